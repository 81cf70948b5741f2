"""``nodeagent sample-app``: the HTTP service (TCP echo, gRPC echo) of the examples and tests.

This module owns the workload process that ``examples/bookinfo`` runs in every pod and that
the end-to-end tests drive L7 routing through: a small HTTP/1.1 server (keep-alive,
``Content-Length``) that answers every request with a JSON description of who answered and
what it received, and optionally calls downstream services on each request, as Istio's
bookinfo does (``productpage`` calls ``details`` and ``reviews``, ``reviews`` v2/v3 call
``ratings``). It is stdlib only (the gRPC service lives in ``samples.samplegrpc``, what
both share in ``samples.common``) and knows nothing of the mesh: it is the thing the mesh
carries traffic for.

Any method on any path answers ``200`` with ``application/json``::

    {"pod", "namespace", "node", "service", "version", "method", "path", "client",
     "headers": {lower-cased request headers}, "body_bytes": n, "body_sha256": hex,
     "served": n, "calls": [{"url", "status", "body", "duration_ms"[, "error"]}]}

``body_sha256`` is the SHA-256 of the request body received (hashed while it is drained in
64 KiB pieces, never kept), so a test can check a body arrived intact through a proxy.
``served`` is the number of requests this process has answered, this one included, on
every path but ``/healthz`` (health probes do not disturb it): a test sees retries reach
the upstream as jumps in it. One counter per process, shared with the gRPC service.

Downstream calls forward the trace headers received (``traceparent``, ``tracestate``,
``baggage``, ``x-request-id``, ``end-user``, ``user`` and the B3 headers); a failed call
is reported with status 0 (or the 5xx it got) and the answer is still ``200``.

Special paths (no downstream calls, never failed by ``--fail-status``):

``/status/NNN``
    answers status NNN.
``/delay/SECONDS``
    sleeps first.
``/bytes/N``
    answers N bytes where byte ``i`` is ``i % 251``.
``/healthz``
    answers ``ok``.
``/fail/N/KEY``
    answers ``503`` to the first N requests this process receives with that KEY, then
    ``200``; the JSON says which ``attempt`` (1, 2, ...) of KEY it was. For retry tests.
    The counters are per process and thread-safe; the oldest KEY is forgotten beyond
    ``MAX_FAIL_KEYS`` keys.
``/toggle-fail/CODE``
    sets the ``--fail-status`` of the running process (``0`` turns it off) and answers
    ``200`` with ``fail_status`` and ``previous_fail_status``.
``/files/NAME``
    answers the file NAME (no ``/``, no leading ``.``) of the process's working directory,
    ``application/json`` for ``*.json``, else ``application/octet-stream``; ``404`` when
    there is none. The sandbox runs pods in their config directory, so a JWKS put next to
    the YAML is served (an in-mesh ``jwksUri``).
``/upgrade-echo``
    with ``Connection: Upgrade`` and ``Upgrade: echo`` answers ``101 Switching
    Protocols`` (``Upgrade: echo``), then echoes raw bytes like ``--tcp-echo`` until the
    client half-closes, then closes its write side; without those headers it answers
    ``426``.

``--fail-status CODE`` makes every request on a non-special path answer CODE (the usual
JSON, no downstream calls) until ``/toggle-fail/0``: one persistently bad endpoint for
outlier-detection tests.

``--tcp-echo PORT`` also serves a raw TCP echo on PORT: every byte is echoed, and when the
client half-closes, the rest is written back and then the write side is shut (half-close
preserved). One thread per connection, 64 KiB buffers, so memory stays bounded.

``--grpc-port PORT`` also serves the gRPC ``nodeagent.sample.Echo`` service of
``nodeagent.samples.samplegrpc`` on PORT, in this process (its own thread pool).

Every listener prints ``listening KIND HOST:PORT`` at start (KIND is ``http``,
``tcp-echo`` or ``grpc``; useful with port 0) and every request prints one line
``TIME SERVICE/VERSION METHOD PATH STATUS DURATIONms`` (gRPC calls: ``GRPC /SERVICE/METHOD
CODE``).
"""

from __future__ import annotations

import argparse
import hashlib
import http.client
import json
import os
import signal
import socket
import socketserver
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import FrameType
from typing import TYPE_CHECKING, Any, cast
from urllib.parse import urlsplit

from nodeagent.samples.common import (
    CALL_TIMEOUT_S,
    MAX_DELAY_S,
    PATTERN_PERIOD,
    AppSettings,
    ServedCounter,
    log_line,
    log_request,
    timestamp,
)

if TYPE_CHECKING:
    from nodeagent.samples.samplegrpc import SampleGrpcServer

DEFAULT_PORT = 9080
MAX_BYTES = 1 << 40
MAX_FILE_BYTES = 16 << 20
"""``/files/NAME`` answers at most this much of the file."""
MAX_CALL_BODY = 1 << 20
"""Downstream answers are read up to this many bytes (memory stays bounded)."""
CHUNK = 64 * 1024
MAX_FAIL_KEYS = 10_000
"""``/fail/N/KEY`` counts at most this many keys; the oldest is forgotten beyond."""
MAX_FAIL_COUNT = 1_000_000_000

FORWARDED_HEADERS: tuple[str, ...] = (
    "traceparent",
    "tracestate",
    "baggage",
    "x-request-id",
    "end-user",
    "user",
    "b3",
    "x-b3-traceid",
    "x-b3-spanid",
    "x-b3-parentspanid",
    "x-b3-sampled",
    "x-b3-flags",
    "x-ot-span-context",
)
"""Request headers copied onto downstream calls, as Istio's bookinfo does."""

_NO_BODY_STATUSES = frozenset({204, 304})

# One period-aligned block: every full chunk written keeps the pattern continuous.
_PATTERN_BLOCK = bytes(range(PATTERN_PERIOD)) * (CHUNK // PATTERN_PERIOD + 1)


class _Runtime:
    """The mutable per-process state the HTTP handler threads share."""

    def __init__(self, fail_status: int, served: ServedCounter) -> None:
        self.served = served
        self._lock = threading.Lock()
        self._fail_status = fail_status
        self._fail_counts: dict[str, int] = {}

    @property
    def fail_status(self) -> int:
        with self._lock:
            return self._fail_status

    def set_fail_status(self, code: int) -> int:
        """Set the ``--fail-status`` (0: off); the previous one."""
        with self._lock:
            previous, self._fail_status = self._fail_status, code
            return previous

    def fail_attempt(self, key: str) -> int:
        """Count one more request of ``/fail/N/KEY``; its number for KEY (the first is 1)."""
        with self._lock:
            n = self._fail_counts.pop(key, 0) + 1
            self._fail_counts[key] = n  # re-inserted: the dict order is the age order
            if len(self._fail_counts) > MAX_FAIL_KEYS:
                del self._fail_counts[next(iter(self._fail_counts))]
            return n


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


# --------------------------------------------------------------------------- HTTP


class _BadRequest(Exception):
    """The client sent a request we cannot read (answered 400, connection closed)."""


@dataclass(frozen=True)
class _Body:
    """What was received of a request body (drained, not kept)."""

    size: int
    sha256: str


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    request_queue_size = 256

    def __init__(
        self, host: str, port: int, settings: AppSettings, served: ServedCounter | None = None
    ) -> None:
        self.address_family = _family(host)
        self.settings = settings
        self.runtime = _Runtime(settings.fail_status, served or ServedCounter())
        super().__init__((host, port), _Handler)

    def server_bind(self) -> None:
        # HTTPServer.server_bind calls getfqdn(), which can hang for seconds in a network
        # namespace without DNS; we need no server name.
        socketserver.TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name = str(host)
        self.server_port = int(port)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # headers and body are two writes: without TCP_NODELAY, Nagle holds the body until
    # the client's delayed ACK (40 ms per keep-alive request)
    disable_nagle_algorithm = True
    timeout = 600  # idle keep-alive connections are dropped after this many seconds
    _served = 0
    """The ``served`` number of the request being answered (0 for ``/healthz``)."""

    # Every method the same way.
    def do_GET(self) -> None:
        self._handle()

    def do_HEAD(self) -> None:
        self._handle()

    def do_POST(self) -> None:
        self._handle()

    def do_PUT(self) -> None:
        self._handle()

    def do_DELETE(self) -> None:
        self._handle()

    def do_PATCH(self) -> None:
        self._handle()

    def do_OPTIONS(self) -> None:
        self._handle()

    def do_TRACE(self) -> None:
        self._handle()

    def version_string(self) -> str:
        return "nodeagent-sample-app"

    @property
    def settings(self) -> AppSettings:
        return cast(_HTTPServer, self.server).settings

    @property
    def runtime(self) -> _Runtime:
        return cast(_HTTPServer, self.server).runtime

    # -- logging: our own one line per request, to stdout
    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        pass

    def log_message(self, format: str, *args: Any) -> None:
        log_line(f"{timestamp()} {self.address_string()} {format % args}")

    # -- request handling
    def _handle(self) -> None:
        start = time.monotonic()
        status = 500
        if urlsplit(self.path).path == "/healthz":
            self._served = 0
        else:
            self._served = self.runtime.served.next()
        try:
            status = self._respond()
        except _BadRequest as e:
            self.close_connection = True
            status = 400
            self._send(400, f"bad request: {e}\n".encode(), "text/plain")
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
            status = 499  # the client went away
        finally:
            ms = (time.monotonic() - start) * 1000
            log_request(self.settings, f"{self.command} {self.path}", status, ms)

    def _respond(self) -> int:
        body = self._drain_body()
        path = urlsplit(self.path).path
        parts = path.strip("/").split("/")
        if path == "/healthz":
            return self._send(200, b"ok", "text/plain")
        if len(parts) == 2 and parts[0] == "status":
            code = _int_arg(parts[1], 200, 599, "status")
            return self._send_json(code, self._describe(body, []))
        if len(parts) == 2 and parts[0] == "delay":
            seconds = _float_arg(parts[1], 0.0, MAX_DELAY_S, "delay")
            time.sleep(seconds)
            return self._send_json(200, self._describe(body, []))
        if len(parts) == 2 and parts[0] == "bytes":
            return self._send_bytes(_int_arg(parts[1], 0, MAX_BYTES, "bytes"))
        if len(parts) == 3 and parts[0] == "fail" and parts[2]:
            n = _int_arg(parts[1], 0, MAX_FAIL_COUNT, "fail")
            attempt = self.runtime.fail_attempt(parts[2])
            doc = self._describe(body, [])
            doc["attempt"] = attempt
            return self._send_json(503 if attempt <= n else 200, doc)
        if len(parts) == 2 and parts[0] == "toggle-fail":
            code = _int_arg(parts[1], 0, 599, "toggle-fail")
            if code and code < 200:
                raise _BadRequest(f"/toggle-fail/ wants 0 or 200..599, got {code}")
            doc = self._describe(body, [])
            doc["previous_fail_status"] = self.runtime.set_fail_status(code)
            doc["fail_status"] = code
            return self._send_json(200, doc)
        if path == "/upgrade-echo":
            return self._upgrade_echo()
        if len(parts) == 2 and parts[0] == "files":
            return self._send_file(parts[1])
        fail_status = self.runtime.fail_status
        if fail_status:
            return self._send_json(fail_status, self._describe(body, []))
        calls = [self._call(url) for url in self.settings.calls]
        return self._send_json(200, self._describe(body, calls))

    def _send_file(self, name: str) -> int:
        if not name or name.startswith(".") or "/" in name or "\\" in name:
            raise _BadRequest(f"/files/ wants a plain file name, got {name!r}")
        try:
            with open(os.path.join(os.getcwd(), name), "rb") as f:
                data = f.read(MAX_FILE_BYTES)
        except OSError as e:
            return self._send(404, f"no file {name}: {e.strerror}\n".encode(), "text/plain")
        kind = "application/json" if name.endswith(".json") else "application/octet-stream"
        return self._send(200, data, kind)

    def _describe(self, body: _Body, calls: list[dict[str, Any]]) -> dict[str, Any]:
        s = self.settings
        headers: dict[str, str] = {}
        for k, v in self.headers.items():
            key = k.lower()
            headers[key] = f"{headers[key]}, {v}" if key in headers else v
        return {
            "pod": s.pod,
            "namespace": s.namespace,
            "node": s.node,
            "service": s.service,
            "version": s.version,
            "method": self.command,
            "path": self.path,
            "client": f"{self.client_address[0]}:{self.client_address[1]}",
            "headers": headers,
            "body_bytes": body.size,
            "body_sha256": body.sha256,
            "served": self._served,
            "calls": calls,
        }

    def _drain_body(self) -> _Body:
        """Read (counting and hashing, without keeping) the request body."""
        digest = hashlib.sha256()
        te = self.headers.get("Transfer-Encoding", "")
        if te:
            if te.strip().lower() != "chunked":
                raise _BadRequest(f"unsupported Transfer-Encoding {te!r}")
            return _Body(self._drain_chunked(digest.update), digest.hexdigest())
        cl = self.headers.get("Content-Length")
        if cl is None:
            return _Body(0, digest.hexdigest())
        try:
            remaining = int(cl)
        except ValueError:
            raise _BadRequest(f"bad Content-Length {cl!r}") from None
        if remaining < 0:
            raise _BadRequest(f"bad Content-Length {cl!r}")
        return _Body(self._drain_exact(remaining, digest.update), digest.hexdigest())

    def _drain_exact(self, n: int, update: Callable[[bytes], object]) -> int:
        remaining = n
        while remaining:
            data = self.rfile.read(min(remaining, CHUNK))
            if not data:
                raise _BadRequest("body shorter than Content-Length")
            update(data)
            remaining -= len(data)
        return n

    def _drain_chunked(self, update: Callable[[bytes], object]) -> int:
        total = 0
        while True:
            line = self.rfile.readline(1024)
            if not line.endswith(b"\n"):
                raise _BadRequest("bad chunk size line")
            try:
                size = int(line.split(b";", 1)[0].strip(), 16)
            except ValueError:
                raise _BadRequest("bad chunk size") from None
            if size == 0:
                break
            total += self._drain_exact(size, update)
            if self.rfile.readline(3).strip():
                raise _BadRequest("missing CRLF after chunk")
        while True:  # trailers up to the empty line
            line = self.rfile.readline(8192)
            if not line:
                raise _BadRequest("body ended inside trailers")
            if line in (b"\r\n", b"\n"):
                return total

    # -- responses
    def _send_json(self, status: int, doc: dict[str, Any]) -> int:
        body = (json.dumps(doc, indent=2) + "\n").encode()
        return self._send(status, body, "application/json")

    def _send(
        self,
        status: int,
        body: bytes,
        content_type: str,
        extra_headers: Sequence[tuple[str, str]] = (),
    ) -> int:
        self.send_response(status)
        for name, value in extra_headers:
            self.send_header(name, value)
        if status in _NO_BODY_STATUSES:
            self.end_headers()
            return status
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)
        return status

    def _send_bytes(self, n: int) -> int:
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(n))
        self.end_headers()
        if self.command == "HEAD":
            return 200
        remaining = n
        view = memoryview(_PATTERN_BLOCK)
        while remaining:
            # Every write but the last is a whole block (a multiple of the period).
            part = view[: min(remaining, len(_PATTERN_BLOCK))]
            self.wfile.write(part)
            remaining -= len(part)
        return 200

    def _upgrade_echo(self) -> int:
        """``/upgrade-echo``: switch to a raw echo of the connection (half-close kept)."""
        connection = _tokens(self.headers.get_all("Connection") or [])
        upgrade = _tokens(self.headers.get_all("Upgrade") or [])
        if "upgrade" not in connection or "echo" not in upgrade:
            message = b"upgrade-echo needs Connection: Upgrade and Upgrade: echo\n"
            return self._send(426, message, "text/plain", [("Upgrade", "echo")])
        self.close_connection = True  # the connection is not HTTP any more
        self.send_response(101)
        self.send_header("Connection", "Upgrade")
        self.send_header("Upgrade", "echo")
        self.end_headers()
        sock = cast(socket.socket, self.connection)
        try:
            # Through rfile: it may already hold bytes sent right behind the request.
            while data := self.rfile.read1(CHUNK):
                sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)  # the client half-closed: all echoed, now ours
        except OSError:
            pass  # reset by the peer (or idle past the timeout): nothing to finish
        return 101

    # -- downstream calls
    def _call(self, url: str) -> dict[str, Any]:
        s = self.settings
        start = time.monotonic()
        result: dict[str, Any] = {"url": url, "status": 0, "body": None}
        headers = {h: v for h in FORWARDED_HEADERS if (v := self.headers.get(h)) is not None}
        headers["User-Agent"] = f"nodeagent-sample-app/{s.service}/{s.version}"
        try:
            u = urlsplit(url)
            if u.scheme not in ("http", "https") or not u.hostname:
                raise ValueError(f"unsupported URL {url!r} (need http://HOST[:PORT]/PATH)")
            target = (u.path or "/") + (f"?{u.query}" if u.query else "")
            conn_cls = (
                http.client.HTTPSConnection if u.scheme == "https" else http.client.HTTPConnection
            )
            conn = conn_cls(u.hostname, u.port, timeout=s.call_timeout)
            try:
                conn.request("GET", target, headers=headers)
                resp = conn.getresponse()
                raw = resp.read(MAX_CALL_BODY)
                result["status"] = resp.status
            finally:
                conn.close()
            text = raw.decode("utf-8", errors="replace")
            try:
                result["body"] = json.loads(text)
            except ValueError:
                result["body"] = text
        except (OSError, http.client.HTTPException, ValueError) as e:
            err = f"timeout after {s.call_timeout:g}s" if isinstance(e, TimeoutError) else str(e)
            err = f"{type(e).__name__}: {err}"
            result["body"] = err
            result["error"] = err
        result["duration_ms"] = round((time.monotonic() - start) * 1000, 1)
        return result


def _tokens(values: Sequence[str]) -> set[str]:
    """The lower-cased tokens of comma-separated header values."""
    return {t.strip().lower() for v in values for t in v.split(",") if t.strip()}


def _int_arg(raw: str, lo: int, hi: int, what: str) -> int:
    try:
        value = int(raw)
    except ValueError:
        raise _BadRequest(f"/{what}/ wants an integer, got {raw!r}") from None
    if not lo <= value <= hi:
        raise _BadRequest(f"/{what}/ wants {lo}..{hi}, got {value}")
    return value


def _float_arg(raw: str, lo: float, hi: float, what: str) -> float:
    try:
        value = float(raw)
    except ValueError:
        raise _BadRequest(f"/{what}/ wants a number, got {raw!r}") from None
    if not lo <= value <= hi:
        raise _BadRequest(f"/{what}/ wants {lo:g}..{hi:g}, got {value:g}")
    return value


# --------------------------------------------------------------------------- TCP echo


class _EchoServer(socketserver.ThreadingTCPServer):
    daemon_threads = True
    block_on_close = False
    allow_reuse_address = True
    request_queue_size = 256

    def __init__(self, host: str, port: int) -> None:
        self.address_family = _family(host)
        super().__init__((host, port), _EchoHandler)


class _EchoHandler(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        sock = cast(socket.socket, self.request)
        buf = bytearray(CHUNK)
        view = memoryview(buf)
        try:
            while True:
                n = sock.recv_into(buf)
                if n == 0:  # the client half-closed: all echoed, now close our side
                    break
                sock.sendall(view[:n])
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # reset by the peer: nothing to finish


# --------------------------------------------------------------------------- CLI


_DESCRIPTION = (
    "The HTTP service of the examples and tests: answers JSON, calls downstreams; "
    "optionally a TCP echo and a gRPC echo service."
)


def _fail_status(text: str) -> int:
    try:
        code = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a status code: {text!r}") from None
    if code != 0 and not 200 <= code <= 599:
        raise argparse.ArgumentTypeError(f"wants 0 (off) or 200..599, got {code}")
    return code


def _add_arguments(p: argparse.ArgumentParser) -> None:
    env = os.environ
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help="HTTP port (default 9080)")
    p.add_argument("--host", default="0.0.0.0", help="listen address (default 0.0.0.0)")
    p.add_argument(
        "--service",
        default=env.get("SERVICE_NAME", "sample-app"),
        help="service name to report (default $SERVICE_NAME)",
    )
    p.add_argument(
        "--version",
        default=env.get("SERVICE_VERSION", "v1"),
        help="version to report (default $SERVICE_VERSION)",
    )
    p.add_argument(
        "--call",
        action="append",
        default=[],
        metavar="URL",
        help="downstream URL to GET on each request (repeatable)",
    )
    p.add_argument(
        "--tcp-echo",
        action="append",
        type=int,
        default=[],
        metavar="PORT",
        help="also serve a raw TCP echo on PORT (repeatable)",
    )
    p.add_argument(
        "--call-timeout",
        type=float,
        default=CALL_TIMEOUT_S,
        metavar="SECONDS",
        help="timeout of each downstream call (default 10)",
    )
    p.add_argument(
        "--fail-status",
        type=_fail_status,
        default=0,
        metavar="CODE",
        help="answer CODE on every non-special path (0: off; /toggle-fail/CODE changes it)",
    )
    p.add_argument(
        "--grpc-port",
        type=int,
        default=None,
        metavar="PORT",
        help="also serve the gRPC nodeagent.sample.Echo service on PORT (default: no gRPC)",
    )
    p.set_defaults(func=run)


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``nodeagent sample-app``."""
    p = sub.add_parser(
        "sample-app",
        help="run the HTTP (and TCP echo, gRPC echo) service of the examples and tests",
        description=_DESCRIPTION,
    )
    _add_arguments(p)


def run(args: argparse.Namespace) -> int:
    """Serve until SIGTERM or SIGINT; the exit code is 0 after a clean stop."""
    env = os.environ
    settings = AppSettings(
        pod=env.get("POD_NAME") or socket.gethostname(),
        namespace=env.get("POD_NAMESPACE", ""),
        node=env.get("NODE_NAME", ""),
        service=args.service,
        version=args.version,
        calls=tuple(args.call),
        call_timeout=args.call_timeout,
        fail_status=args.fail_status,
    )
    served = ServedCounter()
    servers: list[socketserver.TCPServer] = []
    grpc_server: SampleGrpcServer | None = None
    try:
        http_server = _HTTPServer(args.host, args.port, settings, served)
        servers.append(http_server)
        for port in args.tcp_echo:
            servers.append(_EchoServer(args.host, port))
        if args.grpc_port is not None:
            # Imported only when asked for: plain HTTP runs need no grpc import.
            from nodeagent.samples.samplegrpc import start_server

            grpc_server = start_server(args.host, args.grpc_port, settings, served)
    except OSError as e:
        for srv in servers:
            srv.server_close()
        print(f"sample-app: cannot listen on {args.host}: {e}", file=sys.stderr)
        return 1

    stop = threading.Event()
    if threading.current_thread() is threading.main_thread():

        def on_signal(signum: int, frame: FrameType | None) -> None:
            stop.set()

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)

    for i, srv in enumerate(servers):
        host, port = srv.socket.getsockname()[:2]
        kind = "http" if i == 0 else "tcp-echo"
        shown = f"[{host}]" if srv.address_family == socket.AF_INET6 else str(host)
        log_line(f"listening {kind} {shown}:{port} service={settings.service}/{settings.version}")
        t = threading.Thread(
            target=srv.serve_forever, args=(0.1,), name=f"sample-app-{kind}", daemon=True
        )
        t.start()
    if grpc_server is not None:
        shown = f"[{args.host}]" if ":" in args.host else args.host
        log_line(
            f"listening grpc {shown}:{grpc_server.port} "
            f"service={settings.service}/{settings.version}"
        )
    try:
        while not stop.wait(1.0):
            pass
    except KeyboardInterrupt:
        pass
    if grpc_server is not None:
        grpc_server.stop()
    for srv in servers:
        srv.shutdown()
        srv.server_close()
    log_line("sample-app stopped")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run the sample app alone (``python -m nodeagent.samples.sampleapp --port 9080``)."""
    parser = argparse.ArgumentParser(prog="nodeagent sample-app", description=_DESCRIPTION)
    _add_arguments(parser)
    args = parser.parse_args(argv)
    rc: int = args.func(args)
    return rc


if __name__ == "__main__":
    sys.exit(main())
