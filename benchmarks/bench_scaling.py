"""How evaluation time grows with the number of stories and with prompt length (blocks per
story), on the tiny model, engine only.

    python benchmarks/bench_scaling.py [--threads 2]
"""

from __future__ import annotations

import argparse
import random

import torch
from _results import REPEATS, best_of, save

from ih_sweep import data
from ih_sweep.config.schema import DType, EvalConfig, ModelConfig, QuantizationConfig
from ih_sweep.evaluation.evaluator import evaluate
from ih_sweep.model.loading import load_model
from ih_sweep.model.runtime import keep_freed_memory


def timed(model, tok, stories) -> tuple[float, int]:
    items = data.make_items(stories, "last")
    _, seconds = best_of(lambda: evaluate(model, tok, items, EvalConfig(progress=False)))
    return seconds, sum(len(tok(it.prompt)["input_ids"]) for it in items)


def main() -> None:
    keep_freed_memory()  # as the CLI's jobs run
    p = argparse.ArgumentParser()
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    model, tok = load_model(ModelConfig(name="tiny", path="builtin:tiny", dtype=DType.float32),
                            QuantizationConfig(), "cpu")
    timed(model, tok, data.generate_stories(20))  # warm up
    out: dict = {"threads": args.threads, "timing": f"best of {REPEATS} runs",
                 "by_stories": {}, "by_blocks": {}}
    for n in (250, 500, 1000, 2000):
        s, n_tok = timed(model, tok, data.generate_stories(n, seed=1))
        out["by_stories"][n] = {"seconds": round(s, 2), "stories_per_s": round(n / s, 1),
                                "tokens_per_s": round(n_tok / s)}
    for blocks in (2, 5, 10, 20):
        rng = random.Random(2)
        stories = [data.generate_qa1_story(rng, n_blocks=blocks) for _ in range(300)]
        s, n_tok = timed(model, tok, stories)
        out["by_blocks"][blocks] = {"seconds": round(s, 2), "mean_prompt_tokens":
                                    round(n_tok / 300), "tokens_per_s": round(n_tok / s)}
    save("scaling.json", out)


if __name__ == "__main__":
    main()
