"""The shipped tiny model meets its targets; the training command works and is seeded."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import BABI, needs_babi

from ih_sweep import data
from ih_sweep.ablation.hooks import ablate_heads
from ih_sweep.config.schema import EvalConfig, TrainConfig
from ih_sweep.evaluation.evaluator import evaluate
from ih_sweep.heads.selection import select_heads
from ih_sweep.model.loading import ASSET_DIR
from ih_sweep.model.tiny import HELD_OUT_SEED, recipe, train_tiny


def _accuracy(model, tok, items, heads=()):
    with ablate_heads(model, list(heads)):
        res = evaluate(model, tok, items, EvalConfig(progress=False, batch_size=64))
    return sum(r.correct for r in res) / len(res)


@pytest.fixture(scope="module")
def prefix(tiny_prefix):
    return tiny_prefix


def test_architecture_and_size(tiny):
    model, _ = tiny
    c = model.config
    assert c.model_type == "mistral" and c.num_hidden_layers >= 2
    assert c.num_attention_heads >= 32 and c.num_key_value_heads < c.num_attention_heads
    assert (ASSET_DIR / "model.safetensors").stat().st_size <= 5 * 2**20
    card = (ASSET_DIR / "README.md").read_text()
    for needed in ("Architecture", "Training recipe", "Measured", "Retrain", "Seed"):
        assert needed in card
    record = json.loads((ASSET_DIR / "training.json").read_text())
    assert record["facts"]["held_out_accuracy"] >= 0.95


def test_default_recipe_is_the_shipped_models():
    shipped = json.loads((ASSET_DIR / "training.json").read_text())["settings"]
    assert recipe(TrainConfig()) == shipped


def test_held_out_generated_accuracy(tiny):
    model, tok = tiny
    items = data.make_items(data.generate_stories(1000, HELD_OUT_SEED), "last")
    assert _accuracy(model, tok, items) >= 0.95


@needs_babi
def test_real_en10k_qa1_test_accuracy(tiny):
    model, tok = tiny
    stories = data.load_babi_file(BABI / "en-10k" / "qa1_single-supporting-fact_test.txt")
    assert _accuracy(model, tok, data.make_items(stories, "last")) >= 0.95


def test_has_induction_heads(prefix):
    assert (prefix >= 0.5).sum() >= 4


def test_ablating_induction_heads_hurts_and_control_does_not(tiny, prefix):
    """Issue 5's must-show: high at N = #heads >= 0.5 costs >= 15 points, low <= 3."""
    model, tok = tiny
    items = data.make_items(data.generate_stories(1000, seed=0), "last")
    base = _accuracy(model, tok, items)
    n = int((prefix >= 0.5).sum())
    high = _accuracy(model, tok, items, select_heads(prefix, "high", n))
    low = _accuracy(model, tok, items, select_heads(prefix, "low", n))
    assert base - high >= 0.15, (base, high)
    assert abs(base - low) <= 0.03, (base, low)


@pytest.mark.parametrize("n", [8, 16])
def test_top_n_costs_10_points_more_than_layer_matched_low(tiny, prefix, n):
    """In the default sweep's data (1000 generated stories, seed 0)."""
    model, tok = tiny
    items = data.make_items(data.generate_stories(1000, seed=0), "last")
    high = _accuracy(model, tok, items, select_heads(prefix, "high", n))
    low = _accuracy(model, tok, items, select_heads(prefix, "low", n))
    assert low - high >= 0.10, (n, high, low)
    assert set(select_heads(prefix, "high", n)).isdisjoint(select_heads(prefix, "low", n))


def _smoke(tmp_path=None):
    s = TrainConfig(seed=3, threads=1, warmup_steps=4, task_steps=4, batch_size=4,
                    warmup_active_heads=4, log_every=1)
    return train_tiny(s, tmp_path)


def test_training_smoke_run_saves_a_loadable_model_and_is_seeded(tmp_path):
    threads = torch.get_num_threads()
    try:
        a = _smoke(tmp_path / "m")
        b = _smoke()
    finally:
        torch.set_num_threads(threads)
    la = [h["loss"] for h in a["record"]["history"]]
    lb = [h["loss"] for h in b["record"]["history"]]
    assert len(la) == 8 and la == lb
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    tok = AutoTokenizer.from_pretrained(tmp_path / "m")
    ids = tok(data.build_prompt(data.generate_stories(1)[0]), return_tensors="pt")
    assert tok.unk_token_id not in ids["input_ids"][0].tolist()
    out = model(**ids).logits
    assert out.shape[-1] == len(tok) and np.isfinite(out.detach().numpy()).all()
