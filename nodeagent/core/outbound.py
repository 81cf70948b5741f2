"""Outbound decisions: a dialled address becomes the whole plan of a connection.

``plan`` maps (source pod, original destination) to exactly one of ``Refuse``,
``Passthrough``, ``Tcp``, ``Dns``, ``Hbone``, ``Http1`` or ``Http2``, each carrying all
the proxy needs to do it (endpoint, service, destination host); the proxy then dispatches
on the plan's type and decides nothing more, as ztunnel's outbound builds its request
first. ServiceEntry hosts are services here (``Service.kind``): MESH_INTERNAL endpoints
with an identity go through HBONE, others plain TCP; a DNS entry's host is dialled by
name (``Dns``); a NONE entry without endpoints passes through to the address dialled.
With MeshConfig ``outboundTrafficPolicy: REGISTRY_ONLY`` an address in no Service,
ServiceEntry or workload is refused (``BLACKHOLE``), else passed through.
``tunnels`` is the mTLS choice per endpoint, which the L7 path also makes per request
and ``nodeagent ctl explain`` shows. ``Planner`` is ``plan`` for the data path: what the
snapshot alone decides of a connection is remembered until the snapshot changes.

Pure: no I/O and no clock; the state the choices draw on (round robin counters, the load
balancers of ``Clusters``, a random source) is passed in.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import NamedTuple

from nodeagent.core.clusters import ClusterError, Clusters, fqdn, port_protocol
from nodeagent.core.peerauth import effective_mtls
from nodeagent.core.route import pick_weighted, select_tcp_route
from nodeagent.model.objects import Pod, Service, ServicePort
from nodeagent.model.security import MtlsMode
from nodeagent.model.snapshot import Endpoint, MeshSnapshot, PerSnapshot
from nodeagent.model.traffic import Destination, TCPRoute


class RoundRobin:
    """Round robin per (service, port), stable across snapshots."""

    def __init__(self) -> None:
        self._counters: dict[tuple[str, int], itertools.count[int]] = {}

    def pick(self, key: tuple[str, int], endpoints: tuple[Endpoint, ...]) -> Endpoint:
        return endpoints[self.index(key, len(endpoints))]

    def index(self, key: tuple[str, int], n: int) -> int:
        """The position of the next of ``n`` endpoints for ``key``."""
        c = self._counters.get(key)
        if c is None:
            c = self._counters[key] = itertools.count()
        return next(c) % n


# -- the plan -----------------------------------------------------------------------------
# NamedTuples (cheap to build, one per connection); a plan is told apart by its type only
# (two variants with equal fields compare equal as tuples).


class Refuse(NamedTuple):
    """Close the connection before any byte leaves: ``flag`` (``NR`` no route, ``UH`` no
    healthy upstream, ``NC`` no cluster) and a reason a person can act on."""

    flag: str
    reason: str


class Passthrough(NamedTuple):
    """Not a mesh address: connect to the original destination as dialled."""


class Tcp(NamedTuple):
    """Plain TCP to ``endpoint`` (no identities, or mTLS is DISABLE for it)."""

    endpoint: Endpoint
    service: Service | None
    """The service dialled (None: a pod IP was)."""
    service_host: str
    """The destination host for metrics: the service's, or the cluster's a route chose."""


class Dns(NamedTuple):
    """Plain TCP to a DNS ServiceEntry's host name, resolved by the proxy when it connects
    (``Endpoint.ip`` is the name, ``Endpoint.port`` the port)."""

    endpoint: Endpoint
    service: Service
    service_host: str


class Hbone(NamedTuple):
    """An HBONE (mutual TLS) stream to ``endpoint``."""

    endpoint: Endpoint
    service: Service | None
    service_host: str


class Http1(NamedTuple):
    """An HTTP/1 service port: requests are routed one by one by the L7 path."""

    endpoint: Endpoint
    """The service's round-robin endpoint, shown as the peer until requests are routed."""
    service: Service
    port: ServicePort


class Http2(NamedTuple):
    """An HTTP/2 (gRPC, h2c) service port: streams are routed one by one."""

    endpoint: Endpoint
    service: Service
    port: ServicePort


OutboundPlan = Refuse | Passthrough | Tcp | Dns | Hbone | Http1 | Http2

PASSTHROUGH = Passthrough()
BLACKHOLE = "BlackHoleCluster"
"""Envoy's cluster for what REGISTRY_ONLY refuses; the refusal's flag is ``NR``."""


def is_name(ep: Endpoint) -> bool:
    """Whether ``ep`` is a host name the proxy must resolve (a DNS ServiceEntry's), not
    an address."""
    ip = ep.ip
    return ":" not in ip and not ip.replace(".", "").isdigit()


def blackhole(dst_ip: str, dst_port: int) -> Refuse:
    return Refuse(
        "NR",
        f"{BLACKHOLE}: {dst_ip}:{dst_port} is not in the mesh registry (no Service, "
        "ServiceEntry or workload has that address) and the mesh's outboundTrafficPolicy "
        "is REGISTRY_ONLY (add a ServiceEntry for it)",
    )


def tunnels(snap: MeshSnapshot, ep: Endpoint, mtls: bool) -> bool:
    """Whether a connection to ``ep`` goes through HBONE: the agent holds identities
    (``mtls``) and the destination's PeerAuthentication does not DISABLE mTLS."""
    if not mtls or not ep.pod.in_mesh:
        return False
    return effective_mtls(snap, ep.pod, ep.port).mode is not MtlsMode.DISABLE


def plan(
    snap: MeshSnapshot,
    source: Pod,
    dst_ip: str,
    dst_port: int,
    *,
    rr: RoundRobin,
    clusters: Clusters,
    random: Callable[[], float],
    mtls: bool,
) -> OutboundPlan:
    """The plan for a connection from ``source`` to ``dst_ip:dst_port``: where it goes
    and how. ``random`` draws a VirtualService ``tcp[]`` weighted pick; ``mtls``: the
    agent holds identities (else every mesh connection is plain TCP)."""
    staged = _stage(snap, source, dst_ip, dst_port, mtls)
    if isinstance(staged, Spread):
        return staged.pick(snap, source, rr, clusters, random)
    return staged


class Spread:
    """A connection to a service port with ready endpoints, decided as far as the
    snapshot alone decides it: what is left per connection is the endpoint (round robin,
    or the ``tcp[]`` route's weighted pick and its cluster's load balancer)."""

    __slots__ = ("endpoints", "host", "key", "mtls", "plans", "port", "proto", "route", "service")

    def __init__(
        self,
        service: Service,
        port: ServicePort,
        endpoints: tuple[Endpoint, ...],
        proto: str | None,
        host: str,
        route: TCPRoute | Destination | None,
        mtls: bool,
    ) -> None:
        self.service = service
        self.port = port
        self.key = (service.key, port.port)
        self.endpoints = endpoints
        self.proto = proto
        self.host = host
        """The destination host for metrics (the service's)."""
        self.route = route
        """The ``tcp[]`` rule that applies, or the host itself when only a
        DestinationRule does (its load balancer picks), or None (round robin)."""
        self.mtls = mtls
        self.plans: list[OutboundPlan | None] = [None] * len(endpoints)
        """The plan of each round-robin endpoint, made on its first pick."""

    def pick(
        self,
        snap: MeshSnapshot,
        source: Pod,
        rr: RoundRobin,
        clusters: Clusters,
        random: Callable[[], float],
    ) -> OutboundPlan:
        """This connection's plan (``snap`` is the one this was staged from)."""
        i = rr.index(self.key, len(self.endpoints))  # a route's pick moves it on too
        route = self.route
        if route is None:
            made = self.plans[i]
            if made is None:
                made = self.plans[i] = self._to(snap, self.endpoints[i], self.host)
            return made
        try:
            ep, host = _tcp_route(
                snap, source, self.service, self.port.port, route, clusters, random
            )
        except ClusterError as e:
            return Refuse("NC", str(e))
        return self._to(snap, ep, host)

    def _to(self, snap: MeshSnapshot, ep: Endpoint, service_host: str) -> OutboundPlan:
        svc = self.service
        if self.proto == "h2":
            return Http2(ep, svc, self.port)
        if self.proto is not None:
            return Http1(ep, svc, self.port)
        if tunnels(snap, ep, self.mtls):
            return Hbone(ep, svc, service_host)
        if svc.is_entry and is_name(ep):
            return Dns(ep, svc, service_host)
        return Tcp(ep, svc, service_host)


Staged = Refuse | Passthrough | Tcp | Hbone | Spread
"""What the snapshot alone decides of a connection: its whole plan, or all but its
endpoint."""


def _stage(snap: MeshSnapshot, source: Pod, dst_ip: str, dst_port: int, mtls: bool) -> Staged:
    svc = snap.service_for_address(dst_ip)
    if svc is None:
        pod = snap.pod_by_ip.get(dst_ip)
        if pod is None:
            return blackhole(dst_ip, dst_port) if snap.registry_only else PASSTHROUGH
        ep = Endpoint(pod=pod, ip=dst_ip, port=dst_port)
        return Hbone(ep, None, "") if tunnels(snap, ep, mtls) else Tcp(ep, None, "")
    sp = svc.port(dst_port)
    if sp is None:
        ports = ", ".join(str(p.port) for p in svc.ports)
        return Refuse("NR", f"service {svc.key} has no port {dst_port} (its ports: {ports})")
    eps = snap.endpoints(svc, sp)
    if not eps and svc.is_entry:
        return _entry_without_endpoints(svc, sp)
    if not eps:
        return Refuse(
            "UH",
            f"service {svc.key} port {dst_port} has no ready endpoints: no Pod matching "
            f"{svc.selector or '(no selector)'} has an IP and port {sp.target_port} "
            "(is it scheduled and running?)",
        )
    proto = port_protocol(sp)
    host = fqdn(svc)
    route: TCPRoute | Destination | None = None
    if proto is None:  # a VirtualService tcp[] rule, else a DestinationRule's load balancer
        route = select_tcp_route(snap, host, sp.port, source.labels)
        if route is None and host in snap.destination_rule_by_host:
            route = Destination(host)
    return Spread(svc, sp, eps, proto, host, route, mtls)


class Planner:
    """``plan`` for one agent's outbound connections, with what the snapshot alone
    decides (``Staged``) remembered per (destination, port, source pod) until the
    snapshot changes: a connection then costs a dictionary hit and its endpoint's pick."""

    def __init__(
        self,
        *,
        clusters: Clusters,
        random: Callable[[], float],
        mtls: bool,
        kept: int = 4096,
    ) -> None:
        self.rr = RoundRobin()
        self.clusters = clusters
        self.random = random
        self.mtls = mtls
        self.kept = kept
        """Entries kept at most (past it, all are dropped: a scan of many addresses)."""
        self._staged: PerSnapshot[dict[tuple[str, int, int], tuple[Staged, Pod]]]
        self._staged = PerSnapshot(lambda snap: {})

    def plan(self, snap: MeshSnapshot, source: Pod, dst_ip: str, dst_port: int) -> OutboundPlan:
        known = self._staged.get(snap)
        key = (dst_ip, dst_port, id(source))
        hit = known.get(key)
        if hit is None:
            if len(known) >= self.kept:
                known.clear()
            # the entry holds the source pod: its id in the key stays its own
            hit = known[key] = (_stage(snap, source, dst_ip, dst_port, self.mtls), source)
        staged = hit[0]
        if isinstance(staged, Spread):
            return staged.pick(snap, source, self.rr, self.clusters, self.random)
        return staged

    def remembered(self, snap: MeshSnapshot) -> int:
        """Destinations remembered for ``snap``."""
        return len(self._staged.get(snap))


def _entry_without_endpoints(svc: Service, sp: ServicePort) -> Refuse | Passthrough:
    """A ServiceEntry host with no endpoint: resolution NONE passes through to the
    address dialled (it is in the registry); STATIC, or a selector matching nothing,
    has no upstream."""
    if svc.resolution == "NONE" and not svc.selector:
        return PASSTHROUGH
    why = (
        f"its workloadSelector {svc.selector} matches no workload with an address"
        if svc.selector
        else "it lists no endpoints"
    )
    return Refuse(
        "UH", f"ServiceEntry {svc.namespace}/{svc.entry} host {svc.name} port {sp.port}: {why}"
    )


def _tcp_route(
    snap: MeshSnapshot,
    src: Pod,
    svc: Service,
    port: int,
    route: TCPRoute | Destination,
    clusters: Clusters,
    random: Callable[[], float],
) -> tuple[Endpoint, str]:
    """For a TCP service port with a VirtualService ``tcp[]`` rule or a DestinationRule
    (``route``: the rule, or the host itself): the endpoint its weighted route and load
    balancer choose, and the destination host. Raises ``ClusterError``."""
    if isinstance(route, Destination):
        dest = route
    else:
        rd = pick_weighted(route.routes, random())
        dest = rd.destination if rd is not None else Destination(fqdn(svc))
    cluster = clusters.cluster(snap, dest, port)
    ep = clusters.balancer(cluster, src).pick(None)
    if ep is None:
        raise ClusterError(f"no endpoint of {cluster.name} is ready")
    return ep, cluster.host
