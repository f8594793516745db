"""The ranking's uncertainty (ih_sweep.heads.stability) on constructed cases with known
answers."""

from itertools import product

import numpy as np
import pytest

from ih_sweep.heads import stability as st
from ih_sweep.heads.selection import select_heads


def top(n):
    return lambda m: select_heads(m, "high", n)


def test_standard_error_is_std_over_sqrt_n():
    samples = np.array([[[1.0, 0.0]], [[3.0, 0.0]], [[5.0, 0.0]]])  # [3, 1, 2]
    se = st.standard_error(samples)
    assert se.shape == (1, 2)
    assert se[0, 0] == pytest.approx(2.0 / np.sqrt(3))  # std (ddof=1) of 1, 3, 5 is 2
    assert se[0, 1] == 0.0
    assert np.isnan(st.standard_error(samples[:1])).all()


def test_every_resample_of_three_prompts_gives_the_known_mean_overlap():
    # head 0 scores 1 on each prompt; head 1 scores 2.5 on prompt 2 only: on all prompts
    # head 0 leads (1 > 0.83); a resample with prompt 2 at least twice puts head 1 first
    # (2.5 * 2 / 3 > 1). Of the 27 equally likely resamples 7 do (1 + 3 * 2): 20 / 27.
    samples = np.array([[[1.0, 0.0]], [[1.0, 0.0]], [[1.0, 2.5]]])
    every = np.array(list(product(range(3), repeat=3)))
    assert st.resampled_overlap(samples, top(1), every) == pytest.approx(20 / 27)
    assert st.resampled_overlap(samples, top(2), every) == 1.0  # both heads: always


def test_a_clear_ranking_is_stable_and_noise_is_not():
    rng = np.random.default_rng(0)
    clear = rng.normal(0, 0.01, size=(25, 4, 16))
    clear[:, 0, :4] += 1.0  # four heads far above the rest on every prompt
    assert st.top_n_stability(clear, top(4)) == 1.0
    noise = rng.normal(0, 1.0, size=(25, 4, 16))
    value = st.top_n_stability(noise, top(4))
    assert value < st.UNSTABLE_BELOW
    assert st.unstable(value) and not st.unstable(1.0) and not st.unstable(None)


def test_the_bootstrap_is_seeded():
    noise = np.random.default_rng(1).normal(size=(10, 2, 8))
    assert st.top_n_stability(noise, top(3), 50, 7) == st.top_n_stability(noise, top(3), 50, 7)
    assert st.bootstrap_indices(5, 4, 0).shape == (4, 5)


def test_pairwise_overlap_across_seeds():
    a, b, c = [(0, 0), (0, 1)], [(0, 0), (1, 1)], [(0, 0), (0, 1)]
    assert st.pairwise_overlap([a, b, c]) == pytest.approx((0.5 + 1.0 + 0.5) / 3)
    assert st.pairwise_overlap([a]) is None
    assert st.overlap([], a) == 1.0
