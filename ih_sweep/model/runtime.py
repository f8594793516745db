"""Process settings for CPU work.

glibc's malloc serves blocks of more than ~128 KB-32 MB with fresh ``mmap`` pages and hands
them back on free, so every new activation tensor (10 MB for one batch of 32 prompts here)
page-faults all its pages again: on the tiny model that is ~10% of the evaluation's time
(benchmarks/README.md). PyTorch's CPU tuning guides recommend jemalloc/tcmalloc for this;
without an extra library, glibc can be told to keep freed memory for reuse instead.
"""

from __future__ import annotations

import ctypes
import logging
import platform

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
