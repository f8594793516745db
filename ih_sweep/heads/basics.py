"""The parts of the induction scores that need no torch: which token ids a random
sequence may use (:func:`candidate_token_ids`), whether the repeated sequences fit the
model and the tokenizer (:func:`check_repeated_sequences`) and a score column as a
[layers, heads] matrix (:func:`score_matrix`), so that the checks before any job
(:mod:`ih_sweep.pipeline.preflight`) and a sweep's summary import neither torch nor
transformers. :mod:`ih_sweep.heads.scoring` re-exports them."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from ih_sweep.config.errors import ConfigError
from ih_sweep.config.schema import RankBy


def candidate_token_ids(tokenizer, exclude_frequent_frac: float = 0.0,
                        exclude_rare_frac: float = 0.0) -> list[int]:
    """Token ids random sequences may use: no special tokens; optionally drop the most and
    least frequent ids (BPE vocabularies are ordered by merge frequency, so by id)."""
    vocab_size = len(tokenizer)
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    lo = int(math.floor(vocab_size * exclude_frequent_frac))
    hi = vocab_size - int(math.floor(vocab_size * exclude_rare_frac))
    ids = [i for i in range(lo, hi) if i not in special]
    added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    return [i for i in ids if i not in added or not added[i].special]


def check_repeated_sequences(key: str, seq_len: int, repeats: int, bos: int,
                             limit: int | None, offered: int | None = None) -> None:
    """Whether ``bos`` (0 or 1) + ``seq_len`` x ``repeats`` random tokens fit ``limit``
    positions (None: no limit) and, where ``offered`` is given, whether that many candidate
    tokens (:func:`candidate_token_ids`) hold ``seq_len`` distinct ones. The one rule for
    the checks before any job (:mod:`ih_sweep.pipeline.preflight`) and those inside it.
    Raises :class:`~ih_sweep.config.errors.ConfigError` naming ``<key>.seq_len`` (``key``:
    ``scoring`` or ``mechanism``)."""
    length = bos + seq_len * repeats
    if limit and length > limit:
        raise ConfigError(f"{key}.seq_len={seq_len}: a repeated sequence of {bos} + "
                          f"{seq_len} x {repeats} = {length} tokens is longer than the "
                          f"model's {limit} positions; allowed: seq_len <= "
                          f"{(limit - bos) // repeats}")
    if offered is not None and offered < seq_len:
        raise ConfigError(f"{key}.seq_len={seq_len}: a sequence of distinct random tokens "
                          f"this long needs {seq_len} candidate tokens and the tokenizer "
                          f"offers {offered} (after {key}.exclude_*_frac); allowed: "
                          f"seq_len <= {offered}")


SCORE_NAMES = [m.value for m in RankBy]  # the score columns a ranking can use


def score_matrix(scores: pd.DataFrame, column: str = "prefix") -> np.ndarray:
    """[layers, heads] array of one score column."""
    if column not in SCORE_NAMES:
        raise ValueError(f"scoring.rank_by={column!r}; allowed values: "
                         f"{', '.join(SCORE_NAMES)}")
    n_layers = int(scores["layer"].max()) + 1
    heads_per_layer = int(scores["head"].max()) + 1
    mat = np.full((n_layers, heads_per_layer), np.nan)
    mat[scores["layer"].to_numpy(), scores["head"].to_numpy()] = scores[column].to_numpy()
    return mat
