"""The ``Sandbox``: bring a planned topology up (netns, links, cgroups, agents, pods), look
at it, run commands in its pods, and tear it down.

Owns the sandbox's state under ``/run/nodeagent/sandbox/`` (``state.json``, the pod runtime
file ``pods.json``, ``logs/``, the agents' state dirs), the agent sockets
``/run/nodeagent/<node>.sock``, and the order of operations. ``teardown`` finds what to
remove from the state file *and* by scanning for our names, so it also cleans up after a
crash or a lost state file, and it is idempotent.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

from nodeagent.errors import ConfigError, ConfigErrors, LocalStateError
from nodeagent.model.objects import PodRuntime
from nodeagent.sandbox import cgroups, netlink, processes
from nodeagent.sandbox.topology import (
    NETNS_DIR,
    RUN_DIR,
    STATE_DIR,
    NodePlan,
    PodPlan,
    Route,
    Topology,
    log_dir,
    node_of_netns,
    plan,
)

STATE_FILE = f"{STATE_DIR}/state.json"
CA_DIR = f"{STATE_DIR}/ca"
CA_SOCKET = f"{STATE_DIR}/ca.sock"
CA_TOKENS = f"{STATE_DIR}/ca-tokens.json"
CA_LOG_NAME = "ca.log"
CA_CGROUP = "ca"
"""The mesh CA's cgroup, under our subtree (so teardown kills it like everything else)."""
PODS_FILE = f"{STATE_DIR}/pods.json"
STATE_VERSION = 1
AGENT_TIMEOUT = 30.0
POD_TIMEOUT = 20.0
AGENT_GRACE = 3.0
BPF_PIN_DIR = "/sys/fs/bpf/nodeagent-sandbox"
"""The sandbox agents' eBPF pins (``--redirect ebpf|auto``), removed by ``down``."""
"""Seconds an agent gets after SIGTERM (to drain and clean up) before it is killed."""
ALIVE_CHECK = 0.3
"""How long a pod without ports must stay alive to count as started."""

Progress = Callable[[str], None]


class SandboxAlreadyUp(LocalStateError):
    """``up`` while a sandbox is running."""


class NotUp(LocalStateError):
    """A command that needs a running sandbox, without one."""


@dataclasses.dataclass(frozen=True)
class ContainerSpec:
    """What the sandbox runs for one container: argv and the container's own env."""

    name: str
    argv: tuple[str, ...]
    env: tuple[tuple[str, str], ...]


def require_root() -> None:
    if os.geteuid() != 0:
        raise LocalStateError(
            "the sandbox needs root (it makes network namespaces, links and cgroups): "
            "run it with sudo"
        )
    if shutil.which("ip") is None:
        raise LocalStateError("the `ip` command (iproute2) is missing: apt-get install iproute2")


def _quiet(_: str) -> None:
    pass


# -- locking and the state file --------------------------------------------------------------


@contextlib.contextmanager
def _locked(timeout: float = 120.0) -> Iterator[None]:
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


def _write_json(path: str, data: object) -> None:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=p.parent, prefix=".state-")
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=2)
    os.replace(tmp, p)


def _read_state() -> dict[str, Any] | None:
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
        _topology_from(raw)
    except (KeyError, TypeError, ValueError):
        return None
    return raw


def _topology_from(raw: dict[str, Any]) -> Topology:
    nodes = tuple(
        NodePlan(**{**n, "routes": tuple(Route(**r) for r in n["routes"])}) for n in raw["nodes"]
    )
    pods = tuple(PodPlan(**{**p, "ports": tuple(p["ports"])}) for p in raw["pods"])
    return Topology(nodes=nodes, pods=pods)


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


# -- leftovers and teardown ------------------------------------------------------------------


def _cgroup_root_or_none() -> Path | None:
    try:
        return cgroups.find_root()
    except LocalStateError:
        return None


def _known_nodes(state: dict[str, Any] | None, root: Path | None) -> set[str]:
    nodes: set[str] = set()
    if state is not None:
        nodes.update(str(n["name"]) for n in state.get("nodes", []))
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
    root = _cgroup_root_or_none()
    state = _read_state()
    items = [f"netns {n}" for n in netlink.sandbox_netns()]
    items += [f"dir /etc/netns/{n}" for n in netlink.sandbox_etc_netns()]
    if root is not None and cgroups.subtree(root).exists():
        items.append(f"cgroup {cgroups.subtree(root)}")
    for node in sorted(_known_nodes(state, root)):
        sock = f"{RUN_DIR}/{node}.sock"
        if os.path.lexists(sock):
            items.append(f"socket {sock}")
    if os.path.exists(STATE_DIR):
        items.append(f"dir {STATE_DIR}")
    return items


def teardown(progress: Progress = _quiet, popens: Sequence[subprocess.Popen[Any]] = ()) -> None:
    """Remove every process, netns, link, cgroup, file and socket of the sandbox.

    Works from the state file and by scanning for our names, so it also cleans up after a
    crash; idempotent. Raises ``LocalStateError`` naming whatever could not be removed.
    """
    require_root()
    with _locked():
        _teardown(progress, popens)


def _teardown(progress: Progress, popens: Sequence[subprocess.Popen[Any]] = ()) -> None:
    state = _read_state()
    root = _cgroup_root_or_none()
    nodes = _known_nodes(state, root)
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


# -- the sandbox -----------------------------------------------------------------------------


class Sandbox:
    """A running sandbox. Make one with ``Sandbox.up(dir)`` or ``Sandbox.attach()``.

    ``with Sandbox.up(dir, agents=False) as sb: ...`` always tears it down.
    """

    def __init__(
        self,
        topology: Topology,
        *,
        config_dir: str,
        cgroup_root: Path,
        agents: bool,
        agent_args: Sequence[str],
        containers: dict[str, list[ContainerSpec]],
        created: float,
        agent_pids: dict[str, int] | None = None,
        pod_pids: dict[str, list[int]] | None = None,
        mtls: bool = True,
        ca_pid: int = 0,
    ) -> None:
        self.topology = topology
        self.mtls = mtls
        self.ca_pid = ca_pid
        self.config_dir = config_dir
        self.cgroup_root = cgroup_root
        self.agents = agents
        self.agent_args = tuple(agent_args)
        self.containers = containers
        self.created = created
        self.agent_pids: dict[str, int] = dict(agent_pids or {})
        self.pod_pids: dict[str, list[int]] = {k: list(v) for k, v in (pod_pids or {}).items()}
        self._popens: list[subprocess.Popen[bytes]] = []

    # -- making one ------------------------------------------------------------------------

    @classmethod
    def up(
        cls,
        config_dir: str | os.PathLike[str],
        *,
        agents: bool = True,
        agent_args: Sequence[str] = (),
        agent_timeout: float = AGENT_TIMEOUT,
        pod_timeout: float = POD_TIMEOUT,
        progress: Progress = _quiet,
        mtls: bool = True,
    ) -> Sandbox:
        """Load ``config_dir`` and bring the sandbox up; on any failure, tear it all down.

        Raises ``ConfigErrors`` for a bad config, ``SandboxAlreadyUp`` when one is running,
        ``LocalStateError`` when something on the machine fails.
        """
        from nodeagent.control.files import load_directory

        require_root()
        directory = os.path.abspath(config_dir)
        snapshot = load_directory(directory).snapshot
        if not snapshot.pods:
            raise ConfigErrors(
                [
                    ConfigError(
                        "no Pod objects: the sandbox needs at least one Pod "
                        "(with spec.nodeName) to make nodes and pods",
                        source=directory,
                    )
                ]
            )
        topo = plan(snapshot)
        containers = {
            pod.key: [
                ContainerSpec(name=c.name, argv=(*c.command, *c.args), env=c.env)
                for c in pod.containers
                if c.command
            ]
            for pod in snapshot.pods
        }
        root = cgroups.find_root()
        with _locked():
            cls._refuse_if_up()
            left = leftovers()
            if left:
                progress(f"cleaning up after an earlier run: {', '.join(left)}")
                _teardown(progress)
            sb = cls(
                topo,
                config_dir=directory,
                cgroup_root=root,
                agents=agents,
                agent_args=agent_args,
                containers=containers,
                created=time.time(),
                mtls=mtls and agents,
            )
            try:
                sb._build(progress, agent_timeout=agent_timeout, pod_timeout=pod_timeout)
            except BaseException:
                with contextlib.suppress(Exception):
                    progress("bringing the sandbox up failed: tearing it down")
                with contextlib.suppress(Exception):
                    _teardown(_quiet, sb._popens)
                raise
        return sb

    @staticmethod
    def _refuse_if_up() -> None:
        state = _read_state()
        if state is None:
            return
        root = _cgroup_root_or_none()
        topo = _topology_from(state)
        if not all(os.path.exists(f"{NETNS_DIR}/{n}") for n in topo.netns_names()):
            return
        pids = [*state.get("agent_pids", {}).values()]
        for v in state.get("pod_pids", {}).values():
            pids.extend(v)
        if pids and (root is None or not any(_pid_in_subtree(p, root) for p in pids)):
            return
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(state.get("created", 0)))
        raise SandboxAlreadyUp(
            f"a sandbox is already up (from {state.get('config_dir')}, started {started}, "
            f"{len(topo.nodes)} nodes, {len(topo.pods)} pods): "
            "run `nodeagent sandbox down` first"
        )

    @classmethod
    def attach(cls) -> Sandbox:
        """The sandbox described by the state file (made by ``up`` in any process)."""
        state = _read_state()
        if state is None:
            left = leftovers()
            hint = (
                f" (leftovers of an earlier run exist: {', '.join(left)}; "
                "`nodeagent sandbox down` removes them)"
                if left
                else ""
            )
            raise NotUp(f"no sandbox is up: start one with `nodeagent sandbox up`{hint}")
        return cls(
            _topology_from(state),
            config_dir=str(state["config_dir"]),
            cgroup_root=Path(state["cgroup_root"]),
            agents=bool(state["agents"]),
            agent_args=[str(a) for a in state.get("agent_args", [])],
            containers={
                k: [
                    ContainerSpec(
                        name=c["name"],
                        argv=tuple(c["argv"]),
                        env=tuple((str(a), str(b)) for a, b in c["env"]),
                    )
                    for c in v
                ]
                for k, v in state.get("containers", {}).items()
            },
            created=float(state.get("created", 0.0)),
            agent_pids={k: int(v) for k, v in state.get("agent_pids", {}).items()},
            pod_pids={k: [int(x) for x in v] for k, v in state.get("pod_pids", {}).items()},
            mtls=bool(state.get("mtls", False)),
            ca_pid=int(state.get("ca_pid", 0)),
        )

    def _save(self) -> None:
        _write_json(
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
            },
        )

    def _build(self, progress: Progress, *, agent_timeout: float, pod_timeout: float) -> None:
        topo = self.topology
        os.makedirs(log_dir(), exist_ok=True)
        self._save()  # first, so that a crash from here on is recognised as ours
        progress(f"fabric: netns {topo.fabric_netns}, bridge {topo.fabric_bridge}")
        netlink.build_fabric(topo)
        for node in topo.nodes:
            progress(f"node {node.name}: netns {node.netns}, {node.ip}, pods {node.pod_cidr}")
            netlink.build_node(topo, node)
            cgroups.create(self.cgroup_root / node.cgroup)
        for pod in topo.pods:
            progress(f"pod {pod.key}: netns {pod.netns}, {pod.ip} on {pod.node}")
            netlink.build_pod(topo.node(pod.node), pod)
            cgroups.create(self.cgroup_root / pod.cgroup)
        from nodeagent.control.runtime import write_runtimes

        write_runtimes(
            PODS_FILE,
            {
                p.key: PodRuntime(
                    key=p.key,
                    ip=p.ip,
                    node=p.node,
                    netns=netlink.netns_path(p.netns),
                    cgroup=str(self.cgroup_root / p.cgroup),
                )
                for p in topo.pods
            },
        )
        if self.mtls:
            self._start_ca(progress)
        if self.agents:
            for node in topo.nodes:
                self._start_agent(node)
            self._save()
            self._wait_agents([n.name for n in topo.nodes], agent_timeout, progress)
        for pod in topo.pods:
            self._start_pod(pod)
        self._save()
        for pod in topo.pods:
            self._wait_pod(pod, pod_timeout)
            progress(f"pod {pod.key} is ready")

    # -- the mesh CA -----------------------------------------------------------------------

    def ca_token_file(self, node: str) -> str:
        return f"{STATE_DIR}/ca-token-{node}"

    @property
    def ca_log(self) -> str:
        return f"{log_dir()}/{CA_LOG_NAME}"

    def _start_ca(self, progress: Progress) -> None:
        """One CA for the mesh (its own process; its key never reaches an agent), and a
        random credential per node that the CA maps back to the node's name."""
        import secrets

        progress(f"mesh CA: {CA_DIR}, serving on unix:{CA_SOCKET}")
        tokens = {n.name: secrets.token_urlsafe(32) for n in self.topology.nodes}
        _write_json(CA_TOKENS, tokens)
        os.chmod(CA_TOKENS, 0o600)
        for name, token in tokens.items():
            path = self.ca_token_file(name)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(token)
        if not os.path.exists(f"{CA_DIR}/root-cert.pem"):
            subprocess.run(
                [*processes.agent_command(), "ca", "init", "--dir", CA_DIR],
                check=True,
                capture_output=True,
            )
        cg = cgroups.subtree(self.cgroup_root) / CA_CGROUP
        cgroups.create(cg)
        argv = [
            *processes.agent_command(),
            "ca",
            "serve",
            "--dir",
            CA_DIR,
            "--listen",
            f"unix:{CA_SOCKET}",
            "--config",
            self.config_dir,
            "--tokens",
            CA_TOKENS,
        ]
        env = dict(os.environ)
        env["PATH"] = processes.search_path()
        env["PYTHONUNBUFFERED"] = "1"
        p = processes.spawn(processes.launcher(cg, argv), log=self.ca_log, env=env)
        self._popens.append(p)
        self.ca_pid = p.pid
        deadline = time.monotonic() + 15
        while not os.path.exists(CA_SOCKET):
            if p.poll() is not None or time.monotonic() > deadline:
                raise LocalStateError(
                    f"the mesh CA did not start; the end of {self.ca_log}:\n"
                    f"{processes.indent(processes.tail(self.ca_log))}"
                )
            time.sleep(0.05)

    def stop_ca(self) -> None:
        """Stop the mesh CA (tests: certificates must keep working without it)."""
        cgroups.kill(cgroups.subtree(self.cgroup_root) / CA_CGROUP)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(CA_SOCKET)

    def start_ca(self) -> None:
        self._start_ca(_quiet)
        self._save()

    def _ca_args(self, node: NodePlan) -> list[str]:
        if not self.mtls:
            return []
        return [
            "--ca-addr",
            f"unix:{CA_SOCKET}",
            "--ca-token-file",
            self.ca_token_file(node.name),
            "--trust-bundle",
            f"{CA_DIR}/trust-bundle.pem",
        ]

    # -- agents ----------------------------------------------------------------------------

    def _start_agent(self, node: NodePlan) -> None:
        os.makedirs(node.state_dir, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(node.socket)  # a stale socket of a previous agent would look "up"
        argv = [
            *processes.agent_command(),
            "run",
            "--node",
            node.name,
            "--config",
            self.config_dir,
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
            *self._ca_args(node),
            *self.agent_args,
        ]
        env = dict(os.environ)
        env["PATH"] = processes.search_path()
        env["PYTHONUNBUFFERED"] = "1"
        p = processes.spawn(
            processes.launcher(self.cgroup_root / node.cgroup, argv), log=node.log, env=env
        )
        self._popens.append(p)
        self.agent_pids[node.name] = p.pid

    def _agent_ready(self, node: NodePlan) -> bool:
        from nodeagent.admin.client import AdminClient

        if not os.path.exists(node.socket):
            return False
        try:
            with AdminClient(node.socket, timeout=1.0) as client:
                return client.status().get("ready") is True
        except Exception:
            return False

    def _wait_agents(self, names: Sequence[str], timeout: float, progress: Progress) -> None:
        deadline = time.monotonic() + timeout
        pending = list(names)
        while pending:
            for p in self._popens:
                p.poll()
            for name in list(pending):
                node = self.topology.node(name)
                if self._agent_ready(node):
                    progress(f"agent {name} is ready ({node.socket})")
                    pending.remove(name)
                elif not processes.alive(self.agent_pids[name]):
                    raise LocalStateError(
                        f"the agent of node {name} exited during start-up; the end of "
                        f"{node.log}:\n{processes.indent(processes.tail(node.log))}"
                    )
            if pending and time.monotonic() > deadline:
                name = pending[0]
                log = self.topology.node(name).log
                raise LocalStateError(
                    f"the agent of node {name} was not ready within {timeout:.0f}s "
                    f"(no status ready=true on {self.topology.node(name).socket}); "
                    f"the end of {log}:\n{processes.indent(processes.tail(log))}"
                )
            if pending:
                time.sleep(0.1)

    def stop_agent(self, node: str) -> None:
        """Kill a node's agent (tests: what happens while it is gone)."""
        cgroups.kill(self.cgroup_root / self._node(node).cgroup)

    def restart_agent(self, node: str, timeout: float = AGENT_TIMEOUT) -> None:
        """Stop a node's agent (SIGTERM, then SIGKILL) and start it again; wait until ready."""
        if not self.agents:
            raise LocalStateError("this sandbox runs without agents (up --no-agents)")
        plan_ = self._node(node)
        cg = self.cgroup_root / plan_.cgroup
        cgroups.signal_all(cg, signal.SIGTERM)
        if not cgroups.wait_empty(cg, AGENT_GRACE):
            cgroups.kill(cg)
        self._reap()
        self._start_agent(plan_)
        self._save()
        self._wait_agents([plan_.name], timeout, _quiet)

    # -- pods ------------------------------------------------------------------------------

    def _env(self, pod: PodPlan, extra: Sequence[tuple[str, str]] = ()) -> dict[str, str]:
        return processes.pod_env(
            pod_name=pod.name,
            namespace=pod.namespace,
            node=pod.node,
            pod_ip=pod.ip,
            service_account=pod.service_account,
            extra=extra,
        )

    def _start_pod(self, pod: PodPlan) -> None:
        pids: list[int] = []
        cg = self.cgroup_root / pod.cgroup
        for c in self.containers.get(pod.key, []):
            with open(pod.log, "ab") as f:
                f.write(f"--- container {c.name}: {' '.join(c.argv)}\n".encode())
            p = processes.spawn(
                processes.launcher(cg, c.argv, netns=pod.netns),
                log=pod.log,
                env=self._env(pod, c.env),
                cwd=self.config_dir,  # so that examples can ship scripts next to their YAML
            )
            self._popens.append(p)
            pids.append(p.pid)
        self.pod_pids[pod.key] = pids

    def _wait_pod(self, pod: PodPlan, timeout: float) -> None:
        pids = self.pod_pids.get(pod.key, [])
        if not pids:
            return
        if pod.ports:
            ok, why = processes.wait_ports(
                pod.netns,
                ["127.0.0.1", pod.ip],
                pod.ports,
                timeout=timeout,
                pids=pids,
                popens=self._popens,
            )
        else:
            time.sleep(ALIVE_CHECK)
            self._reap()
            dead = [p for p in pids if not processes.alive(p)]
            ok, why = (not dead), f"its process(es) {dead} exited right after start"
        if not ok:
            raise LocalStateError(
                f"pod {pod.key} did not become ready: {why}; the end of "
                f"{pod.log}:\n{processes.indent(processes.tail(pod.log))}"
            )

    def kill_pod(self, pod: str) -> None:
        """Kill every process of a pod (its cgroup); its netns and address stay."""
        p = self._pod(pod)
        cgroups.kill(self.cgroup_root / p.cgroup)
        self._reap()

    def start_pod(self, pod: str, timeout: float = POD_TIMEOUT) -> None:
        """Start a pod's containers again (after ``kill_pod``) and wait until it is ready."""
        p = self._pod(pod)
        cgroups.kill(self.cgroup_root / p.cgroup)
        self._start_pod(p)
        self._save()
        self._wait_pod(p, timeout)

    # -- looking at it ---------------------------------------------------------------------

    def _pod(self, pod: str) -> PodPlan:
        """A pod by ``namespace/name`` or by a name unique across namespaces."""
        if "/" in pod:
            try:
                return self.topology.pod(pod)
            except KeyError:
                raise LocalStateError(
                    f"no pod {pod} in the sandbox; pods: {self._pod_list()}"
                ) from None
        matches = [p for p in self.topology.pods if p.name == pod]
        if len(matches) == 1:
            return matches[0]
        if not matches:
            raise LocalStateError(f"no pod named {pod} in the sandbox; pods: {self._pod_list()}")
        raise LocalStateError(
            f"pod name {pod} is ambiguous: {', '.join(p.key for p in matches)}; use NAMESPACE/NAME"
        )

    def _pod_list(self) -> str:
        return ", ".join(p.key for p in self.topology.pods) or "(none)"

    def _node(self, node: str) -> NodePlan:
        try:
            return self.topology.node(node)
        except KeyError:
            names = ", ".join(n.name for n in self.topology.nodes)
            raise LocalStateError(f"no node {node} in the sandbox; nodes: {names}") from None

    def pod_key(self, pod: str) -> str:
        return self._pod(pod).key

    def pod_ip(self, pod: str) -> str:
        return self._pod(pod).ip

    def pod_netns(self, pod: str) -> str:
        return self._pod(pod).netns

    def pod_cgroup(self, pod: str) -> str:
        return str(self.cgroup_root / self._pod(pod).cgroup)

    def pod_log(self, pod: str) -> str:
        return self._pod(pod).log

    def pod_pids_live(self, pod: str) -> list[int]:
        return cgroups.procs(self.cgroup_root / self._pod(pod).cgroup)

    def node_netns(self, node: str) -> str:
        return self._node(node).netns

    def node_ip(self, node: str) -> str:
        return self._node(node).ip

    def agent_socket(self, node: str) -> str:
        return self._node(node).socket

    def agent_log(self, node: str) -> str:
        return self._node(node).log

    def agent_cgroup(self, node: str) -> str:
        return str(self.cgroup_root / self._node(node).cgroup)

    def log_of(self, node_or_pod: str) -> str:
        """The log file of a node's agent or of a pod (node names win)."""
        if any(n.name == node_or_pod for n in self.topology.nodes):
            return self.agent_log(node_or_pod)
        return self.pod_log(node_or_pod)

    def status(self) -> dict[str, Any]:
        """A JSON-able description: nodes with their agents, pods with their processes."""
        nodes = []
        for n in self.topology.nodes:
            agent: dict[str, Any] | None = None
            if self.agents:
                pids = cgroups.procs(self.cgroup_root / n.cgroup)
                agent = {
                    "pids": pids,
                    "running": bool(pids),
                    "ready": self._agent_ready(n) if pids else False,
                    "socket": n.socket,
                    "log": n.log,
                    "cgroup": str(self.cgroup_root / n.cgroup),
                }
            nodes.append(
                {
                    "name": n.name,
                    "index": n.index,
                    "netns": n.netns,
                    "ip": n.ip,
                    "pod_cidr": n.pod_cidr,
                    "routes": [f"{r.dst} via {r.via}" for r in n.routes],
                    "netns_exists": os.path.exists(netlink.netns_path(n.netns)),
                    "agent": agent,
                }
            )
        pods = []
        for p in self.topology.pods:
            pids = cgroups.procs(self.cgroup_root / p.cgroup)
            expected = len(self.containers.get(p.key, []))
            pods.append(
                {
                    "key": p.key,
                    "namespace": p.namespace,
                    "name": p.name,
                    "node": p.node,
                    "ip": p.ip,
                    "netns": p.netns,
                    "netns_exists": os.path.exists(netlink.netns_path(p.netns)),
                    "cgroup": str(self.cgroup_root / p.cgroup),
                    "pids": pids,
                    "containers": expected,
                    "running": bool(pids) or expected == 0,
                    "ports": list(p.ports),
                    "log": p.log,
                }
            )
        return {
            "up": True,
            "config_dir": self.config_dir,
            "created": self.created,
            "agents": self.agents,
            "cgroup_root": str(self.cgroup_root),
            "fabric_netns": self.topology.fabric_netns,
            "pods_file": PODS_FILE,
            "nodes": nodes,
            "pods": pods,
        }

    # -- running things in pods ------------------------------------------------------------

    def pod_argv(self, pod: str, argv: Sequence[str]) -> list[str]:
        """argv that runs ``argv`` in the pod's cgroup and netns (via ``ip netns exec``)."""
        p = self._pod(pod)
        return processes.launcher(self.cgroup_root / p.cgroup, argv, netns=p.netns)

    def pod_env(self, pod: str, env: dict[str, str] | None = None) -> dict[str, str]:
        """A pod's environment (as its containers get it), plus TERM, plus ``env``."""
        base = self._env(self._pod(pod))
        if "TERM" in os.environ:
            base["TERM"] = os.environ["TERM"]
        base.update(env or {})
        return base

    def exec(self, pod: str, argv: Sequence[str], **kw: Any) -> subprocess.CompletedProcess[Any]:
        """``subprocess.run`` of ``argv`` inside a pod (its netns and cgroup).

        ``env=`` is merged over the pod's environment.
        """
        kw["env"] = self.pod_env(pod, kw.get("env"))
        return subprocess.run(self.pod_argv(pod, argv), **kw)

    def popen(self, pod: str, argv: Sequence[str], **kw: Any) -> subprocess.Popen[Any]:
        """``subprocess.Popen`` of ``argv`` inside a pod; ``down`` kills it with the pod."""
        kw["env"] = self.pod_env(pod, kw.get("env"))
        return subprocess.Popen(self.pod_argv(pod, argv), **kw)

    # -- tearing down ----------------------------------------------------------------------

    def _reap(self) -> None:
        self._popens = [p for p in self._popens if p.poll() is None]

    def down(self, progress: Progress = _quiet) -> None:
        """Tear the sandbox down (everything, also leftovers of earlier runs)."""
        popens, self._popens = self._popens, []
        teardown(progress, popens)

    def dump_logs(self, out: Any = None, lines: int = 30) -> None:
        """Write the end of every agent and pod log (for a failing test's output)."""
        stream = out if out is not None else sys.stderr
        logs = [(f"agent {n.name}", n.log) for n in self.topology.nodes if self.agents]
        logs += [(f"pod {p.key}", p.log) for p in self.topology.pods]
        for title, path in logs:
            stream.write(f"--- {title}: {path}\n{processes.tail(path, lines)}\n")

    def __enter__(self) -> Sandbox:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc is not None:
            with contextlib.suppress(Exception):
                self.dump_logs()
        self.down()
