"""A score table's column as a [layers, heads] matrix: numpy and pandas only, so that the
summary's heatmaps and a rerun that reuses every job need no torch."""

from __future__ import annotations

import numpy as np
import pandas as pd

from ih_sweep.config.schema import RankBy

SCORE_NAMES = [m.value for m in RankBy]  # the score columns a ranking can use


def score_matrix(scores: pd.DataFrame, column: str = "prefix") -> np.ndarray:
    """[layers, heads] array of one score column of ``scores`` (a score table: ``layer``,
    ``head`` and the column; heads it lacks are nan). Raises ValueError for a column
    outside :data:`SCORE_NAMES`."""
    if column not in SCORE_NAMES:
        raise ValueError(f"scoring.rank_by={column!r}; allowed values: {', '.join(SCORE_NAMES)}")
    n_layers = int(scores["layer"].max()) + 1
    heads_per_layer = int(scores["head"].max()) + 1
    mat = np.full((n_layers, heads_per_layer), np.nan)
    mat[scores["layer"].to_numpy(), scores["head"].to_numpy()] = scores[column].to_numpy()
    return mat
