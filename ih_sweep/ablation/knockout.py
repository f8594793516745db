"""Attention knockout: in an ablated head, only the attention edges of the induction pattern
are removed (from each query to the positions right after earlier occurrences of its token);
the rest of the head stays. Crosbie & Shutova 2025 ("Induction Heads as an Essential
Mechanism for Pattern Matching in In-context Learning", NAACL Findings) use it to separate
what the induction pattern does from what else the head does. Definition of the edges, the
two ways to remove them (``ablation.knockout``: ``mask`` before the softmax, renormalised,
the default; ``zero`` after it) and their sources: :mod:`ih_sweep.model.edges`."""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from contextlib import AbstractContextManager
from typing import Any

from ih_sweep.ablation.registry import (
    AblationError,
    BaseAblation,
    FillInputs,
    Heads,
    register_ablation,
)
from ih_sweep.config.schema import Config, KnockoutMode


@register_ablation("knockout")
class Knockout(BaseAblation):
    """Fill: the mode (``ablation.knockout``: ``"mask"`` or ``"zero"``; None: ``"mask"``).
    Edits the heads' attention, not their output: :meth:`attention_edit`."""

    edits_attention = True

    def config_problem(self, config: Config) -> str | None:
        from ih_sweep.model.edges import BASES

        impl = str(config.model.attn_implementation)
        if impl not in BASES:
            return (f"knockout runs with model.attn_implementation={' or '.join(BASES)} "
                    f"(the knocked-out layers run their family's eager attention), not {impl}")
        return None

    def prepare(self, inputs: FillInputs, heads: Heads, reference: Any) -> str:
        return str(inputs.settings.knockout)

    def check_fill(self, fill: Any, heads: Heads) -> None:
        allowed = [str(m) for m in KnockoutMode]
        if fill is not None and str(fill) not in allowed:
            raise AblationError(f"ablation.knockout={fill!r}; allowed values: "
                                f"{', '.join(allowed)}")

    def attention_edit(self, model, by_layer: dict[int, list[int]], fill: Any
                       ) -> AbstractContextManager:
        """The knockout of ``by_layer``'s heads on ``model`` while inside
        (:func:`ih_sweep.model.edges.knock_out`)."""
        from ih_sweep.model.edges import knock_out

        return knock_out(model, by_layer, "mask" if fill is None else str(fill))

    def replace(self, fill: Any, layer: int, z: Any, columns: Any, positions: Any = None,
                keys: Sequence[Hashable] | None = None, cache: dict | None = None) -> Any:
        raise AblationError("knockout edits the heads' attention; it replaces no output")
