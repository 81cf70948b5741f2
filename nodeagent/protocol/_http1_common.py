"""The vocabulary of the HTTP/1.1 layer (``nodeagent.protocol.http1``), shared by both
machines and their callers: the events, the two kinds of protocol error, the header
constants and the pure header rules (``forwardable_headers``, token lists).

Rule: no I/O here, and no state: every name is a constant, an immutable event or a pure
function. The machines (``_http1_down``, ``_http1_up``) build on it; it imports none of them.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final

Headers = tuple[tuple[str, str], ...]
"""Header fields in arrival order, names lower-case, values as sent (latin-1 decoded)."""

DEFAULT_MAX_HEADER_SIZE = 60 * 1024
"""The largest request head (request line plus header fields) accepted: beyond it, 431
(Envoy's ``max_request_headers_kb`` default)."""
DEFAULT_MAX_HEADERS = 100
"""The most header fields (or trailer fields) a request may carry: beyond, 431 (Envoy's
``max_headers_count``)."""

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
# ResponseHead, BodyChunk) are plain classes with their own ``__init__``: compiled, a
# dataclass's generated ``__init__`` stays interpreted (about 1-3k instructions a call, on
# every request); ``__eq__`` and ``__repr__`` are written out as a dataclass's would be.


class RawHead:
    """A head as the peer sent it, for a proxy to forward unchanged.

    Made only by the machines (``RequestHead.raw``, ``ResponseHead.raw``) for an HTTP/1.1
    head that came whole in one read, framed by ``Content-Length`` or without a body, with
    none of the fields a proxy drops (hop-by-hop ones, ``Expect``), so
    ``forwardable_headers`` would keep every field; a request's also has one ``Host``.
    llhttp checked it (names are tokens; no CR, LF, NUL or other control byte in a value;
    CRLF line ends) and its start line is the one the machines would write for it, so it
    can go out as it came in, without a field rebuilt or checked again.
    """

    __slots__ = ("length", "line", "target", "wire")

    def __init__(self, wire: bytes, line: int, length: int, target: str) -> None:
        self.wire = wire
        """The start line and the field lines, each ending in CRLF, without the blank line
        that ends the head."""
        self.line = line
        """The start line's size, CRLF included."""
        self.length = length
        """Its ``Content-Length`` (0 without one: no body)."""
        self.target = target
        """A request's target, as in its start line (``""`` for a response)."""


class RequestHead:
    """Downstream: a request line and its header fields arrived."""

    __slots__ = (
        "expect_continue",
        "has_body",
        "headers",
        "http_version",
        "keep_alive",
        "method",
        "raw",
        "target",
        "upgrade",
    )

    def __init__(
        self,
        method: str,
        target: str,
        headers: Headers,
        http_version: str,
        keep_alive: bool,
        expect_continue: bool,
        upgrade: str | None,
        has_body: bool,
        raw: RawHead | None = None,
    ) -> None:
        self.method = method
        self.target = target
        self.headers = headers
        self.http_version = http_version
        """``"1.1"`` or ``"1.0"``."""
        self.keep_alive = keep_alive
        """The client allows another request on this connection after this one."""
        self.expect_continue = expect_continue
        """The client waits for ``send_continue`` (or a final response) before its body."""
        self.upgrade = upgrade
        """The ``Upgrade`` header (e.g. ``"websocket"``) when the client asks to switch."""
        self.has_body = has_body
        self.raw = raw
        """The head as sent, when it may be forwarded unchanged (not compared: the same
        head may come with or without it)."""

    def _key(self) -> tuple[object, ...]:
        return (
            self.method,
            self.target,
            self.headers,
            self.http_version,
            self.keep_alive,
            self.expect_continue,
            self.upgrade,
            self.has_body,
        )

    def __eq__(self, other: object) -> bool:
        return isinstance(other, RequestHead) and self._key() == other._key()

    def __repr__(self) -> str:
        return (
            f"RequestHead(method={self.method!r}, target={self.target!r}, "
            f"headers={self.headers!r}, http_version={self.http_version!r}, "
            f"keep_alive={self.keep_alive!r}, expect_continue={self.expect_continue!r}, "
            f"upgrade={self.upgrade!r}, has_body={self.has_body!r})"
        )


class ResponseHead:
    """Upstream: a final response head arrived (or a ``101``, after which ``Upgraded``
    events carry the raw bytes)."""

    __slots__ = ("headers", "http_version", "keep_alive", "raw", "reason", "status")

    def __init__(
        self,
        status: int,
        headers: Headers,
        reason: str,
        http_version: str,
        keep_alive: bool,
        raw: RawHead | None = None,
    ) -> None:
        self.status = status
        self.headers = headers
        self.reason = reason
        self.http_version = http_version
        self.keep_alive = keep_alive
        """The server allows another request on this connection."""
        self.raw = raw
        """The head as sent, when it may be forwarded unchanged (not compared)."""

    def _key(self) -> tuple[object, ...]:
        return (self.status, self.headers, self.reason, self.http_version, self.keep_alive)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ResponseHead) and self._key() == other._key()

    def __repr__(self) -> str:
        return (
            f"ResponseHead(status={self.status!r}, headers={self.headers!r}, "
            f"reason={self.reason!r}, http_version={self.http_version!r}, "
            f"keep_alive={self.keep_alive!r})"
        )


@dataclass(frozen=True, slots=True)
class Informational:
    """Upstream: an interim ``1xx`` response other than ``101`` (``100 Continue``, ``103``)."""

    status: int
    headers: Headers


class BodyChunk:
    """A piece of a message body, as it arrived (chunked framing already removed)."""

    __slots__ = ("data",)

    def __init__(self, data: bytes) -> None:
        self.data = data

    def __eq__(self, other: object) -> bool:
        return isinstance(other, BodyChunk) and self.data == other.data

    def __repr__(self) -> str:
        return f"BodyChunk(data={self.data!r})"


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
REQUEST_END: Final = RequestEnd()
RESPONSE_END: Final = ResponseEnd()
CLOSED: Final = ConnectionClosed()
CLOSED_CUT: Final = ConnectionClosed(clean=False)

NAMES_MAX: Final = 4096
"""The bound of each memo of header names (incoming and outgoing): names repeat on every
message, but a peer must not grow a memo without end."""

RESPONSE_FIELDS: Final = frozenset({"connection", "content-length", "transfer-encoding"})
"""The fields of a response head that frame it (read upstream, checked when written)."""


# -- header rules -------------------------------------------------------------------------


def split_tokens(value: str) -> list[str]:
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
                for token in split_tokens(item[1]):
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


def has_token(value: str, token: str) -> bool:
    """``token`` (lower-case) is one of the comma-separated tokens of ``value``."""
    return token in value.lower() and token in split_tokens(value)


def clean_reason(reason: str) -> str:
    """A header-safe text: printable ASCII, one line, bounded."""
    return "".join(c if " " <= c <= "~" else " " for c in reason).strip()[:512]
