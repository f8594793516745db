"""Which heads a condition ablates: pure functions of a [layers, heads] score matrix.

Ordering follows the notebook exactly: a stable sort over heads in layer-major order, so ties
keep the notebook's (layer, head) order and its file reproduces its choices.
"""

from __future__ import annotations

import math
from collections import Counter

import numpy as np

from .schema import Condition, UserError, n_heads_share

Head = tuple[int, int]


class SelectionError(UserError):
    """A condition, N or score table from which no heads can be chosen."""

    kind = "config"


def resolve_n_heads(n_heads: int | str, n_layers: int, heads_per_layer: int) -> int:
    """How many heads ``n_heads`` ablates on a model of ``n_layers`` x ``heads_per_layer``
    query heads: a count as it is; a share ``P%`` as ceil(L x H x P / 100), the rule of
    Crosbie & Shutova (2025, "Induction Heads as an Essential Mechanism for Pattern
    Matching in In-context Learning", Findings of NAACL; they ablate 1% and 3% of all
    heads, ceil(L x H x pct) as issue #18 states it). Exact: P is read as a fraction from
    its decimal string (:func:`ih_sweep.schema.n_heads_share`), never through a float, so
    7% of 100 heads is 7, not 8. Every P > 0 ablates at least one head; 100% ablates all.
    E.g. 64 heads: 1% -> 1, 3% -> 2, 10% -> 7; 1,024 heads (32 x 32): 1% -> 11, 3% -> 31.
    Raises :class:`ih_sweep.schema.ConfigError` for a value that is neither."""
    share = n_heads_share(n_heads)
    if share is None:
        return int(n_heads)
    return math.ceil(n_layers * heads_per_layer * share / 100)


def _check(scores: np.ndarray, n: int, condition: str) -> None:
    if condition not in list(Condition):
        raise SelectionError(f"condition={condition!r} is not allowed; allowed values: "
                             f"{', '.join(c.value for c in Condition)}")
    if not isinstance(n, (int, np.integer)) or isinstance(n, bool) or n < 0:
        raise SelectionError(f"n_heads={n!r} must be an integer >= 0")
    total = scores.size
    if n > total:
        raise SelectionError(f"n_heads={n} is larger than the model's {total} heads "
                             f"({scores.shape[0]} layers x {scores.shape[1]} heads)")
    scored = int(np.isfinite(scores).sum())
    if scored == 0:
        raise SelectionError("the score table holds no scores for this model")
    if n > scored and condition != "none":
        raise SelectionError(f"n_heads={n} is larger than the {scored} heads that have scores")


def top_heads(scores: np.ndarray, n: int) -> list[Head]:
    """Global top-n heads by score, highest first (ties in layer-major order).

    Unscored heads (NaN; the notebook scored every 4th layer only) are never chosen.
    """
    flat = np.where(np.isfinite(scores), scores, -np.inf).reshape(-1)
    order = np.argsort(-flat, kind="stable")[:n]
    n_heads = scores.shape[1]
    return [(int(i // n_heads), int(i % n_heads)) for i in order]


def layer_counts(heads: list[Head]) -> dict[int, int]:
    """How many heads each layer holds, in order of first appearance (as the notebook did)."""
    return dict(Counter(layer for layer, _ in heads))


def low_matched(scores: np.ndarray, n: int) -> list[Head]:
    """The notebook's control: for each layer holding k of the top-n, its k lowest heads."""
    out: list[Head] = []
    for layer, k in layer_counts(top_heads(scores, n)).items():
        row = np.where(np.isfinite(scores[layer]), scores[layer], np.inf)
        order = np.argsort(row, kind="stable")[:k]
        out.extend((layer, int(h)) for h in order)
    return out


def random_matched(scores: np.ndarray, n: int, seed: int) -> list[Head]:
    """Layer-matched random heads that avoid the top-n, drawn with ``seed``.

    Many seeds give a null distribution of 'ablate n comparable heads' effects.
    """
    top = top_heads(scores, n)
    taken = set(top)
    rng = np.random.default_rng(seed)
    out: list[Head] = []
    for layer, k in sorted(layer_counts(top).items()):
        pool = [h for h in range(scores.shape[1])
                if (layer, h) not in taken and np.isfinite(scores[layer, h])]
        if len(pool) < k:
            raise SelectionError(f"layer {layer} has {len(pool)} heads outside the top-{n}, "
                                 f"fewer than the {k} a layer-matched random control needs")
        out.extend((layer, int(h)) for h in rng.choice(pool, size=k, replace=False))
    return out


def select_heads(scores: np.ndarray, condition: str, n: int, control_seed: int = 0
                 ) -> list[Head]:
    """Heads to ablate for one (condition, n, control_seed)."""
    _check(scores, n, condition)
    if condition == "none" or n == 0:
        return []
    if condition == "high":
        return top_heads(scores, n)
    if condition == "low":
        return low_matched(scores, n)
    return random_matched(scores, n, control_seed)
