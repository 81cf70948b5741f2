"""End to end through the sandbox: a pod on node1 reaches services on node2 through both
nodes' proxies, with real netns, iptables and processes.

Each assertion is what a user would check: digests of bytes that crossed, the answer of a
real client (curl), what the agent's socket and metrics say, what is left after down.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from nodeagent.admin.client import AdminClient
from nodeagent.redirect.netns import netns_path
from nodeagent.sandbox import Sandbox

pytestmark = [
    pytest.mark.privileged,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root for netns and iptables"),
]

TCPCLIENT = str(Path(__file__).parent / "tcpclient.py")
PY = sys.executable


def run_json(sb: Sandbox, pod: str, *args: str, timeout: float = 120) -> dict[str, Any]:
    p = sb.exec(pod, [PY, TCPCLIENT, *args], capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, p.stderr
    last: dict[str, Any] = json.loads(p.stdout.strip().splitlines()[-1])
    return last


def curl(sb: Sandbox, pod: str, url: str, *extra: str) -> subprocess.CompletedProcess[str]:
    return sb.exec(
        pod, ["curl", "-sS", "-m", "10", *extra, url], capture_output=True, text=True, timeout=30
    )


def metrics(sb: Sandbox, node: str) -> str:
    p = subprocess.run(
        [
            "nsenter",
            f"--net={netns_path(sb.node_netns(node))}",
            "curl",
            "-sS",
            "http://127.0.0.1:15020/metrics",
        ],
        capture_output=True,
        text=True,
        timeout=10,
        check=True,
    )
    return p.stdout


def metric_value(text: str, name: str, **labels: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name + "{"):
            continue
        if all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def json_stream(text: str) -> list[Any]:
    """The JSON documents written one after another in ``text``."""
    dec, out, i = json.JSONDecoder(), [], 0
    while True:
        while i < len(text) and text[i].isspace():
            i += 1
        if i >= len(text):
            return out
        doc, i = dec.raw_decode(text, i)
        out.append(doc)


def test_reach_service_on_other_node_by_name_and_cluster_ip(sb: Sandbox) -> None:
    pods = set()
    for url in (
        "http://echo/",
        "http://echo.default/",
        "http://echo.default.svc.cluster.local/",
        "http://10.96.1.10/",
    ):
        # five requests in one curl (one keep-alive connection, each request balanced)
        p = curl(sb, "client", *([url] * 5))
        assert p.returncode == 0, p.stderr
        bodies = json_stream(p.stdout)
        assert len(bodies) == 5, p.stdout
        for body in bodies:
            assert body["service"] == "echo" and body["node"] == "node2"
            pods.add(body["pod"])
    # port 80 is HTTP: Istio's default LEAST_REQUEST spreads 20 requests over both pods
    # (all 20 on one pod: 2 in a million)
    assert pods == {"echo-1", "echo-2"}


def test_both_proxies_saw_the_connection(sb: Sandbox) -> None:
    before1 = metric_value(
        metrics(sb, "node1"),
        "istio_tcp_connections_opened_total",
        reporter="source",
        source_workload="client",
    )
    before2 = metric_value(
        metrics(sb, "node2"),
        "istio_tcp_connections_opened_total",
        reporter="destination",
        destination_workload_namespace="default",
    )
    for _ in range(3):  # port 9000 is plain TCP (port 80 is HTTP: see test_mesh_l7)
        assert run_json(sb, "client", "echo", "echo", "9000", "--bytes", "1000")["ok"]
    after1 = metric_value(
        metrics(sb, "node1"),
        "istio_tcp_connections_opened_total",
        reporter="source",
        source_workload="client",
    )
    after2 = metric_value(
        metrics(sb, "node2"),
        "istio_tcp_connections_opened_total",
        reporter="destination",
        destination_workload_namespace="default",
    )
    assert after1 - before1 == 3
    assert after2 - before2 == 3


def test_50_mib_each_way_arrives_intact(sb: Sandbox) -> None:
    out = run_json(sb, "client", "echo", "echo", "9000", "--bytes", str(50 << 20))
    assert out["ok"] == 1, out
    r = out["results"][0]
    assert r["sent"] == r["got"] and r["received"] == 50 << 20


def test_200_concurrent_connections_all_complete(sb: Sandbox) -> None:
    out = run_json(sb, "client", "echo", "10.96.1.10", "9000", "--bytes", "65536", "--conns", "200")
    assert out["ok"] == 200 and out["nfailed"] == 0, out


def test_half_close_server_answers_after_client_eof(sb: Sandbox, tmp_path: Path) -> None:
    # node2's netns is not a mesh address: this is also the pass-through test.
    node_ip = sb.node_ip("node2")
    server = subprocess.Popen(
        ["nsenter", f"--net={netns_path(sb.node_netns('node2'))}", PY, TCPCLIENT, "serve", "7070"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert server.stdout is not None
        assert json.loads(server.stdout.readline())["event"] == "listening"
        payload = os.urandom(3 << 20)
        src = tmp_path / "payload"
        src.write_bytes(payload)
        code = (
            "import socket,sys,json;"
            f"s=socket.create_connection(('{node_ip}',7070));"
            f"s.sendall(open('{src}','rb').read());"
            "s.shutdown(socket.SHUT_WR);"
            "b=b''\nwhile True:\n d=s.recv(65536)\n if not d: break\n b+=d\n"
            "print(b.decode())"
        )
        p = sb.exec("client", [PY, "-c", code], capture_output=True, text=True, timeout=60)
        assert p.returncode == 0, p.stderr
        answer = json.loads(p.stdout)
        import hashlib

        assert answer["sha256"] == hashlib.sha256(payload).hexdigest()
        # untouched: the non-mesh server sees the pod's own address
        assert answer["peer"] == sb.pod_ip("client")
    finally:
        server.kill()
        server.wait()


def test_killing_an_upstream_closes_only_that_connection(sb: Sandbox) -> None:
    victim = sb.popen(
        "client",
        [PY, TCPCLIENT, "stream", "victim", "9000", "--seconds", "8"],
        stdout=subprocess.PIPE,
        text=True,
    )
    other = sb.popen(
        "client",
        [PY, TCPCLIENT, "stream", "echo", "9000", "--seconds", "8"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert victim.stdout is not None and other.stdout is not None
        assert json.loads(victim.stdout.readline())["event"] == "connected"
        assert json.loads(other.stdout.readline())["event"] == "connected"
        time.sleep(1.5)
        sb.kill_pod("victim")
        v = json.loads(victim.communicate(timeout=40)[0].strip().splitlines()[-1])
        o = json.loads(other.communicate(timeout=40)[0].strip().splitlines()[-1])
        assert not v["ok"] and v["elapsed"] < 7, v
        assert o["ok"] and o["received"] == o["sent"] > 0, o
    finally:
        for proc in (victim, other):
            if proc.poll() is None:
                proc.kill()
        sb.start_pod("victim")


def test_failures_close_only_that_connection_and_are_counted(sb: Sandbox) -> None:
    flag = "nodeagent_connection_failures_total"
    uh0 = metric_value(metrics(sb, "node1"), flag, direction="outbound", response_flags="UH")
    uf0 = metric_value(metrics(sb, "node2"), flag, direction="inbound", response_flags="UF")
    # no ready endpoint: refused by node1's proxy
    p = curl(sb, "client", "http://10.96.1.12:9000/")
    assert p.returncode != 0
    # the victim pod does not listen on 9001: node2's proxy (inbound) is refused by it
    p = curl(sb, "client", "http://10.96.1.11:9001/")
    assert p.returncode != 0
    assert (
        metric_value(metrics(sb, "node1"), flag, direction="outbound", response_flags="UH")
        == uh0 + 1
    )
    assert (
        metric_value(metrics(sb, "node2"), flag, direction="inbound", response_flags="UF")
        == uf0 + 1
    )
    assert "has no ready endpoints" in Path(sb.agent_log("node1")).read_text()
    assert "is the app listening on port 9001?" in Path(sb.agent_log("node2")).read_text()
    # and the mesh still serves
    assert curl(sb, "client", "http://echo/").returncode == 0


def test_agent_socket_reports_workloads_services_connections(sb: Sandbox) -> None:
    with AdminClient(sb.agent_socket("node1")) as c:
        st = c.status()
        assert st["ready"] is True and st["node"] == "node1"
        names = {w["name"] for w in c.workloads()}
        assert {"client", "echo-1", "echo-2", "victim"} <= names
        svcs = {s["name"]: s for s in c.services()}
        assert svcs["echo"]["cluster_ip"] == "10.96.1.10"
    stream = sb.popen(
        "client",
        # long enough to outlast a `ctl` that starts slowly on a loaded machine; ended below
        [PY, TCPCLIENT, "stream", "echo", "9000", "--seconds", "60"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert stream.stdout is not None
        stream.stdout.readline()
        time.sleep(1)
        with AdminClient(sb.agent_socket("node1")) as c:
            conns = c.connections()
        mine = [x for x in conns if x["destination"] == "10.96.1.10:9000"]
        assert mine and mine[0]["bytes_sent"] > 0 and mine[0]["service"] == "default/echo"
        out = subprocess.run(
            [sys.executable, "-m", "nodeagent", "ctl", "--node", "node1", "connections"],
            capture_output=True,
            text=True,
            timeout=20,
        )
        assert out.returncode == 0 and "10.96.1.10:9000" in out.stdout
    finally:
        stream.terminate()
        stream.communicate(timeout=30)


def test_hot_reload_within_2s_keeps_live_connections(sb: Sandbox, config_dir: Path) -> None:
    stream = sb.popen(
        "client",
        [PY, TCPCLIENT, "stream", "echo", "9000", "--seconds", "6"],
        stdout=subprocess.PIPE,
        text=True,
    )
    new = config_dir / "new-service.yaml"
    try:
        assert stream.stdout is not None
        stream.stdout.readline()
        new.write_text(
            "apiVersion: v1\nkind: Service\nmetadata: {name: echo-new}\n"
            "spec: {selector: {app: echo}, clusterIP: 10.96.1.20, ports: [{port: 80, "
            "targetPort: 8080}]}\n"
        )
        t0 = time.monotonic()
        while True:
            p = curl(sb, "client", "http://10.96.1.20/", "-m", "1")
            if p.returncode == 0:
                break
            assert time.monotonic() - t0 < 4, "new service not served in time"
            time.sleep(0.1)
        assert time.monotonic() - t0 < 2.5
        # a bad edit keeps the last good snapshot and is visible on the socket
        bad = config_dir / "broken.yaml"
        bad.write_text(
            "apiVersion: v1\nkind: Service\nmetadata: {name: x}\nspec: {ports: [{port: nope}]}\n"
        )
        deadline = time.monotonic() + 5
        err = ""
        while time.monotonic() < deadline and not err:
            with AdminClient(sb.agent_socket("node1")) as c:
                err = c.status()["config"]["last_error"]
            time.sleep(0.2)
        assert "broken.yaml" in err and "spec.ports[0].port" in err
        assert curl(sb, "client", "http://10.96.1.20/").returncode == 0
        bad.unlink()
        o = json.loads(stream.communicate(timeout=40)[0].strip().splitlines()[-1])
        assert o["ok"], o
    finally:
        if stream.poll() is None:
            stream.kill()
        new.unlink(missing_ok=True)
        (config_dir / "broken.yaml").unlink(missing_ok=True)


def test_readiness_and_metrics_endpoints(sb: Sandbox) -> None:
    p = subprocess.run(
        [
            "nsenter",
            f"--net={netns_path(sb.node_netns('node2'))}",
            "curl",
            "-sS",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "http://127.0.0.1:15021/healthz/ready",
        ],
        capture_output=True,
        text=True,
        timeout=10,
    )
    assert p.stdout == "200"
    assert urllib.request  # the root netns has no route into the sandbox: nothing to test there
