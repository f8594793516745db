from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import transformers as tf

from ih_sweep import eval_attention
from ih_sweep.eval_attention import causal, last_layer_at, read_only_at, selected_queries

V = 61


def _models():
    common = dict(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=3)
    torch.manual_seed(0)
    return {
        "llama": tf.LlamaForCausalLM(tf.LlamaConfig(num_attention_heads=4,
                                                    num_key_value_heads=2, **common)),
        "mistral": tf.MistralForCausalLM(tf.MistralConfig(
            num_attention_heads=8, num_key_value_heads=2, head_dim=8, **common)),
        "mistral_short_window": tf.MistralForCausalLM(tf.MistralConfig(
            num_attention_heads=4, num_key_value_heads=4, sliding_window=5, **common)),
        "qwen2": tf.Qwen2ForCausalLM(tf.Qwen2Config(num_attention_heads=4,
                                                    num_key_value_heads=1, **common)),
        "gemma": tf.GemmaForCausalLM(tf.GemmaConfig(num_attention_heads=4,
                                                    num_key_value_heads=1, head_dim=8,
                                                    **common)),
        "gpt2": tf.GPT2LMHeadModel(tf.GPT2Config(n_embd=32, n_layer=3, n_head=4,
                                                 vocab_size=V)),
    }


MODELS = _models()


def _batch(lengths: list[int], width: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.zeros((len(lengths), width), dtype=torch.long)
    mask = torch.zeros_like(ids)
    read = []
    for b, n in enumerate(lengths):
        ids[b, :n] = torch.randint(3, V, (n,), generator=g)
        mask[b, :n] = 1
        read.append(torch.randint(0, n, (3,), generator=g).tolist())  # duplicates allowed
    return ids, mask, torch.tensor(read)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_read_positions_equal_the_plain_forward(name, monkeypatch):
    """Right-padded rows of different lengths: at the read positions the fast path gives
    the plain sdpa forward's logits (also where it must fall back, a short sliding window)."""
    calls = {"causal": 0, "selected": 0, "layer": 0, "attention": 0}

    def spy(key, fn):
        def wrapped(*args, **kwargs):
            calls[key] += 1
            return fn(*args, **kwargs)
        return wrapped

    monkeypatch.setattr(eval_attention, "causal", spy("causal", causal))
    monkeypatch.setattr(eval_attention, "selected_queries", spy("selected", selected_queries))
    monkeypatch.setattr(eval_attention, "last_layer_at", spy("layer", last_layer_at))
    monkeypatch.setattr(eval_attention, "attention_at_all",
                        spy("attention", eval_attention.attention_at_all))
    model = MODELS[name].eval()
    model.config._attn_implementation = "sdpa"
    ids, mask, read = _batch([40, 33, 9, 40], 40)
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask).logits
        with read_only_at(model, read) as on:
            got = model(input_ids=ids, attention_mask=mask).logits
    assert on
    if name == "mistral_short_window":  # window 5 < 40 tokens: every layer falls back
        assert calls == {"causal": 0, "selected": 0, "layer": 0, "attention": 0}
    elif name in ("llama", "mistral", "qwen2"):  # own attention forward in the first two
        # layers (rotary on the projections' layout), the whole last layer at the read
        # positions
        assert calls == {"causal": 2, "selected": 0, "layer": 1, "attention": 2}
    else:  # two layers blockwise through AttentionInterface, the last one's attention at
        # the read positions
        assert calls == {"causal": 2, "selected": 1, "layer": 0, "attention": 0}
    if hasattr(model, "model"):
        for layer in model.model.layers:
            assert "forward" not in vars(layer) and "forward" not in vars(layer.self_attn)
    assert model.config._attn_implementation == "sdpa"
    idx = read[:, :, None].expand(-1, -1, V)
    torch.testing.assert_close(torch.gather(got, 1, idx), torch.gather(ref, 1, idx),
                               atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("name", ["llama", "mistral", "gemma", "gpt2"])
def test_read_positions_after_a_shared_cached_prefix(name):
    """A prefix common to all rows runs once, its cache copied per row; the rest of the rows
    then attend to it at an offset: same logits at the read positions as the plain forward."""
    model = MODELS[name].eval()
    model.config._attn_implementation = "sdpa"
    ids, mask, _ = _batch([40, 33, 12, 40], 40, seed=4)
    shared = 9
    ids[:, :shared] = ids[0, :shared]
    read = torch.tensor([[39, 20], [32, 9], [11, 11], [9, 30]])
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask).logits
        cache = tf.DynamicCache(config=model.config)
        model(input_ids=ids[:1, :shared], cache=cache, use_cache=True)
        cache.batch_repeat_interleave(len(ids))
        with read_only_at(model, read - shared):
            got = model(input_ids=ids[:, shared:], attention_mask=mask, cache=cache,
                        use_cache=True).logits
    idx = read[:, :, None].expand(-1, -1, V)
    torch.testing.assert_close(torch.gather(got, 1, idx - shared), torch.gather(ref, 1, idx),
                               atol=2e-5, rtol=1e-4)


def test_a_wrapped_last_layer_is_left_to_its_wrapper_and_restored():
    """accelerate replaces module.forward with a hook wrapper (device placement, offload):
    such a layer keeps its wrapper, and a plain instance forward is put back afterwards."""
    model = MODELS["llama"].eval()
    model.config._attn_implementation = "sdpa"
    last = model.model.layers[-1]
    calls = []
    original = last.forward

    def wrapper(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    ids, mask, read = _batch([20, 14], 20)
    last.forward = wrapper
    try:
        with torch.no_grad(), read_only_at(model, read):
            model(input_ids=ids, attention_mask=mask)
        assert vars(last)["forward"] is wrapper
        last._hf_hook = object()
        with torch.no_grad(), read_only_at(model, read):
            model(input_ids=ids, attention_mask=mask)
        assert calls == [1] and vars(last)["forward"] is wrapper
    finally:
        del last.forward
        vars(last).pop("_hf_hook", None)


@pytest.mark.parametrize("kernel", ["flex_attention", "eager"])
def test_other_attention_kernels_are_left_alone(kernel):
    """The shortcuts compute sdpa's result: a model set to another kernel keeps it."""
    model = MODELS["llama"]
    model.config._attn_implementation = kernel
    try:
        with read_only_at(model, torch.zeros((1, 1), dtype=torch.long)) as on:
            assert model.config._attn_implementation == kernel
        assert not on
    finally:
        model.config._attn_implementation = "sdpa"


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_installed_attention_is_plain_outside_read_at(name):
    """Installed once for a whole evaluation, the attention takes its shortcuts only in
    passes that ask for them (read_at, in their own thread): others (decoding steps,
    batches in other threads) get every position exactly as before."""
    model = MODELS[name].eval()
    model.config._attn_implementation = "sdpa"
    ids, mask, read = _batch([30, 21, 30], 30, seed=6)
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask).logits
        with eval_attention.fast_attention(model) as on:
            plain = model(input_ids=ids, attention_mask=mask).logits
            with eval_attention.read_at(read):
                fast = model(input_ids=ids, attention_mask=mask).logits
            again = model(input_ids=ids, attention_mask=mask).logits
    assert on
    real = mask.bool()
    torch.testing.assert_close(plain[real], ref[real], atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(again[real], ref[real], atol=2e-5, rtol=1e-4)
    assert not torch.allclose(fast[real], ref[real], atol=1e-3)  # the shortcut did run


def test_models_without_attention_interface_are_left_alone():
    model = tf.BloomForCausalLM(tf.BloomConfig(vocab_size=V, hidden_size=32, n_layer=2,
                                               n_head=4)).eval()
    ids, mask, read = _batch([12, 7], 12)
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask).logits
        with read_only_at(model, read) as on:
            got = model(input_ids=ids, attention_mask=mask).logits
    assert not on
    torch.testing.assert_close(got, ref)


@pytest.mark.parametrize("length", [7, 32, 33, 101])
def test_block_causal_equals_sdpa_causal(length):
    g = torch.Generator().manual_seed(length)
    q = torch.randn(2, 8, length, 16, generator=g)
    k = torch.randn(2, 2, length, 16, generator=g)
    v = torch.randn(2, 2, length, 16, generator=g)
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    torch.testing.assert_close(causal(q, k, v, None, 4), ref.transpose(1, 2), atol=1e-6,
                               rtol=1e-5)


def test_selected_queries_only_fill_the_read_positions():
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 4, 20, 8, generator=g) for _ in range(3))
    pos = torch.tensor([[19, 4], [0, 0]])
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2)
    got = selected_queries(q, k, v, pos, None, 1)
    for b, row in enumerate(pos.tolist()):
        for t in range(20):
            if t in row:
                torch.testing.assert_close(got[b, t], ref[b, t], atol=1e-6, rtol=1e-5)
            else:
                assert not got[b, t].any()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rotary_on_the_projection_layout_equals_transformers(dtype):
    """rotate() on [B, T, n, D] equals transformers' apply_rotary_pos_emb on [B, n, T, D],
    with the model's own rotary table and with one whose halves differ (then it is
    transformers' function that runs)."""
    from transformers.models.mistral.modeling_mistral import apply_rotary_pos_emb

    model = MODELS["mistral"]
    x = torch.randn(3, 20, 8, 8, dtype=dtype)
    position_ids = torch.arange(20)[None].expand(3, -1)
    standard = model.model.rotary_emb(x, position_ids)
    odd = (torch.randn(3, 20, 8), torch.randn(3, 20, 8))
    for cos, sin in (standard, odd):
        cos, sin = cos.to(dtype), sin.to(dtype)
        ref, _ = apply_rotary_pos_emb(x.transpose(1, 2), x.transpose(1, 2), cos, sin)
        got = eval_attention.rotate(x, cos, sin, apply_rotary_pos_emb)
        assert got.dtype == dtype and got.shape == x.shape
        tol = {} if dtype == torch.float32 else {"atol": 1e-2, "rtol": 1e-2}
        torch.testing.assert_close(got.transpose(1, 2), ref, **tol)
