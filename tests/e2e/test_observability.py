"""End to end: the mesh's metrics as an operator reads them, with real parts.

A paced load (``RATE`` requests a second for ``SECONDS``, one in ten answered 503) goes from
the client pod on node1 to the ``echo`` service on node2. Meanwhile:

- Debian's Prometheus server, run in node1's namespace with the shipped
  ``deploy/observability/prometheus.yml`` (scrape interval 1 s), scrapes both agents; its
  PromQL must count exactly what the load sent and give its rate;
- ``nodeagent dashboard`` serves the graph from the agents' sockets, and headless
  Chromium (Debian's) opens it, checks the services that talked are drawn with a padlock,
  clicks the edge and reads its recent requests, and keeps a screenshot;
- a second dashboard reads the same graph from Prometheus (``--prometheus``).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from cdp import Browser, chromium

from nodeagent.redirect.netns import netns_path
from nodeagent.sandbox import Sandbox

pytestmark = [
    pytest.mark.privileged,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root for netns and iptables"),
]

REDIRECT_MODES = ("iptables",)  # what is observed does not depend on the capture
ROOT = Path(__file__).resolve().parents[2]
PROM_CONFIG = ROOT / "deploy" / "observability" / "prometheus.yml"
ARTEFACTS = Path(os.environ.get("NODEAGENT_ARTEFACTS", "/tmp/nodeagent-artefacts"))
PY = sys.executable
RATE = 10
SECONDS = 75
PROM_PORT = 19090
SERVICE = "echo.default.svc.cluster.local"

LOAD = """
import http.client, json, sys, time
rate, seconds = int(sys.argv[1]), float(sys.argv[2])
conn = http.client.HTTPConnection("echo.default.svc.cluster.local", 80, timeout=10)
sent, codes, start = 0, {}, time.time()
while time.time() < start + seconds:
    path = "/status/503" if sent % 10 == 9 else "/"
    try:
        conn.request("GET", path)
        r = conn.getresponse(); r.read(); code = r.status
    except (OSError, http.client.HTTPException):
        conn.close(); code = 0
    sent += 1
    codes[code] = codes.get(code, 0) + 1
    time.sleep(max(0.0, start + sent / rate - time.time()))
print(json.dumps({"sent": sent, "codes": codes, "start": start, "end": time.time()}))
"""


def in_node(sb: Sandbox, node: str, argv: list[str]) -> list[str]:
    return ["nsenter", f"--net={netns_path(sb.node_netns(node))}", *argv]


def get_in_node(sb: Sandbox, url: str, **params: str) -> Any:
    """GET ``url`` from node1's namespace (where Prometheus and the second dashboard are)."""
    argv = ["curl", "-sS", "-m", "10", "--get", url]
    for k, v in params.items():
        argv += ["--data-urlencode", f"{k}={v}"]
    p = subprocess.run(in_node(sb, "node1", argv), capture_output=True, text=True, timeout=20)
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout)


def promql(sb: Sandbox, expr: str, at: float | None = None) -> list[tuple[dict[str, str], float]]:
    params = {"query": expr} | ({"time": f"{at:.3f}"} if at is not None else {})
    doc = get_in_node(sb, f"http://127.0.0.1:{PROM_PORT}/api/v1/query", **params)
    assert doc["status"] == "success", doc
    return [(r["metric"], float(r["value"][1])) for r in doc["data"]["result"]]


def stop(p: subprocess.Popen[Any]) -> None:
    if p.poll() is None:
        p.send_signal(signal.SIGTERM)
        try:
            p.wait(15)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(10)


@pytest.fixture(scope="module")
def prometheus(sb: Sandbox, tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Debian's Prometheus in node1's namespace, scraping both agents every second with
    the shipped config (its targets set to this sandbox's node addresses)."""
    if shutil.which("prometheus") is None:
        pytest.fail("no prometheus on PATH: scripts/setup.sh installs Debian's")
    d = tmp_path_factory.mktemp("prometheus")
    cfg = yaml.safe_load(PROM_CONFIG.read_text())
    cfg["global"]["scrape_interval"] = "1s"
    job = cfg["scrape_configs"][0]
    job["static_configs"] = [{"targets": [f"{sb.node_ip(n)}:15020" for n in ("node1", "node2")]}]
    (d / "prometheus.yml").write_text(yaml.safe_dump(cfg))
    with open(d / "prometheus.log", "wb") as log:
        proc = subprocess.Popen(
            in_node(sb, "node1", [
                "prometheus", f"--config.file={d / 'prometheus.yml'}",
                f"--storage.tsdb.path={d / 'data'}",
                f"--web.listen-address=127.0.0.1:{PROM_PORT}",
                "--storage.tsdb.retention.time=1h"]),
            stdout=log, stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, (d / "prometheus.log").read_text()[-3000:]
            try:
                up = promql(sb, "up")
                if len(up) == 2 and all(v == 1 for _, v in up):
                    break
            except (AssertionError, json.JSONDecodeError):
                pass
            assert time.monotonic() < deadline, "Prometheus never saw both agents up"
            time.sleep(0.5)
        yield
    finally:
        stop(proc)


@dataclass
class Load:
    proc: subprocess.Popen[str]
    started: float
    _result: dict[str, Any] | None = None

    def result(self) -> dict[str, Any]:
        """What the load sent (waits for its end)."""
        if self._result is None:
            out, err = self.proc.communicate(timeout=SECONDS + 60)
            assert self.proc.returncode == 0, err
            self._result = json.loads(out.strip().splitlines()[-1])
        return self._result


@pytest.fixture(scope="module")
def load(sb: Sandbox, prometheus: None) -> Iterator[Load]:
    """The paced load, started once Prometheus scrapes; runs while the tests look."""
    proc = sb.popen("client", [PY, "-c", LOAD, str(RATE), str(SECONDS)],
                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        yield Load(proc, time.time())
    finally:
        stop(proc)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_dashboard(argv: list[str], log: Path) -> subprocess.Popen[bytes]:
    with open(log, "wb") as out:
        return subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT,
                                env={**os.environ, "PYTHONPATH": str(ROOT)})


def wait_graph(fetch: Any, proc: subprocess.Popen[bytes], log: Path,
               ok: Any, timeout: float = 40) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    doc: dict[str, Any] = {}
    while time.monotonic() < deadline:
        assert proc.poll() is None, log.read_text()
        try:
            doc = fetch()
            if ok(doc):
                return doc
        except (OSError, AssertionError, json.JSONDecodeError):
            pass
        time.sleep(0.5)
    raise AssertionError(f"the graph never showed the traffic: {doc}")


def edge(doc: dict[str, Any], source: str, target: str) -> dict[str, Any] | None:
    return next((e for e in doc["edges"] if e["source"] == source and e["target"] == target),
                None)


CLIENT, ECHO = "workload:default/client", f"service:{SERVICE}"


def test_the_page_in_chromium_shows_who_talked(
    sb: Sandbox, load: Load, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    if chromium() is None:
        pytest.fail("no chromium on PATH: scripts/setup.sh installs Debian's")
    port = free_port()
    log = tmp_path / "dashboard.log"
    proc = start_dashboard([PY, "-m", "nodeagent", "dashboard", "--sandbox", "--interval", "1",
                            "--listen", f"127.0.0.1:{port}"], log)
    url = f"http://127.0.0.1:{port}/"
    try:
        def fetch() -> dict[str, Any]:
            import urllib.request

            with urllib.request.urlopen(url + "api/graph", timeout=5) as r:
                doc: dict[str, Any] = json.loads(r.read())
            return doc

        def live(doc: dict[str, Any]) -> bool:
            e = edge(doc, CLIENT, ECHO)
            return e is not None and e["rps"] > 0 and e["p99_ms"] is not None

        wait_graph(fetch, proc, log, live)
        browser = Browser()
        try:
            browser.open(url)
            names = browser.wait_for(
                "(() => { const n = [...document.querySelectorAll('g.node')]"
                ".map(g => g.dataset.kind + ':' + g.dataset.name);"
                " return n.includes('workload:echo-1') && n.includes('workload:echo-2') && n; })()"
            )
            assert {"workload:client", "service:echo", "workload:echo-1",
                    "workload:echo-2"} <= set(names)
            sel = f'g.edge[data-source="{CLIENT}"][data-target="{ECHO}"]'
            label = browser.wait_for(f"document.querySelector('{sel} text.label')?.textContent")
            assert "rps" in label and "err" in label and "p99" in label
            padlocks = browser.eval(f"document.querySelectorAll('{sel} use.padlock').length")
            assert padlocks == 1, "the client → echo edge is mutual TLS: a padlock is drawn"
            # click the edge's label as a person would
            box = browser.eval(f"(() => {{ const r = document.querySelector('{sel} text.label')"
                               ".getBoundingClientRect(); return [r.x + r.width / 2,"
                               " r.y + r.height / 2]; })()")
            browser.click(*box)
            rows = browser.wait_for(
                "(() => { const t = document.querySelector('#requests'); return t &&"
                " [...t.querySelectorAll('tr')].slice(1).map(r => [...r.cells]"
                ".map(c => c.textContent)); })()"
            )
            assert rows and all(r[3] == "GET" for r in rows)
            assert {r[5] for r in rows} <= {"200", "503"} and "200" in {r[5] for r in rows}
            ARTEFACTS.mkdir(parents=True, exist_ok=True)
            shot = browser.screenshot(ARTEFACTS / "dashboard-graph.png")
        finally:
            browser.close()
        assert shot.stat().st_size > 10_000
        with capsys.disabled():
            print(f"\nscreenshot of the service graph: {shot}")
    finally:
        stop(proc)


def test_prometheus_counts_what_the_load_sent(sb: Sandbox, load: Load) -> None:
    sent = load.result()
    n, codes = sent["sent"], sent["codes"]
    assert codes.get("0", 0) == 0, codes
    assert n >= RATE * SECONDS * 0.9, sent
    time.sleep(3)  # a last scrape after the last request
    named = promql(sb, 'count(istio_requests_total{destination_service_name="echo"})')
    selector = ('destination_service_name="echo",destination_service_namespace="default"'
                if named else f'destination_service="{SERVICE}"')
    by_reporter = {m.get("reporter", ""): v for m, v in promql(
        sb, f"sum by (reporter) (istio_requests_total{{{selector},source_workload=\"client\"}})")}
    assert by_reporter.get("source") == n, (by_reporter, sent)
    assert by_reporter.get("destination", n) == n, (by_reporter, sent)
    failed = promql(sb, f'sum(istio_requests_total{{{selector},reporter="source",'
                        f'response_code="503"}})')
    assert failed[0][1] == codes.get("503"), (failed, codes)
    # the rate over the last minute of the load, as a Grafana panel asks it
    at = sent["end"] - 2
    [(_, rate)] = promql(
        sb, f'sum(rate(istio_requests_total{{{selector},reporter="source"}}[1m]))', at=at)
    assert rate == pytest.approx(RATE, rel=0.1), rate
    [(_, errors)] = promql(
        sb, f'sum(rate(istio_requests_total{{{selector},reporter="source",'
            f'response_code=~"5.."}}[1m]))', at=at)
    assert errors / rate == pytest.approx(0.1, abs=0.03)


def test_the_dashboard_reads_the_same_graph_from_prometheus(
    sb: Sandbox, load: Load, tmp_path: Path
) -> None:
    total = load.result()["sent"]
    time.sleep(2)  # scraped after the last request
    port = free_port()
    log = tmp_path / "dashboard-prom.log"
    proc = start_dashboard(in_node(sb, "node1", [
        PY, "-m", "nodeagent", "dashboard", "--sandbox", "--prometheus",
        f"http://127.0.0.1:{PROM_PORT}", "--listen", f"127.0.0.1:{port}"]), log)
    try:
        doc = wait_graph(lambda: get_in_node(sb, f"http://127.0.0.1:{port}/api/graph"),
                         proc, log, lambda d: edge(d, CLIENT, ECHO) is not None)
        assert doc["source"] == f"Prometheus at http://127.0.0.1:{PROM_PORT}"
        assert not doc["errors"], doc["errors"]
        e = edge(doc, CLIENT, ECHO)
        assert e is not None and e["mtls"] and e["protocol"] == "http"
        assert e["requests_total"] == total
        assert e["rps"] > 0 and e["error_rate"] == pytest.approx(0.1, abs=0.03)
        assert {n["name"] for n in doc["nodes"]} >= {"client", "echo", "echo-1", "echo-2"}
    finally:
        stop(proc)
