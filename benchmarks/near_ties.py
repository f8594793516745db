"""The measurement behind ``evaluation.NEAR_TIE_TOLERANCE``: how much another batch size
changes the greedy steps' top-1 minus top-2 gaps, and which outcomes flip.

Tiny model on CPU in the given dtype, batch_size=1 against the default (32), one thread.
Prints the items whose outcome flips (margins in both runs, and relative to |top-1|) and the
largest change of a gap, relative to |top-1|, over the steps whose context is the same in both
runs (same tokens up to the deciding step), and how many items each tolerance marks.

    PYTHONPATH=. python benchmarks/near_ties.py [--dtype bfloat16] [--heads 16] [--seed 11]
"""

from __future__ import annotations

import argparse

import torch

from ih_sweep import data
from ih_sweep.ablation.hooks import ablate_heads
from ih_sweep.config.schema import DType, EvalConfig, ModelConfig, QuantizationConfig, ScoringConfig
from ih_sweep.evaluation import evaluator as evaluation
from ih_sweep.evaluation import runner
from ih_sweep.heads.scoring import score_heads, score_matrix
from ih_sweep.heads.selection import select_heads
from ih_sweep.model.loading import eager_attention, load_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--stories", type=int, default=200)
    parser.add_argument("--seed", type=int, default=11)
    args = parser.parse_args()
    torch.set_num_threads(1)
    model, tok = load_model(ModelConfig(name="tiny", path="builtin:tiny",
                                        dtype=DType(args.dtype)), QuantizationConfig(), "cpu")
    f32, _ = load_model(ModelConfig(name="tiny", path="builtin:tiny", dtype=DType.float32),
                        QuantizationConfig(), "cpu")
    with eager_attention(f32):
        scores = score_matrix(score_heads(f32, tok, ScoringConfig()), "prefix")
    heads = select_heads(scores, "high", args.heads) if args.heads else []
    items = data.make_items(data.generate_stories(args.stories, seed=args.seed), "last")
    steps: dict[int, list] = {}
    real = runner.item_result

    def spy(item, text, correct, how, gaps_tops, decided, read, tolerance):
        steps.setdefault(id(item), []).append(
            (gaps_tops[0][:decided], gaps_tops[1][:decided], text))
        return real(item, text, correct, how, gaps_tops, decided, read, tolerance)

    runner.item_result = spy
    try:
        with ablate_heads(model, heads):
            one = evaluation.evaluate(model, tok, items, EvalConfig(
                batch_size=1, progress=False, cpu_workers=1))
            default = evaluation.evaluate(model, tok, items, EvalConfig(
                progress=False, cpu_workers=1))
    finally:
        runner.item_result = real

    def relative(gaps, tops):
        return min(g / max(abs(t), 1.0) for g, t in zip(gaps, tops))

    change = 0.0
    for it, a, b in zip(items, one, default):
        (ga, ta, ca), (gb, _, cb) = steps[id(it)]
        if a.correct != b.correct:
            print(f"flip: story {it.story_index}: margin {a.margin:.4g} / {b.margin:.4g}, "
                  f"relative {relative(ga, ta):.4g} / {relative(*steps[id(it)][1][:2]):.4g}, "
                  f"near_tie {a.near_tie} / {b.near_tie}")
        if ca == cb:
            change = max([change] + [abs(x - y) / max(abs(t), 1.0)
                                     for x, y, t in zip(ga, gb, ta)])
    print(f"{args.dtype}, {len(heads)} heads ablated, {len(items)} items: largest gap change "
          f"{change:.3g} x |top-1|; near-ties (batch_size=1) at tolerance "
          f"{evaluation.near_tie_tolerance(model):g}: {sum(r.near_tie for r in one)}")


if __name__ == "__main__":
    main()
