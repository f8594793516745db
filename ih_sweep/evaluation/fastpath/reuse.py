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

* The key of a stored output (:func:`pass_key`) is what the layer's input is made from: the
  pass's token ids and attention mask, the prefix shared by its rows (run once and copied, with
  the number of head sets it runs for), torch's intra-op thread count, the device, the layer's
  index and the version counters of the parameters of the layers up to it and of the input
  embedding (an in-place change of a weight changes them).
* A layer is reused only while nothing can change what it computes (:func:`untouched_layers`):
  no forward hook or pre-hook on it or any of its modules, none on the input embedding, no
  global module hook (transformers' own output-capturing hooks, which only record and only
  when a call asks, aside). Ablations hook the output projections of the layers they ablate
  (:func:`ih_sweep.model.sites.hook_z`), so the layers before the first ablated one qualify;
  knockout switches the attention implementation, and the fast path, of which this is a part,
  then stays off.
* Run-time check: the first reuse in each store recomputes the layer the full way and compares
  output and keys/values bit for bit (:meth:`LayerStore.check`); a difference turns the store
  off for the rest of the process, said in one warning, and every later pass computes every
  layer.

Memory: the stored outputs, [rows, tokens, hidden] per batch and reused layer, are kept on the
model's device up to ``eval.layer_store_mb`` (``auto``: 1024 MB on CPU, none on a GPU, where
the layers are cheap and the memory is the batch's); the least recently used go first. The
tiny model's 1,000 stories take ~40 MB.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import weakref
from collections import OrderedDict
from dataclasses import dataclass

import torch

log = logging.getLogger(__name__)

AUTO_CPU_MB = 1024  # eval.layer_store_mb=auto on CPU; on another device: off


def budget_bytes(setting: int | str, device: torch.device) -> int:
    """``eval.layer_store_mb`` in bytes for a model on ``device`` (``auto``:
    :data:`AUTO_CPU_MB` on CPU, 0 elsewhere)."""
    if setting == "auto":
        return AUTO_CPU_MB << 20 if device.type == "cpu" else 0
    return int(setting) << 20


class LayerStore:
    """The stored layer outputs of one model, by key (:func:`pass_key` plus the layer's
    index and parameter versions), least recently used first, within ``budget`` bytes.
    Thread-safe: batches run in several threads at once."""

    def __init__(self, budget: int):
        self.budget = budget
        self.bytes = 0
        self.checked = False  # the first reuse compared with the full computation
        self.off = False  # that comparison failed: nothing is stored or reused any more
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
            return out

    def put(self, key: tuple, output: torch.Tensor) -> None:
        """Keep ``output`` under ``key``, dropping the least recently used outputs to stay
        within the budget; an output larger than the whole budget is not kept."""
        size = output.numel() * output.element_size()
        with self._lock:
            if self.off or size > self.budget or key in self._entries:
                return
            while self.bytes + size > self.budget and self._entries:
                _, old = self._entries.popitem(last=False)
                self.bytes -= old.numel() * old.element_size()
            self._entries[key] = output
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
    bytes; None for a budget of 0 or a store turned off by its check."""
    if budget <= 0:
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


def reset() -> None:
    """Forget every model's store (tests)."""
    with _STORES_LOCK:
        _STORES.clear()


@dataclass(frozen=True)
class PassReuse:
    """What a teacher-forced pass running in this thread may reuse: the model's ``store`` and
    the pass's :func:`pass_key`."""

    store: LayerStore
    key: bytes


def pass_key(host: torch.Tensor, shared_prefix: int, prefix_runs: int, device) -> bytes:
    """The identity of a teacher-forced pass's input: ``host`` (its token ids and attention
    mask as sent to the device, [rows, 2 x width] long), the shared prefix's length and how
    many times it ran (once, or once per head set), torch's intra-op threads and the device
    (sums over another number of threads round differently)."""
    digest = hashlib.sha256(host.numpy().tobytes())
    digest.update(repr((tuple(host.shape), shared_prefix, prefix_runs,
                        torch.get_num_threads(), str(device))).encode())
    return digest.digest()


def _observer(hook, capturing: bool) -> bool:
    """Whether ``hook`` changes nothing: transformers' output-capturing hook (installed for
    good on a model's layers the first time a call asks for hidden states or attentions,
    transformers.utils.output_capturing), which records outputs only while a call asks for
    them (``capturing``) and never changes them."""
    return not capturing and getattr(hook, "__name__", "") == "output_capturing_hook" and \
        getattr(hook, "__module__", "") == "transformers.utils.output_capturing"


def _capturing() -> bool:
    """Whether a transformers call in this thread is collecting outputs through its hooks
    (see :func:`_observer`): each call sets the collector, a dict of what it collects (empty
    when it asks for nothing)."""
    try:
        from transformers.utils.output_capturing import _active_collector
    except ImportError:  # releases that capture by wrapping forwards for the call only
        return False
    return bool(_active_collector.get())


def _hooked(module: torch.nn.Module, capturing: bool) -> bool:
    """Whether a hook that may change what ``module`` computes is on it or its modules."""
    return any(not _observer(hook, capturing) for m in module.modules()
               for hooks in (m._forward_hooks, m._forward_pre_hooks) for hook in hooks.values())


def untouched_layers(model, layers) -> int:
    """How many of ``layers`` (decoder layers, in order) from the first compute what the
    model as loaded computes: none of them or their modules has a forward hook or pre-hook,
    the input embedding has none, and no global module hook is registered (0 if any is;
    a None in ``layers`` ends the count)."""
    from torch.nn.modules import module as torch_module

    if any(getattr(torch_module, name, None) for name in ("_global_forward_hooks",
                                                          "_global_forward_pre_hooks")):
        return 0
    capturing = _capturing()
    embed = model.get_input_embeddings()
    if embed is None or _hooked(embed, capturing):
        return 0
    count = 0
    for layer in layers:
        if layer is None or _hooked(layer, capturing):
            break
        count += 1
    return count


def versions(modules) -> tuple[int, ...]:
    """The version counters of the parameters of ``modules`` (each in-place change of a
    tensor raises its counter)."""
    return tuple(p._version for m in modules for p in m.parameters())


def run_layer(store: LayerStore, key: tuple, layer, hidden: torch.Tensor, kwargs: dict,
              original, keys_values) -> torch.Tensor:
    """A Llama-family decoder layer's output on ``hidden`` [B, T, width] inside the
    teacher-forced pass: the stored one under ``key`` if any, with the key/value cache
    (``kwargs``' ``cache``/``past_key_values``) filled by ``keys_values(x, cache)`` (the
    layer's own keys and values of its normed input ``x``); else ``original(hidden,
    **kwargs)``, stored. The store's first reuse is checked (:func:`_checked`)."""
    stored = store.get(key)
    if stored is None:
        out = original(hidden, **kwargs)
        if isinstance(out, torch.Tensor) and out.shape == hidden.shape:
            store.put(key, out)
        return out
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    if not store.checked:
        return _checked(store, stored, layer, hidden, kwargs, original, keys_values, cache)
    keys_values(layer.input_layernorm(hidden), cache)
    return stored


def _checked(store: LayerStore, stored: torch.Tensor, layer, hidden: torch.Tensor,
             kwargs: dict, original, keys_values, cache) -> torch.Tensor:
    """The store's run-time check: the layer computed the full way (which fills the cache)
    against ``stored``, and the keys/values the reuse would put in the cache against those
    the layer put there, bit for bit; the store is turned off on any difference."""
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
        store.checked = True
    else:
        store.turn_off("a reused layer's output or keys/values differ from the computed "
                       "ones")
    return out
