"""ih_sweep.io_utils: atomic writes get the usual mode for new files, and reading the umask
does not change it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from ih_sweep import io_utils
from ih_sweep.io_utils import write_text


@pytest.fixture
def umask():
    """Sets the process umask for one test and restores it."""
    before = os.umask(0o022)
    os.umask(before)
    yield lambda mask: os.umask(mask)
    os.umask(before)


@pytest.mark.parametrize("mask", [0o022, 0o027, 0o002, 0o077])
def test_a_written_file_has_the_mode_open_would_give(tmp_path, umask, mask):
    umask(mask)
    written = write_text(tmp_path / "a.txt", "x")
    with open(tmp_path / "b.txt", "w") as plain:
        plain.write("x")
    assert written.stat().st_mode & 0o777 == 0o666 & ~mask
    assert written.stat().st_mode & 0o777 == (tmp_path / "b.txt").stat().st_mode & 0o777
    assert not list(tmp_path.glob(".*.tmp"))


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="no /proc (not Linux)")
def test_the_umask_is_read_without_being_set(umask, monkeypatch):
    """Setting the umask to read it (even for a moment) changes the mode of what another
    thread creates meanwhile; on Linux it is read from /proc/self/status instead."""
    umask(0o027)
    calls: list[int] = []
    real = os.umask
    monkeypatch.setattr(io_utils.os, "umask", lambda m: calls.append(m) or real(m))
    assert io_utils._umask() == 0o027 and calls == []


def test_without_proc_the_umask_is_set_and_restored(umask, monkeypatch):
    umask(0o007)
    real_open = open

    def no_proc(path, *args, **kw):
        if str(path).startswith("/proc/"):
            raise FileNotFoundError(path)
        return real_open(path, *args, **kw)

    monkeypatch.setattr("builtins.open", no_proc)
    assert io_utils._umask() == 0o007
    monkeypatch.undo()
    assert io_utils._umask() == 0o007  # left as it was

