from __future__ import annotations

import pytest
import torch

from ih_sweep.ablation.hooks import ablate_heads
from ih_sweep.config.schema import DType, EvalConfig, Quantization
from ih_sweep.data import babi as data
from ih_sweep.evaluation import evaluator as evaluation
from ih_sweep.evaluation.batches import run_batches
from ih_sweep.model.architecture import head_sites
from ih_sweep.model.loading import load_model, quantization_config, resolve_path
from ih_sweep.testing import generate_one_at_a_time

TINY = {"name": "tiny", "path": "builtin:tiny", "dtype": "float32"}


def test_nf4_is_the_notebooks_setting():
    qc = quantization_config({"name": "nf4", "double_quant": True, "compute_dtype": "bfloat16"})
    assert qc.load_in_4bit and qc.bnb_4bit_quant_type == "nf4"
    assert qc.bnb_4bit_use_double_quant and qc.bnb_4bit_compute_dtype == torch.bfloat16
    assert quantization_config({"name": "int8"}).load_in_8bit
    assert quantization_config({"name": "none"}) is None
    with pytest.raises(ValueError, match="allowed values: none, nf4, int8"):
        quantization_config({"name": "int3"})
    # the schema's Enums are accepted as they come from the config
    assert quantization_config({"name": Quantization.int8}).load_in_8bit
    qc = quantization_config({"name": Quantization.nf4, "compute_dtype": DType.float16})
    assert qc.bnb_4bit_compute_dtype == torch.float16
    with pytest.raises(ValueError, match="allowed values: auto, float32, bfloat16, float16"):
        quantization_config({"name": "nf4", "compute_dtype": "float8"})


def test_model_is_loaded_once_per_process(tiny):
    again = load_model({**TINY, "attn_implementation": "sdpa"}, {"name": "none"}, "cpu")
    assert again[0] is tiny[0]


def test_builtin_paths():
    assert resolve_path("builtin:tiny").endswith("assets/tiny")
    assert resolve_path("org/model") == "org/model"
    with pytest.raises(ValueError, match="only built-in model is builtin:tiny"):
        resolve_path("builtin:huge")


@pytest.mark.slow
@pytest.mark.parametrize("quant", [{"name": "nf4", "double_quant": True,
                                    "compute_dtype": "bfloat16"}, {"name": "int8"}])
def test_quantized_models_ablate_and_restore(quant):
    model, tok = load_model(TINY, quant, "cpu")
    kind = type(head_sites(model).out_proj[0]).__name__
    assert kind in ("Linear4bit", "Linear8bitLt")
    assert head_sites(model).w_o(1).shape == (32, 16, 64)  # dequantized for scoring
    ids = tok("Passage : Mary went to the kitchen .", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        base = model(input_ids=ids).logits
        with ablate_heads(model, [(1, h) for h in range(0, 32, 2)]):
            ablated = model(input_ids=ids).logits
        after = model(input_ids=ids).logits
    assert not torch.allclose(base, ablated) and torch.equal(base, after)
    # the evaluation engine's fast path on quantized layers, batches in 2 threads at once:
    # the notebook's method's outcomes, item by item
    items = data.make_items(data.generate_stories(10, seed=3), "all")
    with ablate_heads(model, [(1, h) for h in range(0, 32, 2)]):
        got = evaluation.evaluate(model, tok, items, EvalConfig(
            progress=False, batch_size=3, cpu_workers=2))
        ref = [generate_one_at_a_time(model, tok, it) for it in items]
    assert [r.correct for r in got] == [evaluation.is_correct(c, it.answer, "contains")
                                       for c, it in zip(ref, items)]


def test_cuda_oom_halves_the_batch_and_continues(monkeypatch):
    seen = []

    def fn(chunk):
        seen.append(len(chunk))
        if len(chunk) > 3:
            raise torch.cuda.OutOfMemoryError("fake")
        return [x * 2 for x in chunk]

    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    out = run_batches(fn, list(range(10)), 16, "t", False)
    assert [y for part in out for y in part] == [x * 2 for x in range(10)]
    assert seen[:3] == [10, 5, 2]
