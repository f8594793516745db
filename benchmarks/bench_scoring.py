"""Scoring speed: seconds for all heads of the tiny model, and growth with the number of
sequences and of layers (random Mistral models of the tiny model's width).

    python benchmarks/bench_scoring.py [--threads 2]
"""

from __future__ import annotations

import argparse
import time

import torch
import transformers as tf
from _results import RESULTS, save

from ih_sweep.config.schema import DType, ModelConfig, QuantizationConfig, ScoringConfig
from ih_sweep.heads.scoring import score_heads
from ih_sweep.model.loading import eager_attention, load_model
from ih_sweep.model.runtime import keep_freed_memory


def timed(model, tok, settings) -> float:
    t0 = time.perf_counter()
    with eager_attention(model):
        score_heads(model, tok, settings)
    return time.perf_counter() - t0


def main() -> None:
    keep_freed_memory()  # as the CLI's jobs run
    p = argparse.ArgumentParser()
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=str(RESULTS))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    model, tok = load_model(ModelConfig(name="tiny", path="builtin:tiny", dtype=DType.float32),
                            QuantizationConfig(), "cpu")
    timed(model, tok, ScoringConfig(n_sequences=2))  # warm up
    out: dict = {"threads": args.threads, "tiny_default_s": timed(model, tok, ScoringConfig()),
                 "by_sequences": {}, "by_layers": {}}
    for n in (8, 16, 32, 64):
        out["by_sequences"][n] = round(timed(model, tok, ScoringConfig(n_sequences=n)), 3)
    for layers in (2, 4, 8):
        cfg = model.config.to_dict()
        cfg.update(num_hidden_layers=layers)
        cfg.pop("architectures", None)
        rnd = tf.MistralForCausalLM(tf.MistralConfig(**cfg)).eval()
        rnd.config._attn_implementation = "sdpa"
        out["by_layers"][layers] = round(timed(rnd, tok, ScoringConfig()), 3)
    out["tiny_default_s"] = round(out["tiny_default_s"], 3)
    save("scoring.json", out, args.out)


if __name__ == "__main__":
    main()
