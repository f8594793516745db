"""A random null of K draws on the tiny model, through the real CLI, from empty caches:
one job with ``control_seeds=K`` against K single-seed jobs in one multirun
(``-m control_seed=0,...,K-1``: Hydra's launcher runs them in one process, where the model
load is already cached) and against K separate processes (``control_seed=k`` each: what a
SLURM array or a local launcher pays per job). Each draw's results.csv must be the same
bytes in all three. Methods alternate within a round, so a slow spell hits all of them.

    python benchmarks/bench_null.py [--draws 20] [--stories 1000] [--repeats 1] [--out DIR]
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _results import RESULTS, save

ROOT = Path(__file__).resolve().parents[1]
COMMON = ["n_heads=8", "condition=random", "eval.progress=false", "summarize=false"]


def _cli(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "ih_sweep", *args], cwd=ROOT, check=True,
                   capture_output=True)


def _timed(fn) -> tuple[float, float]:
    """(wall s, CPU s of the child processes) of ``fn()``."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    fn()
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return round(wall, 1), round(cpu, 1)


def _round(k: int, data: str, t: Path, times: dict[str, list]) -> None:
    """Each method once into ``t``, timed into ``times``; the draws compared."""
    times["one_job"].append(_timed(lambda: _cli(
        "-m", *COMMON, data, f"control_seeds={k}", f"hydra.sweep.dir={t}/a",
        f"paths.cache_dir={t}/ca")))
    times["multirun"].append(_timed(lambda: _cli(
        "-m", *COMMON, data, "control_seed=" + ",".join(map(str, range(k))),
        f"hydra.sweep.dir={t}/b", f"paths.cache_dir={t}/cb")))
    times["processes"].append(_timed(lambda: [_cli(
        *COMMON, data, f"control_seed={s}", f"hydra.run.dir={t}/c/{s}",
        f"paths.cache_dir={t}/cc") for s in range(k)]))
    for s in range(k):
        a = next(Path(t, "a").glob(f"*/control_seed={s}/results.csv")).read_bytes()
        b = next(Path(t, "b").glob(f"*control_seed={s},*/results.csv")).read_bytes()
        c = Path(t, "c", str(s), "results.csv").read_bytes()
        assert a == b == c, f"draw {s} differs between the methods"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--draws", type=int, default=20)
    parser.add_argument("--stories", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--out", default=str(RESULTS), help="folder for null.json")
    args = parser.parse_args()
    k, data = args.draws, f"data.n_stories={args.stories}"
    times: dict[str, list] = {"one_job": [], "multirun": [], "processes": []}
    for _ in range(args.repeats):
        with tempfile.TemporaryDirectory() as tmp:
            _round(k, data, Path(tmp), times)
    best = {m: min(v) for m, v in times.items()}
    save("null.json", {
        "machine": f"{platform.machine()}, {len(os.sched_getaffinity(0))} cpus",
        "draws": k, "stories": args.stories, "rounds": args.repeats,
        "wall_s": {m: b[0] for m, b in best.items()},
        "cpu_s": {m: b[1] for m, b in best.items()},
        "all_rounds_wall_cpu_s": times,
        "speedup_vs_multirun": round(best["multirun"][0] / best["one_job"][0], 2),
        "speedup_vs_processes": round(best["processes"][0] / best["one_job"][0], 2)},
         args.out)


if __name__ == "__main__":
    main()
