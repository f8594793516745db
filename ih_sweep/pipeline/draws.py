"""Several random draws in one evaluate job, and what their jobs share.

``condition=random control_seeds=K`` (K > 1) evaluates the draws ``control_seed`` ..
``control_seed + K - 1`` in one process (:func:`run_seeds`): each draw is written as the
complete job folder ``<job folder>/control_seed=<k>/`` that the single-seed job
``control_seed=k`` writes (same files, same config hash: the store serves either to the
other), then ``job.json`` of the job folder lists them
(:class:`~ih_sweep.pipeline.records.SeedsRecord`). What does not depend on the drawn heads
is computed once for all draws (:class:`SharedInputs`): the loaded model, the stories and
items, the score table, the heads' output norms, the check that every prompt fits the
model, each checkpoint chunk's tokenized rows, and the ablation method's heads-independent
statistics (mean and position-wise means cover every head; a per-head fill, resample's
donor outputs, is prepared once for the union of the draws' heads, within
:data:`DONOR_SHARE_BYTES`, and cut per draw). The mechanism check's unablated numbers are
cached per process anyway (:mod:`ih_sweep.pipeline.mechanism`), as is the evaluator's check
of its shortcuts. A killed K-draw job resumes at the draw it reached (finished draws are
skipped, the current one resumes from its last chunk).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ih_sweep.ablation.registry import Ablation, FillInputs
from ih_sweep.config.identity import config_hash
from ih_sweep.config.schema import Condition, Config
from ih_sweep.pipeline.records import (
    COMPLETE,
    EvaluationRecord,
    RecordError,
    SeedsRecord,
    read_record,
    store_dir,
    write_record,
)
from ih_sweep.pipeline.stages import (
    Fill,
    HeadCount,
    Items,
    LazyModel,
    ScoreTable,
    Selection,
    describe,
    load_items,
    load_norms,
    load_scores,
)

log = logging.getLogger("ih_sweep")

# a per-head fill (resample's donor outputs) in a several-draw job is prepared at once for
# the union of the next draws' heads as long as it fits in this many bytes (of the model's
# dtype, on its device: every donor text's tokens x head_dim per head), else for fewer draws
DONOR_SHARE_BYTES = 1 << 30
SEED_FOLDER = "control_seed={}"

Heads = list[tuple[int, int]]


@dataclass
class SharedInputs:
    """What the draws of one several-draw job (:func:`run_seeds`) compute once, by name.
    A single-seed job gets a fresh one. ``pending``: the draws still to evaluate, in order
    (their heads make the union a per-head fill is prepared for); ``used``: what a draw
    took from here that an earlier draw computed (job.json's ``shared``)."""

    pending: list[int] = field(default_factory=list)
    used: set[str] = field(default_factory=set)
    lazy_model: LazyModel | None = None
    items: Items | None = None
    scores: ScoreTable | None = None
    norms: np.ndarray | None = None  # the heads' output norms [layers, heads]
    prompts_checked: bool = False
    items_key: str | None = None  # :func:`items_key` of the job's config
    rows: dict[tuple[int, int], Any] = field(default_factory=dict)
    reference: tuple[Any] | None = None  # (the method's heads-independent statistics,)
    fill: Any = None  # the method's fill of the heads of :attr:`fill_heads`
    fill_heads: Heads | None = None
    # what each distinct head set of the draws gave: (its first draw's control_seed, its
    # Results, its mechanism check), by the set
    evaluated: dict[frozenset, tuple[int, Any, dict]] = field(default_factory=dict)
    # control.draws_per_pass > 1: the checkpoint chunks a draw evaluated for the later draws
    # in its batches, by their head set, then chunk start (items frames, taken once)
    ahead: dict[frozenset, dict[int, Any]] = field(default_factory=dict)

    def same_heads(self, heads: Heads) -> tuple[int, Any, dict] | None:
        """(control_seed, Results, mechanism) of an earlier draw of this job that ablated
        exactly ``heads`` (as a set: the order does not change an ablation), else None. A
        norm-matched control of a layer with few matching heads draws the same set again
        and again; its results are a function of the set, so they are evaluated once."""
        found = self.evaluated.get(frozenset(heads)) if heads else None
        if found is not None:
            self.used.add("same_heads")
        return found

    def remember(self, seed: int, heads: Heads, results: Any, mechanism: dict) -> None:
        """What the draw ``seed`` of ``heads`` gave, for :meth:`same_heads`."""
        if heads:
            self.evaluated.setdefault(frozenset(heads), (seed, results, mechanism))

    def batch_mates(self, config: Config, selection: Selection, method: Ablation) -> list[Heads]:
        """The head sets evaluated beside this draw's (``selection.heads``) in its batches:
        with ``control.draws_per_pass=D`` > 1 and a method that ablates one set a row
        (``per_row_sets``), those of the next pending draws, in order, up to D - 1, each a
        set no earlier draw evaluated, not this draw's, not an earlier mate's and with no
        chunk evaluated ahead already (:attr:`ahead`); a draw whose heads cannot be drawn
        (a refusal) ends the list, so that the refusal comes when that draw runs."""
        from ih_sweep.config.errors import UserError

        d = config.control.draws_per_pass
        if d <= 1 or not selection.heads or not getattr(method, "per_row_sets", False):
            return []
        seed = config.control_seed
        later = self.pending[self.pending.index(seed) + 1:] if seed in self.pending else []
        seen, mates = {frozenset(selection.heads)}, []
        for k in later:
            if len(mates) == d - 1:
                break
            try:
                heads = selection.heads_for(k)
            except UserError:
                break
            key = frozenset(heads)
            if heads and key not in seen and key not in self.evaluated \
                    and key not in self.ahead:
                seen.add(key)
                mates.append(heads)
        return mates

    def take_ahead(self, heads: Heads, start: int) -> Any:
        """The items frame of the chunk at ``start`` an earlier draw evaluated for ``heads``
        (:meth:`batch_mates`), removed from :attr:`ahead`; None if none."""
        chunks = self.ahead.get(frozenset(heads))
        if not chunks or start not in chunks:
            return None
        self.used.add("batches")
        return chunks.pop(start)

    def model(self, config: Config) -> LazyModel:
        """The job's model, loaded at its first use (:class:`LazyModel`)."""
        if self.lazy_model is None:
            self.lazy_model = LazyModel(config)
        return self.lazy_model

    def load_items(self, config: Config) -> Items:
        """The stories and items (:func:`ih_sweep.pipeline.stages.load_items`; made once
        per process for the same settings and data files: :data:`PROCESS`)."""
        if self.items is None:
            self.items_key = items_key(config)
            self.items = PROCESS.get(("items", self.items_key), lambda: load_items(config))
        else:
            self.used.add("data")
        return self.items

    def load_scores(self, config: Config, count: HeadCount, model: LazyModel, data: Items
                    ) -> ScoreTable:
        """The score table (:func:`ih_sweep.pipeline.stages.load_scores`)."""
        if self.scores is None:
            self.scores = load_scores(config, count, model, data)
        else:
            self.used.add("scores")
        return self.scores

    def load_norms(self, config: Config, count: HeadCount, model: LazyModel, data: Items
                   ) -> np.ndarray:
        """The heads' output norms (:func:`ih_sweep.pipeline.stages.load_norms`)."""
        if self.norms is None:
            self.norms = load_norms(config, count, model, data)
        else:
            self.used.add("output_norms")
        return self.norms

    def check_prompts(self, config: Config, model: LazyModel, data: Items) -> None:
        """Every prompt fits the model's positions
        (:func:`ih_sweep.evaluation.evaluator.check_prompt_lengths`), before any pass."""
        from ih_sweep.evaluation.evaluator import check_prompt_lengths

        if self.prompts_checked:
            self.used.add("prompt_lengths")
            return
        PROCESS.get(("prompt_lengths", self.items_key, model_key(config),
                     config.eval.max_new_tokens),
                    lambda: check_prompt_lengths(*model(), data.items,
                                                 config.eval.max_new_tokens) or True)
        self.prompts_checked = True

    def chunk_rows(self, tokenizer, chunk_items: Sequence, start: int, size: int,
                   max_new_tokens: int, candidates: Sequence[str]) -> Any:
        """The tokenized rows of the checkpoint chunk at ``start`` of ``size`` items
        (:func:`ih_sweep.evaluation.evaluator.build_rows`)."""
        from ih_sweep.evaluation.evaluator import build_rows

        if (start, size) in self.rows:
            self.used.add("rows")
        else:
            key = ("rows", self.items_key, self.lazy_model and model_key(self.lazy_model.config),
                   start, size, max_new_tokens, tuple(candidates))
            self.rows[(start, size)] = PROCESS.get(key, lambda: build_rows(
                tokenizer, chunk_items, max_new_tokens, candidates))
        return self.rows[(start, size)]

    def prepare_fill(self, config: Config, method: Ablation, model: LazyModel, data: Items,
                     selection: Selection) -> Fill:
        """The ``method``'s fill of the selected heads, from the unablated model: its
        heads-independent statistics once (``reference``); a per-head fill prepared for the
        union of these heads and the pending draws' after them within
        :data:`DONOR_SHARE_BYTES` (these at least), then cut to these heads (equal to one
        prepared for them alone). No heads: nothing to fill."""
        heads = selection.heads
        if not heads:
            return Fill(method)
        if self.fill is not None and method.covers(self.fill, heads):
            self.used.add(method.fill_shared_as)
            return Fill(method, method.restrict(self.fill, heads))
        lm, tokenizer = model()
        inputs = FillInputs(lm, tokenizer, data.items, config.ablation,
                            config.eval.max_new_tokens)
        if self.reference is None:
            self.reference = (method.reference(inputs),)
        elif self.reference[0] is not None:  # zero ablation has no statistics
            self.used.update(method.reference_shared_as)
        reference = self.reference[0]
        union = heads
        if method.per_head:
            union = self.union(heads, config.control_seed, selection.heads_for,
                               method.bytes_per_head(inputs, reference))
        self.fill = None  # the previous union's memory first
        self.fill = method.prepare(inputs, union, reference)
        return Fill(method, method.restrict(self.fill, heads) if method.per_head else self.fill)

    def union(self, heads: Heads, seed: int, draw: Callable[[int], Heads], per_head: int
              ) -> Heads:
        """``heads`` and those of the pending draws after ``seed`` (``draw(k)``: a draw's
        heads), draw by draw, while ``per_head`` bytes a head fit :data:`DONOR_SHARE_BYTES`."""
        union = list(heads)
        later = self.pending[self.pending.index(seed) + 1:] if seed in self.pending else []
        for k in later:
            more = union + [h for h in draw(k) if h not in union]
            if len(more) * per_head > DONOR_SHARE_BYTES:
                break
            union = more
        return union


class ProcessMemo:
    """What the jobs of one process make alike whatever heads they ablate, by what it is
    made from: the items of a data and eval setting (:func:`items_key`), that their prompts
    fit a model, each checkpoint chunk's tokenized rows. A local multirun runs its jobs in
    one process (Hydra's launcher), so the conditions and N of a sweep share one
    tokenization. Holds the last :attr:`size` values (treated as read-only by every job)."""

    def __init__(self, size: int = 32):
        self.size = size
        self._values: OrderedDict[tuple, Any] = OrderedDict()

    def get(self, key: tuple, make: Callable[[], Any]) -> Any:
        """The value under ``key``, made by ``make()`` if absent (a failing ``make`` keeps
        nothing)."""
        if key in self._values:
            self._values.move_to_end(key)
            return self._values[key]
        value = self._values[key] = make()
        while len(self._values) > self.size:
            self._values.popitem(last=False)
        return value

    def clear(self) -> None:
        self._values.clear()


PROCESS = ProcessMemo()


def items_key(config: Config) -> str:
    """What a job's items are made from: the ``data`` and ``eval`` settings, whether held-out
    items come with them (:func:`~ih_sweep.pipeline.stages.needs_heldout`) and the data
    files' fingerprints (:func:`ih_sweep.fingerprints.data_inputs`), as JSON."""
    import json

    from ih_sweep.config.plain import plain
    from ih_sweep.fingerprints import data_inputs
    from ih_sweep.pipeline.stages import needs_heldout

    return json.dumps([plain(config.data), plain(config.eval), needs_heldout(config),
                       data_inputs(config)], sort_keys=True, default=str)


def model_key(config: Config) -> str:
    """The loaded model's name in this process (:func:`ih_sweep.model.loading.cache_key`)."""
    from ih_sweep.model.loading import cache_key

    return cache_key(config.model, config.quantization, config.device)


def several_draws(config: Config) -> bool:
    """Whether ``config`` asks one job for several random draws (:func:`run_seeds`)."""
    return config.condition == Condition.random and config.control_seeds > 1 \
        and config.n_heads != 0  # a count, or a share P% (P > 0)


def seed_configs(config: Config) -> list[Config]:
    """The single-seed config of each draw of a several-draw ``config``."""
    return [dataclasses.replace(config, control_seed=k, control_seeds=1)
            for k in range(config.control_seed, config.control_seed + config.control_seeds)]


def run_seeds(config: Config, out_dir: Path,
              run_one: Callable[[Config, Path, SharedInputs], EvaluationRecord]
              ) -> SeedsRecord:
    """``condition=random control_seeds=K``: each draw's job into
    ``out_dir/control_seed=<k>/`` through ``run_one`` (the single-draw job) with one
    :class:`SharedInputs`, then ``out_dir/job.json`` listing them. Draws complete in their
    folder or in the store are not evaluated again, so a killed job resumes at the draw it
    reached, and a later single-seed job reuses any draw (and vice versa)."""
    t_start = time.time()
    configs = seed_configs(config)
    hashes = [config_hash(c) for c in configs]
    folders = [SEED_FOLDER.format(c.control_seed) for c in configs]
    done = [_recorded(out_dir / f, h) or _recorded(store_dir(config.paths.cache_dir, h), h)
            for f, h in zip(folders, hashes)]
    shared = SharedInputs(pending=[c.control_seed for c, d in zip(configs, done) if not d])
    log.info("%s: %d draws (control_seed=%d..%d) in one job, %d to evaluate", describe(config),
             len(configs), configs[0].control_seed, configs[-1].control_seed,
             len(shared.pending))
    records = [run_one(c, out_dir / f, shared) for c, f in zip(configs, folders)]
    loaded = shared.lazy_model is not None and shared.lazy_model.loaded is not None
    record = SeedsRecord(
        config_hash=config_hash(config), n_heads=records[0].n_heads,
        n_heads_share=records[0].n_heads_share,
        condition=config.condition.value, control_seeds=[c.control_seed for c in configs],
        seed_folders=folders, seed_hashes=hashes,
        accuracies=[r.accuracy for r in records], model=config.model.name,
        reused=[c.control_seed for c, d in zip(configs, done) if d],
        shared=sorted(shared.used | ({"model"} if loaded and len(shared.pending) > 1
                                     else set())),
        timings={"total_s": round(time.time() - t_start, 3)},
        slurm_job_id=os.environ.get("SLURM_JOB_ID"))
    write_record(out_dir, record)
    acc = [100 * a for a in record.accuracies]
    log.info("%s: %d draws, accuracy %.1f%% to %.1f%%, written to %s", describe(config),
             len(acc), min(acc), max(acc), out_dir)
    return record


def _recorded(folder: Path, chash: str) -> bool:
    """Whether ``folder`` holds a complete record of this config hash (files unchecked:
    for planning only; the job checks them before it trusts them)."""
    try:
        record = read_record(folder)
    except RecordError:
        return False
    return record.status == COMPLETE and record.config_hash == chash
