"""The evaluate job's stages (:mod:`ih_sweep.pipeline.evaluate` calls them in order), each a
plain function of what the earlier ones returned, and the artifacts they pass on:
:class:`HeadCount` -> :class:`Items` -> :class:`ScoreTable` -> :class:`Selection` ->
:class:`Fill` -> :class:`Results` -> the job's record. What the draws of a several-draw job
share (the model, the items, the score table, the fill) is held by
:class:`ih_sweep.pipeline.draws.SharedInputs`, which calls the loading stages here."""

from __future__ import annotations

import dataclasses
import logging
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ih_sweep.ablation.registry import Ablation
from ih_sweep.config.errors import ConfigError
from ih_sweep.config.plain import plain
from ih_sweep.config.rules import n_heads_share
from ih_sweep.config.schema import Condition, Config, EvalConfig, PromptFormat, ScoreSource
from ih_sweep.pipeline.records import EvaluationRecord, finished_record, restore, write_record

log = logging.getLogger("ih_sweep")


@dataclass
class HeadCount:
    """How many heads the job ablates on this model (``n_heads`` resolved; ``share``: the
    percentage it asked for, or None for a count) and the model's shape."""

    n_ablate: int
    share: Any
    n_layers: int
    heads_per_layer: int


@dataclass
class Items:
    """The job's stories and the items (questions as prompts) evaluated on them."""

    stories: list
    items: list


@dataclass
class ScoreTable:
    """The head score table (``frame``, columns :data:`ih_sweep.heads.scoring.SCORE_COLUMNS`),
    the file holding its ``rank_by`` column (a cache file or the user's) and the computed
    scores' per-sample values by score name (``prefix``: [sequences, layers, heads],
    ``fv``: [prompts, layers, heads]; :func:`ih_sweep.heads.score_table.score_samples`)."""

    frame: pd.DataFrame
    file: str
    samples: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)


@dataclass
class Selection:
    """The heads ablated ((layer, head) pairs, in selection order; none for an unablated
    job), the ``rank_by`` matrix [layers, heads] they were chosen on, the score file, the
    heads' mean output norms [layers, heads] (:mod:`ih_sweep.heads.output_norms`;
    residual-stream units), and what :meth:`heads_for` needs to draw them with another
    control seed (``match``, ``norm_factor``: ``control``'s)."""

    heads: list[tuple[int, int]]
    matrix: np.ndarray | None = None
    scores_file: str | None = None
    condition: str = "none"
    n_ablate: int = 0
    excluded: list[tuple[int, int]] = dataclasses.field(default_factory=list)
    norms: np.ndarray | None = None
    match: str = "layer"
    norm_factor: float = 2.0
    stability: dict[str, Any] | None = None  # :func:`ranking_stability`

    def heads_for(self, seed: int) -> list[tuple[int, int]]:
        """This job's heads had it been drawn with ``control_seed=seed``."""
        from ih_sweep.heads.selection import select_heads

        return select_heads(self.matrix, self.condition, self.n_ablate, seed, self.excluded,
                            self.match, self.norms, self.norm_factor)

    def output_norms(self) -> list[float | None]:
        """Each ablated head's mean output norm, in :attr:`heads` order (None without
        norms)."""
        if self.norms is None:
            return [None] * len(self.heads)
        return [float(self.norms[la, h]) for la, h in self.heads]


@dataclass
class Fill:
    """The ablation ``method`` and what it fills the selected heads with (its prepared
    fill; None without heads or for a method that needs none)."""

    method: Ablation
    values: Any = None


@dataclass
class Results:
    """The evaluated items (:data:`ih_sweep.pipeline.records.ITEM_COLUMNS` rows) and how many
    checkpointed chunks were reused."""

    items: pd.DataFrame
    resumed_chunks: int


class LazyModel:
    """The job's (model, tokenizer) (:func:`ih_sweep.model.loading.load_model`), loaded at the
    first call: a job whose score table is cached and whose chunks are all checkpointed never
    loads it. ``load_s``: seconds the load took (None until loaded). With
    ``eval.progress=false`` transformers' own progress bar of the load stays off too, so a
    refusal raised after the load (``control.match=layer_norm`` without a match) is the one
    line on stderr."""

    def __init__(self, config: Config):
        self.config = config
        self.loaded: tuple[Any, Any] | None = None
        self.load_s: float | None = None
        self._told = False

    def __call__(self) -> tuple[Any, Any]:
        if self.loaded is None:
            from transformers.utils import logging as hf_logging

            from ih_sweep.model.loading import load_model

            quiet = not self.config.eval.progress and hf_logging.is_progress_bar_enabled()
            t0 = time.time()
            if quiet:
                hf_logging.disable_progress_bar()
            try:
                self.loaded = load_model(self.config.model, self.config.quantization,
                                        self.config.device)  # frozen if loaded anew
            finally:
                if quiet:
                    hf_logging.enable_progress_bar()
            self.load_s = time.time() - t0
        return self.loaded

    def take_load_time(self) -> dict[str, float]:
        """``{"load_s": seconds}`` the first time after the load, else empty (a job's
        timings; the other draws of a several-draw job reuse the model)."""
        if self.load_s is None or self._told:
            return {}
        self._told = True
        return {"load_s": self.load_s}


# --------------------------------------------------------------------------- stages
def reuse_finished(config: Config, out_dir: Path, chash: str, started: float,
                   inputs: dict[str, str] | None = None, waited: float | None = None
                   ) -> EvaluationRecord | None:
    """The record of this config's finished job, in ``out_dir`` or in the store (then
    copied into ``out_dir`` with this job's bookkeeping), or None: the job must run. A
    finished job is this config's when its config hash is ``chash`` and its recorded input
    files' fingerprints are ``inputs`` (:func:`ih_sweep.fingerprints.job_inputs`, computed
    here when not given). ``waited``: seconds this job waited for another process's
    evaluation of the same hash (:func:`ih_sweep.pipeline.records.evaluation_lock`), said in
    the log line when its stored job is reused."""
    if inputs is None:
        from ih_sweep.fingerprints import job_inputs

        inputs = job_inputs(config)
    previous = finished_record(out_dir, chash, "results.csv", inputs)
    if previous is not None:
        log.info("skipping %s: complete results exist for this config", out_dir)
        return previous  # type: ignore[return-value]
    stored = restore(config.paths.cache_dir, chash, out_dir, inputs)
    if stored is None:
        return None
    score = f"{stored.n_correct}/{stored.n_items} correct ({100 * stored.accuracy:.1f}%)"
    if waited is not None:
        log.info("waited %.1f s for another process evaluating %s (%s); reusing its finished "
                 "evaluation %s: %s", waited, describe(config), chash,
                 Path(config.paths.cache_dir) / "jobs" / chash, score)
    else:
        log.info("reusing the finished evaluation %s (%s) for %s: %s", chash,
                 Path(config.paths.cache_dir) / "jobs" / chash, describe(config), score)
    record = dataclasses.replace(  # this job's own bookkeeping, the stored results
        stored, reused_evaluation=True, slurm_job_id=os.environ.get("SLURM_JOB_ID"),
        host=platform.node(), timings={"total_s": round(time.time() - started, 3)})
    write_record(out_dir, record)
    return record


def count_heads(config: Config, shape: tuple[int, int] | None = None) -> HeadCount:
    """What can be checked without weights: a share of heads (``n_heads=10%``) becomes its
    count on this model. Raises :class:`ConfigError` for more heads than the model has.
    ``shape``: the model's (layers, heads per layer) where the caller knows them (the
    checks before any job: :func:`ih_sweep.pipeline.preflight.model_shape`), else read
    from its config (:func:`ih_sweep.model.loading.layers_and_heads`)."""
    from ih_sweep.heads.selection import resolve_n_heads

    if shape is None:
        from ih_sweep.model.loading import layers_and_heads

        shape = layers_and_heads(config.model)
    n_layers, heads_per_layer = shape
    n_ablate = resolve_n_heads(config.n_heads, n_layers, heads_per_layer)
    share = n_heads_share(config.n_heads)
    if config.condition != Condition.none and n_ablate > n_layers * heads_per_layer:
        raise ConfigError(f"n_heads={config.n_heads} is larger than the model's "
                          f"{n_layers * heads_per_layer} heads ({n_layers} x "
                          f"{heads_per_layer})")
    if share is not None and config.condition != Condition.none:
        log.info("n_heads=%s of the model's %d heads (%d x %d): %d heads (rounded up)",
                 config.n_heads, n_layers * heads_per_layer, n_layers, heads_per_layer,
                 n_ablate)
    return HeadCount(n_ablate, share, n_layers, heads_per_layer)


def load_items(config: Config) -> Items:
    """The job's stories (``data``) and their items (``eval``), with the held-out items
    beside them (:class:`ih_sweep.data.heldout.EvaluatedItems`) where the job takes a
    statistic on them (:func:`needs_heldout`)."""
    from ih_sweep.data import items_for, load_stories
    from ih_sweep.data.heldout import EvaluatedItems, heldout_items

    stories = load_stories(config.data)
    items = items_for(config.data, config.eval, stories)
    if not needs_heldout(config):
        return Items(stories, EvaluatedItems(items))
    return Items(stories, EvaluatedItems(items, *heldout_items(config.data, config.eval,
                                                               stories)))


def needs_heldout(config: Config) -> bool:
    """Whether the job takes a statistic on held-out prompts: an ablating job whose method
    takes reference prompts (not ``zero``) with ``ablation.reference=heldout``, or FV
    scores computed with ``scoring.fv_reference=heldout``."""
    from ih_sweep.config.schema import Reference

    used = reference_prompts(config) or {}
    return Reference.heldout.value in (used.get("ablation"), used.get("fv"))


def needs_scores(config: Config, count: HeadCount) -> bool:
    """Whether the job ablates any head (and so needs the score table)."""
    return config.condition != Condition.none and count.n_ablate > 0


def load_scores(config: Config, count: HeadCount, model: LazyModel, data: Items
                ) -> ScoreTable:
    """The score table (:func:`ih_sweep.heads.score_table.get_scores`: cached, computed with
    ``model`` where no cache holds it, or the user's file, checked against the model)."""
    from ih_sweep.heads.score_table import check_scores_fit, get_scores, score_samples

    shape = (count.n_layers, count.heads_per_layer)
    frame, cached = get_scores(config, model, progress=config.eval.progress,
                               shape=shape, items=data.items)
    if config.scoring.source == ScoreSource.file:
        check_scores_fit(frame, count.n_layers, count.heads_per_layer, config.scoring.file)
    return ScoreTable(frame, str(cached or Path(config.scoring.file).resolve()),
                      score_samples(config, shape))


def load_norms(config: Config, count: HeadCount, model: LazyModel, data: Items) -> np.ndarray:
    """[layers, heads] mean output norms ||z_h W_O^h|| over the job's reference prompts
    (:func:`ih_sweep.heads.output_norms.get_output_norms`: cached per model and prompts)."""
    from ih_sweep.heads.output_norms import get_output_norms

    return get_output_norms(config, model, data.items, (count.n_layers, count.heads_per_layer))


def select(config: Config, count: HeadCount, table: ScoreTable | None,
           norms: np.ndarray | None = None) -> Selection:
    """The heads ``condition`` and ``control_seed`` choose on ``scoring.rank_by``, none of
    those ``scoring.exclude_by`` takes out, a random control matched as ``control.match``
    says (on ``norms``, the heads' output norms, for ``layer_norm``); none without a
    table."""
    from ih_sweep.heads.score_table import exclusion, matrix_for

    if table is None:
        return Selection([])
    selection = Selection([], matrix_for(config, table.frame, config.scoring.rank_by),
                          table.file, str(config.condition), count.n_ablate,
                          exclusion(config, table.frame), norms, str(config.control.match),
                          config.control.norm_factor)
    selection.heads = selection.heads_for(config.control_seed)
    selection.stability = ranking_stability(config, table, selection)
    return selection


def ranking_stability(config: Config, table: ScoreTable, selection: Selection
                      ) -> dict[str, Any] | None:
    """job.json's ``rank_stability``: how often the job's heads come back when the samples
    its ``rank_by`` score averages over are resampled (:mod:`ih_sweep.heads.stability`:
    mean overlap over :data:`~ih_sweep.heads.stability.RESAMPLES` bootstrap resamples,
    seed 0; the heads chosen again by the job's own rule, ``scoring.exclude_by``'s
    exclusion held as chosen on all samples). For ``high`` and ``low`` jobs ranked by
    ``prefix`` (over the random sequences) or ``fv`` (over the corrupted prompts); None
    otherwise (``random`` draws its heads; copying and combined keep no per-sample scores;
    a user's file has none)."""
    from ih_sweep.heads import stability as st

    rank_by = str(config.scoring.rank_by)
    samples = table.samples.get(rank_by)
    if samples is None or not selection.heads or \
            selection.condition not in (Condition.high.value, Condition.low.value):
        return None

    def choose(matrix: np.ndarray) -> list[tuple[int, int]]:
        return dataclasses.replace(selection, matrix=matrix).heads_for(config.control_seed)

    value = st.top_n_stability(samples, choose, st.RESAMPLES, 0)
    log.info("the %s heads by %s come back in %.0f%% of %d resamples of the %d %s%s",
             selection.condition, rank_by, 100 * value, st.RESAMPLES, samples.shape[0],
             "prompts" if rank_by == "fv" else "sequences",
             f" (below {st.UNSTABLE_BELOW:g}: unstable)" if st.unstable(value) else "")
    return {"score": rank_by, "over": "prompts" if rank_by == "fv" else "sequences",
            "samples": int(samples.shape[0]), "resamples": st.RESAMPLES, "seed": 0,
            "mean_overlap": value, "threshold": st.UNSTABLE_BELOW,
            "unstable": st.unstable(value)}


def run_mechanism(config: Config, model: LazyModel, data: Items, selection: Selection,
                  fill: Fill) -> dict[str, Any]:
    """job.json's ``mechanism`` (:func:`ih_sweep.pipeline.mechanism.mechanism_check`) with the
    job's heads and fill, on the first ``mechanism.n_texts`` stories; empty with
    ``mechanism.enabled=false``. A method that cannot be measured on the mechanism's texts
    (its ``mechanism_unmeasured``: resample, whose donors are bAbI stories) leaves the
    ablated entries null, with ``ablated_not_measured`` saying why."""
    if not config.mechanism.enabled:
        return {}
    from ih_sweep.model.loading import cache_key
    from ih_sweep.pipeline.mechanism import icl_tokens, mechanism_check, texts_for

    heads = selection.heads
    unmeasured = fill.method.mechanism_unmeasured if heads else None
    key = cache_key(config.model, config.quantization, config.device)
    tokens = icl_tokens(config.mechanism, config.model.path)
    out = mechanism_check(*model(), config.mechanism,
                          texts_for(data.stories, config.mechanism.n_texts, tokens),
                          [] if unmeasured else heads, fill.method,
                          None if unmeasured else fill.values, model_key=key, tokens=tokens,
                          speed=config.eval)
    if unmeasured:
        log.info("mechanism check: the ablated repeat loss and ICL score are not measured (%s)",
                 unmeasured)
        out |= {"repeat_loss": None, "icl_score": None, "ablated_not_measured": unmeasured}
    return out


def write_job(config: Config, out_dir: Path, chash: str, count: HeadCount,
              selection: Selection, results: Results, mechanism: dict[str, Any],
              timings: dict[str, float], inputs: dict[str, str] | None = None,
              same_heads_as: int | None = None) -> EvaluationRecord:
    """results.csv (:data:`~ih_sweep.pipeline.records.RESULT_COLUMNS`), heads.csv and
    job.json (:class:`~ih_sweep.pipeline.records.EvaluationRecord`) into ``out_dir``, then the
    job into the store; the partial chunks go. An unablated job ablates 0 heads whatever N
    was asked (no share either), and the control seed is 0 unless it drew the heads
    (condition=random), as in the config hash. ``inputs``: the input files' fingerprints
    (:func:`ih_sweep.fingerprints.job_inputs`) the job read, recorded beside the hash;
    ``same_heads_as``: the earlier draw of the same heads whose results these are."""
    import shutil

    from ih_sweep.config.identity import semantic_config
    from ih_sweep.data.prompts import demo_source
    from ih_sweep.io_utils import write_csv
    from ih_sweep.pipeline.records import HEAD_COLUMNS, RESULT_COLUMNS, sha256, store

    heads, mat = selection.heads, selection.matrix
    n_heads, condition, control_seed = len(heads), config.condition.value, \
        (config.control_seed if config.condition == Condition.random else 0)
    n_share = float(count.share) if count.share is not None and heads else None
    if not heads:
        condition = Condition.none.value
    frame = results.items.assign(
        **helm_columns(results.items, config.eval),
        n_heads=n_heads, n_heads_share=n_share, condition=condition, control_seed=control_seed,
        model=config.model.name, quantization=config.quantization.name.value,
        data=config.data.name.value, babi_task=config.data.task, split=split_name(config),
        metric=config.eval.metric.value, scope=config.eval.scope.value,
        ablation=config.ablation.method,
    )[RESULT_COLUMNS]
    norms = selection.output_norms()
    heads_df = pd.DataFrame([(la, h, float(mat[la, h]), config.scoring.rank_by.value, norm)
                             for (la, h), norm in zip(heads, norms)], columns=HEAD_COLUMNS)
    write_csv(out_dir / "results.csv", frame)
    write_csv(out_dir / "heads.csv", heads_df)
    n_correct = int(frame["correct"].sum())
    record = EvaluationRecord(
        config_hash=chash, n_heads=n_heads, n_heads_share=n_share, condition=condition,
        control_seed=control_seed, model=config.model.name,
        quantization=config.quantization.name.value, data=plain(config.data),
        eval={"metric": config.eval.metric.value, "scope": config.eval.scope.value,
              "max_new_tokens": config.eval.max_new_tokens,
              "format": config.eval.format.value, "n_shots": config.eval.n_shots,
              "stop": list(config.eval.stop),
              "demo_pool": demo_source(config.data, config.eval)},
        ablation=config.ablation.method, rank_by=config.scoring.rank_by.value,
        n_items=len(frame), n_correct=n_correct, accuracy=n_correct / max(len(frame), 1),
        n_decoded=int((frame["decided_by"] != "forward").sum()),
        heads=[[int(la), int(h)] for la, h in heads], reused_evaluation=False,
        resumed_chunks=results.resumed_chunks,
        timings={k: round(v, 3) for k, v in timings.items()},
        slurm_job_id=os.environ.get("SLURM_JOB_ID"),
        results_sha256=sha256(out_dir / "results.csv"), settings=semantic_config(config),
        scores_file=selection.scores_file, mechanism=mechanism, inputs=dict(inputs or {}),
        output_norm_mean=float(np.mean(norms)) if heads and None not in norms else None,
        same_heads_as=same_heads_as, rank_stability=selection.stability,
        reference_prompts=reference_prompts(config))
    write_record(out_dir, record)
    store(out_dir, config.paths.cache_dir, chash)
    shutil.rmtree(out_dir / "partial", ignore_errors=True)
    log.info("%s: %d/%d correct (%.1f%%), written to %s", describe(config), n_correct,
             len(frame), 100 * record.accuracy, out_dir)
    return record


def helm_columns(items: pd.DataFrame, settings: EvalConfig) -> dict[str, list]:
    """results.csv's HELM columns (:data:`~ih_sweep.pipeline.records.HELM_COLUMNS`) of the
    item rows ``items``: HELM's four metrics of each continuation (already cut at the stop
    strings) against its answer (:func:`ih_sweep.evaluation.metrics.helm_scores`) where
    ``settings.format`` is helm (its continuations are decoded whole), else empty."""
    from ih_sweep.evaluation.metrics import helm_scores
    from ih_sweep.pipeline.records import HELM_COLUMNS

    if settings.format != PromptFormat.helm:
        return {c: [""] * len(items) for c in HELM_COLUMNS}
    scores = [helm_scores(str(c), str(a)) for c, a in zip(items["continuation"],
                                                            items["answer"])]
    return {c: [s[c] for s in scores] for c in HELM_COLUMNS}


def reference_prompts(config: Config) -> dict[str, Any] | None:
    """job.json's ``reference_prompts``: which prompts the job's reference means
    (``ablation``) and FV scores (``fv``) are taken on, ``heldout`` or ``evaluated``
    (null: the job takes none), and where the held-out stories come from
    (:mod:`ih_sweep.data.heldout`); None for a job that takes neither."""
    from ih_sweep.config.schema import NO_REFERENCE_METHODS, RankBy
    from ih_sweep.data.heldout import HELDOUT_SEED_OFFSET, HELDOUT_STORIES

    ablates = config.condition != Condition.none and config.n_heads not in (0, "0")
    means = config.ablation.reference.value \
        if ablates and config.ablation.method not in NO_REFERENCE_METHODS else None
    fv = config.scoring.fv_reference.value if ablates and config.scoring.uses(RankBy.fv) \
        and config.scoring.source == ScoreSource.compute else None
    if means is None and fv is None:
        return None
    if config.data.name == "babi_generated":
        source = (f"up to {HELDOUT_STORIES} generated stories of seed data.seed + "
                  f"{HELDOUT_SEED_OFFSET} = {config.data.seed + HELDOUT_SEED_OFFSET}")
    else:
        source = (f"up to {HELDOUT_STORIES} stories of data.split={config.data.split.value} "
                  "after the evaluated ones, else of the train file")
    return {"ablation": means, "fv": fv,
            "heldout": f"{source}, none with an evaluated story's text"}


def describe(config: Config) -> str:
    """The job in one phrase for log lines: its ablation, with the control seed if drawn;
    a condition that ablates N = 0 heads is said to be the unablated model (it is recorded
    as condition=none, and the summary counts it so)."""
    seed = f" control_seed={config.control_seed}" if config.condition == "random" else ""
    none = " (ablates no head: the unablated model, recorded as condition=none)" \
        if config.n_heads == 0 and config.condition != Condition.none else ""
    return f"n_heads={config.n_heads} condition={config.condition}{seed}{none}"


def split_name(config: Config) -> str:
    """``data.split``, or ``generated`` for the built-in generator's stories."""
    return "generated" if config.data.name == "babi_generated" else config.data.split.value
