"""The summary's robustness table across ablation methods (issue #18 item 3): synthetic job
folders (test_summary.make_job) whose groups differ only in ``ablation``."""

from __future__ import annotations

import shutil

import numpy as np
import pandas as pd
import pytest
from summary_jobs import edit_record, make_job
from test_summary_sections import md_tables

from ih_sweep.report import statistics as st
from ih_sweep.report.summarize import summarize
from ih_sweep.report.tables import ROBUSTNESS_COLUMNS


def _job(root, name, n, cond, correct, ablation, settings=None):
    """make_job with the record's and results' ``ablation`` set."""
    folder = make_job(root, name, n, cond, correct, settings=settings)
    results = pd.read_csv(folder / "results.csv")
    results.assign(ablation=ablation).to_csv(folder / "results.csv", index=False)
    edit_record(folder, {"ablation": ablation})
    return folder


def _outcomes(wrong: int, n: int = 100) -> list[bool]:
    return [i >= wrong for i in range(n)]


@pytest.fixture
def sweep(tmp_path):
    """``none`` (all right); per method and N, ``high`` wrong on the first k items and
    ``low`` on the first 2: k = zero 30/60, mean 20/50, resample 40/70 at N = 4/8."""
    make_job(tmp_path, "none", 0, "none", _outcomes(0))
    wrong = {"zero": (30, 60), "mean": (20, 50), "resample": (40, 70)}
    for method, ks in wrong.items():
        for n, k in zip((4, 8), ks):
            _job(tmp_path, f"{method}-high{n}", n, "high", _outcomes(k), method)
            _job(tmp_path, f"{method}-low{n}", n, "low", _outcomes(2), method)
    return tmp_path


def test_robustness_table_per_n_and_method(sweep):
    summarize(sweep)
    table = pd.read_csv(sweep / "robustness.csv")
    assert list(table.columns) == ROBUSTNESS_COLUMNS
    assert len(table) == 6 and table.family.nunique() == 1
    assert "ablation=" not in table.family[0] and "model=tiny" in table.family[0]
    row = table.set_index(["ablation", "n_heads"]).loc[("mean", 8)]
    assert (row.accuracy_high, row.accuracy_low, row.accuracy_none) == (0.5, 0.98, 1.0)
    assert row.delta_high_vs_none == pytest.approx(-0.5)
    assert row.delta_high_vs_low == pytest.approx(-0.48)
    a, b = np.array(_outcomes(50)), np.array(_outcomes(0))
    assert (row.delta_high_vs_none_ci_low, row.delta_high_vs_none_ci_high) == \
        pytest.approx(st.paired_bootstrap_ci(a, b))
    assert row.p_high_vs_none == pytest.approx(st.mcnemar_exact(0, 50))
    assert row.delta_high_vs_low_ci_low < -0.48 < row.delta_high_vs_low_ci_high
    # the same numbers as the main table's high-vs-none for that group
    summary = pd.read_csv(sweep / "summary.csv")
    main = summary[(summary.ablation == "mean") & (summary.condition == "high")
                   & (summary.n_heads == 8)].iloc[0]
    assert (main.delta_vs_none, main.delta_ci_low, main.delta_ci_high, main.p_vs_none) == \
        pytest.approx((row.delta_high_vs_none, row.delta_high_vs_none_ci_low,
                       row.delta_high_vs_none_ci_high, row.p_high_vs_none))
    md = (sweep / "summary.md").read_text()
    assert "## Robustness across ablation methods" in md
    rows = md_tables(md, table.family[0])
    assert [(r["N"], r["ablation"]) for r in rows] == [
        (n, m) for m in ("mean", "resample", "zero") for n in ("4", "8")]
    shown = next(r for r in rows if (r["N"], r["ablation"]) == ("8", "resample"))
    assert (shown["high %"], shown["low %"], shown["none %"], shown["Δ high vs none (pts)"],
            shown["Δ high vs low (pts)"]) == ("30.0", "98.0", "100.0", "-70.0", "-68.0")
    assert "**Robustness across ablation methods** (robustness.csv)" in md


def test_no_table_with_one_method_and_no_stale_file(sweep):
    summarize(sweep)
    assert (sweep / "robustness.csv").is_file()
    for folder in sweep.iterdir():
        if folder.is_dir() and folder.name.split("-")[0] in ("mean", "resample"):
            shutil.rmtree(folder)
    summarize(sweep)
    assert not (sweep / "robustness.csv").exists()
    assert "Robustness across ablation methods" not in (sweep / "summary.md").read_text()


def test_other_ablation_settings_label_the_rows(tmp_path):
    """Two mean ablations with different reference counts beside zero and resample:
    labelled apart by the ablation setting in which they differ (resample's seed, absent
    from the others' settings, is no difference)."""
    make_job(tmp_path, "none", 0, "none", _outcomes(0), settings={"model": {"name": "tiny"}})
    for name, method, n_ref in (("z", "zero", 64), ("m64", "mean", 64), ("m8", "mean", 8),
                                ("r", "resample", 64)):
        ablation = {"method": method, "n_reference": n_ref} | \
            ({"seed": 0} if method == "resample" else {})  # as semantic_config keeps it
        settings = {"model": {"name": "tiny"}, "ablation": ablation}
        _job(tmp_path, f"{name}-high", 4, "high", _outcomes(10), method, settings)
    summarize(tmp_path)
    table = pd.read_csv(tmp_path / "robustness.csv")
    assert sorted(table.ablation) == ["mean (n_reference=64)", "mean (n_reference=8)",
                                      "resample (n_reference=64)", "zero (n_reference=64)"]
    assert table.accuracy_low.isna().all() and table.accuracy_none.eq(1.0).all()
    assert table.delta_high_vs_none.to_numpy() == pytest.approx([-0.1] * 4)
    titles = [line for line in (tmp_path / "summary.md").read_text().splitlines()
              if line.startswith("## model=")]
    assert len(titles) == 4 and sum("ablation.seed=0" in t for t in titles) == 1
    assert not any("seed=None" in t for t in titles)
