"""Every family the README lists runs end to end with the default config (sdpa asked for,
float32): a 2-layer random-weight model of each, saved with ``save_pretrained`` beside the
tiny tokenizer (vocab 296) and loaded through ``load_model``; scored (prefix and copying),
heads selected, ablated, evaluated, and the evaluator's outcomes equal one-at-a-time
``generate`` under the same ablation. OPT-350m's layout (word_embed_proj_dim != hidden_size,
post-block LayerNorms, no final norm) and Gemma-2 (logit softcapping, no sdpa) get their
copying score checked against a hand-written reference, and structures the tool cannot
handle are refused in one line before any weights load."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers as tf
from families import CONFIGS, ROPE, V, one_thread, save_model  # noqa: F401 (a fixture)

from ih_sweep import data
from ih_sweep.ablation.hooks import ablate_heads
from ih_sweep.config.schema import DType, EvalConfig, ModelConfig, QuantizationConfig, ScoringConfig
from ih_sweep.evaluation import evaluator as evaluation
from ih_sweep.heads.scoring import copying_from_logits, random_sequences, score_heads, score_matrix
from ih_sweep.heads.selection import select_heads
from ih_sweep.model.architecture import UnsupportedArchitecture, head_sites
from ih_sweep.model.loading import ASSET_DIR, check_architecture, eager_attention, load_model
from ih_sweep.testing import generate_one_at_a_time


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    return {name: save_model(cfg, root / name) for name, cfg in CONFIGS.items()}


def _load(folder: Path):
    # the schema's defaults: attn_implementation=sdpa (Gemma-2 falls back to eager)
    return load_model(ModelConfig(name=folder.name, path=str(folder), dtype=DType.float32),
                      QuantizationConfig(), "cpu")


SETTINGS = ScoringConfig(n_sequences=2, seq_len=12, batch_size=2)
ITEMS = data.make_items(data.generate_stories(2, seed=5), "last")


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_family_runs_end_to_end_with_the_default_config(folders, name, caplog):
    caplog.set_level(logging.INFO, logger="ih_sweep.model.loading")
    model, tok = _load(folders[name])
    if name == "gemma2":
        assert model.config._attn_implementation == "eager"
        assert "model.attn_implementation=sdpa: Gemma2ForCausalLM its attention logit " \
               "softcapping needs another; using eager" in caplog.text
    sites = head_sites(model)
    # the sites' readout is the model's own: final norm where applied, project_out, softcap
    ids = torch.tensor([tok(ITEMS[0].prompt)["input_ids"][:20]])
    last = {}
    handle = sites.layers[-1].register_forward_hook(
        lambda m, a, out: last.__setitem__("h", out[0] if isinstance(out, tuple) else out))
    try:
        with torch.no_grad():
            logits = model(input_ids=ids).logits
            torch.testing.assert_close(sites.logits(last["h"]), logits, atol=1e-5, rtol=0)
    finally:
        handle.remove()
    with eager_attention(model):
        scores = score_heads(model, tok, SETTINGS, name)
    assert len(scores) == 2 * sites.heads_per_layer
    values = scores[["prefix", "copying", "combined"]].to_numpy()
    assert np.isfinite(values).all() and (values[:, :2] >= 0).all() and \
        (values[:, :2] <= 1).all()
    assert (scores["copying"] > 0).any()
    for rank_by in ("prefix", "combined"):
        heads = select_heads(score_matrix(scores, rank_by), "high", 3, 0)
        assert len(heads) == 3
    settings = EvalConfig(progress=False, batch_size=2, cpu_workers=1)
    with ablate_heads(model, heads):
        got = evaluation.evaluate(model, tok, ITEMS, settings)
        ref = [generate_one_at_a_time(model, tok, it, settings.max_new_tokens) for it in ITEMS]
    assert [r.continuation for r in got] == ref
    assert [r.correct for r in got] == [evaluation.is_correct(c, it.answer, "contains")
                                       for c, it in zip(ref, ITEMS)]


def _reference_copying(model, tokens: torch.Tensor, head_path) -> np.ndarray:
    """[layers, heads] copying scores by brute force: each head's z through its W_O columns
    and ``head_path(layer, x)`` (written out by hand per family), full-vocabulary logits."""
    sites = head_sites(model)
    hd = sites.head_dim
    store = {}
    from ih_sweep.model.architecture import hook_z

    with torch.no_grad(), hook_z(sites, lambda i, z: store.__setitem__(i, z)):
        out = model(input_ids=tokens, output_attentions=True)
    scores = np.zeros((sites.n_layers, sites.heads_per_layer))
    with torch.no_grad():
        for layer in range(sites.n_layers):
            w = sites.out_proj[layer].weight  # nn.Linear: [hidden, heads * head_dim]
            for head in range(sites.heads_per_layer):
                sl = slice(head * hd, (head + 1) * hd)
                logits = head_path(layer, store[layer][..., sl] @ w[:, sl].T)[:, 1:]
                attn = out.attentions[layer][:, head, 1:]
                att_tok = torch.gather(tokens, 1, attn.argmax(-1))
                vals = [copying_from_logits(lg.mean(-1), lg.gather(1, a[:, None])[:, 0],
                                            lg[:, torch.unique(t[1:])])
                        for lg, a, t in zip(logits, att_tok, tokens)]
                scores[layer, head] = torch.cat(vals).mean().item()
    return scores


def _opt350m_path(model):
    dec = model.model.decoder

    def path(layer, x):  # post-block LayerNorms of this and every later layer, project_out
        for later in dec.layers[layer:]:
            x = later.final_layer_norm(later.self_attn_layer_norm(x))
        assert dec.final_layer_norm is None
        return model.lm_head(dec.project_out(x))
    return path


def _gemma2_path(model):
    cap = model.config.final_logit_softcapping

    def path(layer, x):  # the layer's norm on the attention output, final norm, softcap
        x = model.model.norm(model.model.layers[layer].post_attention_layernorm(x))
        return torch.tanh(model.lm_head(x) / cap) * cap
    return path


@pytest.mark.parametrize("name,path", [("opt350m", _opt350m_path), ("gemma2", _gemma2_path)])
def test_copying_follows_the_models_own_path_to_the_logits(folders, name, path):
    model, tok = _load(folders[name])
    settings = ScoringConfig(n_sequences=3, seq_len=12, batch_size=2, seed=3)
    with eager_attention(model):
        got = score_matrix(score_heads(model, tok, settings), "copying")
        cands = [i for i in range(V) if i not in tok.all_special_ids]
        tokens, _ = random_sequences(3, 12, 1, cands, tok.bos_token_id, settings.seed + 1)
        ref = _reference_copying(model, tokens, path(model))
    assert (ref > 0).any()
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-5)


def _refused(config, tmp_path, match: str, edit=None):
    folder = tmp_path / "m"
    if edit is None:
        config.save_pretrained(folder)
    else:  # a structure no config gives: built, edited, saved
        model = tf.AutoModelForCausalLM.from_config(config)
        edit(model)
        with pytest.raises(UnsupportedArchitecture, match=match):
            head_sites(model)
        return
    with pytest.raises(UnsupportedArchitecture, match=match):
        check_architecture(tf.AutoConfig.from_pretrained(folder))
    # load_model refuses before reading any weights: the folder has none, and the error is
    # the structure's, not a missing-weights one
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(ASSET_DIR / name, folder / name)
    with pytest.raises(UnsupportedArchitecture, match=match):
        load_model(ModelConfig(name="x", path=str(folder), dtype=DType.float32),
                   QuantizationConfig(), "cpu")


def test_unhandled_structures_are_refused_in_one_line(tmp_path):
    # Cohere multiplies its logits by logit_scale, which the direct path would leave out
    _refused(tf.CohereConfig(**{**ROPE, "logit_scale": 0.0625}), tmp_path,
             r"^CohereForCausalLM: config.logit_scale=0.0625 rescales the logits")

    def extra_norm(model):  # a norm of unknown place in a layer
        model.model.layers[0].extra_norm = tf.models.llama.modeling_llama.LlamaRMSNorm(32)
    _refused(tf.LlamaConfig(**ROPE), tmp_path, r"^LlamaForCausalLM: layer 0 has a norm "
             r"'extra_norm' \(LlamaRMSNorm\) the tool cannot place", extra_norm)

    def extra_out(model):  # a projection after the layers the tool does not know
        model.model.head_adapter = torch.nn.Linear(32, 32)
    _refused(tf.LlamaConfig(**ROPE), tmp_path, r"holds 'head_adapter' \(Linear\), which "
             r"the tool cannot place", extra_out)
