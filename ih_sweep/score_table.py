"""The head score table a job ranks heads by: read from ``scoring.file``, or computed on the
model once and cached (``paths.cache_dir/scores/``) for every job that needs the same one."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd

from .io_utils import write_csv
from .schema import Config, ConfigError, ScoreSource, plain

log = logging.getLogger(__name__)


def cache_path(config: Config) -> Path:
    """Where the computed table for this model, quantization and scoring settings lives."""
    from .model_loading import model_slug

    slug = model_slug(plain(config.model), plain(config.quantization))
    return Path(config.paths.cache_dir) / "scores" / f"{slug}-{config.scoring.key()}.csv"


def get_scores(config: Config, model_getter: Callable[[], tuple[Any, Any]],
               progress: bool = False) -> tuple[pd.DataFrame, Path | None]:
    """(score table, cache file or None for a user's file). Columns: scoring.SCORE_COLUMNS.

    A file lock makes concurrent jobs wait for the one that computes; the CSV is written
    atomically, so a reader never sees a partial table."""
    from filelock import FileLock

    from .scoring import load_score_file, score_heads

    if config.scoring.source == ScoreSource.file:
        return load_score_file(config.scoring.file, config.model.name), None
    path = cache_path(config)
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path) + ".lock"):
        if path.is_file():
            log.info("reusing scores %s", path)
            return pd.read_csv(path), path
        from .model_loading import eager_attention

        model, tokenizer = model_getter()
        t0 = time.time()
        with eager_attention(model):
            df = score_heads(model, tokenizer, config.scoring, config.model.name,
                             progress=progress)
        log.info("scored %d heads in %.1f s", len(df), time.time() - t0)
        write_csv(path, df)
        save_heatmap(df, config.scoring.rank_by, path.with_suffix(".png"), config.model.name)
    return df, path


def check_scores_fit(scores: pd.DataFrame, n_layers: int, heads_per_layer: int,
                     source: str) -> None:
    """A supplied table may cover some layers only (the notebook's does), not other shapes."""
    if int(scores["layer"].max()) >= n_layers or scores["head"].nunique() != heads_per_layer:
        raise ConfigError(
            f"scoring.file={source}: the table has layers up to {int(scores['layer'].max())} "
            f"and {scores['head'].nunique()} heads per layer, but the model has {n_layers} "
            f"layers x {heads_per_layer} heads")


def save_heatmap(scores: pd.DataFrame, column: str, path: Path, title: str,
                 marks: dict[str, list[tuple[int, int]]] | None = None) -> Path:
    """The [layer, head] heatmap of one score column (PNG), ablated heads marked."""
    from .figures import head_heatmap
    from .scoring import score_matrix

    return head_heatmap(score_matrix(scores, str(column)), path,
                        f"{title}: {column} score of every head", f"{column} score", marks)
