"""WorkloadEntry, WorkloadGroup, ServiceEntry and Istio's ``istio`` ConfigMap as users
write them (Istio's reference examples, a ``kubectl get -o yaml`` export) through the
real loader and ``nodeagent config check``: what the snapshot holds, and each bad input
named by file, object and field."""

from __future__ import annotations

import ipaddress
import shutil
from pathlib import Path

import pytest

from nodeagent.cli import main
from nodeagent.control.files import load_directory
from nodeagent.errors import ConfigErrors
from nodeagent.model.entries import workload_cgroup
from nodeagent.model.snapshot import MeshSnapshot

DATA = Path(__file__).parent / "data" / "istio-vm"
ENTRY_RANGE = ipaddress.ip_network("240.240.0.0/16")


@pytest.fixture
def examples(tmp_path: Path) -> Path:
    for f in DATA.glob("*.yaml"):
        shutil.copy(f, tmp_path / f.name)
    return tmp_path


def load(directory: Path) -> MeshSnapshot:
    return load_directory(directory).snapshot


def errors_of(directory: Path, text: str) -> list[str]:
    (directory / "bad.yaml").write_text(text)
    with pytest.raises(ConfigErrors) as e:
        load_directory(directory)
    return [str(x) for x in e.value.errors]


def test_istios_examples_pass_config_check_with_the_probe_warning(
    examples: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["config", "check", str(examples)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines == [
        f"warning: {examples / 'workloadgroup-reviews.yaml'}: WorkloadGroup bookinfo/reviews: "
        "spec.probe: probe is not run: the agent does not health-check VM workloads",
        f"6 files in {examples}: 11 objects, 0 errors, 1 warning: the mesh would load it",
    ]


def test_a_workload_entry_is_a_workload_with_a_spiffe_identity(examples: Path) -> None:
    snap = load(examples)
    (vm,) = [w for w in snap.workload_entries if w.name == "details-svc"]
    assert vm.kind == "WorkloadEntry"
    assert vm.pod_ip == "2.2.2.2"
    assert vm.identity("cluster.local") == "spiffe://cluster.local/ns/default/sa/details-legacy"
    assert snap.pod_by_ip["2.2.2.2"] is vm
    assert vm not in snap.pods  # no pod netns: the agent opens no listeners for it
    assert "2.2.2.2" in snap.mesh_addresses()


def test_a_service_entry_selects_the_vm_and_forwards_to_its_target_port(
    examples: Path,
) -> None:
    snap = load(examples)
    svc = snap.service_for_host("details.bookinfo.com")
    assert svc is not None and svc.is_entry and svc.location == "MESH_INTERNAL"
    (ep,) = snap.endpoints(svc, svc.ports[0])
    assert (ep.ip, ep.port, ep.pod.key) == ("2.2.2.2", 8080, "default/details-svc")


def test_a_kubernetes_service_selects_a_workload_entry_by_its_ports_map(tmp_path: Path) -> None:
    (tmp_path / "vm.yaml").write_text(
        """
apiVersion: networking.istio.io/v1beta1
kind: WorkloadEntry
metadata:
  name: ratings-vm
  namespace: shop
  annotations: {nodeagent.io/node: vm-1}
spec:
  address: 10.10.0.7
  ports: {http: 9081}
  labels: {app: ratings}
  locality: eu-west/zone-a
  serviceAccount: ratings
---
apiVersion: v1
kind: Service
metadata: {name: ratings, namespace: shop}
spec:
  selector: {app: ratings}
  ports:
  - {name: http, port: 80, targetPort: 9080}
  - {name: tcp, port: 7000}
"""
    )
    snap = load(tmp_path)
    svc = snap.service_by_key["shop/ratings"]
    (http,) = snap.endpoints(svc, svc.ports[0])
    (tcp,) = snap.endpoints(svc, svc.ports[1])
    assert (http.ip, http.port) == ("10.10.0.7", 9081)  # its ports map wins, as in Istio
    assert tcp.port == 7000  # no entry for "tcp": the target port
    (vm,) = snap.workload_entries_on_node("vm-1")
    assert vm.key == "shop/ratings-vm" and vm.node_name == "vm-1"
    assert vm.locality == ("eu-west", "zone-a", "")
    assert snap.workload_entries_on_node("node1") == ()


def test_a_kubectl_export_with_status_and_server_metadata_loads(examples: Path) -> None:
    snap = load(examples)
    (vm,) = [w for w in snap.workload_entries if w.namespace == "vm-apps"]
    assert vm.name == "python-http-10.0.2.15-vm-network"
    assert vm.identity("cluster.local") == "spiffe://cluster.local/ns/vm-apps/sa/vm-sa"
    assert vm.labels["service.istio.io/canonical-name"] == "python-http"
    (obj,) = [w for w in snap.workload_entry_objects if w.namespace == "vm-apps"]
    assert obj.network == "vm-network"


def test_a_workload_group_is_kept_as_the_template_vm_join_reads(examples: Path) -> None:
    snap = load(examples)
    (group,) = snap.workload_groups
    assert group.key == "bookinfo/reviews"
    assert group.labels["app.kubernetes.io/version"] == "1.3.4"
    assert group.template is not None
    assert dict(group.template.ports) == {"grpc": 3550, "http": 8080}
    assert group.template.service_account == "default"
    assert group.has_probe


def test_hosts_without_addresses_get_stable_addresses_in_istios_range(examples: Path) -> None:
    first = load(examples)
    addrs = {s.name: s.cluster_ip for s in first.services if s.is_entry}
    for host in ("api.dropboxapi.com", "httpbin.org", "foo.bar.com", "details.bookinfo.com"):
        assert ipaddress.ip_address(addrs[host]) in ENTRY_RANGE, host
    assert len({addrs[h] for h in addrs if addrs[h]}) == sum(1 for a in addrs.values() if a)
    assert addrs["*.wikipedia.org"] is None  # a wildcard, and resolution NONE: none
    assert addrs["mymongodb.somedomain"] is None  # its addresses are a CIDR
    (examples / "more.yaml").write_text(
        """
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: more, namespace: other}
spec:
  hosts: [a.example.com, b.example.com]
  ports: [{number: 443, name: tls, protocol: TLS}]
  resolution: DNS
"""
    )
    again = load(examples)
    assert {s.name: s.cluster_ip for s in again.services if s.name in addrs} == addrs
    for svc in again.services:
        if svc.cluster_ip and svc.is_entry:
            assert again.service_for_address(svc.cluster_ip) is svc


def test_the_allocated_address_shows_in_the_objects_status_as_istio_writes_it(
    examples: Path,
) -> None:
    loaded = load_directory(examples)
    (raw,) = [o for o in loaded.objects if o["metadata"]["name"] == "httpbin-ext"
              and o["kind"] == "ServiceEntry"]  # fmt: skip
    host = loaded.snapshot.service_for_host("httpbin.org")
    assert host is not None
    assert raw["status"]["addresses"] == [{"value": host.cluster_ip, "host": "httpbin.org"}]


def test_an_address_istio_allocated_is_kept(tmp_path: Path) -> None:
    (tmp_path / "se.yaml").write_text(
        """
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: api, namespace: default}
spec:
  hosts: [api.example.com]
  ports: [{number: 443, name: tls, protocol: TLS}]
  resolution: DNS
status:
  addresses:
  - {value: 240.240.0.9, host: api.example.com}
  - {value: "2001:2::9", host: api.example.com}
"""
    )
    svc = load(tmp_path).service_for_host("api.example.com")
    assert svc is not None and svc.cluster_ip == "240.240.0.9"


@pytest.mark.parametrize("status", ["1", "[a, b]", "'x'", "null"])
def test_a_status_that_is_no_mapping_gets_the_allocated_address(
    tmp_path: Path, status: str
) -> None:
    """Found by fuzzing: a ServiceEntry whose ``status`` was not a mapping raised a
    TypeError where the allocated address is written back. The status is the API
    server's, never checked: it is replaced."""
    (tmp_path / "se.yaml").write_text(
        f"""
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: api, namespace: default}}
spec:
  hosts: [api.example.com]
  ports: [{{number: 443, name: tls, protocol: TLS}}]
  resolution: DNS
status: {status}
"""
    )
    svc = load(tmp_path).service_for_host("api.example.com")
    assert svc is not None and svc.cluster_ip.startswith("240.240.")


def test_the_istio_configmap_sets_registry_only_and_others_are_skipped(
    examples: Path,
) -> None:
    assert load(examples).registry_only
    (examples / "istio-configmap.yaml").unlink()
    assert not load(examples).registry_only
    (examples / "elsewhere.yaml").write_text(
        """
apiVersion: v1
kind: ConfigMap
metadata: {name: istio, namespace: default}
data:
  mesh: "outboundTrafficPolicy: {mode: REGISTRY_ONLY}"
---
apiVersion: v1
kind: ConfigMap
metadata: {name: istio-ca-root-cert, namespace: default}
data: {root-cert.pem: "x"}
"""
    )
    loaded = load_directory(examples)
    assert not loaded.snapshot.registry_only
    f = examples / "elsewhere.yaml"
    assert loaded.warnings[-1] == (
        f"{f}: ConfigMap default/istio: metadata.namespace: not read: the mesh config is "
        "the istio ConfigMap of the root namespace (istio-system)"
    )
    assert f"{f} (document 2): v1 ConfigMap default/istio-ca-root-cert: not served by the " \
        "mesh, skipped" in loaded.warnings


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            """
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {name: vm, namespace: default}
spec: {address: 10.0.0.1, serviceAcount: web}
""",
            "WorkloadEntry default/vm: spec.serviceAcount: unknown field (supported here: "
            "address, labels, locality, network, ports, serviceAccount, weight)",
        ),
        (
            """
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {name: vm, namespace: default}
spec: {address: 10.0.0.1, ports: {http: 70000}}
""",
            "WorkloadEntry default/vm: spec.ports.http: port 70000 is out of range 1-65535",
        ),
        (
            """
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {name: vm, namespace: default, annotations: {nodeagent.io/nodes: vm-1}}
spec: {address: 10.0.0.1}
""",
            "WorkloadEntry default/vm: metadata.annotations.nodeagent.io/nodes: unknown "
            "annotation (known: nodeagent.io/node, nodeagent.io/cgroup)",
        ),
        (
            """
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {name: vm, namespace: default, annotations: {nodeagent.io/cgroup: ratings}}
spec: {address: 10.0.0.1}
""",
            "WorkloadEntry default/vm: metadata.annotations.nodeagent.io/cgroup: 'ratings': a "
            "unit name ends in .service, .scope or .slice (or write a cgroup path)",
        ),
        (
            """
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {name: vm, namespace: default, annotations: {nodeagent.io/cgroup: /}}
spec: {address: 10.0.0.1}
""",
            "WorkloadEntry default/vm: metadata.annotations.nodeagent.io/cgroup: '/' would "
            "capture every process of the host, the agent's own and SSH included: name the "
            "workload's cgroup (a service, or user.slice)",
        ),
        (
            """
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {name: vm, namespace: default, annotations: {nodeagent.io/cgroup: /a/../b}}
spec: {address: 10.0.0.1}
""",
            "WorkloadEntry default/vm: metadata.annotations.nodeagent.io/cgroup: '/a/../b': a "
            "cgroup path has no empty, '.' or '..' parts",
        ),
        (
            """
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {name: vm, namespace: default}
spec: {address: "unix:///var/run/app.sock"}
""",
            "WorkloadEntry default/vm: spec.address: unix domain socket addresses are not "
            "supported",
        ),
        (
            """
apiVersion: networking.istio.io/v1
kind: WorkloadGroup
metadata: {name: g, namespace: default}
spec: {template: {address: 10.0.0.1, serviceAccount: web}}
""",
            "WorkloadGroup default/g: spec.template.address: each VM brings its own address: "
            "leave it out",
        ),
        (
            """
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: se, namespace: default}
spec:
  hosts: [api.example.com]
  ports: [{number: 443, name: https, protocol: TLS}]
  resolution: STATIK
""",
            "ServiceEntry default/se: spec.resolution: expected one of NONE, STATIC, DNS, "
            "DNS_ROUND_ROBIN, got 'STATIK'",
        ),
        (
            """
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: se, namespace: default}
spec:
  hosts: [api.example.com]
  ports: [{number: 443, name: https, protocol: TLS}]
  resolution: STATIC
  endpoints: [{address: 10.1.1.1, ports: {http: 8443}}]
""",
            "ServiceEntry default/se: spec.endpoints[0].ports.http: no port of the "
            "ServiceEntry (its ports: https)",
        ),
        (
            """
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: se, namespace: default}
spec:
  hosts: [api.example.com]
  ports: [{number: 443, name: https, protocol: TLS}]
  endpoints: [{address: 10.1.1.1}]
""",
            "ServiceEntry default/se: spec.endpoints: resolution NONE takes no endpoints "
            "(use STATIC or DNS)",
        ),
        (
            """
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: se, namespace: default}
spec:
  hosts: [api.example.com]
  ports: [{number: 443, name: https, protocol: TLS}]
  resolution: STATIC
  endpoints: [{address: api-1.example.com}]
""",
            "ServiceEntry default/se: spec.endpoints[0].address: 'api-1.example.com' is not "
            "an IP address",
        ),
        (
            """
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: se, namespace: default}
spec:
  hosts: [api.example.com]
  ports: [{number: 443, name: https, protocol: SSL}]
""",
            "ServiceEntry default/se: spec.ports[0].protocol: expected one of HTTP, HTTP2, "
            "GRPC, GRPC-WEB, TCP, TLS, HTTPS, MONGO, MYSQL, REDIS, got 'SSL'",
        ),
        (
            """
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: se, namespace: default}
spec:
  hosts: [api.example.com]
  ports: [{number: 443, name: https}]
  location: MESH_EXTERNEL
""",
            "ServiceEntry default/se: spec.location: expected one of MESH_EXTERNAL, "
            "MESH_INTERNAL, got 'MESH_EXTERNEL'",
        ),
        (
            """
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: se, namespace: default}
spec:
  hosts: [api.example.com]
  addresses: [10.0.0.300]
  ports: [{number: 443, name: https}]
""",
            "ServiceEntry default/se: spec.addresses[0]: '10.0.0.300' is not an IP address "
            "or CIDR",
        ),
        (
            """
apiVersion: v1
kind: ConfigMap
metadata: {name: istio, namespace: istio-system}
data:
  mesh: |
    outboundTrafficPolicy:
      mode: REGISTRY_ONY
""",
            "ConfigMap istio-system/istio: data.mesh: outboundTrafficPolicy.mode: expected "
            "one of ALLOW_ANY, REGISTRY_ONLY, got 'REGISTRY_ONY'",
        ),
    ],
)
def test_bad_input_names_file_object_and_field(
    tmp_path: Path, text: str, expected: str
) -> None:
    (error,) = errors_of(tmp_path, text)
    assert error == f"{tmp_path / 'bad.yaml'}: {expected}"


def test_checks_across_objects_name_both(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text(
        """
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: one, namespace: default}
spec:
  hosts: [api.example.com]
  addresses: [10.96.0.20]
  ports: [{number: 443, name: https}]
---
apiVersion: v1
kind: Pod
metadata: {name: web, namespace: default}
spec: {nodeName: node1, containers: [{name: c}]}
status: {podIP: 10.244.0.5}
"""
    )
    errors = errors_of(
        tmp_path,
        """
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: two, namespace: default}
spec:
  hosts: [api.example.com]
  addresses: [10.96.0.20]
  ports: [{number: 443, name: https}]
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {name: vm, namespace: default}
spec: {address: 10.244.0.5}
""",
    )
    a, bad = tmp_path / "a.yaml", tmp_path / "bad.yaml"
    assert sorted(errors) == sorted(
        [
            f"{bad}: WorkloadEntry default/vm: spec.address: address 10.244.0.5 is also "
            "Pod default/web",
            f"{bad}: ServiceEntry default/two: spec.addresses[0]: address 10.96.0.20 is "
            "already used by ServiceEntry default/one",
            f"{bad}: ServiceEntry default/two: spec.hosts[0]: host api.example.com is also "
            f"declared by ServiceEntry default/one ({a}): merge them",
        ]
    )


def test_a_route_to_a_service_entry_port_it_lacks_is_an_error(examples: Path) -> None:
    (error,) = errors_of(
        examples,
        """
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: dbx, namespace: default}
spec:
  hosts: [api.dropboxapi.com]
  tcp:
  - route: [{destination: {host: api.dropboxapi.com, port: {number: 80}}}]
""",
    )
    assert error.endswith(
        "VirtualService default/dbx: spec.tcp[0].route[0].destination.port.number: "
        "ServiceEntry default/external-svc-https host api.dropboxapi.com has no port 80 "
        "(its ports: 443)"
    )


def test_a_vm_at_a_dns_name_is_selected_only_by_a_dns_service_entry(tmp_path: Path) -> None:
    (tmp_path / "vm.yaml").write_text(
        """
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {name: details-vm, namespace: default}
spec: {address: vm1.vpc01.corp.net, labels: {app: details-legacy}}
---
apiVersion: v1
kind: Service
metadata: {name: details, namespace: default}
spec:
  selector: {app: details-legacy}
  ports: [{name: http, port: 9080}]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: details-dns, namespace: default}
spec:
  hosts: [details.bookinfo.com]
  location: MESH_INTERNAL
  ports: [{number: 80, name: http, protocol: HTTP}]
  resolution: DNS
  workloadSelector: {labels: {app: details-legacy}}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: details-static, namespace: default}
spec:
  hosts: [details.static.com]
  location: MESH_INTERNAL
  ports: [{number: 80, name: http, protocol: HTTP}]
  resolution: STATIC
  workloadSelector: {labels: {app: details-legacy}}
"""
    )
    snap = load(tmp_path)

    def endpoints(key: str) -> list[str]:
        svc = snap.service_by_key[key]
        return [str(e) for e in snap.endpoints(svc, svc.ports[0])]

    assert endpoints("default/details.bookinfo.com") == [
        "vm1.vpc01.corp.net:80 (default/details-vm)"
    ]
    assert endpoints("default/details") == []  # as in Istio: a Service needs an IP
    assert endpoints("default/details.static.com") == []


@pytest.mark.parametrize(
    ("status", "serves"),
    [
        ("status: {conditions: [{type: Healthy, status: 'True'}]}", True),
        ("status: {conditions: [{type: Healthy, status: 'False'}]}", False),
        ("", False),  # health checks on and no verdict yet: not an endpoint, as in Istio
    ],
)
def test_with_health_checks_on_only_a_healthy_vm_serves(
    tmp_path: Path, status: str, serves: bool
) -> None:
    (tmp_path / "vm.yaml").write_text(
        f"""
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata:
  name: vm
  namespace: default
  annotations: {{proxy.istio.io/health-checks-enabled: "true"}}
  labels: {{team: web}}
spec: {{address: 10.0.0.9, labels: {{app: web}}}}
{status}
---
apiVersion: v1
kind: Service
metadata: {{name: web, namespace: default}}
spec:
  selector: {{app: web}}
  ports: [{{name: http, port: 80}}]
---
apiVersion: v1
kind: Service
metadata: {{name: team, namespace: default}}
spec:
  selector: {{team: web}}
  ports: [{{name: http, port: 80}}]
"""
    )
    snap = load(tmp_path)
    web, team = snap.service_by_key["default/web"], snap.service_by_key["default/team"]
    assert bool(snap.endpoints(web, web.ports[0])) is serves
    assert snap.endpoints(team, team.ports[0]) == ()  # metadata.labels do not select it
    assert [w.key for w in snap.workload_entries] == ["default/vm"]  # still a workload


@pytest.mark.parametrize(
    ("value", "path"),
    [
        ("ratings.service", "/system.slice/ratings.service"),
        ("user.slice", "/user.slice"),
        ("app-web.slice", "/app.slice/app-web.slice"),
        ("/system.slice/ratings.service/", "/system.slice/ratings.service"),
        ("session-3.scope", "/system.slice/session-3.scope"),
    ],
)
def test_a_cgroup_annotation_names_the_cgroup_systemd_gives_the_unit(value: str, path: str) -> None:
    assert workload_cgroup(value) == path
