"""The forward-pass context: every piece of state a forward pass's hooks read, in one object.

What TransformerLens keeps in its hook points and nnsight in its trace: the code that runs a
forward pass (the evaluator, an ablation, the scoring / mechanism / scan code) says here what
the hooks it installs need to know, and the hooks read it from here, nowhere else.

One :class:`ForwardContext` per model (:meth:`ForwardContext.of`; callers may also create one
and hand it on). It holds two kinds of state:

- *per model*, shared by every thread: what is installed on the model now (position tracking,
  ablations, a row-dependent ablation, the evaluator's shortcuts and its store of unablated
  layers). Counters, changed under a lock, because several ``with`` blocks may be open at
  once (re-entrant installs). And, per
  key/value cache (weakly keyed), the tokens its columns hold, copied and selected with its
  rows (:meth:`ForwardContext.repeat_cache_rows`, :meth:`ForwardContext.select_cache_rows`).
- *per pass*, hence *per thread*: batches run concurrently in threads on one model
  (``eval.cpu_workers``), each pass in the thread that called it, so the values of a pass
  live in a :class:`threading.local` inside the context: the token positions of the forward
  call running (a stack: a pass may call the model again inside), the rows the next o_proj
  call sees (:meth:`ForwardContext.z_positions_at`), the row keys (which sequence each
  batch row holds), the row head sets (which draw's heads each row ablates), the positions
  the logits are computed at, the self-check's record, the tokens of the forward call's keys
  (knockout ablation), the stored layers the pass may reuse
  (:mod:`ih_sweep.evaluation.fastpath.reuse`).
  A value set in one thread is never seen by another (threads start with none set).

One value is not in the object: the evaluator's read positions (:func:`reading`). transformers
calls the AttentionInterface function with the attention module alone (not the model), and
the Llama-family layer forwards from the decoder's own loop, so neither can be handed a
context: the read positions of the pass running in this thread sit in this module's one
ContextVar, :data:`_READ` (per thread, like the values above: a new thread starts without).

No attribute is ever set on a model: the registry of contexts is weakly keyed by the model
(a context lives as long as its model) and :func:`reset` empties it (tests).
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Hashable, Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

import torch

# (read positions [rows, k], rows, largest position) of the pass running in this thread; see
# the module docstring for why this one value is a ContextVar
_READ: ContextVar[tuple[torch.Tensor, int, int] | None] = ContextVar(
    "ih_sweep_read_positions", default=None)

_UNSET = object()


class RowKeys:
    """The row keys of the passes inside :meth:`ForwardContext.sequence_keys` (one per batch
    row), with what an ablation derives from them cached per (fill, device) in :attr:`cache`
    (one lookup per pass, not per layer)."""

    def __init__(self, keys: Sequence[Hashable]):
        self.keys = tuple(keys)
        self.cache: dict = {}


class RowSets:
    """The head sets of the passes inside :meth:`ForwardContext.head_sets`: which of the
    ablated head sets (an index into the list :func:`ih_sweep.ablation.hooks.ablate_head_sets`
    was given) each batch row takes, one per row, with what the hook derives from them cached
    per (layer, device) in :attr:`cache` (one index tensor per pass, not per layer)."""

    def __init__(self, sets: Sequence[int]):
        self.sets = tuple(int(s) for s in sets)
        self.cache: dict = {}


class ForwardContext:
    """State of the forward passes of one model (see the module docstring).

    Per model (read by any thread): :attr:`tracking`, :attr:`ablating`,
    :attr:`row_dependent_ablations` (counts of open contexts), :attr:`evaluator` (the
    evaluator's installation, or None), per key/value cache the tokens its columns hold
    (:meth:`history`; knockout ablation, :mod:`ih_sweep.model.edges`). Per thread:
    :attr:`positions`, :attr:`tokens`, :attr:`z_index`, :attr:`row_keys`, :attr:`row_sets`,
    :attr:`logits_at`, :attr:`record`, :attr:`layer_reuse`."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._local = threading.local()
        self.tracking = 0  # track_positions contexts open (ih_sweep.model.positions)
        self.ablating = 0  # ablations on (ih_sweep.ablation.hooks.ablate_heads)
        self.row_dependent_ablations = 0  # of which fill rows by their sequence (resample)
        self.head_set_ablations = 0  # of which ablate a head set per row (ablate_head_sets)
        self.evaluator: Any = None  # the evaluator's FastPath while installed
        # the evaluation's use of the store of unablated layers' outputs while the
        # evaluator is installed with one (ih_sweep.evaluation.fastpath.reuse.StoreUse)
        self.layer_store: Any = None
        # per key/value cache: the tokens its columns hold (ih_sweep.model.edges.track_tokens)
        self._histories: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    # ------------------------------------------------------------------- the registry
    @classmethod
    def of(cls, model) -> ForwardContext:
        """The context of ``model`` (created on first use; weakly keyed, no attribute on the
        model). Thread-safe."""
        with _REGISTRY_LOCK:
            ctx = _REGISTRY.get(model)
            if ctx is None:
                ctx = _REGISTRY[model] = cls()
            return ctx

    # ------------------------------------------------------------------- per model
    @contextmanager
    def counted(self, name: str) -> Iterator[None]:
        """``self.<name>`` (one of the counters) one higher while inside."""
        with self._lock:
            setattr(self, name, getattr(self, name) + 1)
        try:
            yield
        finally:
            with self._lock:
                setattr(self, name, getattr(self, name) - 1)

    @property
    def row_dependent(self) -> bool:
        """Whether an ablation fills a row by which sequence it holds (resample): then a
        prefix all rows share must still run in every row."""
        return self.row_dependent_ablations > 0

    # ------------------------------------------------------------------- per cache
    def history(self, cache) -> Any:
        """What :func:`ih_sweep.model.edges.track_tokens` recorded for the columns of the
        key/value ``cache`` (None: nothing)."""
        with self._lock:
            return self._histories.get(cache)

    def set_history(self, cache, value: Any) -> None:
        with self._lock:
            self._histories[cache] = value

    def repeat_cache_rows(self, cache, n: int) -> None:
        """``cache.batch_repeat_interleave(n)``, and the same for the tokens recorded for
        its columns (if any): a prefix run once, copied to ``n`` rows."""
        cache.batch_repeat_interleave(n)
        held = self.history(cache)
        if held is not None:
            self.set_history(cache, held.repeat_rows(n))

    def select_cache_rows(self, cache, index: torch.Tensor) -> None:
        """``cache.batch_select_indices(index)``, and the same for the tokens recorded for
        its columns (if any): decoding goes on with these rows, in this order."""
        cache.batch_select_indices(index)
        held = self.history(cache)
        if held is not None:
            self.set_history(cache, held.select_rows(index))

    # ------------------------------------------------------------------- per thread
    def push_tokens(self, tokens: Any) -> None:
        """A forward call starts in this thread: the tokens of its keys
        (:class:`ih_sweep.model.edges.PassTokens`; None until known). Paired with
        :meth:`pop_tokens`."""
        stack = self._get("tokens_stack")
        if stack is None:
            stack = self._local.tokens_stack = []
        stack.append(tokens)

    def set_tokens(self, tokens: Any) -> None:
        self._local.tokens_stack[-1] = tokens

    def pop_tokens(self) -> None:
        self._local.tokens_stack.pop()

    @property
    def tokens(self) -> Any:
        """The tokens of the forward call running in this thread (None outside one)."""
        stack = self._get("tokens_stack")
        return stack[-1] if stack else None

    def _get(self, name: str, default=None):
        return getattr(self._local, name, default)

    @contextmanager
    def _setting(self, name: str, value) -> Iterator[None]:
        """``name`` = ``value`` in this thread while inside; the previous value after."""
        previous = getattr(self._local, name, _UNSET)
        setattr(self._local, name, value)
        try:
            yield
        finally:
            if previous is _UNSET:
                delattr(self._local, name)
            else:
                setattr(self._local, name, previous)

    def push_positions(self, positions: torch.Tensor | None) -> None:
        """A forward call starts in this thread: its tokens' absolute positions [batch, T]
        (None until known). Paired with :meth:`pop_positions`."""
        stack = self._get("positions_stack")
        if stack is None:
            stack = self._local.positions_stack = []
        stack.append(positions)

    def set_positions(self, positions: torch.Tensor) -> None:
        """The positions of the forward call :meth:`push_positions` started."""
        self._local.positions_stack[-1] = positions

    def pop_positions(self) -> None:
        """The forward call ends: the enclosing call's positions (if any) show again."""
        self._local.positions_stack.pop()

    @property
    def positions(self) -> torch.Tensor | None:
        """[batch, T] absolute positions of the forward call running in this thread, None
        outside one (or before they are known)."""
        stack = self._get("positions_stack")
        return stack[-1] if stack else None

    @contextmanager
    def z_positions_at(self, index: torch.Tensor) -> Iterator[None]:
        """Inside (this thread), o_proj calls see the pass's tokens at ``index`` [batch, k]
        (indices into its T tokens) only: for code that runs the output projection at a few
        positions (:func:`ih_sweep.evaluation.fastpath.layers.last_layer_at`)."""
        with self._setting("z_index", index):
            yield

    @property
    def z_index(self) -> torch.Tensor | None:
        return self._get("z_index")

    @contextmanager
    def sequence_keys(self, keys: Sequence[Hashable]) -> Iterator[None]:
        """Inside (this thread), the forward passes' batch rows hold these sequences, one key
        per row (the evaluator gives each row's story index). Row-dependent ablations
        (resample) take each row's fill from it; others ignore it."""
        with self._setting("row_keys", RowKeys(keys)):
            yield

    @property
    def row_keys(self) -> RowKeys | None:
        return self._get("row_keys")

    @contextmanager
    def head_sets(self, sets: Sequence[int]) -> Iterator[None]:
        """Inside (this thread), the forward passes' batch rows take these head sets, one
        index per row into the sets of :func:`ih_sweep.ablation.hooks.ablate_head_sets` (the
        evaluator gives each row's :attr:`ih_sweep.evaluation.rows.Query.head_set`): several
        draws of a random control share one batch. Other ablations ignore it."""
        with self._setting("row_sets", RowSets(sets)):
            yield

    @property
    def row_sets(self) -> RowSets | None:
        return self._get("row_sets")

    @property
    def per_row_sets(self) -> bool:
        """Whether an ablation ablates a head set per batch row (:meth:`head_sets`): then a
        prefix all rows share runs once per head set, not once."""
        return self.head_set_ablations > 0

    @contextmanager
    def logits_at(self, gather: torch.Tensor) -> Iterator[None]:
        """Inside (this thread), the unembedding of a model with the evaluator installed
        reads the last hidden states at ``gather`` [batch, k] only."""
        with self._setting("logits_at", gather):
            yield

    @property
    def logits_gather(self) -> torch.Tensor | None:
        return self._get("logits_at")

    @contextmanager
    def reusing_layers(self, reuse: Any) -> Iterator[None]:
        """Inside (this thread), the evaluator's teacher-forced pass may take the layers no
        ablation touches from ``reuse`` (a :class:`ih_sweep.evaluation.fastpath.reuse.
        PassReuse`: the evaluation's use of the model's store, the pass's key and how many
        layers nothing touches), or computes them (None)."""
        with self._setting("layer_reuse", reuse):
            yield

    @property
    def layer_reuse(self) -> Any:
        return self._get("layer_reuse")

    @contextmanager
    def recording(self, record: dict[int, torch.Tensor]) -> Iterator[None]:
        """Inside (this thread), the evaluator's teacher-forced passes put each query's
        logits at its read positions into ``record`` (query index -> [reads, vocab]): the
        run-time self-check's two sides."""
        with self._setting("record", record):
            yield

    @property
    def record(self) -> dict[int, torch.Tensor] | None:
        return self._get("record")

    @contextmanager
    def reading(self, positions: torch.Tensor) -> Iterator[None]:
        """:func:`reading` (the read positions live in this module's ContextVar)."""
        with reading(positions):
            yield


def own_forward(module: Any) -> Any:
    """The forward set on ``module`` itself (an instance attribute) that may compute
    something else than its class's, or None. The class's own forward bound to ``module``
    counts as none: transformers 5.0's ``check_model_inputs`` wraps the forwards of the
    modules it records from (hidden states, attentions) for a call that asks for them, and
    afterwards sets ``module.forward = original`` (the bound method it had read), leaving
    that attribute on every such module for good."""
    own = vars(module).get("forward")
    if own is None:
        return None
    if getattr(own, "__self__", None) is module and \
            getattr(own, "__func__", None) is getattr(type(module), "forward", None):
        return None
    return own


def leaves_layers_alone(fn: Any, mark: bool = False) -> Any:
    """With ``mark``: mark ``fn`` (a forward hook, or a forward this package sets on a module)
    as changing nothing the model's layers compute from their inputs: a hook that only
    records (token positions, tokens), or one of the evaluator's own layer forwards (the
    numbers its store keeps are theirs); returns ``fn``. Without: whether ``fn`` is marked.
    The evaluator's store of unablated layers (:mod:`ih_sweep.evaluation.fastpath.reuse`)
    stops at any other hook."""
    if mark:
        fn._ih_sweep_leaves_layers_alone = True
        return fn
    return bool(getattr(fn, "_ih_sweep_leaves_layers_alone", False))


_REGISTRY: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_REGISTRY_LOCK = threading.Lock()


def reset() -> None:
    """Forget every model's context (tests: start from none installed)."""
    with _REGISTRY_LOCK:
        _REGISTRY.clear()


@contextmanager
def reading(positions: torch.Tensor) -> Iterator[None]:
    """Inside (this thread), forward passes of a model with the evaluator's attention
    installed are exact at ``positions`` [rows, k] of their input (and at every position
    before the last layer) only. Raises ValueError for anything but a non-empty [rows, k]
    tensor of indices."""
    if positions.dim() != 2 or positions.numel() == 0 or int(positions.min()) < 0:
        raise ValueError(f"read positions must be a non-empty [rows, k] tensor of indices, "
                         f"got shape {tuple(positions.shape)}")
    token = _READ.set((positions, positions.shape[0], int(positions.max())))
    try:
        yield
    finally:
        _READ.reset(token)


def read_positions() -> tuple[torch.Tensor, int, int] | None:
    """(positions [rows, k], rows, largest position) of :func:`reading` in this thread, or
    None outside it."""
    return _READ.get()
