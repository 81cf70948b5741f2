"""The sandbox's node agents: one ``nodeagent run`` per node, in the node's netns (given as
``--netns``) and the node's cgroup.

Owns an agent's command line (its config: the sandbox's directory, or a Kubernetes API
server through a kubeconfig; the pod runtime file, its socket, state dir and
eBPF pin dir), starting it, asking whether it is ready (status ``ready`` on its socket),
waiting for that with the end of its log when it does not come, and stopping it
gracefully. Which agents run and their pids are ``manager.Sandbox``'s.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from nodeagent.errors import LocalStateError
from nodeagent.sandbox import cgroups, processes
from nodeagent.sandbox.state import PODS_FILE, Progress
from nodeagent.sandbox.topology import NodePlan, host_cgroup_root_rel

AGENT_TIMEOUT = 30.0
"""Seconds an agent gets to report ready."""
TAKEOVER_START = 20.0
"""Seconds a new agent gets to start, before what it allows itself to take over
(``takeover_timeout``)."""
AGENT_GRACE = 3.0
"""Seconds an agent gets after SIGTERM (to drain and clean up) before it is killed."""
BPF_PIN_DIR = "/sys/fs/bpf/nodeagent-sandbox"
"""The sandbox agents' eBPF pins (``--redirect ebpf|auto``), removed by ``down``."""


def source_args(config_dir: str, kubeconfig: str = "") -> list[str]:
    """Where an agent's config comes from: the API server of ``kubeconfig`` when given
    (the sandbox's nodes and pods still come from ``config_dir``), else ``config_dir``."""
    if kubeconfig:
        return ["--source", "kubernetes", "--kubeconfig", kubeconfig]
    return ["--config", config_dir]


def dns_proxy_on(args: Sequence[str]) -> bool:
    """Whether agents run with ``args`` answer their pods' DNS (``--dns-proxy``, last
    one wins; on by default)."""
    on = True
    for i, arg in enumerate(args):
        if arg == "--dns-proxy" and i + 1 < len(args):
            on = args[i + 1] != "off"
        elif arg.startswith("--dns-proxy="):
            on = arg.split("=", 1)[1] != "off"
    return on


def start(
    node: NodePlan,
    cgroup_root: Path,
    config_dir: str,
    args: Sequence[str],
    kubeconfig: str = "",
    successor: bool = False,
    cgroup: str = "",
) -> subprocess.Popen[bytes]:
    """Start ``node``'s agent with ``args`` after its own flags (the CA's, the user's);
    ``successor``: alongside the running one, which hands its listeners over; ``cgroup``:
    in a cgroup of that name beside the node's (``pod_cgroups``), as a DaemonSet's new pod
    gets a cgroup of its own."""
    os.makedirs(node.state_dir, exist_ok=True)
    if not successor:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(node.socket)  # a stale socket of a previous agent would look "up"
    argv = [
        *processes.agent_command(),
        "run",
        "--node",
        node.name,
        *source_args(config_dir, kubeconfig),
        "--pods",
        PODS_FILE,
        "--netns",
        node.netns,
        "--socket",
        node.socket,
        "--state-dir",
        node.state_dir,
        "--bpf-pin-dir",
        BPF_PIN_DIR,
        "--workload-cgroup-root",
        str(cgroup_root / host_cgroup_root_rel(node.name)),
        *args,
    ]
    env = dict(os.environ)
    env["PATH"] = processes.search_path()
    env["PYTHONUNBUFFERED"] = "1"
    where = cgroup_root / node.cgroup
    if cgroup:
        where = pod_cgroups(cgroup_root, node) / cgroup
        cgroups.create(where)
    return processes.spawn(processes.launcher(where, argv), log=node.log, env=env)


def ready(node: NodePlan) -> bool:
    """Whether ``node``'s agent answers on its socket with status ready."""
    return not_ready(node) is None


def not_ready(node: NodePlan) -> str | None:
    """Why ``node``'s agent is not ready, as seen on its socket (None: it is)."""
    from nodeagent.admin.client import AdminClient

    if not os.path.exists(node.socket):
        return f"no socket at {node.socket}"
    try:
        with AdminClient(node.socket, timeout=1.0) as client:
            status = client.status()
    except Exception as e:
        return f"its socket did not answer: {e}"
    if status.get("ready") is True:
        return None
    return "it answers not ready: `nodeagent ctl workloads` shows each pod's capture state"


def wait_ready(
    nodes: Sequence[NodePlan],
    pids: Mapping[str, int],
    popens: Sequence[subprocess.Popen[bytes]],
    timeout: float,
    progress: Progress,
) -> None:
    """Until the agents of ``nodes`` (``pids`` by node name) are ready; the end of the log
    of one that exits or is not ready within ``timeout``."""
    deadline = time.monotonic() + timeout
    pending = list(nodes)
    while pending:
        for p in popens:  # reaped, so that an agent that exited is not "alive"
            p.poll()
        for node in list(pending):
            if ready(node):
                progress(f"agent {node.name} is ready ({node.socket})")
                pending.remove(node)
            elif not processes.alive(pids[node.name]):
                raise LocalStateError(
                    f"the agent of node {node.name} exited during start-up; the end of "
                    f"{node.log}:\n{processes.indent(processes.tail(node.log))}"
                )
        if pending and time.monotonic() > deadline:
            node = pending[0]
            raise LocalStateError(
                f"the agent of node {node.name} was not ready within {timeout:.0f}s "
                f"(no status ready=true on {node.socket}); "
                f"the end of {node.log}:\n{processes.indent(processes.tail(node.log))}"
            )
        if pending:
            time.sleep(0.1)


def handover_socket(node: NodePlan) -> Path:
    """Where the agent of ``node`` serves its hand-over socket (its state dir's default)."""
    return Path(node.state_dir) / "handover.sock"


def socket_inode(path: Path) -> tuple[int, int, int] | None:
    """What tells one socket file at ``path`` from the next: its inode, and its change
    time (tmpfs hands a freed inode number to the next file made)."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino, st.st_ctime_ns


def takeover_timeout() -> float:
    """Seconds a new agent gets to take a running one's listeners over (``roll_agent``):
    its start, then what it waits itself: its pods' readiness and the old agent's
    release (``proxy.handover``, imported only here: it brings grpc)."""
    from nodeagent.proxy.handover import READY_TIMEOUT, RELEASE_TIMEOUT

    return TAKEOVER_START + READY_TIMEOUT + RELEASE_TIMEOUT


def wait_taken_over(
    node: NodePlan,
    new: subprocess.Popen[bytes],
    before: tuple[int, int, int] | None,
    timeout: float,
) -> None:
    """Until ``new`` took the listeners of ``node``'s running agent over: it serves the
    hand-over socket (placed only once the old agent let go) and answers ready. Raises
    with the end of its log when it exits or does not get there within ``timeout``."""
    deadline = time.monotonic() + timeout
    path = handover_socket(node)
    while True:
        if new.poll() is not None:
            raise LocalStateError(
                f"the new agent of node {node.name} exited ({new.returncode}) before taking "
                f"over; the old one goes on serving. The end of {node.log}:\n"
                f"{processes.indent(processes.tail(node.log))}"
            )
        now = socket_inode(path)
        if now is None or now == before:
            why: str | None = f"no new hand-over socket at {path}: the old agent has not let go"
        else:
            why = not_ready(node)
            if why is None:
                return
        if time.monotonic() > deadline:
            raise LocalStateError(
                f"the new agent of node {node.name} did not take over within {timeout:.0f}s "
                f"({why}); the end of {node.log}:\n"
                f"{processes.indent(processes.tail(node.log))}"
            )
        time.sleep(0.1)


def wait_exit(pid: int, timeout: float) -> bool:
    """Whether ``pid`` exited within ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while processes.alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def pod_cgroups(cgroup_root: Path, node: NodePlan) -> Path:
    """Where agents started in a cgroup of their own live (``<sandbox>/agent-pods/<node>``):
    beside the node's agent cgroup, not below it (programs attached to a cgroup apply to
    those below it too, and a DaemonSet's pods are siblings)."""
    return cgroup_root / Path(node.cgroup).parent.parent / "agent-pods" / node.name


def stop(node: NodePlan, cgroup_root: Path) -> None:
    """SIGTERM, then SIGKILL after ``AGENT_GRACE`` seconds."""
    for cg in (cgroup_root / node.cgroup, pod_cgroups(cgroup_root, node)):
        cgroups.signal_all(cg, signal.SIGTERM)
        if not cgroups.wait_empty(cg, AGENT_GRACE):
            cgroups.kill(cg)
