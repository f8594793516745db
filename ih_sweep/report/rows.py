"""The rows of summary.csv: per distinct job of each group (:mod:`ih_sweep.report.groups`)
its accuracy and paired tests, the near-tie floor, the continuous metrics and the mechanism
check (the columns are described in :mod:`ih_sweep.report.summarize`). The maths is
:mod:`ih_sweep.report.statistics`; this module pairs the jobs' items and fills the columns."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any

import numpy as np
import pandas as pd

from ih_sweep.report import statistics as st
from ih_sweep.report.discover import FinishedJob
from ih_sweep.report.families import add_holm, add_null_limits
from ih_sweep.report.groups import GROUP_KEYS, Group, as_float, cell_groups, group_of, share

CONTINUOUS = ["gold_logprob", "logit_diff"]  # results.csv per-item metrics (issue #17)
MECHANISM_COLUMNS = ["repeat_loss", "repeat_loss_unablated", "icl_score",
                     "icl_score_unablated"]  # job.json "mechanism"
NEAR_TIE_COLUMNS = ["n_near_tie", "near_tie_acc_low", "near_tie_acc_high",
                    "delta_vs_none_nt_low", "delta_vs_none_nt_high", "within_near_ties_vs_none",
                    "delta_vs_low_nt_low", "delta_vs_low_nt_high", "within_near_ties_vs_low",
                    "random_within_near_ties"]
HEAD_SET_COLUMNS = ["output_norm_mean", "score_mean", "score_min", "score_max",
                    "low_norm_ratio", "random_norm_ratio", "n_random_sets"]
CONTINUOUS_COLUMNS = [f"{m}{suffix}" for m in CONTINUOUS for suffix in
                      ["", *(f"_vs_{c}{b}" for c in ("none", "low", "random")
                             for b in ("", "_ci_low", "_ci_high"))]]
SUMMARY_COLUMNS = ["group", *GROUP_KEYS, "n_heads", "n_heads_share", "condition",
                   "control_seed", "n_items", "n_correct", "accuracy", "ci_low", "ci_high",
                   "delta_vs_none", "delta_ci_low", "delta_ci_high", "p_vs_none", "p_vs_none_holm",
                   "delta_vs_low", "delta_vs_low_ci_low", "delta_vs_low_ci_high", "p_vs_low",
                   "p_vs_low_holm", "p_vs_random", "p_vs_random_holm", "n_random",
                   "random_acc_p2_5", "random_acc_p97_5", "null_band_at", "p_vs_random_holm_min",
                   *HEAD_SET_COLUMNS, *NEAR_TIE_COLUMNS, *CONTINUOUS_COLUMNS, *MECHANISM_COLUMNS]
# the ranking's stability (issue #30 item 3; ih_sweep.heads.stability): job.json's
# rank_stability and the overlap of the heads across the fv_seed values a sweep ran
STABILITY_COLUMNS = ["rank_stability", "rank_stability_over", "rank_stability_seeds",
                     "n_rank_seeds", "rank_unstable"]
SUMMARY_COLUMNS += STABILITY_COLUMNS


class Turns:
    """Rows computed in two threads (:func:`summarize_jobs`): pandas does not promise that
    threads may share frames, so one thread at a time holds the turn for a row's pandas and
    statsmodels work, and gives it away only inside its bootstraps (numpy, which releases
    the GIL: :func:`bootstrap_ci`), so that two rows' bootstraps, or one and the other
    row's table work, run at once. Outside a turn (one thread) :meth:`aside` does nothing."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._mine = threading.local()

    @contextmanager
    def turn(self) -> Iterator[None]:
        with self._lock:
            self._mine.held = True
            try:
                yield
            finally:
                self._mine.held = False

    @contextmanager
    def aside(self) -> Iterator[None]:
        if not getattr(self._mine, "held", False):
            yield
            return
        self._mine.held = False
        self._lock.release()
        try:
            yield
        finally:
            self._lock.acquire()
            self._mine.held = True


TURNS = Turns()
ROW_THREADS = 2  # bootstraps of two rows at once: 27 of them 0.39 s -> 0.21 s on 2 cores


def bootstrap_ci(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """:func:`ih_sweep.report.statistics.paired_bootstrap_ci` of ``x`` and ``y``, with the
    row's turn given away meanwhile (:class:`Turns`)."""
    with TURNS.aside():
        return st.paired_bootstrap_ci(x, y)


def _key(df: pd.DataFrame) -> pd.Series:
    return df["story"].astype(str) + ":" + df["question_index"].astype(str)


def paired(a: pd.DataFrame, b: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """The ``correct`` outcomes (bool arrays of one length) of the items both results
    tables evaluated, aligned by (story, question_index), in ``a``'s order."""
    x = a.assign(k=_key(a)).set_index("k")["correct"].astype(bool)
    y = b.assign(k=_key(b)).set_index("k")["correct"].astype(bool)
    common = x.index.intersection(y.index)
    return x.loc[common].to_numpy(), y.loc[common].to_numpy()


def paired_effect(a: pd.DataFrame, b: pd.DataFrame) -> tuple[float, float, float, float]:
    """Accuracy of ``a`` minus ``b`` on their paired items (:func:`paired`; nan without
    any), its paired bootstrap 95% CI and the exact McNemar p (statistics of
    :mod:`ih_sweep.report.statistics`): (delta, ci_low, ci_high, p)."""
    x, y = paired(a, b)
    delta = float(x.mean() - y.mean()) if len(x) else np.nan
    return (delta, *bootstrap_ci(x, y), st.mcnemar_exact(*st.discordant(x, y)))


def has_column(results: pd.DataFrame, column: str) -> bool:
    """Whether a job's results.csv has ``column`` (jobs written before it was recorded
    lack it) with at least one value."""
    return column in results.columns and results[column].notna().any()


def as_bool(values: pd.Series) -> np.ndarray:
    """A CSV column of booleans (True/False, read as bool or as text; empty = False)."""
    if values.dtype == bool:
        return values.to_numpy()
    return values.astype(str).str.strip().str.lower().isin(("true", "1", "1.0")).to_numpy()


def _aligned(a: pd.DataFrame, b: pd.DataFrame, columns: list[str]) -> pd.DataFrame:
    """The items both jobs evaluated, matched by (story, question_index): ``<col>_a`` and
    ``<col>_b`` for each of ``columns``."""
    key = ["story", "question_index"]
    return a[key + columns].merge(b[key + columns], on=key, suffixes=("_a", "_b"))


def accuracy_row(job: FinishedJob, group: Group, n: int, cond: str) -> dict:
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
        row["delta_vs_none"], row["delta_ci_low"], row["delta_ci_high"], \
            row["p_vs_none"] = paired_effect(res, none.results)
    if cond == "high":
        low = group.cells.get((n, "low", 0))
        if low is not None:
            row["delta_vs_low"], row["delta_vs_low_ci_low"], row["delta_vs_low_ci_high"], \
                row["p_vs_low"] = paired_effect(res, low.results)
    row |= null_row(row["accuracy"], group, n, cond)
    return row


def null_row(accuracy: float, group: Group, n: int, cond: str) -> dict:
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


def head_scores(job: FinishedJob) -> np.ndarray:
    """The ablated heads' scores under ``rank_by`` (heads.csv's ``score``; empty without the
    file or the column, and for an unablated job)."""
    path = job.path / "heads.csv"
    try:
        frame = pd.read_csv(path)
    except (OSError, ValueError):
        return np.array([])
    if "score" not in frame.columns:
        return np.array([])
    return pd.to_numeric(frame["score"], errors="coerce").to_numpy(dtype=float)


def output_norm(job: FinishedJob) -> float:
    """The ablated heads' mean output norm (job.json ``output_norm_mean``; nan for records
    written before it and for unablated jobs)."""
    return as_float(getattr(job.record, "output_norm_mean", None))


def head_set_row(job: FinishedJob, group: Group, n: int, cond: str) -> dict:
    """What the row's heads are: their mean output norm, the min/mean/max of their scores;
    for ``high`` how the controls' output norms compare with its own (the ``low`` heads'
    mean norm over the high heads', the random draws' mean of theirs over the high heads')
    and how many distinct head sets the random draws at this N are."""
    if cond == "none":
        return {}
    scores = head_scores(job)
    scores = scores[np.isfinite(scores)]
    row = {"output_norm_mean": output_norm(job)}
    if len(scores):
        row |= {"score_mean": float(scores.mean()), "score_min": float(scores.min()),
                "score_max": float(scores.max())}
    draws = group.control(n, "random")
    if draws and all(j.record.heads for j in draws):  # (records list the heads they ablate)
        row["n_random_sets"] = len({frozenset(map(tuple, j.record.heads)) for j in draws})
    if cond != "high":
        return row
    own = row["output_norm_mean"]
    low = group.cells.get((n, "low", 0))
    if low is not None and own > 0:
        row["low_norm_ratio"] = output_norm(low) / own
    if draws:
        norms = [output_norm(j) for j in draws]
        if own > 0 and all(np.isfinite(norms)):
            row["random_norm_ratio"] = float(np.mean(norms)) / own
    return row


def _near_tie_comparison(a: pd.DataFrame, b: pd.DataFrame) -> tuple[float, float, bool]:
    """:func:`ih_sweep.report.statistics.near_tie_delta_range` of A minus B on their paired
    items."""
    m = _aligned(a, b, ["correct", "near_tie"])
    return st.near_tie_delta_range(as_bool(m.correct_a), as_bool(m.near_tie_a),
                                   as_bool(m.correct_b), as_bool(m.near_tie_b))


def near_tie_row(job: FinishedJob, group: Group, n: int, cond: str) -> dict:
    """The job's near-tie count and accuracy range, and for each comparison the range of
    the difference if every near-tie fell the other way and whether the difference lies
    inside it (empty where either job has no ``near_tie`` column)."""
    res = job.results
    if not has_column(res, "near_tie"):
        return {}
    tie = as_bool(res["near_tie"])
    low, high = st.near_tie_range(as_bool(res["correct"]), tie)
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
    return (float(x.mean() - y.mean()), *bootstrap_ci(x, y))


def _item_means(jobs: list[FinishedJob], column: str) -> pd.DataFrame:
    """Per item (story, question_index), the mean of ``column`` over ``jobs`` (the random
    draws at one N: the matched random control of each item)."""
    key = ["story", "question_index"]
    frames = [j.results[key + [column]].assign(**{column: pd.to_numeric(
        j.results[column], errors="coerce")}) for j in jobs]
    return pd.concat(frames).groupby(key, as_index=False)[column].mean()


def continuous_row(job: FinishedJob, group: Group, n: int, cond: str) -> dict:
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


def seed_overlaps(jobs: list[FinishedJob]) -> dict[int, tuple[float, int]]:
    """Per ablated job whose heads were ranked with an ``fv_seed`` that other jobs of the
    sweep ran otherwise alike (every other setting of job.json's ``settings`` equal): the
    mean pairwise overlap |A n B| / N of their heads over the distinct seeds
    (:func:`ih_sweep.heads.stability.pairwise_overlap`) and how many seeds, keyed by
    ``id(job)``; absent where fewer than two seeds were run."""
    import json

    from ih_sweep.heads.stability import pairwise_overlap
    from ih_sweep.report.groups import flat

    alike: dict[str, dict[Any, FinishedJob]] = {}
    for job in jobs:
        settings = flat(job.record.settings or {})
        if "scoring.fv_seed" not in settings or not job.record.heads:
            continue
        rest = {k: v for k, v in settings.items() if k != "scoring.fv_seed"}
        key = json.dumps(rest, sort_keys=True, default=str)
        alike.setdefault(key, {}).setdefault(settings["scoring.fv_seed"], job)
    out: dict[int, tuple[float, int]] = {}
    for by_seed in alike.values():
        overlap = pairwise_overlap([[tuple(h) for h in j.record.heads]
                                    for j in by_seed.values()])
        if overlap is not None:
            for job in by_seed.values():
                out[id(job)] = (overlap, len(by_seed))
    return out


def stability_row(job: FinishedJob, seeds: dict[int, tuple[float, int]]) -> dict:
    """:data:`STABILITY_COLUMNS` of a job: job.json's ``rank_stability`` (the bootstrap
    mean overlap and what it resampled), the overlap across ``fv_seed`` values
    (:func:`seed_overlaps`), and ``rank_unstable``: either below
    :data:`ih_sweep.heads.stability.UNSTABLE_BELOW` (empty where neither is known)."""
    from ih_sweep.heads.stability import unstable

    got = job.record.rank_stability if isinstance(job.record.rank_stability, dict) else {}
    row: dict = {}
    if got:
        row["rank_stability"] = as_float(got.get("mean_overlap"))
        row["rank_stability_over"] = f"{got.get('samples')} {got.get('over')}"
    if id(job) in seeds:
        row["rank_stability_seeds"], row["n_rank_seeds"] = seeds[id(job)]
    known = [row[k] for k in ("rank_stability", "rank_stability_seeds") if k in row]
    if known:
        row["rank_unstable"] = any(unstable(v) for v in known)
    return row


def summarize_jobs(jobs: list[FinishedJob], grouped: tuple[list[Group], list[str]] | None = None
                   ) -> tuple[pd.DataFrame, list[str]]:
    """summary.csv: one row per distinct job of each group
    (:func:`ih_sweep.report.groups.cell_groups`; ``grouped``: its result when already
    computed), columns :data:`SUMMARY_COLUMNS`
    (accuracy and its tests with their Holm adjustments and the random null's limits, the
    near-tie floor, the continuous metrics and the mechanism check, the last three where
    the jobs recorded them), and the grouping's notes."""
    groups, notes = grouped or cell_groups(jobs)
    seeds = seed_overlaps(jobs)
    cells = [(group, n, cond, seed, job) for group in groups
             for (n, cond, seed), job in group.cells.items()]

    def make(cell: tuple) -> dict:
        group, n, cond, seed, job = cell
        with TURNS.turn():
            row = {"group": group.name, **group_of(job), "n_heads": n,
                   "n_heads_share": share(job), "condition": cond, "control_seed": seed}
            row |= accuracy_row(job, group, n, cond)
            row |= head_set_row(job, group, n, cond)
            row |= near_tie_row(job, group, n, cond)
            row |= continuous_row(job, group, n, cond)
            mechanism = job.record.mechanism if isinstance(job.record.mechanism, dict) else {}
            row |= {k: as_float(mechanism.get(k)) for k in MECHANISM_COLUMNS}
            row |= stability_row(job, seeds)
            return row

    pool = ThreadPoolExecutor(min(ROW_THREADS, max(1, len(cells))))
    try:
        rows = list(pool.map(make, cells))  # in the cells' order
    except BaseException:  # a row failed (or Ctrl-C): start no other
        pool.shutdown(cancel_futures=True)
        raise
    pool.shutdown()
    df = pd.DataFrame(rows)
    for col in SUMMARY_COLUMNS:
        if col not in df.columns:
            df[col] = np.nan
    # the Holm families (p vs none, vs low, vs random: each over the whole summary) and the
    # random null's limits (:mod:`ih_sweep.report.families`)
    df = add_null_limits(add_holm(df))
    return df[SUMMARY_COLUMNS], notes
