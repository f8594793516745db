"""Evaluation speed: the seed's method against the engine, same process, stories and metric.

Seed's method: one story at a time, ``generate`` 3 new tokens, with the same (sdpa) attention
as the engine: the headline ratio. Unablated it is also timed with eager attention, as the
notebook loaded its model (a secondary number). Engine: batched teacher-forced pass, decoding
on from its cache where needed, run as the sweep runs it (on CPU as many batches at once as
torch has threads, one thread each), and also one batch at a time on all threads. Also the
engine against a bare batched forward pass over the same token rows. Checks per-item outcomes
are identical. The process keeps freed memory for reuse (``runtime.keep_freed_memory``), as
the CLI's jobs do; both methods run under it.

    python benchmarks/bench_eval.py [--stories 300] [--threads 2] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import platform
from functools import partial

import torch
from _results import REPEATS, RESULTS, ratio, rounds, save

from ih_sweep import data
from ih_sweep.ablation.hooks import ablate_heads
from ih_sweep.config.schema import DType, EvalConfig, ModelConfig, QuantizationConfig
from ih_sweep.evaluation.evaluator import (
    build_rows,
    evaluate,
    is_correct,
)
from ih_sweep.model.loading import eager_attention, load_model
from ih_sweep.model.runtime import keep_freed_memory
from ih_sweep.testing import generate_one_at_a_time


def seed_method(model, tok, items):
    return [generate_one_at_a_time(model, tok, it) for it in items]


def engine(model, tok, items, batch_size, cpu_workers="auto"):
    return evaluate(model, tok, items, EvalConfig(
        progress=False, batch_size=batch_size, cpu_workers=cpu_workers))


def eager_seed_method(model, tok, items):
    with eager_attention(model):
        return seed_method(model, tok, items)


def methods(model, tok, items, batch_size: int, eager: bool) -> dict:
    """What one round times, in order. ``eager``: also the seed's method with eager attention,
    as the notebook loaded its model."""
    fns = {"seed": partial(seed_method, model, tok, items),
           "engine": partial(engine, model, tok, items, batch_size),
           "one_batch": partial(engine, model, tok, items, batch_size, cpu_workers=1),
           "bare": partial(bare_forward, model, tok, items, batch_size)}
    if eager:
        fns["eager"] = partial(eager_seed_method, model, tok, items)
    return fns


ELEMENTWISE = {f"aten::{n}" for n in ("mul", "add", "cat", "neg", "silu", "pow", "rsqrt",
                                       "mean", "sub", "div")}


def _kind(op: str) -> str:
    if "scaled_dot_product" in op or op in ("aten::_softmax", "aten::bmm"):
        return "attention"
    if op in ("aten::mm", "aten::addmm"):
        return "matmul"
    return "elementwise" if op.rstrip("_") in ELEMENTWISE else "other"


def engine_profile(model, tok, items, batch_size) -> dict:
    """Share of the engine's CPU time by kind of operator (where a speedup must come from);
    one batch at a time (the profiler does not see operators in worker threads)."""
    from torch.profiler import profile

    with profile() as prof:
        engine(model, tok, items, batch_size, cpu_workers=1)
    totals = dict.fromkeys(("attention", "matmul", "elementwise", "other"), 0.0)
    for ev in prof.key_averages():
        totals[_kind(ev.key)] += ev.self_cpu_time_total
    whole = sum(totals.values()) or 1.0
    return {k: round(v / whole, 3) for k, v in totals.items()}


@torch.no_grad()
def bare_forward(model, tok, items, batch_size):
    """Plain batched forward passes (transformers' sdpa, padding mask, logits at one position)
    over exactly the engine's token rows, nothing else."""
    rows = sorted((r for r, _ in build_rows(tok, items, 3)), key=len)
    return _forward_rows(model, rows, batch_size)


def _forward_rows(model, rows, batch_size) -> int:
    n_tokens = 0
    for i in range(0, len(rows), batch_size):
        chunk = rows[i:i + batch_size]
        width = max(len(r) for r in chunk)
        ids = torch.zeros((len(chunk), width), dtype=torch.long)
        mask = torch.zeros_like(ids)
        for b, r in enumerate(chunk):
            ids[b, :len(r)] = torch.tensor(r)
            mask[b, :len(r)] = 1
        model(input_ids=ids, attention_mask=mask, use_cache=False, logits_to_keep=1)
        n_tokens += sum(len(r) for r in chunk)
    return n_tokens


def run(n_stories: int, threads: int, batch_size: int, heads: list) -> dict:
    torch.set_num_threads(threads)
    model, tok = load_model(ModelConfig(name="tiny", path="builtin:tiny", dtype=DType.float32),
                            QuantizationConfig(), "cpu")
    stories = data.generate_stories(n_stories, seed=0)
    out: dict = {"machine": f"{platform.machine()} {torch.get_num_threads()} threads, "
                            f"torch {torch.__version__}", "stories": n_stories,
                 "batch_size": batch_size, "ablated_heads": len(heads),
                 "timing": f"{REPEATS} rounds, each method once per round: rates from the "
                           "fastest round, ratios the median of the per-round ratios"}
    with ablate_heads(model, heads):
        for scope in ("last", "all"):
            items = data.make_items(stories, scope)
            evaluate(model, tok, items[:8], EvalConfig(progress=False))  # warm up
            got, times = rounds(methods(model, tok, items, batch_size, eager=not heads))
            ref, res, n_tok = got["seed"], got["engine"], got["bare"]
            t_seed, t_eng, t_one, t_bare = (min(times[k]) for k in
                                            ("seed", "engine", "one_batch", "bare"))
            same = all(r.correct == is_correct(c, r.item.answer, "contains")
                       for r, c in zip(res, ref))
            out[scope] = {
                "items": len(items), "seed_s": round(t_seed, 3), "engine_s": round(t_eng, 3),
                "seed_stories_per_s": round(n_stories / t_seed, 1),
                "engine_stories_per_s": round(n_stories / t_eng, 1),
                "seed_questions_per_s": round(len(items) / t_seed, 1),
                "engine_questions_per_s": round(len(items) / t_eng, 1),
                "speedup": round(ratio(times["seed"], times["engine"]), 2),
                "speedup_by_round": [round(a / b, 2) for a, b in
                                     zip(times["seed"], times["engine"])],
                "engine_workers": torch.get_num_threads(),
                "engine_one_batch_at_a_time_stories_per_s": round(n_stories / t_one, 1),
                "speedup_one_batch_at_a_time": round(ratio(times["seed"], times["one_batch"]),
                                                     2),
                **({"seed_eager_stories_per_s": round(n_stories / min(times["eager"]), 1),
                    "speedup_vs_seed_eager": round(ratio(times["eager"], times["engine"]), 2)}
                   if not heads else {}),
                "bare_forward_tokens_per_s": round(n_tok / t_bare),
                "engine_tokens_per_s": round(n_tok / t_eng),
                "engine_vs_bare": round(ratio(times["bare"], times["engine"]), 3),
                "decoded_past_forward": sum(r.decided_by != "forward" for r in res),
                "accuracy": round(sum(r.correct for r in res) / len(res), 4),
                "identical_outcomes": same,
                "engine_time_by_operator": engine_profile(model, tok, items, batch_size),
            }
    return out


def main() -> None:
    keep_freed_memory()  # as the CLI's jobs run
    p = argparse.ArgumentParser()
    p.add_argument("--stories", type=int, default=300)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--out", default=str(RESULTS))
    args = p.parse_args()
    results = {"unablated": run(args.stories, args.threads, args.batch_size, []),
               "top16_ablated": None}
    from ih_sweep.config.schema import ScoringConfig
    from ih_sweep.heads.scoring import score_heads, score_matrix
    from ih_sweep.heads.selection import select_heads

    model, tok = load_model(ModelConfig(name="tiny", path="builtin:tiny", dtype=DType.float32),
                            QuantizationConfig(), "cpu")
    with eager_attention(model):
        mat = score_matrix(score_heads(model, tok, ScoringConfig()), "prefix")
    results["top16_ablated"] = run(args.stories, args.threads, args.batch_size,
                                   select_heads(mat, "high", 16))
    save("eval.json", results, args.out)


if __name__ == "__main__":
    main()
