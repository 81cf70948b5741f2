"""End to end, in both capture modes: MeshConfig ``outboundTrafficPolicy: REGISTRY_ONLY``
refuses a pod's connection to an address in no Service or ServiceEntry (the proxy closes
it, counted ``NR``, and the listener there never sees it); a ServiceEntry's address and
a mesh Service still work; the ConfigMap switched to ``ALLOW_ANY`` (hot reload) lets the
outside address through, in eBPF mode directly (not captured at all).

The outside is a network namespace this test makes, on the sandbox's fabric bridge, with
192.0.2.51 (in no registry) and 192.0.2.52 (a ServiceEntry's) behind it; node1 routes
there. In eBPF mode a real IPv6 connect is refused at ``connect()`` under REGISTRY_ONLY
(the mesh and its registry are IPv4), and a killed agent leaves the outside refused.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from meshops import apply_file, http_status

from nodeagent.redirect import ebpf
from nodeagent.sandbox import Sandbox
from nodeagent.sandbox.agents import BPF_PIN_DIR
from nodeagent.sandbox.netlink import netns_path, run_in_netns
from nodeagent.sandbox.topology import FABRIC_BRIDGE, FABRIC_NETNS

pytestmark = [
    pytest.mark.privileged,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root for netns, iptables and BPF"),
]

OUTSIDE_NETNS = "regtest-outside"
"""Not ``na-``: the sandbox's own names are its to remove."""
OUTSIDE_FABRIC_IP = "10.250.0.251"
UNLISTED = "192.0.2.51"
LISTED = "192.0.2.52"
PORT = 9000

MESH = f"""
apiVersion: v1
kind: Pod
metadata: {{name: client, namespace: default, labels: {{app: client}}}}
spec: {{nodeName: node1, containers: [{{name: main, command: [sleep, infinity]}}]}}
---
apiVersion: v1
kind: Pod
metadata: {{name: web, namespace: default, labels: {{app: web}}}}
spec:
  nodeName: node2
  containers:
  - name: main
    command: [nodeagent, sample-app, --port, "8080", --service, web]
    ports: [{{name: http, containerPort: 8080}}]
---
apiVersion: v1
kind: Service
metadata: {{name: web, namespace: default}}
spec:
  selector: {{app: web}}
  ports: [{{name: http, port: 80, targetPort: http}}]
---
# the one outside address the registry knows (and an IPv6 one, which eBPF capture
# cannot steer: still refused under REGISTRY_ONLY)
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: listed, namespace: default}}
spec:
  hosts: [listed.outside.test]
  addresses: [{LISTED}, "2001:db8::52"]
  location: MESH_EXTERNAL
  resolution: NONE
  ports: [{{number: {PORT}, name: tcp, protocol: TCP}}]
"""


def mesh_config(mode: str) -> str:
    return f"""
apiVersion: v1
kind: ConfigMap
metadata: {{name: istio, namespace: istio-system}}
data:
  mesh: |
    outboundTrafficPolicy:
      mode: {mode}
"""


@pytest.fixture(scope="module")
def config_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("registry-mesh")
    (d / "mesh.yaml").write_text(MESH)
    (d / "meshconfig.yaml").write_text(mesh_config("REGISTRY_ONLY"))
    return d


class Outside:
    """A listener on ``PORT`` of every address of the outside netns: it answers
    ``hello`` and records who connected (``peers``)."""

    def __init__(self) -> None:
        self.server: socket.socket = run_in_netns(
            OUTSIDE_NETNS, lambda: socket.create_server(("0.0.0.0", PORT))
        )
        self.peers: list[str] = []
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        with contextlib.suppress(OSError):
            while True:
                conn, addr = self.server.accept()
                with conn:
                    self.peers.append(addr[0])
                    conn.sendall(b"hello\n")

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.server.shutdown(socket.SHUT_RDWR)
        self.server.close()


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=30)


@pytest.fixture(scope="module")
def outside(sb: Sandbox) -> Iterator[Outside]:
    node1 = sb.node_netns("node1")
    subprocess.run(["ip", "netns", "del", OUTSIDE_NETNS], capture_output=True, check=False)
    ip("netns", "add", OUTSIDE_NETNS)
    server: Outside | None = None
    try:
        ip("-n", OUTSIDE_NETNS, "link", "add", "eth0", "type", "veth", "peer", "regout",
           "netns", FABRIC_NETNS)  # fmt: skip
        ip("-n", FABRIC_NETNS, "link", "set", "regout", "master", FABRIC_BRIDGE, "up")
        ip("-n", OUTSIDE_NETNS, "addr", "add", f"{OUTSIDE_FABRIC_IP}/24", "dev", "eth0")
        for a in (UNLISTED, LISTED):
            ip("-n", OUTSIDE_NETNS, "addr", "add", f"{a}/32", "dev", "eth0")
        ip("-n", OUTSIDE_NETNS, "link", "set", "eth0", "up")
        ip("-n", OUTSIDE_NETNS, "link", "set", "lo", "up")
        ip("-n", OUTSIDE_NETNS, "route", "add", "10.244.0.0/16", "via", sb.node_ip("node1"))
        ip("-n", node1, "route", "add", "192.0.2.0/24", "via", OUTSIDE_FABRIC_IP)
        server = Outside()
        yield server
    finally:
        if server is not None:
            server.close()
        subprocess.run(["ip", "-n", node1, "route", "del", "192.0.2.0/24"], capture_output=True,
                       check=False)  # fmt: skip
        subprocess.run(["ip", "netns", "del", OUTSIDE_NETNS], capture_output=True, check=False)


CLIENT = (
    "import socket,sys\n"
    "host, port = sys.argv[1], int(sys.argv[2])\n"
    "family = socket.AF_INET6 if ':' in host else socket.AF_INET\n"
    "s = socket.socket(family, socket.SOCK_STREAM)\n"
    "s.settimeout(10)\n"
    "try:\n"
    "    s.connect((host, port))\n"
    "    print('got', s.recv(100).decode().strip() or 'EOF')\n"
    "except OSError as e:\n"
    "    print('error', type(e).__name__)\n"
)


def dial(sb: Sandbox, host: str) -> str:
    """What a plain TCP client in the client pod gets from ``host:PORT``: ``got hello``,
    ``got EOF`` or ``error <exception>``."""
    p = sb.exec("client", [sys.executable, "-c", CLIENT, host, str(PORT)],
                capture_output=True, text=True, timeout=30)  # fmt: skip
    assert p.returncode == 0, p.stderr
    return str(p.stdout).strip()


def refused(sb: Sandbox) -> float:
    """``NR`` outbound failures counted by node1's agent (the client's)."""
    p = subprocess.run(
        ["nsenter", f"--net={netns_path(sb.node_netns('node1'))}", "curl", "-sS",
         "http://127.0.0.1:15020/metrics"],
        capture_output=True, text=True, timeout=10, check=True,
    )  # fmt: skip
    total = 0.0
    for line in p.stdout.splitlines():
        name, _, rest = line.partition("{")
        if (name == "nodeagent_connection_failures_total" and 'response_flags="NR"' in rest
                and 'direction="outbound"' in rest):  # fmt: skip
            total += float(line.rsplit(" ", 1)[1])
    return total


def stat(name: str) -> int:
    return ebpf.read_stats(f"{BPF_PIN_DIR}/node1")[name]


def test_an_address_outside_the_registry_is_refused_with_nr(
    sb: Sandbox, outside: Outside, redirect: str
) -> None:
    before = refused(sb)
    captured = stat("captured") if redirect == "ebpf" else 0
    for host in (UNLISTED, f"::ffff:{UNLISTED}"):  # and as a dual-stack socket dials it
        got = dial(sb, host)
        assert got in ("got EOF", "error ConnectionResetError"), (host, got)
    assert outside.peers == []  # closed by the proxy before anything left the node
    assert refused(sb) == before + 2
    if redirect == "ebpf":
        assert stat("captured") == captured + 2  # steered though in no mesh_ips entry
        assert ebpf.capture_all(f"{BPF_PIN_DIR}/node1")


def test_a_service_entry_address_and_the_mesh_still_work(sb: Sandbox, outside: Outside) -> None:
    before = refused(sb)
    assert dial(sb, LISTED) == "got hello"
    assert len(outside.peers) == 1
    assert http_status(sb, "client", "http://web/")[0] == 200
    assert refused(sb) == before
    outside.peers.clear()


@pytest.mark.redirect_modes("ebpf")
def test_real_ipv6_is_refused_at_connect_in_ebpf_mode(sb: Sandbox, outside: Outside) -> None:
    before = stat("v6_refused")
    # in no registry, and in one (the ServiceEntry's IPv6 address): neither can be steered
    assert dial(sb, "2001:db8::51") == "error PermissionError"
    assert dial(sb, "2001:db8::52") == "error PermissionError"
    assert stat("v6_refused") == before + 2
    # this host's own IPv6 is left alone (nothing listens there)
    assert dial(sb, "::1") != "error PermissionError"
    assert stat("v6_refused") == before + 2


def test_allow_any_lets_the_outside_address_through_again(
    sb: Sandbox, outside: Outside, config_dir: Path, redirect: str
) -> None:
    meshconfig = config_dir / "meshconfig.yaml"
    outside.peers.clear()
    try:
        apply_file(sb, meshconfig, mesh_config("ALLOW_ANY"))
        before = refused(sb)
        captured = stat("captured") if redirect == "ebpf" else 0
        assert dial(sb, UNLISTED) == "got hello"
        assert outside.peers == [sb.pod_ip("client")]
        assert refused(sb) == before
        if redirect == "ebpf":  # directly: the programs left it alone
            assert stat("captured") == captured
            assert not ebpf.capture_all(f"{BPF_PIN_DIR}/node1")
            # and real IPv6 is the pod's own business again (no route here)
            assert dial(sb, "2001:db8::51") == "error OSError"
    finally:
        apply_file(sb, meshconfig, mesh_config("REGISTRY_ONLY"))
    outside.peers.clear()
    assert dial(sb, UNLISTED) in ("got EOF", "error ConnectionResetError")
    assert outside.peers == []


@pytest.mark.redirect_modes("ebpf")
def test_with_the_agent_killed_the_outside_stays_refused(sb: Sandbox, outside: Outside) -> None:
    # the switch is pinned with the programs: nothing leaks while the agent is away
    sb.stop_agent("node1")
    try:
        assert dial(sb, UNLISTED) == "error ConnectionRefusedError"
        assert outside.peers == []
    finally:
        sb.restart_agent("node1")
    assert dial(sb, UNLISTED) in ("got EOF", "error ConnectionResetError")
    assert dial(sb, LISTED) == "got hello"
    out = subprocess.run(
        [sys.executable, "-m", "nodeagent", "ctl", "--socket", sb.agent_socket("node1"), "bpf",
         "-o", "json"], capture_output=True, text=True, timeout=30, check=True,
    ).stdout  # fmt: skip
    assert json.loads(out)["outbound"] == "all TCP (REGISTRY_ONLY)"
