"""The errors a user can cause and the one-line form of any error
(ih_sweep.config.errors)."""

from __future__ import annotations

import pytest

from ih_sweep.config.errors import ConfigError, UserError, one_line


def test_kinds():
    assert issubclass(ConfigError, UserError) and issubclass(UserError, ValueError)
    assert UserError.kind == "input" and ConfigError.kind == "config"


@pytest.mark.parametrize("err,limit,line", [
    (OSError("  first line  \nsecond line"), None, "first line  "),
    (ValueError("\n\n  only line\n"), None, "only line"),
    (RuntimeError("a" * 400 + "\nb"), 300, "a" * 300),
    (RuntimeError("short"), 300, "short"),
    (KeyError(""), None, "''"),  # a KeyError's message is the repr of its key
    (ValueError(""), None, ""),
    (ValueError("   \n  "), 160, ""),
    ("a text\nmore", None, "a text"),
])
def test_one_line_is_the_first_line_of_the_message(err, limit, line):
    assert one_line(err, limit) == line


def test_an_empty_message_can_fall_back_to_the_type():
    err = OSError()
    assert (one_line(err) or type(err).__name__) == "OSError"
