"""The evaluator's attention function, registered with transformers' ``AttentionInterface``:
causal attention without a padding mask (in query blocks on CPU), and in the last layer the
read positions' queries only. It takes the shortcut only inside
:func:`ih_sweep.model.forward.reading` (per thread) and for calls its allow-list
(:func:`_fits`) covers; every other call goes to transformers' sdpa unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ih_sweep.model.forward import read_positions

NAME = "ih_sweep_eval"
CPU_QUERY_BLOCK = 32  # 32-64 equally fast for ~150-token rows on 2 cores; unblocked 18% slower
_registered = False


def register() -> None:
    """Register :func:`attention` (and sdpa's mask) with transformers under :data:`NAME`,
    once per process."""
    global _registered
    if _registered:
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(NAME, attention)
    AttentionMaskInterface.register(NAME, sdpa_mask)  # used only by calls passed to sdpa
    _registered = True


def plain_sdpa(module, query, key, value, attention_mask, **kwargs):
    """transformers' own sdpa attention function (every call the shortcut does not take)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


# keyword arguments of an AttentionInterface call that the shortcut handles. Inert ones
# (sdpa_attention_forward ignores them too): positions and cache flags the decoder passes on.
_INERT_KWARGS = frozenset({"position_ids", "use_cache", "cache_position"})
# ones the shortcut handles for some values only: see _fits
_OFF_WHEN_NONE = frozenset({"softcap", "s_aux", "position_bias"})


def _fits(module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
          dropout: float, kwargs: dict, read: tuple[torch.Tensor, int, int]) -> bool:
    """Whether an AttentionInterface call takes the shortcut (an allow-list): every keyword
    argument is inert, or ``sliding_window`` (None/0 or covering every key), ``is_causal``
    (None or True), or softcap / s_aux / position_bias set to None; no dropout, the module
    in evaluation mode and causal; [B, H, T, D] query with key/value [B, KV, >= T, D] of one
    dtype and device, H a multiple of KV; one read-position row per batch row, inside T."""
    for name, value_ in kwargs.items():
        if name in _INERT_KWARGS:
            continue
        if name in _OFF_WHEN_NONE and value_ is None:
            continue
        if name == "sliding_window" and (not value_ or value_ >= key.shape[2]):
            continue
        if name == "is_causal" and value_ in (None, True):
            continue
        return False
    if dropout or getattr(module, "training", True) or \
            getattr(module, "is_causal", True) is not True:
        return False
    if query.dim() != 4 or key.dim() != 4 or value.shape != key.shape or \
            not query.dtype == key.dtype == value.dtype or \
            not query.device == key.device == value.device:
        return False
    batch, heads, length, dim = query.shape
    if key.shape[0] != batch or key.shape[3] != dim or key.shape[2] < length or \
            heads % key.shape[1]:
        return False
    _, rows, top = read
    return rows == batch and top < length


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
    read = read_positions()
    if read is None or not _fits(module, query, key, value, dropout, kwargs, read):
        return plain_sdpa(module, query, key, value, attention_mask, dropout=dropout,
                          scaling=scaling, **kwargs)
    positions = read[0]
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


def attend_at(query_at: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
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
    part = attend_at(q, key, value, pos, length, scaling, groups)
    out = query.new_zeros(batch, length, heads, dim)
    out.scatter_(1, pos[:, :, None, None].expand(batch, k, heads, dim), part.transpose(1, 2))
    return out
