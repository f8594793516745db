"""Turn a sweep folder into what a researcher reports: tables, paired statistics, plots.

Runs at the end of every multirun (Hydra callback) and standalone:
``python -m ih_sweep.summarize <sweep dir>``. Idempotent; never drops a job silently. Job
folders are read through :mod:`ih_sweep.records` (the same definitions the jobs write with).

summary.csv columns
-------------------
group            the settings its jobs share, ``model=..., quantization=..., data=...,
                 babi_task=..., split=..., metric=..., scope=..., ablation=..., rank_by=...``;
                 only rows of one group are compared with each other
model, quantization, data, babi_task, split, metric, scope, ablation, rank_by
n_heads, condition, control_seed
n_items, n_correct, accuracy, ci_low, ci_high   Wilson 95% interval of the accuracy
delta_vs_none    accuracy minus the unablated accuracy on the same items
delta_ci_low, delta_ci_high   paired bootstrap 95% interval of delta_vs_none
p_vs_none        exact McNemar p of the paired outcomes against ``none``
p_vs_none_holm   Holm-adjusted over every p_vs_none of the sweep (all tasks, N, conditions)
delta_vs_low, p_vs_low        for ``high``: against ``low`` at the same N (McNemar)
p_vs_random      for ``high``: empirical p against the ``random`` draws at the same N
n_random         number of random draws behind p_vs_random
"""

from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from . import statistics as st
from .figures import pyplot
from .io_utils import write_csv, write_figure, write_text
from .records import EvaluationRecord, RecordError, ScanRecord, read_record

log = logging.getLogger(__name__)

GROUP_KEYS = ["model", "quantization", "data", "babi_task", "split", "metric", "scope",
              "ablation", "rank_by"]
SUMMARY_COLUMNS = ["group", *GROUP_KEYS, "n_heads", "condition", "control_seed", "n_items",
                   "n_correct", "accuracy", "ci_low", "ci_high", "delta_vs_none",
                   "delta_ci_low", "delta_ci_high", "p_vs_none", "p_vs_none_holm",
                   "delta_vs_low", "p_vs_low", "p_vs_random", "n_random"]


class SummaryError(ValueError):
    pass


@dataclass
class FinishedJob:
    """An evaluate job's folder, record and results."""

    path: Path
    record: EvaluationRecord
    results: pd.DataFrame


@dataclass
class SweepJobs:
    jobs: list[FinishedJob] = field(default_factory=list)
    problems: list[tuple[str, str]] = field(default_factory=list)  # (folder, why)
    scan_parts: list[Path] = field(default_factory=list)  # job=scan folders


DEFAULT_SUBDIR = "${path_safe:${hydra.job.override_dirname}}"


def expected_jobs(sweep_dir: Path) -> tuple[int, list[str]] | None:
    """(how many jobs the sweep's ``multirun.yaml`` launched, their folder names where the
    job folders have the default names), or None without a readable multirun.yaml. The jobs
    are expanded from its overrides the way Hydra's basic sweeper does."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from omegaconf import OmegaConf

    from .schema import folder_name, register, speed_keys

    path = sweep_dir / "multirun.yaml"
    if not path.is_file():
        return None
    register()
    try:
        cfg = OmegaConf.load(path)
        args = list(cfg.hydra.overrides.task)
        params = OmegaConf.select(cfg, "hydra.sweeper.params") or {}
        given = {a.split("=", 1)[0].lstrip("+~") for a in args}
        args += [f"{k}={v}" for k, v in params.items() if k not in given]
        overrides = OverridesParser.create().parse_overrides(args)
        jobs = [job for batch in BasicSweeper.split_arguments(overrides, None)
                for job in batch]
    except Exception as err:  # a multirun.yaml of another tool or version
        log.warning("cannot read the jobs of %s: %s", path, err)
        return None
    if OmegaConf.to_container(cfg.hydra.sweep, resolve=False).get("subdir") != DEFAULT_SUBDIR:
        return len(jobs), []  # folders named otherwise: only the count can be checked
    exclude = set(speed_keys())
    names = []
    for job in jobs:
        lines = sorted(o for o in job if o.split("=", 1)[0].lstrip("+~") not in exclude)
        names.append(folder_name(",".join(lines)))
    return len(jobs), names


def find_jobs(sweep_dir: Path) -> SweepJobs:
    """Find job folders (those with a .hydra/ or job.json) and sort good from broken."""
    out = SweepJobs()
    candidates = sorted({p.parent for p in sweep_dir.rglob("job.json")}
                        | {p.parent.parent for p in sweep_dir.rglob(".hydra/config.yaml")})
    candidates = [c for c in candidates if c != sweep_dir or (c / "job.json").exists()]
    for folder in candidates:
        rel = str(folder.relative_to(sweep_dir)) or "."
        if not (folder / "job.json").is_file():
            out.problems.append((rel, "no job.json: the job failed or has not finished"))
            continue
        try:
            record = read_record(folder)
        except RecordError as err:
            out.problems.append((rel, f"unreadable job.json ({err})"))
            continue
        if record.status != "complete":
            out.problems.append((rel, f"status {record.status!r}"))
            continue
        if isinstance(record, ScanRecord):
            if (folder / "scan.csv").is_file():
                out.scan_parts.append(folder)
            else:
                out.problems.append((rel, "scan job without scan.csv"))
            continue
        try:
            results = pd.read_csv(folder / "results.csv")
        except (OSError, pd.errors.ParserError, pd.errors.EmptyDataError) as err:
            out.problems.append((rel, f"results.csv unreadable ({err})"))
            continue
        if len(results) != record.n_items:
            out.problems.append((rel, f"results.csv has {len(results)} rows, job.json says "
                                      f"{record.n_items}"))
            continue
        out.jobs.append(FinishedJob(folder, record, results))
    return out


def _group_of(job: FinishedJob) -> dict:
    r = job.record
    generated = r.data.get("name") == "babi_generated"
    return {"model": r.model, "quantization": r.quantization, "data": r.data.get("name"),
            "babi_task": r.data.get("task"),
            "split": "generated" if generated else r.data.get("split"),
            "metric": r.eval["metric"], "scope": r.eval["scope"], "ablation": r.ablation,
            "rank_by": r.rank_by}


def _key(df: pd.DataFrame) -> pd.Series:
    return df["story"].astype(str) + ":" + df["question_index"].astype(str)


def _paired(a: pd.DataFrame, b: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """Outcomes of the items both jobs evaluated, aligned by (story, question)."""
    x = a.assign(k=_key(a)).set_index("k")["correct"].astype(bool)
    y = b.assign(k=_key(b)).set_index("k")["correct"].astype(bool)
    common = x.index.intersection(y.index)
    return x.loc[common].to_numpy(), y.loc[common].to_numpy()


_SELECTION = ("n_heads", "condition", "control_seed", "job")
_ARM = ("scoring", "ablation")  # how heads are chosen and ablated: absent for `none`


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _settings_of(record: EvaluationRecord) -> dict:
    """The job's settings (its semantic config); for records without them (older jobs)
    what the record says of the model, data, evaluation and ablation."""
    if record.settings:
        return record.settings
    return {"model": {"name": record.model}, "quantization": {"name": record.quantization},
            "data": record.data, "eval": record.eval,
            "ablation": {"method": record.ablation}, "scoring": {"rank_by": record.rank_by}}


def _settings_key(record: EvaluationRecord, keys: tuple[str, ...]) -> str:
    """The job's settings except ``keys``, as a comparable string."""
    import json

    return json.dumps({k: v for k, v in _settings_of(record).items() if k not in keys},
                      sort_keys=True, default=str)


def group_jobs(jobs: list[FinishedJob]) -> tuple[list[list[FinishedJob]], list[str]]:
    """Jobs that may be compared: same settings but for which heads are ablated. The
    unablated job joins every group with its evaluation settings. Returns (groups, the
    dotted settings that differ between groups)."""
    by_eval: dict[str, dict[str | None, list[FinishedJob]]] = {}
    for job in jobs:
        unablated = job.record.condition == "none" or job.record.n_heads == 0
        arm = None if unablated else _settings_key(job.record, _SELECTION)
        arms = by_eval.setdefault(_settings_key(job.record, _SELECTION + _ARM), {})
        arms.setdefault(arm, []).append(job)
    groups = []
    for arms in by_eval.values():
        none = arms.pop(None, [])
        groups += [none + ablated for ablated in arms.values()] if arms else [none]
    return groups, _differing_settings(groups) if len(groups) > 1 else []


def _differing_settings(groups: list[list[FinishedJob]]) -> list[str]:
    flats = [_flat({k: v for k, v in _settings_of(g[-1].record).items()
                    if k not in _SELECTION}) for g in groups]
    keys = sorted(set().union(*flats))
    return [k for k in keys if len({str(f.get(k)) for f in flats}) > 1]


def summarize_jobs(jobs: list[FinishedJob]) -> tuple[pd.DataFrame, list[str]]:
    """One row per distinct job of each group (:func:`group_jobs`) with the statistics
    above, and notes on what was merged: jobs with the same config hash (e.g. ``none`` at
    every N, or non-random conditions crossed with control seeds) are one row."""
    rows, notes = [], []
    groups, differing = group_jobs(jobs)
    if differing:
        notes.append("Jobs differ in " + ", ".join(differing) + "; each group is "
                     "summarized on its own and never pooled.")
    for gjobs in groups:
        gjobs = sorted(gjobs, key=lambda j: (j.record.n_heads, j.record.condition,
                                             j.record.control_seed))
        base = _group_of(gjobs[-1])
        settings = _flat(_settings_of(gjobs[-1].record))
        gname = group_title(base) + "".join(f", {k}={settings.get(k)}" for k in differing
                                            if k not in base)
        by_cell: dict[tuple[int, str, int], FinishedJob] = {}
        merged: dict[tuple[int, str, int], list[FinishedJob]] = {}
        for j in gjobs:
            r = j.record
            if r.condition == "none" or r.n_heads == 0:
                cell = (0, "none", 0)
            else:
                cell = (r.n_heads, r.condition, r.control_seed if r.condition == "random" else 0)
            if cell in by_cell:
                merged.setdefault(cell, [by_cell[cell]]).append(j)
            else:
                by_cell[cell] = j
        for (n, cond, seed), same in merged.items():
            folders = ", ".join(str(j.path.name) for j in same)
            what = "the unablated model (no head is ablated at any N)" if cond == "none" \
                else f"{cond} N={n}" + (" (the control seed only draws random heads)"
                                        if cond != "random" else f" seed {seed}")
            notes.append(f"{len(same)} jobs evaluate {what}: one row ({folders}).")
        none = by_cell.get((0, "none", 0))
        for (n, cond, seed), job in by_cell.items():
            res = job.results
            k, total = int(res["correct"].sum()), len(res)
            lo, hi = st.wilson_interval(k, total)
            row = {"group": gname, **_group_of(job), "n_heads": n, "condition": cond,
                   "control_seed": seed, "n_items": total, "n_correct": k,
                   "accuracy": k / total if total else float("nan"), "ci_low": lo,
                   "ci_high": hi}
            if none is not None and cond != "none":
                a, b = _paired(res, none.results)
                row["delta_vs_none"] = float(a.mean() - b.mean()) if len(a) else np.nan
                row["delta_ci_low"], row["delta_ci_high"] = st.paired_bootstrap_ci(a, b)
                row["p_vs_none"] = st.mcnemar_exact(*st.discordant(a, b))
            if cond == "high":
                low = by_cell.get((n, "low", 0))
                if low is not None:
                    a, b = _paired(res, low.results)
                    row["delta_vs_low"] = float(a.mean() - b.mean())
                    row["p_vs_low"] = st.mcnemar_exact(*st.discordant(a, b))
                draws = [j for (nn, c, _), j in by_cell.items() if nn == n and c == "random"]
                if draws:
                    null = [j.results["correct"].mean() for j in draws]
                    row["p_vs_random"] = st.empirical_p(row["accuracy"], null)
                    row["n_random"] = len(draws)
            rows.append(row)
        conditions = {c for _, c, _ in by_cell}
        if conditions == {"random"}:
            notes.append(f"{gname}: only random draws, so nothing is compared: add "
                         "condition=none (the unablated model) and condition=high (the "
                         "induction heads) to the sweep to test the random draws against.")
    # one family across tasks, N values and conditions of the whole sweep
    ps = [r.get("p_vs_none", np.nan) for r in rows]
    for r, adj in zip(rows, st.holm(ps)):
        r["p_vs_none_holm"] = adj
    df = pd.DataFrame(rows)
    for col in SUMMARY_COLUMNS:
        if col not in df.columns:
            df[col] = np.nan
    return df[SUMMARY_COLUMNS], notes


def icl_curve(jobs: list[FinishedJob]) -> pd.DataFrame:
    """Accuracy by number of answered examples before the question (scope ``all`` jobs)."""
    parts = []
    for job in jobs:
        if job.record.eval["scope"] != "all":
            continue
        g = job.results.groupby("examples_before")["correct"].agg(["mean", "size"])
        g = g.reset_index().rename(columns={"mean": "accuracy", "size": "n_items"})
        g["n_heads"], g["condition"] = job.record.n_heads, job.record.condition
        g["control_seed"] = job.record.control_seed
        parts.append(g)
    return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame()


# --------------------------------------------------------------------------- rendering
# How numbers are shown, in one place: accuracies and differences in percent (points) with
# one decimal, intervals as [low, high], p-values with three significant digits.
def _missing(x) -> bool:
    return x is None or (isinstance(x, float) and np.isnan(x))


def percent(x) -> str:
    return "" if _missing(x) else f"{100 * x:.1f}"


def interval(low, high) -> str:
    return "" if _missing(low) or _missing(high) else f"[{percent(low)}, {percent(high)}]"


def p_value(p) -> str:
    return "" if _missing(p) else f"{p:.3g}"


def _vs_none(row, text: str) -> str:
    return "" if row.condition == "none" else text  # `none` against itself means nothing


# (markdown header, LaTeX header, cell of a summary row)
_DISPLAY = [
    ("N", "$N$", lambda r: "" if r.condition == "none" else str(r.n_heads)),
    ("condition", "condition", lambda r: r.condition),
    ("control seed", "control seed",
     lambda r: str(r.control_seed) if r.condition == "random" else ""),
    ("items", "items", lambda r: str(r.n_items)),
    ("accuracy %", r"accuracy (\%)", lambda r: percent(r.accuracy)),
    ("95% CI", r"95\% CI", lambda r: interval(r.ci_low, r.ci_high)),
    ("Δ vs none (pts)", r"$\Delta$ vs none (pts)", lambda r: _vs_none(r, percent(r.delta_vs_none))),
    ("95% CI of Δ", r"95\% CI of $\Delta$",
     lambda r: _vs_none(r, interval(r.delta_ci_low, r.delta_ci_high))),
    ("p vs none", "$p$ vs none", lambda r: _vs_none(r, p_value(r.p_vs_none))),
    ("Holm p", "Holm $p$", lambda r: p_value(r.p_vs_none_holm)),
    ("Δ vs low (pts)", r"$\Delta$ vs low (pts)", lambda r: percent(r.delta_vs_low)),
    ("p vs low", "$p$ vs low", lambda r: p_value(r.p_vs_low)),
    ("p vs random", "$p$ vs random", lambda r: p_value(r.p_vs_random)),
]

LEGEND = [
    "**N**: heads ablated. **condition**: `high` = the top-N heads by score (induction "
    "heads); `low` = for each layer holding k of them, its k lowest-scoring heads (the "
    "notebook's control); `random` = layer-matched random heads outside the top-N, drawn "
    "with **control seed**; `none` = unablated (one row: every N evaluates the same model).",
    "**accuracy %** with its **95% CI**: Wilson score interval.",
    "**Δ vs none**: accuracy minus the unablated accuracy on the same items, in percentage "
    "points; **95% CI of Δ**: paired percentile bootstrap over items (2,000 resamples).",
    "**p vs none**: exact McNemar test of the paired per-item outcomes; **Holm p**: "
    "Holm-adjusted over every comparison with `none` in this summary.",
    "**Δ vs low**, **p vs low** (rows `high`): against the `low` control at the same N "
    "(exact McNemar).",
    "**p vs random** (rows `high`): empirical p of the `high` accuracy among the `random` "
    "draws at the same N, (1 + #draws at or below it) / (1 + #draws).",
]


def display_table(df: pd.DataFrame, latex: bool = False) -> pd.DataFrame:
    """The rows a reader sees, as strings: the unablated job once (every N of ``none``
    evaluates the same model), empty cells where a number would mean nothing."""
    rows = df
    headers = [(tex if latex else md) for md, tex, _ in _DISPLAY]
    return pd.DataFrame([[cell(r) for _, _, cell in _DISPLAY] for r in rows.itertuples()],
                        columns=headers)


def markdown_table(table: pd.DataFrame) -> str:
    """A display table as GitHub markdown: text left, numbers right, no reparsing."""
    align = ["left" if c in ("condition",) else "right" for c in table.columns]
    return table.to_markdown(index=False, disable_numparse=True, colalign=align)


def _short_title(row) -> str:
    """A figure title: the model and the data, the metric and the ablation."""
    split = "" if row.split == "generated" else f" {row.split}"
    return (f"{row.model} ({row.quantization}), bAbI task {row.babi_task}{split} "
            f"({row.data}), {row.metric}, {'last' if row.scope == 'last' else 'every'} "
            f"question, {row.ablation} ablation")


def group_title(group: dict) -> str:
    """``key=value`` for every setting a group shares."""
    return ", ".join(f"{k}={group[k]}" for k in GROUP_KEYS)


def to_markdown(df: pd.DataFrame, problems: list[tuple[str, str]], notes: list[str],
                title: str = "Sweep summary") -> str:
    lines = [f"# {title}", ""]
    lines += [f"> {note}" for note in notes] + ([""] if notes else [])
    for gname, g in df.groupby("group", sort=False):
        lines += [f"## {gname}", "", markdown_table(display_table(g)), ""]
    lines += ["### Legend", ""] + [f"- {item}" for item in LEGEND] + [""]
    if problems:
        lines += ["## Jobs left out", ""] + [f"- `{f}`: {why}" for f, why in problems] + [""]
    return "\n".join(lines)


def to_latex(df: pd.DataFrame) -> str:
    """One booktabs table per group (pandas' Styler.to_latex), each under a comment line
    naming the group's settings."""
    parts = []
    for gname, g in df.groupby("group", sort=False):
        table = display_table(g, latex=True)
        styler = table.style.hide(axis="index").format(escape="latex")
        parts.append(f"% {gname}\n" + styler.to_latex(hrules=True,
                                                       column_format="r" * table.shape[1]))
    return "\n".join(parts)


COLORS = {"high": "tab:red", "low": "tab:blue", "random": "tab:grey", "none": "black"}


def plot_accuracy_vs_n(df: pd.DataFrame, path: Path, title: str = "") -> Path | None:
    """Accuracy against N per condition with 95% Wilson CIs; the unablated accuracy as a
    line and band; the random draws as their 2.5-97.5% band (or points, for < 3 draws)."""
    if df.empty:
        return None
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
        by_n = random.groupby("n_heads")["accuracy"]
        draws = int(by_n.size().min())
        if draws >= 3:
            band = by_n.quantile([0.025, 0.975]).unstack()
            ax.fill_between(band.index, 100 * band[0.025], 100 * band[0.975],
                            color=COLORS["random"], alpha=0.3, lw=0,
                            label=f"random heads: 2.5-97.5% of {draws} draws")
            ax.plot(band.index, 100 * by_n.median(), color=COLORS["random"], lw=1, marker="s",
                    ms=4, clip_on=False, zorder=4)
        else:
            ax.plot(random.n_heads, 100 * random.accuracy, "o", color=COLORS["random"],
                    ms=5, clip_on=False, label=f"random heads ({len(random)} draws)")
    measured = sorted(int(n) for n in df.loc[df.condition != "none", "n_heads"].unique())
    dodge = 0.012 * max(1, measured[-1] - measured[0]) if measured else 0
    for cond, shift in (("high", -dodge), ("low", dodge)):  # side by side where they meet
        g = df[df.condition == cond].sort_values("n_heads")
        if g.empty:
            continue
        y = 100 * g.accuracy
        yerr = np.clip([y - 100 * g.ci_low, 100 * g.ci_high - y], 0, None)
        ax.errorbar(g.n_heads + shift, y, yerr=yerr, marker="o", ms=5, capsize=3,
                    color=COLORS[cond], clip_on=False, zorder=3,
                    label={"high": "top-N by score (induction heads)",
                           "low": "layer-matched lowest-N (control)"}[cond])
    if measured:
        ax.set_xticks(measured)
        pad = max(1.0, 0.06 * (measured[-1] - measured[0]))
        ax.set_xlim(measured[0] - pad, measured[-1] + pad)
    ax.set_ylim(-3, 103)  # a point at 0% or 100% and its marker stay inside the frame
    ax.set_xlabel("heads ablated (N)")
    ax.set_ylabel("accuracy (%), error bars: 95% Wilson CI")
    ax.set_title(title or "bAbI accuracy vs number of ablated heads", fontsize=10)
    ax.grid(alpha=0.25)
    ax.legend(fontsize=8, loc="lower left")
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
    order = {"none": 0, "high": 1, "low": 2, "random": 3}
    keys = sorted(pooled.groupby(["condition", "n_heads"]).groups,
                  key=lambda k: (order.get(k[0], 9), k[1]))
    for i, (cond, n) in enumerate(keys):
        g = pooled[(pooled.condition == cond) & (pooled.n_heads == n)].sort_values(
            "examples_before")
        bounds = np.array([st.wilson_interval(int(k), int(m))
                           for k, m in zip(g.n_correct, g.n_items)])
        label = "unablated" if cond == "none" else f"{cond} N={n}" + (
            f" ({draws[n]} draws pooled)" if cond == "random" else "")
        x = g.examples_before + 0.04 * (i - (len(keys) - 1) / 2)  # lines at 100% side by side
        color = COLORS.get(cond, "tab:green")
        ax.plot(x, 100 * g.n_correct / g.n_items, marker="o", ms=4, color=color,
                ls="-" if cond == "none" else styles[int(n)], label=label, clip_on=False)
        ax.fill_between(x, 100 * bounds[:, 0], 100 * bounds[:, 1], color=color, alpha=0.12,
                        lw=0)
    ax.set_xticks(sorted(int(v) for v in curve.examples_before.unique()))
    ax.set_ylim(-3, 103)
    ax.set_xlabel("answered examples before the question")
    ax.set_ylabel("accuracy (%), bands: 95% Wilson CI")
    ax.set_title(title or "In-context learning curve", fontsize=10)
    ax.grid(alpha=0.25)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    write_figure(path, fig)
    plt.close(fig)
    return path


def plot_ablated_heads(jobs: list[FinishedJob], sweep_dir: Path) -> list[Path]:
    """For each score table the sweep's jobs ranked by: its heatmap with the heads ablated
    at the largest N marked (top-N, the layer-matched control and one random draw), as
    ``heads_<rank_by>.png`` (``heads_<rank_by>_<i>.png`` for several tables)."""
    from .score_table import save_heatmap

    by_table: dict[tuple[str, str], list[FinishedJob]] = {}
    for job in jobs:
        r = job.record
        if r.scores_file and r.heads:
            by_table.setdefault((r.scores_file, r.rank_by), []).append(job)
    paths = []
    for i, ((table, rank_by), tjobs) in enumerate(sorted(by_table.items())):
        try:
            scores = pd.read_csv(table)
        except (OSError, ValueError) as err:
            log.warning("no heatmap of %s: %s", table, err)
            continue
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
        paths.append(save_heatmap(scores, rank_by, sweep_dir / name, model, marks))
    return paths


def merge_scan(sweep_dir: Path, parts: list[Path]) -> pd.DataFrame:
    """Merge per-layer scan jobs (SLURM splits) into one scan.csv with plots."""
    from .scan import write_scan_outputs

    frames = [pd.read_csv(p / "scan.csv") for p in parts]
    records = [read_record(p) for p in parts]
    models = {r.model for r in records}
    if len(models) > 1:
        raise SummaryError(f"scan parts of different models are not merged: {sorted(models)}")
    df = pd.concat(frames, ignore_index=True).drop_duplicates(["layer", "head"], keep="last")
    write_scan_outputs(df, sweep_dir, records[0].rank_by, records[0].model)
    log.info("merged %d scan parts (%d heads) into %s", len(parts), len(df), sweep_dir)
    return df


def summarize(sweep_dir: str | Path, not_finished: list[tuple[str, str]] | None = None
              ) -> pd.DataFrame:
    """Write summary.csv/.md/.tex and plots into ``sweep_dir``; return the table.

    ``not_finished`` lists (job, why) pairs the launcher knows failed, including jobs that
    never started and so left no folder behind.
    """
    sweep_dir = Path(sweep_dir)
    if not sweep_dir.is_dir():
        raise SummaryError(f"{sweep_dir}: not a folder")
    found = find_jobs(sweep_dir)
    known = dict(not_finished or [])  # what the launcher knows beats "no job.json"
    found.problems = [(f, known.pop(f, why)) for f, why in found.problems] + list(known.items())
    expected = expected_jobs(sweep_dir)
    if expected is not None:
        count, names = expected
        present = {str(j.path.relative_to(sweep_dir)) for j in found.jobs} | \
            {str(p.relative_to(sweep_dir)) for p in found.scan_parts} | \
            {f for f, _ in found.problems}
        missing = [n for n in names if n not in present]
        found.problems += [(n, "multirun.yaml lists this job, but its folder is missing "
                               "(never ran, or deleted)") for n in missing]
        if not names and count > len(present):
            found.problems.append((str(sweep_dir), f"multirun.yaml lists {count} jobs, "
                                                   f"{len(present)} folders were found"))
    if not found.jobs and not found.problems and not found.scan_parts:
        raise SummaryError(f"{sweep_dir}: no ih_sweep jobs here (no job.json or .hydra/)")
    for folder, why in found.problems:
        log.warning("left out %s: %s", folder, why)
    if found.scan_parts:
        merge_scan(sweep_dir, found.scan_parts)
        if not found.jobs:
            return pd.DataFrame(columns=SUMMARY_COLUMNS)
    df, notes = summarize_jobs(found.jobs)
    write_csv(sweep_dir / "summary.csv", df)
    write_text(sweep_dir / "summary.md", to_markdown(df, found.problems, notes))
    write_text(sweep_dir / "summary.tex", to_latex(df))
    groups = list(df.groupby("group", sort=False))
    for i, (_, g) in enumerate(groups):
        name = "accuracy_vs_n.png" if len(groups) == 1 else f"accuracy_vs_n_{i}.png"
        plot_accuracy_vs_n(g, sweep_dir / name, title=_short_title(g.iloc[0]))
    heatmaps = plot_ablated_heads(found.jobs, sweep_dir)
    curve = icl_curve(found.jobs)
    if not curve.empty:
        write_csv(sweep_dir / "icl_curve.csv", curve)
        plot_icl(curve, sweep_dir / "icl_curve.png",
                 title="In-context learning curve: " + _short_title(df.iloc[0]))
    for note in notes:
        log.info("%s", note)
    log.info("summary of %d jobs (%d rows) written to %s (%d left out)", len(found.jobs),
             len(df), sweep_dir, len(found.problems))
    if heatmaps:
        log.info("ablated heads on their scores: %s", ", ".join(p.name for p in heatmaps))
    return df


def console_report(df: pd.DataFrame, sweep_dir: Path) -> str:
    """What a sweep prints when it ends: each group's table and where the files are."""
    parts = [f"\n{gname}\n{markdown_table(display_table(g))}"
             for gname, g in df.groupby("group", sort=False)]
    parts.append(f"\nSummary (summary.md, summary.csv, summary.tex, figures) and one folder "
                 f"per job in: {sweep_dir}")
    return "\n".join(parts)


def main(argv: list[str] | None = None) -> int:
    """``python -m ih_sweep.summarize <sweep dir>``: (re)build a sweep's summary files."""
    parser = argparse.ArgumentParser(prog="python -m ih_sweep.summarize",
                                     description="Summarize an ih_sweep multirun folder.")
    parser.add_argument("sweep_dir", help="the multirun folder (hydra.sweep.dir)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    try:
        df = summarize(args.sweep_dir)
    except SummaryError as err:
        print(f"ih_sweep.summarize: {err}", file=sys.stderr)
        return 2
    print(console_report(df, Path(args.sweep_dir)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
