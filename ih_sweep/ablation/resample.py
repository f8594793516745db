"""Resample ablation: an ablated head's output becomes its output on another story's text
(the row's donor story) at the matching position (``ablation.align``: the same absolute
position, or the same distance from the end of the prompt); outside the donor's text, the
position-wise mean (definitions, draw and sources: :mod:`ih_sweep.ablation.donors`)."""

from __future__ import annotations

import logging
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import Any

from ih_sweep.ablation.registry import (
    AblationError,
    BaseAblation,
    FillInputs,
    Heads,
    register_ablation,
)
from ih_sweep.config.schema import Config

log = logging.getLogger("ih_sweep")


@dataclass
class DonorReference:
    """What resample's donors of any heads are taken with: the position-wise means
    (:class:`ih_sweep.ablation.means.PositionMeans`, the fallback past a donor's end) and
    per story its donor text and the positions its evaluation feeds
    (:func:`ih_sweep.ablation.donors.donor_texts`)."""

    means: Any
    texts: dict[int, str]
    needed: dict[int, int]


@register_ablation("resample")
class Resample(BaseAblation):
    """Fill: :class:`ih_sweep.ablation.donors.Donors` for exactly the ablated heads."""

    needs_positions = True
    row_dependent = True
    per_head = True
    mechanism_unmeasured = "resample ablation: the mechanism's texts have no donor stories"
    reference_shared_as = ("fill", "donor_texts")
    fill_shared_as = "donors"

    def config_problem(self, config: Config) -> str | None:
        n = config.data.n_stories
        if n is not None and n < 2:
            return f"resample needs donor stories: data.n_stories={n} leaves none (at least 2)"
        return None

    def reference(self, inputs: FillInputs) -> DonorReference:
        from ih_sweep.ablation.donors import donor_texts
        from ih_sweep.ablation.means import position_means, reference_batches

        means = position_means(inputs.model, reference_batches(
            inputs.tokenizer, inputs.reference_items, inputs.settings.n_reference,
            inputs.model))
        texts, needed = donor_texts(inputs.tokenizer, inputs.items, inputs.max_new_tokens)
        return DonorReference(means, texts, needed)

    def prepare(self, inputs: FillInputs, heads: Heads, reference: DonorReference) -> Any:
        """The donors of ``heads``, drawn with ``ablation.seed`` (one log line)."""
        from ih_sweep.ablation.donors import prompt_lengths, resample_donors
        from ih_sweep.config.schema import Align

        seed, align = inputs.settings.seed, inputs.settings.align
        prompts = prompt_lengths(reference.needed, inputs.max_new_tokens) \
            if align == Align.end else None
        donors = resample_donors(inputs.model, inputs.tokenizer, reference.texts, heads, seed,
                                 reference.means, reference.needed, prompts=prompts)
        past = {k: n for k, n in donors.past_end.items() if n}
        log.info("resample ablation: donors drawn with ablation.seed=%d among %d stories, "
                 "aligned at the %s of the prompt (ablation.align=%s); %d of them feed "
                 "positions outside their donor's text (at most %d; those get the "
                 "position-wise mean)", seed, len(reference.texts), align, align, len(past),
                 max(past.values(), default=0))
        return donors

    def covers(self, fill: Any, heads: Heads) -> bool:
        return fill.covers(heads)

    def restrict(self, fill: Any, heads: Heads) -> Any:
        return fill.subset(heads)

    def bytes_per_head(self, inputs: FillInputs, reference: DonorReference) -> int:
        from ih_sweep.ablation.donors import donor_bytes_per_head

        return donor_bytes_per_head(inputs.model, inputs.tokenizer, reference.texts)

    def check_fill(self, fill: Any, heads: Heads) -> None:
        from ih_sweep.ablation.donors import Donors

        if not isinstance(fill, Donors):
            raise AblationError("ablation.method=resample needs donor outputs "
                                "(resample_donors())")
        if sorted(map(tuple, fill.heads)) != sorted((int(la), int(h)) for la, h in heads):
            raise AblationError("resample ablation: the donor outputs were taken for other "
                                "heads than those ablated")

    def columns(self, fill: Any) -> dict[int, Any]:
        return fill.columns  # the same heads (checked), in the donors' column order

    def replace(self, fill: Any, layer: int, z: Any, columns: Any, positions: Any = None,
                keys: Sequence[Hashable] | None = None, cache: dict | None = None) -> Any:
        means = fill.fallback
        fallback = means.table_on(layer, columns, z.device, cache)[means.rows(positions)]
        fallback = fallback.to(z.dtype)
        device = fill.values[layer].device
        held = cache.get(("donor rows", device))
        if held is None or held[0] is not keys:  # once per pass (keys), not per layer
            held = cache[("donor rows", device)] = (
                keys, fill.rows(keys, device), fill.shifts(keys, device) if fill.shift else None)
        return fill.at(layer, positions, held[1], fallback, held[2])
