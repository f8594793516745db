"""Mean ablation: an ablated head's output becomes its mean output over every real token of
the reference prompts (:func:`ih_sweep.ablation.means.head_means`; e.g. Wang et al. 2022,
"Interpretability in the Wild", https://arxiv.org/abs/2211.00593, section 3.1, over a
reference distribution: the first ``ablation.n_reference`` evaluated prompts)."""

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


@register_ablation("mean")
class Mean(BaseAblation):
    """Fill: ``{layer: [heads_per_layer * head_dim]}`` float32 means (every head's)."""

    per_row_sets = True

    def reference(self, inputs: FillInputs) -> dict:
        from ih_sweep.ablation.means import head_means, reference_batches

        return head_means(inputs.model, reference_batches(
            inputs.tokenizer, inputs.reference_items, inputs.settings.n_reference,
            inputs.model))

    def check_fill(self, fill: Any, heads: Heads) -> None:
        if fill is None:
            raise AblationError("ablation.method=mean needs head means (head_means())")

    def replace(self, fill: Any, layer: int, z: Any, columns: Any, positions: Any = None,
                keys: Sequence[Hashable] | None = None, cache: dict | None = None) -> Any:
        return fill[layer][columns].to(device=z.device, dtype=z.dtype)
