from __future__ import annotations

import threading

import pytest
import torch

from ih_sweep import data, evaluation
from ih_sweep.ablation import ablate_heads
from ih_sweep.evaluation import (
    EvalSettings,
    _known_greedy,
    decide_partial,
    evaluate,
    generate_one_at_a_time,
    is_correct,
)
from ih_sweep.selection import select_heads


def test_metric_contains_is_the_seeds():
    assert is_correct(" hallway\nPassage", "hallway", "contains")
    assert is_correct("the hallway.", "hallway", "contains")
    assert not is_correct("hallways", "hallway", "contains")
    assert is_correct("apple and football", "apple,football", "contains")
    assert not is_correct("apple", "apple,football", "contains")


def test_metric_exact_is_first_word():
    assert is_correct("hallway Read", "hallway", "exact")
    assert not is_correct("the hallway", "hallway", "exact")
    with pytest.raises(ValueError, match="allowed values: contains, exact"):
        is_correct("x", "x", "fuzzy")


def test_partial_decisions_only_when_final():
    assert decide_partial("hallway ", "hallway", "contains") is True
    assert decide_partial("hallway", "hallway", "contains") is None  # could become hallways
    assert decide_partial("kitchen ", "hallway", "contains") is None  # answer may follow
    assert decide_partial("kitchen ", "hallway", "exact") is False
    assert decide_partial("hall", "hallway", "exact") is None
    assert decide_partial("hallway.", "hallway", "exact") is True


def test_known_greedy_stops_at_first_disagreement_or_eos():
    assert _known_greedy([5, 6, 7], [5, 6], eos=2) == [5, 6, 7]
    assert _known_greedy([5, 9, 7], [5, 6], eos=2) == [5, 9]
    assert _known_greedy([4, 6, 7], [5, 6], eos=2) == [4]
    assert _known_greedy([2, 6, 7], [2, 6], eos=2) == [2]


@pytest.mark.parametrize("scope", ["last", "all"])
def test_per_item_equality_with_one_at_a_time_generate(tiny, tiny_prefix, scope):
    """The engine's outcome equals the seed's method on every item, also with errors."""
    model, tok = tiny
    items = data.make_items(data.generate_stories(40 if scope == "last" else 12, seed=77),
                           scope)
    for heads in ([], select_heads(tiny_prefix, "high", 16)):
        with ablate_heads(model, heads):
            got = evaluate(model, tok, items, EvalSettings(progress=False, batch_size=7))
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
        cached = evaluate(model, tok, items, EvalSettings(progress=False, batch_size=5))
        monkeypatch.setattr(evaluation, "_reusable_cache", lambda *a: None)
        fallback = evaluate(model, tok, items, EvalSettings(progress=False, batch_size=5))
    assert {r.decided_by for r in cached} == {"forward", "decode"}
    assert {r.decided_by for r in fallback} == {"forward", "generate"}
    assert [(r.correct, r.continuation) for r in cached] == \
        [(r.correct, r.continuation) for r in fallback]


def test_shared_prefix_stops_before_the_first_read_position():
    q = evaluation._Query
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
            monkeypatch.setattr(evaluation, "MIN_SHARED_PREFIX", minimum)
            runs.append(evaluate(model, tok, items, EvalSettings(progress=False, batch_size=8)))
    assert [(r.correct, r.continuation, r.decided_by) for r in runs[0]] == \
        [(r.correct, r.continuation, r.decided_by) for r in runs[1]]
    rows = evaluation.build_rows(tok, items, 3)
    assert evaluation.shared_prefix_length(rows) >= default  # the header: 18 tokens


def test_sliding_window_within_reach_disables_cache_reuse():
    import transformers as tf

    model = tf.MistralForCausalLM(tf.MistralConfig(
        vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, sliding_window=64))
    assert evaluation._reusable_cache(model, 40, 3) is not None
    assert evaluation._reusable_cache(model, 62, 3) is None


def test_exact_metric_equality(tiny, tiny_prefix):
    model, tok = tiny
    items = data.make_items(data.generate_stories(8, seed=5), "all")
    with ablate_heads(model, select_heads(tiny_prefix, "high", 8)):
        got = evaluate(model, tok, items, EvalSettings(metric="exact", progress=False))
        ref = [generate_one_at_a_time(model, tok, it) for it in items]
    assert [r.correct for r in got] == [is_correct(c, it.answer, "exact")
                                       for c, it in zip(ref, items)]


def test_batch_size_does_not_change_results(tiny):
    model, tok = tiny
    items = data.make_items(data.generate_stories(20, seed=9), "last")
    a = evaluate(model, tok, items, EvalSettings(batch_size=1, progress=False))
    b = evaluate(model, tok, items, EvalSettings(batch_size=64, progress=False))
    assert [r.correct for r in a] == [r.correct for r in b]


def _spy_batches(monkeypatch, each):
    real = evaluation._evaluate_rows

    def spy(*args, **kwargs):
        each()
        return real(*args, **kwargs)

    monkeypatch.setattr(evaluation, "_evaluate_rows", spy)


def _put_back(model, threads: int) -> None:
    """Nothing of an evaluation stays on the model or in torch's settings."""
    assert torch.get_num_threads() == threads
    assert not model.get_output_embeddings()._forward_pre_hooks
    assert model.config._attn_implementation == "sdpa"
    for layer in model.model.layers:
        assert "forward" not in vars(layer) and "forward" not in vars(layer.self_attn)
    assert not hasattr(model, evaluation._INSTALLED)


def test_batches_in_threads_give_the_same_outcomes(tiny, tiny_prefix, monkeypatch):
    """cpu_workers: batches evaluated in threads at the same time (one intra-op thread
    each) give the outcomes of one batch at a time, also while one thread decodes from its
    cache as another runs its teacher-forced pass; afterwards everything is put back."""
    model, tok = tiny
    items = data.make_items(data.generate_stories(24, seed=80), "all")
    threads = torch.get_num_threads()
    together = threading.Barrier(2, timeout=60)  # the first two batches must overlap
    inside: list[tuple[int, bool]] = []
    lock = threading.Lock()

    def each():
        with lock:
            inside.append((torch.get_num_threads(), torch.is_grad_enabled()))
            first_two = len(inside) <= 2
        if first_two:
            together.wait()

    with ablate_heads(model, select_heads(tiny_prefix, "high", 16)):
        one = evaluate(model, tok, items,
                       EvalSettings(progress=False, batch_size=4, cpu_workers=1))
        _spy_batches(monkeypatch, each)
        many = evaluate(model, tok, items,
                        EvalSettings(progress=False, batch_size=4, cpu_workers=3))
    assert [(r.correct, r.continuation, r.decided_by) for r in many] == \
        [(r.correct, r.continuation, r.decided_by) for r in one]
    assert {r.decided_by for r in many} == {"forward", "decode"}
    assert inside == [(max(1, threads // 3), False)] * 6  # 24 story rows / 4
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
                     EvalSettings(progress=False, batch_size=3, cpu_workers=workers))
        _put_back(model, threads)
