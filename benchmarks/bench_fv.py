"""FV scoring (ih_sweep.heads.function_vectors) on the tiny model with the default settings
(1,000 generated stories, the notebook's prompt, 100 clean + 25 corrupted prompts): seconds,
best of a few runs, and how many of the top-8 heads by FV score are among the top-8 by
prefix matching.

    python benchmarks/bench_fv.py [--threads 2] [--repeats 2]
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from _results import RESULTS, best_of, save

from ih_sweep.config.schema import (
    DataConfig,
    DType,
    EvalConfig,
    ModelConfig,
    QuantizationConfig,
    ScoringConfig,
)
from ih_sweep.data import items_for
from ih_sweep.heads.function_vectors import function_vector_scores
from ih_sweep.heads.scoring import score_heads, score_matrix
from ih_sweep.heads.selection import top_heads
from ih_sweep.model.loading import eager_attention, load_model
from ih_sweep.model.runtime import keep_freed_memory


def main() -> None:
    keep_freed_memory()  # as the CLI's jobs run
    p = argparse.ArgumentParser()
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--out", default=str(RESULTS))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    model, tok = load_model(ModelConfig(name="tiny", path="builtin:tiny", dtype=DType.float32),
                            QuantizationConfig(), "cpu")
    items = items_for(DataConfig(), EvalConfig())
    settings = ScoringConfig()
    result, seconds = best_of(lambda: function_vector_scores(model, tok, items, settings),
                              args.repeats)
    with eager_attention(model):
        prefix = score_matrix(score_heads(model, tok, settings), "prefix")
    fv, top_prefix = top_heads(result.aie, 8), top_heads(prefix, 8)
    save("fv.json", {
        "threads": args.threads, "items": len(items), "fv_prompts": settings.fv_prompts,
        "fv_mean_prompts": settings.fv_mean_prompts, "seconds": round(seconds, 2),
        "top8_fv": fv, "top8_prefix": top_prefix,
        "top8_overlap": len(set(fv) & set(top_prefix)),
        "max_abs_aie": float(np.abs(result.aie).max()),
        "baseline_p_min": float(result.baseline.min()),
        "skipped": result.skipped}, args.out)


if __name__ == "__main__":
    main()
