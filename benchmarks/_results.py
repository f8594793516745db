"""What the benchmark scripts share: where their JSON goes (benchmarks/results/, echoed to
stdout) and how they time (best of a few runs: 2 shared cores are noisy; methods compared
are timed in alternating rounds, so a slow spell hits all of them)."""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

RESULTS = Path(__file__).parent / "results"
REPEATS = 3
T = TypeVar("T")


def rounds(fns: dict[str, Callable[[], object]], repeats: int = REPEATS
           ) -> tuple[dict[str, object], dict[str, list[float]]]:
    """Each fn once per round, in order, ``repeats`` rounds: (result of each fn's last run,
    each fn's wall times by round)."""
    out: dict[str, object] = {}
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            out[name] = fn()
            times[name].append(time.perf_counter() - t0)
    return out, times


def best_of(fn: Callable[[], T], repeats: int = REPEATS) -> tuple[T, float]:
    """(result of the last run, fastest wall time of ``repeats`` runs)."""
    out, times = rounds({"fn": fn}, repeats)
    return out["fn"], min(times["fn"])


def ratio(slow: list[float], fast: list[float]) -> float:
    """Median of the per-round ratios: robust to a slow spell in one round."""
    return statistics.median(a / b for a, b in zip(slow, fast))


def save(name: str, results: dict, folder: str | Path = RESULTS) -> Path:
    path = Path(folder) / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=1) + "\n")
    print(json.dumps(results, indent=1))
    return path
