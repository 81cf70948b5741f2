"""The outbound plan: service → endpoints (round robin), pod IPs, pass-through, refusals,
L7 by port protocol, plain TCP or HBONE, TCP routes."""

from __future__ import annotations

import random
from collections import Counter

from nodeagent.core.balancer import BalancerRegistry
from nodeagent.core.clusters import Clusters
from nodeagent.core.outbound import (
    Hbone,
    Http1,
    Http2,
    OutboundPlan,
    Passthrough,
    Planner,
    Refuse,
    RoundRobin,
    Tcp,
    plan,
    tunnels,
)
from nodeagent.model import Container, Labels, MeshSnapshot, Pod, Service, ServicePort
from nodeagent.model.security import MtlsMode, PeerAuthentication
from nodeagent.model.snapshot import Endpoint
from nodeagent.model.traffic import Destination, RouteDestination, TCPRoute, VirtualService


def pod(name: str, ip: str | None, app: str = "web", port: int = 8080) -> Pod:
    return Pod(
        namespace="default",
        name=name,
        node_name="node1",
        labels=Labels.of({"app": app}),
        containers=(Container(name="c", ports=(("http", port),)),),
        pod_ip=ip,
    )


SVC = Service(
    namespace="default",
    name="web",
    ports=(ServicePort(port=80, target_port="http"),),
    selector=Labels.of({"app": "web"}),
    cluster_ip="10.96.0.1",
)


def snap(*pods: Pod) -> MeshSnapshot:
    return MeshSnapshot.build(version=1, pods=pods, services=(SVC,))


def planned(s: MeshSnapshot, ip: str, port: int, rr: RoundRobin | None = None) -> OutboundPlan:
    """The plan of a connection from ``CLIENT``, without identities (plain TCP)."""
    clusters = Clusters(BalancerRegistry(lambda: 0.0, random.Random(1)))
    rr = rr or RoundRobin()
    return plan(s, CLIENT, ip, port, rr=rr, clusters=clusters, random=random.random, mtls=False)


def test_round_robin_over_ready_endpoints_with_named_target_port() -> None:
    s = snap(pod("a", "10.244.1.2"), pod("b", "10.244.1.3"), pod("c", None))
    rr = RoundRobin()
    picks = Counter()
    for _ in range(10):
        d = planned(s, "10.96.0.1", 80, rr)
        assert isinstance(d, Tcp)
        assert d.endpoint.port == 8080
        picks[d.endpoint.ip] += 1
    assert picks == {"10.244.1.2": 5, "10.244.1.3": 5}


def test_no_ready_endpoint_is_refused_with_a_reason() -> None:
    d = planned(snap(pod("c", None)), "10.96.0.1", 80)
    assert isinstance(d, Refuse) and d.flag == "UH"
    assert "no ready endpoints" in d.reason and "app=web" in d.reason


def test_unknown_service_port_is_no_route() -> None:
    d = planned(snap(pod("a", "10.244.1.2")), "10.96.0.1", 81)
    assert isinstance(d, Refuse) and d.flag == "NR" and "no port 81" in d.reason


def test_pod_ip_goes_straight_to_that_pod() -> None:
    d = planned(snap(pod("a", "10.244.1.2")), "10.244.1.2", 9999)
    assert isinstance(d, Tcp) and d.service is None
    assert (d.endpoint.ip, d.endpoint.port, d.endpoint.pod.name) == ("10.244.1.2", 9999, "a")


def test_other_addresses_pass_through() -> None:
    d = planned(snap(pod("a", "10.244.1.2")), "192.0.2.7", 443)
    assert isinstance(d, Passthrough)


# -- plan: the whole decision, one variant per way a connection goes --------------------

HTTP = ServicePort(port=80, target_port="http", name="http")
GRPC = ServicePort(port=50051, target_port=50051, name="api", app_protocol="grpc")
TCP = ServicePort(port=5432, target_port=8080, name="db")
MIXED = Service(
    namespace="default",
    name="web",
    ports=(HTTP, GRPC, TCP),
    selector=Labels.of({"app": "web"}),
    cluster_ip="10.96.0.1",
)
OTHER = Service(
    namespace="default",
    name="other",
    ports=(ServicePort(port=5432, target_port=8080),),
    selector=Labels.of({"app": "other"}),
    cluster_ip="10.96.0.2",
)
CLIENT = pod("client", "10.244.9.9", app="client")


def mesh(**objects: object) -> MeshSnapshot:
    pods = (pod("a", "10.244.1.2"), pod("o", "10.244.1.3", app="other"), CLIENT)
    return MeshSnapshot.build(version=1, pods=pods, services=(MIXED, OTHER), **objects)


def plan_for(
    s: MeshSnapshot, ip: str, port: int, *, mtls: bool = False, rnd: float = 0.5
) -> OutboundPlan:
    clusters = Clusters(BalancerRegistry(lambda: 0.0, random.Random(1)))
    return plan(
        s, CLIENT, ip, port, rr=RoundRobin(), clusters=clusters, random=lambda: rnd, mtls=mtls
    )


def test_plan_http_ports_go_to_the_l7_path_by_protocol() -> None:
    s = mesh()
    h1 = plan_for(s, "10.96.0.1", 80, mtls=True)
    assert isinstance(h1, Http1) and (h1.service, h1.port) == (MIXED, HTTP)
    assert h1.endpoint.ip == "10.244.1.2"
    h2 = plan_for(s, "10.96.0.1", 50051)
    assert isinstance(h2, Http2) and h2.port == GRPC


def test_plan_tcp_is_plain_without_identities_and_hbone_with_them() -> None:
    s = mesh()
    plain = plan_for(s, "10.96.0.1", 5432)
    assert isinstance(plain, Tcp)
    assert (plain.endpoint.ip, plain.endpoint.port) == ("10.244.1.2", 8080)
    assert plain.service_host == "web.default.svc.cluster.local"
    tunnel = plan_for(s, "10.96.0.1", 5432, mtls=True)
    assert isinstance(tunnel, Hbone) and tunnel.service_host == plain.service_host


def test_plan_peer_authentication_disable_keeps_it_plain() -> None:
    off = PeerAuthentication(namespace="default", name="off", mode=MtlsMode.DISABLE)
    s = mesh(peer_authentications=(off,))
    assert isinstance(plan_for(s, "10.96.0.1", 5432, mtls=True), Tcp)
    assert not tunnels(s, Endpoint(pod=s.pod_by_key["default/a"], ip="10.244.1.2", port=8080), True)


def test_a_pod_opted_out_of_the_mesh_is_reached_in_plain_tcp() -> None:
    out = Pod(
        namespace="default",
        name="legacy",
        node_name="node1",
        labels=Labels.of({"app": "web", "istio.io/dataplane-mode": "none"}),
        containers=(Container(name="c", ports=(("http", 8080),)),),
        pod_ip="10.244.1.9",
    )
    s = snap(out)
    assert not out.in_mesh and pod("a", "10.244.1.2").in_mesh
    assert not tunnels(s, Endpoint(pod=out, ip="10.244.1.9", port=8080), True)
    clusters = Clusters(BalancerRegistry(lambda: 0.0, random.Random(1)))
    p = plan(s, CLIENT, "10.96.0.1", 80, rr=RoundRobin(), clusters=clusters,
             random=random.random, mtls=True)  # fmt: skip
    assert isinstance(p, Tcp) and p.endpoint.ip == "10.244.1.9"


def test_plan_a_pod_ip_has_no_service_host() -> None:
    p = plan_for(mesh(), "10.244.1.2", 9999, mtls=True)
    assert isinstance(p, Hbone) and p.service is None and p.service_host == ""


def test_plan_refusals_and_passthrough() -> None:
    s = mesh()
    nr = plan_for(s, "10.96.0.1", 81)
    assert isinstance(nr, Refuse) and nr.flag == "NR" and "no port 81" in nr.reason
    assert isinstance(plan_for(s, "192.0.2.7", 443), Passthrough)


def tcp_vs(*routes: RouteDestination) -> VirtualService:
    host = "web.default.svc.cluster.local"
    return VirtualService("default", "web", (host,), tcp=(TCPRoute(routes=routes),))


def test_plan_follows_a_weighted_tcp_route_to_another_service() -> None:
    vs = tcp_vs(
        RouteDestination(Destination("web.default.svc.cluster.local"), weight=50),
        RouteDestination(Destination("other.default.svc.cluster.local"), weight=50),
    )
    s = mesh(virtual_services=(vs,))
    low = plan_for(s, "10.96.0.1", 5432, rnd=0.1)
    high = plan_for(s, "10.96.0.1", 5432, rnd=0.9)
    assert isinstance(low, Tcp) and low.endpoint.ip == "10.244.1.2"
    assert isinstance(high, Tcp) and high.endpoint.ip == "10.244.1.3"
    assert high.service_host == "other.default.svc.cluster.local" and high.service == MIXED


def test_plan_a_route_to_an_unknown_host_is_no_cluster() -> None:
    s = mesh(virtual_services=(tcp_vs(RouteDestination(Destination("nope.example"))),))
    nc = plan_for(s, "10.96.0.1", 5432)
    assert isinstance(nc, Refuse) and nc.flag == "NC" and "nope.example" in nc.reason


# -- Planner: the data path's plan, what the snapshot alone decides remembered -------------


def planner(*, mtls: bool = False, kept: int = 4096, rnd: float = 0.5) -> Planner:
    clusters = Clusters(BalancerRegistry(lambda: 0.0, random.Random(1)))
    return Planner(clusters=clusters, random=lambda: rnd, mtls=mtls, kept=kept)


def test_planner_decides_every_connection_as_plan_does() -> None:
    vs = tcp_vs(
        RouteDestination(Destination("web.default.svc.cluster.local"), weight=50),
        RouteDestination(Destination("other.default.svc.cluster.local"), weight=50),
    )
    two = (pod("a", "10.244.1.2"), pod("b", "10.244.1.4"), pod("o", "10.244.1.3", app="other"))
    s = MeshSnapshot.build(version=1, pods=(*two, CLIENT), services=(MIXED, OTHER))
    routed = MeshSnapshot.build(
        version=2, pods=(*two, CLIENT), services=(MIXED, OTHER), virtual_services=(vs,)
    )
    draws = [0.1, 0.9, 0.3, 0.7]
    dests = [("10.96.0.1", p) for p in (80, 81, 5432, 50051)] + [
        ("10.96.0.2", 5432),
        ("10.244.1.2", 9999),
        ("192.0.2.7", 443),
    ]
    for snapshot in (s, routed):
        for mtls in (False, True):
            cached = Planner(
                clusters=Clusters(BalancerRegistry(lambda: 0.0, random.Random(1))),
                random=iter(draws * 20).__next__,
                mtls=mtls,
            )
            clusters = Clusters(BalancerRegistry(lambda: 0.0, random.Random(1)))
            rr, rnd = RoundRobin(), iter(draws * 20).__next__
            for _ in range(4):
                for ip, port in dests:
                    want = plan(snapshot, CLIENT, ip, port, rr=rr, clusters=clusters,
                                random=rnd, mtls=mtls)  # fmt: skip
                    got = cached.plan(snapshot, CLIENT, ip, port)
                    assert (type(got), got) == (type(want), want), (ip, port, mtls)


def test_planner_a_new_snapshot_takes_effect_for_the_next_connection() -> None:
    p = planner(mtls=True)
    s1 = mesh()
    assert isinstance(p.plan(s1, CLIENT, "10.96.0.1", 5432), Hbone)
    off = PeerAuthentication(namespace="default", name="off", mode=MtlsMode.DISABLE)
    to_other = tcp_vs(RouteDestination(Destination("other.default.svc.cluster.local")))
    s2 = mesh(peer_authentications=(off,), virtual_services=(to_other,))
    got = p.plan(s2, CLIENT, "10.96.0.1", 5432)
    assert isinstance(got, Tcp) and got.endpoint.ip == "10.244.1.3"
    assert got.service_host == "other.default.svc.cluster.local"
    s3 = MeshSnapshot.build(version=3, pods=(CLIENT,), services=(MIXED, OTHER))
    gone = p.plan(s3, CLIENT, "10.96.0.1", 5432)
    assert isinstance(gone, Refuse) and gone.flag == "UH"


def test_planner_keeps_a_bounded_number_of_destinations() -> None:
    p = planner(kept=3)
    s = mesh()
    for port in range(1000, 1010):
        got = p.plan(s, CLIENT, "10.244.1.2", port)
        assert isinstance(got, Tcp) and got.endpoint.port == port
        assert p.remembered(s) <= 3
    picks = Counter()
    for _ in range(4):
        got = p.plan(s, CLIENT, "10.96.0.1", 5432)
        assert isinstance(got, Tcp)
        picks[got.endpoint.ip] += 1
    assert picks == {"10.244.1.2": 4}
