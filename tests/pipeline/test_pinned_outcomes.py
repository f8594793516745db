"""Refactors of the model internals keep the numbers: the shipped model's head scores and its
ablated logits equal values recorded before (bit for bit on the machine that recorded them;
the tolerances here only absorb other CPUs' float rounding)."""

from __future__ import annotations

import json

import numpy as np
import torch

from ih_sweep import data
from ih_sweep.ablation.hooks import ablate_heads
from ih_sweep.ablation.means import head_means
from ih_sweep.config.schema import ScoringConfig
from ih_sweep.heads.scoring import score_heads, score_matrix
from ih_sweep.model.loading import ASSET_DIR, eager_attention
from ih_sweep.pipeline import head_scan as scan


def test_scores_equal_the_model_cards(tiny):
    """training.json holds every head's scores (4 decimals) from the default settings."""
    model, tok = tiny
    with eager_attention(model):
        df = score_heads(model, tok, ScoringConfig(), "tiny")
    card = json.loads((ASSET_DIR / "training.json").read_text())["facts"]["scores"]
    for column in ("prefix", "copying"):
        want = np.full((2, 32), np.nan)
        for r in card:
            want[r["layer"], r["head"]] = r[column]
        np.testing.assert_allclose(score_matrix(df, column), want, rtol=0, atol=6e-5)


# the largest logit at the answer position of the first 4 items, recorded at commit c1c9ab8
HEADS = [(1, 4), (1, 6), (0, 3), (1, 18)]
PINNED = {"zero": [19.536, 20.4958, 21.8095, 20.1546],
          "mean": [19.3165, 20.4957, 21.9828, 19.2895]}


@torch.no_grad()
def test_ablated_logits_equal_recorded_values(tiny):
    model, tok = tiny
    probe = scan.babi_probe(tok, data.make_items(data.generate_stories(20, seed=3), "last"))
    batch = {"input_ids": probe.ids, "attention_mask": probe.mask}
    means = head_means(model, [batch])
    for method, want in PINNED.items():
        with ablate_heads(model, HEADS, method, means):
            logits = model(**batch).logits
        at_answer = logits[torch.arange(4), probe.pos[:4, 0]]
        np.testing.assert_allclose(at_answer.max(-1).values.numpy(), want, rtol=0, atol=2e-3)
