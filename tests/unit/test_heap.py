"""``heap.tune_malloc``: a bulk transfer's buffers come from malloc's heap, not mappings of
their own, unless the user chose the thresholds in the environment. Each case runs in a
fresh interpreter: the thresholds are the process's, for good."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# Prints whether a freed 512 KiB buffer (an uvloop read's size, and more) was mapped on its
# own: mallinfo2's hblks counts the chunks malloc mapped with mmap.
PROBE = """
import ctypes, sys
from nodeagent.heap import tune_malloc

class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks",
        "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL(None)
libc.mallinfo2.restype = MallInfo2
if sys.argv[1] == "tune":
    print("set" if tune_malloc() else "unset", end=" ")
before = libc.mallinfo2().hblks
buf = bytes(512 * 1024)
print("mapped" if libc.mallinfo2().hblks > before else "heap")
"""


def probe(tune: bool, **env: str) -> str:
    out = subprocess.run(
        [sys.executable, "-c", PROBE, "tune" if tune else "plain"],
        env={**os.environ, "PYTHONPATH": str(ROOT), **env},
        capture_output=True,
        text=True,
        check=True,
    )
    return out.stdout.strip()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc only")
def test_bulk_sized_buffers_come_from_the_heap_once_tuned() -> None:
    assert probe(tune=False) == "mapped"  # glibc's default: 128 KiB and up are mapped
    assert probe(tune=True) == "set heap"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc only")
def test_a_threshold_from_the_environment_is_kept() -> None:
    assert probe(tune=True, MALLOC_MMAP_THRESHOLD_=str(256 * 1024)) == "set mapped"
