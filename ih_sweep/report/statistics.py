"""Statistics for paired per-item outcomes, from the field's libraries (scipy, statsmodels).

Each function names the library call it wraps and the source of the method; only
:func:`empirical_p` is this project's own (no library has it). Pure functions, no I/O.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

NAN = float("nan")


def wilson_interval(k: int, n: int, level: float = 0.95) -> tuple[float, float]:
    """Wilson score interval of the proportion ``k / n`` (Wilson 1927), from
    ``statsmodels.stats.proportion.proportion_confint(method="wilson")``.

    Returns (low, high) as fractions; (nan, nan) when ``n`` is 0. The bounds are clipped so
    that ``low <= k / n <= high`` exactly: at 0 of n and n of n the closed form can land a
    rounding error on the wrong side of the point."""
    if n <= 0:
        return (NAN, NAN)
    from statsmodels.stats.proportion import proportion_confint

    low, high = proportion_confint(k, n, alpha=1 - level, method="wilson")
    p = k / n
    return (float(min(max(low, 0.0), p)), float(max(min(high, 1.0), p)))


def discordant(a: Sequence[bool], b: Sequence[bool]) -> tuple[int, int]:
    """(#items A right and B wrong, #items A wrong and B right) of paired outcomes."""
    x = np.asarray(a, dtype=bool)
    y = np.asarray(b, dtype=bool)
    return int((x & ~y).sum()), int((~x & y).sum())


def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value from the discordant counts ``b`` and ``c`` (McNemar
    1947; the exact binomial form), from ``statsmodels.stats.contingency_tables.mcnemar(
    exact=True)``. 1.0 when there are no discordant pairs."""
    from statsmodels.stats.contingency_tables import mcnemar

    return float(mcnemar([[0, b], [c, 0]], exact=True).pvalue)


def paired_bootstrap_ci(a: Sequence[float], b: Sequence[float], n_boot: int = 2000,
                        seed: int = 0, level: float = 0.95) -> tuple[float, float]:
    """Bootstrap interval of ``mean(a) - mean(b)`` resampling items as pairs, from
    ``scipy.stats.bootstrap(paired=True, method="percentile")`` (Efron & Tibshirani 1993).
    ``a``, ``b``: one value per item, aligned (outcomes as 0/1, or a continuous score such
    as a log-probability); the interval is in the values' unit.

    Percentile, not BCa: outcomes here are often all correct in both jobs (a ceiling), and
    BCa's acceleration is then undefined (scipy returns nan); the percentile interval of a
    constant difference is that constant. (nan, nan) with fewer than 2 pairs."""
    x = np.asarray(a, dtype=float)
    y = np.asarray(b, dtype=float)
    if len(x) < 2:
        return (NAN, NAN)
    from scipy.stats import bootstrap

    def mean_difference(u: np.ndarray, v: np.ndarray, axis: int = -1) -> np.ndarray:
        return u.mean(axis=axis) - v.mean(axis=axis)

    ci = bootstrap((x, y), mean_difference, paired=True, vectorized=True, n_resamples=n_boot,
                   confidence_level=level, method="percentile",
                   rng=np.random.default_rng(seed)).confidence_interval
    return (float(ci.low), float(ci.high))


def near_tie_range(correct: Sequence[bool], near_tie: Sequence[bool]) -> tuple[float, float]:
    """The accuracy's range if every near-tie fell the other way: ``(acc - #(near-tie and
    correct) / n, acc + #(near-tie and wrong) / n)``. A near-tie is an item whose greedy
    choice was decided by a top-1 minus top-2 logit gap below the evaluator's threshold
    (results.csv ``near_tie``), so another numeric precision could flip it. This project's
    own (issue #21 item 4); (nan, nan) for no items."""
    c = np.asarray(correct, dtype=bool)
    t = np.asarray(near_tie, dtype=bool)
    if len(c) == 0:
        return (NAN, NAN)
    acc = c.mean()
    return (float(acc - (t & c).sum() / len(c)), float(acc + (t & ~c).sum() / len(c)))


def near_tie_delta_range(correct_a: Sequence[bool], tie_a: Sequence[bool],
                         correct_b: Sequence[bool], tie_b: Sequence[bool]
                         ) -> tuple[float, float, bool]:
    """Paired items (aligned arrays) of jobs A and B: the range of ``acc(A) - acc(B)`` if
    every near-tie of either job fell the other way (each job's :func:`near_tie_range`
    combined: A's low minus B's high, A's high minus B's low), and whether the observed
    difference lies inside the near-tie floor, i.e. near-ties alone could produce it (the
    range reaches 0 and is not empty: without near-ties nothing is inside). This project's
    own (issue #21 item 4); (nan, nan, False) for no items."""
    ca, ta = np.asarray(correct_a, dtype=bool), np.asarray(tie_a, dtype=bool)
    cb, tb = np.asarray(correct_b, dtype=bool), np.asarray(tie_b, dtype=bool)
    n = len(ca)
    if n == 0:
        return (NAN, NAN, False)
    # in item counts, so that a range ending exactly at 0 is not lost to rounding
    low = int(ca.sum() - (ta & ca).sum()) - int(cb.sum() + (tb & ~cb).sum())
    high = int(ca.sum() + (ta & ~ca).sum()) - int(cb.sum() - (tb & cb).sum())
    return (low / n, high / n, bool(low < high and low <= 0 <= high))


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p-values (Holm 1979), from
    ``statsmodels.stats.multitest.multipletests(method="holm")``. NaN entries are left out
    of the family and stay NaN."""
    p = np.asarray(pvalues, dtype=float)
    out = np.full_like(p, np.nan)
    valid = ~np.isnan(p)
    if valid.any():
        from statsmodels.stats.multitest import multipletests

        out[valid] = multipletests(p[valid], method="holm")[1]
    return out.tolist()


def empirical_p(observed: float, null: Sequence[float]) -> float:
    """One-sided empirical p that a value this low (or lower) arises under the null draws:
    ``(1 + #{null <= observed}) / (1 + #null)``, which never gives 0 for a finite null
    (Davison & Hinkley 1997, eq. 4.11; Phipson & Smyth 2010). No library computes it.
    "At least as extreme" is one-sided, a null draw at or below the observed value (ties
    count against the observation): the question is whether ablating the heads lowers
    accuracy more than ablating random heads does; a condition that hurts less than every
    draw gets p = 1. nan without null draws or with a nan observation."""
    draws = np.asarray(null, dtype=float)
    if not len(draws) or np.isnan(observed):
        return NAN
    return float((1 + (draws <= observed).sum()) / (1 + len(draws)))


def null_band(null: Sequence[float], low: float = 2.5, high: float = 97.5
              ) -> tuple[float, float]:
    """The ``low``-``high`` percentile band of null draws, from ``numpy.percentile``
    (linear interpolation between order statistics, Hyndman & Fan 1996 definition 7, as
    ``pandas.Series.quantile``); (nan, nan) without draws."""
    draws = np.asarray(null, dtype=float)
    if not len(draws):
        return (NAN, NAN)
    a, b = np.percentile(draws, [low, high])
    return (float(a), float(b))


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman's rank correlation (average ranks for ties), from
    ``scipy.stats.spearmanr``; nan when either side is constant."""
    from scipy.stats import spearmanr

    x = np.asarray(x, dtype=float)
    y = np.asarray(y, dtype=float)
    if len(x) < 2 or np.all(x == x[0]) or np.all(y == y[0]):
        return NAN
    return float(spearmanr(x, y).statistic)


def spearman_ci(x: Sequence[float], y: Sequence[float], n_boot: int = 1000, seed: int = 0,
                level: float = 0.95) -> tuple[float, float]:
    """Bootstrap interval of Spearman's correlation, resampling (x, y) pairs, from
    ``scipy.stats.bootstrap(paired=True, method="percentile")``; resamples in which either
    side is constant (no correlation defined) are left out. (nan, nan) with < 3 pairs."""
    x = np.asarray(x, dtype=float)
    y = np.asarray(y, dtype=float)
    if len(x) < 3 or np.all(x == x[0]) or np.all(y == y[0]):
        return (NAN, NAN)
    import warnings

    from scipy.stats import bootstrap

    with warnings.catch_warnings():  # constant resamples: scipy warns, spearman gives nan
        warnings.simplefilter("ignore")
        draws = bootstrap((x, y), spearman, paired=True, vectorized=False,
                          n_resamples=n_boot, confidence_level=level, method="percentile",
                          rng=np.random.default_rng(seed)).bootstrap_distribution
    if np.isnan(draws).all():
        return (NAN, NAN)
    low, high = np.nanpercentile(draws, [50 * (1 - level), 50 * (1 + level)])
    return (float(low), float(high))
