"""Hydra's refusals of a command line told in one line of ours.

Hydra refuses an override it cannot parse (``OverrideParseException``), a value OmegaConf
cannot merge into the schema's type or a key the schema does not have
(``ConfigCompositionException`` caused by an OmegaConf ``ValidationError`` or
``ConfigKeyError``), and a config group option that does not exist
(``MissingConfigException``), each in 4-14 lines of its own. :func:`refusal` turns any of
them into one line, ``<key or override>: <what is wrong>; allowed: ...; did you mean ...?``,
reading the key, the value and the node from the exception's fields, and what is allowed
from the schema's type hints (:mod:`ih_sweep.config.schema`, Hydra's own dataclasses for
``hydra.*``) or from the config group's options. ``ih_sweep.cli`` prints it as ``ih_sweep:
config error: <line>`` with exit status 2.
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import functools
import operator
import re
import types
import typing
from typing import Any

from hydra.errors import ConfigCompositionException, MissingConfigException, OverrideParseException
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

from ih_sweep.config.errors import one_line
from ih_sweep.config.schema import Config

_INDEX = re.compile(r"\[\d+\]")


def did_you_mean(word: str, choices: typing.Iterable[str]) -> str:
    """``"; did you mean X?"`` (or ``X or Y``) for the choices close to ``word``
    (:func:`difflib.get_close_matches`), or ``""`` when none is close."""
    by_lower = {str(c).lower(): str(c) for c in choices}  # HIGH -> high
    close = difflib.get_close_matches(str(word).lower(), list(by_lower), n=2, cutoff=0.6)
    close = [by_lower[c] for c in close if by_lower[c] != str(word)]
    return f"; did you mean {' or '.join(close)}?" if close else ""


def _root(full_key: str) -> tuple[type, list[str]]:
    """The dataclass at the top of ``full_key`` (Hydra's for ``hydra.*``) and the path's
    parts below it, list indices dropped."""
    parts = [p for p in _INDEX.sub("", full_key).split(".") if p]
    if parts[:1] == ["hydra"]:
        from hydra.conf import HydraConf

        return HydraConf, parts[1:]
    return Config, parts


def _optional(hint: Any) -> tuple[Any, bool]:
    """``hint`` without ``None`` (``X | None`` -> X) and whether None was allowed."""
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType) and type(None) in args:
        rest = tuple(a for a in args if a is not type(None))
        return (rest[0] if len(rest) == 1 else functools.reduce(operator.or_, rest)), True
    return hint, False


def node_type(full_key: str) -> Any:
    """The type hint of the node ``full_key`` names (``eval``, ``scan.layers``,
    ``hydra.job``), None when the path leaves the dataclasses."""
    cls, parts = _root(full_key)
    hint: Any = cls
    for part in parts:
        hint = _optional(hint)[0]
        if not dataclasses.is_dataclass(hint):
            return None
        hints = typing.get_type_hints(hint)
        if part not in hints:
            return None
        hint = hints[part]
    return hint


def _field_default(full_key: str) -> Any:
    """The schema's default of the leaf ``full_key`` (None when it has none)."""
    parent, _, name = _INDEX.sub("", full_key).rpartition(".")
    cls = _optional(node_type(parent))[0] if parent else _root(full_key)[0]
    if dataclasses.is_dataclass(cls):
        for f in dataclasses.fields(cls):
            if f.name == name:
                return None if f.default is dataclasses.MISSING else f.default
    return None


def allowed(hint: Any, default: Any = None) -> str:
    """What a value of type ``hint`` may be, in words (``high, low, random, none``; ``an
    integer, or null``; ``auto, or an integer``)."""
    inner, nullable = _optional(hint)
    tail = ", or null" if nullable else ""
    if isinstance(inner, type) and issubclass(inner, enum.Enum):
        return ", ".join(str(m.value) for m in inner) + (", null" if nullable else "")
    if inner is bool:
        return "true, false" + (", null" if nullable else "")
    words = {int: "an integer", float: "a number", str: "a text"}
    if inner in words:
        return words[inner] + tail
    origin, args = typing.get_origin(inner), typing.get_args(inner)
    if origin in (list, tuple):
        item = args[0] if args else Any
        what = {int: "integers", float: "numbers", str: "texts"}.get(item, "values")
        example = {int: "[0, 1]", float: "[0.5, 1.0]"}.get(item, "[a, b]")
        return f"a list of {what}, e.g. {example}{tail}"
    if origin is dict:
        return "a mapping, e.g. {a: 1}" + tail
    if origin in (typing.Union, types.UnionType) and set(args) == {int, str}:
        return (f"{default}, or an integer" if isinstance(default, str) else
                "an integer or a text") + tail
    return str(inner).replace("typing.", "") + tail


def _show(value: Any) -> str:
    """A value as one writes it on the command line (``''`` for the empty text)."""
    if isinstance(value, enum.Enum):
        value = value.value
    if value == "" or value is None:
        return "''" if value == "" else "null"
    return str(value)


def _bad_value(err: ValidationError, override: str | None) -> str:
    """``<key>=<value> is not allowed; allowed: ...[; did you mean ...?]``."""
    full_key = str(err.full_key)
    key = _INDEX.sub("", full_key)
    shown = override or f"{key}={_show(err.value)}"
    if key == "n_heads":  # the rules' own words: a count or a share P%
        from ih_sweep.config.errors import ConfigError
        from ih_sweep.config.rules import n_heads_share

        try:
            n_heads_share(_show(err.value))
        except ConfigError as rule:
            return f"{shown} is not allowed; {str(rule).partition('; ')[2]}"
    hint = node_type(key)
    if hint is None:
        return f"{shown} is not allowed: {one_line(err.msg)}"
    inner = _optional(hint)[0]
    text = f"{shown} is not allowed; allowed: {allowed(hint, _field_default(key))}"
    if isinstance(inner, type) and issubclass(inner, enum.Enum):
        text += did_you_mean(_show(err.value), [str(m.value) for m in inner])
    return text


def _keys_of(node: str) -> list[str]:
    """The keys the schema declares under ``node`` ("" : the top level)."""
    cls = _optional(node_type(node))[0] if node else Config
    return [f.name for f in dataclasses.fields(cls)] if dataclasses.is_dataclass(cls) else []


def _unknown_key(full_key: str) -> str:
    """``<key>: not a key of <node>; did you mean ...?`` (or the node's keys)."""
    node, _, key = full_key.rpartition(".")
    keys = _keys_of(node)
    where = node or "the config"
    hint = did_you_mean(key, keys)
    if hint or not keys:
        return f"{full_key}: not a key of {where}{hint}"
    return f"{full_key}: not a key of {where}; keys of {where}: {', '.join(keys)}"


def _missing_option(err: MissingConfigException, options: list[str] | None) -> str:
    """``<group>=<option>: no such option of <group>; options: ...; did you mean ...?``."""
    group, _, name = str(err.missing_cfg_file).rpartition("/")
    shown = [o for o in (options or err.options or []) if o != "base"]
    text = f"{group}={name}: no such option of {group}"
    if shown:
        text += f"; options: {', '.join(shown)}{did_you_mean(name, shown)}"
    return text


_ANTLR = [(re.compile(r"^(?:extraneous|mismatched) input (.+?)(?: expecting .*)?$"),
           r"unexpected \1"),
          (re.compile(r"^no viable alternative at input (.+)$"), r"cannot read \1"),
          (re.compile(r"^missing EQUAL at '<EOF>'$"), "no '=' after the key"),
          (re.compile(r"^missing (\S+) at (.+)$"), r"missing \1 at \2"),
          (re.compile(r"^token recognition error at: (.+)$"), r"unexpected \1")]


def _parse_error(err: OverrideParseException) -> str:
    """``<override>: Hydra cannot read this override (<why>); write key=value ...``, with
    why from the ANTLR parser's words (``unexpected '='``) or the lexer's caret (``unexpected
    '.' at character 1``)."""
    lines = [line for line in str(err.message).splitlines()
             if line.strip() and not line.startswith("See https://")]
    if lines and lines[0].startswith("Error parsing override"):
        lines = lines[1:]
    why = lines[0].strip() if lines else ""
    if why.startswith("LexerNoViableAltException"):
        start = lines[0].find(err.override)
        at = lines[1].find("^") - start if len(lines) > 1 and start >= 0 else -1
        why = (f"unexpected {err.override[at]!r} at character {at + 1}"
               if 0 <= at < len(err.override) else "")
    for pattern, words in _ANTLR:
        if pattern.match(why):
            why = pattern.sub(words, why)
            break
    return (f"{err.override}: Hydra cannot read this override" + (f" ({why})" if why else "")
            + "; write key=value (n_heads=4), group=option (model=hub), a sweep a,b "
              "(n_heads=4,8) or quote a value with special characters ('stop=[\"a b\"]')")


_APPEND = re.compile(r"An item is already at '(?P<key>[^']+)'")
_DELETE = re.compile(r"Could not delete from config\. '(?P<key>[^']+)' does not exist")
_MERGING = re.compile(r"^Error merging override (?P<override>.+)$", re.M)


def refusal(err: BaseException, group_options: typing.Callable[[str], list[str]] | None = None
            ) -> str | None:
    """One line for a refusal of Hydra's while it composes the config, without the
    ``ih_sweep: config error:`` prefix; None when ``err`` is not one (a bug, or an error of
    a job). ``group_options`` lists a config group's options (Hydra's config loader), for
    an unknown option; the exception's own list otherwise."""
    if isinstance(err, OverrideParseException):
        return _parse_error(err)
    if isinstance(err, MissingConfigException):
        group = str(err.missing_cfg_file).rpartition("/")[0]
        try:
            options = group_options(group) if group_options else None
        except Exception:  # the exception's list is as good
            options = None
        return _missing_option(err, options)
    cause = err.__cause__ if isinstance(err, ConfigCompositionException) else err
    text = str(err)
    if isinstance(cause, ValidationError) and cause.full_key:
        merging = _MERGING.search(text)  # the override as typed (a list's, not its item)
        return _bad_value(cause, merging.group("override") if merging else None)
    if isinstance(cause, (ConfigKeyError, AttributeError)) and \
            isinstance(cause, OmegaConfBaseException) and cause.full_key:
        return _unknown_key(str(cause.full_key))
    if isinstance(err, ConfigCompositionException):
        if match := _APPEND.search(text):
            key = match.group("key")
            return (f"+{key}: {key} is already in the config, so it cannot be added; write "
                    f"{key}=<value> to change it")
        if match := _DELETE.search(text):
            key = match.group("key")
            node = key.rpartition(".")[0]
            return (f"~{key}: {key} is not in the config, so it cannot be deleted"
                    + did_you_mean(key.rpartition(".")[2], _keys_of(node)))
        return "; ".join(line.strip() for line in text.splitlines() if line.strip())
    if isinstance(cause, OmegaConfBaseException):
        key = getattr(cause, "full_key", None)
        return (f"{key}: " if key else "") + one_line(getattr(cause, "msg", None) or cause)
    return None
