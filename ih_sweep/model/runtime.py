"""Process settings: glibc's malloc (CPU work), and Python's garbage collector in the command's
own process.

glibc's malloc serves blocks of more than ~128 KB-32 MB with fresh ``mmap`` pages and hands
them back on free, so every new activation tensor (10 MB for one batch of 32 prompts here)
page-faults all its pages again: on the tiny model that is ~10% of the evaluation's time
(benchmarks/README.md). PyTorch's CPU tuning guides recommend jemalloc/tcmalloc for this;
without an extra library, glibc can be told to keep freed memory for reuse instead.
"""

from __future__ import annotations

import ctypes
import gc
import logging
import platform
from collections.abc import Iterator
from contextlib import contextmanager

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3
MMAP_THRESHOLD = 32 << 20  # glibc's maximum: blocks below it come from the reusable heap
TRIM_THRESHOLD = 512 << 20  # free memory kept at the heap's top before it goes back
TOP_PAD = 64 << 20

_applied = False


def keep_freed_memory() -> bool:
    """Make glibc's malloc keep freed memory for reuse (process-wide, for the rest of the
    process). Returns whether it applies: False off glibc (macOS, musl), where nothing
    changes. Costs up to ``TRIM_THRESHOLD`` of memory the process keeps after a peak."""
    global _applied
    if _applied:
        return True
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    ok = all(mallopt(param, value) == 1 for param, value in (
        (M_MMAP_THRESHOLD, MMAP_THRESHOLD), (M_TRIM_THRESHOLD, TRIM_THRESHOLD),
        (M_TOP_PAD, TOP_PAD)))
    _applied = ok
    log.debug("glibc malloc keeps freed memory: %s", ok)
    return ok


def reset() -> None:
    """Forget that the settings were applied, so that :func:`keep_freed_memory` checks the
    platform and applies them again (glibc keeps what was set; for tests that change the
    platform it sees)."""
    global _applied
    _applied = False


# --------------------------------------------------------------------------- the heap
# Python's cyclic garbage collector walks every tracked object at each full (generation-2)
# collection: after torch and transformers are imported that is ~1M objects, ~0.15 s a
# walk on this project's CPU, ~12 walks in the default sweep and a last one at exit
# (~1 s). The command's process moves what it keeps for its whole life (the modules, the
# loaded model) out of those walks with gc.freeze (Python docs, "gc.freeze": "move them to
# a permanent generation and ignore them in all the future collections"). Only the
# command's own process (ih-sweep / python -m ih_sweep) does: a notebook or another
# program that imports the package keeps its collector as it is.
_command_process = False


def this_process_is_the_command(yes: bool = True) -> None:
    """Say that this process is the ``ih-sweep`` command (:func:`ih_sweep.cli.cli`): it
    exits when the command ends, so what it keeps for good may be frozen
    (:func:`long_lived`, :func:`freeze_for_exit`)."""
    global _command_process
    _command_process = yes


@contextmanager
def long_lived(collect: bool = True) -> Iterator[bool]:
    """Around work that makes objects the process keeps until it exits (importing torch and
    transformers, loading the model): in the command's process
    (:func:`this_process_is_the_command`) the cyclic collector is paused inside, and on
    leaving collects once (``collect``), then freezes every survivor (``gc.freeze``), so
    that later collections walk only what is made after. Yields whether it applies;
    elsewhere (a notebook, a test) it changes nothing. With ``collect``, garbage left inside
    is collected on leaving; without it, that garbage is frozen too and stays until exit:
    for imports alone, whose garbage is small (after torch and transformers ~12k objects,
    ~8 MB) while the collection walks every object they made (~0.2 s), never around work
    whose garbage may hold tensors. A survivor that later becomes garbage is freed by its
    reference count as usual (only a reference cycle among frozen objects stays until
    exit)."""
    if not _command_process:
        yield False
        return
    was_on = gc.isenabled()
    gc.disable()
    try:
        yield True
    finally:
        if was_on:
            gc.enable()
        if collect:
            gc.collect()
        gc.freeze()


def freeze_for_exit() -> None:
    """In the command's process, freeze every object just before the interpreter exits: its
    shutdown then skips the full collection over them (~1 s with torch loaded)."""
    if _command_process:
        gc.freeze()
