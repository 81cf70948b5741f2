"""A pod as Istio's telemetry names it: workload from its controller, app, version,
canonical service and revision (``core.workload``)."""

from __future__ import annotations

import pytest

from nodeagent.core.workload import UNKNOWN_PEER, PeerMeta, peer_meta, workload_name
from nodeagent.model.objects import Labels, Pod


def pod(name: str, **labels: str) -> Pod:
    return Pod("shop", name, "node1", labels=Labels.of(labels))


@pytest.mark.parametrize(
    ("name", "labels", "workload"),
    [
        ("reviews-v1", {}, "reviews-v1"),  # a bare pod is its own workload
        ("reviews-v2-5b6c7d8f9-x7k2p", {"pod-template-hash": "5b6c7d8f9"}, "reviews-v2"),
        ("backup-28931520-abcde", {"job-name": "backup-28931520"}, "backup"),  # a CronJob's
        ("migrate-xk2p9", {"job-name": "migrate"}, "migrate"),
        (
            "db-2",
            {"controller-revision-hash": "db-6c8", "statefulset.kubernetes.io/pod-name": "db-2"},
            "db",
        ),
        ("agent-x7k2p", {"controller-revision-hash": "7f9c"}, "agent"),  # a DaemonSet's
        ("odd-5b6c7d8f9-x7k2p", {"service.istio.io/workload-name": "named"}, "named"),
    ],
)
def test_the_workload_is_named_after_the_controller(
    name: str, labels: dict[str, str], workload: str
) -> None:
    assert workload_name(pod(name, **labels)) == workload


def test_app_version_and_canonical_names_follow_istios_order() -> None:
    p = pod("reviews-v2-5b6c7d8f9-x7k2p", **{"pod-template-hash": "5b6c7d8f9"})
    assert peer_meta(p) == PeerMeta(
        "reviews-v2", "shop", "unknown", "unknown", "reviews-v2", "latest", "Kubernetes"
    )
    p = pod("r", app="reviews", version="v2")
    assert peer_meta(p)[2:6] == ("reviews", "v2", "reviews", "v2")
    p = pod("r", app="reviews", version="v2", **{"app.kubernetes.io/name": "rev"})
    assert peer_meta(p).canonical_service == "rev"  # the recommended label first
    p = pod(
        "r",
        app="reviews",
        version="v2",
        **{"service.istio.io/canonical-name": "c", "service.istio.io/canonical-revision": "r9"},
    )
    assert (peer_meta(p).canonical_service, peer_meta(p).canonical_revision) == ("c", "r9")
    assert peer_meta(None) == UNKNOWN_PEER
