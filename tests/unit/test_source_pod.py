"""Which pod a tunnelled connection came from, on the receiving node: the replicas of a
Deployment share one identity, so the client's address picks among them, and only when
the pod there runs as the identity the peer's certificate proves."""

from __future__ import annotations

from nodeagent.model import Labels, MeshSnapshot, Pod
from nodeagent.model.entries import WorkloadEntry
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


# -- WorkloadEntries: a VM's workload is a source like a pod ------------------------------

NODE = {"nodeagent.io/node": "vm-1"}
VM = "spiffe://cluster.local/ns/default/sa/ratings"
ENTRIES = (
    WorkloadEntry("default", "ratings-vm-1", "192.168.121.10", service_account="ratings",
                  annotations=Labels.of(NODE)),
    WorkloadEntry("default", "ratings-vm-2", "192.168.121.11", service_account="ratings"),
    WorkloadEntry("default", "squatter", "10.244.1.4", service_account="squatter"),  # db's IP
    WorkloadEntry("default", "by-name", "vm.example.com", service_account="by-name"),
)  # fmt: skip
VM_SNAP = MeshSnapshot.build(version=1, pods=SNAP.pods, services=(), workload_entries=ENTRIES)
VM_INDEX = IdentityIndex.build(VM_SNAP, lambda p: p.identity())


def test_a_workload_entry_is_the_source_at_its_address() -> None:
    src = VM_INDEX.source_pod(VM_SNAP, VM, "192.168.121.11")
    assert src is not None and (src.kind, src.name) == ("WorkloadEntry", "ratings-vm-2")
    src = VM_INDEX.source_pod(VM_SNAP, VM, None)  # no address: the identity's first workload
    assert src is not None and src.name == "ratings-vm-1"


def test_a_vms_forwarded_address_is_believed_only_for_its_identity() -> None:
    peer = "10.244.9.9"
    ok = VM_INDEX.tunnel_source(VM_SNAP, VM, "192.168.121.11", peer)
    assert ok == ("192.168.121.11", VM_SNAP.pod_by_ip["192.168.121.11"])
    why = VM_INDEX.tunnel_source(VM_SNAP, WEB, "192.168.121.10", peer)  # a pod claims the VM's
    assert why == (
        f"forwarded for=192.168.121.10 is WorkloadEntry default/ratings-vm-1, running as {VM}, "
        f"not {WEB}"
    )


def test_an_entry_at_a_pods_address_does_not_shadow_the_pod() -> None:
    assert VM_SNAP.pod_by_ip["10.244.1.4"].key == "default/db"
    squatter = "spiffe://cluster.local/ns/default/sa/squatter"
    why = VM_INDEX.tunnel_source(VM_SNAP, squatter, "10.244.1.4", "10.244.9.9")
    assert isinstance(why, str) and "is pod default/db" in why
    assert VM_INDEX.source_pod(VM_SNAP, squatter, "10.244.1.4") is None  # known by no address


def test_an_entry_at_a_dns_name_has_no_address_in_the_mesh() -> None:
    assert "vm.example.com" not in VM_SNAP.pod_by_ip
    assert "vm.example.com" not in VM_INDEX.identity_at


def test_only_an_entry_with_a_node_shares_a_tunnel_peer() -> None:
    assert VM_INDEX.tunnel_peer[("vm-1", VM)] == "192.168.121.10"
    assert ("", VM) not in VM_INDEX.tunnel_peer  # ratings-vm-2 is remote: its own address
