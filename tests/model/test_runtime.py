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


# The command's own process freezes what it keeps out of the garbage collector's walks; run
# in a process of its own (the test process's collector stays as it is).
FREEZE = """
import gc, sys, weakref
from ih_sweep.model import runtime
if sys.argv[1] == "command":
    runtime.this_process_is_the_command()
before = gc.get_freeze_count()
with runtime.long_lived(collect=sys.argv[2] == "collect") as applies:
    inside = gc.isenabled()
    kept = [[i] for i in range(50000)]  # long-lived, tracked
    class Node:
        pass
    cycle = Node()
    cycle.me = cycle  # garbage made inside
    alive = weakref.ref(cycle)
    del cycle
print(applies, inside, gc.isenabled(), gc.get_freeze_count() - before >= 50000,
      gc.collect(), alive() is not None)
"""


def _freeze(mode: str, collect: str = "collect") -> list[str]:
    return subprocess.run([sys.executable, "-c", FREEZE, mode, collect], check=True,
                          capture_output=True, text=True).stdout.split()


def test_the_command_freezes_what_it_keeps_and_collects_what_it_drops():
    applies, inside, after, frozen, left, alive = _freeze("command")
    assert (applies, inside, after, frozen) == ("True", "False", "True", "True")
    assert (left, alive) == ("0", "False")  # the cycle dropped inside was collected


def test_without_collecting_the_garbage_made_inside_is_frozen_too():
    """long_lived(collect=False) (the imports before a sweep's first job): no walk on
    leaving; the cycle dropped inside is frozen with the rest, so a later collection finds
    nothing either (it stays until exit)."""
    applies, inside, after, frozen, left, alive = _freeze("command", "frozen")
    assert (applies, inside, after, frozen) == ("True", "False", "True", "True")
    assert (left, alive) == ("0", "True")  # frozen, not walked: still there


def test_elsewhere_the_collector_is_left_as_it_is():
    applies, inside, after, frozen, _, _ = _freeze("library")
    assert (applies, inside, after, frozen) == ("False", "True", "True", "False")


def test_the_console_script_and_python_m_run_the_command():
    from pathlib import Path

    import tomllib

    root = Path(__file__).resolve().parents[2]
    scripts = tomllib.loads((root / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["ih-sweep"] == "ih_sweep.cli:command"
    assert "command()" in (root / "ih_sweep" / "__main__.py").read_text()


# The model load in the command's process: the first load collects once and freezes what it
# made; a load the process's cache answers (each later job of a sweep) collects nothing.
LOAD = """
import gc
from ih_sweep.config.schema import ModelConfig
from ih_sweep.model import runtime
from ih_sweep.model.loading import load_model
runtime.this_process_is_the_command()
full = []
gc.callbacks.append(lambda phase, info: phase == "start" and info["generation"] == 2
                    and full.append(1))
settings = ModelConfig(name="tiny", path="builtin:tiny")
frozen = gc.get_freeze_count()
first = load_model(settings, device="cpu")
print(len(full), gc.get_freeze_count() > frozen)
del full[:]
frozen = gc.get_freeze_count()
again = load_model(settings, device="cpu")
print(len(full), gc.get_freeze_count() == frozen, again is first)
"""


def test_a_cached_model_load_collects_nothing():
    out = subprocess.run([sys.executable, "-c", LOAD], check=True, capture_output=True,
                         text=True).stdout.split()
    assert out[:2] == ["1", "True"]  # the load itself: one collection, then frozen
    assert out[2:] == ["0", "True", "True"]  # the cached one: no walk over the heap
