"""The evaluator's store of unablated layers (ih_sweep/evaluation/fastpath/reuse.py): what a
later evaluation of the same items takes from it is exactly what it would have computed."""

from __future__ import annotations

import logging

import pytest
import torch

from ih_sweep import data
from ih_sweep.ablation.hooks import ablate_heads
from ih_sweep.config.schema import EvalConfig
from ih_sweep.evaluation.evaluator import evaluate
from ih_sweep.evaluation.fastpath import reuse

HIGH = [(1, h) for h in (18, 20, 3, 7, 9, 11)]  # layer 1: layer 0 stays the model's own


@pytest.fixture
def items():
    return data.make_items(data.generate_stories(48, seed=31), "last")


@pytest.fixture(autouse=True)
def _fresh_stores():
    reuse.reset()
    yield
    reuse.reset()


def _outcomes(model, tok, items, heads=(), store="auto"):
    with ablate_heads(model, list(heads)):
        got = evaluate(model, tok, items, EvalConfig(progress=False, batch_size=8,
                                                     layer_store_mb=store))
    return [(r.correct, r.continuation, r.decided_by, r.margin, r.near_tie, r.gold_logprob,
             r.logit_diff) for r in got]


def _store(model) -> reuse.LayerStore:
    return reuse._STORES[model]


def test_reused_layers_give_bit_identical_results(tiny, items):
    model, tok = tiny
    plain_none = _outcomes(model, tok, items, store=0)
    plain_high = _outcomes(model, tok, items, HIGH, store=0)
    assert model not in reuse._STORES  # 0: no store at all
    assert _outcomes(model, tok, items) == plain_none  # stores layer 0 of each batch
    store = _store(model)
    assert store.hits == 0 and len(store) == 6 and store.bytes > 0  # 48 items, 8 a batch
    assert _outcomes(model, tok, items, HIGH) == plain_high  # takes them
    assert store.hits == 6 and not store.off
    assert _outcomes(model, tok, items) == plain_none
    assert store.hits == 12
    assert _outcomes(model, tok, items, store=0) == plain_none  # 0 empties the store
    assert len(store) == 0 and store.bytes == 0 and store.hits == 12


def test_a_layer_an_ablation_touches_is_computed(tiny, items):
    model, tok = tiny
    plain = _outcomes(model, tok, items, [(0, 3), (1, 18)], store=0)
    _outcomes(model, tok, items)
    store = _store(model)
    assert _outcomes(model, tok, items, [(0, 3), (1, 18)]) == plain
    assert store.hits == 0  # layer 0 is hooked: nothing reused


def test_any_hook_on_a_layer_or_the_embedding_stops_reuse(tiny):
    model, _ = tiny
    layers = list(model.model.layers)
    assert reuse.untouched_layers(model, layers) == 2
    handle = layers[1].mlp.register_forward_pre_hook(lambda m, a: None)
    try:
        assert reuse.untouched_layers(model, layers) == 1
    finally:
        handle.remove()
    handle = model.get_input_embeddings().register_forward_hook(lambda m, a, o: None)
    try:
        assert reuse.untouched_layers(model, layers) == 0
    finally:
        handle.remove()
    handle = torch.nn.modules.module.register_module_forward_hook(lambda m, a, o: None)
    try:
        assert reuse.untouched_layers(model, layers) == 0
    finally:
        handle.remove()


def test_transformers_output_capturing_hooks_only_record(tiny):
    """transformers (5.x) hooks a model's layers for good the first time a call asks for
    hidden states; those hooks change nothing while no call collects through them."""
    model, tok = tiny
    model(input_ids=torch.tensor([[1, 5, 6, 7]]), output_hidden_states=True)
    layers = list(model.model.layers)
    assert reuse.untouched_layers(model, layers) == 2
    try:
        from transformers.utils.output_capturing import _active_collector
    except ImportError:
        pytest.skip("this transformers captures outputs without hooks")
    token = _active_collector.set({"hidden_states": []})  # a call collecting hidden states
    try:
        assert reuse.untouched_layers(model, layers) == 0
    finally:
        _active_collector.reset(token)


@pytest.mark.parametrize("how", ["in_place", "through_data", "new_parameter", "epsilon"])
def test_a_changed_weight_or_setting_is_not_served_stale(tiny, items, how):
    """The key holds the weights by content (and the modules' plain settings), so no change
    to layer 0 is served from the store, whether it bumps a version counter or not."""
    model, tok = tiny
    _outcomes(model, tok, items)  # layer 0 of every batch stored
    mlp, norm = model.model.layers[0].mlp, model.model.layers[0].input_layernorm
    weight, eps = mlp.down_proj.weight, norm.variance_epsilon
    kept = weight.detach().clone()
    try:
        with torch.no_grad():
            if how == "in_place":
                weight.mul_(0.5)
            elif how == "through_data":
                weight.data.mul_(0.5)  # no version bump (how PEFT merges adapters)
            elif how == "new_parameter":
                mlp.down_proj.weight = torch.nn.Parameter(kept * 0.5, requires_grad=False)
            else:
                norm.variance_epsilon = 0.5
        changed = _outcomes(model, tok, items, HIGH, store=0)
        assert _outcomes(model, tok, items, HIGH) == changed
        assert _store(model).hits == 0
    finally:
        mlp.down_proj.weight = weight
        norm.variance_epsilon = eps
        with torch.no_grad():
            weight.copy_(kept)


def test_a_forward_set_on_a_module_or_a_rotary_hook_stops_reuse(tiny):
    model, _ = tiny
    layers = list(model.model.layers)
    mlp = layers[0].mlp
    wrapped = mlp.forward
    mlp.forward = lambda *args, **kwargs: wrapped(*args, **kwargs)  # what a wrapper does
    try:
        assert reuse.untouched_layers(model, layers) == 0
    finally:
        del mlp.forward
    handle = model.model.rotary_emb.register_forward_hook(lambda m, a, o: None)
    try:
        assert reuse.untouched_layers(model, layers) == 0
    finally:
        handle.remove()
    assert reuse.untouched_layers(model, layers) == 2


def test_the_class_forward_set_back_on_a_layer_keeps_reuse(tiny, items):
    """transformers 5.0 records hidden states and attentions by wrapping the layers' and
    attention modules' forwards for the call, then sets ``module.forward = original`` (the
    bound class forward it had read): that attribute computes what the class does, so the
    layers stay reusable (the store was off for good after any such call before)."""
    model, tok = tiny
    modules = [m for layer in model.model.layers for m in (layer, layer.self_attn)]
    plain = _outcomes(model, tok, items, HIGH, store=0)
    for module in modules:
        module.forward = module.forward
    try:
        assert reuse.untouched_layers(model, list(model.model.layers)) == 2
        _outcomes(model, tok, items)
        assert _outcomes(model, tok, items, HIGH) == plain
        assert _store(model).hits == 6
        assert all("forward" in vars(m) and getattr(vars(m)["forward"], "__self__", None) is m
                   for m in modules)  # what was there is put back
    finally:
        for module in modules:
            vars(module).pop("forward", None)


def test_a_hook_that_edits_its_input_in_place_does_not_reach_the_store(tiny, items):
    """A later layer's hook may change the reused output in place: the store keeps and
    hands out copies."""
    model, tok = tiny

    def steer(module, args):
        args[0].add_(0.25)

    handle = model.model.layers[1].register_forward_pre_hook(steer)
    try:
        plain = _outcomes(model, tok, items, HIGH, store=0)
        assert _outcomes(model, tok, items, HIGH) == plain
        assert _outcomes(model, tok, items, HIGH) == plain
        assert _store(model).hits == 6
    finally:
        handle.remove()


def test_the_first_reuse_is_checked_and_a_mismatch_turns_the_store_off(tiny, items,
                                                                        caplog):
    model, tok = tiny
    plain = _outcomes(model, tok, items, HIGH, store=0)
    _outcomes(model, tok, items)
    store = _store(model)
    for tensor in store._entries.values():  # what a wrong reuse would serve
        tensor.add_(1.0)
    with caplog.at_level(logging.WARNING, logger="ih_sweep.evaluation.fastpath.reuse"):
        assert _outcomes(model, tok, items, HIGH) == plain
    assert store.off and len(store) == 0
    assert sum("no longer reuses unablated layers" in r.message for r in caplog.records) == 1
    assert reuse.store_for(model, 1 << 20) is None  # off for the rest of the process


def test_budget_keeps_the_most_recent_outputs():
    store = reuse.LayerStore(budget=3 * 400)
    for i in range(5):
        store.put(("k", i), torch.zeros(100))  # 400 bytes each
    assert len(store) == 3 and store.bytes == 1200
    assert store.get(("k", 0)) is None and store.get(("k", 4)) is not None
    store.put(("big",), torch.zeros(1000))  # larger than the whole budget: not kept
    assert store.get(("big",)) is None and len(store) == 3
    store.resize(400)
    assert len(store) == 1 and store.get(("k", 4)) is not None  # the most recently used


def test_budget_setting():
    cpu, gpu = torch.device("cpu"), torch.device("cuda", 0)
    assert reuse.budget_bytes("auto", cpu) == reuse.AUTO_CPU_MB << 20
    assert reuse.budget_bytes("auto", gpu) == 0
    assert reuse.budget_bytes(3, gpu) == 3 << 20
    assert reuse.budget_bytes(0, cpu) == 0


def test_pass_key_names_the_threads_and_the_prefix():
    host = torch.arange(12).view(2, 6)
    key = reuse.pass_key(host, 0, 0, "cpu")
    assert key == reuse.pass_key(host.clone(), 0, 0, "cpu")
    assert key != reuse.pass_key(host, 2, 1, "cpu")
    changed = host.clone()
    changed[1, 5] = 99
    assert key != reuse.pass_key(changed, 0, 0, "cpu")
    threads = torch.get_num_threads()
    torch.set_num_threads(1 if threads > 1 else 2)
    try:
        assert key != reuse.pass_key(host, 0, 0, "cpu")
    finally:
        torch.set_num_threads(threads)


def test_pass_key_names_the_attention_backends():
    from torch.nn.attention import SDPBackend, sdpa_kernel

    host = torch.arange(12).view(2, 6)
    key = reuse.pass_key(host, 0, 0, "cpu")
    with sdpa_kernel([SDPBackend.MATH]):
        assert reuse.pass_key(host, 0, 0, "cpu") != key
    assert reuse.pass_key(host, 0, 0, "cpu") == key


def test_a_forward_someone_set_on_a_layer_is_not_hidden_by_the_patch(tiny, items):
    """A wrapper set on a layer's forward before the evaluation (steering) keeps the layer
    out of the store: its outputs are the wrapper's, which no key names."""
    model, tok = tiny
    layer = model.model.layers[0]
    own = layer.forward

    def steered(*args, **kwargs):
        return own(*args, **kwargs) + 0.1

    layer.forward = steered
    try:
        plain = _outcomes(model, tok, items, HIGH, store=0)
        assert _outcomes(model, tok, items, HIGH) == plain
        assert model not in reuse._STORES or len(_store(model)) == 0
    finally:
        del layer.forward
    assert _outcomes(model, tok, items, HIGH, store=0) != plain  # the wrapper did change it
    assert _outcomes(model, tok, items, HIGH) == _outcomes(model, tok, items, HIGH, store=0)


def test_a_nested_evaluation_takes_fresh_fingerprints(tiny, items):
    from ih_sweep.evaluation.fastpath.install import installed
    from ih_sweep.model.forward import ForwardContext

    model, tok = tiny
    ctx = ForwardContext.of(model)
    with installed(model, None, ctx, 1 << 30):
        outer = ctx.layer_store
        outer.fingerprint(0)
        with installed(model, None, ctx, 1 << 30):
            inner = ctx.layer_store
            assert inner is not outer and inner.store is outer.store and not inner._prints
        assert ctx.layer_store is outer
    assert ctx.layer_store is None


def test_weights_the_fingerprint_cannot_read_are_computed(tiny, items):
    """A quantized weight keeps its state beside its data (bitsandbytes' quant_state): the
    fingerprint cannot vouch for it, so its layer is not reused."""
    model, tok = tiny
    weight = model.model.layers[0].mlp.down_proj.weight
    weight.quant_state = object()  # scales the content does not show
    try:
        plain = _outcomes(model, tok, items, HIGH, store=0)
        _outcomes(model, tok, items)
        assert _outcomes(model, tok, items, HIGH) == plain
        assert _store(model).hits == 0 and len(_store(model)) == 0
    finally:
        del weight.quant_state
