"""How many processes ``--workers auto`` (the default) starts: one per CPU the agent may
use, which is its CPU affinity bounded by the CPU quota of its cgroup (``cpu.max`` of its
cgroup v2 directory and each parent: a DaemonSet's CPU limit); one alone when that is
``SMALL`` CPUs or fewer."""

from __future__ import annotations

import math
import os
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")
MAIN_BUDGET = 256 << 20
"""Bytes of a memory limit that ``auto`` leaves to the main process (idle near 80 MiB,
more while the capture's loader runs and with many connections)."""
WORKER_BUDGET = 128 << 20
"""Bytes of a memory limit that ``auto`` counts for each worker (idle near 60 MiB in pure
Python, and its connections)."""
SMALL = 2
"""CPUs up to which ``auto`` is one process: on 2 CPUs a second process costs more than
it gives (measured: a request 15-25% and a new connection 20-30% more CPU when two
processes split the work, and a worker's own ~60 MiB), and the node's pods need the
other CPU anyway (docs/operating.md)."""


def quota_cpus(cpu_max: str) -> int | None:
    """``cpu.max`` (``max 100000``, ``150000 100000``) as whole CPUs, rounded up; None:
    no quota (or a text that is not one)."""
    parts = cpu_max.split()
    if len(parts) != 2 or parts[0] == "max":
        return None
    try:
        quota, period = int(parts[0]), int(parts[1])
    except ValueError:
        return None
    if quota <= 0 or period <= 0:
        return None
    return max(1, math.ceil(quota / period))


def memory_bytes(memory_max: str) -> int | None:
    """``memory.max`` (``max``, ``1073741824``) in bytes; None: no limit (or not one)."""
    text = memory_max.strip()
    return int(text) if text.isdigit() and int(text) > 0 else None


def cgroup_quota(root: Path, cgroup: str, name: str = "cpu.max") -> int | None:
    """The smallest quota of ``cgroup`` (a path under ``root``) and its parents: CPUs
    (``cpu.max``) or bytes (``memory.max``)."""
    read = quota_cpus if name == "cpu.max" else memory_bytes
    best: int | None = None
    d = root / cgroup.strip("/")
    while True:
        try:
            q = read((d / name).read_text())
        except OSError:
            q = None
        if q is not None:
            best = q if best is None else min(best, q)
        if d == root or root not in d.parents:
            return best
        d = d.parent


def own_cgroup(proc_cgroup: str) -> str:
    """This process's cgroup v2 path from ``/proc/self/cgroup`` (``0::/path``)."""
    for line in proc_cgroup.splitlines():
        if line.startswith("0::"):
            return line[3:]
    return "/"


def cpus_allowed(root: Path = CGROUP_ROOT, cgroup: str | None = None) -> int:
    """CPUs this process may use: its affinity, bounded by the quotas of its cgroup
    (``cgroup``; None: read from ``/proc/self/cgroup``)."""
    n = len(os.sched_getaffinity(0))
    cgroup = cgroup if cgroup is not None else this_cgroup()
    quota = cgroup_quota(root, cgroup) if cgroup is not None else None
    return max(1, n if quota is None else min(n, quota))


def this_cgroup() -> str | None:
    """This process's cgroup v2 path; None when ``/proc/self/cgroup`` cannot be read."""
    try:
        return own_cgroup(Path("/proc/self/cgroup").read_text())
    except OSError:
        return None


def auto_workers(cpus: int, memory: int | None = None) -> int:
    """``--workers auto`` where the agent may use ``cpus`` CPUs and ``memory`` bytes (its
    cgroup's ``memory.max``; None: no limit): one per CPU, as many as the memory holds
    (``MAIN_BUDGET`` for the main process, ``WORKER_BUDGET`` for each worker)."""
    n = cpus if cpus > SMALL else 1
    if memory is not None:
        n = min(n, 1 + max(0, memory - MAIN_BUDGET) // WORKER_BUDGET)
    return max(1, n)


def auto_allowed(root: Path = CGROUP_ROOT) -> int:
    """``--workers auto`` for this process (its CPUs, its cgroup's CPU and memory limits)."""
    cgroup = this_cgroup()
    memory = cgroup_quota(root, cgroup, "memory.max") if cgroup is not None else None
    return auto_workers(cpus_allowed(root, cgroup), memory)
