"""Turn a sweep folder into what a researcher reports: tables, paired statistics, plots.

Runs at the end of every multirun (Hydra callback) and standalone:
``python -m ih_sweep.report.summarize <sweep dir>``; given several sweep folders, the command writes
one cross-model table instead (:mod:`ih_sweep.report.cross_model`). Idempotent; never drops a job
silently. Job folders are read through
:mod:`ih_sweep.pipeline.records` (the same definitions the jobs
write with).

summary.csv columns
-------------------
group            the settings its jobs share, ``model=..., quantization=..., data=...,
                 babi_task=..., split=..., metric=..., scope=..., ablation=..., rank_by=...``;
                 only rows of one group are compared with each other
model, quantization, data, babi_task, split, metric, scope, ablation, rank_by
n_heads, condition, control_seed
n_heads_share    the share of all the model's heads the job was asked for, in percent
                 (``n_heads=10%``: 10.0, n_heads then being its count); empty where a count
                 was asked, for ``none``, and for jobs recorded before shares existed. Tables
                 show N as ``7 (10%)`` where a share was asked, ``7`` otherwise
n_items, n_correct, accuracy, ci_low, ci_high   Wilson 95% interval of the accuracy
delta_vs_none    accuracy minus the unablated accuracy on the same items
delta_ci_low, delta_ci_high   paired bootstrap 95% interval of delta_vs_none
p_vs_none        exact McNemar p of the paired outcomes against ``none``
p_vs_none_holm   Holm-adjusted over every p_vs_none of the sweep (all tasks, N, conditions
                 but ``random``: its draws are the null's sample, not hypotheses; empty there)
delta_vs_low, p_vs_low        for ``high``: against ``low`` at the same N (McNemar)
delta_vs_low_ci_low, delta_vs_low_ci_high   paired bootstrap 95% interval of delta_vs_low
p_vs_random      every row but ``random`` and ``none`` (``high``, ``low`` and any other
                 selection of heads), where the group has ``random`` draws at the same N:
                 empirical p within that null, (1 + #{draws with accuracy <= the row's})
                 / (1 + n_random); one-sided, a draw at least as extreme is one at or below
                 the row's accuracy (ties count against the row), so a small p says that
                 ablating these heads lowers accuracy more than layer-matched random heads
                 do, and a row that hurts less than every draw gets 1
                 (:func:`ih_sweep.report.statistics.empirical_p`). With K draws the smallest
                 possible p is 1 / (K + 1): K >= 19 can reach 0.05
n_random         number of random draws (K) behind p_vs_random and the band
random_acc_p2_5, random_acc_p97_5   the same rows: the 2.5th and 97.5th percentiles of
                 the draws' accuracies at the same N (the null's 95% band; numpy's linear
                 interpolation, as the accuracy-vs-N figure draws it)

Near-tie floor (issue #21 item 4; jobs whose results.csv has ``near_tie``, else empty): a
near-tie is an item decided by a top-1 minus top-2 logit gap small enough that another
numeric precision could flip it.
n_near_tie       items of the job that are near-ties
near_tie_acc_low, near_tie_acc_high   the accuracy if every near-tie fell the other way:
                 acc - #(near-tie, correct)/n, acc + #(near-tie, wrong)/n
delta_vs_none_nt_low, delta_vs_none_nt_high   the range of delta_vs_none if every near-tie
                 of either job fell the other way (the two jobs' ranges combined)
within_near_ties_vs_none   whether that range reaches 0 (and is not empty): near-ties alone
                 could produce the difference; False without near-ties
delta_vs_low_nt_low, delta_vs_low_nt_high, within_near_ties_vs_low   the same against ``low``
random_within_near_ties   for ``high``: of the n_random draws, how many differ from it by an
                 amount near-ties alone could produce

Continuous metrics (issue #17; jobs whose results.csv has the column, else empty), for
<m> in gold_logprob (nats: summed log-probability of the gold answer's tokens) and
logit_diff (the gold first token's logit minus the best other candidate answer's):
<m>              the job's mean over items
<m>_vs_none, <m>_vs_none_ci_low, <m>_vs_none_ci_high   mean paired difference against
                 ``none`` (items matched by story and question) with its paired bootstrap
                 95% interval (percentile, 2,000 resamples)
<m>_vs_low, ..._ci_low, ..._ci_high      for ``high``: against ``low`` at the same N
<m>_vs_random, ..._ci_low, ..._ci_high   for ``high``: against the per-item mean of the
                 ``random`` draws at the same N

Mechanism check (job.json ``mechanism``; empty for jobs without it): repeat_loss,
repeat_loss_unablated (nats, loss on the repeated half of seeded repeated random-token
sequences with the job's heads ablated / unablated), icl_score, icl_score_unablated
(Olsson et al. 2022: loss at a late token minus loss at an early token).

strata.csv (jobs whose results.csv has the stratum columns): accuracy (Wilson 95% CI) and
the continuous metrics' means per stratum, per group, condition and N (random draws of an N
pooled), for support_distance (1, 2, 3, 4, 5+), recency_correct, mentions and
question_position (0-4, 5+).

robustness.csv (sweeps whose groups differ only in the ablation settings, e.g.
``ablation=zero,mean,position_mean,resample``): one row per such family, N and ablation
family          the settings the family's groups share (every group key but ablation)
n_heads, ablation   N; the group's ablation method (with its other ablation settings where
                 the family's groups differ in them, e.g. ``mean (n_reference=128)``)
n_items, accuracy_high, accuracy_low, accuracy_none
delta_high_vs_none, ..._ci_low, ..._ci_high, p_high_vs_none   ``high`` minus ``none`` on
                 the same items, paired bootstrap 95% CI, exact McNemar p (as in summary.csv)
delta_high_vs_low, ..._ci_low, ..._ci_high, p_high_vs_low     ``high`` minus the ``low``
                 control at the same N, the same statistics

A step that fails (a table, a figure) does not stop the others; :func:`summarize` then
raises :class:`SummaryIncomplete` naming it, so the command exits non-zero.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ih_sweep.config.schema import FV_KEYS
from ih_sweep.io_utils import write_csv, write_figure, write_text
from ih_sweep.pipeline.records import (
    EvaluationRecord,
    RecordError,
    ScanRecord,
    SeedsRecord,
    read_record,
)
from ih_sweep.report import statistics as st
from ih_sweep.report.figures import pyplot

log = logging.getLogger(__name__)

GROUP_KEYS = ["model", "quantization", "data", "babi_task", "split", "metric", "scope",
              "ablation", "rank_by"]
CONTINUOUS = ["gold_logprob", "logit_diff"]  # results.csv per-item metrics (issue #17)
MECHANISM_COLUMNS = ["repeat_loss", "repeat_loss_unablated", "icl_score",
                     "icl_score_unablated"]  # job.json "mechanism"
NEAR_TIE_COLUMNS = ["n_near_tie", "near_tie_acc_low", "near_tie_acc_high",
                    "delta_vs_none_nt_low", "delta_vs_none_nt_high", "within_near_ties_vs_none",
                    "delta_vs_low_nt_low", "delta_vs_low_nt_high", "within_near_ties_vs_low",
                    "random_within_near_ties"]
CONTINUOUS_COLUMNS = [f"{m}{suffix}" for m in CONTINUOUS for suffix in
                      ["", *(f"_vs_{c}{b}" for c in ("none", "low", "random")
                             for b in ("", "_ci_low", "_ci_high"))]]
SUMMARY_COLUMNS = ["group", *GROUP_KEYS, "n_heads", "n_heads_share", "condition",
                   "control_seed", "n_items", "n_correct", "accuracy", "ci_low", "ci_high",
                   "delta_vs_none", "delta_ci_low", "delta_ci_high", "p_vs_none", "p_vs_none_holm",
                   "delta_vs_low", "delta_vs_low_ci_low", "delta_vs_low_ci_high", "p_vs_low",
                   "p_vs_random", "n_random",
                   "random_acc_p2_5", "random_acc_p97_5",
                   *NEAR_TIE_COLUMNS, *CONTINUOUS_COLUMNS, *MECHANISM_COLUMNS]
STRATA = {  # results.csv column: (what it is, for tables and figures; bucket the top at 5+)
    "support_distance": ("statements back to the supporting fact", True),
    "recency_correct": ("the most recent location of anyone is the answer", False),
    "mentions": ("mentions of the asked person before the question", True),
    "question_position": ("index of the question in its story, 0-based", True),
}


class SummaryError(ValueError):
    """Nothing to summarize (not a folder, no jobs): the user gave the wrong folder."""


class SummaryIncomplete(RuntimeError):
    """The summary was written, but some step failed or some jobs are missing from it.
    ``table``: the summary table (None where it could not be made); ``failed``: (step,
    why) for each output not written; ``left_out``: (job folder, why)."""

    def __init__(self, sweep_dir: Path, table: pd.DataFrame | None,
                 failed: list[tuple[str, str]], left_out: list[tuple[str, str]]):
        self.table, self.failed, self.left_out = table, failed, left_out
        parts = [f"{step} failed ({why})" for step, why in failed]
        if left_out:
            parts.append(f"{len(left_out)} job(s) left out ("
                         + "; ".join(f"{f}: {why}" for f, why in left_out) + ")")
        super().__init__(f"the summary in {sweep_dir} is incomplete: " + "; ".join(parts))


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
    seed_parents: list[Path] = field(default_factory=list)  # several-draw jobs' folders


DEFAULT_SUBDIR = "${path_safe:${hydra.job.override_dirname}}"


def expected_jobs(sweep_dir: Path) -> tuple[int, list[str]] | None:
    """(how many jobs the sweep's ``multirun.yaml`` launched, their folder names where the
    job folders have the default names), or None without a readable multirun.yaml. The jobs
    are expanded from its overrides the way Hydra's basic sweeper does."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from omegaconf import OmegaConf

    from ih_sweep.config.hydra import register
    from ih_sweep.config.identity import folder_name, speed_keys

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
    """Find job folders (those with a .hydra/ or job.json) and sort good from broken. A
    several-draw job's folder (``control_seeds=K``) lists its draws, each a job folder
    of its own below it: it is kept apart (:attr:`SweepJobs.seed_parents`), and reported
    only when a listed draw's folder is missing."""
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
        if isinstance(record, SeedsRecord):  # its draws are job folders of their own
            gone = [f for f in record.seed_folders if not (folder / f / "job.json").is_file()]
            if gone:
                out.problems.append((rel, f"the draw folder(s) {', '.join(gone)} of this "
                                          "several-draw job are missing"))
            else:
                out.seed_parents.append(folder)
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


def _number(value) -> float:
    """A recorded number as float; nan where it is missing or not a number."""
    try:
        return float(value)
    except (TypeError, ValueError):
        return float("nan")


def _share(job: FinishedJob) -> float:
    """The share of all heads the job was asked for (percent; ``n_heads=10%``: 10.0), nan
    where it was asked a count, ablates nothing, or was recorded before shares existed."""
    r = job.record
    unablated = r.condition == "none" or r.n_heads == 0
    return np.nan if unablated else _number(getattr(r, "n_heads_share", None))


def n_text(n, share=None) -> str:
    """How tables show N: the count, with the share of all heads asked for where the job
    was asked one (``7 (10%)``), else the count alone (``7``)."""
    return f"{int(n)}" + ("" if _missing(share) else f" ({float(share):.10g}%)")


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
# named in a group's title whenever its jobs have them, also in a sweep of one group: an
# exclusion arm (Yin & Steinhardt's) must not read as plain top-N by rank_by
_TITLE_ALWAYS = ("scoring.exclude_by", "scoring.exclude_share")


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


# dotted settings the base title (group_title) already names under GROUP_KEYS
_FV = {f"scoring.{key}" for key in FV_KEYS}
_IN_BASE_TITLE = {"model.name", "quantization.name", "data.name", "data.task", "data.split",
                  "eval.metric", "eval.scope", "ablation.method", "scoring.rank_by"}


def _differing_settings(groups: list[list[FinishedJob]]) -> list[str]:
    """The dotted settings whose values differ between groups (a setting absent from some
    groups differs from the value it has in others), but the FV settings
    (``schema.FV_KEYS``): they differ only where two groups computing FV scores set them
    apart; an arm that computes none has none, and ``rank_by``/``exclude_by`` name FV."""
    flats = [_flat({k: v for k, v in _settings_of(g[-1].record).items()
                    if k not in _SELECTION}) for g in groups]
    keys = sorted(set().union(*flats))
    return [k for k in keys if len({str(f.get(k)) for f in flats if k in f or k not in _FV}) > 1]


@dataclass
class Group:
    """One group of comparable jobs (:func:`group_jobs`): its title and one job per cell
    ``(n_heads, condition, control_seed)`` (``none`` is the cell ``(0, "none", 0)``)."""

    name: str
    cells: dict[tuple[int, str, int], FinishedJob]

    def control(self, n: int, condition: str) -> list[FinishedJob]:
        """The jobs of ``condition`` at ``n`` (every random draw)."""
        return [j for (nn, c, _), j in self.cells.items() if nn == n and c == condition]


def cell_groups(jobs: list[FinishedJob]) -> tuple[list[Group], list[str]]:
    """The groups of :func:`group_jobs`, each with its title and one job per cell, and
    notes on what was merged: jobs with the same cell (e.g. ``none`` at every N, or
    non-random conditions crossed with control seeds) evaluate the same thing: one row."""
    notes = []
    groups, differing = group_jobs(jobs)
    if differing:
        notes.append("Jobs differ in " + ", ".join(differing) + "; each group is "
                     "summarized on its own and never pooled.")
    out = []
    for gjobs in groups:
        gjobs = sorted(gjobs, key=lambda j: (j.record.n_heads, j.record.condition,
                                             j.record.control_seed))
        base = _group_of(gjobs[-1])
        settings = _flat(_settings_of(gjobs[-1].record))
        # a setting the group's jobs do not have (resample's ablation.seed) names nothing
        named = [k for k in differing if k not in _IN_BASE_TITLE] + \
            [k for k in _TITLE_ALWAYS if k not in differing]
        gname = group_title(base) + "".join(f", {k}={settings.get(k)}" for k in named
                                            if k not in base and k in settings)
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
        if {c for _, c, _ in by_cell} == {"random"}:
            notes.append(f"{gname}: only random draws, so nothing is compared: add "
                         "condition=none (the unablated model) and condition=high (the "
                         "induction heads) to the sweep to test the random draws against.")
        out.append(Group(gname, by_cell))
    return out, notes


def _accuracy_row(job: FinishedJob, group: Group, n: int, cond: str) -> dict:
    """Accuracy, its Wilson interval and the paired tests against ``none``, (rows
    ``high``) against ``low``, and (every row but ``random`` and ``none``) the empirical
    p within the ``random`` draws at the same N and their 2.5-97.5% band."""
    res = job.results
    k, total = int(res["correct"].sum()), len(res)
    lo, hi = st.wilson_interval(k, total)
    row = {"n_items": total, "n_correct": k,
           "accuracy": k / total if total else float("nan"), "ci_low": lo, "ci_high": hi}
    none = group.cells.get((0, "none", 0))
    if none is not None and cond != "none":
        a, b = _paired(res, none.results)
        row["delta_vs_none"] = float(a.mean() - b.mean()) if len(a) else np.nan
        row["delta_ci_low"], row["delta_ci_high"] = st.paired_bootstrap_ci(a, b)
        row["p_vs_none"] = st.mcnemar_exact(*st.discordant(a, b))
    if cond == "high":
        low = group.cells.get((n, "low", 0))
        if low is not None:
            a, b = _paired(res, low.results)
            row["delta_vs_low"] = float(a.mean() - b.mean()) if len(a) else np.nan
            row["delta_vs_low_ci_low"], row["delta_vs_low_ci_high"] = \
                st.paired_bootstrap_ci(a, b)
            row["p_vs_low"] = st.mcnemar_exact(*st.discordant(a, b))
    row |= _null_row(row["accuracy"], group, n, cond)
    return row


def _null_row(accuracy: float, group: Group, n: int, cond: str) -> dict:
    """``p_vs_random``, ``n_random`` and the null's band for a row of a condition other
    than ``random`` and ``none``, from the group's ``random`` draws at the same N; empty
    where there are none."""
    draws = group.control(n, "random")
    if cond in ("random", "none") or not draws:
        return {}
    null = [j.results["correct"].mean() for j in draws]
    low, high = st.null_band(null)
    return {"p_vs_random": st.empirical_p(accuracy, null), "n_random": len(draws),
            "random_acc_p2_5": low, "random_acc_p97_5": high}


def summarize_jobs(jobs: list[FinishedJob], grouped: tuple[list[Group], list[str]] | None = None
                   ) -> tuple[pd.DataFrame, list[str]]:
    """One row per distinct job of each group (:func:`cell_groups`; ``grouped``: its result
    when already computed) with the statistics of the module docstring: accuracy and its
    tests, the near-tie floor, the continuous metrics and the mechanism check (the last
    three where the jobs recorded them)."""
    rows = []
    groups, notes = grouped or cell_groups(jobs)
    for group in groups:
        for (n, cond, seed), job in group.cells.items():
            row = {"group": group.name, **_group_of(job), "n_heads": n,
                   "n_heads_share": _share(job), "condition": cond, "control_seed": seed}
            row |= _accuracy_row(job, group, n, cond)
            row |= _near_tie_row(job, group, n, cond)
            row |= _continuous_row(job, group, n, cond)
            mechanism = job.record.mechanism if isinstance(job.record.mechanism, dict) else {}
            row |= {k: _number(mechanism.get(k)) for k in MECHANISM_COLUMNS}
            rows.append(row)
    # one family across tasks, N values and conditions of the whole sweep; the random draws
    # are the null's sample, not hypotheses: outside the family (their Holm p stays empty)
    ps = [np.nan if r["condition"] == "random" else r.get("p_vs_none", np.nan) for r in rows]
    for r, adj in zip(rows, st.holm(ps)):
        r["p_vs_none_holm"] = adj
    df = pd.DataFrame(rows)
    for col in SUMMARY_COLUMNS:
        if col not in df.columns:
            df[col] = np.nan
    return df[SUMMARY_COLUMNS], notes


# --------------------------------------------------------------------------- robustness
ROBUSTNESS_COLUMNS = ["family", "n_heads", "n_heads_share", "ablation", "n_items", "accuracy_high",
                      "accuracy_low", "accuracy_none",
                      *(f"delta_high_vs_{c}{s}" for c in ("none", "low")
                        for s in ("", "_ci_low", "_ci_high")),
                      "p_high_vs_none", "p_high_vs_low"]
_ABLATION_KEY = re.compile(r", ablation(\.[\w.]+)?=[^,]*")


def _ablation_families(groups: list[Group]) -> list[tuple[str, list[tuple[str, Group]]]]:
    """Groups that differ only in their ablation settings, as (family title, [(ablation
    label, group)]) for families of at least two groups. The label is the method, with the
    other ablation settings in which the family's groups differ."""
    found: dict[str, list[tuple[dict, Group]]] = {}
    for g in groups:
        ablated = [j for (_, c, _), j in g.cells.items() if c != "none"]
        if not ablated:
            continue
        record = ablated[0].record
        ablation = _flat(_settings_of(record).get("ablation") or {"method": record.ablation})
        ablation.setdefault("method", record.ablation)
        key = _settings_key(record, _SELECTION + ("ablation",))
        found.setdefault(key, []).append((ablation, g))
    out = []
    for members in found.values():
        if len(members) < 2:
            continue
        keys = sorted(set().union(*(a for a, _ in members)) - {"method"})
        # settings that differ where set (resample's seed is absent from other methods')
        differ = [k for k in keys if len({str(a[k]) for a, _ in members if k in a}) > 1]
        labelled = []
        for ablation, g in members:
            extra = ", ".join(f"{k}={ablation[k]}" for k in differ if k in ablation)
            labelled.append((str(ablation["method"]) + (f" ({extra})" if extra else ""), g))
        out.append((_ABLATION_KEY.sub("", members[0][1].name), labelled))
    return out


def robustness_table(jobs: list[FinishedJob], groups: list[Group] | None = None
                     ) -> pd.DataFrame:
    """Per family of groups that differ only in how heads are ablated
    (:func:`_ablation_families`), per N and ablation: the ``high`` - ``none`` and ``high``
    - ``low`` accuracy effects with paired bootstrap 95% CIs and exact McNemar p (the
    statistics of :func:`_accuracy_row`). Empty when the sweep has no such family.
    ``groups``: :func:`cell_groups` of ``jobs`` when already computed."""
    rows = []
    groups = groups if groups is not None else cell_groups(jobs)[0]
    for family, members in _ablation_families(groups):
        for label, g in members:
            none = g.cells.get((0, "none", 0))
            for n in sorted({n for (n, c, _) in g.cells if c == "high"}):
                high, low = g.cells[(n, "high", 0)], g.cells.get((n, "low", 0))
                row = {"family": family, "n_heads": n, "n_heads_share": _share(high),
                       "ablation": label,
                       "n_items": len(high.results),
                       "accuracy_high": float(high.results["correct"].mean())}
                for name, other in (("none", none), ("low", low)):
                    if other is None:
                        continue
                    row[f"accuracy_{name}"] = float(other.results["correct"].mean())
                    a, b = _paired(high.results, other.results)
                    row[f"delta_high_vs_{name}"] = float(a.mean() - b.mean()) if len(a) \
                        else np.nan
                    row[f"delta_high_vs_{name}_ci_low"], \
                        row[f"delta_high_vs_{name}_ci_high"] = st.paired_bootstrap_ci(a, b)
                    row[f"p_high_vs_{name}"] = st.mcnemar_exact(*st.discordant(a, b))
                rows.append(row)
    df = pd.DataFrame(rows)
    for col in ROBUSTNESS_COLUMNS:
        if col not in df.columns:
            df[col] = np.nan
    return df[ROBUSTNESS_COLUMNS]


_ROBUSTNESS = [
    ("N", "$N$", lambda r: n_text(r.n_heads, r.n_heads_share)),
    ("ablation", "ablation", lambda r: r.ablation),
    ("items", "items", lambda r: str(r.n_items)),
    ("high %", r"high (\%)", lambda r: percent(r.accuracy_high)),
    ("low %", r"low (\%)", lambda r: percent(r.accuracy_low)),
    ("none %", r"none (\%)", lambda r: percent(r.accuracy_none)),
    ("Δ high vs none (pts)", r"$\Delta$ high vs none (pts)",
     lambda r: percent(r.delta_high_vs_none)),
    ("95% CI of Δ vs none", r"95\% CI of $\Delta$ vs none",
     lambda r: interval(r.delta_high_vs_none_ci_low, r.delta_high_vs_none_ci_high)),
    ("p vs none", "$p$ vs none", lambda r: p_value(r.p_high_vs_none)),
    ("Δ high vs low (pts)", r"$\Delta$ high vs low (pts)",
     lambda r: percent(r.delta_high_vs_low)),
    ("95% CI of Δ vs low", r"95\% CI of $\Delta$ vs low",
     lambda r: interval(r.delta_high_vs_low_ci_low, r.delta_high_vs_low_ci_high)),
    ("p vs low", "$p$ vs low", lambda r: p_value(r.p_high_vs_low)),
]

ROBUSTNESS_LEGEND = [
    "**Robustness across ablation methods** (robustness.csv): for groups that differ only in "
    "how heads are ablated, per N and **ablation** method (`zero`: the head's output set to "
    "0; `mean`: its mean over the reference prompts; `position_mean`: its mean at the same "
    "absolute position; `resample`: its output on a donor story at the same position; see "
    "ih_sweep/ablation/hooks.py): the accuracy of `high`, `low` (at that N) and `none` in %, "
    "**Δ high vs none** and **Δ high vs low** in points with paired percentile bootstrap "
    "95% CIs (2,000 resamples) and exact McNemar p (not Holm-adjusted). An effect that keeps "
    "its sign and size across methods does not hinge on the ablation choice.",
]


def robustness_markdown(table: pd.DataFrame | None) -> list[str]:
    """summary.md's robustness section: one table per family (none without one)."""
    if table is None or table.empty:
        return []
    lines = ["## Robustness across ablation methods", ""]
    for family, part in table.groupby("family", sort=False):
        lines += [f"### {family}", "", markdown_table(_display(part, _ROBUSTNESS)), ""]
    return lines


# --------------------------------------------------------------------------- the null
def _group_of_row(row) -> str:
    """The part of a group's title that tells it apart in a table across groups: how its
    heads are chosen (:func:`heads_phrase`) and the settings the base title does not name."""
    extra = str(row.group)[len(group_title({k: getattr(row, k) for k in GROUP_KEYS})):]
    extra = _EXCLUSION.sub("", extra).strip(", ")
    return heads_phrase(row) + (f" ({extra})" if extra else "")


_NULL = [
    ("arm", "arm", lambda r: r.arm),
    ("condition", "condition", lambda r: r.condition),
    ("N", "$N$", lambda r: n_text(r.n_heads, r.n_heads_share)),
    ("accuracy % [95% CI]", r"accuracy \% [95\% CI]",
     lambda r: f"{percent(r.accuracy)} {interval(r.ci_low, r.ci_high)}"),
    ("random 2.5-97.5% (draws)", r"random 2.5--97.5\% (draws)",
     lambda r: f"{interval(r.random_acc_p2_5, r.random_acc_p97_5)} ({int(r.n_random)})"),
    ("p vs random", "$p$ vs random", lambda r: p_value(r.p_vs_random)),
    ("Δ vs none (pts)", r"$\Delta$ vs none (pts)", lambda r: percent(r.delta_vs_none)),
]


def null_markdown(df: pd.DataFrame) -> list[str]:
    """summary.md's section "Against the random null": every row compared with random
    draws (``n_random`` >= 1), across the groups of one model and data set, so that the
    arms (induction heads, FV heads, the exclusions) and the controls read side by side."""
    rows = df[df.n_random.ge(1) & ~df.condition.isin(["random", "none"])] \
        if "n_random" in df else df.iloc[:0]
    if rows.empty:
        return []
    lines = ["## Against the random null", ""]
    shared = [k for k in GROUP_KEYS if k != "rank_by"]  # the arms differ in rank_by
    setting = rows[shared].astype(str).agg(", ".join, axis=1)
    for _, part in rows.groupby(setting, sort=False):
        part = part.assign(arm=part.apply(_group_of_row, axis=1),
                           cond_order=part.condition.map(_ORDER))
        part = part.sort_values(["arm", "cond_order", "n_heads"], kind="stable")
        first = part.iloc[0]
        lines += [f"### {', '.join(f'{k}={first[k]}' for k in shared)}", "",
                  markdown_table(_display(part, _NULL)), ""]
    return lines


NULL_LEGEND = [
    "**Against the random null**: every row compared with layer-matched random draws at its "
    "N, across the sweep's arms (**arm**: how its `high` heads are chosen, `top-N by "
    "<score>`, with Yin & Steinhardt's exclusion where the arm has one; its `low` rows are "
    "its layer-matched lowest-N control, its random draws layer-matched to its top-N, so "
    "each arm has a null of its own); **random 2.5-97.5% (draws)** and **p vs "
    "random** as in the main table; **Δ vs none**: accuracy minus the unablated accuracy."]


# --------------------------------------------------------------------------- near-ties
def has_column(results: pd.DataFrame, column: str) -> bool:
    """Whether a job's results.csv has ``column`` (jobs written before it was recorded
    lack it) with at least one value."""
    return column in results.columns and results[column].notna().any()


def _as_bool(values: pd.Series) -> np.ndarray:
    """A CSV column of booleans (True/False, read as bool or as text; empty = False)."""
    if values.dtype == bool:
        return values.to_numpy()
    return values.astype(str).str.strip().str.lower().isin(("true", "1", "1.0")).to_numpy()


def _aligned(a: pd.DataFrame, b: pd.DataFrame, columns: list[str]) -> pd.DataFrame:
    """The items both jobs evaluated, matched by (story, question_index): ``<col>_a`` and
    ``<col>_b`` for each of ``columns``."""
    key = ["story", "question_index"]
    return a[key + columns].merge(b[key + columns], on=key, suffixes=("_a", "_b"))


def _near_tie_comparison(a: pd.DataFrame, b: pd.DataFrame) -> tuple[float, float, bool]:
    """:func:`ih_sweep.report.statistics.near_tie_delta_range` of A minus B on their paired
    items."""
    m = _aligned(a, b, ["correct", "near_tie"])
    return st.near_tie_delta_range(_as_bool(m.correct_a), _as_bool(m.near_tie_a),
                                   _as_bool(m.correct_b), _as_bool(m.near_tie_b))


def _near_tie_row(job: FinishedJob, group: Group, n: int, cond: str) -> dict:
    """The job's near-tie count and accuracy range, and for each comparison the range of
    the difference if every near-tie fell the other way and whether the difference lies
    inside it (empty where either job has no ``near_tie`` column)."""
    res = job.results
    if not has_column(res, "near_tie"):
        return {}
    tie = _as_bool(res["near_tie"])
    low, high = st.near_tie_range(_as_bool(res["correct"]), tie)
    row = {"n_near_tie": int(tie.sum()), "near_tie_acc_low": low, "near_tie_acc_high": high}
    none = group.cells.get((0, "none", 0))
    if none is not None and cond != "none" and has_column(none.results, "near_tie"):
        row["delta_vs_none_nt_low"], row["delta_vs_none_nt_high"], \
            row["within_near_ties_vs_none"] = _near_tie_comparison(res, none.results)
    if cond == "high":
        low_job = group.cells.get((n, "low", 0))
        if low_job is not None and has_column(low_job.results, "near_tie"):
            row["delta_vs_low_nt_low"], row["delta_vs_low_nt_high"], \
                row["within_near_ties_vs_low"] = _near_tie_comparison(res, low_job.results)
        draws = [j for j in group.control(n, "random") if has_column(j.results, "near_tie")]
        if draws:
            row["random_within_near_ties"] = sum(
                _near_tie_comparison(res, j.results)[2] for j in draws)
    return row


# --------------------------------------------------------------------------- continuous
def _paired_metric(a: pd.DataFrame, b: pd.DataFrame, column: str
                   ) -> tuple[float, float, float]:
    """Mean paired difference of ``column`` (A minus B, items matched by (story,
    question_index), non-finite values left out) and its paired bootstrap 95% CI."""
    m = _aligned(a, b, [column])
    x = pd.to_numeric(m[f"{column}_a"], errors="coerce").to_numpy(dtype=float)
    y = pd.to_numeric(m[f"{column}_b"], errors="coerce").to_numpy(dtype=float)
    keep = np.isfinite(x) & np.isfinite(y)
    x, y = x[keep], y[keep]
    if not len(x):
        return (np.nan, np.nan, np.nan)
    return (float(x.mean() - y.mean()), *st.paired_bootstrap_ci(x, y))


def _item_means(jobs: list[FinishedJob], column: str) -> pd.DataFrame:
    """Per item (story, question_index), the mean of ``column`` over ``jobs`` (the random
    draws at one N: the matched random control of each item)."""
    key = ["story", "question_index"]
    frames = [j.results[key + [column]].assign(**{column: pd.to_numeric(
        j.results[column], errors="coerce")}) for j in jobs]
    return pd.concat(frames).groupby(key, as_index=False)[column].mean()


def _continuous_row(job: FinishedJob, group: Group, n: int, cond: str) -> dict:
    """Per metric of :data:`CONTINUOUS`: the job's mean, and its paired difference (with
    bootstrap CI) against ``none``, and for rows ``high`` against ``low`` at the same N and
    the per-item mean of the ``random`` draws at the same N."""
    row: dict = {}
    res = job.results
    for metric in CONTINUOUS:
        if not has_column(res, metric):
            continue
        values = pd.to_numeric(res[metric], errors="coerce")
        row[metric] = float(values[np.isfinite(values)].mean())
        controls = {}
        none = group.cells.get((0, "none", 0))
        if cond != "none" and none is not None:
            controls["none"] = none.results
        if cond == "high":
            low = group.cells.get((n, "low", 0))
            if low is not None:
                controls["low"] = low.results
            draws = [j for j in group.control(n, "random") if has_column(j.results, metric)]
            if draws:
                controls["random"] = _item_means(draws, metric)
        for name, other in controls.items():
            if has_column(other, metric):
                row[f"{metric}_vs_{name}"], row[f"{metric}_vs_{name}_ci_low"], \
                    row[f"{metric}_vs_{name}_ci_high"] = _paired_metric(res, other, metric)
    return row


def icl_curve(jobs: list[FinishedJob]) -> pd.DataFrame:
    """Accuracy by number of answered examples before the question (scope ``all`` jobs)."""
    parts = []
    for job in jobs:
        if job.record.eval["scope"] != "all":
            continue
        g = job.results.groupby("examples_before")["correct"].agg(["mean", "size"])
        g = g.reset_index().rename(columns={"mean": "accuracy", "size": "n_items"})
        g["n_heads"], g["condition"] = job.record.n_heads, job.record.condition
        g["n_heads_share"] = _share(job)
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
    ("N", "$N$", lambda r: "" if r.condition == "none" else n_text(r.n_heads,
                                                                     r.n_heads_share)),
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
    ("random 2.5-97.5% (draws)", r"random 2.5--97.5\% (draws)",
     lambda r: "" if _missing(r.n_random) else
     f"{interval(r.random_acc_p2_5, r.random_acc_p97_5)} ({int(r.n_random)})"),
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
    "Holm-adjusted over every comparison with `none` in this summary but the random draws "
    "(the null's sample, not hypotheses).",
    "**Δ vs low**, **p vs low** (rows `high`): against the `low` control at the same N "
    "(exact McNemar).",
    "**random 2.5-97.5% (draws)**: the null, the accuracies of the `random` draws at the "
    "same N (in %): their 2.5th and 97.5th percentiles (linear interpolation) and how many "
    "draws K; **p vs random** (every row but `random` and `none`): empirical p of the row's "
    "accuracy within those draws, (1 + #draws at or below it) / (1 + K), one-sided (a "
    "draw at least as extreme is one whose accuracy is at or below the row's; small p: "
    "these heads hurt more than random heads; the smallest p K draws can give is "
    "1 / (K + 1)). Where another row at an N carries a null of 3 or more draws this way, "
    "the draws' own rows are left out of the tables (each is a row of summary.csv).",
]


def display_table(df: pd.DataFrame, latex: bool = False) -> pd.DataFrame:
    """The rows a reader sees, as strings: the unablated job once (every N of ``none``
    evaluates the same model), empty cells where a number would mean nothing."""
    return _display(df, _DISPLAY, latex)


def shown_rows(df: pd.DataFrame) -> pd.DataFrame:
    """The rows of one group's summary a table shows: every row, but the ``random`` draws
    at an N where there are at least 3 and another row carries them as its null
    (``n_random``: the band and p vs random); K = 20 draws at three N would otherwise bury
    the conditions among 60 rows."""
    if not {"n_random", "condition", "n_heads"} <= set(df.columns):
        return df  # not rows of a sweep's summary (e.g. the cross-model table)
    carried = set(df.loc[(df.condition != "random") & (df.n_random >= 3), "n_heads"])
    return df[~((df.condition == "random") & df.n_heads.isin(carried))]


def _display(df: pd.DataFrame, spec: list, latex: bool = False,
             keep: int | None = None) -> pd.DataFrame:
    """``df``'s rows through ``spec`` ((markdown header, LaTeX header, cell) triples);
    ``keep``: columns after the first ``keep`` that are empty in every row are dropped."""
    headers = [(tex if latex else md) for md, tex, _ in spec]
    table = pd.DataFrame([[cell(r) for _, _, cell in spec]
                          for r in shown_rows(df).itertuples()], columns=headers)
    if keep is not None:
        table = table[[c for i, c in enumerate(table.columns)
                       if i < keep or table[c].astype(bool).any()]]
    return table


def number(x, digits: int = 3) -> str:
    """A continuous value (nats, logits) with ``digits`` significant digits."""
    return "" if _missing(x) else f"{x:.{digits}g}"


def fixed(x, decimals: int = 3) -> str:
    """A loss in nats with ``decimals`` decimals (values of one scale, compared by row)."""
    return "" if _missing(x) else f"{x:.{decimals}f}"


def draws_text(k: int) -> str:
    """``1 draw``, ``3 draws``."""
    return f"{int(k)} draw" + ("" if int(k) == 1 else "s")


def value_ci(x, low, high) -> str:
    """``value [low, high]`` of a continuous difference, or its value alone (no CI)."""
    if _missing(x):
        return ""
    ci = "" if _missing(low) or _missing(high) else f" [{number(low)}, {number(high)}]"
    return number(x) + ci


def inside(flag) -> str:
    """Whether a difference lies within the near-tie floor: inside / outside."""
    return "" if _missing(flag) else ("inside" if bool(flag) else "outside")


_ROW_KEYS = _DISPLAY[:3]  # N, condition, control seed: how every table names its rows

_NEAR_TIES = [
    *_ROW_KEYS,
    ("items", "items", lambda r: str(r.n_items)),
    ("near-ties", "near-ties", lambda r: "" if _missing(r.n_near_tie) else str(int(r.n_near_tie))),
    ("accuracy % if near-ties flip", r"accuracy (\%) if near-ties flip",
     lambda r: interval(r.near_tie_acc_low, r.near_tie_acc_high)),
    ("Δ vs none if near-ties flip", r"$\Delta$ vs none if near-ties flip",
     lambda r: _vs_none(r, interval(r.delta_vs_none_nt_low, r.delta_vs_none_nt_high))),
    ("Δ vs none within near-ties", r"$\Delta$ vs none within near-ties",
     lambda r: _vs_none(r, inside(r.within_near_ties_vs_none))),
    ("Δ vs low if near-ties flip", r"$\Delta$ vs low if near-ties flip",
     lambda r: interval(r.delta_vs_low_nt_low, r.delta_vs_low_nt_high)),
    ("Δ vs low within near-ties", r"$\Delta$ vs low within near-ties",
     lambda r: inside(r.within_near_ties_vs_low)),
    ("random draws inside", "random draws inside",
     lambda r: "" if _missing(r.random_within_near_ties) or _missing(r.n_random) else
     f"{int(r.random_within_near_ties)} of {int(r.n_random)}"),
]

_CONTINUOUS = [*_ROW_KEYS]
for _m, _name, _tex in (("gold_logprob", "gold log-prob", "gold log-prob"),
                        ("logit_diff", "logit diff", "logit diff")):
    _CONTINUOUS.append((f"mean {_name}", f"mean {_tex}",
                        lambda r, m=_m: number(getattr(r, m))))
    for _c in ("none", "low", "random"):
        _CONTINUOUS.append((f"{_name} Δ vs {_c} [95% CI]", rf"{_tex} $\Delta$ vs {_c} [95\% CI]",
                            lambda r, m=_m, c=_c: value_ci(getattr(r, f"{m}_vs_{c}"),
                                                           getattr(r, f"{m}_vs_{c}_ci_low"),
                                                           getattr(r, f"{m}_vs_{c}_ci_high"))))

_MECHANISM = [
    *_ROW_KEYS,
    ("repeat loss (nats)", "repeat loss (nats)", lambda r: fixed(r.repeat_loss)),
    ("repeat loss unablated", "repeat loss unablated",
     lambda r: fixed(r.repeat_loss_unablated)),
    ("ICL score (nats)", "ICL score (nats)", lambda r: fixed(r.icl_score)),
    ("ICL score unablated", "ICL score unablated", lambda r: fixed(r.icl_score_unablated)),
]


@dataclass
class Section:
    """A table beside the main one, shown for a group only where its jobs recorded what it
    needs (``present``); otherwise one line saying why it is left out."""

    title: str
    spec: list
    present: Callable[[pd.DataFrame], bool]
    absent: str  # why the section is left out
    legend: list[str]


SECTIONS = [
    Section("Near-tie floor", _NEAR_TIES, lambda g: g.n_near_tie.notna().any(),
            "no job's results.csv has a `near_tie` column (evaluated before near-ties were "
            "recorded)",
            ["**near-ties**: items decided by a top-1 minus top-2 logit gap small enough "
             "that another numeric precision could flip them (results.csv `near_tie`); "
             "**accuracy % if near-ties flip**: [acc - near-ties correct / n, acc + "
             "near-ties wrong / n].",
             "**Δ vs none / vs low if near-ties flip**: the range of Δ if every near-tie of "
             "either job fell the other way; **within near-ties**: `inside` when that range "
             "reaches 0, so near-ties alone could produce the difference, `outside` when "
             "they could not (always so without near-ties); **random draws inside** (rows "
             "`high`): of the random draws at the same N, those whose difference from "
             "`high` is inside."]),
    Section("Continuous metrics", _CONTINUOUS,
            lambda g: g[CONTINUOUS].notna().any().any(),
            "no job's results.csv has `gold_logprob` or `logit_diff` (evaluated before they "
            "were recorded)",
            ["**gold log-prob**: summed log-probability (nats) of the gold answer's tokens "
             "given the prompt; **logit diff**: the gold answer's first-token logit minus "
             "the best other candidate answer's; **mean** over the job's items.",
             "**Δ vs none / low / random [95% CI]**: mean paired difference (this job minus "
             "the other, items matched by story and question) with its paired percentile "
             "bootstrap interval (2,000 resamples); `low` at the same N; `random`: the "
             "per-item mean of the random draws at the same N."]),
    Section("Mechanism check", _MECHANISM,
            lambda g: g[MECHANISM_COLUMNS].notna().any().any(),
            "no job.json has a `mechanism` record (evaluated before the mechanism check "
            "was run)",
            ["**repeat loss**: mean loss (nats) on the repeated half of seeded repeated "
             "random-token sequences with the job's heads ablated (**repeat loss unablated**: "
             "the same model without ablation); **ICL score**: loss at a late token minus "
             "loss at an early token (Olsson et al. 2022), ablated and **unablated**. "
             "Induction heads ablated should raise the repeat loss and the ICL score more "
             "than the control."]),
]


def section_tables(g: pd.DataFrame, latex: bool = False
                   ) -> list[tuple[Section, pd.DataFrame | None]]:
    """Each section of one group: its display table, or None where it is left out."""
    return [(sec, _display(g, sec.spec, latex, keep=len(_ROW_KEYS)) if sec.present(g)
             else None) for sec in SECTIONS]


def markdown_table(table: pd.DataFrame) -> str:
    """A display table as GitHub markdown: text left, numbers right, no reparsing."""
    align = ["left" if c in ("condition", "ablation", "arm") else "right"
             for c in table.columns]
    return table.to_markdown(index=False, disable_numparse=True, colalign=align)


_EXCLUSION = re.compile(r"scoring\.exclude_by=(\w+), scoring\.exclude_share=([\d.e-]+)")


def heads_phrase(row) -> str:
    """How a group's ``high`` heads are chosen, for titles and legends: ``top-N by prefix``,
    with Yin & Steinhardt's exclusion where the group has one (``, outside the top 2% by
    fv``)."""
    found = _EXCLUSION.search(str(getattr(row, "group", "")))
    rank = getattr(row, "rank_by", "")
    outside = f", outside the top {100 * float(found[2]):.3g}% by {found[1]}" if found else ""
    return f"top-N by {rank}{outside}" if isinstance(rank, str) and rank else "top-N"


def _arm_row(g: pd.DataFrame):
    """A row of one group that says how its heads were chosen: an ablated one (the
    unablated job has no scoring settings), else the first."""
    ablated = g[g.condition != "none"]
    return (ablated if not ablated.empty else g).iloc[0]


def _short_title(row) -> str:
    """A figure title: the model and the data, the metric, the ablation and, where they
    are not the default prefix-matching heads, how the heads are chosen."""
    split = "" if row.split == "generated" else f" {row.split}"
    phrase = heads_phrase(row)
    heads = "" if phrase == "top-N by prefix" else f"\n{phrase}"
    return (f"{row.model} ({row.quantization}), bAbI task {row.babi_task}{split} "
            f"({row.data}), {row.metric}, {'last' if row.scope == 'last' else 'every'} "
            f"question, {row.ablation} ablation{heads}")


def group_title(group: dict) -> str:
    """``key=value`` for every setting a group shares."""
    return ", ".join(f"{k}={group[k]}" for k in GROUP_KEYS)


def to_markdown(df: pd.DataFrame, problems: list[tuple[str, str]], notes: list[str],
                title: str = "Sweep summary", strata: pd.DataFrame | None = None,
                robustness: pd.DataFrame | None = None) -> str:
    """The summary page: per group its main table and the sections of :data:`SECTIONS`
    (each left out with one line where its jobs did not record it), the difficulty strata
    (:func:`strata_markdown`), a legend of every column shown, the jobs left out."""
    lines = [f"# {title}", ""]
    lines += [f"> {note}" for note in notes] + ([""] if notes else [])
    shown = set()
    for gname, g in df.groupby("group", sort=False):
        lines += [f"## {gname}", "", markdown_table(display_table(g)), ""]
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
    legend = LEGEND + [item for sec in SECTIONS if sec.title in shown for item in sec.legend]
    legend += NULL_LEGEND if null else []
    if robustness is not None and not robustness.empty:
        legend += ROBUSTNESS_LEGEND
    if strata is not None and not strata.empty:
        legend += STRATA_LEGEND
    lines += ["### Legend", ""] + [f"- {item}" for item in legend] + [""]
    if problems:
        lines += ["## Jobs left out", ""] + [f"- `{f}`: {why}" for f, why in problems] + [""]
    return "\n".join(lines)


def _latex(table: pd.DataFrame) -> str:
    styler = table.style.hide(axis="index").format(escape="latex")
    return styler.to_latex(hrules=True, column_format="r" * table.shape[1])


def to_latex(df: pd.DataFrame) -> str:
    """One booktabs table per group and section (pandas' Styler.to_latex), each under a
    comment line naming the group's settings (and the section)."""
    parts = []
    for gname, g in df.groupby("group", sort=False):
        parts.append(f"% {gname}\n" + _latex(display_table(g, latex=True)))
        parts += [f"% {gname}: {sec.title}\n" + _latex(table)
                  for sec, table in section_tables(g, latex=True) if table is not None]
    return "\n".join(parts)


# --------------------------------------------------------------------------- strata
STRATA_LEGEND = [
    "**Difficulty strata** (strata.csv, strata.png): accuracy % per stratum of the items, "
    "(n) items; `support_distance`: statements back from the question to the most recent "
    "supporting fact (1 = the statement just before; 5+ pooled); `recency_correct`: whether "
    "\"the most recent location of anyone\" answers correctly; `mentions`: times the asked "
    "person is mentioned before the question; `question_position`: the question's index in "
    "its story. Random draws of an N are pooled. strata.csv also has the means of "
    "`gold_logprob` and `logit_diff` per stratum.",
]


def _bucket(values: pd.Series, top: bool) -> tuple[pd.Series, pd.Series]:
    """(label, sort order) per item: integers with 5 and more pooled as ``5+`` (``top``),
    or booleans as no/yes; missing values stay missing."""
    if not top:
        flag = pd.Series(_as_bool(values), index=values.index).where(values.notna())
        order = flag.map({False: 0, True: 1})
        return order.map({0: "no", 1: "yes"}), order
    v = pd.to_numeric(values, errors="coerce")
    order = v.clip(upper=5)
    label = order.map(lambda x: np.nan if pd.isna(x) else
                      ("5+" if x >= 5 else str(int(x))))
    return label, order


def strata_table(jobs: list[FinishedJob], groups: list[Group] | None = None) -> pd.DataFrame:
    """Accuracy (Wilson 95% CI) and the means of the continuous metrics per stratum of
    :data:`STRATA`, per group, condition and N: one row per (group, condition, N, stratum,
    value); the unablated model once per group; the random draws of an N pooled
    (``n_draws``). Strata a job's results.csv lacks are left out; empty when none has any.
    ``groups``: :func:`cell_groups` of ``jobs`` when already computed."""
    rows = []
    groups = groups if groups is not None else cell_groups(jobs)[0]
    for group in groups:
        arms: dict[tuple[int, str], list[FinishedJob]] = {}
        for (n, cond, _), job in group.cells.items():
            arms.setdefault((n, cond), []).append(job)
        for (n, cond), arm in sorted(arms.items(), key=lambda kv: (
                _ORDER.get(kv[0][1], 9), kv[0][0])):
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
                           "n_heads_share": _share(arm[0]), "condition": cond,
                           "n_draws": len(arm), "stratum": column, "value": value,
                           "order": int(o), "n_items": total, "n_correct": k,
                           "accuracy": k / total, "ci_low": lo, "ci_high": hi}
                    for metric in CONTINUOUS:
                        row[metric] = float(pd.to_numeric(part[metric], errors="coerce")
                                            .mean()) if metric in part else np.nan
                    rows.append(row)
    columns = ["group", "n_heads", "n_heads_share", "condition", "n_draws", "stratum", "value",
               "order", "n_items", "n_correct", "accuracy", "ci_low", "ci_high", *CONTINUOUS]
    if not rows:
        return pd.DataFrame(columns=columns)
    return pd.DataFrame(rows, columns=columns).sort_values(
        ["group", "stratum", "condition", "n_heads", "order"], key=_sort_key,
        kind="stable").reset_index(drop=True)


_ORDER = {"none": 0, "high": 1, "low": 2, "random": 3}


def _sort_key(col: pd.Series) -> pd.Series:
    if col.name == "condition":
        return col.map(lambda c: _ORDER.get(c, 9))
    if col.name in ("group", "stratum"):  # the order they came in
        return col.map({v: i for i, v in enumerate(dict.fromkeys(col))})
    return col


def strata_markdown(table: pd.DataFrame | None) -> list[str]:
    """The strata section of summary.md: per group and stratum a table of accuracy %
    (items), one row per condition and N, one column per stratum value; one line saying
    why where the jobs have no stratum columns."""
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


def plot_strata(table: pd.DataFrame, path: Path, title: str = "",
                stratum: str = "support_distance") -> Path | None:
    """Accuracy by ``stratum`` (default: support distance, 1-4 and 5+): one line per
    condition and N (colour = condition, line style = N; random draws pooled), 95% Wilson
    CIs as bands. None when the table has no rows of that stratum."""
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
        x = g.value.map(position) + 0.04 * (i - (len(keys) - 1) / 2)  # side by side
        draws = int(g.n_draws.iloc[0])
        label = "unablated" if cond == "none" else f"{cond} N={n_text(n, _first_share(g))}" + (
            f" ({draws_text(draws)} pooled)" if cond == "random" else "")
        color = COLORS.get(cond, "tab:green")
        ax.plot(x, 100 * g.accuracy, marker="o", ms=4, color=color, label=label,
                ls="-" if cond == "none" else styles[int(n)], clip_on=False)
        ax.fill_between(x, 100 * g.ci_low, 100 * g.ci_high, color=color, alpha=0.12, lw=0)
    ax.set_xticks(range(len(position)), list(position))
    ax.set_xlim(-0.3, len(position) - 0.7)
    ax.set_ylim(-3, 103)
    ax.set_xlabel(f"{stratum.replace('_', ' ')}: {STRATA.get(stratum, ('', True))[0]}")
    ax.set_ylabel("accuracy (%), bands: 95% Wilson CI")
    ax.set_title(title or f"Accuracy by {stratum.replace('_', ' ')}", fontsize=10)
    ax.grid(alpha=0.25)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    write_figure(path, fig)
    plt.close(fig)
    return path


def _first_share(rows: pd.DataFrame) -> float:
    """The first share of all heads (percent) among ``rows`` (nan: none was asked)."""
    shares = rows["n_heads_share"].dropna() if "n_heads_share" in rows else []
    return float(shares.iloc[0]) if len(shares) else np.nan


def _dose_axis(df: pd.DataFrame) -> tuple[pd.DataFrame, bool]:
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


def _plot_null(ax, random: pd.DataFrame) -> None:
    """The random draws on the accuracy-vs-N axes: at each N a box from the 2.5th to the
    97.5th percentile of the draws' accuracies (:func:`ih_sweep.report.statistics.null_band`, as
    summary.csv's ``random_acc_p2_5``/``random_acc_p97_5``) with the median as a line
    across it, the boxes joined by a lighter band; a band narrower than
    :data:`NULL_MIN_HEIGHT` points (draws alike, e.g. all at 100%) is drawn that tall
    around its centre so that it stays visible. Every draw as a point where an N has fewer
    than 3 draws. ``random`` has the figure's x positions in column ``x`` (:func:`_dose_axis`)."""
    color = COLORS["random"]
    by_n = {float(x): g.accuracy.to_numpy(dtype=float) for x, g in random.groupby("x")}
    xs = sorted(by_n)
    sizes = sorted({len(by_n[x]) for x in xs})
    if sizes[0] < 3:
        ax.plot(random.x, 100 * random.accuracy, "o", color=color, ms=5, clip_on=False,
                label=f"random heads ({draws_text(len(random))})")
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
           label=f"random heads: 2.5-97.5% of {draws} draws (line: median)")
    ax.hlines(median, [x - width / 2 for x in xs], [x + width / 2 for x in xs], color=color,
              lw=1.5, zorder=2)


def _high_label(row) -> str:
    """The legend of a group's ``high`` rows: how its heads are chosen and what they are
    (induction heads by prefix matching or copying, FV heads by their indirect effect)."""
    kind = {"fv": "FV heads"}.get(getattr(row, "rank_by", ""), "induction heads")
    phrase = heads_phrase(row)
    return f"{phrase} ({kind})" if "outside" not in phrase else f"{phrase}\n({kind})"


def plot_accuracy_vs_n(df: pd.DataFrame, path: Path, title: str = "") -> Path | None:
    """Accuracy against N per condition with 95% Wilson CIs; the unablated accuracy as a
    line and band; the random draws as their 2.5-97.5% band (:func:`_plot_null`).
    The x axis is the share of all heads (%, each tick with its count) when every ablated
    job of the figure was asked as a share, else the count N (:func:`_dose_axis`)."""
    if df.empty:
        return None
    df, by_share = _dose_axis(df)
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
        _plot_null(ax, random)
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
                    label={"high": _high_label(g.iloc[0]),
                           "low": "layer-matched lowest-N (control)"}[cond])
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
    order = {"none": 0, "high": 1, "low": 2, "random": 3}
    keys = sorted(pooled.groupby(["condition", "n_heads"]).groups,
                  key=lambda k: (order.get(k[0], 9), k[1]))
    for i, (cond, n) in enumerate(keys):
        g = pooled[(pooled.condition == cond) & (pooled.n_heads == n)].sort_values(
            "examples_before")
        bounds = np.array([st.wilson_interval(int(k), int(m))
                           for k, m in zip(g.n_correct, g.n_items)])
        share = _first_share(curve[(curve.condition == cond) & (curve.n_heads == n)])
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
    ax.set_ylabel("accuracy (%), bands: 95% Wilson CI")
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
    runs each figure (:func:`summarize`'s: a failure, e.g. an unreadable score table, is
    recorded and the others go on); without it a failure raises."""
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
                raise SummaryError(f"score table {table} unreadable: {_why(err)}") from None
            return save_heatmap(scores, rank_by, sweep_dir / name, model, marks)

        path = step(f"{name} (heads on the score table)", heatmap)
        if path is not None:
            paths.append(path)
    return paths


def merge_scan(sweep_dir: Path, parts: list[Path]) -> pd.DataFrame:
    """Merge per-layer scan jobs (SLURM splits) into one scan.csv with plots."""
    from ih_sweep.pipeline.head_scan import write_scan_outputs

    frames = [pd.read_csv(p / "scan.csv") for p in parts]
    records = [read_record(p) for p in parts]
    models = {r.model for r in records}
    if len(models) > 1:
        raise SummaryError(f"scan parts of different models are not merged: {sorted(models)}")
    df = pd.concat(frames, ignore_index=True).drop_duplicates(["layer", "head"], keep="last")
    write_scan_outputs(df, sweep_dir, records[0].rank_by, records[0].model)
    log.info("merged %d scan parts (%d heads) into %s", len(parts), len(df), sweep_dir)
    return df


def _why(err: BaseException) -> str:
    """An error as one line: its type and the first line of its message."""
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0][:300]}" if text else \
        type(err).__name__


def summarize(sweep_dir: str | Path, not_finished: list[tuple[str, str]] | None = None
              ) -> pd.DataFrame:
    """Write summary.csv/.md/.tex, strata.csv and the figures into ``sweep_dir``; return
    the table.

    ``not_finished`` lists (job, why) pairs the launcher knows failed, including jobs that
    never started and so left no folder behind. Raises :class:`SummaryError` when there is
    nothing to summarize, and :class:`SummaryIncomplete` (after writing every output it
    could) when a step failed or jobs are left out.
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
            {str(p.relative_to(sweep_dir)) for p in found.scan_parts + found.seed_parents} | \
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
    failed: list[tuple[str, str]] = []

    def step(name: str, make: Callable[[], Any]) -> Any:
        """Run one output step; a failure is recorded (and logged) and the others go on."""
        try:
            return make()
        except Exception as err:
            log.error("summary: %s failed: %s", name, _why(err), exc_info=log.isEnabledFor(
                logging.DEBUG))
            failed.append((name, _why(err)))
            return None

    def finish(df: pd.DataFrame | None) -> pd.DataFrame:
        if failed or found.problems:
            raise SummaryIncomplete(sweep_dir, df, failed, found.problems)
        return df

    if found.scan_parts:
        step("scan.csv (merging the scan jobs)", lambda: merge_scan(sweep_dir,
                                                                    found.scan_parts))
        if not found.jobs:
            return finish(pd.DataFrame(columns=SUMMARY_COLUMNS))
    grouped = step("statistics (summary table)", lambda: cell_groups(found.jobs))
    made = grouped and step("statistics (summary table)",
                            lambda: summarize_jobs(found.jobs, grouped))
    if made is None:
        return finish(None)
    df, notes = made
    groups = grouped[0]
    strata = step("strata.csv", lambda: strata_table(found.jobs, groups))
    if strata is not None and not strata.empty:
        step("strata.csv", lambda: write_csv(sweep_dir / "strata.csv", strata))
    robustness = step("robustness.csv", lambda: robustness_table(found.jobs, groups))
    if robustness is not None and not robustness.empty:
        step("robustness.csv", lambda: write_csv(sweep_dir / "robustness.csv", robustness))
    elif robustness is not None:  # no longer any family: no stale file from an earlier run
        (sweep_dir / "robustness.csv").unlink(missing_ok=True)
    step("summary.csv", lambda: write_csv(sweep_dir / "summary.csv", df))
    step("summary.md", lambda: write_text(sweep_dir / "summary.md",
                                          to_markdown(df, found.problems, notes,
                                                      strata=strata, robustness=robustness)))
    step("summary.tex", lambda: write_text(sweep_dir / "summary.tex", to_latex(df)))
    groups = list(df.groupby("group", sort=False))
    for i, (_, g) in enumerate(groups):
        name = "accuracy_vs_n.png" if len(groups) == 1 else f"accuracy_vs_n_{i}.png"
        step(name, lambda g=g, name=name: plot_accuracy_vs_n(
            g, sweep_dir / name, title=_short_title(_arm_row(g))))
    if strata is not None and not strata.empty:
        parts = list(strata.groupby("group", sort=False))
        for i, (gname, part) in enumerate(parts):
            name = "strata.png" if len(parts) == 1 else f"strata_{i}.png"
            row = _arm_row(df[df.group == gname])
            step(name, lambda part=part, name=name, row=row: plot_strata(
                part, sweep_dir / name, title="Accuracy by support distance: "
                + _short_title(row)))
    heatmaps = plot_ablated_heads(found.jobs, sweep_dir, step)
    curve = step("icl_curve.csv", lambda: icl_curve(found.jobs))
    if curve is not None and not curve.empty:
        step("icl_curve.csv", lambda: write_csv(sweep_dir / "icl_curve.csv", curve))
        step("icl_curve.png", lambda: plot_icl(
            curve, sweep_dir / "icl_curve.png",
            title="In-context learning curve: " + _short_title(df.iloc[0])))
    for note in notes:
        log.info("%s", note)
    log.info("summary of %d jobs (%d rows) written to %s (%d left out)", len(found.jobs),
             len(df), sweep_dir, len(found.problems))
    if heatmaps:
        log.info("ablated heads on their scores: %s", ", ".join(p.name for p in heatmaps))
    return finish(df)


def console_report(df: pd.DataFrame, sweep_dir: Path) -> str:
    """What a sweep prints when it ends: each group's main table, then its near-tie floor
    and mechanism check (or one line each saying why they are left out), and where the
    files are."""
    console = {"Near-tie floor", "Mechanism check"}
    parts = []
    for gname, g in df.groupby("group", sort=False):
        parts.append(f"\n{gname}\n{markdown_table(display_table(g))}")
        for sec, table in section_tables(g):
            if sec.title not in console:
                continue
            parts.append(f"{sec.title}: left out: {sec.absent}." if table is None else
                         f"\n{sec.title}\n{markdown_table(table)}")
    parts.append(f"\nSummary (summary.md with the continuous metrics and strata, summary.csv, "
                 f"summary.tex, figures) and one folder per job in: {sweep_dir}")
    return "\n".join(parts)


if __name__ == "__main__":  # python -m ih_sweep.report.summarize: the command's code is in
    # summarize_command, which builds on this module and on cross_model (imports in this
    # block are the script's entry, not this module's: tests/test_imports.py)
    from ih_sweep.report.command import main

    raise SystemExit(main())
