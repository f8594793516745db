"""The benchmark scripts run (their timings are recorded in benchmarks/, never asserted)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_benchmark_smoke_run_on_cpu(tmp_path):
    """bench_gpu.py end to end on a small Mistral shape on CPU, bf16 and nf4 (bitsandbytes
    runs 4-bit on CPU): every number it reports is there and the outcomes match the seed's
    method on the subset. The real run needs a CUDA GPU."""
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_gpu.py"), "--device", "cpu",
         "--shape", "small", "--stories", "12", "--seed-subset", "4", "--batch-size", "8",
         "--out", str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads((tmp_path / "gpu_smoke_cpu_small.json").read_text())
    assert out["shape"] == "small" and out["flops_per_token"] > 0
    for quant in ("bf16", "nf4"):
        r = out[quant]
        assert r["stories"] == 12 and r["seed_subset"] == 4
        assert r["engine_stories_per_s"] > 0 and r["seed_method_stories_per_s"] > 0
        assert r["subset_outcomes_identical"] is True
        assert 0 <= r["decoded_past_forward"] <= 12


def test_gpu_benchmark_refuses_without_cuda_by_default(tmp_path):
    import torch

    if torch.cuda.is_available():
        return
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_gpu.py"),
                           "--out", str(tmp_path)], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode != 0
    assert "no CUDA GPU here" in proc.stderr
