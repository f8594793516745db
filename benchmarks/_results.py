"""What the benchmark scripts share: where their JSON goes (benchmarks/results/, echoed to
stdout) and how they time (best of a few runs: 2 shared cores are noisy)."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

RESULTS = Path(__file__).parent / "results"
REPEATS = 3
T = TypeVar("T")


def best_of(fn: Callable[[], T], repeats: int = REPEATS) -> tuple[T, float]:
    """(result of the last run, fastest wall time of ``repeats`` runs)."""
    times = []
    out = None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return out, min(times)


def save(name: str, results: dict, folder: str | Path = RESULTS) -> Path:
    path = Path(folder) / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=1) + "\n")
    print(json.dumps(results, indent=1))
    return path
