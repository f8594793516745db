"""The sweep's tables beside summary.csv, computed from the jobs: robustness.csv (families of
groups that differ only in how heads are ablated), strata.csv (accuracy per difficulty
stratum of the items) and icl_curve.csv (accuracy by answered examples before the question).
Their columns are described in :mod:`ih_sweep.report.summarize`."""

from __future__ import annotations

import numpy as np
import pandas as pd

from ih_sweep.report import statistics as st
from ih_sweep.report.discover import FinishedJob
from ih_sweep.report.groups import Group, ablation_families, cell_groups, share
from ih_sweep.report.rows import CONTINUOUS, as_bool, has_column, paired_effect

ROBUSTNESS_COLUMNS = ["family", "n_heads", "n_heads_share", "ablation", "n_items", "accuracy_high",
                      "accuracy_low", "accuracy_none",
                      *(f"delta_high_vs_{c}{s}" for c in ("none", "low")
                        for s in ("", "_ci_low", "_ci_high")),
                      "p_high_vs_none", "p_high_vs_low"]
STRATA = {  # results.csv column: (what it is, for tables and figures; bucket the top at 5+)
    "support_distance": ("statements back to the supporting fact", True),
    "recency_correct": ("the most recent location of anyone is the answer", False),
    "mentions": ("mentions of the asked person before the question", True),
    "question_position": ("index of the question in its story, 0-based", True),
}
STRATA_COLUMNS = ["group", "n_heads", "n_heads_share", "condition", "n_draws", "stratum",
                  "value", "order", "n_items", "n_correct", "accuracy", "ci_low", "ci_high",
                  *CONTINUOUS]
CONDITION_ORDER = {"none": 0, "high": 1, "low": 2, "random": 3}  # how tables sort conditions


def robustness_table(jobs: list[FinishedJob], groups: list[Group] | None = None
                     ) -> pd.DataFrame:
    """robustness.csv (:data:`ROBUSTNESS_COLUMNS`): per family of groups that differ only
    in how heads are ablated (:func:`ih_sweep.report.groups.ablation_families`), per N and
    ablation: the ``high`` - ``none`` and ``high`` - ``low`` accuracy effects with paired
    bootstrap 95% CIs and exact McNemar p (:func:`ih_sweep.report.rows.paired_effect`, as in
    summary.csv). Empty when the sweep has no such family. ``groups``:
    :func:`ih_sweep.report.groups.cell_groups` of ``jobs`` when already computed."""
    rows = []
    groups = groups if groups is not None else cell_groups(jobs)[0]
    for family, members in ablation_families(groups):
        for label, g in members:
            none = g.cells.get((0, "none", 0))
            for n in sorted({n for (n, c, _) in g.cells if c == "high"}):
                high, low = g.cells[(n, "high", 0)], g.cells.get((n, "low", 0))
                row = {"family": family, "n_heads": n, "n_heads_share": share(high),
                       "ablation": label,
                       "n_items": len(high.results),
                       "accuracy_high": float(high.results["correct"].mean())}
                for name, other in (("none", none), ("low", low)):
                    if other is None:
                        continue
                    row[f"accuracy_{name}"] = float(other.results["correct"].mean())
                    row[f"delta_high_vs_{name}"], row[f"delta_high_vs_{name}_ci_low"], \
                        row[f"delta_high_vs_{name}_ci_high"], row[f"p_high_vs_{name}"] = \
                        paired_effect(high.results, other.results)
                rows.append(row)
    df = pd.DataFrame(rows)
    for col in ROBUSTNESS_COLUMNS:
        if col not in df.columns:
            df[col] = np.nan
    return df[ROBUSTNESS_COLUMNS]


def _bucket(values: pd.Series, top: bool) -> tuple[pd.Series, pd.Series]:
    """(label, sort order) per item: integers with 5 and more pooled as ``5+`` (``top``),
    or booleans as no/yes; missing values stay missing."""
    if not top:
        flag = pd.Series(as_bool(values), index=values.index).where(values.notna())
        order = flag.map({False: 0, True: 1})
        return order.map({0: "no", 1: "yes"}), order
    v = pd.to_numeric(values, errors="coerce")
    order = v.clip(upper=5)
    label = order.map(lambda x: np.nan if pd.isna(x) else
                      ("5+" if x >= 5 else str(int(x))))
    return label, order


def strata_table(jobs: list[FinishedJob], groups: list[Group] | None = None) -> pd.DataFrame:
    """strata.csv (:data:`STRATA_COLUMNS`): accuracy (Wilson 95% CI) and the means of the
    continuous metrics per stratum of :data:`STRATA`, per group, condition and N: one row
    per (group, condition, N, stratum, value); the unablated model once per group; the
    random draws of an N pooled (``n_draws``). Strata a job's results.csv lacks are left
    out; empty when none has any. ``groups``: :func:`ih_sweep.report.groups.cell_groups` of
    ``jobs`` when already computed."""
    rows = []
    groups = groups if groups is not None else cell_groups(jobs)[0]
    for group in groups:
        arms: dict[tuple[int, str], list[FinishedJob]] = {}
        for (n, cond, _), job in group.cells.items():
            arms.setdefault((n, cond), []).append(job)
        for (n, cond), arm in sorted(arms.items(), key=lambda kv: (
                CONDITION_ORDER.get(kv[0][1], 9), kv[0][0])):
            res = pd.concat([j.results for j in arm], ignore_index=True)
            for column, (_, top) in STRATA.items():
                if not has_column(res, column):
                    continue
                label, order = _bucket(res[column], top)
                frame = res.assign(value=label, order=order).dropna(subset=["value"])
                for (value, o), part in frame.groupby(["value", "order"], sort=False):
                    k, total = int(part["correct"].sum()), len(part)
                    lo, hi = st.wilson_interval(k, total)
                    row = {"group": group.name, "n_heads": n,
                           "n_heads_share": share(arm[0]), "condition": cond,
                           "n_draws": len(arm), "stratum": column, "value": value,
                           "order": int(o), "n_items": total, "n_correct": k,
                           "accuracy": k / total, "ci_low": lo, "ci_high": hi}
                    for metric in CONTINUOUS:
                        row[metric] = float(pd.to_numeric(part[metric], errors="coerce")
                                            .mean()) if metric in part else np.nan
                    rows.append(row)
    if not rows:
        return pd.DataFrame(columns=STRATA_COLUMNS)
    return pd.DataFrame(rows, columns=STRATA_COLUMNS).sort_values(
        ["group", "stratum", "condition", "n_heads", "order"], key=_sort_key,
        kind="stable").reset_index(drop=True)


def _sort_key(col: pd.Series) -> pd.Series:
    if col.name == "condition":
        return col.map(lambda c: CONDITION_ORDER.get(c, 9))
    if col.name in ("group", "stratum"):  # the order they came in
        return col.map({v: i for i, v in enumerate(dict.fromkeys(col))})
    return col


def icl_curve(jobs: list[FinishedJob]) -> pd.DataFrame:
    """icl_curve.csv: accuracy by number of answered examples before the question
    (``examples_before``, ``accuracy``, ``n_items``, ``n_heads``, ``condition``,
    ``n_heads_share``, ``control_seed``), one row per job and count, for the jobs of scope
    ``all``; empty without one."""
    parts = []
    for job in jobs:
        if job.record.eval["scope"] != "all":
            continue
        g = job.results.groupby("examples_before")["correct"].agg(["mean", "size"])
        g = g.reset_index().rename(columns={"mean": "accuracy", "size": "n_items"})
        g["n_heads"], g["condition"] = job.record.n_heads, job.record.condition
        g["n_heads_share"] = share(job)
        g["control_seed"] = job.record.control_seed
        parts.append(g)
    return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame()
