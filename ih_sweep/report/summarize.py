"""Turn a sweep folder into what a researcher reports: tables, paired statistics, plots.

Runs at the end of every multirun (Hydra callback) and standalone:
``python -m ih_sweep.report <sweep dir>`` (:mod:`ih_sweep.report.command`); given several sweep
folders, the command writes one cross-model table instead (:mod:`ih_sweep.report.cross_model`).
Idempotent; never drops a job silently. :func:`summarize` runs the stages in order:

1. find the jobs (:mod:`ih_sweep.report.discover`, job folders read through
   :mod:`ih_sweep.pipeline.records`, the same definitions the jobs write with);
2. group the comparable jobs (:mod:`ih_sweep.report.groups`);
3. the statistics rows of summary.csv (:mod:`ih_sweep.report.rows`, the maths in
   :mod:`ih_sweep.report.statistics`, the Holm families and the random null's limits in
   :mod:`ih_sweep.report.families`) and the tables beside it (:mod:`ih_sweep.report.tables`);
4. markdown and LaTeX (:mod:`ih_sweep.report.render`, the tables' columns in
   :mod:`ih_sweep.report.sections`, the cells in :mod:`ih_sweep.report.cells`);
5. the figures (:mod:`ih_sweep.report.plots`).

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
p_vs_none_holm   Holm-adjusted over every p_vs_none of the summary (all groups: tasks,
                 models, arms, ablation methods; all N and conditions but ``random``: its
                 draws are the null's sample, not hypotheses; empty there)
delta_vs_low, p_vs_low        for ``high``: against ``low`` at the same N (McNemar)
delta_vs_low_ci_low, delta_vs_low_ci_high   paired bootstrap 95% interval of delta_vs_low
p_vs_low_holm    Holm-adjusted over every p_vs_low of the summary (a family of its own, as
                 wide as p_vs_none_holm's; empty where p_vs_low is)
p_vs_random      every row but ``random`` and ``none`` (``high``, ``low`` and any other
                 selection of heads), where the group has ``random`` draws at the same N:
                 empirical p within that null, (1 + #{draws with accuracy <= the row's})
                 / (1 + n_random); one-sided, a draw at least as extreme is one at or below
                 the row's accuracy (ties count against the row), so a small p says that
                 ablating these heads lowers accuracy more than layer-matched random heads
                 do, and a row that hurts less than every draw gets 1
                 (:func:`ih_sweep.report.statistics.empirical_p`). With K draws the smallest
                 possible p is 1 / (K + 1): K >= 19 can reach 0.05
p_vs_random_holm Holm-adjusted over every p_vs_random of the summary (a family of its own,
                 as wide as p_vs_none_holm's; empty where p_vs_random is). The three
                 families are :data:`ih_sweep.report.families.FAMILIES`; each is adjusted
                 apart from the others, its missing p-values left out of it
n_random         number of random draws (K) behind p_vs_random and the band
random_acc_p2_5, random_acc_p97_5   the same rows: the 2.5th and 97.5th percentiles of
                 the draws' accuracies at the same N (the null's 95% band; numpy's linear
                 interpolation, as the accuracy-vs-N figure draws it)
null_band_at     the same rows: ``ceiling`` where that band is at 100% at both ends,
                 ``floor`` where at 0% at both ends (the null cannot separate at that N: its
                 draws lose nothing, or everything, on these items), empty otherwise
p_vs_random_holm_min   the rows of p_vs_random's family: the smallest p_vs_random_holm the
                 row could have had, whatever the heads did, min(1, max(m / (K_max + 1),
                 1 / (K + 1))) for the family's m p-values and largest null K_max; above
                 0.05, no p vs random of that N can survive the correction (the summary
                 says so in words under the group's table; :mod:`ih_sweep.report.families`)

The ablated heads (every row but ``none``; from heads.csv and job.json, empty for jobs
recorded before output norms existed):
output_norm_mean the row's heads' mean output norm ||z_h W_O^h|| over the reference
                 prompts (residual-stream units; :mod:`ih_sweep.heads.output_norms`): how
                 much the ablated heads write
score_mean, score_min, score_max   their scores under ``rank_by`` (heads.csv ``score``)
low_norm_ratio   for ``high``: the ``low`` heads' output_norm_mean over the high heads' at
                 the same N (1 = a control that writes as much; the layer-matched lowest
                 scorers of the tiny model write ~0.2x)
random_norm_ratio   for ``high``: the random draws' mean output_norm_mean over the high
                 heads' (``control.match=layer_norm`` draws each head within
                 ``control.norm_factor`` of the top head it stands for)
n_random_sets    rows compared with the random draws: how many distinct head sets they are (a
                 norm-matched null of a layer with few matching heads repeats its sets; a
                 null of one set is a single control, not a distribution)

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

Ranking stability (issue #30 item 3, ih_sweep.heads.stability; empty where not known):
rank_stability   job.json ``rank_stability.mean_overlap`` (rows ``high`` and ``low``
                 ranked by prefix or fv): the mean share |A n B| / N of the ablated heads A
                 chosen again (B) over 200 seeded bootstrap resamples of the samples the
                 score averages over
rank_stability_over   what was resampled: ``<count> prompts`` (fv) or ``<count> sequences``
                 (prefix)
rank_stability_seeds, n_rank_seeds   the mean pairwise share of heads in common between
                 the jobs of the sweep run with different ``scoring.fv_seed`` and otherwise
                 alike, and how many seeds
rank_unstable    True where either share is below 0.8 (UNSTABLE_BELOW): flagged in
                 summary.md's Ranking stability section and ringed in accuracy_vs_n.png

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
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd

from ih_sweep.io_utils import write_csv, write_text
from ih_sweep.pipeline.records import read_record
from ih_sweep.report.discover import find_jobs, missing_jobs
from ih_sweep.report.errors import SummaryError, SummaryIncomplete, why
from ih_sweep.report.groups import cell_groups
from ih_sweep.report.plots import (
    arm_row,
    plot_ablated_heads,
    plot_accuracy_vs_n,
    plot_icl,
    plot_strata,
    short_title,
)
from ih_sweep.report.render import to_latex, to_markdown
from ih_sweep.report.reuse import remember, reusable, summary_key
from ih_sweep.report.rows import SUMMARY_COLUMNS, summarize_jobs
from ih_sweep.report.tables import icl_curve, robustness_table, strata_table

log = logging.getLogger(__name__)


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
    found.problems = [(f, known.pop(f, reason)) for f, reason in found.problems] + \
        list(known.items())
    present = {str(j.path.relative_to(sweep_dir)) for j in found.jobs} | \
        {str(p.relative_to(sweep_dir)) for p in found.scan_parts + found.seed_parents} | \
        {f for f, _ in found.problems}
    found.problems += missing_jobs(sweep_dir, present)
    if not found.jobs and not found.problems and not found.scan_parts:
        raise SummaryError(f"{sweep_dir}: no ih_sweep jobs here (no job.json or .hydra/)")
    for folder, reason in found.problems:
        log.warning("left out %s: %s", folder, reason)
    key = None
    if found.jobs and not found.problems and not found.scan_parts:
        key = summary_key(sweep_dir, [j.record.scores_file for j in found.jobs
                                      if j.record.scores_file], not_finished or [])
        if reusable(sweep_dir, key):
            log.info("summary of %d jobs in %s reused: nothing it reads has changed since it "
                     "was written", len(found.jobs), sweep_dir)
            return pd.read_csv(sweep_dir / "summary.csv")
    failed: list[tuple[str, str]] = []

    def step(name: str, make: Callable[[], Any]) -> Any:
        """Run one output step; a failure is recorded (and logged) and the others go on."""
        try:
            return make()
        except Exception as err:
            log.error("summary: %s failed: %s", name, why(err), exc_info=log.isEnabledFor(
                logging.DEBUG))
            failed.append((name, why(err)))
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
            g, sweep_dir / name, title=short_title(arm_row(g))))
    if strata is not None and not strata.empty:
        parts = list(strata.groupby("group", sort=False))
        for i, (gname, part) in enumerate(parts):
            name = "strata.png" if len(parts) == 1 else f"strata_{i}.png"
            row = arm_row(df[df.group == gname])
            step(name, lambda part=part, name=name, row=row: plot_strata(
                part, sweep_dir / name, title="Accuracy by support distance: "
                + short_title(row)))
    heatmaps = plot_ablated_heads(found.jobs, sweep_dir, step)
    curve = step("icl_curve.csv", lambda: icl_curve(found.jobs))
    if curve is not None and not curve.empty:
        step("icl_curve.csv", lambda: write_csv(sweep_dir / "icl_curve.csv", curve))
        step("icl_curve.png", lambda: plot_icl(
            curve, sweep_dir / "icl_curve.png",
            title="In-context learning curve: " + short_title(df.iloc[0])))
    for note in notes:
        log.info("%s", note)
    log.info("summary of %d jobs (%d rows) written to %s (%d left out)", len(found.jobs),
             len(df), sweep_dir, len(found.problems))
    if heatmaps:
        log.info("ablated heads on their scores: %s", ", ".join(p.name for p in heatmaps))
    if key is not None and not failed:
        remember(sweep_dir, key)  # a complete summary: the next one may reuse it
    return finish(df)


if __name__ == "__main__":  # the command is a module of its own: tell the old name's users
    raise SystemExit("the summary command is python -m ih_sweep.report (this module is its "
                     "library)")
