from __future__ import annotations

import pytest
import torch

from ih_sweep import data
from ih_sweep.ablation.hooks import ablate_heads
from ih_sweep.config.schema import DType, EvalConfig, ModelConfig, Quantization, QuantizationConfig
from ih_sweep.evaluation import evaluator as evaluation
from ih_sweep.evaluation.batches import run_batches
from ih_sweep.model.architecture import head_sites
from ih_sweep.model.loading import (
    cache_key,
    layers_and_heads,
    load_model,
    model_slug,
    quantization_config,
    resolve_path,
)
from ih_sweep.testing import generate_one_at_a_time

TINY = ModelConfig(name="tiny", path="builtin:tiny", dtype=DType.float32)


def test_nf4_is_the_notebooks_setting():
    """The schema's defaults for nf4 are the notebook's: double quant, bf16 compute."""
    qc = quantization_config(QuantizationConfig(name=Quantization.nf4))
    assert qc.load_in_4bit and qc.bnb_4bit_quant_type == "nf4"
    assert qc.bnb_4bit_use_double_quant and qc.bnb_4bit_compute_dtype == torch.bfloat16
    assert quantization_config(QuantizationConfig(name=Quantization.int8)).load_in_8bit
    assert quantization_config(QuantizationConfig()) is None
    qc = quantization_config(QuantizationConfig(name=Quantization.nf4, double_quant=False,
                                                compute_dtype=DType.float16))
    assert qc.bnb_4bit_compute_dtype == torch.float16 and not qc.bnb_4bit_use_double_quant
    # values outside the Enums (the schema refuses them at compose time) are refused here too
    with pytest.raises(ValueError, match=r"quantization.name='int3'; allowed values: none, "
                                         r"nf4, int8"):
        quantization_config(QuantizationConfig(name="int3"))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"model.dtype='float8'; allowed values: auto, "
                                         r"float32, bfloat16, float16"):
        quantization_config(QuantizationConfig(name=Quantization.nf4,
                                               compute_dtype="float8"))  # type: ignore[arg-type]


def test_model_is_loaded_once_per_process(tiny):
    again = load_model(ModelConfig(name="tiny", path="builtin:tiny", dtype=DType.float32),
                       QuantizationConfig(), "cpu")
    assert again[0] is tiny[0]
    assert load_model(TINY)[0] is tiny[0]  # no quantization: the same settings


def test_the_typed_settings_name_the_model_and_its_cache_files():
    """The cache key and the cache-file slug, read from the typed settings: unchanged from
    the dict form they replaced (JSON of the plain settings; name, revision, quantization)."""
    import json

    key = json.loads(cache_key(TINY, QuantizationConfig(), "cpu"))
    assert key == {"device": "cpu",
                   "model": {"name": "tiny", "path": "builtin:tiny", "revision": None,
                             "dtype": "float32", "device_map": None,
                             "trust_remote_code": False, "attn_implementation": "sdpa"},
                   "quant": {"name": "none", "double_quant": True, "compute_dtype": "bfloat16"}}
    assert model_slug(TINY) == model_slug(TINY, QuantizationConfig()) == "tiny"
    hub = ModelConfig(name="org/model", path="org/model", revision="abc")
    assert model_slug(hub, QuantizationConfig(name=Quantization.nf4)) == "org__model@abc-nf4"
    assert model_slug(ModelConfig(name="", path="builtin:tiny")) == "builtin_tiny"
    long = model_slug(ModelConfig(name="", path="/data/" + "x" * 200))
    assert len(long.encode()) <= 120 and long.endswith("x" * 80)


def test_layers_and_heads_from_the_config_alone():
    assert layers_and_heads(TINY) == (2, 32)


def test_builtin_paths():
    assert resolve_path("builtin:tiny").endswith("assets/tiny")
    assert resolve_path("org/model") == "org/model"
    with pytest.raises(ValueError, match="only built-in model is builtin:tiny"):
        resolve_path("builtin:huge")


@pytest.mark.slow
@pytest.mark.parametrize("quant", [QuantizationConfig(name=Quantization.nf4),
                                   QuantizationConfig(name=Quantization.int8)])
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


@pytest.mark.parametrize("flag", [True, False])
def test_a_softcapping_model_never_runs_under_sdpa(monkeypatch, caplog, flag):
    """Gemma-2's attention logit softcap cannot be applied by sdpa: eager, whatever the
    release's class flag says (transformers 5.0 sets Gemma2ForCausalLM._supports_sdpa,
    5.24 does not; issue 34). Without the softcap the flag decides as before."""
    import logging

    from transformers import Gemma2Config, Gemma2ForCausalLM

    from ih_sweep.model.loading import supported_attention

    monkeypatch.setattr(Gemma2ForCausalLM, "_supports_sdpa", flag)
    caplog.set_level(logging.INFO, logger="ih_sweep.model.loading")
    capped = Gemma2Config(attn_logit_softcapping=50.0)
    assert supported_attention(capped, "sdpa") == "eager"
    assert "softcapping needs another; using eager" in caplog.text
    assert supported_attention(capped, "eager") == "eager"
    plain_gemma = Gemma2Config(attn_logit_softcapping=None)
    assert supported_attention(plain_gemma, "sdpa") == ("sdpa" if flag else "eager")
