"""The summary's sections beside the accuracy table: the near-tie floor (issue #21 item 4),
the continuous metrics and the mechanism check (issue #17), the difficulty strata. Job
folders are synthetic, written through the project's records with the per-item columns
and job.json fields the evaluation records (test_summary.make_job)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from summary_jobs import make_job

from ih_sweep.report.discover import find_jobs
from ih_sweep.report.plots import plot_strata
from ih_sweep.report.render import console_report
from ih_sweep.report.sections import SECTIONS
from ih_sweep.report.summarize import summarize
from ih_sweep.report.tables import strata_table


def md_tables(md: str, title: str) -> list[dict[str, str]]:
    """The rows of the first markdown table after the heading ``### title``."""
    lines = md[md.index(f"### {title}\n"):].splitlines()[2:]
    rows = [[c.strip() for c in line.strip().strip("|").split("|")]
            for line in lines[:next(i for i, x in enumerate(lines) if not x.startswith("|"))]]
    return [dict(zip(rows[0], r)) for r in rows[2:]]


def row_of(rows: list[dict[str, str]], condition: str, seed: str = "") -> dict[str, str]:
    return next(r for r in rows if r["condition"] == condition
                and r.get("control seed", "") == seed)


# --------------------------------------------------------------------------- near-ties
def _tie_sweep(root, ties: dict[str, list[int]]):
    """20 items; ``none`` all right, ``high`` wrong on 0-1, ``low`` wrong on 0-3, random
    draw 0 all right, draw 1 wrong on 0-9; ``ties``: each job's near-tie items."""
    wrong = {"none": [], "high": [0, 1], "low": [0, 1, 2, 3], "r0": [], "r1": list(range(10))}
    for name, cond, n, seed in (("none", "none", 0, 0), ("high", "high", 4, 0),
                                ("low", "low", 4, 0), ("r0", "random", 4, 0),
                                ("r1", "random", 4, 1)):
        correct = [i not in wrong[name] for i in range(20)]
        tie = [i in ties.get(name, []) for i in range(20)]
        make_job(root, name, n, cond, correct, seed=seed, extra={"near_tie": tie})


def test_near_ties_that_could_produce_the_difference_are_inside(tmp_path):
    """high's two wrong items are near-ties: flipped, high would equal none (and random
    draw 0), so those differences are inside; against low (one near-tie of its four wrong
    items) and draw 1 they are not."""
    _tie_sweep(tmp_path, {"high": [0, 1], "low": [0]})
    df = summarize(tmp_path).set_index(["condition", "control_seed"])
    h, lo = df.loc[("high", 0)], df.loc[("low", 0)]
    assert h.n_near_tie == 2 and (h.near_tie_acc_low, h.near_tie_acc_high) == (0.9, 1.0)
    # high - none = -0.1; high's near-ties can add 2/20: range [-0.1, 0.0] reaches 0
    assert (h.delta_vs_none_nt_low, h.delta_vs_none_nt_high) == pytest.approx((-0.1, 0.0))
    assert h.within_near_ties_vs_none
    # high - low = +0.1: [0.9 - 0.85, 1.0 - 0.8] = [0.05, 0.2], 0 outside
    assert (h.delta_vs_low_nt_low, h.delta_vs_low_nt_high) == pytest.approx((0.05, 0.2))
    assert not h.within_near_ties_vs_low
    assert h.random_within_near_ties == 1 and h.n_random == 2  # draw 0 in, draw 1 (+0.4) out
    # low - none = -0.2; low's one near-tie (wrong) can add 1/20: [-0.2, -0.15]
    assert (lo.delta_vs_none_nt_low, lo.delta_vs_none_nt_high) == pytest.approx((-0.2, -0.15))
    assert not lo.within_near_ties_vs_none
    md = (tmp_path / "summary.md").read_text()
    rows = md_tables(md, "Near-tie floor")
    assert row_of(rows, "high") == {
        "N": "4", "condition": "high", "control seed": "", "items": "20", "near-ties": "2",
        "accuracy % if near-ties flip": "[90.0, 100.0]",
        "Δ vs none if near-ties flip": "[-10.0, 0.0]", "Δ vs none within near-ties": "inside",
        "Δ vs low if near-ties flip": "[5.0, 20.0]", "Δ vs low within near-ties": "outside",
        "random draws inside": "1 of 2"}
    assert row_of(rows, "low")["Δ vs none within near-ties"] == "outside"
    assert row_of(rows, "none")["Δ vs none within near-ties"] == ""  # none against itself: nothing
    assert "`inside` when that range reaches 0, so near-ties alone could produce" in md
    csv = pd.read_csv(tmp_path / "summary.csv")
    assert csv.set_index("condition").loc["high", "within_near_ties_vs_none"]
    report = console_report(summarize(tmp_path), tmp_path)
    assert "Near-ties alone could produce: N=4 high vs unablated (summary.md, near-tie floor)." \
        in report  # the console names the comparison inside, summary.md has the floor
    assert "Near-tie floor\n" not in report


def test_a_difference_no_near_tie_can_move_reads_no_near_ties_not_outside(tmp_path):
    """Without any near-tie the range if near-ties flip is one point ([0.0, 0.0] for a
    control that loses nothing): the table says ``no near-ties``, as the legend does, not
    ``outside``; a range of more than one point keeps inside / outside."""
    _tie_sweep(tmp_path, {"high": [0, 1]})
    df = summarize(tmp_path).set_index(["condition", "control_seed"])
    lo = df.loc[("low", 0)]
    assert lo.delta_vs_none_nt_low == lo.delta_vs_none_nt_high == pytest.approx(-0.2)
    md = (tmp_path / "summary.md").read_text()
    rows = md_tables(md, "Near-tie floor")
    assert row_of(rows, "low")["Δ vs none within near-ties"] == "no near-ties"
    assert row_of(rows, "high")["Δ vs none within near-ties"] == "inside"
    assert "`no near-ties` when neither job has a near-tie that could move it" in md


def test_without_near_ties_the_floor_is_empty_and_every_comparison_says_so(tmp_path):
    """The float32 case: near_tie recorded, never true. Even the zero difference of random
    draw 0 against none reads ``no near-ties`` (not outside, not inside): no near-tie could
    have produced anything, and the flag stays False."""
    _tie_sweep(tmp_path, {})
    df = summarize(tmp_path)
    ablated = df[df.condition != "none"]
    assert (df.n_near_tie == 0).all()
    assert (df.near_tie_acc_low == df.accuracy).all() and \
        (df.near_tie_acc_high == df.accuracy).all()
    assert not ablated.within_near_ties_vs_none.astype(bool).any()
    assert ablated.delta_vs_none_nt_low.to_numpy() == pytest.approx(ablated.delta_vs_none)
    rows = md_tables((tmp_path / "summary.md").read_text(), "Near-tie floor")
    assert {r["near-ties"] for r in rows} == {"0"}
    verdicts = {r["Δ vs none within near-ties"] for r in rows if r["condition"] != "none"}
    assert verdicts == {"no near-ties"}
    assert row_of(rows, "random", "0")["Δ vs none if near-ties flip"] == "[0.0, 0.0]"
    assert row_of(rows, "high")["random draws inside"] == "0 of 2"


# --------------------------------------------------------------------------- continuous
def test_continuous_metrics_paired_against_none_low_and_the_random_mean(tmp_path):
    rng = np.random.default_rng(5)
    n = 60
    base = rng.normal(-1.0, 0.3, n)
    values = {"none": base, "high": base - 2.0 + rng.normal(0, 0.2, n),
              "low": base - 0.1 + rng.normal(0, 0.2, n),
              "r0": base - 0.2 + rng.normal(0, 0.2, n), "r1": base + rng.normal(0, 0.2, n)}
    values["high"][3] = np.nan  # an item without a value: left out of its pairs
    for name, cond, seed in (("none", "none", 0), ("high", "high", 0), ("low", "low", 0),
                             ("r0", "random", 0), ("r1", "random", 1)):
        v = values[name]
        make_job(tmp_path, name, 0 if cond == "none" else 8, cond, v > -2.5, seed=seed,
                 extra={"gold_logprob": v, "logit_diff": 3 * v + 5})
    df = summarize(tmp_path).set_index(["condition", "control_seed"])
    h = df.loc[("high", 0)]
    keep = np.arange(n) != 3
    assert h.gold_logprob == pytest.approx(np.nanmean(values["high"]))
    vs_none = (values["high"] - base)[keep].mean()
    assert h.gold_logprob_vs_none == pytest.approx(vs_none)
    assert h.gold_logprob_vs_none_ci_low < vs_none < h.gold_logprob_vs_none_ci_high < -1.5
    assert h.gold_logprob_vs_low == pytest.approx((values["high"] - values["low"])[keep].mean())
    random_mean = (values["r0"] + values["r1"]) / 2  # per item, over the draws
    assert h.gold_logprob_vs_random == pytest.approx((values["high"] - random_mean)[keep].mean())
    assert h.logit_diff_vs_none == pytest.approx(3 * vs_none)  # linear in the log-prob here
    lo = df.loc[("low", 0)]
    assert lo.gold_logprob_vs_none == pytest.approx((values["low"] - base).mean())
    assert np.isnan(lo.gold_logprob_vs_low) and np.isnan(df.loc[("none", 0)].gold_logprob_vs_none)
    rows = md_tables((tmp_path / "summary.md").read_text(), "Continuous metrics")
    cell = row_of(rows, "high")["gold log-prob Δ vs none [95% CI]"]
    assert cell == (f"{h.gold_logprob_vs_none:.3g} [{h.gold_logprob_vs_none_ci_low:.3g}, "
                    f"{h.gold_logprob_vs_none_ci_high:.3g}]")
    assert row_of(rows, "none")["mean gold log-prob"] == f"{base.mean():.3g}"


# --------------------------------------------------------------------------- mechanism
def test_mechanism_check_per_job_in_csv_markdown_and_console(tmp_path):
    mech = {"none": (2.0, 2.0, -1.5, -1.5), "high": (4.5, 2.0, -0.2, -1.5),
            "low": (2.1, 2.0, -1.4, -1.5)}
    for cond, (rl, rlu, icl, iclu) in mech.items():
        make_job(tmp_path, cond, 0 if cond == "none" else 4, cond, [True, False] * 10,
                 mechanism={"repeat_loss": rl, "repeat_loss_unablated": rlu, "icl_score": icl,
                            "icl_score_unablated": iclu, "positions": [50, 500]})
    df = summarize(tmp_path)
    csv = pd.read_csv(tmp_path / "summary.csv").set_index("condition")
    for cond, values in mech.items():
        assert tuple(csv.loc[cond, ["repeat_loss", "repeat_loss_unablated", "icl_score",
                                    "icl_score_unablated"]]) == values
    rows = md_tables((tmp_path / "summary.md").read_text(), "Mechanism check")
    assert row_of(rows, "high") == {"N": "4", "condition": "high", "control seed": "",
                                    "repeat loss (nats)": "4.500",
                                    "repeat loss unablated": "2.000", "ICL score (nats)": "-0.200",
                                    "ICL score unablated": "-1.500"}
    assert "mechanism check" in console_report(df, tmp_path)  # where to find it
    tex = (tmp_path / "summary.tex").read_text()
    assert ": Mechanism check\n" in tex and "repeat loss unablated" in tex


# --------------------------------------------------------------------------- strata
def test_strata_accuracy_per_support_distance_pooled_at_5(tmp_path):
    distance = [1, 2, 3, 4, 5, 7, 9, 1, 2, 3]
    recency = [True, False] * 5
    none_ok = [True] * 10
    high_ok = [d <= 2 for d in distance]
    extra = {"support_distance": distance, "recency_correct": recency,
             "mentions": [1, 1, 2, 2, 3, 3, 4, 5, 6, 1], "question_position": [4] * 10,
             "gold_logprob": [-0.5] * 10}
    make_job(tmp_path, "none", 0, "none", none_ok, extra=extra)
    make_job(tmp_path, "high", 4, "high", high_ok, extra=extra)
    for seed in (0, 1):
        make_job(tmp_path, f"r{seed}", 4, "random", [d != 3 for d in distance], seed=seed,
                 extra=extra)
    summarize(tmp_path)
    table = pd.read_csv(tmp_path / "strata.csv", keep_default_na=False)
    sd = table[table.stratum == "support_distance"].set_index(["condition", "value"])
    assert list(sd.loc["high"].index) == ["1", "2", "3", "4", "5+"]
    assert sd.loc[("high", "5+")].n_items == 3 and sd.loc[("high", "5+")].accuracy == 0
    assert sd.loc[("high", "1")].n_correct == 2 and sd.loc[("high", "1")].accuracy == 1
    r3 = sd.loc[("random", "3")]
    assert r3.n_draws == 2 and r3.n_items == 4 and r3.accuracy == 0  # two draws pooled
    assert (r3.ci_low, r3.ci_high) == pytest.approx((0.0, 0.4899), abs=1e-4)  # Wilson 0/4
    assert sd.loc[("none", "1")].gold_logprob == -0.5
    rec = table[table.stratum == "recency_correct"].set_index(["condition", "value"])
    assert rec.loc[("high", "yes")].n_items == 5 and rec.loc[("high", "no")].n_items == 5
    md = (tmp_path / "summary.md").read_text()
    section = md[md.index("## Difficulty strata"):]
    assert "**support_distance** (statements back to the supporting fact)" in section
    high_row = next(line for line in section.splitlines() if "| high" in line)
    assert [c.strip() for c in high_row.strip("|").split("|")] == [
        "4", "high", "100.0 (2)", "100.0 (2)", "0.0 (2)", "0.0 (1)", "0.0 (3)"]
    assert "random (2 draws)" in section
    assert "**Difficulty strata** (strata.csv, strata.png)" in md  # in the legend
    assert (tmp_path / "strata.png").stat().st_size > 1000


def test_strata_of_jobs_with_some_stratum_columns(tmp_path):
    """Only support_distance recorded: only that stratum; strata_table is pure."""
    make_job(tmp_path, "none", 0, "none", [True, False, True],
             extra={"support_distance": [1, 1, 6]})
    table = strata_table(find_jobs(tmp_path).jobs)
    assert set(table.stratum) == {"support_distance"}
    assert table.set_index("value").n_items.to_dict() == {"1": 2, "5+": 1}
    assert plot_strata(table, tmp_path / "s.png") == tmp_path / "s.png"
    assert plot_strata(table, tmp_path / "m.png", stratum="mentions") is None


# --------------------------------------------------------------------------- old jobs
def test_jobs_without_the_new_records_leave_each_section_out_with_one_line(tmp_path):
    make_job(tmp_path, "none", 0, "none", [True, False] * 10)
    make_job(tmp_path, "high", 4, "high", [False] * 20)
    df = summarize(tmp_path)
    md = (tmp_path / "summary.md").read_text()
    for sec in SECTIONS:
        assert f"*{sec.title}: left out: {sec.absent}.*" in md
        assert f"### {sec.title}" not in md
    assert "## Difficulty strata\n\n*Left out: no job's results.csv has the stratum columns" \
        in md
    assert not (tmp_path / "strata.csv").exists() and not (tmp_path / "strata.png").exists()
    assert "near-ties" not in md.split("### Legend")[1]  # no legend of what is not shown
    assert "Near-ties alone could produce" not in console_report(df, tmp_path)
    csv = pd.read_csv(tmp_path / "summary.csv")  # the columns are there, empty
    assert csv[["n_near_tie", "gold_logprob", "repeat_loss"]].isna().all().all()


# --------------------------------------------------------------------------- stability
def test_ranking_stability_in_csv_markdown_and_figure(tmp_path):
    """job.json's rank_stability per row, the overlap across fv_seed of jobs otherwise
    alike (heads {0..3} and {0, 1, 2, 9}: 3 of 4 in common), the flag below 80%."""
    from summary_jobs import edit_record

    make_job(tmp_path, "none", 0, "none", [True] * 20)
    for name, fv_seed, heads, kept in (("s0", 0, [0, 1, 2, 3], 0.9),
                                       ("s1", 1, [0, 1, 2, 9], 0.95)):
        folder = make_job(tmp_path, name, 4, "high", [True, False] * 10, rank_by="fv")
        edit_record(folder, {
            "heads": [[1, h] for h in heads],
            "settings": {"n_heads": 4, "condition": "high",
                         "scoring": {"rank_by": "fv", "fv_seed": fv_seed}},
            "rank_stability": {"score": "fv", "over": "prompts", "samples": 25,
                               "resamples": 200, "seed": 0, "mean_overlap": kept,
                               "threshold": 0.8, "unstable": False}})
    summarize(tmp_path)
    csv = pd.read_csv(tmp_path / "summary.csv")
    high = csv[csv.condition == "high"].sort_values("rank_stability")
    assert high.rank_stability.tolist() == [0.9, 0.95]
    assert high.rank_stability_over.tolist() == ["25 prompts"] * 2
    assert high.rank_stability_seeds.tolist() == [0.75, 0.75]  # 3 of 4 heads in common
    assert high.n_rank_seeds.tolist() == [2, 2] and high.rank_unstable.tolist() == [True] * 2
    assert csv.loc[csv.condition == "none", "rank_stability"].isna().all()
    md = (tmp_path / "summary.md").read_text()
    rows = [row_of(md_tables("### " + part, "Ranking stability"), "high")
            for part in md.split("### ")[1:]  # one table per fv_seed's group
            if part.startswith("Ranking stability\n")]
    assert len(rows) == 2
    assert sorted(r["top-N kept (bootstrap)"] for r in rows) == \
        ["90.0% over 25 prompts", "95.0% over 25 prompts"]
    assert {(r["top-N kept across fv_seed"], r["ranking"]) for r in rows} == \
        {("75.0% (2 seeds)", "UNSTABLE")}
    assert "**ranking** `UNSTABLE`: either share below 80%" in md


def test_unstable_points_are_ringed_in_the_figure(tmp_path):
    from ih_sweep.report.figures import pyplot
    from ih_sweep.report.plots import plot_accuracy_vs_n, plot_unstable

    rows = pd.DataFrame({"condition": ["none", "high", "high", "low"], "n_heads": [0, 4, 8, 4],
                         "n_heads_share": [np.nan] * 4, "accuracy": [1.0, 0.5, 0.4, 0.9],
                         "ci_low": [0.9, 0.4, 0.3, 0.8], "ci_high": [1.0, 0.6, 0.5, 1.0],
                         "rank_by": ["prefix"] * 4,
                         "rank_unstable": [np.nan, True, False, np.nan]})
    assert plot_accuracy_vs_n(rows, tmp_path / "a.png").is_file()
    fig, ax = pyplot().subplots()
    plot_unstable(ax, rows.assign(x=rows.n_heads), 0.0)
    (ring,) = ax.collections
    assert ring.get_label().startswith("unstable ranking")
    assert ring.get_offsets().tolist() == [[4.0, 50.0]]  # high at N=4 only
    fig2, ax2 = pyplot().subplots()
    plot_unstable(ax2, rows.drop(columns="rank_unstable").assign(x=rows.n_heads), 0.0)
    assert not ax2.collections  # summaries written before the column: nothing ringed
