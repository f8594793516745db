"""The heads' mean output norms ||z_h W_O^h|| (ih_sweep.heads.output_norms): equal to the
write computed by hand through the model's own o_proj, independent of batching, refused
without tokens or inside an ablation, cached per model and prompts."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from compose_config import compose

from ih_sweep.ablation.hooks import ablate_heads
from ih_sweep.ablation.means import reference_batches
from ih_sweep.ablation.registry import AblationError
from ih_sweep.config.hydra import settings
from ih_sweep.data import generate_stories, make_items
from ih_sweep.heads.output_norms import (
    NormError,
    get_output_norms,
    head_output_norms,
    norms_cache_path,
)

PROMPTS = 6


def _items():
    return make_items(generate_stories(PROMPTS, seed=5), "last")


@torch.no_grad()
def _by_hand(model, batch: dict, layer: int) -> np.ndarray:
    """[heads] mean over real tokens of ||o_proj(z with every other head zeroed)||, minus
    o_proj of zeros (its bias, shared by all heads): the head's write through the model's
    own module, no weight slicing of the code under test."""
    proj = model.model.layers[layer].self_attn.o_proj
    seen = []
    handle = proj.register_forward_pre_hook(lambda module, args: seen.append(args[0].clone()))
    try:
        model(**batch, use_cache=False)
    finally:
        handle.remove()
    z = seen[0].double()  # [batch, pos, heads * head_dim]
    mask = batch["attention_mask"].bool()
    n_heads, dim = model.config.num_attention_heads, model.config.head_dim
    proj64 = torch.nn.Linear(proj.in_features, proj.out_features, bias=proj.bias is not None,
                             dtype=torch.float64)
    proj64.load_state_dict({k: v.double() for k, v in proj.state_dict().items()})
    zero = proj64(torch.zeros(proj.in_features, dtype=torch.float64))
    out = []
    for h in range(n_heads):
        only = torch.zeros_like(z)
        only[..., h * dim:(h + 1) * dim] = z[..., h * dim:(h + 1) * dim]
        write = proj64(only) - zero  # [batch, pos, d_model]
        out.append(float(write.norm(dim=-1)[mask].mean()))
    return np.array(out)


def test_norms_equal_the_write_computed_by_hand(tiny):
    model, tok = tiny
    batches = reference_batches(tok, _items(), PROMPTS, model, batch_size=PROMPTS)
    assert batches[0]["attention_mask"].sum(1).unique().numel() > 1  # padded rows
    norms = head_output_norms(model, batches)
    assert norms.shape == (2, 32) and np.isfinite(norms).all() and (norms > 0).all()
    for layer in range(2):
        np.testing.assert_allclose(norms[layer], _by_hand(model, batches[0], layer),
                                   rtol=0, atol=1e-5)


def test_norms_do_not_depend_on_batching(tiny):
    model, tok = tiny
    whole = head_output_norms(model, reference_batches(tok, _items(), PROMPTS, model,
                                                       batch_size=PROMPTS))
    ones = head_output_norms(model, reference_batches(tok, _items(), PROMPTS, model,
                                                      batch_size=1))
    np.testing.assert_allclose(whole, ones, rtol=0, atol=1e-5)


def test_norms_need_a_token_and_the_unablated_model(tiny):
    model, tok = tiny
    batch = reference_batches(tok, _items(), 2, model)[0]
    empty = {"input_ids": batch["input_ids"], "attention_mask": torch.zeros_like(
        batch["attention_mask"])}
    with pytest.raises(NormError) as err:
        head_output_norms(model, [empty])
    assert "\n" not in str(err.value) and "ablation.n_reference" in str(err.value)
    with ablate_heads(model, [(1, 4)]), pytest.raises(AblationError):
        head_output_norms(model, [batch])


def test_norms_are_cached_per_model_and_prompts(tmp_path, tiny, caplog):
    caplog.set_level(logging.INFO)
    config = settings(compose("debug=fast", "ablation.n_reference=4",
                              f"paths.cache_dir={tmp_path}"))
    items = _items()
    loads = []

    def model_getter():
        loads.append(1)
        return tiny

    first = get_output_norms(config, model_getter, items, (2, 32))
    again = get_output_norms(config, model_getter, items, (2, 32))
    assert len(loads) == 1 and "reusing output norms" in caplog.text
    np.testing.assert_array_equal(first, again)  # read back from the file: the same floats
    model, tok = tiny
    np.testing.assert_allclose(first, head_output_norms(
        model, reference_batches(tok, items, 4, model)), rtol=0, atol=1e-12)
    other = settings(compose("debug=fast", "ablation.n_reference=5",
                             f"paths.cache_dir={tmp_path}"))
    assert norms_cache_path(other) != norms_cache_path(config)
    assert norms_cache_path(settings(compose("debug=fast", "ablation.n_reference=4",
                                             "data.seed=1", f"paths.cache_dir={tmp_path}"))) \
        != norms_cache_path(config)
    assert not np.array_equal(get_output_norms(other, model_getter, items, (2, 32)), first)
    assert len(loads) == 2
