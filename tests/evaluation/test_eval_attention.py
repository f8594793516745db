from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import transformers as tf

from ih_sweep.evaluation import fastpath as eval_attention
from ih_sweep.evaluation import runner
from ih_sweep.evaluation.decoding import cache_argument
from ih_sweep.evaluation.fastpath import (
    causal,
    gate,
    kernel,
    last_layer_at,
    layers,
    read_only_at,
    selected_queries,
)
from ih_sweep.model import attention as architecture
from ih_sweep.model.attention import attention_implementation

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

    spied_causal = spy("causal", causal)  # called by the kernel and the patched layers
    monkeypatch.setattr(kernel, "causal", spied_causal)
    monkeypatch.setattr(layers, "causal", spied_causal)
    monkeypatch.setattr(kernel, "selected_queries", spy("selected", selected_queries))
    monkeypatch.setattr(layers, "last_layer_at", spy("layer", last_layer_at))
    monkeypatch.setattr(layers, "attention_at_all",
                        spy("attention", layers.attention_at_all))
    model = MODELS[name].eval()
    ids, mask, read = _batch([40, 33, 9, 40], 40)
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask).logits
        with read_only_at(model, read) as fast:
            got = model(input_ids=ids, attention_mask=mask).logits
            assert fast.on and fast.layers == (name in ("llama", "mistral", "qwen2",
                                                        "mistral_short_window"))
    assert not fast  # taken off on exit
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
    ids, mask, _ = _batch([40, 33, 12, 40], 40, seed=4)
    shared = 9
    ids[:, :shared] = ids[0, :shared]
    read = torch.tensor([[39, 20], [32, 9], [11, 11], [9, 30]])
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask).logits
        # the forward's own keyword: `cache` from transformers 5.24, `past_key_values` before
        # (an unknown keyword is swallowed by **kwargs: the pass would run without the cache)
        arg = {cache_argument(model): tf.DynamicCache(config=model.config)}
        model(input_ids=ids[:1, :shared], use_cache=True, **arg)
        next(iter(arg.values())).batch_repeat_interleave(len(ids))
        with read_only_at(model, read - shared):
            got = model(input_ids=ids[:, shared:], attention_mask=mask, use_cache=True,
                        **arg).logits
    idx = read[:, :, None].expand(-1, -1, V)
    torch.testing.assert_close(torch.gather(got, 1, idx - shared), torch.gather(ref, 1, idx),
                               atol=2e-5, rtol=1e-4)


def test_a_wrapped_last_layer_is_left_to_its_wrapper_and_restored():
    """accelerate replaces module.forward with a hook wrapper (device placement, offload):
    such a layer keeps its wrapper, and a plain instance forward is put back afterwards."""
    model = MODELS["llama"].eval()
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
    with attention_implementation(model, kernel):
        with read_only_at(model, torch.zeros((1, 1), dtype=torch.long)) as fast:
            assert model.config._attn_implementation == kernel
            assert not fast.on and not fast.layers
            assert "forward" not in vars(model.model.layers[-1])
    assert model.config._attn_implementation == "sdpa"


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_installed_attention_is_plain_outside_read_at(name):
    """Installed once for a whole evaluation, the attention takes its shortcuts only in
    passes that ask for them (read_at, in their own thread): others (decoding steps,
    batches in other threads) get every position exactly as before."""
    model = MODELS[name].eval()
    ids, mask, read = _batch([30, 21, 30], 30, seed=6)
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask).logits
        with eval_attention.fast_attention(model) as fast:
            assert fast.on
            plain = model(input_ids=ids, attention_mask=mask).logits
            with eval_attention.read_at(read):
                fast = model(input_ids=ids, attention_mask=mask).logits
            again = model(input_ids=ids, attention_mask=mask).logits
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
        with read_only_at(model, read) as fast:
            got = model(input_ids=ids, attention_mask=mask).logits
            assert not fast.on
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


# --------------------------------------------------------------------------- switching helper
def test_attention_implementation_switches_and_restores_also_on_an_exception():
    model = MODELS["llama"]
    kernel.register()
    for name in ("eager", eval_attention.NAME):
        with pytest.raises(KeyError, match="inside"):
            with attention_implementation(model, name):
                assert model.config._attn_implementation == name
                assert model.model.config._attn_implementation == name
                raise KeyError("inside")
        assert model.config._attn_implementation == "sdpa"
    with pytest.raises(ValueError, match="not_a_kernel"):  # transformers' own error
        with attention_implementation(model, "not_a_kernel"):
            pass
    assert model.config._attn_implementation == "sdpa"


def test_attention_implementation_gives_each_sub_config_its_own_back():
    text = tf.LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=64,
                          num_hidden_layers=1, num_attention_heads=4)
    vision = tf.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                 num_attention_heads=4, image_size=28, patch_size=14)
    model = tf.LlavaForConditionalGeneration(tf.LlavaConfig(text_config=text,
                                                            vision_config=vision))
    model.set_attn_implementation({"text_config": "sdpa", "vision_config": "eager"})
    before = {"": "sdpa", "text_config": "sdpa", "vision_config": "eager"}
    assert architecture.implementations(model.config) == before
    with pytest.raises(RuntimeError):
        with attention_implementation(model, "eager"):
            assert model.config.text_config._attn_implementation == "eager"
            raise RuntimeError
    assert architecture.implementations(model.config) == before


def test_a_model_that_cannot_switch_raises_a_clear_error_and_stays_as_it_was():
    model = tf.BloomForCausalLM(tf.BloomConfig(vocab_size=V, hidden_size=32, n_layer=1,
                                               n_head=4))
    assert model.config._attn_implementation == "eager"
    with pytest.raises(architecture.AttentionSwitchError, match="AttentionInterface"):
        with attention_implementation(model, "sdpa"):
            pass
    assert model.config._attn_implementation == "eager"
    with pytest.raises(architecture.AttentionSwitchError, match="set_attn_implementation"):
        with attention_implementation(torch.nn.Linear(2, 2), "eager"):
            pass


# --------------------------------------------------------------------------- version gate
@pytest.mark.parametrize("version, requested, parts, message", [
    ("5.24.0", None, (True, True), None),
    ("5.24.3", None, (True, True), None),
    ("5.0.0", None, (True, True), None),
    ("5.17.0", False, (True, False), None),
    ("5.25.0", None, (False, False), ("INFO", "not a release the tests cover")),
    ("4.57.6", None, (False, False), ("INFO", "not a release the tests cover")),
    ("5.0.0rc1", None, (False, False), ("INFO", "not a release the tests cover")),
    ("5.25.0.dev0", None, (False, False), ("INFO", "not a release the tests cover")),
    ("5.30.0", False, (False, False), ("INFO", "not a release the tests cover")),
    ("5.25.0", True, (True, True), ("WARNING", "which the tests do not cover")),
])
def test_the_fast_path_follows_the_tested_version_range(version, requested, parts, message,
                                                        monkeypatch, caplog):
    """Inside the tested transformers range: the AttentionInterface part on, the layer
    patching too unless fast_layers=false. Outside it: both off (the plain forward) with one
    line naming the version and the range, unless fast_layers=true forces both on with a
    warning. The line comes once per process, not once per evaluation."""
    monkeypatch.setattr(gate, "transformers_version", lambda: version)
    gate.reset()
    model = MODELS["llama"].eval()
    last = model.model.layers[-1]
    caplog.set_level("INFO", logger="ih_sweep.evaluation.fastpath.gate")
    for _ in range(2):
        with eval_attention.fast_attention(model, requested) as fast:
            assert (fast.on, fast.layers) == parts
            assert (model.config._attn_implementation == eval_attention.NAME) == parts[0]
            assert ("forward" in vars(last)) == parts[1]
        assert "forward" not in vars(last) and model.config._attn_implementation == "sdpa"
    lines = [(r.levelname, r.getMessage()) for r in caplog.records]
    if message is None:
        assert lines == []
    else:
        assert len(lines) == 1 and lines[0][0] == message[0] and message[1] in lines[0][1]
        assert version in lines[0][1] and ">=5.0,<5.25" in lines[0][1]


def test_outside_the_tested_range_the_evaluation_runs_the_plain_forward(tiny, monkeypatch,
                                                                         caplog):
    """Off by the gate, an evaluation neither installs the attention nor patches a layer, and
    its outcomes are those of the fast path."""
    from ih_sweep import data
    from ih_sweep.config.schema import EvalConfig
    from ih_sweep.evaluation import evaluator as evaluation

    model, tok = tiny
    items = data.make_items(data.generate_stories(6, seed=3), "all")
    settings = EvalConfig(progress=False, batch_size=4, cpu_workers=1)
    fast = evaluation.evaluate(model, tok, items, settings)
    seen = []
    real = runner.greedy_from_forward

    def spy(model_, *args, **kwargs):
        seen.append((model_.config._attn_implementation,
                     "forward" in vars(model_.model.layers[-1])))
        return real(model_, *args, **kwargs)

    monkeypatch.setattr(runner, "greedy_from_forward", spy)
    monkeypatch.setattr(gate, "transformers_version", lambda: "5.99.0")
    gate.reset()
    caplog.set_level("INFO", logger="ih_sweep.evaluation.fastpath.gate")
    plain = evaluation.evaluate(model, tok, items, settings)
    assert seen and set(seen) == {("sdpa", False)}
    assert [(r.correct, r.continuation) for r in plain] == \
        [(r.correct, r.continuation) for r in fast]
    assert len(caplog.records) == 1 and "5.99.0" in caplog.records[0].getMessage()


def test_the_pyproject_bound_matches_the_tested_range():
    from pathlib import Path

    text = (Path(__file__).resolve().parents[2] / "pyproject.toml").read_text()
    assert f'"transformers{eval_attention.tested_range()}"' in text
    assert gate.version_tested(tf.__version__)  # the tests run on a tested one


# --------------------------------------------------------------------------- allow-lists
def _qkv(batch=2, heads=4, kv=2, length=12, keys=None, dim=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    keys = keys or length
    return (torch.randn(batch, heads, length, dim, generator=g),
            torch.randn(batch, kv, keys, dim, generator=g),
            torch.randn(batch, kv, keys, dim, generator=g))


class _Module(torch.nn.Module):
    """What an attention module shows the AttentionInterface function."""

    def __init__(self, layer_idx=0, layers=3, causal=True):
        super().__init__()
        self.layer_idx = layer_idx
        self.config = tf.LlamaConfig(num_hidden_layers=layers)
        self.is_causal = causal
        self.num_key_value_groups = 2
        self.eval()  # as in the evaluator; "training_mode" below switches it back


def _route(module, q, k, v, read, dropout=0.0, **kwargs):
    """(which path ran, the fast function's output, plain sdpa's output); an output is the
    exception's type and text where the call raises (transformers' sdpa refuses some calls,
    e.g. softcapping). Each call starts from the same random state (dropout)."""
    ran = []
    real = kernel.plain_sdpa

    def spy(*args, **kw):
        ran.append("sdpa")
        return real(*args, **kw)

    def call(fn, **extra):
        torch.manual_seed(0)
        try:
            return fn(module, q, k, v, None, dropout=dropout, scaling=None, **extra,
                      **kwargs)[0]
        except Exception as error:  # noqa: BLE001
            return type(error), str(error)

    kernel.plain_sdpa = spy
    try:
        with eval_attention.read_at(read):
            out = call(eval_attention.attention)
    finally:
        kernel.plain_sdpa = real
    ref = call(real)
    return (ran or ["shortcut"])[0], out, ref


READ = torch.tensor([[3, 11], [0, 5]])
FALLBACKS = {  # each: (module, q, k, v, dropout, kwargs) of a call the shortcut must not take
    "softcap": (_Module(), *_qkv(), 0.0, {"softcap": 30.0}),
    "s_aux": (_Module(), *_qkv(), 0.0, {"s_aux": torch.zeros(4)}),
    "position_bias": (_Module(), *_qkv(), 0.0, {"position_bias": torch.zeros(1, 4, 12, 12)}),
    "unknown_kwarg": (_Module(), *_qkv(), 0.0, {"some_future_flag": 1}),
    "unknown_kwarg_none": (_Module(), *_qkv(), 0.0, {"some_future_flag": None}),
    "output_attentions": (_Module(), *_qkv(), 0.0, {"output_attentions": False}),
    "dropout": (_Module(), *_qkv(), 0.1, {}),
    "short_sliding_window": (_Module(), *_qkv(), 0.0, {"sliding_window": 5}),
    "is_causal_false": (_Module(), *_qkv(), 0.0, {"is_causal": False}),
    "non_causal_module": (_Module(causal=False), *_qkv(), 0.0, {}),
    "key_shorter_than_query": (_Module(), *_qkv(keys=8), 0.0, {}),
    "training_mode": (_Module().train(), *_qkv(), 0.0, {}),
    "mixed_dtypes": (_Module(), *(t.double() if i else t for i, t in enumerate(_qkv())),
                     0.0, {}),
    "heads_not_a_multiple": (_Module(), *_qkv(heads=3), 0.0, {}),
    "read_rows_not_the_batch": (_Module(), *_qkv(batch=3), 0.0, {}),
    "read_position_past_the_query": (_Module(), *_qkv(length=8, keys=12), 0.0, {}),
}


@pytest.mark.parametrize("case", sorted(FALLBACKS))
@pytest.mark.parametrize("last", [False, True])
def test_calls_outside_the_allow_list_go_to_plain_sdpa(case, last):
    """Every call the shortcut does not handle is transformers' sdpa, unchanged: the same
    output, or the same error where sdpa refuses the call."""
    module, q, k, v, dropout, kwargs = FALLBACKS[case]
    module.layer_idx = 2 if last else 0
    ran, out, ref = _route(module, q, k, v, READ, dropout, **kwargs)
    assert ran == "sdpa"
    if isinstance(ref, tuple):
        assert out == ref
    else:
        torch.testing.assert_close(out, ref, atol=0, rtol=0)


@pytest.mark.parametrize("kwargs", [{}, {"position_ids": torch.arange(12)[None],
                                         "use_cache": True, "cache_position": None,
                                         "sliding_window": 12, "is_causal": True,
                                         "softcap": None, "s_aux": None,
                                         "position_bias": None}])
def test_calls_inside_the_allow_list_take_the_shortcut(kwargs):
    """The handled set itself: the shortcut runs and equals sdpa's causal result (the last
    layer at the read positions)."""
    q, k, v = _qkv()
    for layer_idx in (0, 2):
        ran, out, ref = _route(_Module(layer_idx), q, k, v, READ, **kwargs)
        assert ran == "shortcut"
        if layer_idx == 0:
            torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-5)
        else:
            idx = READ[:, :, None, None].expand(-1, -1, 4, 8)
            torch.testing.assert_close(out.gather(1, idx), ref.gather(1, idx), atol=1e-6,
                                       rtol=1e-5)


def _layer_call(model, length=10, batch=2):
    """A last-layer call as LlamaModel makes it: hidden states and keyword arguments."""
    g = torch.Generator().manual_seed(5)
    hidden = torch.randn(batch, length, 32, generator=g)
    position_ids = torch.arange(length)[None].expand(batch, -1)
    embeddings = model.model.rotary_emb(hidden, position_ids)
    return hidden, {"attention_mask": None, "position_embeddings": embeddings,
                    "position_ids": position_ids, "cache": None, "use_cache": False}


LAYER_FALLBACKS = {
    "unknown_kwarg": lambda h, kw: (h, {**kw, "some_future_flag": 1}, ()),
    "output_attentions": lambda h, kw: (h, {**kw, "output_attentions": True}, ()),
    "positional_args": lambda h, kw: (h, {k: v for k, v in kw.items()
                                          if k != "attention_mask"}, (None,)),
    "other_cache_class": lambda h, kw: (h, {**kw, "cache": tf.StaticCache(
        config=MODELS["llama"].config, max_cache_len=16), "use_cache": True}, ()),
    "read_rows_not_the_batch": lambda h, kw: (h[:1], {**kw, "position_embeddings": tuple(
        e[:1] for e in kw["position_embeddings"])}, ()),
    "read_position_past_the_row": lambda h, kw: (h[:, :4], {**kw, "position_embeddings": tuple(
        e[:, :4] for e in kw["position_embeddings"])}, ()),
}


@pytest.mark.parametrize("case", sorted(LAYER_FALLBACKS) + ["training_mode"])
def test_patched_layer_calls_outside_the_allow_list_run_the_layers_own_forward(case):
    """A patched layer forward hands every call it does not handle to the layer's own
    forward: the same result as with the layers unpatched (same AttentionInterface part)."""
    model = MODELS["llama"].eval()
    layer = model.model.layers[-1]
    hidden, kwargs = _layer_call(model)
    args: tuple = ()
    if case != "training_mode":
        hidden, kwargs, args = LAYER_FALLBACKS[case](hidden, kwargs)
    ran = []
    real = layers.last_layer_at
    layers.last_layer_at = lambda *a, **kw: (ran.append(1), real(*a, **kw))[1]
    try:
        with torch.no_grad(), eval_attention.read_only_at(model, torch.tensor(
                [[9, 5], [3, 7]]), layers=True) as fast:
            assert fast.layers and "forward" in vars(layer)
            layer.train(case == "training_mode")
            got = layer(hidden, *args, **kwargs)
            layer.eval()
        if isinstance(kwargs.get("cache"), tf.StaticCache):
            kwargs["cache"] = tf.StaticCache(config=model.config, max_cache_len=16)
        with torch.no_grad(), eval_attention.read_only_at(model, torch.tensor(
                [[9, 5], [3, 7]]), layers=False) as fast:  # the layer's own forward
            assert not fast.layers and "forward" not in vars(layer)
            layer.train(case == "training_mode")
            ref = layer(hidden, *args, **kwargs)
    finally:
        layers.last_layer_at = real
        layer.eval()
    assert ran == []
    torch.testing.assert_close(got, ref, atol=0, rtol=0)


def test_patched_layer_calls_inside_the_allow_list_take_the_shortcut():
    model = MODELS["llama"].eval()
    layer = model.model.layers[-1]
    hidden, kwargs = _layer_call(model)
    read = torch.tensor([[9, 5], [3, 7]])
    with torch.no_grad():
        ref = layer(hidden, **kwargs)
        with eval_attention.read_only_at(model, read, layers=True):
            got = layer(hidden, **kwargs)
    idx = read[:, :, None].expand(-1, -1, 32)
    torch.testing.assert_close(got.gather(1, idx), ref.gather(1, idx), atol=1e-5, rtol=1e-4)
    assert not torch.equal(got, ref)  # zeros off the read positions: the shortcut ran


def test_subclasses_of_the_llama_layers_are_not_patched():
    class Custom(tf.models.llama.modeling_llama.LlamaDecoderLayer):
        pass

    model = MODELS["llama"]
    family = layers.llama_family()
    assert layers.is_plain_llama_layer(model.model.layers[0], family)
    custom = Custom(model.config, 0)
    assert not layers.is_plain_llama_layer(custom, family)
