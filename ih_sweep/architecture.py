"""Where the attention heads live in a Hugging Face causal LM.

Ablation and scoring both need, per layer, the module whose *input* is the concatenation of
the query heads' outputs (o_proj / c_proj / dense / out_proj), the head count and head size,
the final norm and the unembedding. Finding them from the model's structure keeps every
family on one code path; an unknown structure gets a clear error instead of a silent no-op.
Code that reads or changes the heads' outputs goes through one hook helper, :func:`hook_z`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from .schema import UserError


class UnsupportedArchitecture(UserError):
    """A model whose structure the tool cannot find its heads in."""

    kind = "model"


# (attention submodule name, output projection name) pairs seen in the supported families:
# Llama/Mistral/Qwen2/Gemma (self_attn.o_proj), GPT-2 (attn.c_proj),
# GPT-NeoX/Pythia (attention.dense), OPT (self_attn.out_proj).
_ATTN_NAMES = ("self_attn", "attn", "attention")
_OUT_NAMES = ("o_proj", "c_proj", "dense", "out_proj")
_FINAL_NORM_NAMES = ("norm", "ln_f", "final_layer_norm", "final_layernorm")


@dataclass
class HeadSites:
    """The pieces of a model that per-head code needs."""

    layers: list[nn.Module]
    out_proj: list[nn.Module]
    n_layers: int
    heads_per_layer: int  # query heads per layer (not the config's n_heads: heads to ablate)
    head_dim: int
    final_norm: nn.Module | None
    unembed: nn.Module

    def head_slice(self, head: int) -> slice:
        return slice(head * self.head_dim, (head + 1) * self.head_dim)

    def w_o(self, layer: int) -> torch.Tensor:
        """Output projection of a layer as [heads_per_layer, head_dim, hidden] (dequantized,
        float32)."""
        weight = linear_weight(self.out_proj[layer])  # [hidden, heads_per_layer * head_dim]
        return weight.float().T.reshape(self.heads_per_layer, self.head_dim, -1)


ZHook = Callable[[int, torch.Tensor], torch.Tensor | None]


@contextmanager
def hook_z(model_or_sites: nn.Module | HeadSites, fn: ZHook,
           layers: Iterable[int] | None = None) -> Iterator[HeadSites]:
    """Call ``fn(layer, z)`` on every forward pass at the attention output projection's input.

    ``z`` is the input of o_proj / c_proj / dense / out_proj: the query heads' outputs side
    by side, [batch, pos, heads_per_layer * head_dim] (head h in columns
    ``HeadSites.head_slice(h)``). This is the site TransformerLens calls ``hook_z``
    (``blocks.{layer}.attn.hook_z``, shape [batch, pos, head_index, d_head] there; flattened
    here). ``fn`` returns a replacement tensor or None to leave ``z`` as it is.

    Forward pre-hooks on the given layers (default: all) while inside, yielding the model's
    :class:`HeadSites`; they always come off, also when the body raises.
    """
    sites = model_or_sites if isinstance(model_or_sites, HeadSites) else \
        head_sites(model_or_sites)
    layers = range(sites.n_layers) if layers is None else [int(i) for i in layers]
    for i in layers:
        if not 0 <= i < sites.n_layers:
            raise IndexError(f"layer {i} is outside the model's {sites.n_layers} layers")

    def make(layer: int):
        def hook(module, args):
            out = fn(layer, args[0])
            return None if out is None else (out, *args[1:])
        return hook

    handles = []
    try:
        for i in layers:
            handles.append(sites.out_proj[i].register_forward_pre_hook(make(i)))
        yield sites
    finally:
        for h in handles:
            h.remove()


def linear_weight(module: nn.Module) -> torch.Tensor:
    """Weight as [out, in] for nn.Linear, GPT-2's Conv1D and bitsandbytes 4/8-bit layers."""
    weight = module.weight
    cls = type(module).__name__
    if cls == "Conv1D":  # GPT-2 stores [in, out]
        return weight.detach().T
    if cls == "Linear4bit":
        import bitsandbytes.functional as bnbf

        return bnbf.dequantize_4bit(weight.data, weight.quant_state).detach()
    if cls == "Linear8bitLt":
        scb = getattr(weight, "SCB", None)
        if scb is None:
            return weight.detach().float()
        return (weight.detach().float() * scb.float().unsqueeze(1) / 127.0)
    return weight.detach()


def _find_layers(model: nn.Module, n_layers: int) -> list[nn.Module]:
    for _, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == n_layers:
            first = module[0]
            if any(hasattr(first, a) for a in _ATTN_NAMES):
                return list(module)
    raise UnsupportedArchitecture(
        f"{type(model).__name__}: found no list of {n_layers} decoder layers with an attention "
        f"submodule named one of {_ATTN_NAMES}; supported families: Llama/Mistral/Qwen2/Gemma, "
        "GPT-2, GPT-NeoX (Pythia), OPT")


def _find_out_proj(layer: nn.Module, index: int, model_name: str) -> nn.Module:
    for a in _ATTN_NAMES:
        attn = getattr(layer, a, None)
        if attn is None:
            continue
        for o in _OUT_NAMES:
            proj = getattr(attn, o, None)
            if proj is not None:
                return proj
    raise UnsupportedArchitecture(
        f"{model_name}: layer {index} has no attention output projection named one of "
        f"{_OUT_NAMES}; supported families: Llama/Mistral/Qwen2/Gemma, GPT-2, GPT-NeoX, OPT")


def _config_value(config, *names: str) -> int | None:
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
    n_layers = _config_value(text, "num_hidden_layers", "n_layer", "num_layers")
    heads = _config_value(text, "num_attention_heads", "n_head")
    if n_layers is None or heads is None:
        raise UnsupportedArchitecture(f"{type(config).__name__}: config lacks layer/head "
                                      "counts")
    return n_layers, heads


def position_limit(config) -> int | None:
    """How many positions a model config allows (``max_position_embeddings`` /
    ``n_positions``), or None when it names no limit."""
    return _config_value(text_config(config), "max_position_embeddings", "n_positions")


def head_sites(model: nn.Module) -> HeadSites:
    """Locate layers, per-layer output projections and head geometry from the config."""
    config = getattr(model, "config", None)
    if config is None:
        raise UnsupportedArchitecture(f"{type(model).__name__} has no .config: not a Hugging "
                                      "Face model; supported families: Llama/Mistral/Qwen2/"
                                      "Gemma, GPT-2, GPT-NeoX (Pythia), OPT")
    n_layers, heads = config_shape(config)
    config = text_config(config)
    hidden = _config_value(config, "hidden_size", "n_embd", "d_model")
    if hidden is None:
        raise UnsupportedArchitecture(f"{type(model).__name__}: config lacks the hidden size")
    head_dim = _config_value(config, "head_dim") or hidden // heads
    name = type(model).__name__
    layers = _find_layers(model, n_layers)
    out_proj = [_find_out_proj(layer, i, name) for i, layer in enumerate(layers)]
    in_features = linear_in_features(out_proj[0])
    if in_features != heads * head_dim:
        raise UnsupportedArchitecture(
            f"{name}: output projection takes {in_features} inputs, expected heads*head_dim = "
            f"{heads}*{head_dim}")
    final_norm = None
    for module_name, module in model.named_modules():
        if module_name.split(".")[-1] in _FINAL_NORM_NAMES and module_name.count(".") <= 2:
            final_norm = module
    unembed = model.get_output_embeddings()
    if unembed is None:
        raise UnsupportedArchitecture(f"{name}: no output embedding (unembedding) found")
    return HeadSites(layers, out_proj, n_layers, heads, head_dim, final_norm, unembed)


def linear_in_features(module: nn.Module) -> int:
    if type(module).__name__ == "Conv1D":
        return int(module.weight.shape[0])
    in_features = getattr(module, "in_features", None)
    if in_features is not None:
        return int(in_features)
    return int(linear_weight(module).shape[1])


# --------------------------------------------------------------------------- attention kernel
class AttentionSwitchError(UnsupportedArchitecture):
    """The model cannot switch its attention implementation (transformers'
    ``set_attn_implementation`` left it unchanged, or the model has no such method)."""


def _implementations(config):
    """``config``'s attention implementation and its sub-configs', in the format
    ``set_attn_implementation`` takes back (a str, or a dict with ``""`` for the config itself
    and one entry per sub-config), so a restore gives each sub-model its own again."""
    subs = {}
    for key in getattr(config, "sub_configs", None) or {}:
        sub = getattr(config, key, None)
        if sub is not None:
            subs[key] = _implementations(sub)
    own = config._attn_implementation
    return {"": own, **subs} if subs else own


_UNCHANGED = object()


class attention_implementation:  # named as a function: it is used like a contextmanager
    """``with attention_implementation(model, name):`` -- ``model`` on attention
    implementation ``name`` (``"eager"``, ``"sdpa"`` or a name registered with transformers'
    ``AttentionInterface``) while inside, through transformers' public
    ``set_attn_implementation`` (the model and every sub-model); the previous
    implementation(s), sub-configs' included, are put back on exit, also on an exception.

    Raises :class:`AttentionSwitchError` on entry where the switch does not take: models whose
    attention does not go through ``AttentionInterface`` (transformers then only logs a
    warning and changes nothing), or objects without ``set_attn_implementation``. A name
    transformers does not know raises its own ``ValueError``. Nothing changes (and nothing
    is checked) when the model is on ``name`` already."""

    def __init__(self, model, name: str):
        self.model = model
        self.name = name
        self._previous = _UNCHANGED

    def __enter__(self) -> None:
        model, name = self.model, self.name
        setter = getattr(model, "set_attn_implementation", None)
        if setter is None:
            raise AttentionSwitchError(
                f"{type(model).__name__} has no set_attn_implementation: cannot switch its "
                f"attention to {name!r} (a transformers>=5 PreTrainedModel is needed)")
        previous = _implementations(model.config)
        if previous == name:
            return
        self._previous = previous
        try:
            setter(name)
            text = model.config.get_text_config(decoder=True)
            now = (model.config._attn_implementation, text._attn_implementation)
            if now != (name, name):
                raise AttentionSwitchError(
                    f"{type(model).__name__} cannot switch its attention to {name!r} (it stays "
                    f"{now[1]!r}): its attention does not go through transformers' "
                    "AttentionInterface")
        except BaseException:
            self._restore()
            raise

    def __exit__(self, *exc) -> None:
        self._restore()

    def _restore(self) -> None:
        previous, self._previous = self._previous, _UNCHANGED
        if previous is not _UNCHANGED:
            self.model.set_attn_implementation(previous)
