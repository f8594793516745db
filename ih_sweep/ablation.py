"""Head ablation at the right place: the head's slice of the attention output projection's
input (o_proj / c_proj / dense / out_proj; TransformerLens's ``hook_z``, see
:func:`ih_sweep.architecture.hook_z`).

The notebook hooked ``post_attention_layernorm``'s output (the MLP input), which is not a head.
Hooks always come off, also when the body raises.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch

from .architecture import HeadSites, head_sites, hook_z, positions_from_mask
from .schema import AblationMethod, UserError


class AblationError(UserError):
    """Heads or an ablation method the model cannot take."""

    kind = "config"


def _columns(sites: HeadSites, heads: Sequence[int]) -> torch.Tensor:
    return torch.cat([torch.arange(h * sites.head_dim, (h + 1) * sites.head_dim)
                      for h in heads])


def _validate(sites: HeadSites, heads: Sequence[tuple[int, int]]) -> dict[int, list[int]]:
    by_layer: dict[int, list[int]] = defaultdict(list)
    for layer, head in heads:
        if not (0 <= layer < sites.n_layers and 0 <= head < sites.heads_per_layer):
            raise AblationError(f"head ({layer}, {head}) is outside the model's "
                                f"{sites.n_layers} layers x {sites.heads_per_layer} heads")
        by_layer[int(layer)].append(int(head))
    return by_layer


@contextmanager
def ablate_heads(model, heads: Sequence[tuple[int, int]],
                 method: AblationMethod | str = AblationMethod.zero,
                 means: dict[int, torch.Tensor] | None = None) -> Iterator[None]:
    """Replace the listed (layer, query head) outputs by zero or by their mean while inside.

    ``means[layer]`` is a [heads_per_layer * head_dim] vector (see :func:`head_means`).
    """
    allowed = [m.value for m in AblationMethod]
    if method not in allowed:
        raise AblationError(f"ablation.method={method!r}; allowed values: {', '.join(allowed)}")
    if method == AblationMethod.mean and means is None:
        raise AblationError("ablation.method=mean needs head means (head_means())")
    sites = head_sites(model)
    by_layer = _validate(sites, heads)
    cols = {layer: _columns(sites, layer_heads) for layer, layer_heads in by_layer.items()}
    fills = {layer: None if method == AblationMethod.zero else means[layer][c]
             for layer, c in cols.items()}

    def replace(layer: int, z: torch.Tensor) -> torch.Tensor:
        x = z.clone()
        c = cols[layer].to(x.device)
        fill = fills[layer]
        if fill is None:
            x[..., c] = 0
        else:
            x[..., c] = fill.to(device=x.device, dtype=x.dtype)
        return x

    with hook_z(sites, replace, by_layer):
        yield


@torch.no_grad()
def head_means(model, batches: Sequence[dict[str, torch.Tensor]]) -> dict[int, torch.Tensor]:
    """Each layer's mean o_proj input [heads_per_layer * head_dim] over the real (non-pad)
    tokens of reference batches (``input_ids``, ``attention_mask``; padded on either side).

    Each pass gets position ids derived from the mask (:func:`positions_from_mask`), so the
    means do not depend on the batch size or the tokenizer's padding side (left padding
    without them shifts GPT-2's and other absolute-position models' positions)."""
    sites = head_sites(model)
    sums = [None] * sites.n_layers
    count = 0
    current_mask: list[torch.Tensor] = []

    def add(i: int, z: torch.Tensor) -> None:
        x = z.float()
        m = current_mask[0].to(x.device).bool()[..., None]
        s = torch.where(m, x, 0.0).sum((0, 1)).cpu()  # pads may hold NaN (no key to attend)
        sums[i] = s if sums[i] is None else sums[i] + s

    with hook_z(sites, add):
        for batch in batches:
            mask = batch["attention_mask"]
            current_mask[:] = [mask]
            model(**batch, position_ids=positions_from_mask(mask), use_cache=False)
            count += int(mask.sum())
    if count == 0:
        raise AblationError("mean ablation needs at least one reference token")
    return {i: s / count for i, s in enumerate(sums)}
