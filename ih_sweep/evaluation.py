"""Fast, seed-faithful bAbI evaluation.

The seed generated 3 greedy tokens for one story at a time. Here each item is first decided
by one batched teacher-forced forward pass: feeding the prompt plus a candidate continuation
(the gold answer and what follows it) reveals the greedy tokens for as long as they agree
with the candidate. When those known tokens already settle the metric the item is done;
otherwise greedy decoding goes on from the pass's own key/value cache (masked to the valid
prefix), or, for models whose cache cannot be reused exactly, by ``generate``. Either way the
outcome is what one-story-at-a-time ``generate`` gives. With scope ``all``, every question
of a story whose prompt tokenizes as a prefix of the story's full text is read off one shared
forward pass.

The evaluator's speed shortcuts (:mod:`.eval_attention`) are checked at run time: the first
batch's teacher-forced logits at the read positions are compared with the plain forward's
(:func:`_check_first_batch`); where they differ beyond the dtype's tolerance the evaluation
goes on without the shortcuts.
"""

from __future__ import annotations

import inspect
import logging
import time
import weakref
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from .data import Item
from .eval_attention import FastPath, fast_attention, read_at
from .metrics import cut_at_stop, decide_partial, final_or_verdict, is_correct, stop_seen, words
from .schema import EvalConfig, Metric, Scope, UserError

log = logging.getLogger(__name__)

__all__ = ["EvalConfig", "ItemResult", "Metric", "Scope", "decide_partial", "evaluate",
           "is_correct", "words"]


@dataclass
class ItemResult:
    item: Item
    continuation: str
    correct: bool
    decided_by: str  # "forward", "decode" (from the pass's cache) or "generate" (fallback)


# --------------------------------------------------------------------------- rows
@dataclass
class _Query:
    index: int  # into items
    pos: int  # position of the prompt's last token in the row
    teacher: list[int]  # candidate continuation tokens fed after the prompt


def _encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text)["input_ids"])


def _encode_all(tokenizer, texts: Sequence[str]) -> list[list[int]]:
    """One batched tokenizer call (fast tokenizers encode a list in one native call)."""
    if not texts:
        return []
    return [list(ids) for ids in tokenizer(list(texts))["input_ids"]]


def build_rows(tokenizer, items: Sequence[Item], max_new_tokens: int
               ) -> list[tuple[list[int], list[_Query]]]:
    """Token rows to run, each answering one or more items (shared story prefixes)."""
    by_story: dict[int, list[int]] = {}
    for i, it in enumerate(items):
        by_story.setdefault(it.story_index, []).append(i)
    groups = [sorted(idxs, key=lambda i: items[i].line) for idxs in by_story.values()]
    lasts = [items[g[-1]] for g in groups]
    last_ids = _encode_all(tokenizer, [it.prompt for it in lasts])
    full_ids = _encode_all(tokenizer, [it.prompt + it.target + "\n" for it in lasts])
    others = [i for g in groups for i in g[:-1]]
    other_ids = dict(zip(others, _encode_all(tokenizer, [items[i].prompt for i in others])))
    rows: list[tuple[list[int], list[_Query]]] = []
    need = max_new_tokens - 1
    for idxs, last, prompt_ids, full in zip(groups, lasts, last_ids, full_ids):
        if full[:len(prompt_ids)] != prompt_ids:
            full = prompt_ids + _continuation(tokenizer, last.target)
        row = full[:len(prompt_ids) + need]
        queries = [_Query(idxs[-1], len(prompt_ids) - 1, row[len(prompt_ids):])]
        for i in idxs[:-1]:
            ids = other_ids[i]
            if row[:len(ids)] == ids:
                queries.append(_Query(i, len(ids) - 1, row[len(ids):len(ids) + need]))
            else:  # tokenization differs at the boundary: the item gets its own row
                own = ids + _continuation(tokenizer, items[i].target)[:need]
                rows.append((own, [_Query(i, len(ids) - 1, own[len(ids):])]))
        rows.append((row, queries))
    return rows


def _continuation(tokenizer, target: str) -> list[int]:
    return list(tokenizer(target + "\n", add_special_tokens=False)["input_ids"])


# --------------------------------------------------------------------------- model passes
def _pad_id(tokenizer) -> int:
    if tokenizer.pad_token_id is not None:
        return int(tokenizer.pad_token_id)
    return int(tokenizer.eos_token_id)


def _cache_argument(model) -> str | None:
    """The forward keyword that takes a cache (``cache`` from transformers 5.x's rename)."""
    params = inspect.signature(model.forward).parameters
    return next((name for name in ("cache", "past_key_values") if name in params), None)


def _reusable_cache(model, width: int, budget: int):
    """A fresh DynamicCache the teacher-forced pass fills, so undecided items continue from
    it; None where continuing would not be exact (a sliding window the decode could reach,
    cache layers other than plain or sliding key/value)."""
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    if _cache_argument(model) is None:
        return None
    text_config = model.config.get_text_config(decoder=True)
    window = getattr(text_config, "sliding_window", None)
    if window and width + budget >= window:
        return None
    try:
        cache = DynamicCache(config=model.config)
    except Exception:  # configs the cache cannot read: decode by generate instead
        return None
    if not all(isinstance(layer, DynamicLayer) for layer in cache.layers):
        return None
    return cache


MIN_SHARED_PREFIX = 8  # tokens; a shorter common prefix is not worth its own forward pass


def shared_prefix_length(rows) -> int:
    """Tokens every row starts with, stopping before any row's first read position (its
    logits must come out of the pass)."""
    first = rows[0][0]
    n = min(q.pos for _, queries in rows for q in queries)
    for row, _ in rows[1:]:
        n = min(n, len(row))
        n = next((i for i in range(n) if row[i] != first[i]), n)
    return n


_LOGITS_AT: ContextVar[torch.Tensor | None] = ContextVar("ih_sweep_logits_at", default=None)
# per-query logits at the read positions, recorded by the passes of the batch being checked
_RECORD: ContextVar[dict[int, torch.Tensor] | None] = ContextVar("ih_sweep_record",
                                                                  default=None)
_INSTALLED = "_ih_sweep_evaluating"


@contextmanager
def installed(model, layers: bool | None = None) -> Iterator[FastPath]:
    """The evaluator's shortcuts on ``model`` while inside: its attention (see
    :mod:`.eval_attention`; ``layers``: ``eval.fast_layers``) and logits computed only at the
    positions the calling thread asks for. Both act only on passes that ask, so batches in
    other threads and decoding steps see the plain model. Yields the attention's
    :class:`.eval_attention.FastPath`. Re-entrant (an inner call changes nothing)."""
    outer = getattr(model, _INSTALLED, None)
    if outer is not None:
        yield outer
        return

    def pick(module, args):
        gather = _LOGITS_AT.get()
        if gather is None:
            return None
        h = args[0]
        idx = gather[:, :, None].expand(-1, -1, h.shape[-1])
        return (torch.gather(h, 1, idx), *args[1:])

    handle = model.get_output_embeddings().register_forward_pre_hook(pick)
    try:
        with fast_attention(model, layers) as fast:
            setattr(model, _INSTALLED, fast)
            yield fast
    finally:
        vars(model).pop(_INSTALLED, None)
        handle.remove()


@contextmanager
def _logits_at(gather: torch.Tensor) -> Iterator[None]:
    token = _LOGITS_AT.set(gather)
    try:
        yield
    finally:
        _LOGITS_AT.reset(token)


@torch.no_grad()
def _greedy_from_forward(model, rows, pad_id: int, max_new_tokens: int, device,
                         cache=None) -> dict[int, list[int]]:
    """For each query: the argmax tokens at its positions (prompt end, then each teacher).
    With ``cache``, the pass also fills it (key/values of every row position), and a prefix
    all rows share (the prompt header) runs once instead of once per row."""
    width = max(len(r) for r, _ in rows)
    shared = shared_prefix_length(rows) if cache is not None else 0
    if shared < MIN_SHARED_PREFIX:
        shared = 0
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    positions: list[list[int]] = []
    for b, (row, queries) in enumerate(rows):
        ids[b, :len(row)] = torch.tensor(row)
        mask[b, :len(row)] = 1
        pos = []
        for q in queries:
            pos.extend(q.pos - shared + j
                       for j in range(min(max_new_tokens, len(q.teacher) + 1)))
        positions.append(pos)
    k = max(len(p) for p in positions)
    gather = torch.zeros((len(rows), k), dtype=torch.long)
    for b, pos in enumerate(positions):
        gather[b, :len(pos)] = torch.tensor(pos)
    gather = gather.to(device)
    kwargs = {"use_cache": False}
    if cache is not None:
        kwargs = {"use_cache": True, _cache_argument(model): cache}
    if shared:  # the common prefix once, its key/values copied to every row
        model(input_ids=ids[:1, :shared].to(device), logits_to_keep=1, **kwargs)
        cache.batch_repeat_interleave(len(rows))
    with read_at(gather), _logits_at(gather):
        logits = model(input_ids=ids[:, shared:].to(device),
                       attention_mask=mask.to(device), **kwargs).logits
    top = logits.argmax(-1).cpu()
    record = _RECORD.get()
    out: dict[int, list[int]] = {}
    for b, (_, queries) in enumerate(rows):
        cursor = 0
        for q in queries:
            n = min(max_new_tokens, len(q.teacher) + 1)
            out[q.index] = top[b, cursor:cursor + n].tolist()
            if record is not None:
                record[q.index] = logits[b, cursor:cursor + n].float().cpu()
            cursor += n
    return out


@torch.no_grad()
def continue_greedy(model, cache, width: int, starts: Sequence[tuple[int, int, list[int]]],
                    max_new_tokens: int, eos: int | None, device,
                    finished: Callable[[list[int]], bool] | None = None) -> list[list[int]]:
    """Greedy decoding onward from the teacher-forced pass's cache, batched.

    ``starts``: (row in the pass, prompt end position, known greedy tokens). The cache holds
    exact key/values for the prompt and the known tokens but the last (they matched the
    teacher); later columns (other teacher tokens, padding) are masked out, and each new
    token gets its true position id. ``finished``: tokens after which a sequence needs no
    more (a stop string generated), or None.
    """
    cache.batch_select_indices(torch.tensor([row for row, _, _ in starts], device=device))
    valid = torch.tensor([pos + len(known) for _, pos, known in starts])
    mask = (torch.arange(width)[None, :] < valid[:, None]).long()
    tokens = [list(known) for _, _, known in starts]
    nxt = torch.tensor([t[-1] for t in tokens])
    position = valid.clone()
    arg = _cache_argument(model)

    def open_(t: list[int]) -> bool:
        return len(t) < max_new_tokens and (eos is None or t[-1] != eos) and \
            (finished is None or not finished(t))

    while any(open_(t) for t in tokens):
        mask = torch.cat([mask, torch.ones(len(tokens), 1, dtype=torch.long)], 1)
        logits = model(input_ids=nxt[:, None].to(device), attention_mask=mask.to(device),
                       position_ids=position[:, None].to(device), use_cache=True,
                       logits_to_keep=1, **{arg: cache}).logits
        nxt = logits[:, -1].argmax(-1).cpu()
        for j, t in enumerate(tokens):
            if open_(t):
                t.append(int(nxt[j]))
        position += 1
    return tokens


def _known_greedy(argmax: list[int], teacher: list[int], eos: int | None) -> list[int]:
    """Greedy tokens that are certain: each is known while the previous matched the teacher."""
    known = [argmax[0]]
    for j in range(1, len(argmax)):
        if known[-1] != teacher[j - 1] or known[-1] == eos:
            break
        known.append(argmax[j])
    return known


@torch.no_grad()
def generate_greedy(model, tokenizer, prompts: Sequence[str], max_new_tokens: int,
                    device) -> list[list[int]]:
    """Real greedy generation, batched with left padding (the fallback)."""
    pad_id = _pad_id(tokenizer)
    encoded = [_encode(tokenizer, p) for p in prompts]
    width = max(len(e) for e in encoded)
    ids = torch.full((len(encoded), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, e in enumerate(encoded):
        ids[b, width - len(e):] = torch.tensor(e)
        mask[b, width - len(e):] = 1
    out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                         max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                         pad_token_id=pad_id, temperature=None, top_p=None, top_k=None)
    gen = out[:, width:].cpu().tolist()
    return [_cut_at_eos(g, tokenizer.eos_token_id) for g in gen]


def _cut_at_eos(tokens: list[int], eos: int | None) -> list[int]:
    if eos is not None and eos in tokens:
        return tokens[:tokens.index(eos) + 1]
    return tokens


def _decode(tokenizer, tokens: list[int]) -> str:
    return tokenizer.decode(tokens, skip_special_tokens=True)


def _device(model) -> torch.device:
    return next(model.parameters()).device


def _run_batches(fn, work: list, batch_size: int, desc: str, progress: bool,
                 workers: int = 1, bar=None, weight=len):
    """Apply fn to batches of work; on CUDA out-of-memory halve the batch and go on.
    With ``workers`` > 1 (CPU), that many batches run at once (see :func:`_in_threads`).
    ``bar``: a progress bar to update (left open) instead of one of its own, by
    ``weight(batch)`` per batch done."""
    bs = max(1, batch_size)
    own_bar = bar is None
    if own_bar:
        bar = tqdm(total=len(work), desc=desc, disable=not progress, leave=False)
    if workers > 1 and len(work) > bs:
        results = _in_threads(fn, [work[i:i + bs] for i in range(0, len(work), bs)],
                              workers, bar, weight)
        if own_bar:
            bar.close()
        return results
    results = []
    start = 0
    while start < len(work):
        chunk = work[start:start + bs]
        try:
            results.append(fn(chunk))
        except torch.cuda.OutOfMemoryError:
            if bs == 1:
                raise
            bs = max(1, len(chunk) // 2)
            torch.cuda.empty_cache()
            log.warning("CUDA out of memory: batch size halved to %d", bs)
            continue
        start += len(chunk)
        bar.update(weight(chunk))
    if own_bar:
        bar.close()
    return results


@contextmanager
def intra_op_threads(n: int) -> Iterator[None]:
    """torch's intra-op thread count while inside (threads started inside inherit it)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _in_threads(fn, chunks: list, workers: int, bar, weight=len) -> list:
    """Batches in ``workers`` threads at once, the cores split between them.

    Why: on CPU the evaluator's operators are small (a 2-layer model, 16-dim heads) and
    parallelise poorly inside one batch (2 threads: ~1.2x one), while whole batches are
    independent: two at once on one thread each evaluate ~1.2x faster than one at a time
    on two (benchmarks/README.md). torch releases the GIL inside its operators."""
    workers = min(workers, len(chunks))
    per_worker = max(1, torch.get_num_threads() // workers)

    def run(chunk):
        with torch.no_grad():  # grad mode is per thread
            return fn(chunk)

    with intra_op_threads(per_worker), ThreadPoolExecutor(workers) as pool:
        futures = {pool.submit(run, c): weight(c) for c in chunks}
        results = []
        try:
            for future in as_completed(futures):
                results.append(future.result())
                bar.update(futures[future])
        except BaseException:  # a failed batch (or Ctrl-C): start no other
            for future in futures:
                future.cancel()
            raise
    return results


def _allowed(choices) -> str:
    return ", ".join(str(c) for c in choices)


def _evaluate_rows(model, tokenizer, items: Sequence[Item], rows, settings: EvalConfig,
                   device) -> dict[int, ItemResult]:
    """One batch: the teacher-forced pass, then decoding for what it left undecided."""
    budget = settings.max_new_tokens
    eos = tokenizer.eos_token_id
    width = max(len(r) for r, _ in rows)
    cache = _reusable_cache(model, width, budget)
    argmax = _greedy_from_forward(model, rows, _pad_id(tokenizer), budget, device, cache)
    results: dict[int, ItemResult] = {}
    pending: list[tuple[int, int, list[int]]] = []  # (row, prompt end, known tokens)
    index_of: list[int] = []
    for b, (_, queries) in enumerate(rows):
        for q in queries:
            toks = _known_greedy(argmax[q.index], q.teacher, eos)
            text = _decode(tokenizer, toks)
            verdict = final_or_verdict(text, toks, items[q.index].target, settings, eos)
            if verdict is None:
                pending.append((b, q.pos, toks))
                index_of.append(q.index)
            else:
                results[q.index] = ItemResult(items[q.index], cut_at_stop(text, settings.stop),
                                              verdict, "forward")
    if not pending:
        return results
    if cache is not None:
        finished = (lambda t: stop_seen(_decode(tokenizer, t), settings.stop)) \
            if settings.stop else None
        conts = continue_greedy(model, cache, width, pending, budget, eos, device, finished)
        how = "decode"
    else:
        conts = generate_greedy(model, tokenizer, [items[i].prompt for i in index_of], budget,
                                device)
        how = "generate"
    for idx, toks in zip(index_of, conts):
        text = _decode(tokenizer, toks)
        results[idx] = ItemResult(items[idx], cut_at_stop(text, settings.stop),
                                  is_correct(text, items[idx].target, settings.metric,
                                             settings.stop), how)
    return results


class PromptTooLong(UserError):
    """A prompt (plus the tokens to generate) longer than the model's positions."""

    kind = "data"


def check_prompt_lengths(model, tokenizer, items: Sequence[Item], max_new_tokens: int
                         ) -> None:
    """Every prompt plus ``max_new_tokens`` must fit the model's positions: raises
    :class:`PromptTooLong` naming the longest prompt, the limit and what to do, before any
    evaluation (a longer input indexes past the position table)."""
    from .architecture import position_limit

    limit = position_limit(model.config)
    if limit is None or not items:
        return
    lengths = [len(ids) for ids in _encode_all(tokenizer, [it.prompt for it in items])]
    longest = max(range(len(items)), key=lengths.__getitem__)
    if lengths[longest] + max_new_tokens > limit:
        item = items[longest]
        raise PromptTooLong(
            f"story {item.story_index} question {item.question_index}: the prompt has "
            f"{lengths[longest]} tokens and eval.max_new_tokens={max_new_tokens} more are "
            f"generated, but the model takes {limit} positions; use a model with more "
            "positions, or a bAbI task with shorter stories (eval.scope=all does not shorten "
            "the last question's prompt)")


def _items_in(rows) -> int:
    return sum(len(queries) for _, queries in rows)


@torch.no_grad()
def evaluate(model, tokenizer, items: Sequence[Item], settings: EvalConfig, bar=None
             ) -> list[ItemResult]:
    """Greedy-decoding outcome of every item, identical to one-at-a-time ``generate``.
    ``settings``: the ``eval`` group of the config (:class:`.schema.EvalConfig`). ``bar``:
    a progress bar (in items) to advance instead of one of its own, so that a job that
    evaluates in checkpointed chunks shows one bar."""
    if settings.metric not in tuple(Metric):
        raise ValueError(f"eval.metric={settings.metric!r}; allowed values: "
                         f"{_allowed(Metric)}")
    t0 = time.time()
    device = _device(model)
    rows = build_rows(tokenizer, items, settings.max_new_tokens)
    rows.sort(key=lambda r: len(r[0]))  # similar lengths together: less padding
    workers = 1 if device.type != "cpu" else \
        (settings.cpu_worker_count() or torch.get_num_threads())
    results: dict[int, ItemResult] = {}
    bs = max(1, settings.batch_size)

    def run(chunk):
        return _evaluate_rows(model, tokenizer, items, chunk, settings, device)

    own_bar = bar is None
    if own_bar:
        bar = tqdm(total=len(items), desc="evaluate", unit="item",
                   disable=not settings.progress, leave=False)
    try:
        with installed(model, settings.fast_layers) as fast:
            key = fast.layers
            verdict = _VERIFIED.get(model, {}).get(key) if fast.on else None
            if verdict is False:
                fast.off()  # found wrong on this model earlier in this process
            if fast.on and verdict is None and rows:
                # before any thread starts: nothing runs alongside
                parts = _check_first_batch(model, tokenizer, rows[:bs], fast, run, bs,
                                           settings, device, bar)
                _VERIFIED.setdefault(model, {})[key] = fast.on
                rest = rows[bs:]
            else:
                parts, rest = [], rows
            parts += _run_batches(run, rest, bs, "evaluate", settings.progress, workers, bar,
                                  _items_in)
            for part in parts:
                results.update(part)
    finally:
        if own_bar:
            bar.close()
    decoded = sum(r.decided_by != "forward" for r in results.values())
    log.info("evaluated %d items in %.1f s (%d decoded past the teacher-forced pass)",
             len(items), time.time() - t0, decoded)
    return [results[i] for i in range(len(items))]


# --------------------------------------------------------------------------- run-time check
# Largest difference allowed between the shortcuts' logits and the plain forward's at the read
# positions, as a fraction of the logit scale (the largest |logit| there), by the dtype the
# model computes in. Rounding alone moves a logit by a few units of the dtype's precision times
# the scale (float32: eps 1.2e-7, bfloat16: 7.8e-3, float16: 9.8e-4) per layer, and the
# shortcuts reorder sums (blocked softmax, gathered queries, a rotary on another layout): in
# float32 they differ by ~1e-6 of the scale (measured: tiny model and the test models), so
# 1e-4 leaves a wide margin while a wrong shortcut (a mask, a position, a rotary off) moves
# logits by a sizeable fraction of the scale. The half-precision bounds are a few units of
# their precision, for the same reason.
# models whose shortcuts were checked in this process: {model: {fast_layers: passed}}. The
# check compares attention paths; ablation hooks act on the o_proj input alike in both, so
# one check per model and setting covers every later evaluation of it.
_VERIFIED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
CHECK_TOLERANCE = {torch.float32: 1e-4, torch.float64: 1e-4, torch.bfloat16: 5e-2,
                   torch.float16: 1e-2}


def check_tolerance(model) -> float:
    """:data:`CHECK_TOLERANCE` of the least precise dtype among the model's embedding and
    unembedding weights (they stay in the compute dtype under 4/8-bit quantization)."""
    dtypes = {m.weight.dtype for m in (model.get_input_embeddings(),
                                       model.get_output_embeddings())
              if m is not None and m.weight.is_floating_point()}
    return max((CHECK_TOLERANCE.get(d, 5e-2) for d in dtypes), default=5e-2)


def compare_logits(fast: torch.Tensor, plain: torch.Tensor, tolerance: float) -> str | None:
    """None where ``fast`` [n, vocab] matches ``plain`` within ``tolerance`` of the logit
    scale and picks the same token at every position, or one whose plain logit is within
    ``tolerance`` x scale of the plain maximum (a near-tie); else what differs, in words.
    (Within the first condition a flipped pick can only trail by up to twice the tolerance;
    the second accepts only half of that band.)"""
    scale = max(float(plain.abs().max()), 1e-6)
    diff = float((fast - plain).abs().max())
    if diff > tolerance * scale:
        return f"logits differ by {diff:.3g} (tolerance {tolerance:g} x scale {scale:.3g})"
    picked = fast.argmax(-1)
    best = plain.max(-1).values
    behind = best - plain.gather(-1, picked[:, None])[:, 0]
    if bool((behind > tolerance * scale).any()):
        return "the greedy token differs where the plain forward has no near-tie"
    return None


def _check_first_batch(model, tokenizer, rows, fast: FastPath, run, bs: int,
                       settings: EvalConfig, device, bar) -> list:
    """The first batch with the shortcuts, its read-position logits recorded; the same rows
    through the plain forward (the attention shortcuts suspended: sdpa and the layers' own
    forwards, no cache, no shared prefix; only the unembedding still runs at the read
    positions alone, an exact gather); on a
    mismatch, one warning, the shortcuts off for the rest of the evaluation, and the batch
    again without them. Runs before any other batch (no thread shares the model then)."""
    shortcut: dict[int, torch.Tensor] = {}
    token = _RECORD.set(shortcut)
    try:
        parts = _run_batches(run, rows, bs, "evaluate", settings.progress, 1, bar, _items_in)
    finally:
        _RECORD.reset(token)
    plain: dict[int, torch.Tensor] = {}
    token = _RECORD.set(plain)
    try:
        with fast.suspended():
            _run_batches(lambda chunk: _greedy_from_forward(
                model, chunk, _pad_id(tokenizer), settings.max_new_tokens, device),
                rows, bs, "check", False, 1)
    finally:
        _RECORD.reset(token)
    order = sorted(plain)
    got = torch.cat([shortcut[i] for i in order])
    ref = torch.cat([plain[i] for i in order])
    problem = compare_logits(got, ref, check_tolerance(model))
    if problem is None:
        return parts
    log.warning("the evaluator's shortcuts (eval_attention%s) do not reproduce the plain "
                "forward on the first batch (%s): evaluating without them",
                ", fast_layers" if fast.layers else "", problem)
    fast.off()
    return _run_batches(run, rows, bs, "evaluate", False, 1)
