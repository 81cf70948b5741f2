"""Pure sandbox planning: names, link names, addresses, routes, hosts files."""

from __future__ import annotations

import dataclasses

import pytest

from nodeagent.errors import ConfigErrors
from nodeagent.model.objects import (
    DATAPLANE_MODE_LABEL,
    Container,
    Labels,
    Pod,
    Service,
    ServicePort,
)
from nodeagent.model.snapshot import MeshSnapshot
from nodeagent.sandbox.topology import (
    IFNAMSIZ,
    Route,
    Topology,
    hosts_file,
    is_sandbox_netns,
    node_of_netns,
    plan,
)


def pod(
    name: str,
    node: str,
    ns: str = "default",
    *,
    ip: str | None = None,
    ports: tuple[int, ...] = (),
    command: tuple[str, ...] = ("sleep", "1000"),
    sa: str = "default",
) -> Pod:
    return Pod(
        namespace=ns,
        name=name,
        node_name=node,
        service_account=sa,
        labels=Labels.of({"app": name}),
        containers=(Container(name="c", command=command, ports=tuple(("", p) for p in ports)),),
        pod_ip=ip,
        source="test.yaml",
    )


def svc(name: str, ns: str = "default", cluster_ip: str | None = "10.96.0.10") -> Service:
    return Service(
        namespace=ns,
        name=name,
        ports=(ServicePort(port=80, target_port=8080),),
        selector=Labels.of({"app": name}),
        cluster_ip=cluster_ip,
        source="test.yaml",
    )


def snap(pods: list[Pod], services: list[Service] | None = None) -> MeshSnapshot:
    return MeshSnapshot.build(version=1, pods=tuple(pods), services=tuple(services or []))


def topo(
    pods: list[Pod], services: list[Service] | None = None, dns_proxy: bool = True
) -> Topology:
    return plan(snap(pods, services), dns_proxy=dns_proxy)


@pytest.mark.parametrize(
    ("node_names", "expected"),
    [
        (["node1"], [("node1", 1, "10.250.0.1", "10.244.1.0/24", "10.244.1.1", ())]),
        (
            ["node-b", "node-a"],
            [
                (
                    "node-a",
                    1,
                    "10.250.0.1",
                    "10.244.1.0/24",
                    "10.244.1.1",
                    (Route("10.244.2.0/24", "10.250.0.2"),),
                ),
                (
                    "node-b",
                    2,
                    "10.250.0.2",
                    "10.244.2.0/24",
                    "10.244.2.1",
                    (Route("10.244.1.0/24", "10.250.0.1"),),
                ),
            ],
        ),
        (
            ["c", "a", "b"],
            [
                (
                    "a",
                    1,
                    "10.250.0.1",
                    "10.244.1.0/24",
                    "10.244.1.1",
                    (Route("10.244.2.0/24", "10.250.0.2"), Route("10.244.3.0/24", "10.250.0.3")),
                ),
                (
                    "b",
                    2,
                    "10.250.0.2",
                    "10.244.2.0/24",
                    "10.244.2.1",
                    (Route("10.244.1.0/24", "10.250.0.1"), Route("10.244.3.0/24", "10.250.0.3")),
                ),
                (
                    "c",
                    3,
                    "10.250.0.3",
                    "10.244.3.0/24",
                    "10.244.3.1",
                    (Route("10.244.1.0/24", "10.250.0.1"), Route("10.244.2.0/24", "10.250.0.2")),
                ),
            ],
        ),
    ],
)
def test_nodes_are_indexed_by_sorted_name(
    node_names: list[str], expected: list[tuple[str, int, str, str, str, tuple[Route, ...]]]
) -> None:
    t = topo([pod(f"p-{n}", n) for n in node_names])
    got = [(n.name, n.index, n.ip, n.pod_cidr, n.bridge_ip, n.routes) for n in t.nodes]
    assert got == expected
    for n in t.nodes:
        assert n.netns == f"na-n-{n.name}"
        assert n.fabric_ifname == f"vn{n.index}"
        assert n.cgroup == f"nodeagent/agents/{n.name}"
        assert n.socket == f"/run/nodeagent/{n.name}.sock"
        assert n.log == f"/run/nodeagent/sandbox/logs/agent-{n.name}.log"
        assert n.state_dir == f"/run/nodeagent/sandbox/state/{n.name}"


@pytest.mark.parametrize(
    ("pods", "expected"),
    [
        # (namespace, name) order within a node, addresses from .2
        (
            [pod("b", "n1"), pod("a", "n1"), pod("a", "n1", ns="aaa")],
            {
                "aaa/a": ("10.244.1.2", "vp1-1"),
                "default/a": ("10.244.1.3", "vp1-2"),
                "default/b": ("10.244.1.4", "vp1-3"),
            },
        ),
        # each node numbers its own pods
        (
            [pod("x", "n2"), pod("y", "n1"), pod("z", "n2")],
            {
                "default/y": ("10.244.1.2", "vp1-1"),
                "default/x": ("10.244.2.2", "vp2-1"),
                "default/z": ("10.244.2.3", "vp2-2"),
            },
        ),
        # a status.podIP inside the node's CIDR is kept, the others skip it
        (
            [pod("a", "n1", ip="10.244.1.2"), pod("b", "n1"), pod("0", "n1")],
            {
                "default/0": ("10.244.1.3", "vp1-1"),
                "default/a": ("10.244.1.2", "vp1-2"),
                "default/b": ("10.244.1.4", "vp1-3"),
            },
        ),
    ],
)
def test_pod_addresses_and_links(pods: list[Pod], expected: dict[str, tuple[str, str]]) -> None:
    t = topo(pods)
    assert {p.key: (p.ip, p.host_ifname) for p in t.pods} == expected
    for p in t.pods:
        node = t.node(p.node)
        assert p.gateway == node.bridge_ip
        assert p.netns == f"na-p-{p.namespace}-{p.name}"
        assert p.cgroup == f"nodeagent/pods/{p.node}/{p.namespace}_{p.name}"
        assert p.log == f"/run/nodeagent/sandbox/logs/{p.namespace}_{p.name}.log"


def test_interface_names_fit_and_are_unique_at_the_limits() -> None:
    pods = [pod(f"p{k:03d}", "node-zzz") for k in range(253)]
    pods += [pod(f"only-{i}", f"n{i:03d}") for i in range(253)]
    t = topo(pods)
    assert len(t.nodes) == 254
    names = t.interface_names()
    assert all(0 < len(n) <= IFNAMSIZ for n in names), [n for n in names if len(n) > IFNAMSIZ]
    fabric = [n.fabric_ifname for n in t.nodes]
    assert len(set(fabric)) == len(fabric)
    for node in t.nodes:
        links = [p.host_ifname for p in t.pods if p.node == node.name]
        assert len(set(links)) == len(links)
    busiest = [p for p in t.pods if p.node == "node-zzz"]
    assert busiest[-1].ip == "10.244.254.254"
    assert max(len(n) for n in names) == len("vp254-253")


def test_netns_names_are_unique_and_recognised() -> None:
    t = topo([pod("a", "n1"), pod("b", "n2", ns="x")])
    names = t.netns_names()
    assert names == ("na-fabric", "na-n-n1", "na-n-n2", "na-p-default-a", "na-p-x-b")
    assert all(is_sandbox_netns(n) for n in names)


@pytest.mark.parametrize(
    ("name", "ours", "node"),
    [
        ("na-fabric", True, None),
        ("na-n-node1", True, "node1"),
        ("na-p-default-web", True, None),
        ("na-n-", False, None),
        ("na-p-", False, None),
        ("na-other", False, None),
        ("t-node", False, None),
        ("fabric", False, None),
    ],
)
def test_is_sandbox_netns(name: str, ours: bool, node: str | None) -> None:
    assert is_sandbox_netns(name) is ours
    assert node_of_netns(name) == node


def test_hosts_file_lists_the_pods_namespace_first() -> None:
    services = (
        svc("db", ns="a", cluster_ip="10.96.0.1"),
        svc("db", ns="b", cluster_ip="10.96.0.2"),
    )
    lines = hosts_file("p", "10.244.1.2", services, namespace="b").splitlines()
    assert lines[4:] == [
        "10.96.0.2\tdb db.b db.b.svc db.b.svc.cluster.local",
        "10.96.0.1\tdb db.a db.a.svc db.a.svc.cluster.local",
    ]


def test_hosts_file() -> None:
    services = (
        svc("reviews", cluster_ip="10.96.0.11"),
        svc("api", ns="shop", cluster_ip="10.96.0.20"),
        svc("headless", cluster_ip=None),
    )
    assert hosts_file("web", "10.244.1.2", services) == (
        "# written by nodeagent sandbox\n"
        "127.0.0.1\tlocalhost\n"
        "::1\tlocalhost ip6-localhost ip6-loopback\n"
        "10.244.1.2\tweb\n"
        "10.96.0.11\treviews reviews.default reviews.default.svc "
        "reviews.default.svc.cluster.local\n"
        "10.96.0.20\tapi api.shop api.shop.svc api.shop.svc.cluster.local\n"
    )


def test_pod_plan_carries_hosts_resolv_and_ports() -> None:
    p = pod("web", "n1", ns="shop", ports=(8080, 9090, 8080), sa="web-sa")
    idle = Pod(
        namespace="shop",
        name="idle",
        node_name="n1",
        containers=(Container(name="c", ports=(("http", 80),)),),
    )
    api = svc("api", ns="shop", cluster_ip="10.96.0.20")
    t = topo([p, idle], [api])
    web = t.pod("shop/web")
    assert web.ports == (8080, 9090)
    assert web.service_account == "web-sa"
    assert f"{web.ip}\tweb\n" in web.hosts
    # names come from the agent's DNS proxy, at the address its capture takes
    assert "10.96.0.20" not in web.hosts
    assert web.resolv_conf.splitlines()[1:] == [
        "search shop.svc.cluster.local svc.cluster.local cluster.local",
        "nameserver 10.96.0.10",
        "options ndots:5 timeout:2 attempts:2",
    ]
    # without the DNS proxy, or for a pod out of the mesh: a hosts file with the services
    outside = dataclasses.replace(
        p, name="outside", labels=Labels.of({DATAPLANE_MODE_LABEL: "none"})
    )
    for other, key in (
        (topo([p], [api], dns_proxy=False), "shop/web"),
        (topo([outside], [api]), "shop/outside"),
    ):
        plan_ = other.pod(key)
        assert "10.96.0.20\tapi api.shop " in plan_.hosts
        assert "nameserver 127.0.0.1" in plan_.resolv_conf.splitlines()
    # a container without a command is not run, so its ports are not waited for
    assert t.pod("shop/idle").ports == ()


@pytest.mark.parametrize(
    ("pods", "services", "message"),
    [
        ([pod("b-c", "n1", ns="a"), pod("c", "n1", ns="a-b")], [], "na-p-a-b-c"),
        ([pod("a", "Node_1")], [], "cannot name a sandbox node"),
        ([pod("a", "n1", ip="10.244.2.5")], [], "not a free address of node n1"),
        ([pod("a", "n1", ip="10.244.1.1")], [], "not a free address of node n1"),
        (
            [pod("a", "n1", ip="10.244.1.7"), pod("b", "n1", ip="10.244.1.7")],
            [],
            "10.244.1.7 is also Pod default/a",
        ),
        ([pod("a", "n1")], [svc("s", cluster_ip="10.244.9.9")], "inside the sandbox"),
        ([pod("a", "n1")], [svc("s", cluster_ip="10.250.0.9")], "inside the sandbox"),
    ],
)
def test_plan_errors(pods: list[Pod], services: list[Service], message: str) -> None:
    with pytest.raises(ConfigErrors) as e:
        topo(pods, services)
    assert message in str(e.value)


def test_too_many_pods_on_a_node() -> None:
    with pytest.raises(ConfigErrors, match="at most 253 per node"):
        topo([pod(f"p{k}", "n1") for k in range(254)])


def test_empty_config_plans_only_the_fabric() -> None:
    t = topo([])
    assert t.nodes == () and t.pods == ()
    assert t.netns_names() == ("na-fabric",)
