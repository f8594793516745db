"""A random null of K draws evaluated D draws side by side (``control.draws_per_pass=D``:
one head set a batch row, :func:`ih_sweep.ablation.hooks.ablate_head_sets`) against one at a
time (D=1), on the tiny model through the real CLI, each from an empty cache: one job
``condition=random control_seeds=K`` per D. Reports wall and CPU seconds of each job and the
summed ``eval_s`` of its draws (the evaluation alone: no load, scoring or mechanism check),
with the machine and its load average. Every draw's items must agree with D=1's: outcomes
and continuations equal, float measures within 1e-5 (relative above 1). Methods alternate
within a round, so a slow spell hits all of them.

    python benchmarks/bench_draws_per_pass.py [--draws 20] [--stories 1000] [--n-heads 4]
        [--per-pass 1,4,8] [--repeats 1] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
from _results import RESULTS, save

ROOT = Path(__file__).resolve().parents[1]
FLOATS = ["margin", "gold_logprob", "logit_diff"]


def _job(folder: Path, common: list[str], d: int) -> tuple[float, float]:
    """One K-draw job with ``control.draws_per_pass=d`` into ``folder``: (wall s, CPU s)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "ih_sweep", *common, f"control.draws_per_pass={d}",
                    f"hydra.run.dir={folder}", f"paths.cache_dir={folder}-cache"],
                   cwd=ROOT, check=True, capture_output=True)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return round(wall, 2), round(cpu, 2)


def _eval_s(folder: Path, k: int, first: int = 0) -> float:
    """The summed ``eval_s`` of the job's draws (their job.json timings)."""
    return round(sum(json.loads((folder / f"control_seed={s}" / "job.json").read_text())
                     ["timings"].get("eval_s", 0.0) for s in range(first, first + k)), 2)


def _same(a: Path, b: Path, k: int) -> bool:
    """Whether every draw's items agree (exact columns equal, floats within 1e-5)."""
    for s in range(k):
        x, y = (pd.read_csv(f / f"control_seed={s}" / "results.csv", keep_default_na=False)
                for f in (a, b))
        exact = [c for c in x.columns if c not in FLOATS]
        if not x[exact].equals(y[exact]) or not np.allclose(
                x[FLOATS].to_numpy(float), y[FLOATS].to_numpy(float), rtol=1e-5, atol=1e-5,
                equal_nan=True):
            return False
    return True


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--draws", type=int, default=20)
    parser.add_argument("--stories", type=int, default=1000)
    parser.add_argument("--n-heads", type=int, default=4)
    parser.add_argument("--per-pass", default="1,4,8", help="the D values, 1 first")
    parser.add_argument("--ablation", default="zero")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--out", default=str(RESULTS), help="folder for draws_per_pass.json")
    args = parser.parse_args()
    k, ds = args.draws, [int(d) for d in args.per_pass.split(",")]
    assert ds[0] == 1, "--per-pass starts with 1 (the reference)"
    common = [f"n_heads={args.n_heads}", "condition=random", f"control_seeds={k}",
              f"data.n_stories={args.stories}", f"ablation={args.ablation}",
              "eval.progress=false", "summarize=false"]
    times: dict[int, list] = {d: [] for d in ds}
    identical = True
    load = [os.getloadavg()]
    for _ in range(args.repeats):
        with tempfile.TemporaryDirectory() as tmp:
            for d in ds:
                folder = Path(tmp) / f"d{d}"
                wall, cpu = _job(folder, common, d)
                times[d].append({"wall_s": wall, "cpu_s": cpu, "eval_s": _eval_s(folder, k)})
                identical &= d == 1 or _same(Path(tmp) / "d1", folder, k)
        load.append(os.getloadavg())
    best = {d: min(v, key=lambda t: t["wall_s"]) for d, v in times.items()}
    save("draws_per_pass.json", {
        "machine": f"{platform.machine()}, {len(os.sched_getaffinity(0))} cpus, "
                   f"{platform.processor() or 'cpu'}",
        "load_average_1_5_15_before_and_after_each_round": [list(map(round, x, [2] * 3))
                                                             for x in load],
        "draws": k, "stories": args.stories, "n_heads": args.n_heads,
        "ablation": args.ablation, "rounds": args.repeats,
        "best_by_draws_per_pass": {str(d): b for d, b in best.items()},
        "all_rounds": {str(d): v for d, v in times.items()},
        "speedup_wall_vs_1": {str(d): round(best[1]["wall_s"] / best[d]["wall_s"], 3)
                              for d in ds},
        "speedup_eval_vs_1": {str(d): round(best[1]["eval_s"] / best[d]["eval_s"], 3)
                              for d in ds if best[d]["eval_s"]},
        "identical_to_one_at_a_time": identical}, args.out)


if __name__ == "__main__":
    main()
