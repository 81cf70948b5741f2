"""Host mode, planned without a host: the iptables rules of a host's workloads
(``redirect/hostmode.render``), the cgroup v2 mount they are relative to, and how the
sandbox places a "vm" node's workloads (``sandbox.topology.plan``)."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from nodeagent.control.files import load_directory
from nodeagent.errors import ConfigErrors, LocalStateError
from nodeagent.model.objects import HostWorkload
from nodeagent.redirect.hostmode import Placed, cgroup2_mount, render, render_removal
from nodeagent.sandbox.topology import Route, Topology, plan

RATINGS = HostWorkload(
    key="default/ratings-vm",
    ip="192.168.50.10",
    cgroup="/system.slice/ratings.service",
    loopback="127.77.1.2",
    inbound_ports=(9080, 9443),
    exclude_outbound_ports=frozenset({5432}),
    exclude_inbound_ports=frozenset({9443}),
)


def test_a_workloads_rules_match_its_cgroup_and_its_declared_ports_only() -> None:
    rules = render([Placed(RATINGS, "/system.slice/ratings.service")], dns_port=15053)
    assert rules.splitlines() == [
        "*nat",
        ":NODEAGENT_HOST_OUT - [0:0]",
        ":NODEAGENT_HOST_IN - [0:0]",
        ":NODEAGENT_HW1 - [0:0]",
        "-A OUTPUT -j NODEAGENT_HOST_OUT",
        "-A PREROUTING -p tcp -j NODEAGENT_HOST_IN",
        "-A NODEAGENT_HOST_OUT -m mark --mark 0x539/0xfff -j RETURN",
        '-A NODEAGENT_HOST_OUT -m cgroup --path "/system.slice/ratings.service" -j NODEAGENT_HW1',
        "-A NODEAGENT_HW1 -o lo -j RETURN",
        "-A NODEAGENT_HW1 -p udp --dport 53 -j DNAT --to-destination 127.77.1.2:15053",
        "-A NODEAGENT_HW1 -p tcp --dport 53 -j DNAT --to-destination 127.77.1.2:15053",
        "-A NODEAGENT_HW1 -p tcp --dport 5432 -j RETURN",
        "-A NODEAGENT_HW1 -p tcp -j DNAT --to-destination 127.77.1.2:15001",
        "-A NODEAGENT_HOST_IN -d 192.168.50.10/32 -p tcp -m multiport --dports 9080 "
        "-j DNAT --to-destination 192.168.50.10:15006",
        "COMMIT",
    ]


def test_without_a_cgroup_only_inbound_is_steered() -> None:
    rules = render([Placed(RATINGS, "")], dns_port=None)
    assert "-m cgroup" not in rules
    assert "--dports 9080 -j DNAT --to-destination 192.168.50.10:15006" in rules
    assert "15053" not in rules


def test_rendering_again_adds_no_second_jump_and_drops_chains_of_workloads_gone() -> None:
    existing = textwrap.dedent("""\
        *nat
        :NODEAGENT_HOST_OUT - [0:0]
        :NODEAGENT_HW1 - [0:0]
        :NODEAGENT_HW2 - [0:0]
        -A OUTPUT -j NODEAGENT_HOST_OUT
        -A PREROUTING -p tcp -j NODEAGENT_HOST_IN
        COMMIT
    """)
    rules = render([Placed(RATINGS, "/x")], dns_port=None, existing_nat=existing).splitlines()
    assert "-A OUTPUT -j NODEAGENT_HOST_OUT" not in rules
    assert rules[-3:] == ["-F NODEAGENT_HW2", "-X NODEAGENT_HW2", "COMMIT"]


def test_many_ports_are_split_into_multiport_rules_of_fifteen() -> None:
    many = HostWorkload("default/w", "10.0.0.1", "", "127.77.0.1", tuple(range(8000, 8020)))
    lines = [ln for ln in render([Placed(many, "")], None).splitlines() if "--dports" in ln]
    assert len(lines) == 2 and lines[1].split("--dports ")[1].startswith("8015,8016")


def test_removal_takes_out_every_chain_and_jump_of_host_mode() -> None:
    existing = textwrap.dedent("""\
        *nat
        :NODEAGENT_HOST_OUT - [0:0]
        :NODEAGENT_HOST_IN - [0:0]
        :NODEAGENT_HW1 - [0:0]
        :NODEAGENT_OUTPUT - [0:0]
        -A OUTPUT -j NODEAGENT_HOST_OUT
        -A PREROUTING -p tcp -j NODEAGENT_HOST_IN
        COMMIT
    """)
    lines = render_removal(existing).splitlines()
    assert "-D OUTPUT -j NODEAGENT_HOST_OUT" in lines
    assert "-X NODEAGENT_HW1" in lines and "-X NODEAGENT_HOST_IN" in lines
    assert not any("NODEAGENT_OUTPUT" in ln for ln in lines)  # a pod's chain: not ours
    assert render_removal("*nat\nCOMMIT\n") == ""


def test_the_cgroup_v2_mount_is_found_on_hybrid_and_unified_hosts() -> None:
    hybrid = (
        "cgroup /sys/fs/cgroup/cpu cgroup rw 0 0\ncgroup2 /sys/fs/cgroup/unified cgroup2 rw 0 0\n"
    )
    assert cgroup2_mount(hybrid) == Path("/sys/fs/cgroup/unified")
    assert cgroup2_mount("cgroup2 /sys/fs/cgroup cgroup2 rw 0 0\n") == Path("/sys/fs/cgroup")
    with pytest.raises(LocalStateError, match="no cgroup v2"):
        cgroup2_mount("proc /proc proc rw 0 0\n")


VM_MESH = """
apiVersion: v1
kind: Pod
metadata: {name: client, namespace: default}
spec: {nodeName: node1, containers: [{name: c, command: [sleep, infinity]}]}
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata:
  name: ratings-vm
  namespace: default
  annotations: {nodeagent.io/node: vm-1, nodeagent.io/cgroup: ratings.service}
spec: {address: ADDRESS, serviceAccount: ratings, ports: {http: 9080}}
"""


def _plan(tmp_path: Path, address: str = "192.168.50.10") -> Topology:
    (tmp_path / "mesh.yaml").write_text(VM_MESH.replace("ADDRESS", address))
    return plan(load_directory(tmp_path).snapshot)


def test_a_vm_node_hosts_its_entries_in_its_own_netns_and_every_node_routes_to_them(
    tmp_path: Path,
) -> None:
    topo = _plan(tmp_path)
    node1, vm = topo.node("node1"), topo.node("vm-1")
    assert vm.host_addresses == ("192.168.50.10",)
    assert Route(dst="192.168.50.10/32", via=vm.ip) in node1.routes
    assert Route(dst="default", via="") in vm.routes and node1.host_addresses == ()
    w = topo.pod("default/ratings-vm")
    assert w.host and w.netns == vm.netns and w.ip == "192.168.50.10"
    assert w.cgroup == "nodeagent/hosts/vm-1/system.slice/ratings.service"
    assert w.ports == (9080,)
    assert vm.netns in topo.netns_names()
    assert "na-p-default-ratings-vm" not in topo.netns_names()


@pytest.mark.parametrize(
    ("address", "why"),
    [
        ("10.244.3.7", "inside the sandbox's pod or node network"),
        ("127.0.0.5", "or reserved"),
        ("ratings.example.com", "needs an IPv4 address"),
    ],
)
def test_a_vm_address_the_sandbox_cannot_give_is_an_error_naming_the_entry(
    tmp_path: Path, address: str, why: str
) -> None:
    with pytest.raises(ConfigErrors) as e:
        _plan(tmp_path, address)
    assert "WorkloadEntry default/ratings-vm: spec.address" in str(e.value) and why in str(e.value)
