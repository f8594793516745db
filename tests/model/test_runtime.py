from __future__ import annotations

import platform
import subprocess
import sys

import pytest

from ih_sweep.model import runtime

# glibc marks a chunk it served with its own mmap by bit 0x2 of the size word just before
# the pointer (malloc.c: IS_MMAPPED); a chunk from the reusable heap has it clear. Which of
# the two a fresh 10 MB block gets is decided by the mmap threshold alone, so this is exact.
# (The page-fault figure this setting buys is a benchmark: benchmarks/bench_page_faults.py.)
CHUNK_OF_10MB = """
import ctypes, sys
from ih_sweep.model.runtime import keep_freed_memory
if sys.argv[1] == "keep":
    assert keep_freed_memory() and keep_freed_memory()
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
p = libc.malloc(10 << 20)
size_word = ctypes.c_size_t.from_address(p - ctypes.sizeof(ctypes.c_size_t)).value
print("mmapped" if size_word & 2 else "heap")
"""


def _chunk(mode: str) -> str:
    return subprocess.run([sys.executable, "-c", CHUNK_OF_10MB, mode], check=True,
                          capture_output=True, text=True).stdout.split()[-1]


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's malloc only")
def test_kept_memory_serves_activation_sized_blocks_from_the_heap():
    """A 10 MB block (one batch's activation on the tiny model) comes from a fresh mmap by
    default, so every forward pass page-faults it afresh; with the setting it comes from the
    heap, where freed memory is reused."""
    assert _chunk("plain") == "mmapped"
    assert _chunk("keep") == "heap"


def test_nothing_changes_off_glibc(monkeypatch):
    runtime.reset()
    monkeypatch.setattr(runtime.platform, "libc_ver", lambda: ("", ""))
    assert runtime.keep_freed_memory() is False
