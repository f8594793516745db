"""GPU benchmark: a Mistral-7B-shaped model with random weights (built from its config, no
download), bf16 and nf4, evaluating 2,000 generated qa1 stories (last question, `contains`),
plus the seed's one-story-at-a-time method on a subset for the ratio, and the plain forward
(``model.model(input_ids)``: no unembedding, no cache, no decoding) over the same padded rows
in the same batches, for the evaluator's overhead over it.

Reports stories/s, tokens/s and model FLOP utilisation: (2 x the parameters a token passes
through, embeddings and unembedding left out since logits are computed at ~3 positions a row,
+ causal attention FLOPs) x tokens / time, over the card's dense bf16 peak; the same for the
plain forward, and ``overhead_vs_plain`` = evaluator time / plain forward time. The batch size
is ``eval.batch_size``'s (``auto`` by default: :mod:`ih_sweep.model.batching`), reported as
``batch_size``. Token counts come from the tiny model's word-level tokenizer (ids < 300 of
the 32,000-token vocabulary); real Mistral BPE prompts are ~1.3x longer. Random weights never
agree with the gold answer, so nearly every item is decoded past the teacher-forced pass: the
engine's worst case. Sized to finish in under 10 minutes on one H100 (the nf4 pass saves the
random bf16 weights once, ~14.5 GB, and quantizes them on load); writes JSON.

    python benchmarks/bench_gpu.py [--stories 2000] [--batch-size auto] [--out benchmarks/results]
    python benchmarks/bench_gpu.py --device cpu --shape small --stories 16   # smoke run
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
from _results import RESULTS, save

from ih_sweep import data
from ih_sweep.config.schema import EvalConfig
from ih_sweep.evaluation.evaluator import (
    build_rows,
    evaluate,
    is_correct,
)
from ih_sweep.model.batching import eval_batch_rows
from ih_sweep.model.tiny import build_tokenizer
from ih_sweep.testing import generate_one_at_a_time

PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12}
SHAPES = {  # small: same family and GQA ratio, for a CPU smoke run of this script
    "mistral-7b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=8),
    "small": dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                  num_attention_heads=8, num_key_value_heads=2),
}


def model_config(shape: str):
    from transformers import MistralConfig

    return MistralConfig(vocab_size=32000, max_position_embeddings=32768, rms_norm_eps=1e-5,
                         rope_theta=10000.0, sliding_window=None, bos_token_id=1,
                         eos_token_id=2, **SHAPES[shape])


def flops_per_token(cfg, n_tokens_per_row: float) -> float:
    """Forward FLOPs per token: weight matmuls (no embeddings/unembedding) + causal attention."""
    from transformers import MistralForCausalLM

    with torch.device("meta"):
        model = MistralForCausalLM(cfg)
    dense = sum(p.numel() for n, p in model.named_parameters()
                if "embed" not in n and "lm_head" not in n and p.dim() == 2)
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    attention = (2 * 2 * cfg.num_hidden_layers * cfg.num_attention_heads * head_dim
                 * n_tokens_per_row / 2)  # QK^T and AV over on average half the row
    return 2 * dense + attention


def random_model(cfg, quant: str, device: str, folder: Path):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig, MistralForCausalLM

    def build():
        torch.set_default_dtype(torch.bfloat16)
        try:
            with torch.device(device):
                return MistralForCausalLM(cfg)
        finally:
            torch.set_default_dtype(torch.float32)

    if quant == "bf16":
        model = build()
    else:
        if not (folder / "config.json").exists():  # nf4 quantizes on load: save bf16 once
            build().save_pretrained(folder)
            if device == "cuda":
                torch.cuda.empty_cache()
        qc = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                bnb_4bit_use_double_quant=True,
                                bnb_4bit_compute_dtype=torch.bfloat16)
        model = AutoModelForCausalLM.from_pretrained(
            folder, quantization_config=qc,
            device_map={"": 0} if device == "cuda" else {"": "cpu"})
    model.config._attn_implementation = "sdpa"
    return model.eval()


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def plain_forward_s(model, rows, batch_size: int, pad_id: int, device: str) -> float:
    """Seconds for ``model.model(input_ids)`` (the decoder alone: no unembedding, no cache)
    over ``rows`` sorted by length as the evaluator sorts them, right-padded to each batch's
    longest row, ``batch_size`` rows a batch; the first batch once before, as a warm-up."""
    order = sorted((r for r, _ in rows), key=len)
    batches = []
    for i in range(0, len(order), batch_size):
        chunk = order[i:i + batch_size]
        width = max(map(len, chunk))
        batches.append(torch.tensor([r + [pad_id] * (width - len(r)) for r in chunk]))
    with torch.no_grad():
        model.model(input_ids=batches[0].to(device))
        _sync(device)
        t0 = time.perf_counter()
        for ids in batches:
            model.model(input_ids=ids.to(device))
        _sync(device)
    return time.perf_counter() - t0


def bench(model, tok, stories, seed_subset: int, batch_size: int | str, device: str,
          flops_token: float) -> dict:
    items = data.make_items(stories, "last")
    rows = build_rows(tok, items, 3)
    n_tokens = sum(len(r) for r, _ in rows)
    bs = eval_batch_rows(batch_size, model, rows, 3)  # what the evaluator will use
    settings = EvalConfig(progress=False, batch_size=bs)
    evaluate(model, tok, items[:bs], settings)  # warm up
    _sync(device)
    t0 = time.perf_counter()
    res = evaluate(model, tok, items, settings)
    _sync(device)
    t_eng = time.perf_counter() - t0
    t_plain = plain_forward_s(model, rows, bs, tok.pad_token_id or 0, device)
    subset = items[:seed_subset]
    t0 = time.perf_counter()
    seed_out = [generate_one_at_a_time(model, tok, it) for it in subset]
    _sync(device)
    t_seed = (time.perf_counter() - t0) / len(subset) * len(items)
    out = {"stories": len(items), "tokens": n_tokens, "batch_size": bs,
           "engine_s": round(t_eng, 2),
           "engine_stories_per_s": round(len(items) / t_eng, 1),
           "engine_tokens_per_s": round(n_tokens / t_eng),
           "plain_forward_s": round(t_plain, 4),
           "plain_forward_tokens_per_s": round(n_tokens / t_plain),
           "overhead_vs_plain": round(t_eng / t_plain, 3),
           "seed_method_stories_per_s": round(len(items) / t_seed, 2),
           "seed_subset": len(subset), "speedup_vs_seed": round(t_seed / t_eng, 1),
           "decoded_past_forward": sum(r.decided_by != "forward" for r in res),
           "subset_outcomes_identical": all(
               r.correct == is_correct(c, r.item.answer, "contains")
               for r, c in zip(res, seed_out))}
    if device == "cuda":
        name = torch.cuda.get_device_name(0)
        peak = next((v for k, v in PEAK_BF16.items() if k in name), None)
        out["mfu"] = round(flops_token * n_tokens / t_eng / peak, 4) if peak else None
        out["plain_forward_mfu"] = \
            round(flops_token * n_tokens / t_plain / peak, 4) if peak else None
        out["peak_memory_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 1)
    return out


def _batch_size(text: str) -> int | str:
    if text == "auto":
        return text
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: allowed: auto, or an integer >= 1")
    return int(text)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--stories", type=int, default=2000)
    p.add_argument("--seed-subset", type=int, default=40)
    p.add_argument("--batch-size", type=_batch_size, default="auto",
                   help="rows a batch: auto (eval.batch_size's default) or a number")
    p.add_argument("--quant", nargs="+", default=["bf16", "nf4"], choices=["bf16", "nf4"])
    p.add_argument("--shape", default="mistral-7b", choices=sorted(SHAPES))
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--out", default=str(RESULTS))
    args = p.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench_gpu.py: no CUDA GPU here (use --device cpu --shape small "
                         "for a smoke run)")
    torch.manual_seed(0)
    tok = build_tokenizer()
    stories = data.generate_stories(args.stories, seed=0)
    cfg = model_config(args.shape)
    rows = build_rows(tok, data.make_items(stories, "last"), 3)
    flops_token = flops_per_token(cfg, sum(len(r) for r, _ in rows) / len(rows))
    out = {"device": torch.cuda.get_device_name(0) if args.device == "cuda" else "cpu",
           "shape": args.shape, "torch": torch.__version__, "flops_per_token": flops_token}
    with tempfile.TemporaryDirectory() as tmp:
        for quant in args.quant:
            t0 = time.perf_counter()
            model = random_model(cfg, quant, args.device, Path(tmp))
            load_s = time.perf_counter() - t0
            out[quant] = {"load_s": round(load_s, 1),
                          **bench(model, tok, stories, args.seed_subset, args.batch_size,
                                  args.device, flops_token)}
            print(json.dumps({quant: out[quant]}), flush=True)
            del model
            if args.device == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
    name = "gpu.json" if args.device == "cuda" and args.shape == "mistral-7b" else \
        f"gpu_smoke_{args.device}_{args.shape}.json"
    save(name, out, args.out)


if __name__ == "__main__":
    main()
