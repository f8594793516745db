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

from ih_sweep.ablation.registry import AblationError, get_ablation, head_set_methods
from ih_sweep.model.forward import ForwardContext
from ih_sweep.model.positions import current_positions, track_positions
from ih_sweep.model.sites import HeadSites, head_sites, hook_z

__all__ = ["AblationError", "ablate_head_sets", "ablate_heads", "head_columns", "head_sets",
           "heads_by_layer", "require_unablated", "row_dependent", "sequence_keys"]


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


@contextmanager
def head_sets(model, sets: Sequence[int]) -> Iterator[None]:
    """Inside (this thread), the forward passes of ``model`` ablate head set ``sets[b]`` (an
    index into the sets given :func:`ablate_head_sets`) in batch row ``b``, one per row."""
    with ForwardContext.of(model).head_sets(sets):
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


# --------------------------------------------------------------------------- one head set a row
def set_masks(sites: HeadSites, sets: Sequence[Sequence[tuple[int, int]]]
              ) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """Per layer holding a head of any of ``sets``: (the o_proj input columns of the union of
    the sets' heads there [U * head_dim] (long), which of those columns each set ablates
    [len(sets), U * head_dim] (bool)). Raises :class:`AblationError` for a head outside the
    model."""
    per_set = [heads_by_layer(sites, heads) for heads in sets]
    out = {}
    for layer in sorted({la for by_layer in per_set for la in by_layer}):
        union = sorted({h for by_layer in per_set for h in by_layer.get(layer, ())})
        heads = torch.zeros(len(sets), len(union), dtype=torch.bool)  # [sets, U]
        for i, by_layer in enumerate(per_set):
            for h in by_layer.get(layer, ()):
                heads[i, union.index(h)] = True
        out[layer] = (head_columns(sites, union),
                      heads.repeat_interleave(sites.head_dim, dim=1))
    return out


@contextmanager
def ablate_head_sets(model, sets: Sequence[Sequence[tuple[int, int]]], method: Any = "zero",
                     fill: Any = None) -> Iterator[None]:
    """Several head sets in one forward pass, one a batch row: batch row ``b`` of a pass
    inside :func:`head_sets` ``(model, index)`` is ablated as :func:`ablate_heads` ``(model,
    sets[index[b]], method, fill)`` ablates it (several draws of a random control share one
    batch: ``control.draws_per_pass``). ``fill``: one fill for every set (the method's
    ``per_row_sets``: its value for a head does not depend on the other heads or the row's
    sequence: ``zero``, ``mean``, ``position_mean``).

    At each hooked layer, the columns of the sets' heads there (their union, U heads) of
    ``z`` [batch, pos, width] become ``where(mask, value, z)``: ``mask`` [batch, 1,
    U * head_dim] the row's set's heads (from a [sets, U * head_dim] table, indexed by the
    pass's rows), ``value`` the method's replacement of those columns (broadcastable to
    [batch, pos, U * head_dim]); other columns keep ``z``. An ablated column gets exactly
    the value :func:`ablate_heads` gives it. Raises :class:`AblationError` for a method
    other than those (resample fills a row by its sequence, knockout edits attention), heads
    outside the model or a fill the method cannot use, and, in a pass, where the rows' sets
    are unknown, of another count than the rows, or out of range."""
    ablation = get_ablation(method)
    if not getattr(ablation, "per_row_sets", False):
        raise AblationError(f"ablation.method={ablation.name} cannot ablate a different head "
                            "set in each batch row (control.draws_per_pass > 1); allowed: "
                            f"{', '.join(head_set_methods())}")
    for heads in sets:
        ablation.check_fill(fill, heads)
    sites = head_sites(model)
    masks = set_masks(sites, sets)
    cache: dict = {}  # what the method keeps on the device while inside
    on_device: dict = {}  # (layer, device) -> (columns, mask table) there
    ctx = ForwardContext.of(model)

    def replace(layer: int, z: torch.Tensor) -> torch.Tensor:
        given = ctx.row_sets
        if given is None:
            raise AblationError("a forward pass with a head set per row did not say which set "
                                "each batch row takes (ih_sweep.ablation.hooks.head_sets)")
        if len(given.sets) != z.shape[0]:
            raise AblationError(f"the pass has {z.shape[0]} rows but {len(given.sets)} head "
                                "sets were given")
        key = (layer, z.device)
        if key not in on_device:
            on_device[key] = tuple(t.to(z.device) for t in masks[layer])
        cols, table = on_device[key]
        rows = given.cache.get(z.device)
        if rows is None:
            if given.sets and not 0 <= min(given.sets) <= max(given.sets) < len(sets):
                raise AblationError(f"head sets {sorted(set(given.sets))} given, but "
                                    f"{len(sets)} sets are ablated")
            rows = given.cache[z.device] = torch.tensor(given.sets, device=z.device)
        mask = table[rows][:, None, :]  # [batch, 1, U * head_dim]
        positions = current_positions(z, ctx) if ablation.needs_positions else None
        value = ablation.replace(fill, layer, z, cols, positions, None, cache)
        value = torch.as_tensor(value, dtype=z.dtype, device=z.device)
        x = z.clone()
        x[..., cols] = torch.where(mask, value, z[..., cols])
        return x

    by_layer = {layer: [] for layer in masks}  # the layers hooked
    with ExitStack() as stack:
        if masks:
            stack.enter_context(ctx.counted("ablating"))
            stack.enter_context(ctx.counted("head_set_ablations"))
        if masks and ablation.needs_positions:
            stack.enter_context(track_positions(model, ctx))
        stack.enter_context(hook_z(sites, replace, by_layer))
        yield
