"""Removing a sandbox: every process, netns, link, cgroup, eBPF pin, file and socket of it.

``teardown`` finds what to remove from the state file *and* by scanning for our names, so
it also cleans up after a crash or a lost state file, and it is idempotent; ``leftovers``
lists what it would find. Knows how to remove anything the sandbox makes, but makes nothing.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from nodeagent.errors import LocalStateError
from nodeagent.sandbox import cgroups, netlink
from nodeagent.sandbox.agents import AGENT_GRACE, BPF_PIN_DIR
from nodeagent.sandbox.state import (
    Progress,
    Record,
    cgroup_root_or_none,
    locked,
    quiet,
    require_root,
)
from nodeagent.sandbox.topology import RUN_DIR, STATE_DIR, node_of_netns


def _known_nodes(record: Record | None, root: Path | None) -> set[str]:
    nodes: set[str] = set()
    if record is not None:
        nodes.update(n.name for n in record.topology.nodes)
    for name in netlink.sandbox_netns():
        node = node_of_netns(name)
        if node:
            nodes.add(node)
    if root is not None:
        for d in ("agents", "pods"):
            with contextlib.suppress(OSError):
                nodes.update(os.listdir(cgroups.subtree(root) / d))
    return nodes


def leftovers() -> list[str]:
    """Everything of a sandbox that exists now, as human-readable items."""
    root = cgroup_root_or_none()
    record = Record.load()
    items = [f"netns {n}" for n in netlink.sandbox_netns()]
    items += [f"dir /etc/netns/{n}" for n in netlink.sandbox_etc_netns()]
    if root is not None and cgroups.subtree(root).exists():
        items.append(f"cgroup {cgroups.subtree(root)}")
    for node in sorted(_known_nodes(record, root)):
        sock = f"{RUN_DIR}/{node}.sock"
        if os.path.lexists(sock):
            items.append(f"socket {sock}")
    if os.path.exists(STATE_DIR):
        items.append(f"dir {STATE_DIR}")
    return items


def teardown(progress: Progress = quiet, popens: Sequence[subprocess.Popen[Any]] = ()) -> None:
    """Remove every process, netns, link, cgroup, file and socket of the sandbox.

    Works from the state file and by scanning for our names, so it also cleans up after a
    crash; idempotent. Raises ``LocalStateError`` naming whatever could not be removed.
    """
    require_root()
    with locked():
        teardown_locked(progress, popens)


def teardown_locked(progress: Progress, popens: Sequence[subprocess.Popen[Any]] = ()) -> None:
    """``teardown`` for a caller that holds the lock already (``Sandbox.up``)."""
    record = Record.load()
    root = cgroup_root_or_none()
    nodes = _known_nodes(record, root)
    problems: list[str] = []
    if root is not None:
        sub = cgroups.subtree(root)
        agents = sub / "agents"
        if cgroups.populated(agents):
            progress("stopping agents")
            cgroups.signal_all(agents, signal.SIGTERM)
            cgroups.wait_empty(agents, AGENT_GRACE)
        if cgroups.populated(sub):
            progress("killing sandbox processes")
        try:
            cgroups.kill(sub)
        except LocalStateError as e:
            problems.append(str(e))
    if os.path.isdir(BPF_PIN_DIR):  # unpinning detaches the links, frees the maps
        progress("removing eBPF pins")
        shutil.rmtree(BPF_PIN_DIR, ignore_errors=True)
    names = netlink.sandbox_netns()
    # processes that entered our namespaces from outside our cgroups (e.g. a manual
    # `ip netns exec na-p-... sh`): they would keep a namespace alive after its unmount
    for pid, ns in netlink.netns_pids(names).items():
        progress(f"killing process {pid} in netns {ns}")
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    for p in popens:
        with contextlib.suppress(subprocess.TimeoutExpired):
            p.wait(timeout=1.0)
    if names:
        progress(f"removing network namespaces {', '.join(names)}")
    # pods first, then nodes, then the fabric: each veth goes with its namespace
    for name in sorted(names, key=lambda n: (not n.startswith("na-p-"), n)):
        try:
            netlink.remove_netns(name)
        except LocalStateError as e:
            problems.append(str(e))
    for name in netlink.sandbox_etc_netns():
        netlink.remove_etc_netns(name)
    if root is not None:
        failed = cgroups.remove_tree(cgroups.subtree(root))
        problems += [f"cannot remove cgroup {f}" for f in failed]
    for node in nodes:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(f"{RUN_DIR}/{node}.sock")
    shutil.rmtree(STATE_DIR, ignore_errors=True)
    left = leftovers()
    if problems or left:
        raise LocalStateError(
            "sandbox teardown left things behind:\n"
            + "\n".join(f"  - {x}" for x in [*problems, *left])
            + "\nremove them by hand (`ip netns del NAME`, `rmdir CGROUP`) or run "
            "`nodeagent sandbox down` again"
        )
