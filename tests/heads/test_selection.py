from __future__ import annotations

import logging

import numpy as np
import pytest
from conftest import SEED_SCORES, needs_seed

from ih_sweep.config.errors import ConfigError
from ih_sweep.heads.selection import (
    SelectionError,
    excluded_heads,
    layer_counts,
    low_matched,
    norm_matched,
    random_matched,
    resolve_n_heads,
    select_heads,
    top_heads,
    within_factor,
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


# --------------------------------------------------------------------------- norm matching
def _norm_case(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Scores and output norms of a 3 x 32 model whose norms spread over a decade and more,
    grow with the score (as the tiny model's: induction heads write most)."""
    rng = np.random.default_rng(seed)
    scores = rng.random((3, 32))
    norms = np.exp(2.0 * scores + rng.normal(0, 0.6, (3, 32)))
    return scores, norms


def _pairs(scores, heads, n):
    """(top head, the drawn head standing for it): the i-th drawn head of a layer stands for
    the layer's i-th top head, layers in order."""
    top = top_heads(scores, n)
    return [(t, d) for layer in sorted(layer_counts(top))
            for t, d in zip([h for h in top if h[0] == layer],
                            [h for h in heads if h[0] == layer])]


@pytest.mark.parametrize("factor", [1.5, 2.0, 3.0])
def test_norm_matched_heads_lie_within_the_factor_of_the_top_head_they_stand_for(factor):
    scores, norms = _norm_case()
    n = 8
    top = set(top_heads(scores, n))
    draws = set()
    for seed in range(30):
        heads = select_heads(scores, "random", n, seed, match="layer_norm", norms=norms,
                             norm_factor=factor)
        assert not set(heads) & top and len(set(heads)) == n
        assert layer_counts(sorted(heads)) == layer_counts(sorted(top))
        for t, d in _pairs(scores, heads, n):
            ratio = norms[d] / norms[t]
            assert 1 / factor <= ratio <= factor, (seed, t, d, ratio)
        assert heads == norm_matched(scores, norms, n, seed, factor)  # the seed fixes it
        draws.add(tuple(heads))
    assert len(draws) > 10  # a draw, not one fixed set


def test_norm_matched_controls_write_as_much_as_the_top_heads_unlike_layer_matched_ones():
    scores, norms = _norm_case()
    top = np.mean([norms[h] for h in top_heads(scores, 8)])
    plain = np.mean([np.mean([norms[h] for h in random_matched(scores, 8, s)])
                     for s in range(30)])
    matched = np.mean([np.mean([norms[h] for h in norm_matched(scores, norms, 8, s, 2.0)])
                       for s in range(30)])
    assert abs(np.log(matched / top)) < np.log(2) < abs(np.log(plain / top))


def test_norm_matched_draw_leaves_the_later_top_heads_a_match():
    """Layer 0's top heads, in top order, write 4 and 8; the others 3 and 5. Within a factor
    2 the 4 may take 3 or 5, the 8 only 5: every seed must give the 4 the 3."""
    scores = np.array([[0.9, 0.8, 0.1, 0.2]])
    norms = np.array([[4.0, 8.0, 3.0, 5.0]])
    for seed in range(40):
        assert norm_matched(scores, norms, 2, seed, 2.0) == [(0, 2), (0, 3)]


def test_norm_matched_avoids_the_excluded_heads():
    scores, norms = _norm_case(1)
    exclude = excluded_heads(norms, 0.1)  # the 9 heads that write most
    for seed in range(10):
        heads = select_heads(scores, "random", 6, seed, exclude, "layer_norm", norms, 3.0)
        assert not set(heads) & set(exclude) and not set(heads) & set(
            top_heads(scores, 6, exclude))


def test_norm_matching_refuses_in_one_line_where_no_control_exists():
    """Each top head (norms 10, 10) has a head within a factor 2 (the 6), but not one each."""
    scores = np.array([[0.9, 0.8, 0.3, 0.2, 0.1]])
    norms = np.array([[10.0, 10.0, 6.0, 1.0, 1.0]])
    with pytest.raises(SelectionError) as err:
        select_heads(scores, "random", 2, 0, match="layer_norm", norms=norms, norm_factor=2.0)
    message = str(err.value)
    assert "\n" not in message
    assert message == (
        "control.match=layer_norm cannot match n_heads=2: layer 0 has no 2 heads outside the "
        "top-2 whose output norms each lie within a factor control.norm_factor=2 of the top "
        "head they stand for (top heads' norms 10 to 10, the others' 1 to 6); allowed: a "
        "larger control.norm_factor, a smaller n_heads, or control.match=layer")
    assert norm_matched(scores, norms, 1, 0, 2.0) == [(0, 2)]  # one top head: the 6
    assert len(norm_matched(scores, norms, 2, 0, 10.0)) == 2  # a wider factor: possible


def test_within_factor_is_symmetric_and_inclusive():
    assert within_factor(5.0, 10.0, 2.0) and within_factor(20.0, 10.0, 2.0)
    assert not within_factor(4.99, 10.0, 2.0) and not within_factor(20.01, 10.0, 2.0)
    assert within_factor(0.0, 0.0, 2.0) and not within_factor(0.1, 0.0, 2.0)


def test_the_default_layer_match_keeps_todays_random_heads():
    """control.match=layer (the default) draws what random_matched always drew, whatever
    norms are given; the other conditions ignore the match."""
    scores, norms = _norm_case()
    for seed in range(20):
        today = random_matched(scores, 8, seed)
        assert select_heads(scores, "random", 8, seed) == today
        assert select_heads(scores, "random", 8, seed, match="layer", norms=norms) == today
    for condition in ("high", "low"):
        assert select_heads(scores, condition, 8, 0, match="layer_norm", norms=norms) == \
            select_heads(scores, condition, 8)


def test_a_forced_norm_matched_set_is_said_once_per_draw(caplog):
    """Only the 6 and the 7 lie within a factor 2 of the top heads' 10s: every seed draws
    them, which the log says (a K-draw null of one set)."""
    caplog.set_level(logging.INFO, logger="ih_sweep")
    scores = np.array([[0.9, 0.8, 0.3, 0.2, 0.1]])
    norms = np.array([[10.0, 10.0, 6.0, 7.0, 1.0]])
    assert {frozenset(norm_matched(scores, norms, 2, s, 2.0)) for s in range(10)} == \
        {frozenset({(0, 2), (0, 3)})}
    assert "layer 0 has just 2 heads within a factor 2" in caplog.text
    caplog.clear()
    norm_matched(scores, norms, 2, 0, 10.0)  # the 1 fits too: a real draw, nothing said
    assert "has just" not in caplog.text
