"""glibc malloc's thresholds for a proxy that moves bulk bytes: set once, early in every
agent process (the main one and each worker).

A bulk transfer allocates a bytes object per socket read (uvloop reads up to 256 KiB) and
per TLS read-out, and frees it within the same loop iteration. Past glibc's default
thresholds each of them was mapped and unmapped, or the top of the heap trimmed and grown
back, so every MB cost hundreds of minor page faults (``bench/bulk_cost.py``). A fixed mmap
threshold of 1 MiB keeps such buffers in the heap, and a trim threshold of 4 MiB keeps the
heap's top from being returned and faulted in again between two reads.

Only glibc has ``mallopt``; elsewhere this does nothing. A threshold the user set in the
environment (``MALLOC_MMAP_THRESHOLD_``, ``MALLOC_TRIM_THRESHOLD_``) is left as it is.
"""

from __future__ import annotations

import ctypes
import os

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
"""``mallopt`` parameters (glibc's ``malloc.h``)."""

MMAP_THRESHOLD = 1024 * 1024
"""Allocations at least this large are mapped on their own; below, they come from the heap."""
TRIM_THRESHOLD = 4 * 1024 * 1024
"""Free bytes at the top of the heap beyond which glibc returns them to the kernel."""


def tune_malloc() -> bool:
    """Set the thresholds above (see the module's docstring); whether they were set."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    done = True
    if "MALLOC_MMAP_THRESHOLD_" not in os.environ:
        done = mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1 and done
    if "MALLOC_TRIM_THRESHOLD_" not in os.environ:
        done = mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1 and done
    return done
