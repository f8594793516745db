"""Zero ablation: an ablated head's output ``z`` becomes 0 at every token, so its bias-free
contribution to the residual stream vanishes."""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import Any

from ih_sweep.ablation.registry import BaseAblation, register_ablation


@register_ablation("zero")
class Zero(BaseAblation):
    """Nothing to prepare (the fill is None)."""

    per_row_sets = True

    def replace(self, fill: Any, layer: int, z: Any, columns: Any, positions: Any = None,
                keys: Sequence[Hashable] | None = None, cache: dict | None = None) -> float:
        return 0
