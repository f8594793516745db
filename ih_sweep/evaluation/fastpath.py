"""Attention for the evaluator's teacher-forced pass: the same outputs where they are read,
with less work.

Two facts of that pass make work skippable:

* Its rows are right-padded, so causality alone keeps every real query away from padding:
  no padding mask is needed. On CPU the causal triangle is then computed in query blocks
  (PyTorch's CPU flash kernel computes the whole square for prompts under 512 tokens).
* Only a few positions per row are read (each prompt's last token and the teacher tokens
  after it). In the last layer nothing else depends on the other positions, so only those
  queries are computed; the rest get zeros, which nothing reads. For the Llama-family decoder
  layer (Llama, Mistral, Qwen2) the whole last layer runs at the read positions (keys and
  values still at all of them); other families restrict only its attention. On a 2-layer
  model that is half the work; on a 32-layer model ~3% of it.

In the other Llama-family layers the attention module's forward is this module's too: the
rotary embedding is applied on the projections' own [B, T, heads, D] layout with fewer passes
(:func:`rotate`) and the causal attention is called directly (4-6% of the tiny model's
evaluation time).

:func:`fast_attention` installs this once per evaluation; only passes inside :func:`read_at`
(a context variable, so per thread) take the shortcuts, every other call on the model is the
plain one. Batches evaluated in several threads at once therefore share one installation.

Keys may begin with a cached prefix shared by every row (no padding in it): query i then sits
at key position ``offset + i``. Which calls take a shortcut is decided by allow-lists
(:func:`_fits`, :func:`_takes_shortcut`): only calls whose keyword arguments, shapes and module
state are all in the handled set; anything else (dropout, training mode, a sliding window
shorter than the row, softcapping, attention sinks, position biases, a non-causal module, a
keyword this module does not know) goes to transformers' sdpa / the layer's own forward
unchanged.

The two parts differ in what they rely on. The AttentionInterface function is transformers'
public extension point (switched to with ``set_attn_implementation``, see
:func:`.architecture.attention_implementation`). The patched layer forwards are copies of
transformers' Llama-family internals (decoder layer and attention forward, their keyword
arguments, ``apply_rotary_pos_emb``). Both are on, by default, only where the installed
transformers is a release the tests cover (:data:`TESTED_TRANSFORMERS`, pyproject.toml's
range; elsewhere the plain forward, with one line saying so); see :func:`parts_wanted`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from contextvars import ContextVar

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

NAME = "ih_sweep_eval"
CPU_QUERY_BLOCK = 32  # 32-64 equally fast for ~150-token rows on 2 cores; unblocked 18% slower
# The transformers releases the shortcuts are tested on: [lowest, upper) as in pyproject.toml's
# requirement, whose bound must equal it (a test checks). CI runs the evaluator's tests on the
# newest release below `upper` and on `lowest` (scripts/test.sh). Both parts rely on
# transformers' internals (the AttentionInterface call's keyword arguments, the cache keyword,
# the Llama-family layer forwards the patched ones copy), hence the gate (see parts_wanted).
TESTED_TRANSFORMERS = ("5.0", "5.25")
# (positions [rows, k], rows, largest position) of the pass running in this context
_READ: ContextVar[tuple[torch.Tensor, int, int] | None] = ContextVar(
    "ih_sweep_read_positions", default=None)
_registered = False
_told: set[tuple[str, bool | None]] = set()  # gate lines already logged in this process


def _register() -> None:
    global _registered
    if _registered:
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(NAME, attention)
    AttentionMaskInterface.register(NAME, sdpa_mask)  # used only by calls passed to sdpa
    _registered = True


def transformers_version() -> str:
    """The installed transformers' version (read at each installation)."""
    import transformers

    return transformers.__version__


def tested_range() -> str:
    """:data:`TESTED_TRANSFORMERS` as a requirement specifier, e.g. ``>=5.0,<5.25``."""
    lowest, upper = TESTED_TRANSFORMERS
    return f">={lowest},<{upper}"


def _version_tested(version: str) -> bool:
    """Whether ``version`` is a release in :data:`TESTED_TRANSFORMERS` (pre-releases and
    development builds are not: PEP 440 specifiers exclude them)."""
    from packaging.specifiers import SpecifierSet
    from packaging.version import InvalidVersion, Version

    try:
        return Version(version) in SpecifierSet(tested_range())
    except InvalidVersion:
        return False


def parts_wanted(requested: bool | None) -> tuple[bool, bool]:
    """Which parts of the fast path go on: (the AttentionInterface function, the patched
    layer forwards). ``requested`` is ``eval.fast_layers``.

    On a transformers release in :data:`TESTED_TRANSFORMERS`: the attention part, and the
    layers unless ``requested`` is False. Outside it: nothing unless ``requested`` is True
    (both parts, with a warning; the evaluator's run-time check still falls back where they
    do not match), the plain forward instead; one line says so (once per process and
    version)."""
    version = transformers_version()
    if _version_tested(version):
        return True, requested is not False
    told = (version, requested) in _told
    _told.add((version, requested))
    if requested:
        if not told:
            log.warning("eval.fast_layers=true on transformers %s, which the tests do not "
                        "cover (%s): the evaluator's shortcuts rely on its internals and may "
                        "not match them (its run-time check falls back if they do not)",
                        version, tested_range())
        return True, True
    if not told:
        log.info("the evaluator's shortcuts are off (plain forward, slower): transformers %s "
                 "is not a release the tests cover (%s; eval.fast_layers=true forces them)",
                 version, tested_range())
    return False, False


class FastPath:
    """What :func:`fast_attention` installed on a model: true while its attention is on.
    ``layers``: whether the Llama-family layer forwards are patched too. :meth:`off` takes
    everything off (for good); :meth:`suspended` for a while (nothing may run a pass on the
    model in another thread meanwhile)."""

    def __init__(self, model, layers: bool):
        self.model = model
        self.want_layers = layers
        self.on = False
        self.layers = False
        self._stack: ExitStack | None = None

    def __bool__(self) -> bool:
        return self.on

    def _install(self) -> None:
        from ih_sweep.model.architecture import AttentionSwitchError, attention_implementation

        _register()
        stack = ExitStack()
        try:
            stack.enter_context(attention_implementation(self.model, NAME))
        except AttentionSwitchError as error:
            log.debug("evaluator's attention not installed: %s", error)
            return
        patched = _patch_layers(self.model) if self.want_layers else []
        stack.callback(_unpatch_all, patched)
        self._stack, self.on, self.layers = stack, True, bool(patched)

    def off(self) -> None:
        if self._stack is not None:
            self._stack.close()
        self._stack, self.on, self.layers = None, False, False

    @contextmanager
    def suspended(self) -> Iterator[None]:
        was_on = self.on
        self.off()
        try:
            yield
        finally:
            if was_on:
                self._install()


@contextmanager
def fast_attention(model, layers: bool | None = None) -> Iterator[FastPath]:
    """Install the evaluator's attention on ``model`` while inside; yields a :class:`FastPath`
    (true when on). ``layers``: also patch the Llama-family layer forwards (``eval.fast_layers``;
    which parts go on, by the installed transformers' version: :func:`parts_wanted`).

    Installed, it changes nothing by itself: only forward passes run inside
    :func:`read_at` (in the same thread) take the shortcuts; every other call gets sdpa and
    the layers' own forwards, as before. So one installation can serve batches evaluated in
    several threads at once. Models on another attention kernel (eager, flash-attention,
    flex) keep theirs, and so do models whose attention does not go through transformers'
    AttentionInterface. Re-entrant: an inner call on an installed model changes nothing
    (it yields a FastPath that is on but owns nothing)."""
    previous = model.config._attn_implementation
    if previous == NAME:
        inner = FastPath(model, False)
        inner.on = True
        yield inner
        return
    attention_on, layers_on = parts_wanted(layers)
    fast = FastPath(model, layers_on)
    if attention_on and previous in ("sdpa", None):
        fast._install()
    try:
        yield fast
    finally:
        fast.off()


@contextmanager
def read_at(positions: torch.Tensor) -> Iterator[None]:
    """Inside (this thread/context only), a forward pass of a model under
    :func:`fast_attention`, over right-padded rows (after, optionally, a cached prefix shared
    by all rows), is exact at ``positions`` [rows, k] of its input and at every position
    before the last layer."""
    if positions.dim() != 2 or positions.numel() == 0 or int(positions.min()) < 0:
        raise ValueError(f"read positions must be a non-empty [rows, k] tensor of indices, "
                         f"got shape {tuple(positions.shape)}")
    token = _READ.set((positions, positions.shape[0], int(positions.max())))
    try:
        yield
    finally:
        _READ.reset(token)


@contextmanager
def read_only_at(model, positions: torch.Tensor, layers: bool | None = None
                 ) -> Iterator[FastPath]:
    """:func:`fast_attention` and :func:`read_at` together, for one forward pass."""
    with fast_attention(model, layers) as fast, read_at(positions):
        yield fast


# --------------------------------------------------------------------------- patched layers
def _llama_family() -> dict[type, type]:
    """The decoder layer classes whose forward (and their attention's) this module re-runs,
    each with its attention class: exactly these classes, not subclasses (which may change
    the forward)."""
    from transformers.models.llama import modeling_llama as llama
    from transformers.models.mistral import modeling_mistral as mistral
    from transformers.models.qwen2 import modeling_qwen2 as qwen2

    return {llama.LlamaDecoderLayer: llama.LlamaAttention,
            mistral.MistralDecoderLayer: mistral.MistralAttention,
            qwen2.Qwen2DecoderLayer: qwen2.Qwen2Attention}


def _patch_layers(model) -> list:
    """Patch the Llama-family layers (the last one's whole forward, the others' attention
    forward); returns (module, what to put back) pairs."""
    layers = _llama_layers(model)
    patched = []
    for i, layer in enumerate(layers):
        if layer is None:
            continue
        if i == len(layers) - 1:
            patched.append((layer, _patch(layer, _read_only_layer(layer, layer.forward))))
        else:
            attn = layer.self_attn
            patched.append((attn, _patch(attn, _read_only_attention(attn, attn.forward))))
    return patched


def _unpatch_all(patched: list) -> None:
    for module, own in reversed(patched):
        _unpatch(module, own)


def _llama_layers(model) -> list:
    """Each decoder layer if it is the Llama-family layer this module re-runs and no
    accelerate hook (device placement across cards, offloading) wraps it, else None."""
    from ih_sweep.model.architecture import UnsupportedArchitecture, head_sites

    try:
        layers = list(head_sites(model).layers)
    except UnsupportedArchitecture:
        return []
    family = _llama_family()
    return [layer if _is_plain_llama_layer(layer, family) else None for layer in layers]


def _is_plain_llama_layer(layer, family: dict[type, type]) -> bool:
    attn = getattr(layer, "self_attn", None)
    if family.get(type(layer)) is not type(attn) or \
            any(hasattr(m, "_hf_hook") for m in (layer, attn)) or \
            any(hasattr(attn, name) for name in ("q_norm", "k_norm")):
        return False
    return all(hasattr(attn, name) for name in ("q_proj", "k_proj", "v_proj", "o_proj",
                                                "head_dim", "scaling", "layer_idx", "config"))


def _patch(module, forward) -> object:
    """Set an instance forward; returns what to put back (an existing wrapper, or None)."""
    own = vars(module).get("forward")
    module.forward = forward
    return own


def _unpatch(module, own) -> None:
    if own is None:
        del module.forward  # the class's forward shows again
    else:
        module.forward = own


def _rope_of(module):
    import sys

    return getattr(sys.modules[type(module).__module__], "apply_rotary_pos_emb", None)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rope) -> torch.Tensor:
    """Rotary embedding of ``x`` [B, T, n, D] (the projection's own layout, so no transposed
    copy first) with transformers' half-split convention: 4 passes over half the tensor
    instead of rotate_half's 5 over all of it. ``cos``/``sin`` [B or 1, T, D]; where their two
    halves differ (not the standard rotary table) ``rope`` (transformers' function) does it."""
    half = x.shape[-1] // 2
    if cos.shape[-1] != x.shape[-1] or not torch.equal(cos[..., :half], cos[..., half:]) or \
            not torch.equal(sin[..., :half], sin[..., half:]):
        out, _ = rope(x.transpose(1, 2), x.transpose(1, 2), cos, sin)
        return out.transpose(1, 2)
    c, s = cos[..., None, :half], sin[..., None, :half]
    x1, x2 = x[..., :half], x[..., half:]
    out = torch.empty(x.shape, dtype=torch.result_type(x, cos), device=x.device)
    o1, o2 = out[..., :half], out[..., half:]
    torch.mul(x1, c, out=o1).addcmul_(x2, s, value=-1)
    torch.mul(x2, c, out=o2).addcmul_(x1, s)
    return out.to(x.dtype)


def _cache_of(kwargs: dict):
    return kwargs.get("cache", kwargs.get("past_key_values"))


# keyword arguments the decoder passes a layer / the layer passes its attention (transformers
# 5.24) that the shortcut handles: the cache (either name), ``use_cache``, and positions that
# ``position_embeddings`` already encodes. The attention mask is dropped by design (read_at's
# contract: right-padded rows). Any other keyword: the original forward.
_LAYER_KWARGS = frozenset({"attention_mask", "position_embeddings", "position_ids", "cache",
                           "past_key_values", "use_cache", "cache_position"})


def _takes_shortcut(module, attn, hidden: torch.Tensor, args: tuple, kwargs: dict,
                    embeddings, cache, rope) -> bool:
    """Whether a call of a patched layer / attention forward fits the shortcut (an
    allow-list): inside :func:`read_at`, evaluation mode, keyword arguments only and all of
    them in :data:`_LAYER_KWARGS`, [B, T, width] hidden states with a read position row per
    batch row inside T, a rotary table for T positions, and no sliding window shorter than
    the cached plus new keys."""
    read = _READ.get()
    if read is None or args or rope is None or module.training or attn.training or \
            not set(kwargs) <= _LAYER_KWARGS or not _is_cache(cache) or \
            not isinstance(embeddings, tuple) or len(embeddings) != 2 or hidden.dim() != 3:
        return False
    batch, length = hidden.shape[:2]
    cos, sin = embeddings
    _, rows, top = read
    if rows != batch or top >= length or cos.dim() != 3 or cos.shape != sin.shape or \
            cos.shape[1] != length or cos.shape[0] not in (1, batch):
        return False
    window = getattr(attn.config, "sliding_window", None)
    past = 0 if cache is None else cache.get_seq_length(attn.layer_idx)
    return not window or window >= past + length


def _is_cache(cache) -> bool:
    if cache is None:
        return True
    from transformers import DynamicCache

    return type(cache) is DynamicCache


def _keys_values(attn, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rope, cache
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotated keys and values [B, KV, T(+cached), D] of ``x`` [B, T, width]; ``cache``
    (if any) updated with them."""
    shape = (*x.shape[:2], -1, attn.head_dim)
    key = rotate(attn.k_proj(x).view(shape), cos, sin, rope).transpose(1, 2)
    value = attn.v_proj(x).view(shape).transpose(1, 2)
    if cache is not None:
        key, value = cache.update(key, value, attn.layer_idx)
    return key, value


def _read_only_attention(attn, original):
    """A forward for a Llama-family attention module that, inside :func:`read_at`, runs the
    causal attention of this module directly on the projections' own layout (see
    :func:`rotate`); ``original`` for every other call and for calls that do not fit."""
    rope = _rope_of(attn)

    def forward(hidden_states, position_embeddings=None, attention_mask=None, *args, **kwargs):
        cache = _cache_of(kwargs)
        if not _takes_shortcut(attn, attn, hidden_states, args, kwargs, position_embeddings,
                               cache, rope):
            return original(hidden_states, position_embeddings, attention_mask, *args,
                            **kwargs)
        return attention_at_all(attn, hidden_states, position_embeddings, cache, rope), None

    return forward


def attention_at_all(attn, hidden: torch.Tensor,
                     embeddings: tuple[torch.Tensor, torch.Tensor], cache, rope
                     ) -> torch.Tensor:
    """The attention module's output [B, T, width] over right-padded rows (causal only);
    fills ``cache`` with its key/values."""
    batch, length, _ = hidden.shape
    cos, sin = embeddings
    query = rotate(attn.q_proj(hidden).view(batch, length, -1, attn.head_dim), cos, sin, rope)
    query = query.transpose(1, 2)
    key, value = _keys_values(attn, hidden, cos, sin, rope, cache)
    out = causal(query, key, value, attn.scaling, query.shape[1] // key.shape[1])
    return attn.o_proj(out.reshape(batch, length, -1))


def _read_only_layer(layer, original):
    """A forward for the last decoder layer that, inside :func:`read_at`, computes its
    output at the read positions only (zeros elsewhere); ``original`` for every other call
    and for calls that do not fit."""
    rope = _rope_of(layer.self_attn)

    def forward(hidden_states, *args, **kwargs):
        embeddings = kwargs.get("position_embeddings")
        cache = _cache_of(kwargs)
        if not _takes_shortcut(layer, layer.self_attn, hidden_states, args, kwargs, embeddings,
                               cache, rope):
            return original(hidden_states, *args, **kwargs)
        return last_layer_at(layer, hidden_states, embeddings, _READ.get()[0], cache, rope)

    return forward


def last_layer_at(layer, hidden: torch.Tensor, embeddings: tuple[torch.Tensor, torch.Tensor],
                  positions: torch.Tensor, cache, rope) -> torch.Tensor:
    """The Llama-family decoder layer's output at ``positions`` [B, k], zeros elsewhere;
    fills ``cache`` with its key/values at every position."""
    from ih_sweep.model.architecture import z_positions_at

    attn = layer.self_attn
    batch, length, width = hidden.shape
    pos = positions.to(hidden.device)
    k = pos.shape[1]
    x = layer.input_layernorm(hidden)
    cos, sin = embeddings
    key, value = _keys_values(attn, x, cos, sin, rope, cache)
    take = pos[:, :, None]
    query = attn.q_proj(torch.gather(x, 1, take.expand(batch, k, width)))
    cos_at = torch.gather(cos.expand(batch, -1, -1), 1, take.expand(batch, k, cos.shape[-1]))
    sin_at = torch.gather(sin.expand(batch, -1, -1), 1, take.expand(batch, k, sin.shape[-1]))
    query = rotate(query.view(batch, k, -1, attn.head_dim), cos_at, sin_at, rope)
    query = query.transpose(1, 2)
    out = _attend_at(query, key, value, pos, length, attn.scaling,
                     query.shape[1] // key.shape[1])
    with z_positions_at(pos):  # o_proj sees the read positions only (hook_z's positions)
        out = attn.o_proj(out.transpose(1, 2).reshape(batch, k, -1))
    h = torch.gather(hidden, 1, take.expand(batch, k, width)) + out
    h = h + layer.mlp(layer.post_attention_layernorm(h))
    return hidden.new_zeros(hidden.shape).scatter_(1, take.expand(batch, k, width), h)


def _plain_sdpa(module, query, key, value, attention_mask, **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


# keyword arguments of an AttentionInterface call that the shortcut handles. Inert ones
# (sdpa_attention_forward ignores them too): positions and cache flags the decoder passes on.
_INERT_KWARGS = frozenset({"position_ids", "use_cache", "cache_position"})
# ones the shortcut handles for some values only: see _fits
_OFF_WHEN_NONE = frozenset({"softcap", "s_aux", "position_bias"})


def _fits(module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
          dropout: float, kwargs: dict, read: tuple[torch.Tensor, int, int]) -> bool:
    """Whether an AttentionInterface call takes the shortcut (an allow-list): every keyword
    argument is inert, or ``sliding_window`` (None/0 or covering every key), ``is_causal``
    (None or True), or softcap / s_aux / position_bias set to None; no dropout, the module
    in evaluation mode and causal; [B, H, T, D] query with key/value [B, KV, >= T, D] of one
    dtype and device, H a multiple of KV; one read-position row per batch row, inside T."""
    for name, value_ in kwargs.items():
        if name in _INERT_KWARGS:
            continue
        if name in _OFF_WHEN_NONE and value_ is None:
            continue
        if name == "sliding_window" and (not value_ or value_ >= key.shape[2]):
            continue
        if name == "is_causal" and value_ in (None, True):
            continue
        return False
    if dropout or getattr(module, "training", True) or \
            getattr(module, "is_causal", True) is not True:
        return False
    if query.dim() != 4 or key.dim() != 4 or value.shape != key.shape or \
            not query.dtype == key.dtype == value.dtype or \
            not query.device == key.device == value.device:
        return False
    batch, heads, length, dim = query.shape
    if key.shape[0] != batch or key.shape[3] != dim or key.shape[2] < length or \
            heads % key.shape[1]:
        return False
    _, rows, top = read
    return rows == batch and top < length


def _is_last_layer(module) -> bool:
    layer = getattr(module, "layer_idx", None)
    config = getattr(module, "config", None)
    n_layers = getattr(config, "num_hidden_layers", None)
    return layer is not None and n_layers is not None and layer == n_layers - 1


def attention(module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
              attention_mask: torch.Tensor | None, dropout: float = 0.0,
              scaling: float | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    """An AttentionInterface function: [B, H, T, D] query, [B, KV, T, D] key/value in,
    [B, T, H, D] out (transformers' convention)."""
    read = _READ.get()
    if read is None or not _fits(module, query, key, value, dropout, kwargs, read):
        return _plain_sdpa(module, query, key, value, attention_mask, dropout=dropout,
                           scaling=scaling, **kwargs)
    positions = read[0]
    groups = query.shape[1] // key.shape[1]
    if _is_last_layer(module):
        return selected_queries(query, key, value, positions, scaling, groups), None
    return causal(query, key, value, scaling, groups), None


def _sdpa(q, k, v, groups: int, **kw) -> torch.Tensor:
    if groups > 1:
        return F.scaled_dot_product_attention(q, k, v, enable_gqa=True, **kw)
    return F.scaled_dot_product_attention(q, k, v, **kw)


def causal(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
           scaling: float | None, groups: int, block: int | None = None) -> torch.Tensor:
    """Causal attention without a padding mask (query i at key position offset + i); on CPU
    in query blocks that see only the keys up to their end."""
    length = query.shape[2]
    offset = key.shape[2] - length
    block = block or CPU_QUERY_BLOCK
    if offset == 0 and (query.device.type != "cpu" or length <= block):
        out = _sdpa(query, key, value, groups, is_causal=True, scale=scaling)
        return out.transpose(1, 2).contiguous()
    if query.device.type != "cpu":
        block = length  # one call with an explicit mask
    out = query.new_empty(query.shape[0], length, query.shape[1], query.shape[3])
    index = torch.arange(offset + length, device=query.device)
    for start in range(0, length, block):
        end = min(length, start + block)
        mask = index[None, :offset + end] <= index[offset + start:offset + end, None]
        part = _sdpa(query[:, :, start:end], key[:, :, :offset + end],
                     value[:, :, :offset + end], groups, attn_mask=mask, scale=scaling)
        out[:, start:end] = part.transpose(1, 2)
    return out


def _attend_at(query_at: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
               positions: torch.Tensor, length: int, scaling: float | None, groups: int
               ) -> torch.Tensor:
    """Attention of queries already taken at ``positions`` [B, k] of a ``length``-long input
    whose keys may begin with a shared cached prefix: [B, H, k, D]."""
    offset = key.shape[2] - length
    mask = (torch.arange(key.shape[2], device=key.device)[None, None, :]
            <= offset + positions[:, :, None])
    return _sdpa(query_at, key, value, groups, attn_mask=mask[:, None], scale=scaling)


def selected_queries(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     positions: torch.Tensor, scaling: float | None, groups: int
                     ) -> torch.Tensor:
    """Attention outputs at query ``positions`` [B, k] only; zeros elsewhere."""
    batch, heads, length, dim = query.shape
    pos = positions.to(query.device)
    k = pos.shape[1]
    q = torch.gather(query, 2, pos[:, None, :, None].expand(batch, heads, k, dim))
    part = _attend_at(q, key, value, pos, length, scaling, groups)
    out = query.new_zeros(batch, length, heads, dim)
    out.scatter_(1, pos[:, :, None, None].expand(batch, k, heads, dim), part.transpose(1, 2))
    return out
