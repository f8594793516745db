from __future__ import annotations

import numpy as np
import pytest
from conftest import SEED_SCORES, needs_seed

from ih_sweep.config.errors import ConfigError
from ih_sweep.heads.selection import (
    SelectionError,
    layer_counts,
    low_matched,
    random_matched,
    resolve_n_heads,
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


@pytest.mark.parametrize("n_heads,layers,heads,want", [
    ("1%", 2, 32, 1), ("3%", 2, 32, 2), ("10%", 2, 32, 7),  # the tiny model's 64 heads
    ("1%", 32, 32, 11), ("3%", 32, 32, 31),  # Mistral-7B / Llama-3-8B: 1,024 heads
    ("100%", 2, 32, 64), ("100%", 32, 32, 1024), ("0.5%", 2, 32, 1), ("50%", 2, 32, 32),
    ("10%", 2, 4, 1), ("12.5%", 2, 4, 1), ("12.6%", 2, 4, 2), ("7%", 10, 10, 7),
    ("0.07%", 100, 100, 7), (".5%", 2, 32, 1), (8, 2, 32, 8), (0, 2, 32, 0),
])
def test_a_share_of_heads_resolves_to_the_ceiling_exactly(n_heads, layers, heads, want):
    """ceil(L x H x P / 100) in exact arithmetic: 7% of 100 heads is 7 (through a float,
    100 * 0.07 = 7.000000000000001 would round up to 8); 12.5% of 8 heads is exactly 1."""
    assert resolve_n_heads(n_heads, layers, heads) == want


@pytest.mark.parametrize("bad", ["0%", "0.0%", "100.01%", "101%", "-1%", "abc", "10", "10 %",
                                 "%", "1e1%", "10%%", "", -1, True])
def test_a_share_outside_0_to_100_or_not_a_share_is_refused(bad):
    with pytest.raises(ConfigError, match=r"^n_heads=.* is not allowed; allowed: an integer "
                                          r">= 0 \(heads\), or a share of all the model's "
                                          r"heads P% with 0 < P <= 100"):
        resolve_n_heads(bad, 2, 32)


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
    from ih_sweep.heads.scoring import load_seed_scores, score_matrix

    mat = score_matrix(load_seed_scores(SEED_SCORES), "combined")
    assert mat.shape == (32, 32)
    assert select_heads(mat, "high", 16) == SEED_HIGH
    assert select_heads(mat, "low", 16) == SEED_LOW
