"""Position-wise mean ablation: an ablated head's output at a token becomes its mean output
at the token's absolute position over the reference prompts that reach that position
(:func:`ih_sweep.ablation.means.position_means`); past the longest reference, the overall
mean (``mean``'s value). It keeps what the head writes at every position on average, so
positional information the head carries is not removed with the ablation (Heimersheim &
Nanda 2024, "How to use and interpret activation patching", https://arxiv.org/abs/2404.15255,
section on ablation choices: "mean over a reference distribution", taken per position when
prompts are aligned). A token's position is its index among its row's real tokens (BOS = 0)."""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import Any

from ih_sweep.ablation.registry import (
    AblationError,
    BaseAblation,
    FillInputs,
    Heads,
    register_ablation,
)


@register_ablation("position_mean")
class PositionMean(BaseAblation):
    """Fill: :class:`ih_sweep.ablation.means.PositionMeans` (every head's)."""

    needs_positions = True
    per_row_sets = True

    def reference(self, inputs: FillInputs) -> Any:
        from ih_sweep.ablation.means import position_means, reference_batches

        return position_means(inputs.model, reference_batches(
            inputs.tokenizer, inputs.reference_items, inputs.settings.n_reference,
            inputs.model))

    def check_fill(self, fill: Any, heads: Heads) -> None:
        from ih_sweep.ablation.means import PositionMeans

        if not isinstance(fill, PositionMeans):
            raise AblationError("ablation.method=position_mean needs position-wise means "
                                "(position_means())")

    def replace(self, fill: Any, layer: int, z: Any, columns: Any, positions: Any = None,
                keys: Sequence[Hashable] | None = None, cache: dict | None = None) -> Any:
        table = fill.table_on(layer, columns, z.device, cache)
        return table[fill.rows(positions)].to(z.dtype)
