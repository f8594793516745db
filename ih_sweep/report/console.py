"""What a sweep prints when it ends: per group, the N x condition table the README shows
(accuracy in % with its 95% Wilson interval, one row per N, one column per condition), one
line per ablated condition and N with its difference from the unablated model and the
exact McNemar p (raw and Holm-adjusted), the limits of the random null and the
comparisons near-ties alone could produce; then where summary.md (the long table, the
near-tie floor, the continuous metrics, the mechanism check, the head sets) and the
figures are.

The table's columns (:data:`COLUMNS`): ``high`` (the
top-N, "(induction)" where they are ranked by prefix score alone), ``low`` (the
layer-matched lowest-N), ``random`` (one draw: its accuracy and interval; K draws: the
2.5th-97.5th percentile band of their accuracies and K) and ``none`` (the unablated
model, the same in every row)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

from ih_sweep.report.cells import heads_phrase, interval, missing, n_text, p_value, percent
from ih_sweep.report.statistics import null_band

COLUMNS = ("high", "low", "random", "none")  # the table's columns, in this order


def column_name(condition: str, row: Any) -> str:
    """The console table's header for ``condition`` in the group of summary row ``row``."""
    if condition == "high":
        phrase = heads_phrase(row)
        return ("top-N (induction) ablated" if phrase == "top-N by prefix"
                else f"{phrase} ablated")
    if condition == "low":
        return "layer-matched lowest-N ablated"
    if condition == "random":
        norm = "control.match=layer_norm" in str(getattr(row, "group", ""))
        return f"{'layer- and norm-matched' if norm else 'layer-matched'} random-N ablated"
    return "unablated"


def _cell(rows: pd.DataFrame) -> str:
    """``accuracy [CI]`` of one job; for several random draws the band of their
    accuracies, ``[p2.5, p97.5] (K draws)``."""
    if len(rows) == 1:
        r = rows.iloc[0]
        return f"{percent(r.accuracy)} {interval(r.ci_low, r.ci_high)}"
    low, high = null_band(rows.accuracy)  # as summary.csv's random_acc_p2_5 / _p97_5
    return f"{interval(low, high)} ({len(rows)} draws)"


def condition_table(g: pd.DataFrame) -> pd.DataFrame:
    """One group's summary rows ``g`` as the README's table: a row per N (in order), a
    column per condition present (strings; empty where a condition has no job at that
    N). A group with only the unablated job has one row with N empty."""
    conditions = [c for c in COLUMNS if c in set(g.condition)]
    conditions += [c for c in dict.fromkeys(g.condition) if c not in conditions]
    ablated_rows = g[g.condition != "none"]
    first = (ablated_rows if len(ablated_rows) else g).iloc[0]  # names the ranking
    none = g[g.condition == "none"].head(1)
    ablated = g[g.condition != "none"]
    ns = sorted(set(ablated.n_heads)) or [None]
    out = []
    for n in ns:
        at_n = ablated[ablated.n_heads == n]
        share = at_n.n_heads_share.iloc[0] if len(at_n) and "n_heads_share" in at_n else None
        row = {"N": "" if n is None else n_text(n, share)}
        for c in conditions:
            jobs = none if c == "none" else at_n[at_n.condition == c]
            row[column_name(c, first)] = _cell(jobs) if len(jobs) else ""
        out.append(row)
    return pd.DataFrame(out, columns=["N"] + [column_name(c, first) for c in conditions])


def comparison_lines(g: pd.DataFrame) -> list[str]:
    """One line per ablated job (``high``, ``low``, and a single ``random`` draw) of the
    group ``g``: its difference from the unablated model in points with the paired
    bootstrap's 95% CI, the exact McNemar p and its Holm adjustment; for ``high`` also
    against ``low`` and the random null where the summary has them."""
    lines = []
    jobs = g[g.condition != "none"]
    draws = jobs[jobs.condition == "random"].groupby("n_heads").size()
    for r in jobs.sort_values("n_heads", kind="stable").itertuples():
        if r.condition == "random" and draws.get(r.n_heads, 0) > 1 or missing(r.p_vs_none):
            continue
        text = (f"N={n_text(r.n_heads, r.n_heads_share)} {r.condition} vs unablated: "
                f"{percent(r.delta_vs_none)} points {interval(r.delta_ci_low, r.delta_ci_high)}"
                f", exact McNemar p = {p_value(r.p_vs_none)} (Holm {p_value(r.p_vs_none_holm)})")
        if not missing(r.p_vs_low):
            text += (f"; vs low: {percent(r.delta_vs_low)} points, p = {p_value(r.p_vs_low)} "
                     f"(Holm {p_value(r.p_vs_low_holm)})")
        if not missing(r.p_vs_random):
            text += (f"; vs the random null ({int(r.n_random)} draws): p = "
                     f"{p_value(r.p_vs_random)} (Holm {p_value(r.p_vs_random_holm)})")
        lines.append(text)
    return lines


def near_tie_lines(g: pd.DataFrame) -> list[str]:
    """The comparisons of ``g`` that near-ties alone could produce (summary.md's near-tie
    floor says ``inside``), one line; none where there are none."""
    found = []
    draws = g[g.condition == "random"].groupby("n_heads").size()
    for r in g.itertuples():
        if r.condition == "random" and draws.get(r.n_heads, 0) > 1:
            continue  # a K-draw null: summary.md counts its draws inside
        for flag, against in (("within_near_ties_vs_none", "unablated"),
                              ("within_near_ties_vs_low", "low")):
            value = getattr(r, flag, None)
            if r.condition != "none" and not missing(value) and bool(value):
                found.append(f"N={n_text(r.n_heads, r.n_heads_share)} {r.condition} vs "
                             f"{against}")
    if not found:
        return []
    return ["Near-ties alone could produce: " + "; ".join(found)
            + " (summary.md, near-tie floor)."]


def plain_markdown(table: pd.DataFrame) -> str:
    """A table of strings as unpadded GitHub markdown, ``| a | b |`` under ``|---|---|``:
    the form the README shows it in, so that a printed table can be pasted there as it is."""
    rows = [list(table.columns), *table.astype(str).to_numpy().tolist()]
    lines = ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join([lines[0], "|" + "---|" * table.shape[1], *lines[1:]])


def console_report(df: pd.DataFrame, sweep_dir: Path, limits: dict[str, list[str]]
                   ) -> str:
    """The text a sweep prints when it ends (see the module docstring). ``limits``: the
    sentences on the random null's limits per group
    (:func:`ih_sweep.report.families.null_limits`)."""
    parts = []
    for gname, g in df.groupby("group", sort=False):
        parts.append(f"\n{gname}\n{plain_markdown(condition_table(g))}")
        parts += comparison_lines(g)
        parts += [f"Limits of the random null: {s}." for s in limits.get(gname, [])]
        parts += near_tie_lines(g)
    parts.append(f"\nsummary.md: every difference with its CI and raw and Holm-adjusted p, the "
                 "random null, near-tie floor, continuous metrics, mechanism check and head "
                 f"sets; with summary.csv, summary.tex, the figures and one folder per job in: "
                 f"{sweep_dir}")
    return "\n".join(parts)
