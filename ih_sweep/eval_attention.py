"""Attention for the evaluator's teacher-forced pass: the same outputs where they are read,
with less work.

Two facts of that pass make work skippable:

* Its rows are right-padded, so causality alone keeps every real query away from padding:
  no padding mask is needed. On CPU the causal triangle is then computed in query blocks
  (PyTorch's CPU flash kernel computes the whole square for prompts under 512 tokens).
* Only a few positions per row are read (each prompt's last token and the teacher tokens
  after it). In the last layer nothing else depends on the other positions, so only those
  queries are computed; the rest get zeros, which nothing reads. For the Llama-family decoder
  layer (Llama, Mistral, Qwen2) the whole last layer runs at the read positions (keys and
  values still at all of them); other families restrict only its attention. On a 2-layer
  model that is half the work; on a 32-layer model ~3% of it.

In the other Llama-family layers the attention module's forward is this module's too: the
rotary embedding is applied on the projections' own [B, T, heads, D] layout with fewer passes
(:func:`rotate`) and the causal attention is called directly (4-6% of the tiny model's
evaluation time).

:func:`fast_attention` installs this once per evaluation; only passes inside :func:`read_at`
(a context variable, so per thread) take the shortcuts, every other call on the model is the
plain one. Batches evaluated in several threads at once therefore share one installation.

Keys may begin with a cached prefix shared by every row (no padding in it): query i then sits
at key position ``offset + i``. Any call that does not fit (dropout, a sliding window shorter
than the row, softcapping, attention sinks, position biases) goes to transformers' sdpa
unchanged.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

import torch
import torch.nn.functional as F

NAME = "ih_sweep_eval"
CPU_QUERY_BLOCK = 32  # 32-64 equally fast for ~150-token rows on 2 cores; unblocked 18% slower
_READ: ContextVar[torch.Tensor | None] = ContextVar("ih_sweep_read_positions", default=None)
_registered = False


def _register() -> None:
    global _registered
    if _registered:
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(NAME, attention)
    AttentionMaskInterface.register(NAME, sdpa_mask)  # used only by calls passed to sdpa
    _registered = True


@contextmanager
def fast_attention(model) -> Iterator[bool]:
    """Install the evaluator's attention on ``model`` while inside; yields whether it is on.

    Installed, it changes nothing by itself: only forward passes run inside
    :func:`read_at` (in the same thread) take the shortcuts; every other call gets sdpa and
    the layers' own forwards, as before. So one installation can serve batches evaluated in
    several threads at once. Models on another attention kernel (eager, flash-attention,
    flex) keep theirs, and so do models that do not route attention through transformers'
    AttentionInterface. Re-entrant: an inner call on an installed model changes nothing."""
    config = model.config
    previous = config._attn_implementation
    if previous == NAME:
        yield True
        return
    if previous not in ("sdpa", None) or \
            not getattr(model, "_supports_attention_backend", False):
        yield False
        return
    _register()
    config._attn_implementation = NAME
    layers = _llama_layers(model)
    patched = []  # (module, what to put back)
    for i, layer in enumerate(layers):
        if layer is None:
            continue
        if i == len(layers) - 1:
            patched.append((layer, _patch(layer, _read_only_layer(layer, layer.forward))))
        else:
            attn = layer.self_attn
            patched.append((attn, _patch(attn, _read_only_attention(attn, attn.forward))))
    try:
        yield True
    finally:
        for module, own in reversed(patched):
            _unpatch(module, own)
        config._attn_implementation = previous


@contextmanager
def read_at(positions: torch.Tensor) -> Iterator[None]:
    """Inside (this thread/context only), a forward pass of a model under
    :func:`fast_attention`, over right-padded rows (after, optionally, a cached prefix shared
    by all rows), is exact at ``positions`` [rows, k] of its input and at every position
    before the last layer."""
    token = _READ.set(positions)
    try:
        yield
    finally:
        _READ.reset(token)


@contextmanager
def read_only_at(model, positions: torch.Tensor) -> Iterator[bool]:
    """:func:`fast_attention` and :func:`read_at` together, for one forward pass."""
    with fast_attention(model) as on, read_at(positions):
        yield on


# --------------------------------------------------------------------------- last layer
LLAMA_FAMILY_LAYERS = ("LlamaDecoderLayer", "MistralDecoderLayer", "Qwen2DecoderLayer")


def _llama_layers(model) -> list:
    """Each decoder layer if it is the Llama-family layer this module re-runs and no
    accelerate hook (device placement across cards, offloading) wraps it, else None."""
    from .architecture import UnsupportedArchitecture, head_sites

    try:
        layers = list(head_sites(model).layers)
    except UnsupportedArchitecture:
        return []
    return [layer if _is_plain_llama_layer(layer) else None for layer in layers]


def _is_plain_llama_layer(layer) -> bool:
    attn = getattr(layer, "self_attn", None)
    if type(layer).__name__ not in LLAMA_FAMILY_LAYERS or attn is None or \
            any(hasattr(m, "_hf_hook") for m in (layer, attn)) or \
            any(hasattr(attn, name) for name in ("q_norm", "k_norm")):
        return False
    return all(hasattr(attn, name) for name in ("q_proj", "k_proj", "v_proj", "o_proj",
                                                "head_dim", "scaling", "layer_idx", "config"))


def _patch(module, forward) -> object:
    """Set an instance forward; returns what to put back (an existing wrapper, or None)."""
    own = vars(module).get("forward")
    module.forward = forward
    return own


def _unpatch(module, own) -> None:
    if own is None:
        del module.forward  # the class's forward shows again
    else:
        module.forward = own


def _rope_of(module):
    import sys

    return getattr(sys.modules[type(module).__module__], "apply_rotary_pos_emb", None)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rope) -> torch.Tensor:
    """Rotary embedding of ``x`` [B, T, n, D] (the projection's own layout, so no transposed
    copy first) with transformers' half-split convention: 4 passes over half the tensor
    instead of rotate_half's 5 over all of it. ``cos``/``sin`` [B or 1, T, D]; where their two
    halves differ (not the standard rotary table) ``rope`` (transformers' function) does it."""
    half = x.shape[-1] // 2
    if cos.shape[-1] != x.shape[-1] or not torch.equal(cos[..., :half], cos[..., half:]) or \
            not torch.equal(sin[..., :half], sin[..., half:]):
        out, _ = rope(x.transpose(1, 2), x.transpose(1, 2), cos, sin)
        return out.transpose(1, 2)
    c, s = cos[..., None, :half], sin[..., None, :half]
    x1, x2 = x[..., :half], x[..., half:]
    out = torch.empty(x.shape, dtype=torch.result_type(x, cos), device=x.device)
    o1, o2 = out[..., :half], out[..., half:]
    torch.mul(x1, c, out=o1).addcmul_(x2, s, value=-1)
    torch.mul(x2, c, out=o2).addcmul_(x1, s)
    return out.to(x.dtype)


def _cache_of(kwargs: dict):
    return kwargs.get("cache", kwargs.get("past_key_values"))


def _takes_shortcut(module, attn, hidden: torch.Tensor, args: tuple, embeddings, cache,
                    rope) -> bool:
    """Whether a call of a patched layer / attention forward fits the shortcut: inside
    :func:`read_at`, evaluation mode, keyword arguments as the decoder passes them, and no
    sliding window shorter than the cached plus new keys."""
    if _READ.get() is None or args or rope is None or embeddings is None or module.training:
        return False
    window = getattr(attn.config, "sliding_window", None)
    past = 0 if cache is None else cache.get_seq_length(attn.layer_idx)
    return not window or window >= past + hidden.shape[1]


def _keys_values(attn, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rope, cache
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotated keys and values [B, KV, T(+cached), D] of ``x`` [B, T, width]; ``cache``
    (if any) updated with them."""
    shape = (*x.shape[:2], -1, attn.head_dim)
    key = rotate(attn.k_proj(x).view(shape), cos, sin, rope).transpose(1, 2)
    value = attn.v_proj(x).view(shape).transpose(1, 2)
    if cache is not None:
        key, value = cache.update(key, value, attn.layer_idx)
    return key, value


def _read_only_attention(attn, original):
    """A forward for a Llama-family attention module that, inside :func:`read_at`, runs the
    causal attention of this module directly on the projections' own layout (see
    :func:`rotate`); ``original`` for every other call and for calls that do not fit."""
    rope = _rope_of(attn)

    def forward(hidden_states, position_embeddings=None, attention_mask=None, *args, **kwargs):
        cache = _cache_of(kwargs)
        if not _takes_shortcut(attn, attn, hidden_states, args, position_embeddings, cache,
                               rope):
            return original(hidden_states, position_embeddings, attention_mask, *args,
                            **kwargs)
        return attention_at_all(attn, hidden_states, position_embeddings, cache, rope), None

    return forward


def attention_at_all(attn, hidden: torch.Tensor,
                     embeddings: tuple[torch.Tensor, torch.Tensor], cache, rope
                     ) -> torch.Tensor:
    """The attention module's output [B, T, width] over right-padded rows (causal only);
    fills ``cache`` with its key/values."""
    batch, length, _ = hidden.shape
    cos, sin = embeddings
    query = rotate(attn.q_proj(hidden).view(batch, length, -1, attn.head_dim), cos, sin, rope)
    query = query.transpose(1, 2)
    key, value = _keys_values(attn, hidden, cos, sin, rope, cache)
    out = causal(query, key, value, attn.scaling, query.shape[1] // key.shape[1])
    return attn.o_proj(out.reshape(batch, length, -1))


def _read_only_layer(layer, original):
    """A forward for the last decoder layer that, inside :func:`read_at`, computes its
    output at the read positions only (zeros elsewhere); ``original`` for every other call
    and for calls that do not fit."""
    rope = _rope_of(layer.self_attn)

    def forward(hidden_states, *args, **kwargs):
        embeddings = kwargs.get("position_embeddings")
        cache = _cache_of(kwargs)
        if not _takes_shortcut(layer, layer.self_attn, hidden_states, args, embeddings, cache,
                               rope):
            return original(hidden_states, *args, **kwargs)
        return last_layer_at(layer, hidden_states, embeddings, _READ.get(), cache, rope)

    return forward


def last_layer_at(layer, hidden: torch.Tensor, embeddings: tuple[torch.Tensor, torch.Tensor],
                  positions: torch.Tensor, cache, rope) -> torch.Tensor:
    """The Llama-family decoder layer's output at ``positions`` [B, k], zeros elsewhere;
    fills ``cache`` with its key/values at every position."""
    attn = layer.self_attn
    batch, length, width = hidden.shape
    pos = positions.to(hidden.device)
    k = pos.shape[1]
    x = layer.input_layernorm(hidden)
    cos, sin = embeddings
    key, value = _keys_values(attn, x, cos, sin, rope, cache)
    take = pos[:, :, None]
    query = attn.q_proj(torch.gather(x, 1, take.expand(batch, k, width)))
    cos_at = torch.gather(cos.expand(batch, -1, -1), 1, take.expand(batch, k, cos.shape[-1]))
    sin_at = torch.gather(sin.expand(batch, -1, -1), 1, take.expand(batch, k, sin.shape[-1]))
    query = rotate(query.view(batch, k, -1, attn.head_dim), cos_at, sin_at, rope)
    query = query.transpose(1, 2)
    out = _attend_at(query, key, value, pos, length, attn.scaling,
                     query.shape[1] // key.shape[1])
    out = attn.o_proj(out.transpose(1, 2).reshape(batch, k, -1))
    h = torch.gather(hidden, 1, take.expand(batch, k, width)) + out
    h = h + layer.mlp(layer.post_attention_layernorm(h))
    return hidden.new_zeros(hidden.shape).scatter_(1, take.expand(batch, k, width), h)


def _plain_sdpa(module, query, key, value, attention_mask, **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def _fits(query: torch.Tensor, key: torch.Tensor, dropout: float, kwargs: dict) -> bool:
    length = query.shape[2]
    window = kwargs.get("sliding_window")
    return (key.shape[2] >= length and not dropout
            and all(kwargs.get(k) is None for k in ("softcap", "s_aux", "position_bias"))
            and kwargs.get("is_causal", True) is not False
            and (not window or window >= key.shape[2]))


def _is_last_layer(module) -> bool:
    layer = getattr(module, "layer_idx", None)
    config = getattr(module, "config", None)
    n_layers = getattr(config, "num_hidden_layers", None)
    return layer is not None and n_layers is not None and layer == n_layers - 1


def attention(module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
              attention_mask: torch.Tensor | None, dropout: float = 0.0,
              scaling: float | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    """An AttentionInterface function: [B, H, T, D] query, [B, KV, T, D] key/value in,
    [B, T, H, D] out (transformers' convention)."""
    positions = _READ.get()
    if positions is None or not _fits(query, key, dropout, kwargs):
        return _plain_sdpa(module, query, key, value, attention_mask, dropout=dropout,
                           scaling=scaling, **kwargs)
    groups = query.shape[1] // key.shape[1]
    if _is_last_layer(module):
        return selected_queries(query, key, value, positions, scaling, groups), None
    return causal(query, key, value, scaling, groups), None


def _sdpa(q, k, v, groups: int, **kw) -> torch.Tensor:
    if groups > 1:
        return F.scaled_dot_product_attention(q, k, v, enable_gqa=True, **kw)
    return F.scaled_dot_product_attention(q, k, v, **kw)


def causal(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
           scaling: float | None, groups: int, block: int | None = None) -> torch.Tensor:
    """Causal attention without a padding mask (query i at key position offset + i); on CPU
    in query blocks that see only the keys up to their end."""
    length = query.shape[2]
    offset = key.shape[2] - length
    block = block or CPU_QUERY_BLOCK
    if offset == 0 and (query.device.type != "cpu" or length <= block):
        out = _sdpa(query, key, value, groups, is_causal=True, scale=scaling)
        return out.transpose(1, 2).contiguous()
    if query.device.type != "cpu":
        block = length  # one call with an explicit mask
    out = query.new_empty(query.shape[0], length, query.shape[1], query.shape[3])
    index = torch.arange(offset + length, device=query.device)
    for start in range(0, length, block):
        end = min(length, start + block)
        mask = index[None, :offset + end] <= index[offset + start:offset + end, None]
        part = _sdpa(query[:, :, start:end], key[:, :, :offset + end],
                     value[:, :, :offset + end], groups, attn_mask=mask, scale=scaling)
        out[:, start:end] = part.transpose(1, 2)
    return out


def _attend_at(query_at: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
               positions: torch.Tensor, length: int, scaling: float | None, groups: int
               ) -> torch.Tensor:
    """Attention of queries already taken at ``positions`` [B, k] of a ``length``-long input
    whose keys may begin with a shared cached prefix: [B, H, k, D]."""
    offset = key.shape[2] - length
    mask = (torch.arange(key.shape[2], device=key.device)[None, None, :]
            <= offset + positions[:, :, None])
    return _sdpa(query_at, key, value, groups, attn_mask=mask[:, None], scale=scaling)


def selected_queries(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     positions: torch.Tensor, scaling: float | None, groups: int
                     ) -> torch.Tensor:
    """Attention outputs at query ``positions`` [B, k] only; zeros elsewhere."""
    batch, heads, length, dim = query.shape
    pos = positions.to(query.device)
    k = pos.shape[1]
    q = torch.gather(query, 2, pos[:, None, :, None].expand(batch, heads, k, dim))
    part = _attend_at(q, key, value, pos, length, scaling, groups)
    out = query.new_zeros(batch, length, heads, dim)
    out.scatter_(1, pos[:, :, None, None].expand(batch, k, heads, dim), part.transpose(1, 2))
    return out
