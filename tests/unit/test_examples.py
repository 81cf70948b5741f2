"""The shipped examples load: bookinfo alone, and bookinfo with each task of
``examples/bookinfo-tasks`` applied the way the README shows (the subsets first, then
one task file per host); the VM example plans what its README says."""

from __future__ import annotations

import random
import shutil
from pathlib import Path

import pytest

from nodeagent.control.files import load_directory
from nodeagent.core.balancer import BalancerRegistry
from nodeagent.core.clusters import Clusters
from nodeagent.core.outbound import Http1, OutboundPlan, Refuse, RoundRobin, plan, tunnels
from nodeagent.core.route import RequestInfo, RouteOutcome, select_route

ROOT = Path(__file__).resolve().parents[2]
BOOKINFO = ROOT / "examples" / "bookinfo"
TASKS = ROOT / "examples" / "bookinfo-tasks"


def test_bookinfo_loads() -> None:
    snap = load_directory(BOOKINFO).snapshot
    assert {s.name for s in snap.services} >= {"productpage", "details", "reviews", "ratings"}


@pytest.mark.parametrize(
    "task", sorted(p.name for p in TASKS.glob("virtual-service-*.yaml")), ids=str
)
def test_each_task_loads_with_the_subsets(task: str, tmp_path: Path) -> None:
    d = tmp_path / "mesh"
    shutil.copytree(BOOKINFO, d)
    shutil.copy(TASKS / "destination-rule-all.yaml", d)
    shutil.copy(TASKS / task, d / "vs.yaml")
    snap = load_directory(d).snapshot
    assert len(snap.virtual_services) == 1 and len(snap.destination_rules) == 4
    vs = snap.virtual_services[0]
    host = vs.hosts[0]
    decision = select_route(
        snap, host, RequestInfo("GET", host, "/", {"end-user": "jason"}, port=9080)
    )
    assert decision.outcome is RouteOutcome.ROUTE
    for rd in decision.routes:  # every subset a task names is defined
        assert rd.destination.subset in {"v1", "v2", "v3"}


POLICY = ROOT / "examples" / "bookinfo-policy"


@pytest.mark.parametrize("policy", sorted(p.name for p in POLICY.glob("*.yaml")), ids=str)
def test_each_policy_example_loads(policy: str, tmp_path: Path) -> None:
    d = tmp_path / "mesh"
    shutil.copytree(BOOKINFO, d)
    shutil.copy(POLICY / policy, d / policy)
    snap = load_directory(d).snapshot
    kinds = (
        len(snap.authorization_policies),
        len(snap.request_authentications),
        len(snap.local_rate_limits),
    )
    assert sum(kinds) >= 1, kinds


def test_locality_example_places_pods_by_their_nodes_zones() -> None:
    snap = load_directory(ROOT / "examples" / "locality").snapshot
    got = {p.name: p.locality for p in snap.pods}
    assert got == {
        "client": ("region1", "zone-a", ""),
        "web-a": ("region1", "zone-a", ""),
        "web-b": ("region1", "zone-b", ""),
        "web-c": ("region2", "zone-c", ""),
    }


VM = ROOT / "examples" / "vm"


def test_the_vm_example_plans_what_its_readme_says() -> None:
    snap = load_directory(VM).snapshot
    client = snap.pod_by_key["default/client"]
    (vm,) = snap.workload_entries_on_node("vm-1")
    assert vm.identity() == "spiffe://cluster.local/ns/default/sa/ratings"
    assert vm.locality == ("eu-west", "eu-west-1b", "")  # its node's zone
    assert snap.registry_only
    clusters = Clusters(BalancerRegistry(lambda: 0.0, random.Random(1)))

    def planned(ip: str, port: int) -> OutboundPlan:
        return plan(
            snap, client, ip, port,
            rr=RoundRobin(), clusters=clusters, random=random.random, mtls=True,
        )  # fmt: skip

    ratings = planned("10.96.8.10", 9080)
    assert isinstance(ratings, Http1)
    assert (ratings.endpoint.ip, ratings.endpoint.port) == ("192.168.121.10", 9080)
    assert tunnels(snap, ratings.endpoint, mtls=True)
    httpbin = snap.service_for_host("httpbin.org")
    assert httpbin is not None and httpbin.cluster_ip is not None
    assert isinstance(planned(httpbin.cluster_ip, 80), Http1)
    refused = planned("93.184.216.34", 443)
    assert isinstance(refused, Refuse) and refused.reason.startswith("BlackHoleCluster")
