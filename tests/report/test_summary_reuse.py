"""ih_sweep.report.reuse: a summary is reused only while nothing it reads has changed (issue
#32: a rerun that reuses every job should not pay for the statistics and figures again)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from summary_jobs import make_job

from ih_sweep.report import reuse
from ih_sweep.report.render import console_report
from ih_sweep.report.summarize import summarize


def _sweep(root: Path) -> Path:
    scores = root / "scores.csv"
    scores.write_text("model,layer,head,prefix\n" + "".join(
        f"tiny,{la},{h},{0.1 * h + la}\n" for la in range(2) for h in range(4)))
    rng = np.random.default_rng(3)
    for name, n, cond in (("none", 0, "none"), ("high", 2, "high"), ("low", 2, "low")):
        make_job(root / "s", name, n, cond, rng.random(30) < 0.7, scores_file=str(scores))
    return root / "s"


def _stamps(sweep: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in sweep.iterdir() if p.is_file()}


def test_an_unchanged_sweep_reuses_its_summary_and_prints_the_same(tmp_path):
    sweep = _sweep(tmp_path)
    first = summarize(sweep)
    assert (sweep / reuse.RECORD).is_file()
    before = _stamps(sweep)
    again = summarize(sweep)
    assert _stamps(sweep) == before  # nothing written again
    assert console_report(again, sweep) == console_report(first, sweep)
    assert list(again.columns) == list(first.columns) and len(again) == len(first)


@pytest.mark.parametrize("change", ["results", "score table", "summary.md edited",
                                    "figure deleted", "record", "new job"])
def test_any_change_to_what_it_reads_or_wrote_computes_it_again(tmp_path, change):
    sweep = _sweep(tmp_path)
    summarize(sweep)
    if change == "results":
        path = sweep / "high" / "results.csv"
        path.write_text(path.read_text().replace(",True,", ",False,", 1))
    elif change == "score table":
        path = tmp_path / "scores.csv"
        os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))
    elif change == "summary.md edited":
        (sweep / "summary.md").write_text("edited\n")
    elif change == "figure deleted":
        (sweep / "accuracy_vs_n.png").unlink()
    elif change == "record":
        record = json.loads((sweep / reuse.RECORD).read_text())
        record["key"] = "0" * 64
        (sweep / reuse.RECORD).write_text(json.dumps(record))
    else:
        make_job(sweep, "high4", 4, "high", np.arange(30) < 20)
    md_before = (sweep / "summary.md").stat().st_mtime_ns
    try:
        summarize(sweep)
    except Exception:  # a changed results.csv fails its job's checksum: left out, loudly
        assert change == "results"
    assert (sweep / "summary.md").stat().st_mtime_ns != md_before or change == "results"
    if change == "results":
        assert "high" in (sweep / "summary.md").read_text().split("## Jobs left out")[1]
    if change == "new job":
        assert "| 4 |" in console_report(summarize(sweep), sweep)
