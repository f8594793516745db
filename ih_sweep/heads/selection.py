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

Norm matching (``control.match=layer_norm``, :func:`norm_matched`): a random control drawn
layer by layer as :func:`random_matched`'s, each drawn head's mean output norm
(:mod:`ih_sweep.heads.output_norms`) within a factor ``control.norm_factor`` of the top head
it stands for, so the control writes about as much into the residual stream as the heads it
is compared with.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from collections.abc import Collection, Sequence

import numpy as np

from ih_sweep.config.errors import UserError
from ih_sweep.config.rules import n_heads_share
from ih_sweep.config.schema import Condition

Head = tuple[int, int]
log = logging.getLogger("ih_sweep")


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


def within_factor(norm: float, target: float, factor: float) -> bool:
    """Whether ``norm`` lies within a factor ``factor`` (> 1) of ``target``, either way:
    target / factor <= norm <= target x factor (a zero target admits only zero)."""
    return bool(target / factor <= norm <= target * factor)


def _matchable(targets: Sequence[float], norms: Sequence[float], factor: float) -> bool:
    """Whether each of ``targets`` can get its own one of ``norms`` within ``factor``
    (:func:`within_factor`). Exact: every target's window [t / f, t x f] grows with t, so
    taking the windows in ascending order and giving each the smallest free norm inside
    it finds a matching whenever one exists (the greedy matching of intervals to points,
    windows ordered by their right ends)."""
    points = sorted(norms)
    j = 0
    for t in sorted(targets):
        while j < len(points) and points[j] < t / factor:
            j += 1
        if j == len(points) or not within_factor(points[j], t, factor):
            return False
        j += 1
    return True


def norm_matched(scores: np.ndarray, norms: np.ndarray, n: int, seed: int, factor: float,
                 exclude: Collection[Head] = ()) -> list[Head]:
    """A layer- and norm-matched random control for the top-n (``control.match=layer_norm``),
    drawn with ``seed``: in each layer holding k of the top-n (layers in order), k heads
    outside the top-n and ``exclude`` (scored, with a finite norm), the i-th of them
    standing for the layer's i-th top head (in top order) and its output norm ``norms``
    [layers, heads] (:mod:`ih_sweep.heads.output_norms`) within a factor ``factor`` of
    that head's (:func:`within_factor`).

    The rule: a caliper on log output norm, |log(norm / top head's norm)| <= log(factor),
    one control head per top head (caliper matching, Cochran & Rubin 1973, "Controlling
    bias in observational studies: a review", Sankhya A 35(4); Rosenbaum &
    Rubin 1985, "Constructing a control group using multivariate matched sampling methods
    that incorporate the propensity score", The American Statistician 39(1)): a ratio,
    not a difference, because output norms are scales (a model's residual stream has its
    own), and per head, not per set, so that no mix of very large and very small heads
    passes for a match. The default factor 2 is a project choice: on the tiny model N = 8
    has no control within 1.5 and has one within 2 (N = 16 has none within 4: its layer
    holds just 16 other heads, the low control's, which match within 5).

    The draw: the layer's top heads in top order, each taking a head drawn uniformly among
    those within its window that leave the rest a matching (:func:`_matchable`), so a
    control is refused only where none exists. Raises :class:`SelectionError` (one line,
    naming ``control.match``, ``control.norm_factor`` and what is allowed) where a layer
    has none."""
    top = top_heads(scores, n, exclude)
    taken = set(top) | {(int(la), int(h)) for la, h in exclude}
    rng = np.random.default_rng(seed)
    out: list[Head] = []
    for layer in sorted(layer_counts(top)):
        wanted = [norms[layer, h] for la, h in top if la == layer]
        pool = [h for h in range(scores.shape[1]) if (layer, h) not in taken
                and np.isfinite(scores[layer, h]) and np.isfinite(norms[layer, h])]
        if not _matchable(wanted, [norms[layer, h] for h in pool], factor):
            others = [norms[layer, h] for h in pool]
            span = f"{min(others):.3g} to {max(others):.3g}" if others else "none"
            raise SelectionError(
                f"control.match=layer_norm cannot match n_heads={n}: layer {layer} has no "
                f"{len(wanted)} heads outside the top-{n}{' and the excluded' if exclude else ''}"
                f" whose output norms each lie within a factor control.norm_factor={factor:g} "
                f"of the top head they stand for (top heads' norms {min(wanted):.3g} to "
                f"{max(wanted):.3g}, the others' {span}); allowed: a larger "
                "control.norm_factor, a smaller n_heads, or control.match=layer")
        eligible = [h for h in pool if any(within_factor(norms[layer, h], t, factor)
                                            for t in wanted)]
        if len(eligible) == len(wanted):
            log.info("control.match=layer_norm: layer %d has just %d heads within a factor %g "
                     "of its top heads' output norms, so every control seed draws these "
                     "heads (only which top head each stands for changes)", layer,
                     len(wanted), factor)
        for i, target in enumerate(wanted):
            fits = [h for h in pool if within_factor(norms[layer, h], target, factor)
                    and _matchable(wanted[i + 1:], [norms[layer, g] for g in pool if g != h],
                                   factor)]
            pick = fits[int(rng.integers(len(fits)))]
            out.append((layer, int(pick)))
            pool.remove(pick)
    return out


def select_heads(scores: np.ndarray, condition: str, n: int, control_seed: int = 0,
                 exclude: Collection[Head] = (), match: str = "layer",
                 norms: np.ndarray | None = None, norm_factor: float = 2.0) -> list[Head]:
    """Heads to ablate for one (condition, n, control_seed), none of ``exclude`` (see the
    module docstring). ``match`` (``control.match``) says how ``random`` is matched to the
    top-n: ``layer`` (:func:`random_matched`) or ``layer_norm`` (:func:`norm_matched` on
    ``norms`` [layers, heads] with ``norm_factor``; the other conditions ignore it)."""
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
    if match == "layer_norm":
        if norms is None:
            raise ValueError("control.match=layer_norm needs the heads' output norms")
        return norm_matched(scores, norms, n, control_seed, norm_factor, exclude)
    return random_matched(scores, n, control_seed, exclude)
