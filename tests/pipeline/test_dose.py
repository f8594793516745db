"""Dose as a share of all heads (issue #18 item 1): ``n_heads=P%`` resolved per model as
ceil(layers x heads x P / 100), recorded beside the count (job.json and results.csv
``n_heads_share``), shown as ``7 (10%)`` in every table and on a percent axis in the
accuracy-vs-N figure; through the summary (written job folders), the CLI on the tiny model
and the evaluate job on a random-weight GPT-2."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from compose_config import run_job
from families import family_configs, save_model
from summary_jobs import edit_record, make_job

from ih_sweep.pipeline.records import RESULT_COLUMNS, read_record
from ih_sweep.report import plots
from ih_sweep.report.cells import n_text
from ih_sweep.report.discover import find_jobs
from ih_sweep.report.sections import display_table
from ih_sweep.report.summarize import summarize
from ih_sweep.report.tables import strata_table

ROOT = Path(__file__).resolve().parents[2]


def share_job(root: Path, name: str, n: int, cond: str, correct, share: float | None):
    """A finished job folder (:func:`test_summary.make_job`) whose job.json records the
    share it was asked for; ``share=None``: a record written before shares existed (no
    key at all), its results.csv without the column."""
    folder = make_job(root, name, n, cond, correct, mechanism={
        "repeat_loss": 0.1 * n, "repeat_loss_unablated": 0.1, "icl_score": -1.0,
        "icl_score_unablated": -1.0})
    if share is None:
        res = pd.read_csv(folder / "results.csv")
        res.drop(columns="n_heads_share").to_csv(folder / "results.csv", index=False)
        edit_record(folder, drop=("n_heads_share",))
    else:
        edit_record(folder, {"n_heads_share": share})
    return folder


def _first_cells(markdown: str) -> set[tuple[str, str]]:
    """(N, condition) of every markdown table row."""
    return {tuple(c.strip() for c in line.split("|")[1:3]) for line in markdown.splitlines()
            if line.startswith("|")}


@pytest.fixture
def share_sweep(tmp_path):
    rng = np.random.default_rng(1)
    base = rng.random(120) < 0.95
    worse = base.copy()
    worse[:30] = False
    # written out of order: the rows come sorted by the count
    share_job(tmp_path, "high10", 7, "high", worse, 10.0)
    share_job(tmp_path, "low10", 7, "low", base, 10.0)
    share_job(tmp_path, "high1", 1, "high", base, 1.0)
    share_job(tmp_path, "high3", 2, "high", base, 3.0)
    share_job(tmp_path, "none", 0, "none", base, None)
    return tmp_path


def test_summary_gives_count_and_share_sorted_by_count(share_sweep):
    df = summarize(share_sweep)
    columns = list(df.columns)
    assert columns[columns.index("n_heads") + 1] == "n_heads_share"
    assert list(zip(df.n_heads, df.condition)) == [(0, "none"), (1, "high"), (2, "high"),
                                                   (7, "high"), (7, "low")]
    assert df.n_heads_share.iloc[0] != df.n_heads_share.iloc[0]  # none: NaN
    assert df.n_heads_share.iloc[1:].tolist() == [1.0, 3.0, 10.0, 10.0]
    assert display_table(df)["N"].tolist() == ["", "1 (1%)", "2 (3%)", "7 (10%)",
                                                  "7 (10%)"]
    written = pd.read_csv(share_sweep / "summary.csv")
    assert written.n_heads_share.tolist()[1:] == [1.0, 3.0, 10.0, 10.0]
    md = (share_sweep / "summary.md").read_text()
    assert ("7 (10%)", "high") in _first_cells(md)
    mechanism = md.split("### Mechanism check")
    assert len(mechanism) == 2 and ("7 (10%)", "high") in _first_cells(mechanism[1])
    strata = strata_table(find_jobs(share_sweep).jobs)
    assert strata.empty  # make_job writes no stratum columns; the column is still declared
    assert "n_heads_share" in strata.columns


def test_a_count_job_and_an_older_record_show_the_count_alone(share_sweep):
    """A job asked a count, and one recorded before shares existed (no key in job.json, no
    column in results.csv), show N alone, and then the figure's axis is the count."""
    rng = np.random.default_rng(2)
    share_job(share_sweep, "high4_old", 4, "high", rng.random(120) < 0.9, None)
    assert read_record(share_sweep / "high4_old").n_heads_share is None
    df = summarize(share_sweep)
    assert df.n_heads.tolist() == [0, 1, 2, 4, 7, 7]
    assert display_table(df)["N"].tolist() == ["", "1 (1%)", "2 (3%)", "4", "7 (10%)",
                                                  "7 (10%)"]
    _, by_share = plots.dose_axis(df)
    assert not by_share
    assert n_text(7, 10.0) == "7 (10%)" and n_text(1, 0.5) == "1 (0.5%)"
    assert n_text(4, None) == "4" and n_text(4, float("nan")) == "4"


def _figure_axis(df: pd.DataFrame, tmp_path: Path, monkeypatch) -> tuple[str, list[str]]:
    """The accuracy-vs-N figure's x label and tick labels, read from the figure."""
    seen = {}

    def keep(path, fig):
        ax = fig.axes[0]
        seen["label"] = ax.get_xlabel()
        seen["ticks"] = [t.get_text() for t in ax.get_xticklabels()]
        Path(path).write_bytes(b"")
    monkeypatch.setattr(plots, "write_figure", keep)
    plots.plot_accuracy_vs_n(df, tmp_path / "fig.png")
    return seen["label"], seen["ticks"]


def test_the_figure_puts_the_share_on_the_axis_only_when_every_job_asked_one(
        share_sweep, tmp_path, monkeypatch):
    df = summarize(share_sweep)
    label, ticks = _figure_axis(df, tmp_path, monkeypatch)
    assert label.startswith("heads ablated (% of all heads")
    assert ticks == ["1%\n(N=1)", "3%\n(N=2)", "10%\n(N=7)"]
    mixed = pd.concat([df, df.iloc[[1]].assign(n_heads=4, n_heads_share=np.nan)])
    label, ticks = _figure_axis(mixed, tmp_path, monkeypatch)
    assert label == "heads ablated (N)" and ticks == ["1", "2", "4", "7"]


@pytest.mark.slow
def test_cli_sweep_of_shares_on_the_tiny_model(tmp_path):
    """``-m n_heads=1%,10% condition=high,none``: folders keep the percentage, the jobs
    ablate ceil(64 x P / 100) heads (1 and 7), results.csv and job.json record both, and
    the summary shows ``7 (10%)``."""
    out = tmp_path / "s"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "2"}
    proc = subprocess.run(
        [sys.executable, "-m", "ih_sweep", "-m", "n_heads=1%,10%", "condition=high,none",
         "data.n_stories=20", f"hydra.sweep.dir={out}", f"paths.cache_dir={tmp_path / 'c'}",
         "eval.progress=false"], cwd=ROOT, env=env, capture_output=True, text=True,
        timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    folders = {p.parent.name for p in out.glob("*/job.json")}
    assert folders == {f"condition={c},data.n_stories=20,n_heads={p}"
                       for c in ("high", "none") for p in ("1%", "10%")}
    for share, count in (("1%", 1), ("10%", 7)):
        folder = out / f"condition=high,data.n_stories=20,n_heads={share}"
        record = json.loads((folder / "job.json").read_text())
        assert (record["n_heads"], record["n_heads_share"]) == (count, float(share[:-1]))
        assert len(pd.read_csv(folder / "heads.csv")) == count
        res = pd.read_csv(folder / "results.csv")
        assert list(res.columns) == RESULT_COLUMNS
        assert set(res.n_heads) == {count} and set(res.n_heads_share) == {float(share[:-1])}
        none = pd.read_csv(out / f"condition=none,data.n_stories=20,n_heads={share}"
                           / "results.csv")
        assert set(none.n_heads) == {0} and none.n_heads_share.isna().all()
    summary = pd.read_csv(out / "summary.csv")
    assert list(zip(summary.n_heads, summary.n_heads_share.fillna(-1), summary.condition)) \
        == [(0, -1, "none"), (1, 1.0, "high"), (7, 10.0, "high")]
    rows = [line for line in proc.stdout.splitlines() if line.startswith("|")]
    assert rows[0] == "| N | top-N (induction) ablated | unablated |"  # the console table
    assert any(r.split("|")[1].strip() == "7 (10%)" for r in rows)
    assert "N=7 (10%) high vs unablated: " in proc.stdout
    assert "n_heads=10% of the model's 64 heads (2 x 32): 7 heads" in proc.stdout + proc.stderr


@pytest.mark.slow
def test_a_share_resolves_through_the_job_on_a_random_gpt2(tmp_path):
    """GPT-2 of 2 layers x 4 heads: 10% is ceil(0.8) = 1 head, 30% ceil(2.4) = 3, 100% all 8;
    resolved by the evaluate job from the model's own shape."""
    folder = save_model(family_configs()["gpt2"], tmp_path / "gpt2")
    for share, count in (("10%", 1), ("30%", 3), ("100%", 8)):
        record = run_job(tmp_path / share, "model=hub", f"model.path={folder}",
                         "model.dtype=float32", f"n_heads={share}", "condition=high",
                         "data.n_stories=4", "scoring.n_sequences=2", "scoring.seq_len=12",
                         "mechanism.enabled=false", "eval.progress=false")
        assert (record.n_heads, record.n_heads_share) == (count, float(share[:-1]))
        assert len(record.heads) == count
        assert len({tuple(h) for h in record.heads}) == count
