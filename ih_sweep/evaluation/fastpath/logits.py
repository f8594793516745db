"""A model's logits at chosen positions of whole rows, through the evaluator's shortcuts
where they were checked on the model: the pass the mechanism check
(:mod:`ih_sweep.pipeline.mechanism`) scores its repeated sequences and texts with.

The evaluator's teacher-forced pass and this one differ only in what they read: right-padded
token rows with no cache, exact at the positions asked for (:func:`.install.read_at`). So the
same shortcuts serve it: the last layer at those positions only, the causal attention in
query blocks, and, across passes over the same rows in one process (the unablated pass, then
each job's ablated one), the Llama-family layers below the first ablated one taken from the
model's store (:mod:`.reuse`). Where the evaluator's run-time check has not yet judged the
shortcuts on this model and setting (:data:`.check.VERDICTS`; the evaluator's pass, with
masks and a cached prefix, exercises everything these passes use), nor this module's own
check, the first batch is computed both ways and compared (:func:`.check.compare_logits`); a
mismatch turns them off, with one warning, and the plain forward's logits are used. This
module's verdict is kept apart: it does not spare the evaluator its own check.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

from ih_sweep.evaluation.decoding import model_device
from ih_sweep.evaluation.fastpath.check import VERDICTS, check_tolerance, compare_logits
from ih_sweep.evaluation.fastpath.install import installed
from ih_sweep.evaluation.fastpath.reuse import PassReuse, budget_bytes, pass_key
from ih_sweep.model.forward import ForwardContext

log = logging.getLogger(__name__)
WHOLE_ROWS = "whole rows"  # this module's verdicts (check.Verdicts), apart from the evaluator's


@torch.no_grad()
def logits_at(model, ids: torch.Tensor, positions: torch.Tensor, batch_size: int,
              fast_layers: bool | None = None, layer_store_mb: int | str = 0,
              reduce: Callable[[torch.Tensor, slice], torch.Tensor] | None = None
              ) -> torch.Tensor:
    """[n, k, vocab] float32 logits (on the CPU) of ``model`` at ``positions`` [n, k] of the
    token rows ``ids`` [n, T] (right-padded or of equal length; no attention mask: causality
    keeps each position from the padding after it), in batches of ``batch_size`` rows.
    ``reduce(logits, rows)``: what is kept of each batch's logits [b, k, vocab] (on the
    model's device; ``rows``: the batch's slice of ``ids``) instead of the logits, e.g. the
    losses of target tokens, so that no [n, k, vocab] tensor is held; the result is then the
    batches' results (on the CPU) concatenated.

    Ablation hooks on the model act as in any pass. ``fast_layers`` and ``layer_store_mb``
    are ``eval.fast_layers`` and ``eval.layer_store_mb`` (:func:`.install.installed`,
    :func:`.reuse.budget_bytes`; 0: no store). Raises ValueError for positions outside the
    rows or a shape mismatch."""
    if ids.dim() != 2 or positions.dim() != 2 or positions.shape[0] != ids.shape[0]:
        raise ValueError(f"ids [n, T] and positions [n, k] expected, got {tuple(ids.shape)} "
                         f"and {tuple(positions.shape)}")
    if positions.numel() == 0 or int(positions.min()) < 0 or \
            int(positions.max()) >= ids.shape[1]:
        raise ValueError(f"positions must lie in 0..{ids.shape[1] - 1} (non-empty)")
    device = model_device(model)
    ctx = ForwardContext.of(model)
    out = []
    with installed(model, fast_layers, ctx, budget_bytes(layer_store_mb, device)) as fast:
        verdict = None
        if fast.on:  # the evaluator's verdict covers these passes; else their own
            verdict = VERDICTS.get(model, fast.layers)
            if verdict is None:
                verdict = VERDICTS.get(model, (fast.layers, WHOLE_ROWS))
        if verdict is False:
            fast.off()  # found wrong on this model earlier in this process
        for start in range(0, ids.shape[0], batch_size):
            host = ids[start:start + batch_size].long()
            dev_ids = host.to(device)
            at = positions[start:start + batch_size].to(device)
            use = ctx.layer_store
            reuse = None if use is None else PassReuse(
                use, pass_key(torch.cat([host, torch.ones_like(host)], 1), 0, 0, device),
                use.untouched())
            with ctx.reading(at), ctx.logits_at(at), ctx.reusing_layers(reuse):
                logits = model(input_ids=dev_ids, use_cache=False).logits
            if fast.on and verdict is None:
                verdict, logits = _checked(model, fast, ctx, dev_ids, at, logits)
            rows = slice(start, start + host.shape[0])
            out.append(logits.float().cpu() if reduce is None else reduce(logits, rows).cpu())
    return torch.cat(out)


def _checked(model, fast, ctx: ForwardContext, ids: torch.Tensor, at: torch.Tensor,
             logits: torch.Tensor) -> tuple[bool, torch.Tensor]:
    """The run-time check on a first batch (:mod:`.check`): the plain forward's logits at
    ``at`` (the shortcuts suspended; the unembedding still reads those positions only, an
    exact gather) against ``logits``. Records the verdict and returns it with the logits to
    use: ``logits`` if they passed, else the plain ones (one warning, the shortcuts off)."""
    with fast.suspended(), ctx.logits_at(at):
        plain = model(input_ids=ids, use_cache=False).logits
    problem = compare_logits(logits.flatten(0, 1).float(), plain.flatten(0, 1).float(),
                             check_tolerance(model))
    VERDICTS.set(model, (fast.layers, WHOLE_ROWS), problem is None)
    if problem is None:
        return True, logits
    log.warning("the evaluator's shortcuts (fastpath%s) do not reproduce the plain forward "
                "on the first batch of whole rows (%s): computing without them",
                ", fast_layers" if fast.layers else "", problem)
    fast.off()
    return False, plain
