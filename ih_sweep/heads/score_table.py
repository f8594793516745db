"""The head score table a job ranks heads by: read from ``scoring.file``, or computed on the
model once and cached (``paths.cache_dir/scores/``) for every job that needs the same one."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ih_sweep.config.errors import UserError
from ih_sweep.config.plain import plain
from ih_sweep.config.schema import Config, RankBy, ScoreSource
from ih_sweep.io_utils import write_csv, write_text

log = logging.getLogger(__name__)


WEIGHT_FILES = ("*.safetensors", "*.bin", "*.pt", "*.pth", "*.gguf", "config.json")


def weights_fingerprint(model_path: str) -> dict[str, Any]:
    """What identifies the weights behind ``model.path``: for a local folder (symlinks
    resolved) the content fingerprint of each of its weight, config, tokenizer and
    generation files (:func:`ih_sweep.fingerprints.model_inputs`), so that changed files are
    rescored; for builtin:tiny the name, size and modification time of each weight file and
    of config.json; for a hub id, the id alone (its revision is in the model config)."""
    from ih_sweep.fingerprints import local_model_folder, model_inputs
    from ih_sweep.model.loading import resolve_path

    if local_model_folder(model_path) is not None:
        return {"files": model_inputs(model_path)}
    folder = Path(resolve_path(model_path))
    if not folder.is_dir():
        return {"hub": model_path}
    files = sorted({f for pattern in WEIGHT_FILES for f in folder.glob(pattern)})
    return {"folder": str(folder.resolve()),
            "files": [[f.name, f.stat().st_size, f.stat().st_mtime_ns] for f in files]}


def cache_key(config: Config) -> dict[str, Any]:
    """Everything that determines a computed induction score table: the model (path, its
    weights' fingerprint, revision, dtype), its quantization and the induction scoring
    settings (:meth:`ih_sweep.config.schema.ScoringConfig.induction_settings`: not how the scores
    are used, not the FV settings)."""
    return {**model_key(config), "scoring": config.scoring.induction_settings()}


def model_key(config: Config) -> dict[str, Any]:
    """What identifies the job's model in a cache key: path, revision, dtype, the weights'
    fingerprint (:func:`weights_fingerprint`) and the quantization."""
    model = config.model
    return {"model": {"path": model.path, "revision": model.revision, "dtype": str(model.dtype)},
            "weights": weights_fingerprint(config.model.path),
            "quantization": plain(config.quantization)}


def fv_cache_key(config: Config) -> dict[str, Any]:
    """Everything that determines a computed FV score table: the model (as in
    :func:`cache_key`), the settings that make the job's prompts (``data``, and the content
    of the bAbI files it reads, :func:`ih_sweep.fingerprints.data_inputs`; ``eval``'s
    format, scope, n_shots, demo_seed) and the FV settings (not the induction ones)."""
    from ih_sweep.config.schema import FV_KEYS
    from ih_sweep.fingerprints import data_inputs

    ev = plain(config.eval)
    scoring = plain(config.scoring)
    files = data_inputs(config)
    return {**model_key(config), "data": plain(config.data),
            "eval": {k: ev[k] for k in ("format", "scope", "n_shots", "demo_seed")},
            "fv": {k: scoring[k] for k in FV_KEYS if k != "fv_batch_size"},
            **({"data_files": files} if files else {})}


def _path(config: Config, key: dict[str, Any], kind: str = "") -> Path:
    import hashlib
    import json

    from ih_sweep.model.loading import model_slug

    slug = model_slug(config.model, config.quantization)
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    return Path(config.paths.cache_dir) / "scores" / f"{slug}-{kind}{digest}.csv"


def cache_path(config: Config) -> Path:
    """Where the computed induction table for this model, its weights, quantization and
    scoring settings lives: ``<paths.cache_dir>/scores/<model>-<hash of cache_key>.csv``."""
    return _path(config, cache_key(config))


def fv_cache_path(config: Config) -> Path:
    """Where the computed FV table lives: ``<paths.cache_dir>/scores/<model>-fv-<hash of
    fv_cache_key>.csv``."""
    return _path(config, fv_cache_key(config), "fv-")


def problem_with_cache(path: Path, n_layers: int, heads_per_layer: int,
                       columns: list[str] | None = None, names: list[str] | None = None
                       ) -> str | None:
    """Why a cached table cannot be trusted (None when it can): its checksum (written
    beside it), exactly ``columns`` (default: the induction table's), every layer x head
    once, finite scores in ``names``."""
    from ih_sweep.heads.scoring import INDUCTION_COLUMNS, INDUCTION_NAMES
    from ih_sweep.pipeline.records import sha256

    columns, names = columns or INDUCTION_COLUMNS, names or INDUCTION_NAMES
    digest = checksum_path(path)
    if not digest.is_file() or digest.read_text().strip() != sha256(path):
        return "its checksum does not match (damaged, or written by an older version)"
    try:
        df = pd.read_csv(path)
    except (OSError, ValueError, pd.errors.ParserError, pd.errors.EmptyDataError) as err:
        return f"unreadable ({err})"
    if list(df.columns) != columns:
        return "it lacks the score columns"
    cells = set(zip(df["layer"], df["head"]))
    if len(df) != n_layers * heads_per_layer or len(cells) != len(df) or \
            cells != {(la, h) for la in range(n_layers) for h in range(heads_per_layer)}:
        return f"it does not hold each of the model's {n_layers} x {heads_per_layer} heads once"
    if not np.isfinite(df[names].to_numpy(dtype=float)).all():
        return "it holds scores that are not finite"
    return None


def get_scores(config: Config, model_getter: Callable[[], tuple[Any, Any]],
               progress: bool = False, shape: tuple[int, int] | None = None,
               items: Sequence[Any] | None = None) -> tuple[pd.DataFrame, Path | None]:
    """(score table, the file holding the ``scoring.rank_by`` column: a cache file, or None
    for a user's file). Columns: scoring.SCORE_COLUMNS.

    Computed: the induction scores (always) and, where ``scoring.rank_by`` or
    ``scoring.exclude_by`` is ``fv``, the FV scores (:mod:`ih_sweep.heads.function_vectors`) on
    the prompts :func:`fv_items` gives (held-out stories' by default; ``items``: the
    job's, None: made from ``data`` and ``eval``), each table cached
    for every job that needs the same one (:func:`cache_path`, :func:`fv_cache_path`);
    the ``fv`` column is empty otherwise. A user's file (``scoring.source=file``) is the
    whole table: its ``fv`` column where it has one.

    Each cached table is checked each time it is read (:func:`problem_with_cache`; a bad
    one is recomputed with a warning), and read without a lock from a cache folder this
    process cannot write. ``shape``: the model's (layers, heads per layer), if known. A
    file lock makes concurrent jobs wait for the one that computes; files are written
    atomically, so a reader never sees a partial table."""
    from ih_sweep.heads.scoring import (
        INDUCTION_COLUMNS,
        INDUCTION_NAMES,
        SCORE_COLUMNS,
        load_score_file,
    )
    from ih_sweep.model.loading import layers_and_heads

    if config.scoring.source == ScoreSource.file:
        return load_score_file(config.scoring.file, config.model.name), None
    shape = shape or layers_and_heads(config.model)
    rank_by = str(config.scoring.rank_by)
    path = cache_path(config)
    df = cached_table(config, path, shape, INDUCTION_COLUMNS, INDUCTION_NAMES,
                      lambda: _compute(config, model_getter, progress, path),
                      rank_by if rank_by in INDUCTION_NAMES else "prefix")
    df = df.assign(fv=np.nan, fv_se=np.nan)
    if config.scoring.uses(RankBy.fv):
        from ih_sweep.heads.function_vectors import FV_COLUMNS

        fv_path = fv_cache_path(config)
        fv = cached_table(config, fv_path, shape, FV_COLUMNS, ["fv"],
                          lambda: _compute_fv(config, model_getter, items, progress, fv_path),
                          "fv")
        df = df.drop(columns=["fv", "fv_se"]).merge(fv[["layer", "head", "fv", "fv_se"]],
                                                    on=["layer", "head"], how="left")
        if rank_by == RankBy.fv:
            path = fv_path
    return df[SCORE_COLUMNS], path


def cached_table(config: Config, path: Path, shape: tuple[int, int], columns: list[str],
                 names: list[str], compute: Callable[[], pd.DataFrame], column: str | None,
                 what: str = "scores") -> pd.DataFrame:
    """The table at ``path`` if it passes :func:`problem_with_cache`, else ``compute()``d
    and written there (with its checksum and a heatmap of ``column``; none for None), under
    the file's lock (see :func:`get_scores`). ``what``: the table's name in log lines (the per-head
    output norms, :mod:`ih_sweep.heads.output_norms`, are cached the same way)."""
    from filelock import FileLock, Timeout

    if path.is_file() and not os.access(path.parent, os.W_OK):  # a read-only cache
        problem = problem_with_cache(path, *shape, columns, names)
        if problem is None:
            log.info("reusing %s %s (read-only cache)", what, path)
            return pd.read_csv(path)
        raise CacheError(f"paths.cache_dir={config.paths.cache_dir}: the cached table {path} "
                         f"is not usable ({problem}) and the folder is not writable; give a "
                         "writable paths.cache_dir")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(path) + ".lock")
        lock.acquire()
    except (OSError, Timeout) as err:
        raise CacheError(f"paths.cache_dir={config.paths.cache_dir}: cannot write there "
                         f"({err})") from None
    try:
        _remove_stale_temporaries(path)
        if path.is_file():
            problem = problem_with_cache(path, *shape, columns, names)
            if problem is None:
                log.info("reusing %s %s", what, path)
                df = pd.read_csv(path)
                if column is not None and not path.with_suffix(".png").is_file():
                    save_heatmap(df, column, path.with_suffix(".png"), config.model.name)
                return df
            log.warning("%s: the cached table %s is not used: %s",
                        "rescoring" if what == "scores" else f"recomputing {what}", path,
                        problem)
        df = compute()
        write_csv(path, df)
        from ih_sweep.pipeline.records import sha256

        write_text(checksum_path(path), sha256(path) + "\n")
        if column is not None:
            save_heatmap(df, column, path.with_suffix(".png"), config.model.name)
    finally:
        lock.release()
    return df


class CacheError(UserError):
    kind = "config"


def check_sequences_fit(config: Config) -> None:
    """A repeated sequence ([BOS] + seq_len tokens x repeats) must fit the model's
    positions (:func:`ih_sweep.heads.scoring.check_repeated_sequences`); raises
    :class:`~ih_sweep.config.errors.ConfigError` naming scoring.seq_len."""
    from ih_sweep.heads.scoring import check_repeated_sequences
    from ih_sweep.model.architecture import position_limit
    from ih_sweep.model.loading import load_config

    check_repeated_sequences("scoring", config.scoring.seq_len, config.scoring.repeats, 1,
                             position_limit(load_config(config.model)))


def checksum_path(path: Path) -> Path:
    """The SHA-256 of a cached table, written beside it (``<table>.sha256``)."""
    return path.with_name(path.name + ".sha256")


def samples_path(path: Path) -> Path:
    """The per-sample scores beside a cached table (``<table>.samples.npy``: [samples,
    layers, heads] float64; the prefix score per random sequence, the FV score's indirect
    effect per corrupted prompt), from which :mod:`ih_sweep.heads.stability` resamples."""
    return path.with_name(path.stem + ".samples.npy")


def write_samples(path: Path, samples: np.ndarray) -> None:
    """:func:`samples_path` of the table at ``path`` written atomically
    (:func:`ih_sweep.io_utils.atomic_write`: a temporary file renamed, normal file modes, a
    full disk or a read-only folder a :class:`~ih_sweep.io_utils.WriteError` naming it;
    under the table's lock)."""
    from ih_sweep.io_utils import atomic_write

    data = np.asarray(samples, dtype=np.float64)

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as fh:
            np.save(fh, data)

    atomic_write(samples_path(path), write)


def read_samples(path: Path | None, shape: tuple[int, int]) -> np.ndarray | None:
    """The per-sample scores beside the cached table at ``path`` ([S, layers, heads]), or
    None (logged) where there are none or they do not fit ``shape``: a table cached by a
    version that kept none (its stability is then unknown; delete the table to rescore)."""
    if path is None:
        return None
    target = samples_path(path)
    try:
        samples = np.load(target, allow_pickle=False)
    except (OSError, ValueError) as err:
        log.warning("no per-sample scores beside %s (%s): the ranking's stability is not "
                    "known; delete the table to rescore", path, type(err).__name__)
        return None
    if samples.ndim != 3 or tuple(samples.shape[1:]) != tuple(shape) or samples.shape[0] < 1:
        log.warning("the per-sample scores %s have shape %s, not [samples, %d, %d]: the "
                    "ranking's stability is not known", target, samples.shape, *shape)
        return None
    return samples


def score_samples(config: Config, shape: tuple[int, int]) -> dict[str, np.ndarray]:
    """The per-sample scores of the job's computed tables, by score name (``prefix``:
    [sequences, layers, heads]; ``fv``, where the job uses it: [prompts, layers, heads]);
    none for a user's file (``scoring.source=file``) or where :func:`read_samples` finds
    none. Read after :func:`get_scores` (which writes them)."""
    if config.scoring.source == ScoreSource.file:
        return {}
    found = {"prefix": read_samples(cache_path(config), shape)}
    if config.scoring.uses(RankBy.fv):
        found["fv"] = read_samples(fv_cache_path(config), shape)
    return {k: v for k, v in found.items() if v is not None}


def _compute(config: Config, model_getter, progress: bool, path: Path | None = None
             ) -> pd.DataFrame:
    from ih_sweep.heads.scoring import score_heads_with_samples
    from ih_sweep.model.loading import eager_attention

    check_sequences_fit(config)
    model, tokenizer = model_getter()
    t0 = time.time()
    with eager_attention(model):
        df, samples = score_heads_with_samples(model, tokenizer, config.scoring,
                                               config.model.name, progress=progress)
    log.info("scored %d heads in %.1f s", len(df), time.time() - t0)
    if path is not None:
        write_samples(path, samples)
    return df


def _compute_fv(config: Config, model_getter, items: Sequence[Any] | None,
                progress: bool, path: Path | None = None) -> pd.DataFrame:
    from ih_sweep.heads.function_vectors import function_vector_scores, fv_table

    items = fv_items(config, items)
    model, tokenizer = model_getter()
    t0 = time.time()
    result = function_vector_scores(model, tokenizer, items, config.scoring, progress)
    log.info("FV-scored %d heads in %.1f s", result.aie.size, time.time() - t0)
    if path is not None:
        write_samples(path, result.effects)
    return fv_table(result, config.scoring, config.model.name)


def fv_items(config: Config, items: Sequence[Any] | None) -> Sequence[Any]:
    """The prompts the FV scores are computed on (``scoring.fv_reference``): items of
    held-out stories (``heldout``: ``items.heldout`` where the job made them, else made
    here, :mod:`ih_sweep.data.heldout`) or the job's own ``items`` (``evaluated``; None:
    made from ``data`` and ``eval``)."""
    from ih_sweep.config.schema import Reference
    from ih_sweep.data import items_for, load_stories
    from ih_sweep.data.heldout import heldout_items

    if config.scoring.fv_reference == Reference.heldout:
        if getattr(items, "heldout", None) is not None:
            return items.heldout  # type: ignore[union-attr]
        return heldout_items(config.data, config.eval, load_stories(config.data))[0]
    if items is None:
        return items_for(config.data, config.eval, load_stories(config.data))
    return items


def _remove_stale_temporaries(path: Path) -> None:
    """Temporary files a killed write of ``path``'s table left behind: of the table, its
    checksum, its heatmap and its per-sample scores (:func:`~ih_sweep.io_utils.atomic_write`'s
    ``.<name>.<random>.tmp``), which only the holder of ``path``'s lock writes, so none is
    being written now. Other tables' temporaries in the folder are left alone: another
    process may be writing one under its own lock."""
    own = {f".{p.name}" for p in (path, checksum_path(path), path.with_suffix(".png"),
                                  samples_path(path))}
    for tmp in path.parent.glob(".*.tmp"):
        if tmp.name.rsplit(".", 2)[0] in own:
            tmp.unlink(missing_ok=True)
            log.info("removed %s, left by an interrupted write", tmp)


def matrix_for(config: Config, scores: pd.DataFrame, column: str) -> np.ndarray:
    """[layers, heads] of one score column the job uses (``rank_by`` or ``exclude_by``).
    Raises :class:`~ih_sweep.heads.scoring.ScoreFileError` where a user's table has no score in
    that column (e.g. ``rank_by=fv`` with a table of induction scores only)."""
    from ih_sweep.heads.scoring import ScoreFileError, score_matrix

    mat = score_matrix(scores, str(column))
    if not np.isfinite(mat).any() and config.scoring.source == ScoreSource.file:
        key = "rank_by" if column == config.scoring.rank_by else "exclude_by"
        raise ScoreFileError(f"scoring.file={config.scoring.file}: no {column} score in it, "
                             f"and scoring.{key}={column} needs one; give a table with a "
                             f"{column} column, or scoring.source=compute")
    return mat


def exclusion(config: Config, scores: pd.DataFrame) -> list[tuple[int, int]]:
    """The heads ``scoring.exclude_by`` takes out (:func:`ih_sweep.heads.selection.excluded_heads`;
    none without it), logged."""
    from ih_sweep.heads.selection import excluded_heads

    sc = config.scoring
    if sc.exclude_by is None:
        return []
    heads = excluded_heads(matrix_for(config, scores, sc.exclude_by), sc.exclude_share)
    log.info("excluded from the top-%s by %s: the top %d heads by %s (exclude_share=%g): %s",
             config.n_heads, sc.rank_by, len(heads), sc.exclude_by, sc.exclude_share, heads)
    return heads


def check_scores_fit(scores: pd.DataFrame, n_layers: int, heads_per_layer: int,
                     source: str) -> None:
    """A supplied table may cover some layers only (the notebook's scored every 4th), but
    every layer it has must be one of the model's and hold all of its heads. Raises
    :class:`~ih_sweep.heads.scoring.ScoreFileError`."""
    from ih_sweep.heads.scoring import ScoreFileError

    top_layer, top_head = int(scores["layer"].max()), int(scores["head"].max())
    if top_layer >= n_layers or top_head >= heads_per_layer:
        raise ScoreFileError(
            f"scoring.file={source}: it has layers up to {top_layer} and heads up to "
            f"{top_head}, but the model has {n_layers} layers x {heads_per_layer} heads "
            "(ids are 0-based); is it the score file of another model?")
    counts = scores.groupby("layer")["head"].nunique()
    short = counts[counts != heads_per_layer]
    if not short.empty:
        raise ScoreFileError(
            f"scoring.file={source}: layer {int(short.index[0])} has {int(short.iloc[0])} of "
            f"the model's {heads_per_layer} heads; a layer in the table needs all of them")


def save_heatmap(scores: pd.DataFrame, column: str, path: Path, title: str,
                 marks: dict[str, list[tuple[int, int]]] | None = None) -> Path:
    """The [layer, head] heatmap of one score column (PNG), ablated heads marked."""
    from ih_sweep.heads.basics import score_matrix
    from ih_sweep.report.figures import head_heatmap

    return head_heatmap(score_matrix(scores, str(column)), path,
                        f"{title}: {column} score of every head", f"{column} score", marks)
