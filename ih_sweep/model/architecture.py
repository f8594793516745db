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

import inspect
import threading
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field

import torch
from torch import nn

from ih_sweep.config.errors import UserError


class UnsupportedArchitecture(UserError):
    """A model whose structure the tool cannot find its heads in."""

    kind = "model"


SUPPORTED = ("Llama/Mistral/Qwen2/Qwen3/Phi-3/Gemma/Gemma-2/Gemma-3, GPT-2, GPT-NeoX (Pythia), "
             "OPT")  # the families tests/test_families.py runs end to end

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


# --------------------------------------------------------------------------- token positions
class PositionsUnknown(UnsupportedArchitecture):
    """A forward pass whose tokens' absolute positions cannot be told from its inputs (or a
    hook that needs them outside a tracked forward): position-dependent ablations refuse
    to guess."""


# [batch, T] absolute positions of the tokens of the forward pass running in this thread
# (set by the model-level pre-hook of :func:`track_positions`, reset by its post-hook)
_POSITIONS: ContextVar[torch.Tensor | None] = ContextVar("ih_sweep_positions", default=None)
# [batch, k] indices into the pass's T tokens of the rows the next o_proj call sees, where a
# shortcut runs the output projection at a few positions only (eval_attention.last_layer_at)
_Z_INDEX: ContextVar[torch.Tensor | None] = ContextVar("ih_sweep_z_index", default=None)
_TRACKED = "_ih_sweep_tracks_positions"
_stack = threading.local()


def _forward_arguments(model: nn.Module, args: tuple, kwargs: dict) -> dict:
    """The forward call's arguments by name (positional ones bound to the signature)."""
    if not args:
        return kwargs
    try:
        return dict(inspect.signature(model.forward).bind_partial(*args, **kwargs).arguments)
    except TypeError as err:
        raise PositionsUnknown(f"{type(model).__name__}: cannot read the forward call's "
                               f"arguments to tell token positions ({err})") from None


def token_positions(model: nn.Module, args: tuple, kwargs: dict) -> torch.Tensor:
    """Absolute position [batch, T] of every token a causal-LM forward call feeds: each
    token's index among its row's real (unmasked) tokens, cached ones included. This is
    the position the token has when its sequence runs alone, unpadded (the position
    ``generate`` gives it on one story), whatever the padding side, batch or cache:

    - with a 2-D ``attention_mask`` (it covers the cached tokens and the new ones,
      transformers' convention): ``cumsum(mask) - 1`` over the whole row, the new tokens'
      part (:func:`positions_from_mask`; pads get 0). ``position_ids``, where given too,
      must agree at every real token;
    - else ``position_ids`` ([1 or batch, T]) as given;
    - else no padding: the cache's length plus 0..T-1 (what the model itself numbers).

    Raises :class:`PositionsUnknown` where the inputs do not determine positions: a mask
    whose width is not the cache's length plus T, non-2-D masks or position ids without
    the other, position ids that contradict the mask, no input_ids/inputs_embeds."""
    named = _forward_arguments(model, args, kwargs)
    name = type(model).__name__
    x = named.get("input_ids")
    if x is None:
        x = named.get("inputs_embeds")
    if x is None or x.dim() < 2:
        raise PositionsUnknown(f"{name}: a forward call without input_ids or inputs_embeds; "
                               "token positions are unknown")
    batch, length = x.shape[:2]
    cache = named.get("cache", named.get("past_key_values"))
    past = int(cache.get_seq_length()) if cache is not None and \
        hasattr(cache, "get_seq_length") else 0
    mask, ids = named.get("attention_mask"), named.get("position_ids")
    if ids is not None and (ids.dim() != 2 or ids.shape[-1] != length or
                            ids.shape[0] not in (1, batch)):
        raise PositionsUnknown(f"{name}: position_ids of shape {tuple(ids.shape)} for "
                               f"[{batch}, {length}] tokens; token positions are unknown")
    if mask is not None:
        if mask.dim() != 2 or tuple(mask.shape) != (batch, past + length):
            if ids is not None and mask.dim() != 2:
                return ids.expand(batch, length)
            raise PositionsUnknown(
                f"{name}: attention_mask of shape {tuple(mask.shape)} for {length} new "
                f"tokens after {past} cached ones (expected [{batch}, {past + length}]); "
                "token positions are unknown")
        pos = positions_from_mask(mask)[:, past:]
        if ids is not None:
            real = mask[:, past:].bool()
            if not torch.equal(torch.where(real, ids.expand(batch, length).to(pos.device), 0),
                               torch.where(real, pos, 0)):
                raise PositionsUnknown(f"{name}: position_ids disagree with the "
                                       "attention mask's real-token positions; token "
                                       "positions are ambiguous")
        return pos
    if ids is not None:
        return ids.expand(batch, length)
    return (torch.arange(length, device=x.device) + past).expand(batch, length)


@contextmanager
def track_positions(model: nn.Module) -> Iterator[None]:
    """While inside, every forward call of ``model`` (the module callers call: a
    ``*ForCausalLM``; ``generate`` calls it too) records its tokens' absolute positions
    (:func:`token_positions`) for :func:`current_positions`, in the calling thread only.
    A model-level forward pre-hook (with keyword arguments) sets them and a forward hook
    that runs also when the forward raises puts the previous value back. Re-entrant."""
    if getattr(model, _TRACKED, False):
        yield
        return

    def before(module, args, kwargs):
        tokens = getattr(_stack, "tokens", None)
        if tokens is None:
            tokens = _stack.tokens = []
        tokens.append(None)  # popped by ``after`` also when token_positions raises
        tokens[-1] = _POSITIONS.set(token_positions(module, args, kwargs))

    def after(module, args, kwargs, output):
        token = _stack.tokens.pop()
        if token is not None:
            _POSITIONS.reset(token)

    handles = [model.register_forward_pre_hook(before, with_kwargs=True),
               model.register_forward_hook(after, with_kwargs=True, always_call=True)]
    setattr(model, _TRACKED, True)
    try:
        yield
    finally:
        for h in handles:
            h.remove()
        vars(model).pop(_TRACKED, None)


@contextmanager
def z_positions_at(index: torch.Tensor) -> Iterator[None]:
    """Inside (this thread), o_proj calls see the pass's tokens at ``index`` [batch, k]
    (indices into its T tokens) only: for code that runs the output projection at a few
    positions (:func:`ih_sweep.evaluation.fastpath.last_layer_at`)."""
    token = _Z_INDEX.set(index)
    try:
        yield
    finally:
        _Z_INDEX.reset(token)


def current_positions(z: torch.Tensor) -> torch.Tensor:
    """Absolute positions [batch, pos] of the tokens of ``z`` ([batch, pos, ...], an o_proj
    input seen by a :func:`hook_z` function), on ``z``'s device. Raises
    :class:`PositionsUnknown` outside a forward call of a model under
    :func:`track_positions`, or where ``z``'s tokens do not match the pass's."""
    pos = _POSITIONS.get()
    if pos is None:
        raise PositionsUnknown(
            "a position-dependent ablation saw a head's output outside a forward call of "
            "the model it was installed on (a submodule called directly?): token positions "
            "are unknown")
    index = _Z_INDEX.get()
    if index is not None:
        pos = torch.gather(pos, 1, index.to(pos.device))
    if tuple(pos.shape) != tuple(z.shape[:2]):
        raise PositionsUnknown(f"the heads' output has [batch, pos] = {tuple(z.shape[:2])} but "
                               f"the forward call fed {tuple(pos.shape)} tokens: token "
                               "positions are unknown")
    return pos.to(z.device)


def positions_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids [b, T] of a padded batch: each real token's index among its row's real
    tokens, 0 at pads (what transformers' ``generate`` derives, GenerationMixin
    ``_prepare_position_ids_for_generation``). Passed explicitly, they make a left-padded
    batch compute what each row computes alone: models with absolute position embeddings
    (GPT-2) otherwise number the pads too and shift every real token."""
    mask = attention_mask.long()
    return (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)


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
    hidden = _config_value(config, "hidden_size", "n_embd", "d_model")
    if hidden is None:
        raise UnsupportedArchitecture(f"{name}: config lacks the hidden size")
    head_dim = _config_value(config, "head_dim") or hidden // heads
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
    return _linear_features(module, "out")


def linear_in_features(module: nn.Module) -> int:
    return _linear_features(module, "in")


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
