"""The ``Sandbox``: bring a planned topology up (netns, links, cgroups, the mesh CA,
agents, pods), look at it, run commands in its pods, and tear it down.

Owns the order of operations, and finding a node or pod by the name a user gives. A
``Sandbox`` is the ``state.Record`` of a running sandbox (its topology, config and the
pids of what it started; saved after each step, so that any process can ``attach`` to it)
plus what can be done with it. The steps are elsewhere: names and addresses in
``topology``, links in ``netlink``, cgroups in ``cgroups``, the CA, agents and pods as
processes in ``ca``, ``agents`` and ``pods``, removal in ``cleanup``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from types import TracebackType
from typing import Any

from nodeagent.errors import ConfigError, ConfigErrors, LocalStateError
from nodeagent.model.objects import PodRuntime
from nodeagent.sandbox import agents, ca, cgroups, netlink, pods, processes
from nodeagent.sandbox.agents import AGENT_TIMEOUT, dns_proxy_on
from nodeagent.sandbox.cleanup import leftovers, teardown, teardown_locked
from nodeagent.sandbox.pods import POD_TIMEOUT
from nodeagent.sandbox.state import PODS_FILE, Progress, Record, locked, quiet, require_root
from nodeagent.sandbox.topology import NodePlan, PodPlan, log_dir, plan


class SandboxAlreadyUp(LocalStateError):
    """``up`` while a sandbox is running."""


class NotUp(LocalStateError):
    """A command that needs a running sandbox, without one."""


# -- the sandbox -----------------------------------------------------------------------------


@dataclasses.dataclass(eq=False, repr=False)
class Sandbox(Record):
    """A running sandbox. Make one with ``Sandbox.up(dir)`` or ``Sandbox.attach()``.

    ``with Sandbox.up(dir, agents=False) as sb: ...`` always tears it down.
    """

    _popens: list[subprocess.Popen[bytes]] = dataclasses.field(default_factory=list, init=False)
    """The processes this one started (reaped as they exit; waited for by ``down``)."""

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
        progress: Progress = quiet,
        mtls: bool = True,
        kubeconfig: str | os.PathLike[str] | None = None,
        before_agents: Callable[[Sandbox], None] | None = None,
    ) -> Sandbox:
        """Load ``config_dir`` and bring the sandbox up; on any failure, tear it all down.

        Nodes and pods always come from ``config_dir``. With ``kubeconfig``, the agents
        follow that Kubernetes API server instead (``run --source kubernetes``): it must
        hold the same pods, and the agents must reach it from their node netns (e.g. on
        an address of the fabric). ``before_agents(sb)`` runs once the namespaces exist,
        before any agent starts (e.g. to start that API server on the fabric).

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
        topo = plan(snapshot, dns_proxy=agents and dns_proxy_on(agent_args))
        containers = pods.containers_of(snapshot)
        root = cgroups.find_root()
        with locked():
            cls._refuse_if_up()
            left = leftovers()
            if left:
                progress(f"cleaning up after an earlier run: {', '.join(left)}")
                teardown_locked(progress)
            sb = cls(
                topo,
                config_dir=directory,
                cgroup_root=root,
                agents=agents,
                agent_args=tuple(agent_args),
                containers=containers,
                created=time.time(),
                mtls=mtls and agents,
                kubeconfig=os.path.abspath(kubeconfig) if kubeconfig else "",
            )
            try:
                sb._build(
                    progress,
                    agent_timeout=agent_timeout,
                    pod_timeout=pod_timeout,
                    before_agents=before_agents,
                )
            except BaseException:
                with contextlib.suppress(Exception):
                    progress("bringing the sandbox up failed: tearing it down")
                with contextlib.suppress(Exception):
                    teardown_locked(quiet, sb._popens)
                raise
        return sb

    @staticmethod
    def _refuse_if_up() -> None:
        record = Record.load()
        if record is None or not record.still_running():
            return
        topo = record.topology
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(record.created))
        raise SandboxAlreadyUp(
            f"a sandbox is already up (from {record.config_dir}, started {started}, "
            f"{len(topo.nodes)} nodes, {len(topo.pods)} pods): "
            "run `nodeagent sandbox down` first"
        )

    @classmethod
    def attach(cls) -> Sandbox:
        """The sandbox described by the state file (made by ``up`` in any process)."""
        sb = cls.load()
        if sb is None:
            left = leftovers()
            hint = (
                f" (leftovers of an earlier run exist: {', '.join(left)}; "
                "`nodeagent sandbox down` removes them)"
                if left
                else ""
            )
            raise NotUp(f"no sandbox is up: start one with `nodeagent sandbox up`{hint}")
        return sb

    def _build(
        self,
        progress: Progress,
        *,
        agent_timeout: float,
        pod_timeout: float,
        before_agents: Callable[[Sandbox], None] | None = None,
    ) -> None:
        topo = self.topology
        os.makedirs(log_dir(), exist_ok=True)
        self.save()  # first, so that a crash from here on is recognised as ours
        progress(f"fabric: netns {topo.fabric_netns}, bridge {topo.fabric_bridge}")
        netlink.build_fabric(topo)
        for node in topo.nodes:
            progress(f"node {node.name}: netns {node.netns}, {node.ip}, pods {node.pod_cidr}")
            netlink.build_node(topo, node)
            cgroups.create(self.cgroup_root / node.cgroup)
        for pod in topo.pods:
            cgroups.create(self.cgroup_root / pod.cgroup)
            if pod.host:
                progress(f"workload {pod.key}: {pod.ip} on {pod.node}'s host, {pod.cgroup}")
                netlink.write_etc_netns(pod)
                continue
            progress(f"pod {pod.key}: netns {pod.netns}, {pod.ip} on {pod.node}")
            netlink.build_pod(topo.node(pod.node), pod)
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
                if not p.host  # the agent finds its host's workloads in the config
            },
        )
        if self.mtls:
            self._start_ca(progress)
        if before_agents is not None:
            before_agents(self)
        if self.agents:
            for node in topo.nodes:
                self._start_agent(node)
            self.save()
            self._wait_agents([n.name for n in topo.nodes], agent_timeout, progress)
        for pod in topo.pods:
            self._start_pod(pod)
        self.save()
        for pod in topo.pods:
            self._wait_pod(pod, pod_timeout)
            progress(f"pod {pod.key} is ready")

    # -- the mesh CA -----------------------------------------------------------------------

    def ca_token_file(self, node: str) -> str:
        return ca.token_file(node)

    @property
    def ca_log(self) -> str:
        return ca.log_path()

    def _start_ca(self, progress: Progress) -> None:
        p = ca.start(self.topology.nodes, self.cgroup_root, self.config_dir, progress)
        self._popens.append(p)
        self.ca_pid = p.pid
        ca.wait_started(p)

    def stop_ca(self) -> None:
        """Stop the mesh CA (tests: certificates must keep working without it)."""
        ca.stop(self.cgroup_root)

    def start_ca(self) -> None:
        self._start_ca(quiet)
        self.save()

    # -- agents ----------------------------------------------------------------------------

    def _start_agent(
        self, node: NodePlan, successor: bool = False, cgroup: str = ""
    ) -> subprocess.Popen[bytes]:
        args = [*(ca.agent_args(node) if self.mtls else []), *self.agent_args]
        if not any(a == "--workers" or a.startswith("--workers=") for a in args):
            args += ["--workers", "1"]  # one process whatever the box: the same on every machine
        p = agents.start(
            node,
            self.cgroup_root,
            self.config_dir,
            args,
            self.kubeconfig,
            successor=successor,
            cgroup=cgroup,
        )
        self._popens.append(p)
        self.agent_pids[node.name] = p.pid
        return p

    def _wait_agents(self, names: Sequence[str], timeout: float, progress: Progress) -> None:
        nodes = [self.topology.node(name) for name in names]
        agents.wait_ready(nodes, self.agent_pids, self._popens, timeout, progress)

    def stop_agent(self, node: str) -> None:
        """Kill a node's agent (tests: what happens while it is gone)."""
        plan_ = self._node(node)
        cgroups.kill(self.cgroup_root / plan_.cgroup)
        cgroups.kill(agents.pod_cgroups(self.cgroup_root, plan_))

    def restart_agent(self, node: str, timeout: float = AGENT_TIMEOUT, cgroup: str = "") -> None:
        """Stop a node's agent (SIGTERM, then SIGKILL) and start it again; wait until ready.
        ``cgroup``: start it in a cgroup of that name beside the node's (a DaemonSet's new
        pod, ``agents.pod_cgroups``)."""
        if not self.agents:
            raise LocalStateError("this sandbox runs without agents (up --no-agents)")
        plan_ = self._node(node)
        agents.stop(plan_, self.cgroup_root)
        self._reap()
        self._start_agent(plan_, cgroup=cgroup)
        self.save()
        self._wait_agents([plan_.name], timeout, quiet)

    def roll_agent(
        self,
        node: str,
        timeout: float | None = None,
        exit_timeout: float | None = 120.0,
        cgroup: str = "",
    ) -> int:
        """What a DaemonSet rolling update does (maxSurge 1, maxUnavailable 0): start a new
        agent (same command line, the node's cgroup) alongside the running one, which
        hands it its listeners (docs/upgrade.md); once the new one serves, the old one
        drains and exits. Waits up to ``timeout`` seconds for the take-over (None:
        ``agents.takeover_timeout()``) and up to ``exit_timeout`` for that exit (None: not
        at all). ``cgroup``: the new agent runs in a cgroup of that name beside the node's
        (a DaemonSet's new pod, ``agents.pod_cgroups``). Returns the old agent's pid; the
        state records the new one's."""
        if not self.agents:
            raise LocalStateError("this sandbox runs without agents (up --no-agents)")
        plan_ = self._node(node)
        old = self.agent_pids.get(plan_.name, 0)
        if not old or not processes.alive(old):
            raise LocalStateError(
                f"the agent of node {plan_.name} is not running (pid {old}): nothing to roll; "
                "start one by restarting it"
            )
        before = agents.socket_inode(agents.handover_socket(plan_))
        self._reap()
        new = self._start_agent(plan_, successor=True, cgroup=cgroup)
        try:
            wait = agents.takeover_timeout() if timeout is None else timeout
            agents.wait_taken_over(plan_, new, before, wait)
        except LocalStateError:
            self.agent_pids[plan_.name] = old
            with contextlib.suppress(ProcessLookupError):
                new.kill()
            raise
        finally:
            self.save()
        if exit_timeout is not None and not agents.wait_exit(old, exit_timeout):
            raise LocalStateError(
                f"the old agent of node {plan_.name} (pid {old}) did not exit within "
                f"{exit_timeout:.0f}s of handing over"
            )
        self._reap()
        return old

    # -- pods ------------------------------------------------------------------------------

    def _start_pod(self, pod: PodPlan) -> None:
        pids: list[int] = []
        for c in self.containers.get(pod.key, []):
            p = pods.start_container(pod, c, self.cgroup_root, self.config_dir)
            self._popens.append(p)
            pids.append(p.pid)
        self.pod_pids[pod.key] = pids

    def _wait_pod(self, pod: PodPlan, timeout: float) -> None:
        pods.wait_ready(pod, self.pod_pids.get(pod.key, []), self._popens, timeout)

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
        self.save()
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
                    "ready": agents.ready(n) if pids else False,
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
        pod_items = []
        for p in self.topology.pods:
            pids = cgroups.procs(self.cgroup_root / p.cgroup)
            expected = len(self.containers.get(p.key, []))
            pod_items.append(
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
            "kubeconfig": self.kubeconfig,
            "created": self.created,
            "agents": self.agents,
            "cgroup_root": str(self.cgroup_root),
            "fabric_netns": self.topology.fabric_netns,
            "pods_file": PODS_FILE,
            "nodes": nodes,
            "pods": pod_items,
        }

    # -- running things in pods ------------------------------------------------------------

    def pod_argv(self, pod: str, argv: Sequence[str]) -> list[str]:
        """argv that runs ``argv`` in the pod's cgroup and netns (via ``ip netns exec``)."""
        p = self._pod(pod)
        return processes.launcher(self.cgroup_root / p.cgroup, argv, netns=p.netns)

    def pod_env(self, pod: str, env: dict[str, str] | None = None) -> dict[str, str]:
        """A pod's environment (as its containers get it), plus TERM, plus ``env``."""
        base = pods.env(self._pod(pod))
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

    def down(self, progress: Progress = quiet) -> None:
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
