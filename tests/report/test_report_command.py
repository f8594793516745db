"""The summary command (ih_sweep/report/command.py): ``python -m ih_sweep.report``, its
older name ``python -m ih_sweep.summarize``, and each library module imported once."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from summary_jobs import make_job

from ih_sweep.report.command import main

ROOT = Path(__file__).resolve().parents[2]


def _sweep(root: Path) -> Path:
    rng = np.random.default_rng(1)
    for name, n, cond in (("none", 0, "none"), ("high", 4, "high"), ("low", 4, "low")):
        make_job(root, name, n, cond, rng.random(20) < 0.8)
    return root


@pytest.mark.parametrize("module", ["ih_sweep.report", "ih_sweep.summarize"])
def test_the_command_and_its_older_name(tmp_path, module):
    _sweep(tmp_path)
    proc = subprocess.run([sys.executable, "-m", module, str(tmp_path)], cwd=ROOT,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "| N |" in proc.stdout and (tmp_path / "summary.md").is_file()
    proc = subprocess.run([sys.executable, "-m", module, str(tmp_path), "--out", "x"],
                          cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip() == ("ih_sweep.report: --out is for several sweeps; a single "
                                   "sweep's summary is written into the sweep folder")


def test_the_library_module_run_as_a_script_names_the_command(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "ih_sweep.report.summarize", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 1
    assert "python -m ih_sweep.report" in proc.stderr and "Traceback" not in proc.stderr


def test_no_module_is_executed_twice(tmp_path):
    """Under ``python -m ih_sweep.report`` every module is executed once: the file run as
    ``__main__`` is not imported again under its own name, and no module is imported twice
    (``python -m`` of a library module that the command imports would be both)."""
    _sweep(tmp_path)
    code = f"""
import collections, importlib.util, runpy, sys
executed = collections.Counter()
class Watch:
    def find_spec(self, name, path=None, target=None):
        if not name.startswith("ih_sweep"):
            return None
        for finder in sys.meta_path[1:]:
            spec = finder.find_spec(name, path, target) if hasattr(finder, "find_spec") \\
                else None
            if spec is not None:
                run = spec.loader.exec_module
                def exec_module(module, run=run, origin=spec.origin):
                    executed[origin] += 1
                    run(module)
                spec.loader.exec_module = exec_module
                return spec
        return None
sys.meta_path.insert(0, Watch())
main = importlib.util.find_spec("ih_sweep.report.__main__").origin
sys.argv = ["x", {str(tmp_path)!r}]
try:
    runpy.run_module("ih_sweep.report", run_name="__main__", alter_sys=True)
except SystemExit as e:
    assert e.code == 0, e.code
print("TWICE", sorted(o for o, k in executed.items() if k > 1))
print("MAIN IMPORTED", executed[main])
print("SEEN", len(executed))
"""
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                          text=True)
    assert proc.returncode == 0, proc.stderr
    assert "TWICE []" in proc.stdout and "MAIN IMPORTED 0" in proc.stdout
    assert "SEEN 0" not in proc.stdout


def test_main_in_process(tmp_path, capsys):
    assert main([str(_sweep(tmp_path))]) == 0
    assert f"one folder per job in: {tmp_path}" in capsys.readouterr().out
    assert main([str(tmp_path / "missing")]) == 2
    assert capsys.readouterr().err.strip() == f"ih_sweep.report: {tmp_path / 'missing'}: " \
                                              "not a folder"


def test_the_summary_with_a_heatmap_imports_no_torch(tmp_path):
    """issue #32: a summary (its tables, figures and the score heatmap) needs no torch or
    transformers, so a rerun that reuses every job does not pay for their import."""
    scores = tmp_path / "scores.csv"
    scores.write_text("model,layer,head,prefix\n" + "".join(
        f"tiny,{la},{h},{0.1 * h + la}\n" for la in range(2) for h in range(4)))
    rng = np.random.default_rng(1)
    for name, n, cond in (("none", 0, "none"), ("high", 2, "high"), ("low", 2, "low")):
        make_job(tmp_path / "sweep", name, n, cond, rng.random(20) < 0.8,
                 scores_file=str(scores))
    probe = ("import json, runpy, sys\n"
             "sys.argv = ['ih_sweep.report', sys.argv[1]]\n"
             "try:\n"
             "    runpy.run_module('ih_sweep.report', run_name='__main__', alter_sys=True)\n"
             "except SystemExit as exit_:\n"
             "    assert not exit_.code, exit_.code\n"
             "print(json.dumps([m for m in ('torch', 'transformers') if m in sys.modules]))\n")
    proc = subprocess.run([sys.executable, "-c", probe, str(tmp_path / "sweep")], cwd=ROOT,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "sweep" / "heads_prefix.png").is_file()
    assert proc.stdout.strip().splitlines()[-1] == "[]"
