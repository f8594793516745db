"""How many rows a batch holds: ``batch_size: auto`` (``eval.batch_size``,
``scoring.batch_size``, ``scan.heads_per_pass``).

On CPU ``auto`` keeps the numbers the project has always used (:data:`CPU_EVAL_ROWS`,
:data:`CPU_SCORING_ROWS`, :data:`CPU_HEADS_PER_PASS`). On a CUDA device it fills the free
memory: the rows a batch holds follow from the device's free bytes and the model's shape by
the memory model below, rounded down to a power of two (so that a little more or less free
memory gives the same batches, hence, in half precision, the same near-tie outcomes from run
to run) and capped. The evaluator still halves its batch on ``torch.cuda.OutOfMemoryError``
(:func:`ih_sweep.evaluation.batches.run_batches`):
the model is an estimate, that is the safety net.

Memory model (bytes; ``b`` = bytes per element of the compute dtype: 2 for bfloat16 and
float16, also under nf4/int8 whose layers compute in 16 bits; 4 for float32). A batch of
``rows`` rows padded to ``T`` tokens needs ``rows x T`` tokens of

- **KV cache**, :func:`kv_bytes_per_token`: ``2 (keys, values) x layers x KV heads x
  head_dim x b``, kept for every layer over the whole pass (the evaluator fills a
  ``DynamicCache`` so that undecided items decode on from it;
  ``transformers.cache_utils.DynamicLayer`` stores ``[batch, kv_heads, T, head_dim]`` per
  layer for keys and for values).
- **Activations**, :func:`activation_bytes_per_token`: the peak inside one decoder layer (a
  layer's buffers are freed before the next one runs), the larger of its two blocks. The
  attention block: the residual stream, the normed input and the o_proj output (3 x hidden),
  the queries before and after the rotary embedding, the keys and values repeated to the
  query heads (grouped-query attention in sdpa's fallback: 2 more) and the heads' output
  (5 x heads x head_dim), the keys before and after the rotary embedding and the values
  (3 x KV heads x head_dim). The MLP block: the residual stream and the normed input
  (2 x hidden), the gate's activation, the up projection and their product
  (3 x intermediate), as in the Llama-family ``MLP.forward``
  ``down_proj(act_fn(gate_proj(x)) * up_proj(x))``. Times ``b``.
- **Logits** at the read positions only, :func:`logits_bytes_per_row`: the evaluator runs
  the unembedding on the positions it reads (``max_new_tokens`` a question), ``reads x vocab
  x (b + 4)`` a row (the logits and a float32 copy).
- **Eager attention's scores**, :func:`eager_bytes_per_row`, where eager attention is used
  (``attn_implementation=eager``; scoring needs the probabilities): one layer's scores while
  it runs, ``heads x T x T`` a row, in ``b``, their float32 softmax and its cast back
  (transformers' ``eager_attention_forward``): ``heads x T^2 x (2b + 4)``; with
  ``output_attentions`` every layer's probabilities are kept too (``layers x heads x T^2 x
  b``). sdpa's flash and memory-efficient kernels materialise no scores.

Of the free bytes :data:`FILL` are planned for and :data:`RESERVE_BYTES` are held back
(:func:`usable_bytes`). Checked against the H200 measurement of 2026-11-30
(``benchmarks/README.md``): Mistral-7B shape, bf16, batches of 64 rows of ~160 tokens,
peak 15.8 GiB of which 13.5 GiB weights, i.e. <= 2.3 GiB for the batch; this model gives
2.2-2.8 GiB for 64 rows of 160-200 tokens.

The pure functions take plain numbers; the three resolvers (:func:`eval_batch_rows`,
:func:`scoring_batch_rows`, :func:`scan_heads_per_pass`) read the model and the device.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

AUTO = "auto"
GIB = 2**30
CPU_EVAL_ROWS = 32  # eval.batch_size=auto on CPU: the project's number before auto
CPU_SCORING_ROWS = 8  # scoring.batch_size=auto on CPU
CPU_HEADS_PER_PASS = 1  # scan.heads_per_pass=auto on CPU (fastest on a 2-core CPU)
FILL = 0.8  # share of the free bytes planned for: the allocator's fragmentation and the
# small tensors the model leaves out live in the rest
RESERVE_BYTES = 1 * GIB  # held back besides: cuBLAS and attention kernels' workspaces, an
# nf4/int8 weight matrix dequantised while it runs (Mistral-7B's largest: 14336 x 4096 bf16,
# 112 MiB)
# At most this many rows a batch. Measured on an H200 (Mistral-7B shape, bf16, 1,024 stories,
# benchmarks/README.md): the evaluator took 8.92 / 6.40 / 5.53 s at 64 / 128 / 256 rows, the
# plain forward 4.83 s at 256: within 1.15x there; larger batches were not measured.
MAX_ROWS = 256
COPY_BUFFERS = 6  # scoring's copying pass: float32 [rows, positions, heads, hidden] buffers
# alive at once (direct path, the final norm's temporaries and output, the gathered
# unembedding rows, their product)


@dataclass(frozen=True)
class ModelShape:
    """What the memory model needs of a decoder-only transformer (counts, not bytes)."""

    layers: int
    hidden: int
    heads: int  # query heads a layer
    kv_heads: int  # key/value heads a layer (= heads without grouped-query attention)
    head_dim: int
    intermediate: int  # the MLP's inner width
    vocab: int


def model_shape(config) -> ModelShape:
    """:class:`ModelShape` from a Hugging Face model config, under any supported family's key
    names (layers and heads through :func:`ih_sweep.model.shape.config_shape`). Missing
    keys: KV heads = heads, head_dim = hidden / heads, intermediate = 4 x hidden (GPT-2's
    ``n_inner=None``), vocab = 0. Raises
    :class:`~ih_sweep.model.shape.UnsupportedArchitecture` without layer/head counts or a
    hidden size."""
    from ih_sweep.model.shape import (
        UnsupportedArchitecture,
        config_shape,
        config_value,
        text_config,
    )

    layers, heads = config_shape(config)
    text = text_config(config)
    hidden = config_value(text, "hidden_size", "n_embd", "d_model")
    if hidden is None:
        raise UnsupportedArchitecture(f"{type(config).__name__}: config lacks the hidden size")
    return ModelShape(
        layers=layers, hidden=hidden, heads=heads,
        kv_heads=config_value(text, "num_key_value_heads") or heads,
        head_dim=config_value(text, "head_dim") or hidden // heads,
        intermediate=config_value(text, "intermediate_size", "n_inner", "ffn_dim")
        or 4 * hidden,
        vocab=config_value(text, "vocab_size") or 0)


# --------------------------------------------------------------------------- pure maths
def kv_bytes_per_token(shape: ModelShape, dtype_bytes: int) -> int:
    """Bytes of keys and values a token leaves in the cache, all layers."""
    return 2 * shape.layers * shape.kv_heads * shape.head_dim * dtype_bytes


def activation_bytes_per_token(shape: ModelShape, dtype_bytes: int) -> int:
    """Bytes a token's activations take at the peak inside one decoder layer (see the module
    docstring: the larger of the attention block and the MLP block)."""
    q, kv = shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim
    attention = 3 * shape.hidden + 5 * q + 3 * kv
    mlp = 2 * shape.hidden + 3 * shape.intermediate
    return max(attention, mlp) * dtype_bytes


def logits_bytes_per_row(shape: ModelShape, reads: int, dtype_bytes: int) -> int:
    """Bytes of a row's logits at its ``reads`` read positions (and a float32 copy)."""
    return reads * shape.vocab * (dtype_bytes + 4)


def eager_bytes_per_row(shape: ModelShape, tokens: int, dtype_bytes: int,
                        kept_layers: int = 0) -> int:
    """Bytes of eager attention's scores for one row of ``tokens``: one layer's scores,
    float32 softmax and cast while it runs, plus ``kept_layers`` layers' probabilities kept
    (``output_attentions``)."""
    square = shape.heads * tokens * tokens
    return square * (2 * dtype_bytes + 4) + kept_layers * square * dtype_bytes


def usable_bytes(free_bytes: float) -> int:
    """Bytes a batch may plan for out of ``free_bytes``: ``FILL x free - RESERVE_BYTES``
    (0 or more)."""
    return max(0, int(FILL * free_bytes) - RESERVE_BYTES)


def tokens_per_batch(free_bytes: float, shape: ModelShape, dtype_bytes: int, *,
                     kv_cache: bool = True) -> int:
    """The token budget: how many tokens' KV cache (``kv_cache``) and activations fit in the
    usable part of ``free_bytes`` (logits and eager scores left out: per row, see
    :func:`rows_that_fit`)."""
    per_token = activation_bytes_per_token(shape, dtype_bytes)
    if kv_cache:
        per_token += kv_bytes_per_token(shape, dtype_bytes)
    return usable_bytes(free_bytes) // per_token


def row_bytes(shape: ModelShape, dtype_bytes: int, tokens: int, reads: int, *,
              kv_cache: bool = True, eager: bool = False) -> int:
    """Bytes one row of ``tokens`` (padded length) with ``reads`` read positions needs in
    the evaluator's teacher-forced pass (the memory model of the module docstring)."""
    per_token = activation_bytes_per_token(shape, dtype_bytes)
    if kv_cache:
        per_token += kv_bytes_per_token(shape, dtype_bytes)
    total = tokens * per_token + logits_bytes_per_row(shape, reads, dtype_bytes)
    if eager:
        total += eager_bytes_per_row(shape, tokens, dtype_bytes)
    return total


def rows_that_fit(free_bytes: float, shape: ModelShape, dtype_bytes: int, tokens: int,
                  reads: int = 3, *, kv_cache: bool = True, eager: bool = False) -> int:
    """How many rows of :func:`row_bytes` fit in the usable part of ``free_bytes`` (0 or
    more; not rounded, not capped)."""
    return usable_bytes(free_bytes) // row_bytes(shape, dtype_bytes, tokens, reads,
                                                 kv_cache=kv_cache, eager=eager)


def power_of_two_at_most(n: int) -> int:
    """The largest power of two <= ``n``; 1 for ``n`` < 2."""
    return 1 << (max(1, int(n)).bit_length() - 1)


def rows_per_batch(free_bytes: float, shape: ModelShape, dtype_bytes: int, tokens: int,
                   reads: int = 3, *, kv_cache: bool = True, eager: bool = False,
                   cap: int = MAX_ROWS) -> int:
    """Rows a batch of the evaluator holds: :func:`rows_that_fit` rounded down to a power of
    two, at least 1, at most ``cap``. Monotone (non-decreasing) in ``free_bytes``."""
    fit = rows_that_fit(free_bytes, shape, dtype_bytes, tokens, reads, kv_cache=kv_cache,
                        eager=eager)
    return max(1, min(cap, power_of_two_at_most(fit)))


def scoring_row_bytes(shape: ModelShape, dtype_bytes: int, seq_len: int, repeats: int,
                      bos: bool = True) -> int:
    """Bytes one random sequence needs in :func:`ih_sweep.heads.scoring.score_heads`: the repeated
    pass (eager, every layer's probabilities kept, and still kept during the next pass; one
    layer's float32 copy, target mask and product in ``prefix_matching``), then the plain
    pass (eager, probabilities kept; every layer's o_proj input stored) and its copying
    maths (:data:`COPY_BUFFERS` float32 buffers of [positions, heads, hidden] for one
    layer). No KV cache (``use_cache=False``)."""
    t1 = int(bos) + seq_len * repeats
    t2 = int(bos) + seq_len
    act = activation_bytes_per_token(shape, dtype_bytes)
    repeated = t1 * act + eager_bytes_per_row(shape, t1, dtype_bytes, shape.layers) + \
        shape.heads * t1 * t1 * 8
    plain = t2 * act + eager_bytes_per_row(shape, t2, dtype_bytes, shape.layers) + \
        shape.layers * t2 * shape.heads * shape.head_dim * dtype_bytes + \
        COPY_BUFFERS * seq_len * shape.heads * shape.hidden * 4
    kept_repeated = shape.layers * shape.heads * t1 * t1 * dtype_bytes
    return max(repeated, kept_repeated + plain)


def scoring_rows(free_bytes: float, shape: ModelShape, dtype_bytes: int, seq_len: int,
                 repeats: int, n_sequences: int, bos: bool = True) -> int:
    """Sequences a scoring batch holds: what fits (:func:`scoring_row_bytes`), rounded down
    to a power of two, at least 1, at most ``n_sequences``."""
    fit = usable_bytes(free_bytes) // scoring_row_bytes(shape, dtype_bytes, seq_len, repeats,
                                                        bos)
    return max(1, min(n_sequences, power_of_two_at_most(fit)))


def scan_replica_bytes(shape: ModelShape, dtype_bytes: int, rows: int, tokens: int,
                       reads: int) -> int:
    """Bytes one head replica of a scan probe (``rows`` x ``tokens``, ``reads`` scored
    positions a row) needs in
    :meth:`ih_sweep.pipeline.head_scan._Tail.run_from`: activations (no cache),
    a boolean [T, T] attention mask a row, logits at the scored positions with their float32
    copy and log-softmax."""
    per_row = tokens * activation_bytes_per_token(shape, dtype_bytes) + tokens * tokens + \
        reads * shape.vocab * (dtype_bytes + 8)
    return rows * per_row


def scan_fixed_bytes(shape: ModelShape, dtype_bytes: int, rows: int, tokens: int) -> int:
    """Bytes a scan probe holds before any replica runs
    (:meth:`ih_sweep.pipeline.head_scan._Tail.capture`):
    every layer's input hidden states, and the clean pass's logits at every position."""
    return rows * tokens * (shape.layers * shape.hidden + shape.vocab) * dtype_bytes


def scan_heads(free_bytes: float, shape: ModelShape, dtype_bytes: int,
               probes: list[tuple[int, int, int]]) -> int:
    """Heads ablated side by side in the exact scan: replicas of the largest probe that fit
    after every probe's fixed part (``probes``: (rows, tokens, reads) each), rounded down to
    a power of two, at least 1, at most the heads of a layer."""
    fixed = sum(scan_fixed_bytes(shape, dtype_bytes, r, t) for r, t, _ in probes)
    replica = max(scan_replica_bytes(shape, dtype_bytes, r, t, k) for r, t, k in probes)
    fit = max(0, usable_bytes(free_bytes) - fixed) // max(1, replica)
    return max(1, min(shape.heads, power_of_two_at_most(fit)))


# --------------------------------------------------------------------------- the device
def free_device_bytes(device) -> int:
    """Bytes a new batch can get on a CUDA ``device``: the driver's free memory
    (``torch.cuda.mem_get_info``) plus what PyTorch's caching allocator holds unused."""
    import torch

    free, _total = torch.cuda.mem_get_info(device)
    cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    return int(free + max(0, cached))


def compute_dtype_bytes(model) -> int:
    """Bytes per element the model computes in: its input embedding's dtype (kept in the
    compute dtype under nf4/int8), else its first floating-point parameter's."""
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    weight = getattr(emb, "weight", None)
    if weight is None or not weight.is_floating_point():
        weight = next(p for p in model.parameters() if p.is_floating_point())
    return weight.element_size()


def _cuda_device(model):
    """The model's device when it is a CUDA device, else None."""
    device = next(model.parameters()).device
    return device if device.type == "cuda" else None


def _eager(model) -> bool:
    from ih_sweep.model.shape import text_config

    return getattr(text_config(model.config), "_attn_implementation", None) == "eager"


_LOGGED: dict[str, tuple] = {}  # setting -> the (value, detail) last logged for it


def reset() -> None:
    """Forget which ``auto`` choices were logged (each is logged again once)."""
    _LOGGED.clear()


def _log_choice(key: str, value: int, free: int, detail: str) -> None:
    """One info line per setting and outcome (evaluate runs once per checkpoint chunk)."""
    if _LOGGED.get(key) != (value, detail):
        _LOGGED[key] = (value, detail)
        log.info("%s=auto: %d (%.1f GiB free on the device; %s)", key, value, free / GIB,
                 detail)


def eval_batch_rows(value: int | str, model, rows: list[tuple[list[int], list[Any]]],
                    max_new_tokens: int) -> int:
    """``eval.batch_size`` as a number of rows: a number is taken as it is (at least 1);
    ``auto`` is :data:`CPU_EVAL_ROWS` off CUDA, else :func:`rows_per_batch` for the model's
    shape and compute dtype, the longest of ``rows`` (the evaluator's (tokens, queries)
    rows; each query has ``teacher`` tokens) and its most read positions a row."""
    if value != AUTO:
        return max(1, int(value))
    device = _cuda_device(model)
    if device is None or not rows:
        return CPU_EVAL_ROWS
    tokens = max(len(row) for row, _ in rows)
    reads = max(sum(min(max_new_tokens, len(q.teacher) + 1) for q in queries)
                for _, queries in rows)
    free = free_device_bytes(device)
    n = rows_per_batch(free, model_shape(model.config), compute_dtype_bytes(model), tokens,
                       reads, eager=_eager(model))
    _log_choice("eval.batch_size", n, free, f"rows of up to {tokens} tokens")
    return n


def scoring_batch_rows(settings, model) -> int:
    """``scoring.batch_size`` (``settings``: :class:`~ih_sweep.config.schema.ScoringConfig`) as a
    number of sequences: a number as it is (at least 1); ``auto`` is
    :data:`CPU_SCORING_ROWS` off CUDA, else :func:`scoring_rows`."""
    if settings.batch_size != AUTO:
        return max(1, int(settings.batch_size))
    device = _cuda_device(model)
    if device is None:
        return CPU_SCORING_ROWS
    free = free_device_bytes(device)
    n = scoring_rows(free, model_shape(model.config), compute_dtype_bytes(model),
                     settings.seq_len, settings.repeats, settings.n_sequences)
    _log_choice("scoring.batch_size", n, free, f"{settings.n_sequences} sequences")
    return n


def scan_heads_per_pass(value: int | str, model, probes: dict[str, Any]) -> int:
    """``scan.heads_per_pass`` as a number: a number as it is (at least 1); ``auto`` is
    :data:`CPU_HEADS_PER_PASS` off CUDA, else :func:`scan_heads` for the probes
    (:class:`ih_sweep.pipeline.head_scan.Probe`: ``ids`` [rows, T], ``pos`` [rows, K])."""
    if value != AUTO:
        return max(1, int(value))
    device = _cuda_device(model)
    if device is None:
        return CPU_HEADS_PER_PASS
    dims = [(int(p.ids.shape[0]), int(p.ids.shape[1]), int(p.pos.shape[1]))
            for p in probes.values()]
    free = free_device_bytes(device)
    n = scan_heads(free, model_shape(model.config), compute_dtype_bytes(model), dims)
    _log_choice("scan.heads_per_pass", n, free, f"probes {dims}")
    return n
