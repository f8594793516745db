"""The errors a user can cause, and how any error is told in one line.

A :class:`UserError` is a mistake in what the user gave; the command reports it in one line
and exits with status 2 (:mod:`ih_sweep.cli`). Anything else that fails is a bug. Importing
this module imports nothing of the package and no third-party library.
"""

from __future__ import annotations


class UserError(ValueError):
    """A mistake in what the user gave (a config value, a file, a model path, a device):
    reported in one line, ``ih_sweep: <kind> error: <key or file>: <what is wrong>; <what is
    allowed or what to do>``, exit status 2. Anything else that fails is a bug."""

    kind = "input"


class ConfigError(UserError):
    """A config value that breaks a rule (see :func:`ih_sweep.config.rules.check`)."""

    kind = "config"


def one_line(err: BaseException | str, limit: int | None = None) -> str:
    """The first line of an error's message (or of a text), stripped of the message's
    leading and trailing white space, cut to ``limit`` characters (None: whole line);
    ``""`` for an empty message. Callers that want the type name instead of an empty
    text write ``one_line(err) or type(err).__name__``."""
    text = str(err).strip()
    return text.splitlines()[0][:limit] if text else ""
