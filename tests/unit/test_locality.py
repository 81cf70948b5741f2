"""Where a workload runs (its locality), by Istio's rule: its Node's topology labels, its
own ``topology.istio.io/locality`` / ``istio-locality`` label overriding; worked out once
per snapshot and used by the load balancer of a config loaded from YAML."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from nodeagent.control.files import load_directory
from nodeagent.core.balancer import BalancerRegistry
from nodeagent.core.clusters import Clusters
from nodeagent.model.objects import (
    NO_LOCALITY,
    Labels,
    Node,
    Pod,
    format_locality,
    parse_locality,
    pod_locality,
)
from nodeagent.model.snapshot import MeshSnapshot
from nodeagent.model.traffic import Destination


def node(name: str, **labels: str) -> Node:
    return Node(name=name, labels=Labels.of(labels))


def pod(name: str = "p", node_name: str = "n1", **labels: str) -> Pod:
    return Pod(namespace="default", name=name, node_name=node_name, labels=Labels.of(labels))


ZONED = node(
    "n1",
    **{"topology.kubernetes.io/region": "us-east", "topology.kubernetes.io/zone": "us-east-1a"},
)
ZONED_LOCALITY = ("us-east", "us-east-1a", "")


@pytest.mark.parametrize(
    ("value", "locality"),
    [
        ("us-east.us-east-1a.rack7", ("us-east", "us-east-1a", "rack7")),
        ("us-east.us-east-1a", ("us-east", "us-east-1a", "")),
        ("us-east", ("us-east", "", "")),
        ("us-east/us-east-1a/rack.7", ("us-east", "us-east-1a", "rack.7")),  # / wins over .
        ("a.b.c.d", ("a", "b", "c")),  # Istio ignores parts past the subzone
    ],
)
def test_locality_label_values(value: str, locality: tuple[str, str, str]) -> None:
    assert parse_locality(value) == locality


def test_format_drops_missing_trailing_parts() -> None:
    assert format_locality(("r", "z", "s")) == "r/z/s"
    assert format_locality(("r", "z", "")) == "r/z"
    assert format_locality(NO_LOCALITY) == ""


def test_a_pod_is_where_its_node_is() -> None:
    assert pod_locality(pod(), ZONED) == ("us-east", "us-east-1a", "")
    racked = node("n1", **dict(ZONED.labels.items_), **{"topology.istio.io/subzone": "rack7"})
    assert pod_locality(pod(), racked) == ("us-east", "us-east-1a", "rack7")


def test_the_deprecated_node_labels_count_when_the_ga_ones_are_absent() -> None:
    beta = node(
        "n1",
        **{
            "failure-domain.beta.kubernetes.io/region": "old-r",
            "failure-domain.beta.kubernetes.io/zone": "old-z",
        },
    )
    assert pod_locality(pod(), beta) == ("old-r", "old-z", "")
    both = node("n1", **dict(ZONED.labels.items_), **dict(beta.labels.items_))
    assert pod_locality(pod(), both) == ("us-east", "us-east-1a", "")


def test_the_pods_locality_label_overrides_its_node() -> None:
    assert pod_locality(pod(**{"istio-locality": "eu.eu-1b"}), ZONED) == ("eu", "eu-1b", "")
    newer = pod(**{"istio-locality": "eu.eu-1b", "topology.istio.io/locality": "ap.ap-2c.r1"})
    assert pod_locality(newer, ZONED) == ("ap", "ap-2c", "r1")
    assert pod_locality(pod(**{"istio-locality": "eu.eu-1b"}), None) == ("eu", "eu-1b", "")
    assert pod_locality(pod(**{"istio-locality": ""}), ZONED) == ZONED_LOCALITY  # empty: unset


def test_no_node_object_no_locality_and_pod_topology_labels_are_not_read() -> None:
    # Kubernetes puts topology labels on Nodes; Istio does not read them from Pods
    labelled = pod(**{"topology.kubernetes.io/region": "r", "topology.kubernetes.io/zone": "z"})
    assert pod_locality(labelled, None) == NO_LOCALITY
    assert pod_locality(labelled, node("n1")) == NO_LOCALITY


def test_the_snapshot_places_each_pod_once_by_its_nodes_name() -> None:
    snap = MeshSnapshot.build(
        version=1,
        pods=(pod("a", "n1"), pod("b", "n2"), pod("c", "n3")),
        services=(),
        node_objects=(ZONED, node("n2", **{"topology.kubernetes.io/region": "eu"})),
    )
    got = {p.name: p.locality for p in snap.pods}
    assert got == {"a": ZONED_LOCALITY, "b": ("eu", "", ""), "c": NO_LOCALITY}
    assert snap.pod_by_key["default/a"] is snap.pods[0]


MESH = """
apiVersion: v1
kind: Node
metadata:
  name: {node1}
  labels: {{topology.kubernetes.io/region: r1, topology.kubernetes.io/zone: {zone1}}}
---
apiVersion: v1
kind: Node
metadata:
  name: node2
  labels: {{topology.kubernetes.io/region: r1, topology.kubernetes.io/zone: zone-b}}
---
apiVersion: v1
kind: Pod
metadata: {{name: client, namespace: default}}
spec: {{nodeName: node1, containers: [{{name: main}}]}}
status: {{podIP: 10.244.1.2}}
---
apiVersion: v1
kind: Pod
metadata: {{name: web-a, namespace: default, labels: {{app: web}}}}
spec: {{nodeName: node1, containers: [{{name: main}}]}}
status: {{podIP: 10.244.1.3}}
---
apiVersion: v1
kind: Pod
metadata: {{name: web-b, namespace: default, labels: {{app: web}}}}
spec: {{nodeName: node2, containers: [{{name: main}}]}}
status: {{podIP: 10.244.2.2}}
---
apiVersion: v1
kind: Service
metadata: {{name: web, namespace: default}}
spec:
  selector: {{app: web}}
  clusterIP: 10.96.0.10
  ports: [{{name: http, port: 80, targetPort: 8080}}]
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: web, namespace: default}}
spec:
  host: web
  trafficPolicy:
    outlierDetection: {{consecutive5xxErrors: 2, interval: 1s, baseEjectionTime: 30s}}
"""


def picks_from_client(snap: MeshSnapshot, clusters: Clusters, n: int = 20) -> set[str]:
    c = clusters.cluster(snap, Destination("web.default.svc.cluster.local"), 80)
    bal = clusters.balancer(c, snap.pod_by_key["default/client"])
    out = set()
    for _ in range(n):
        ep = bal.pick()
        assert ep is not None
        out.add(ep.pod.name)
    return out


def load(tmp_path: Path, version: int, node1: str = "node1", zone1: str = "zone-a") -> MeshSnapshot:
    (tmp_path / "mesh.yaml").write_text(MESH.format(node1=node1, zone1=zone1))
    return load_directory(tmp_path, version=version).snapshot


def test_config_from_yaml_keeps_a_client_in_its_zone_and_fails_over(tmp_path: Path) -> None:
    clusters = Clusters(BalancerRegistry(lambda: 0.0, random.Random(1), panic_threshold=0))
    snap = load(tmp_path, 1)
    assert snap.pod_by_key["default/web-b"].locality == ("r1", "zone-b", "")
    assert picks_from_client(snap, clusters) == {"web-a"}
    c = clusters.cluster(snap, Destination("web.default.svc.cluster.local"), 80)
    bal = clusters.balancer(c, snap.pod_by_key["default/client"])
    web_a = next(e for e in c.endpoints if e.pod.name == "web-a")
    for _ in range(2):
        bal.report(web_a, 503)
    assert picks_from_client(snap, clusters) == {"web-b"}


def test_a_node_relabelled_or_gone_moves_its_pods_on_the_next_snapshot(tmp_path: Path) -> None:
    clusters = Clusters(BalancerRegistry(lambda: 0.0, random.Random(1), panic_threshold=0))
    assert picks_from_client(load(tmp_path, 1), clusters) == {"web-a"}
    # node1 moves to zone-b: client and both endpoints share a zone
    assert picks_from_client(load(tmp_path, 2, zone1="zone-b"), clusters) == {"web-a", "web-b"}
    # node1 has no Node object: the client has no locality, no tiers
    gone = load(tmp_path, 3, node1="node9")
    assert gone.pod_by_key["default/client"].locality == NO_LOCALITY
    assert picks_from_client(gone, clusters) == {"web-a", "web-b"}
