"""Greedy decoding for the evaluator: read off the teacher-forced pass
(:func:`greedy_from_forward`), continued from that pass's key/value cache
(:func:`continue_greedy`), or, where the cache cannot be reused exactly, by ``generate``
(:func:`generate_greedy`). Each gives the same tokens as one-story-at-a-time ``generate``,
with each step's top-1 minus top-2 logit gap and top-1 logit (the near-tie measures).

Forward-pass state (row keys, read positions, logits-at positions, the self-check's record)
goes through the model's :class:`~ih_sweep.model.forward.ForwardContext`.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from ih_sweep.config.schema import EvalConfig
from ih_sweep.evaluation.fastpath.reuse import PassReuse, pass_key
from ih_sweep.evaluation.metrics import final_or_verdict
from ih_sweep.evaluation.rows import MIN_SHARED_PREFIX, encode, shared_prefix_length
from ih_sweep.model.forward import ForwardContext
from ih_sweep.model.tokens import pad_id

if TYPE_CHECKING:  # annotations only (the items' type)
    from ih_sweep.data import Item


@dataclass
class ItemResult:
    """One item's outcome and its continuous measures (results.csv's columns of the same
    names, documented in :mod:`.records`)."""

    item: Item
    continuation: str
    correct: bool
    decided_by: str  # "forward", "decode" (from the pass's cache) or "generate" (fallback)
    # logits: smallest top-1 minus top-2 gap over the greedy steps up to the deciding one
    margin: float = math.nan
    near_tie: bool = False  # some step up to the deciding one is a near-tie (see margins)
    gold_logprob: float = math.nan  # nats: sum of log p(gold answer token) given the prompt
    logit_diff: float = math.nan  # gold first-token logit minus the best other candidate's


def cache_argument(model) -> str | None:
    """The forward keyword that takes a cache (``cache`` from transformers 5.x's rename)."""
    params = inspect.signature(model.forward).parameters
    return next((name for name in ("cache", "past_key_values") if name in params), None)


def reusable_cache(model, width: int, budget: int):
    """A fresh DynamicCache the teacher-forced pass fills, so undecided items continue from
    it; None where continuing would not be exact (a sliding window the decode could reach,
    cache layers other than plain or sliding key/value)."""
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    if cache_argument(model) is None:
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


@dataclass
class Read:
    """What one query needs from the teacher-forced pass (host values)."""

    argmax: list[int]  # greedy token at each greedy read position
    gap: list[float]  # top-1 minus top-2 logit there
    top: list[float]  # the top-1 logit there (the near-tie scale)
    gold_logprob: float
    logit_diff: float


def read_stats(logits: torch.Tensor, targets: torch.Tensor, others: torch.Tensor) -> torch.Tensor:
    """Per read position, stacked for one copy to the host: [..., 5] float32 of (argmax,
    top-1 minus top-2 logit, top-1 logit, log p(target), logit(target) minus the largest
    logit among ``others`` that are not the target (+inf when none)).

    ``logits`` [..., vocab]; ``targets`` [...] token ids; ``others`` [..., C] token ids (pad
    with the target: a pad never counts). Token ids stay exact in float32 below 2**24."""
    full = logits.float()
    target = full.gather(-1, targets[..., None])[..., 0]
    rival = full.gather(-1, others).masked_fill(others == targets[..., None], -math.inf)
    return torch.cat([step_stats(logits), torch.stack([target - full.logsumexp(-1),
                                                       target - rival.amax(-1)], -1)], -1)


def step_stats(logits: torch.Tensor) -> torch.Tensor:
    """[..., 3] float32 of (argmax, top-1 minus top-2, top-1) for greedy decoding steps."""
    top2 = logits.topk(2, -1).values.float()
    return torch.stack([logits.argmax(-1).float(), top2[..., 0] - top2[..., 1], top2[..., 0]],
                       -1)


@torch.no_grad()
def greedy_from_forward(model, rows, pad_id: int, max_new_tokens: int, device,
                        cache=None, ctx: ForwardContext | None = None) -> dict[int, Read]:
    """For each query: the argmax tokens at its greedy positions (prompt end, then each
    teacher), their top-2 gaps, the gold answer's log-probability and first-token logit
    difference. With ``cache``, the pass also fills it (key/values of every row position),
    and a prefix all rows share (the prompt header) runs once instead of once per row.
    The inputs go to the device in one copy and the results come back in one. ``ctx``: the
    model's :class:`~ih_sweep.model.forward.ForwardContext` (default: ``model``'s); the pass
    runs with its row keys, row head sets (each row's first query's ``head_set``), read
    positions, logits-at positions and, where the model has a store of unablated layers
    (:mod:`.fastpath.reuse`), the pass's key into it set there, and where its
    :attr:`~ih_sweep.model.forward.ForwardContext.record` is set, each query's logits at its
    read positions go into it."""
    ctx = ctx if ctx is not None else ForwardContext.of(model)
    width = max(len(r) for r, _ in rows)
    shared = shared_prefix_length(rows) if cache is not None else 0
    if shared < MIN_SHARED_PREFIX or ctx.row_dependent:  # resample: rows differ from BOS on
        shared = 0
    n_read = [[q.reads(max_new_tokens) for q in queries] for _, queries in rows]
    k = max(sum(n) for n in n_read)
    c = max([1] + [len(q.others) for _, queries in rows for q in queries])
    # one host tensor, built from lists: ids | mask | read positions | targets | candidates
    packed = []
    for (row, queries), reads in zip(rows, n_read):
        gather, targets, others = [], [], []
        for q, n in zip(queries, reads):
            gather += range(q.pos - shared, q.pos - shared + n)
            answer = q.answer[:n] + [q.answer[-1] if q.answer else 0] * (n - len(q.answer))
            targets += answer
            others += [(q.others + [answer[0]] * c)[:c]] + [[t] * c for t in answer[1:]]
        pad = k - len(gather)
        packed.append(row + [pad_id] * (width - len(row)) + [1] * len(row)
                      + [0] * (width - len(row)) + gather + [0] * pad + targets + [0] * pad
                      + [t for o in others for t in o] + [0] * (pad * c))
    host = torch.tensor(packed, dtype=torch.long)
    dev = host.to(device)
    d_ids, d_mask = dev[:, :width], dev[:, width:2 * width]
    d_gather = dev[:, 2 * width:2 * width + k]
    d_targets = dev[:, 2 * width + k:2 * width + 2 * k]
    d_others = dev[:, 2 * width + 2 * k:].view(len(rows), k, c)
    kwargs = {"use_cache": False}
    if cache is not None:
        kwargs = {"use_cache": True, cache_argument(model): cache}
    sets = [queries[0].head_set for _, queries in rows]  # each row's head set
    distinct = sorted(set(sets))
    with ctx.sequence_keys([queries[0].story for _, queries in rows]), ctx.head_sets(sets):
        if shared and len(distinct) == 1:  # the common prefix once, copied to every row
            with ctx.head_sets(distinct):
                model(input_ids=d_ids[:1, :shared], logits_to_keep=1, **kwargs)
            ctx.repeat_cache_rows(cache, len(rows))
        elif shared:  # rows ablating different head sets: the prefix once per set
            with ctx.head_sets(distinct):
                model(input_ids=d_ids[:1, :shared].expand(len(distinct), -1),
                      logits_to_keep=1, **kwargs)
            ctx.select_cache_rows(cache, torch.tensor([distinct.index(s) for s in sets],
                                                      device=device))
        use = ctx.layer_store
        reuse = None if use is None else PassReuse(use, pass_key(
            host[:, :2 * width], shared, len(distinct) if shared else 0, device),
            use.untouched())
        with ctx.reading(d_gather), ctx.logits_at(d_gather), ctx.reusing_layers(reuse):
            logits = model(input_ids=d_ids[:, shared:], attention_mask=d_mask, **kwargs).logits
    stats = read_stats(logits, d_targets, d_others).cpu().tolist()
    record = ctx.record
    recorded = logits.float().cpu() if record is not None else None
    out: dict[int, Read] = {}
    for b, (_, queries) in enumerate(rows):
        cursor = 0
        for q, n in zip(queries, n_read[b]):
            at = stats[b][cursor:cursor + n]
            g = q.greedy_reads(max_new_tokens)
            out[q.index] = Read(
                [int(s[0]) for s in at[:g]], [s[1] for s in at[:g]], [s[2] for s in at[:g]],
                math.fsum(s[3] for s in at[:len(q.answer)]),
                at[0][4] if q.others and math.isfinite(at[0][4]) else math.nan)
            if recorded is not None:
                record[q.index] = recorded[b, cursor:cursor + n]
            cursor += n
    return out


@torch.no_grad()
def continue_greedy(model, cache, width: int, starts: Sequence[tuple[int, int, list[int]]],
                    max_new_tokens: int, eos: int | None, device,
                    finished: Callable[[list[int]], bool] | None = None
                    ) -> list[tuple[list[int], list[float], list[float]]]:
    """Greedy decoding onward from the teacher-forced pass's cache, batched.

    ``starts``: (row in the pass, prompt end position, known greedy tokens). The cache holds
    exact key/values for the prompt and the known tokens but the last (they matched the
    teacher); later columns (other teacher tokens, padding) are masked out, and each new
    token gets its true position id. Returns, per start, the new tokens (after the known
    ones) with each step's top-1 minus top-2 logit gap and top-1 logit. The mask and the
    positions are allocated once on the device and updated in place; each step copies its
    (token, gap, top) triples to the host once. ``finished``: whether a start's known plus
    new tokens need no more (a stop string generated), or None.
    """
    steps = max_new_tokens - min(len(known) for _, _, known in starts)
    host = torch.tensor([[row, pos + len(known), known[-1]] for row, pos, known in starts])
    dev = host.T.contiguous().to(device)
    ForwardContext.of(model).select_cache_rows(cache, dev[0])
    valid, nxt = dev[1], dev[2]
    mask = (torch.arange(width + steps, device=device)[None, :] < valid[:, None]).long()
    position = valid[:, None].clone()
    lengths = [len(known) for _, _, known in starts]
    new: list[tuple[list[int], list[float], list[float]]] = [([], [], []) for _ in starts]
    arg = cache_argument(model)

    def open_(j: int) -> bool:
        last = new[j][0][-1] if new[j][0] else starts[j][2][-1]
        return lengths[j] < max_new_tokens and (eos is None or last != eos) and \
            (finished is None or not finished(starts[j][2] + new[j][0]))

    step = 0
    while any(open_(j) for j in range(len(starts))):
        mask[:, width + step] = 1
        logits = model(input_ids=nxt[:, None], attention_mask=mask[:, :width + step + 1],
                       position_ids=position, use_cache=True, logits_to_keep=1,
                       **{arg: cache}).logits[:, -1]
        nxt = logits.argmax(-1)
        got = step_stats(logits).cpu().tolist()
        for j, (token, gap, top) in enumerate(got):
            if open_(j):
                new[j][0].append(int(token))
                new[j][1].append(gap)
                new[j][2].append(top)
                lengths[j] += 1
        position += 1
        step += 1
    return new


def known_greedy(argmax: list[int], teacher: list[int], eos: int | None) -> list[int]:
    """Greedy tokens that are certain: each is known while the previous matched the teacher."""
    known = [argmax[0]]
    for j in range(1, len(argmax)):
        if known[-1] != teacher[j - 1] or known[-1] == eos:
            break
        known.append(argmax[j])
    return known


@torch.no_grad()
def generate_greedy(model, tokenizer, prompts: Sequence[str], max_new_tokens: int,
                    device) -> list[tuple[list[int], list[float], list[float]]]:
    """Real greedy generation, batched with left padding (the fallback). Per prompt: the
    tokens (cut after EOS), each step's top-1 minus top-2 gap and top-1 value of the scores
    ``generate`` picked from (``output_scores``: the logits after its logits processors,
    none for plain greedy decoding), copied to the host at once."""
    pad = pad_id(tokenizer)
    encoded = [encode(tokenizer, p) for p in prompts]
    width = max(len(e) for e in encoded)
    ids = torch.full((len(encoded), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, e in enumerate(encoded):
        ids[b, width - len(e):] = torch.tensor(e)
        mask[b, width - len(e):] = 1
    dev = torch.cat([ids, mask]).to(device)
    out = model.generate(input_ids=dev[:len(encoded)], attention_mask=dev[len(encoded):],
                         max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                         pad_token_id=pad, temperature=None, top_p=None, top_k=None,
                         output_scores=True, return_dict_in_generate=True)
    stats = step_stats(torch.stack(out.scores, 1))  # [prompts, steps, 3]
    stats[..., 0] = out.sequences[:, width:]  # the tokens generate chose
    results = []
    for row in stats.cpu().tolist():
        tokens = cut_at_eos([int(s[0]) for s in row], tokenizer.eos_token_id)
        results.append((tokens, [s[1] for s in row[:len(tokens)]],
                        [s[2] for s in row[:len(tokens)]]))
    return results


def cut_at_eos(tokens: list[int], eos: int | None) -> list[int]:
    """``tokens`` up to and including the first ``eos`` (all of them without one)."""
    if eos is not None and eos in tokens:
        return tokens[:tokens.index(eos) + 1]
    return tokens


def decode(tokenizer, tokens: list[int]) -> str:
    """The text of ``tokens``, special tokens left out (what the metrics read)."""
    return tokenizer.decode(tokens, skip_special_tokens=True)


def model_device(model) -> torch.device:
    """The device of the model's first parameter (where its inputs go)."""
    return next(model.parameters()).device


def deciding_length(tokenizer, toks: list[int], answer: str, settings: EvalConfig,
                    eos: int | None) -> int:
    """How many of the greedy tokens ``toks`` decided the item: the shortest prefix after
    which the metric's outcome can no longer change (:func:`.metrics.final_or_verdict` on growing
    prefixes); all of them when no shorter prefix does."""
    for n in range(1, len(toks)):
        head = toks[:n]
        if final_or_verdict(decode(tokenizer, head), head, answer, settings, eos) is not None:
            return n
    return len(toks)
