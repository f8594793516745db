"""Several sweeps side by side: one table and one figure with a row group per model.

``python -m ih_sweep.report A B [C ...] [--out OUT]`` (issue #18 item 5): sweeps of
different models, or of one model in different quantizations or dtypes. Each sweep is read
and summarized with the summary's own machinery (:func:`ih_sweep.report.discover.find_jobs`,
:func:`ih_sweep.report.groups.cell_groups`, :func:`ih_sweep.report.rows.summarize_jobs`: the
same numbers as its summary.csv); this module only
arranges them. Jobs of different models (or of different groups of one sweep) are never
compared with each other: every difference in the table is within one row group.

A **model** is what :func:`model_identity` reads from a job's settings: every ``model.*``
and ``quantization.*`` key (``quantization.double_quant`` and ``compute_dtype`` only for a
quantized model). Its label is ``model.name``, followed, where the table has several models
of that name, by the keys in which they differ, e.g. ``tiny (quantization=none)`` and
``tiny (quantization=nf4)``, or ``tiny (dtype=bfloat16)`` and ``tiny (dtype=float32)``.
One model in two of the sweeps given is refused (:class:`CrossModelError`): the table puts
different models side by side; one model's runs belong in one sweep (whose summary
compares them).

Nothing is written into the sweeps: the files go to ``--out`` (default
``outputs/compare/<time>``), which must not lie inside one of them.

cross_model.csv columns (one row per model, sweep group and N)
---------------------------------------------------------------
model_key        the row group's label (above)
model, quantization, dtype   ``model.name``, ``quantization.name``, ``model.dtype``
sweep            the sweep folder the row comes from
group            the sweep's group (summary.csv ``group``): the settings its jobs share
n_heads          N, heads ablated (0 in a group that has only the unablated job)
n_heads_share    the share of all the model's heads asked for, in percent (``n_heads=10%``:
                 10.0; summary.csv ``n_heads_share``), empty where a count was asked
n_items          items of the unablated job (of the first ablated job without one)
accuracy_<c>, ci_low_<c>, ci_high_<c>   for c in none, high, low: the accuracy and its
                 Wilson 95% interval (summary.csv ``accuracy``, ``ci_low``, ``ci_high``)
accuracy_random  mean accuracy of the ``random`` draws at N; n_random: how many draws
delta_high_vs_none, delta_high_vs_none_ci_low, ..._ci_high, p_high_vs_none,
p_high_vs_none_holm   ``high`` minus ``none`` on the same items, its paired bootstrap 95% CI,
                 exact McNemar p and its Holm adjustment within the sweep (summary.csv
                 ``delta_vs_none``, ``delta_ci_low``, ``delta_ci_high``, ``p_vs_none``,
                 ``p_vs_none_holm`` of the ``high`` row)
delta_high_vs_low, delta_high_vs_low_ci_low, ..._ci_high, p_high_vs_low   ``high`` minus
                 ``low`` at N: summary.csv ``delta_vs_low``, ``delta_vs_low_ci_low``,
                 ``delta_vs_low_ci_high`` and ``p_vs_low``
p_high_vs_random empirical p of ``high`` among the random draws at N (summary.csv)
within_near_ties_vs_none, within_near_ties_vs_low   the near-tie floor's verdict on the
                 two deltas (summary.csv, empty where the jobs have no ``near_tie``):
                 True when near-ties alone could produce the difference

Files in the output folder: cross_model.csv, cross_model.md (the table, its legend, the
row groups' sweeps and settings, the jobs left out), cross_model.tex (booktabs) and
cross_model.png (accuracy against N, one panel per row group). As for one sweep, a step
that fails does not stop the others and jobs left out are listed; both end in
:class:`~ih_sweep.report.errors.SummaryIncomplete`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ih_sweep.io_utils import write_csv, write_figure, write_text
from ih_sweep.report.cells import draws_text, inside, interval, missing, n_text, p_value, percent
from ih_sweep.report.discover import FinishedJob, SweepJobs, find_jobs, missing_jobs
from ih_sweep.report.errors import SummaryError, SummaryIncomplete, why
from ih_sweep.report.figures import pyplot
from ih_sweep.report.groups import Group, cell_groups, flat, settings_of
from ih_sweep.report.plots import COLORS, dose_axis
from ih_sweep.report.render import latex_table
from ih_sweep.report.rows import summarize_jobs
from ih_sweep.report.sections import display

log = logging.getLogger(__name__)

CONDITIONS = ("none", "high", "low")
CROSS_COLUMNS = ["model_key", "model", "quantization", "dtype", "sweep", "group", "n_heads",
                 "n_heads_share", "n_items",
                 *(f"{m}_{c}" for c in CONDITIONS for m in ("accuracy", "ci_low", "ci_high")),
                 "accuracy_random", "n_random",
                 "delta_high_vs_none", "delta_high_vs_none_ci_low", "delta_high_vs_none_ci_high",
                 "p_high_vs_none", "p_high_vs_none_holm",
                 "delta_high_vs_low", "delta_high_vs_low_ci_low", "delta_high_vs_low_ci_high",
                 "p_high_vs_low", "p_high_vs_random",
                 "within_near_ties_vs_none", "within_near_ties_vs_low"]
DEFAULT_OUT = "outputs/compare"


class CrossModelError(SummaryError):
    """Sweeps that cannot share a cross-model table (one model in two of them, an output
    folder inside a sweep): a user error, exit status 2."""


# --------------------------------------------------------------------------- models
def model_identity(record) -> dict[str, Any]:
    """What makes a job's model: its settings' ``model.*`` and ``quantization.*`` keys,
    flattened (``model.dtype``, ``quantization.name``, ...); the quantization's own settings
    only when it quantizes (``none`` ignores them). Records without settings (older jobs)
    give ``model.name`` and ``quantization.name``."""
    settings = settings_of(record)
    ident = flat({k: settings.get(k) or {} for k in ("model", "quantization")})
    ident.setdefault("model.name", record.model)
    ident.setdefault("quantization.name", record.quantization)
    if ident["quantization.name"] == "none":
        ident = {k: v for k, v in ident.items()
                 if not k.startswith("quantization.") or k == "quantization.name"}
    return ident


def _short(key: str) -> str:
    return {"model.dtype": "dtype", "quantization.name": "quantization"}.get(key, key)


def model_labels(identities: list[dict[str, Any]]) -> list[str]:
    """A label per identity: ``model.name``, then, where several identities share that name,
    ``(key=value, ...)`` for the keys in which those differ (among the identities that have
    the key: a quantization's own keys, which only quantized models have, count among
    those)."""
    labels = []
    for ident in identities:
        same = [i for i in identities if i["model.name"] == ident["model.name"]]
        keys = sorted(set().union(*same) - {"model.name"})
        differ = [k for k in keys if len({str(i[k]) for i in same if k in i}) > 1]
        extra = ", ".join(f"{_short(k)}={ident[k]}" for k in differ if k in ident)
        labels.append(str(ident["model.name"]) + (f" ({extra})" if extra else ""))
    return labels


# --------------------------------------------------------------------------- the table
def _frame(row: pd.Series | None, column: str) -> Any:
    return np.nan if row is None or column not in row.index else row[column]


def group_rows(summary: pd.DataFrame, group: Group) -> list[dict]:
    """One row per N of a sweep group: the accuracy of each condition and the high-vs-none
    and high-vs-low statistics, read from the group's rows of the sweep's summary table
    (:func:`ih_sweep.report.rows.summarize_jobs`)."""
    rows_of = summary[summary.group == group.name]

    def one(n: int, cond: str) -> pd.Series | None:
        hit = rows_of[(rows_of.n_heads == n) & (rows_of.condition == cond)]
        return None if hit.empty else hit.iloc[0]

    none = one(0, "none")
    ns = sorted({n for (n, c, _) in group.cells if c != "none"}) or [0]
    out = []
    for n in ns:
        high, low = one(n, "high"), one(n, "low")
        random = rows_of[(rows_of.n_heads == n) & (rows_of.condition == "random")]
        first = next((r for r in (none, high, low) if r is not None), None)
        if first is None and not random.empty:
            first = random.iloc[0]
        row: dict[str, Any] = {"group": group.name, "n_heads": n,
                               "n_heads_share": _frame(high if high is not None else low,
                                                       "n_heads_share"),
                               "n_items": _frame(first, "n_items")}
        for cond, r in (("none", none), ("high", high), ("low", low)):
            for m in ("accuracy", "ci_low", "ci_high"):
                row[f"{m}_{cond}"] = _frame(r, m)
        row["accuracy_random"] = float(random.accuracy.mean()) if len(random) else np.nan
        row["n_random"] = len(random)
        for src, dst in (("delta_vs_none", "delta_high_vs_none"),
                         ("delta_ci_low", "delta_high_vs_none_ci_low"),
                         ("delta_ci_high", "delta_high_vs_none_ci_high"),
                         ("p_vs_none", "p_high_vs_none"), ("p_vs_none_holm", "p_high_vs_none_holm"),
                         ("delta_vs_low", "delta_high_vs_low"),
                         ("delta_vs_low_ci_low", "delta_high_vs_low_ci_low"),
                         ("delta_vs_low_ci_high", "delta_high_vs_low_ci_high"),
                         ("p_vs_low", "p_high_vs_low"),
                         ("p_vs_random", "p_high_vs_random"),
                         ("within_near_ties_vs_none", "within_near_ties_vs_none"),
                         ("within_near_ties_vs_low", "within_near_ties_vs_low")):
            row[dst] = _frame(high, src)
        out.append(row)
    return out


def cross_table(sweeps: Mapping[str, list[FinishedJob]]) -> tuple[pd.DataFrame, list[str]]:
    """The cross-model table of :data:`CROSS_COLUMNS` over ``sweeps`` ({sweep name: its
    finished jobs}), row groups in the order given, and the sweeps' notes (prefixed with the
    sweep). Each sweep is grouped and summarized on its own (``cell_groups``,
    ``summarize_jobs``). Raises :class:`CrossModelError` when one model (:func:`model_identity`)
    is in two sweeps."""
    parts: list[tuple[str, dict, list[dict]]] = []  # (sweep, identity, rows)
    notes: list[str] = []
    seen: dict[str, str] = {}
    for name, jobs in sweeps.items():
        groups, sweep_notes = cell_groups(jobs)
        summary, _ = summarize_jobs(jobs, (groups, sweep_notes))
        notes += [f"{name}: {note}" for note in sweep_notes]
        for group in groups:
            ident = model_identity(next(iter(group.cells.values())).record)
            key = repr(sorted(ident.items()))
            if seen.setdefault(key, name) != name:
                raise CrossModelError(
                    f"{seen[key]} and {name} both hold {ident['model.name']} (quantization="
                    f"{ident['quantization.name']}, dtype={ident.get('model.dtype')}): a "
                    f"cross-model table compares different models; give one sweep per model "
                    f"(one model's runs belong in one sweep, whose own summary compares them)")
            parts.append((name, ident, group_rows(summary, group)))
    idents = list({repr(sorted(i.items())): i for _, i, _ in parts}.values())
    labels = dict(zip((repr(sorted(i.items())) for i in idents), model_labels(idents)))
    rows = []
    for name, ident, group_rows_ in parts:
        for row in group_rows_:
            rows.append({"model_key": labels[repr(sorted(ident.items()))],
                         "model": ident["model.name"],
                         "quantization": ident["quantization.name"],
                         "dtype": ident.get("model.dtype", ""), "sweep": name, **row})
    return pd.DataFrame(rows, columns=CROSS_COLUMNS), notes


# --------------------------------------------------------------------------- rendering
def _acc(r, cond: str) -> str:
    value = getattr(r, f"accuracy_{cond}")
    if missing(value):
        return ""
    ci = interval(getattr(r, f"ci_low_{cond}"), getattr(r, f"ci_high_{cond}"))
    return f"{percent(value)} {ci}"


def _delta(r, other: str) -> str:
    value = getattr(r, f"delta_high_vs_{other}")
    if missing(value):
        return ""
    ci = interval(getattr(r, f"delta_high_vs_{other}_ci_low"),
                     getattr(r, f"delta_high_vs_{other}_ci_high"))
    return f"{percent(value)} {ci}".strip()


def _random(r) -> str:
    if not r.n_random:
        return ""
    return f"{percent(r.accuracy_random)} ({draws_text(r.n_random)})"


# (markdown header, LaTeX header, cell of a cross_model.csv row); the first two always shown
_CROSS = [
    ("model", "model", lambda r: r.model_key if r.first else ""),
    ("N", "$N$", lambda r: "" if r.n_heads == 0 else n_text(r.n_heads, r.n_heads_share)),
    ("items", "items", lambda r: "" if missing(r.n_items) else str(int(r.n_items))),
    ("none % [95% CI]", r"none (\%) [95\% CI]", lambda r: _acc(r, "none")),
    ("high % [95% CI]", r"high (\%) [95\% CI]", lambda r: _acc(r, "high")),
    ("low % [95% CI]", r"low (\%) [95\% CI]", lambda r: _acc(r, "low")),
    ("random % (draws)", r"random (\%) (draws)", _random),
    ("Δ high vs none (pts) [95% CI]", r"$\Delta$ high vs none (pts) [95\% CI]",
     lambda r: _delta(r, "none")),
    ("p vs none", "$p$ vs none", lambda r: p_value(r.p_high_vs_none)),
    ("Δ high vs low (pts) [95% CI]", r"$\Delta$ high vs low (pts) [95\% CI]",
     lambda r: _delta(r, "low")),
    ("p vs low", "$p$ vs low", lambda r: p_value(r.p_high_vs_low)),
    ("p vs random", "$p$ vs random", lambda r: p_value(r.p_high_vs_random)),
    ("Δ vs none within near-ties", r"$\Delta$ vs none within near-ties",
     lambda r: inside(r.within_near_ties_vs_none)),
    ("Δ vs low within near-ties", r"$\Delta$ vs low within near-ties",
     lambda r: inside(r.within_near_ties_vs_low)),
]

LEGEND = [
    "**model**: one row group per model: `model.name` and the model or quantization settings "
    "in which the sweeps differ. Rows are never compared across groups.",
    "**N**: heads ablated, with the share of all the model's heads where the sweep asked "
    "for one (`7 (10%)`); **items**: items evaluated.",
    "**none / high / low %**: accuracy of the unablated model, the top-N heads by score "
    "and the layer-matched lowest-N control, with 95% Wilson intervals; **random %**: mean "
    "over the layer-matched random draws at N.",
    "**Δ high vs none / vs low**: accuracy difference in points on the same items with its "
    "paired percentile bootstrap 95% CI (2,000 resamples); **p**: exact McNemar (not "
    "adjusted; cross_model.csv also has the Holm-adjusted p vs none within each sweep); "
    "**p vs random**: empirical p among the random draws.",
    "**within near-ties**: `inside` when the near-ties of the two jobs alone could produce "
    "the difference, `outside` when they could not (from the jobs' `near_tie` column).",
]


def row_group_labels(table: pd.DataFrame) -> pd.Series:
    """Each row's group label: its model_key, numbered ``[1]``, ``[2]``, ... where one
    model has several sweep groups (e.g. two ablation methods)."""
    keys = table.model_key + "\0" + table.sweep + "\0" + table.group
    labels = table.model_key.copy()
    for model, part in keys.groupby(table.model_key, sort=False):
        distinct = list(dict.fromkeys(part))
        if len(distinct) > 1:
            number = {k: i + 1 for i, k in enumerate(distinct)}
            labels[part.index] = [f"{model} [{number[k]}]" for k in part]
    return labels


def display_table(table: pd.DataFrame, latex: bool = False) -> pd.DataFrame:
    """The rows a reader sees: the row group named on its first row, columns empty in
    every row dropped (random, near-ties where the jobs lack them)."""
    labels = row_group_labels(table)
    first = ~labels.eq(labels.shift())
    return display(table.assign(model_key=labels, first=first.to_numpy()), _CROSS, latex,
                   keep=2)


def markdown_table(table: pd.DataFrame) -> str:
    """A display table as GitHub markdown: the model left, numbers right."""
    align = ["left" if c == "model" else "right" for c in table.columns]
    return table.to_markdown(index=False, disable_numparse=True, colalign=align)


def to_markdown(table: pd.DataFrame, notes: list[str], problems: list[tuple[str, str]]) -> str:
    """cross_model.md: the table, the row groups' sweeps and settings, notes, the legend
    and the jobs left out."""
    lines = ["# Cross-model summary", ""]
    if not table.empty:
        lines += [markdown_table(display_table(table)), ""]
    lines += ["## Row groups", ""]
    labelled = table.assign(label=row_group_labels(table))
    for (label, sweep, group), _ in labelled.groupby(["label", "sweep", "group"], sort=False):
        lines.append(f"- **{label}**: `{sweep}`; {group}")
    lines.append("")
    lines += [f"> {note}" for note in notes] + ([""] if notes else [])
    lines += ["### Legend", ""] + [f"- {item}" for item in LEGEND] + [""]
    if problems:
        lines += ["## Jobs left out", ""] + [f"- `{f}`: {why}" for f, why in problems] + [""]
    return "\n".join(lines)


def to_latex(table: pd.DataFrame) -> str:
    """One booktabs table (pandas' Styler.to_latex), like summary.tex."""
    return latex_table(display_table(table, latex=True))


def _distinct_settings(groups: list[str]) -> dict[str, str]:
    """Per group title (``key=value, ...``), the settings not shared by every group."""
    parts = {g: g.split(", ") for g in groups}
    shared = set.intersection(*(set(p) for p in parts.values())) if parts else set()
    return {g: ", ".join(p for p in ps if p not in shared) for g, ps in parts.items()}


def plot_cross(table: pd.DataFrame, path: Path) -> Path | None:
    """Accuracy against N, one panel per row group (model, and sweep group where a model
    has several): ``high`` and ``low`` with 95% Wilson error bars, the random draws' mean,
    the unablated accuracy as a dashed line in its band; colours as the sweep's figure
    (:data:`ih_sweep.report.plots.COLORS`). The x axis is the share of all heads (%, each tick
    with its count) when every ablated row was asked as a share (models of different sizes
    then meet at the same x), else the count N. None for an empty table."""
    if table.empty:
        return None
    table, by_share = dose_axis(table)
    plt = pyplot()
    panels = list(table.assign(label=row_group_labels(table)).groupby(
        ["label", "sweep", "group"], sort=False))
    cols = min(3, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.3 * cols, 3.6 * rows + 0.5), sharey=True,
                             squeeze=False)
    own = _distinct_settings(list(dict.fromkeys(table.group)))
    labels = {}
    for ax, ((key, _, group), g) in zip(axes.flat, panels):
        g = g.sort_values("n_heads")
        r = g.iloc[0]
        if not missing(r.accuracy_none):
            ax.axhspan(100 * r.ci_low_none, 100 * r.ci_high_none, color=COLORS["none"],
                       alpha=0.12, lw=0)
            labels["none"] = ax.axhline(100 * r.accuracy_none, color=COLORS["none"],
                                        lw=1, ls="--")
        ns = g.x[g.n_heads > 0].tolist()
        pad = max(0.5 if by_share else 1.0, 0.06 * (ns[-1] - ns[0])) if ns else 0
        dodge = 0.025 * (ns[-1] - ns[0] + 2 * pad) if ns else 0  # ~2.5% of the axis
        for cond, shift in (("high", -dodge), ("low", dodge)):
            part = g[g[f"accuracy_{cond}"].notna()]
            if part.empty:
                continue
            y = 100 * part[f"accuracy_{cond}"]
            err = np.clip([y - 100 * part[f"ci_low_{cond}"], 100 * part[f"ci_high_{cond}"] - y],
                          0, None)
            labels[cond] = ax.errorbar(part.x + shift, y, yerr=err, marker="o", ms=5,
                                       capsize=3, color=COLORS[cond], clip_on=False,
                                       zorder=3)
        part = g[g.n_random > 0]
        if not part.empty:
            labels["random"] = ax.plot(part.x, 100 * part.accuracy_random, "s",
                                       color=COLORS["random"], ms=5, clip_on=False)[0]
        if ns:
            ticks = [f"{x:.10g}%\n(N={n})" for x, n in zip(ns, g.n_heads[g.n_heads > 0])] \
                if by_share else [str(int(x)) for x in ns]
            ax.set_xticks(ns, ticks)
            ax.set_xlim(ns[0] - pad, ns[-1] + pad)
        else:
            ax.set_xticks([])
        ax.set_ylim(-3, 103)
        ax.set_xlabel("heads ablated (% of all heads; N: the count)" if by_share
                      else "heads ablated (N)")
        ax.set_title(key if key in set(table.model_key) else f"{key}\n{own[group]}",
                     fontsize=9)
        ax.grid(alpha=0.25)
    for ax in axes[:, 0]:
        ax.set_ylabel("accuracy (%), bars: 95% Wilson CI")
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    names = {"none": "unablated (band: 95% CI)", "high": "top-N by score (induction heads)",
             "low": "layer-matched lowest-N (control)", "random": "random heads (mean of draws)"}
    order = [c for c in ("none", "high", "low", "random") if c in labels]
    fig.legend([labels[c] for c in order], [names[c] for c in order], loc="lower center",
               ncol=len(order), fontsize=8, frameon=False, bbox_to_anchor=(0.5, -0.02))
    fig.suptitle("bAbI accuracy vs heads ablated, per model", fontsize=10)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    write_figure(path, fig)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------- I/O
def read_sweep(sweep_dir: Path) -> SweepJobs:
    """A sweep's finished jobs and the jobs left out, as the summary finds them
    (:func:`ih_sweep.report.discover.find_jobs`, and the jobs its multirun.yaml lists whose
    folder is missing).
    Raises :class:`~ih_sweep.report.errors.SummaryError` for a folder that holds no sweep."""
    if not sweep_dir.is_dir():
        raise SummaryError(f"{sweep_dir}: not a folder")
    found = find_jobs(sweep_dir)
    present = {str(p.relative_to(sweep_dir)) for p in
               [j.path for j in found.jobs] + found.scan_parts} | {f for f, _ in found.problems}
    found.problems += missing_jobs(sweep_dir, present, count=False)
    if not found.jobs and not found.problems:
        raise SummaryError(f"{sweep_dir}: no ih_sweep evaluation jobs here (no job.json "
                           "of an evaluate job)")
    return found


def default_out(now: datetime | None = None) -> Path:
    """``outputs/compare/<%Y-%m-%d_%H-%M-%S>`` under the working directory (as Hydra's
    ``outputs/multirun/<time>``)."""
    return Path(DEFAULT_OUT) / (now or datetime.now()).strftime("%Y-%m-%d_%H-%M-%S")


def compare(sweep_dirs: list[str | Path], out: str | Path | None = None) -> pd.DataFrame:
    """Write cross_model.csv/.md/.tex/.png for ``sweep_dirs`` into ``out`` (created;
    default :func:`default_out`) and return the table. Raises
    :class:`~ih_sweep.report.errors.SummaryError` (a folder that is no sweep),
    :class:`CrossModelError` (one model in two sweeps, ``out`` inside a sweep) before
    writing anything, and :class:`~ih_sweep.report.errors.SummaryIncomplete` after writing every
    output it could, when a step failed or jobs were left out."""
    dirs = [Path(d) for d in sweep_dirs]
    out = Path(out) if out is not None else default_out()
    for d in dirs:
        if d.is_dir() and out.resolve().is_relative_to(d.resolve()):
            raise CrossModelError(f"--out {out} lies inside the sweep {d}: the cross-model "
                                  "files go to a folder of their own")
    if len({d.resolve() for d in dirs}) < len(dirs):
        raise CrossModelError("a sweep folder is given twice: " + " ".join(map(str, dirs)))
    found = {str(d): read_sweep(d) for d in dirs}
    problems = [(f"{d}/{f}", reason) for d, s in found.items() for f, reason in s.problems]
    for folder, reason in problems:
        log.warning("left out %s: %s", folder, reason)
    table, notes = cross_table({d: s.jobs for d, s in found.items() if s.jobs})
    out.mkdir(parents=True, exist_ok=True)
    failed: list[tuple[str, str]] = []

    def step(name: str, make: Callable[[], Any]) -> Any:
        try:
            return make()
        except Exception as err:
            log.error("cross-model summary: %s failed: %s", name, why(err))
            failed.append((name, why(err)))
            return None

    step("cross_model.csv", lambda: write_csv(out / "cross_model.csv", table))
    step("cross_model.md", lambda: write_text(out / "cross_model.md",
                                              to_markdown(table, notes, problems)))
    step("cross_model.tex", lambda: write_text(out / "cross_model.tex", to_latex(table)))
    step("cross_model.png", lambda: plot_cross(table, out / "cross_model.png"))
    log.info("cross-model summary of %d sweeps (%d rows) written to %s", len(dirs),
             len(table), out)
    if failed or problems:
        raise SummaryIncomplete(out, table, failed, problems)
    return table
