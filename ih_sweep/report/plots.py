"""The summary's figures: accuracy against N per group (with the random null as a band),
accuracy by difficulty stratum, the in-context learning curve, and the ablated heads on
their score table's heatmap; each written as a PNG by :func:`ih_sweep.io_utils.write_figure`
(the layer x head heatmap itself is :mod:`ih_sweep.report.figures`, shared with the score
and scan jobs)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ih_sweep.io_utils import write_figure
from ih_sweep.report import statistics as st
from ih_sweep.report.cells import draws_text, heads_phrase, n_text
from ih_sweep.report.discover import FinishedJob
from ih_sweep.report.errors import SummaryError, why
from ih_sweep.report.figures import pyplot
from ih_sweep.report.tables import CONDITION_ORDER, STRATA


def arm_row(g: pd.DataFrame) -> pd.Series:
    """A row of one group that says how its heads were chosen: an ablated one (the
    unablated job has no scoring settings), else the first."""
    ablated = g[g.condition != "none"]
    return (ablated if not ablated.empty else g).iloc[0]


def short_title(row: Any) -> str:
    """A figure title for a summary row: the model and the data, the metric, the ablation
    and, where they are not the default prefix-matching heads, how the heads are chosen."""
    split = "" if row.split == "generated" else f" {row.split}"
    phrase = heads_phrase(row)
    heads = "" if phrase == "top-N by prefix" else f"\n{phrase}"
    # quantization "none" would read as "no ablation": name the weights' format instead
    weights = "full-precision weights" if row.quantization == "none" else row.quantization
    return (f"{row.model} ({weights}), bAbI task {row.babi_task}{split} "
            f"({row.data}), {row.metric}, {'last' if row.scope == 'last' else 'every'} "
            f"question, {row.ablation} ablation{heads}")


def plot_strata(table: pd.DataFrame, path: Path, title: str = "",
                stratum: str = "support_distance") -> Path | None:
    """Accuracy by ``stratum`` (default: support distance, 1-4 and 5+): one line per
    condition and N (colour = condition, line style = N; random draws pooled, lines side
    by side), 95% Wilson CIs as error bars. None when the table has no rows of that stratum."""
    part = table[table.stratum == stratum] if not table.empty else table
    if part.empty:
        return None
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7.6, 4.2))
    ticks = part.drop_duplicates("value").sort_values("order")
    position = {v: i for i, v in enumerate(ticks.value)}
    ns = sorted(int(n) for n in part.loc[part.condition != "none", "n_heads"].unique())
    styles = dict(zip(reversed(ns), ["-", "--", ":", "-."] * 4))
    keys = list(dict.fromkeys(zip(part.condition, part.n_heads)))
    for i, (cond, n) in enumerate(keys):
        g = part[(part.condition == cond) & (part.n_heads == n)].sort_values("order")
        x = g.value.map(position) + 0.06 * (i - (len(keys) - 1) / 2)  # side by side
        draws = int(g.n_draws.iloc[0])
        label = "unablated" if cond == "none" else f"{cond} N={n_text(n, first_share(g))}" + (
            f" ({draws_text(draws)} pooled)" if cond == "random" else "")
        color = COLORS.get(cond, "tab:green")
        ax.plot(x, 100 * g.accuracy, marker="o", ms=4, color=color, label=label,
                ls="-" if cond == "none" else styles[int(n)], clip_on=False)
        # intervals as bars at each line's own x: bands of lines side by side at 100% would
        # smear into one another
        ax.errorbar(x, 100 * g.accuracy, yerr=[100 * (g.accuracy - g.ci_low),
                                              100 * (g.ci_high - g.accuracy)],
                    fmt="none", ecolor=color, elinewidth=1, capsize=2, alpha=0.7,
                    clip_on=False)
    ax.set_xticks(range(len(position)), list(position))
    ax.set_xlim(-0.3, len(position) - 0.7)
    ax.set_ylim(-3, 103)
    ax.set_xlabel(f"{stratum.replace('_', ' ')}: {STRATA.get(stratum, ('', True))[0]}")
    ax.set_ylabel("accuracy (%), bars: 95% Wilson CI")
    ax.set_title(title or f"Accuracy by {stratum.replace('_', ' ')}", fontsize=10)
    ax.grid(alpha=0.25)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    write_figure(path, fig)
    plt.close(fig)
    return path


def first_share(rows: pd.DataFrame) -> float:
    """The first share of all heads (percent) among ``rows`` (nan: none was asked)."""
    shares = rows["n_heads_share"].dropna() if "n_heads_share" in rows else []
    return float(shares.iloc[0]) if len(shares) else np.nan


def dose_axis(df: pd.DataFrame) -> tuple[pd.DataFrame, bool]:
    """``df`` with column ``x``, where the accuracy-vs-N figure puts each row: the share of
    all heads (percent) when every ablated row of the figure was asked as one
    (``n_heads=1%,3%,10%``), else the count N; and whether it is the share. Rows of
    summary.csv or of the cross-model table (ablated: ``n_heads`` > 0; an unablated job's
    is 0)."""
    ablated = df[df.n_heads > 0]
    by_share = "n_heads_share" in df and not ablated.empty and \
        bool(ablated.n_heads_share.notna().all())
    return df.assign(x=df.n_heads_share if by_share else df.n_heads), by_share


COLORS = {"high": "tab:red", "low": "tab:blue", "random": "tab:purple", "none": "black"}
NULL_MIN_HEIGHT = 1.5  # points of accuracy: the least height the null's band is drawn with


def plot_null(ax: Any, random: pd.DataFrame) -> None:
    """The random draws on the accuracy-vs-N axes: at each N a box from the 2.5th to the
    97.5th percentile of the draws' accuracies (:func:`ih_sweep.report.statistics.null_band`, as
    summary.csv's ``random_acc_p2_5``/``random_acc_p97_5``) with the median as a line
    across it, the boxes joined by a lighter band; a band narrower than
    :data:`NULL_MIN_HEIGHT` points (draws alike, e.g. all at 100%) is drawn that tall
    around its centre so that it stays visible. Every draw as a point where an N has fewer
    than 3 draws. ``random`` has the figure's x positions in column ``x`` (:func:`dose_axis`)."""
    color = COLORS["random"]
    norm = "group" in random and random.group.astype(str).str.contains(
        "control.match=layer_norm").any()
    what = "layer- and norm-matched random heads" if norm else "random heads"
    by_n = {float(x): g.accuracy.to_numpy(dtype=float) for x, g in random.groupby("x")}
    xs = sorted(by_n)
    sizes = sorted({len(by_n[x]) for x in xs})
    if sizes[0] < 3:
        ax.plot(random.x, 100 * random.accuracy, "o", color=color, ms=5, clip_on=False,
                label=f"{what} ({draws_text(len(random))})")
        return
    draws = f"{sizes[0]}" if len(sizes) == 1 else f"{sizes[0]}-{sizes[-1]}"
    band = 100 * np.array([st.null_band(by_n[x]) for x in xs])
    median = [100 * float(np.median(by_n[x])) for x in xs]
    spacing = min(np.diff(xs), default=2)
    width = 0.3 * spacing
    tall = np.maximum(band[:, 1] - band[:, 0], NULL_MIN_HEIGHT)
    bottom = (band[:, 0] + band[:, 1] - tall) / 2
    if len(xs) > 1:
        ax.fill_between(xs, bottom, bottom + tall, color=color, alpha=0.15, lw=0, zorder=2)
    ax.bar(xs, tall, bottom=bottom, width=width, color=color, alpha=0.45, lw=0, zorder=2,
           label=f"{what}: 2.5-97.5% of {draws} draws (line: median)")
    ax.hlines(median, [x - width / 2 for x in xs], [x + width / 2 for x in xs], color=color,
              lw=1.5, zorder=2)


def high_label(row: Any) -> str:
    """The legend of a group's ``high`` rows: how its heads are chosen and what they are
    (induction heads by prefix matching or copying, FV heads by their indirect effect)."""
    kind = {"fv": "FV heads"}.get(getattr(row, "rank_by", ""), "induction heads")
    phrase = heads_phrase(row)
    return f"{phrase} ({kind})" if "outside" not in phrase else f"{phrase}\n({kind})"


def plot_unstable(ax: Any, df: pd.DataFrame, dodge: float) -> None:
    """Rings around the ``high`` and ``low`` points whose ranking is unstable
    (summary.csv ``rank_unstable``, :mod:`ih_sweep.heads.stability`), one legend entry;
    nothing where none is (or the column is absent)."""
    if "rank_unstable" not in df:
        return
    flagged = df[df.rank_unstable.astype(str) == "True"]
    flagged = flagged[flagged.condition.isin(["high", "low"])]
    if flagged.empty:
        return
    x = flagged.x + np.where(flagged.condition == "high", -dodge, dodge)
    ax.scatter(x, 100 * flagged.accuracy, s=220, facecolors="none", edgecolors="orange",
               linewidths=2, zorder=4, clip_on=False,
               label="unstable ranking: < 80% of its heads kept when the prompts / "
                     "sequences are resampled")


def plot_accuracy_vs_n(df: pd.DataFrame, path: Path, title: str = "") -> Path | None:
    """Accuracy against N per condition with 95% Wilson CIs; the unablated accuracy as a
    line and band; the random draws as their 2.5-97.5% band (:func:`plot_null`); points
    of an unstable ranking ringed (:func:`plot_unstable`).
    The x axis is the share of all heads (%, each tick with its count) when every ablated
    job of the figure was asked as a share, else the count N (:func:`dose_axis`)."""
    if df.empty:
        return None
    df, by_share = dose_axis(df)
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    none = df[df.condition == "none"]
    if not none.empty:
        r = none.iloc[0]
        ax.axhspan(100 * r.ci_low, 100 * r.ci_high, color="black", alpha=0.12, lw=0)
        ax.axhline(100 * r.accuracy, color="black", lw=1, ls="--",
                   label=f"unablated {100 * r.accuracy:.1f}% [{100 * r.ci_low:.1f}, "
                         f"{100 * r.ci_high:.1f}]")
    random = df[df.condition == "random"]
    if not random.empty:
        plot_null(ax, random)
    measured = sorted(df.loc[df.condition != "none", "x"].unique())
    dodge = 0.012 * max(1, measured[-1] - measured[0]) if measured else 0
    for cond, shift in (("high", -dodge), ("low", dodge)):  # side by side where they meet
        g = df[df.condition == cond].sort_values("n_heads")
        if g.empty:
            continue
        y = 100 * g.accuracy
        yerr = np.clip([y - 100 * g.ci_low, 100 * g.ci_high - y], 0, None)
        ax.errorbar(g.x + shift, y, yerr=yerr, marker="o", ms=5, capsize=3,
                    color=COLORS[cond], clip_on=False, zorder=3,
                    label={"high": high_label(g.iloc[0]),
                           "low": "layer-matched lowest-N (control)"}[cond])
    plot_unstable(ax, df, dodge)
    if measured and by_share:
        counts = df[df.condition != "none"].groupby("x").n_heads.first()
        ax.set_xticks(measured, [f"{x:.10g}%\n(N={counts[x]})" for x in measured])
        pad = max(0.5, 0.06 * (measured[-1] - measured[0]))
        ax.set_xlim(measured[0] - pad, measured[-1] + pad)
        ax.set_xlabel("heads ablated (% of all heads; N: the count)")
    elif measured:
        ax.set_xticks(measured)
        pad = max(1.0, 0.06 * (measured[-1] - measured[0]))
        ax.set_xlim(measured[0] - pad, measured[-1] + pad)
        ax.set_xlabel("heads ablated (N)")
    else:  # only the unablated model: no N to put on the axis
        ax.set_xticks([])
        ax.set_xlabel("heads ablated (N): no ablated job in this group")
    ax.set_ylim(-3, 103)  # a point at 0% or 100% and its marker stay inside the frame
    ax.set_ylabel("accuracy (%), error bars: 95% Wilson CI")
    ax.set_title(title or "bAbI accuracy vs number of ablated heads", fontsize=10)
    ax.grid(alpha=0.25)
    # below the axes: inside, it would cover the points at 0% (or 100%); lower still under
    # the two-line ticks of a share axis
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.2 if by_share else -0.14),
              ncol=2, frameon=False)
    write_figure(path, fig)
    plt.close(fig)
    return path


def plot_icl(curve: pd.DataFrame, path: Path, title: str = "") -> Path | None:
    """Accuracy by answered examples before the question: one line per (condition, N), the
    random draws of an N pooled, with 95% Wilson CIs as bands; colour = condition,
    line style = N."""
    if curve.empty:
        return None
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7.6, 4.2))
    curve = curve.drop_duplicates(["condition", "n_heads", "control_seed", "examples_before"])
    curve = curve.assign(n_correct=(curve.accuracy * curve.n_items).round())
    none = curve[curve.condition == "none"]
    none = none[none.n_heads == none.n_heads.min()]
    pooled = pd.concat([none, curve[curve.condition != "none"]]).groupby(
        ["condition", "n_heads", "examples_before"], as_index=False)[["n_correct",
                                                                      "n_items"]].sum()
    draws = curve[curve.condition == "random"].groupby("n_heads").control_seed.nunique()
    ns = sorted(int(n) for n in pooled.loc[pooled.condition != "none", "n_heads"].unique())
    styles = dict(zip(reversed(ns), ["-", "--", ":", "-."] * 4))
    keys = sorted(pooled.groupby(["condition", "n_heads"]).groups,
                  key=lambda k: (CONDITION_ORDER.get(k[0], 9), k[1]))
    for i, (cond, n) in enumerate(keys):
        g = pooled[(pooled.condition == cond) & (pooled.n_heads == n)].sort_values(
            "examples_before")
        bounds = np.array([st.wilson_interval(int(k), int(m))
                           for k, m in zip(g.n_correct, g.n_items)])
        share = first_share(curve[(curve.condition == cond) & (curve.n_heads == n)])
        label = "unablated" if cond == "none" else f"{cond} N={n_text(n, share)}" + (
            f" ({draws_text(draws[n])} pooled)" if cond == "random" else "")
        x = g.examples_before + 0.04 * (i - (len(keys) - 1) / 2)  # lines at 100% side by side
        color = COLORS.get(cond, "tab:green")
        ax.plot(x, 100 * g.n_correct / g.n_items, marker="o", ms=4, color=color,
                ls="-" if cond == "none" else styles[int(n)], label=label, clip_on=False)
        ax.fill_between(x, 100 * bounds[:, 0], 100 * bounds[:, 1], color=color, alpha=0.12,
                        lw=0)
    ax.set_xticks(sorted(int(v) for v in curve.examples_before.unique()))
    ax.set_ylim(-3, 103)
    ax.set_xlabel("answered examples before the question")
    ax.set_ylabel("accuracy (%), bars: 95% Wilson CI")
    ax.set_title(title or "In-context learning curve", fontsize=10)
    ax.grid(alpha=0.25)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    write_figure(path, fig)
    plt.close(fig)
    return path


def plot_ablated_heads(jobs: list[FinishedJob], sweep_dir: Path,
                       step: Callable[[str, Callable[[], Any]], Any] | None = None
                       ) -> list[Path]:
    """For each score table the sweep's jobs ranked by: its heatmap with the heads ablated
    at the largest N marked (top-N, the layer-matched control and one random draw), as
    ``heads_<rank_by>.png`` (``heads_<rank_by>_<i>.png`` for several tables). ``step``
    runs each figure (:func:`ih_sweep.report.summarize.summarize`'s: a failure, e.g. an
    unreadable score table, is recorded and the others go on); without it a failure raises
    :class:`ih_sweep.report.errors.SummaryError`."""
    from ih_sweep.heads.score_table import save_heatmap

    step = step or (lambda name, make: make())
    by_table: dict[tuple[str, str], list[FinishedJob]] = {}
    for job in jobs:
        r = job.record
        if r.scores_file and r.heads:
            by_table.setdefault((r.scores_file, r.rank_by), []).append(job)
    paths = []
    for i, ((table, rank_by), tjobs) in enumerate(sorted(by_table.items())):
        n = max(j.record.n_heads for j in tjobs)
        marks = {}
        for cond, label in (("high", "top-N"), ("low", "layer-matched low"),
                            ("random", "random draw")):
            job = next((j for j in sorted(tjobs, key=lambda j: j.record.control_seed)
                        if j.record.condition == cond and j.record.n_heads == n), None)
            if job is not None:
                marks[f"{label} (N={n})"] = [tuple(h) for h in job.record.heads]
        name = f"heads_{rank_by}.png" if len(by_table) == 1 else f"heads_{rank_by}_{i}.png"
        model = tjobs[0].record.model

        def heatmap(table=table, rank_by=rank_by, name=name, model=model, marks=marks):
            try:
                scores = pd.read_csv(table)
            except (OSError, ValueError) as err:
                raise SummaryError(f"score table {table} unreadable: {why(err)}") from None
            return save_heatmap(scores, rank_by, sweep_dir / name, model, marks)

        path = step(f"{name} (heads on the score table)", heatmap)
        if path is not None:
            paths.append(path)
    return paths
