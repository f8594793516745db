"""How stable the tiny model's top-N head sets are (issue #30 item 3;
ih_sweep.heads.stability): for the FV ranking (default settings: 1,000 generated stories,
the notebook's prompt, 100 clean + 25 corrupted prompts of the held-out stories) at each
``fv_seed`` and for the prefix ranking (16 random sequences), the mean overlap of the
top-N over 200 seeded bootstrap resamples of the prompts / sequences, the FV top-N's mean
pairwise overlap across the seeds, and how many heads lie more than 2 standard errors
from 0. Not a timing: the numbers are deterministic.

    python benchmarks/rank_stability.py [--seeds 0 1 2] [--n 4 8 16] [--threads 2]
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from _results import RESULTS, save

from ih_sweep.config.schema import (
    DataConfig,
    DType,
    EvalConfig,
    ModelConfig,
    QuantizationConfig,
    ScoringConfig,
)
from ih_sweep.data import load_stories
from ih_sweep.data.heldout import heldout_items
from ih_sweep.heads import stability as st
from ih_sweep.heads.function_vectors import function_vector_scores
from ih_sweep.heads.scoring import score_heads_with_samples
from ih_sweep.heads.selection import top_heads
from ih_sweep.model.loading import eager_attention, load_model


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--n", type=int, nargs="+", default=[4, 8, 16])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=str(RESULTS))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    model, tok = load_model(ModelConfig(name="tiny", path="builtin:tiny", dtype=DType.float32),
                            QuantizationConfig(), "cpu")
    data, ev = DataConfig(), EvalConfig()
    items, where = heldout_items(data, ev, load_stories(data))
    out: dict = {"fv_prompts_from": where, "resamples": st.RESAMPLES, "fv": {}, "prefix": {}}
    tops: dict[int, dict[int, list]] = {n: {} for n in args.n}
    for seed in args.seeds:
        result = function_vector_scores(model, tok, items, ScoringConfig(fv_seed=seed))
        se = st.standard_error(result.effects)
        row = {"heads_beyond_2se": int((np.abs(result.aie) > 2 * se).sum())}
        for n in args.n:
            row[f"top{n}_bootstrap"] = st.top_n_stability(
                result.effects, lambda m, n=n: top_heads(m, n))
            tops[n][seed] = top_heads(result.aie, n)
        out["fv"][f"fv_seed={seed}"] = row
        print(f"fv_seed={seed}: {row}", flush=True)
    out["fv"]["across_seeds"] = {f"top{n}": st.pairwise_overlap(list(tops[n].values()))
                                 for n in args.n}
    with eager_attention(model):
        df, samples = score_heads_with_samples(model, tok, ScoringConfig())
    se = st.standard_error(samples)
    prefix = samples.mean(0)
    out["prefix"] = {"sequences": int(samples.shape[0]),
                     "heads_beyond_2se": int((np.abs(prefix) > 2 * se).sum())}
    for n in args.n:
        out["prefix"][f"top{n}_bootstrap"] = st.top_n_stability(
            samples, lambda m, n=n: top_heads(m, n))
    save("rank_stability.json", out, args.out)


if __name__ == "__main__":
    main()
