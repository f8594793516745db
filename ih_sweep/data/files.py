"""Why a file or folder a user names cannot be read, in a few words: what every reader of
a user's input (bAbI files and folders, score tables) asks before it opens the path, so
that a missing path, a folder where a file belongs, a named pipe, a loop of symbolic links
or a permission refused ends in one line naming the path, never in a traceback or a read
that blocks. Imports nothing of the package."""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

PERMISSION = "not readable (permission denied)"

_KINDS = ((stat.S_ISFIFO, "a named pipe (FIFO)"), (stat.S_ISSOCK, "a socket"),
          (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"))


def _stat_problem(path: Path, what: str) -> tuple[os.stat_result | None, str | None]:
    """``(os.stat(path), None)``, or ``(None, why it cannot be looked at)``."""
    try:
        return os.stat(path), None
    except FileNotFoundError:
        if os.path.islink(path):
            return None, f"a symbolic link to {os.readlink(path)}, which does not exist"
        hint = " (a leading ~ is not expanded here: give the full path)" \
            if str(path).startswith("~") else ""
        return None, f"no such {what}{hint}"
    except PermissionError:
        return None, PERMISSION
    except OSError as err:
        if err.errno == errno.ELOOP:
            return None, "a loop of symbolic links (it never reaches a file)"
        if err.errno == errno.ENOTDIR:
            return None, f"no such {what} (a part of the path is a file, not a folder)"
        if err.errno == errno.ENAMETOOLONG:
            return None, "the path is too long for this file system"
        return None, f"cannot be looked at ({err.strerror or type(err).__name__})"


def unreadable(path: str | Path, want: str = "file") -> str | None:
    """Why ``path`` cannot be read as a ``want`` (``"file"``: a regular file, opened and
    closed again; ``"folder"``: a directory whose entries can be listed and looked at), in
    a few words without the path (e.g. ``"not readable (permission denied)"``, ``"a folder,
    not a file"``, ``"a named pipe (FIFO)"``); None when it can. Never opens anything but a
    regular file, so a named pipe or a device is never read (a read could block)."""
    path = Path(path)
    st, problem = _stat_problem(path, want)
    if st is None:
        return problem
    if want == "folder":
        if not stat.S_ISDIR(st.st_mode):
            return "a file, not a folder"
        try:
            os.listdir(path)
            os.stat(os.path.join(path, "."))  # needs search permission
        except PermissionError:
            return PERMISSION
        except OSError as err:
            return f"cannot be read ({err.strerror or type(err).__name__})"
        return None
    if stat.S_ISDIR(st.st_mode):
        return "a folder, not a file"
    for test, kind in _KINDS:
        if test(st.st_mode):
            return f"{kind}, not a regular file"
    try:
        with open(path, "rb"):
            pass
    except PermissionError:
        return PERMISSION
    except OSError as err:
        return f"cannot be read ({err.strerror or type(err).__name__})"
    return None
