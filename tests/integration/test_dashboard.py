"""``nodeagent dashboard`` over a real node agent socket: the graph's JSON, an edge's recent
requests, the page itself (nothing fetched from the internet), an agent that is down.

The agent side is the real gRPC server (``start_admin_server``) over the in-test view of
``test_admin.py`` and a real ``Metrics`` registry whose series the test moves; the
dashboard is the real HTTP server on 127.0.0.1 with its poller scraping the socket.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import ThreadingHTTPServer
from typing import Any

import pytest
from test_admin import FakeView, UvloopThread, _typed

from nodeagent.admin.server import start_admin_server
from nodeagent.dashboard.agents import AgentSource
from nodeagent.dashboard.server import Dashboard, serve
from nodeagent.telemetry.metrics import BUCKET0, COUNT, DURATION_BUCKETS_MS, HTTP_LABELS, Metrics

WEB = "web.default.svc.cluster.local"


def labels(**kw: str) -> dict[str, str]:
    base = dict.fromkeys(HTTP_LABELS, "unknown") | {
        "reporter": "source", "source_workload": "client", "source_workload_namespace": "default",
        "destination_workload": "web-v1", "destination_workload_namespace": "default",
        "destination_service": WEB, "response_code": "200", "response_flags": "-",
        "connection_security_policy": "mutual_tls", "request_protocol": "http",
        "route_name": "default"}
    return base | kw


class RequestsView(FakeView):
    def recent_requests(self, limit: int) -> list[dict[str, Any]]:
        rec = {"start_time": "2026-12-06T10:00:00.000Z", "method": "GET", "response_flags": "-",
               "duration_ms": 2.5, "reporter": "source", "source_workload": "client",
               "destination_service": WEB, "destination_workload": "web-v1"}
        return [rec | {"path": "/ok", "response_code": 200},
                rec | {"path": "/bad", "response_code": 503},
                rec | {"path": "/elsewhere", "response_code": 200,
                       "destination_service": "db.default.svc.cluster.local"}]


@dataclass
class Running:
    metrics: Metrics
    source: AgentSource
    url: str


@pytest.fixture
def dashboard() -> Iterator[Running]:
    short = f"/tmp/na-dash-{os.getpid()}"
    os.makedirs(short, exist_ok=True)
    path = f"{short}/node1.sock"
    metrics = Metrics()
    lt = UvloopThread()
    server = lt.run(start_admin_server(_typed(RequestsView()), path, registry=metrics.registry))
    source = AgentSource({"node1": path, "node9": f"{short}/node9.sock"}, window=60.0)
    board = Dashboard(source, source, interval=0.1)
    httpd: ThreadingHTTPServer = serve(board, "127.0.0.1", 0)
    t = threading.Thread(target=httpd.serve_forever, daemon=True)
    t.start()
    try:
        yield Running(metrics, source, f"http://127.0.0.1:{httpd.server_address[1]}")
    finally:
        board.stop()
        httpd.shutdown()
        httpd.server_close()
        lt.run(server.stop(None))
        lt.close()
        shutil.rmtree(short, ignore_errors=True)


def get(url: str) -> tuple[int, str, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.status, r.headers["content-type"], r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers["content-type"], e.read()


def graph(url: str) -> dict[str, Any]:
    status, ctype, body = get(url + "/api/graph")
    assert status == 200 and ctype == "application/json"
    doc: dict[str, Any] = json.loads(body)
    return doc


def wait_scraped(source: AgentSource, n: int = 2) -> None:
    """Until the poller has scraped node1 ``n`` more times."""
    start = len(source._history["node1"])
    deadline = time.monotonic() + 10
    while len(source._history["node1"]) < start + n:
        assert time.monotonic() < deadline, "the dashboard never scraped the agent"
        time.sleep(0.05)


def test_the_graph_shows_who_talked_with_rates_errors_p99_and_mtls(dashboard: Running) -> None:
    wait_scraped(dashboard.source)
    assert graph(dashboard.url)["edges"] == []
    ok = dashboard.metrics.requests.series_of(labels())
    bad = dashboard.metrics.requests.series_of(labels(response_code="503"))
    ok[COUNT], bad[COUNT] = 40, 10
    ok[BUCKET0 + DURATION_BUCKETS_MS.index(5)] = 40  # 1-5 ms
    bad[BUCKET0 + DURATION_BUCKETS_MS.index(50)] = 10  # 25-50 ms
    wait_scraped(dashboard.source)
    doc = graph(dashboard.url)
    assert {(n["kind"], n["name"]) for n in doc["nodes"]} == {
        ("workload", "client"), ("service", "web"), ("workload", "web-v1")}
    assert len(doc["edges"]) == 2
    for e in doc["edges"]:
        assert e["rps"] > 0 and e["requests_total"] == 50
        assert e["error_rate"] == pytest.approx(0.2)
        assert 25 < e["p99_ms"] <= 50
        assert e["mtls"] is True
    # node9 has no agent: said on the page, not fatal
    assert "node9" in doc["errors"] and "no such socket" in doc["errors"]["node9"]
    assert doc["source"].startswith("agents: node1")


def test_an_edges_recent_requests(dashboard: Running) -> None:
    q = f"source_workload=client&destination_service={WEB}"
    status, _, body = get(f"{dashboard.url}/api/requests?{q}")
    assert status == 200
    doc = json.loads(body)
    assert [(r["path"], r["response_code"], r["node"]) for r in doc["records"]] == [
        ("/ok", 200, "node1"), ("/bad", 503, "node1")]
    assert get(f"{dashboard.url}/api/requests?path=/x")[0] == 400


def test_the_page_loads_nothing_from_the_internet(dashboard: Running) -> None:
    status, ctype, body = get(dashboard.url + "/")
    assert status == 200 and ctype.startswith("text/html")
    page = body.decode()
    assert "<svg" in page and "/api/graph" in page and "/api/requests" in page
    # the one absolute URL is the SVG namespace (an identifier, never fetched)
    assert set(re.findall(r"https?://[^\s\"'<>)]+", page)) == {"http://www.w3.org/2000/svg"}
    assert not re.search(r"<(script|link|img|iframe)[^>]+(src|href)=", page)
    assert not re.search(r"@import|url\((?!#)", page)
    assert get(dashboard.url + "/nope")[0] == 404


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (["--listen", "nowhere"], "--listen 'nowhere': expected HOST:PORT"),
        (["--prometheus", "ftp://x"], "--prometheus 'ftp://x': expected an http://"),
        (["--listen", "TAKEN"], "cannot listen on 127.0.0.1:"),
    ],
)
def test_bad_options_are_one_clear_line(
    argv: list[str], says: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from nodeagent.cli import main

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        argv = [a.replace("TAKEN", f"127.0.0.1:{port}") for a in argv]
        assert main(["dashboard", "--socket", "/nonexistent/n1.sock", *argv]) == 1
    err = capsys.readouterr().err
    assert err.startswith("nodeagent dashboard: ") and says in err and "Traceback" not in err
