"""The local pods' lifecycle: for each pod of this node with a runtime entry, its sockets,
its three listeners (15001 outbound, 15006 inbound, 15008 HBONE), its DNS proxy's (15053,
UDP and TCP) and its outbound HBONE pool, its capture (through the ``Capture`` it was
handed), its readiness and state; and their release when the pod leaves or its runtime changes.

The host's own workloads (host mode: the WorkloadEntries annotated with this node, a VM's
services) are served the same way in the agent's own netns (``HOST_NETNS``), where
they share the host with everything else: each one's outbound and DNS listeners on a
loopback address of its own (``loopback_for``), its inbound and HBONE listeners on its
address, its upstream sockets from its address.

Connections accepted on those listeners go to the handlers it was given; what they do
with them is none of this module's business.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
import zlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from nodeagent.errors import NodeAgentError
from nodeagent.model.entries import WORKLOAD_CGROUP_ANNOTATION, workload_cgroup
from nodeagent.model.objects import HOST_NETNS, HostWorkload, Pod, PodRuntime
from nodeagent.model.snapshot import MeshSnapshot
from nodeagent.proxy.dns import DNS_PORT, DnsListeners, DnsProxy
from nodeagent.proxy.handover import Listener
from nodeagent.proxy.hbone import HBONE_PORT
from nodeagent.proxy.hbone_client import HboneClientPool
from nodeagent.proxy.hbone_server import (
    ConnectRefusal,
    ConnectRequest,
    HboneServer,
    start_hbone_server,
)
from nodeagent.proxy.inputs import (
    INBOUND_PORT,
    OUTBOUND_PORT,
    Addr,
    Excluded,
    PodSockets,
    ProxyInputs,
)
from nodeagent.proxy.limits import ConnectionCaps

log = logging.getLogger("nodeagent.proxy")


@dataclass
class PodProxy:
    """The listeners and capture state of one local pod."""

    pod: Pod
    runtime: PodRuntime
    sockets: PodSockets | None = None
    servers: list[asyncio.base_events.Server] = field(default_factory=list)
    """The outbound listener's server, then the inbound one's."""
    hbone: HboneServer | None = None
    pool: HboneClientPool | None = None
    dns: DnsListeners | None = None
    state: str = "pending"
    mode: str = ""
    """What the capture reported when it attached the pod."""
    host: HostWorkload | None = None
    """A host-mode workload's capture spec (None: a pod in its own netns)."""

    @property
    def is_host(self) -> bool:
        return self.runtime.netns == HOST_NETNS

    @property
    def listener(self) -> socket.socket:
        """The inbound listener (eBPF steers inbound connections to it)."""
        return self.servers[1].sockets[0]

    def close(self) -> None:
        for s in self.servers:
            s.close()
        self.servers.clear()
        if self.hbone is not None:
            self.hbone.close()
            self.hbone = None
        if self.dns is not None:
            self.dns.close()
            self.dns = None
        if self.pool is not None:
            self.pool.close()
            self.pool = None
        if self.sockets is not None:
            self.sockets.close()
            self.sockets = None


Accept = Callable[[PodProxy], Callable[[], asyncio.BaseProtocol]]
"""A pod → the protocol factory of one of its listeners."""
OnHbone = Callable[[PodProxy, ConnectRequest], Awaitable[asyncio.BaseProtocol | ConnectRefusal]]
"""Answers a CONNECT that arrived on a pod's HBONE listener."""


class ListenerSource(Protocol):
    """Listening sockets opened elsewhere: by the agent this one took over from
    (``handover.Inherited``), or, in a worker process, by the main process."""

    def take(
        self, kind: str, port: int, pod: str = "", netns: str = "", ip: str = ""
    ) -> socket.socket | None: ...


GROUP_KINDS = ("outbound", "inbound", "hbone")
"""A pod's listeners that worker processes share (``SO_REUSEPORT`` groups); its DNS
proxy stays with the main process."""


def exclusions(pod: Pod) -> Excluded:
    """(outbound, inbound) ports a pod's annotations leave out of capture."""
    return pod.excluded_ports("Outbound"), pod.excluded_ports("Inbound")


def loopback_for(key: str, taken: set[str]) -> str:
    """A host workload's own address on ``lo`` (``127.77.0.0/16``), the same for the same
    key in every agent (a hand-over finds its listeners there), not one in ``taken``."""
    h = zlib.crc32(key.encode())
    while True:
        addr = f"127.77.{(h >> 8) & 0xFF}.{1 + h % 254}"
        if addr not in taken:
            return addr
        h += 1


def host_runtime(entry: Pod, node: str) -> PodRuntime | None:
    """A local WorkloadEntry's place on this host (None: no IP address to serve it at)."""
    if not entry.pod_ip:
        return None
    try:
        ipaddress.IPv4Address(entry.pod_ip)
    except ValueError:
        return None
    raw = entry.annotations.get(WORKLOAD_CGROUP_ANNOTATION)
    cgroup = workload_cgroup(raw) if raw else ""  # (checked when the config was read)
    return PodRuntime(key=entry.key, ip=entry.pod_ip, node=node, netns=HOST_NETNS, cgroup=cgroup)


class LocalPods:
    """The pods this node's proxy serves, keyed by pod key (``pods``, shared with the
    inbound handler, which serves only pods found there)."""

    def __init__(
        self,
        inputs: ProxyInputs,
        pods: dict[str, PodProxy],
        outbound: Accept,
        inbound: Accept,
        hbone: OnHbone,
        caps: ConnectionCaps | None = None,
        dns: DnsProxy | None = None,
    ) -> None:
        self.inputs = inputs
        self.caps = caps or ConnectionCaps(inputs.connection_limits, inputs.metrics)
        self.dns = dns
        self.pods = pods
        self._outbound = outbound
        self._inbound = inbound
        self._hbone = hbone
        self.inherited: ListenerSource | None = None
        """Listeners handed over by the agent this one replaces (taken at capture)."""
        self.serves: Callable[[str], bool] | None = None
        """Which local pods this process serves (None: all); a worker process serves
        those whose listeners the main process sent."""

    async def reconcile(self, snap: MeshSnapshot) -> None:
        """Capture every local pod that has a runtime entry; release pods that left."""
        capture = self.inputs.capture
        wanted: dict[str, tuple[Pod, PodRuntime]] = {}
        for pod in snap.pods_on_node(self.inputs.node):
            rt = snap.runtimes.get(pod.key)
            if rt is not None and pod.in_mesh:
                wanted[pod.key] = (pod, rt)
        for entry in snap.workload_entries_on_node(self.inputs.node):
            hrt = host_runtime(entry, self.inputs.node)
            if hrt is None or not entry.in_mesh:
                continue
            if entry.key in wanted:
                log.warning("WorkloadEntry %s: a pod of this node has its name", entry.key)
                continue
            wanted[entry.key] = (entry, hrt)
        if self.serves is not None:
            wanted = {k: v for k, v in wanted.items() if self.serves(k)}
        capture.on_snapshot(snap, {k for k, (_, rt) in wanted.items() if rt.netns != HOST_NETNS})
        for key in list(self.pods):
            pp = self.pods[key]
            if key not in wanted or wanted[key][1] != pp.runtime:
                log.info("%s %s left this node's mesh: closing its listeners", pp.pod.kind, key)
                if pp.is_host:
                    await capture.detach_host(key)
                else:
                    await capture.detach(key, pp.runtime)
                pp.close()
                del self.pods[key]
        for key, (pod, rt) in wanted.items():
            existing = self.pods.get(key)
            if existing is None:
                pp = self.pods[key] = PodProxy(pod=pod, runtime=rt)
            else:
                pp = existing
                excluded = exclusions(pod)
                if pp.state == "ready" and excluded != exclusions(pp.pod) and not pp.is_host:
                    capture.exclude(rt, pp.listener, excluded)
                pp.pod = pod
            if pp.state != "ready":
                await self._capture(pp, snap)
            elif pp.is_host and pp.host != self._host_spec(pp, snap):
                await self._capture_host(pp, snap)  # its ports or exclusions changed
        if capture.host_stale():
            await self.refresh_hosts()

    async def refresh_hosts(self) -> None:
        """Remake the host rules where a workload's cgroup came, went or was made again."""
        try:
            modes = await self.inputs.capture.refresh_hosts()
        except (OSError, NodeAgentError) as e:
            log.error("cannot capture this host's workloads: %s", e)
            return
        for key, mode in modes.items():
            if key in self.pods:
                self.pods[key].mode = mode

    def hosts_stale(self) -> bool:
        return self.inputs.capture.host_stale()

    def _host_spec(self, pp: PodProxy, snap: MeshSnapshot) -> HostWorkload:
        """What host mode captures of ``pp``: its cgroup, its own loopback address, the
        ports its services reach, its exclusions."""
        taken = {p.host.loopback for p in self.pods.values() if p.host and p is not pp}
        loopback = pp.host.loopback if pp.host else loopback_for(pp.pod.key, taken)
        out_ports, in_ports = exclusions(pp.pod)
        return HostWorkload(
            key=pp.pod.key,
            ip=pp.runtime.ip,
            cgroup=pp.runtime.cgroup,
            loopback=loopback,
            inbound_ports=snap.workload_ports(pp.pod),
            exclude_outbound_ports=out_ports,
            exclude_inbound_ports=in_ports,
        )

    async def _capture_host(self, pp: PodProxy, snap: MeshSnapshot) -> None:
        spec = self._host_spec(pp, snap)
        pp.mode = await self.inputs.capture.attach_host(spec)
        pp.host = spec

    def _binds(self, pp: PodProxy, snap: MeshSnapshot) -> tuple[str, str, str]:
        """(outbound and DNS, inbound, HBONE) listening addresses of ``pp``: a pod's own
        netns has them all; on a host they are the workload's own."""
        if not pp.is_host:
            return "127.0.0.1", "0.0.0.0", "0.0.0.0"
        if pp.host is None:
            pp.host = self._host_spec(pp, snap)
        return pp.host.loopback, pp.runtime.ip, pp.runtime.ip

    async def _capture(self, pp: PodProxy, snap: MeshSnapshot) -> None:
        key = pp.pod.key
        try:
            local, inbound, hbone = self._binds(pp, snap)
            if pp.sockets is None:
                pp.sockets = self.inputs.sockets.pod(pp.runtime)
            if not pp.servers:
                loop = asyncio.get_running_loop()
                for handler, host, port, kind in (
                    (self._outbound, local, OUTBOUND_PORT, "outbound"),
                    (self._inbound, inbound, INBOUND_PORT, "inbound"),
                ):
                    sock = self._inherit(pp, kind, port) or pp.sockets.listen(host, port)
                    server = await loop.create_server(handler(pp), sock=sock, backlog=4096)
                    pp.servers.append(server)
            if self.inputs.identity is not None and pp.hbone is None:
                await self._start_hbone(pp, pp.sockets, hbone)
            if self.dns is not None and pp.dns is None:
                await self._start_dns(self.dns, pp, pp.sockets, local)
            if pp.is_host:
                await self._capture_host(pp, snap)
            else:
                pp.mode = await self.inputs.capture.attach(
                    key, pp.runtime, pp.listener, exclusions(pp.pod)
                )
            pp.state = "ready"
            log.info("%s %s captured (%s) in %s", pp.pod.kind, key, pp.mode, pp.runtime.netns)
        except (OSError, NodeAgentError) as e:
            pp.state = f"error: {e}"
            if pp.is_host and isinstance(e, OSError) and e.errno == 99:  # EADDRNOTAVAIL
                pp.state = f"error: {pp.runtime.ip} is not an address of this host ({e})"
            log.error("cannot capture %s %s: %s", pp.pod.kind, key, pp.state[7:])
            pp.close()
            pp.host = None

    async def _start_hbone(self, pp: PodProxy, sockets: PodSockets, host: str) -> None:
        """The pod's HBONE server on 15008 and its outbound tunnel pool."""
        identity = self.inputs.identity
        assert identity is not None
        timeout = self.inputs.connect_timeout
        me = self.inputs.principal(pp.pod)
        on_connect = self._hbone
        pp.hbone = await start_hbone_server(
            self._inherit(pp, "hbone", HBONE_PORT) or sockets.listen(host, HBONE_PORT),
            lambda: identity.server_context(me),
            lambda req: on_connect(pp, req),
            metrics=self.inputs.metrics,
            slots=self.caps.listener("hbone"),
            idle_timeout=self.inputs.connection_limits.hbone_idle_timeout,
            preface_timeout=self.inputs.connection_limits.hbone_preface_timeout,
        )

        def dial(addr: Addr) -> Awaitable[socket.socket]:
            return sockets.connect(addr, timeout)

        pp.pool = HboneClientPool(dial, identity.client_context, timeout)

    def _inherit(self, pp: PodProxy, kind: str, port: int) -> socket.socket | None:
        """The listener the previous agent opened for this pod and runtime, if handed over."""
        if self.inherited is None:
            return None
        rt = pp.runtime
        return self.inherited.take(kind, port, pp.pod.key, rt.netns, rt.ip)

    def listeners(self) -> list[tuple[Listener, socket.socket]]:
        """Every captured pod's listening sockets, for a hand-over to a new agent."""
        out: list[tuple[Listener, socket.socket]] = []
        for key, pp in sorted(self.pods.items()):
            if pp.state != "ready" or len(pp.servers) != 2:
                continue
            rt = pp.runtime
            socks = [("outbound", OUTBOUND_PORT, pp.servers[0].sockets[0])]
            socks.append(("inbound", INBOUND_PORT, pp.servers[1].sockets[0]))
            if pp.hbone is not None and pp.hbone.sockets:
                socks.append(("hbone", HBONE_PORT, pp.hbone.sockets[0]))
            if pp.dns is not None:
                socks += [("dns-udp", DNS_PORT, pp.dns.udp_socket)]
                socks += [("dns-tcp", DNS_PORT, pp.dns.tcp_socket)]
            for kind, port, sock in socks:
                out.append((Listener(kind, port, key, rt.netns, rt.ip), sock))
        return out

    def group_listeners(self, key: str) -> list[tuple[Listener, socket.socket]]:
        """One more listening socket for each of the ``GROUP_KINDS`` listeners of the
        captured pod ``key``, in the same ``SO_REUSEPORT`` group (for a worker process);
        raises ``OSError`` where the pod's listener is in no group (handed over by an
        agent without ``--workers``)."""
        pp = self.pods.get(key)
        if pp is None or pp.sockets is None or pp.state != "ready":
            return []
        out: list[tuple[Listener, socket.socket]] = []
        try:
            for lst, sock in self.listeners():
                if lst.pod == key and lst.kind in GROUP_KINDS:
                    host = sock.getsockname()[0]
                    out.append((lst, pp.sockets.listen(host, lst.port)))
        except OSError:
            for _, sock in out:
                sock.close()
            raise
        return out

    async def _start_dns(self, dns: DnsProxy, pp: PodProxy, sockets: PodSockets, host: str) -> None:
        """The pod's DNS proxy on 127.0.0.1:15053 (a host workload's: on its own loopback
        address), UDP and TCP (where capture sends its port 53: a REDIRECT of the pod's
        own traffic goes to its loopback address)."""
        udp = self._inherit(pp, "dns-udp", DNS_PORT) or sockets.listen_udp(host, DNS_PORT)
        try:
            tcp = self._inherit(pp, "dns-tcp", DNS_PORT) or sockets.listen(host, DNS_PORT)
        except OSError:
            udp.close()
            raise
        pp.dns = await dns.serve(lambda: pp.pod.namespace, udp, tcp)

    def all_ready(self) -> bool:
        identity = self.inputs.identity
        return all(
            pp.state == "ready"
            and (identity is None or identity.has(self.inputs.principal(pp.pod)))
            for pp in self.pods.values()
        )

    def pod_states(self) -> list[dict[str, Any]]:
        return [
            {
                "key": k,
                "ip": pp.runtime.ip,
                "netns": pp.runtime.netns,
                "cgroup": pp.runtime.cgroup,
                "capture": pp.state,
                "mode": pp.mode,
            }
            for k, pp in sorted(self.pods.items())
        ]

    def stop_accepting(self) -> None:
        """Close every pod's listeners (established connections go on; HBONE ones get a
        GOAWAY: their open streams finish, new ones go elsewhere)."""
        for pp in self.pods.values():
            for s in pp.servers:
                s.close()
            if pp.hbone is not None:
                pp.hbone.close()
            if pp.dns is not None:  # its queries go to the agent that took the sockets
                pp.dns.close()
                pp.dns = None

    def hbone_busy(self) -> bool:
        """Whether a pod's HBONE server still has a connection open or being set up (a
        tunnel whose handshake started before ``stop_accepting``: its client's CONNECTs
        wait on it, so the agent must not exit under it)."""
        return any(pp.hbone is not None and pp.hbone.busy() for pp in self.pods.values())

    def close(self) -> None:
        for pp in self.pods.values():
            pp.close()
        self.pods.clear()
