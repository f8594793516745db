"""Host round trips of the evaluator per batch, counted on CPU.

On CPU ``.cpu()`` and ``.to(device)`` are no-ops, so a profiler sees no copies. This script
simulates a separate device instead: a ``TorchFunctionMode`` tags as *device* tensors the
model's parameters and buffers, whatever ``.to(<device>)`` returns, factory calls given an
explicit ``device=`` and every result of an op with a device input; everything else is
*host*. It counts, per evaluated batch (:func:`ih_sweep.evaluation.runner.evaluate_rows` call):

- ``d2h``: device -> host copies: ``.cpu()`` / ``.numpy()`` of a device tensor, and the
  implicit ones (``.tolist()``, ``.item()``, ``int()``, ``float()``, ``bool()`` of a device
  tensor), split into those made by the evaluator (ih_sweep/evaluation/, its fast path aside)
  and those inside transformers or the fast path;
- ``h2d``: host -> device copies (``.to(<device>)`` of a host tensor, ``torch.tensor(...,
  device=)``) made by the evaluator;
- ``ops``: aten operators run (``TorchDispatchMode``; each is a kernel launch on a GPU),
  and those run outside the model's forward calls (the evaluator's own).

Runs the default evaluation settings on the tiny model, 64 stories, last question, in one
thread (``cpu_workers=1``), after one evaluation that runs the shortcuts' run-time check:
unablated (every item decided by the teacher-forced pass), top-16 ablated (decoding from the
cache) and the same with decoding by ``generate``. Works on any checkout of the project
(put it first on PYTHONPATH) to compare before/after.

    PYTHONPATH=. python benchmarks/bench_transfers.py [--stories 64]
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from ih_sweep import data
from ih_sweep.ablation.hooks import ablate_heads
from ih_sweep.config.schema import DType, EvalConfig, ModelConfig, QuantizationConfig, ScoringConfig
from ih_sweep.evaluation import evaluator as evaluation
from ih_sweep.evaluation import runner
from ih_sweep.heads.scoring import score_heads, score_matrix
from ih_sweep.heads.selection import select_heads
from ih_sweep.model.loading import eager_attention, load_model

TAG = "_bench_on_device"
READS = {"tolist", "item", "__int__", "__float__", "__bool__", "__index__"}
FACTORIES = {"tensor", "as_tensor", "full", "zeros", "ones", "arange", "empty", "full_like",
             "zeros_like", "ones_like", "empty_like"}


def _tensors(obj):
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (list, tuple)):
        for o in obj:
            yield from _tensors(o)
    elif isinstance(obj, dict):
        for o in obj.values():
            yield from _tensors(o)


def _on_device(t) -> bool:
    return bool(getattr(t, TAG, False))


def _tag(obj, on: bool) -> None:
    for t in _tensors(obj):
        try:
            setattr(t, TAG, on)
        except (AttributeError, RuntimeError):
            pass


def _caller() -> str:
    """'evaluation' when the evaluator (ih_sweep/evaluation/, not its fast path) made the call
    (its nearest project frame)."""
    frame = sys._getframe(2)
    while frame is not None:
        name = frame.f_code.co_filename
        if "transformers" in name or "ih_sweep/evaluation/fastpath/" in name:
            return "model"
        if "ih_sweep/evaluation/" in name:
            return "evaluation"
        frame = frame.f_back
    return "other"


class Devices(TorchFunctionMode):
    """Tags device tensors and counts copies between host and device."""

    def __init__(self, counts: Counter):
        super().__init__()
        self.counts = counts

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", str(func))
        inputs = list(_tensors(args)) + list(_tensors(kwargs))
        device_in = any(_on_device(t) for t in inputs)
        first = args[0] if args and isinstance(args[0], torch.Tensor) else None
        if name in ("cpu", "numpy") and first is not None and _on_device(first):
            self.counts[f"d2h {_caller()}"] += 1
            out = func(*args, **kwargs)
            out = out.clone() if isinstance(out, torch.Tensor) and out is first else out
            _tag(out, False)
            return out
        if name in READS and first is not None and _on_device(first):
            self.counts[f"d2h {_caller()}"] += 1
            return func(*args, **kwargs)
        if name == "to" and first is not None:
            target = [a for a in (*args[1:], kwargs.get("device"))
                      if isinstance(a, (torch.device, str))]
            out = func(*args, **kwargs)
            if target and not _on_device(first):
                if _caller() == "evaluation":
                    self.counts["h2d evaluation"] += 1
                out = out.clone() if out is first else out
                _tag(out, True)
                return out
            _tag(out, device_in)
            return out
        out = func(*args, **kwargs)
        if name in FACTORIES and not device_in:
            on = "device" in kwargs and kwargs["device"] is not None
            if on and name in ("tensor", "as_tensor") and _caller() == "evaluation":
                self.counts["h2d evaluation"] += 1
            _tag(out, on)
        elif isinstance(out, (torch.Tensor, list, tuple)) and name not in READS:
            _tag(out, device_in)
        return out


class Ops(TorchDispatchMode):
    """Counts aten operators, and those outside the model's forward calls."""

    def __init__(self, counts: Counter, depth: list):
        super().__init__()
        self.counts, self.depth = counts, depth

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts["ops"] += 1
        if not self.depth[0]:
            self.counts["ops outside the model"] += 1
        return func(*args, **(kwargs or {}))


def measure(model, tok, items, settings, batches_of) -> dict[str, float]:
    counts: Counter = Counter()
    depth = [0]
    for p in (*model.parameters(), *model.buffers()):
        setattr(p, TAG, True)

    def enter(*_):
        depth[0] += 1

    def leave(*_):
        depth[0] -= 1

    hooks = [model.register_forward_pre_hook(enter), model.register_forward_hook(leave)]
    real = runner.evaluate_rows
    n_batches = [0]

    def counted(*args, **kwargs):
        n_batches[0] += 1
        return real(*args, **kwargs)

    runner.evaluate_rows = counted
    try:
        with Devices(counts), Ops(counts, depth):
            results = evaluation.evaluate(model, tok, items, settings)
    finally:
        runner.evaluate_rows = real
        for h in hooks:
            h.remove()
    per = {k: round(v / n_batches[0], 1) for k, v in sorted(counts.items())}
    per["batches"] = n_batches[0]
    per["decided_by"] = dict(Counter(r.decided_by for r in results))
    per["correct"] = sum(r.correct for r in results)
    return per


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stories", type=int, default=64)
    args = parser.parse_args()
    torch.set_num_threads(1)
    model, tok = load_model(ModelConfig(name="tiny", path="builtin:tiny", dtype=DType.float32),
                            QuantizationConfig(), "cpu")
    with eager_attention(model):
        heads = select_heads(score_matrix(score_heads(model, tok, ScoringConfig()), "prefix"),
                             "high", 16)
    items = data.make_items(data.generate_stories(args.stories, seed=0), "last")
    settings = EvalConfig(progress=False, cpu_workers=1)
    evaluation.evaluate(model, tok, items[:8], settings)  # the run-time check, once
    out = {"unablated": measure(model, tok, items, settings, None)}
    with ablate_heads(model, heads):
        out["top-16 ablated (decode)"] = measure(model, tok, items, settings, None)
        real = runner.reusable_cache
        runner.reusable_cache = lambda *a: None
        try:
            out["top-16 ablated (generate)"] = measure(model, tok, items, settings, None)
        finally:
            runner.reusable_cache = real
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
