from __future__ import annotations

import math

import numpy as np
import pytest

from ih_sweep.report import statistics as st


def test_wilson_textbook_values():
    # Newcombe (1998), example: 81/263 -> 0.2553 to 0.3662
    lo, hi = st.wilson_interval(81, 263)
    assert lo == pytest.approx(0.2553, abs=5e-4) and hi == pytest.approx(0.3662, abs=5e-4)
    # 0/10 -> 0 to 0.2775 (Agresti & Coull 1998)
    lo, hi = st.wilson_interval(0, 10)
    assert lo == 0.0 and hi == pytest.approx(0.2775, abs=5e-4)
    assert all(math.isnan(v) for v in st.wilson_interval(0, 0))


def test_mcnemar_exact_known_values():
    # b=1, c=9: two-sided binomial p = 2 * (1 + 10) / 1024
    assert st.mcnemar_exact(1, 9) == pytest.approx(22 / 1024)
    assert st.mcnemar_exact(9, 1) == pytest.approx(22 / 1024)
    assert st.mcnemar_exact(5, 5) == 1.0
    assert st.mcnemar_exact(0, 0) == 1.0
    # b=0, c=6 -> 2 / 64
    assert st.mcnemar_exact(0, 6) == pytest.approx(0.03125)


def test_discordant_counts():
    assert st.discordant([1, 1, 0, 0, 1], [1, 0, 1, 0, 0]) == (2, 1)


def test_paired_bootstrap_ci_covers_and_is_deterministic():
    rng = np.random.default_rng(1)
    a = rng.random(500) < 0.8
    b = a.copy()
    b[:100] = False  # b is worse on 100 items where a may be right
    lo, hi = st.paired_bootstrap_ci(a, b)
    diff = a.mean() - b.mean()
    assert lo < diff < hi and lo > 0
    assert (lo, hi) == st.paired_bootstrap_ci(a, b)
    assert st.paired_bootstrap_ci(a, a) == (0.0, 0.0)


def test_holm_known_values():
    # p = [0.01, 0.04, 0.03, 0.005] -> sorted 0.005*4, 0.01*3, 0.03*2, 0.04*1 (monotone)
    got = st.holm([0.01, 0.04, 0.03, 0.005])
    assert got == pytest.approx([0.03, 0.06, 0.06, 0.02])
    got = st.holm([0.5, float("nan"), 0.01])
    assert got[0] == pytest.approx(0.5) and math.isnan(got[1]) and got[2] == pytest.approx(0.02)


def test_empirical_p():
    assert st.empirical_p(0.1, [0.5, 0.6, 0.7]) == pytest.approx(0.25)
    assert st.empirical_p(0.65, [0.5, 0.6, 0.7]) == pytest.approx(0.75)


def test_spearman():
    assert st.spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert st.spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)


@pytest.mark.parametrize("k,n,expected", [
    (0, 10, (0.0, 0.2775)), (10, 10, (0.7225, 1.0)),  # Agresti & Coull (1998), table 1
    (1, 1, (0.2065, 1.0)), (0, 1, (0.0, 0.7935)),  # n = 1: z^2/(n+z^2) = 0.7935
])
def test_wilson_edges_never_cross_the_point(k, n, expected):
    lo, hi = st.wilson_interval(k, n)
    assert (lo, hi) == pytest.approx(expected, abs=5e-4)
    assert lo <= k / n <= hi  # exactly, not within a rounding error: the plots' error bars
    assert 0.0 <= lo and hi <= 1.0


def test_no_discordant_pairs_and_one_pair():
    assert st.mcnemar_exact(*st.discordant([1, 0, 1], [1, 0, 1])) == 1.0
    assert all(math.isnan(v) for v in st.paired_bootstrap_ci([1], [0]))
    assert all(math.isnan(v) for v in st.paired_bootstrap_ci([], []))
    assert st.paired_bootstrap_ci([1, 1, 1], [0, 0, 0]) == (1.0, 1.0)


def test_holm_of_no_p_values():
    assert all(math.isnan(v) for v in st.holm([float("nan")] * 3))
    assert st.holm([]) == []


def test_spearman_textbook_value_and_constants():
    # Wikipedia, "Spearman's rank correlation coefficient", IQ vs hours of TV: -29/165
    iq = [106, 86, 100, 101, 99, 103, 97, 113, 112, 110]
    tv = [7, 0, 27, 50, 28, 29, 20, 12, 6, 17]
    assert st.spearman(iq, tv) == pytest.approx(-29 / 165)
    assert math.isnan(st.spearman([1, 1, 1], [1, 2, 3]))


def test_spearman_ci_covers_and_leaves_out_constant_resamples():
    rng = np.random.default_rng(0)
    x = np.arange(64.0)
    y = x + rng.normal(0, 20, 64)
    lo, hi = st.spearman_ci(x, y)
    assert lo < st.spearman(x, y) < hi and 0 < lo and hi < 1
    lo, hi = st.spearman_ci([1, 2, 3, 4], [1, 3, 2, 4])  # many resamples are constant
    assert -1 <= lo <= hi <= 1
    assert all(math.isnan(v) for v in st.spearman_ci([1, 2], [2, 1]))


def test_near_tie_range_known_values():
    # 10 items, 7 right; near-ties: 2 of the right ones, 1 of the wrong ones
    correct = [1, 1, 1, 1, 1, 1, 1, 0, 0, 0]
    tie = [1, 1, 0, 0, 0, 0, 0, 1, 0, 0]
    assert st.near_tie_range(correct, tie) == pytest.approx((0.5, 0.8))
    assert st.near_tie_range(correct, [0] * 10) == pytest.approx((0.7, 0.7))  # float32: none
    assert st.near_tie_range([1, 1], [1, 1]) == (0.0, 1.0)
    assert all(math.isnan(v) for v in st.near_tie_range([], []))


def test_near_tie_delta_range_inside_and_outside():
    # A wrong on its 2 near-ties, B right everywhere without near-ties: flipped, A = B
    a, ta = [0, 0, 1, 1, 1], [1, 1, 0, 0, 0]
    b, tb = [1] * 5, [0] * 5
    assert st.near_tie_delta_range(a, ta, b, tb) == (-0.4, 0.0, True)
    # one near-tie of the two wrong items: A can only reach -0.2
    assert st.near_tie_delta_range(a, [1, 0, 0, 0, 0], b, tb) == (-0.4, -0.2, False)
    # B's near-ties count too: B's right near-tie can drop B to A's level
    assert st.near_tie_delta_range([0, 1], [0, 0], [1, 1], [1, 0]) == (-0.5, 0.0, True)
    # no near-ties at all: nothing is inside, not even an equal pair
    assert st.near_tie_delta_range([1, 0], [0, 0], [1, 0], [0, 0]) == (0.0, 0.0, False)
    # equal accuracy with near-ties: the range straddles 0
    assert st.near_tie_delta_range([1, 0], [1, 1], [1, 0], [0, 0]) == (-0.5, 0.5, True)
    assert st.near_tie_delta_range([], [], [], [])[2] is False


def test_paired_bootstrap_ci_of_a_continuous_score():
    rng = np.random.default_rng(2)
    a = rng.normal(-1.0, 0.5, 400)
    b = a + 0.3 + rng.normal(0, 0.1, 400)  # b is 0.3 nats higher on every item, give or take
    lo, hi = st.paired_bootstrap_ci(a, b)
    assert lo < (a - b).mean() < hi and -0.32 < lo < hi < -0.28
