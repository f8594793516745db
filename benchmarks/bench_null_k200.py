"""A null that can decide (issue #30 item 2): the default-sized sweep with K random draws at
each N, on the tiny model through the real CLI, from empty caches, for each way of matching
the draws to the top-N (``control.match=layer`` and ``layer_norm``):

    ih-sweep -m n_heads=4,8,16 condition=high,low,random,none control_seeds=K control.match=M

Records the sweep's wall and CPU time, each random job's time and how many of its draws were
evaluated (a draw of a head set an earlier draw had takes that draw's results), the distinct
head sets, the output norms of high / low / random at each N, the raw and Holm-adjusted p
vs none, low and random of the ``high`` rows, and any job the sweep left out (with its
one-line reason: a norm match that does not exist at an N is refused, not faked).

    python benchmarks/bench_null_k200.py [--draws 200] [--stories 1000] [--match layer layer_norm]
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

import pandas as pd
from _results import RESULTS, save

ROOT = Path(__file__).resolve().parents[1]
COLUMNS = ["n_heads", "accuracy", "p_vs_none", "p_vs_none_holm", "p_vs_low", "p_vs_low_holm",
           "p_vs_random", "p_vs_random_holm", "n_random", "random_acc_p2_5",
           "random_acc_p97_5", "null_band_at", "p_vs_random_holm_min", "output_norm_mean",
           "low_norm_ratio", "random_norm_ratio", "n_random_sets"]


def run_sweep(match: str, k: int, stories: int, folder: Path) -> dict:
    """The sweep for one ``control.match`` into ``folder``: its timings and numbers."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "ih_sweep", "-m", "n_heads=4,8,16",
         "condition=high,low,random,none", f"control_seeds={k}", f"control.match={match}",
         f"data.n_stories={stories}", "eval.progress=false", f"hydra.sweep.dir={folder}/s",
         f"paths.cache_dir={folder}/cache"],
        cwd=folder, capture_output=True, text=True,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(  # this checkout's code
            [str(ROOT), os.environ.get("PYTHONPATH", "")])})
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    sweep = folder / "s"
    jobs = {}
    for parent in sorted(sweep.glob("condition=random,*")):
        record = parent / "job.json"
        if not record.is_file():
            continue
        seeds = json.loads(record.read_text())
        evaluated = 0
        for sub in seeds["seed_folders"]:
            draw = json.loads((parent / sub / "job.json").read_text())
            evaluated += draw.get("same_heads_as") is None
        n = seeds["n_heads"]
        jobs[n] = {"wall_s": seeds["timings"]["total_s"], "draws": len(seeds["seed_folders"]),
                   "evaluated": evaluated}
    summary = pd.read_csv(sweep / "summary.csv")
    high = summary[summary.condition == "high"][COLUMNS].sort_values("n_heads")
    low = summary[summary.condition == "low"][["n_heads", "output_norm_mean"]]
    left_out = [line.strip() for line in proc.stderr.splitlines()
                if "SelectionError" in line and "left out" not in line]
    return {"exit_status": proc.returncode, "wall_s": round(wall, 1), "cpu_s": round(cpu, 1),
            "random_jobs": jobs, "high_rows": high.to_dict("records"),
            "low_norms": low.round(4).to_dict("records"), "left_out": left_out}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--draws", type=int, default=200)
    parser.add_argument("--stories", type=int, default=1000)
    parser.add_argument("--match", nargs="+", default=["layer", "layer_norm"])
    parser.add_argument("--out", default=str(RESULTS), help="folder for null_k200.json")
    args = parser.parse_args()
    out = {"machine": f"{platform.machine()}, {len(os.sched_getaffinity(0))} cpus",
           "load_before": os.getloadavg(), "draws": args.draws, "stories": args.stories,
           "sweeps": {}}
    for match in args.match:
        with tempfile.TemporaryDirectory() as tmp:
            out["sweeps"][match] = run_sweep(match, args.draws, args.stories, Path(tmp))
    out["load_after"] = os.getloadavg()
    save("null_k200.json", out, args.out)


if __name__ == "__main__":
    main()
