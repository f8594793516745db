"""Attention for the evaluator's teacher-forced pass: the same outputs where they are read,
with less work.

Two facts of that pass make work skippable:

* Its rows are right-padded, so causality alone keeps every real query away from padding:
  no padding mask is needed. On CPU the causal triangle is then computed in query blocks
  (PyTorch's CPU flash kernel computes the whole square for prompts under 512 tokens).
* Only a few positions per row are read (each prompt's last token and the teacher tokens
  after it). In the last layer nothing else depends on the other positions, so only those
  queries are computed; the rest get zeros, which nothing reads. On a 2-layer model this
  halves the attention; on a 32-layer model it saves ~3% of it.

Any call that does not fit (a cache, dropout, a sliding window shorter than the row,
softcapping, attention sinks, position biases) goes to transformers' sdpa unchanged.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

import torch
import torch.nn.functional as F

NAME = "ih_sweep_eval"
CPU_QUERY_BLOCK = 32  # fastest of 16-80 for 160-token rows, 2 cores (benchmarks/README.md)
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
def read_only_at(model, positions: torch.Tensor) -> Iterator[bool]:
    """Inside, a forward pass over right-padded rows is exact at ``positions`` [rows, k]
    (and at every position before the last layer). Yields whether the fast path is on:
    models configured for other attention kernels (flash-attention, flex) keep theirs."""
    config = model.config
    previous = config._attn_implementation
    if previous not in ("sdpa", "eager", None):
        yield False
        return
    _register()
    token = _READ.set(positions)
    config._attn_implementation = NAME
    try:
        yield True
    finally:
        config._attn_implementation = previous
        _READ.reset(token)


def _plain_sdpa(module, query, key, value, attention_mask, **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def _fits(query: torch.Tensor, key: torch.Tensor, dropout: float, kwargs: dict) -> bool:
    length = query.shape[2]
    window = kwargs.get("sliding_window")
    return (key.shape[2] == length and not dropout
            and all(kwargs.get(k) is None for k in ("softcap", "s_aux", "position_bias"))
            and kwargs.get("is_causal", True) is not False
            and (not window or window >= length))


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
           scaling: float | None, groups: int, block: int = CPU_QUERY_BLOCK) -> torch.Tensor:
    """Causal attention without a padding mask; on CPU in query blocks that see only the
    keys up to their end."""
    length = query.shape[2]
    if query.device.type != "cpu" or length <= block:
        out = _sdpa(query, key, value, groups, is_causal=True, scale=scaling)
        return out.transpose(1, 2).contiguous()
    out = query.new_empty(query.shape[0], length, query.shape[1], query.shape[3])
    index = torch.arange(length, device=query.device)
    for start in range(0, length, block):
        end = min(length, start + block)
        mask = index[None, :end] <= index[start:end, None]
        part = _sdpa(query[:, :, start:end], key[:, :, :end], value[:, :, :end], groups,
                     attn_mask=mask, scale=scaling)
        out[:, start:end] = part.transpose(1, 2)
    return out


def selected_queries(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     positions: torch.Tensor, scaling: float | None, groups: int
                     ) -> torch.Tensor:
    """Attention outputs at ``positions`` [B, k] only; zeros elsewhere."""
    batch, heads, length, dim = query.shape
    pos = positions.to(query.device)
    k = pos.shape[1]
    q = torch.gather(query, 2, pos[:, None, :, None].expand(batch, heads, k, dim))
    mask = torch.arange(length, device=query.device)[None, None, :] <= pos[:, :, None]
    part = _sdpa(q, key, value, groups, attn_mask=mask[:, None], scale=scaling)
    out = query.new_zeros(batch, length, heads, dim)
    out.scatter_(1, pos[:, :, None, None].expand(batch, k, heads, dim), part.transpose(1, 2))
    return out
