"""End to end: Istio's metrics and the access log on both nodes of the sandbox, after N
requests and N connections from the client pod (node1) to the `web` pods (v1 and v2 on
node2, v3 on node1; the L7 mesh of ``l7/``): each node's ``/metrics`` counts exactly
what was sent, with Istio's labels and ``reporter`` set on each side as Istio does, and
its log has a line per request or connection."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from meshops import apply_file

from nodeagent.redirect.netns import netns_path
from nodeagent.sandbox import Sandbox

pytestmark = [
    pytest.mark.privileged,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root for netns and iptables"),
]

HERE = Path(__file__).parent
WEB = "http://web.default.svc.cluster.local"
CLIENT_ID = "spiffe://cluster.local/ns/default/sa/client"
WEB_ID = "spiffe://cluster.local/ns/default/sa/web"
N = 20

PEERS = {
    "source_workload": "client",
    "source_workload_namespace": "default",
    "source_principal": CLIENT_ID,
    "source_app": "client",
    "source_canonical_service": "client",
    "source_canonical_revision": "latest",
    "source_cluster": "Kubernetes",
    "destination_workload_namespace": "default",
    "destination_principal": WEB_ID,
    "destination_app": "web",
    "destination_service": "web.default.svc.cluster.local",
    "destination_service_name": "web",
    "destination_service_namespace": "default",
    "destination_canonical_service": "web",
    "destination_cluster": "Kubernetes",
    "connection_security_policy": "mutual_tls",
}

TO_V1_BY_PATH = """
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: web, namespace: default}
spec:
  hosts: [web]
  http:
  - route: [{destination: {host: web, subset: v1}}]
---
# a rule on paths: web's node serves its HTTP port request by request (reporter
# destination); without one it relays the tunnelled bytes, as ztunnel does
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: web-paths, namespace: default}
spec:
  selector: {matchLabels: {app: web}}
  action: ALLOW
  rules:
  - to: [{operation: {paths: ["/*"]}}]
"""


@pytest.fixture(scope="module")
def config_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("telemetry")
    for f in (HERE / "l7").glob("*.yaml"):
        shutil.copy(f, d / f.name)
    return d


def scrape(sb: Sandbox, node: str) -> list[tuple[str, dict[str, str], float]]:
    """Every sample of ``node``'s agent's ``/metrics``: (name, labels, value)."""
    from prometheus_client.parser import text_string_to_metric_families

    p = subprocess.run(
        ["nsenter", f"--net={netns_path(sb.node_netns(node))}", "curl", "-sS",
         "http://127.0.0.1:15020/metrics"],
        capture_output=True, text=True, timeout=10, check=True,
    )
    return [
        (s.name, dict(s.labels), float(s.value))
        for family in text_string_to_metric_families(p.stdout)
        for s in family.samples
    ]


def total(samples: list[tuple[str, dict[str, str], float]], name: str, **want: str) -> float:
    return sum(v for n, lb, v in samples if n == name and want.items() <= lb.items())


def load(sb: Sandbox, *args: str) -> dict[str, Any]:
    """The sandbox's HTTP client in the client pod: its JSON summary."""
    p = sb.exec("client", [sys.executable, str(HERE / "httpclient.py"), *args],
                capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    doc: dict[str, Any] = json.loads(p.stdout.strip().splitlines()[-1])
    return doc


def log_lines(sb: Sandbox, node: str, key: str, value: Any) -> list[dict[str, Any]]:
    """The JSON lines of ``node``'s agent log whose ``key`` is ``value``."""
    out = []
    for line in Path(sb.agent_log(node)).read_text(errors="replace").splitlines():
        if line.startswith("{"):
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if rec.get(key) == value:
                out.append(rec)
    return out


def settle(check: Any, timeout: float = 5) -> None:
    """Wait until ``check()`` holds (records are flushed every half second)."""
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.2)


def test_requests_are_counted_on_both_nodes_with_istios_labels(
    sb: Sandbox, config_dir: Path
) -> None:
    path = config_dir / "telemetry.yaml"
    apply_file(sb, path, TO_V1_BY_PATH)
    try:
        v1 = {**PEERS, "destination_workload": "web-v1", "destination_version": "v1",
              "destination_canonical_revision": "v1", "request_protocol": "http",
              "response_code": "200", "response_flags": "-"}
        sides = (("node1", "source"), ("node2", "destination"))
        before = {node: scrape(sb, node) for node, _ in sides}
        out = load(sb, f"{WEB}/telemetry", "-n", str(N), "--body-bytes", "100",
                   "--method", "POST")
        assert out["statuses"] == {"200": N} and out["pods"] == {"web-v1": N}, out

        def counted(node: str, reporter: str, name: str) -> float:
            after = total(scrape(sb, node), name, **v1, reporter=reporter)
            return after - total(before[node], name, **v1, reporter=reporter)

        for node, reporter in sides:
            settle(lambda n=node, r=reporter: counted(n, r, "istio_requests_total") == N)
            assert counted(node, reporter, "istio_request_duration_milliseconds_count") == N
            assert counted(node, reporter, "istio_request_bytes_sum") == 100 * N
            assert counted(node, reporter, "istio_response_bytes_count") == N

            def recs(n: str = node, r: str = reporter) -> list[dict[str, Any]]:
                return [x for x in log_lines(sb, n, "path", "/telemetry") if x["reporter"] == r]

            settle(lambda f=recs: len(f()) == N)
            recs_ = recs()
            assert {(r["method"], r["response_code"], r["bytes_received"]) for r in recs_} == {
                ("POST", 200, 100)}
            assert all(isinstance(r["duration"], int) for r in recs_)
            assert {r["destination_workload"] for r in recs_} == {"web-v1"}
        # both sides saw the same responses
        sizes = [counted(n, r, "istio_response_bytes_sum") for n, r in sides]
        assert sizes[0] == sizes[1] > 0, sizes
    finally:
        apply_file(sb, path, None)


def test_tcp_connections_are_counted_and_logged_on_both_nodes(sb: Sandbox) -> None:
    # port 8081 is plain TCP to the same servers: relayed at L4 on both nodes
    tcp = {**PEERS, "request_protocol": "tcp"}
    before = {node: scrape(sb, node) for node in ("node1", "node2")}
    out = load(sb, f"{WEB}:8081/tcp-telemetry", "-n", str(N), "--new-conn")
    assert out["statuses"] == {"200": N}, out
    pods: dict[str, int] = out["pods"]

    def counted(node: str, name: str, **want: str) -> float:
        after = total(scrape(sb, node), name, **tcp, **want)
        return after - total(before[node], name, **tcp, **want)

    closed = "istio_tcp_connections_closed_total"
    settle(lambda: counted("node1", closed, reporter="source") == N)
    assert counted("node1", "istio_tcp_connections_opened_total", reporter="source") == N
    remote = sum(n for pod, n in pods.items() if pod in ("web-v1", "web-v2"))
    settle(lambda: counted("node2", closed, reporter="destination") == remote)
    for pod in ("web-v1", "web-v2"):
        want = {"destination_workload": pod, "destination_version": pod[-2:]}
        for node, reporter in (("node1", "source"), ("node2", "destination")):
            assert counted(node, closed, reporter=reporter, **want) == pods.get(pod, 0)
    sent = [counted(n, "istio_tcp_sent_bytes_total", reporter=r, destination_workload="web-v1")
            for n, r in (("node1", "source"), ("node2", "destination"))]
    assert sent[0] == sent[1], sent
    # ztunnel's "connection complete" on node2, one per connection it served
    settle(lambda: len([r for r in log_lines(sb, "node2", "message", "connection complete")
                        if r.get("src.workload") == "client"]) >= remote)
    lines = [r for r in log_lines(sb, "node2", "message", "connection complete")
             if r.get("src.workload") == "client"]
    for r in lines[-remote:]:
        assert r["direction"] == "inbound" and r["src.identity"] == CLIENT_ID
        assert r["dst.identity"] == WEB_ID and r["dst.workload"] in ("web-v1", "web-v2")
        assert r["dst.service"] == "web.default.svc.cluster.local"
        assert r["bytes_sent"] > 0 and r["bytes_recv"] > 0 and "error" not in r
