"""The whole command against the notebook's method (issue 32): the default sweep
``python -m ih_sweep -m n_heads=4,8,16 condition=high,low,none`` through the real CLI from
empty caches (every check, the scoring, 7 evaluations of 1000 stories, the mechanism
check, the records, the summary), and the notebook's method in a process of its own
(import, the model loaded once, then for each of the same 7 head sets one HF ``generate``
per story, 3 new tokens, greedy: :func:`ih_sweep.testing.generate_one_at_a_time`, as
``bench_eval.py`` times it, with the same sdpa attention), timed in alternating pairs so
that a slow spell on the shared cores hits both. The notebook's method gets the heads the
sweep chose (from the first sweep's job.json files) for free: it neither scores heads nor
writes anything. Reports each side's median wall and CPU seconds (the child's user +
system time), the median of the per-pair ratios, the load average before and after,
whether the notebook's per-item outcomes equal the sweep's results.csv, and the wall of a
full-reuse rerun (the same command again with the first sweep's folder and cache: every
job reused, no torch imported). Then, in the same run, the start-up a user waits for:
``python -m ih_sweep --help`` and a config error (``n_heads=abc``, exit status 2), each
``--quick`` times, one after the other (median wall).

    python benchmarks/bench_end_to_end.py [--pairs 3] [--reruns 3] [--quick 5]
                                          [--stories 1000] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _results import RESULTS, save

ROOT = Path(__file__).resolve().parents[1]
SWEEP = ["-m", "n_heads=4,8,16", "condition=high,low,none", "eval.progress=false"]
QUICK = {"help": (["--help"], 0), "config_error": (["n_heads=abc"], 2)}  # args, exit status


def timed(cmd: list[str], status: int = 0) -> tuple[float, float, subprocess.CompletedProcess]:
    """Run ``cmd`` from the repository root (its package first on the path, 2 torch
    threads as the machine has cores), which must end with exit ``status``: (wall s, CPU s,
    the finished process)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "2",
           "OMP_WAIT_POLICY": "PASSIVE"}  # on busy shared cores, no spinning thread
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    if proc.returncode != status:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return wall, cpu, proc


def sweep(folder: Path, stories: int) -> tuple[float, float, int]:
    """The CLI sweep into ``folder``/sweep with the score cache ``folder``/cache: (wall,
    CPU, how many of its jobs were reused: found complete in their folder or the store)."""
    wall, cpu, proc = timed([sys.executable, "-m", "ih_sweep", *SWEEP,
                             f"data.n_stories={stories}", f"hydra.sweep.dir={folder}/sweep",
                             f"paths.cache_dir={folder}/cache"])
    log = proc.stdout + proc.stderr
    return wall, cpu, log.count("complete results exist") + log.count(
        "reusing the finished evaluation")


def head_sets(sweep_dir: Path) -> list[dict]:
    """The sweep's evaluations, one per distinct (condition, heads): the three ``none``
    jobs are one evaluation (the sweep reuses it), as in the notebook."""
    seen: dict[tuple, dict] = {}
    for path in sorted(sweep_dir.glob("*/job.json")):
        job = json.loads(path.read_text())
        heads = [tuple(h) for h in job["heads"]]
        key = (job["condition"], tuple(heads))
        if key not in seen:
            with open(path.parent / "results.csv", newline="") as fh:
                correct = [row["correct"] == "True" for row in csv.DictReader(fh)]
            seen[key] = {"name": path.parent.name, "condition": job["condition"],
                         "heads": heads, "n_correct": job["n_correct"], "correct": correct}
    return list(seen.values())


def notebook_child(spec: Path, out: Path) -> None:
    """The notebook's method in this process: the model loaded once, then for each head
    set of ``spec`` one ``generate`` per story; per-item correctness written to ``out``."""
    from ih_sweep import data
    from ih_sweep.ablation.hooks import ablate_heads
    from ih_sweep.config.schema import DType, ModelConfig, QuantizationConfig
    from ih_sweep.evaluation.evaluator import is_correct
    from ih_sweep.model.loading import load_model
    from ih_sweep.testing import generate_one_at_a_time

    job = json.loads(spec.read_text())
    model, tok = load_model(ModelConfig(name="tiny", path="builtin:tiny", dtype=DType.float32),
                            QuantizationConfig(), "cpu")
    items = data.make_items(data.generate_stories(job["stories"], seed=0), "last")
    results = {}
    for head_set in job["sets"]:
        with ablate_heads(model, [tuple(h) for h in head_set["heads"]]):
            results[head_set["name"]] = [
                is_correct(generate_one_at_a_time(model, tok, it, 3), it.answer, "contains")
                for it in items]
    out.write_text(json.dumps(results))


def notebook(folder: Path, sets: list[dict], stories: int) -> tuple[float, float, dict]:
    """The notebook's method in a process of its own: (wall, CPU, per-item correctness by
    head set)."""
    spec, out = folder / "notebook_spec.json", folder / "notebook_out.json"
    spec.write_text(json.dumps({"stories": stories, "sets": [
        {"name": s["name"], "heads": s["heads"]} for s in sets]}))
    wall, cpu, _ = timed([sys.executable, str(Path(__file__).resolve()), "--notebook-child",
                          str(spec), str(out)])
    return wall, cpu, json.loads(out.read_text())


def median(values: list[float]) -> float:
    return round(statistics.median(values), 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--reruns", type=int, default=3)
    parser.add_argument("--quick", type=int, default=5,
                        help="runs each of --help and a config error")
    parser.add_argument("--stories", type=int, default=1000)
    parser.add_argument("--out", default=str(RESULTS))
    parser.add_argument("--notebook-child", nargs=2, type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.notebook_child:
        notebook_child(*args.notebook_child)
        return
    load_before = os.getloadavg()
    times: dict[str, list[float]] = {k: [] for k in ("sweep_wall", "sweep_cpu", "notebook_wall",
                                                     "notebook_cpu", "rerun_wall", "rerun_cpu",
                                                     "help_wall", "config_error_wall")}
    state: dict = {"sets": [], "identical": True, "reused": []}
    with tempfile.TemporaryDirectory() as tmp:
        for pair in range(args.pairs):
            folder = Path(tmp, f"pair{pair}")
            wall, cpu, _ = sweep(folder, args.stories)
            times["sweep_wall"].append(wall)
            times["sweep_cpu"].append(cpu)
            if not state["sets"]:
                state["sets"] = head_sets(folder / "sweep")
            wall, cpu, outcomes = notebook(Path(tmp), state["sets"], args.stories)
            times["notebook_wall"].append(wall)
            times["notebook_cpu"].append(cpu)
            state["identical"] &= all(outcomes[s["name"]] == s["correct"]
                                      for s in state["sets"])
            print(f"pair {pair}: sweep {times['sweep_wall'][-1]:.1f} s, notebook "
                  f"{wall:.1f} s", file=sys.stderr, flush=True)
            report(args, load_before, times, state)  # what finished so far is kept
        first = Path(tmp, "pair0")
        for _ in range(args.reruns):  # every job reused from the first sweep's folder/cache
            wall, cpu, n = sweep(first, args.stories)
            times["rerun_wall"].append(wall)
            times["rerun_cpu"].append(cpu)
            state["reused"].append(n)
    for name, (extra, status) in QUICK.items():
        for _ in range(args.quick):
            wall, _, proc = timed([sys.executable, "-m", "ih_sweep", *extra], status)
            if status == 2 and "n_heads" not in proc.stderr:
                raise SystemExit(f"the config error did not name its key:\n{proc.stderr}")
            times[f"{name}_wall"].append(wall)
    report(args, load_before, times, state)


def report(args: argparse.Namespace, load_before: tuple, times: dict[str, list[float]],
           state: dict) -> None:
    """Save end_to_end.json with the rounds timed so far."""
    ratios = [n / s for n, s in zip(times["notebook_wall"], times["sweep_wall"])]
    save("end_to_end.json", {
        "machine": f"{platform.machine()}, {len(os.sched_getaffinity(0))} cpus (shared), "
                   f"Python {platform.python_version()}, OMP_NUM_THREADS=2, "
                   "OMP_WAIT_POLICY=PASSIVE",
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
        "command": "python -m ih_sweep " + " ".join(SWEEP)
                   + f" data.n_stories={args.stories} (empty caches)",
        "stories": args.stories, "evaluations": len(state["sets"]),
        "pairs": len(ratios),
        "sweep_wall_s": median(times["sweep_wall"]), "sweep_cpu_s": median(times["sweep_cpu"]),
        "notebook_wall_s": median(times["notebook_wall"]),
        "notebook_cpu_s": median(times["notebook_cpu"]),
        "ratio_notebook_over_sweep": round(statistics.median(ratios), 2) if ratios else None,
        "ratio_by_pair": [round(r, 2) for r in ratios],
        "outcomes_identical": state["identical"],
        "rerun_wall_s": median(times["rerun_wall"]) if times["rerun_wall"] else None,
        "rerun_cpu_s": median(times["rerun_cpu"]) if times["rerun_cpu"] else None,
        "rerun_jobs_reused": state["reused"],  # per rerun, of the sweep's 9 jobs
        "help_wall_s": median(times["help_wall"]) if times["help_wall"] else None,
        "config_error_wall_s": (median(times["config_error_wall"])
                                if times["config_error_wall"] else None),
        "by_round": {k: [round(v, 2) for v in vs] for k, vs in times.items()},
    }, args.out)

if __name__ == "__main__":
    main()
