"""Attention knockout of the induction edges in chosen heads (``ablation=knockout``).

The induction pattern (Olsson et al. 2022, "In-context Learning and Induction Heads", the
pattern Crosbie & Shutova 2025 knock out): a query at absolute position ``i`` holding token
``t[i]`` attends to the position right after an earlier occurrence of that token. An
*induction edge* is a (query ``i``, key ``j``) pair with

    1 <= j <= i  and  t[j - 1] == t[i]

(the earlier occurrence ``j - 1`` lies strictly before ``i``; ``j = i`` counts where
``t[i - 1] == t[i]``). Positions are absolute: a token's index among its row's real tokens,
as it has when its sequence runs alone (padding and masked cache columns skipped), so the
edges are the same in a padded batch, with a key/value cache, and in one-story ``generate``.

Two ways to remove an edge (:class:`ih_sweep.config.schema.KnockoutMode`):

- ``mask`` (the default): the edge's score is set to -inf before the softmax, so the head's
  remaining weights are renormalised to sum to 1. This is the attention knockout of Geva et
  al. 2023 ("Dissecting Recall of Factual Associations", M[i, j] = -inf), which Crosbie &
  Shutova 2025 follow to block the induction pattern.
- ``zero``: the edge's weight is set to 0 after the softmax, the rest left as they are (the
  row then sums to less than 1), as in Wang et al. 2023 ("Label Words are Anchors", A[i, j]
  = 0).

Everything else of the head stays (its queries, keys, values, other edges); heads not
chosen and layers without chosen heads are not touched.

How it is done: :func:`knock_out` switches the model (transformers' public
``set_attn_implementation``) to a function registered with transformers'
``AttentionInterface``. In a layer with chosen heads it runs the layer's own family's
``eager_attention_forward`` (the model file's reference attention, the one place that
knows scaling, softcapping, grouped keys of that family) with the knocked-out edges masked
in the chosen heads (``mask``), or with its weights' edges zeroed and the output recomputed
from them (``zero``); every other layer runs the implementation the model was on (eager or
sdpa) unchanged. The tokens every key column holds come from a model-level forward
pre-hook (:func:`track_tokens`): the call's ``input_ids`` after the tokens recorded for its
cache's columns (in the model's :class:`~ih_sweep.model.forward.ForwardContext`; a cache whose
rows are copied or selected must go through
:meth:`~ih_sweep.model.forward.ForwardContext.repeat_cache_rows` /
:meth:`~ih_sweep.model.forward.ForwardContext.select_cache_rows`), so decoding with a cache sees
the edges of the whole sequence so far. Where the tokens cannot be told (embeddings fed
instead of ids, a cache the hook has not seen fill, a cache of another length than its
keys), the pass raises :class:`EdgesUnknown` instead of guessing.
"""

from __future__ import annotations

import sys
import weakref
from collections.abc import Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ih_sweep.model.forward import ForwardContext, leaves_layers_alone
from ih_sweep.model.positions import forward_arguments, positions_from_mask
from ih_sweep.model.shape import UnsupportedArchitecture
from ih_sweep.model.sites import attention_module, head_sites

# the implementations the knocked-out layers can stand in for (each name's own registered
# function and mask): the model's other layers keep theirs
BASES = ("eager", "sdpa")
MODES = ("mask", "zero")


class EdgesUnknown(UnsupportedArchitecture):
    """A forward pass whose keys' tokens cannot be told, or a model the knockout cannot
    run on: the knockout refuses to guess."""


@dataclass
class TokenHistory:
    """The tokens a key/value cache's columns hold, [batch, columns], and which columns are
    real (not padding, not masked-out teacher tokens), [batch, columns] bool."""

    tokens: torch.Tensor
    valid: torch.Tensor

    def repeat_rows(self, n: int) -> TokenHistory:
        return TokenHistory(self.tokens.repeat_interleave(n, 0),
                            self.valid.repeat_interleave(n, 0))

    def select_rows(self, index: torch.Tensor) -> TokenHistory:
        index = index.to(self.tokens.device)
        return TokenHistory(self.tokens[index], self.valid[index])


@dataclass
class PassTokens:
    """One forward call's keys: ``history`` (cached columns and the call's own, in key
    order) and ``new`` (how many of them, at the end, are the call's queries). The edges
    [batch, new, keys] are computed once per call, at the first layer that asks."""

    history: TokenHistory
    new: int
    _edges: torch.Tensor | None = field(default=None, repr=False)

    def edges(self) -> torch.Tensor:
        if self._edges is None:
            self._edges = induction_edges(self.history.tokens, self.history.valid, self.new)
        return self._edges


def induction_edges(tokens: torch.Tensor, valid: torch.Tensor, new: int) -> torch.Tensor:
    """The induction edges (module docstring) of the last ``new`` columns' queries:
    [batch, new, columns] bool, True where query column ``c`` (of the last ``new``) and key
    column ``j`` are both real and ``1 <= pos[j] <= pos[c]``, ``t[pos[j] - 1] == t[c]``,
    with ``pos`` each real column's index among its row's real columns and ``t`` the row's
    real tokens in that order. ``tokens`` [batch, columns] ids, ``valid`` [batch, columns]
    bool (the 2-D attention mask)."""
    batch, width = tokens.shape
    valid = valid.to(tokens.device).bool()
    pos = positions_from_mask(valid.long())  # [batch, columns]
    # the row's real tokens packed in position order (index ``width``: a bin for the rest)
    packed = tokens.new_full((batch, width + 1), -1)
    packed.scatter_(1, torch.where(valid, pos, width), tokens)
    before = packed.gather(1, (pos - 1).clamp(min=0))  # t[pos[j] - 1]
    before = before.masked_fill((pos < 1) | ~valid, -1)  # no earlier token: never an edge
    q = slice(width - new, width)
    query_tok = tokens[:, q].masked_fill(~valid[:, q], -2)  # a pad query matches nothing
    same = before[:, None, :] == query_tok[:, :, None]  # [batch, new, columns]
    causal = pos[:, None, :] <= pos[:, q, None]
    return same & causal & valid[:, None, :] & valid[:, q, None]


@contextmanager
def track_tokens(model: nn.Module, ctx: ForwardContext | None = None) -> Iterator[None]:
    """While inside, every forward call of ``model`` records its keys' tokens
    (:class:`PassTokens`, in ``ctx``, this thread only) and, when it fills a key/value cache,
    the tokens of the cache's columns (:meth:`ForwardContext.set_history`). Raises
    :class:`EdgesUnknown` for a call without ``input_ids``, with a cache whose columns it did
    not see filled (or of another batch), or with a mask that does not cover the cached and
    new tokens."""
    ctx = ctx if ctx is not None else ForwardContext.of(model)

    def before(module, args, kwargs):
        ctx.push_tokens(None)  # popped by ``after`` also when this raises
        ctx.set_tokens(pass_tokens(module, args, kwargs, ctx))

    def after(module, args, kwargs, output):
        try:
            adopt_new_cache(ctx, output)
        finally:
            ctx.pop_tokens()

    handles = [model.register_forward_pre_hook(leaves_layers_alone(before, mark=True),
                                               with_kwargs=True),
               model.register_forward_hook(leaves_layers_alone(after, mark=True),
                                           with_kwargs=True, always_call=True)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def adopt_new_cache(ctx: ForwardContext, output: Any) -> None:
    """A key/value cache the model made inside the call that just ended (transformers
    before the ``cache`` argument, e.g. 5.0: ``generate``'s first pass gets no cache and
    the model makes one) holds exactly that call's keys: record their tokens for it, so the
    next call on it knows them. A cache already known, or of another length, is left alone."""
    current = ctx.tokens
    made = getattr(output, "past_key_values", None)
    if made is None:
        made = getattr(output, "cache", None)
    if current is None or made is None or not hasattr(made, "get_seq_length") or \
            ctx.history(made) is not None:
        return
    if int(made.get_seq_length()) == current.history.tokens.shape[1]:
        ctx.set_history(made, current.history)


def pass_tokens(model: nn.Module, args: tuple, kwargs: dict, ctx: ForwardContext) -> PassTokens:
    """The keys' tokens of one forward call of ``model`` (see :func:`track_tokens`)."""
    named = forward_arguments(model, args, kwargs)
    ids = named.get("input_ids")
    name = type(model).__name__
    if ids is None or ids.dim() != 2:
        raise EdgesUnknown(f"ablation=knockout: a forward call of {name} without 2-D "
                           "input_ids (embeddings fed?): the tokens its edges follow are unknown")
    batch, length = ids.shape
    cache = named.get("cache", named.get("past_key_values"))
    past = int(cache.get_seq_length()) if cache is not None and \
        hasattr(cache, "get_seq_length") else 0
    held = None
    if past:
        held = ctx.history(cache)
        if held is None or held.tokens.shape[1] != past:
            raise EdgesUnknown(f"ablation=knockout: {name} is called with a cache of {past} "
                               "tokens whose filling was not seen: the tokens its keys hold "
                               "are unknown")
        if held.tokens.shape[0] == 1 and batch > 1:
            held = held.repeat_rows(batch)
        if held.tokens.shape[0] != batch:
            raise EdgesUnknown(f"ablation=knockout: {name} is called with {batch} rows on a "
                               f"cache of {held.tokens.shape[0]} (rows selected without "
                               "ForwardContext.select_cache_rows): the keys' tokens are unknown")
    tokens = ids if held is None else torch.cat([held.tokens.to(ids.device), ids], 1)
    mask = named.get("attention_mask")
    if mask is not None and mask.dim() == 2:
        if tuple(mask.shape) != (batch, past + length):
            raise EdgesUnknown(f"ablation=knockout: {name}: attention_mask of shape "
                               f"{tuple(mask.shape)} for {length} new tokens after {past} "
                               "cached ones: the keys' positions are unknown")
        valid = mask.to(ids.device).bool()
    else:
        own = torch.ones_like(ids, dtype=torch.bool)
        valid = own if held is None else torch.cat([held.valid.to(ids.device), own], 1)
    history = TokenHistory(tokens, valid)
    if cache is not None and named.get("use_cache", True) is not False:
        ctx.set_history(cache, history)
    return PassTokens(history, length)


# --------------------------------------------------------------------------- attention
@dataclass(frozen=True)
class LayerKnockout:
    """What the registered function does in one attention module: ``heads`` (query-head
    indices) of it knocked out by ``mode``; ``eager`` the family's reference attention;
    ``ctx`` the model's forward context (the pass's tokens)."""

    heads: tuple[int, ...]
    mode: str
    eager: object
    ctx: ForwardContext


_KNOCKED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # attention module -> it
_registered: set[str] = set()


def function_name(base: str) -> str:
    """The AttentionInterface name standing in for implementation ``base``."""
    return f"ih_sweep_knockout_{base}"


def _register(base: str) -> str:
    name = function_name(base)
    if name in _registered:
        return name
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask, sdpa_mask

    plain = AttentionInterface()[base] if base != "eager" else None

    def attention(module, query, key, value, attention_mask, **kwargs):
        knock = _KNOCKED.get(module)
        if knock is None:  # a layer without chosen heads: the implementation it was on
            run = plain if plain is not None else _family_eager(module)
            return run(module, query, key, value, attention_mask, **kwargs)
        return knocked_attention(knock, module, query, key, value, attention_mask, **kwargs)

    AttentionInterface.register(name, attention)
    AttentionMaskInterface.register(name, eager_mask if base == "eager" else sdpa_mask)
    _registered.add(name)
    return name


def _family_eager(module):
    """The ``eager_attention_forward`` of the module's own modeling file."""
    fn = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
    if fn is None:
        raise EdgesUnknown(f"ablation=knockout: {type(module).__name__}'s modeling file has no "
                           "eager_attention_forward to run the knocked-out heads with")
    return fn


def _additive(mask: torch.Tensor | None, query: torch.Tensor, keys: int) -> torch.Tensor:
    """The call's mask as an additive float mask [b, 1 or h, T, keys] of the query's dtype
    (None: causal, query t at key ``keys - T + t``)."""
    low = torch.finfo(query.dtype).min
    if mask is None:
        t = query.shape[2]
        idx = torch.arange(keys, device=query.device)
        allowed = idx[None, :] <= (keys - t + torch.arange(t, device=query.device))[:, None]
        return torch.zeros((), dtype=query.dtype, device=query.device).masked_fill(
            ~allowed, low)[None, None]
    mask = mask[..., :keys]
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=query.dtype, device=query.device).masked_fill(
            ~mask, low)
    return mask.to(query.dtype)


def knocked_attention(knock: LayerKnockout, module, query: torch.Tensor, key: torch.Tensor,
                      value: torch.Tensor, attention_mask: torch.Tensor | None, **kwargs
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """The layer's attention ([B, H, T, D] query, [B, KV, S, D] key/value; out [B, T, H, D],
    transformers' convention) by its family's eager attention, with the induction edges of
    ``knock.heads`` removed (:data:`MODES`)."""
    passing = knock.ctx.tokens
    batch, heads, length, _ = query.shape
    keys = key.shape[2]
    if passing is None:
        raise EdgesUnknown("ablation=knockout: an attention module ran outside a forward call "
                           "of the model it was installed on: the tokens are unknown")
    edges = passing.edges()  # [batch, new, columns]
    if tuple(edges.shape) != (batch, length, keys):
        raise EdgesUnknown(f"ablation=knockout: the layer sees {length} queries on {keys} keys "
                           f"but the pass fed {edges.shape[1]} tokens on {edges.shape[2]} "
                           "(a cache that drops keys, e.g. a sliding window?): refused")
    chosen = torch.zeros(heads, dtype=torch.bool, device=query.device)
    chosen[list(knock.heads)] = True
    block = edges.to(query.device)[:, None] & chosen[None, :, None, None]  # [B, H, T, S]
    base = _additive(attention_mask, query, keys)
    eager = knock.eager
    kwargs.pop("is_causal", None)
    if knock.mode == "mask":
        masked = base.masked_fill(block, torch.finfo(query.dtype).min)
        return eager(module, query, key, value, masked, **kwargs)
    _, weights = eager(module, query, key, value, base, **kwargs)
    weights = weights.masked_fill(block, 0)
    groups = heads // value.shape[1]
    v = value.repeat_interleave(groups, 1) if groups > 1 else value
    out = torch.matmul(weights.to(v.dtype), v).transpose(1, 2).contiguous()
    return out, weights


@contextmanager
def knock_out(model: nn.Module, heads: Sequence[tuple[int, int]] | Mapping[int, Sequence[int]],
              mode: str = "mask", ctx: ForwardContext | None = None) -> Iterator[None]:
    """While inside, the induction edges of ``heads`` ((layer, query head) pairs, or query
    heads by layer) are knocked out by ``mode`` (:data:`MODES`) in every forward call of
    ``model`` (module docstring). The model must be on ``eager`` or ``sdpa``; its previous
    implementation is put back on exit. Raises :class:`EdgesUnknown` (one line) for another
    implementation, an unknown mode, or a layer without an attention module."""
    from ih_sweep.model.attention import attention_implementation

    if mode not in MODES:
        raise EdgesUnknown(f"ablation.knockout={mode!r}; allowed values: {', '.join(MODES)}")
    ctx = ctx if ctx is not None else ForwardContext.of(model)
    sites = head_sites(model)
    by_layer: dict[int, list[int]] = {}
    pairs = heads.items() if isinstance(heads, Mapping) else \
        [(la, [h]) for la, h in heads]
    for layer, hs in pairs:
        by_layer.setdefault(int(layer), []).extend(int(h) for h in hs)
    if not by_layer:
        yield
        return
    text = model.config.get_text_config(decoder=True)
    base = getattr(text, "_attn_implementation", None) or "eager"
    if base not in BASES:
        raise EdgesUnknown(f"ablation=knockout: model.attn_implementation={base} is not "
                           f"supported; allowed values: {', '.join(BASES)}")
    modules = {}
    for layer, hs in by_layer.items():
        attn = attention_module(sites.layers[layer])
        if attn is None:
            raise EdgesUnknown(f"ablation=knockout: layer {layer} has no attention module")
        modules[attn] = LayerKnockout(tuple(sorted(set(hs))), mode, _family_eager(attn), ctx)
    with ExitStack() as stack:
        stack.enter_context(attention_implementation(model, _register(base)))
        stack.enter_context(track_tokens(model, ctx))
        _KNOCKED.update(modules)
        stack.callback(lambda: [_KNOCKED.pop(m, None) for m in modules])
        yield
