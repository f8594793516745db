"""Statistics for paired per-item outcomes: pure functions, no I/O."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np


def wilson_interval(k: int, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion k/n (95% by default)."""
    if n <= 0:
        return (float("nan"), float("nan"))
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value from the discordant counts b (only A right) and c
    (only B right): a binomial test of b against Binomial(b + c, 1/2)."""
    n = b + c
    if n == 0:
        return 1.0
    k = min(b, c)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n
    return min(1.0, 2 * tail)


def discordant(a: Sequence[bool], b: Sequence[bool]) -> tuple[int, int]:
    """(#items A right and B wrong, #items A wrong and B right)."""
    x = np.asarray(a, dtype=bool)
    y = np.asarray(b, dtype=bool)
    return int((x & ~y).sum()), int((~x & y).sum())


def paired_bootstrap_ci(a: Sequence[bool], b: Sequence[bool], n_boot: int = 2000,
                        seed: int = 0, level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of mean(a) - mean(b), resampling items (pairs) together."""
    x = np.asarray(a, dtype=float) - np.asarray(b, dtype=float)
    if len(x) == 0:
        return (float("nan"), float("nan"))
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(x), size=(n_boot, len(x)))
    means = x[idx].mean(1)
    lo, hi = np.quantile(means, [(1 - level) / 2, 1 - (1 - level) / 2])
    return (float(lo), float(hi))


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm-Bonferroni adjusted p-values (NaN entries are left out and stay NaN)."""
    p = np.asarray(pvalues, dtype=float)
    out = np.full_like(p, np.nan)
    valid = np.flatnonzero(~np.isnan(p))
    m = len(valid)
    order = valid[np.argsort(p[valid], kind="stable")]
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p[i]))
        out[i] = running
    return out.tolist()


def empirical_p(observed: float, null: Sequence[float]) -> float:
    """One-sided empirical p that an effect this negative (or more) arises under the null:
    (1 + #null <= observed) / (1 + #null)."""
    null = np.asarray(null, dtype=float)
    return float((1 + (null <= observed).sum()) / (1 + len(null)))


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman rank correlation (average ranks for ties)."""
    import pandas as pd

    rx = pd.Series(x, dtype=float).rank()
    ry = pd.Series(y, dtype=float).rank()
    return float(np.corrcoef(rx, ry)[0, 1])
