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


def paired_bootstrap_ci(a: Sequence[bool], b: Sequence[bool], n_boot: int = 2000,
                        seed: int = 0, level: float = 0.95) -> tuple[float, float]:
    """Bootstrap interval of ``mean(a) - mean(b)`` resampling items as pairs, from
    ``scipy.stats.bootstrap(paired=True, method="percentile")`` (Efron & Tibshirani 1993).

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
    (Davison & Hinkley 1997, eq. 4.11; Phipson & Smyth 2010). No library computes it."""
    draws = np.asarray(null, dtype=float)
    return float((1 + (draws <= observed).sum()) / (1 + len(draws)))


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
