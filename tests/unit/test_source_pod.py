"""Which pod a tunnelled connection came from, on the receiving node: the replicas of a
Deployment share one identity, so the client's address picks among them, and only when
the pod there runs as the identity the peer's certificate proves."""

from __future__ import annotations

from nodeagent.model import Labels, MeshSnapshot, Pod
from nodeagent.proxy.plumbing import IdentityIndex


def pod(name: str, ip: str, sa: str) -> Pod:
    return Pod(namespace="default", name=name, node_name="node1", service_account=sa,
               labels=Labels.of({"app": name}), pod_ip=ip)  # fmt: skip


SNAP = MeshSnapshot.build(
    version=1,
    pods=(
        pod("web-1", "10.244.1.2", "web"),
        pod("web-2", "10.244.1.3", "web"),
        pod("db", "10.244.1.4", "db"),
    ),
    services=(),
)
WEB = "spiffe://cluster.local/ns/default/sa/web"
INDEX = IdentityIndex.build(SNAP, lambda p: p.identity())


def test_each_replica_is_named_by_its_address() -> None:
    src = INDEX.source_pod(SNAP, WEB, "10.244.1.3")
    assert src is not None and src.name == "web-2"
    src = INDEX.source_pod(SNAP, WEB, "10.244.1.2")
    assert src is not None and src.name == "web-1"


def test_an_address_of_another_identity_is_not_believed() -> None:
    # the certificate says web; the address claimed is db's: db is not named as the source
    src = INDEX.source_pod(SNAP, WEB, "10.244.1.4")
    assert src is not None and src.name == "web-1"


def test_no_address_or_an_unknown_one_falls_back_to_the_identity() -> None:
    for ip in (None, "", "10.9.9.9"):
        src = INDEX.source_pod(SNAP, WEB, ip)
        assert src is not None and src.name == "web-1"
    assert INDEX.source_pod(SNAP, "spiffe://cluster.local/ns/x/sa/y", "10.244.1.2") is None


def test_a_claimed_address_is_believed_as_far_as_the_identity_vouches() -> None:
    peer = "10.244.9.9"
    assert INDEX.tunnel_source(SNAP, WEB, "10.244.1.3", peer) == (
        "10.244.1.3",
        SNAP.pod_by_ip["10.244.1.3"],  # web-2, not the identity's first pod
    )
    assert INDEX.tunnel_source(SNAP, WEB, None, peer) == (peer, SNAP.pod_by_ip["10.244.1.2"])
    assert INDEX.tunnel_source(SNAP, WEB, "192.0.2.1", peer)[0] == peer  # no pod: not believed
    why = INDEX.tunnel_source(SNAP, WEB, "10.244.1.4", peer)  # the db pod's address
    assert why == (
        "forwarded for=10.244.1.4 is pod default/db, running as "
        "spiffe://cluster.local/ns/default/sa/db, not spiffe://cluster.local/ns/default/sa/web"
    )
