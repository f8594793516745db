"""Ablation methods as plug-ins: one protocol, a registry of named methods.

A method is a class registered under its ``ablation.method`` name with
:func:`register_ablation` (the pattern of lm-evaluation-harness's ``lm_eval/api/registry.py``:
a decorator filling a name -> object table, a lookup that lists the names it knows). The
built-in methods, one module each, are imported by :mod:`ih_sweep.ablation` in the order
:func:`ablation_names` lists them: ``zero``, ``mean``, ``position_mean``, ``resample``,
``knockout``.
Adding a method is one module with one registered class, plus its import there (or, for a
method of one's own, the import of the module that registers it before the job runs).

What a method does, in the order a job asks (:class:`Ablation`):

1. ``reference(inputs)``: statistics of the unablated model that do not depend on the heads
   (means over the reference prompts; None when the method needs none);
2. ``prepare(inputs, heads, reference)``: the fill of those heads (:class:`Fill`);
3. ``replace(fill, layer, z, columns, positions, keys)``, called by
   :func:`ih_sweep.ablation.hooks.ablate_heads` at every forward pass: the new values of the
   ablated columns. ``positions`` (absolute token positions) and ``keys`` (which sequence
   each batch row holds) are given only to methods that declare ``needs_positions`` /
   ``row_dependent``; the hook is the one place that reads them. A method that
   ``edits_attention`` (knockout) replaces no output: its ``attention_edit(model, by_layer,
   fill)`` is the context the passes run in instead.

Importing this module imports no torch.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar, runtime_checkable

from ih_sweep.config.errors import UserError
from ih_sweep.config.schema import AblationConfig, Config

Heads = Sequence[tuple[int, int]]


class AblationError(UserError):
    """Heads or an ablation method the model cannot take."""

    kind = "config"


@dataclass(frozen=True)
class FillInputs:
    """What a method computes its fill from: the unablated ``model`` and its ``tokenizer``,
    the job's ``items`` (:class:`ih_sweep.data.Item`, in evaluation order), the
    ``ablation`` settings and ``max_new_tokens`` (how far the evaluation generates past
    each prompt)."""

    model: Any
    tokenizer: Any
    items: Sequence[Any]
    settings: AblationConfig
    max_new_tokens: int

    @property
    def reference_items(self) -> Sequence[Any]:
        """The prompts the reference means are taken on (``ablation.reference``):
        held-out items for ``heldout``, the evaluated ``items`` for ``evaluated``
        (:func:`ih_sweep.data.heldout.reference_items`)."""
        from ih_sweep.data.heldout import reference_items

        return reference_items(self.items, self.settings.reference)


Fill = Any  # what a method's prepare returns and its replace reads (None: nothing)


@runtime_checkable
class Ablation(Protocol):
    """An ablation method: what replaces the ablated heads' outputs ``z`` (the attention
    output projection's input, :func:`ih_sweep.model.architecture.hook_z`)."""

    name: str  # the ablation.method value (set by register_ablation)
    needs_positions: bool  # replace reads each token's absolute position
    row_dependent: bool  # replace reads which sequence each batch row holds
    per_head: bool  # the fill holds values per head (else it covers every head)
    # why the mechanism check cannot measure this method on its texts, or None
    mechanism_unmeasured: str | None
    # what job.json's ``shared`` calls a reused reference / fill (several-draw jobs)
    reference_shared_as: tuple[str, ...]
    fill_shared_as: str
    # the method changes the heads' attention (attention_edit) instead of their output z
    edits_attention: bool
    # replace's value does not depend on which heads or sequence a row has (one fill serves
    # every head set): rows of one pass may ablate different head sets
    # (ih_sweep.ablation.hooks.ablate_head_sets, control.draws_per_pass)
    per_row_sets: bool

    def config_problem(self, config: Config) -> str | None:
        """Why ``config`` cannot use this method (one phrase), or None."""

    def reference(self, inputs: FillInputs) -> Any:
        """Heads-independent statistics of the unablated model, or None."""

    def prepare(self, inputs: FillInputs, heads: Heads, reference: Any) -> Fill:
        """The fill of ``heads`` (from ``reference`` and the unablated model)."""

    def covers(self, fill: Fill, heads: Heads) -> bool:
        """Whether ``fill`` holds what ``heads`` need."""

    def restrict(self, fill: Fill, heads: Heads) -> Fill:
        """The fill of ``heads`` alone, cut from one that covers them."""

    def bytes_per_head(self, inputs: FillInputs, reference: Any) -> int:
        """Memory a per-head fill takes per head (bytes), for sharing it among draws."""

    def check_fill(self, fill: Fill, heads: Heads) -> None:
        """Raise :class:`AblationError` where ``fill`` cannot ablate ``heads``."""

    def columns(self, fill: Fill) -> dict[int, Any] | None:
        """Per layer, the z columns the fill's values are in (None: the heads' order)."""

    def attention_edit(self, model: Any, by_layer: dict[int, list[int]], fill: Fill) -> Any:
        """For a method that ``edits_attention``: a context manager under which ``model``'s
        forward passes run with the heads ``by_layer`` (query heads per layer) edited."""

    def replace(self, fill: Fill, layer: int, z: Any, columns: Any, positions: Any = None,
                keys: Sequence[Hashable] | None = None, cache: dict | None = None) -> Any:
        """The ablated columns' new values, [batch, pos, len(columns)] or broadcastable
        to it, for ``z`` [batch, pos, width] of ``layer``; ``columns``: their indices (a
        long tensor); ``positions``: [batch, pos] absolute token positions, ``keys``: one
        sequence key per batch row (each only if declared needed); ``cache``: a dict that
        lives as long as the ablation context (for what the method keeps on the device)."""


class BaseAblation:
    """Defaults for a method: nothing to prepare, nothing read but ``z``, a fill that
    covers every head, measurable by the mechanism check. A method overrides
    :meth:`replace` and what it needs."""

    name = ""
    needs_positions = False
    row_dependent = False
    per_head = False
    mechanism_unmeasured: str | None = None
    reference_shared_as: tuple[str, ...] = ("fill",)
    fill_shared_as = "fill"
    edits_attention = False
    per_row_sets = False

    def config_problem(self, config: Config) -> str | None:
        return None

    def reference(self, inputs: FillInputs) -> Any:
        return None

    def prepare(self, inputs: FillInputs, heads: Heads, reference: Any) -> Fill:
        return reference

    def covers(self, fill: Fill, heads: Heads) -> bool:
        return True

    def restrict(self, fill: Fill, heads: Heads) -> Fill:
        return fill

    def bytes_per_head(self, inputs: FillInputs, reference: Any) -> int:
        return 0

    def check_fill(self, fill: Fill, heads: Heads) -> None:
        return None

    def columns(self, fill: Fill) -> dict[int, Any] | None:
        return None

    def attention_edit(self, model: Any, by_layer: dict[int, list[int]], fill: Fill) -> Any:
        raise NotImplementedError(f"{type(self).__name__}.attention_edit")

    def replace(self, fill: Fill, layer: int, z: Any, columns: Any, positions: Any = None,
                keys: Sequence[Hashable] | None = None, cache: dict | None = None) -> Any:
        raise NotImplementedError(f"{type(self).__name__}.replace")


_REGISTRY: dict[str, Ablation] = {}
T = TypeVar("T", bound=type)


def register_ablation(name: str) -> Callable[[T], T]:
    """Class decorator: register an instance of the class as ablation method ``name``
    (its ``name`` attribute is set to it). Raises :class:`AblationError` if ``name`` is
    taken."""

    def add(cls: T) -> T:
        if name in _REGISTRY:
            taken = type(_REGISTRY[name])
            raise AblationError(f"ablation method {name!r} is already registered (by "
                                f"{taken.__module__}.{taken.__qualname__})")
        method = cls()
        method.name = name
        if not isinstance(method, Ablation):
            raise AblationError(f"ablation method {name!r}: {cls.__qualname__} does not "
                                "implement the Ablation protocol (see BaseAblation)")
        _REGISTRY[name] = method
        return cls

    return add


def unregister_ablation(name: str) -> None:
    """Remove method ``name`` (a test's own method, after the test); absent: nothing."""
    _REGISTRY.pop(name, None)


def ablation_names() -> list[str]:
    """The registered methods' names, in registration order."""
    return list(_REGISTRY)


def head_set_methods() -> list[str]:
    """The registered methods whose rows of one pass may ablate different head sets
    (``per_row_sets``: ``zero``, ``mean``, ``position_mean``), in registration order."""
    return [name for name, method in _REGISTRY.items() if getattr(method, "per_row_sets", False)]


def get_ablation(method: str | Ablation) -> Ablation:
    """The registered method ``method`` (a name, or a method, returned as it is). Raises
    :class:`AblationError` naming the registered methods for an unknown name."""
    if not isinstance(method, str):
        return method
    try:
        return _REGISTRY[str(method)]
    except KeyError:
        raise AblationError(f"ablation.method={method!r} is not a registered ablation "
                            f"method; allowed values: {', '.join(_REGISTRY)}") from None
