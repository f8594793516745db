"""Head ablation at the right place: the head's slice of the attention output projection's
input (o_proj / c_proj / dense / out_proj; TransformerLens's ``hook_z``, see
:func:`ih_sweep.model.sites.hook_z`).

The notebook hooked ``post_attention_layernorm``'s output (the MLP input), which is not a head.
Hooks always come off, also when the body raises.

What replaces an ablated head's output ``z`` at every token of every forward pass while
:func:`ablate_heads` is on is the ablation method's (``ablation.method``; the methods and
their sources: :mod:`ih_sweep.ablation.zero`, :mod:`~ih_sweep.ablation.mean`,
:mod:`~ih_sweep.ablation.position_mean`, :mod:`~ih_sweep.ablation.resample`, registered in
:mod:`ih_sweep.ablation.registry`). This module names no method: :func:`ablate_heads`'
hook is the one place that reads the forward pass's state for a method, the tokens'
absolute positions (from the model-level hook of
:func:`ih_sweep.model.positions.track_positions`: attention mask, position ids, cache
length of each forward call) and which sequence each batch row holds (from the caller,
:func:`sequence_keys`), each only for a method that declares it needs it. Where either is
unknown the hook raises instead of guessing.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Hashable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from typing import Any

import torch

from ih_sweep.ablation.registry import AblationError, get_ablation
from ih_sweep.model.forward import ForwardContext
from ih_sweep.model.positions import current_positions, track_positions
from ih_sweep.model.sites import HeadSites, head_sites, hook_z

__all__ = ["AblationError", "ablate_heads", "head_columns", "heads_by_layer",
           "require_unablated", "row_dependent", "sequence_keys"]


def head_columns(sites: HeadSites, heads: Sequence[int]) -> torch.Tensor:
    """The o_proj input columns of query heads ``heads`` of one layer, side by side
    ([len(heads) * head_dim], long)."""
    return torch.cat([torch.arange(h * sites.head_dim, (h + 1) * sites.head_dim)
                      for h in heads])


def heads_by_layer(sites: HeadSites, heads: Sequence[tuple[int, int]]
                   ) -> dict[int, list[int]]:
    """``heads`` ((layer, head) pairs) grouped by layer, in their order. Raises
    :class:`AblationError` for a head outside the model."""
    by_layer: dict[int, list[int]] = defaultdict(list)
    for layer, head in heads:
        if not (0 <= layer < sites.n_layers and 0 <= head < sites.heads_per_layer):
            raise AblationError(f"head ({layer}, {head}) is outside the model's "
                                f"{sites.n_layers} layers x {sites.heads_per_layer} heads")
        by_layer[int(layer)].append(int(head))
    return by_layer


# --------------------------------------------------------------------------- row identity
# (the state lives in the model's ForwardContext, ih_sweep.model.forward)
@contextmanager
def sequence_keys(model, keys: Sequence[Hashable]) -> Iterator[None]:
    """Inside (this thread), the forward passes of ``model`` hold these sequences in their
    batch rows, one key per row (the evaluator gives each row's story index). Resample
    ablation takes each row's donor from it; other methods ignore it."""
    with ForwardContext.of(model).sequence_keys(keys):
        yield


def row_dependent(model) -> bool:
    """Whether an ablation on ``model`` fills a row by which sequence it holds (resample):
    then a prefix that all rows share must still run in every row."""
    return ForwardContext.of(model).row_dependent


# --------------------------------------------------------------------------- the hook
def require_unablated(model, what: str) -> None:
    """Raise :class:`AblationError` if ``model`` is inside :func:`ablate_heads` with heads
    ablated: ``what`` (a fill's statistics) must come from the unablated model."""
    if ForwardContext.of(model).ablating:
        raise AblationError(f"{what} must come from the unablated model: compute them "
                            "before ablate_heads")


@contextmanager
def ablate_heads(model, heads: Sequence[tuple[int, int]], method: Any = "zero",
                 fill: Any = None) -> Iterator[None]:
    """Replace the listed (layer, query head) outputs while inside, by ``method`` (a
    registered name, :func:`ih_sweep.ablation.registry.get_ablation`, or a method) with its
    ``fill`` (what its ``prepare`` returned: ``mean``: head means, ``position_mean``:
    position-wise means, ``resample``: donors for exactly these heads; None for ``zero``).

    The hook hands the method, with ``z`` [batch, pos, width] of each hooked layer, the
    tokens' absolute positions [batch, pos] if it ``needs_positions`` (the forward call of
    ``model`` is then tracked, :func:`ih_sweep.model.positions.track_positions`) and the
    batch rows' sequence keys if it is ``row_dependent`` (:func:`sequence_keys`; the model
    then says so, :func:`row_dependent`). Raises :class:`AblationError` for heads outside
    the model, an unknown method or a fill the method cannot use. A method that
    ``edits_attention`` (knockout) hooks no output: its ``attention_edit`` context is
    entered instead."""
    ablation = get_ablation(method)
    ablation.check_fill(fill, heads)
    sites = head_sites(model)
    by_layer = heads_by_layer(sites, heads)
    if ablation.edits_attention:  # knockout: the heads' attention, not their output
        with ExitStack() as stack:
            if by_layer:
                stack.enter_context(ForwardContext.of(model).counted("ablating"))
                stack.enter_context(ablation.attention_edit(model, dict(by_layer), fill))
            yield
        return
    cols = ablation.columns(fill) or \
        {layer: head_columns(sites, layer_heads) for layer, layer_heads in by_layer.items()}
    cache: dict = {}  # what the method keeps on the device while inside
    ctx = ForwardContext.of(model)

    def replace(layer: int, z: torch.Tensor) -> torch.Tensor:
        positions = current_positions(z, ctx) if ablation.needs_positions else None  # [batch, pos]
        keys = None
        if ablation.row_dependent:
            given = ctx.row_keys
            if given is None:
                raise AblationError(f"{ablation.name} ablation: a forward pass did not say "
                                    "which sequence each batch row holds (ih_sweep.ablation."
                                    "hooks.sequence_keys), so no donor can be chosen")
            if len(given.keys) != z.shape[0]:
                raise AblationError(f"{ablation.name} ablation: the pass has {z.shape[0]} rows "
                                    f"but {len(given.keys)} sequence keys were given")
            keys = given.keys
        x = z.clone()
        x[..., cols[layer].to(x.device)] = ablation.replace(fill, layer, z, cols[layer],
                                                            positions, keys, cache)
        return x

    with ExitStack() as stack:
        if by_layer:
            stack.enter_context(ctx.counted("ablating"))
        if by_layer and ablation.needs_positions:
            stack.enter_context(track_positions(model, ctx))
        if by_layer and ablation.row_dependent:
            stack.enter_context(ctx.counted("row_dependent_ablations"))
        stack.enter_context(hook_z(sites, replace, by_layer))
        yield
