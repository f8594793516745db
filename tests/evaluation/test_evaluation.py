from __future__ import annotations

import threading

import pytest
import torch

from ih_sweep import data
from ih_sweep.ablation.hooks import ablate_heads
from ih_sweep.config.schema import EvalConfig, Metric
from ih_sweep.evaluation import decoding, fastpath, runner
from ih_sweep.evaluation import evaluator as evaluation
from ih_sweep.evaluation import rows as rows_module
from ih_sweep.evaluation.decoding import known_greedy
from ih_sweep.evaluation.evaluator import evaluate, is_correct
from ih_sweep.evaluation.fastpath import check, layers
from ih_sweep.heads.selection import select_heads
from ih_sweep.model.attention import attention_implementation
from ih_sweep.model.forward import ForwardContext, own_forward
from ih_sweep.testing import generate_one_at_a_time


def test_known_greedy_stops_at_first_disagreement_or_eos():
    assert known_greedy([5, 6, 7], [5, 6], eos=2) == [5, 6, 7]
    assert known_greedy([5, 9, 7], [5, 6], eos=2) == [5, 9]
    assert known_greedy([4, 6, 7], [5, 6], eos=2) == [4]
    assert known_greedy([2, 6, 7], [2, 6], eos=2) == [2]


@pytest.mark.parametrize("scope", ["last", "all"])
def test_per_item_equality_with_one_at_a_time_generate(tiny, tiny_prefix, scope):
    """The engine's outcome equals the seed's method on every item, also with errors."""
    model, tok = tiny
    items = data.make_items(data.generate_stories(40 if scope == "last" else 12, seed=77),
                           scope)
    for heads in ([], select_heads(tiny_prefix, "high", 16)):
        with ablate_heads(model, heads):
            got = evaluate(model, tok, items, EvalConfig(progress=False, batch_size=7))
            ref = [generate_one_at_a_time(model, tok, it) for it in items]
        for r, c in zip(got, ref):
            assert r.correct == is_correct(c, r.item.answer, "contains")
            assert c.startswith(r.continuation)
            if r.decided_by != "forward":
                assert r.continuation == c
        if heads:
            assert sum(not r.correct for r in got) >= 3  # the ablation produced errors
            assert any(r.decided_by == "decode" for r in got)  # continued from the cache


def test_generate_fallback_gives_the_same_outcomes(tiny, tiny_prefix, monkeypatch):
    """Where the pass's cache cannot be reused, undecided items go to ``generate``."""
    model, tok = tiny
    items = data.make_items(data.generate_stories(12, seed=78), "all")
    with ablate_heads(model, select_heads(tiny_prefix, "high", 16)):
        cached = evaluate(model, tok, items, EvalConfig(progress=False, batch_size=5))
        monkeypatch.setattr(runner, "reusable_cache", lambda *a: None)
        fallback = evaluate(model, tok, items, EvalConfig(progress=False, batch_size=5))
    assert {r.decided_by for r in cached} == {"forward", "decode"}
    assert {r.decided_by for r in fallback} == {"forward", "generate"}
    assert [(r.correct, r.continuation) for r in cached] == \
        [(r.correct, r.continuation) for r in fallback]


def test_shared_prefix_stops_before_the_first_read_position():
    q = rows_module.Query
    rows = [([1, 5, 6, 7, 8, 9], [q(0, 4, [9])]), ([1, 5, 6, 2, 8], [q(1, 3, [8])])]
    assert evaluation.shared_prefix_length(rows) == 3
    rows[1] = ([1, 5, 6, 7, 8, 9], [q(1, 2, [7]), q(2, 4, [9])])
    assert evaluation.shared_prefix_length(rows) == 2  # position 2's logits are read


def test_shared_prefix_changes_nothing(tiny, tiny_prefix, monkeypatch):
    """The prompt header once per batch (its cache copied to every row) gives the same
    continuations as running it in every row."""
    model, tok = tiny
    items = data.make_items(data.generate_stories(24, seed=79), "all")
    runs = []
    default = evaluation.MIN_SHARED_PREFIX
    with ablate_heads(model, select_heads(tiny_prefix, "high", 8)):
        for minimum in (default, 10**6):
            monkeypatch.setattr(decoding, "MIN_SHARED_PREFIX", minimum)
            runs.append(evaluate(model, tok, items, EvalConfig(progress=False, batch_size=8)))
    assert [(r.correct, r.continuation, r.decided_by) for r in runs[0]] == \
        [(r.correct, r.continuation, r.decided_by) for r in runs[1]]
    rows = evaluation.build_rows(tok, items, 3)
    assert evaluation.shared_prefix_length(rows) >= default  # the header: 18 tokens


def test_sliding_window_within_reach_disables_cache_reuse():
    import transformers as tf

    model = tf.MistralForCausalLM(tf.MistralConfig(
        vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, sliding_window=64))
    assert decoding.reusable_cache(model, 40, 3) is not None
    assert decoding.reusable_cache(model, 62, 3) is None


def test_exact_metric_equality(tiny, tiny_prefix):
    model, tok = tiny
    items = data.make_items(data.generate_stories(8, seed=5), "all")
    with ablate_heads(model, select_heads(tiny_prefix, "high", 8)):
        got = evaluate(model, tok, items, EvalConfig(metric="exact", progress=False))
        ref = [generate_one_at_a_time(model, tok, it) for it in items]
    assert [r.correct for r in got] == [is_correct(c, it.answer, "exact")
                                       for c, it in zip(ref, items)]


def test_batch_size_does_not_change_results(tiny):
    model, tok = tiny
    items = data.make_items(data.generate_stories(20, seed=9), "last")
    a = evaluate(model, tok, items, EvalConfig(batch_size=1, progress=False))
    b = evaluate(model, tok, items, EvalConfig(batch_size=64, progress=False))
    assert [r.correct for r in a] == [r.correct for r in b]


def _spy_batches(monkeypatch, each):
    real = runner.evaluate_rows

    def spy(*args, **kwargs):
        each()
        return real(*args, **kwargs)

    monkeypatch.setattr(runner, "evaluate_rows", spy)


def _put_back(model, threads: int) -> None:
    """Nothing of an evaluation stays on the model or in torch's settings."""
    assert torch.get_num_threads() == threads
    assert not model.get_output_embeddings()._forward_pre_hooks
    assert model.config._attn_implementation == "sdpa"
    for layer in model.model.layers:  # no forward of its own left (own_forward: what
        # transformers 5.0 sets back after the scoring fixture's output_attentions pass aside)
        assert own_forward(layer) is None and own_forward(layer.self_attn) is None
    ctx = ForwardContext.of(model)
    assert ctx.evaluator is None and not ctx.tracking and not ctx.ablating


def test_batches_in_threads_give_the_same_outcomes(tiny, tiny_prefix, monkeypatch):
    """cpu_workers: batches evaluated in threads at the same time (one intra-op thread
    each) give the outcomes of one batch at a time, also while one thread decodes from its
    cache as another runs its teacher-forced pass; afterwards everything is put back. (The
    first evaluation checked the shortcuts on this model, so the second runs every batch in
    threads.)"""
    model, tok = tiny
    items = data.make_items(data.generate_stories(24, seed=80), "all")
    threads = torch.get_num_threads()
    together = threading.Barrier(2, timeout=60)  # the first two in threads must overlap
    inside: list[tuple[int, bool]] = []
    lock = threading.Lock()

    def each():
        with lock:
            inside.append((torch.get_num_threads(), torch.is_grad_enabled()))
            first_two = len(inside) in (1, 2)
        if first_two:
            together.wait()

    with ablate_heads(model, select_heads(tiny_prefix, "high", 16)):
        one = evaluate(model, tok, items,
                       EvalConfig(progress=False, batch_size=4, cpu_workers=1))
        _spy_batches(monkeypatch, each)
        many = evaluate(model, tok, items,
                        EvalConfig(progress=False, batch_size=4, cpu_workers=3))
    assert [(r.correct, r.continuation, r.decided_by) for r in many] == \
        [(r.correct, r.continuation, r.decided_by) for r in one]
    assert {r.decided_by for r in many} == {"forward", "decode"}
    # 24 story rows / 4: 6 batches, all in threads
    assert inside == [(max(1, threads // 3), False)] * 6
    _put_back(model, threads)


def test_a_failing_batch_fails_the_evaluation_and_puts_everything_back(tiny, monkeypatch):
    model, tok = tiny
    items = data.make_items(data.generate_stories(12, seed=81), "last")
    threads = torch.get_num_threads()
    calls = []

    def each():
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("batch 2 failed")

    _spy_batches(monkeypatch, each)
    for workers in (1, 2):
        calls.clear()
        with pytest.raises(RuntimeError, match="batch 2 failed"):
            evaluate(model, tok, items,
                     EvalConfig(progress=False, batch_size=3, cpu_workers=workers))
        _put_back(model, threads)


# --------------------------------------------------------------------------- run-time check
def test_compare_logits_tolerance_and_near_ties():
    plain = torch.tensor([[10.0, 2.0, -3.0], [1.0, 4.0, 3.99999]])
    assert evaluation.compare_logits(plain.clone(), plain, 1e-4) is None
    assert evaluation.compare_logits(plain + 5e-4, plain, 1e-4) is None  # 5e-4 < 1e-4 x 10
    assert "differ by" in evaluation.compare_logits(plain + 2e-3, plain, 1e-4)
    tie = plain.clone()
    tie[1, 2] += 2e-5  # the near-tie flips: still the plain path's choice within tolerance
    assert tie[1].argmax() != plain[1].argmax()
    assert evaluation.compare_logits(tie, plain, 1e-4) is None
    # within the tolerance (1e-3 x 10) everywhere, but the pick flips where the plain
    # forward's lead (0.015) is more than the tolerance: not a near-tie
    plain = torch.tensor([[10.0, 2.0, -3.0], [1.0, 4.0, 3.985]])
    flipped = torch.tensor([[10.0, 2.0, -3.0], [1.0, 3.993, 3.994]])
    assert evaluation.compare_logits(flipped, plain, 1e-3) == \
        "the greedy token differs where the plain forward has no near-tie"
    assert evaluation.compare_logits(flipped, plain, 2e-3) is None
    # the tolerance follows the model's dtype
    model = torch.nn.Module()
    emb = torch.nn.Embedding(3, 2).to(torch.bfloat16)
    model.get_input_embeddings = lambda: emb
    model.get_output_embeddings = lambda: torch.nn.Linear(2, 3)
    assert evaluation.check_tolerance(model) == evaluation.CHECK_TOLERANCE[torch.bfloat16]


@pytest.fixture(autouse=True)
def _unchecked():
    """Each test starts with no model checked (the check runs once per model in a process)."""
    check.reset()


def _noisy_last_layer(monkeypatch, calls):
    real = layers.last_layer_at

    def noisy(*args, **kwargs):
        calls.append(1)
        out = real(*args, **kwargs)
        g = torch.Generator().manual_seed(len(calls))
        return out + 0.3 * torch.randn(out.shape, generator=g)

    monkeypatch.setattr(layers, "last_layer_at", noisy)


@pytest.mark.parametrize("workers", [1, 2])
def test_a_wrong_shortcut_is_caught_on_the_first_batch(tiny, tiny_prefix, monkeypatch, caplog,
                                                        workers):
    """A patched forward that is off (noise in the last layer): one warning, the rest of the
    evaluation on the plain path (the noisy forward never runs again), and the outcomes of
    one-at-a-time generate."""
    model, tok = tiny
    items = data.make_items(data.generate_stories(16, seed=82), "last")
    calls: list[int] = []
    _noisy_last_layer(monkeypatch, calls)
    caplog.set_level("WARNING", logger="ih_sweep.evaluation.fastpath.check")
    threads = torch.get_num_threads()
    with ablate_heads(model, select_heads(tiny_prefix, "high", 16)):
        got = evaluate(model, tok, items, EvalConfig(progress=False, batch_size=5,
                                                     cpu_workers=workers, fast_layers=True))
        ref = [generate_one_at_a_time(model, tok, it) for it in items]
    assert calls == [1]  # the first batch only
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1 and "do not reproduce the plain forward" in warnings[0]
    assert "fast_layers" in warnings[0] and "differ" in warnings[0]
    for r, c in zip(got, ref):
        assert r.correct == is_correct(c, r.item.answer, "contains")
        assert c.startswith(r.continuation)
    _put_back(model, threads)


def test_correct_shortcuts_pass_the_check_and_stay_on(tiny, monkeypatch, caplog):
    model, tok = tiny
    items = data.make_items(data.generate_stories(12, seed=83), "last")
    checked, layer_calls = [], []
    real_compare = check.compare_logits
    real_layer = layers.last_layer_at
    monkeypatch.setattr(check, "compare_logits",
                        lambda *a: checked.append(real_compare(*a)) or checked[-1])
    monkeypatch.setattr(layers, "last_layer_at",
                        lambda *a, **k: layer_calls.append(1) or real_layer(*a, **k))
    caplog.set_level("WARNING")
    evaluate(model, tok, items, EvalConfig(progress=False, batch_size=4, cpu_workers=1))
    assert checked == [None] and not caplog.records
    assert len(layer_calls) == 3  # 12 rows / 4: the shortcut stayed on after the check
    evaluate(model, tok, items, EvalConfig(progress=False, batch_size=4, cpu_workers=1))
    assert checked == [None] and len(layer_calls) == 6  # checked once per model and setting


def test_a_shortcut_found_wrong_stays_off_for_that_model(tiny, monkeypatch, caplog):
    model, tok = tiny
    items = data.make_items(data.generate_stories(8, seed=85), "last")
    calls: list[int] = []
    _noisy_last_layer(monkeypatch, calls)
    caplog.set_level("WARNING", logger="ih_sweep.evaluation.fastpath.check")
    settings = EvalConfig(progress=False, batch_size=4, cpu_workers=1, fast_layers=True)
    first = evaluate(model, tok, items, settings)
    second = evaluate(model, tok, items, settings)
    assert calls == [1] and len(caplog.records) == 1  # no second check, no second warning
    assert [r.correct for r in first] == [r.correct for r in second]


def test_without_shortcuts_there_is_no_check(tiny, monkeypatch):
    model, tok = tiny
    items = data.make_items(data.generate_stories(6, seed=84), "last")
    monkeypatch.setattr(check, "compare_logits", lambda *a: pytest.fail("checked"))
    with attention_implementation(model, "eager"):  # the shortcuts compute sdpa only
        with fastpath.fast_attention(model) as fast:
            assert not fast.on
        evaluate(model, tok, items, EvalConfig(progress=False))


def test_metric_accepts_the_enum_and_plain_strings():
    assert is_correct("the hallway", "hallway", Metric.contains)
    assert not is_correct("the hallway", "hallway", Metric.exact)
    with pytest.raises(ValueError, match="allowed values: contains, exact"):
        evaluate(None, None, [], EvalConfig(metric="fuzzy"))
