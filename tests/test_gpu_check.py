"""benchmarks/gpu_check.py on a machine without CUDA: one line and exit 0 (through a
subprocess); its CPU-side parts with fake results (the table, the verdicts against the #21
targets); and its equality check run for real on CPU on a few items."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"


@pytest.fixture(scope="module")
def gc():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_without_cuda_it_says_so_in_one_line_and_exits_0(tmp_path):
    proc = subprocess.run([sys.executable, str(SCRIPT), "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path,
                          env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gpu_check: no CUDA device here"), lines
    assert not list(tmp_path.iterdir())  # nothing written


def test_the_table_and_its_verdicts_from_fake_results(gc):
    bf16 = {"stories": 2000, "batch_size": 256, "engine_s": 5.5, "engine_stories_per_s": 363.6,
            "seed_method_stories_per_s": 8.65, "speedup_vs_seed": 42.0,
            "plain_forward_s": 4.9, "overhead_vs_plain": 1.122, "mfu": 0.41,
            "plain_forward_mfu": 0.46, "subset_outcomes_identical": True}
    nf4 = dict(bf16, engine_stories_per_s=250.0, speedup_vs_seed=20.0,
               overhead_vs_plain=1.3, mfu=None, plain_forward_mfu=None)
    rows = [gc.equality_row("llama fp32 unablated", {"items": 60, "flips": 0,
                                                     "flipped_near_ties": None,
                                                     "near_ties": None}),
            gc.noise_row("tiny bf16 top-16 ablated", {"items": 400, "flips": 2,
                                                      "flipped_near_ties": 2,
                                                      "near_ties": 7}),
            gc.noise_row("tiny nf4 top-16 ablated", {"items": 400, "flips": 1,
                                                     "flipped_near_ties": None,
                                                     "near_ties": None}),
            *gc.sweep_rows(0, 23.0, dict(gc.README_ACCURACY)),
            *gc.bench_rows("bf16", bf16), *gc.bench_rows("nf4", nf4, bf16)]
    verdict = {r.check: r.verdict for r in rows}
    assert verdict["equality llama fp32 unablated"] == "ok"
    assert verdict["noise tiny bf16 top-16 ablated"] == "ok"  # both flips near-ties
    assert verdict["noise tiny nf4 top-16 ablated"] == "n/a"  # no near_tie field yet
    assert verdict["bench bf16: x notebook's method"] == "ok"
    assert verdict["bench bf16: evaluator / plain forward"] == "ok"
    assert verdict["bench bf16: MFU"] == "ok"
    assert verdict["bench nf4: x notebook's method"] == "MISSED"
    assert verdict["bench nf4: evaluator / plain forward"] == "MISSED"
    assert verdict["bench nf4: MFU"] == "n/a"
    assert verdict["bench nf4: time / bf16's"] == "MISSED"  # 363.6 / 250 = 1.45x
    assert not gc.failed(rows)
    table = gc.format_table(rows)
    lines = table.splitlines()
    assert lines[0] == "| check | result | target | verdict |" and len(lines) == len(rows) + 2
    assert "| bench bf16: MFU | 41.0% (plain forward 46.0%) | >= 40% | ok |" in lines
    assert "| bench nf4: time / bf16's | 1.45x | <= 1.3x | MISSED |" in lines

    bad = [gc.equality_row("gpt2 fp32 unablated", {"items": 60, "flips": 1}),
           gc.noise_row("tiny bf16 unablated", {"items": 400, "flips": 2,
                                                "flipped_near_ties": 1, "near_ties": 3}),
           *gc.sweep_rows(1, 3.0, {})]
    assert [r.verdict for r in bad] == ["FAILED", "FAILED", "FAILED"]
    assert gc.failed(bad)
    wrong = {**gc.README_ACCURACY, ("high", 16): 31.0}
    assert gc.sweep_rows(0, 20.0, wrong)[1].verdict == "FAILED"


def test_a_step_that_raises_is_one_failed_row(gc):
    def boom():
        raise RuntimeError("CUDA error: device-side assert")

    (row,) = gc._guarded("noise tiny nf4", boom)
    assert row.verdict == "FAILED" and "RuntimeError: CUDA error" in row.result


def test_equality_check_runs_on_cpu(gc):
    """The real step on CPU, small: the tiny model (last and every question, unablated and
    top-16 ablated) and one random-weight family; every outcome equals generate's."""
    rows = gc.equality_checks("cpu", items=2, tiny_items=4, families=["gpt2"])
    assert [r.check for r in rows] == [
        "equality tiny fp32 last unablated", "equality tiny fp32 all unablated",
        "equality tiny fp32 last top-16 ablated", "equality tiny fp32 all top-16 ablated",
        "equality gpt2 fp32 unablated", "equality gpt2 fp32 2 heads ablated"]
    assert all(r.verdict == "ok" for r in rows), gc.format_table(rows)
