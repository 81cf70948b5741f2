"""End to end: pods resolve names through the agent's DNS proxy (their port 53 captured,
their resolv.conf naming kubeadm's DNS address, nothing listening there).

Real resolvers ask: glibc's (``getent``, ``curl``) over UDP, dnspython over TCP. The
mesh's names (a Service in its search forms, from another namespace, a headless
Service, a ServiceEntry host with its auto-allocated address) are answered by the
agent; other names are forwarded to a resolver this test runs on the sandbox's fabric,
which sees the query come from the node's address (the agent's own query, not captured
again). A connection to the ServiceEntry host's address is routed to its workload.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import socket
import struct
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import dns.message
import dns.rcode
import dns.rrset
import pytest

from nodeagent.control.files import load_directory
from nodeagent.sandbox import Sandbox
from nodeagent.sandbox.netlink import run_in_netns
from nodeagent.sandbox.topology import FABRIC_BRIDGE, FABRIC_NETNS

pytestmark = [
    pytest.mark.privileged,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root for netns and iptables"),
]

RESOLVER_IP = "10.250.0.253"
"""The test's upstream resolver, on the fabric bridge (every node netns reaches it)."""
AGENT_ARGS = ("--dns-upstream", RESOLVER_IP)
OUTSIDE = {"outside.test.": "192.0.2.10"}
"""What the upstream resolver knows; every other name is NXDOMAIN there."""

MESH = """
apiVersion: v1
kind: Pod
metadata: {name: client, namespace: default, labels: {app: client}}
spec: {nodeName: node1, containers: [{name: main, command: [sleep, infinity]}]}
---
apiVersion: v1
kind: Pod
metadata: {name: stranger, namespace: other, labels: {app: stranger}}
spec: {nodeName: node1, containers: [{name: main, command: [sleep, infinity]}]}
---
apiVersion: v1
kind: Pod
metadata: {name: web, namespace: default, labels: {app: web}}
spec:
  nodeName: node2
  serviceAccountName: web
  containers:
  - name: main
    command: [nodeagent, sample-app, --port, "8080", --service, web]
    ports: [{name: http, containerPort: 8080}]
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: default}
spec:
  selector: {app: web}
  ports: [{name: http, port: 80, targetPort: http}]
---
apiVersion: v1
kind: Service
metadata: {name: web-pods, namespace: default}
spec:
  clusterIP: None
  selector: {app: web}
  ports: [{name: http, port: 8080}]
---
# the cluster's DNS Service at the pods' nameserver address (TCP 53 a mesh port): their
# queries still go to the DNS proxy, not to 15001 (nothing answers behind this one)
apiVersion: v1
kind: Service
metadata: {name: kube-dns, namespace: kube-system}
spec:
  clusterIP: 10.96.0.10
  selector: {k8s-app: kube-dns}
  ports: [{name: dns, port: 53, protocol: UDP}, {name: dns-tcp, port: 53, protocol: TCP}]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: web-external, namespace: default}
spec:
  hosts: [web.external.test]
  location: MESH_INTERNAL
  resolution: STATIC
  workloadSelector: {labels: {app: web}}
  ports: [{number: 8080, name: http, protocol: HTTP}]
"""


@pytest.fixture(scope="module")
def config_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("dns-mesh")
    (d / "mesh.yaml").write_text(MESH)
    return d


class Resolver:
    """A UDP and TCP DNS server on the fabric: ``OUTSIDE``'s names, the rest NXDOMAIN;
    ``clients`` records who asked."""

    def __init__(self) -> None:
        self.udp: socket.socket = run_in_netns(
            FABRIC_NETNS, lambda: socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        )
        self.udp.bind((RESOLVER_IP, 53))
        self.tcp: socket.socket = run_in_netns(
            FABRIC_NETNS, lambda: socket.create_server((RESOLVER_IP, 53))
        )
        self.clients: list[tuple[str, str]] = []
        self.threads = [
            threading.Thread(target=self._serve_udp, daemon=True),
            threading.Thread(target=self._serve_tcp, daemon=True),
        ]
        for t in self.threads:
            t.start()

    def answer(self, wire: bytes, client: str) -> bytes:
        query = dns.message.from_wire(wire)
        q = query.question[0]
        self.clients.append((q.name.to_text(), client))
        response = dns.message.make_response(query)
        if q.name.to_text().lower() in OUTSIDE:
            ip = OUTSIDE[q.name.to_text().lower()]
            if q.rdtype == 1:
                response.answer.append(dns.rrset.from_text(q.name, 60, "IN", "A", ip))
        else:
            response.set_rcode(dns.rcode.NXDOMAIN)
        return response.to_wire()

    def _serve_udp(self) -> None:
        with contextlib.suppress(OSError):
            while True:
                data, addr = self.udp.recvfrom(4096)
                if not addr:  # shut down
                    return
                self.udp.sendto(self.answer(data, addr[0]), addr)

    def _serve_tcp(self) -> None:
        with contextlib.suppress(OSError):
            while True:
                conn, addr = self.tcp.accept()
                with conn:
                    (size,) = struct.unpack("!H", conn.recv(2, socket.MSG_WAITALL))
                    reply = self.answer(conn.recv(size, socket.MSG_WAITALL), addr[0])
                    conn.sendall(struct.pack("!H", len(reply)) + reply)

    def close(self) -> None:
        for s in (self.udp, self.tcp):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()


@pytest.fixture(scope="module")
def resolver(sb: Sandbox) -> Iterator[Resolver]:
    subprocess.run(
        ["ip", "-n", FABRIC_NETNS, "addr", "add", f"{RESOLVER_IP}/24", "dev", FABRIC_BRIDGE],
        check=True,
    )
    r = Resolver()
    try:
        yield r
    finally:
        r.close()


def getent(sb: Sandbox, pod: str, name: str) -> list[str]:
    """The addresses glibc's resolver gives ``pod`` for ``name`` (empty: none)."""
    p = sb.exec(pod, ["getent", "ahostsv4", name], capture_output=True, text=True, timeout=30)
    return sorted({line.split()[0] for line in p.stdout.splitlines()})


def service_ip(sb: Sandbox, name: str) -> str:
    svc = load_directory(sb.config_dir).snapshot.service_by_key[f"default/{name}"]
    assert svc.cluster_ip
    return svc.cluster_ip


def test_service_names_in_every_search_form(sb: Sandbox, resolver: Resolver) -> None:
    ip = service_ip(sb, "web")
    for name in ("web", "web.default", "web.default.svc", "web.default.svc.cluster.local"):
        assert getent(sb, "client", name) == [ip], name
    # from another namespace: the short name is that namespace's (none there)
    assert getent(sb, "stranger", "web.default") == [ip]
    assert getent(sb, "stranger", "web") == []


def test_a_headless_service_answers_its_pods(sb: Sandbox, resolver: Resolver) -> None:
    web = sb.topology.pod("default/web")
    assert getent(sb, "client", "web-pods") == [web.ip]


def test_other_names_are_forwarded_by_the_agent(sb: Sandbox, resolver: Resolver) -> None:
    assert getent(sb, "client", "outside.test") == ["192.0.2.10"]
    assert getent(sb, "client", "nosuch.test") == []
    node1 = sb.topology.node("node1")
    asked = {client for name, client in resolver.clients if name == "outside.test."}
    assert asked == {node1.ip}, resolver.clients  # from the agent, in the node's netns


def test_tcp_queries_are_answered_too(sb: Sandbox, resolver: Resolver) -> None:
    script = (
        "import dns.message, dns.query, sys\n"
        "for name in sys.argv[1:]:\n"
        "    r = dns.query.tcp(dns.message.make_query(name, 'A'), '10.96.0.10', timeout=10)\n"
        "    print(name, sorted(x.to_text() for s in r.answer for x in s if s.rdtype == 1))\n"
    )
    p = sb.exec(
        "client",
        [sys.executable, "-c", script, "web.default.svc.cluster.local.", "outside.test."],
        capture_output=True,
        text=True,
        timeout=60,
        env={"PYTHONPATH": os.environ.get("PYTHONPATH", "")},
    )
    assert p.returncode == 0, p.stderr
    assert p.stdout.splitlines() == [
        f"web.default.svc.cluster.local. ['{service_ip(sb, 'web')}']",
        "outside.test. ['192.0.2.10']",
    ]


def test_a_service_entry_host_gets_its_address_and_is_routed(
    sb: Sandbox, resolver: Resolver
) -> None:
    (addr,) = getent(sb, "client", "web.external.test")
    assert ipaddress.ip_address(addr) in ipaddress.ip_network("240.240.0.0/16")
    p = sb.exec(
        "client",
        ["curl", "-sS", "-m", "10", "-o", "/dev/null", "-w", "%{http_code}",
         "http://web.external.test:8080/"],
        capture_output=True,
        text=True,
        timeout=30,
    )  # fmt: skip
    assert (p.returncode, p.stdout) == (0, "200"), p.stderr


def test_an_upgrade_hands_the_dns_sockets_over(sb: Sandbox, resolver: Resolver) -> None:
    """(Last: it replaces node1's agent.) The new agent takes the pods' 15053 from the old
    one, as their other listeners; else its bind fails and the pod is not ready."""
    old = sb.agent_pids["node1"]
    sb.roll_agent("node1", exit_timeout=60)
    assert sb.agent_pids["node1"] != old
    assert getent(sb, "client", "web") == [service_ip(sb, "web")]
    assert getent(sb, "client", "outside.test") == ["192.0.2.10"]
    # The agents forked for their pods' capture (nsenter, iptables) with gRPC running:
    # its fork handlers are off, so the log holds no line of theirs per fork.
    log = Path(sb.agent_log("node1")).read_text()
    assert "captured" in log and "fork() handlers" not in log
