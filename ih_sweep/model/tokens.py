"""Token ids every part of the tool agrees on."""

from __future__ import annotations


def pad_id(tokenizer) -> int:
    """The id padded rows are filled with: the tokenizer's pad token, else its EOS token
    (what ``generate`` falls back to; the pads' values are never read: they are masked or
    come after the read positions)."""
    if tokenizer.pad_token_id is not None:
        return int(tokenizer.pad_token_id)
    return int(tokenizer.eos_token_id)
