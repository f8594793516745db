from __future__ import annotations

import numpy as np
import pytest
from conftest import SEED_SCORES, needs_seed

from ih_sweep.selection import (
    SelectionError,
    layer_counts,
    low_matched,
    random_matched,
    select_heads,
    top_heads,
)

SCORES = np.array([[0.1, 0.9, 0.2, 0.05],
                   [0.8, 0.3, 0.7, 0.01],
                   [0.4, 0.4, 0.0, 0.6]])


def test_high_is_global_top_n_highest_first():
    assert select_heads(SCORES, "high", 3) == [(0, 1), (1, 0), (1, 2)]


def test_low_is_layer_matched_lowest():
    # top-4: (0,1) (1,0) (1,2) (2,3) -> layer 0: 1, layer 1: 2, layer 2: 1
    assert layer_counts(top_heads(SCORES, 4)) == {0: 1, 1: 2, 2: 1}
    assert select_heads(SCORES, "low", 4) == [(0, 3), (1, 3), (1, 1), (2, 2)]


def test_ties_keep_layer_major_order():
    flat = np.zeros((2, 3))
    assert top_heads(flat, 4) == [(0, 0), (0, 1), (0, 2), (1, 0)]
    assert low_matched(flat, 1) == [(0, 0)]


def test_random_is_layer_matched_excludes_top_and_depends_on_seed():
    scores = np.random.default_rng(0).random((4, 32))
    top = set(top_heads(scores, 8))
    draws = {tuple(random_matched(scores, 8, s)) for s in range(20)}
    assert len(draws) > 15
    for seed in range(20):
        heads = select_heads(scores, "random", 8, seed)
        assert not set(heads) & top
        assert layer_counts(sorted(heads)) == layer_counts(sorted(top))
        assert heads == select_heads(scores, "random", 8, seed)


def test_none_and_zero():
    assert select_heads(SCORES, "none", 5) == []
    assert select_heads(SCORES, "high", 0) == []


@pytest.mark.parametrize("cond,n,match", [
    ("high", 13, "larger than the model's 12 heads"),
    ("high", -1, "must be an integer >= 0"),
    ("best", 2, "allowed values: high, low, random, none"),
])
def test_errors(cond, n, match):
    with pytest.raises(SelectionError, match=match):
        select_heads(SCORES, cond, n)


def test_unscored_heads_are_never_chosen_and_all_missing_is_an_error():
    s = SCORES.copy()
    s[0] = np.nan
    assert all(layer != 0 for layer, _ in select_heads(s, "high", 4))
    assert all(layer != 0 for layer, _ in select_heads(s, "low", 4))
    with pytest.raises(SelectionError, match="no scores"):
        select_heads(np.full((2, 2), np.nan), "high", 1)
    with pytest.raises(SelectionError, match="random control"):
        select_heads(np.array([[1.0, 0.5]]), "random", 2)


SEED_HIGH = [(19, 8), (23, 30), (19, 9), (31, 5), (31, 31), (23, 12), (23, 15), (19, 10),
             (23, 14), (19, 17), (23, 13), (31, 4), (27, 27), (19, 19), (19, 23), (31, 19)]
SEED_LOW = [(19, 1), (19, 24), (19, 3), (19, 0), (19, 26), (19, 7), (23, 16), (23, 25),
            (23, 2), (23, 23), (23, 19), (31, 1), (31, 3), (31, 20), (31, 10), (27, 10)]


@needs_seed
def test_seed_score_file_reproduces_the_seeds_choice():
    """The lists above are what the seed's own top_values/matched_list code returns."""
    from ih_sweep.scoring import load_seed_scores, score_matrix

    mat = score_matrix(load_seed_scores(SEED_SCORES), "combined")
    assert mat.shape == (32, 32)
    assert select_heads(mat, "high", 16) == SEED_HIGH
    assert select_heads(mat, "low", 16) == SEED_LOW
