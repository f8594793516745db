"""Rotary position scalings whose frequencies depend on the sequence a forward pass sees
(issue 29), detected from the model's config.

transformers (``modeling_rope_utils.dynamic_rope_update``) recomputes the rotary frequencies
of two types at every forward pass from ``max(position_ids) + 1``:

- ``dynamic`` (dynamic NTK): past ``max_position_embeddings`` the base grows with the
  length, and the rotary module keeps the grown frequencies until a shorter pass resets
  them (state carried from one call to the next);
- ``longrope`` (Phi-3 128k): the short factors below ``original_max_position_embeddings``,
  the long ones above, for every position of the pass.

So an item's outcome depends on the other rows of its batch (the padded length) and on the
teacher-forced tokens after its prompt, and differs from ``generate`` on the prompt alone.
Such a model is evaluated one item at a time by ``generate`` (:func:`batch_dependent`
names why), with the rotary state reset before each item (:func:`fresh_rotary`), as a
freshly loaded model's ``generate`` would.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

# the rope types transformers recomputes per forward pass, and what each depends on
SEQUENCE_DEPENDENT = {
    "dynamic": "dynamic NTK scaling, whose rotary base follows the longest position of each "
               "forward pass",
    "longrope": "LongRoPE, which switches between its short and long factors by the longest "
                "position of each forward pass",
}


def rope_types(config) -> set[str]:
    """The rope types a model config names (``rope_parameters`` in transformers 5,
    ``rope_scaling`` before; a per-layer-type dict of them as Gemma-3 has), e.g.
    ``{"default"}``; empty when it names none."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    found: set[str] = set()
    for attr in ("rope_parameters", "rope_scaling"):
        params = getattr(text, attr, None)
        if not isinstance(params, dict):
            continue
        nested = [params] if ("rope_type" in params or "type" in params) else \
            [v for v in params.values() if isinstance(v, dict)]
        for entry in nested:
            kind = entry.get("rope_type", entry.get("type"))
            if kind is not None:
                found.add(str(kind))
    return found


def batch_dependent(config) -> str | None:
    """Why a model of ``config`` gives batch-dependent outcomes (its rope type in
    :data:`SEQUENCE_DEPENDENT`), or None."""
    for kind in sorted(rope_types(config)):
        for name, why in SEQUENCE_DEPENDENT.items():
            if name in kind:  # transformers matches "dynamic" as a substring too
                return f"rope_type={kind} ({why})"
    return None


def extrapolates(config) -> bool:
    """Whether ``config``'s rotary scaling stretches past ``max_position_embeddings``
    (dynamic NTK), so that it is no limit on a prompt's length."""
    return any("dynamic" in kind for kind in rope_types(config))


def reset_rotary(model) -> None:
    """Every dynamic rotary module of ``model`` back to its loaded frequencies (as a
    freshly loaded model has them): ``inv_freq`` the original, ``max_seq_len_cached`` the
    original length. Modules without that state are left alone."""
    for module in model.modules():
        original = getattr(module, "original_inv_freq", None)
        if original is None or not hasattr(module, "original_max_seq_len"):
            continue
        if "dynamic" not in str(getattr(module, "rope_type", "")):
            continue
        module.register_buffer("inv_freq", original.clone(), persistent=False)
        module.max_seq_len_cached = module.original_max_seq_len


@contextmanager
def fresh_rotary(model, on: bool = True) -> Iterator[None]:
    """Run the block with ``model``'s rotary state reset (:func:`reset_rotary`) when
    ``on``, and reset again after it."""
    if on:
        reset_rotary(model)
    try:
        yield
    finally:
        if on:
            reset_rotary(model)
