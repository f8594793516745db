"""The evaluate stage in checkpointed chunks: each chunk of ``eval.checkpoint_items`` items
is written atomically to ``<job folder>/partial/`` as it finishes, and a rerun after a kill
(preemption, timeout, SIGKILL) reuses the finished chunks it can trust, so rows are neither
lost nor duplicated."""

from __future__ import annotations

import logging
import shutil
from collections.abc import Sequence
from pathlib import Path

import pandas as pd
from tqdm.auto import tqdm

from ih_sweep.config.schema import Config
from ih_sweep.io_utils import read_json, write_csv, write_json
from ih_sweep.pipeline.draws import SharedInputs
from ih_sweep.pipeline.records import ITEM_COLUMNS, STRATA_COLUMNS
from ih_sweep.pipeline.stages import Fill, Items, LazyModel, Results, Selection, describe

log = logging.getLogger("ih_sweep")


def evaluate_chunks(config: Config, out_dir: Path, chash: str, model: LazyModel, data: Items,
                    selection: Selection, fill: Fill, shared: SharedInputs,
                    inputs: dict[str, str] | None = None) -> Results:
    """Every item evaluated with the selection's heads ablated by ``fill``
    (:func:`ih_sweep.evaluation.evaluator.evaluate` under
    :func:`ih_sweep.ablation.hooks.ablate_heads`), chunk by chunk, each chunk's rows with the
    stories' difficulty strata (:func:`ih_sweep.data.strata.strata_frame`). ``shared`` keeps
    each chunk's tokenized rows for the job's other draws. Partial results of another
    config (``partial/state.json``), or of other input files (``inputs``, the fingerprints
    of :func:`ih_sweep.fingerprints.job_inputs`), are discarded; the model is loaded only
    for a chunk still to evaluate. With ``control.draws_per_pass`` > 1 a chunk is evaluated
    for this draw's heads and its batch mates' (the next draws' head sets,
    :meth:`~ih_sweep.pipeline.draws.SharedInputs.batch_mates`) in the same batches
    (:func:`ih_sweep.evaluation.head_sets.evaluate_head_sets`), the mates' rows kept in
    ``shared`` until their draw writes them as its chunk."""
    from ih_sweep.ablation.hooks import ablate_head_sets, ablate_heads
    from ih_sweep.evaluation.evaluator import evaluate
    from ih_sweep.evaluation.head_sets import evaluate_head_sets

    items = data.items
    part = out_dir / "partial"
    size = config.eval.checkpoint_items
    state = {"config_hash": chash, "chunk_items": size, "n_items": len(items)}
    if inputs:  # none for the built-in model on generated data
        state["inputs"] = inputs
    if (part / "state.json").is_file() and read_json(part / "state.json") != state:
        log.info("discarding partial results of a different config in %s", part)
        shutil.rmtree(part)
    part.mkdir(parents=True, exist_ok=True)
    write_json(part / "state.json", state)
    for stale in [*out_dir.glob(".*.tmp"), *part.glob(".*.tmp")]:  # left by a killed write
        stale.unlink(missing_ok=True)
    frames, resumed = [], 0
    mates = shared.batch_mates(config, selection, fill.method)
    candidates = sorted({it.answer for it in items})  # the task's answers, for logit_diff
    starts = range(0, len(items), size)
    bar = tqdm(total=len(items), desc=describe(config), unit="item",
               disable=not config.eval.progress, leave=False)
    for c, start in enumerate(starts):
        chunk_file = part / f"chunk-{c:05d}.csv"
        chunk_items = items[start:start + size]
        if chunk_file.is_file():
            done, problem = read_chunk(chunk_file, chunk_items)
            if problem is None:
                frames.append(done)
                bar.update(len(done))
                resumed += 1
                continue
            log.warning("redoing %s: %s", chunk_file, problem)
        df = shared.take_ahead(selection.heads, start)  # an earlier draw's batches held it
        if df is not None:
            write_csv(chunk_file, df)
            frames.append(df)
            bar.update(len(df))
            continue
        lm, tokenizer = model()
        rows = shared.chunk_rows(tokenizer, chunk_items, start, size,
                                 config.eval.max_new_tokens, candidates)
        if mates:  # control.draws_per_pass: the later draws' head sets in the same batches
            with ablate_head_sets(lm, [selection.heads, *mates], fill.method, fill.values):
                res, *later = evaluate_head_sets(lm, tokenizer, chunk_items, config.eval,
                                                 1 + len(mates), bar, candidates, rows)
            for heads, their in zip(mates, later):
                shared.ahead.setdefault(frozenset(heads), {})[start] = \
                    chunk_frame(their, data.stories)
        else:
            with ablate_heads(lm, selection.heads, fill.method, fill.values):
                res = evaluate(lm, tokenizer, chunk_items, config.eval, bar, candidates, rows)
        df = chunk_frame(res, data.stories)
        write_csv(chunk_file, df)
        frames.append(df)
        if len(starts) > 1:
            log.info("chunk %d/%d done", c + 1, len(starts))
    bar.close()
    if resumed:
        log.info("resumed: %d of %d chunks were already done", resumed, len(starts))
    return Results(pd.concat(frames, ignore_index=True), resumed)


def chunk_frame(results: Sequence, stories: Sequence) -> pd.DataFrame:
    """A chunk's ITEM_COLUMNS rows: the evaluated items (:func:`item_frame`) with their
    stories' difficulty strata (:func:`ih_sweep.data.strata.strata_frame`)."""
    from ih_sweep.data.strata import strata_frame

    return pd.concat([item_frame(results), strata_frame(stories, [r.item for r in results])],
                     axis=1)[ITEM_COLUMNS]


def item_frame(results: Sequence) -> pd.DataFrame:
    """The ITEM_COLUMNS rows of evaluated items (:class:`.evaluation.ItemResult`) but the
    difficulty strata (:func:`ih_sweep.data.strata.strata_frame` adds them)."""
    return pd.DataFrame([(r.item.story_index, r.item.question_index, r.item.line,
                          r.item.examples_before, r.item.answer, r.continuation,
                          bool(r.correct), r.decided_by, r.margin, bool(r.near_tie),
                          r.gold_logprob, r.logit_diff) for r in results],
                        columns=[c for c in ITEM_COLUMNS if c not in STRATA_COLUMNS])


def read_chunk(path: Path, chunk_items: Sequence) -> tuple[pd.DataFrame | None, str | None]:
    """A checkpointed chunk and None, or None and why it cannot be trusted: it must hold
    exactly the chunk's items, once each, in the item columns."""
    try:
        df = pd.read_csv(path, keep_default_na=False)
    except (OSError, ValueError, pd.errors.ParserError, pd.errors.EmptyDataError) as err:
        return None, f"unreadable ({err})"
    if list(df.columns) != ITEM_COLUMNS:
        return None, "it does not have the item columns"
    want = [(it.story_index, it.question_index) for it in chunk_items]
    got = list(zip(df["story"], df["question_index"]))
    if sorted(got) != sorted(want) or len(set(got)) != len(got):
        return None, f"it holds {len(got)} rows, not the chunk's {len(want)} items once each"
    return df, None
