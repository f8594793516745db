"""Token ids every part of the tool agrees on."""

from __future__ import annotations

from ih_sweep.config.errors import UserError


class NoPadToken(UserError):
    """A tokenizer with neither a pad nor an EOS token, whose model names no pad id."""

    kind = "model"


def config_pad_id(*configs) -> int | None:
    """The first ``pad_token_id`` the configs set (the model's config, its generation
    config; None entries skipped), or None."""
    for config in configs:
        value = getattr(config, "pad_token_id", None) if config is not None else None
        if isinstance(value, (list, tuple)):
            value = value[0] if value else None
        if value is not None:
            return int(value)
    return None


def settle_pad(tokenizer, folder: str, *configs) -> None:
    """Give ``tokenizer`` a pad token where it has none: its EOS token (what ``generate``
    falls back to), else the ``pad_token_id`` of ``configs`` (the model's config, then its
    generation config). Raises :class:`NoPadToken` naming ``folder`` (the tokenizer's
    folder or hub id) when there is none anywhere."""
    if tokenizer.pad_token_id is not None:
        return
    if tokenizer.eos_token_id is not None:
        tokenizer.pad_token = tokenizer.eos_token
        return
    pid = config_pad_id(*configs)
    if pid is None or not 0 <= pid < len(tokenizer):
        raise NoPadToken(
            f"{folder}: the tokenizer has neither a pad nor an eos token, and the model's "
            "config.json and generation_config.json name no pad_token_id"
            + ("" if pid is None else f" within its vocabulary (pad_token_id={pid})")
            + "; add pad_token (or eos_token) to tokenizer_config.json, or pad_token_id "
              "to config.json")
    tokenizer.pad_token = tokenizer.convert_ids_to_tokens(pid)


def pad_id(tokenizer) -> int:
    """The id padded rows are filled with: the tokenizer's pad token, else its EOS token
    (what ``generate`` falls back to; the pads' values are never read: they are masked or
    come after the read positions). Raises :class:`NoPadToken` for a tokenizer with
    neither (:func:`settle_pad` gives one from the model's config when it loads)."""
    if tokenizer.pad_token_id is not None:
        return int(tokenizer.pad_token_id)
    if tokenizer.eos_token_id is None:
        raise NoPadToken(f"{getattr(tokenizer, 'name_or_path', '') or 'the tokenizer'}: the "
                         "tokenizer has neither a pad nor an eos token; add pad_token to "
                         "tokenizer_config.json, or pad_token_id to config.json")
    return int(tokenizer.eos_token_id)
