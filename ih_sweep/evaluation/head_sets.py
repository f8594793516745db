"""Several head sets in one evaluation: each row of the evaluator once per head set, so that
the draws of a random control share its batches (``control.draws_per_pass``).

The rows' queries carry their set (:attr:`ih_sweep.evaluation.rows.Query.head_set`), which
every forward pass of the evaluator hands the ablation hook
(:meth:`ih_sweep.model.forward.ForwardContext.head_sets`: the teacher-forced pass, its shared
prefix once per set, decoding from its cache, ``generate``); the hook ablates each row's set
(:func:`ih_sweep.ablation.hooks.ablate_head_sets`). An item's outcome under set ``s`` is
what :func:`ih_sweep.evaluation.runner.evaluate` gives it with ``s``'s heads alone ablated
(its float measures up to the rounding of another batch).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from ih_sweep.config.schema import EvalConfig
from ih_sweep.evaluation.decoding import ItemResult
from ih_sweep.evaluation.rows import build_rows
from ih_sweep.evaluation.runner import evaluate
from ih_sweep.model.forward import ForwardContext


def repeat_rows(rows: Sequence, n_items: int, n_sets: int) -> list:
    """Each (tokens, queries) row of :func:`build_rows` once per head set, side by side: its
    copy for set ``s`` reads item ``index + s * n_items`` (``n_items`` the items the rows
    index) with ``head_set`` ``s``. The token lists are shared, not copied."""
    return [(tokens, [dataclasses.replace(q, index=q.index + s * n_items, head_set=s)
                      for q in queries])
            for tokens, queries in rows for s in range(n_sets)]


def evaluate_head_sets(model, tokenizer, items: Sequence, settings: EvalConfig, n_sets: int,
                       bar=None, candidates: Sequence[str] | None = None, rows=None,
                       ctx: ForwardContext | None = None) -> list[list[ItemResult]]:
    """Every item under each of ``n_sets`` head sets, in one evaluation: per set, the
    :class:`ItemResult` of each item in ``items``' order ([n_sets][len(items)]). The model
    must be inside :func:`ih_sweep.ablation.hooks.ablate_head_sets` with ``n_sets`` sets
    (set ``s`` ablated in the rows of set ``s``). ``eval.batch_size`` counts rows, so a
    batch holds as many rows (and takes as much memory) as with one set; there are
    ``n_sets`` times as many rows. ``bar``: advanced by ``len(items)`` when done (the
    evaluation's own bar, if ``settings.progress``, counts ``n_sets * len(items)``).
    ``candidates``, ``rows``, ``ctx``: as :func:`ih_sweep.evaluation.runner.evaluate`'s
    (``rows`` of ``items``, not repeated)."""
    n = len(items)
    rows = list(rows) if rows is not None else \
        build_rows(tokenizer, items, settings.max_new_tokens, candidates)
    results = evaluate(model, tokenizer, list(items) * n_sets, settings, None, candidates,
                       repeat_rows(rows, n, n_sets), ctx)
    if bar is not None:
        bar.update(n)
    return [results[s * n:(s + 1) * n] for s in range(n_sets)]
