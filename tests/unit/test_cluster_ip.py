"""A Service written without ``spec.clusterIP`` (as almost every user writes one) gets an
address, as the API server would give it: the same on every reload, when other Services
come, and in every process that loads the directory (the sandbox and each node's agent);
and the sandbox's pods find it by name."""

from __future__ import annotations

import ipaddress
import os
import subprocess
import sys
from pathlib import Path

from nodeagent.control.clusterip import SERVICE_CIDR, STATIC_BAND
from nodeagent.control.files import load_directory
from nodeagent.core.dns import DnsTable
from nodeagent.sandbox.topology import FABRIC_NET, POD_SUPERNET, plan

ROOT = Path(__file__).resolve().parents[2]


def service(name: str, namespace: str = "default", cluster_ip: str = "") -> str:
    spec = "{selector: {app: web}, ports: [{name: http, port: 80, targetPort: 8080}]"
    if cluster_ip:
        spec += f", clusterIP: {cluster_ip}"
    return (
        f"---\napiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: {namespace}}}"
        f"\nspec: {spec}}}\n"
    )


def pod(name: str, node: str, namespace: str = "default") -> str:
    return (
        f"---\napiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: {namespace}, "
        f"labels: {{app: web}}}}\nspec: {{nodeName: {node}, containers: [{{name: c, "
        "command: [sleep, infinity], ports: [{containerPort: 8080}]}]}\n"
    )


def address_of(directory: Path, key: str) -> str:
    svc = next(s for s in load_directory(directory).snapshot.services if s.key == key)
    assert svc.cluster_ip is not None
    return svc.cluster_ip


def test_a_service_without_cluster_ip_gets_one_in_the_service_cidr(tmp_path: Path) -> None:
    (tmp_path / "web.yaml").write_text(pod("web-1", "node1") + service("web"))
    loaded = load_directory(tmp_path)
    (svc,) = loaded.snapshot.services
    assert svc.cluster_ip is not None
    addr = ipaddress.ip_address(svc.cluster_ip)
    # in kubeadm's service CIDR, above the band left to hand-picked addresses
    assert addr in SERVICE_CIDR and int(addr) >= int(SERVICE_CIDR.network_address) + STATIC_BAND
    assert loaded.snapshot.service_by_ip[svc.cluster_ip] is svc
    # the config dump shows it where the API server would
    raw = next(o for o in loaded.objects if o["kind"] == "Service")
    assert raw["spec"]["clusterIP"] == svc.cluster_ip
    assert raw["spec"]["clusterIPs"] == [svc.cluster_ip]


def test_the_address_stays_across_reloads_and_when_services_are_added(tmp_path: Path) -> None:
    (tmp_path / "web.yaml").write_text(pod("web-1", "node1") + service("web"))
    first = address_of(tmp_path, "default/web")
    assert address_of(tmp_path, "default/web") == first
    (tmp_path / "more.yaml").write_text(
        "".join(service(f"svc-{i}", "shop") for i in range(40))
        + pod("web-2", "node2", "shop")
        + service("aaa")  # sorts before web: allocated first
    )
    snap = load_directory(tmp_path).snapshot
    assert address_of(tmp_path, "default/web") == first
    addresses = [s.cluster_ip for s in snap.services]
    assert len(set(addresses)) == len(addresses) == 42


def test_the_address_is_the_same_in_every_process(tmp_path: Path) -> None:
    (tmp_path / "web.yaml").write_text(pod("web-1", "node1") + service("web") + service("api"))
    here = [address_of(tmp_path, "default/web"), address_of(tmp_path, "default/api")]
    code = (
        "import sys\nfrom nodeagent.control.files import load_directory\n"
        "snap = load_directory(sys.argv[1]).snapshot\n"
        "print(' '.join(s.cluster_ip for k in ('default/web', 'default/api')"
        " for s in snap.services if s.key == k))\n"
    )
    for seed in ("1", "2"):  # str hashes differ between these processes; the address not
        env = {**os.environ, "PYTHONHASHSEED": seed, "PYTHONPATH": str(ROOT)}
        out = subprocess.run(
            [sys.executable, "-c", code, str(tmp_path)],
            env=env,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.split()
        assert out == here


def test_a_headless_service_stays_without_an_address(tmp_path: Path) -> None:
    (tmp_path / "web.yaml").write_text(pod("web-1", "node1") + service("web", cluster_ip="None"))
    (svc,) = load_directory(tmp_path).snapshot.services
    assert svc.cluster_ip is None


def test_an_address_written_by_hand_wins_and_the_allocation_moves_past_it(
    tmp_path: Path,
) -> None:
    (tmp_path / "web.yaml").write_text(pod("web-1", "node1") + service("web"))
    taken = address_of(tmp_path, "default/web")
    (tmp_path / "db.yaml").write_text(service("db", cluster_ip=taken))
    snap = load_directory(tmp_path).snapshot
    by_key = {s.key: s.cluster_ip for s in snap.services}
    assert by_key["default/db"] == taken
    moved = by_key["default/web"]
    assert moved is not None and moved != taken
    assert ipaddress.ip_address(moved) in SERVICE_CIDR


def test_pods_resolve_the_allocated_address(tmp_path: Path) -> None:
    (tmp_path / "web.yaml").write_text(
        pod("client", "node1") + pod("web-1", "node2") + service("web")
    )
    snap = load_directory(tmp_path).snapshot
    addr = address_of(tmp_path, "default/web")
    answer = DnsTable.build(snap).lookup("web", "default", 4)  # the agents' DNS proxy
    assert answer is not None and answer.addresses == (addr,)
    topo = plan(snap, dns_proxy=False)  # the sandbox's hosts files without it
    for p in topo.pods:
        assert f"{addr}\tweb web.default web.default.svc web.default.svc.cluster.local\n" in (
            p.hosts
        )
    # the service CIDR never overlaps the sandbox's own networks
    assert not SERVICE_CIDR.overlaps(POD_SUPERNET) and not SERVICE_CIDR.overlaps(FABRIC_NET)
