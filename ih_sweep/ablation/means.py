"""The means that mean, position-wise mean and resample ablation fill heads with, taken
from the unablated model over reference prompts.

- :func:`head_means`: each head's mean output over every real token of the reference
  prompts (mean ablation, e.g. Wang et al. 2022, "Interpretability in the Wild",
  https://arxiv.org/abs/2211.00593, section 3.1, over a reference distribution).
- :func:`position_means` (:class:`PositionMeans`): the mean output at each absolute position
  over the references that reach it, and over all of them past the longest (position-wise
  mean ablation: Heimersheim & Nanda 2024, "How to use and interpret activation patching",
  https://arxiv.org/abs/2404.15255, section on ablation choices: "mean over a reference
  distribution", taken per position when prompts are aligned).
- :func:`reference_batches`: the reference prompts, the first ``ablation.n_reference``
  of the reference items (:attr:`ih_sweep.ablation.registry.FillInputs.reference_items`:
  by default items of held-out stories, disjoint from the evaluated ones,
  :mod:`ih_sweep.data.heldout`; with ``ablation.reference=evaluated`` the evaluated
  prompts), tokenized.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ih_sweep.ablation.hooks import require_unablated
from ih_sweep.ablation.registry import AblationError
from ih_sweep.model.positions import positions_from_mask
from ih_sweep.model.sites import head_sites, hook_z

log = logging.getLogger("ih_sweep")


@dataclass
class PositionMeans:
    """The position-wise mean of every layer's o_proj input over reference prompts.

    ``table[layer]``: [P + 1, heads_per_layer * head_dim] float32 (CPU); row p < P is the
    mean over the references with more than p real tokens (at least one: P is the longest
    reference's length), row P the mean over every reference token. ``counts``: [P]
    references reaching each position."""

    table: dict[int, torch.Tensor]
    counts: torch.Tensor

    @property
    def n_positions(self) -> int:
        return int(self.counts.numel())

    def rows(self, positions: torch.Tensor) -> torch.Tensor:
        """Row of :attr:`table` for each absolute position: itself, or P past the longest
        reference."""
        return positions.clamp(min=0, max=self.n_positions)

    def table_on(self, layer: int, columns: torch.Tensor, device, cache: dict) -> torch.Tensor:
        """[P + 1, len(columns)] float32: :attr:`table` of ``layer`` at ``columns`` on
        ``device``, copied once per ``cache`` (one ablation context)."""
        key = ("position_means", layer, device)
        if key not in cache:
            cache[key] = self.table[layer][:, columns].to(device)
        return cache[key]


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
            model(**batch, position_ids=positions_from_mask(mask), use_cache=False,
                  logits_to_keep=1)  # the hooks read z; no logits are needed
            count += int(mask.sum())
    if count == 0:
        raise AblationError("mean ablation needs at least one reference token")
    return {i: s / count for i, s in enumerate(sums)}


@torch.no_grad()
def position_means(model, batches: Sequence[dict[str, torch.Tensor]]) -> PositionMeans:
    """Each layer's mean o_proj input at each absolute position over the real tokens of
    reference batches (as for :func:`head_means`), and over all of them: a
    :class:`PositionMeans`. A token's position is its index among its row's real tokens
    (:func:`positions_from_mask`), so the means do not depend on batching or padding
    side. Raises :class:`AblationError` without any reference token."""
    require_unablated(model, "position-wise means")
    sites = head_sites(model)
    sums: list[torch.Tensor | None] = [None] * sites.n_layers
    counts = torch.zeros(0, dtype=torch.long)
    current: list = []  # this batch's (mask, positions of its real tokens on the host, n)

    def grow(t: torch.Tensor | None, n: int, width: int) -> torch.Tensor:
        out = torch.zeros(n, width, dtype=torch.float64)
        if t is not None:
            out[:t.shape[0]] = t
        return out

    def add(i: int, z: torch.Tensor) -> None:
        mask, p, n = current
        x = z[mask.to(z.device).bool()].double().cpu()  # [real tokens, width]; pads: NaN
        s = sums[i]
        if s is None or s.shape[0] < n:
            s = grow(s, n, x.shape[-1])
        sums[i] = s.index_add_(0, p, x)

    with hook_z(sites, add):
        for batch in batches:
            mask = batch["attention_mask"]
            pos = positions_from_mask(mask)
            p = pos[mask.bool()].cpu()  # once per batch, not once per layer
            n = int(p.max()) + 1 if p.numel() else 0
            current[:] = [mask, p, n]
            model(**batch, position_ids=pos, use_cache=False, logits_to_keep=1)
            c = torch.bincount(p, minlength=n)
            if c.numel() > counts.numel():
                c[:counts.numel()] += counts
                counts = c
            else:
                counts[:c.numel()] += c
    total = int(counts.sum())
    if total == 0:
        raise AblationError("position-wise mean ablation needs at least one reference token")
    table = {}
    for i, s in enumerate(sums):
        per_position = s[:counts.numel()] / counts[:, None].double()
        overall = s.sum(0, keepdim=True) / total
        table[i] = torch.cat([per_position, overall]).float()
    return PositionMeans(table, counts)


def reference_batches(tokenizer, items: Sequence, n: int, model, batch_size: int = 16
                      ) -> list[dict]:
    """Tokenized reference prompts for mean and position-wise mean ablation (the first
    ``n`` of ``items``, the reference items): batches of ``input_ids`` and ``attention_mask`` on the
    model's device."""
    device = next(model.parameters()).device
    if n > len(items):
        log.warning("ablation.n_reference=%d, but there are %d reference prompts: the mean "
                    "is taken over all %d", n, len(items), len(items))
    prompts = [it.prompt for it in items[:n]]
    batches = []
    for i in range(0, len(prompts), batch_size):
        enc = tokenizer(prompts[i:i + batch_size], return_tensors="pt", padding=True)
        batches.append({k: v.to(device) for k, v in enc.items() if isinstance(v, torch.Tensor)
                        and k in ("input_ids", "attention_mask")})
    return batches
