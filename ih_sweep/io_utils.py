"""Atomic writes: a reader (or a killed job) never sees half a file. Files get the usual
mode for new files (0666 less the umask: 0644 under umask 022), as ``open()`` would give.
A write the file system refuses (a full disk, a read-only folder, a file too large) raises
:class:`WriteError`, one line naming the file and the operating system's error."""

from __future__ import annotations

import json
import os
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pandas only for the annotation: importing it costs ~0.4 s
    import pandas as pd


_UMASK_LOCK = threading.Lock()


class WriteError(OSError):
    """A file or folder the file system would not write (ENOSPC, EROFS, EACCES, EFBIG ...):
    ``str()`` is one line, ``[Errno N] cannot write <path> (<the system's reason>)``; the
    errno is the original's."""


def write_error(err: OSError, path: Path) -> WriteError:
    """``err``, raised while writing ``path``, as a :class:`WriteError` naming ``path``."""
    if isinstance(err, WriteError):
        return err
    return WriteError(err.errno, f"cannot write {path} ({err.strerror or err})")


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Write through ``write(tmp_path)`` into a temporary sibling, then rename over ``path``.
    Raises :class:`WriteError` where the file system refuses (nothing is left behind)."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600, and the rename keeps the mode
        os.close(fd)
    except OSError as err:
        raise write_error(err, path) from err
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    except OSError as err:
        Path(tmp).unlink(missing_ok=True)
        raise write_error(err, path) from err
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _umask() -> int:
    """The process's umask, read without setting it where Linux shows it (``Umask:`` in
    /proc/self/status, Linux >= 4.7): setting it, even for a moment, changes the mode of
    what another thread creates meanwhile. Elsewhere set and restored under a lock."""
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    with _UMASK_LOCK:
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def write_text(path: str | Path, text: str) -> Path:
    return atomic_write(path, lambda p: p.write_text(text, encoding="utf-8"))


def write_json(path: str | Path, obj: Any) -> Path:
    return write_text(path, json.dumps(obj, indent=1, sort_keys=True, default=str) + "\n")


def write_csv(path: str | Path, df: pd.DataFrame) -> Path:
    return atomic_write(path, lambda p: df.to_csv(p, index=False))


def write_figure(path: str | Path, fig) -> Path:
    return atomic_write(path, lambda p: fig.savefig(p, format=Path(path).suffix.lstrip(".") or
                                                    "png", dpi=120, bbox_inches="tight"))


def read_json(path: str | Path) -> Any:
    return json.loads(Path(path).read_text(encoding="utf-8"))
