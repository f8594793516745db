"""The ``evaluate`` job: one (n_heads, condition, control_seed) on one model and data set.

Recipe, read top to bottom in :func:`run`, each stage a named call returning what the next
takes: check (:class:`~ih_sweep.pipeline.stages.HeadCount`) -> data
(:class:`~ih_sweep.pipeline.stages.Items`) -> scores
(:class:`~ih_sweep.pipeline.stages.ScoreTable`) -> output norms
(:mod:`ih_sweep.heads.output_norms`) -> select
(:class:`~ih_sweep.pipeline.stages.Selection`) -> ablate (the method's
:class:`~ih_sweep.pipeline.stages.Fill`, :mod:`ih_sweep.ablation.registry`) -> evaluate
(:class:`~ih_sweep.pipeline.stages.Results`, checkpointed: :mod:`.checkpoints`) -> mechanism
-> write (the :class:`~ih_sweep.pipeline.records.EvaluationRecord`). The stages live in
:mod:`.stages`.

A job already complete for the same config is reused; a killed job resumes from its last
checkpoint. ``condition=random control_seeds=K`` (K > 1) runs the K draws in one process,
sharing what does not depend on the drawn heads (:mod:`.draws`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ih_sweep.ablation.registry import get_ablation
from ih_sweep.config.identity import config_hash
from ih_sweep.config.schema import Config
from ih_sweep.fingerprints import job_inputs
from ih_sweep.pipeline.checkpoints import evaluate_chunks
from ih_sweep.pipeline.draws import SharedInputs, run_seeds, several_draws
from ih_sweep.pipeline.records import EvaluationRecord, SeedsRecord, evaluation_lock
from ih_sweep.pipeline.stages import (
    count_heads,
    describe,
    needs_scores,
    reuse_finished,
    run_mechanism,
    select,
    write_job,
)

log = logging.getLogger("ih_sweep")


def run(config: Config, out_dir: Path, shared: SharedInputs | None = None
        ) -> EvaluationRecord | SeedsRecord:
    """Run the job into ``out_dir`` (results.csv, heads.csv, job.json); returns its record.
    ``shared``: what the draws of a several-draw job compute once (:mod:`.draws`)."""
    if several_draws(config):
        return run_seeds(config, out_dir, run)
    started = time.time()
    chash = config_hash(config)
    inputs = job_inputs(config)  # the input files by content, recorded beside the hash
    with evaluation_lock(config.paths.cache_dir, chash) as waited:  # one process evaluates
        finished = reuse_finished(config, out_dir, chash, started, inputs, waited)
        if finished is not None:  # done before, or by the process this one waited for
            return finished
        return evaluate(config, out_dir, chash, inputs, started, shared)


def evaluate(config: Config, out_dir: Path, chash: str, inputs: dict[str, str],
             started: float, shared: SharedInputs | None) -> EvaluationRecord:
    """The job's stages, in order (the job's lock held: :func:`run`)."""
    shared = shared or SharedInputs()
    timings: dict[str, float] = {}
    method = get_ablation(config.ablation.method)
    model = shared.model(config)  # loaded at its first use

    # check: what can be checked without weights comes first
    count = count_heads(config)

    with timed(timings, "data_s"):
        data = shared.load_items(config)

    with timed(timings, "scores_s"):
        table = shared.load_scores(config, count, model, data) \
            if needs_scores(config, count) else None
    with timed(timings, "norms_s"):  # the heads' output norms: heads.csv, norm matching
        norms = shared.load_norms(config, count, model, data) if table is not None else None
        selection = select(config, count, table, norms)

    same = shared.same_heads(selection.heads)  # a draw of a set an earlier draw had
    if same is not None:
        seed, results, mechanism = same
        log.info("%s: the heads of control_seed=%d again; its results are that draw's",
                 describe(config), seed)
    else:
        with timed(timings, "eval_s"):
            shared.check_prompts(config, model, data)  # before any pass: every prompt fits
            fill = shared.prepare_fill(config, method, model, data, selection)
            results = evaluate_chunks(config, out_dir, chash, model, data, selection, fill,
                                      shared, inputs)

        with timed(timings, "mechanism_s"):  # repeat loss and ICL score, ablated and not
            mechanism = run_mechanism(config, model, data, selection, fill)
        shared.remember(config.control_seed, selection.heads, results, mechanism)

    timings |= model.take_load_time()  # load_s where this draw loaded it
    timings["total_s"] = time.time() - started
    return write_job(config, out_dir, chash, count, selection, results, mechanism, timings,
                     inputs, same_heads_as=same[0] if same is not None else None)


@contextmanager
def timed(timings: dict[str, float], key: str) -> Iterator[None]:
    """``timings[key]``: the seconds spent inside."""
    t0 = time.time()
    try:
        yield
    finally:
        timings[key] = time.time() - t0
