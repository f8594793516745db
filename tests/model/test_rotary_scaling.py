"""Rotary scalings recomputed per forward pass (dynamic NTK, LongRoPE: issue 29) are found in
the config and evaluated one item at a time by ``generate``: batch size 1 and 8 give the same
outcomes and measures, equal to ``generate`` on each prompt alone with a freshly loaded
model; a dynamic-NTK model is not refused as "too long" (it extrapolates). Small random-weight
Llama (dynamic) and Phi-3 (longrope) models saved with save_pretrained, whose scaling
switches within the items' lengths (155-160 tokens)."""

from __future__ import annotations

import copy

import pytest
import transformers as tf
from families import ROPE, one_thread, save_model  # noqa: F401 (a fixture)

from ih_sweep import data
from ih_sweep.config.schema import DType, EvalConfig, ModelConfig, QuantizationConfig
from ih_sweep.evaluation import evaluator as evaluation
from ih_sweep.evaluation.runner import PromptTooLong, check_prompt_lengths
from ih_sweep.model.loading import load_model
from ih_sweep.model.rotary import batch_dependent
from ih_sweep.testing import generate_one_at_a_time

SWITCH = 157  # the length where the scaling changes, among the items' prompt lengths
ITEMS = data.make_items(data.generate_stories(12, seed=5), "last")
CONFIGS = {
    "dynamic": tf.LlamaConfig(**{**ROPE, "max_position_embeddings": SWITCH,
                                 "initializer_range": 0.3,
                                 "rope_parameters": {"rope_type": "dynamic", "factor": 4.0,
                                                     "rope_theta": 10000.0}}),
    "longrope": tf.Phi3Config(**{**ROPE, "initializer_range": 0.3,
                                 "original_max_position_embeddings": SWITCH,
                                 "rope_parameters": {
                                     "rope_type": "longrope", "rope_theta": 10000.0,
                                     "short_factor": [1.0] * 4,
                                     "long_factor": [1.0, 16.0, 256.0, 4096.0],
                                     "original_max_position_embeddings": SWITCH}}),
}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_batch_dependent_rope_is_evaluated_one_item_at_a_time(tmp_path, name):
    folder = save_model(CONFIGS[name], tmp_path / name)
    model, tok = load_model(ModelConfig(name=name, path=str(folder), dtype=DType.float32),
                            QuantizationConfig(), "cpu")
    assert batch_dependent(model.config).startswith(f"rope_type={name} ")
    runs = {bs: evaluation.evaluate(model, tok, ITEMS, EvalConfig(progress=False,
                                                                  batch_size=bs, cpu_workers=1))
            for bs in (8, 1)}
    for field in ("continuation", "correct", "gold_logprob", "margin", "logit_diff"):
        assert [getattr(r, field) for r in runs[1]] == [getattr(r, field) for r in runs[8]], \
            field
    budget = EvalConfig().max_new_tokens
    fresh = [generate_one_at_a_time(copy.deepcopy(model), tok, it, budget) for it in ITEMS]
    assert [r.continuation for r in runs[8]] == fresh


def test_dynamic_ntk_is_not_refused_as_too_long(tmp_path):
    """The prompts (155-160 tokens) pass max_position_embeddings=100 under dynamic NTK; the
    same model with the default rotary embedding is still refused."""
    short = {**ROPE, "max_position_embeddings": 100}
    dyn = save_model(tf.LlamaConfig(**short, rope_parameters={
        "rope_type": "dynamic", "factor": 4.0, "rope_theta": 10000.0}), tmp_path / "dyn")
    plain = save_model(tf.LlamaConfig(**short), tmp_path / "plain")
    model, tok = load_model(ModelConfig(name="dyn", path=str(dyn), dtype=DType.float32),
                            QuantizationConfig(), "cpu")
    check_prompt_lengths(model, tok, ITEMS, 8)
    model, tok = load_model(ModelConfig(name="plain", path=str(plain), dtype=DType.float32),
                            QuantizationConfig(), "cpu")
    with pytest.raises(PromptTooLong, match=r"but the model takes 100 positions"):
        check_prompt_lengths(model, tok, ITEMS, 8)
