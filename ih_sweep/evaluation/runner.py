"""The evaluator's entry point, :func:`evaluate`: rows into batches (threads on CPU, halving
on CUDA out-of-memory), the fast path installed and checked once per model, each batch decided
by its teacher-forced pass and decoding, then the model's own generation settings applied.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from tqdm.auto import tqdm

from ih_sweep.config.errors import UserError
from ih_sweep.config.schema import EvalConfig, Metric, PromptFormat
from ih_sweep.evaluation.batches import batch_threads, intra_op_threads, run_batches
from ih_sweep.evaluation.by_generate import by_model_generate
from ih_sweep.evaluation.decoding import (
    ItemResult,
    Read,
    continue_greedy,
    deciding_length,
    decode,
    generate_greedy,
    greedy_from_forward,
    known_greedy,
    model_device,
    reusable_cache,
)
from ih_sweep.evaluation.fastpath.check import VERDICTS, check_first_batch
from ih_sweep.evaluation.fastpath.install import installed
from ih_sweep.evaluation.fastpath.reuse import budget_bytes
from ih_sweep.evaluation.metrics import cut_at_stop, final_or_verdict, is_correct, stop_seen
from ih_sweep.evaluation.near_ties import near_tie, near_tie_tolerance
from ih_sweep.evaluation.rows import build_rows, encode_all, items_in
from ih_sweep.model.batching import eval_batch_rows
from ih_sweep.model.forward import ForwardContext
from ih_sweep.model.rotary import batch_dependent, fresh_rotary
from ih_sweep.model.shape import position_limit
from ih_sweep.model.tokens import pad_id

if TYPE_CHECKING:  # annotations only (the items' type)
    from ih_sweep.data import Item

log = logging.getLogger(__name__)


def _allowed(choices) -> str:
    return ", ".join(str(c) for c in choices)


def item_result(item: Item, text: str, correct: bool, how: str, steps: tuple[list, list],
                decided: int, read: Read, tolerance: float) -> ItemResult:
    """An :class:`ItemResult` with its measures: ``steps`` (gaps, top logits) of the greedy
    tokens, of which the first ``decided`` count (:func:`deciding_length`)."""
    gaps, tops = steps[0][:decided], steps[1][:decided]
    return ItemResult(item, text, correct, how, margin=min(gaps, default=math.nan),
                      near_tie=near_tie(gaps, tops, tolerance),
                      gold_logprob=read.gold_logprob, logit_diff=read.logit_diff)


def evaluate_rows(model, tokenizer, items: Sequence[Item], rows, settings: EvalConfig,
                  device, ctx: ForwardContext | None = None) -> dict[int, ItemResult]:
    """One batch: the teacher-forced pass, then decoding for what it left undecided.
    ``ctx``: the model's forward context (default: :meth:`ForwardContext.of` the model)."""
    ctx = ctx if ctx is not None else ForwardContext.of(model)
    budget = settings.max_new_tokens
    eos = tokenizer.eos_token_id
    tolerance = near_tie_tolerance(model)
    width = max(len(r) for r, _ in rows)
    cache = reusable_cache(model, width, budget)
    reads = greedy_from_forward(model, rows, pad_id(tokenizer), budget, device, cache, ctx)
    results: dict[int, ItemResult] = {}
    pending: list[tuple[int, int, list[int]]] = []  # (row, prompt end, known tokens)
    index_of: list[int] = []
    # HELM's format records all four of HELM's metrics (results.csv): each item's whole
    # continuation is decoded, whatever metric decides it
    whole = settings.format == PromptFormat.helm
    for b, (_, queries) in enumerate(rows):
        for q in queries:
            read, answer = reads[q.index], items[q.index].target
            toks = known_greedy(read.argmax, q.teacher, eos)
            text = decode(tokenizer, toks)
            verdict = final_or_verdict(text, toks, answer, settings, eos, whole)
            if verdict is None:
                pending.append((b, q.pos, toks))
                index_of.append(q.index)
            else:
                decided = deciding_length(tokenizer, toks, answer, settings, eos)
                results[q.index] = item_result(items[q.index], cut_at_stop(text, settings.stop),
                                               verdict, "forward",
                                               (read.gap, read.top), decided, read, tolerance)
    if not pending:
        return results
    if cache is not None:
        finished = (lambda t: stop_seen(decode(tokenizer, t), settings.stop)) \
            if settings.stop else None
        with ctx.sequence_keys([rows[b][1][0].story for b, _, _ in pending]), \
                ctx.head_sets([rows[b][1][0].head_set for b, _, _ in pending]):
            new = continue_greedy(model, cache, width, pending, budget, eos, device, finished)
        conts = []
        for (_, _, known), (toks, gaps, tops) in zip(pending, new):
            read = reads[index_of[len(conts)]]
            n = len(known)
            conts.append((known + toks, read.gap[:n] + gaps, read.top[:n] + tops))
        how = "decode"
    else:
        head_set = {q.index: q.head_set for _, queries in rows for q in queries}
        with ctx.sequence_keys([items[i].story_index for i in index_of]), \
                ctx.head_sets([head_set[i] for i in index_of]):
            conts = generate_greedy(model, tokenizer, [items[i].prompt for i in index_of],
                                    budget, device)
        how = "generate"
    for idx, (toks, gaps, tops) in zip(index_of, conts):
        text, answer = decode(tokenizer, toks), items[idx].target
        decided = deciding_length(tokenizer, toks, answer, settings, eos)
        correct = is_correct(text, answer, settings.metric, settings.stop)
        results[idx] = item_result(items[idx], cut_at_stop(text, settings.stop), correct, how,
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
    limit = position_limit(model.config)
    if limit is None or not items:
        return
    lengths = [len(ids) for ids in encode_all(tokenizer, [it.prompt for it in items])]
    longest = max(range(len(items)), key=lengths.__getitem__)
    if lengths[longest] + max_new_tokens > limit:
        item = items[longest]
        raise PromptTooLong(
            f"story {item.story_index} question {item.question_index}: the prompt has "
            f"{lengths[longest]} tokens and eval.max_new_tokens={max_new_tokens} more are "
            f"generated, but the model takes {limit} positions; use a model with more "
            "positions, or a bAbI task with shorter stories (eval.scope=all does not shorten "
            "the last question's prompt)")


@torch.no_grad()
def evaluate(model, tokenizer, items: Sequence[Item], settings: EvalConfig, bar=None,
             candidates: Sequence[str] | None = None, rows=None,
             ctx: ForwardContext | None = None) -> list[ItemResult]:
    """Greedy-decoding outcome of every item, identical to one-at-a-time ``generate``, with
    its measures (:class:`ItemResult`). ``settings``: the ``eval`` group of the config
    (:class:`.schema.EvalConfig`). ``bar``: a progress bar (in items) to advance instead of
    one of its own, so that a job that evaluates in checkpointed chunks shows one bar.
    ``candidates``: the task's answer vocabulary for ``logit_diff`` (None: the distinct gold
    answers of ``items``; a job evaluating in chunks passes those of all its items).
    ``rows``: :func:`build_rows` of these items, ``settings.max_new_tokens`` and
    ``candidates``, where the caller already has them (a job evaluating several ablations
    of the same items tokenizes them once); not modified. ``ctx``: the forward context its
    passes run in (:class:`~ih_sweep.model.forward.ForwardContext`; default: the model's,
    :meth:`~ih_sweep.model.forward.ForwardContext.of`, which the ablation hooks read too)."""
    if settings.metric not in tuple(Metric):
        raise ValueError(f"eval.metric={settings.metric!r}; allowed values: "
                         f"{_allowed(Metric)}")
    ctx = ctx if ctx is not None else ForwardContext.of(model)
    t0 = time.time()
    device = model_device(model)
    rows = list(rows) if rows is not None else \
        build_rows(tokenizer, items, settings.max_new_tokens, candidates)
    rows.sort(key=lambda r: len(r[0]))  # similar lengths together: less padding
    workers = 1 if device.type != "cpu" else \
        (settings.cpu_worker_count() or torch.get_num_threads())
    results: dict[int, ItemResult] = {}
    bs = eval_batch_rows(settings.batch_size, model, rows, settings.max_new_tokens)
    rope = one_at_a_time(model, settings)
    if rope:  # one row a batch, one batch at a time: the rotary state is the model's
        bs, workers = 1, 1

    def run(chunk):
        with fresh_rotary(model, bool(rope)):
            return evaluate_rows(model, tokenizer, items, chunk, settings, device, ctx)

    own_bar = bar is None
    if own_bar:
        bar = tqdm(total=len(items), desc="evaluate", unit="item",
                   disable=not settings.progress, leave=False)
    try:
        with installed(model, settings.fast_layers, ctx,
                       budget_bytes(settings.layer_store_mb, device)) as fast:
            key = fast.layers
            verdict = VERDICTS.get(model, key) if fast.on else None
            if verdict is False:
                fast.off()  # found wrong on this model earlier in this process
            threads = batch_threads(workers, len(rows), bs)
            if fast.on and verdict is None and rows:
                # before any thread starts: nothing runs alongside; on the threads the
                # batch gets without the check, so that its numbers do not depend on it
                with intra_op_threads(threads):
                    parts = check_first_batch(model, tokenizer, rows[:bs], fast, run, bs,
                                              settings, device, bar, ctx)
                VERDICTS.set(model, key, fast.on)
                rest = rows[bs:]
            else:
                parts, rest = [], rows
            parts += run_batches(run, rest, bs, "evaluate", settings.progress, workers, bar,
                                 items_in, threads)
            for part in parts:
                results.update(part)
    finally:
        if own_bar:
            bar.close()
    decoded = sum(r.decided_by != "forward" for r in results.values())
    log.info("evaluated %d items in %.1f s (%d decoded past the teacher-forced pass)",
             len(items), time.time() - t0, decoded)
    # the model's own generation settings (tfrange, #22 item 3): where they change greedy
    # output, the outcomes are generate's, one item at a time (see by_model_generate)
    head_set = {q.index: q.head_set for _, queries in rows for q in queries}
    return by_model_generate(model, tokenizer, [results[i] for i in range(len(items))],
                             settings, reason=rope,
                             head_sets=[head_set.get(i, 0) for i in range(len(items))])


_TOLD_ROPE: set[str] = set()  # the routing lines logged in this process


def one_at_a_time(model, settings: EvalConfig) -> str | None:
    """Why ``model``'s outcomes depend on the batch (its rotary scaling:
    :func:`ih_sweep.model.rotary.batch_dependent`), or None. Such a model is evaluated one
    item at a time: the teacher-forced pass one row a batch (its ``gold_logprob`` and
    ``logit_diff`` the same whatever ``eval.batch_size``), the outcomes by ``generate`` on
    each prompt alone (:func:`.by_generate.by_model_generate`), the rotary state reset
    before each; said in one log line per model and process."""
    why = batch_dependent(model.config)
    if why is not None and why not in _TOLD_ROPE:
        _TOLD_ROPE.add(why)
        log.warning("the model's %s makes outcomes depend on the batch: items are evaluated "
                    "one at a time by model.generate (eval.batch_size=%s not used; exact, "
                    "slower)", why, settings.batch_size)
    return why
