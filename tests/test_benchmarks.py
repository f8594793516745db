"""The benchmark scripts run (their timings are recorded in benchmarks/, never asserted)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _smoke_run(tmp_path: Path, script: str, result: str, *args: str, timeout: int = 600,
               env: dict | None = None) -> dict:
    """``benchmarks/<script> ARGS --out tmp_path`` run to the end (exit status 0): the JSON
    it wrote there as ``result``."""
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *args,
                           "--out", str(tmp_path)], capture_output=True, text=True,
                          timeout=timeout, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((tmp_path / result).read_text())


def test_gpu_benchmark_smoke_run_on_cpu(tmp_path):
    """bench_gpu.py end to end on a small Mistral shape on CPU, bf16 and nf4 (bitsandbytes
    runs 4-bit on CPU): every number it reports is there (the plain forward's time and the
    evaluator's overhead over it too) and the outcomes match the seed's method on the
    subset. The real run needs a CUDA GPU."""
    out = _smoke_run(tmp_path, "bench_gpu.py", "gpu_smoke_cpu_small.json", "--device", "cpu",
                     "--shape", "small", "--stories", "12", "--seed-subset", "4",
                     "--batch-size", "8")
    assert out["shape"] == "small" and out["flops_per_token"] > 0
    for quant in ("bf16", "nf4"):
        r = out[quant]
        assert r["stories"] == 12 and r["seed_subset"] == 4
        assert r["engine_stories_per_s"] > 0 and r["seed_method_stories_per_s"] > 0
        assert r["subset_outcomes_identical"] is True
        assert 0 <= r["decoded_past_forward"] <= 12
        assert r["batch_size"] == 8
        assert r["plain_forward_s"] > 0 and r["plain_forward_tokens_per_s"] > 0
        assert r["overhead_vs_plain"] > 0


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


@pytest.mark.skipif(_cuda(), reason="the refusal is what a machine without CUDA gets")
def test_gpu_benchmark_refuses_without_cuda_by_default(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_gpu.py"),
                           "--out", str(tmp_path)], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode != 0
    assert "no CUDA GPU here" in proc.stderr


def test_evaluation_benchmark_smoke_run(tmp_path):
    """bench_eval.py end to end on a few stories: both scopes, unablated and with the top 16
    heads ablated, every reported ratio there, per-item outcomes identical to the seed's."""
    out = _smoke_run(tmp_path, "bench_eval.py", "eval.json", "--stories", "6",
                     "--batch-size", "2")
    for condition in ("unablated", "top16_ablated"):
        for scope, items in (("last", 6), ("all", 30)):
            r = out[condition][scope]
            assert r["items"] == items and r["identical_outcomes"] is True
            assert len(r["speedup_by_round"]) == 3 and r["speedup"] > 0
            assert r["engine_one_batch_at_a_time_stories_per_s"] > 0
            assert abs(sum(r["engine_time_by_operator"].values()) - 1) < 0.01
        assert ("speedup_vs_seed_eager" in out[condition]["last"]) == (condition == "unablated")
    assert out["top16_ablated"]["all"]["decoded_past_forward"] > 0


def test_fast_path_benchmark_smoke_run(tmp_path):
    """bench_fast_path.py on a few stories: three timings, identical outcomes."""
    out = _smoke_run(tmp_path, "bench_fast_path.py", "fast_path.json", "--stories", "8")
    assert out["identical_outcomes"] is True
    assert set(out["median_s"]) == {"no_shortcut", "attention_interface_only",
                                    "with_layer_forwards"}


def test_rank_stability_benchmark_smoke_run(tmp_path):
    """rank_stability.py for one fv_seed and one N: every number it reports is a share."""
    import os

    env = {**os.environ, "PYTHONPATH": str(ROOT)}  # this checkout's package
    out = _smoke_run(tmp_path, "rank_stability.py", "rank_stability.json", "--seeds", "0",
                     "--n", "4", env=env)
    assert 0 <= out["fv"]["fv_seed=0"]["top4_bootstrap"] <= 1
    assert 0 <= out["prefix"]["top4_bootstrap"] <= 1 and out["prefix"]["sequences"] == 16
    assert out["fv"]["across_seeds"] == {"top4": None}  # one seed: no pair to compare


def test_draws_per_pass_benchmark_smoke_run(tmp_path):
    """bench_draws_per_pass.py on 3 draws of 8 stories, D=1 and D=2: both timed, the draws'
    items the same either way."""
    out = _smoke_run(tmp_path, "bench_draws_per_pass.py", "draws_per_pass.json", "--draws",
                     "3", "--stories", "8", "--per-pass", "1,2")
    assert out["identical_to_one_at_a_time"] is True
    assert set(out["best_by_draws_per_pass"]) == {"1", "2"}
    assert all(t["wall_s"] > 0 and t["cpu_s"] > 0 and t["eval_s"] > 0
               for t in out["best_by_draws_per_pass"].values())


def test_end_to_end_benchmark_smoke_run(tmp_path):
    """bench_end_to_end.py on a few stories, one pair and one rerun: the CLI sweep and the
    notebook's method both timed, the same 7 evaluations with identical per-item outcomes,
    the rerun reusing all 9 jobs, and --help and a config error timed."""
    out = _smoke_run(tmp_path, "bench_end_to_end.py", "end_to_end.json", "--stories", "4",
                     "--pairs", "1", "--reruns", "1", "--quick", "1", timeout=900)
    assert out["evaluations"] == 7 and out["outcomes_identical"] is True
    assert out["sweep_wall_s"] > 0 and out["notebook_wall_s"] > 0
    assert out["ratio_notebook_over_sweep"] > 0 and len(out["ratio_by_pair"]) == 1
    assert out["rerun_jobs_reused"] == [9]
    assert len(out["by_round"]["help_wall"]) == 1 and out["help_wall_s"] > 0
    assert len(out["by_round"]["config_error_wall"]) == 1 and out["config_error_wall_s"] > 0
