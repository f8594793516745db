"""The summary as text: summary.md (every group's tables, the table against the random
null, the robustness and strata sections, the legend, the jobs left out), summary.tex
(booktabs tables) and what a sweep prints when it ends. Tables are the display tables of
:mod:`ih_sweep.report.sections`, written by pandas (``DataFrame.to_markdown``,
``Styler.to_latex``)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from ih_sweep.report.cells import draws_text, n_text, percent
from ih_sweep.report.families import LIMITS_LEGEND, holm_legend, null_limits
from ih_sweep.report.groups import GROUP_KEYS
from ih_sweep.report.sections import (
    LEGEND,
    NULL,
    NULL_LEGEND,
    ROBUSTNESS,
    ROBUSTNESS_LEGEND,
    SECTIONS,
    STRATA_LEGEND,
    arm_of_row,
    display,
    display_table,
    section_tables,
)
from ih_sweep.report.tables import CONDITION_ORDER, STRATA


def markdown_table(table: pd.DataFrame) -> str:
    """A display table as GitHub markdown (``DataFrame.to_markdown``): text columns
    (condition, ablation, arm) left, the others right, cells never reparsed as numbers."""
    align = ["left" if c in ("condition", "ablation", "arm") else "right"
             for c in table.columns]
    return table.to_markdown(index=False, disable_numparse=True, colalign=align)


def latex_table(table: pd.DataFrame) -> str:
    """A display table as one booktabs table (``Styler.to_latex``): no index, the cells'
    LaTeX special characters escaped (the headers are written in LaTeX already), every
    column right-aligned."""
    styler = table.style.hide(axis="index").format(escape="latex")
    return styler.to_latex(hrules=True, column_format="r" * table.shape[1])


def robustness_markdown(table: pd.DataFrame | None) -> list[str]:
    """summary.md's robustness section (lines): one table per family of robustness.csv
    (none without one)."""
    if table is None or table.empty:
        return []
    lines = ["## Robustness across ablation methods", ""]
    for family, part in table.groupby("family", sort=False):
        lines += [f"### {family}", "", markdown_table(display(part, ROBUSTNESS)), ""]
    return lines


def limits_markdown(sentences: list[str]) -> list[str]:
    """The random null's limits (:func:`ih_sweep.report.families.null_limits`) as a list
    under a table (lines; none without any)."""
    if not sentences:
        return []
    return ["**Limits of the random null**:", ""] + [f"- {s}." for s in sentences] + [""]


def null_markdown(df: pd.DataFrame) -> list[str]:
    """summary.md's section "Against the random null" (lines): every row compared with
    random draws (``n_random`` >= 1), across the groups of one model and data set, so that
    the arms (induction heads, FV heads, the exclusions) and the controls read side by
    side; under each table the limits of its arms' nulls, each named by its arm."""
    rows = df[df.n_random.ge(1) & ~df.condition.isin(["random", "none"])] \
        if "n_random" in df else df.iloc[:0]
    if rows.empty:
        return []
    lines = ["## Against the random null", ""]
    shared = [k for k in GROUP_KEYS if k != "rank_by"]  # the arms differ in rank_by
    setting = rows[shared].astype(str).agg(", ".join, axis=1)
    limits = null_limits(df)
    for _, part in rows.groupby(setting, sort=False):
        part = part.assign(arm=part.apply(arm_of_row, axis=1),
                           cond_order=part.condition.map(CONDITION_ORDER))
        part = part.sort_values(["arm", "cond_order", "n_heads"], kind="stable")
        first = part.iloc[0]
        lines += [f"### {', '.join(f'{k}={first[k]}' for k in shared)}", "",
                  markdown_table(display(part, NULL)), ""]
        arms = part.drop_duplicates("group")  # in the table's order
        lines += limits_markdown([f"{arm}: {s}" for group, arm in zip(arms.group, arms.arm)
                                  for s in limits.get(group, [])])
    return lines


def strata_markdown(table: pd.DataFrame | None) -> list[str]:
    """The strata section of summary.md (lines): per group and stratum a table of
    accuracy % (items), one row per condition and N, one column per stratum value; one
    line saying why where the jobs have no stratum columns; nothing for ``None``."""
    if table is None:
        return []
    if table.empty:
        return ["## Difficulty strata", "",
                "*Left out: no job's results.csv has the stratum columns (`support_distance`, "
                "`recency_correct`, `mentions`, `question_position`; evaluated before they "
                "were recorded).*", ""]
    lines = ["## Difficulty strata", ""]
    groups = list(table.groupby("group", sort=False))
    for gname, g in groups:
        if len(groups) > 1:
            lines += [f"### {gname}", ""]
        for stratum, part in g.groupby("stratum", sort=False):
            what = STRATA.get(stratum, ("", True))[0]
            values = part.drop_duplicates("value").sort_values("order")["value"].tolist()
            if len(values) == 1:  # e.g. eval.scope=last: every question is the story's last
                lines += [f"**{stratum}** ({what}): every item has the same value, "
                          f"{values[0]}, so it makes no strata.", ""]
                continue
            out = []
            for (cond, n), arm in part.groupby(["condition", "n_heads"], sort=False):
                draws = int(arm.n_draws.iloc[0])
                cells = {v: f"{percent(r.accuracy)} ({r.n_items})"
                         for v, r in zip(arm.value, arm.itertuples())}
                out.append({"N": "" if cond == "none" else n_text(
                                n, arm.n_heads_share.iloc[0]),
                            "condition": cond + (f" ({draws_text(draws)})" if cond == "random"
                                                 else ""),
                            **{v: cells.get(v, "") for v in values}})
            lines += [f"**{stratum}** ({what}): accuracy % (items)", "",
                      markdown_table(pd.DataFrame(out)), ""]
    return lines


def to_markdown(df: pd.DataFrame, problems: list[tuple[str, str]], notes: list[str],
                title: str = "Sweep summary", strata: pd.DataFrame | None = None,
                robustness: pd.DataFrame | None = None) -> str:
    """summary.md: per group its main table, the limits of its random null
    (:func:`ih_sweep.report.families.null_limits`) and the sections of
    :data:`ih_sweep.report.sections.SECTIONS` (each left out with one line where its jobs
    did not record it), the table against the random null, the robustness table, the
    difficulty strata (:func:`strata_markdown`), a legend of every column shown, the jobs
    left out (``problems``: (folder, why)); ``notes`` are quoted under the title."""
    lines = [f"# {title}", ""]
    lines += [f"> {note}" for note in notes] + ([""] if notes else [])
    shown = set()
    limits = null_limits(df)
    for gname, g in df.groupby("group", sort=False):
        lines += [f"## {gname}", "", markdown_table(display_table(g)), ""]
        lines += limits_markdown(limits.get(gname, []))
        for sec, table in section_tables(g):
            if table is None:
                lines += [f"*{sec.title}: left out: {sec.absent}.*", ""]
            else:
                shown.add(sec.title)
                lines += [f"### {sec.title}", "", markdown_table(table), ""]
    null = null_markdown(df)
    lines += null
    lines += robustness_markdown(robustness)
    lines += strata_markdown(strata)
    legend = LEGEND + [holm_legend(df)] + ([LIMITS_LEGEND] if limits else [])
    legend += [item for sec in SECTIONS if sec.title in shown for item in sec.legend]
    legend += NULL_LEGEND if null else []
    if robustness is not None and not robustness.empty:
        legend += ROBUSTNESS_LEGEND
    if strata is not None and not strata.empty:
        legend += STRATA_LEGEND
    lines += ["### Legend", ""] + [f"- {item}" for item in legend] + [""]
    if problems:
        lines += ["## Jobs left out", ""] + [f"- `{f}`: {why}" for f, why in problems] + [""]
    return "\n".join(lines)


def to_latex(df: pd.DataFrame) -> str:
    """summary.tex: one booktabs table per group and section (:func:`latex_table`), each
    under a comment line naming the group's settings (and the section)."""
    parts = []
    for gname, g in df.groupby("group", sort=False):
        parts.append(f"% {gname}\n" + latex_table(display_table(g, latex=True)))
        parts += [f"% {gname}: {sec.title}\n" + latex_table(table)
                  for sec, table in section_tables(g, latex=True) if table is not None]
    return "\n".join(parts)


def console_report(df: pd.DataFrame, sweep_dir: Path) -> str:
    """What a sweep prints when it ends (:func:`ih_sweep.report.console.console_report`):
    each group's N x condition table, its comparisons in one line each, the limits of its
    random null, and where summary.md and the figures are."""
    from ih_sweep.report import console

    return console.console_report(df, sweep_dir, null_limits(df))
