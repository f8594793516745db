"""Config nodes as plain data (:func:`plain`): for what is written or hashed (job.json's
settings, config hashes, cache keys), never to hand settings on to a function (those take
the dataclasses of :mod:`ih_sweep.config.schema`)."""

from __future__ import annotations

import dataclasses
import typing
from enum import Enum
from typing import Any

from omegaconf import OmegaConf


def plain(node: Any) -> Any:
    """A config node (dataclass or DictConfig) as plain dicts, lists and strings (Enums as
    their names), resolved: for what is written or hashed (job.json's settings, cache
    keys), never to hand settings on to a function (those take the dataclasses).

    Exactly ``OmegaConf.to_container(OmegaConf.structured(node), resolve=True,
    enum_to_str=True)``. A dataclass whose every value already has its field's type (what
    :func:`ih_sweep.config.hydra.settings` makes) is read directly (:func:`_read`), ~10x
    faster than building OmegaConf's node; any other value (one OmegaConf would convert or
    resolve: an int in a float field, an interpolation, a tuple) goes through OmegaConf."""
    if dataclasses.is_dataclass(node):
        if not isinstance(node, type):  # an instance (a class goes to OmegaConf)
            try:
                return _read(node)
            except _NeedsOmegaConf:
                pass
        node = OmegaConf.structured(node)
    return OmegaConf.to_container(node, resolve=True, enum_to_str=True)


class _NeedsOmegaConf(Exception):
    """A value whose plain form only OmegaConf's conversion can say (:func:`plain`)."""


_PRIMITIVES = (int, float, bool, str)
_HINTS: dict[type, dict[str, Any]] = {}


def _read(node: Any) -> dict[str, Any]:
    """:func:`plain` of a dataclass instance whose values need no conversion: each field
    (but those OmegaConf ignores) by :func:`_leaf`; raises :class:`_NeedsOmegaConf`
    otherwise."""
    cls = type(node)
    hints = _HINTS.get(cls)
    if hints is None:
        hints = _HINTS[cls] = typing.get_type_hints(cls)
    return {f.name: _leaf(getattr(node, f.name), hints[f.name])
            for f in dataclasses.fields(node) if f.metadata.get("omegaconf_ignore") is not True}


def _leaf(value: Any, hint: Any) -> Any:
    """``value`` of a field typed ``hint`` as OmegaConf's container holds it, where OmegaConf
    keeps it as it is: a primitive of exactly the field's type (or one of a union's; a
    string without ``${``), None where the type allows it, a member of the field's Enum (its
    name), a list of such values, a dataclass of exactly the field's class. Raises
    :class:`_NeedsOmegaConf` for anything else."""
    origin = typing.get_origin(hint)
    if origin is typing.Union or (origin is not None and origin.__name__ == "UnionType"):
        members = [m for m in typing.get_args(hint) if m is not type(None)]
        if value is None and len(members) < len(typing.get_args(hint)):
            return None
        if len(members) == 1:
            return _leaf(value, members[0])
        if all(m in _PRIMITIVES for m in members) and type(value) in members:
            return _primitive(value)
        raise _NeedsOmegaConf
    if hint is Any:
        if value is None or type(value) in _PRIMITIVES:
            return _primitive(value)
        raise _NeedsOmegaConf
    if hint in _PRIMITIVES and type(value) is hint:
        return _primitive(value)
    if isinstance(hint, type) and issubclass(hint, Enum) and type(value) is hint:
        return value.name
    if origin is list and type(value) is list:
        (element,) = typing.get_args(hint) or (Any,)
        return [_leaf(v, element) for v in value]
    if dataclasses.is_dataclass(hint) and type(value) is hint:
        return _read(value)
    raise _NeedsOmegaConf


def _primitive(value: Any) -> Any:
    if isinstance(value, str) and "${" in value:  # an interpolation: OmegaConf resolves it
        raise _NeedsOmegaConf
    return value
