"""The Llama-family layer patch (Llama, Mistral, Qwen2): inside
:func:`ih_sweep.model.forward.reading`, the attention modules' forward runs the rotary on the
projections' own layout and calls the causal kernel directly, the last decoder layer runs
at the read positions only, and a layer no ablation touches returns its output of an
earlier pass of the same batch where the model's store holds it (:mod:`.reuse`). Copies of
transformers' Llama-family internals (decoder layer and attention forward, their keyword
arguments, ``apply_rotary_pos_emb``); every call that does not fit (:func:`_takes_shortcut`)
goes to the layer's own forward.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch

from ih_sweep.evaluation.fastpath.kernel import attend_at, causal
from ih_sweep.evaluation.fastpath.reuse import run_layer
from ih_sweep.model.forward import (
    ForwardContext,
    leaves_layers_alone,
    own_forward,
    read_positions,
)
from ih_sweep.model.shape import UnsupportedArchitecture
from ih_sweep.model.sites import head_sites


def llama_family() -> dict[type, type]:
    """The decoder layer classes whose forward (and their attention's) this module re-runs,
    each with its attention class: exactly these classes, not subclasses (which may change
    the forward)."""
    from transformers.models.llama import modeling_llama as llama
    from transformers.models.mistral import modeling_mistral as mistral
    from transformers.models.qwen2 import modeling_qwen2 as qwen2

    return {llama.LlamaDecoderLayer: llama.LlamaAttention,
            mistral.MistralDecoderLayer: mistral.MistralAttention,
            qwen2.Qwen2DecoderLayer: qwen2.Qwen2Attention}


def patch_layers(model, ctx: ForwardContext | None = None) -> list:
    """Patch the Llama-family layers (the last one's whole forward, the others' attention
    forward); returns (module, what to put back) pairs. ``ctx``: the model's forward context
    (default: :meth:`ForwardContext.of` the model), where the last layer says which
    positions its o_proj sees."""
    ctx = ctx if ctx is not None else ForwardContext.of(model)
    layers = _llama_layers(model)
    patched = []
    for i, layer in enumerate(layers):
        if layer is None:
            continue
        if i == len(layers) - 1:
            patched.append((layer, _patch(layer, _read_only_layer(layer, layer.forward, ctx))))
        else:
            attn = layer.self_attn
            patched.append((attn, _patch(attn, _read_only_attention(attn, attn.forward))))
            if own_forward(layer) is None:  # a forward set by someone else is not hidden
                patched.append((layer, _patch(layer, _reusable_layer(layer, i, layer.forward,
                                                                     ctx))))
    return patched


def unpatch_all(patched: list) -> None:
    """Put back what :func:`patch_layers` replaced, in reverse order."""
    for module, own in reversed(patched):
        _unpatch(module, own)


def _llama_layers(model) -> list:
    """Each decoder layer if it is the Llama-family layer this module re-runs and no
    accelerate hook (device placement across cards, offloading) wraps it, else None."""
    try:
        layers = list(head_sites(model).layers)
    except UnsupportedArchitecture:
        return []
    family = llama_family()
    return [layer if is_plain_llama_layer(layer, family) else None for layer in layers]


def is_plain_llama_layer(layer, family: dict[type, type]) -> bool:
    """Whether ``layer`` is exactly one of ``family``'s decoder layers (:func:`llama_family`)
    with its own attention class, no accelerate hook, no q/k norms, and the attributes the
    patched forwards use."""
    attn = getattr(layer, "self_attn", None)
    if family.get(type(layer)) is not type(attn) or \
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


# keyword arguments the decoder passes a layer / the layer passes its attention (transformers
# 5.24) that the shortcut handles: the cache (either name), ``use_cache``, and positions that
# ``position_embeddings`` already encodes. The attention mask is dropped by design (read_at's
# contract: right-padded rows). Any other keyword: the original forward.
_LAYER_KWARGS = frozenset({"attention_mask", "position_embeddings", "position_ids", "cache",
                           "past_key_values", "use_cache", "cache_position"})


def _takes_shortcut(module, attn, hidden: torch.Tensor, args: tuple, kwargs: dict,
                    embeddings, cache, rope) -> bool:
    """Whether a call of a patched layer / attention forward fits the shortcut (an
    allow-list): inside :func:`read_at`, evaluation mode, keyword arguments only and all of
    them in :data:`_LAYER_KWARGS`, [B, T, width] hidden states with a read position row per
    batch row inside T, a rotary table for T positions, and no sliding window shorter than
    the cached plus new keys."""
    read = read_positions()
    if read is None or args or rope is None or module.training or attn.training or \
            not set(kwargs) <= _LAYER_KWARGS or not _is_cache(cache) or \
            not isinstance(embeddings, tuple) or len(embeddings) != 2 or hidden.dim() != 3:
        return False
    batch, length = hidden.shape[:2]
    cos, sin = embeddings
    _, rows, top = read
    if rows != batch or top >= length or cos.dim() != 3 or cos.shape != sin.shape or \
            cos.shape[1] != length or cos.shape[0] not in (1, batch):
        return False
    window = getattr(attn.config, "sliding_window", None)
    past = 0 if cache is None else cache.get_seq_length(attn.layer_idx)
    return not window or window >= past + length


def _is_cache(cache) -> bool:
    if cache is None:
        return True
    from transformers import DynamicCache

    return type(cache) is DynamicCache


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
        if not _takes_shortcut(attn, attn, hidden_states, args, kwargs, position_embeddings,
                               cache, rope):
            return original(hidden_states, position_embeddings, attention_mask, *args,
                            **kwargs)
        return attention_at_all(attn, hidden_states, position_embeddings, cache, rope), None

    return leaves_layers_alone(forward, mark=True)  # elsewhere: the module's own forward


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


def _reusable_layer(layer, index: int, original, ctx: ForwardContext):
    """A forward for decoder layer ``index`` (not the last) that, inside :func:`read_at` with
    a store for the pass (:attr:`ForwardContext.layer_reuse`) and while nothing touches the
    layers up to it (:func:`.reuse.untouched_layers`), returns the output an earlier pass of
    the same batch computed (:func:`.reuse.run_layer`); ``original`` for every other
    call."""
    attn = layer.self_attn
    rope = _rope_of(attn)

    def forward(hidden_states, *args, **kwargs):
        reuse = ctx.layer_reuse
        embeddings = kwargs.get("position_embeddings")
        cache = _cache_of(kwargs)
        if reuse is None or reuse.untouched <= index or \
                not _takes_shortcut(layer, attn, hidden_states, args, kwargs, embeddings,
                                    cache, rope):
            return original(hidden_states, *args, **kwargs)
        fingerprint = reuse.use.fingerprint(index)
        if fingerprint is None:  # weights the fingerprint cannot read (quantized, meta)
            return original(hidden_states, *args, **kwargs)
        cos, sin = embeddings
        return run_layer(reuse.use, (reuse.key, index, fingerprint), index, layer,
                         hidden_states, kwargs, original,
                         lambda x, kv: _keys_values(attn, x, cos, sin, rope, kv))

    return leaves_layers_alone(forward, mark=True)


def _read_only_layer(layer, original, ctx: ForwardContext):
    """A forward for the last decoder layer that, inside :func:`read_at`, computes its
    output at the read positions only (zeros elsewhere); ``original`` for every other call
    and for calls that do not fit."""
    rope = _rope_of(layer.self_attn)

    def forward(hidden_states, *args, **kwargs):
        embeddings = kwargs.get("position_embeddings")
        cache = _cache_of(kwargs)
        if not _takes_shortcut(layer, layer.self_attn, hidden_states, args, kwargs, embeddings,
                               cache, rope):
            return original(hidden_states, *args, **kwargs)
        return last_layer_at(layer, hidden_states, embeddings, read_positions()[0], cache, rope,
                             ctx)

    return leaves_layers_alone(forward, mark=True)


def last_layer_at(layer, hidden: torch.Tensor, embeddings: tuple[torch.Tensor, torch.Tensor],
                  positions: torch.Tensor, cache, rope, ctx: ForwardContext | None = None
                  ) -> torch.Tensor:
    """The Llama-family decoder layer's output at ``positions`` [B, k], zeros elsewhere;
    fills ``cache`` with its key/values at every position. ``ctx``: the model's forward
    context, told (this thread) that the o_proj call sees the tokens at ``positions`` only,
    for hooks that read token positions (None: not told)."""

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
    out = attend_at(query, key, value, pos, length, attn.scaling,
                    query.shape[1] // key.shape[1])
    # o_proj sees the read positions only (hook_z's positions)
    with ctx.z_positions_at(pos) if ctx is not None else nullcontext():
        out = attn.o_proj(out.transpose(1, 2).reshape(batch, k, -1))
    h = torch.gather(hidden, 1, take.expand(batch, k, width)) + out
    h = h + layer.mlp(layer.post_attention_layernorm(h))
    return hidden.new_zeros(hidden.shape).scatter_(1, take.expand(batch, k, width), h)
