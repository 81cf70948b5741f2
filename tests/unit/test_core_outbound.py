"""Outbound resolution: service → endpoints (round robin), pod IPs, pass-through, refusals."""

from __future__ import annotations

from collections import Counter

from nodeagent.core.outbound import Action, RoundRobin, resolve
from nodeagent.model import Container, Labels, MeshSnapshot, Pod, Service, ServicePort


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


def test_round_robin_over_ready_endpoints_with_named_target_port() -> None:
    s = snap(pod("a", "10.244.1.2"), pod("b", "10.244.1.3"), pod("c", None))
    rr = RoundRobin()
    picks = Counter()
    for _ in range(10):
        d = resolve(s, None, "10.96.0.1", 80, rr)
        assert d.action is Action.MESH and d.endpoint is not None
        assert d.endpoint.port == 8080
        picks[d.endpoint.ip] += 1
    assert picks == {"10.244.1.2": 5, "10.244.1.3": 5}


def test_no_ready_endpoint_is_refused_with_a_reason() -> None:
    d = resolve(snap(pod("c", None)), None, "10.96.0.1", 80, RoundRobin())
    assert d.action is Action.REFUSE and d.flag == "UH"
    assert "no ready endpoints" in d.reason and "app=web" in d.reason


def test_unknown_service_port_is_no_route() -> None:
    d = resolve(snap(pod("a", "10.244.1.2")), None, "10.96.0.1", 81, RoundRobin())
    assert d.action is Action.REFUSE and d.flag == "NR" and "no port 81" in d.reason


def test_pod_ip_goes_straight_to_that_pod() -> None:
    d = resolve(snap(pod("a", "10.244.1.2")), None, "10.244.1.2", 9999, RoundRobin())
    assert d.action is Action.MESH and d.endpoint is not None
    assert (d.endpoint.ip, d.endpoint.port, d.endpoint.pod.name) == ("10.244.1.2", 9999, "a")


def test_other_addresses_pass_through() -> None:
    d = resolve(snap(pod("a", "10.244.1.2")), None, "192.0.2.7", 443, RoundRobin())
    assert d.action is Action.PASSTHROUGH
