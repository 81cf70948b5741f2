"""Upstream clusters: which service ports speak HTTP, and what one routed destination
(service host, port, subset) resolves to in a snapshot: its endpoints and its effective
DestinationRule traffic policy, with Istio's cluster name. ``Clusters`` keeps the clusters
of each snapshot and the load balancer of each cluster, for the L4 and L7 paths alike.
"""

from __future__ import annotations

from dataclasses import dataclass

from mypy_extensions import mypyc_attr

from nodeagent.core.balancer import Balancer, BalancerRegistry
from nodeagent.core.route import subset_filter, traffic_policy_for
from nodeagent.model.objects import Pod, Service, ServicePort
from nodeagent.model.snapshot import Endpoint, MeshSnapshot, PerSnapshot
from nodeagent.model.traffic import Destination, TrafficPolicy

UNLIMITED = 2**32 - 1
"""Istio's default for connection-pool limits that are not set."""

HTTP_APP_PROTOCOLS = {
    "http": "http1",
    "http2": "h2",
    "h2c": "h2",
    "kubernetes.io/h2c": "h2",
    "grpc": "h2",
    "grpc-web": "http1",
}
_NAME_PREFIXES = (("http2", "h2"), ("grpc-web", "http1"), ("grpc", "h2"), ("http", "http1"))


def port_protocol(sp: ServicePort) -> str | None:
    """``"http1"``, ``"h2"`` or None (TCP) for a service port: its ``appProtocol``, else
    Istio's port-name convention (``http``, ``http-*``, ``http2-*``, ``grpc-*``)."""
    if sp.app_protocol:
        return HTTP_APP_PROTOCOLS.get(sp.app_protocol.lower())
    name = sp.name.lower()
    for prefix, proto in _NAME_PREFIXES:
        if name == prefix or name.startswith(prefix + "-"):
            return proto
    return None


def fqdn(svc: Service) -> str:
    """``name.namespace.svc.cluster.local``, or a ServiceEntry's host."""
    return svc.fqdn


# -- clusters -----------------------------------------------------------------------------


@dataclass
class Cluster:
    """Where one weighted destination sends requests: a service port (and subset) with
    its endpoints and effective traffic policy. Cached per snapshot."""

    name: str
    """Istio's cluster name: ``outbound|<port>|<subset>|<host>``."""
    host: str
    service: Service
    port: ServicePort
    subset: str | None
    endpoints: tuple[Endpoint, ...]
    policy: TrafficPolicy
    max_connections: int = UNLIMITED
    max_pending: int = UNLIMITED
    connect_timeout: float | None = None
    """``connectionPool.tcp.connectTimeout``; None: the agent's ``--connect-timeout``."""
    max_h2_requests: int = UNLIMITED
    max_requests_per_connection: int = 0
    idle_timeout: float = 3600.0


@mypyc_attr(native_class=False)
class ClusterError(Exception):
    """A route names a host, port or subset that does not exist (503, flag ``NC``)."""


def build_cluster(snap: MeshSnapshot, dest: Destination, request_port: int) -> Cluster:
    svc = snap.service_by_host.get(dest.host)
    if svc is None:
        raise ClusterError(f"route destination {dest.host} is not a known service")
    if dest.port is not None:
        sp = svc.port(dest.port)
    elif len(svc.ports) == 1:
        sp = svc.ports[0]
    else:
        sp = svc.port(request_port)
    if sp is None:
        raise ClusterError(
            f"route destination {dest.host} has no port "
            f"{dest.port if dest.port is not None else request_port}"
        )
    try:
        selector = subset_filter(snap, dest.host, dest.subset)
    except KeyError as e:
        raise ClusterError(str(e.args[0])) from None
    eps = snap.endpoints(svc, sp)
    if selector:
        eps = tuple(e for e in eps if e.pod.labels.matches(selector))
    policy = traffic_policy_for(snap, dest.host, dest.subset, sp.port)
    c = Cluster(
        name=f"outbound|{sp.port}|{dest.subset or ''}|{dest.host}",
        host=dest.host,
        service=svc,
        port=sp,
        subset=dest.subset,
        endpoints=eps,
        policy=policy,
    )
    pool = policy.connection_pool
    if pool is not None:
        c.max_connections = pool.max_connections or UNLIMITED
        c.max_pending = pool.http1_max_pending_requests or UNLIMITED
        c.connect_timeout = pool.connect_timeout
        c.max_h2_requests = pool.http2_max_requests or UNLIMITED
        c.max_requests_per_connection = pool.max_requests_per_connection or 0
        if pool.idle_timeout:
            c.idle_timeout = pool.idle_timeout
    return c


class Clusters:
    """The clusters of each snapshot, built on first use, and the load balancer of each
    cluster (its state, round robin counters and outlier ejections, outlives snapshots)."""

    def __init__(self, balancers: BalancerRegistry) -> None:
        self.balancers = balancers
        self._built: PerSnapshot[dict[tuple[str, str | None, int | None, int], Cluster]]
        self._built = PerSnapshot(lambda snap: {})

    def cluster(self, snap: MeshSnapshot, dest: Destination, request_port: int) -> Cluster:
        """The cluster ``dest`` names for a request to ``request_port``; raises
        ``ClusterError``."""
        built = self._built.get(snap)
        key = (dest.host, dest.subset, dest.port, request_port)
        c = built.get(key)
        if c is None:
            c = built[key] = build_cluster(snap, dest, request_port)
        return c

    def balancer(self, c: Cluster, source: Pod) -> Balancer:
        """The load balancer of ``c`` as seen from ``source`` (locality)."""
        p = c.policy
        return self.balancers.get(c.name, c.endpoints, p.load_balancer, p.outlier_detection, source)
