"""The forward-pass context (ih_sweep.model.forward): per-thread pass values, per-model
counters, no attribute on the model, one ContextVar for the read positions."""

from __future__ import annotations

import threading

import pytest
import torch

from ih_sweep import data
from ih_sweep.ablation.hooks import ablate_heads
from ih_sweep.config.schema import EvalConfig
from ih_sweep.evaluation.evaluator import evaluate
from ih_sweep.model import forward
from ih_sweep.model.forward import ForwardContext, read_positions, reading
from ih_sweep.model.positions import PositionsUnknown, current_positions, track_positions
from ih_sweep.model.sites import hook_z


def _in_two_threads(body) -> list:
    """``body(i)`` in two threads at once (a barrier makes them overlap); their results."""
    barrier = threading.Barrier(2)
    out: list = [None, None]
    errors: list = []

    def run(i: int) -> None:
        try:
            out[i] = body(i, barrier)
        except BaseException as err:  # noqa: BLE001 (re-raised in the main thread)
            errors.append(err)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return out


def test_each_thread_sees_its_own_positions_and_keys():
    ctx = ForwardContext()

    def body(i: int, barrier) -> tuple:
        mine = torch.full((1, 3), i)
        ctx.push_positions(None)
        ctx.set_positions(mine)
        with ctx.sequence_keys([i, i]), ctx.z_positions_at(mine[:, :1]):
            barrier.wait()  # both threads hold their values now
            seen = (ctx.positions, ctx.row_keys.keys, ctx.z_index)
            barrier.wait()
        ctx.pop_positions()
        return seen, ctx.positions, ctx.row_keys, ctx.z_index

    for i, (seen, after, keys, index) in enumerate(_in_two_threads(body)):
        assert torch.equal(seen[0], torch.full((1, 3), i)) and seen[1] == (i, i)
        assert torch.equal(seen[2], torch.full((1, 1), i))
        assert after is None and keys is None and index is None  # put back on exit
    assert ctx.positions is None  # the main thread never saw either


def test_nested_calls_restore_the_outer_value():
    ctx = ForwardContext()
    with ctx.sequence_keys([1]):
        with ctx.sequence_keys([2]):
            assert ctx.row_keys.keys == (2,)
        assert ctx.row_keys.keys == (1,)
    assert ctx.row_keys is None
    ctx.push_positions(torch.zeros(1, 2))
    ctx.push_positions(torch.ones(1, 1))
    assert ctx.positions.shape == (1, 1)
    ctx.pop_positions()
    assert ctx.positions.shape == (1, 2)
    ctx.pop_positions()
    assert ctx.positions is None


def test_counters_are_shared_by_threads_and_come_back_to_zero():
    ctx = ForwardContext()

    def body(i: int, barrier) -> int:
        with ctx.counted("ablating"):
            barrier.wait()
            seen = ctx.ablating
            barrier.wait()
        return seen

    assert _in_two_threads(body) == [2, 2]
    assert ctx.ablating == 0
    with ctx.counted("row_dependent_ablations"):
        assert ctx.row_dependent
    assert not ctx.row_dependent


def test_one_context_per_model_and_reset():
    a, b = torch.nn.Linear(1, 1), torch.nn.Linear(1, 1)
    assert ForwardContext.of(a) is ForwardContext.of(a)
    assert ForwardContext.of(a) is not ForwardContext.of(b)
    before = ForwardContext.of(a)
    forward.reset()
    assert ForwardContext.of(a) is not before


def test_read_positions_are_per_thread_and_checked():
    with pytest.raises(ValueError, match="non-empty"):
        with reading(torch.zeros(0, 2, dtype=torch.long)):
            pass

    def body(i: int, barrier) -> int:
        with reading(torch.full((2, 1), i + 1)):
            barrier.wait()
            seen = read_positions()
            barrier.wait()
        return seen[2], seen[1], read_positions()

    assert _in_two_threads(body) == [(1, 2, None), (2, 2, None)]
    assert read_positions() is None


def test_tracked_passes_in_two_threads_see_their_own_positions(tiny):
    """The model-level hooks record each forward call's positions in the calling thread:
    two threads running passes of different shapes on one model at once each read theirs
    in a hook_z function."""
    model, _ = tiny
    ctx = ForwardContext.of(model)
    widths = (5, 9)
    seen: dict[int, list[torch.Tensor]] = {0: [], 1: []}
    waits = threading.local()

    def fn(layer: int, z: torch.Tensor) -> None:
        pos = current_positions(z, ctx)
        seen[waits.i].append(pos)
        if layer == 0:
            waits.barrier.wait()  # both passes are inside their forward call now

    def body(i: int, barrier) -> None:
        waits.i, waits.barrier = i, barrier
        ids = torch.full((1, widths[i]), 3)
        with torch.no_grad():
            model(input_ids=ids, use_cache=False)

    with track_positions(model), hook_z(model, fn, [0]):
        assert ctx.tracking == 1
        _in_two_threads(body)
    assert ctx.tracking == 0
    for i, width in enumerate(widths):
        assert len(seen[i]) == 1
        assert torch.equal(seen[i][0], torch.arange(width)[None])
    with pytest.raises(PositionsUnknown, match="outside a forward call"):
        current_positions(torch.zeros(1, 2, 4), ctx)


def test_nothing_is_set_on_the_model(tiny, tiny_prefix):
    """An ablated evaluation (positions tracked, the evaluator installed) leaves no attribute
    on the model and every counter of its context at zero."""
    from ih_sweep.heads.selection import select_heads

    model, tok = tiny
    before = set(vars(model))
    items = data.make_items(data.generate_stories(4, seed=5), "last")
    ctx = ForwardContext.of(model)
    with ablate_heads(model, select_heads(tiny_prefix, "high", 4)):
        assert ctx.ablating == 1
        evaluate(model, tok, items, EvalConfig(progress=False, batch_size=2))
    assert set(vars(model)) == before
    assert not any(name.startswith("_ih_sweep") for name in vars(model))
    assert (ctx.ablating, ctx.tracking, ctx.row_dependent_ablations) == (0, 0, 0)
    assert ctx.evaluator is None


def test_own_forward_ignores_the_class_forward_set_back():
    """forward.own_forward: a forward set on the instance counts, unless it is the class's
    own forward bound to that instance (what transformers 5.0 leaves after recording)."""
    module, other = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    assert forward.own_forward(module) is None
    module.forward = module.forward  # the class forward, bound to it
    assert forward.own_forward(module) is None
    borrowed = other.forward  # bound to another module
    module.forward = borrowed
    assert forward.own_forward(module) is borrowed
    wrapper = lambda x: x  # noqa: E731
    module.forward = wrapper
    assert forward.own_forward(module) is wrapper
    del module.forward
    assert forward.own_forward(module) is None
