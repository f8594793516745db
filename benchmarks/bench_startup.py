"""What a user waits for before any work: ``python -m ih_sweep --help``, a config error
(``n_heads=abc``) and a rerun of the default sweep that reuses every job
(``-m n_heads=4,8,16 condition=high,low,none`` with a score cache that holds all of them),
for this checkout and, optionally, a baseline checkout (``--base``, e.g. an export of an
older commit: ``git archive <commit> | tar -x -C /tmp/base``), timed in alternating rounds
(each command of each checkout once per round) so that a slow spell on the shared cores hits
both. Reports per command the median wall and CPU seconds (the child's user + system time),
the load average before and after, and checks that the rerun reused all 9 jobs.

    python benchmarks/bench_startup.py [--base /tmp/base] [--repeats 5] [--cache DIR]

``--cache`` names a score cache that already holds the sweep's jobs (else one sweep fills a
temporary one first, ~30 s on an idle machine).
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _results import save

ROOT = Path(__file__).resolve().parents[1]
SWEEP = ["-m", "n_heads=4,8,16", "condition=high,low,none", "eval.progress=false"]


def timed(root: Path, args: list[str]) -> tuple[float, float, subprocess.CompletedProcess]:
    """``python -m ih_sweep ARGS`` from ``root`` (its package first on the path): (wall s,
    CPU s, the finished process)."""
    env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "2"}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "ih_sweep", *args], cwd=root, env=env,
                          capture_output=True, text=True)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu, proc


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", type=Path, help="a baseline checkout to compare with")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--cache", type=Path, help="a score cache holding the sweep's jobs")
    args = parser.parse_args()
    trees = {"this": ROOT, **({"base": args.base.resolve()} if args.base else {})}
    with tempfile.TemporaryDirectory() as tmp:
        cache = args.cache or Path(tmp, "cache")
        if args.cache is None:
            _, _, proc = timed(ROOT, [*SWEEP, f"hydra.sweep.dir={tmp}/fill",
                                      f"paths.cache_dir={cache}"])
            assert proc.returncode == 0, proc.stderr[-3000:]
        commands = {"help": lambda run: ["--help"],
                    "config_error": lambda run: ["n_heads=abc"],
                    "reuse_rerun": lambda run: [*SWEEP, f"hydra.sweep.dir={tmp}/{run}",
                                                f"paths.cache_dir={cache}"]}
        expected = {"help": 0, "config_error": 2, "reuse_rerun": 0}
        times: dict[str, dict[str, list[tuple[float, float]]]] = {
            t: {c: [] for c in commands} for t in trees}
        load_before = os.getloadavg()
        for r in range(args.repeats):
            for command, make in commands.items():
                for tree, root in trees.items():
                    wall, cpu, proc = timed(root, make(f"{tree}{r}"))
                    assert proc.returncode == expected[command], proc.stderr[-3000:]
                    if command == "reuse_rerun":
                        reused = (proc.stdout + proc.stderr).count("reusing the finished")
                        assert reused == 9, f"{tree}: {reused} of 9 jobs reused"
                    times[tree][command].append((wall, cpu))
                    print(f"round {r}: {tree} {command}: {wall:.2f} s wall, {cpu:.2f} s CPU",
                          flush=True)
        load_after = os.getloadavg()
    out = {"machine": f"{platform.machine()}, {len(os.sched_getaffinity(0))} cpus (shared)",
           "repeats": args.repeats, "load_avg_1_5_15_before": load_before,
           "load_avg_1_5_15_after": load_after, "trees": {k: str(v) for k, v in trees.items()}}
    for tree, by_command in times.items():
        out[tree] = {c: {"median_wall_s": round(statistics.median(w for w, _ in ts), 2),
                         "median_cpu_s": round(statistics.median(c for _, c in ts), 2),
                         "wall_s": [round(w, 2) for w, _ in ts],
                         "cpu_s": [round(c, 2) for _, c in ts]}
                     for c, ts in by_command.items()}
    save("startup.json", out)


if __name__ == "__main__":
    main()
