"""The layers below the first one a pass changes, computed once per batch and process.

Every evaluation of the same items in one process runs the same batches: the same rows in the
same order (sorted by length), the same batch size, the same torch threads
(:func:`ih_sweep.evaluation.batches.batch_threads` is a function of the whole run). Layers that
no ablation touches compute the same numbers in each: the bundled tiny model's induction heads
all sit in layer 1, so its layer 0 (two thirds of an evaluation's time on CPU) is the same for
the unablated model, the top-N and the layer-matched controls of a sweep, and for every draw of
a random null. TransformerLens does this by hand: ``run_with_cache`` once, then
``forward(..., start_at_layer=L)``.

Inside the evaluator's teacher-forced pass (only there: :func:`ih_sweep.model.forward.reading`,
the fast path's Llama-family layer patch, :mod:`.layers`), such a layer returns the output an
earlier pass of the same batch computed (a :class:`LayerStore` of the model), and fills the
key/value cache with keys and values computed by the code the layer itself runs there
(:func:`.layers._keys_values` on its ``input_layernorm``): the cache is the one the whole layer
leaves, and decoding goes on from it as before.

Why the numbers are the same (exact, not close):

* The key of a stored output is what the layer's input is made from and what it computes
  with: the pass's token ids and attention mask, the prefix shared by its rows (run once and
  copied, with the number of head sets it runs for), the device and torch's settings that
  change floats (:func:`numerics`: intra-op threads, matmul precision, attention backends,
  autocast), the layer's index, and a fingerprint of the weights by content: every
  parameter, buffer and plain setting of the input and rotary embeddings and of the layers
  up to it (:meth:`StoreUse.fingerprint`, taken once per evaluation), so a weight changed in
  place, through ``.data`` or replaced, or a changed epsilon, is never served stale.
* A layer is reused only while nothing can change what it computes (:func:`untouched_layers`):
  no forward hook or pre-hook and no forward set on the instance (the class's own, bound,
  aside: :func:`ih_sweep.model.forward.own_forward`) on it or any of its modules, or on
  any module outside the layers (the model, the decoder, the embeddings), and
  no global module hook; this package's hooks that only record and transformers' own
  output-capturing hooks (which only record, and only when a call asks) aside. Ablations
  hook the output projections of the layers they ablate (:func:`ih_sweep.model.sites.hook_z`),
  so the layers before the first ablated one qualify; knockout switches the attention
  implementation, and the fast path, of which this is a part, then stays off.
* Outputs are stored and handed out as copies, so a hook downstream that edits its input in
  place changes neither.
* Run-time check: the first reuse of each layer in each evaluation recomputes the layer the
  full way and compares output and keys/values bit for bit (:func:`_checked`); a difference
  turns the store off for the rest of the process, said in one warning, and every later pass
  computes every layer. Weights the fingerprint cannot read by content (quantized
  bitsandbytes weights with their state beside the data, meta or sparse tensors) are never
  reused.

Memory: the stored outputs, [rows, tokens, hidden] per batch and reused layer, are kept on the
model's device up to ``eval.layer_store_mb`` (``auto``: 1024 MB on CPU, none on a GPU, where
the layers are cheap and the memory is the batch's); the least recently used go first. The
tiny model's 1,000 stories take ~34 MB. The fingerprint reads every weight it covers once per
evaluation: 1.6 ms for the tiny model; for a 7B model in bfloat16 the input embedding
(0.26 GB) and ~0.44 GB a reused layer, seconds on CPU (on a GPU, where the store is off by
default, every covered weight is also copied to the host).
"""

from __future__ import annotations

import hashlib
import logging
import threading
import weakref
from collections import OrderedDict
from dataclasses import dataclass

import torch

from ih_sweep.model.forward import leaves_layers_alone, own_forward

log = logging.getLogger(__name__)

AUTO_CPU_MB = 1024  # eval.layer_store_mb=auto on CPU; on another device: off


def budget_bytes(setting: int | str, device: torch.device) -> int:
    """``eval.layer_store_mb`` in bytes for a model on ``device`` (``auto``:
    :data:`AUTO_CPU_MB` on CPU, 0 elsewhere)."""
    if setting == "auto":
        return AUTO_CPU_MB << 20 if device.type == "cpu" else 0
    return int(setting) << 20


class LayerStore:
    """The stored layer outputs of one model, by key (:func:`pass_key`, the layer's index and
    the weights' fingerprint, :meth:`StoreUse.fingerprint`), least recently used first,
    within ``budget`` bytes. Outputs go in and come out as copies (a hook downstream may
    change its input in place). Thread-safe: batches run in several threads at once."""

    def __init__(self, budget: int):
        self.budget = budget
        self.bytes = 0
        self.off = False  # a check failed: nothing is stored or reused any more
        self.hits = 0
        self.misses = 0
        self._entries: OrderedDict[tuple, torch.Tensor] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: tuple) -> torch.Tensor | None:
        with self._lock:
            out = self._entries.get(key)
            if out is not None:
                self._entries.move_to_end(key)
                self.hits += 1
            else:
                self.misses += 1
        return None if out is None else out.clone()

    def put(self, key: tuple, output: torch.Tensor) -> None:
        """Keep a copy of ``output`` under ``key``, dropping the least recently used outputs
        to stay within the budget; an output larger than the whole budget is not kept."""
        size = output.numel() * output.element_size()
        if self.off or size > self.budget:
            return
        kept = output.clone()
        with self._lock:
            if self.off or key in self._entries:
                return
            while self.bytes + size > self.budget and self._entries:
                _, old = self._entries.popitem(last=False)
                self.bytes -= old.numel() * old.element_size()
            self._entries[key] = kept
            self.bytes += size

    def resize(self, budget: int) -> None:
        """A new budget (the next evaluation's setting); drops what no longer fits."""
        with self._lock:
            self.budget = budget
            while self.bytes > budget and self._entries:
                _, old = self._entries.popitem(last=False)
                self.bytes -= old.numel() * old.element_size()

    def turn_off(self, why: str) -> None:
        with self._lock:
            if self.off:
                return
            self.off = True
            self._entries.clear()
            self.bytes = 0
        log.warning("the evaluator no longer reuses unablated layers on this model: %s "
                    "(every layer is computed from here on; results are unaffected)", why)

    def __len__(self) -> int:
        return len(self._entries)


_STORES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_STORES_LOCK = threading.Lock()


def store_for(model, budget: int) -> LayerStore | None:
    """``model``'s store (made on first use, lives as long as the model) with ``budget``
    bytes; None for a budget of 0 (which empties a store the model has) or a store turned
    off by a check."""
    if budget <= 0:
        with _STORES_LOCK:
            store = _STORES.get(model)
        if store is not None:
            store.resize(0)
        return None
    with _STORES_LOCK:
        store = _STORES.get(model)
        if store is None:
            store = _STORES[model] = LayerStore(budget)
    if store.off:
        return None
    if store.budget != budget:
        store.resize(budget)
    return store


def store_use(model, budget: int) -> StoreUse | None:
    """An evaluation's use of ``model``'s store (:func:`store_for`) over its decoder layers
    (:func:`ih_sweep.model.sites.head_sites`); None without a store."""
    from ih_sweep.model.shape import UnsupportedArchitecture
    from ih_sweep.model.sites import head_sites

    store = store_for(model, budget)
    if store is None:
        return None
    try:
        layers = list(head_sites(model).layers)
    except UnsupportedArchitecture:
        return None
    return StoreUse(store, model, layers)


def reset() -> None:
    """Forget every model's store (tests)."""
    with _STORES_LOCK:
        _STORES.clear()


class StoreUse:
    """One evaluation's use of a model's store (``ctx.layer_store`` while the evaluator is
    installed, :func:`ih_sweep.evaluation.fastpath.install.installed`): the ``store``, the
    model and its decoder ``layers``, the weights' fingerprints (taken at the first need in
    this evaluation) and the layers whose first reuse in it has been checked
    (:func:`_checked`)."""

    def __init__(self, store: LayerStore, model, layers: list):
        self.store = store
        self.model = model
        self.layers = list(layers)
        self.checked: set[int] = set()
        self._prints: list[bytes | None] = []
        self._lock = threading.Lock()

    def again(self) -> StoreUse:
        """A fresh use of the same store (another evaluation)."""
        return StoreUse(self.store, self.model, self.layers)

    def fingerprint(self, index: int) -> bytes | None:
        """A digest of everything outside the decoder layers but the output embedding
        (the input embedding, the rotary embedding) and of layers 0..``index``: each
        module's parameters and buffers by content, dtype, shape and device, and its other
        attributes that are tensors or plain settings (an epsilon, a scaling, a dtype,
        training mode). None where some weight is not a plain dense tensor this can read
        (quantized, meta, sparse): such layers are computed, not reused."""
        with self._lock:
            if not self._prints:
                inside = {id(m) for layer in self.layers for m in layer.modules()}
                head = self.model.get_output_embeddings()
                self._prints.append(_digest(
                    [m for m in self.model.modules() if id(m) not in inside and m is not head],
                    None))
            while len(self._prints) <= index + 1:
                before = self._prints[-1]
                self._prints.append(None if before is None else _digest(
                    list(self.layers[len(self._prints) - 1].modules()), before))
            return self._prints[index + 1]

    def untouched(self) -> int:
        """:func:`untouched_layers` of the model now."""
        return untouched_layers(self.model, self.layers)


class Unreadable(Exception):
    """A weight the fingerprint cannot read by content."""


def _digest(modules: list, previous: bytes | None) -> bytes | None:
    """sha256 of ``previous`` (the fingerprint so far; None at the start) and ``modules``'
    state (:func:`_state`); None when some weight is :class:`Unreadable`."""
    digest = hashlib.sha256(previous or b"")
    try:
        for m in modules:
            _state(m, digest)
    except Unreadable:
        return None
    return digest.digest()


_PLAIN = (bool, int, float, str, type(None), torch.dtype, torch.device)


def _tensor(t: torch.Tensor, digest) -> None:
    if type(t) not in (torch.Tensor, torch.nn.Parameter) or t.layout != torch.strided or \
            t.is_meta or t.is_conj() or t.is_neg():
        raise Unreadable(type(t).__name__)
    t = t.detach()
    digest.update(repr((str(t.dtype), tuple(t.shape), t.device.type)).encode())
    digest.update(memoryview(t.contiguous().view(-1).view(torch.uint8).cpu().numpy()))


def _state(module: torch.nn.Module, digest) -> None:
    for name, tensor in [*module.named_parameters(recurse=False),
                         *module.named_buffers(recurse=False)]:
        digest.update(name.encode())
        _tensor(tensor, digest)
        # what a weight carries beside its data (transformers' flags; a quantized weight's
        # state would be an object: unreadable)
        digest.update(repr(_attributes(tensor, digest, strict=True)).encode())
    digest.update(repr((type(module).__qualname__, _attributes(module, digest))).encode())


def _is_plain(value) -> bool:
    return isinstance(value, _PLAIN) or (isinstance(value, tuple) and
                                         all(isinstance(v, _PLAIN) for v in value))


def _attributes(obj, digest, strict: bool = False) -> list:
    """``obj``'s instance attributes that are plain settings, sorted (tensors among them go
    into ``digest``); with ``strict``, any other attribute is :class:`Unreadable`."""
    plain = []
    for key, value in sorted(vars(obj).items()):
        if key in ("_parameters", "_buffers", "_modules"):
            continue
        if isinstance(value, torch.Tensor):
            digest.update(key.encode())
            _tensor(value, digest)
        elif _is_plain(value):
            plain.append((key, value))
        elif strict:
            raise Unreadable(f"{type(obj).__name__}.{key}")
    return plain


@dataclass(frozen=True)
class PassReuse:
    """What a teacher-forced pass running in this thread may reuse: the evaluation's
    :class:`StoreUse`, the pass's :func:`pass_key`, and how many decoder layers from the
    first nothing touches (:func:`untouched_layers`, when the pass starts)."""

    use: StoreUse
    key: bytes
    untouched: int


def numerics() -> tuple:
    """torch's process-wide settings that change a kernel's floats: intra-op threads (sums
    over another number of threads round differently), float32 matmul precision and TF32,
    the scaled-dot-product attention backends allowed, oneDNN, deterministic algorithms,
    autocast."""
    b = torch.backends
    flags: list = [torch.get_num_threads(), torch.get_float32_matmul_precision(),
                   b.cuda.matmul.allow_tf32, b.cudnn.allow_tf32, b.mkldnn.enabled,
                   b.cudnn.deterministic, b.cudnn.benchmark,
                   torch.are_deterministic_algorithms_enabled()]
    for name in ("allow_fp16_reduced_precision_reduction",
                 "allow_bf16_reduced_precision_reduction"):
        flags.append(getattr(b.cuda.matmul, name, None))
    for name in ("flash_sdp_enabled", "mem_efficient_sdp_enabled", "math_sdp_enabled",
                 "cudnn_sdp_enabled"):
        flag = getattr(b.cuda, name, None)
        flags.append(flag() if flag else None)
    for device in ("cpu", "cuda"):
        try:
            flags.append((torch.is_autocast_enabled(device),
                          torch.get_autocast_dtype(device)))
        except (TypeError, AttributeError, RuntimeError):
            flags.append(None)
    return tuple(flags)


def pass_key(host: torch.Tensor, shared_prefix: int, prefix_runs: int, device) -> bytes:
    """The identity of a teacher-forced pass's input: ``host`` (its token ids and attention
    mask as sent to the device, [rows, 2 x width] long), the shared prefix's length and how
    many times it ran (once, or once per head set), the device and torch's settings that
    change floats (:func:`numerics`)."""
    digest = hashlib.sha256(host.numpy().tobytes())
    digest.update(repr((tuple(host.shape), shared_prefix, prefix_runs, str(device),
                        numerics())).encode())
    return digest.digest()


def _observer(hook, capturing: bool) -> bool:
    """Whether ``hook`` changes nothing: one of this package's hooks that only record
    (:func:`ih_sweep.model.forward.leaves_layers_alone`), or transformers' output-capturing
    hook (installed for good on a model's layers the first time a call asks for hidden
    states or attentions, transformers.utils.output_capturing), which records outputs only
    while a call asks for them (``capturing``) and never changes them."""
    if leaves_layers_alone(hook):
        return True
    return not capturing and getattr(hook, "__name__", "") == "output_capturing_hook" and \
        getattr(hook, "__module__", "") == "transformers.utils.output_capturing"


def _capturing() -> bool:
    """Whether a transformers call in this thread is collecting outputs through its hooks
    (see :func:`_observer`): each call sets the collector, a dict of what it collects (empty
    when it asks for nothing). The evaluator asks when its pass starts, before its model
    call sets one, and its passes ask for no outputs; this is for a caller already inside a
    call that collects."""
    try:
        from transformers.utils.output_capturing import _active_collector
    except ImportError:  # releases that capture by wrapping forwards for the call only
        return False
    return bool(_active_collector.get())


def _touched(module: torch.nn.Module, capturing: bool) -> bool:
    """Whether ``module`` (alone, not its children) has a hook that may change what it
    computes, or a forward set on the instance that is not this package's."""
    own = own_forward(module)
    if own is not None and not leaves_layers_alone(own):
        return True
    for name in ("_forward_hooks", "_forward_pre_hooks"):  # torch's own registries
        hooks = getattr(module, name, None)
        if hooks is None:  # a torch that keeps them elsewhere: nothing can be vouched for
            return True
        if any(not _observer(hook, capturing) for hook in hooks.values()):
            return True
    return False


def untouched_layers(model, layers) -> int:
    """How many of ``layers`` (the decoder layers, in order) from the first compute what the
    model as loaded computes: no global module hook is registered, no module outside the
    layers (the model, the decoder, the input and rotary embeddings; the output embedding
    aside) has a hook or a forward of its own that may change what it computes, and none of
    these layers or their modules has one (0 if any outside does; a None in ``layers``
    ends the count)."""
    from torch.nn.modules import module as torch_module

    if any(getattr(torch_module, name, None) for name in ("_global_forward_hooks",
                                                          "_global_forward_pre_hooks")):
        return 0
    capturing = _capturing()
    inside = {id(m) for layer in layers if layer is not None for m in layer.modules()}
    head = model.get_output_embeddings()
    if any(_touched(m, capturing) for m in model.modules()
           if id(m) not in inside and m is not head):
        return 0
    count = 0
    for layer in layers:
        if layer is None or any(_touched(m, capturing) for m in layer.modules()):
            break
        count += 1
    return count


def run_layer(use: StoreUse, key: tuple, index: int, layer, hidden: torch.Tensor,
              kwargs: dict, original, keys_values) -> torch.Tensor:
    """Decoder layer ``index``'s (a Llama-family layer) output on ``hidden`` [B, T, width]
    inside the teacher-forced pass: the stored one under ``key`` if any, with the key/value
    cache (``kwargs``' ``cache``/``past_key_values``) filled by ``keys_values(x, cache)``
    (the layer's own keys and values of its normed input ``x``); else ``original(hidden,
    **kwargs)``, stored. The first reuse of each layer in each evaluation is checked
    (:func:`_checked`)."""
    stored = use.store.get(key)
    if stored is None:
        out = original(hidden, **kwargs)
        if isinstance(out, torch.Tensor) and out.shape == hidden.shape:
            use.store.put(key, out)
        return out
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    if index not in use.checked:
        return _checked(use, index, stored, layer, hidden, kwargs, original, keys_values,
                        cache)
    if cache is not None:
        keys_values(layer.input_layernorm(hidden), cache)
    return stored


def _checked(use: StoreUse, index: int, stored: torch.Tensor, layer, hidden: torch.Tensor,
             kwargs: dict, original, keys_values, cache) -> torch.Tensor:
    """The run-time check of a layer's first reuse in an evaluation: the layer computed the
    full way (which fills the cache) against ``stored``, and the keys/values the reuse would
    put in the cache against those the layer put there (when the pass has a cache), bit for
    bit; the store is turned off on any difference."""
    key, value = keys_values(layer.input_layernorm(hidden), None)
    out = original(hidden, **kwargs)
    same = isinstance(out, torch.Tensor) and torch.equal(out, stored)
    if same and cache is not None:
        try:
            held = cache.layers[layer.self_attn.layer_idx]
            length = key.shape[-2]
            same = torch.equal(held.keys[..., -length:, :], key) and \
                torch.equal(held.values[..., -length:, :], value)
        except (AttributeError, IndexError, TypeError):  # a cache laid out otherwise
            same = False
    if same:
        use.checked.add(index)
    else:
        use.store.turn_off(f"layer {index}'s reused output or keys/values differ from the "
                           "computed ones")
    return out
