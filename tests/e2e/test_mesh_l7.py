"""End to end: HTTP routing by VirtualService and DestinationRule in the shared proxy, with
real clients in sandbox pods (Python's http.client, curl, wrk) and mTLS between nodes.

Each test applies its routing YAML to the running mesh (hot reload) and checks what a
user would check: which version answered, how long it took, what status came back and
what the upstream saw, the access log and the metrics.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from meshops import apply_file, config_versions, wait_loaded

from nodeagent.admin.client import AdminClient
from nodeagent.redirect.netns import netns_path
from nodeagent.sandbox import Sandbox

pytestmark = [
    pytest.mark.privileged,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root for netns and iptables"),
]

HERE = Path(__file__).parent
HTTPCLIENT = str(HERE / "httpclient.py")
PY = sys.executable
WEB = "http://web.default.svc.cluster.local"


@pytest.fixture(scope="module")
def config_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("l7")
    for f in (HERE / "l7").glob("*.yaml"):
        shutil.copy(f, d / f.name)
    return d


@pytest.fixture
def routing(sb: Sandbox, config_dir: Path) -> Iterator[Any]:
    """``routing(yaml, own_dr=False)``: apply one routing file to the running mesh; with
    ``own_dr`` the base DestinationRule (``l7/dr.yaml``) is moved aside first. Undone
    after the test (and the undoing applied) so tests do not see each other's rules."""
    path = config_dir / "routing.yaml"
    base_dr = config_dir / "dr.yaml"
    aside = config_dir / "dr.yaml.aside"

    def apply(text: str, own_dr: bool = False) -> None:
        if own_dr and base_dr.exists():
            before = config_versions(sb)
            base_dr.rename(aside)
            wait_loaded(sb, before)
        apply_file(sb, path, textwrap.dedent(text))

    try:
        yield apply
    finally:
        if path.exists():
            apply_file(sb, path, None)
        if aside.exists():
            before = config_versions(sb)
            aside.rename(base_dr)
            wait_loaded(sb, before)


def http(sb: Sandbox, url: str, *args: str, pod: str = "client", timeout: float = 180) -> Any:
    p = sb.exec(pod, [PY, HTTPCLIENT, url, *args], capture_output=True, text=True,
                timeout=timeout)
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout.strip().splitlines()[-1])


def curl(sb: Sandbox, url: str, *extra: str) -> subprocess.CompletedProcess[str]:
    return sb.exec("client", ["curl", "-sS", "-m", "20", *extra, url], capture_output=True,
                   text=True, timeout=40)


def app_get(sb: Sandbox, pod: str, path: str) -> dict[str, Any]:
    """Ask one web pod directly (from its own netns, not through the mesh)."""
    p = sb.exec(pod, ["curl", "-sS", "-m", "5", f"http://127.0.0.1:8080{path}"],
                capture_output=True, text=True, timeout=20)
    assert p.returncode == 0, p.stderr
    doc: dict[str, Any] = json.loads(p.stdout)
    return doc


def served(sb: Sandbox, pod: str) -> int:
    return int(app_get(sb, pod, "/count")["served"])


def metrics(sb: Sandbox, node: str) -> str:
    p = subprocess.run(
        ["nsenter", f"--net={netns_path(sb.node_netns(node))}", "curl", "-sS",
         "http://127.0.0.1:15020/metrics"],
        capture_output=True, text=True, timeout=10, check=True,
    )
    return p.stdout


def metric_value(text: str, name: str, **labels: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def within(count: int, n: int, p: float, sds: float = 5.0) -> bool:
    """``count`` of ``n`` Bernoulli(p) trials is within ``sds`` standard deviations."""
    sd = math.sqrt(n * p * (1 - p))
    return abs(count - n * p) <= sds * sd


# -- routing ---------------------------------------------------------------------------------


def test_default_routing_spreads_and_reports_l7(sb: Sandbox) -> None:
    out = http(sb, f"{WEB}/", "-n", "60", "-c", "3")
    assert out["statuses"] == {"200": 60}, out
    assert set(out["versions"]) == {"v1", "v2", "v3"}, out


def test_all_traffic_to_v1(sb: Sandbox, routing: Any) -> None:
    routing("""
        apiVersion: networking.istio.io/v1
        kind: VirtualService
        metadata: {name: web, namespace: default}
        spec:
          hosts: [web]
          http:
          - name: all-v1
            route: [{destination: {host: web, subset: v1}}]
    """)
    out = http(sb, f"{WEB}/", "-n", "100", "-c", "4")
    assert out["statuses"] == {"200": 100} and out["versions"] == {"v1": 100}, out


def test_canary_weights_hold_over_2000_requests(sb: Sandbox, routing: Any) -> None:
    for w1, w3 in ((90, 10), (50, 50)):
        routing(f"""
            apiVersion: networking.istio.io/v1
            kind: VirtualService
            metadata: {{name: web, namespace: default}}
            spec:
              hosts: [web]
              http:
              - route:
                - {{destination: {{host: web, subset: v1}}, weight: {w1}}}
                - {{destination: {{host: web, subset: v3}}, weight: {w3}}}
        """)
        out = http(sb, f"{WEB}/", "-n", "2000", "-c", "8")
        assert out["statuses"] == {"200": 2000}, out
        v3 = out["versions"].get("v3", 0)
        assert set(out["versions"]) <= {"v1", "v3"}, out
        # 5 standard deviations: a correct proxy fails this about once in 1.7 million runs
        assert within(v3, 2000, w3 / 100), (w1, w3, out["versions"])


def test_header_match_routes_exactly(sb: Sandbox, routing: Any) -> None:
    routing("""
        apiVersion: networking.istio.io/v1
        kind: VirtualService
        metadata: {name: web, namespace: default}
        spec:
          hosts: [web]
          http:
          - name: jason
            match: [{headers: {end-user: {exact: jason}}}]
            route: [{destination: {host: web, subset: v2}}]
          - route: [{destination: {host: web, subset: v1}}]
    """)
    jason = http(sb, f"{WEB}/", "-n", "200", "-c", "4", "-H", "end-user: jason")
    other = http(sb, f"{WEB}/", "-n", "200", "-c", "4", "-H", "end-user: mary")
    assert jason["versions"] == {"v2": 200}, jason
    assert other["versions"] == {"v1": 200}, other


def test_delay_fault_and_route_timeout(sb: Sandbox, routing: Any) -> None:
    routing("""
        apiVersion: networking.istio.io/v1
        kind: VirtualService
        metadata: {name: web, namespace: default}
        spec:
          hosts: [web]
          http:
          - match: [{headers: {end-user: {exact: jason}}}]
            fault: {delay: {fixedDelay: 2s, percentage: {value: 100}}}
            route: [{destination: {host: web, subset: v1}}]
          - match: [{uri: {prefix: /delay/}}]
            timeout: 0.5s
            route: [{destination: {host: web, subset: v1}}]
          - route: [{destination: {host: web, subset: v1}}]
    """)
    jason = http(sb, f"{WEB}/", "-n", "2", "-H", "end-user: jason")
    assert jason["statuses"] == {"200": 2} and jason["min_s"] >= 2.0, jason
    other = http(sb, f"{WEB}/", "-n", "5")
    assert other["max_s"] < 1.0, other
    t0 = time.monotonic()
    slow = http(sb, f"{WEB}/delay/3", "-n", "1")
    took = time.monotonic() - t0
    assert slow["statuses"] == {"504": 1} and slow["flags"] == {"UT": 1}, slow
    assert took < 2.5, took


def test_abort_fault_for_half_the_requests(sb: Sandbox, routing: Any) -> None:
    routing("""
        apiVersion: networking.istio.io/v1
        kind: VirtualService
        metadata: {name: web, namespace: default}
        spec:
          hosts: [web]
          http:
          - fault: {abort: {httpStatus: 500, percentage: {value: 50}}}
            route: [{destination: {host: web, subset: v1}}]
    """)
    before = served(sb, "web-v1")
    out = http(sb, f"{WEB}/", "-n", "400", "-c", "4")
    aborted = out["statuses"].get("500", 0)
    assert aborted + out["statuses"].get("200", 0) == 400, out
    assert within(aborted, 400, 0.5), out
    assert out["flags"] == {"FI": aborted}, out
    # aborted requests never reach the upstream (+1: our own count request)
    assert served(sb, "web-v1") - before == 400 - aborted + 1


def test_503_once_is_retried_and_client_sees_200(sb: Sandbox, routing: Any) -> None:
    routing("""
        apiVersion: networking.istio.io/v1
        kind: VirtualService
        metadata: {name: web, namespace: default}
        spec:
          hosts: [web]
          http:
          - route: [{destination: {host: web, subset: v2}}]
    """)
    key = f"k{time.time_ns()}"
    before = served(sb, "web-v2")
    out = http(sb, f"{WEB}/fail/1/{key}", "-n", "1")
    assert out["statuses"] == {"200": 1}, out
    # the upstream saw both attempts (+1: our own count request)
    assert served(sb, "web-v2") - before == 3
    # and the access log says so
    rec = access_records(sb, "node1", lambda r: key in r["path"])
    assert rec and rec[-1]["attempts"] == 2 and rec[-1]["response_code"] == 200, rec


def test_retries_off_shows_the_503(sb: Sandbox, routing: Any) -> None:
    routing("""
        apiVersion: networking.istio.io/v1
        kind: VirtualService
        metadata: {name: web, namespace: default}
        spec:
          hosts: [web]
          http:
          - retries: {attempts: 0}
            route: [{destination: {host: web, subset: v2}}]
    """)
    out = http(sb, f"{WEB}/fail/1/k{time.time_ns()}", "-n", "1")
    assert out["statuses"] == {"503": 1}, out


def test_retry_policy_with_per_try_timeout(sb: Sandbox, routing: Any) -> None:
    routing("""
        apiVersion: networking.istio.io/v1
        kind: VirtualService
        metadata: {name: web, namespace: default}
        spec:
          hosts: [web]
          http:
          - retries: {attempts: 3, perTryTimeout: 0.3s, retryOn: "5xx,reset"}
            route: [{destination: {host: web, subset: v1}}]
    """)
    t0 = time.monotonic()
    out = http(sb, f"{WEB}/delay/2", "-n", "1")
    took = time.monotonic() - t0
    assert out["statuses"] == {"504": 1}, out
    assert took < 2.0, took  # 4 tries of 0.3 s plus back-off, not 2 s
    rec = access_records(sb, "node1", lambda r: r["path"] == "/delay/2")
    assert rec[-1]["attempts"] == 4, rec[-1]


def test_outlier_detection_ejects_then_brings_back(sb: Sandbox, routing: Any) -> None:
    routing("""
        apiVersion: networking.istio.io/v1
        kind: VirtualService
        metadata: {name: web, namespace: default}
        spec:
          hosts: [web]
          http:
          - retries: {attempts: 0}
            route: [{destination: {host: web, subset: all}}]
        ---
        apiVersion: networking.istio.io/v1
        kind: DestinationRule
        metadata: {name: web, namespace: default}
        spec:
          host: web
          trafficPolicy:
            loadBalancer: {simple: ROUND_ROBIN}
            outlierDetection:
              consecutive5xxErrors: 2
              interval: 0.5s
              baseEjectionTime: 10s
              maxEjectionPercent: 100
          subsets:
          - {name: all, labels: {app: web}}
    """, own_dr=True)
    # 10 s of ejection: the checks below (two request runs, `ctl` started as a process)
    # must all see it, also on a loaded machine
    app_get(sb, "web-v2", "/toggle-fail/503")
    try:
        first = http(sb, f"{WEB}/", "-n", "30")
        # at most 2 failures reach the client before web-v2 is ejected
        assert first["statuses"].get("503", 0) <= 2, first
        later = http(sb, f"{WEB}/", "-n", "30")
        assert "v2" not in later["versions"] and later["statuses"] == {"200": 30}, later
        # the operator sees why
        with AdminClient(sb.agent_socket("node1")) as c:
            ejected = c.requests()["ejected"]
        assert [e["endpoint"] for e in ejected] == [f"{sb.pod_ip('web-v2')}:8080"], ejected
        p = subprocess.run(
            [sys.executable, "-m", "nodeagent", "ctl", "--node", "node1", "requests"],
            capture_output=True, text=True, timeout=20,
        )
        assert "Ejected by outlier detection" in p.stdout and sb.pod_ip("web-v2") in p.stdout
    finally:
        app_get(sb, "web-v2", "/toggle-fail/0")
    time.sleep(10.5)
    back = http(sb, f"{WEB}/", "-n", "60")
    assert back["versions"].get("v2", 0) > 0, back


def test_consistent_hash_keeps_a_user_on_one_endpoint(sb: Sandbox, routing: Any) -> None:
    routing("""
        apiVersion: networking.istio.io/v1
        kind: DestinationRule
        metadata: {name: web, namespace: default}
        spec:
          host: web
          trafficPolicy:
            loadBalancer: {consistentHash: {httpHeaderName: x-user}}
    """, own_dr=True)
    seen = set()
    for user in ("alice", "bob", "carol", "dave", "erin", "frank"):
        out = http(sb, f"{WEB}/", "-n", "40", "-c", "4", "-H", f"x-user: {user}")
        assert len(out["pods"]) == 1, (user, out)
        seen |= set(out["pods"])
    assert len(seen) >= 2, seen  # six users do not all hash to one pod


def test_redirect_rewrite_and_header_operations(sb: Sandbox, routing: Any) -> None:
    routing("""
        apiVersion: networking.istio.io/v1
        kind: VirtualService
        metadata: {name: web, namespace: default}
        spec:
          hosts: [web]
          http:
          - match: [{uri: {exact: /old}}]
            redirect: {uri: /new, authority: web.example}
          - match: [{uri: {prefix: /api/}}]
            rewrite: {uri: /v2/}
            headers:
              request: {set: {x-route: api}, remove: [x-secret]}
              response: {add: {x-served-by: nodeagent}}
            route: [{destination: {host: web, subset: v1}}]
          - route: [{destination: {host: web, subset: v1}}]
    """)
    p = curl(sb, f"{WEB}/old", "-i")
    assert p.stdout.startswith("HTTP/1.1 301"), p.stdout
    assert "location: http://web.example/new" in p.stdout.lower(), p.stdout
    p = curl(sb, f"{WEB}/api/items?x=1", "-i", "-H", "x-secret: s3cret")
    head, _, body = p.stdout.partition("\n\n")  # text mode: CRLF read as LF
    assert "x-served-by: nodeagent" in head.lower(), head
    doc = json.loads(body)
    assert doc["path"] == "/v2/items?x=1", doc
    assert doc["headers"]["x-route"] == "api" and "x-secret" not in doc["headers"], doc


def test_no_matching_rule_is_404_nr(sb: Sandbox, routing: Any) -> None:
    routing("""
        apiVersion: networking.istio.io/v1
        kind: VirtualService
        metadata: {name: web, namespace: default}
        spec:
          hosts: [web]
          http:
          - match: [{uri: {prefix: /only}}]
            route: [{destination: {host: web, subset: v1}}]
    """)
    out = http(sb, f"{WEB}/elsewhere", "-n", "1")
    assert out["statuses"] == {"404": 1} and out["flags"] == {"NR": 1}, out


def test_tcp_route_weights_split_connections(sb: Sandbox, routing: Any) -> None:
    routing("""
        apiVersion: networking.istio.io/v1
        kind: VirtualService
        metadata: {name: web, namespace: default}
        spec:
          hosts: [web]
          tcp:
          - match: [{port: 8081}]
            route:
            - {destination: {host: web, subset: v1, port: {number: 8081}}, weight: 80}
            - {destination: {host: web, subset: v2, port: {number: 8081}}, weight: 20}
    """)
    out = http(sb, "http://web:8081/", "-n", "400", "-c", "4", "--new-conn")
    assert out["statuses"] == {"200": 400}, out
    assert set(out["versions"]) <= {"v1", "v2"}, out
    assert within(out["versions"].get("v2", 0), 400, 0.2), out
    # it really is L4: no request was logged for port 8081
    assert not access_records(sb, "node1", lambda r: ":8081" in r["authority"])


# -- protocol ---------------------------------------------------------------------------------


def test_bodies_stream_intact_both_ways(sb: Sandbox) -> None:
    n = 5 * 1024 * 1024
    want = hashlib.sha256(bytes(i % 251 for i in range(n))).hexdigest()
    out = http(sb, f"{WEB}/", "-n", "3", "--method", "POST", "--body-bytes", str(n))
    assert out["statuses"] == {"200": 3} and out["digests"] == {want: 3}, out
    p = sb.exec("client", ["sh", "-c", f"curl -sS -m 30 {WEB}/bytes/{n} | sha256sum"],
                capture_output=True, text=True, timeout=60)
    assert p.stdout.split()[0] == want, p


def test_chunked_upload_with_expect_continue(sb: Sandbox) -> None:
    p = sb.exec(
        "client",
        ["sh", "-c", f"head -c 300000 /dev/zero | curl -sS -m 20 -H 'Transfer-Encoding: chunked' "
         f"-H 'Expect: 100-continue' --data-binary @- {WEB}/upload"],
        capture_output=True, text=True, timeout=40,
    )
    assert p.returncode == 0, p.stderr
    doc = json.loads(p.stdout)
    assert doc["body_bytes"] == 300000
    assert doc["body_sha256"] == hashlib.sha256(bytes(300000)).hexdigest()


def test_upgrade_passes_through(sb: Sandbox) -> None:
    script = (
        "import socket,sys\n"
        "s=socket.create_connection(('web.default.svc.cluster.local',80),timeout=10)\n"
        "s.sendall(b'GET /upgrade-echo HTTP/1.1\\r\\nHost: web\\r\\nConnection: Upgrade\\r\\n"
        "Upgrade: echo\\r\\n\\r\\n')\n"
        "buf=b''\n"
        "while b'\\r\\n\\r\\n' not in buf: buf+=s.recv(4096)\n"
        "head,_,rest=buf.partition(b'\\r\\n\\r\\n')\n"
        "assert head.startswith(b'HTTP/1.1 101'), head\n"
        "msg=bytes(range(256))*400\n"
        "s.sendall(msg); s.shutdown(socket.SHUT_WR)\n"
        "got=rest\n"
        "while True:\n"
        "  d=s.recv(65536)\n"
        "  if not d: break\n"
        "  got+=d\n"
        "print('ok' if got==msg else f'bad {len(got)}')\n"
    )
    p = sb.exec("client", [PY, "-c", script], capture_output=True, text=True, timeout=30)
    assert p.stdout.strip() == "ok", (p.stdout, p.stderr)


def test_malformed_and_oversize_requests_leave_others_unaffected(sb: Sandbox) -> None:
    bg = sb.popen("client", [PY, HTTPCLIENT, f"{WEB}/", "-n", "600", "-c", "2"],
                  stdout=subprocess.PIPE, text=True)
    script = (
        "import socket\n"
        "def ask(raw):\n"
        "  s=socket.create_connection(('10.96.2.10',80),timeout=10); s.sendall(raw)\n"
        "  d=b''\n"
        "  while True:\n"
        "    x=s.recv(65536)\n"
        "    if not x: break\n"
        "    d+=x\n"
        "  return d.split(b'\\r\\n',1)[0].decode()\n"
        "print(ask(b'GARBAGE\\r\\n\\r\\n'))\n"
        "print(ask(b'GET / HTTP/1.1\\r\\nHost: web\\r\\nX-Big: '+b'a'*70000+b'\\r\\n\\r\\n'))\n"
    )
    p = sb.exec("client", [PY, "-c", script], capture_output=True, text=True, timeout=30)
    lines = p.stdout.split("\n")
    assert lines[0].startswith("HTTP/1.1 400"), p
    assert lines[1].startswith("HTTP/1.1 431"), p
    out = json.loads(bg.communicate(timeout=120)[0].strip().splitlines()[-1])
    assert out["statuses"] == {"200": 600}, out


def test_wrk_counts_match_the_metrics_and_access_log_has_trace(sb: Sandbox) -> None:
    def count_200() -> float:
        return metric_value(metrics(sb, "node1"), "istio_requests_total",
                            destination_service="web.default.svc.cluster.local",
                            response_code="200")

    before = count_200()
    p = sb.exec("client", ["wrk", "-t1", "-c8", "-d2s", f"{WEB}/"], capture_output=True,
                text=True, timeout=30)
    assert p.returncode == 0, p.stderr
    line = next(ln for ln in p.stdout.splitlines() if "requests in" in ln)
    done = int(line.split()[0])
    assert "Non-2xx" not in p.stdout, p.stdout
    time.sleep(0.5)
    counted = count_200() - before
    # wrk leaves at most its 8 in-flight requests uncounted
    assert done <= counted <= done + 8, (done, counted)
    # a traceparent sent is propagated to the upstream and logged
    tid = "4bf92f3577b34da6a3ce929d0e0e4736"
    p = curl(sb, f"{WEB}/trace-me", "-H", f"traceparent: 00-{tid}-00f067aa0ba902b7-01")
    doc = json.loads(p.stdout)
    assert tid in doc["headers"]["traceparent"]
    rec = access_records(sb, "node1", lambda r: r["path"] == "/trace-me")
    assert rec[-1]["trace_id"] == tid and rec[-1]["response_code"] == 200, rec[-1]
    assert rec[-1]["source_workload"] == "client" and rec[-1]["upstream_host"].endswith(":8080")
    assert rec[-1]["destination_principal"].startswith("spiffe://cluster.local/ns/default/sa/web")


def access_records(sb: Sandbox, node: str, pred: Any) -> list[dict[str, Any]]:
    deadline = time.monotonic() + 3
    while True:
        out = []
        for line in Path(sb.agent_log(node)).read_text(errors="replace").splitlines():
            if line.startswith("{") and '"response_code"' in line:
                try:
                    r = json.loads(line)
                except ValueError:
                    continue
                if pred(r):
                    out.append(r)
        if out or time.monotonic() > deadline:
            return out
        time.sleep(0.2)


# -- gRPC -------------------------------------------------------------------------------------


def grpc_client(sb: Sandbox, *args: str) -> list[dict[str, Any]]:
    p = sb.exec(
        "client",
        [PY, "-m", "nodeagent.samples.samplegrpc", "client", "--target", "web:50051", *args],
        capture_output=True, text=True, timeout=120,
    )
    assert p.returncode == 0, (p.stdout, p.stderr)
    return [json.loads(line) for line in p.stdout.splitlines() if line.strip()]


def test_grpc_unary_and_streaming_route_by_method(sb: Sandbox, routing: Any) -> None:
    routing("""
        apiVersion: networking.istio.io/v1
        kind: VirtualService
        metadata: {name: web, namespace: default}
        spec:
          hosts: [web]
          http:
          - name: unary-to-v2
            match: [{uri: {exact: /nodeagent.sample.Echo/Unary}}]
            route: [{destination: {host: web, subset: v2}}]
          - name: streams-to-v3
            route: [{destination: {host: web, subset: v3}}]
    """)
    summary = grpc_client(sb, "--method", "unary", "--repeat", "50")[-1]
    assert summary["ok"] == 50 and summary["versions"] == {"v2": 50}, summary
    stream = grpc_client(sb, "--method", "server-stream", "--count", "20", "--text", "s")
    assert len(stream) == 20 and {r["version"] for r in stream} == {"v3"}
    bidi = grpc_client(sb, "--method", "bidi", "--count", "10", "--text", "b")
    assert len(bidi) == 10 and {r["version"] for r in bidi} == {"v3"}
    up = grpc_client(sb, "--method", "client-stream", "--count", "7", "--payload-bytes", "300000")
    assert up[-1]["count"] == 7 and up[-1]["version"] == "v3"
    rec = access_records(sb, "node1", lambda r: r["path"].endswith("/Unary"))
    assert rec[-1]["protocol"] == "HTTP/2" and rec[-1]["route_name"] == "unary-to-v2"
    assert rec[-1]["grpc_status"] == "0"
    assert rec[-1]["destination_principal"].endswith("/sa/web")
