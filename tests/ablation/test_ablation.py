from __future__ import annotations

import pytest
import torch
import transformers as tf

from ih_sweep.ablation.hooks import AblationError, ablate_heads
from ih_sweep.ablation.means import head_means
from ih_sweep.ablation.registry import get_ablation
from ih_sweep.model.architecture import UnsupportedArchitecture, head_sites, hook_z
from ih_sweep.testing import zero_attention_probs

V = 97


def _families():
    common = dict(vocab_size=V)
    return {
        "llama": tf.LlamaForCausalLM(tf.LlamaConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, **common)),
        "mistral": tf.MistralForCausalLM(tf.MistralConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=8,
            num_key_value_heads=2, head_dim=8, **common)),  # head_dim * heads != hidden
        "qwen2": tf.Qwen2ForCausalLM(tf.Qwen2Config(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, **common)),
        "gemma": tf.GemmaForCausalLM(tf.GemmaConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=1, head_dim=8, **common)),
        "gpt2": tf.GPT2LMHeadModel(tf.GPT2Config(n_embd=32, n_layer=2, n_head=4, **common)),
        "gpt_neox": tf.GPTNeoXForCausalLM(tf.GPTNeoXConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            **common)),
        "opt": tf.OPTForCausalLM(tf.OPTConfig(
            hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4,
            word_embed_proj_dim=32, **common)),
    }


FAMILIES = _families()
IDS = torch.randint(3, V, (2, 11), generator=torch.Generator().manual_seed(0))


def _logits(model):
    with torch.no_grad():
        return model(input_ids=IDS).logits


def _surgery_logits(model, layer, head):
    """Reference: zero the head's columns of the output projection weight itself."""
    sites = head_sites(model)
    proj = sites.out_proj[layer]
    sl = sites.head_slice(head)
    saved = proj.weight.data.clone()
    if type(proj).__name__ == "Conv1D":
        proj.weight.data[sl, :] = 0
    else:
        proj.weight.data[:, sl] = 0
    try:
        return _logits(model)
    finally:
        proj.weight.data.copy_(saved)


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_hook_equals_weight_surgery_and_hooks_come_off(name):
    model = FAMILIES[name].eval()
    sites = head_sites(model)
    assert sites.n_layers == 2
    base = _logits(model)
    layer, head = 1, sites.heads_per_layer - 1
    with ablate_heads(model, [(layer, head)]):
        ablated = _logits(model)
    assert not torch.allclose(ablated, base)
    assert torch.allclose(ablated, _surgery_logits(model, layer, head), atol=1e-5)
    assert torch.equal(_logits(model), base)


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_hook_z_sees_and_replaces_the_projection_input(name):
    model = FAMILIES[name].eval()
    sites = head_sites(model)
    base = _logits(model)
    seen = []
    with hook_z(model, lambda layer, z: seen.append((layer, tuple(z.shape)))) as got:
        assert torch.equal(_logits(model), base)  # returning None changes nothing
    assert got.out_proj == sites.out_proj
    width = sites.heads_per_layer * sites.head_dim
    assert seen == [(0, (*IDS.shape, width)), (1, (*IDS.shape, width))]
    # a replacement goes into the projection: zeroing all of layer 1's z is ablating every head
    seen.clear()
    with hook_z(sites, lambda layer, z: seen.append(layer) or torch.zeros_like(z), [1]):
        replaced = _logits(model)
    assert seen == [1]
    with ablate_heads(model, [(1, h) for h in range(sites.heads_per_layer)]):
        assert torch.equal(replaced, _logits(model))
    assert not torch.equal(replaced, base)
    assert torch.equal(_logits(model), base)
    assert all(not p._forward_pre_hooks for p in sites.out_proj)


def test_hook_z_removes_its_hooks_on_errors():
    model = FAMILIES["llama"].eval()
    sites = head_sites(model)

    def bad(layer, z):
        raise ValueError("bad z")

    with pytest.raises(RuntimeError, match="boom"):
        with hook_z(model, lambda layer, z: z * 0):
            raise RuntimeError("boom")
    with pytest.raises(ValueError, match="bad z"):
        with hook_z(model, bad):
            _logits(model)
    with pytest.raises(IndexError, match="layer 2 is outside the model's 2 layers"):
        with hook_z(model, lambda layer, z: None, [0, 2]):
            pass
    assert all(not p._forward_pre_hooks for p in sites.out_proj)


def test_query_heads_under_grouped_query_attention():
    model = FAMILIES["mistral"].eval()
    sites = head_sites(model)
    assert (sites.heads_per_layer, sites.head_dim) == (8, 8)  # query heads, head_dim from config
    assert sites.w_o(0).shape == (8, 8, 32)
    base = _logits(model)
    # two query heads that share a key/value head have distinct effects
    with ablate_heads(model, [(0, 0)]):
        a = _logits(model)
    with ablate_heads(model, [(0, 1)]):
        b = _logits(model)
    assert not torch.allclose(a, b) and not torch.allclose(a, base)


def test_hooks_removed_after_exception():
    model = FAMILIES["llama"].eval()
    base = _logits(model)
    with pytest.raises(RuntimeError, match="boom"):
        with ablate_heads(model, [(0, 1), (1, 2)]):
            assert not torch.allclose(_logits(model), base)
            raise RuntimeError("boom")
    assert torch.equal(_logits(model), base)
    assert all(not p._forward_pre_hooks for p in head_sites(model).out_proj)


@pytest.mark.parametrize("name", ["llama", "mistral", "qwen2"])
def test_second_mechanism_zeroing_attention_probabilities_agrees(name):
    model = FAMILIES[name].eval()
    model.config._attn_implementation = "eager"
    heads = [(0, 1), (1, 0), (1, 3)]
    base = _logits(model)
    with ablate_heads(model, heads):
        hooked = _logits(model)
    with zero_attention_probs(model, heads):
        probs = _logits(model)
    assert model.config._attn_implementation == "eager"
    assert not torch.allclose(hooked, base)
    assert torch.allclose(hooked, probs, atol=1e-5)
    # no heads: the recomputed attention is the model's own; leaving restores the model
    with zero_attention_probs(model, []):
        assert torch.allclose(_logits(model), base, atol=1e-6)
    assert torch.equal(_logits(model), base)


def test_mean_ablation_uses_reference_means():
    model = FAMILIES["llama"].eval()
    batch = {"input_ids": IDS, "attention_mask": torch.ones_like(IDS)}
    means = head_means(model, [batch])
    sites = head_sites(model)
    captured = {}
    h = sites.out_proj[1].register_forward_pre_hook(
        lambda m, a: captured.__setitem__("x", a[0].detach().clone()))
    try:
        _logits(model)
    finally:
        h.remove()
    assert torch.allclose(means[1], captured["x"].reshape(-1, captured["x"].shape[-1]).mean(0),
                          atol=1e-6)
    zeros = {k: torch.zeros_like(v) for k, v in means.items()}
    with ablate_heads(model, [(1, 2)], "zero"):
        z = _logits(model)
    with ablate_heads(model, [(1, 2)], "mean", zeros):
        m0 = _logits(model)
    with ablate_heads(model, [(1, 2)], "mean", means):
        m = _logits(model)
    with ablate_heads(model, [(1, 2)], get_ablation("mean"), means):  # the method itself
        assert torch.equal(_logits(model), m)
    assert torch.allclose(z, m0) and not torch.allclose(z, m)


def test_errors():
    model = FAMILIES["llama"].eval()
    with pytest.raises(AblationError, match="outside the model's 2 layers x 4 heads"):
        with ablate_heads(model, [(2, 0)]):
            pass
    with pytest.raises(AblationError, match="allowed values: zero, mean, position_mean, "
                                            "resample"):
        with ablate_heads(model, [(0, 0)], "shuffle"):
            pass
    with pytest.raises(AblationError, match="needs head means"):
        with ablate_heads(model, [(0, 0)], "mean"):
            pass
    with pytest.raises(UnsupportedArchitecture, match="supported families"):
        head_sites(torch.nn.Sequential(torch.nn.Linear(2, 2)))

    class Odd(torch.nn.Module):
        config = tf.LlamaConfig(hidden_size=8, num_hidden_layers=1, num_attention_heads=2)

        def __init__(self):
            super().__init__()
            self.blocks = torch.nn.ModuleList([torch.nn.Module()])
            self.blocks[0].self_attn = torch.nn.Module()

    with pytest.raises(UnsupportedArchitecture, match="no attention output projection"):
        head_sites(Odd())
