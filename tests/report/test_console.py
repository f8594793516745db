"""The console's end-of-sweep report (ih_sweep.report.console): the README's N x condition
table, one line per comparison, and the null's draws as a band."""

from __future__ import annotations

import numpy as np

from ih_sweep.report.console import condition_table, plain_markdown
from ih_sweep.report.render import console_report
from ih_sweep.report.summarize import summarize
from tests.summary_jobs import make_job

ITEMS = 40


def right_but(wrong: int) -> np.ndarray:
    return np.arange(ITEMS) >= wrong


def _sweep(root, draws: int = 0, rank_by: str = "prefix") -> None:
    make_job(root, "none4", 4, "none", right_but(0), rank_by=rank_by)
    make_job(root, "none8", 8, "none", right_but(0), rank_by=rank_by)
    for n, wrong in ((4, 2), (8, 20)):
        make_job(root, f"high{n}", n, "high", right_but(wrong), rank_by=rank_by)
        make_job(root, f"low{n}", n, "low", right_but(1), rank_by=rank_by)
    for k in range(draws):
        make_job(root, f"rand8-{k}", 8, "random", right_but(k), seed=k, rank_by=rank_by)


def test_the_table_has_a_row_per_n_and_a_column_per_condition(tmp_path):
    _sweep(tmp_path)
    df = summarize(tmp_path)
    table = condition_table(df)
    assert list(table.columns) == ["N", "top-N (induction) ablated",
                                   "layer-matched lowest-N ablated", "unablated"]
    assert table.N.tolist() == ["4", "8"]
    # 38/40 = 95.0% with its Wilson interval; the unablated job in every row
    assert table.iloc[0, 1].startswith("95.0 [") and table.iloc[1, 1].startswith("50.0 [")
    assert table.iloc[0, 3] == table.iloc[1, 3] and table.iloc[0, 3].startswith("100.0 [")
    assert plain_markdown(table).splitlines()[:2] == [
        "| N | top-N (induction) ablated | layer-matched lowest-N ablated | unablated |",
        "|---|---|---|---|"]


def test_the_report_prints_the_table_and_a_line_per_comparison_not_the_long_table(tmp_path):
    _sweep(tmp_path)
    df = summarize(tmp_path)
    report = console_report(df, tmp_path)
    assert report.count("\n| N |") == 1
    assert "accuracy %" not in report and "Mechanism check\n" not in report
    high8 = df[(df.condition == "high") & (df.n_heads == 8)].iloc[0]
    assert (f"N=8 high vs unablated: -50.0 points [{100 * high8.delta_ci_low:.1f}, "
            f"{100 * high8.delta_ci_high:.1f}], exact McNemar p = {high8.p_vs_none:.3g} "
            f"(Holm {high8.p_vs_none_holm:.3g}); vs low: -47.5 points") in report
    assert report.rstrip().endswith(str(tmp_path))


def test_k_draws_are_one_band_cell(tmp_path):
    _sweep(tmp_path, draws=5)
    df = summarize(tmp_path)
    table = condition_table(df)
    assert "layer-matched random-N ablated" in table.columns
    cells = table.set_index("N")["layer-matched random-N ablated"]
    accs = np.array([ITEMS - k for k in range(5)]) / ITEMS
    lo, hi = np.quantile(accs, [0.025, 0.975])
    assert cells["8"] == f"[{100 * lo:.1f}, {100 * hi:.1f}] (5 draws)" and cells["4"] == ""
    report = console_report(df, tmp_path)
    assert "N=8 random vs" not in report  # the draws are the null, not comparisons
    assert "vs the random null (5 draws): p = " in report


def test_a_ranking_other_than_prefix_is_named(tmp_path):
    _sweep(tmp_path, rank_by="fv")
    table = condition_table(summarize(tmp_path))
    assert table.columns[1] == "top-N by fv ablated"
