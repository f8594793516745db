"""The fast path's run-time self-check: the first batch's teacher-forced logits at the read
positions with the shortcuts against the plain forward's; where they differ beyond the
dtype's tolerance the evaluation goes on without the shortcuts. One verdict per model and
``eval.fast_layers`` setting per process (:data:`VERDICTS`)."""

from __future__ import annotations

import logging
import threading
import weakref
from collections.abc import Hashable

import torch

from ih_sweep.config.schema import EvalConfig
from ih_sweep.evaluation.batches import run_batches
from ih_sweep.evaluation.decoding import greedy_from_forward
from ih_sweep.evaluation.fastpath.install import FastPath
from ih_sweep.evaluation.rows import items_in
from ih_sweep.model.forward import ForwardContext
from ih_sweep.model.tokens import pad_id

log = logging.getLogger(__name__)


class Verdicts:
    """Models whose shortcuts were checked in this process: {model: {key: passed}} (weakly
    keyed: a verdict lives as long as its model). ``key``: ``eval.fast_layers`` for the
    evaluator's check of its teacher-forced pass (masks, a cached shared prefix); ``(fast_layers,
    "whole rows")`` for the check of :func:`ih_sweep.evaluation.fastpath.logits.logits_at`'s
    simpler passes (no mask, no cache), which the evaluator's verdict covers too but which
    does not cover the evaluator's. The check compares attention paths; ablation hooks act
    on the o_proj input alike in both, so one check per model and key covers every later
    pass of its kind."""

    def __init__(self) -> None:
        self._by_model: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self._lock = threading.Lock()

    def get(self, model, key: Hashable) -> bool | None:
        """Whether the shortcuts passed on ``model`` for ``key``; None: not checked."""
        with self._lock:
            return self._by_model.get(model, {}).get(key)

    def set(self, model, key: Hashable, passed: bool) -> None:
        with self._lock:
            self._by_model.setdefault(model, {})[key] = passed

    def reset(self) -> None:
        """Forget every verdict (the next evaluation of each model is checked again)."""
        with self._lock:
            self._by_model.clear()


VERDICTS = Verdicts()


def reset() -> None:
    """:meth:`Verdicts.reset` of :data:`VERDICTS`."""
    VERDICTS.reset()


# Largest difference allowed between the shortcuts' logits and the plain forward's at the read
# positions, as a fraction of the logit scale (the largest |logit| there), by the dtype the
# model computes in. Rounding alone moves a logit by a few units of the dtype's precision times
# the scale (float32: eps 1.2e-7, bfloat16: 7.8e-3, float16: 9.8e-4) per layer, and the
# shortcuts reorder sums (blocked softmax, gathered queries, a rotary on another layout): in
# float32 they differ by ~1e-6 of the scale (measured: tiny model and the test models), so
# 1e-4 leaves a wide margin while a wrong shortcut (a mask, a position, a rotary off) moves
# logits by a sizeable fraction of the scale. The half-precision bounds are a few units of
# their precision, for the same reason.
# models whose shortcuts were checked in this process: {model: {fast_layers: passed}}. The
# check compares attention paths; ablation hooks act on the o_proj input alike in both, so
# one check per model and setting covers every later evaluation of it.
CHECK_TOLERANCE = {torch.float32: 1e-4, torch.float64: 1e-4, torch.bfloat16: 5e-2,
                   torch.float16: 1e-2}


def check_tolerance(model) -> float:
    """:data:`CHECK_TOLERANCE` of the least precise dtype among the model's embedding and
    unembedding weights (they stay in the compute dtype under 4/8-bit quantization)."""
    dtypes = {m.weight.dtype for m in (model.get_input_embeddings(),
                                       model.get_output_embeddings())
              if m is not None and m.weight.is_floating_point()}
    return max((CHECK_TOLERANCE.get(d, 5e-2) for d in dtypes), default=5e-2)


def compare_logits(fast: torch.Tensor, plain: torch.Tensor, tolerance: float) -> str | None:
    """None where ``fast`` [n, vocab] matches ``plain`` within ``tolerance`` of the logit
    scale and picks the same token at every position, or one whose plain logit is within
    ``tolerance`` x scale of the plain maximum (a near-tie); else what differs, in words.
    (Within the first condition a flipped pick can only trail by up to twice the tolerance;
    the second accepts only half of that band.)"""
    scale = max(float(plain.abs().max()), 1e-6)
    diff = float((fast - plain).abs().max())
    if diff > tolerance * scale:
        return f"logits differ by {diff:.3g} (tolerance {tolerance:g} x scale {scale:.3g})"
    picked = fast.argmax(-1)
    best = plain.max(-1).values
    behind = best - plain.gather(-1, picked[:, None])[:, 0]
    if bool((behind > tolerance * scale).any()):
        return "the greedy token differs where the plain forward has no near-tie"
    return None


def check_first_batch(model, tokenizer, rows, fast: FastPath, run, bs: int,
                      settings: EvalConfig, device, bar, ctx: ForwardContext | None = None
                      ) -> list:
    """The first batch with the shortcuts, its read-position logits recorded; the same rows
    through the plain forward (the attention shortcuts suspended: sdpa and the layers' own
    forwards, no cache, no shared prefix; only the unembedding still runs at the read
    positions alone, an exact gather); on a
    mismatch, one warning, the shortcuts off for the rest of the evaluation, and the batch
    again without them. Runs before any other batch (no thread shares the model then).
    ``ctx``: the forward context ``run``'s passes record in (default: the model's).
    Returns ``run``'s results of the batch(es)."""
    ctx = ctx if ctx is not None else ForwardContext.of(model)
    shortcut: dict[int, torch.Tensor] = {}
    with ctx.recording(shortcut):
        parts = run_batches(run, rows, bs, "evaluate", settings.progress, 1, bar, items_in)
    plain: dict[int, torch.Tensor] = {}
    with ctx.recording(plain), fast.suspended():
        run_batches(lambda chunk: greedy_from_forward(
            model, chunk, pad_id(tokenizer), settings.max_new_tokens, device, ctx=ctx),
            rows, bs, "check", False, 1)
    order = sorted(plain)
    got = torch.cat([shortcut[i] for i in order])
    ref = torch.cat([plain[i] for i in order])
    problem = compare_logits(got, ref, check_tolerance(model))
    if problem is None:
        return parts
    log.warning("the evaluator's shortcuts (fastpath%s) do not reproduce the plain "
                "forward on the first batch (%s): evaluating without them",
                ", fast_layers" if fast.layers else "", problem)
    fast.off()
    return run_batches(run, rows, bs, "evaluate", False, 1)
