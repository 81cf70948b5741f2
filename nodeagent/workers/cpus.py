"""How many processes ``--workers auto`` starts: one per CPU the agent may use, which is
its CPU affinity bounded by the CPU quota of its cgroup (``cpu.max`` of its cgroup v2
directory and each parent: a DaemonSet's CPU limit), never less than one."""

from __future__ import annotations

import math
import os
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")


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


def cgroup_quota(root: Path, cgroup: str) -> int | None:
    """The smallest quota of ``cgroup`` (a path under ``root``) and its parents."""
    best: int | None = None
    d = root / cgroup.strip("/")
    while True:
        try:
            q = quota_cpus((d / "cpu.max").read_text())
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


def cpus_allowed(root: Path = CGROUP_ROOT) -> int:
    """CPUs this process may use: its affinity, bounded by its cgroups' quotas."""
    n = len(os.sched_getaffinity(0))
    try:
        cgroup = own_cgroup(Path("/proc/self/cgroup").read_text())
    except OSError:
        return max(1, n)
    quota = cgroup_quota(root, cgroup)
    return max(1, n if quota is None else min(n, quota))
