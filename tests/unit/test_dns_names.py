"""The names the DNS proxy answers itself (``core/dns.py``), from YAML through the real
loader: Services in every search form from the asker's namespace, headless Services,
ServiceEntry hosts (written and auto-allocated addresses, wildcards), pods by address and
by hostname/subdomain, WorkloadEntries behind a headless Service; and the names it leaves
to the upstream resolver."""

from __future__ import annotations

from pathlib import Path

import pytest

from nodeagent.control.files import load_directory
from nodeagent.core.dns import DnsAnswer, DnsTable
from nodeagent.errors import ConfigErrors

MESH = """
apiVersion: v1
kind: Pod
metadata: {name: client, namespace: default, labels: {app: client}}
spec: {nodeName: node1, containers: [{name: main}]}
status: {podIP: 10.244.1.10}
---
apiVersion: v1
kind: Service
metadata: {name: reviews, namespace: default}
spec: {clusterIP: 10.96.0.20, selector: {app: reviews}, ports: [{name: http, port: 9080}]}
---
apiVersion: v1
kind: Service
metadata: {name: reviews, namespace: other}
spec: {clusterIP: 10.96.0.21, selector: {app: reviews}, ports: [{name: http, port: 9080}]}
---
apiVersion: v1
kind: Service
metadata: {name: db, namespace: default}
spec: {clusterIP: None, selector: {app: db}, ports: [{name: pg, port: 5432}]}
---
apiVersion: v1
kind: Pod
metadata: {name: db-0, namespace: default, labels: {app: db}}
spec: {nodeName: node1, hostname: db-0, subdomain: db, containers: [{name: main}]}
status: {podIP: 10.244.1.20}
---
apiVersion: v1
kind: Pod
metadata: {name: db-1, namespace: default, labels: {app: db}}
spec: {nodeName: node2, hostname: db-1, subdomain: db, containers: [{name: main}]}
status: {podIP: 10.244.2.21}
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {name: db-vm, namespace: default}
spec: {address: 10.10.0.7, labels: {app: db}}
---
apiVersion: v1
kind: Service
metadata: {name: empty, namespace: default}
spec: {clusterIP: None, selector: {app: nobody}, ports: [{name: tcp, port: 1}]}
---
apiVersion: v1
kind: Service
metadata: {name: v6, namespace: default}
spec: {clusterIP: "fd00::10", selector: {app: v6}, ports: [{name: tcp, port: 1}]}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: httpbin, namespace: default}
spec:
  hosts: [httpbin.example.com]
  ports: [{number: 80, name: http, protocol: HTTP}]
  resolution: DNS
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: legacy, namespace: default}
spec:
  hosts: [db.legacy.corp]
  addresses: [172.16.0.5]
  ports: [{number: 5432, name: pg, protocol: TCP}]
  resolution: NONE
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: wild, namespace: default}
spec:
  hosts: ["*.wild.corp"]
  addresses: [172.16.0.9]
  ports: [{number: 443, name: tls, protocol: TLS}]
  resolution: NONE
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: no-address, namespace: default}
spec:
  hosts: [plain.example.org]
  ports: [{number: 443, name: tls, protocol: TLS}]
  resolution: NONE
"""


@pytest.fixture()
def table(tmp_path: Path) -> DnsTable:
    (tmp_path / "mesh.yaml").write_text(MESH)
    return DnsTable.build(load_directory(tmp_path).snapshot)


def addrs(table: DnsTable, name: str, ns: str = "default", family: int = 4) -> tuple[str, ...]:
    answer = table.lookup(name, ns, family)
    assert answer is not None, f"{name} from {ns} was not answered locally"
    return answer.addresses


@pytest.mark.parametrize(
    "name",
    [
        "reviews",
        "reviews.default",
        "reviews.default.svc",
        "reviews.default.svc.cluster.local",
        "Reviews.Default.SVC.cluster.local.",
    ],
)
def test_a_service_answers_every_search_form(table: DnsTable, name: str) -> None:
    assert addrs(table, name) == ("10.96.0.20",)


def test_a_short_name_is_the_askers_namespace(table: DnsTable) -> None:
    assert addrs(table, "reviews", ns="other") == ("10.96.0.21",)
    assert addrs(table, "reviews.default", ns="other") == ("10.96.0.20",)


@pytest.mark.parametrize(
    ("asked", "stripped", "address"),
    [
        # what a pod's resolver sends for "reviews.other" (search default.svc.cluster.local)
        ("reviews.other.default.svc.cluster.local", "reviews.other", "10.96.0.21"),
        (
            "reviews.other.svc.cluster.local.cluster.local",
            "reviews.other.svc.cluster.local",
            "10.96.0.21",
        ),
        ("db.legacy.corp.default.svc.cluster.local", "db.legacy.corp", "172.16.0.5"),
        ("db.legacy.corp.svc.cluster.local", "db.legacy.corp", "172.16.0.5"),
    ],
)
def test_a_search_domain_appended_by_the_resolver_is_a_cname(
    table: DnsTable, asked: str, stripped: str, address: str
) -> None:
    answer = table.lookup(asked, "default", 4)
    assert answer is not None
    assert (answer.stripped, answer.addresses) == (stripped, (address,))


def test_the_fqdn_asked_as_is_needs_no_cname(table: DnsTable) -> None:
    answer = table.lookup("reviews.default.svc.cluster.local", "other", 4)
    assert answer == DnsAnswer(("10.96.0.20",), None, "service default/reviews")


def test_a_headless_service_answers_its_endpoints(table: DnsTable) -> None:
    assert addrs(table, "db") == ("10.10.0.7", "10.244.1.20", "10.244.2.21")


def test_a_headless_service_without_endpoints_is_an_empty_answer(table: DnsTable) -> None:
    assert addrs(table, "empty.default.svc.cluster.local") == ()


def test_pods_by_hostname_and_subdomain(table: DnsTable) -> None:
    assert addrs(table, "db-0.db") == ("10.244.1.20",)
    assert addrs(table, "db-1.db.default.svc.cluster.local", ns="other") == ("10.244.2.21",)


def test_a_workload_entry_behind_a_headless_service(table: DnsTable) -> None:
    assert addrs(table, "db-vm.db.default.svc.cluster.local") == ("10.10.0.7",)


def test_a_pod_by_its_dashed_address_only_in_its_namespace(table: DnsTable) -> None:
    assert addrs(table, "10-244-1-10.default.pod.cluster.local") == ("10.244.1.10",)
    assert table.lookup("10-244-1-10.other.pod.cluster.local", "default", 4) is None
    assert table.lookup("10-9-9-9.default.pod.cluster.local", "default", 4) is None


def test_service_entry_hosts_answer_their_addresses(table: DnsTable) -> None:
    auto = addrs(table, "httpbin.example.com")
    assert len(auto) == 1 and auto[0].startswith("240.240."), auto
    assert addrs(table, "db.legacy.corp") == ("172.16.0.5",)


def test_a_wildcard_host_answers_names_under_it(table: DnsTable) -> None:
    assert addrs(table, "api.wild.corp") == ("172.16.0.9",)
    assert addrs(table, "a.b.wild.corp") == ("172.16.0.9",)
    assert table.lookup("wild.corp", "default", 4) is None


def test_aaaa_for_a_v4_only_name_is_empty_and_a_for_v6_only(table: DnsTable) -> None:
    assert addrs(table, "reviews", family=6) == ()
    assert addrs(table, "v6", family=6) == ("fd00::10",)
    assert addrs(table, "v6", family=4) == ()


@pytest.mark.parametrize(
    "name",
    [
        "example.com",
        "plain.example.org",  # a ServiceEntry host without an address: upstream's
        "nosuch",
        "nosuch.default.svc.cluster.local",
        "reviews.nosuchns",
        "kubernetes.default.svc.cluster.local",
        "",
        ".",
        "a..b",
    ],
)
def test_names_not_of_the_mesh_are_left_to_the_upstream(table: DnsTable, name: str) -> None:
    assert table.lookup(name, "default", 4) is None


def test_a_bad_hostname_is_an_error_naming_the_field(tmp_path: Path) -> None:
    (tmp_path / "pod.yaml").write_text(
        "apiVersion: v1\nkind: Pod\nmetadata: {name: p, namespace: default}\n"
        "spec: {nodeName: n, subdomain: Not_A_Label, containers: [{name: c}]}\n"
    )
    with pytest.raises(ConfigErrors) as e:
        load_directory(tmp_path)
    assert "spec.subdomain" in str(e.value) and "Not_A_Label" in str(e.value)
