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

Per item the same pass also yields continuous measures (no extra pass): ``gold_logprob``
(the log-probability of every gold answer token given the prompt), ``logit_diff`` (the gold
answer's first-token logit minus the best other candidate answer's) and, from the greedy
steps that decided the item, ``margin`` (the smallest top-1 minus top-2 logit gap) and
``near_tie`` (that gap within the rounding of the model's compute dtype, so that another batch
size or kernel could flip the outcome: :data:`NEAR_TIE_TOLERANCE`). What a batch needs from
the device comes back in one copy per forward pass or decoding step.

The evaluator's speed shortcuts (:mod:`.eval_attention`) are checked at run time: the first
batch's teacher-forced logits at the read positions are compared with the plain forward's
(:func:`_check_first_batch`); where they differ beyond the dtype's tolerance the evaluation
goes on without the shortcuts.
"""

from __future__ import annotations

import inspect
import logging
import math
import time
import weakref
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from ih_sweep.ablation.hooks import row_dependent, sequence_keys
from ih_sweep.config.errors import UserError
from ih_sweep.config.schema import EvalConfig, Metric, Scope
from ih_sweep.data import Item
from ih_sweep.evaluation.fastpath import FastPath, fast_attention, read_at
from ih_sweep.evaluation.metrics import (
    cut_at_stop,
    decide_partial,
    final_or_verdict,
    is_correct,
    stop_seen,
    words,
)
from ih_sweep.model.batching import eval_batch_rows

log = logging.getLogger(__name__)

__all__ = ["EvalConfig", "ItemResult", "Metric", "Scope", "decide_partial", "evaluate",
           "is_correct", "words"]


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


# --------------------------------------------------------------------------- rows
@dataclass
class _Query:
    index: int  # into items
    pos: int  # position of the prompt's last token in the row
    teacher: list[int]  # candidate continuation tokens fed after the prompt
    # the gold answer's tokens as they follow the prompt in the row (their log-probs are
    # read at pos, pos + 1, ...), and the first tokens of the other candidate answers
    answer: list[int] = field(default_factory=list)
    others: list[int] = field(default_factory=list)
    story: int = -1  # the item's story index: which sequence its row holds (resample ablation)

    def greedy_reads(self, max_new_tokens: int) -> int:
        """Positions whose argmax is a greedy token that may be known from the pass."""
        return min(max_new_tokens, len(self.teacher) + 1)

    def reads(self, max_new_tokens: int) -> int:
        """Positions read from the pass: the greedy ones and every gold answer token's."""
        return max(self.greedy_reads(max_new_tokens), len(self.answer))


def _encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text)["input_ids"])


def _encode_all(tokenizer, texts: Sequence[str], **kwargs) -> list[list[int]]:
    """One batched tokenizer call (fast tokenizers encode a list in one native call)."""
    if not texts:
        return []
    return [list(ids) for ids in tokenizer(list(texts), **kwargs)["input_ids"]]


def _tail(prompt: str) -> str:
    """The prompt's last line with the newline before it: the context that decides how an
    answer right after the prompt tokenizes (tokenizers split words at whitespace)."""
    cut = prompt.rfind("\n")
    return prompt[cut:] if cut >= 0 else prompt


def answer_tokens(tokenizer, tails: Sequence[str], answers: Sequence[str]
                  ) -> dict[tuple[str, str], tuple[list[int], int]]:
    """For each (prompt tail, answer): the tokens of the gold continuation ``answer + "\\n"``
    as they follow a prompt ending in that tail, and how many of them cover the answer.

    Tokenized the way :func:`build_rows` tokenizes the gold continuation: after the context
    where its tokens extend the context's, else on its own (:func:`_continuation`). The
    answer's tokens are those of ``context + answer``; where the answer's last token merges
    with the newline they are the continuation's tokens up to that merged one. The context is
    the tail (:func:`_tail`), not the whole prompt, so that a task's few answers tokenize once;
    :func:`build_rows` checks the result against each row (an item whose row disagrees gets its
    own row of exactly these tokens)."""
    pairs = sorted({(t, a) for t in tails for a in answers})
    contexts = sorted({t for t, _ in pairs})
    texts = contexts + [t + a + "\n" for t, a in pairs] + [t + a for t, a in pairs]
    enc = dict(zip(texts, _encode_all(tokenizer, texts, add_special_tokens=False)))
    alone = {}
    out: dict[tuple[str, str], tuple[list[int], int]] = {}
    for t, a in pairs:
        head, cont, short = enc[t], enc[t + a + "\n"], enc[t + a]
        if cont[:len(head)] == head and short[:len(head)] == head:
            cont, short = cont[len(head):], short[len(head):]
        else:
            if a not in alone:
                alone[a] = (_continuation(tokenizer, a),
                            _encode_all(tokenizer, [a], add_special_tokens=False)[0])
            cont, short = alone[a]
        n = next((i for i, (x, y) in enumerate(zip(cont, short)) if x != y), len(short))
        out[t, a] = cont, min(len(cont), n + (n < len(short)))
    return out


def build_rows(tokenizer, items: Sequence[Item], max_new_tokens: int,
               candidates: Sequence[str] | None = None
               ) -> list[tuple[list[int], list[_Query]]]:
    """Token rows to run, each answering one or more items (shared story prefixes).

    Each query reads the greedy positions (prompt end, then each teacher token, up to
    ``max_new_tokens``) and every gold answer token's position, so a row reaches as far as
    the longer of the two. ``candidates``: the answers whose first tokens ``logit_diff``
    compares with the gold's (None: the items' distinct answers)."""
    lead = items[0].lead if items else ""  # the format's, the same for every item
    candidates = sorted({lead + c for c in (candidates if candidates is not None
                                            else {it.answer for it in items})})
    tails = [_tail(it.prompt) for it in items]
    known = answer_tokens(tokenizer, sorted(set(tails)),
                          sorted(set(candidates) | {it.target for it in items}))
    firsts: dict[str, set[int]] = {}
    for t in set(tails):
        firsts[t] = {known[t, c][0][0] for c in candidates if known[t, c][0]}

    def gold(i: int) -> tuple[list[int], list[int], list[int]]:
        """(continuation, answer tokens, other candidates' first tokens) of item i."""
        cont, n = known[tails[i], items[i].target]
        answer = cont[:n]
        others = sorted(firsts[tails[i]] - {answer[0]}) if answer else []
        return cont, answer, others

    by_story: dict[int, list[int]] = {}
    for i, it in enumerate(items):
        by_story.setdefault(it.story_index, []).append(i)
    groups = [sorted(idxs, key=lambda i: items[i].line) for idxs in by_story.values()]
    lasts = [items[g[-1]] for g in groups]
    last_ids = _encode_all(tokenizer, [it.prompt for it in lasts])
    full_ids = _encode_all(tokenizer, [it.prompt + it.target + "\n" for it in lasts])
    others_ = [i for g in groups for i in g[:-1]]
    other_ids = dict(zip(others_, _encode_all(tokenizer, [items[i].prompt for i in others_])))
    rows: list[tuple[list[int], list[_Query]]] = []
    need = max_new_tokens - 1

    def extent(answer: list[int]) -> int:
        return max(need, len(answer) - 1)  # tokens fed after the prompt

    for idxs, last, prompt_ids, full in zip(groups, lasts, last_ids, full_ids):
        cont, answer, others = gold(idxs[-1])
        p = len(prompt_ids)
        if full[:p] != prompt_ids:
            full = prompt_ids + _continuation(tokenizer, last.target)
        if full[p:p + len(answer)] != answer:  # the answer tokenizes otherwise in context
            full = prompt_ids + cont
        row = full[:p + extent(answer)]
        queries = [_Query(idxs[-1], p - 1, row[p:], answer, others, last.story_index)]
        for i in idxs[:-1]:
            ids = other_ids[i]
            cont, answer, others = gold(i)
            q = len(ids)
            if row[:q] == ids and row[q:q + len(answer)] == answer:
                queries.append(_Query(i, q - 1, row[q:q + extent(answer)], answer, others,
                                      last.story_index))
            else:  # tokenization differs at the boundary: the item gets its own row
                own = ids + cont[:extent(answer)]
                rows.append((own, [_Query(i, q - 1, own[q:], answer, others,
                                          last.story_index)]))
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


@dataclass
class _Read:
    """What one query needs from the teacher-forced pass (host values)."""

    argmax: list[int]  # greedy token at each greedy read position
    gap: list[float]  # top-1 minus top-2 logit there
    top: list[float]  # the top-1 logit there (the near-tie scale)
    gold_logprob: float
    logit_diff: float


def _stats(logits: torch.Tensor, targets: torch.Tensor, others: torch.Tensor) -> torch.Tensor:
    """Per read position, stacked for one copy to the host: [..., 5] float32 of (argmax,
    top-1 minus top-2 logit, top-1 logit, log p(target), logit(target) minus the largest
    logit among ``others`` that are not the target (+inf when none)).

    ``logits`` [..., vocab]; ``targets`` [...] token ids; ``others`` [..., C] token ids (pad
    with the target: a pad never counts). Token ids stay exact in float32 below 2**24."""
    full = logits.float()
    target = full.gather(-1, targets[..., None])[..., 0]
    rival = full.gather(-1, others).masked_fill(others == targets[..., None], -math.inf)
    return torch.cat([_step_stats(logits), torch.stack([target - full.logsumexp(-1),
                                                        target - rival.amax(-1)], -1)], -1)


def _step_stats(logits: torch.Tensor) -> torch.Tensor:
    """[..., 3] float32 of (argmax, top-1 minus top-2, top-1) for greedy decoding steps."""
    top2 = logits.topk(2, -1).values.float()
    return torch.stack([logits.argmax(-1).float(), top2[..., 0] - top2[..., 1], top2[..., 0]],
                       -1)


@torch.no_grad()
def _greedy_from_forward(model, rows, pad_id: int, max_new_tokens: int, device,
                         cache=None) -> dict[int, _Read]:
    """For each query: the argmax tokens at its greedy positions (prompt end, then each
    teacher), their top-2 gaps, the gold answer's log-probability and first-token logit
    difference. With ``cache``, the pass also fills it (key/values of every row position),
    and a prefix all rows share (the prompt header) runs once instead of once per row.
    The inputs go to the device in one copy and the results come back in one."""
    width = max(len(r) for r, _ in rows)
    shared = shared_prefix_length(rows) if cache is not None else 0
    if shared < MIN_SHARED_PREFIX or row_dependent(model):  # resample: rows differ from BOS on
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
        kwargs = {"use_cache": True, _cache_argument(model): cache}
    with sequence_keys([queries[0].story for _, queries in rows]):
        if shared:  # the common prefix once, its key/values copied to every row
            model(input_ids=d_ids[:1, :shared], logits_to_keep=1, **kwargs)
            cache.batch_repeat_interleave(len(rows))
        with read_at(d_gather), _logits_at(d_gather):
            logits = model(input_ids=d_ids[:, shared:], attention_mask=d_mask, **kwargs).logits
    stats = _stats(logits, d_targets, d_others).cpu().tolist()
    record = _RECORD.get()
    recorded = logits.float().cpu() if record is not None else None
    out: dict[int, _Read] = {}
    for b, (_, queries) in enumerate(rows):
        cursor = 0
        for q, n in zip(queries, n_read[b]):
            at = stats[b][cursor:cursor + n]
            g = q.greedy_reads(max_new_tokens)
            out[q.index] = _Read(
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
    cache.batch_select_indices(dev[0])
    valid, nxt = dev[1], dev[2]
    mask = (torch.arange(width + steps, device=device)[None, :] < valid[:, None]).long()
    position = valid[:, None].clone()
    lengths = [len(known) for _, _, known in starts]
    new: list[tuple[list[int], list[float], list[float]]] = [([], [], []) for _ in starts]
    arg = _cache_argument(model)

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
        got = _step_stats(logits).cpu().tolist()
        for j, (token, gap, top) in enumerate(got):
            if open_(j):
                new[j][0].append(int(token))
                new[j][1].append(gap)
                new[j][2].append(top)
                lengths[j] += 1
        position += 1
        step += 1
    return new


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
                    device) -> list[tuple[list[int], list[float], list[float]]]:
    """Real greedy generation, batched with left padding (the fallback). Per prompt: the
    tokens (cut after EOS), each step's top-1 minus top-2 gap and top-1 value of the scores
    ``generate`` picked from (``output_scores``: the logits after its logits processors,
    none for plain greedy decoding), copied to the host at once."""
    pad_id = _pad_id(tokenizer)
    encoded = [_encode(tokenizer, p) for p in prompts]
    width = max(len(e) for e in encoded)
    ids = torch.full((len(encoded), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, e in enumerate(encoded):
        ids[b, width - len(e):] = torch.tensor(e)
        mask[b, width - len(e):] = 1
    dev = torch.cat([ids, mask]).to(device)
    out = model.generate(input_ids=dev[:len(encoded)], attention_mask=dev[len(encoded):],
                         max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                         pad_token_id=pad_id, temperature=None, top_p=None, top_k=None,
                         output_scores=True, return_dict_in_generate=True)
    stats = _step_stats(torch.stack(out.scores, 1))  # [prompts, steps, 3]
    stats[..., 0] = out.sequences[:, width:]  # the tokens generate chose
    results = []
    for row in stats.cpu().tolist():
        tokens = _cut_at_eos([int(s[0]) for s in row], tokenizer.eos_token_id)
        results.append((tokens, [s[1] for s in row[:len(tokens)]],
                        [s[2] for s in row[:len(tokens)]]))
    return results


def _cut_at_eos(tokens: list[int], eos: int | None) -> list[int]:
    if eos is not None and eos in tokens:
        return tokens[:tokens.index(eos) + 1]
    return tokens


def _decode(tokenizer, tokens: list[int]) -> str:
    return tokenizer.decode(tokens, skip_special_tokens=True)


def _device(model) -> torch.device:
    return next(model.parameters()).device


def _run_batches(fn, work: list, batch_size: int, desc: str, progress: bool,
                 workers: int = 1, bar=None, weight=len, threads: int | None = None):
    """Apply fn to batches of work; on CUDA out-of-memory halve the batch and go on.
    With ``workers`` > 1 (CPU), that many batches run at once (see :func:`_in_threads`).
    ``bar``: a progress bar to update (left open) instead of one of its own, by
    ``weight(batch)`` per batch done. ``threads``: torch's intra-op threads for each batch
    (None: as :func:`_in_threads` splits them, or all of them one batch at a time)."""
    bs = max(1, batch_size)
    own_bar = bar is None
    if own_bar:
        bar = tqdm(total=len(work), desc=desc, disable=not progress, leave=False)
    if workers > 1 and len(work) > bs:
        results = _in_threads(fn, [work[i:i + bs] for i in range(0, len(work), bs)],
                              workers, bar, weight, threads)
        if own_bar:
            bar.close()
        return results
    if threads:
        with intra_op_threads(threads):
            results = _one_at_a_time(fn, work, bs, bar, weight)
    else:
        results = _one_at_a_time(fn, work, bs, bar, weight)
    if own_bar:
        bar.close()
    return results


def _one_at_a_time(fn, work: list, bs: int, bar, weight) -> list:
    """:func:`_run_batches`' batches one after the other, halving on CUDA out-of-memory."""
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
    return results


def batch_threads(workers: int, n_work: int, batch_size: int) -> int:
    """torch's intra-op threads each batch of ``n_work`` runs on when
    :func:`_run_batches` spreads them over ``workers``: the cores split among the batches
    that run at once, or all of them when one batch runs at a time. A function of the
    whole run only, so that every batch, the first one checked on its own included
    (:func:`_check_first_batch`), computes with the same threads (sums over another number
    of threads round differently: a batch's floats would depend on whether it was the
    process's first)."""
    threads = torch.get_num_threads()
    batches = -(-n_work // max(1, batch_size))
    return max(1, threads // min(workers, batches)) if workers > 1 and batches > 1 else threads


@contextmanager
def intra_op_threads(n: int) -> Iterator[None]:
    """torch's intra-op thread count while inside (threads started inside inherit it)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _in_threads(fn, chunks: list, workers: int, bar, weight=len, threads: int | None = None
                ) -> list:
    """Batches in ``workers`` threads at once, the cores split between them.

    Why: on CPU the evaluator's operators are small (a 2-layer model, 16-dim heads) and
    parallelise poorly inside one batch (2 threads: ~1.2x one), while whole batches are
    independent: two at once on one thread each evaluate ~1.2x faster than one at a time
    on two (benchmarks/README.md). torch releases the GIL inside its operators."""
    workers = min(workers, len(chunks))
    per_worker = threads or max(1, torch.get_num_threads() // workers)

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


def _deciding_length(tokenizer, toks: list[int], answer: str, settings: EvalConfig,
                     eos: int | None) -> int:
    """How many of the greedy tokens ``toks`` decided the item: the shortest prefix after
    which the metric's outcome can no longer change (:func:`.metrics.final_or_verdict` on growing
    prefixes); all of them when no shorter prefix does."""
    for n in range(1, len(toks)):
        head = toks[:n]
        if final_or_verdict(_decode(tokenizer, head), head, answer, settings, eos) is not None:
            return n
    return len(toks)


def _result(item: Item, text: str, correct: bool, how: str, steps: tuple[list, list],
            decided: int, read: _Read, tolerance: float) -> ItemResult:
    """An :class:`ItemResult` with its measures: ``steps`` (gaps, top logits) of the greedy
    tokens, of which the first ``decided`` count (:func:`_deciding_length`)."""
    gaps, tops = steps[0][:decided], steps[1][:decided]
    return ItemResult(item, text, correct, how, margin=min(gaps, default=math.nan),
                      near_tie=near_tie(gaps, tops, tolerance),
                      gold_logprob=read.gold_logprob, logit_diff=read.logit_diff)


def _evaluate_rows(model, tokenizer, items: Sequence[Item], rows, settings: EvalConfig,
                   device) -> dict[int, ItemResult]:
    """One batch: the teacher-forced pass, then decoding for what it left undecided."""
    budget = settings.max_new_tokens
    eos = tokenizer.eos_token_id
    tolerance = near_tie_tolerance(model)
    width = max(len(r) for r, _ in rows)
    cache = _reusable_cache(model, width, budget)
    reads = _greedy_from_forward(model, rows, _pad_id(tokenizer), budget, device, cache)
    results: dict[int, ItemResult] = {}
    pending: list[tuple[int, int, list[int]]] = []  # (row, prompt end, known tokens)
    index_of: list[int] = []
    for b, (_, queries) in enumerate(rows):
        for q in queries:
            read, answer = reads[q.index], items[q.index].target
            toks = _known_greedy(read.argmax, q.teacher, eos)
            text = _decode(tokenizer, toks)
            verdict = final_or_verdict(text, toks, answer, settings, eos)
            if verdict is None:
                pending.append((b, q.pos, toks))
                index_of.append(q.index)
            else:
                decided = _deciding_length(tokenizer, toks, answer, settings, eos)
                results[q.index] = _result(items[q.index], cut_at_stop(text, settings.stop),
                                           verdict, "forward",
                                           (read.gap, read.top), decided, read, tolerance)
    if not pending:
        return results
    if cache is not None:
        finished = (lambda t: stop_seen(_decode(tokenizer, t), settings.stop)) \
            if settings.stop else None
        with sequence_keys([rows[b][1][0].story for b, _, _ in pending]):
            new = continue_greedy(model, cache, width, pending, budget, eos, device, finished)
        conts = []
        for (_, _, known), (toks, gaps, tops) in zip(pending, new):
            read = reads[index_of[len(conts)]]
            n = len(known)
            conts.append((known + toks, read.gap[:n] + gaps, read.top[:n] + tops))
        how = "decode"
    else:
        with sequence_keys([items[i].story_index for i in index_of]):
            conts = generate_greedy(model, tokenizer, [items[i].prompt for i in index_of],
                                    budget, device)
        how = "generate"
    for idx, (toks, gaps, tops) in zip(index_of, conts):
        text, answer = _decode(tokenizer, toks), items[idx].target
        decided = _deciding_length(tokenizer, toks, answer, settings, eos)
        correct = is_correct(text, answer, settings.metric, settings.stop)
        results[idx] = _result(items[idx], cut_at_stop(text, settings.stop), correct, how,
                               (gaps, tops), decided, reads[idx], tolerance)
    return results


class PromptTooLong(UserError):
    """A prompt (plus the tokens to generate) longer than the model's positions."""

    kind = "data"


def check_prompt_lengths(model, tokenizer, items: Sequence[Item], max_new_tokens: int
                         ) -> None:
    """Every prompt plus ``max_new_tokens`` must fit the model's positions: raises
    :class:`PromptTooLong` naming the longest prompt, the limit and what to do, before any
    evaluation (a longer input indexes past the position table)."""
    from ih_sweep.model.architecture import position_limit

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
def evaluate(model, tokenizer, items: Sequence[Item], settings: EvalConfig, bar=None,
             candidates: Sequence[str] | None = None, rows=None) -> list[ItemResult]:
    """Greedy-decoding outcome of every item, identical to one-at-a-time ``generate``, with
    its measures (:class:`ItemResult`). ``settings``: the ``eval`` group of the config
    (:class:`.schema.EvalConfig`). ``bar``: a progress bar (in items) to advance instead of
    one of its own, so that a job that evaluates in checkpointed chunks shows one bar.
    ``candidates``: the task's answer vocabulary for ``logit_diff`` (None: the distinct gold
    answers of ``items``; a job evaluating in chunks passes those of all its items).
    ``rows``: :func:`build_rows` of these items, ``settings.max_new_tokens`` and
    ``candidates``, where the caller already has them (a job evaluating several ablations
    of the same items tokenizes them once); not modified."""
    if settings.metric not in tuple(Metric):
        raise ValueError(f"eval.metric={settings.metric!r}; allowed values: "
                         f"{_allowed(Metric)}")
    t0 = time.time()
    device = _device(model)
    rows = list(rows) if rows is not None else \
        build_rows(tokenizer, items, settings.max_new_tokens, candidates)
    rows.sort(key=lambda r: len(r[0]))  # similar lengths together: less padding
    workers = 1 if device.type != "cpu" else \
        (settings.cpu_worker_count() or torch.get_num_threads())
    results: dict[int, ItemResult] = {}
    bs = eval_batch_rows(settings.batch_size, model, rows, settings.max_new_tokens)

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
            threads = batch_threads(workers, len(rows), bs)
            if fast.on and verdict is None and rows:
                # before any thread starts: nothing runs alongside; on the threads the
                # batch gets without the check, so that its numbers do not depend on it
                with intra_op_threads(threads):
                    parts = _check_first_batch(model, tokenizer, rows[:bs], fast, run, bs,
                                               settings, device, bar)
                _VERIFIED.setdefault(model, {})[key] = fast.on
                rest = rows[bs:]
            else:
                parts, rest = [], rows
            parts += _run_batches(run, rest, bs, "evaluate", settings.progress, workers, bar,
                                  _items_in, threads)
            for part in parts:
                results.update(part)
    finally:
        if own_bar:
            bar.close()
    decoded = sum(r.decided_by != "forward" for r in results.values())
    log.info("evaluated %d items in %.1f s (%d decoded past the teacher-forced pass)",
             len(items), time.time() - t0, decoded)
    # the model's own generation settings (tfrange, #22 item 3): where they change greedy
    # output, the outcomes are generate's, one item at a time (see _by_model_generate)
    return _by_model_generate(model, tokenizer, [results[i] for i in range(len(items))],
                              settings)


# the generation-config lines logged in this process, by model (each line once per model)
_TOLD_GENERATION: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


@torch.no_grad()
def _by_model_generate(model, tokenizer, results: list[ItemResult], settings: EvalConfig
                       ) -> list[ItemResult]:
    """``results`` (the fast path's) where the model's generation config changes nothing
    that greedy decoding returns; else each item's outcome by ``model.generate`` on its
    prompt alone with that config (the notebook's method, exact by construction; slower):
    continuation, correctness, ``decided_by="generate"``, and ``margin``/``near_tie`` from
    generate's scores (the logits after its processors, those the greedy choice is made
    from), up to the deciding step. ``gold_logprob`` and ``logit_diff`` stay the forward
    pass's (they are read off the model's own distribution, before any processor).

    Which settings count: :mod:`.generation_settings`. Decoding modes other than greedy
    search in the config (sampling, beams, ...) are overridden: the tool evaluates
    greedily by design. One log line per model says which settings were found."""
    from dataclasses import replace

    from ih_sweep.evaluation import generation_settings as gs

    config = getattr(model, "generation_config", None)
    eos = tokenizer.eos_token_id
    changing, ignored = gs.greedy_changing(config, eos), gs.not_greedy(config)
    told = _TOLD_GENERATION.setdefault(model, set())
    lines = []
    if ignored:
        lines.append(f"the model's generation config asks for {gs.describe(ignored)}: the "
                     "tool evaluates greedily by design (do_sample=False, num_beams=1)")
    if changing and results:
        lines.append(f"the model's generation config sets {gs.describe(changing)}, which "
                     "changes greedy output: items are evaluated by model.generate with it, "
                     "one at a time (exact, slower than the fast path)")
    for line in lines:
        if line not in told:
            log.warning("%s", line)
            told.add(line)
    if not changing or not results:
        return results
    device = _device(model)
    tolerance = near_tie_tolerance(model)
    greedy = gs.greedy_config(config, settings.max_new_tokens, _pad_id(tokenizer))
    out = []
    for r in tqdm(results, desc="generate", unit="item", disable=not settings.progress,
                  leave=False):
        ids = torch.tensor([_encode(tokenizer, r.item.prompt)], device=device)
        gen = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                             generation_config=greedy, tokenizer=tokenizer,
                             stopping_criteria=_stop_criteria(tokenizer, ids.shape[1],
                                                              settings.stop))
        steps = _step_stats(torch.stack(gen.scores, 1))[0].cpu().tolist()
        toks = _cut_at_eos(gen.sequences[0, ids.shape[1]:].tolist(), eos)
        text, answer = _decode(tokenizer, toks), r.item.target
        decided = _deciding_length(tokenizer, toks, answer, settings, eos)
        gaps, tops = [s[1] for s in steps[:decided]], [s[2] for s in steps[:decided]]
        out.append(replace(r, continuation=cut_at_stop(text, settings.stop),
                           decided_by="generate",
                           correct=is_correct(text, answer, settings.metric, settings.stop),
                           margin=min(gaps, default=math.nan),
                           near_tie=near_tie(gaps, tops, tolerance)))
    return out


def _stop_criteria(tokenizer, start: int, stop: Sequence[str]):
    """``generate`` ends once the decoded new text (after ``start``) holds one of the tool's
    stop strings (``eval.stop``) that later tokens cannot change (:func:`.metrics.stop_seen`:
    the cut is then the same as after the whole budget); None without stop strings."""
    if not stop:
        return None
    from transformers import StoppingCriteria, StoppingCriteriaList

    class _Seen(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            done = stop_seen(_decode(tokenizer, input_ids[0, start:].tolist()), stop)
            return torch.full((input_ids.shape[0],), done, dtype=torch.bool,
                              device=input_ids.device)

    return StoppingCriteriaList([_Seen()])


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


# --------------------------------------------------------------------------- near-ties
# A greedy step is a near-tie when its top-1 minus top-2 logit gap is at most this fraction
# of the top-1 logit's magnitude (at least 1), by the dtype the model computes in: within that
# band another batch size, padding or kernel (other rounding) can swap the two tokens. An
# outcome can flip only where the gap is smaller than the change of the gap between two
# numerically different runs, so the tolerance is the largest such change measured, rounded
# up. Measured on the tiny model on CPU (2-core x86_64), batch_size=1 against the default 32,
# 200 stories x {unablated, top-16 ablated} x 2 data seeds, at every greedy step whose
# context is the same in both runs (``benchmarks/near_ties.py``):
# - bfloat16: the gap changes by up to 0.036 x |top-1| (0.56 logits at top-1 ~20; bf16's
#   relative precision is 2**-7 = 0.0078 and two 2-layer runs differ by a few units of it);
#   3 outcomes flipped, at gaps of 0 to 0.0056 x |top-1|. Tolerance 0.05 (~6 units).
# - float32: the gap changes by up to 3e-6 x |top-1|, no outcome flipped. Tolerance 5e-6,
#   the measured change rounded up as bfloat16's is. (1e-4, the run-time check's bound, is
#   33x the measured change: it flagged 9 items of the default sweep's 7,000 whose gaps of
#   1.2e-4 to 7.7e-4 logits lie between two filler tokens, 2-13x beyond any change measured.)
# - float16 (not measured on CPU): bfloat16's scaled by their precisions (2**-10 vs 2**-7).
# Deeper models accumulate more rounding; a GPU check of a large model may call for more.
NEAR_TIE_TOLERANCE = {torch.float32: 5e-6, torch.float64: 5e-6, torch.bfloat16: 5e-2,
                      torch.float16: 5e-2 / 8}


def compute_dtype(model) -> torch.dtype:
    """The least precise floating dtype the model computes in: among its embedding and
    unembedding weights and, under bitsandbytes quantization, its quantized layers' matmuls
    (:func:`_quantized_compute_dtypes`: nf4's ``bnb_4bit_compute_dtype``, bfloat16 by
    default, even where the embeddings stay float32); float32 when none is lower."""
    dtypes = [m.weight.dtype for m in (model.get_input_embeddings(),
                                       model.get_output_embeddings())
              if m is not None and m.weight.is_floating_point()]
    dtypes += _quantized_compute_dtypes(model)
    return min(dtypes, key=lambda d: torch.finfo(d).bits, default=torch.float32)


def _quantized_compute_dtypes(model) -> set[torch.dtype]:
    """The dtypes bitsandbytes layers compute in: a ``Linear4bit``'s ``compute_dtype``
    (none set: its input's, which the other dtypes already cover); bfloat16 standing for
    LLM.int8()'s 8-bit matmul, whose rounding (activations in int8, outlier columns
    chosen over the whole batch) is no finer than bfloat16's."""
    out = set()
    for module in model.modules():
        if not type(module).__module__.startswith("bitsandbytes"):
            continue
        if type(module).__name__.startswith("Linear8bit"):
            out.add(torch.bfloat16)
        dtype = getattr(module, "compute_dtype", None)
        if isinstance(dtype, torch.dtype) and dtype.is_floating_point:
            out.add(dtype)
    return out


def near_tie_tolerance(model) -> float:
    """:data:`NEAR_TIE_TOLERANCE` of the model's compute dtype (:func:`compute_dtype`)."""
    return NEAR_TIE_TOLERANCE.get(compute_dtype(model), NEAR_TIE_TOLERANCE[torch.bfloat16])


def near_tie(gaps: Sequence[float], tops: Sequence[float], tolerance: float) -> bool:
    """Whether some step's top-1 minus top-2 gap is within ``tolerance`` x max(|top-1|, 1)."""
    return any(g <= tolerance * max(abs(t), 1.0) for g, t in zip(gaps, tops))
