"""HTTP/1.1 for the proxy as two sans-I/O machines on top of ``httptools`` (the C parser
``llhttp``, strict mode): one per side of a proxied exchange.

Rule: **no I/O here**. No asyncio, no sockets, no clocks, no logging side effects. Bytes
from a peer go in with ``receive_data`` and come out as events; the caller's actions
(``send_response_head``, ``send_body``, ...) return the bytes to write. ``receive_data(b"")``
means the peer closed its side (EOF). The I/O layer (``nodeagent.proxy``) owns sockets.

- ``DownstreamHttp1`` is the proxy's server side, facing the client: it yields
  ``RequestHead`` / ``BodyChunk`` / ``RequestEnd``, answers malformed requests with 400 and
  oversize heads with 431 (``ProtocolError``; answer it with ``send_error``), supports
  ``Expect: 100-continue`` (``send_continue``), keep-alive (``start_next_request``), and
  pipelining: a request arriving while one is in flight is parsed, but its events stay
  queued here and are delivered by ``start_next_request``. After a ``101`` (or a 2xx to
  ``CONNECT``) it becomes a raw passthrough: every later input comes out as
  ``Upgraded(data)``.
- ``UpstreamHttp1`` is the proxy's client side, facing the application: it sends one
  request at a time and yields ``Informational`` / ``ResponseHead`` / ``BodyChunk`` /
  ``ResponseEnd``; a malformed response is ``ProtocolError(502, ...)``; ``reusable`` says
  whether the connection can carry another request after this one.
- ``forwardable_headers`` is the pure rule for copying a head across the proxy
  (hop-by-hop headers removed, see its docstring).

Parsing is llhttp's: it rejects the request-smuggling vectors (``Content-Length`` together
with ``Transfer-Encoding``, a bad or repeated ``Content-Length``, obs-fold, bare LF or CR
line ends, whitespace after a chunk size, control characters in fields). Added here: an
HTTP/1.1 request needs exactly one ``Host`` (400), a request ``Transfer-Encoding`` other
than ``chunked`` is a 501 and a response one a 502 (relayed without its hop-by-hop coding,
such a body would reach the client still encoded), a version other than 1.0/1.1 is a 505
(502 upstream), and so are a response status below 100 or control characters in a reason
phrase (llhttp lets those through).

Trailers of a chunked body are delivered: llhttp reports trailer fields like header fields
after the last chunk, and they come out in ``RequestEnd.trailers`` /
``ResponseEnd.trailers``; on the way out they go after the last chunk (on a body framed any
other way they are dropped).

Heads are written here by hand; header names must be tokens and no name, value, target or
reason may contain CR, LF or NUL, so a caller cannot inject a header or a second message.

What else this module adds to llhttp (which ``httptools`` exposes only partly): size
limits for the parts llhttp would buffer in Python (a head, and the trailers: bytes are
counted per read while one is incomplete, so a never-ending one is cut after the read that
crosses ``max_header_size``: 431, 502 upstream), end-of-body by EOF for responses without
framing, the ``HEAD`` / ``204`` / ``304`` / ``CONNECT`` rules for responses (the response
parser does not know the request), and the boundary between pipelined messages. Bytes an
application sends after a complete response make its connection not ``reusable`` (they are
never taken for the next response); bytes a client sends after a request that ends the
connection (``Connection: close``, HTTP/1.0) are ignored.

Bodies stream in both directions: each ``BodyChunk`` is what arrived, never a whole body.
Errors are split by whose fault: the peer's bytes produce a ``ProtocolError`` event; a
caller's misuse (a body on a ``HEAD`` response, a header value with CR/LF, a second
response head, ...) raises ``LocalProtocolError`` (a ``ValueError``).

Limits of llhttp worth knowing: only the request methods llhttp knows are accepted (the
registered ones, ``PURGE``, WebDAV, ...; an unknown token is a 400); llhttp stops right
after an ``Upgrade``/``CONNECT`` head, so the ``Content-Length`` body of such a request is
counted here, an ``Upgrade`` offer on a request with a *chunked* body is dropped
(``RequestHead.upgrade`` is None; the request is served as plain HTTP) and ``CONNECT`` with
a chunked body is a 400.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Final

# httptools >= 0.7 ships type hints (used then); 0.6.x has none, hence the ignore, which
# is unused, and allowed to be, with a typed version.
import httptools  # type: ignore[import-untyped, unused-ignore]

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
    "LocalProtocolError",
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


class LocalProtocolError(ValueError):
    """The caller broke HTTP/1.1 (wrong order of commands, a body where none may be, a
    header that would corrupt the message). Nothing was written; a bug, not the peer's."""


# -- events -------------------------------------------------------------------------------
# Events are not changed once made. The ones made for every message (RequestHead,
# ResponseHead, BodyChunk) are plain slotted dataclasses all the same: a frozen dataclass's
# __init__ calls object.__setattr__ once per field, a cost paid on every request.


@dataclass(slots=True)
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


@dataclass(slots=True)
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


@dataclass(slots=True)
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

# Immutable, so shared.
_REQUEST_END: Final = RequestEnd()
_RESPONSE_END: Final = ResponseEnd()
_CLOSED: Final = ConnectionClosed()
_CLOSED_CUT: Final = ConnectionClosed(clean=False)


# -- helpers ------------------------------------------------------------------------------


def _split(value: str) -> list[str]:
    """The comma-separated tokens of a header value, lower-cased."""
    if "," not in value:
        token = value.strip().lower()
        return [token] if token else []
    return [t for p in value.split(",") if (t := p.strip().lower())]


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
    without ``Content-Length`` is chunked by ``send_response_head``).

    With ``upgrade`` (the protocol of a switch being forwarded, e.g. ``"websocket"``),
    ``Upgrade: <upgrade>`` and ``Connection: upgrade`` are emitted so the switch crosses.
    Pure: the input is not changed.
    """
    hop = HOP_BY_HOP
    out: list[tuple[str, str]] = []
    named: list[str] | None = None
    for item in headers:
        low = item[0].lower()
        if low in hop:
            if low == "connection":
                for token in _split(item[1]):
                    if token not in hop:
                        named = [token] if named is None else [*named, token]
            continue
        out.append(item)
    if named:  # fields the Connection header names are hop-by-hop too
        out = [item for item in out if item[0].lower() not in named]
    if upgrade is not None:
        out.append(("connection", "upgrade"))
        out.append(("upgrade", upgrade))
    return out


def _clean_reason(reason: str) -> str:
    """A header-safe text: printable ASCII, one line, bounded."""
    return "".join(c if " " <= c <= "~" else " " for c in reason).strip()[:512]


_TOKEN: Final = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_TARGET: Final = re.compile(r"[\x21-\x7e\x80-\xff]+")
_CONTROL: Final = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
_NAMES: dict[str, str] = {}
"""Outgoing header names already checked to be tokens, mapped to their lower-case form
(a memo, bounded by ``_NAMES_MAX``: names repeat on every message)."""
_NAMES_MAX: Final = 4096


def _checked_name(name: str) -> str:
    """``name`` lower-cased, after checking it is a token (the slow path of ``_NAMES``)."""
    if _TOKEN.fullmatch(name) is None:
        raise LocalProtocolError(f"invalid header name {name!r}")
    low = name.lower()
    if len(_NAMES) < _NAMES_MAX:
        _NAMES[name] = low
    return low


def _checked_length(previous: str | None, value: str) -> str:
    if not (value.isascii() and value.isdigit()):
        raise LocalProtocolError(f"invalid Content-Length {value!r}")
    if previous is not None and int(previous) != int(value):
        raise LocalProtocolError("conflicting Content-Length headers")
    return value


def _wire(lines: list[str]) -> bytes:
    """Lines (each ending in CRLF) plus the blank line, as bytes; refuses any CR, LF or NUL
    inside a line: one count over the whole head instead of a scan per field."""
    lines.append("\r\n")
    text = "".join(lines)
    n = len(lines)
    if text.count("\n") != n or text.count("\r") != n or "\x00" in text:
        bad = next(
            (ln for ln in lines if "\x00" in ln or ln.count("\r") != 1 or ln.count("\n") != 1),
            "",
        )
        raise LocalProtocolError(f"CR, LF or NUL inside a header line: {bad[:-2]!r}")
    try:
        return text.encode("latin-1")
    except UnicodeEncodeError as e:
        raise LocalProtocolError(f"not latin-1: {e.object[e.start : e.end]!r}") from e


def _without(
    lines: list[str], headers: Sequence[tuple[str, str]], drop: tuple[str, ...]
) -> list[str]:
    """``lines`` (a start line, one line per field of ``headers``, then added lines)
    without the lines of the fields named in ``drop``."""
    n = len(headers)
    kept = [
        line
        for (name, _), line in zip(headers, lines[1 : n + 1], strict=True)
        if name.lower() not in drop
    ]
    return [lines[0], *kept, *lines[n + 1 :]]


def _trailer_lines(trailers: Sequence[tuple[str, str]]) -> list[str]:
    names = _NAMES
    lines = ["0\r\n"]
    for name, value in trailers:
        if name not in names:
            _checked_name(name)
        lines.append(f"{name}: {value}\r\n")
    return lines


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%b\r\n" % (len(data), data)


_METHODS: Final = {
    m.encode(): m for m in ("GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS")
}

_FIELD_NAMES: dict[bytes, str] = {}
"""Incoming field names (llhttp checked they are tokens) decoded and lower-cased: a memo
bounded like ``_NAMES``."""


def _field_name(name: bytes) -> str:
    low = name.decode("latin-1").lower()
    if len(_FIELD_NAMES) < _NAMES_MAX:
        _FIELD_NAMES[name] = low
    return low


def _has_token(value: str, token: str) -> bool:
    """``token`` (lower-case) is one of the comma-separated tokens of ``value``."""
    return token in value.lower() and token in _split(value)


def _head_size(first: int, headers: Headers) -> int:
    """The size of a head as sent: the start line plus ``name: value\\r\\n`` per field."""
    return first + sum(len(k) + len(v) + 4 for k, v in headers) + 2


class _Stop(Exception):
    """Raised in a parser callback to stop llhttp (it becomes an ``HttpParserError``)."""


def _reraise_bug(error: Exception) -> None:
    """A callback that failed for another reason than ``_Stop`` is a bug here: surface it
    rather than blame the peer."""
    cause = error.__context__
    if cause is not None and not isinstance(cause, _Stop):
        raise cause


# Parser modes (what happens to the next bytes) and message phases.
_PARSING: Final = 0  # they go to llhttp
_COUNTED: Final = 1  # downstream: the Content-Length body of an Upgrade/CONNECT request
_RAW: Final = 2  # llhttp stopped at a protocol switch: they wait for the decision
_DEAD: Final = 3  # an error or EOF: nothing more is read

_IDLE: Final = 0  # between messages
_HEAD: Final = 1  # a head began
_BODY: Final = 2  # the head is complete
_DONE: Final = 3  # upstream: the response is complete

# What follows an Upgrade/CONNECT head (llhttp stops right after it, even with a body).
_NO_BODY: Final = 0
_COUNTED_BODY: Final = 1
_CHUNKED_BODY: Final = 2
_CHUNKED_HEAD: Final = b"PUT / HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\n"
"""Primes a fresh parser to read the chunked body of a request whose head the first
parser already consumed (the Upgrade offer of such a request is dropped)."""

# Outgoing message states and body framings.
_NOTHING: Final = 0
_SENDING: Final = 1  # head sent, body may follow
_SENT: Final = 2

_LENGTH: Final = 0
_CHUNKED: Final = 1
_UNTIL_CLOSE: Final = 2

_REQUEST_FIELDS: Final = frozenset(
    {"host", "connection", "content-length", "transfer-encoding", "upgrade", "expect"}
)
_RESPONSE_FIELDS: Final = frozenset({"connection", "content-length", "transfer-encoding"})
_REQUEST_OUT_FIELDS: Final = frozenset(
    {"host", "connection", "content-length", "transfer-encoding", "upgrade"}
)


# -- downstream ---------------------------------------------------------------------------


class DownstreamHttp1:
    """The proxy's server side of one client connection.

    Script of an exchange: ``receive_data`` -> ``RequestHead``, ``BodyChunk``*,
    ``RequestEnd``; the caller writes ``send_response_head`` + ``send_body``* +
    ``send_end``; then, if ``keep_alive`` is still True, ``start_next_request()`` returns
    the events of the next request already buffered (pipelining) and reading goes on.

    Inside: events are queued per message (``_backlog``: one list per request, the last
    one being filled by the parser); only the first list is ever handed out, and the
    next one only after ``start_next_request``.
    """

    __slots__ = (
        "_backlog",
        "_body_left",
        "_chunk_new",
        "_chunk_open",
        "_closed",
        "_completed",
        "_cur",
        "_expect",
        "_failed",
        "_feed_len",
        "_fields",
        "_head_new",
        "_head_seen",
        "_mode",
        "_parser",
        "_pending",
        "_phase",
        "_raw",
        "_raw_eof",
        "_request_done",
        "_resp",
        "_resp_close",
        "_resp_framing",
        "_resp_left",
        "_sink",
        "_switch_body",
        "_synthetic",
        "_tail_seen",
        "_upgraded",
        "_url",
        "max_header_size",
    )

    def __init__(self, *, max_header_size: int = DEFAULT_MAX_HEADER_SIZE) -> None:
        self.max_header_size = max_header_size
        # reading
        self._parser = self._new_parser()
        self._mode = _PARSING
        self._phase = _IDLE
        self._url = b""
        self._fields: list[tuple[str, str]] = []
        self._sink: list[DownstreamEvent] = []
        self._backlog: list[list[DownstreamEvent]] = [self._sink]
        self._completed = 0  # requests the parser finished
        self._head_seen = 0  # bytes charged to the incomplete head
        self._head_new = False  # that head began in the current read
        self._feed_len = 0
        self._chunk_open = False  # a chunk-size line was read, no data yet (trailers?)
        self._chunk_new = False  # ... in the current read
        self._tail_seen = 0  # bytes charged to the chunk-size line and what follows
        self._switch_body = _NO_BODY
        self._body_left = 0
        self._synthetic = False
        self._raw = bytearray()
        self._raw_eof = False
        # the exchange being answered
        self._cur: RequestHead | None = None
        self._request_done = False
        self._expect = False
        self._resp = _NOTHING
        self._resp_framing = _LENGTH
        self._resp_left = 0
        self._resp_close = False
        self._failed = False
        self._closed = False
        self._upgraded = False
        self._pending: list[DownstreamEvent] = []

    def _new_parser(self) -> httptools.HttpRequestParser:
        callbacks = SimpleNamespace(
            on_message_begin=self._on_message_begin,
            on_url=self._on_url,
            on_header=self._on_header,
            on_headers_complete=self._on_headers_complete,
            on_body=self._on_body,
            on_message_complete=self._on_message_complete,
            on_chunk_header=self._on_chunk_header,
            on_chunk_complete=self._on_chunk_complete,
        )
        return httptools.HttpRequestParser(callbacks)

    # -- state -----------------------------------------------------------------------
    @property
    def upgraded(self) -> bool:
        """A protocol switch happened: all input now comes out as ``Upgraded``."""
        return self._upgraded

    @property
    def keep_alive(self) -> bool:
        """Another request may follow the current one on this connection."""
        cur = self._cur
        return not (
            self._failed
            or self._closed
            or self._upgraded
            or self._resp_close
            or (cur is not None and not cur.keep_alive)
        )

    @property
    def awaiting_response(self) -> bool:
        """The current request has been read completely: stop reading until the response
        is done and ``start_next_request`` is called. Bytes fed meanwhile (a pipelined
        request) are parsed and queued here without a bound, so the I/O layer pauses its
        reads."""
        return self._request_done and not self._upgraded

    @property
    def response_started(self) -> bool:
        """A final response head (or a ``101``) has been sent for the current request."""
        return self._resp != _NOTHING

    # -- input -----------------------------------------------------------------------
    def receive_data(self, data: bytes) -> list[DownstreamEvent]:
        """Feed bytes from the client (``b""`` = EOF); returns what they completed."""
        if self._failed or self._closed:
            return []
        if self._upgraded:
            if data:
                return [Upgraded(data)]
            self._closed = True
            return [_CLOSED]
        if self._mode == _PARSING and data:
            self._feed(data)
        else:
            self._input(data)
        return self._deliver()

    def take_events(self) -> list[DownstreamEvent]:
        """Events made ready by a command rather than by input: after a ``101``, the bytes
        the client sent behind its upgrade request (as ``Upgraded``)."""
        events, self._pending = self._pending, []
        return events

    def start_next_request(self) -> list[DownstreamEvent]:
        """After a complete exchange on a keep-alive connection: reset for the next
        request and return the events of any bytes already received (pipelined)."""
        if not (self._request_done and self._resp == _SENT and self.keep_alive):
            raise LocalProtocolError("no complete exchange on a keep-alive connection")
        self._request_done = False
        self._resp = _NOTHING
        self._cur = None
        self._expect = False
        if self._mode == _RAW and len(self._backlog) == 1:
            # The request just answered offered a switch that was refused: what followed
            # its head is HTTP after all.
            raw, eof = bytes(self._raw), self._raw_eof
            self._raw = bytearray()
            self._raw_eof = False
            self._parser = self._new_parser()
            self._mode = _PARSING
            self._phase = _IDLE
            if raw:
                self._input(raw)
            if eof:
                self._input(b"")
        return self._deliver()

    def _input(self, data: bytes) -> None:
        mode = self._mode
        if mode == _PARSING:
            if data:
                self._feed(data)
            else:
                self._sink.append(_CLOSED if self._phase == _IDLE else _CLOSED_CUT)
                self._mode = _DEAD
        elif mode == _COUNTED:
            if data:
                self._counted(data)
            else:
                self._sink.append(_CLOSED_CUT)
                self._mode = _DEAD
        elif mode == _RAW:
            if data:
                self._raw += data
            else:
                self._raw_eof = True

    def _feed(self, data: bytes) -> None:
        self._head_new = self._chunk_new = False
        self._feed_len = n = len(data)
        completed = self._completed
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade as e:
            offset: int = e.args[0]
            self._switch_stop(data[offset:])
            return
        except httptools.HttpParserError as e:
            _reraise_bug(e)
            if self._mode == _PARSING:  # not stopped by a callback that already said why
                self._fail(400, str(e) or "malformed request")
            return
        if self._phase == _HEAD:  # a head is still incomplete: charge this read to it
            if not self._head_new:
                self._head_seen += n
            elif self._completed == completed:
                self._head_seen = n
            else:  # began behind a pipelined request: its share of this read is unknown
                self._head_seen = 0
            if self._head_seen > self.max_header_size:
                self._fail(431, f"request head exceeds {self.max_header_size} bytes")
        elif self._chunk_open and self._over_tail(n):
            self._fail(431, f"request trailers exceed {self.max_header_size} bytes")

    def _fail(self, status: int, reason: str) -> None:
        self._sink.append(ProtocolError(status, _clean_reason(reason)))
        self._mode = _DEAD

    def _switch_stop(self, rest: bytes) -> None:
        """llhttp stopped right after an Upgrade/CONNECT head: read its body, if any, then
        hold what follows raw until the response decides."""
        body, self._switch_body = self._switch_body, _NO_BODY
        if body == _COUNTED_BODY:
            self._mode = _COUNTED
            if rest:
                self._counted(rest)
        elif body == _CHUNKED_BODY:
            self._parser = self._new_parser()
            self._synthetic = True
            self._parser.feed_data(_CHUNKED_HEAD)
            if rest:
                self._feed(rest)
        else:
            self._mode = _RAW
            self._raw = bytearray(rest)

    def _counted(self, data: bytes) -> None:
        left = self._body_left
        if len(data) < left:
            self._body_left = left - len(data)
            self._sink.append(BodyChunk(data))
            return
        if left:
            self._sink.append(BodyChunk(data[:left]))
        self._body_left = 0
        self._end_request(())
        self._mode = _RAW
        self._raw = bytearray(data[left:])

    def _end_request(self, trailers: Headers) -> None:
        self._sink.append(RequestEnd(trailers) if trailers else _REQUEST_END)
        self._sink = []
        self._backlog.append(self._sink)
        self._completed += 1
        self._phase = _IDLE

    def _deliver(self) -> list[DownstreamEvent]:
        """The events the caller may see now: the rest of the current request; nothing of
        a later one before ``start_next_request``, except a clean EOF with nothing
        pending."""
        backlog = self._backlog
        if self._request_done:
            events: list[DownstreamEvent] = []
        else:
            events = backlog[0]
            if len(backlog) > 1:  # complete: it ends with RequestEnd
                del backlog[0]
                self._request_done = True
            elif events:
                self._sink = backlog[0] = []
                last = events[-1]
                if isinstance(last, ProtocolError):
                    self._failed = True
                elif isinstance(last, ConnectionClosed):
                    self._closed = True
            else:
                return []
            self._expect = False  # whatever follows a head: the client did not wait
            first = events[0]
            if isinstance(first, RequestHead):
                self._cur = first
                self._expect = first.expect_continue and len(events) == 1
            if not self._request_done:
                return events
        sink = backlog[0]
        if len(backlog) == 1 and len(sink) == 1 and sink[0] is _CLOSED:
            self._sink = backlog[0] = []
            self._closed = True
            events.append(_CLOSED)
        return events

    # -- llhttp callbacks --------------------------------------------------------------
    def _on_message_begin(self) -> None:
        self._phase = _HEAD
        self._head_new = True
        self._url = b""
        self._fields = []

    def _on_url(self, url: bytes) -> None:
        self._url += url

    def _on_header(self, name: bytes, value: bytes) -> None:
        self._fields.append(
            (_FIELD_NAMES.get(name) or _field_name(name), value.rstrip(b" \t").decode("latin-1"))
        )

    def _on_headers_complete(self) -> None:
        self._phase = _BODY
        headers = tuple(self._fields)
        self._fields = []  # trailers, if any, go here
        if self._synthetic:
            self._synthetic = False
            return
        parser = self._parser
        raw_method = parser.get_method()
        method = _METHODS.get(raw_method) or raw_method.decode("ascii")
        limit = self.max_header_size
        seen = self._feed_len if self._head_new else self._head_seen + self._feed_len
        if seen > limit and _head_size(len(method) + len(self._url) + 12, headers) > limit:
            self._fail(431, f"request head exceeds {limit} bytes")
            raise _Stop
        version = parser.get_http_version()
        if version != "1.1" and version != "1.0":
            self._fail(505, f"HTTP/{version} is not supported")
            raise _Stop
        connection = expect = upgrade = length = coding = None
        hosts = 0
        for k, v in headers:
            if k in _REQUEST_FIELDS:
                if k == "host":
                    hosts += 1
                elif k == "content-length":
                    length = v
                elif k == "transfer-encoding":
                    coding = v if coding is None else f"{coding},{v}"
                elif k == "connection":
                    connection = v if connection is None else f"{connection},{v}"
                elif k == "upgrade":
                    if upgrade is None:
                        upgrade = v
                else:
                    expect = v if expect is None else f"{expect},{v}"
        if hosts != 1 and (hosts or version == "1.1"):  # RFC 9112 §3.2
            self._fail(400, "no Host header" if not hosts else "more than one Host header")
            raise _Stop
        chunked = coding is not None
        if chunked and _split(coding or "") != ["chunked"]:
            self._fail(501, f"Transfer-Encoding {coding!r} is not supported")
            raise _Stop
        has_body = chunked or (length is not None and int(length) > 0)
        if parser.should_upgrade():  # llhttp stops after this head
            if method == "CONNECT":
                upgrade = None
                if chunked:
                    self._fail(400, "CONNECT with a chunked body")
                    raise _Stop
            elif chunked:
                upgrade = None  # the body must be parsed: the switch cannot happen
            if chunked:
                self._switch_body = _CHUNKED_BODY
            elif has_body:
                self._switch_body = _COUNTED_BODY
                self._body_left = int(length or 0)
        else:
            upgrade = None
        http11 = version == "1.1"
        self._sink.append(
            RequestHead(  # positional: measurably cheaper for a frozen dataclass
                method,
                self._url.decode("latin-1"),
                headers,
                version,
                http11 and (connection is None or not _has_token(connection, "close")),
                http11 and expect is not None and _has_token(expect, "100-continue"),
                upgrade,
                has_body,
            )
        )

    def _on_body(self, body: bytes) -> None:
        self._chunk_open = False
        self._sink.append(BodyChunk(body))

    def _on_chunk_header(self) -> None:
        self._chunk_open = self._chunk_new = True
        self._tail_seen = 0

    def _on_chunk_complete(self) -> None:
        self._chunk_open = False

    def _over_tail(self, n: int) -> bool:
        """Charge a read to what follows a chunk-size line while no data came: the
        trailers after the last chunk, which llhttp (via httptools) buffers field by
        field, so they are bounded like a head. A read in which the line ended is not
        charged (its share is unknown)."""
        if not self._chunk_new:
            self._tail_seen += n
        return self._tail_seen > self.max_header_size

    def _on_message_complete(self) -> None:
        if self._switch_body != _NO_BODY:  # llhttp skipped the body of a switching request
            return
        fields = self._fields
        self._end_request(tuple(fields) if fields else ())

    # -- output ----------------------------------------------------------------------
    def send_continue(self) -> bytes:
        """``100 Continue`` for a client that sent ``Expect: 100-continue``."""
        if not self._expect or self._resp != _NOTHING:
            return b""
        self._expect = False
        return b"HTTP/1.1 100 \r\n\r\n"

    def send_response_head(
        self, status: int, headers: Sequence[tuple[str, str]], reason: str = ""
    ) -> bytes:
        """A response head (use ``forwardable_headers`` on an upstream head first).

        Without ``Content-Length`` the body is chunked (HTTP/1.1) or delimited by close
        (HTTP/1.0). ``Connection: close`` is added when the connection ends after this
        response. ``101`` (or 2xx to ``CONNECT``) switches to passthrough; then call
        ``take_events`` for the client bytes that followed the request.
        """
        if self._upgraded or self._resp != _NOTHING:
            raise LocalProtocolError("a response was already sent for this request")
        cur = self._cur
        if cur is None and not self._failed:
            raise LocalProtocolError("no request to respond to")
        if not 100 <= status <= 999:
            raise LocalProtocolError(f"invalid status {status}")
        names = _NAMES
        lines = [f"HTTP/1.1 {status} {reason}\r\n"]
        method = cur.method if cur is not None else ""
        switch = status == 101 or (method == "CONNECT" and 200 <= status < 300)
        if switch and not (
            self._mode == _RAW
            and self._request_done
            and len(self._backlog) == 1
            and (status != 101 or (cur is not None and cur.upgrade is not None))
        ):
            raise LocalProtocolError(f"{status} without a complete request to switch")
        if status < 200:
            for name, value in headers:
                if name not in names:
                    _checked_name(name)
                lines.append(f"{name}: {value}\r\n")
            wire = _wire(lines)
            self._expect = False
            if switch:
                self._switch()
            return wire

        length: str | None = None
        coding = False
        connection: list[str] | None = None
        for name, value in headers:
            low = names.get(name) or _checked_name(name)
            if low in _RESPONSE_FIELDS:
                if low == "content-length":
                    length = _checked_length(length, value)
                elif low == "transfer-encoding":
                    coding = True
                elif connection is None:
                    connection = _split(value)
                else:
                    connection += _split(value)
            lines.append(f"{name}: {value}\r\n")

        close = self._failed or cur is None or not cur.keep_alive
        drop: tuple[str, ...] = ()  # fields of the caller's replaced here
        if switch or status == 204 or status == 304:
            framing, left = _LENGTH, 0
        elif length is not None and not coding:
            framing, left = _LENGTH, 0 if method == "HEAD" else int(length)
        else:  # a body of unknown length (for HEAD: the fields a GET would get)
            drop = ("content-length", "transfer-encoding")
            left = 0
            if cur is not None and cur.http_version == "1.1":
                lines.append("Transfer-Encoding: chunked\r\n")
                framing = _CHUNKED
            else:
                framing = _UNTIL_CLOSE
                close = close or method != "HEAD"
            if method == "HEAD":
                framing = _LENGTH
        if connection is not None and "close" in connection:
            close = True
        elif close:
            tokens = set(connection or ())
            tokens.discard("keep-alive")
            tokens.add("close")
            drop += ("connection",)
            lines.append(f"Connection: {', '.join(sorted(tokens))}\r\n")
        if drop and (length is not None or coding or connection is not None):
            lines = _without(lines, headers, drop)
        wire = _wire(lines)
        self._expect = False
        self._resp_close = close
        self._resp_framing = framing
        self._resp_left = left
        self._resp = _SENDING
        if switch:
            self._switch()
        return wire

    def _switch(self) -> None:
        self._upgraded = True
        self._resp = _SENT
        if self._raw:
            self._pending.append(Upgraded(bytes(self._raw)))
            self._raw = bytearray()
        if self._raw_eof:
            self._closed = True
            self._pending.append(_CLOSED)

    def send_body(self, data: bytes) -> bytes:
        """A piece of the response body (raw bytes once upgraded)."""
        if self._upgraded:
            return data
        if self._resp != _SENDING:
            raise LocalProtocolError("no response body is being sent")
        if not data:
            return b""
        framing = self._resp_framing
        if framing == _CHUNKED:
            return _chunk(data)
        if framing == _LENGTH:
            left = self._resp_left - len(data)
            if left < 0:
                raise LocalProtocolError("more body than the response allows")
            self._resp_left = left
        return data

    def send_end(self, trailers: Sequence[tuple[str, str]] = ()) -> bytes:
        """The end of the response body. Trailers only go out on a chunked body; on any
        other they are dropped."""
        if self._upgraded:
            return b""
        if self._resp != _SENDING:
            raise LocalProtocolError("no response body is being sent")
        framing = self._resp_framing
        if framing == _LENGTH and self._resp_left:
            raise LocalProtocolError(f"{self._resp_left} bytes of the body are missing")
        self._resp = _SENT
        if framing == _CHUNKED:
            return _wire(_trailer_lines(trailers)) if trailers else b"0\r\n\r\n"
        return b""

    def send_error(
        self, status: int, body: str, flag: str, extra: Sequence[tuple[str, str]] = ()
    ) -> bytes:
        """A complete response made here: ``status``, a short ``text/plain`` body, the
        ``x-nodeagent-response-flag: <flag>`` header and ``extra`` headers (lowercase
        names, e.g. ``retry-after``); ``Connection: close`` is added after
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
            *extra,
        ]
        if self._failed or (self._cur is not None and not self._request_done):
            # The request body was not (or could not be) read: this connection is done.
            headers.append(("connection", "close"))
            self._failed = True
        try:
            wire = self.send_response_head(status, headers)
            if self._cur is None or self._cur.method != "HEAD":
                wire += self.send_body(payload)
            return wire + self.send_end()
        except LocalProtocolError:
            self._failed = True
            return b""


# -- upstream -----------------------------------------------------------------------------

# Why a callback stopped the response parser.
_STOP_NONE: Final = 0  # it did not: llhttp found an error
_STOP_FAILED: Final = 1  # a ProtocolError is already queued
_STOP_HEAD: Final = 2  # the final head of a HEAD response: the response is complete
_STOP_TUNNEL: Final = 3  # a 2xx to CONNECT: what follows the head is tunnel data
_STOP_EXTRA: Final = 4  # bytes after a complete response


class UpstreamHttp1:
    """The proxy's client side of one connection to an application (one request at a
    time; ``reusable`` after ``ResponseEnd`` says whether another may follow).

    Script: ``send_request_head`` + ``send_body``* + ``send_end``; ``receive_data`` ->
    ``Informational``*, ``ResponseHead``, ``BodyChunk``*, ``ResponseEnd``; then
    ``start_next_request`` if ``reusable``.

    Bytes the application sends after a complete response (before the next request) make
    the connection not ``reusable``; no event is made of them.
    """

    __slots__ = (
        "_chunk_new",
        "_chunk_open",
        "_closed",
        "_failed",
        "_feed_len",
        "_fields",
        "_head_new",
        "_head_seen",
        "_headbuf",
        "_interim",
        "_interims",
        "_method",
        "_parser",
        "_parser_ok",
        "_phase",
        "_proposed_upgrade",
        "_reason",
        "_req",
        "_req_close",
        "_req_framing",
        "_req_left",
        "_resp_keep_alive",
        "_reuse_ok",
        "_sink",
        "_stop",
        "_tail_seen",
        "_until_eof",
        "_upgraded",
        "max_header_size",
    )

    def __init__(self, *, max_header_size: int = DEFAULT_MAX_HEADER_SIZE) -> None:
        self.max_header_size = max_header_size
        self._parser = self._new_parser()
        self._parser_ok = True  # may parse the next response
        self._phase = _IDLE
        self._sink: list[UpstreamEvent] = []
        self._fields: list[tuple[str, str]] = []
        self._reason = b""
        self._head_seen = 0
        self._head_new = False
        self._feed_len = 0
        self._chunk_open = False  # a chunk-size line was read, no data yet (trailers?)
        self._chunk_new = False  # ... in the current read
        self._tail_seen = 0  # bytes charged to the chunk-size line and what follows
        self._interim = False
        self._until_eof = False
        self._stop = _STOP_NONE
        self._headbuf: bytearray | None = None  # response bytes, kept for HEAD and CONNECT
        self._interims = 0  # 1xx heads in _headbuf
        self._req = _NOTHING
        self._req_framing = _LENGTH
        self._req_left = 0
        self._method = ""
        self._req_close = False
        self._proposed_upgrade = False
        self._resp_keep_alive = False
        self._reuse_ok = True
        self._failed = False
        self._upgraded = False
        self._closed = False

    def _new_parser(self) -> httptools.HttpResponseParser:
        callbacks = SimpleNamespace(
            on_message_begin=self._on_message_begin,
            on_status=self._on_status,
            on_header=self._on_header,
            on_headers_complete=self._on_headers_complete,
            on_body=self._on_body,
            on_message_complete=self._on_message_complete,
            on_chunk_header=self._on_chunk_header,
            on_chunk_complete=self._on_chunk_complete,
        )
        return httptools.HttpResponseParser(callbacks)

    @property
    def upgraded(self) -> bool:
        return self._upgraded

    @property
    def reusable(self) -> bool:
        """The exchange is complete and both sides allow another request here."""
        return (
            self._req == _SENT
            and self._phase == _DONE
            and self._reuse_ok
            and self._resp_keep_alive
            and not (self._req_close or self._failed or self._upgraded or self._closed)
        )

    def start_next_request(self) -> None:
        """Reset for the next request (only when ``reusable``)."""
        if not self.reusable:
            raise LocalProtocolError("the connection is not reusable")
        self._req = _NOTHING
        self._phase = _IDLE
        self._method = ""
        self._proposed_upgrade = False
        self._headbuf = None
        if not self._parser_ok:
            self._parser = self._new_parser()
            self._parser_ok = True

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
        if self._req != _NOTHING or self._failed or self._closed or self._upgraded:
            raise LocalProtocolError("a request was already sent on this connection")
        names = _NAMES
        if method not in names:
            _checked_name(method)
        if _TARGET.fullmatch(target) is None:
            raise LocalProtocolError(f"invalid request target {target!r}")
        lines = [f"{method} {target} HTTP/1.1\r\n"]
        host = upgrade = False
        length: str | None = None
        coding: str | None = None
        connection: str | None = None
        for name, value in headers:
            low = names.get(name) or _checked_name(name)
            if low in _REQUEST_OUT_FIELDS:
                if low == "host":
                    host = True
                elif low == "content-length":
                    length = _checked_length(length, value)
                elif low == "transfer-encoding":
                    coding = value if coding is None else f"{coding},{value}"
                elif low == "connection":
                    connection = value if connection is None else f"{connection},{value}"
                else:
                    upgrade = True
            lines.append(f"{name}: {value}\r\n")
        if not host:
            raise LocalProtocolError("a request needs a Host header")
        if coding is not None:
            if _split(coding) != ["chunked"] or length is not None:
                raise LocalProtocolError(f"unsupported framing {coding!r} / {length!r}")
            framing, left = _CHUNKED, 0
        elif length is not None:
            framing, left = _LENGTH, int(length)
        elif body:
            lines.append("transfer-encoding: chunked\r\n")
            framing, left = _CHUNKED, 0
        else:
            framing, left = _LENGTH, 0
        wire = _wire(lines)
        self._req = _SENDING
        self._req_framing = framing
        self._req_left = left
        self._method = method
        self._req_close = connection is not None and "close" in _split(connection)
        self._proposed_upgrade = upgrade
        if method == "HEAD" or method == "CONNECT":
            self._headbuf = bytearray()
            self._interims = 0
        return wire

    def send_body(self, data: bytes) -> bytes:
        if self._upgraded:
            return data
        if self._req != _SENDING:
            raise LocalProtocolError("no request body is being sent")
        if not data:
            return b""
        if self._req_framing == _CHUNKED:
            return _chunk(data)
        left = self._req_left - len(data)
        if left < 0:
            raise LocalProtocolError("more body than the request allows")
        self._req_left = left
        return data

    def send_end(self, trailers: Sequence[tuple[str, str]] = ()) -> bytes:
        """The end of the request body. Trailers only go out on a chunked body; on any
        other they are dropped."""
        if self._upgraded:
            return b""
        if self._req != _SENDING:
            raise LocalProtocolError("no request body is being sent")
        if self._req_framing == _LENGTH and self._req_left:
            raise LocalProtocolError(f"{self._req_left} bytes of the body are missing")
        self._req = _SENT
        if self._req_framing == _CHUNKED:
            return _wire(_trailer_lines(trailers)) if trailers else b"0\r\n\r\n"
        return b""

    # -- input -----------------------------------------------------------------------
    def receive_data(self, data: bytes) -> list[UpstreamEvent]:
        """Feed bytes from the application (``b""`` = EOF)."""
        if self._failed or self._closed:
            return []
        if self._upgraded:
            if data:
                return [Upgraded(data)]
            self._closed = True
            return [_CLOSED]
        if not data:
            return self._eof()
        if self._phase == _DONE:  # nothing was asked: the connection is out of step
            self._reuse_ok = False
            return []
        if self._req == _NOTHING:
            self._failed = True
            return [ProtocolError(502, "upstream: data before any request")]
        events: list[UpstreamEvent] = []
        self._sink = events
        self._feed(data)
        return events

    def _eof(self) -> list[UpstreamEvent]:
        self._closed = True
        phase = self._phase
        if phase == _DONE or self._req == _NOTHING:
            return [_CLOSED]
        if phase == _BODY and self._until_eof:
            self._phase = _DONE
            return [_RESPONSE_END, _CLOSED]
        self._failed = True
        return [ProtocolError(502, "upstream: connection closed before the response ended")]

    def _feed(self, data: bytes) -> None:
        if self._headbuf is not None:
            self._headbuf += data
        self._head_new = self._chunk_new = False
        self._feed_len = n = len(data)
        interims = self._interims
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade as e:  # after a 101
            offset: int = e.args[0]
            self._parser_ok = False
            self._upgraded = True
            if rest := data[offset:]:
                self._sink.append(Upgraded(rest))
            return
        except httptools.HttpParserError as e:
            self._parser_ok = False
            stop, self._stop = self._stop, _STOP_NONE
            if stop == _STOP_NONE:
                _reraise_bug(e)
                self._fail(f"upstream: {e}")
            elif stop == _STOP_HEAD:
                if self._after_head():
                    self._reuse_ok = False
            elif stop == _STOP_TUNNEL:
                self._upgraded = True
                if rest := self._after_head():
                    self._sink.append(Upgraded(rest))
            return
        phase = self._phase
        if phase == _HEAD:
            if not self._head_new:
                self._head_seen += n
            elif self._interims == interims:
                self._head_seen = n
            else:  # began behind a 1xx head: its share of this read is unknown
                self._head_seen = 0
            if self._head_seen > self.max_header_size:
                self._fail(f"upstream: response head exceeds {self.max_header_size} bytes")
                self._parser_ok = False
        elif self._chunk_open and self._over_tail(n):
            self._fail(f"upstream: response trailers exceed {self.max_header_size} bytes")
            self._parser_ok = False
        elif phase == _IDLE and self._headbuf is not None:
            self._headbuf.clear()  # only whole 1xx heads so far
            self._interims = 0

    def _after_head(self) -> bytes:
        """The bytes behind the final head (llhttp does not say where it stopped): skip
        the 1xx heads and the final head in the bytes kept since the request."""
        buf = self._headbuf or bytearray()
        self._headbuf = None
        pos = 0
        for _ in range(self._interims + 1):
            while pos < len(buf) and buf[pos] in b"\r\n":
                pos += 1
            end = buf.find(b"\r\n\r\n", pos)
            if end < 0:  # cannot happen after a head llhttp accepted
                return b""
            pos = end + 4
        return bytes(buf[pos:])

    def _fail(self, reason: str) -> None:
        self._sink.append(ProtocolError(502, _clean_reason(reason)))
        self._failed = True
        self._stop = _STOP_FAILED

    # -- llhttp callbacks --------------------------------------------------------------
    def _on_message_begin(self) -> None:
        if self._phase == _DONE:
            self._reuse_ok = False
            self._stop = _STOP_EXTRA
            raise _Stop
        self._phase = _HEAD
        self._head_new = True
        self._reason = b""
        self._fields = []

    def _on_status(self, status: bytes) -> None:
        self._reason += status

    def _on_header(self, name: bytes, value: bytes) -> None:
        self._fields.append(
            (_FIELD_NAMES.get(name) or _field_name(name), value.rstrip(b" \t").decode("latin-1"))
        )

    def _on_headers_complete(self) -> None:
        self._phase = _BODY
        headers = tuple(self._fields)
        self._fields = []  # trailers, if any, go here
        parser = self._parser
        status = parser.get_status_code()
        reason = self._reason.decode("latin-1")
        limit = self.max_header_size
        seen = self._feed_len if self._head_new else self._head_seen + self._feed_len
        if seen > limit and _head_size(len(reason) + 15, headers) > limit:
            self._fail(f"upstream: response head exceeds {limit} bytes")
            raise _Stop
        version = parser.get_http_version()
        if version != "1.1" and version != "1.0":
            self._fail(f"upstream: HTTP/{version} is not supported")
            raise _Stop
        if status < 100:  # llhttp takes any three digits
            self._fail(f"upstream: invalid status {status:03d}")
            raise _Stop
        if reason and _CONTROL.search(reason):  # llhttp lets them through
            self._fail("upstream: control character in the reason phrase")
            raise _Stop
        if status < 200:
            self._interim = True
            if status != 101:
                self._sink.append(Informational(status, headers))
                return
            if not (self._proposed_upgrade and parser.should_upgrade()):
                self._fail("upstream: 101 without an upgrade to switch to")
                raise _Stop
        connection = length = coding = None
        for k, v in headers:
            if k in _RESPONSE_FIELDS:
                if k == "content-length":
                    length = v
                elif k == "transfer-encoding":
                    coding = v if coding is None else f"{coding},{v}"
                else:
                    connection = v if connection is None else f"{connection},{v}"
        if coding is not None and _split(coding) != ["chunked"]:
            # llhttp would read such a body until close, but the coding is hop-by-hop:
            # relayed without it, the body would reach the client still encoded.
            self._fail(f"upstream: Transfer-Encoding {coding!r} is not supported")
            raise _Stop
        keep_alive = version == "1.1" and (
            connection is None or not _has_token(connection, "close")
        )
        self._sink.append(ResponseHead(status, headers, reason, version, keep_alive))
        if status < 200:  # 101: llhttp stops after this head (HttpParserUpgrade)
            return
        self._resp_keep_alive = keep_alive
        method = self._method
        if method == "HEAD":
            self._sink.append(_RESPONSE_END)
            self._phase = _DONE
            self._stop = _STOP_HEAD
            raise _Stop
        if method == "CONNECT" and status < 300:
            self._stop = _STOP_TUNNEL
            raise _Stop
        self._headbuf = None
        self._until_eof = status != 204 and status != 304 and length is None and coding is None

    def _on_body(self, body: bytes) -> None:
        self._chunk_open = False
        self._sink.append(BodyChunk(body))

    def _on_chunk_header(self) -> None:
        self._chunk_open = self._chunk_new = True
        self._tail_seen = 0

    def _on_chunk_complete(self) -> None:
        self._chunk_open = False

    def _over_tail(self, n: int) -> bool:
        """Charge a read to what follows a chunk-size line while no data came: the
        trailers after the last chunk, which llhttp (via httptools) buffers field by
        field, so they are bounded like a head. A read in which the line ended is not
        charged (its share is unknown)."""
        if not self._chunk_new:
            self._tail_seen += n
        return self._tail_seen > self.max_header_size

    def _on_message_complete(self) -> None:
        if self._interim:
            self._interim = False
            self._phase = _IDLE
            self._interims += 1
            return
        fields = self._fields
        self._sink.append(ResponseEnd(tuple(fields)) if fields else _RESPONSE_END)
        self._phase = _DONE
