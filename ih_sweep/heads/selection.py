"""Which heads a condition ablates: pure functions of a [layers, heads] score matrix.

Ordering follows the notebook exactly: a stable sort over heads in layer-major order, so ties
keep the notebook's (layer, head) order and its file reproduces its choices.

Exclusion (Yin & Steinhardt 2025, "Which Attention Heads Matter for In-Context Learning?",
ICML 2025, section 4; their code kayoyin/icl-heads ``src/utils/ablate_utils.py``
``get_heads_to_ablate``): the top ``floor(share x heads)`` heads by another score
(:func:`excluded_heads`) are taken out before the top-N is chosen, so "induction heads
outside the top FV heads" and vice versa. With an exclusion, the controls stay
layer-matched to that filtered top-N and avoid both it and the excluded heads (``low``: the
k lowest of the layer's other heads; ``random``: drawn among them); without one, every
function behaves as before.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Collection

import numpy as np

from ih_sweep.config.errors import UserError
from ih_sweep.config.rules import n_heads_share
from ih_sweep.config.schema import Condition

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
    its decimal string (:func:`ih_sweep.config.rules.n_heads_share`), never through a float, so
    7% of 100 heads is 7, not 8. Every P > 0 ablates at least one head; 100% ablates all.
    E.g. 64 heads: 1% -> 1, 3% -> 2, 10% -> 7; 1,024 heads (32 x 32): 1% -> 11, 3% -> 31.
    Raises :class:`ih_sweep.config.errors.ConfigError` for a value that is neither."""
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


def excluded_heads(other: np.ndarray, share: float) -> list[Head]:
    """The heads an exclusion takes out: the top ``floor(share x heads)`` by ``other``
    (Yin & Steinhardt's ``int(excl_num * len(all_heads))``), highest first."""
    return top_heads(other, int(share * other.size))


def _usable(scores: np.ndarray, exclude: Collection[Head]) -> np.ndarray:
    """Whether each head may be chosen: scored and not excluded."""
    ok = np.isfinite(scores)
    for layer, head in exclude:
        ok[layer, head] = False
    return ok


def top_heads(scores: np.ndarray, n: int, exclude: Collection[Head] = ()) -> list[Head]:
    """Global top-n heads by score, highest first (ties in layer-major order), none of
    ``exclude``.

    Unscored heads (NaN; the notebook scored every 4th layer only) are never chosen.
    """
    flat = np.where(_usable(scores, exclude), scores, -np.inf).reshape(-1)
    order = np.argsort(-flat, kind="stable")[:n]
    n_heads = scores.shape[1]
    return [(int(i // n_heads), int(i % n_heads)) for i in order]


def layer_counts(heads: list[Head]) -> dict[int, int]:
    """How many heads each layer holds, in order of first appearance (as the notebook did)."""
    return dict(Counter(layer for layer, _ in heads))


def low_matched(scores: np.ndarray, n: int, exclude: Collection[Head] = ()) -> list[Head]:
    """The notebook's control: for each layer holding k of the top-n, its k lowest heads.
    With ``exclude``: the top-n outside it, and each layer's k lowest heads outside both."""
    top = top_heads(scores, n, exclude)
    ok = _usable(scores, [*exclude, *top]) if exclude else np.isfinite(scores)
    out: list[Head] = []
    for layer, k in layer_counts(top).items():
        row = np.where(ok[layer], scores[layer], np.inf)
        if exclude and int(ok[layer].sum()) < k:
            raise SelectionError(f"layer {layer} has {int(ok[layer].sum())} heads outside the "
                                 f"top-{n} and the excluded ones, fewer than the {k} a "
                                 "layer-matched control needs")
        order = np.argsort(row, kind="stable")[:k]
        out.extend((layer, int(h)) for h in order)
    return out


def random_matched(scores: np.ndarray, n: int, seed: int, exclude: Collection[Head] = ()
                   ) -> list[Head]:
    """Layer-matched random heads that avoid the top-n (and ``exclude``), drawn with
    ``seed``.

    Many seeds give a null distribution of 'ablate n comparable heads' effects.
    """
    top = top_heads(scores, n, exclude)
    taken = set(top) | {(int(la), int(h)) for la, h in exclude}
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


def select_heads(scores: np.ndarray, condition: str, n: int, control_seed: int = 0,
                 exclude: Collection[Head] = ()) -> list[Head]:
    """Heads to ablate for one (condition, n, control_seed), none of ``exclude`` (see the
    module docstring)."""
    _check(scores, n, condition)
    exclude = [(int(la), int(h)) for la, h in exclude]
    if condition == "none" or n == 0:
        return []
    left = int(_usable(scores, exclude).sum())
    if exclude and n > left:
        raise SelectionError(f"n_heads={n} is larger than the {left} scored heads left after "
                             f"excluding {len(exclude)}")
    if condition == "high":
        return top_heads(scores, n, exclude)
    if condition == "low":
        return low_matched(scores, n, exclude)
    return random_matched(scores, n, control_seed, exclude)
