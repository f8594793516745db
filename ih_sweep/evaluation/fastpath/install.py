"""Installing the evaluator's fast path on a model (:func:`fast_attention`, :func:`installed`)
and asking for it on a pass (:func:`read_at`)."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager

import torch

from ih_sweep.evaluation.fastpath.gate import parts_wanted
from ih_sweep.evaluation.fastpath.kernel import NAME, register
from ih_sweep.evaluation.fastpath.layers import patch_layers, unpatch_all
from ih_sweep.evaluation.fastpath.reuse import store_use
from ih_sweep.model.attention import AttentionSwitchError, attention_implementation
from ih_sweep.model.forward import ForwardContext, reading

log = logging.getLogger(__name__)


class FastPath:
    """What :func:`fast_attention` installed on a model: true while its attention is on.
    ``layers``: whether the Llama-family layer forwards are patched too. :meth:`off` takes
    everything off (for good); :meth:`suspended` for a while (nothing may run a pass on the
    model in another thread meanwhile)."""

    def __init__(self, model, layers: bool, ctx: ForwardContext | None = None):
        self.model = model
        self.ctx = ctx if ctx is not None else ForwardContext.of(model)
        self.want_layers = layers
        self.on = False
        self.layers = False
        self._stack: ExitStack | None = None

    def __bool__(self) -> bool:
        return self.on

    def _install(self) -> None:
        register()
        stack = ExitStack()
        try:
            stack.enter_context(attention_implementation(self.model, NAME))
        except AttentionSwitchError as error:
            log.debug("evaluator's attention not installed: %s", error)
            return
        patched = patch_layers(self.model, self.ctx) if self.want_layers else []
        stack.callback(unpatch_all, patched)
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
def fast_attention(model, layers: bool | None = None, ctx: ForwardContext | None = None
                   ) -> Iterator[FastPath]:
    """Install the evaluator's attention on ``model`` while inside; yields a :class:`FastPath`
    (true when on). ``layers``: also patch the Llama-family layer forwards (``eval.fast_layers``;
    which parts go on, by the installed transformers' version: :func:`parts_wanted`).
    ``ctx``: the model's forward context (default: :meth:`ForwardContext.of` the model).

    Installed, it changes nothing by itself: only forward passes run inside
    :func:`read_at` (in the same thread) take the shortcuts; every other call gets sdpa and
    the layers' own forwards, as before. So one installation can serve batches evaluated in
    several threads at once. Models on another attention kernel (eager, flash-attention,
    flex) keep theirs, and so do models whose attention does not go through transformers'
    AttentionInterface. Re-entrant: an inner call on an installed model changes nothing
    (it yields a FastPath that is on but owns nothing)."""
    previous = model.config._attn_implementation
    if previous == NAME:
        inner = FastPath(model, False, ctx)
        inner.on = True
        yield inner
        return
    attention_on, layers_on = parts_wanted(layers)
    fast = FastPath(model, layers_on, ctx)
    if attention_on and previous in ("sdpa", None):
        fast._install()
    try:
        yield fast
    finally:
        fast.off()


@contextmanager
def read_at(positions: torch.Tensor) -> Iterator[None]:
    """Inside (this thread only), a forward pass of a model under :func:`fast_attention`,
    over right-padded rows (after, optionally, a cached prefix shared by all rows), is exact
    at ``positions`` [rows, k] of its input and at every position before the last layer
    (:func:`ih_sweep.model.forward.reading`; ValueError for anything but a non-empty
    [rows, k] tensor of indices)."""
    with reading(positions):
        yield


@contextmanager
def read_only_at(model, positions: torch.Tensor, layers: bool | None = None
                 ) -> Iterator[FastPath]:
    """:func:`fast_attention` and :func:`read_at` together, for one forward pass."""
    with fast_attention(model, layers) as fast, read_at(positions):
        yield fast


@contextmanager
def installed(model, layers: bool | None = None, ctx: ForwardContext | None = None,
              store_bytes: int = 0) -> Iterator[FastPath]:
    """The evaluator's shortcuts on ``model`` while inside: its attention
    (:func:`fast_attention`; ``layers``: ``eval.fast_layers``) and logits computed only at
    the positions the calling thread asks for (:meth:`ForwardContext.logits_at`). Both act
    only on passes that ask, so batches in other threads and decoding steps see the plain
    model. Yields the attention's :class:`FastPath`, also kept as ``ctx.evaluator`` (``ctx``:
    the model's forward context, default :meth:`ForwardContext.of` the model) while inside.
    ``store_bytes``: where the layer patch is on, the model's store of unablated layers'
    outputs (:mod:`.reuse`; this evaluation's use of it is ``ctx.layer_store`` while inside)
    holds up to this many bytes (0: none). Re-entrant (an inner call changes nothing but
    starting a new use of the store: its fingerprints are taken and its reuse checked
    afresh)."""
    ctx = ctx if ctx is not None else ForwardContext.of(model)
    outer = ctx.evaluator
    if outer is not None:  # an evaluation of its own: a fresh use of the outer store
        previous = ctx.layer_store
        if previous is not None:
            ctx.layer_store = previous.again()
        try:
            yield outer
        finally:
            ctx.layer_store = previous
        return

    def pick(module, args):
        gather = ctx.logits_gather
        if gather is None:
            return None
        h = args[0]
        idx = gather[:, :, None].expand(-1, -1, h.shape[-1])
        return (torch.gather(h, 1, idx), *args[1:])

    handle = model.get_output_embeddings().register_forward_pre_hook(pick)
    try:
        with fast_attention(model, layers, ctx) as fast:
            ctx.evaluator = fast
            ctx.layer_store = store_use(model, store_bytes) if fast.layers else None
            yield fast
    finally:
        ctx.evaluator = None
        ctx.layer_store = None
        handle.remove()
