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
and ``nodeagent ctl explain`` shows.

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
from nodeagent.model.snapshot import Endpoint, MeshSnapshot
from nodeagent.model.traffic import Destination


class RoundRobin:
    """Round robin per (service, port), stable across snapshots."""

    def __init__(self) -> None:
        self._counters: dict[tuple[str, int], itertools.count[int]] = {}

    def pick(self, key: tuple[str, int], endpoints: tuple[Endpoint, ...]) -> Endpoint:
        c = self._counters.get(key)
        if c is None:
            c = self._counters[key] = itertools.count()
        return endpoints[next(c) % len(endpoints)]


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
    ep = rr.pick((svc.key, sp.port), eps)
    proto = port_protocol(sp)
    if proto == "h2":
        return Http2(ep, svc, sp)
    if proto is not None:
        return Http1(ep, svc, sp)
    try:
        routed = _tcp_route(snap, source, svc, sp.port, clusters, random)
    except ClusterError as e:
        return Refuse("NC", str(e))
    service_host = fqdn(svc)
    if routed is not None:
        ep, service_host = routed
    if tunnels(snap, ep, mtls):
        return Hbone(ep, svc, service_host)
    if svc.is_entry and is_name(ep):
        return Dns(ep, svc, service_host)
    return Tcp(ep, svc, service_host)


def _entry_without_endpoints(svc: Service, sp: ServicePort) -> OutboundPlan:
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
    clusters: Clusters,
    random: Callable[[], float],
) -> tuple[Endpoint, str] | None:
    """For a TCP service port with a VirtualService ``tcp[]`` rule or a DestinationRule:
    the endpoint its weighted route and load balancer choose, and the destination host.
    None: neither applies (round robin over the service). Raises ``ClusterError``."""
    host = fqdn(svc)
    rule = select_tcp_route(snap, host, port, src.labels)
    if rule is not None:
        rd = pick_weighted(rule.routes, random())
        dest = rd.destination if rd is not None else Destination(host)
    elif host in snap.destination_rule_by_host:
        dest = Destination(host)
    else:
        return None
    cluster = clusters.cluster(snap, dest, port)
    ep = clusters.balancer(cluster, src).pick(None)
    if ep is None:
        raise ClusterError(f"no endpoint of {cluster.name} is ready")
    return ep, cluster.host
