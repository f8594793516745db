"""How much a ranking of heads rests on its samples: each head's standard error and the
top-N set's stability under bootstrap resamples of the samples the score averages over.

A head score here is a mean over samples: the FV score (AIE, :mod:`.function_vectors`)
over its corrupted prompts, the prefix score (:mod:`.scoring`) over its random
sequences (every sequence has as many query positions, so the prefix score is the plain
mean of the per-sequence scores). ``samples`` is then [S, layers, heads] and the score
is ``samples.mean(0)``.

- Standard error (per head): the sample standard deviation over the S samples (ddof=1)
  over sqrt(S), in the score's units; NaN for S < 2.
- Top-N stability (per set): resample the S samples with replacement (the percentile
  bootstrap's resampling, Efron & Tibshirani 1993, "An Introduction to the Bootstrap",
  ch. 6), recompute the scores, choose the heads again with the job's own rule
  (``choose``: e.g. :func:`ih_sweep.heads.selection.select_heads` for its condition and
  N) and take the overlap |A n B| / N of the resample's set B with the set A chosen on
  all samples; the stability is the mean overlap over :data:`RESAMPLES` resamples drawn
  from ``numpy.random.default_rng(seed)``. 1 where every resample chooses the same set;
  a set drawn at random among H heads would score about N / H.
- Across seeds (``fv_seed``): the mean pairwise overlap |A_i n A_j| / N of the sets the
  runs chose (:func:`pairwise_overlap`).

A set whose stability is below :data:`UNSTABLE_BELOW` is called unstable (the summary
flags it): fewer than 4 in 5 of its heads come back on a resample of the prompts.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from itertools import combinations

import numpy as np

RESAMPLES = 200  # bootstrap resamples of the samples
UNSTABLE_BELOW = 0.8  # mean overlap under which a top-N set is flagged unstable

Head = tuple[int, int]


def standard_error(samples: np.ndarray) -> np.ndarray:
    """[layers, heads] standard error of the mean over ``samples`` [S, layers, heads]
    (std with ddof=1 over sqrt(S)); NaN everywhere for S < 2."""
    samples = np.asarray(samples, dtype=np.float64)
    if samples.shape[0] < 2:
        return np.full(samples.shape[1:], np.nan)
    return samples.std(0, ddof=1) / np.sqrt(samples.shape[0])


def bootstrap_indices(n_samples: int, resamples: int = RESAMPLES, seed: int = 0
                      ) -> np.ndarray:
    """[resamples, n_samples] indices drawn with replacement from
    ``numpy.random.default_rng(seed)``."""
    return np.random.default_rng(seed).integers(0, n_samples, size=(resamples, n_samples))


def overlap(a: Collection[Head], b: Collection[Head]) -> float:
    """|a n b| / |a| (1.0 for an empty ``a``)."""
    a = {(int(la), int(h)) for la, h in a}
    if not a:
        return 1.0
    return len(a & {(int(la), int(h)) for la, h in b}) / len(a)


def resampled_overlap(samples: np.ndarray, choose: Callable[[np.ndarray], Sequence[Head]],
                      indices: np.ndarray) -> float:
    """Mean over the rows of ``indices`` [R, S] of the overlap of ``choose`` on the
    resampled mean (``samples[row].mean(0)``) with ``choose`` on ``samples.mean(0)``;
    ``samples``: [S, layers, heads]."""
    samples = np.asarray(samples, dtype=np.float64)
    chosen = choose(samples.mean(0))
    return float(np.mean([overlap(chosen, choose(samples[row].mean(0))) for row in indices]))


def top_n_stability(samples: np.ndarray, choose: Callable[[np.ndarray], Sequence[Head]],
                    resamples: int = RESAMPLES, seed: int = 0) -> float:
    """The bootstrap stability of ``choose``'s set (module docstring): mean overlap over
    ``resamples`` seeded resamples of the S samples of ``samples`` [S, layers, heads]."""
    samples = np.asarray(samples)
    return resampled_overlap(samples, choose,
                             bootstrap_indices(samples.shape[0], resamples, seed))


def pairwise_overlap(sets: Sequence[Collection[Head]]) -> float | None:
    """Mean of |A_i n A_j| / |A_i| over the pairs of ``sets`` (runs of one arm with
    different seeds); None for fewer than two sets."""
    pairs = list(combinations(sets, 2))
    if not pairs:
        return None
    return float(np.mean([overlap(a, b) for a, b in pairs]))


def unstable(stability: float | None) -> bool:
    """Whether a stability is below :data:`UNSTABLE_BELOW` (None, unknown: not flagged)."""
    return stability is not None and bool(np.isfinite(stability)) and \
        stability < UNSTABLE_BELOW
