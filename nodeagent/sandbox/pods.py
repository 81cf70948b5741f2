"""The sandbox's pods as processes: each container of a Pod with a ``command`` runs in the
pod's netns and cgroup, with the pod's environment.

Owns what runs for a container (``ContainerSpec``, taken from the config), a pod's
environment, starting its containers, and waiting until the pod is ready (its declared
ports accept connections from inside its netns, or, without ports, its processes are still
alive shortly after start). The pods' netns and addresses are ``topology``'s and
``netlink``'s; their pids are ``manager.Sandbox``'s.
"""

from __future__ import annotations

import dataclasses
import shlex
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

from nodeagent.errors import LocalStateError
from nodeagent.model.snapshot import MeshSnapshot
from nodeagent.sandbox import processes
from nodeagent.sandbox.topology import PodPlan

POD_TIMEOUT = 20.0
"""Seconds a pod gets to become ready."""
ALIVE_CHECK = 0.3
"""How long a pod without ports must stay alive to count as started."""


@dataclasses.dataclass(frozen=True)
class ContainerSpec:
    """What the sandbox runs for one container: argv and the container's own env."""

    name: str
    argv: tuple[str, ...]
    env: tuple[tuple[str, str], ...]


COMMAND_ANNOTATION = "sandbox.nodeagent.io/command"
"""A WorkloadEntry's annotation: what the sandbox runs as that workload on its node's
host (a shell-quoted command line), as a VM would run its service; read by the sandbox
only."""


def containers_of(snapshot: MeshSnapshot) -> dict[str, list[ContainerSpec]]:
    """The containers to run, by pod key (those without a ``command`` run nothing), and
    the processes of host workloads (WorkloadEntries with ``COMMAND_ANNOTATION``)."""
    out = {
        pod.key: [
            ContainerSpec(name=c.name, argv=(*c.command, *c.args), env=c.env)
            for c in pod.containers
            if c.command
        ]
        for pod in snapshot.pods
    }
    for w in snapshot.workload_entries:
        command = w.annotations.get(COMMAND_ANNOTATION)
        if w.node_name and command:
            out[w.key] = [ContainerSpec(name=w.name, argv=tuple(shlex.split(command)), env=())]
    return out


def env(pod: PodPlan, extra: Sequence[tuple[str, str]] = ()) -> dict[str, str]:
    """A container's environment in ``pod``, with its own ``extra`` variables."""
    return processes.pod_env(
        pod_name=pod.name,
        namespace=pod.namespace,
        node=pod.node,
        pod_ip=pod.ip,
        service_account=pod.service_account,
        extra=extra,
    )


def start_container(
    pod: PodPlan, c: ContainerSpec, cgroup_root: Path, config_dir: str
) -> subprocess.Popen[bytes]:
    """Start container ``c`` of ``pod``, announced in the pod's log."""
    with open(pod.log, "ab") as f:
        f.write(f"--- container {c.name}: {' '.join(c.argv)}\n".encode())
    return processes.spawn(
        processes.launcher(cgroup_root / pod.cgroup, c.argv, netns=pod.netns),
        log=pod.log,
        env=env(pod, c.env),
        cwd=config_dir,  # so that examples can ship scripts next to their YAML
    )


def wait_ready(
    pod: PodPlan,
    pids: Sequence[int],
    popens: Sequence[subprocess.Popen[bytes]],
    timeout: float,
) -> None:
    """Until ``pod`` (its processes ``pids``) is ready; the end of its log if it is not."""
    if not pids:
        return
    if pod.ports:
        ok, why = processes.wait_ports(
            pod.netns,
            ["127.0.0.1", pod.ip],
            pod.ports,
            timeout=timeout,
            pids=pids,
            popens=popens,
        )
    else:
        time.sleep(ALIVE_CHECK)
        for p in popens:  # reaped, so that a process that exited is not "alive"
            p.poll()
        dead = [p for p in pids if not processes.alive(p)]
        ok, why = (not dead), f"its process(es) {dead} exited right after start"
    if not ok:
        raise LocalStateError(
            f"pod {pod.key} did not become ready: {why}; the end of "
            f"{pod.log}:\n{processes.indent(processes.tail(pod.log))}"
        )
