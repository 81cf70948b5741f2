"""What a sandbox keeps on this machine outside its namespaces, and what every step of
bringing one up or down shares.

Owns the state directory ``/run/nodeagent/sandbox/``: ``state.json`` (the ``Record`` of a
sandbox that is up: its topology, config, and the pids of what it started; written and
read back here, and judged still running or a crash leftover) and the pod runtime file
``pods.json``; the lock that serialises ``up``/``down`` between processes; the check that
we may make namespaces at all (root, iproute2); and the ``Progress`` callback the steps
report through. Starts nothing and removes nothing.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Self

from nodeagent.errors import LocalStateError
from nodeagent.sandbox import cgroups, processes
from nodeagent.sandbox.pods import ContainerSpec
from nodeagent.sandbox.topology import (
    NETNS_DIR,
    RUN_DIR,
    STATE_DIR,
    NodePlan,
    PodPlan,
    Route,
    Topology,
)

STATE_FILE = f"{STATE_DIR}/state.json"
STATE_VERSION = 1
PODS_FILE = f"{STATE_DIR}/pods.json"

Progress = Callable[[str], None]


def quiet(_: str) -> None:
    """A ``Progress`` that says nothing."""


def require_root() -> None:
    if os.geteuid() != 0:
        raise LocalStateError(
            "the sandbox needs root (it makes network namespaces, links and cgroups): "
            "run it with sudo"
        )
    if shutil.which("ip") is None:
        raise LocalStateError("the `ip` command (iproute2) is missing: apt-get install iproute2")


@contextlib.contextmanager
def locked(timeout: float = 120.0) -> Iterator[None]:
    """Serialise sandbox up/down between processes (flock on ``/run/nodeagent``)."""
    os.makedirs(RUN_DIR, exist_ok=True)
    fd = os.open(RUN_DIR, os.O_RDONLY | os.O_DIRECTORY)
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise LocalStateError(
                        "another `nodeagent sandbox up/down` has been running for "
                        f"{timeout:.0f}s (it holds the lock on {RUN_DIR}): wait for it or stop it"
                    ) from None
                time.sleep(0.1)
        yield
    finally:
        os.close(fd)


def write_json(path: str, data: object) -> None:
    """Write ``data`` to ``path`` atomically (a reader sees the old file or the new one)."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=p.parent, prefix=".state-")
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=2)
    os.replace(tmp, p)


@dataclasses.dataclass(eq=False, repr=False)
class Record:
    """What ``state.json`` holds about a sandbox that is up (``manager.Sandbox`` is one):
    enough for any process to find its pieces again."""

    topology: Topology
    config_dir: str
    cgroup_root: Path
    agents: bool
    """Whether it runs node agents (``up --no-agents`` does not)."""
    agent_args: tuple[str, ...]
    """Extra arguments of every agent."""
    containers: dict[str, list[ContainerSpec]]
    """What runs in each pod, by pod key."""
    created: float
    agent_pids: dict[str, int] = dataclasses.field(default_factory=dict)
    pod_pids: dict[str, list[int]] = dataclasses.field(default_factory=dict)
    mtls: bool = True
    ca_pid: int = 0
    kubeconfig: str = ""
    """Agents follow the Kubernetes API of this kubeconfig; empty: ``config_dir``."""

    def save(self) -> None:
        write_json(
            STATE_FILE,
            {
                "version": STATE_VERSION,
                "created": self.created,
                "config_dir": self.config_dir,
                "cgroup_root": str(self.cgroup_root),
                "agents": self.agents,
                "agent_args": list(self.agent_args),
                "nodes": [dataclasses.asdict(n) for n in self.topology.nodes],
                "pods": [dataclasses.asdict(p) for p in self.topology.pods],
                "containers": {
                    k: [dataclasses.asdict(c) for c in v] for k, v in self.containers.items()
                },
                "agent_pids": self.agent_pids,
                "pod_pids": self.pod_pids,
                "mtls": self.mtls,
                "ca_pid": self.ca_pid,
                "kubeconfig": self.kubeconfig,
            },
        )

    @classmethod
    def load(cls) -> Self | None:
        """The record in the state file, or None when there is none we wrote (anything
        unreadable or not ours counts as a crash leftover)."""
        try:
            raw = json.loads(Path(STATE_FILE).read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return None  # unreadable: treated as a crash leftover
        if not isinstance(raw, dict) or raw.get("version") != STATE_VERSION:
            return None
        if not all(k in raw for k in ("config_dir", "cgroup_root", "agents")):
            return None  # not one we wrote: treated as a crash leftover
        try:
            return cls._from_json(raw)
        except (KeyError, TypeError, ValueError):
            return None

    @classmethod
    def _from_json(cls, raw: dict[str, Any]) -> Self:
        nodes = tuple(
            NodePlan(
                **{
                    **n,
                    "routes": tuple(Route(**r) for r in n["routes"]),
                    "host_addresses": tuple(n.get("host_addresses", ())),
                }
            )
            for n in raw["nodes"]
        )
        pods = tuple(PodPlan(**{**p, "ports": tuple(p["ports"])}) for p in raw["pods"])
        return cls(
            Topology(nodes=nodes, pods=pods),
            config_dir=str(raw["config_dir"]),
            cgroup_root=Path(raw["cgroup_root"]),
            agents=bool(raw["agents"]),
            agent_args=tuple(str(a) for a in raw.get("agent_args", [])),
            containers={
                k: [
                    ContainerSpec(
                        name=c["name"],
                        argv=tuple(c["argv"]),
                        env=tuple((str(a), str(b)) for a, b in c["env"]),
                    )
                    for c in v
                ]
                for k, v in raw.get("containers", {}).items()
            },
            created=float(raw.get("created", 0.0)),
            agent_pids={k: int(v) for k, v in raw.get("agent_pids", {}).items()},
            pod_pids={k: [int(x) for x in v] for k, v in raw.get("pod_pids", {}).items()},
            mtls=bool(raw.get("mtls", False)),
            ca_pid=int(raw.get("ca_pid", 0)),
            kubeconfig=str(raw.get("kubeconfig", "")),
        )

    def still_running(self) -> bool:
        """Whether what it records is still there: all its netns, and (when it started
        anything) one of its processes alive in our cgroup subtree."""
        if not all(os.path.exists(f"{NETNS_DIR}/{n}") for n in self.topology.netns_names()):
            return False
        pids = [*self.agent_pids.values()]
        for v in self.pod_pids.values():
            pids.extend(v)
        root = cgroup_root_or_none()
        return not pids or (root is not None and any(_pid_in_subtree(p, root) for p in pids))


def _pid_in_subtree(pid: int, root: Path) -> bool:
    """True when ``pid`` is alive and in our cgroup subtree (guards against PID reuse)."""
    if not processes.alive(pid):
        return False
    try:
        text = Path(f"/proc/{pid}/cgroup").read_text()
    except OSError:
        return False
    sub = "/" + cgroups.subtree(root).relative_to(root).as_posix()
    for line in text.splitlines():
        if line.startswith("0::"):
            path = line[3:]
            return path == sub or path.startswith(sub + "/")
    return False


def cgroup_root_or_none() -> Path | None:
    try:
        return cgroups.find_root()
    except LocalStateError:
        return None
