"""Metrics (``GET /metrics``, port 15020) and readiness (``GET /healthz/ready``, port 15021).

Owns two tiny HTTP/1.1 servers on plain ``asyncio.start_server`` (so they run on uvloop),
with just enough parsing for Prometheus and kubelet probes: GET only (anything else is
405), keep-alive, and a malformed request answered 400 on that connection alone, which is
then closed. Request parsing and readiness are pure functions; only ``_serve`` does I/O.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field

import prometheus_client
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import CollectorRegistry

from nodeagent.admin import capture_state
from nodeagent.errors import LocalStateError
from nodeagent.model.status import AgentView

__all__ = [
    "BadRequest",
    "Request",
    "Response",
    "parse_request",
    "readiness",
    "render_response",
    "start_http_servers",
]

log = logging.getLogger(__name__)

MAX_HEAD = 16 * 1024
"""The largest request line + headers we read; longer is a 400."""
MAX_BODY = 64 * 1024
"""A GET may carry a (pointless) body; we discard up to this much, a longer one is a 400."""
IDLE_TIMEOUT = 30.0
"""Seconds a connection may take to send the next request head before we close it."""

_REASONS = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    500: "Internal Server Error",
    503: "Service Unavailable",
}
_TOKEN_CHARS = frozenset(
    "!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
)
_TEXT = "text/plain; charset=utf-8"


class BadRequest(ValueError):
    """The request cannot be parsed: answer 400 and close the connection."""


@dataclass(frozen=True)
class Request:
    method: str
    target: str
    version: str
    headers: Mapping[str, str] = field(default_factory=dict)
    """Lower-cased names; a repeated header keeps its values joined by ``, ``."""

    @property
    def path(self) -> str:
        return self.target.split("?", 1)[0]

    @property
    def keep_alive(self) -> bool:
        tokens = {t.strip().lower() for t in self.headers.get("connection", "").split(",")}
        if self.version == "HTTP/1.0":
            return "keep-alive" in tokens
        return "close" not in tokens

    def content_length(self) -> int:
        if "transfer-encoding" in self.headers:
            raise BadRequest("a GET request with a chunked body is not supported")
        raw = self.headers.get("content-length", "0").strip()
        if not raw.isdigit():
            raise BadRequest(f"bad Content-Length: {raw!r}")
        n = int(raw)
        if n > MAX_BODY:
            raise BadRequest(f"request body too large ({n} > {MAX_BODY} bytes)")
        return n


@dataclass(frozen=True)
class Response:
    status: int
    body: bytes
    content_type: str = _TEXT
    headers: tuple[tuple[str, str], ...] = ()


def _is_token(s: str) -> bool:
    return bool(s) and all(c in _TOKEN_CHARS for c in s)


def parse_request(head: bytes) -> Request:
    """Parse a request line and headers, up to and including the empty line.

    Lines end with CRLF (a bare LF is accepted too, as RFC 9112 allows).
    """
    try:
        text = head.decode("ascii")
    except UnicodeDecodeError as e:
        raise BadRequest("request head is not ASCII") from e
    lines = [line.removesuffix("\r") for line in text.split("\n")]
    if len(lines) < 3 or lines[-2:] != ["", ""]:
        raise BadRequest("request head does not end with an empty line")
    lines = lines[:-2]
    parts = lines[0].split(" ")
    if len(parts) != 3:
        raise BadRequest(f"bad request line: {lines[0]!r}")
    method, target, version = parts
    if not _is_token(method):
        raise BadRequest(f"bad method: {method!r}")
    if version not in ("HTTP/1.0", "HTTP/1.1"):
        raise BadRequest(f"unsupported HTTP version: {version!r}")
    if not target.startswith("/") or any(c <= " " or c == "\x7f" for c in target):
        raise BadRequest(f"bad request target: {target!r}")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if not sep or not _is_token(name):
            raise BadRequest(f"bad header line: {line!r}")
        key = name.lower()
        value = value.strip(" \t")
        if any((c < " " and c != "\t") or c == "\x7f" for c in value):
            raise BadRequest(f"control character in header {name!r}")
        headers[key] = f"{headers[key]}, {value}" if key in headers else value
    return Request(method=method, target=target, version=version, headers=headers)


async def _read_head(reader: asyncio.StreamReader) -> bytes:
    """Read up to and including the empty line ending the head (leading empty lines skipped)."""
    chunks: list[bytes] = []
    total = 0
    while True:
        try:
            line = await reader.readuntil(b"\n")
        except asyncio.LimitOverrunError as e:
            raise BadRequest("request head too large") from e
        total += len(line)
        if total > MAX_HEAD:
            raise BadRequest("request head too large")
        if line in (b"\r\n", b"\n"):
            if not chunks:
                continue
            chunks.append(line)
            return b"".join(chunks)
        chunks.append(line)


def render_response(resp: Response, keep_alive: bool) -> bytes:
    """The bytes of an HTTP/1.1 response."""
    lines = [
        f"HTTP/1.1 {resp.status} {_REASONS.get(resp.status, 'Unknown')}",
        f"Content-Type: {resp.content_type}",
        f"Content-Length: {len(resp.body)}",
        f"Connection: {'keep-alive' if keep_alive else 'close'}",
        *(f"{k}: {v}" for k, v in resp.headers),
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("ascii") + resp.body


def readiness(view: AgentView) -> tuple[bool, str]:
    """Whether the agent is ready and, when it is not, why (for the 503 body)."""
    try:
        if view.ready():
            return True, "ready"
        reasons: list[str] = []
        cfg = view.config_status()
        if cfg.loaded_at <= 0:
            detail = f": {cfg.last_error}" if cfg.last_error else ""
            reasons.append(f"no config loaded yet{detail}")
        for lp in view.local_pods():
            state = capture_state(lp)
            if state != "ready":
                reasons.append(f"capture of {lp.get('key', '?')} is not ready: {state}")
    except Exception as e:
        return False, f"not ready: cannot read the agent's state: {type(e).__name__}: {e}"
    if not reasons:
        reasons.append("the agent is still starting")
    return False, "not ready: " + "; ".join(reasons)


Handler = Callable[[Request], Response]


def _metrics_handler(registry: CollectorRegistry) -> Handler:
    def handle(req: Request) -> Response:
        encoder, content_type = choose_encoder(req.headers.get("accept", ""))
        return Response(200, encoder(registry), content_type)

    return handle


def _ready_handler(view: AgentView) -> Handler:
    def handle(req: Request) -> Response:
        ok, reason = readiness(view)
        return Response(200 if ok else 503, f"{reason}\n".encode())

    return handle


def _dispatch(routes: Mapping[str, Handler], req: Request) -> Response:
    if req.method != "GET":
        return Response(405, b"method not allowed: only GET\n", headers=(("Allow", "GET"),))
    handler = routes.get(req.path)
    if handler is None:
        paths = ", ".join(sorted(routes))
        return Response(404, f"not found: {req.path} (try {paths})\n".encode())
    try:
        return handler(req)
    except Exception as e:
        log.exception("HTTP %s failed", req.path)
        return Response(500, f"{req.path} failed: {type(e).__name__}: {e}\n".encode())


async def _serve(
    routes: Mapping[str, Handler], reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:
    """One connection: requests in a loop until close, error or idle timeout."""
    try:
        while True:
            try:
                async with asyncio.timeout(IDLE_TIMEOUT):
                    head = await _read_head(reader)
                req = parse_request(head)
                body_len = req.content_length() if req.method == "GET" else 0
                if body_len:
                    async with asyncio.timeout(IDLE_TIMEOUT):
                        await reader.readexactly(body_len)
            except (asyncio.IncompleteReadError, TimeoutError, ConnectionError):
                return
            except BadRequest as e:
                writer.write(render_response(Response(400, f"bad request: {e}\n".encode()), False))
                await writer.drain()
                return
            resp = _dispatch(routes, req)
            keep_alive = req.keep_alive and req.method == "GET"
            writer.write(render_response(resp, keep_alive))
            await writer.drain()
            if not keep_alive:
                return
    except ConnectionError:
        pass
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()


async def _listen(
    routes: Mapping[str, Handler],
    host: str,
    port: int,
    what: str,
    sock: socket.socket | None = None,
) -> asyncio.Server:
    def on_connect(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> Awaitable[None]:
        return _serve(routes, r, w)

    if sock is not None:  # handed over by the agent this one replaces
        return await asyncio.start_server(on_connect, sock=sock, limit=MAX_HEAD)
    try:
        return await asyncio.start_server(
            on_connect, host, port, limit=MAX_HEAD, reuse_address=True
        )
    except OSError as e:
        raise LocalStateError(
            f"cannot listen on {host}:{port} for {what}: {e}: is another agent running on "
            "this node, or is the port taken?"
        ) from e


async def start_http_servers(
    view: AgentView,
    host: str,
    metrics_port: int = 15020,
    ready_port: int = 15021,
    registry: CollectorRegistry = prometheus_client.REGISTRY,
    inherited: Callable[[str, int], socket.socket | None] | None = None,
) -> list[asyncio.Server]:
    """Start the metrics and readiness servers; returns ``[metrics, readiness]``.
    ``inherited(kind, port)`` may give the listening socket of ``metrics`` or ``ready``
    (handed over by the agent this one replaces).

    Port 0 picks a free port (read it from ``server.sockets[0].getsockname()[1]``). When both
    ports are the same non-zero port, one server answers both paths and the list has one
    server. Stop them with ``server.close()`` and ``await server.wait_closed()``.
    """
    metrics_routes: dict[str, Handler] = {"/metrics": _metrics_handler(registry)}
    ready_routes: dict[str, Handler] = {"/healthz/ready": _ready_handler(view)}
    take = inherited or (lambda _kind, _port: None)
    if metrics_port == ready_port and metrics_port != 0:
        routes = {**metrics_routes, **ready_routes}
        both = take("metrics", metrics_port)
        return [await _listen(routes, host, metrics_port, "metrics and readiness", both)]
    metrics = await _listen(
        metrics_routes, host, metrics_port, "metrics", take("metrics", metrics_port)
    )
    try:
        ready = await _listen(
            ready_routes, host, ready_port, "readiness", take("ready", ready_port)
        )
    except BaseException:
        metrics.close()
        raise
    return [metrics, ready]
