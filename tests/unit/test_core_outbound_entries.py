"""The outbound plan for VMs and services outside the mesh, from YAML through the real
loader: a WorkloadEntry behind a Service (HBONE with its identity), ServiceEntry hosts
(MESH_INTERNAL over HBONE, MESH_EXTERNAL plain TCP, DNS hosts dialled by name, NONE
passed through), and ``outboundTrafficPolicy: REGISTRY_ONLY`` refusing the rest; and
``ctl explain`` for a ServiceEntry host."""

from __future__ import annotations

import io
import random
from pathlib import Path
from typing import Any, cast

import pytest

from nodeagent.control.files import load_directory
from nodeagent.core.balancer import BalancerRegistry
from nodeagent.core.clusters import Clusters
from nodeagent.core.outbound import (
    Dns,
    Hbone,
    Http1,
    OutboundPlan,
    Passthrough,
    Refuse,
    RoundRobin,
    Tcp,
    plan,
)
from nodeagent.model.objects import Pod
from nodeagent.model.snapshot import MeshSnapshot
from nodeagent.model.status import ExplainQuery
from nodeagent.proxy.admission import InboundPolicy
from nodeagent.proxy.explain import ExplainError, explain
from nodeagent.proxy.l7 import L7Proxy
from nodeagent.telemetry.accesslog import AccessLog
from nodeagent.telemetry.metrics import Metrics

MESH = """
apiVersion: v1
kind: Pod
metadata: {name: client, namespace: default, labels: {app: client}}
spec: {nodeName: node1, containers: [{name: main}]}
status: {podIP: 10.244.1.10}
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata:
  name: ratings-vm
  namespace: default
  annotations: {nodeagent.io/node: vm-1}
spec: {address: 10.10.0.7, labels: {app: ratings}, serviceAccount: ratings}
---
apiVersion: v1
kind: Service
metadata: {name: ratings, namespace: default}
spec:
  clusterIP: 10.96.0.30
  selector: {app: ratings}
  ports: [{name: tcp, port: 9080}]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: mongo, namespace: default}
spec:
  hosts: [mongo.vms.internal]
  addresses: [192.168.50.0/24]
  ports: [{number: 27017, name: mongo, protocol: MONGO}]
  location: MESH_INTERNAL
  resolution: STATIC
  endpoints:
  - {address: 10.10.0.8, serviceAccount: mongo}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: legacy-db, namespace: default}
spec:
  hosts: [db.legacy.corp]
  addresses: [172.16.0.5]
  ports: [{number: 5432, name: pg, protocol: TCP, targetPort: 6432}]
  location: MESH_EXTERNAL
  resolution: STATIC
  endpoints: [{address: 172.16.0.6}]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: github, namespace: default}
spec:
  hosts: [api.github.com]
  ports: [{number: 443, name: https, protocol: TLS}]
  resolution: DNS
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: saas, namespace: default}
spec:
  hosts: [saas.example.com]
  addresses: [203.0.113.10]
  ports: [{number: 443, name: tls, protocol: TLS}]
  resolution: NONE
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: empty, namespace: default}
spec:
  hosts: [empty.example.com]
  addresses: [203.0.113.20]
  ports: [{number: 80, name: tcp}]
  resolution: STATIC
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: httpbin, namespace: default}
spec:
  hosts: [httpbin.org]
  ports: [{number: 80, name: http, protocol: HTTP}]
  resolution: DNS
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: httpbin, namespace: default}
spec:
  hosts: [httpbin.org]
  http:
  - timeout: 3s
    route: [{destination: {host: httpbin.org}}]
"""

REGISTRY_ONLY = """
apiVersion: v1
kind: ConfigMap
metadata: {name: istio, namespace: istio-system}
data:
  mesh: |
    outboundTrafficPolicy:
      mode: REGISTRY_ONLY
"""


@pytest.fixture
def mesh(tmp_path: Path) -> Path:
    (tmp_path / "mesh.yaml").write_text(MESH)
    return tmp_path


def snapshot(directory: Path) -> MeshSnapshot:
    return load_directory(directory).snapshot


def client(snap: MeshSnapshot) -> Pod:
    return snap.pod_by_key["default/client"]


def planned(snap: MeshSnapshot, ip: str, port: int, *, mtls: bool = True) -> OutboundPlan:
    clusters = Clusters(BalancerRegistry(lambda: 0.0, random.Random(1)))
    return plan(
        snap, client(snap), ip, port,
        rr=RoundRobin(), clusters=clusters, random=random.random, mtls=mtls,
    )  # fmt: skip


def test_a_service_reaches_a_vm_over_hbone_with_the_vms_identity(mesh: Path) -> None:
    p = planned(snapshot(mesh), "10.96.0.30", 9080)
    assert isinstance(p, Hbone)
    assert (p.endpoint.ip, p.endpoint.port) == ("10.10.0.7", 9080)
    assert p.endpoint.pod.identity() == "spiffe://cluster.local/ns/default/sa/ratings"
    assert p.service_host == "ratings.default.svc.cluster.local"


def test_a_vm_dialled_by_its_address_is_a_mesh_peer(mesh: Path) -> None:
    p = planned(snapshot(mesh), "10.10.0.7", 9080)
    assert isinstance(p, Hbone) and p.endpoint.pod.kind == "WorkloadEntry"


def test_mesh_internal_endpoints_with_an_identity_go_through_hbone(mesh: Path) -> None:
    p = planned(snapshot(mesh), "192.168.50.77", 27017)  # in the entry's CIDR
    assert isinstance(p, Hbone)
    assert p.endpoint.ip == "10.10.0.8"
    assert p.endpoint.pod.identity() == "spiffe://cluster.local/ns/default/sa/mongo"
    assert p.service_host == "mongo.vms.internal"


def test_mesh_external_endpoints_are_plain_tcp_to_the_target_port(mesh: Path) -> None:
    p = planned(snapshot(mesh), "172.16.0.5", 5432)
    assert isinstance(p, Tcp)  # even with identities: nothing there speaks HBONE
    assert (p.endpoint.ip, p.endpoint.port) == ("172.16.0.6", 6432)
    assert p.service_host == "db.legacy.corp"


def test_a_dns_host_is_dialled_by_name_at_its_allocated_address(mesh: Path) -> None:
    snap = snapshot(mesh)
    host = snap.service_for_host("api.github.com")
    assert host is not None and host.cluster_ip is not None
    p = planned(snap, host.cluster_ip, 443)
    assert isinstance(p, Dns)
    assert (p.endpoint.ip, p.endpoint.port) == ("api.github.com", 443)
    assert p.service_host == "api.github.com"


def test_resolution_none_passes_through_and_static_without_endpoints_is_uh(
    mesh: Path,
) -> None:
    snap = snapshot(mesh)
    assert isinstance(planned(snap, "203.0.113.10", 443), Passthrough)
    p = planned(snap, "203.0.113.20", 80)
    assert p == Refuse(
        "UH", "ServiceEntry default/empty host empty.example.com port 80: it lists no endpoints"
    )
    p = planned(snap, "203.0.113.10", 8443)
    assert isinstance(p, Refuse) and p.flag == "NR"  # not a port of the entry


def test_an_http_port_of_a_service_entry_is_routed_by_the_l7_path(mesh: Path) -> None:
    snap = snapshot(mesh)
    host = snap.service_for_host("httpbin.org")
    assert host is not None and host.cluster_ip is not None
    p = planned(snap, host.cluster_ip, 80)
    assert isinstance(p, Http1) and p.service is host


def test_allow_any_passes_unknown_destinations_through(mesh: Path) -> None:
    assert isinstance(planned(snapshot(mesh), "93.184.216.34", 443), Passthrough)


def test_registry_only_refuses_destinations_outside_the_registry(mesh: Path) -> None:
    (mesh / "istio.yaml").write_text(REGISTRY_ONLY)
    snap = snapshot(mesh)
    p = planned(snap, "93.184.216.34", 443)
    assert isinstance(p, Refuse)
    assert p.flag == "NR"
    assert p.reason.startswith("BlackHoleCluster: 93.184.216.34:443 is not in the mesh registry")
    assert "REGISTRY_ONLY" in p.reason
    # what the registry holds still goes: a ServiceEntry, a VM, a pod
    assert isinstance(planned(snap, "203.0.113.10", 443), Passthrough)
    assert isinstance(planned(snap, "10.10.0.7", 9080), Hbone)
    assert isinstance(planned(snap, "10.244.1.10", 80), Hbone)


class _Identity:
    trust_domain = "cluster.local"


class _Proxy:
    """What ``explain`` uses of the Proxy."""

    def __init__(self, snap: MeshSnapshot) -> None:
        self.snap = snap
        self.identity = _Identity()
        self.l7 = L7Proxy(self.snapshot, Metrics(), AccessLog(io.BytesIO()), rnd=random.Random(1))
        self.admission = InboundPolicy(self.snapshot)
        self.pods = {"default/client": object()}

    def snapshot(self) -> MeshSnapshot:
        return self.snap

    def identity_principal(self, pod: Pod) -> str:
        return pod.identity("cluster.local")


def ask(snap: MeshSnapshot, to: str) -> dict[str, Any]:
    return explain(cast(Any, _Proxy(snap)), ExplainQuery(from_pod="client", to=to))


def test_explain_routes_a_request_to_a_service_entry_host(mesh: Path) -> None:
    out = ask(snapshot(mesh), "httpbin.org")
    assert out["service"] == {"name": "default/httpbin.org", "host": "httpbin.org", "port": 80}
    assert out["route"]["timeout"] == 3.0
    assert out["endpoints"]["cluster"] == "outbound|80||httpbin.org"
    assert out["endpoints"]["pick"]["endpoint"].startswith("httpbin.org:80")


def test_explain_says_registry_only_refuses_an_unknown_host(mesh: Path) -> None:
    with pytest.raises(ExplainError, match="is not a service or pod of the mesh"):
        ask(snapshot(mesh), "93.184.216.34:443")
    (mesh / "istio.yaml").write_text(REGISTRY_ONLY)
    with pytest.raises(ExplainError, match="refused: outboundTrafficPolicy is REGISTRY_ONLY"):
        ask(snapshot(mesh), "93.184.216.34:443")


def test_explain_follows_a_service_to_the_vm_and_its_identity(mesh: Path) -> None:
    out = ask(snapshot(mesh), "ratings:9080")
    assert out["destination"] == {
        "pod": "default/ratings-vm",
        "node": "vm-1",
        "port": 9080,
        "principal": "spiffe://cluster.local/ns/default/sa/ratings",
    }
    assert out["peer_authentication"]["hop"] == "HBONE mTLS (port 15008)"
    assert out["verdict"]["allowed"] is True


def test_explain_expects_no_identity_outside_the_mesh(mesh: Path) -> None:
    out = ask(snapshot(mesh), "httpbin.org")
    assert out["destination"]["pod"] == "default/httpbin.org"
    assert out["destination"]["principal"] == "none"
    assert out["peer_authentication"]["hop"] == "plaintext"
