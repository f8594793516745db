"""Summaries at the edges (issue #22 item 9): every step works for accuracies of exactly 0%
and 100%, one N, one condition, one item, one job; and a summary that fails makes the
command exit non-zero with one line saying what (``python -m ih_sweep.report``, the
Hydra callback, the resilient launcher, and one real ``ih_sweep -m`` run)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from omegaconf import OmegaConf
from summary_jobs import make_job

from ih_sweep.report.errors import SummaryIncomplete
from ih_sweep.report.render import console_report
from ih_sweep.report.summarize import summarize

ROOT = Path(__file__).resolve().parents[2]


def _extra(n: int, rng) -> dict:
    """Every per-item column the evaluation records beyond the writer's."""
    lp = rng.normal(-1, 0.5, n)
    return {"near_tie": rng.random(n) < 0.2, "gold_logprob": lp, "logit_diff": 2 * lp + 1,
            "margin": rng.random(n), "support_distance": rng.integers(1, 8, n),
            "recency_correct": rng.random(n) < 0.5, "mentions": rng.integers(1, 7, n),
            "question_position": rng.integers(0, 5, n)}


MECHANISM = {"repeat_loss": 3.0, "repeat_loss_unablated": 1.0, "icl_score": -0.5,
             "icl_score_unablated": -2.0}

# (name, jobs as (N, condition, control seed, per-item correct))
CASES = {
    "all wrong": [(0, "none", 0, [False] * 12), (4, "high", 0, [False] * 12),
                  (4, "low", 0, [False] * 12), (4, "random", 0, [False] * 12)],
    "all right": [(0, "none", 0, [True] * 12), (4, "high", 0, [True] * 12),
                  (8, "high", 0, [True] * 12), (8, "low", 0, [True] * 12),
                  *[(8, "random", s, [True] * 12) for s in range(3)]],
    "one N, high only": [(8, "high", 0, [True, False] * 6)],
    "only none": [(0, "none", 0, [True, False, True] * 4)],
    "one item": [(0, "none", 0, [True]), (4, "high", 0, [False]), (4, "low", 0, [True]),
                 (4, "random", 0, [True])],
    "one job, one item, 0%": [(16, "high", 0, [False])],
}


@pytest.fixture
def score_table(tmp_path) -> Path:
    rows = [{"model": "tiny", "layer": la, "head": h, "prefix": (la * 32 + h) / 64,
             "copying": 0.0, "combined": 0.0, "n_sequences": 16, "seed": 0}
            for la in range(2) for h in range(32)]
    path = tmp_path / "scores.csv"
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


@pytest.mark.parametrize("case", list(CASES))
def test_every_step_works_at_the_edges(tmp_path, score_table, case):
    """Every question's scope (``all``): the ICL curve is made too."""
    rng = np.random.default_rng(0)
    root = tmp_path / "sweep"
    for n, cond, seed, correct in CASES[case]:
        make_job(root, f"{cond}{n}_{seed}", n, cond, correct, seed=seed, scope="all",
                 examples=[i % 5 for i in range(len(correct))],
                 extra=_extra(len(correct), rng), mechanism=MECHANISM,
                 scores_file=str(score_table))
    df = summarize(root)  # raises SummaryIncomplete if any step failed
    assert len(df) == len(CASES[case])
    for _, r in df.iterrows():
        assert r.ci_low <= r.accuracy <= r.ci_high and 0 <= r.ci_low and r.ci_high <= 1
        assert r.near_tie_acc_low <= r.accuracy <= r.near_tie_acc_high
    if case == "all wrong":
        assert (df.accuracy == 0).all() and (df.ci_low == 0).all()
        assert (df.loc[df.condition != "none", "delta_vs_none"] == 0).all()
    if case == "all right":
        assert (df.accuracy == 1).all() and (df.ci_high == 1).all()
        assert df.loc[(df.condition == "high") & (df.n_heads == 8), "p_vs_random"].item() == 1
    if case.startswith("one item") or case.startswith("one job"):
        assert df.delta_ci_low.isna().all()  # no bootstrap of one pair
    files = ["summary.csv", "summary.md", "summary.tex", "accuracy_vs_n.png", "strata.csv",
             "strata.png"]
    files += ["heads_prefix.png"] if (df.n_heads > 0).any() else []
    files += ["icl_curve.csv", "icl_curve.png"]
    for name in files:
        assert (root / name).is_file() and (root / name).stat().st_size > 0, name
    md = (root / "summary.md").read_text()
    for title in ("Near-tie floor", "Continuous metrics", "Mechanism check"):
        assert f"### {title}" in md
    assert "nan" not in md.lower().replace("near", "")  # empty cells, never 'nan'
    report = console_report(df, root)
    assert report.count("| N |") == df.group.nunique() and "summary.md" in report


def _sweep_with_a_folder_in_place_of_the_figure(root: Path) -> None:
    make_job(root, "condition=none,n_heads=4", 0, "none", [True] * 10)
    make_job(root, "condition=high,n_heads=4", 4, "high", [False] * 10)
    (root / "accuracy_vs_n.png").mkdir()  # the figure cannot be written where it goes


def test_a_failed_step_leaves_the_others_written_and_is_named(tmp_path):
    _sweep_with_a_folder_in_place_of_the_figure(tmp_path)
    with pytest.raises(SummaryIncomplete) as caught:
        summarize(tmp_path)
    err = caught.value
    assert [step for step, _ in err.failed] == ["accuracy_vs_n.png"]
    assert err.failed[0][1].startswith("WriteError: [Errno 21] cannot write") and not err.left_out
    assert len(err.table) == 2 and (tmp_path / "summary.md").is_file()
    assert str(err).count("\n") == 0
    assert "accuracy_vs_n.png failed (WriteError: [Errno 21] cannot write" in str(err)


def test_a_damaged_score_table_fails_the_heatmap_step(tmp_path):
    damaged = tmp_path / "scores.csv"
    damaged.write_bytes(b"\x00\x01garbage,\n\xff")
    make_job(tmp_path, "none", 0, "none", [True] * 4)
    make_job(tmp_path, "high", 4, "high", [True] * 4, scores_file=str(damaged))
    with pytest.raises(SummaryIncomplete, match=r"heads_prefix.png \(heads on the score "
                                                r"table\) failed"):
        summarize(tmp_path)
    assert (tmp_path / "accuracy_vs_n.png").is_file()  # the other steps ran


def test_the_summarize_command_exits_1_with_one_line(tmp_path):
    _sweep_with_a_folder_in_place_of_the_figure(tmp_path)
    proc = subprocess.run([sys.executable, "-m", "ih_sweep.report", str(tmp_path)],
                          capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 1
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"ih_sweep.report: the summary in {tmp_path} is incomplete: "
                           "accuracy_vs_n.png failed (WriteError: [Errno 21] cannot write"), last
    assert "Traceback" not in proc.stderr and "| N |" in proc.stdout


def test_the_callback_ends_the_sweep_with_exit_1(tmp_path, capsys):
    from ih_sweep.cli import SummarizeCallback

    _sweep_with_a_folder_in_place_of_the_figure(tmp_path)
    config = OmegaConf.create({"job": "evaluate", "summarize": True,
                               "hydra": {"sweep": {"dir": str(tmp_path)}}})
    with pytest.raises(SystemExit) as caught:
        SummarizeCallback().on_multirun_end(config=config)
    assert caught.value.code == 1
    out, err = capsys.readouterr()
    assert "| N |" in out  # the table it made is printed all the same
    assert err.strip().splitlines()[-1].startswith(
        f"ih_sweep: the summary in {tmp_path} is incomplete: accuracy_vs_n.png failed")


def test_the_resilient_launcher_adds_a_failed_summary_to_its_report(tmp_path):
    from hydra_plugins.ih_sweep_launcher.resilient import summarize_partial

    _sweep_with_a_folder_in_place_of_the_figure(tmp_path)
    config = OmegaConf.create({"job": "evaluate", "summarize": True})
    line = summarize_partial(config, tmp_path, [("condition=low,n_heads=4", "ValueError: x")])
    assert line.startswith("\n  summary: accuracy_vs_n.png failed (WriteError: [Errno 21] "
                           "cannot write")
    (tmp_path / "accuracy_vs_n.png").rmdir()
    # the failed job alone (already in the launcher's report) adds nothing
    assert summarize_partial(config, tmp_path, [("condition=low,n_heads=4", "ValueError")]) == ""


@pytest.mark.slow
def test_a_real_sweep_whose_summary_fails_exits_1(tmp_path):
    """ih_sweep -m through Hydra's callback: the jobs finish, the summary cannot write its
    figure (a folder is in its place): exit 1, one line naming it, the rest written."""
    sweep = tmp_path / "s"
    (sweep / "accuracy_vs_n.png").mkdir(parents=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "2"}
    proc = subprocess.run([sys.executable, "-m", "ih_sweep", "-m", "n_heads=4",
                           "condition=high,none", "debug=fast", f"hydra.sweep.dir={sweep}",
                           f"paths.cache_dir={tmp_path}/c", "eval.progress=false"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 1, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"ih_sweep: the summary in {sweep} is incomplete: "
                           "accuracy_vs_n.png failed (WriteError: [Errno 21] cannot write"), last
    assert "Traceback" not in proc.stderr
    assert len(pd.read_csv(sweep / "summary.csv")) == 2 and "| N |" in proc.stdout
