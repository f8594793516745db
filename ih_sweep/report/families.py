"""Multiple comparisons within one summary: the Holm families of its p-values, and what its
random null can and cannot decide (issue #30 item 2). Pure functions over the rows of
summary.csv; the columns are described in :mod:`ih_sweep.report.summarize`.

Families. Each kind of p-value of the summary is a family of its own, adjusted by Holm's
step-down method (:func:`ih_sweep.report.statistics.holm`, statsmodels' ``multipletests``)
apart from the other two (:data:`FAMILIES`):

- ``p_vs_none`` -> ``p_vs_none_holm``: every row with a p vs ``none`` but the ``random``
  draws;
- ``p_vs_low`` -> ``p_vs_low_holm``: every row with a p vs ``low`` (the ``high`` rows);
- ``p_vs_random`` -> ``p_vs_random_holm``: every row with a p within the random null
  (``high``, ``low`` and any other selection of heads).

A family extends over the whole summary, as ``p_vs_none_holm`` always has: every group
(tasks, models, arms, ablation methods, precisions), every N and condition; a reader who
scans the table for its smallest p makes every comparison in it. The ``random`` draws stay
out of every family (they are the null's sample, not hypotheses), and so do missing p-values
(no control at that N): they are not counted in the family's size.

The null's limits, per group and N of a row compared with ``random`` draws:

- its 2.5-97.5% band *at the ceiling* (both ends at 100% accuracy) or *at the floor* (both
  at 0%): the draws then lose nothing (or everything) on these items, so the null cannot
  separate a small loss from a large one (every row below the ceiling gets the smallest p its
  K allows) or place any row below it. A band that only reaches a bound at one end
  ([70, 100]) still spreads, and is not flagged;
- K too small: a null of K draws gives p >= 1 / (K + 1), so after Holm over the m p vs
  random of the family a row's adjusted p is at least ``min(1, max(m / (K_max + 1),
  1 / (K + 1)))`` (Holm multiplies the family's smallest p, itself at least
  1 / (K_max + 1) where K_max is the family's largest null, by m, and adjusted p-values never
  fall below their raw ones). Where that floor is above :data:`LEVEL`, no p vs random at this
  N can reach it, whatever the heads do.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from ih_sweep.report import statistics as st
from ih_sweep.report.cells import missing, n_text

FEW_SETS = 10  # a null of fewer distinct head sets than this is said to be few controls
FAMILIES = {"p_vs_none": "p_vs_none_holm", "p_vs_low": "p_vs_low_holm",
            "p_vs_random": "p_vs_random_holm"}  # raw column: its Holm-adjusted column
NAMES = {"p_vs_none": "p vs none", "p_vs_low": "p vs low",
         "p_vs_random": "p vs random"}  # how tables and sentences name each family
LEVEL = 0.05  # the significance level the null's limits are stated against


def family_members(df: pd.DataFrame, column: str) -> pd.Series:
    """Which rows of a summary belong to ``column``'s family (bool, aligned with ``df``):
    those with a p-value in it, the ``random`` draws excepted."""
    return df[column].notna() & (df["condition"] != "random")


def family_sizes(df: pd.DataFrame) -> dict[str, int]:
    """How many p-values each family of :data:`FAMILIES` adjusts over in the summary
    ``df`` ({raw column: m})."""
    return {raw: int(family_members(df, raw).sum()) for raw in FAMILIES}


def add_holm(df: pd.DataFrame) -> pd.DataFrame:
    """``df`` (summary rows with the raw p-value columns) with each family's Holm-adjusted
    column of :data:`FAMILIES`: adjusted over its own members only, NaN elsewhere."""
    out = df.copy()
    for raw, adjusted in FAMILIES.items():
        p = out[raw].astype(float).where(family_members(out, raw))
        out[adjusted] = st.holm(p.to_numpy())
    return out


def band_at(low: float, high: float) -> str | None:
    """``"ceiling"`` when a null's band [low, high] (accuracies, 0-1) lies at 100% at both
    ends, ``"floor"`` when at 0% at both ends, None otherwise (a missing band included)."""
    if missing(low) or missing(high):
        return None
    if low >= 1.0:
        return "ceiling"
    if high <= 0.0:
        return "floor"
    return None


def add_null_limits(df: pd.DataFrame) -> pd.DataFrame:
    """``df`` with ``null_band_at`` (:func:`band_at` of every row compared with random
    draws) and ``p_vs_random_holm_min`` (the smallest ``p_vs_random_holm`` a member of the
    p vs random family could have had, given the family's size m and its nulls' sizes K:
    ``min(1, max(m / (K_max + 1), 1 / (K + 1)))``; NaN outside the family)."""
    out = df.copy()
    out["null_band_at"] = [band_at(lo, hi) if not missing(k) else None for lo, hi, k in
                           zip(out["random_acc_p2_5"], out["random_acc_p97_5"],
                               out["n_random"])]
    members = family_members(out, "p_vs_random")
    floor = pd.Series(np.nan, index=out.index)
    if members.any():
        k = out.loc[members, "n_random"].astype(float)
        m, k_max = int(members.sum()), float(k.max())
        floor[members] = np.minimum(1.0, np.maximum(m / (k_max + 1), 1 / (k + 1)))
    out["p_vs_random_holm_min"] = floor
    return out


def _plural(count: int, word: str) -> str:
    return f"{count} {word}" + ("" if count == 1 else "s")


def limit_sentences(row: pd.Series, m: int, k_max: int) -> list[str]:
    """What the random null at one row's group and N cannot decide, in words (none where it
    can): its band at the ceiling or floor, draws of fewer than :data:`FEW_SETS` distinct
    head sets (summary.csv ``n_random_sets``), and a floor of the Holm-adjusted p above
    :data:`LEVEL`. ``row``: a summary row carrying the null (``n_random``, the band,
    ``null_band_at``, ``p_vs_random_holm_min``); ``m``: the p vs random family's size;
    ``k_max``: its largest K."""
    n, k = n_text(row["n_heads"], row["n_heads_share"]), int(row["n_random"])
    out = []
    if isinstance(row["null_band_at"], str):
        lo, hi = 100 * row["random_acc_p2_5"], 100 * row["random_acc_p97_5"]
        why = ("the draws lose nothing, so it cannot tell a small loss from a large one"
               if row["null_band_at"] == "ceiling" else
               "the draws lose everything, so no row can fall below them")
        out.append(f"the random null cannot separate at N={n}: its K={k} draws' band is "
                   f"[{lo:g}, {hi:g}] (at the {row['null_band_at']}: {why})")
    sets = row.get("n_random_sets")
    if not missing(sets) and int(sets) < FEW_SETS:
        out.append(f"at N={n} the K={k} draws are only {_plural(int(sets), 'distinct head set')}"
                   f" (a matched control with few candidates draws the same heads again), so "
                   f"p vs random compares the row with {_plural(int(sets), 'control set')}, "
                   f"not with a distribution of them: its 1/(K+1) floor is set by K, not by "
                   f"the heads")
    floor = row["p_vs_random_holm_min"]
    if not missing(floor) and floor > LEVEL:
        largest = f" (the family's largest null has K={k_max} draws)" if k_max != k and \
            m / (k_max + 1) >= 1 / (k + 1) else ""
        out.append(f"at N={n}, with K={k} draws the smallest p vs random is 1/{k + 1} = "
                   f"{1 / (k + 1):.2g}; Holm over {_plural(m, 'comparison')} cannot go below "
                   f"{floor:.2g}{largest}, so no p vs random (Holm) at this N can reach "
                   f"{LEVEL:g}")
    return out


def null_limits(df: pd.DataFrame) -> dict[str, list[str]]:
    """Per group of the summary ``df`` (rows with :func:`add_null_limits`' columns), the
    sentences of :func:`limit_sentences` for each N whose null has a limit, in the order
    of N; groups without any are left out."""
    members = family_members(df, "p_vs_random")
    m = int(members.sum())
    k_max = int(df.loc[members, "n_random"].max()) if m else 0
    carried = df[df["n_random"].notna() & ~df["condition"].isin(["random", "none"])]
    out: dict[str, list[str]] = {}
    for group, part in carried.groupby("group", sort=False):
        sentences = []
        for _, at_n in part.sort_values("n_heads", kind="stable").groupby("n_heads",
                                                                            sort=False):
            # every row at an N shares the null; the floor is on the rows with a p
            with_p = at_n[at_n["p_vs_random_holm_min"].notna()]
            sentences += limit_sentences((with_p if len(with_p) else at_n).iloc[0], m, k_max)
        if sentences:
            out[str(group)] = sentences
    return out


def holm_legend(df: pd.DataFrame) -> str:
    """The legend's item on the adjusted p-values of the summary ``df``: which family each
    adjustment runs over, with its size."""
    sizes = family_sizes(df)
    over = "; ".join(f"**{NAMES[raw]} (Holm)** over the {sizes[raw]} {NAMES[raw]} of this "
                     f"summary" if sizes[raw] else f"no {NAMES[raw]} here"
                     for raw in FAMILIES)
    return ("**(Holm)**: Holm's step-down adjustment (Holm 1979), shown beside the raw p; "
            "each kind of p is a family of its own, adjusted apart from the others across "
            "this whole summary (every group, N and condition; the random draws are the "
            f"null's sample, not hypotheses, and stay out): {over}.")


LIMITS_LEGEND = (
    "**Limits of the random null** (summary.csv `null_band_at`, `p_vs_random_holm_min`): "
    "at an N where the draws' 2.5-97.5% band lies at 100% at both ends (the ceiling) or at "
    "0% (the floor), the null cannot separate: the draws lose nothing (or everything) on "
    "these items. With K draws the smallest p vs random is 1 / (K + 1), and after Holm over "
    "the family's m p vs random no adjusted p can go below min(1, max(m / (K_max + 1), "
    f"1 / (K + 1))) (K_max: the family's largest null); where that is above {LEVEL:g}, "
    "the summary says so: more draws are needed before the null can decide. Where the K "
    f"draws are fewer than {FEW_SETS} distinct head sets (a norm-matched control in a layer "
    "with few candidates), it says p vs random compares with those few sets, not with a "
    "distribution.")
