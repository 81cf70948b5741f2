"""``nodeagent sample-app`` as a real process on loopback, and the bookinfo example files."""

from __future__ import annotations

import argparse
import hashlib
import http.client
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from nodeagent.samples import sampleapp
from nodeagent.samples.common import pattern_bytes

ROOT = Path(__file__).resolve().parents[2]
BOOKINFO = ROOT / "examples" / "bookinfo"
LISTENING = re.compile(r"^listening (http|tcp-echo) (\S+):(\d+)", re.MULTILINE)

pytestmark = pytest.mark.timeout(120)


@dataclass
class App:
    proc: subprocess.Popen[bytes]
    log: Path
    http_port: int = 0
    echo_ports: list[int] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}/"

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


StartApp = Callable[..., App]


@pytest.fixture
def start_app(tmp_path: Path) -> Iterator[StartApp]:
    """Start sample apps as subprocesses on ephemeral ports; always stop them."""
    apps: list[App] = []

    def start(*args: str, env: dict[str, str] | None = None) -> App:
        log = tmp_path / f"app{len(apps)}.log"
        cmd = [sys.executable, "-m", "nodeagent.samples.sampleapp"]
        cmd += ["--host", "127.0.0.1", "--port", "0"]
        full_env = {**os.environ, **(env or {})}
        with log.open("wb") as out:
            proc = subprocess.Popen(
                [*cmd, *args], stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, env=full_env
            )
        app = App(proc=proc, log=log)
        apps.append(app)
        want = 1 + args.count("--tcp-echo")
        deadline = time.monotonic() + 20
        while True:
            found = LISTENING.findall(log.read_text(errors="replace"))
            if len(found) >= want:
                break
            if proc.poll() is not None:
                pytest.fail(f"sample-app exited with {proc.returncode}:\n{app.log_text()}")
            if time.monotonic() > deadline:
                pytest.fail(f"sample-app did not start listening:\n{app.log_text()}")
            time.sleep(0.05)
        app.http_port = int(found[0][2])
        app.echo_ports = [int(port) for kind, _, port in found[1:] if kind == "tcp-echo"]
        return app

    try:
        yield start
    finally:
        for app in apps:
            if app.proc.poll() is None:
                app.proc.terminate()
        for app in apps:
            try:
                app.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                app.proc.kill()
                app.proc.wait()


def request(
    port: int,
    path: str,
    *,
    method: str = "GET",
    headers: dict[str, str] | None = None,
    body: bytes | None = None,
    conn: http.client.HTTPConnection | None = None,
) -> tuple[int, http.client.HTTPResponse, bytes]:
    c = conn or http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        c.request(method, path, body=body, headers=headers or {})
        resp = c.getresponse()
        data = resp.read()
        return resp.status, resp, data
    finally:
        if conn is None:
            c.close()


def get_json(port: int, path: str = "/", **kw: Any) -> dict[str, Any]:
    status, resp, data = request(port, path, **kw)
    assert status == 200, data
    assert resp.getheader("Content-Type") == "application/json"
    doc: dict[str, Any] = json.loads(data)
    return doc


def closed_port() -> int:
    """A loopback port nobody listens on (connections are refused)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


# --------------------------------------------------------------------------- HTTP


def test_answer_names_the_pod_and_echoes_request(start_app: StartApp) -> None:
    env = {"POD_NAME": "details-v1", "POD_NAMESPACE": "default", "NODE_NAME": "node2"}
    app = start_app("--service", "details", "--version", "v7", env=env)
    doc = get_json(app.http_port, "/some/path?q=1", headers={"X-Test": "hello"})
    assert doc["pod"] == "details-v1"
    assert doc["namespace"] == "default"
    assert doc["node"] == "node2"
    assert doc["service"] == "details"
    assert doc["version"] == "v7"
    assert doc["method"] == "GET"
    assert doc["path"] == "/some/path?q=1"
    assert doc["headers"]["x-test"] == "hello"
    assert doc["body_bytes"] == 0
    assert doc["calls"] == []


def test_service_and_version_default_from_env(start_app: StartApp) -> None:
    app = start_app(env={"SERVICE_NAME": "ratings", "SERVICE_VERSION": "v9"})
    doc = get_json(app.http_port)
    assert (doc["service"], doc["version"]) == ("ratings", "v9")


def test_keep_alive_and_request_bodies(start_app: StartApp) -> None:
    app = start_app()
    conn = http.client.HTTPConnection("127.0.0.1", app.http_port, timeout=30)
    try:
        conn.connect()
        local = conn.sock.getsockname()
        doc = get_json(app.http_port, "/a", method="POST", body=b"x" * 100_000, conn=conn)
        assert (doc["method"], doc["body_bytes"]) == ("POST", 100_000)
        chunks = iter([b"abc", b"defgh"])  # an iterable body is sent chunked
        doc = get_json(app.http_port, "/b", method="PUT", body=chunks, conn=conn)
        assert (doc["method"], doc["body_bytes"]) == ("PUT", 8)
        assert doc["headers"]["transfer-encoding"] == "chunked"
        doc = get_json(app.http_port, "/c", method="DELETE", conn=conn)
        assert doc["method"] == "DELETE"
        # All three on one connection: the server kept it alive.
        assert conn.sock.getsockname() == local
        assert doc["client"] == f"{local[0]}:{local[1]}"
    finally:
        conn.close()


def test_chained_call_nests_answer_and_forwards_trace_headers(start_app: StartApp) -> None:
    ratings = start_app("--service", "ratings", "--version", "v1")
    dead = f"http://127.0.0.1:{closed_port()}/"
    reviews = start_app(
        "--service", "reviews", "--version", "v2", "--call", ratings.url, "--call", dead
    )
    traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    headers = {
        "traceparent": traceparent,
        "x-request-id": "req-1",
        "baggage": "k=v",
        "end-user": "jason",
        "x-not-forwarded": "secret",
    }
    doc = get_json(reviews.http_port, "/", headers=headers)
    assert doc["service"] == "reviews"
    first, second = doc["calls"]
    assert first["url"] == ratings.url
    assert first["status"] == 200
    inner = first["body"]
    assert (inner["service"], inner["version"], inner["calls"]) == ("ratings", "v1", [])
    assert inner["headers"]["traceparent"] == traceparent
    assert inner["headers"]["x-request-id"] == "req-1"
    assert inner["headers"]["baggage"] == "k=v"
    assert inner["headers"]["end-user"] == "jason"
    assert "x-not-forwarded" not in inner["headers"]
    # The failed call is reported, and the answer is still 200.
    assert second["url"] == dead
    assert second["status"] == 0
    assert "refused" in second["body"].lower()


def test_downstream_error_status_is_reported(start_app: StartApp) -> None:
    ratings = start_app("--service", "ratings")
    productpage = start_app("--service", "productpage", "--call", ratings.url + "status/503")
    doc = get_json(productpage.http_port)
    (call,) = doc["calls"]
    assert call["status"] == 503
    assert call["body"]["service"] == "ratings"


def test_downstream_timeout_is_reported(start_app: StartApp) -> None:
    slow = start_app("--service", "slow")
    app = start_app("--call", slow.url + "delay/5", "--call-timeout", "0.5")
    t0 = time.monotonic()
    doc = get_json(app.http_port)
    assert time.monotonic() - t0 < 4
    (call,) = doc["calls"]
    assert call["status"] == 0
    assert "timeout" in call["body"].lower()


def test_status_paths(start_app: StartApp) -> None:
    app = start_app("--call", f"http://127.0.0.1:{closed_port()}/")
    status, resp, data = request(app.http_port, "/status/503")
    assert status == 503
    doc = json.loads(data)
    assert doc["calls"] == []  # special paths call nobody
    status, _, data = request(app.http_port, "/status/418", method="POST", body=b"x")
    assert status == 418
    status, _, data = request(app.http_port, "/status/204")
    assert (status, data) == (204, b"")
    status, _, _ = request(app.http_port, "/status/999")
    assert status == 400
    status, resp, data = request(app.http_port, "/", method="HEAD")
    assert status == 200 and data == b""
    assert int(resp.getheader("Content-Length") or 0) > 0


def test_delay_and_healthz(start_app: StartApp) -> None:
    app = start_app()
    t0 = time.monotonic()
    doc = get_json(app.http_port, "/delay/0.3")
    assert time.monotonic() - t0 >= 0.3
    assert doc["path"] == "/delay/0.3"
    status, _, data = request(app.http_port, "/healthz")
    assert (status, data) == (200, b"ok")


@pytest.mark.parametrize("n", [0, 1, 250, 251, 65_536, 3_000_017])
def test_bytes(start_app: StartApp, n: int) -> None:
    app = start_app()
    status, resp, data = request(app.http_port, f"/bytes/{n}")
    assert status == 200
    assert resp.getheader("Content-Length") == str(n)
    assert len(data) == n
    assert data == bytes(i % 251 for i in range(n))
    assert data == pattern_bytes(n)


def test_logs_one_line_per_request_and_stops_cleanly(start_app: StartApp) -> None:
    app = start_app("--service", "details", "--version", "v1")
    request(app.http_port, "/healthz")
    request(app.http_port, "/status/503")
    app.proc.send_signal(signal.SIGTERM)
    assert app.proc.wait(timeout=10) == 0
    text = app.log_text()
    assert re.search(r" details/v1 GET /healthz 200 [\d.]+ms$", text, re.MULTILINE), text
    assert re.search(r" details/v1 GET /status/503 503 [\d.]+ms$", text, re.MULTILINE), text
    assert "sample-app stopped" in text


# --------------------------------------------------------------------------- fail modes


def test_fail_n_key_answers_503_n_times_then_200(start_app: StartApp) -> None:
    app = start_app("--call", f"http://127.0.0.1:{closed_port()}/")
    seen = []
    for _ in range(4):
        status, _, data = request(app.http_port, "/fail/2/alpha")
        doc = json.loads(data)
        seen.append((status, doc["attempt"]))
        assert doc["calls"] == []  # a special path: no downstream calls
        assert doc["path"] == "/fail/2/alpha"
    assert seen == [(503, 1), (503, 2), (200, 3), (200, 4)]
    # Another key counts on its own; N=0 never fails.
    status, _, data = request(app.http_port, "/fail/1/beta", method="POST", body=b"x")
    assert (status, json.loads(data)["attempt"]) == (503, 1)
    assert request(app.http_port, "/fail/1/beta")[0] == 200
    assert request(app.http_port, "/fail/0/gamma")[0] == 200
    assert request(app.http_port, "/fail/x/delta")[0] == 400
    assert request(app.http_port, "/fail/-1/delta")[0] == 400


def test_fail_n_key_counter_is_thread_safe(start_app: StartApp) -> None:
    app = start_app()
    n, total = 10, 40

    def one(_: int) -> tuple[int, int]:
        status, _, data = request(app.http_port, "/fail/10/shared")
        return status, json.loads(data)["attempt"]

    with ThreadPoolExecutor(max_workers=total) as pool:
        results = list(pool.map(one, range(total)))
    assert sorted(a for _, a in results) == list(range(1, total + 1))
    assert all((status == 503) == (attempt <= n) for status, attempt in results)
    assert sum(status == 503 for status, _ in results) == n


def test_served_counts_every_request_but_healthz(start_app: StartApp) -> None:
    app = start_app()
    conn = http.client.HTTPConnection("127.0.0.1", app.http_port, timeout=30)
    try:
        first = get_json(app.http_port, "/", conn=conn)["served"]
        request(app.http_port, "/healthz", conn=conn)
        status, _, data = request(app.http_port, "/status/503", conn=conn)
        assert (status, json.loads(data)["served"]) == (503, first + 1)
        request(app.http_port, "/fail/1/k", conn=conn)
        request(app.http_port, "/bytes/10")  # another connection counts too
        assert get_json(app.http_port, "/", conn=conn)["served"] == first + 4
    finally:
        conn.close()
    assert first == 1


def test_fail_status_flag_and_runtime_toggle(start_app: StartApp) -> None:
    dead = f"http://127.0.0.1:{closed_port()}/"
    app = start_app("--service", "reviews", "--fail-status", "503", "--call", dead)
    status, resp, data = request(app.http_port, "/any/path", method="POST", body=b"abc")
    assert status == 503
    assert resp.getheader("Content-Type") == "application/json"
    doc = json.loads(data)
    assert (doc["service"], doc["body_bytes"], doc["calls"]) == ("reviews", 3, [])
    # Special paths are not failed.
    assert request(app.http_port, "/healthz")[:1] == (200,)
    assert request(app.http_port, "/status/200")[0] == 200
    assert request(app.http_port, "/delay/0")[0] == 200
    assert request(app.http_port, "/bytes/3")[0] == 200
    # Good again, at runtime.
    doc = get_json(app.http_port, "/toggle-fail/0")
    assert (doc["fail_status"], doc["previous_fail_status"]) == (0, 503)
    doc = get_json(app.http_port, "/")
    assert len(doc["calls"]) == 1  # the normal answer again, downstream calls included
    # And bad again, with another status.
    doc = get_json(app.http_port, "/toggle-fail/500")
    assert (doc["fail_status"], doc["previous_fail_status"]) == (500, 0)
    assert request(app.http_port, "/")[0] == 500
    assert request(app.http_port, "/", method="HEAD")[:1] == (500,)
    assert request(app.http_port, "/toggle-fail/99")[0] == 400
    assert request(app.http_port, "/toggle-fail/600")[0] == 400
    assert request(app.http_port, "/")[0] == 500  # a bad toggle changed nothing


@pytest.mark.parametrize("value", ["42", "600", "x"])
def test_fail_status_flag_is_checked(value: str) -> None:
    parser = argparse.ArgumentParser()
    sampleapp.add_parser(parser.add_subparsers())
    with pytest.raises(SystemExit):
        parser.parse_args(["sample-app", "--fail-status", value])
    args = parser.parse_args(["sample-app", "--fail-status", "0"])
    assert args.fail_status == 0


# --------------------------------------------------------------------------- body digest


def test_body_sha256_content_length_chunked_and_empty(start_app: StartApp) -> None:
    app = start_app()
    body = os.urandom(3 * 1024 * 1024 + 7)
    doc = get_json(app.http_port, "/", method="POST", body=body)
    assert doc["body_bytes"] == len(body)
    assert doc["body_sha256"] == hashlib.sha256(body).hexdigest()
    pieces = [os.urandom(100_000), b"", os.urandom(1)]  # the empty piece is skipped
    doc = get_json(app.http_port, "/", method="PUT", body=iter(pieces))
    assert doc["headers"]["transfer-encoding"] == "chunked"
    assert doc["body_sha256"] == hashlib.sha256(b"".join(pieces)).hexdigest()
    doc = get_json(app.http_port, "/")
    assert (doc["body_bytes"], doc["body_sha256"]) == (0, hashlib.sha256().hexdigest())
    # Special paths report it too.
    status, _, data = request(app.http_port, "/status/502", method="POST", body=b"abc")
    assert status == 502
    assert json.loads(data)["body_sha256"] == hashlib.sha256(b"abc").hexdigest()


# --------------------------------------------------------------------------- upgrade echo


def read_head(sock: socket.socket) -> tuple[bytes, bytes]:
    """The response head up to the empty line, and the bytes already read past it."""
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = sock.recv(4096)
        assert chunk, f"closed before the end of the head: {buf!r}"
        buf += chunk
    head, _, rest = buf.partition(b"\r\n\r\n")
    return head, rest


def test_upgrade_echo_switches_and_echoes_with_half_close(start_app: StartApp) -> None:
    app = start_app("--service", "ws", "--version", "v3")
    data = os.urandom(2 * 1024 * 1024)
    with socket.create_connection(("127.0.0.1", app.http_port), timeout=30) as s:
        # Bytes right behind the request, in the same segment, are echoed too.
        s.sendall(
            b"GET /upgrade-echo HTTP/1.1\r\nHost: x\r\n"
            b"Connection: keep-alive, Upgrade\r\nUpgrade: echo\r\n\r\nearly"
        )
        head, got = read_head(s)
        lines = head.decode().split("\r\n")
        assert lines[0] == "HTTP/1.1 101 Switching Protocols"
        fields = {k.lower(): v.strip() for k, _, v in (x.partition(":") for x in lines[1:])}
        assert fields["upgrade"] == "echo"
        assert fields["connection"].lower() == "upgrade"
        while len(got) < 5:
            got += s.recv(100)
        assert got == b"early"

        def write() -> None:
            s.sendall(data)
            s.shutdown(socket.SHUT_WR)

        writer = threading.Thread(target=write)
        writer.start()
        echoed = bytearray()
        while chunk := s.recv(1 << 16):
            echoed += chunk
        writer.join(timeout=30)
        assert bytes(echoed) == data  # all of it came back, then EOF: half-close kept
    app.proc.send_signal(signal.SIGTERM)
    assert app.proc.wait(timeout=10) == 0
    assert re.search(r" ws/v3 GET /upgrade-echo 101 [\d.]+ms$", app.log_text(), re.MULTILINE)


def test_upgrade_echo_needs_the_upgrade_headers(start_app: StartApp) -> None:
    app = start_app()
    status, resp, data = request(app.http_port, "/upgrade-echo")
    assert status == 426
    assert resp.getheader("Upgrade") == "echo"
    assert b"Upgrade: echo" in data
    status, _, _ = request(
        app.http_port, "/upgrade-echo", headers={"Connection": "Upgrade", "Upgrade": "websocket"}
    )
    assert status == 426


# --------------------------------------------------------------------------- TCP echo


def echo_roundtrip(port: int, data: bytes, barrier: threading.Barrier | None = None) -> bytes:
    """Send ``data`` while reading the echo, half-close, read to EOF; return the digest."""
    with socket.create_connection(("127.0.0.1", port), timeout=60) as s:
        if barrier is not None:
            barrier.wait(timeout=60)
        errors: list[BaseException] = []

        def write() -> None:
            try:
                view = memoryview(data)
                for off in range(0, len(data), 256 * 1024):
                    s.sendall(view[off : off + 256 * 1024])
                s.shutdown(socket.SHUT_WR)
            except BaseException as e:
                errors.append(e)

        writer = threading.Thread(target=write)
        writer.start()
        h = hashlib.sha256()
        got = 0
        while chunk := s.recv(1 << 16):
            h.update(chunk)
            got += len(chunk)
        writer.join(timeout=60)
        assert not errors, errors
        assert got == len(data)
        return h.digest()


def test_tcp_echo_8mib_exact(start_app: StartApp) -> None:
    app = start_app("--tcp-echo", "0")
    (port,) = app.echo_ports
    data = os.urandom(8 * 1024 * 1024)
    assert echo_roundtrip(port, data) == hashlib.sha256(data).digest()


def test_tcp_echo_half_close(start_app: StartApp) -> None:
    app = start_app("--tcp-echo", "0", "--tcp-echo", "0")
    assert len(app.echo_ports) == 2
    data = os.urandom(1024 * 1024)
    with socket.create_connection(("127.0.0.1", app.echo_ports[1]), timeout=30) as s:
        # Write everything and half-close before reading a byte: the server must still
        # echo all of it after seeing EOF, then close its side.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 * 1024 * 1024)

        def write() -> None:
            s.sendall(data)
            s.shutdown(socket.SHUT_WR)

        writer = threading.Thread(target=write)
        writer.start()
        time.sleep(0.2)
        got = bytearray()
        while chunk := s.recv(1 << 16):
            got += chunk
        writer.join(timeout=30)
        assert bytes(got) == data
        assert s.recv(1) == b""  # EOF stays EOF


def test_tcp_echo_small_half_close(start_app: StartApp) -> None:
    app = start_app("--tcp-echo", "0")
    with socket.create_connection(("127.0.0.1", app.echo_ports[0]), timeout=10) as s:
        s.sendall(b"ping")
        assert s.recv(4) == b"ping"  # echoed before any EOF
        s.sendall(b"hello")
        s.shutdown(socket.SHUT_WR)
        got = b""
        while chunk := s.recv(100):
            got += chunk
        assert got == b"hello"


def test_tcp_echo_50_concurrent_connections(start_app: StartApp) -> None:
    app = start_app("--tcp-echo", "0")
    (port,) = app.echo_ports
    n = 50
    payloads = [os.urandom(512 * 1024 + i) for i in range(n)]
    # The barrier holds every connection open until all 50 are connected.
    barrier = threading.Barrier(n)
    with ThreadPoolExecutor(max_workers=n) as pool:
        futures = [pool.submit(echo_roundtrip, port, p, barrier) for p in payloads]
        digests = [f.result(timeout=90) for f in futures]
    assert digests == [hashlib.sha256(p).digest() for p in payloads]


# --------------------------------------------------------------------------- examples

ALLOWED = {
    "": {"apiVersion", "kind", "metadata", "spec"},
    "metadata": {"name", "namespace", "labels", "annotations"},
    "Pod.spec": {"nodeName", "serviceAccountName", "containers"},
    "container": {"name", "image", "command", "args", "env", "ports"},
    "env": {"name", "value"},
    "containerPort": {"name", "containerPort", "protocol"},
    "Service.spec": {"selector", "clusterIP", "ports"},
    "servicePort": {"name", "port", "targetPort", "protocol", "appProtocol"},
}


def load_bookinfo() -> list[dict[str, Any]]:
    docs: list[dict[str, Any]] = []
    for path in sorted(BOOKINFO.glob("*.yaml")):
        with path.open() as f:
            docs.extend(d for d in yaml.safe_load_all(f) if d is not None)
    return docs


def test_bookinfo_uses_only_supported_fields() -> None:
    def check(obj: dict[str, Any], where: str) -> None:
        extra = set(obj) - ALLOWED[where]
        assert not extra, f"{where}: unsupported fields {extra}"

    docs = load_bookinfo()
    assert docs
    for d in docs:
        check(d, "")
        assert d["apiVersion"] == "v1"
        assert d["kind"] in ("Pod", "Service")
        check(d["metadata"], "metadata")
        check(d["spec"], f"{d['kind']}.spec")
        if d["kind"] == "Pod":
            for c in d["spec"]["containers"]:
                check(c, "container")
                for e in c.get("env", []):
                    check(e, "env")
                for p in c.get("ports", []):
                    check(p, "containerPort")
        else:
            for p in d["spec"]["ports"]:
                check(p, "servicePort")


def test_bookinfo_graph() -> None:
    docs = load_bookinfo()
    pods = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Pod"}
    services = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Service"}
    placement = {name: p["spec"]["nodeName"] for name, p in pods.items()}
    assert placement == {
        "productpage-v1": "node1",
        "details-v1": "node2",
        "reviews-v1": "node1",
        "reviews-v2": "node2",
        "reviews-v3": "node2",
        "ratings-v1": "node1",
        "sleep": "node1",
    }
    assert all(d["metadata"]["namespace"] == "default" for d in docs)
    assert pods["sleep"]["spec"]["containers"][0]["command"] == ["sleep", "infinity"]
    assert {n: s["spec"]["clusterIP"] for n, s in services.items()} == {
        "productpage": "10.96.0.10",
        "details": "10.96.0.11",
        "reviews": "10.96.0.12",
        "ratings": "10.96.0.13",
    }
    for name, svc in services.items():
        (port,) = svc["spec"]["ports"]
        assert (port["name"], port["port"], port["appProtocol"]) == ("http", 9080, "http")
        selected = [
            p
            for p in pods.values()
            if svc["spec"]["selector"].items() <= p["metadata"]["labels"].items()
        ]
        assert selected, f"service {name} selects no pod"

    parser = argparse.ArgumentParser()
    sampleapp.add_parser(parser.add_subparsers())
    calls: dict[str, list[str]] = {}
    for name, pod in pods.items():
        if name == "sleep":
            continue
        labels = pod["metadata"]["labels"]
        app, version = labels["app"], labels["version"]
        assert pod["spec"]["serviceAccountName"] == f"bookinfo-{app}"
        (c,) = pod["spec"]["containers"]
        assert c["command"] == ["nodeagent", "sample-app"]
        args = parser.parse_args([*c["command"][1:], *c["args"]])
        assert (args.service, args.version, args.port) == (app, version, 9080)
        assert c["ports"] == [{"name": "http", "containerPort": 9080, "protocol": "TCP"}]
        calls[name] = args.call
        for url in args.call:
            host = url.split("//", 1)[1].split(":", 1)[0]
            assert host in services, f"{name} calls unknown service {host}"
    assert calls == {
        "productpage-v1": ["http://details:9080/", "http://reviews:9080/"],
        "details-v1": [],
        "reviews-v1": [],
        "reviews-v2": ["http://ratings:9080/"],
        "reviews-v3": ["http://ratings:9080/"],
        "ratings-v1": [],
    }


def test_cli_registers_sample_app() -> None:
    pytest.importorskip("nodeagent.admin.ctl", reason="nodeagent.admin.ctl not written yet")
    pytest.importorskip("nodeagent.sandbox.cli", reason="nodeagent.sandbox.cli not written yet")
    from nodeagent.cli import build_parser

    args = build_parser().parse_args(["sample-app", "--port", "1", "--call", "http://x:1/"])
    assert args.func is sampleapp.run
    assert (args.port, args.call, args.host) == (1, ["http://x:1/"], "0.0.0.0")
