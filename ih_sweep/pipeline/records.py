"""What a job leaves behind: its record (``job.json``) and the columns of its CSV files.

The writer (:mod:`ih_sweep.pipeline`) and the reader (:mod:`ih_sweep.report.summarize`) both use
these
definitions; nothing else knows the layout of a job folder.

results.csv (one row per evaluated bAbI question)
-------------------------------------------------
story            index of the story in the data set (0-based)
question_index   index of the question within the story (0-based)
line             the question's line number in the story (bAbI's own numbering)
examples_before  answered questions shown before this one in the prompt
answer           the gold answer (comma-separated parts for multi-word answers)
continuation     the model's greedy continuation (at most ``eval.max_new_tokens`` tokens)
correct          whether ``continuation`` scores as ``answer`` under ``metric``
decided_by       forward (the teacher-forced pass settled it), decode (greedy decoding from
                 its cache) or generate (``model.generate``, for models whose cache cannot
                 be reused exactly)
margin           logits: the smallest top-1 minus top-2 logit gap over the greedy steps up to
                 the one that decided the item (after which the metric's outcome could no
                 longer change; later steps do not count)
near_tie         true when one of those steps' gap is within the rounding of the model's
                 compute dtype: at most ``evaluation.NEAR_TIE_TOLERANCE`` (float32 1e-4,
                 bfloat16 0.05, float16 0.00625) x max(|top-1 logit|, 1) there. Another
                 batch size or kernel can flip such an item's outcome (bfloat16, tiny model:
                 every item that flipped between batch sizes 1 and 32 was one); in float32
                 practically none is
gold_logprob     nats: sum of the log-probabilities of all the gold answer's tokens given the
                 prompt (teacher-forced, as they tokenize after the prompt)
logit_diff       logits, at the answer's first position: the gold answer's first token minus
                 the best other candidate answer's first token; candidates: the distinct gold
                 answers of the job's items; candidates whose first token is the gold's are
                 not "other" (empty when none is left: no candidate to compare with)
support_distance statements back from the question to its latest supporting fact (1 = the
                 statement just before it; questions are not statements); empty when the
                 story names no supporting fact (:mod:`ih_sweep.data.strata`)
recency_correct  whether the location in the last statement before the question (the most
                 recent location of anyone) is the gold answer; empty unless the question is
                 ``Where is <Name>?`` and that statement is a bAbI task-1 move
mentions         statements before the question that name the asked person (a capitalized
                 word of the question); empty when the question names no single person
question_position  0-based index of the question among the story's questions
exact_match, quasi_exact_match, prefix_exact_match, quasi_prefix_exact_match
                 HELM's four metrics of ``continuation`` against ``answer``, as HELM defines
                 them (:func:`ih_sweep.evaluation.metrics.helm_scores`; ``eval.metric``
                 helm_exact, quasi_exact, prefix_exact, quasi_prefix_exact makes the one of
                 the same name decide ``correct``); written for ``eval.format=helm`` (whose
                 continuation is decoded whole), empty for the other formats
n_heads, condition, control_seed   the job's ablation (n_heads: the heads ablated, a count)
n_heads_share    the share of all the model's heads asked for, in percent (``n_heads=10%``:
                 10.0; n_heads is then its count, ceil(layers x heads x 10 / 100)); empty
                 when a count was asked or nothing is ablated (older files lack the column)
model, quantization                ``model.name``, ``quantization.name``
data, babi_task, split             ``data.name``, ``data.task``, ``data.split`` (generated
                                   stories: ``generated``)
metric, scope, ablation            ``eval.metric``, ``eval.scope``, ``ablation.method``

heads.csv (one row per ablated head; empty for condition=none)
--------------------------------------------------------------
layer, head      0-based; ``head`` is the query head within the layer
score            the head's score under ``rank_by`` (the notebook's file: its own score)
rank_by          ``scoring.rank_by``
output_norm      the head's mean output norm ||z_h W_O^h|| (L2, residual-stream units: z_h its
                 slice of the o_proj input, W_O^h its o_proj weight columns) over the real
                 tokens of the job's first ``ablation.n_reference`` prompts, the unablated
                 model (:mod:`ih_sweep.heads.output_norms`); how much the head writes, to
                 compare the conditions' heads (files written before it lack the column)
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import platform
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ih_sweep.io_utils import atomic_write, read_json, write_json

log = logging.getLogger(__name__)

STRATA_COLUMNS = ["support_distance", "recency_correct", "mentions", "question_position"]
ITEM_COLUMNS = ["story", "question_index", "line", "examples_before", "answer",
                "continuation", "correct", "decided_by", "margin", "near_tie", "gold_logprob",
                "logit_diff", *STRATA_COLUMNS]
JOB_COLUMNS = ["n_heads", "n_heads_share", "condition", "control_seed", "model",
               "quantization", "data", "babi_task", "split", "metric", "scope", "ablation"]
HELM_COLUMNS = ["exact_match", "quasi_exact_match", "prefix_exact_match",
                "quasi_prefix_exact_match"]  # metrics.HELM_METRICS' names (a test checks)
RESULT_COLUMNS = ITEM_COLUMNS + HELM_COLUMNS + JOB_COLUMNS
HEAD_COLUMNS = ["layer", "head", "score", "rank_by", "output_norm"]
RECORD_FILE = "job.json"
COMPLETE = "complete"


class RecordError(ValueError):
    """A job.json that is missing, unreadable or not an ih_sweep record."""


@dataclass
class EvaluationRecord:
    """``job.json`` of an ``evaluate`` job: what it ran and what it found."""

    config_hash: str
    n_heads: int
    condition: str
    control_seed: int
    model: str
    quantization: str
    data: dict[str, Any]  # the data config (name, task, split, lang, n_stories, seed, path)
    # metric, scope, max_new_tokens, format, n_shots, stop, demo_pool (where the demos come
    # from: ih_sweep.data.prompts.demo_source; null without demos)
    eval: dict[str, Any]
    ablation: str
    rank_by: str
    n_items: int
    n_correct: int
    accuracy: float
    n_decoded: int  # items decided past the teacher-forced pass
    heads: list[list[int]]  # [[layer, head], ...] in selection order
    # n_heads=P% asked: P (percent of all the model's heads; n_heads is its count); null for
    # a count or an unablated job, and in records written before shares existed
    n_heads_share: float | None = None
    results_sha256: str = ""  # of results.csv as written: a damaged file is not trusted
    scores_file: str | None = None  # the score table the heads were chosen from
    settings: dict[str, Any] = field(default_factory=dict)  # config.identity.semantic_config
    reused_evaluation: bool = False  # results restored from the store (a finished job)
    resumed_chunks: int = 0  # checkpointed chunks a previous (killed) run had finished
    # a draw of a several-draw job whose heads an earlier draw of that job had: its results
    # and mechanism check are that draw's (control_seed), not evaluated again (evaluation is
    # a function of the ablated set); null otherwise
    same_heads_as: int | None = None
    timings: dict[str, float] = field(default_factory=dict)  # seconds per stage
    slurm_job_id: str | None = None
    host: str = field(default_factory=platform.node)
    status: str = COMPLETE
    job: str = "evaluate"
    # the mechanism check (ih_sweep.pipeline.mechanism.mechanism_check): repeat_loss,
    # repeat_loss_unablated, icl_score, icl_score_unablated (nats), positions and settings;
    # empty with mechanism.enabled=false
    mechanism: dict[str, Any] = field(default_factory=dict)
    # the input files that determine the results, by content (ih_sweep.fingerprints:
    # job_inputs): {"data/<file>" | "scores/<file>" | "model/<file>": fingerprint}; empty
    # for the built-in model on generated data. A finished job is reused only where they
    # are what they are now
    inputs: dict[str, str] = field(default_factory=dict)
    # the ablated heads' mean output norm (heads.csv's output_norm averaged over them,
    # residual-stream units); null for an unablated job and in records written before it
    output_norm_mean: float | None = None
    # how stable the ablated set is (ih_sweep.pipeline.stages.ranking_stability): score,
    # over (prompts | sequences), samples, resamples, seed, mean_overlap (|A n B| / N over
    # bootstrap resamples), threshold, unstable; null for random / none jobs, copying or
    # combined rankings, a user's score file, and records written before it existed
    rank_stability: dict[str, Any] | None = None
    # which prompts the reference means (ablation) and FV scores (fv) were taken on:
    # heldout (stories disjoint from the evaluated ones) or evaluated, and where the
    # held-out stories come from (ih_sweep.pipeline.stages.reference_prompts); null for a
    # job that takes neither and in records written before it existed
    reference_prompts: dict[str, Any] | None = None


@dataclass
class ScanRecord:
    """``job.json`` of a ``scan`` job."""

    config_hash: str
    model: str
    layers: list[int]
    n_items: int
    rank_by: str
    stats: dict[str, Any]
    timings: dict[str, float] = field(default_factory=dict)
    host: str = field(default_factory=platform.node)
    status: str = COMPLETE
    job: str = "scan"
    inputs: dict[str, str] = field(default_factory=dict)  # as EvaluationRecord's


@dataclass
class SeedsRecord:
    """``job.json`` of an ``evaluate`` job that drew several random controls in one process
    (``condition=random control_seeds=K``): each draw is a complete evaluate job folder of
    its own, ``<job folder>/control_seed=<k>/``, whose record and files are those of the
    single-seed job ``control_seed=k`` (its config hash included); this record lists them.
    Written last, once every draw is complete."""

    config_hash: str  # of the K-draw config (control_seeds in it)
    n_heads: int  # heads each draw ablates (a count)
    condition: str
    control_seeds: list[int]  # the draws, in order
    seed_folders: list[str]  # each draw's job folder, relative to this one
    seed_hashes: list[str]  # each draw's config hash (its single-seed job's)
    accuracies: list[float]  # each draw's accuracy
    model: str
    n_heads_share: float | None = None  # n_heads=P% asked: P; null for a count
    reused: list[int] = field(default_factory=list)  # draws already complete or stored
    shared: list[str] = field(default_factory=list)  # what the draws computed once
    timings: dict[str, float] = field(default_factory=dict)  # seconds, the whole job
    slurm_job_id: str | None = None
    host: str = field(default_factory=platform.node)
    status: str = COMPLETE
    job: str = "random_seeds"


Record = EvaluationRecord | ScanRecord | SeedsRecord
_KINDS: dict[str, type] = {"evaluate": EvaluationRecord, "scan": ScanRecord,
                           "random_seeds": SeedsRecord}


SEAL = "record_sha256"  # job.json's key holding the checksum of all its other keys


def record_checksum(raw: dict[str, Any]) -> str:
    """The sha256 of a record's JSON (sorted keys) without its :data:`SEAL` key: what
    :func:`write_record` writes under that key, so that any later edit of job.json (a
    field the summary reads, the results' checksum) is noticed."""
    body = {k: v for k, v in raw.items() if k != SEAL}
    return hashlib.sha256(json.dumps(body, sort_keys=True, default=str).encode()).hexdigest()


def write_record(out_dir: Path, record: Record) -> Path:
    """``out_dir/job.json``, atomically, sealed with :func:`record_checksum`."""
    raw = dataclasses.asdict(record)
    return write_json(Path(out_dir) / RECORD_FILE, raw | {SEAL: record_checksum(raw)})


def seal_problem(out_dir: Path) -> str | None:
    """Why ``out_dir/job.json`` is not the record a job wrote (None when it is): its
    :data:`SEAL` is missing, empty or not the checksum of its other keys."""
    path = Path(out_dir) / RECORD_FILE
    try:
        raw = read_json(path)
    except (OSError, ValueError, UnicodeDecodeError) as err:
        return f"job.json unreadable ({err})"
    if not isinstance(raw, dict):
        return "job.json is not a job record"
    if not raw.get(SEAL):
        return "job.json has no record checksum (edited, or written by an older version)"
    if raw[SEAL] != record_checksum(raw):
        return "job.json differs from the record the job wrote (record checksum)"
    return None


def read_record(out_dir: Path) -> Record:
    """The record in ``out_dir/job.json``. Raises :class:`RecordError` if it is missing,
    not JSON, of an unknown job kind or lacks a field."""
    path = Path(out_dir) / RECORD_FILE
    if not path.is_file():
        raise RecordError(f"{path}: no job record")
    try:
        raw = read_json(path)
    except (ValueError, UnicodeDecodeError) as err:
        raise RecordError(f"{path}: not JSON ({err})") from None
    if not isinstance(raw, dict):
        raise RecordError(f"{path}: not a job record")
    cls = _KINDS.get(raw.get("job", "evaluate"))
    if cls is None:
        raise RecordError(f"{path}: unknown job kind {raw.get('job')!r}")
    names = {f.name for f in dataclasses.fields(cls)}
    try:
        return cls(**{k: v for k, v in raw.items() if k in names})
    except TypeError as err:
        raise RecordError(f"{path}: incomplete record ({err})") from None


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def problem_with(out_dir: Path, record: Record) -> str | None:
    """Why the files in ``out_dir`` do not match ``record`` (None when they do): an
    evaluation's results.csv must have the recorded checksum, row count, unique
    (story, question_index) pairs and correct count, heads.csv its heads, and job.json
    its checksums (:func:`checksum_problem`); a several-draw job's draws must each be
    complete (:func:`finished_record`)."""
    import pandas as pd

    out_dir = Path(out_dir)
    if isinstance(record, ScanRecord):
        return None if (out_dir / "scan.csv").is_file() else "scan.csv is missing"
    if isinstance(record, SeedsRecord):
        for folder, chash in zip(record.seed_folders, record.seed_hashes):
            if finished_record(out_dir / folder, chash) is None:
                return f"the draw in {folder} is not complete"
        return None
    results, heads = out_dir / "results.csv", out_dir / "heads.csv"
    for path in (results, heads):
        if not path.is_file():
            return f"{path.name} is missing"
    if record.results_sha256 and sha256(results) != record.results_sha256:
        return "results.csv differs from the file the job wrote (checksum)"
    try:
        df = pd.read_csv(results, keep_default_na=False)
        head_rows = pd.read_csv(heads)
    except (OSError, ValueError, pd.errors.ParserError, pd.errors.EmptyDataError) as err:
        return f"unreadable CSV ({err})"
    if list(df.columns) != RESULT_COLUMNS:
        return "results.csv does not have the result columns"
    if len(df) != record.n_items:
        return f"results.csv has {len(df)} rows, job.json says {record.n_items}"
    if df.duplicated(["story", "question_index"]).any():
        return "results.csv repeats a (story, question_index)"
    correct = int(df["correct"].astype(str).str.lower().eq("true").sum())
    if correct != record.n_correct:
        return f"results.csv has {correct} correct, job.json says {record.n_correct}"
    if abs(record.accuracy - correct / max(len(df), 1)) > 1e-9:
        return f"job.json's accuracy {record.accuracy} is not {correct}/{len(df)}"
    pairs = [[int(a), int(b)] for a, b in zip(head_rows.get("layer", []),
                                               head_rows.get("head", []))]
    if pairs != record.heads:
        return "heads.csv does not list the recorded heads"
    return checksum_problem(out_dir, record)


def checksum_problem(out_dir: Path, record: EvaluationRecord) -> str | None:
    """Why an evaluation's results.csv or job.json is not what the job wrote (None when
    both are): results.csv must have the recorded checksum (a record without one is
    damaged: edited, or older than checksums) and job.json its seal (:func:`seal_problem`),
    which covers every field the summary reads."""
    results = Path(out_dir) / "results.csv"
    if not record.results_sha256:
        return "job.json has no checksum of results.csv (edited, or written by an older version)"
    if not results.is_file() or sha256(results) != record.results_sha256:
        return "results.csv differs from the file the job wrote (checksum)"
    return seal_problem(out_dir)


def finished_record(out_dir: Path, config_hash: str, output: str = "results.csv",
                    inputs: dict[str, str] | None = None) -> Record | None:
    """The record of a job already complete in ``out_dir`` for this config hash whose files
    match it (:func:`problem_with`) and, for an evaluation or scan given ``inputs`` (its
    input files' fingerprints now, :func:`ih_sweep.fingerprints.job_inputs`), whose
    recorded inputs are those; None when the job has to run. A complete record whose files do not
    match, or whose inputs changed, is reported in one log line and not trusted."""
    out_dir = Path(out_dir)
    if not (out_dir / RECORD_FILE).is_file():
        return None
    try:
        record = read_record(out_dir)
    except RecordError as err:
        log.warning("redoing %s: %s", out_dir, err)
        return None
    if record.status != COMPLETE or record.config_hash != config_hash:
        return None
    if not (out_dir / output).is_file():
        log.warning("redoing %s: %s is missing", out_dir, output)
        return None
    problem = problem_with(out_dir, record)
    if problem:
        log.warning("redoing %s: %s", out_dir, problem)
        return None
    if inputs is not None and isinstance(record, (EvaluationRecord, ScanRecord)) and \
            record.inputs != inputs:
        from ih_sweep.fingerprints import changed_inputs

        log.info("redoing %s: its input changed since it ran: %s", out_dir,
                 ", ".join(changed_inputs(record.inputs, inputs)))
        return None
    return record


# --------------------------------------------------------------------------- the store
# Every finished evaluation is also kept under <paths.cache_dir>/jobs/<config hash>/, so a
# rerun of the same command (in a new timestamped sweep folder) reuses it.
STORED_FILES = ("results.csv", "heads.csv", RECORD_FILE)


def store_dir(cache_dir: str | Path, config_hash: str) -> Path:
    return Path(cache_dir) / "jobs" / config_hash


def job_lock_path(cache_dir: str | Path, config_hash: str) -> Path:
    """The lock file of this config hash's evaluation, beside its folder in the store."""
    return Path(cache_dir) / "jobs" / f"{config_hash}.lock"


@contextmanager
def evaluation_lock(cache_dir: str | Path, config_hash: str) -> Iterator[float | None]:
    """Hold the lock of this config hash's evaluation (:func:`job_lock_path`, a
    ``filelock.FileLock`` as the score table's): a job evaluates only while it holds it, so
    two processes given the same job (two sweeps on one cache) evaluate it once, the second
    waiting and then reusing the first's stored job. Yields the seconds this process waited
    for another to release it (None: it was free). The lock is the operating system's
    (``flock``): a killed holder (``kill -9``) releases it, the file left behind locks
    nothing. A store folder that cannot be written (a read-only cache) is evaluated without
    the lock, in one log line. Taken before a job looks for its finished evaluation, so
    the one that waited finds the other's."""
    from filelock import FileLock, Timeout

    path = job_lock_path(cache_dir, config_hash)
    waited: float | None = None
    lock: FileLock | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(path))
        try:
            lock.acquire(timeout=0)
        except Timeout:
            log.info("waiting for another process evaluating %s (lock %s)", config_hash, path)
            started = time.monotonic()
            lock.acquire()
            waited = time.monotonic() - started
    except OSError as err:
        log.warning("no job lock for %s: %s (%s); another process may evaluate it too",
                    config_hash, path, err)
        lock = None
    try:
        yield waited
    finally:
        if lock is not None:
            lock.release()


def _copy(names: tuple[str, ...], source: Path, target: Path) -> None:
    for name in names:  # each file atomically, in the order given
        atomic_write(Path(target) / name, lambda tmp, src=Path(source) / name:
                     shutil.copyfile(src, tmp))


def store(out_dir: Path, cache_dir: str | Path, config_hash: str) -> Path:
    """Copy a finished job's files into the store (the record last)."""
    target = store_dir(cache_dir, config_hash)
    _copy(STORED_FILES, out_dir, target)
    return target


def restore(cache_dir: str | Path, config_hash: str, out_dir: Path,
            inputs: dict[str, str] | None = None) -> Record | None:
    """The stored job of this config hash, if the store has one whose files match its
    record (and whose recorded ``inputs`` are these, when given): its results.csv and
    heads.csv are copied into ``out_dir`` and its record is returned for the caller to
    write (with its own bookkeeping); None otherwise."""
    source = store_dir(cache_dir, config_hash)
    record = finished_record(source, config_hash, inputs=inputs)
    if record is None:
        return None
    _copy(tuple(n for n in STORED_FILES if n != RECORD_FILE), source, out_dir)
    return record
