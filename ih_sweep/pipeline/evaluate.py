"""The ``evaluate`` job: one (n_heads, condition, control_seed) on one model and data set.

Recipe: check -> data -> scores -> select -> ablate + evaluate -> write. A job already
complete for the same config is reused; a killed job resumes from its last checkpoint.

``condition=random control_seeds=K`` (K > 1) evaluates the draws ``control_seed`` ..
``control_seed + K - 1`` in one process (:func:`run_seeds`): each draw is written as the
complete job folder ``<job folder>/control_seed=<k>/`` that the single-seed job
``control_seed=k`` writes (same files, same config hash: the store serves either to the
other), then ``job.json`` of the job folder lists them
(:class:`~ih_sweep.pipeline.records.SeedsRecord`).
What does not depend on the drawn heads is computed once for all draws (:class:`Shared`):
the loaded model, the stories and items, the score table, the ablation fill (mean and
position-wise means cover every head; resample's donor outputs are taken once for the
union of the draws' heads, within :data:`DONOR_SHARE_BYTES`), the check that every prompt
fits the model, each checkpoint chunk's tokenized rows; the mechanism check's unablated
numbers are cached per process anyway (:mod:`ih_sweep.pipeline.mechanism`), as is the evaluator's
check of its shortcuts. A killed K-draw job resumes at the draw it reached (finished draws
are skipped, the current one resumes from its last chunk).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import platform
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
from tqdm.auto import tqdm

from ih_sweep.config.errors import ConfigError
from ih_sweep.config.identity import config_hash, semantic_config
from ih_sweep.config.rules import n_heads_share
from ih_sweep.config.schema import AblationMethod, Condition, Config, ScoreSource, plain
from ih_sweep.io_utils import read_json, write_csv, write_json
from ih_sweep.pipeline.records import (
    COMPLETE,
    HEAD_COLUMNS,
    ITEM_COLUMNS,
    RESULT_COLUMNS,
    STRATA_COLUMNS,
    EvaluationRecord,
    RecordError,
    SeedsRecord,
    finished_record,
    read_record,
    restore,
    sha256,
    store,
    store_dir,
    write_record,
)

log = logging.getLogger("ih_sweep")


def run(config: Config, out_dir: Path, shared: Shared | None = None
        ) -> EvaluationRecord | SeedsRecord:
    """Run the job into ``out_dir`` (results.csv, heads.csv, job.json); returns its record.
    ``shared``: what the draws of a several-draw job compute once (:func:`run_seeds`)."""
    if several_draws(config):
        return run_seeds(config, out_dir)
    t_start = time.time()
    chash = config_hash(config)
    previous = finished_record(out_dir, chash, "results.csv")
    if previous is not None:
        log.info("skipping %s: complete results exist for this config", out_dir)
        return previous  # type: ignore[return-value]
    stored = restore(config.paths.cache_dir, chash, out_dir)
    if stored is not None:
        log.info("reusing the finished evaluation %s (%s) for %s", chash,
                 Path(config.paths.cache_dir) / "jobs" / chash, _describe(config))
        record = dataclasses.replace(  # this job's own bookkeeping, the stored results
            stored, reused_evaluation=True, slurm_job_id=os.environ.get("SLURM_JOB_ID"),
            host=platform.node(), timings={"total_s": round(time.time() - t_start, 3)})
        write_record(out_dir, record)
        return record
    from ih_sweep.data import items_for, load_stories
    from ih_sweep.heads.score_table import check_scores_fit, exclusion, get_scores, matrix_for
    from ih_sweep.heads.selection import resolve_n_heads, select_heads
    from ih_sweep.model.loading import layers_and_heads, load_model

    shared = shared or Shared()
    timings: dict[str, float] = {}

    # check: what can be checked without weights comes first; a share of heads (n_heads=10%)
    # becomes its count on this model
    n_layers, heads_per_layer = layers_and_heads(config.model)
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

    # data
    t0 = time.time()
    stories, items = shared.once("data", lambda: (
        (s := load_stories(config.data)), items_for(config.data, config.eval, s)))
    timings["data_s"] = time.time() - t0

    loaded = shared.loaded

    def model_getter():
        if "model" not in loaded:
            t = time.time()
            loaded["model"] = load_model(config.model, config.quantization, config.device)
            timings["load_s"] = time.time() - t
        return loaded["model"]

    # scores -> select
    t0 = time.time()
    mat, heads, scores_file, draw = None, [], None, None
    if config.condition != Condition.none and n_ablate > 0:
        scores, cached = shared.once("scores", lambda: get_scores(
            config, model_getter, progress=config.eval.progress,
            shape=(n_layers, heads_per_layer), items=items))
        scores_file = str(cached or Path(config.scoring.file).resolve())
        if config.scoring.source == ScoreSource.file:
            check_scores_fit(scores, n_layers, heads_per_layer, config.scoring.file)
        mat = matrix_for(config, scores, config.scoring.rank_by)
        excluded = exclusion(config, scores)

        def draw(seed: int) -> list[tuple[int, int]]:  # this job's heads with another seed
            return select_heads(mat, config.condition, n_ablate, seed, excluded)
        heads = draw(config.control_seed)
    timings["scores_s"] = time.time() - t0

    # ablate + evaluate
    t0 = time.time()
    fill = _once(lambda: shared.fill(config, *model_getter(), items, heads, draw))
    items_df, resumed = evaluate_checkpointed(config, out_dir, chash, model_getter, items,
                                              heads, stories, fill, shared)
    timings["eval_s"] = time.time() - t0

    # mechanism check: repeat loss and ICL score with these heads ablated and without
    t0 = time.time()
    mechanism = run_mechanism(config, model_getter, stories, heads, fill)
    timings["mechanism_s"] = time.time() - t0

    # write: an unablated job ablates 0 heads whatever N was asked (no share either), and
    # the control seed is 0 unless it drew the heads (condition=random), as in the config hash
    n_heads, condition, control_seed = len(heads), config.condition.value, \
        (config.control_seed if config.condition == Condition.random else 0)
    n_share = float(share) if share is not None and heads else None
    if not heads:
        condition = Condition.none.value
    results = items_df.assign(
        n_heads=n_heads, n_heads_share=n_share, condition=condition, control_seed=control_seed,
        model=config.model.name, quantization=config.quantization.name.value,
        data=config.data.name.value, babi_task=config.data.task, split=split_name(config),
        metric=config.eval.metric.value, scope=config.eval.scope.value,
        ablation=config.ablation.method.value,
    )[RESULT_COLUMNS]
    heads_df = pd.DataFrame([(la, h, float(mat[la, h]), config.scoring.rank_by.value)
                             for la, h in heads], columns=HEAD_COLUMNS)
    write_csv(out_dir / "results.csv", results)
    write_csv(out_dir / "heads.csv", heads_df)
    n_correct = int(results["correct"].sum())
    timings["total_s"] = time.time() - t_start
    record = EvaluationRecord(
        config_hash=chash, n_heads=n_heads, n_heads_share=n_share, condition=condition,
        control_seed=control_seed, model=config.model.name,
        quantization=config.quantization.name.value, data=plain(config.data),
        eval={"metric": config.eval.metric.value, "scope": config.eval.scope.value,
              "max_new_tokens": config.eval.max_new_tokens,
              "format": config.eval.format.value, "n_shots": config.eval.n_shots,
              "stop": list(config.eval.stop)},
        ablation=config.ablation.method.value, rank_by=config.scoring.rank_by.value,
        n_items=len(results), n_correct=n_correct,
        accuracy=n_correct / max(len(results), 1),
        n_decoded=int((results["decided_by"] != "forward").sum()),
        heads=[[int(la), int(h)] for la, h in heads], reused_evaluation=False,
        resumed_chunks=resumed, timings={k: round(v, 3) for k, v in timings.items()},
        slurm_job_id=os.environ.get("SLURM_JOB_ID"),
        results_sha256=sha256(out_dir / "results.csv"), settings=semantic_config(config),
        scores_file=scores_file, mechanism=mechanism)
    write_record(out_dir, record)
    store(out_dir, config.paths.cache_dir, chash)
    shutil.rmtree(out_dir / "partial", ignore_errors=True)
    log.info("%s: %d/%d correct (%.1f%%), written to %s", _describe(config), n_correct,
             len(results), 100 * record.accuracy, out_dir)
    return record


# resample ablation in a several-draw job: donor outputs are taken at once for the union of
# the next draws' heads as long as they fit in this many bytes (of the model's dtype, on its
# device: every donor text's tokens x head_dim per head), else for fewer draws at a time
DONOR_SHARE_BYTES = 1 << 30
SEED_FOLDER = "control_seed={}"


def several_draws(config: Config) -> bool:
    """Whether ``config`` asks one job for several random draws (:func:`run_seeds`)."""
    return config.condition == Condition.random and config.control_seeds > 1 \
        and config.n_heads != 0  # a count, or a share P% (P > 0)


def seed_configs(config: Config) -> list[Config]:
    """The single-seed config of each draw of a several-draw ``config``."""
    return [dataclasses.replace(config, control_seed=k, control_seeds=1)
            for k in range(config.control_seed, config.control_seed + config.control_seeds)]


def run_seeds(config: Config, out_dir: Path) -> SeedsRecord:
    """``condition=random control_seeds=K``: each draw's job into
    ``out_dir/control_seed=<k>/`` through :func:`run` with one :class:`Shared` (the module
    docstring says what is shared), then ``out_dir/job.json`` listing them. Draws complete
    in their folder or in the store are not evaluated again, so a killed job resumes at
    the draw it reached, and a later single-seed job reuses any draw (and vice versa)."""
    t_start = time.time()
    configs = seed_configs(config)
    hashes = [config_hash(c) for c in configs]
    folders = [SEED_FOLDER.format(c.control_seed) for c in configs]
    done = [_recorded(out_dir / f, h) or _recorded(store_dir(config.paths.cache_dir, h), h)
            for f, h in zip(folders, hashes)]
    shared = Shared(pending=[c.control_seed for c, d in zip(configs, done) if not d])
    log.info("%s: %d draws (control_seed=%d..%d) in one job, %d to evaluate", _describe(config),
             len(configs), configs[0].control_seed, configs[-1].control_seed,
             len(shared.pending))
    records = [run(c, out_dir / f, shared) for c, f in zip(configs, folders)]
    record = SeedsRecord(
        config_hash=config_hash(config), n_heads=records[0].n_heads,
        n_heads_share=records[0].n_heads_share,
        condition=config.condition.value, control_seeds=[c.control_seed for c in configs],
        seed_folders=folders, seed_hashes=hashes,
        accuracies=[r.accuracy for r in records], model=config.model.name,
        reused=[c.control_seed for c, d in zip(configs, done) if d],
        shared=sorted(shared.used | ({"model"} if shared.loaded and len(shared.pending) > 1
                                     else set())),
        timings={"total_s": round(time.time() - t_start, 3)},
        slurm_job_id=os.environ.get("SLURM_JOB_ID"))
    write_record(out_dir, record)
    acc = [100 * a for a in record.accuracies]
    log.info("%s: %d draws, accuracy %.1f%% to %.1f%%, written to %s", _describe(config),
             len(acc), min(acc), max(acc), out_dir)
    return record


def _recorded(folder: Path, chash: str) -> bool:
    """Whether ``folder`` holds a complete record of this config hash (files unchecked:
    for planning only; :func:`run` checks them before it trusts them)."""
    try:
        record = read_record(folder)
    except RecordError:
        return False
    return record.status == COMPLETE and record.config_hash == chash


@dataclass
class Shared:
    """What the draws of one several-draw job (:func:`run_seeds`) compute once: the loaded
    model (:attr:`loaded`), values that do not depend on the drawn heads (:meth:`once`:
    the data, the score table, the prompt check, each chunk's tokenized rows, the means),
    and resample's donor outputs for the union of the draws still to evaluate
    (:attr:`pending`, in order; :meth:`fill`). A single-seed job gets a fresh one."""

    pending: list[int] = dataclasses.field(default_factory=list)
    loaded: dict[str, Any] = dataclasses.field(default_factory=dict)
    memo: dict[Any, Any] = dataclasses.field(default_factory=dict)
    used: set[str] = dataclasses.field(default_factory=set)  # memo keys read a second time
    donors: Any = None  # the current union's Donors

    def once(self, key: Any, compute: Callable[[], Any]) -> Any:
        """``compute()`` the first time ``key`` is asked for, the same value after."""
        if key in self.memo:
            if key != "fill" or self.memo[key] is not None:  # zero ablation fills nothing
                self.used.add(key[0] if isinstance(key, tuple) else key)
            return self.memo[key]
        value = self.memo[key] = compute()
        return value

    def fill(self, config: Config, model, tokenizer, items: Sequence,
             heads: list[tuple[int, int]], draw: Callable[[int], list] | None):
        """:func:`ablation_fill` of ``heads``: mean and position-wise means once (they
        cover every head); resample's donors taken for the union of the heads of this draw
        and the pending draws after it (``draw(seed)``: a draw's heads) within
        :data:`DONOR_SHARE_BYTES` (this draw's at least), then cut to ``heads``
        (:meth:`ih_sweep.ablation.hooks.Donors.subset`: equal to donors taken for them alone)."""
        method = config.ablation.method
        if method != AblationMethod.resample:
            return self.once("fill", lambda: ablation_fill(config, model, tokenizer, items,
                                                           heads))
        from ih_sweep.ablation.hooks import position_means

        if self.donors is None or not self.donors.covers(heads):
            means = self.once("fill", lambda: position_means(model, reference_batches(
                tokenizer, items, config.ablation.n_reference, model)))
            texts = self.once("donor_texts", lambda: donor_texts(
                tokenizer, items, config.eval.max_new_tokens))
            union = self._union(heads, config.control_seed, draw,
                                _bytes_per_head(model, tokenizer, texts[0]))
            self.donors = None  # the previous union's memory first
            self.donors = _donors(config, model, tokenizer, union, means, texts)
        else:
            self.used.add("donors")
        return self.donors.subset(heads)

    def _union(self, heads: list, seed: int, draw: Callable[[int], list] | None,
               per_head: int) -> list:
        union = list(heads)
        later = self.pending[self.pending.index(seed) + 1:] if seed in self.pending else []
        for k in later if draw is not None else []:
            more = union + [h for h in draw(k) if h not in union]
            if len(more) * per_head > DONOR_SHARE_BYTES:
                break
            union = more
        return union


def _bytes_per_head(model, tokenizer, texts: dict[int, str]) -> int:
    """Bytes resample's donor outputs take per head: donor texts x the longest one's tokens
    x head_dim x the bytes of an activation (:func:`ih_sweep.model.batching.compute_dtype_bytes`:
    the dtype head outputs are stored in, float32 for an nf4 model with float32 embeddings
    although its matmuls round in bfloat16) (:func:`ih_sweep.ablation.hooks.resample_donors`)."""
    from ih_sweep.model.architecture import head_sites
    from ih_sweep.model.batching import compute_dtype_bytes

    longest = max((len(ids) for ids in tokenizer(list(texts.values()))["input_ids"]),
                  default=0)
    return len(texts) * longest * head_sites(model).head_dim * compute_dtype_bytes(model)


def _describe(config: Config) -> str:
    """The job in one phrase for log lines: its ablation, with the control seed if drawn."""
    seed = f" control_seed={config.control_seed}" if config.condition == "random" else ""
    return f"n_heads={config.n_heads} condition={config.condition}{seed}"


def split_name(config: Config) -> str:
    """``data.split``, or ``generated`` for the built-in generator's stories."""
    return "generated" if config.data.name == "babi_generated" else config.data.split.value


def evaluate_checkpointed(config: Config, out_dir: Path, chash: str,
                          model_getter: Callable[[], tuple[Any, Any]], items: Sequence,
                          heads: list[tuple[int, int]], stories: Sequence,
                          fill: Callable[[], Any], shared: Shared | None = None
                          ) -> tuple[pd.DataFrame, int]:
    """Evaluate in chunks of ``eval.checkpoint_items``, each written atomically to
    ``partial/``; a rerun after a kill (preemption, timeout, SIGKILL) reuses finished chunks,
    so rows are neither lost nor duplicated. Returns (ITEM_COLUMNS rows, chunks reused);
    ``stories``: those the items ask about (their difficulty strata); ``fill``: the job's
    :func:`ablation_fill`, computed once when first called; ``shared``: where the prompt
    check and each chunk's tokenized rows are kept for the job's other draws."""
    from ih_sweep.ablation.hooks import ablate_heads
    from ih_sweep.data.strata import strata_frame
    from ih_sweep.evaluation.evaluator import build_rows, check_prompt_lengths, evaluate

    shared = shared or Shared()

    part = out_dir / "partial"
    size = config.eval.checkpoint_items
    state = {"config_hash": chash, "chunk_items": size, "n_items": len(items)}
    if (part / "state.json").is_file() and read_json(part / "state.json") != state:
        log.info("discarding partial results of a different config in %s", part)
        shutil.rmtree(part)
    part.mkdir(parents=True, exist_ok=True)
    write_json(part / "state.json", state)
    for stale in [*out_dir.glob(".*.tmp"), *part.glob(".*.tmp")]:  # left by a killed write
        stale.unlink(missing_ok=True)
    frames, resumed, checked = [], 0, False
    candidates = sorted({it.answer for it in items})  # the task's answers, for logit_diff
    starts = range(0, len(items), size)
    bar = tqdm(total=len(items), desc=_describe(config), unit="item",
               disable=not config.eval.progress, leave=False)
    for c, start in enumerate(starts):
        chunk_file = part / f"chunk-{c:05d}.csv"
        chunk_items = items[start:start + size]
        if chunk_file.is_file():
            done, problem = _read_chunk(chunk_file, chunk_items)
            if problem is None:
                frames.append(done)
                bar.update(len(done))
                resumed += 1
                continue
            log.warning("redoing %s: %s", chunk_file, problem)
        model, tokenizer = model_getter()
        if not checked:  # before any evaluation: every prompt fits the model's positions
            shared.once("prompt_lengths", lambda m=model, t=tokenizer: check_prompt_lengths(
                m, t, items, config.eval.max_new_tokens))
            checked = True
        means = fill() if heads else None
        rows = shared.once(("rows", start, size), lambda t=tokenizer, c=chunk_items: build_rows(
            t, c, config.eval.max_new_tokens, candidates))
        with ablate_heads(model, heads, config.ablation.method, means):
            res = evaluate(model, tokenizer, chunk_items, config.eval, bar, candidates, rows)
        df = pd.concat([item_frame(res), strata_frame(stories, [r.item for r in res])],
                       axis=1)[ITEM_COLUMNS]
        write_csv(chunk_file, df)
        frames.append(df)
        if len(starts) > 1:
            log.info("chunk %d/%d done", c + 1, len(starts))
    bar.close()
    if resumed:
        log.info("resumed: %d of %d chunks were already done", resumed, len(starts))
    return pd.concat(frames, ignore_index=True), resumed


def run_mechanism(config: Config, model_getter: Callable[[], tuple[Any, Any]],
                  stories: Sequence, heads: list[tuple[int, int]],
                  fill: Callable[[], Any]) -> dict[str, Any]:
    """job.json's ``mechanism`` (:func:`ih_sweep.pipeline.mechanism.mechanism_check`) with the job's
    heads and ablation method, on the first ``mechanism.n_texts`` stories; empty with
    ``mechanism.enabled=false``. Mean and position-wise mean ablation use the evaluation's
    own means (``fill``: the job's :func:`ablation_fill`, computed once). Resample ablation
    is not measured here (its donors are bAbI stories, which the mechanism's random-token
    sequences have none of): the ablated entries are null, with ``ablated_not_measured``
    saying why."""
    if not config.mechanism.enabled:
        return {}
    from ih_sweep.model.loading import cache_key
    from ih_sweep.pipeline.mechanism import mechanism_check, texts_for

    model, tokenizer = model_getter()
    method = config.ablation.method
    resample = method == AblationMethod.resample and bool(heads)
    means = fill() if heads and method in (AblationMethod.mean,
                                           AblationMethod.position_mean) else None
    key = cache_key(config.model, config.quantization, config.device)
    out = mechanism_check(model, tokenizer, config.mechanism,
                          texts_for(stories, config.mechanism.n_texts),
                          [] if resample else heads, method, means, model_key=key)
    if resample:
        log.info("mechanism check: the ablated repeat loss and ICL score are not measured "
                 "under resample ablation (no donor story for its texts)")
        out |= {"repeat_loss": None, "icl_score": None,
                "ablated_not_measured": "resample ablation: the mechanism's texts have no "
                                        "donor stories"}
    return out


def _once(compute: Callable[[], Any]) -> Callable[[], Any]:
    """``compute``, run on the first call only; later calls return its result."""
    done: list = []

    def get():
        if not done:
            done.append(compute())
        return done[0]
    return get


def item_frame(results: Sequence) -> pd.DataFrame:
    """The ITEM_COLUMNS rows of evaluated items (:class:`.evaluation.ItemResult`) but the
    difficulty strata (:func:`ih_sweep.data.strata.strata_frame` adds them)."""
    return pd.DataFrame([(r.item.story_index, r.item.question_index, r.item.line,
                          r.item.examples_before, r.item.answer, r.continuation,
                          bool(r.correct), r.decided_by, r.margin, bool(r.near_tie),
                          r.gold_logprob, r.logit_diff) for r in results],
                        columns=[c for c in ITEM_COLUMNS if c not in STRATA_COLUMNS])


def _read_chunk(path: Path, chunk_items: Sequence) -> tuple[pd.DataFrame | None, str | None]:
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


def ablation_fill(config: Config, model, tokenizer, items: Sequence,
                  heads: list[tuple[int, int]]):
    """What the job's ``ablation.method`` fills the heads' outputs with
    (:func:`ih_sweep.ablation.hooks.ablate_heads`' ``means``), from the unablated model: ``mean``:
    the heads' means over the reference prompts (:func:`reference_batches`);
    ``position_mean``: their position-wise means; ``resample``: the donors' outputs, one
    donor text per story of the job (:func:`donor_texts`), drawn with ``ablation.seed``,
    the position-wise means past a donor's end. None for ``zero``."""
    from ih_sweep.ablation.hooks import head_means, position_means

    method = config.ablation.method
    if method == AblationMethod.zero:
        return None
    references = reference_batches(tokenizer, items, config.ablation.n_reference, model)
    if method == AblationMethod.mean:
        return head_means(model, references)
    means = position_means(model, references)
    if method == AblationMethod.position_mean:
        return means
    return _donors(config, model, tokenizer, heads, means,
                   donor_texts(tokenizer, items, config.eval.max_new_tokens))


def _donors(config: Config, model, tokenizer, heads: list[tuple[int, int]], means,
            texts_needed: tuple[dict[int, str], dict[int, int]]):
    """Resample ablation's donors of ``heads`` (:func:`ablation_fill`), with one log line."""
    from ih_sweep.ablation.hooks import resample_donors

    texts, needed = texts_needed
    donors = resample_donors(model, tokenizer, texts, heads, config.ablation.seed, means,
                             needed)
    past = {k: n for k, n in donors.past_end.items() if n}
    log.info("resample ablation: donors drawn with ablation.seed=%d among %d stories; %d of "
             "them feed positions past their donor's text (at most %d; those get the "
             "position-wise mean)", config.ablation.seed, len(texts), len(past),
             max(past.values(), default=0))
    return donors


def donor_texts(tokenizer, items: Sequence, max_new_tokens: int
                ) -> tuple[dict[int, str], dict[int, int]]:
    """Per story of ``items``: the text it donates in resample ablation (its last evaluated
    question's prompt followed by its gold continuation and a newline, as the evaluator
    feeds it), and the positions its own evaluation feeds (its longest prompt's tokens plus
    ``max_new_tokens - 1`` generated ones)."""
    last: dict[int, Any] = {}
    for it in items:
        if it.story_index not in last or it.line > last[it.story_index].line:
            last[it.story_index] = it
    texts = {k: it.prompt + it.target + "\n" for k, it in last.items()}
    lengths = tokenizer([it.prompt for it in last.values()])["input_ids"]
    needed = {k: len(ids) + max_new_tokens - 1 for k, ids in zip(last, lengths)}
    return texts, needed


def reference_batches(tokenizer, items: Sequence, n: int, model, batch_size: int = 16
                      ) -> list[dict]:
    """Tokenized reference prompts for mean and position-wise mean ablation (the first
    ``n`` evaluated prompts)."""
    import torch

    device = next(model.parameters()).device
    if n > len(items):
        log.warning("ablation.n_reference=%d, but the job has %d prompts: the mean is taken "
                    "over all %d", n, len(items), len(items))
    prompts = [it.prompt for it in items[:n]]
    batches = []
    for i in range(0, len(prompts), batch_size):
        enc = tokenizer(prompts[i:i + batch_size], return_tensors="pt", padding=True)
        batches.append({k: v.to(device) for k, v in enc.items() if isinstance(v, torch.Tensor)
                        and k in ("input_ids", "attention_mask")})
    return batches

