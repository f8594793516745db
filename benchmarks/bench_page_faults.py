"""Minor page faults per forward pass of a batch of 32 prompts (150 tokens) on the tiny
model, with glibc's default malloc settings and with ``runtime.keep_freed_memory()``.

Each setting runs in a fresh process (the malloc settings are process-wide), ``--pairs``
alternating pairs. Page-fault counts vary with the machine's load and memory state, so they
are recorded here and never asserted in tests.

    python benchmarks/bench_page_faults.py
"""

from __future__ import annotations

import argparse
import platform
import statistics
import subprocess
import sys

from _results import save

FAULTS_PER_FORWARD = """
import resource, sys, torch
from ih_sweep.model.runtime import keep_freed_memory
from ih_sweep.config.schema import DType, ModelConfig, QuantizationConfig
from ih_sweep.model.loading import load_model
torch.set_num_threads(1)
if sys.argv[1] == "keep":
    assert keep_freed_memory()
model, _ = load_model(ModelConfig(name="tiny", path="builtin:tiny", dtype=DType.float32),
                      QuantizationConfig(), "cpu")
ids = torch.randint(3, 290, (32, 150))
with torch.no_grad():
    model(input_ids=ids, use_cache=False, logits_to_keep=1)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(3):
        model(input_ids=ids, use_cache=False, logits_to_keep=1)
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) // 3)
"""


def faults(mode: str) -> int:
    proc = subprocess.run([sys.executable, "-c", FAULTS_PER_FORWARD, mode],
                          capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"the {mode} measurement failed:\n{proc.stderr[-2000:]}")
    return int(proc.stdout.split()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=5)
    args = parser.parse_args()
    plain, kept = [], []
    for _ in range(args.pairs):
        plain.append(faults("plain"))
        kept.append(faults("keep"))
    save("page_faults.json", {
        "machine": f"{platform.machine()}, glibc {platform.libc_ver()[1]}",
        "batch": "32 prompts x 150 tokens, tiny model, 1 thread",
        "faults_per_forward_plain": plain, "faults_per_forward_kept": kept,
        "median_plain": statistics.median(plain), "median_kept": statistics.median(kept)})


if __name__ == "__main__":
    main()
