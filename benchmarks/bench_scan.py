"""Per-head scan: the cached-prefix exact scan against naive full reruns (one full forward
per head with the ablation hook), on the tiny model; and attribution patching's time and
rank agreement with the exact scan.

    python benchmarks/bench_scan.py [--threads 2] [--stories 200]
"""

from __future__ import annotations

import argparse
import time

import torch
from _results import save

from ih_sweep import data
from ih_sweep.config.schema import DType, ModelConfig, QuantizationConfig
from ih_sweep.model.architecture import head_sites
from ih_sweep.model.loading import load_model
from ih_sweep.model.runtime import keep_freed_memory
from ih_sweep.pipeline import head_scan as scan
from ih_sweep.testing import scan_by_full_reruns


def main() -> None:
    keep_freed_memory()  # as the CLI's jobs run
    p = argparse.ArgumentParser()
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--stories", type=int, default=200)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    model, tok = load_model(ModelConfig(name="tiny", path="builtin:tiny", dtype=DType.float32),
                            QuantizationConfig(), "cpu")
    probe = scan.babi_probe(tok, data.make_items(data.generate_stories(args.stories), "last"))
    sites = head_sites(model)
    out: dict = {"threads": args.threads, "stories": args.stories, "exact_s": {}}
    for per_pass in (1, 8, 32):
        t0 = time.perf_counter()
        exact = scan.exact_scan(model, {"babi": probe}, heads_per_pass=per_pass)
        out["exact_s"][per_pass] = round(time.perf_counter() - t0, 2)
    heads = [(la, h) for la in range(sites.n_layers) for h in range(sites.heads_per_layer)]
    t0 = time.perf_counter()
    scan_by_full_reruns(model, {"babi": probe}, heads)
    out["naive_full_reruns_s"] = round(time.perf_counter() - t0, 2)
    t0 = time.perf_counter()
    attr = scan.attribution_scan(model, probe)
    out["attribution_s"] = round(time.perf_counter() - t0, 2)
    m = exact.merge(attr, on=["layer", "head"])
    rho, lo, hi = scan.bootstrap_spearman(m["d_logprob"].to_numpy(),
                                          m["attr_d_logprob"].to_numpy())
    out["attribution_vs_exact_spearman"] = {"rho": round(rho, 3), "ci": [round(lo, 3),
                                                                          round(hi, 3)]}
    best = min(out["exact_s"].values())
    out["speedup_vs_naive"] = round(out["naive_full_reruns_s"] / best, 2)
    save("scan.json", out)


if __name__ == "__main__":
    main()
