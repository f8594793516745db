"""GPU benchmark: a Mistral-7B-shaped model with random weights (built from its config, no
download), bf16 and nf4, evaluating 2,000 generated qa1 stories (last question, `contains`),
plus the seed's one-story-at-a-time method on a subset for the ratio.

Reports stories/s, tokens/s and model FLOP utilisation (2 * parameters * tokens / time over
the card's dense bf16 peak). Token counts come from the tiny model's word-level tokenizer
(ids < 300 of the 32,000-token vocabulary); real Mistral BPE prompts are ~1.3x longer.
Designed to finish in under 10 minutes on one H100; writes JSON.

    python benchmarks/bench_gpu.py --out benchmarks/results/gpu.json [--stories 2000]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from ih_sweep import data
from ih_sweep.evaluation import EvalSettings, build_rows, evaluate, generate_one_at_a_time
from ih_sweep.tiny_model import build_tokenizer

PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


def mistral_7b_config():
    from transformers import MistralConfig

    return MistralConfig(vocab_size=32000, hidden_size=4096, intermediate_size=14336,
                         num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                         max_position_embeddings=32768, rms_norm_eps=1e-5, rope_theta=10000.0,
                         sliding_window=None, bos_token_id=1, eos_token_id=2,
                         attn_implementation="sdpa")


def random_model(quant: str, folder: Path):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig, MistralForCausalLM

    cfg = mistral_7b_config()
    if quant == "bf16":
        with torch.device("cuda"):
            torch.set_default_dtype(torch.bfloat16)
            model = MistralForCausalLM(cfg)
            torch.set_default_dtype(torch.float32)
        return model.eval()
    if not (folder / "config.json").exists():  # nf4 quantizes on load: save random bf16 once
        with torch.device("cuda"):
            torch.set_default_dtype(torch.bfloat16)
            MistralForCausalLM(cfg).save_pretrained(folder)
            torch.set_default_dtype(torch.float32)
        torch.cuda.empty_cache()
    qc = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                            bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.bfloat16)
    return AutoModelForCausalLM.from_pretrained(folder, quantization_config=qc,
                                                device_map={"": 0}).eval()


def bench(model, tok, stories, seed_subset: int, batch_size: int) -> dict:
    items = data.make_items(stories, "last")
    n_tokens = sum(len(r) for r, _ in build_rows(tok, items, 3))
    evaluate(model, tok, items[:batch_size], EvalSettings(progress=False,
                                                          batch_size=batch_size))  # warm up
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    res = evaluate(model, tok, items, EvalSettings(progress=False, batch_size=batch_size))
    torch.cuda.synchronize()
    t_eng = time.perf_counter() - t0
    t0 = time.perf_counter()
    for it in items[:seed_subset]:
        generate_one_at_a_time(model, tok, it)
    torch.cuda.synchronize()
    t_seed = (time.perf_counter() - t0) / seed_subset * len(items)
    n_params = sum(p.numel() for p in model.parameters())
    if hasattr(model, "get_memory_footprint"):
        n_params = max(n_params, 7_241_732_096)  # 4-bit storage packs two weights a byte
    name = torch.cuda.get_device_name(0)
    peak = next((v for k, v in PEAK_BF16.items() if k in name), float("nan"))
    return {"stories": len(items), "engine_s": round(t_eng, 2),
            "engine_stories_per_s": round(len(items) / t_eng, 1),
            "engine_tokens_per_s": round(n_tokens / t_eng),
            "seed_method_stories_per_s": round(len(items) / t_seed, 2),
            "speedup_vs_seed": round(t_seed / t_eng, 1),
            "mfu": round(2 * n_params * n_tokens / t_eng / peak, 4),
            "by_generation": sum(r.decided_by == "generate" for r in res),
            "peak_memory_gb": round(torch.cuda.max_memory_allocated() / 2**30, 1)}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--stories", type=int, default=2000)
    p.add_argument("--seed-subset", type=int, default=40)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--quant", nargs="+", default=["bf16", "nf4"])
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "gpu.json"))
    args = p.parse_args()
    assert torch.cuda.is_available(), "this benchmark needs a CUDA GPU"
    torch.manual_seed(0)
    tok = build_tokenizer()
    stories = data.generate_stories(args.stories, seed=0)
    out = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__}
    with tempfile.TemporaryDirectory() as tmp:
        for quant in args.quant:
            t0 = time.perf_counter()
            model = random_model(quant, Path(tmp))
            load_s = time.perf_counter() - t0
            out[quant] = {"load_s": round(load_s, 1),
                          **bench(model, tok, stories, args.seed_subset, args.batch_size)}
            print(json.dumps({quant: out[quant]}), flush=True)
            del model
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
