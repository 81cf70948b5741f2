"""HTTP/1.1 for the proxy as two sans-I/O machines on top of python-hyper's ``h11``: one
per side of a proxied exchange.

Rule: **no I/O here**. No asyncio, no sockets, no clocks, no logging side effects. Bytes
from a peer go in with ``receive_data`` and come out as events; the caller's actions
(``send_response_head``, ``send_body``, ...) return the bytes to write. ``receive_data(b"")``
means the peer closed its side (EOF). The I/O layer (``nodeagent.proxy``) owns sockets.

- ``DownstreamHttp1`` is the proxy's server side, facing the client: it yields
  ``RequestHead`` / ``BodyChunk`` / ``RequestEnd``, answers malformed requests with 400 and
  oversize heads with 431 (``ProtocolError``; answer it with ``send_error``), supports
  ``Expect: 100-continue`` (``send_continue``), keep-alive (``start_next_request``), and
  pipelining (a request arriving while one is in flight stays buffered in ``h11`` and is
  delivered by ``start_next_request``). After a ``101`` (or a 2xx to ``CONNECT``) it
  becomes a raw passthrough: every later input comes out as ``Upgraded(data)``.
- ``UpstreamHttp1`` is the proxy's client side, facing the application: it sends one
  request at a time and yields ``Informational`` / ``ResponseHead`` / ``BodyChunk`` /
  ``ResponseEnd``; a malformed response is ``ProtocolError(502, ...)``; ``reusable`` says
  whether the connection can carry another request after this one.
- ``forwardable_headers`` is the pure rule for copying a head across the proxy
  (hop-by-hop headers removed, see its docstring).

Bodies stream in both directions: each ``BodyChunk`` is what arrived, never a whole body.
Errors are split by whose fault as in ``h11``: the peer's bytes produce a
``ProtocolError`` event; a caller's misuse (e.g. a body on a ``HEAD`` response) raises
``h11.LocalProtocolError``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import h11

__all__ = [
    "DEFAULT_MAX_HEADER_SIZE",
    "HOP_BY_HOP",
    "RESPONSE_FLAG_HEADER",
    "BodyChunk",
    "ConnectionClosed",
    "DownstreamEvent",
    "DownstreamHttp1",
    "Headers",
    "Informational",
    "ProtocolError",
    "RequestEnd",
    "RequestHead",
    "ResponseEnd",
    "ResponseHead",
    "Upgraded",
    "UpstreamEvent",
    "UpstreamHttp1",
    "forwardable_headers",
]

Headers = tuple[tuple[str, str], ...]
"""Header fields in arrival order, names lower-case, values as sent (latin-1 decoded)."""

DEFAULT_MAX_HEADER_SIZE = 64 * 1024
"""The largest request head (request line plus header fields) accepted: beyond it, 431."""

RESPONSE_FLAG_HEADER = "x-nodeagent-response-flag"
"""Response header naming why the proxy answered itself (Envoy-style: ``UF``, ``UH``, ...)."""

HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "te",
        "transfer-encoding",
        "upgrade",
        "proxy-authenticate",
        "proxy-authorization",
        "trailer",
    }
)
"""Headers that describe one connection, never forwarded (RFC 9110 §7.6.1)."""


# -- events -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RequestHead:
    """Downstream: a request line and its header fields arrived."""

    method: str
    target: str
    headers: Headers
    http_version: str
    """``"1.1"`` or ``"1.0"``."""
    keep_alive: bool
    """The client allows another request on this connection after this one."""
    expect_continue: bool
    """The client waits for ``send_continue`` (or a final response) before its body."""
    upgrade: str | None
    """The ``Upgrade`` header (e.g. ``"websocket"``) when the client asks to switch."""
    has_body: bool
    """A body follows (``Content-Length`` > 0 or chunked): forward it with ``body=True``."""


@dataclass(frozen=True, slots=True)
class ResponseHead:
    """Upstream: a final response head arrived (or a ``101``, after which ``Upgraded``
    events carry the raw bytes)."""

    status: int
    headers: Headers
    reason: str
    http_version: str
    keep_alive: bool
    """The server allows another request on this connection."""


@dataclass(frozen=True, slots=True)
class Informational:
    """Upstream: an interim ``1xx`` response other than ``101`` (``100 Continue``, ``103``)."""

    status: int
    headers: Headers


@dataclass(frozen=True, slots=True)
class BodyChunk:
    """A piece of a message body, as it arrived (chunked framing already removed)."""

    data: bytes


@dataclass(frozen=True, slots=True)
class RequestEnd:
    """Downstream: the request body is complete."""

    trailers: Headers = ()


@dataclass(frozen=True, slots=True)
class ResponseEnd:
    """Upstream: the response body is complete."""

    trailers: Headers = ()


@dataclass(frozen=True, slots=True)
class Upgraded:
    """Raw bytes after a protocol switch (WebSocket, CONNECT): relay them unchanged."""

    data: bytes


@dataclass(frozen=True, slots=True)
class ConnectionClosed:
    """The peer closed its side (EOF). ``clean`` is False if a message was cut short."""

    clean: bool = True


@dataclass(frozen=True, slots=True)
class ProtocolError:
    """The peer broke HTTP/1.1. Downstream: answer ``status`` with ``send_error`` and close;
    upstream: the exchange failed (answer the client 502) and the connection is dead.
    No further events come from the machine."""

    status: int
    reason: str


DownstreamEvent = RequestHead | BodyChunk | RequestEnd | Upgraded | ConnectionClosed | ProtocolError
UpstreamEvent = (
    ResponseHead
    | Informational
    | BodyChunk
    | ResponseEnd
    | Upgraded
    | ConnectionClosed
    | ProtocolError
)


# -- helpers ------------------------------------------------------------------------------


def _tokens(headers: Iterable[tuple[str, str]], name: str) -> list[str]:
    """The comma-separated tokens of every ``name`` header, lower-cased."""
    out: list[str] = []
    for k, v in headers:
        if k.lower() == name:
            out.extend(t.strip().lower() for t in v.split(",") if t.strip())
    return out


def forwardable_headers(
    headers: Iterable[tuple[str, str]], *, upgrade: str | None = None
) -> list[tuple[str, str]]:
    """The header fields of a head to copy to the other side of the proxy.

    Removed: the hop-by-hop fields ``Connection``, ``Keep-Alive``, ``Proxy-Connection``,
    ``TE``, ``Transfer-Encoding``, ``Upgrade``, ``Proxy-Authenticate``,
    ``Proxy-Authorization``, ``Trailer``, and every field the ``Connection`` header names.
    Kept: everything else in order, including ``Content-Length`` (end-to-end framing).
    ``Transfer-Encoding`` is not copied: the sending machine frames the body itself
    (``send_request_head(..., body=True)`` chunks a body of unknown length; a response
    without ``Content-Length`` is chunked by ``h11``).

    With ``upgrade`` (the protocol of a switch being forwarded, e.g. ``"websocket"``),
    ``Upgrade: <upgrade>`` and ``Connection: upgrade`` are emitted so the switch crosses.
    Pure: the input is not changed.
    """
    items = list(headers)
    named = set(_tokens(items, "connection"))
    out = [(k, v) for k, v in items if (n := k.lower()) not in HOP_BY_HOP and n not in named]
    if upgrade is not None:
        out.append(("connection", "upgrade"))
        out.append(("upgrade", upgrade))
    return out


def _decode(headers: Iterable[tuple[bytes, bytes]]) -> Headers:
    return tuple((k.decode("latin-1"), v.decode("latin-1")) for k, v in headers)


def _encode(headers: Iterable[tuple[str, str]]) -> list[tuple[bytes, bytes]]:
    return [(k.encode("latin-1"), v.encode("latin-1")) for k, v in headers]


def _clean_reason(reason: str) -> str:
    """A header-safe text: printable ASCII, one line, bounded."""
    return "".join(c if " " <= c <= "~" else " " for c in reason).strip()[:512]


def _keep_alive(http_version: bytes, headers: Iterable[tuple[str, str]]) -> bool:
    # h11 keeps only HTTP/1.1 connections alive, unless "Connection: close".
    return http_version >= b"1.1" and "close" not in _tokens(headers, "connection")


def _head_size(event: h11.Request) -> int:
    line = len(event.method) + len(event.target) + len(b" HTTP/1.1\r\n") + 1
    return line + sum(len(k) + len(v) + 4 for k, v in event.headers.raw_items()) + 2


# -- machines -----------------------------------------------------------------------------

_FINAL_STATES = (h11.MUST_CLOSE, h11.CLOSED, h11.ERROR)


class DownstreamHttp1:
    """The proxy's server side of one client connection.

    Script of an exchange: ``receive_data`` -> ``RequestHead``, ``BodyChunk``*,
    ``RequestEnd``; the caller writes ``send_response_head`` + ``send_body``* +
    ``send_end``; then, if ``keep_alive`` is still True, ``start_next_request()`` returns
    the events of the next request already buffered (pipelining) and reading goes on.
    """

    def __init__(self, *, max_header_size: int = DEFAULT_MAX_HEADER_SIZE) -> None:
        self.max_header_size = max_header_size
        self._h11 = h11.Connection(h11.SERVER, max_incomplete_event_size=max_header_size)
        self._failed = False
        self._upgraded = False
        self._closed = False
        self._pending: list[DownstreamEvent] = []
        self._request_done = False
        self._method = b""

    # -- state -----------------------------------------------------------------------
    @property
    def upgraded(self) -> bool:
        """A protocol switch happened: all input now comes out as ``Upgraded``."""
        return self._upgraded

    @property
    def keep_alive(self) -> bool:
        """Another request may follow the current one on this connection."""
        return (
            not self._failed
            and self._h11.our_state not in _FINAL_STATES
            and self._h11.their_state not in _FINAL_STATES
        )

    @property
    def awaiting_response(self) -> bool:
        """The current request has been read completely: stop reading until the response
        is done and ``start_next_request`` is called. Bytes fed meanwhile (a pipelined
        request) are buffered here without a bound, so the I/O layer pauses its reads."""
        return self._request_done and not self._upgraded

    @property
    def response_started(self) -> bool:
        """A response head has been sent for the current request."""
        return self._h11.our_state in (h11.SEND_BODY, h11.DONE, h11.MUST_CLOSE)

    # -- input -----------------------------------------------------------------------
    def receive_data(self, data: bytes) -> list[DownstreamEvent]:
        """Feed bytes from the client (``b""`` = EOF); returns what they completed."""
        if self._failed or self._closed:
            return []
        if self._upgraded:
            if data:
                return [Upgraded(data)]
            self._closed = True
            return [ConnectionClosed()]
        try:
            self._h11.receive_data(data)
        except RuntimeError:  # data after EOF: nothing more can come
            return []
        return self._drain()

    def take_events(self) -> list[DownstreamEvent]:
        """Events made ready by a command rather than by input: after a ``101``, the bytes
        the client sent behind its upgrade request (as ``Upgraded``)."""
        events, self._pending = self._pending, []
        return events

    def start_next_request(self) -> list[DownstreamEvent]:
        """After a complete exchange on a keep-alive connection: reset for the next
        request and return the events of any bytes already buffered (pipelined)."""
        self._h11.start_next_cycle()
        self._request_done = False
        return self._drain()

    def _drain(self) -> list[DownstreamEvent]:
        events: list[DownstreamEvent] = []
        conn = self._h11
        while True:
            try:
                ev = conn.next_event()
            except h11.RemoteProtocolError as e:
                if conn.their_state is h11.ERROR and self._eof_seen():
                    events.append(ConnectionClosed(clean=False))
                    self._closed = True
                else:
                    events.append(ProtocolError(e.error_status_hint, _clean_reason(str(e))))
                self._failed = True
                return events
            if ev is h11.NEED_DATA or ev is h11.PAUSED:
                return events
            if isinstance(ev, h11.Request):
                if _head_size(ev) > self.max_header_size:
                    self._failed = True
                    events.append(
                        ProtocolError(431, f"request head exceeds {self.max_header_size} bytes")
                    )
                    return events
                self._method = ev.method
                events.append(self._head(ev))
            elif isinstance(ev, h11.Data):
                events.append(BodyChunk(bytes(ev.data)))
            elif isinstance(ev, h11.EndOfMessage):
                self._request_done = True
                events.append(RequestEnd(_decode(ev.headers)))
            elif isinstance(ev, h11.ConnectionClosed):
                self._closed = True
                events.append(ConnectionClosed())
                return events

    def _eof_seen(self) -> bool:
        return bool(self._h11.trailing_data[1])

    def _head(self, ev: h11.Request) -> RequestHead:
        headers = _decode(ev.headers)
        upgrade = next((v for k, v in headers if k == "upgrade"), None)
        if upgrade is not None and "upgrade" not in _tokens(headers, "connection"):
            upgrade = None
        length = next((v for k, v in headers if k == "content-length"), "0")
        chunked = "chunked" in _tokens(headers, "transfer-encoding")
        return RequestHead(
            method=ev.method.decode("ascii"),
            target=ev.target.decode("latin-1"),
            headers=headers,
            http_version=ev.http_version.decode("ascii"),
            keep_alive=_keep_alive(ev.http_version, headers),
            expect_continue=self._h11.they_are_waiting_for_100_continue,
            upgrade=upgrade,
            has_body=chunked or length.strip() not in ("", "0"),
        )

    # -- output ----------------------------------------------------------------------
    def send_continue(self) -> bytes:
        """``100 Continue`` for a client that sent ``Expect: 100-continue``."""
        if not self._h11.they_are_waiting_for_100_continue:
            return b""
        return self._send(h11.InformationalResponse(status_code=100, headers=[]))

    def send_response_head(
        self, status: int, headers: Sequence[tuple[str, str]], reason: str = ""
    ) -> bytes:
        """A response head (use ``forwardable_headers`` on an upstream head first).

        Without ``Content-Length`` the body is chunked (HTTP/1.1) or delimited by close.
        ``101`` (or 2xx to ``CONNECT``) switches to passthrough; then call ``take_events``
        for the client bytes that followed the request.
        """
        raw = _encode(headers)
        if status < 200:
            data = self._send(
                h11.InformationalResponse(status_code=status, headers=raw, reason=reason)
            )
        else:
            data = self._send(h11.Response(status_code=status, headers=raw, reason=reason))
        if self._h11.our_state is h11.SWITCHED_PROTOCOL:
            self._upgraded = True
            leftover, closed = self._h11.trailing_data
            if leftover:
                self._pending.append(Upgraded(bytes(leftover)))
            if closed:
                self._closed = True
                self._pending.append(ConnectionClosed())
        return data

    def send_body(self, data: bytes) -> bytes:
        """A piece of the response body (raw bytes once upgraded)."""
        if self._upgraded:
            return data
        return self._send(h11.Data(data=data)) if data else b""

    def send_end(self, trailers: Sequence[tuple[str, str]] = ()) -> bytes:
        """The end of the response body (trailers only go out on a chunked body)."""
        if self._upgraded:
            return b""
        return self._send(h11.EndOfMessage(headers=_encode(trailers)))

    def send_error(self, status: int, body: str, flag: str) -> bytes:
        """A complete response made here: ``status``, a short ``text/plain`` body and the
        ``x-nodeagent-response-flag: <flag>`` header; ``Connection: close`` is added after
        a protocol error (then close the connection once the bytes are written).

        If the response had already started, nothing can be said any more: returns
        ``b""`` and ``keep_alive`` becomes False (close the connection).
        """
        if self.response_started or self._upgraded:
            self._failed = True
            return b""
        payload = (_clean_reason(body) + "\n").encode("ascii")
        headers = [
            ("content-type", "text/plain; charset=utf-8"),
            ("content-length", str(len(payload))),
            (RESPONSE_FLAG_HEADER, _clean_reason(flag)),
        ]
        if self._failed or self._h11.their_state in (h11.SEND_BODY, h11.ERROR):
            # The request body was not (or could not be) read: this connection is done.
            headers.append(("connection", "close"))
            self._failed = True
        try:
            wire = self._send(h11.Response(status_code=status, headers=_encode(headers)))
            if self._method != b"HEAD":
                wire += self._send(h11.Data(data=payload))
            return wire + self._send(h11.EndOfMessage())
        except h11.LocalProtocolError:
            self._failed = True
            return b""

    def _send(self, event: h11.Event) -> bytes:
        return self._h11.send(event) or b""


class UpstreamHttp1:
    """The proxy's client side of one connection to an application (one request at a
    time; ``reusable`` after ``ResponseEnd`` says whether another may follow).

    Script: ``send_request_head`` + ``send_body``* + ``send_end``; ``receive_data`` ->
    ``Informational``*, ``ResponseHead``, ``BodyChunk``*, ``ResponseEnd``; then
    ``start_next_request`` if ``reusable``.
    """

    def __init__(self, *, max_header_size: int = DEFAULT_MAX_HEADER_SIZE) -> None:
        self._h11 = h11.Connection(h11.CLIENT, max_incomplete_event_size=max_header_size)
        self._failed = False
        self._upgraded = False
        self._closed = False
        self._ended = False

    @property
    def upgraded(self) -> bool:
        return self._upgraded

    @property
    def reusable(self) -> bool:
        """The exchange is complete and both sides allow another request here."""
        return (
            not self._failed
            and not self._upgraded
            and self._h11.our_state is h11.DONE
            and self._h11.their_state is h11.DONE
        )

    def start_next_request(self) -> None:
        """Reset for the next request (only when ``reusable``)."""
        self._h11.start_next_cycle()
        self._ended = False

    # -- output ----------------------------------------------------------------------
    def send_request_head(
        self,
        method: str,
        target: str,
        headers: Sequence[tuple[str, str]],
        *,
        body: bool = False,
    ) -> bytes:
        """The request head. ``headers`` must include ``Host``. With ``body`` and no
        ``Content-Length``, the body is sent chunked (``Transfer-Encoding`` is added)."""
        items = list(headers)
        if body and not any(k.lower() == "content-length" for k, _ in items):
            items.append(("transfer-encoding", "chunked"))
        request = h11.Request(method=method, target=target, headers=_encode(items))
        return self._h11.send(request) or b""

    def send_body(self, data: bytes) -> bytes:
        if self._upgraded:
            return data
        return (self._h11.send(h11.Data(data=data)) or b"") if data else b""

    def send_end(self, trailers: Sequence[tuple[str, str]] = ()) -> bytes:
        if self._upgraded:
            return b""
        return self._h11.send(h11.EndOfMessage(headers=_encode(trailers))) or b""

    # -- input -----------------------------------------------------------------------
    def receive_data(self, data: bytes) -> list[UpstreamEvent]:
        """Feed bytes from the application (``b""`` = EOF)."""
        if self._failed or self._closed:
            return []
        if self._upgraded:
            if data:
                return [Upgraded(data)]
            self._closed = True
            return [ConnectionClosed()]
        try:
            self._h11.receive_data(data)
        except RuntimeError:
            return []
        events: list[UpstreamEvent] = []
        conn = self._h11
        while True:
            try:
                ev = conn.next_event()
            except h11.RemoteProtocolError as e:
                self._failed = True
                events.append(ProtocolError(502, _clean_reason(f"upstream: {e}")))
                return events
            if ev is h11.NEED_DATA:
                return events
            if ev is h11.PAUSED:
                if conn.their_state is h11.SWITCHED_PROTOCOL:
                    self._upgraded = True
                    leftover, closed = conn.trailing_data
                    if leftover:
                        events.append(Upgraded(bytes(leftover)))
                    if closed:
                        self._closed = True
                        events.append(ConnectionClosed())
                return events
            if isinstance(ev, h11.InformationalResponse):
                headers = _decode(ev.headers)
                if ev.status_code == 101:
                    events.append(self._response_head(ev, headers))
                else:
                    events.append(Informational(ev.status_code, headers))
            elif isinstance(ev, h11.Response):
                events.append(self._response_head(ev, _decode(ev.headers)))
            elif isinstance(ev, h11.Data):
                events.append(BodyChunk(bytes(ev.data)))
            elif isinstance(ev, h11.EndOfMessage):
                self._ended = True
                events.append(ResponseEnd(_decode(ev.headers)))
            elif isinstance(ev, h11.ConnectionClosed):
                self._closed = True
                events.append(ConnectionClosed(clean=self._ended))
                return events

    @staticmethod
    def _response_head(
        ev: h11.Response | h11.InformationalResponse, headers: Headers
    ) -> ResponseHead:
        return ResponseHead(
            status=ev.status_code,
            headers=headers,
            reason=ev.reason.decode("latin-1"),
            http_version=ev.http_version.decode("ascii"),
            keep_alive=_keep_alive(ev.http_version, headers),
        )
