"""10,000 concurrent proxied connections across two nodes (issue 20): a client pod on node1
holds them all open at once to an echo Service on node2, through both agents and HBONE;
every one still echoes its own bytes, none is dropped, and each agent's RSS stays within
300 MiB while they are all open.

The echo Service's two pods run as one service account, as a Deployment's would: HBONE
tunnels are pooled per (source identity, destination identity, destination pod), 100
streams per connection, and a pod's HBONE server takes up to 200 connections from one
client identity (``MAX_CONNECTIONS_PER_IDENTITY``), so each pod's 5,000 ride on 50.

One capture mode (eBPF, the default): the held connections cost the same in both, and a
second sandbox would double the test's time.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from nodeagent.redirect.netns import netns_path
from nodeagent.sandbox import Sandbox
from nodeagent.sandbox.processes import next_json_line

pytestmark = [
    pytest.mark.privileged,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root for netns and capture"),
]

REDIRECT_MODES = ("ebpf",)
CONNS = 10_000
RSS_LIMIT_MIB = 300.0
MANYCONNS = str(Path(__file__).parent / "manyconns.py")
ECHO_IP = "10.96.2.10"

PODS = """\
apiVersion: v1
kind: Pod
metadata: {name: client, namespace: default, labels: {app: client}}
spec:
  nodeName: node1
  serviceAccountName: client
  containers:
  - {name: main, command: [sleep, infinity]}
"""
ECHO_POD = """\
---
apiVersion: v1
kind: Pod
metadata: {name: echo-%(n)s, namespace: default, labels: {app: echo}}
spec:
  nodeName: node2
  serviceAccountName: echo
  containers:
  - name: main
    command: [nodeagent, sample-app, --port, "8080", --tcp-echo, "9000", --service, echo]
    ports: [{name: tcp-echo, containerPort: 9000}]
"""
SERVICES = f"""\
apiVersion: v1
kind: Service
metadata: {{name: echo, namespace: default}}
spec:
  selector: {{app: echo}}
  clusterIP: {ECHO_IP}
  ports:
  - {{name: tcp, port: 9000, targetPort: tcp-echo}}
"""


@pytest.fixture(scope="module")
def config_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("conns10k")
    (d / "pods.yaml").write_text(PODS + "".join(ECHO_POD % {"n": n} for n in ("a", "b")))
    (d / "services.yaml").write_text(SERVICES)
    return d


def rss_mib(pid: int) -> float:
    """``VmRSS`` of a process, in MiB (what ``nodeagent ctl status`` shows)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmRSS in /proc/{pid}/status")


def opened_over_hbone(sb: Sandbox, node: str, reporter: str) -> float:
    """The agent's ``istio_tcp_connections_opened_total`` over mutual TLS, as ``reporter``."""
    netns = f"--net={netns_path(sb.node_netns(node))}"
    text = subprocess.run(
        ["nsenter", netns, "curl", "-sS", "-m", "10", "http://127.0.0.1:15020/metrics"],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    ).stdout
    want = (f'reporter="{reporter}"', 'connection_security_policy="mutual_tls"')
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("istio_tcp_connections_opened_total{") and all(w in line for w in want)
    )


def test_10k_connections_across_nodes_all_echo_within_300_mib(sb: Sandbox) -> None:
    idle = {node: rss_mib(pid) for node, pid in sb.agent_pids.items()}
    before = [
        opened_over_hbone(sb, "node1", "source"),
        opened_over_hbone(sb, "node2", "destination"),
    ]
    client = sb.popen(
        "client",
        [sys.executable, MANYCONNS, ECHO_IP, "9000", "--conns", str(CONNS)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        opened = next_json_line(client, 180)
        # every connection is open and idle now: what the agents hold for them
        held = {node: rss_mib(pid) for node, pid in sb.agent_pids.items()}
        assert client.stdin is not None
        client.stdin.write("check\n")
        client.stdin.flush()
        checked = next_json_line(client, 120)
    finally:
        if client.poll() is None:
            client.kill()
        client.communicate(timeout=10)
    assert opened["event"] == "open" and opened["ok"] == CONNS, opened
    assert checked["event"] == "done" and checked["ok"] == CONNS, checked
    # both agents relayed each one, through HBONE: none went around them or was retried
    after = [
        opened_over_hbone(sb, "node1", "source"),
        opened_over_hbone(sb, "node2", "destination"),
    ]
    assert [a - b for a, b in zip(after, before, strict=True)] == [CONNS, CONNS]
    per_conn = {n: (held[n] - idle[n]) * 1024 / CONNS for n in held}
    print(
        f"{CONNS} opened in {opened['seconds']} s, checked and closed in {checked['seconds']} s;"
        f" RSS idle {idle}, with all open {held} MiB; KiB per connection {per_conn}"
    )
    for node, mib in held.items():
        assert mib <= RSS_LIMIT_MIB, (
            f"agent {node}: {mib:.1f} MiB RSS with {CONNS} connections open "
            f"(idle {idle[node]:.1f}), over {RSS_LIMIT_MIB:g}"
        )
