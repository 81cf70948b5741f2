"""The shared per-node proxy: listeners inside each local pod's netns, and the outbound
(15001) and inbound (15006) connection handlers that feed ``Relay``s.

One asyncio loop serves every pod. The source workload of an outbound connection is known
from the listener that accepted it; the destination comes from ``SO_ORIGINAL_DST``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nodeagent.core import authz
from nodeagent.core.authz import AuthzRequest
from nodeagent.core.clusters import ClusterError, fqdn, port_protocol
from nodeagent.core.outbound import Action, RoundRobin, resolve
from nodeagent.core.peerauth import effective_mtls
from nodeagent.core.route import pick_weighted, select_tcp_route
from nodeagent.errors import LocalStateError, NodeAgentError, PeerError
from nodeagent.model.objects import Pod, PodRuntime, Service, ServicePort
from nodeagent.model.security import MtlsMode
from nodeagent.model.snapshot import Endpoint, MeshSnapshot, PerSnapshot
from nodeagent.model.traffic import Destination
from nodeagent.proxy.admission import HttpPort, InboundPolicy
from nodeagent.proxy.connections import ConnectionTable
from nodeagent.proxy.h1pool import ConnectFn
from nodeagent.proxy.hbone import (
    HBONE_PORT,
    ConnectRefusal,
    ConnectRequest,
    HboneClientPool,
    HboneServer,
    start_hbone_server,
)
from nodeagent.proxy.identity import MeshIdentity
from nodeagent.proxy.l7 import Downstream, Inbound, L7Proxy
from nodeagent.proxy.l7h2 import H2Pool, serve_h2
from nodeagent.proxy.pipe import Pipe
from nodeagent.proxy.relay import ClientSide, Relay, UpstreamSide
from nodeagent.proxy.sockets import connect_in, listen_in, original_dst
from nodeagent.redirect import iptables
from nodeagent.redirect.ebpf import NodeCapture
from nodeagent.redirect.netns import NetnsHandle, netns_path
from nodeagent.telemetry.accesslog import AccessLog, AccessRecord, rfc3339
from nodeagent.telemetry.metrics import Metrics

log = logging.getLogger("nodeagent.proxy")


@dataclass
class PodProxy:
    """The listeners and capture state of one local pod."""

    pod: Pod
    runtime: PodRuntime
    ns: NetnsHandle | None = None
    servers: list[asyncio.base_events.Server] = field(default_factory=list)
    hbone: HboneServer | None = None
    pool: HboneClientPool | None = None
    state: str = "pending"
    rules: str = ""

    def close(self) -> None:
        for s in self.servers:
            s.close()
        self.servers.clear()
        if self.hbone is not None:
            self.hbone.close()
            self.hbone = None
        if self.pool is not None:
            self.pool.close()
            self.pool = None
        if self.ns is not None:
            self.ns.close()
            self.ns = None


def _ip_order(ip: str) -> tuple[int, ...]:
    return tuple(int(x) for x in ip.split(".")) if "." in ip else (0,)


@dataclass(frozen=True)
class _IdentityIndex:
    """Per-snapshot lookups by workload identity."""

    tunnel_peer: dict[tuple[str, str], str]
    """(node, identity) → the lowest pod IP of that identity on that node."""
    pod_by_identity: dict[str, Pod]
    """identity → the first pod (in config order) running as it."""

    @classmethod
    def build(cls, snap: MeshSnapshot, identity_of: Callable[[Pod], str]) -> _IdentityIndex:
        peers: dict[tuple[str, str], str] = {}
        by_identity: dict[str, Pod] = {}
        for p in snap.pods:
            ident = identity_of(p)
            by_identity.setdefault(ident, p)
            if p.pod_ip:
                key = (p.node_name, ident)
                if key not in peers or _ip_order(p.pod_ip) < _ip_order(peers[key]):
                    peers[key] = p.pod_ip
        return cls(tunnel_peer=peers, pod_by_identity=by_identity)


def _forwarded_for(headers: Any) -> str | None:
    """The client address of an HBONE CONNECT's ``forwarded: for=IP`` header, if any."""
    value = headers.get("forwarded") if headers else None
    if not value:
        return None
    for part in str(value).split(";"):
        k, _, v = part.strip().partition("=")
        if k.lower() == "for" and v:
            return v.strip('"')
    return None


def _labels(
    reporter: str,
    src: Pod | None,
    dst: Pod | None,
    service: str,
    flags: str = "-",
    *,
    src_principal: str = "unknown",
    dst_principal: str = "unknown",
) -> dict[str, str]:
    mtls = src_principal != "unknown" and dst_principal != "unknown"
    return {
        "reporter": reporter,
        "source_workload": src.name if src else "unknown",
        "source_workload_namespace": src.namespace if src else "unknown",
        "source_principal": src_principal,
        "destination_workload": dst.name if dst else "unknown",
        "destination_workload_namespace": dst.namespace if dst else "unknown",
        "destination_service": service or "unknown",
        "destination_principal": dst_principal,
        "response_flags": flags,
        "connection_security_policy": "mutual_tls" if mtls else "none",
    }


class Proxy:
    def __init__(
        self,
        node: str,
        snapshot: Callable[[], MeshSnapshot],
        metrics: Metrics,
        connect_timeout: float = 5.0,
        identity: MeshIdentity | None = None,
        access_log: AccessLog | None = None,
        state_dir: Path | None = None,
        bpf: NodeCapture | None = None,
    ) -> None:
        self.node = node
        self.identity = identity
        self.snapshot = snapshot
        self.metrics = metrics
        self.table = ConnectionTable(metrics)
        self.connect_timeout = connect_timeout
        self.rr = RoundRobin()
        self.pods: dict[str, PodProxy] = {}
        self._identities = PerSnapshot(lambda snap: _IdentityIndex.build(snap, self._identity_of))
        self._tasks: set[asyncio.Task[None]] = set()
        self.accepting = True
        self.access_log = access_log or AccessLog()
        self.l7 = L7Proxy(snapshot, metrics, self.access_log)
        self.h2pool = H2Pool()
        self.admission = InboundPolicy(snapshot, state_dir)
        self.bpf = bpf
        """eBPF capture (None: iptables)."""
        self._bpf_retained = False

    # -- pods ------------------------------------------------------------------------
    async def reconcile(self, snap: MeshSnapshot) -> None:
        """Capture every local pod that has a runtime entry; release pods that left."""
        wanted: dict[str, tuple[Pod, PodRuntime]] = {}
        for pod in snap.pods_on_node(self.node):
            rt = snap.runtimes.get(pod.key)
            if rt is not None:
                wanted[pod.key] = (pod, rt)
        if self.bpf is not None:
            self.bpf.cap.set_mesh_ips(snap.mesh_addresses())
            if not self._bpf_retained:  # pins of pods that left while we were down
                self.bpf.retain(set(wanted))
                self._bpf_retained = True
        for key in list(self.pods):
            pp = self.pods[key]
            if key not in wanted or wanted[key][1] != pp.runtime:
                log.info("pod %s left this node's mesh: closing its listeners", key)
                if self.bpf is not None:
                    self.bpf.detach(key, pp.runtime.ip)
                pp.close()
                del self.pods[key]
        for key, (pod, rt) in wanted.items():
            existing = self.pods.get(key)
            if existing is None:
                pp = self.pods[key] = PodProxy(pod=pod, runtime=rt)
            else:
                pp = existing
                excluded = _exclusions(pod)
                if self.bpf is not None and pp.state == "ready" and excluded != _exclusions(pp.pod):
                    # eBPF mode applies changed exclude*Ports annotations to a live pod
                    self.bpf.exclude(rt.ip, pp.servers[1].sockets[0], *excluded)
                pp.pod = pod
            if pp.state != "ready":
                await self._capture(pp)

    async def _capture(self, pp: PodProxy) -> None:
        key = pp.pod.key
        try:
            if pp.ns is None:
                pp.ns = NetnsHandle(pp.runtime.netns)
            if not pp.servers:
                loop = asyncio.get_running_loop()
                out_sock = listen_in(pp.ns, "127.0.0.1", iptables.OUTBOUND_PORT)
                in_sock = listen_in(pp.ns, "0.0.0.0", iptables.INBOUND_PORT)
                pp.servers.append(
                    await loop.create_server(
                        self._factory(pp, "outbound"), sock=out_sock, backlog=4096
                    )
                )
                pp.servers.append(
                    await loop.create_server(
                        self._factory(pp, "inbound"), sock=in_sock, backlog=4096
                    )
                )
            if self.identity is not None and pp.hbone is None:
                await self._start_hbone(pp)
            out_ports, in_ports = _exclusions(pp.pod)
            if self.bpf is not None:
                listener = pp.servers[1].sockets[0]
                self.bpf.attach(
                    key,
                    pp.runtime.cgroup,
                    netns_path(pp.runtime.netns),
                    pp.runtime.ip,
                    listener,
                    exclude_outbound_ports=out_ports,
                    exclude_inbound_ports=in_ports,
                )
                mode = "eBPF"
            else:
                spec = iptables.CaptureSpec(
                    exclude_outbound_ports=out_ports, exclude_inbound_ports=in_ports
                )
                pp.rules = await iptables.apply_rules(pp.runtime.netns, spec)
                mode = "iptables"
            pp.state = "ready"
            log.info("pod %s captured (%s) in %s", key, mode, pp.runtime.netns)
        except (OSError, NodeAgentError) as e:
            pp.state = f"error: {e}"
            log.error("cannot capture pod %s: %s", key, e)
            pp.close()

    async def _start_hbone(self, pp: PodProxy) -> None:
        """The pod's HBONE server on 15008 and its outbound tunnel pool."""
        identity = self.identity
        ns = pp.ns
        assert identity is not None and ns is not None
        me = self._identity_of(pp.pod)
        sock = listen_in(ns, "0.0.0.0", HBONE_PORT)
        pp.hbone = await start_hbone_server(
            sock,
            lambda: identity.server_context(me),
            lambda req: self._on_hbone(pp, req),
        )

        async def dial(addr: tuple[str, int]) -> Any:
            return await connect_in(ns, addr, self.connect_timeout)

        pp.pool = HboneClientPool(dial, identity.client_context, self.connect_timeout)

    def all_ready(self) -> bool:
        return all(self._pod_ready(pp) for pp in self.pods.values())

    def _pod_ready(self, pp: PodProxy) -> bool:
        if pp.state != "ready":
            return False
        return self.identity is None or self.identity.has(self._identity_of(pp.pod))

    def identity_principal(self, pod: Pod) -> str:
        """``pod``'s SPIFFE identity (what mTLS proves for it)."""
        return self._identity_of(pod)

    def _identity_of(self, pod: Pod) -> str:
        td = self.identity.trust_domain if self.identity is not None else "cluster.local"
        return pod.identity(td)

    def pod_states(self) -> list[dict[str, Any]]:
        return [
            {
                "key": k,
                "ip": pp.runtime.ip,
                "netns": pp.runtime.netns,
                "cgroup": pp.runtime.cgroup,
                "capture": pp.state,
            }
            for k, pp in sorted(self.pods.items())
        ]

    # -- connections -----------------------------------------------------------------
    def _factory(self, pp: PodProxy, direction: str) -> Callable[[], ClientSide]:
        on_made = self._on_outbound if direction == "outbound" else self._on_inbound

        def make() -> ClientSide:
            relay = self.table.open({"direction": direction, "pod": pp.pod.key})
            return ClientSide(relay, lambda side: self._spawn(on_made(pp, side)))

        return make

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("connection handler failed: %r", task.exception(), exc_info=task.exception())

    def _refuse(self, relay: Relay, direction: str, flag: str, reason: str) -> None:
        self.metrics.failures.labels(direction=direction, response_flags=flag).inc()
        log.warning(
            "%s %s from %s to %s refused [%s]: %s",
            direction,
            relay.meta.get("pod"),
            relay.meta.get("source"),
            relay.meta.get("destination"),
            flag,
            reason,
        )
        relay.close(f"{flag}: {reason}")

    async def _dial(
        self, pp: PodProxy, relay: Relay, addr: tuple[str, int], direction: str
    ) -> None:
        ns = pp.ns
        if ns is None:
            self._refuse(relay, direction, "UF", f"pod {pp.pod.key} is no longer captured")
            return
        relay.meta["upstream"] = f"{addr[0]}:{addr[1]}"
        try:
            sock = await connect_in(ns, addr, self.connect_timeout)
        except PeerError as e:
            if relay.closed:
                return
            self._refuse(relay, direction, "UF", str(e))
            return
        if relay.closed:  # the client left while we were connecting
            sock.close()
            self.metrics.failures.labels(direction=direction, response_flags="DC").inc()
            return
        try:
            await self._wire_upstream(relay, sock)
        except OSError as e:
            self._refuse(relay, direction, "UF", f"upstream {addr}: {e}")

    async def _wire_upstream(self, relay: Relay, sock: Any) -> None:
        """Make the connected ``sock`` the relay's upstream and count the connection as
        opened; on failure the socket is closed and the error raised."""
        try:
            await asyncio.get_running_loop().create_connection(
                lambda: UpstreamSide(relay), sock=sock
            )
        except OSError:
            sock.close()
            raise
        relay.meta["counted"] = True
        self.table.counted(relay)

    def _captured_destination(
        self, side: ClientSide, direction: str, own_ports: tuple[int, ...] = ()
    ) -> tuple[str, int] | None:
        """Record the client's address and return the address it dialled before capture;
        refuse the connection (and return None) when there is none."""
        relay = side.relay
        t = side.transport
        assert t is not None
        peer = t.get_extra_info("peername")
        relay.meta["source"] = f"{peer[0]}:{peer[1]}" if peer else "?"
        try:
            if direction == "inbound" and self.bpf is not None:
                # sk_lookup steers without rewriting: the socket's own address is it
                name = t.get_extra_info("sockname")
                dst = (name[0], name[1]) if name else None
            else:
                dst = original_dst(t.get_extra_info("socket"))
        except OSError as e:
            self._refuse(relay, direction, "NR", f"cannot read the original destination: {e}")
            return None
        if dst is None or dst[1] in own_ports:
            self._refuse(relay, direction, "NR", "connection was not redirected by capture")
            return None
        relay.meta["destination"] = f"{dst[0]}:{dst[1]}"
        return dst

    async def _on_outbound(self, pp: PodProxy, side: ClientSide) -> None:
        relay = side.relay
        dst = self._captured_destination(side, "outbound")
        if dst is None:
            return
        snap = self.snapshot()
        decision = resolve(snap, pp.pod, dst[0], dst[1], self.rr)
        if decision.action is Action.REFUSE:
            self._refuse(relay, "outbound", decision.flag, decision.reason)
            return
        if decision.action is Action.PASSTHROUGH:
            relay.meta["direction"] = "passthrough"
            relay.meta["labels"] = _labels("source", pp.pod, None, "PassthroughCluster")
            await self._dial(pp, relay, dst, "passthrough")
            return
        ep = decision.endpoint
        assert ep is not None
        service = decision.service.key if decision.service else ""
        relay.meta["service"] = service
        relay.meta["peer"] = ep.pod.key
        service_host = (
            f"{decision.service.name}.{decision.service.namespace}.svc.cluster.local"
            if decision.service
            else ""
        )
        if decision.service is not None and decision.port is not None:
            proto = port_protocol(decision.port)
            if proto is not None:
                await self._serve_l7(pp, side, decision.service, decision.port, proto)
                return
            try:
                routed = self._tcp_route(snap, pp.pod, decision.service, decision.port.port)
            except ClusterError as e:
                self._refuse(relay, "outbound", "NC", str(e))
                return
            if routed is not None:
                ep, service_host = routed
                relay.meta["peer"] = ep.pod.key
        if self.identity is None or effective_mtls(snap, ep.pod, ep.port).mode is MtlsMode.DISABLE:
            relay.meta["labels"] = _labels("source", pp.pod, ep.pod, service_host)
            await self._dial(pp, relay, (ep.ip, ep.port), "outbound")
            return
        await self._tunnel(pp, relay, snap, ep.pod, (ep.ip, ep.port), service_host)

    def _tcp_route(
        self, snap: MeshSnapshot, src: Pod, svc: Service, port: int
    ) -> tuple[Endpoint, str] | None:
        """For a TCP service port with a VirtualService ``tcp[]`` rule or a
        DestinationRule: the endpoint its weighted route and load balancer choose, and the
        destination host. None: neither applies (round robin over the service)."""
        host = fqdn(svc)
        rule = select_tcp_route(snap, host, port, src.labels)
        if rule is not None:
            rd = pick_weighted(rule.routes, self.l7.rnd.random())
            dest = rd.destination if rd is not None else Destination(host)
        elif host in snap.destination_rule_by_host:
            dest = Destination(host)
        else:
            return None
        cluster = self.l7.clusters.cluster(snap, dest, port)
        ep = self.l7.clusters.balancer(cluster, src).pick(None)
        if ep is None:
            raise ClusterError(f"no endpoint of {cluster.name} is ready")
        return ep, cluster.host

    async def _serve_l7(
        self, pp: PodProxy, side: ClientSide, svc: Service, port: ServicePort, proto: str
    ) -> None:
        """Hand the client connection to the L7 path: requests are routed one by one."""
        relay = side.relay
        t = side.transport
        assert t is not None
        relay.meta["direction"] = "outbound-http"
        relay.meta["upstream"] = "per request"
        client_ip = str(relay.meta.get("source", "")).rsplit(":", 1)[0]
        ds = Downstream(
            pod=pp.pod,
            source_principal=(
                self._identity_of(pp.pod) if self.identity is not None else "unknown"
            ),
            source_ip=client_ip,
            service=svc,
            port=port,
            connect=self._l7_connect(pp, client_ip),
            meta=relay.meta,
        )
        pipe = Pipe()
        pending, relay.pending = relay.pending, []
        pipe.adopt(t, pending)
        await self._serve_http(ds, pipe, relay, proto)

    async def _serve_http(self, ds: Downstream, pipe: Pipe, relay: Relay, proto: str) -> None:
        """Serve one client connection (either side) with the L7 engine in ``proto``
        (``h2`` or ``http1``); then record its byte counts (from the client's side:
        sent = read from the client) and close its table entry."""
        try:
            if proto == "h2":
                await serve_h2(self.l7, self.h2pool, ds, pipe)
            else:
                await self.l7.serve_http1(ds, pipe)
        finally:
            relay.bytes_sent, relay.bytes_received = pipe.bytes_in, pipe.bytes_out
            relay.close("done")

    def _l7_connect(self, pp: PodProxy, client_ip: str) -> ConnectFn:
        """How the L7 path of ``pp``'s clients reaches an endpoint: plain TCP from the
        pod's netns where mTLS is off for it, else an HBONE stream."""

        async def connect(ep: Endpoint, pipe: Pipe) -> tuple[str, str]:
            snap = self.snapshot()
            addr = (ep.ip, ep.port)
            if self.identity is not None and (
                effective_mtls(snap, ep.pod, ep.port).mode is not MtlsMode.DISABLE
            ):
                return await self._open_tunnel(pp, snap, ep.pod, addr, client_ip, pipe)
            await self._connect_plain(pp, ep, pipe)
            return f"{ep.ip}:{ep.port}", "unknown"

        return connect

    async def _connect_plain(self, pp: PodProxy, ep: Endpoint, pipe: Pipe) -> None:
        """Connect ``pipe`` to ``ep`` over plain TCP from ``pp``'s netns."""
        ns = pp.ns
        if ns is None:
            raise PeerError(f"pod {pp.pod.key} is no longer captured")
        sock = await connect_in(ns, (ep.ip, ep.port), self.connect_timeout)
        try:
            await asyncio.get_running_loop().create_connection(lambda: pipe, sock=sock)
        except OSError as e:
            sock.close()
            raise PeerError(f"upstream {ep}: {e}") from None

    async def _serve_inbound(
        self,
        tpp: PodProxy,
        hp: HttpPort,
        peer_principal: str | None,
        peer_pod: Pod | None,
        src_ip: str,
        pipe: Pipe,
        relay: Relay,
    ) -> None:
        """Serve one connection that reached ``tpp``'s HTTP port request by request:
        each passes the workload's policies, then goes to the app."""
        principal = self._identity_of(tpp.pod)

        async def connect(ep: Endpoint, up: Pipe) -> tuple[str, str]:
            await self._connect_plain(tpp, ep, up)
            return f"{ep.ip}:{ep.port}", principal

        ds = Downstream(
            pod=tpp.pod,
            source_principal=peer_principal or "unknown",
            source_ip=src_ip,
            service=hp.service,
            port=hp.port,
            connect=connect,
            meta=relay.meta,
            inbound=Inbound(
                peer_pod=peer_pod,
                cluster=hp.cluster,
                admit=self.admission.admit,
                principal=principal if self.identity is not None else "unknown",
            ),
        )
        relay.meta["direction"] = "inbound-http"
        relay.meta["upstream"] = "per request"
        if relay.client is None:
            relay.client = pipe.transport
        await self._serve_http(ds, pipe, relay, hp.protocol)

    def _index(self, snap: MeshSnapshot) -> _IdentityIndex:
        """Identity lookups for ``snap``, built once per snapshot, not per connection."""
        return self._identities.get(snap)

    def _hbone_peer(self, snap: MeshSnapshot, dst: Pod) -> str:
        """The address to tunnel to for ``dst``: one pod per (node, identity), so tunnels
        are pooled per (source identity, destination identity, destination node)."""
        peer = self._index(snap).tunnel_peer.get((dst.node_name, self._identity_of(dst)))
        return peer or dst.pod_ip or ""

    async def _tunnel(
        self,
        pp: PodProxy,
        relay: Relay,
        snap: MeshSnapshot,
        dst: Pod,
        addr: tuple[str, int],
        service_host: str,
    ) -> None:
        relay.meta["labels"] = _labels(
            "source",
            pp.pod,
            dst,
            service_host,
            src_principal=self._identity_of(pp.pod),
            dst_principal=self._identity_of(dst),
        )
        client_ip = str(relay.meta.get("source", "")).rsplit(":", 1)[0]
        try:
            relay.meta["upstream"], _ = await self._open_tunnel(
                pp, snap, dst, addr, client_ip, UpstreamSide(relay)
            )
        except PeerError as e:
            if not relay.closed:
                self._refuse(relay, "outbound", "UF", str(e))
            return
        if relay.closed:
            return
        relay.meta["counted"] = True
        self.table.counted(relay)

    async def _open_tunnel(
        self,
        pp: PodProxy,
        snap: MeshSnapshot,
        dst: Pod,
        addr: tuple[str, int],
        client_ip: str,
        protocol: asyncio.BaseProtocol,
    ) -> tuple[str, str]:
        """An HBONE stream from ``pp`` to ``addr`` (a port of ``dst``) wired to
        ``protocol``: (a description of the path, the destination's identity). Raises
        ``PeerError`` (``ConnectRefusedError`` when the destination answered non-200)."""
        pool = pp.pool
        if pool is None:
            raise PeerError(f"pod {pp.pod.key} has no HBONE pool yet")
        dst_id = self._identity_of(dst)
        peer = (self._hbone_peer(snap, dst), HBONE_PORT)
        await pool.open_stream(
            source_identity=self._identity_of(pp.pod),
            expected_identity=dst_id,
            peer=peer,
            authority=f"{addr[0]}:{addr[1]}",
            headers={
                "forwarded": f"for={client_ip}",
                "baggage": f"k8s.namespace.name={pp.pod.namespace},k8s.pod.name={pp.pod.name}",
            },
            protocol=protocol,
        )
        return f"hbone {peer[0]}:{peer[1]} -> {addr[0]}:{addr[1]}", dst_id

    async def _on_hbone(
        self, pp: PodProxy, req: ConnectRequest
    ) -> asyncio.BaseProtocol | ConnectRefusal:
        """A CONNECT arrived on ``pp``'s 15008: check the target, dial it, wire a relay."""
        snap = self.snapshot()
        ip, port = req.destination
        target = snap.pod_by_ip.get(ip)
        me = self._identity_of(pp.pod)
        if target is None or target.key not in self.pods or self._identity_of(target) != me:
            self.metrics.failures.labels(direction="inbound", response_flags="NR").inc()
            reason = f"{req.authority} is not a pod running as {me} on node {self.node}"
            log.warning("HBONE from %s refused: %s", req.peer_identity, reason)
            return ConnectRefusal(400, reason)
        src_ip = _forwarded_for(req.headers) or req.peer_addr[0]
        tpp = self.pods[target.key]
        hp = self.admission.l7_port(snap, target, port)
        if hp is not None:  # authorized request by request
            if tpp.ns is None:
                return ConnectRefusal(503, f"pod {target.key} is not captured")
            rate = self.admission.connection_rate(snap, target, port)
            if not rate.allowed:
                why = f"local_rate_limited: tcp limit of {rate.policy}"
                self._denied(req.peer_identity, src_ip, target, port, "RL", why, rate.policy)
                return ConnectRefusal(429, why)
            pipe = Pipe()
            relay = self.table.open(
                {
                    "pod": target.key,
                    "source": f"{req.peer_addr[0]}:{req.peer_addr[1]}",
                    "destination": req.authority,
                    "peer": req.peer_identity,
                }
            )
            peer_pod = self._index(snap).pod_by_identity.get(req.peer_identity)
            self._spawn(
                self._serve_inbound(tpp, hp, req.peer_identity, peer_pod, src_ip, pipe, relay)
            )
            return pipe
        authz_req = AuthzRequest(
            destination=target,
            destination_port=port,
            source_principal=req.peer_identity,
            source_ip=src_ip,
            destination_ip=ip,
        )
        adm = self.admission.admit_connection(snap, target, port, req.peer_identity, src_ip)
        if not adm.allowed:
            self._denied(
                req.peer_identity, src_ip, target, port, adm.flag, adm.reason, *adm.deciding()
            )
            return ConnectRefusal(adm.status, adm.reason)
        ns = tpp.ns
        if ns is None:
            return ConnectRefusal(503, f"pod {target.key} is not captured")
        try:
            sock = await connect_in(ns, (ip, port), self.connect_timeout)
        except PeerError as e:
            self.metrics.failures.labels(direction="inbound", response_flags="UF").inc()
            log.warning("inbound HBONE %s -> %s failed: %s", req.peer_identity, req.authority, e)
            return ConnectRefusal(503, str(e))
        src_pod = self._index(snap).pod_by_identity.get(req.peer_identity)
        relay = self.table.open(
            {
                "direction": "inbound",
                "pod": target.key,
                "source": f"{req.peer_addr[0]}:{req.peer_addr[1]}",
                "destination": req.authority,
                "upstream": req.authority,
                "peer": req.peer_identity,
                "authz": authz_req,
                "labels": _labels(
                    "destination",
                    src_pod,
                    target,
                    "",
                    src_principal=req.peer_identity,
                    dst_principal=me,
                ),
            }
        )

        def attach(side: ClientSide) -> None:
            async def go() -> None:
                try:
                    await self._wire_upstream(relay, sock)
                except OSError as e:
                    relay.abort(f"upstream {req.authority}: {e}")

            self._spawn(go())

        return ClientSide(relay, attach)

    async def _on_inbound(self, pp: PodProxy, side: ClientSide) -> None:
        relay = side.relay
        dst = self._captured_destination(
            side, "inbound", own_ports=(iptables.INBOUND_PORT, iptables.OUTBOUND_PORT)
        )
        if dst is None:
            return
        peer = side.transport.get_extra_info("peername") if side.transport else None
        snap = self.snapshot()
        if self.identity is not None:
            mtls = effective_mtls(snap, pp.pod, dst[1])
            if not mtls.accepts_plaintext:
                self._refuse(
                    relay,
                    "inbound",
                    "MTLS_REQUIRED",
                    f"plaintext to {pp.pod.key} port {dst[1]} refused: PeerAuthentication "
                    f"{mtls.policy} requires mTLS (STRICT)",
                )
                return
        hp = self.admission.l7_port(snap, pp.pod, dst[1])
        if hp is not None and side.transport is not None:  # authorized request by request
            rate = self.admission.connection_rate(snap, pp.pod, dst[1])
            if not rate.allowed:
                why = f"local_rate_limited: tcp limit of {rate.policy}"
                self._denied(None, peer[0] if peer else "?", pp.pod, dst[1], "RL", why, rate.policy)
                relay.close(why)
                return
            pipe = Pipe()
            pending, relay.pending = relay.pending, []
            pipe.adopt(side.transport, pending)
            relay.client = side.transport
            src_ip = peer[0] if peer else ""
            await self._serve_inbound(pp, hp, None, snap.pod_by_ip.get(src_ip), src_ip, pipe, relay)
            return
        authz_req = AuthzRequest(
            destination=pp.pod,
            destination_port=dst[1],
            source_ip=peer[0] if peer else "",
            destination_ip=dst[0],
        )
        relay.meta["authz"] = authz_req
        adm = self.admission.admit_connection(snap, pp.pod, dst[1], None, authz_req.source_ip)
        if not adm.allowed:
            self._denied(
                None,
                peer[0] if peer else "?",
                pp.pod,
                dst[1],
                adm.flag,
                adm.reason,
                *adm.deciding(),
            )
            relay.close(adm.reason)
            return
        src_pod = snap.pod_by_ip.get(peer[0]) if peer else None
        relay.meta["peer"] = src_pod.key if src_pod else ""
        relay.meta["labels"] = _labels("destination", src_pod, pp.pod, "")
        await self._dial(pp, relay, dst, "inbound")

    def recheck(self, snap: MeshSnapshot) -> int:
        """After a config change: close the live inbound connections the
        AuthorizationPolicies of ``snap`` now deny (others continue): connections
        authorized once (L4), and those served request by request whose request in flight
        (a long download, a stream, a WebSocket) is now denied. Returns how many."""
        closed = 0
        for relay in list(self.table.live.values()):
            if relay.closed:
                continue
            inflight = relay.meta.get("inflight")
            if inflight:
                for r in list(inflight.values()):
                    target = snap.pod_by_key.get(r.destination.key)
                    if target is None:
                        continue
                    d = authz.evaluate(snap, dataclasses.replace(r, destination=target))
                    if not d.allowed:
                        self._denied(
                            r.source_principal,
                            r.source_ip,
                            target,
                            r.destination_port,
                            "RBAC",
                            f"{d.reason} (policy changed: {r.method} {r.path} in flight closed)",
                            d.policy,
                            d.rule_index,
                        )
                        relay.abort(f"RBAC: {d.reason}")
                        closed += 1
                        break
                continue
            req = relay.meta.get("authz")
            if not isinstance(req, AuthzRequest):
                continue
            target = snap.pod_by_key.get(req.destination.key)
            if target is None:
                continue
            if target is not req.destination:
                req = dataclasses.replace(req, destination=target)
                relay.meta["authz"] = req
            decision = authz.evaluate(snap, req)
            if not decision.allowed:
                self._denied(
                    req.source_principal,
                    req.source_ip,
                    target,
                    req.destination_port,
                    "RBAC",
                    f"{decision.reason} (policy changed: live connection closed)",
                    decision.policy,
                    decision.rule_index,
                )
                relay.abort(f"RBAC: {decision.reason}")
                closed += 1
        return closed

    def _denied(
        self,
        principal: str | None,
        src_ip: str,
        target: Pod,
        port: int,
        flag: str,
        reason: str,
        policy: str = "",
        rule: int | None = None,
    ) -> None:
        """A policy (``flag`` RBAC: authorization, RL: a connection rate limit) refused a
        connection: count it, log it, and write it to the access log (``protocol`` TCP,
        the deciding ``policy`` and ``rule``); the caller closes it before any byte
        reaches the app."""
        self.metrics.failures.labels(direction="inbound", response_flags=flag).inc()
        snap = self.snapshot()
        src = self._index(snap).pod_by_identity.get(principal or "") or snap.pod_by_ip.get(src_ip)
        rec = AccessRecord(
            start_time=rfc3339(time.time()),
            source_workload=src.name if src else "unknown",
            source_namespace=src.namespace if src else "unknown",
            source_principal=principal or "unknown",
            destination_service="-",
            destination_workload=target.name,
            destination_namespace=target.namespace,
            destination_principal=self._identity_of(target),
            method="-",
            authority=f"{target.pod_ip}:{port}",
            path="-",
            protocol="TCP",
            response_code=0,
            response_flags=flag,
            bytes_received=0,
            bytes_sent=0,
            duration_ms=0.0,
            upstream_host="-",
            upstream_cluster=f"inbound|{port}||",
            route_name="-",
            attempts=0,
            trace_id="",
            request_id="",
            user_agent="",
            reporter="destination",
            detail=reason,
        )
        if policy:
            rec["authz_policy"] = policy
            if rule is not None:
                rec["authz_rule"] = rule
        self.access_log.write(rec)
        log.warning(
            "connection refused by policy: %s (%s) -> %s port %d: %s",
            principal or "plaintext",
            src_ip,
            target.key,
            port,
            reason,
        )

    # -- shutdown --------------------------------------------------------------------
    def stop_accepting(self) -> None:
        self.accepting = False
        for pp in self.pods.values():
            for s in pp.servers:
                s.close()

    async def drain(self, seconds: float) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + seconds
        while self.table.live and loop.time() < deadline:
            await asyncio.sleep(0.1)
        for relay in list(self.table.live.values()):
            relay.abort("agent shutting down")

    async def close(self) -> None:
        self.admission.close()
        self.l7.close()
        self.h2pool.close()
        for pp in self.pods.values():
            pp.close()
        self.pods.clear()
        self.access_log.flush()


__all__ = ["LocalStateError", "PodProxy", "Proxy"]


def _exclusions(pod: Pod) -> tuple[frozenset[int], frozenset[int]]:
    """(outbound, inbound) ports a pod's annotations leave out of capture."""
    return pod.excluded_ports("Outbound"), pod.excluded_ports("Inbound")
