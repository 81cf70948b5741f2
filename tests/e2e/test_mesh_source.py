"""End to end, in both capture modes: the destination app sees the client's address, not
the proxy's (the proxy's upstream socket in the destination pod binds to it with
``IP_TRANSPARENT``; the pod's netns routes the app's answers back to the proxy: iptables
``apply_source_routing`` with connmark, or with eBPF ``srcroute`` with the socket mark the
app's end takes from the SYN): over HBONE from another node, from the same node, on a port
served request by request, in plaintext from outside the mesh; a pod calling itself
through its Service still works. With eBPF the proxy's connection to the app is not
steered back to the proxy's own 15006 listener. A pod that leaves the mesh keeps none of
the routing in its netns.

Mesh: ``client`` on node1; ``echo-1``, ``echo-2`` and ``victim`` on node2 (``tests/e2e/mesh``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from meshops import apply_file, http_status

from nodeagent.admin.client import AdminClient
from nodeagent.redirect import ebpf, libbpf
from nodeagent.redirect.capture import MIGRATE_REQ
from nodeagent.redirect.netns import netns_path
from nodeagent.sandbox import Sandbox
from nodeagent.sandbox.agents import BPF_PIN_DIR

pytestmark = [
    pytest.mark.privileged,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root for netns and iptables"),
]

TCPCLIENT = str(Path(__file__).parent / "tcpclient.py")

# an HTTP rule: echo's port 8080 is served request by request
DENY_ADMIN = """
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: no-admin, namespace: default}
spec:
  selector: {matchLabels: {app: echo}}
  action: DENY
  rules:
  - to: [{operation: {paths: ["/admin*"]}}]
"""

# the routing each mode leaves in a pod's netns (``ip rule`` line, sysctl)
RULES = {"iptables": "fwmark 0x111/0xfff lookup 100", "ebpf": "fwmark 0x1539 lookup 100"}
FWMARK_ACCEPT = {"iptables": "0 0", "ebpf": "1 1"}


IPTABLES_PORT_CLASH = (
    "known: in iptables mode the proxy's leg from the client's own port has the tuple of "
    "the client's conntrack entry (REDIRECTed to 15006), so its SYN is taken for the "
    "client's and hangs; a conntrack zone for the proxy's marked legs would part them"
)


def seen_by_app(sb: Sandbox, pod: str, url: str) -> str:
    code, body = http_status(sb, pod, url)
    assert code == 200, (code, body)
    client: str = json.loads(body)["client"]
    return client.rsplit(":", 1)[0]


def in_netns(netns: str, *argv: str) -> str:
    return subprocess.run(
        ["nsenter", f"--net={netns_path(netns)}", *argv],
        capture_output=True, text=True, check=True, timeout=30,
    ).stdout  # fmt: skip


def routing(netns: str) -> tuple[str, str, str]:
    """(``ip rule``, the routes of table 100, ``tcp_fwmark_accept`` and
    ``fwmark_reflect``) in ``netns``."""
    routes = in_netns(netns, "ip", "route", "show", "table", "all").splitlines(keepends=True)
    return (
        in_netns(netns, "ip", "rule", "show"),
        "".join(ln for ln in routes if " table 100 " in ln),
        " ".join(
            in_netns(
                netns, "sysctl", "-n", "net.ipv4.tcp_fwmark_accept", "net.ipv4.fwmark_reflect"
            ).split()
        ),
    )


def migrate_req(netns: str) -> str:
    """``tcp_migrate_req`` in ``netns``: 1 while the pod is captured (a closing listener of
    a worker's group hands its queued connections on)."""
    return in_netns(netns, "sysctl", "-n", MIGRATE_REQ).strip()


def eventually(check: Callable[[], bool], timeout: float = 5.0) -> bool:
    """Whether ``check()`` holds within ``timeout`` seconds (a pod's capture follows a
    config change a moment after the agents load it)."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def steered(redirect: str) -> tuple[int, int]:
    """(connections node2's sk_lookup steered to a proxy listener, the proxy's own
    connections to an app it let through); (0, 0) with iptables."""
    if redirect != "ebpf":
        return 0, 0
    stats = ebpf.read_stats(f"{BPF_PIN_DIR}/node2")
    return stats["inbound_steered"], stats["own_legs_passed"]


def own_legs(redirect: str) -> int:
    """Entries left in node2's ``own_legs`` map (handshakes in flight: none at rest)."""
    if redirect != "ebpf":
        return 0
    with libbpf.pinned(ebpf.maps_path(f"{BPF_PIN_DIR}/node2"), "own_legs") as fd:
        return libbpf.map_count(fd, 16)


def test_the_app_sees_the_client_pods_address(sb: Sandbox, config_dir: Path, redirect: str) -> None:
    in0, legs0 = steered(redirect)
    assert seen_by_app(sb, "client", "http://echo/") == sb.pod_ip("client")  # HBONE, L4
    assert seen_by_app(sb, "victim", "http://echo/") == sb.pod_ip("victim")  # same node
    # HBONE arrives on 15008, never steered; the proxy's legs to the app are let through
    legs = 2 if redirect == "ebpf" else 0
    assert steered(redirect) == (in0, legs0 + legs)
    assert own_legs(redirect) == 0
    path = config_dir / "authz-source.yaml"
    apply_file(sb, path, DENY_ADMIN)
    try:
        # a port served request by request (L7)
        assert seen_by_app(sb, "client", "http://echo/") == sb.pod_ip("client")
    finally:
        apply_file(sb, path, None)
    # the routing is in the pod's netns: the app's answers go back to the proxy
    rules, routes, accept_mark = routing(sb.pod_netns("echo-1"))
    assert f"32764:\tfrom all {RULES[redirect]}" in rules, rules
    assert "local default dev lo" in routes, routes
    assert accept_mark == FWMARK_ACCEPT[redirect]
    assert migrate_req(sb.pod_netns("echo-1")) == "1"
    with AdminClient(sb.agent_socket("node2")) as c:
        assert "apps see their pod's address" not in c.status()["redirect_mode"]


def test_plaintext_from_outside_the_mesh_is_steered_once(sb: Sandbox, redirect: str) -> None:
    """From node2 itself (no mesh pod: plaintext to the pod IP): steered to 15006 once,
    and the proxy's connection to the app from node2's address reaches the app."""
    url = f"http://{sb.pod_ip('echo-1')}:8080/"
    in0, legs0 = steered(redirect)
    out = in_netns(sb.node_netns("node2"), "curl", "-s", "-m", "10", "-w", "\n%{local_ip}", url)
    body, _, local_ip = out.rpartition("\n")  # node2's address towards the pods
    assert json.loads(body)["client"].rsplit(":", 1)[0] == local_ip, out
    n = 1 if redirect == "ebpf" else 0
    assert steered(redirect) == (in0 + n, legs0 + n)
    assert own_legs(redirect) == 0


def test_the_proxy_never_takes_a_plaintext_clients_own_port(
    sb: Sandbox, redirect: str, request: pytest.FixtureRequest
) -> None:
    """The proxy's connection to the app binds the client's address, on a port the kernel
    picks in the pod's netns, where the client's own connection to the app may live with
    the same tuple reversed (eBPF's sk_lookup keeps it): that port is refused and another
    taken. Made certain: echo-1's netns has two ephemeral ports, and a bind's first pick is
    the odd one, the client's own."""
    if redirect == "iptables":
        request.applymarker(pytest.mark.xfail(strict=True, reason=IPTABLES_PORT_CLASH))
    netns, url = sb.pod_netns("echo-1"), f"http://{sb.pod_ip('echo-1')}:8080/"
    low, high = in_netns(netns, "sysctl", "-n", "net.ipv4.ip_local_port_range").split()
    in_netns(netns, "sysctl", "-q", "-w", "net.ipv4.ip_local_port_range=40000 40001")
    try:
        out = in_netns(sb.node_netns("node2"), "curl", "-s", "-m", "10", "--local-port",
                       "40001", "-w", "\n%{local_ip}", url)  # fmt: skip
    finally:
        in_netns(netns, "sysctl", "-q", "-w", f"net.ipv4.ip_local_port_range={low} {high}")
    body, _, local_ip = out.rpartition("\n")
    assert json.loads(body)["client"] == f"{local_ip}:40000", out


def test_a_pod_calling_itself_through_its_service(sb: Sandbox) -> None:
    for _ in range(4):  # both endpoints, itself among them
        assert seen_by_app(sb, "echo-1", "http://echo/") == sb.pod_ip("echo-1")
    p = sb.exec("echo-1", [sys.executable, TCPCLIENT, "echo", "echo", "9000", "--bytes", "1000"],
                capture_output=True, text=True, timeout=60)  # fmt: skip
    assert p.returncode == 0 and json.loads(p.stdout.strip().splitlines()[-1])["ok"] == 1


def test_a_pod_leaving_the_mesh_keeps_no_routing(sb: Sandbox, config_dir: Path) -> None:
    netns = sb.pod_netns("victim")
    assert "lookup 100" in routing(netns)[0]
    pods = config_dir / "pods.yaml"
    original = pods.read_text()
    kept = [d for d in original.split("\n---\n") if "name: victim," not in d]
    services = config_dir / "services.yaml"
    svc_original = services.read_text()
    svc_kept = [d for d in svc_original.split("\n---\n") if "app: victim" not in d]
    try:  # the services selecting victim go first, or they would select nothing
        apply_file(sb, services, "\n---\n".join(svc_kept))
        apply_file(sb, pods, "\n---\n".join(kept))
        assert eventually(lambda: routing(netns)[1:] == ("", "0 0"))
        assert "lookup 100" not in routing(netns)[0]
        assert eventually(lambda: migrate_req(netns) == "0")
    finally:
        apply_file(sb, pods, original)
        apply_file(sb, services, svc_original)
    url = f"http://{sb.pod_ip('victim')}:8080/"
    assert eventually(lambda: "lookup 100" in routing(netns)[0])
    assert eventually(lambda: migrate_req(netns) == "1")
    assert seen_by_app(sb, "client", url) == sb.pod_ip("client")
