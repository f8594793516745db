"""The evaluator's per-item measures: margin and near_tie (the greedy steps that decided the
item), gold_logprob and logit_diff (the teacher-forced pass), checked against hand-built
logits and against plain forwards / one-at-a-time ``generate`` of the tiny model."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

from ih_sweep import data
from ih_sweep.ablation.hooks import ablate_heads
from ih_sweep.config.schema import DType, EvalConfig, ModelConfig, Quantization, QuantizationConfig
from ih_sweep.data import Item
from ih_sweep.evaluation import decoding, runner
from ih_sweep.evaluation import evaluator as evaluation
from ih_sweep.evaluation.evaluator import evaluate
from ih_sweep.evaluation.fastpath import check
from ih_sweep.heads.selection import select_heads
from ih_sweep.model.tokens import pad_id

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _unchecked():
    check.reset()


# --------------------------------------------------------------------------- hand-built
def test_stats_read_gap_logprob_and_logit_diff_off_known_logits():
    logits = torch.tensor([[[0.0, 3.0, 1.0, 2.5, -1.0],    # gap 0.5, target 2
                            [4.0, 0.0, 0.0, 0.0, 4.0]]])   # exact tie: gap 0
    targets = torch.tensor([[2, 0]])
    others = torch.tensor([[[3, 4, 2], [0, 0, 0]]])  # pads are the target itself
    got = decoding.read_stats(logits, targets, others)
    assert got.shape == (1, 2, 5)
    argmax, gap, top, logp, diff = got[0, 0].tolist()
    assert (argmax, gap, top) == (1, 0.5, 3.0)
    assert logp == pytest.approx(float(torch.log_softmax(logits[0, 0], -1)[2]), abs=1e-6)
    assert diff == pytest.approx(1.0 - 2.5)  # candidates 3 (2.5) and 4 (-1): the best is 3
    assert got[0, 1, 1] == 0 and got[0, 1, 0] == 0  # ties: argmax's first index, gap 0
    assert got[0, 1, 4] == math.inf  # no other candidate: read as NaN by the evaluator


def test_margin_counts_only_the_steps_up_to_the_deciding_one(tiny):
    """``contains``: 'hallway' alone could still grow ('hallways'); the newline after it
    decides, so the third step's tiny gap does not count."""
    _, tok = tiny
    hall, newline, other = (tok.convert_tokens_to_ids(t) for t in ("hallway", "¶", "w009"))
    settings = EvalConfig(progress=False)
    toks = [hall, newline, other]
    assert decoding.deciding_length(tok, toks, "hallway", settings, tok.eos_token_id) == 2
    item = Item(0, 0, 0, 0, "", "hallway")
    read = decoding.Read([], [], [], -0.5, 1.25)
    got = runner.item_result(item, "hallway ", True, "forward",
                             ([5.0, 1.0, 1e-6], [20.0, 20.0, 20.0]), 2, read, 1e-4)
    assert (got.margin, got.near_tie, got.gold_logprob, got.logit_diff) == (1.0, False, -0.5,
                                                                           1.25)
    tie = runner.item_result(item, "", False, "decode", ([5.0, 0.01], [20.0, 20.0]), 2,
                             read, 1e-3)
    assert tie.margin == 0.01 and tie.near_tie  # 0.01 <= 1e-3 x 20
    # a wrong first word decides 'exact' at once
    assert decoding.deciding_length(tok, [other, hall, newline], "hallway",
                                       EvalConfig(metric="exact"), tok.eos_token_id) == 2


def test_near_tie_tolerance_follows_the_compute_dtype():
    model = torch.nn.Module()
    emb = torch.nn.Embedding(3, 2).to(torch.bfloat16)
    model.get_input_embeddings = lambda: emb
    model.get_output_embeddings = lambda: torch.nn.Linear(2, 3)
    assert evaluation.compute_dtype(model) == torch.bfloat16
    assert evaluation.near_tie_tolerance(model) == 5e-2
    assert evaluation.near_tie([0.9, 0.2], [20.0, 3.0], 5e-2)  # 0.2 <= 0.05 x 3
    assert not evaluation.near_tie([0.9, 0.2], [20.0, 3.0], 1e-4)


@pytest.mark.parametrize("quantization,dtype", [("nf4", torch.bfloat16),
                                                ("int8", torch.bfloat16)])
def test_quantized_layers_set_the_compute_dtype(tmp_path, quantization, dtype):
    """The tiny model quantized by bitsandbytes keeps float32 embeddings, but its layers
    compute in bfloat16 (nf4's compute dtype; int8's 8-bit matmul): the near-tie tolerance
    is bfloat16's, not float32's."""
    pytest.importorskip("bitsandbytes")
    from ih_sweep.model.loading import load_model

    model, _ = load_model(ModelConfig(name="tiny", path="builtin:tiny"),
                          QuantizationConfig(name=Quantization(quantization)), "cpu")
    assert model.get_input_embeddings().weight.dtype == torch.float32
    assert evaluation.compute_dtype(model) == dtype
    assert evaluation.near_tie_tolerance(model) == evaluation.NEAR_TIE_TOLERANCE[dtype]
    plain, _ = load_model(ModelConfig(name="tiny", path="builtin:tiny"), QuantizationConfig(),
                          "cpu")
    assert evaluation.compute_dtype(plain) == torch.float32


# --------------------------------------------------------------------------- references
@torch.no_grad()
def _reference_steps(model, tok, item: Item, max_new_tokens: int = 3):
    """One-at-a-time greedy generate with its scores: (tokens, gaps, tops)."""
    ids = torch.tensor([tok(item.prompt)["input_ids"]])
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                         max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                         pad_token_id=pad_id(tok), temperature=None, top_p=None,
                         top_k=None, output_scores=True, return_dict_in_generate=True)
    toks = decoding.cut_at_eos(out.sequences[0, ids.shape[1]:].tolist(), tok.eos_token_id)
    top2 = [s[0].topk(2).values for s in out.scores]
    return toks, [float(v[0] - v[1]) for v in top2], [float(v[0]) for v in top2]


def _reference_margin(model, tok, item, settings):
    toks, gaps, _ = _reference_steps(model, tok, item, settings.max_new_tokens)
    n = decoding.deciding_length(tok, toks, item.answer, settings, tok.eos_token_id)
    return min(gaps[:n])


@torch.no_grad()
def _reference_gold(model, tok, item: Item, candidates):
    """gold_logprob and logit_diff from a plain forward of prompt + answer."""
    prompt = tok(item.prompt)["input_ids"]
    full = tok(item.prompt + item.answer)["input_ids"]
    assert full[:len(prompt)] == prompt
    answer = full[len(prompt):]
    logp = torch.log_softmax(model(input_ids=torch.tensor([full])).logits[0].float(), -1)
    gold = sum(float(logp[len(prompt) - 1 + j, t]) for j, t in enumerate(answer))
    first = {tok(item.prompt + c)["input_ids"][len(prompt)] for c in candidates} - {answer[0]}
    at = logp[len(prompt) - 1]  # log-softmax differences are logit differences
    diff = float(at[answer[0]] - max(at[t] for t in first)) if first else math.nan
    return gold, diff


@pytest.mark.parametrize("path", ["decode", "generate"])
def test_margins_equal_one_at_a_time_generate_on_every_path(tiny, tiny_prefix, monkeypatch,
                                                             path):
    """Ablated (errors, items left undecided by the pass): every item's margin equals the
    smallest gap of one-at-a-time generate up to its deciding step, whether the pass
    decided it (forward), decoding from its cache did or generate did; in float32 none is
    a near-tie."""
    model, tok = tiny
    items = data.make_items(data.generate_stories(6, seed=90), "all")
    if path == "generate":
        monkeypatch.setattr(runner, "reusable_cache", lambda *a: None)
    settings = EvalConfig(progress=False, batch_size=6)
    with ablate_heads(model, select_heads(tiny_prefix, "high", 16)):
        got = evaluate(model, tok, items, settings)
        want = [_reference_margin(model, tok, it, settings) for it in items]
    assert {r.decided_by for r in got} == {"forward", path}
    for r, w in zip(got, want):
        assert r.margin == pytest.approx(w, abs=1e-4), (r.item, r.decided_by)
    assert not any(r.near_tie for r in got)


def test_gold_logprob_and_logit_diff_equal_a_plain_forward(tiny):
    """Every question of a story read off one shared row, each at its own positions."""
    model, tok = tiny
    items = data.make_items(data.generate_stories(6, seed=91), "all")
    candidates = sorted({it.answer for it in items})
    got = evaluate(model, tok, items, EvalConfig(progress=False))
    assert len(evaluation.build_rows(tok, items, 3)) == 6  # rows shared by the questions
    for r in got:
        gold, diff = _reference_gold(model, tok, r.item, candidates)
        assert r.gold_logprob == pytest.approx(gold, abs=1e-4)
        assert r.logit_diff == pytest.approx(diff, abs=1e-4)
        assert r.gold_logprob < 0 and (r.logit_diff > 0) == r.correct  # unablated: right
    # candidates passed in: only these are compared with
    two = evaluate(model, tok, items, EvalConfig(progress=False),
                   candidates=["hallway", "kitchen"])
    for r in two:
        assert r.logit_diff == pytest.approx(
            _reference_gold(model, tok, r.item, ["hallway", "kitchen"])[1], abs=1e-4)


def test_answers_longer_than_the_budget_are_read_whole(tiny):
    """A 3-token answer with max_new_tokens=1: the row is extended so every answer token's
    log-probability is read; the outcome is still one-token greedy's."""
    model, tok = tiny
    base = data.make_items(data.generate_stories(3, seed=92), "last")
    items = [Item(it.story_index, 0, it.line, 0, it.prompt, "garden w009 office")
             for it in base]
    settings = EvalConfig(progress=False, max_new_tokens=1)
    got = evaluate(model, tok, items, settings)
    for r in got:
        gold, _ = _reference_gold(model, tok, r.item, [])
        assert r.gold_logprob == pytest.approx(gold, abs=1e-4)
        assert len(tok(r.continuation, add_special_tokens=False)["input_ids"]) <= 1
        assert math.isnan(r.logit_diff)  # one candidate: nothing to compare with


def test_logit_diff_skips_candidates_sharing_the_gold_first_token(tiny):
    """'garden' and 'garden w009' start with the same token: neither is the other's rival."""
    model, tok = tiny
    items = data.make_items(data.generate_stories(4, seed=93), "last")
    items = [Item(it.story_index, 0, it.line, 0, it.prompt, "garden") for it in items]
    got = evaluate(model, tok, items, EvalConfig(progress=False),
                   candidates=["garden", "garden w009", "office"])
    for r in got:
        assert r.logit_diff == pytest.approx(
            _reference_gold(model, tok, r.item, ["office"])[1], abs=1e-4)


# --------------------------------------------------------------------------- bfloat16
@pytest.fixture(scope="module")
def tiny_bf16():
    from ih_sweep.model.loading import load_model

    return load_model(ModelConfig(name="tiny", path="builtin:tiny", dtype=DType.bfloat16),
                      QuantizationConfig(), "cpu")


def test_bf16_items_that_flip_with_the_batch_size_are_near_ties(tiny_bf16, tiny_prefix):
    """bfloat16 on CPU, top-16 ablated, 200 stories: batch size 1 and the default 32 round
    differently; every item whose outcome differs between them is a near-tie in both."""
    model, tok = tiny_bf16
    items = data.make_items(data.generate_stories(200, seed=11), "last")
    with ablate_heads(model, select_heads(tiny_prefix, "high", 16)):
        one = evaluate(model, tok, items, EvalConfig(batch_size=1, progress=False))
        default = evaluate(model, tok, items, EvalConfig(progress=False))
    flips = [i for i, (a, b) in enumerate(zip(one, default)) if a.correct != b.correct]
    for i in flips:
        assert one[i].near_tie and default[i].near_tie, (i, one[i].margin, default[i].margin)
    assert sum(r.near_tie for r in one) < len(one)  # not every item


# --------------------------------------------------------------------------- end to end
@pytest.mark.slow
def test_cli_sweep_writes_the_measure_columns(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "2"}
    proc = subprocess.run([sys.executable, "-m", "ih_sweep", "-m", "n_heads=8",
                           "condition=high,none", "debug=fast",
                           f"hydra.sweep.dir={tmp_path}/sweep",
                           f"paths.cache_dir={tmp_path}/cache"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    frames = [pd.read_csv(p) for p in sorted((tmp_path / "sweep").glob("*/results.csv"))]
    assert len(frames) == 2
    for df in frames:
        for column in ("margin", "near_tie", "gold_logprob", "logit_diff"):
            assert column in df.columns
        assert len(df) == 20 and (df["margin"] >= 0).all() and not df["near_tie"].any()
        assert (df["gold_logprob"] <= 0).all() and df["logit_diff"].notna().all()
