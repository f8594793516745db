"""Absolute token positions of a forward pass, for hooks that need them.

A position-dependent ablation (position-wise mean, resample) fills a head's output at a token
by the token's absolute position: its index among its row's real tokens, the position it has
when its sequence runs alone, unpadded. :func:`track_positions` records them for every forward
call of a model, in the model's :class:`~ih_sweep.model.forward.ForwardContext` (per thread);
:func:`current_positions` reads them back for an o_proj input seen by a hook.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from ih_sweep.model.forward import ForwardContext, leaves_layers_alone
from ih_sweep.model.shape import UnsupportedArchitecture


class PositionsUnknown(UnsupportedArchitecture):
    """A forward pass whose tokens' absolute positions cannot be told from its inputs (or a
    hook that needs them outside a tracked forward): position-dependent ablations refuse
    to guess."""




def forward_arguments(model: nn.Module, args: tuple, kwargs: dict) -> dict:
    """The forward call's arguments by name (positional ones bound to the signature)."""
    if not args:
        return kwargs
    try:
        return dict(inspect.signature(model.forward).bind_partial(*args, **kwargs).arguments)
    except TypeError as err:
        raise PositionsUnknown(f"{type(model).__name__}: cannot read the forward call's "
                               f"arguments to tell token positions ({err})") from None


def token_positions(model: nn.Module, args: tuple, kwargs: dict) -> torch.Tensor:
    """Absolute position [batch, T] of every token a causal-LM forward call feeds: each
    token's index among its row's real (unmasked) tokens, cached ones included. This is
    the position the token has when its sequence runs alone, unpadded (the position
    ``generate`` gives it on one story), whatever the padding side, batch or cache:

    - with a 2-D ``attention_mask`` (it covers the cached tokens and the new ones,
      transformers' convention): ``cumsum(mask) - 1`` over the whole row, the new tokens'
      part (:func:`positions_from_mask`; pads get 0). ``position_ids``, where given too,
      must agree at every real token;
    - else ``position_ids`` ([1 or batch, T]) as given;
    - else no padding: the cache's length plus 0..T-1 (what the model itself numbers).

    Raises :class:`PositionsUnknown` where the inputs do not determine positions: a mask
    whose width is not the cache's length plus T, non-2-D masks or position ids without
    the other, position ids that contradict the mask, no input_ids/inputs_embeds."""
    named = forward_arguments(model, args, kwargs)
    name = type(model).__name__
    x = named.get("input_ids")
    if x is None:
        x = named.get("inputs_embeds")
    if x is None or x.dim() < 2:
        raise PositionsUnknown(f"{name}: a forward call without input_ids or inputs_embeds; "
                               "token positions are unknown")
    batch, length = x.shape[:2]
    cache = named.get("cache", named.get("past_key_values"))
    past = int(cache.get_seq_length()) if cache is not None and \
        hasattr(cache, "get_seq_length") else 0
    mask, ids = named.get("attention_mask"), named.get("position_ids")
    if ids is not None and (ids.dim() != 2 or ids.shape[-1] != length or
                            ids.shape[0] not in (1, batch)):
        raise PositionsUnknown(f"{name}: position_ids of shape {tuple(ids.shape)} for "
                               f"[{batch}, {length}] tokens; token positions are unknown")
    if mask is not None:
        if mask.dim() != 2 or tuple(mask.shape) != (batch, past + length):
            if ids is not None and mask.dim() != 2:
                return ids.expand(batch, length)
            raise PositionsUnknown(
                f"{name}: attention_mask of shape {tuple(mask.shape)} for {length} new "
                f"tokens after {past} cached ones (expected [{batch}, {past + length}]); "
                "token positions are unknown")
        pos = positions_from_mask(mask)[:, past:]
        if ids is not None:
            real = mask[:, past:].bool()
            if not torch.equal(torch.where(real, ids.expand(batch, length).to(pos.device), 0),
                               torch.where(real, pos, 0)):
                raise PositionsUnknown(f"{name}: position_ids disagree with the "
                                       "attention mask's real-token positions; token "
                                       "positions are ambiguous")
        return pos
    if ids is not None:
        return ids.expand(batch, length)
    return (torch.arange(length, device=x.device) + past).expand(batch, length)




@contextmanager
def track_positions(model: nn.Module, ctx: ForwardContext | None = None) -> Iterator[None]:
    """While inside, every forward call of ``model`` (the module callers call: a
    ``*ForCausalLM``; ``generate`` calls it too) records its tokens' absolute positions
    (:func:`token_positions`) in ``ctx`` (default: the model's
    :class:`~ih_sweep.model.forward.ForwardContext`), for :func:`current_positions`, in the
    calling thread only. A model-level forward pre-hook (with keyword arguments) pushes them
    and a forward hook that runs also when the forward raises pops them. Re-entrant (an
    inner call installs nothing)."""
    ctx = ctx if ctx is not None else ForwardContext.of(model)
    if ctx.tracking:
        yield
        return

    def before(module, args, kwargs):
        ctx.push_positions(None)  # popped by ``after`` also when token_positions raises
        ctx.set_positions(token_positions(module, args, kwargs))

    def after(module, args, kwargs, output):
        ctx.pop_positions()

    handles = [model.register_forward_pre_hook(leaves_layers_alone(before, mark=True),
                                               with_kwargs=True),
               model.register_forward_hook(leaves_layers_alone(after, mark=True),
                                           with_kwargs=True, always_call=True)]
    try:
        with ctx.counted("tracking"):
            yield
    finally:
        for h in handles:
            h.remove()


def current_positions(z: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
    """Absolute positions [batch, pos] of the tokens of ``z`` ([batch, pos, ...], an o_proj
    input seen by a :func:`~ih_sweep.model.sites.hook_z` function), on ``z``'s device, from
    the model's context ``ctx``. Raises :class:`PositionsUnknown` outside a forward call of
    a model under :func:`track_positions`, or where ``z``'s tokens do not match the pass's."""
    pos = ctx.positions
    if pos is None:
        raise PositionsUnknown(
            "a position-dependent ablation saw a head's output outside a forward call of "
            "the model it was installed on (a submodule called directly?): token positions "
            "are unknown")
    index = ctx.z_index
    if index is not None:
        pos = torch.gather(pos, 1, index.to(pos.device))
    if tuple(pos.shape) != tuple(z.shape[:2]):
        raise PositionsUnknown(f"the heads' output has [batch, pos] = {tuple(z.shape[:2])} but "
                               f"the forward call fed {tuple(pos.shape)} tokens: token "
                               "positions are unknown")
    return pos.to(z.device)


def positions_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids [b, T] of a padded batch: each real token's index among its row's real
    tokens, 0 at pads (what transformers' ``generate`` derives, GenerationMixin
    ``_prepare_position_ids_for_generation``). Passed explicitly, they make a left-padded
    batch compute what each row computes alone: models with absolute position embeddings
    (GPT-2) otherwise number the pads too and shift every real token."""
    mask = attention_mask.long()
    return (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)

