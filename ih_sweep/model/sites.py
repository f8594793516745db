"""Where the attention heads live in a Hugging Face causal LM.

Ablation and scoring both need, per layer, the module whose *input* is the concatenation of
the query heads' outputs (o_proj / c_proj / dense / out_proj), the head count and head size,
and the modules on a head's way to the logits as the model itself applies them (norms on the
attention output, the final norm where there is one, OPT's project_out, the unembedding,
Gemma-2's logit softcap). Finding them from the model's structure keeps every family on one
code path; a structure it cannot place gets a one-line error instead of a silent no-op or a
wrong score.
Code that reads or changes the heads' outputs goes through one hook helper, :func:`hook_z`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from ih_sweep.model.shape import (
    SUPPORTED,
    UnsupportedArchitecture,
    config_shape,
    config_value,
    text_config,
)

# (attention submodule name, output projection name) pairs seen in the supported families:
# Llama/Mistral/Qwen2/Qwen3/Phi-3/Gemma (self_attn.o_proj), GPT-2 (attn.c_proj),
# GPT-NeoX/Pythia (attention.dense), OPT (self_attn.out_proj).
_ATTN_NAMES = ("self_attn", "attn", "attention")
_OUT_NAMES = ("o_proj", "c_proj", "dense", "out_proj")
# what the decoder stack (the module holding the layer list) applies after its last layer,
# in this order: a final norm (where the model has one: OPT-350m has none), then OPT's
# project_out (word_embed_proj_dim != hidden_size)
_FINAL_NORM_NAMES = ("norm", "ln_f", "final_layer_norm", "final_layernorm")
_PROJECT_OUT_NAMES = ("project_out",)
# the decoder stack's other children with parameters: input side only (embeddings, OPT's
# project_in, rotary tables); anything else is refused (it could sit on the heads' path)
_INPUT_SIDE_NAMES = ("embed_tokens", "wte", "wpe", "embed_in", "embed_positions", "project_in",
                     "rotary_emb")
# norms a decoder layer may hold. Pre-norm layers (input_layernorm/ln_1/self_attn_layer_norm
# before attention, post_attention_layernorm/ln_2/final_layer_norm before the MLP) leave the
# attention output's way to the residual stream free; Gemma-2/3 "sandwich" layers (they have a
# post_feedforward_layernorm) put post_attention_layernorm on the attention output itself;
# OPT-350m (do_layer_norm_before=False) normalizes the residual stream after each block.
_LAYER_NORM_NAMES = ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                     "post_feedforward_layernorm", "ln_1", "ln_2", "self_attn_layer_norm",
                     "final_layer_norm")
# config keys that change the logits after the unembedding in a way the tool does not apply
# (Cohere's logit_scale, Granite's logits_scaling); Gemma-2's final_logit_softcapping is applied
_UNHANDLED_LOGIT_KEYS = ("logit_scale", "logits_scaling")


@dataclass
class HeadSites:
    """The pieces of a model that per-head code needs."""

    layers: list[nn.Module]
    out_proj: list[nn.Module]
    n_layers: int
    heads_per_layer: int  # query heads per layer (not the config's n_heads: heads to ablate)
    head_dim: int
    final_norm: nn.Module | None  # the decoder's final norm, None where it applies none
    unembed: nn.Module
    # the rest of a head's direct path, see :meth:`direct_path`: per layer, the norms the
    # attention output passes through before the final norm (Gemma-2/3: the layer's
    # post_attention_layernorm; OPT-350m: every later post-block LayerNorm); OPT's
    # project_out; Gemma-2's final logit softcap (logits -> cap * tanh(logits / cap))
    attn_out_norms: list[list[nn.Module]] = field(default_factory=list)
    project_out: nn.Module | None = None
    logit_softcap: float | None = None

    def head_slice(self, head: int) -> slice:
        return slice(head * self.head_dim, (head + 1) * self.head_dim)

    def direct_path(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        """A layer's attention-output contribution [..., hidden] (e.g. one head's z through
        its W_O columns) to what the unembedding reads [..., unembed inputs], float32: the
        modules the model itself applies on the way, each applied to the contribution
        alone (the convention of Olsson et al.'s direct path; a norm rescales by the
        contribution's own statistics): the layer's attention-output norms, the final norm
        (only where the model applies one), the output projection (OPT's project_out)."""
        for module in [*self.attn_out_norms[layer], self.final_norm, self.project_out]:
            if module is not None:
                x = _apply(module, x)
        return x.float()

    def softcap(self, logits: torch.Tensor) -> torch.Tensor:
        """The model's final logit softcapping (Gemma-2), identity where it has none."""
        if self.logit_softcap is None:
            return logits
        return torch.tanh(logits / self.logit_softcap) * self.logit_softcap

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits from the last layer's output (the residual stream the final norm reads),
        as the model computes them: final norm, project_out, unembedding, softcap."""
        for module in (self.final_norm, self.project_out):
            if module is not None:
                hidden = module(hidden)
        return self.softcap(self.unembed(hidden))

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


def _apply(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``module(x)`` in the module's own dtype (the weights may be half precision)."""
    param = next(module.parameters(), None)
    return module(x if param is None or not param.is_floating_point() else x.to(param.dtype))


def _find_layers(model: nn.Module, n_layers: int) -> tuple[nn.Module, str, list[nn.Module]]:
    """(the decoder stack holding the layer list, the list's name there, the layers)."""
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == n_layers:
            first = module[0]
            if any(hasattr(first, a) for a in _ATTN_NAMES):
                parent, _, child = name.rpartition(".")
                return model.get_submodule(parent), child, list(module)
    raise UnsupportedArchitecture(
        f"{type(model).__name__}: found no list of {n_layers} decoder layers with an attention "
        f"submodule named one of {_ATTN_NAMES}; supported families: {SUPPORTED}")


def _is_norm(module: nn.Module) -> bool:
    return "norm" in type(module).__name__.lower()


def _attn_out_norms(layers: list[nn.Module], name: str) -> list[list[nn.Module]]:
    """Per layer, the norms between its attention output and the final norm (see
    :attr:`HeadSites.attn_out_norms`); refuses a layer norm of unknown place."""
    for i, layer in enumerate(layers):
        for child, module in layer.named_children():
            if _is_norm(module) and child not in _LAYER_NORM_NAMES:
                raise UnsupportedArchitecture(
                    f"{name}: layer {i} has a norm {child!r} ({type(module).__name__}) the tool "
                    "cannot place on the heads' path to the logits; supported families: "
                    f"{SUPPORTED}")
    out: list[list[nn.Module]] = []
    post_ln = [getattr(layer, "do_layer_norm_before", True) is False for layer in layers]
    for i, layer in enumerate(layers):
        if post_ln[i]:  # OPT-350m: LayerNorm after each block's residual add, every later one
            if not all(post_ln[i:]):
                raise UnsupportedArchitecture(f"{name}: layers mix pre- and post-norm blocks")
            out.append([getattr(later, n) for later in layers[i:]
                        for n in ("self_attn_layer_norm", "final_layer_norm")])
        elif hasattr(layer, "post_feedforward_layernorm"):  # Gemma-2/3 sandwich norms
            out.append([layer.post_attention_layernorm])
        else:
            out.append([])
    return out


def _decoder_tail(decoder: nn.Module, layers_name: str, name: str
                  ) -> tuple[nn.Module | None, nn.Module | None]:
    """(final norm or None, project_out or None) of the decoder stack; refuses a child with
    weights of unknown role."""
    known = (layers_name, *_FINAL_NORM_NAMES, *_PROJECT_OUT_NAMES, *_INPUT_SIDE_NAMES)
    for child, module in decoder.named_children():
        if child not in known and any(True for _ in module.parameters()):
            raise UnsupportedArchitecture(
                f"{name}: its decoder ({type(decoder).__name__}) holds {child!r} "
                f"({type(module).__name__}), which the tool cannot place on the heads' path "
                f"to the logits; supported families: {SUPPORTED}")
    final_norm = next((getattr(decoder, n) for n in _FINAL_NORM_NAMES
                       if getattr(decoder, n, None) is not None), None)
    project_out = next((getattr(decoder, n) for n in _PROJECT_OUT_NAMES
                        if getattr(decoder, n, None) is not None), None)
    return final_norm, project_out


def attention_module(layer: nn.Module) -> nn.Module | None:
    """A decoder layer's attention submodule (self_attn / attn / attention: the module
    transformers hands its AttentionInterface function), or None where it has none."""
    return next((getattr(layer, a) for a in _ATTN_NAMES if getattr(layer, a, None) is not None),
                None)


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
        f"{_OUT_NAMES}; supported families: {SUPPORTED}")



def head_sites(model: nn.Module) -> HeadSites:
    """Locate layers, per-layer output projections, head geometry and the path from the
    heads' outputs to the logits, from the model's config and module tree.

    Raises :class:`UnsupportedArchitecture` (one line, naming what it cannot handle) for a
    structure outside the supported families: no decoder layer list or attention output
    projection, a projection input other than heads x head_dim, a norm or decoder child of
    unknown place on the path to the logits, a logit transform it does not apply, or an
    unembedding whose input size is not the decoder's output size."""
    config = getattr(model, "config", None)
    name = type(model).__name__
    if config is None:
        raise UnsupportedArchitecture(f"{name} has no .config: not a Hugging Face model; "
                                      f"supported families: {SUPPORTED}")
    n_layers, heads = config_shape(config)
    config = text_config(config)
    hidden = config_value(config, "hidden_size", "n_embd", "d_model")
    if hidden is None:
        raise UnsupportedArchitecture(f"{name}: config lacks the hidden size")
    head_dim = config_value(config, "head_dim") or hidden // heads
    decoder, layers_name, layers = _find_layers(model, n_layers)
    out_proj = [_find_out_proj(layer, i, name) for i, layer in enumerate(layers)]
    in_features = linear_in_features(out_proj[0])
    if in_features != heads * head_dim:
        raise UnsupportedArchitecture(
            f"{name}: output projection takes {in_features} inputs, expected heads*head_dim = "
            f"{heads}*{head_dim}")
    for key in _UNHANDLED_LOGIT_KEYS:
        if getattr(config, key, None) not in (None, 1, 1.0):
            raise UnsupportedArchitecture(f"{name}: config.{key}={getattr(config, key)} "
                                          "rescales the logits, which the tool does not "
                                          f"apply; supported families: {SUPPORTED}")
    attn_out_norms = _attn_out_norms(layers, name)
    final_norm, project_out = _decoder_tail(decoder, layers_name, name)
    unembed = model.get_output_embeddings()
    if unembed is None:
        raise UnsupportedArchitecture(f"{name}: no output embedding (unembedding) found")
    width = linear_out_features(project_out) if project_out is not None else hidden
    if linear_in_features(unembed) != width:
        raise UnsupportedArchitecture(
            f"{name}: the unembedding takes {linear_in_features(unembed)} inputs but the "
            f"decoder puts out {width}; supported families: {SUPPORTED}")
    softcap = getattr(config, "final_logit_softcapping", None)
    return HeadSites(layers, out_proj, n_layers, heads, head_dim, final_norm, unembed,
                     attn_out_norms, project_out, float(softcap) if softcap else None)


def _linear_features(module: nn.Module, side: str) -> int:
    """A linear layer's ``in`` or ``out`` size: GPT-2's Conv1D stores its weight as
    [in, out], nn.Linear (and bitsandbytes' layers, through :func:`linear_weight`) as
    [out, in]."""
    if type(module).__name__ == "Conv1D":
        return int(module.weight.shape[0 if side == "in" else 1])
    features = getattr(module, f"{side}_features", None)
    if features is not None:
        return int(features)
    return int(linear_weight(module).shape[1 if side == "in" else 0])


def linear_out_features(module: nn.Module) -> int:
    """A linear layer's output size (nn.Linear, GPT-2's Conv1D, bitsandbytes layers)."""
    return _linear_features(module, "out")


def linear_in_features(module: nn.Module) -> int:
    """A linear layer's input size (nn.Linear, GPT-2's Conv1D, bitsandbytes layers)."""
    return _linear_features(module, "in")

