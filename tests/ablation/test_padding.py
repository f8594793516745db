"""Every batched pass the tool makes gives the same results, in float32, at batch size 1 and
N whatever side the tokenizer pads on: scoring, the mean-ablation reference means, the
evaluation (its teacher-forced pass and its batched ``generate`` fallback) and the scan.
GPT-2 and OPT random-weight models (absolute position embeddings: a shifted position moves
every result) with the tiny tokenizer; prompts of different lengths, so batches pad."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from families import CONFIGS, one_thread, save_model  # noqa: F401 (a fixture)

from ih_sweep import data
from ih_sweep.ablation.means import head_means, reference_batches
from ih_sweep.config.schema import DType, EvalConfig, ModelConfig, QuantizationConfig, ScoringConfig
from ih_sweep.evaluation import evaluator as evaluation
from ih_sweep.evaluation.decoding import greedy_from_forward
from ih_sweep.heads.scoring import score_heads
from ih_sweep.model.forward import ForwardContext
from ih_sweep.model.loading import eager_attention, load_model
from ih_sweep.model.tokens import pad_id
from ih_sweep.pipeline.head_scan import attribution_scan, babi_probe, exact_scan

FAMILIES = ("gpt2", "opt")
SIDES = ("left", "right")
N = 6
ITEMS = data.make_items(data.generate_stories(N, seed=11), "last")
TOL = dict(rtol=0, atol=1e-5)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("padding")
    out = {}
    for name in FAMILIES:
        folder = save_model(CONFIGS[name], root / name)
        out[name] = load_model(ModelConfig(name=name, path=str(folder), dtype=DType.float32),
                               QuantizationConfig(), "cpu")
    return out


@pytest.fixture(params=[(f, s) for f in FAMILIES for s in SIDES], ids=lambda p: "-".join(p))
def model_tok(request, models):
    name, side = request.param
    model, tok = models[name]
    before = tok.padding_side
    tok.padding_side = side
    yield model, tok
    tok.padding_side = before


def test_mean_ablation_reference_means(model_tok):
    model, tok = model_tok
    one = head_means(model, reference_batches(tok, ITEMS, N, model, batch_size=1))
    batched = reference_batches(tok, ITEMS, N, model, batch_size=N)
    assert (batched[0]["attention_mask"] == 0).any()  # the batch does pad
    many = head_means(model, batched)
    for layer in one:
        torch.testing.assert_close(many[layer], one[layer], **TOL)


def test_scoring(model_tok):
    model, tok = model_tok
    settings = ScoringConfig(n_sequences=4, seq_len=10, batch_size=1)
    with eager_attention(model):
        one = score_heads(model, tok, settings)
        many = score_heads(model, tok, ScoringConfig(n_sequences=4, seq_len=10, batch_size=4))
    for col in ("prefix", "copying"):
        np.testing.assert_allclose(many[col], one[col], **TOL)


def test_evaluation_teacher_forced_pass_and_outcomes(model_tok):
    model, tok = model_tok
    rows = evaluation.build_rows(tok, ITEMS, 3)
    pad = pad_id(tok)
    ctx = ForwardContext.of(model)

    def logits(batch):
        record: dict[int, torch.Tensor] = {}
        with ctx.recording(record), torch.no_grad(), \
                evaluation.installed(model):  # logits at the read positions
            greedy_from_forward(model, batch, pad, 3, torch.device("cpu"))
        return record

    one = {}
    for row in rows:
        one.update(logits([row]))
    many = logits(rows)
    for i in one:
        torch.testing.assert_close(many[i], one[i], **TOL)
    got = [evaluation.evaluate(model, tok, ITEMS, EvalConfig(progress=False, batch_size=bs,
                                                             cpu_workers=1))
           for bs in (1, N)]
    assert [r.continuation for r in got[0]] == [r.continuation for r in got[1]]


def test_evaluation_generate_fallback(model_tok):
    """The fallback pads on the left for ``model.generate``, which derives position ids from
    the mask for GPT-2 and OPT: batched tokens equal one prompt at a time."""
    model, tok = model_tok
    prompts = [it.prompt for it in ITEMS]
    cpu = torch.device("cpu")
    one = [evaluation.generate_greedy(model, tok, [p], 3, cpu)[0] for p in prompts]
    many = evaluation.generate_greedy(model, tok, prompts, 3, cpu)
    assert [toks for toks, _, _ in many] == [toks for toks, _, _ in one]
    for (_, gaps, tops), (_, gaps1, tops1) in zip(many, one):  # each step's logit gap, top
        torch.testing.assert_close(torch.tensor([gaps, tops]), torch.tensor([gaps1, tops1]),
                                   **TOL)


def test_scan(model_tok):
    """The scan's probes pad on the right by themselves (the tokenizer's side does not
    enter); the batch's effects equal the items' own, for the exact and the attribution
    scan (last layer: the exact scan reruns only layers from the head's own on)."""
    model, tok = model_tok
    items = ITEMS[:4]
    probe = babi_probe(tok, items)
    assert (probe.mask == 0).any()
    cols = ["d_accuracy", "d_logprob"]
    many = exact_scan(model, {"babi": probe}, [1], heads_per_pass=4)
    singles = [exact_scan(model, {"babi": babi_probe(tok, [it])}, [1], heads_per_pass=4)
               for it in items]
    # one read position per item: the batch's mean effect is the mean of the items' effects
    np.testing.assert_allclose(many[cols].to_numpy(),
                               np.mean([s[cols].to_numpy() for s in singles], 0), **TOL)
    attr = attribution_scan(model, probe, [1])["attr_d_logprob"].to_numpy()
    attr_one = np.mean([attribution_scan(model, babi_probe(tok, [it]), [1])["attr_d_logprob"]
                        .to_numpy() for it in items], 0)
    np.testing.assert_allclose(attr, attr_one, **TOL)
