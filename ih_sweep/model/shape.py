"""A model config's shape under any family's key names (layers, heads, positions), and the
error every model-structure check raises (:class:`UnsupportedArchitecture`)."""

from __future__ import annotations

from ih_sweep.config.errors import UserError
from ih_sweep.model.rotary import extrapolates


class UnsupportedArchitecture(UserError):
    """A model whose structure the tool cannot find its heads in."""

    kind = "model"


SUPPORTED = ("Llama/Mistral/Qwen2/Qwen3/Phi-3/Gemma/Gemma-2/Gemma-3, GPT-2, GPT-NeoX (Pythia), "
             "OPT")  # the families tests/model/test_families.py runs end to end


def config_value(config, *names: str) -> int | None:
    """The first of ``names`` that ``config`` sets (not None), as an int; None if none."""
    for name in names:
        value = getattr(config, name, None)
        if value is not None:
            return int(value)
    return None


def text_config(config):
    """The decoder's config of a model config (multimodal configs nest it)."""
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def config_shape(config) -> tuple[int, int]:
    """(layers, query heads per layer) from a model config, under any family's key names.
    Raises :class:`UnsupportedArchitecture` when it names neither."""
    text = text_config(config)
    n_layers = config_value(text, "num_hidden_layers", "n_layer", "num_layers")
    heads = config_value(text, "num_attention_heads", "n_head")
    if n_layers is None or heads is None:
        raise UnsupportedArchitecture(f"{type(config).__name__}: config lacks layer/head "
                                      "counts")
    return n_layers, heads


def position_limit(config) -> int | None:
    """How many positions a model config allows (``max_position_embeddings`` /
    ``n_positions``), or None when it names no limit or its rotary scaling extrapolates
    past it (dynamic NTK: :func:`ih_sweep.model.rotary.extrapolates`)."""
    if extrapolates(config):
        return None
    return config_value(text_config(config), "max_position_embeddings", "n_positions")

