"""What each part of the evaluator's fast path buys (ih_sweep/evaluation/fastpath/): the same
300 generated stories (last question, tiny model, unablated) evaluated with no attention
shortcut, with the public AttentionInterface part only (``eval.fast_layers=false``), and
with the patched Llama-family layer forwards too (``eval.fast_layers=true``), in 3
alternating rounds. Outcomes must be identical across the three; the script says so.

    python benchmarks/bench_fast_path.py [--stories 300]
"""

from __future__ import annotations

import argparse
import platform
import statistics

import torch
from _results import rounds, save

from ih_sweep import data
from ih_sweep.config.schema import DType, EvalConfig, ModelConfig, QuantizationConfig
from ih_sweep.evaluation import evaluator as evaluation
from ih_sweep.evaluation import fastpath as eval_attention
from ih_sweep.model.loading import load_model
from ih_sweep.model.runtime import keep_freed_memory


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stories", type=int, default=300)
    parser.add_argument("--out", default=None, help="folder for fast_path.json")
    args = parser.parse_args()
    keep_freed_memory()
    torch.set_num_threads(2)
    model, tok = load_model(ModelConfig(name="tiny", path="builtin:tiny", dtype=DType.float32),
                            QuantizationConfig(), "cpu")
    items = data.make_items(data.generate_stories(args.stories, seed=10_000), "last")
    install = eval_attention.FastPath._install

    def run(layers: bool | None, attention: bool = True):
        eval_attention.FastPath._install = install if attention else (lambda self: None)
        try:
            return evaluation.evaluate(model, tok, items, EvalConfig(progress=False,
                                                                     fast_layers=layers))
        finally:
            eval_attention.FastPath._install = install

    run(True)  # warm up (and the one-time run-time check)
    out, times = rounds({"no_shortcut": lambda: run(None, attention=False),
                         "attention_interface_only": lambda: run(False),
                         "with_layer_forwards": lambda: run(True)})
    outcomes = {k: [(r.correct, r.continuation) for r in v] for k, v in out.items()}
    save("fast_path.json", {
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, "
                   f"torch {torch.__version__}",
        "stories": args.stories,
        "median_s": {k: round(statistics.median(v), 3) for k, v in times.items()},
        "rounds_s": {k: [round(t, 3) for t in v] for k, v in times.items()},
        "identical_outcomes": len({str(v) for v in outcomes.values()}) == 1},
        **({"folder": args.out} if args.out else {}))


if __name__ == "__main__":
    main()
