from __future__ import annotations

import math

import numpy as np
import pytest

from ih_sweep import statistics as st


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
