"""Wall time and peak memory of the default sweep on the tiny model, through the real CLI:
``python -m ih_sweep -m n_heads=4,8,16 condition=high,low,none`` (one process, the model
loaded once, the three ``none`` jobs evaluated once), from an empty score cache.

    python benchmarks/bench_sweep.py
"""

from __future__ import annotations

import json
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _results import save

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "ih_sweep", "-m", "n_heads=4,8,16",
                        "condition=high,low,none", f"hydra.sweep.dir={tmp}/sweep",
                        f"paths.cache_dir={tmp}/cache", "eval.progress=false"],
                       cwd=ROOT, check=True, capture_output=True)
        wall = time.perf_counter() - t0
        peak_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
        jobs = [json.loads(p.read_text()) for p in Path(tmp, "sweep").glob("*/job.json")]
    widths = {}
    for rec in jobs:
        from ih_sweep.report.statistics import wilson_interval

        lo, hi = wilson_interval(rec["n_correct"], rec["n_items"])
        widths[f"{rec['condition']}{rec['n_heads']}"] = round(100 * (hi - lo) / 2, 2)
    out = {"machine": f"{platform.machine()}, {len(__import__('os').sched_getaffinity(0))} cpus",
           "wall_s": round(wall, 1), "peak_rss_mb": round(peak_mb), "jobs": len(jobs),
           "n_items": jobs[0]["n_items"],
           "evaluations": sum(not r["reused_evaluation"] for r in jobs),
           "ci_half_width_pts": widths}
    save("sweep.json", out)


if __name__ == "__main__":
    main()
