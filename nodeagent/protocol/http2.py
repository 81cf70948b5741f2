"""HTTP/2 for the proxy (h2c, gRPC included) as two sans-I/O machines on top of
python-hyper's ``h2``: one per side of a proxied exchange, streams multiplexed.

Rule: **no I/O here**. No asyncio, no sockets, no clocks, no logging side effects. Bytes
from a peer go in with ``receive_data`` and come out as events; the caller's commands
(``send_response_head``, ``send_data``, ...) queue frames that ``data_to_send`` hands back.
``receive_data(b"")`` means the peer closed the connection (EOF). The I/O layer
(``nodeagent.proxy``) owns sockets and routes each downstream stream to an upstream one.

- ``DownstreamHttp2`` is the proxy's server side, facing the client (cleartext HTTP/2 with
  prior knowledge: the client starts with ``H2C_PREFACE``). It yields ``StreamRequest`` /
  ``StreamData`` / ``StreamTrailers`` per stream and answers malformed requests itself:
  a request with a bad header block gets ``400`` (``431`` when its header list exceeds
  ``max_header_list_size``) and only that stream is reset (``StreamRejected``); other
  streams are unaffected.
- ``UpstreamHttp2`` is the proxy's client side, one multiplexed connection to an endpoint:
  ``send_request`` opens a stream; it yields ``StreamInformational`` (1xx, reported
  separately: forward or drop them) / ``StreamResponse`` / ``StreamData`` /
  ``StreamTrailers``; ``can_open_stream`` and ``max_concurrent_streams`` serve the pool; a
  stream the server never processed ends with ``StreamReset(refused=True)`` (RST_STREAM
  REFUSED_STREAM, or above the last-stream-id of a GOAWAY): safe to retry.
- ``forwardable_h2_headers`` is the pure rule for copying header fields onto HTTP/2.

gRPC needs nothing special: ``te: trailers`` passes, trailers (``grpc-status``) and
"trailers-only" responses (``StreamResponse(end_stream=True)``) cross as they are, and each
stream's two directions are independent (bidirectional streaming).

Flow control (the same on both machines)
----------------------------------------
*Receiving.* A stream's window is returned to the peer only for bytes the caller
acknowledges with ``ack_data(stream_id, n)``; the proxy acknowledges bytes when it has
forwarded them, so a slow reader on one side stops the sender on the other after one
stream window (``Http2Settings.stream_window``). The *connection* window is returned as
soon as bytes arrive (they are bounded by the stream windows), so one stalled stream never
stalls the others.

*Sending.* ``send_data`` accepts everything: it frames what the peer's windows allow now
and queues the rest on the stream; queued bytes are framed as WINDOW_UPDATEs arrive
(round-robin over streams when the connection window is the limit). The return value of
``send_data`` is the number of bytes framed at once, and ``DataSent(stream_id, size)``
events (from ``receive_data``) report the queued bytes framed later. The I/O layer acks
the source stream by exactly these amounts (``other.ack_data(source, n)``), which closes
the loop: a stream's queue here never holds more than the window of the stream feeding it,
so no separate buffer bound or high-water mark is needed. (``buffered(stream_id)`` reports
it.) When the socket itself is backed up, the I/O layer defers those acks until it drains.

Header handling and cost
------------------------
``h2``'s own header validation is off in both directions: inbound blocks are checked here
in one pass that also builds the event's fields (so a malformed block is a *stream* error,
answered per stream, as RFC 9113 §8.1.1 wants, instead of ``h2``'s connection error), and
outbound blocks are built by this module (names lower-cased, ``authorization`` and short
``cookie`` values never indexed; dropping connection-specific fields is the job of
``forwardable_h2_headers``). Multiple ``cookie`` fields are joined (RFC 9113 §8.2.3).
Outgoing DATA frames are built here, not by ``h2`` (whose per-frame cost is several times
that); incoming frames all go through ``h2``. Events are plain slotted dataclasses.

Coupling to ``h2`` beyond its public API, in ``_H2``, ``send_data`` and ``_flush`` (pin
``h2<5``): a received GOAWAY does not close the connection (python-hyper/h2#1181); the
HPACK block is decoded before ``h2`` sees it (a stand-in decoder returns the result), so
oversized header lists can be refused per stream with the HPACK state intact; stream-level
errors ``h2`` raises as connection errors (a bad ``content-length``, a body not matching
it, trailers without END_STREAM) become stream resets; outgoing DATA frames are charged to
``h2``'s public ``outbound_flow_control_window`` attributes. A client opening more streams
than ``max_concurrent_streams`` still fails the connection, as in ``h2``.
"""

from __future__ import annotations

import contextlib
import re
import struct
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, cast

import h2.events as h2e
import h2.exceptions as h2x
from h2.config import H2Configuration
from h2.connection import ConnectionState, H2Connection
from h2.errors import ErrorCodes
from h2.settings import SettingCodes, Settings
from hpack import HeaderTuple, NeverIndexedHeaderTuple
from hpack.exceptions import HPACKError, OversizedHeaderListError
from hpack.hpack import Decoder
from hyperframe.frame import GoAwayFrame

from nodeagent.protocol.http1 import RESPONSE_FLAG_HEADER, Headers

if TYPE_CHECKING:
    from h2.stream import H2Stream
    from hyperframe.frame import DataFrame, Frame, HeadersFrame

__all__ = [
    "H2C_PREFACE",
    "RESPONSE_FLAG_HEADER",
    "ConnectionEnded",
    "DataSent",
    "DownstreamEvent",
    "DownstreamHttp2",
    "ErrorCodes",
    "Headers",
    "Http2Settings",
    "ProtocolError",
    "StreamData",
    "StreamInformational",
    "StreamRejected",
    "StreamRequest",
    "StreamReset",
    "StreamResponse",
    "StreamTrailers",
    "UpstreamEvent",
    "UpstreamHttp2",
    "forwardable_h2_headers",
]

H2C_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
"""The first bytes of a cleartext HTTP/2 connection with prior knowledge (for sniffing)."""

KiB = 1024
MiB = 1024 * KiB

_MAX_WINDOW = 2**31 - 1
_MAX_STREAM_ID = 2**31 - 1
_DEFAULT_WINDOW = 65535
_ASSUMED_PEER_STREAMS = 100
"""Streams opened towards a peer before its SETTINGS arrive (RFC 9113 §6.5.2 advises
peers not to go below 100)."""


@dataclass(frozen=True, slots=True)
class Http2Settings:
    """The HTTP/2 parameters one side announces (and enforces) on a connection."""

    stream_window: int = 1 * MiB
    """SETTINGS_INITIAL_WINDOW_SIZE: bytes a peer may send on one stream before the
    caller acknowledges them; also the most a stream can make the other side queue."""
    connection_window: int = 16 * MiB
    """Connection-level receive window (raised from 64 KiB by a WINDOW_UPDATE)."""
    max_frame_size: int = 16 * KiB
    """SETTINGS_MAX_FRAME_SIZE: the largest frame the peer may send us."""
    max_concurrent_streams: int = 100
    """SETTINGS_MAX_CONCURRENT_STREAMS: streams the client may open (downstream)."""
    max_header_list_size: int = 64 * KiB
    """SETTINGS_MAX_HEADER_LIST_SIZE (RFC 9113 §6.5.2 size: name + value + 32 per field).
    A larger request head is answered ``431``; a larger response head resets its stream.
    Beyond four times this, decoding stops and the connection fails (HPACK bomb)."""

    def __post_init__(self) -> None:
        if not 1 <= self.stream_window <= _MAX_WINDOW:
            raise ValueError(f"stream_window {self.stream_window} is not in 1..2^31-1")
        if not _DEFAULT_WINDOW <= self.connection_window <= _MAX_WINDOW:
            raise ValueError(f"connection_window {self.connection_window} is not in 65535..2^31-1")
        if not 16384 <= self.max_frame_size <= 2**24 - 1:
            raise ValueError(f"max_frame_size {self.max_frame_size} is not in 16384..2^24-1")
        if self.max_concurrent_streams < 1:
            raise ValueError("max_concurrent_streams must be at least 1")
        if self.max_header_list_size < 1024:
            raise ValueError("max_header_list_size must be at least 1024")


# -- events -------------------------------------------------------------------------------
# Plain (not frozen) slotted dataclasses: one is made per frame on the data path, and a
# frozen one costs three times as much to build. Treat them as values all the same.


@dataclass(slots=True)
class StreamRequest:
    """Downstream: a well-formed request head opened stream ``stream_id``."""

    stream_id: int
    method: str
    scheme: str
    """``""`` for ``CONNECT``."""
    authority: str
    """``:authority``, or the ``host`` header when the client sent no ``:authority``."""
    path: str
    """``""`` for ``CONNECT``."""
    headers: Headers
    """Regular fields in arrival order (pseudo-headers excluded), names lower-case."""
    end_stream: bool
    """No body follows (the request is complete)."""


@dataclass(slots=True)
class StreamResponse:
    """Upstream: the final response head of stream ``stream_id``."""

    stream_id: int
    status: int
    headers: Headers
    end_stream: bool
    """No body follows. With gRPC this is a "trailers-only" response: ``grpc-status`` is in
    ``headers``; forward it with ``send_response_head(..., end_stream=True)``."""


@dataclass(slots=True)
class StreamInformational:
    """Upstream: an interim ``1xx`` response (``100 Continue``, ``103 Early Hints``)."""

    stream_id: int
    status: int
    headers: Headers


@dataclass(slots=True)
class StreamData:
    """A piece of a body as it arrived. Call ``ack_data(stream_id, len(data))`` once it
    has been forwarded. ``end_stream``: the peer's side of the stream is complete
    (``data`` may then be empty)."""

    stream_id: int
    data: bytes
    end_stream: bool


@dataclass(slots=True)
class StreamTrailers:
    """Trailer fields; they end the peer's side of the stream."""

    stream_id: int
    headers: Headers


@dataclass(slots=True)
class StreamReset:
    """The stream is over before its exchange completed; forget it (and reset the stream
    it was routed to). The last event for ``stream_id``.

    ``reason`` is ``""`` when the peer sent RST_STREAM; otherwise this side reset the
    stream because the peer's message on it was malformed (``PROTOCOL_ERROR``), or the
    peer's GOAWAY said it was never processed (``REFUSED_STREAM``). After a complete
    response, ``NO_ERROR`` from the server only means "stop sending the request body".
    """

    stream_id: int
    error_code: int
    reason: str = ""

    @property
    def refused(self) -> bool:
        """The peer did not process the stream at all (REFUSED_STREAM): safe to retry,
        even a non-idempotent request, on another connection."""
        return self.error_code == ErrorCodes.REFUSED_STREAM


@dataclass(slots=True)
class StreamRejected:
    """Downstream: a malformed request was answered here (``status`` 400 or 431, with the
    ``x-nodeagent-response-flag: DPE`` header) and its stream reset; it was never
    reported as a ``StreamRequest``. For the access log."""

    stream_id: int
    status: int
    reason: str


@dataclass(slots=True)
class DataSent:
    """``size`` more bytes that ``send_data`` had queued on ``stream_id`` were framed (a
    window opened). Acknowledge as many on the stream they came from."""

    stream_id: int
    size: int


@dataclass(slots=True)
class ConnectionEnded:
    """The peer is done with the connection: it sent GOAWAY, or closed it (EOF).

    GOAWAY: ``last_stream_id`` is the highest stream it may still process; streams of
    ours above it were reported as ``StreamReset(refused=True)`` already, the others may
    finish. Open no new streams here. EOF: ``last_stream_id`` and ``error_code`` are
    ``None`` and every stream still open is lost.
    """

    last_stream_id: int | None
    error_code: int | None
    reason: str


@dataclass(slots=True)
class ProtocolError:
    """The peer broke HTTP/2 at the connection level. A GOAWAY is queued: write
    ``data_to_send()`` and close. Every open stream is lost; no further events."""

    reason: str


DownstreamEvent = (
    StreamRequest
    | StreamData
    | StreamTrailers
    | StreamReset
    | StreamRejected
    | DataSent
    | ConnectionEnded
    | ProtocolError
)
UpstreamEvent = (
    StreamResponse
    | StreamInformational
    | StreamData
    | StreamTrailers
    | StreamReset
    | DataSent
    | ConnectionEnded
    | ProtocolError
)
_Event = DownstreamEvent | UpstreamEvent


# -- headers ------------------------------------------------------------------------------

_CONNECTION_SPECIFIC = frozenset(
    {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "upgrade"}
)
"""Fields HTTP/2 forbids (RFC 9113 §8.2.2); ``te`` is allowed only as ``trailers``."""

_NOT_FORWARDED = _CONNECTION_SPECIFIC | {"http2-settings"}
_SPECIAL_OUT = _NOT_FORWARDED | {"te"}


def forwardable_h2_headers(headers: Iterable[tuple[str, str]]) -> Headers:
    """The header fields of a head to copy onto HTTP/2 (either direction).

    Removed: ``connection``, ``keep-alive``, ``proxy-connection``, ``transfer-encoding``,
    ``upgrade``, ``http2-settings``, every field the ``connection`` header names, and
    ``te`` unless it lists ``trailers`` (then exactly ``te: trailers`` is kept, as gRPC
    needs). Names come out lower-case; everything else is kept in order. Pure; a tuple
    with nothing to change (any head from ``DownstreamHttp2``) is returned as it is.
    """
    items = headers if isinstance(headers, tuple) else tuple(headers)
    for k, v in items:
        n = k.lower()
        if n != k or (n in _SPECIAL_OUT and (n != "te" or v != "trailers")):
            break
    else:
        return items
    named = {t.strip().lower() for k, v in items if k.lower() == "connection" for t in v.split(",")}
    out: list[tuple[str, str]] = []
    for k, v in items:
        n = k.lower()
        if n in _NOT_FORWARDED or n in named:
            continue
        if n == "te":
            if "trailers" in {t.split(";")[0].strip().lower() for t in v.split(",")}:
                out.append(("te", "trailers"))
            continue
        out.append((n, v))
    return tuple(out)


class _Malformed(Exception):
    """A header block that makes its message malformed (RFC 9113 §8.1.1)."""

    def __init__(self, reason: str, status: int = 400) -> None:
        super().__init__(reason)
        self.reason = reason
        self.status = status


_BAD_NAME = re.compile(rb"[^\x21-\x39\x3b-\x40\x5b-\x7e]").search
"""RFC 9113 §8.2.1: no controls, space, upper case, ``:`` or non-ASCII in a field name."""
_BAD_VALUE = re.compile(rb"[\x00\n\r]").search
"""RFC 9113 §8.2.1: no NUL/CR/LF in a value (nor whitespace at either end: ``_EDGE``)."""
_EDGE = (0x20, 0x09)
_BAD_TOKEN = re.compile(rb"[^!#$%&'*+\-.^_`|~0-9A-Za-z]").search
_FIELD_OVERHEAD = 32

_F_CONNECTION, _F_TE, _F_COOKIE, _F_HOST = 1, 2, 3, 4
_SPECIAL_IN = {n.encode(): _F_CONNECTION for n in _CONNECTION_SPECIFIC} | {
    b"te": _F_TE,
    b"cookie": _F_COOKIE,
    b"host": _F_HOST,
}

_RawHeaders = Iterable[tuple[bytes, bytes]]


def _split(
    raw: _RawHeaders, limit: int
) -> tuple[list[tuple[bytes, bytes]], list[tuple[str, str]], bytes | None]:
    """One pass over a received header block: (pseudo-headers, regular fields decoded,
    the ``host`` value). Raises ``_Malformed`` (431 when only the size is wrong)."""
    pseudo: list[tuple[bytes, bytes]] = []
    regular: list[tuple[str, str]] = []
    size = 0
    host: bytes | None = None
    cookies = 0
    special = _SPECIAL_IN.get
    for name, value in raw:
        size += len(name) + len(value) + _FIELD_OVERHEAD
        if not name:
            raise _Malformed("empty header name")
        if value and (_BAD_VALUE(value) or value[0] in _EDGE or value[-1] in _EDGE):
            raise _Malformed(f"invalid value of {_show(name)}")
        if name[0] == 0x3A:  # ":"
            if regular:
                raise _Malformed(f"pseudo-header {_show(name)} after a regular field")
            pseudo.append((name, value))
            continue
        if _BAD_NAME(name):
            raise _Malformed(f"invalid header name {_show(name)}")
        kind = special(name)
        if kind is not None:
            if kind == _F_CONNECTION:
                raise _Malformed(f"connection-specific header {_show(name)}")
            if kind == _F_TE and value.lower() != b"trailers":
                raise _Malformed("te other than trailers")
            if kind == _F_COOKIE:
                cookies += 1
            elif kind == _F_HOST:
                if host is not None:
                    raise _Malformed("more than one host header")
                host = value
        regular.append((name.decode("latin-1"), value.decode("latin-1")))
    if size > limit:
        raise _Malformed(f"header list of {size} bytes exceeds {limit}", 431)
    if cookies > 1:  # RFC 9113 §8.2.3: one field again, where the first one was
        crumbs = [v for k, v in regular if k == "cookie"]
        first = next(i for i, (k, _) in enumerate(regular) if k == "cookie")
        regular = [f for f in regular if f[0] != "cookie"]
        regular.insert(first, ("cookie", "; ".join(crumbs)))
    return pseudo, regular, host


def _show(name: bytes) -> str:
    return repr(name.decode("latin-1")[:64])


def _parse_request(raw: _RawHeaders, limit: int) -> tuple[str, str, str, str, Headers]:
    pseudo, regular, host = _split(raw, limit)
    method = scheme = authority = path = None
    for name, value in pseudo:
        if name == b":method" and method is None:
            method = value
        elif name == b":path" and path is None:
            path = value
        elif name == b":scheme" and scheme is None:
            scheme = value
        elif name == b":authority" and authority is None:
            authority = value
        else:
            raise _Malformed(f"unexpected or repeated pseudo-header {_show(name)}")
    if not method or _BAD_TOKEN(method):
        raise _Malformed("missing or invalid :method")
    if authority is None:
        authority = host
    elif host is not None and host != authority:
        raise _Malformed(":authority and host differ")
    if method == b"CONNECT":
        if scheme is not None or path is not None or not authority:
            raise _Malformed("CONNECT needs :authority and no :scheme or :path")
        scheme = path = b""
    else:
        if not scheme or _BAD_TOKEN(scheme):
            raise _Malformed("missing or invalid :scheme")
        if not path or (path[0] != 0x2F and (path != b"*" or method != b"OPTIONS")):
            raise _Malformed("missing or invalid :path")
        if authority is None:
            raise _Malformed("no :authority and no host")
    if b"@" in authority:
        raise _Malformed(":authority with userinfo")
    return (
        method.decode("ascii"),
        scheme.decode("ascii"),
        authority.decode("latin-1"),
        path.decode("latin-1"),
        tuple(regular),
    )


def _parse_response(raw: _RawHeaders, limit: int) -> tuple[int, Headers]:
    pseudo, regular, _ = _split(raw, limit)
    if len(pseudo) != 1 or pseudo[0][0] != b":status":
        raise _Malformed("a response needs exactly one pseudo-header, :status")
    text = pseudo[0][1]
    if len(text) != 3 or not text.isdigit() or text == b"101" or text[0] == 0x30:
        raise _Malformed(f"invalid :status {text.decode('latin-1')[:16]!r}")
    return int(text), tuple(regular)


def _parse_trailers(raw: _RawHeaders, limit: int) -> Headers:
    pseudo, regular, _ = _split(raw, limit)
    if pseudo:
        raise _Malformed("pseudo-header in trailers")
    return tuple(regular)


_Field = tuple[bytes, bytes] | HeaderTuple
_SENSITIVE = frozenset({b"authorization", b"proxy-authorization"})
_STATUS = {s: str(s).encode() for s in range(100, 600)}


def _encode_fields(block: list[_Field], headers: Iterable[tuple[str, str]]) -> list[_Field]:
    """Append regular fields to an outgoing block: names lower-cased, latin-1 as received
    (h2's own normalization is off); credentials never enter the HPACK table."""
    for k, v in headers:
        name = k.lower().encode("latin-1")
        value = v.encode("latin-1")
        if name in _SENSITIVE or (name == b"cookie" and len(value) < 20):
            block.append(NeverIndexedHeaderTuple(name, value))
        else:
            block.append((name, value))
    return block


def _clean_text(text: str) -> str:
    """A header-safe text: printable ASCII, one line, bounded."""
    return "".join(c if " " <= c <= "~" else " " for c in text).strip()[:512]


# -- h2 -----------------------------------------------------------------------------------


class _StreamMalformed(h2e.Event):
    """Raised-as-event: ``h2`` found a stream-level error it would treat as fatal."""

    def __init__(self, stream_id: int, reason: str) -> None:
        self.stream_id = stream_id
        self.reason = reason


class _Decoded(Decoder):
    """Stands in for the HPACK decoder while ``h2`` handles a block decoded already."""

    def __init__(self) -> None:
        super().__init__()
        self.headers: Iterable[HeaderTuple] = ()

    def decode(self, data: bytes, raw: bool = False) -> Iterable[HeaderTuple]:
        return self.headers


class _H2(H2Connection):
    """``h2`` with per-stream errors where RFC 9113 has them (see the module docstring)."""

    def __init__(self, config: H2Configuration, hpack_limit: int) -> None:
        super().__init__(config=config)
        self._hpack_limit = hpack_limit
        self._decoded = _Decoded()

    def _receive_goaway_frame(self, frame: GoAwayFrame) -> tuple[list[Frame], list[h2e.Event]]:
        # RFC 9113 §6.8: streams up to last-stream-id may still complete (h2#1181).
        event = h2e.ConnectionTerminated()
        event.error_code = frame.error_code
        event.last_stream_id = frame.last_stream_id
        event.additional_data = frame.additional_data or None
        return [], [event]

    def _receive_headers_frame(self, frame: HeadersFrame) -> tuple[list[Frame], list[h2e.Event]]:
        decoder = self.decoder
        # h2 lowers this to our advertised limit when the SETTINGS are acknowledged; the
        # advertised limit is enforced per stream instead, after a complete decode.
        decoder.max_header_list_size = self._hpack_limit
        try:
            headers = decoder.decode(frame.data, raw=True)
        except OversizedHeaderListError as e:
            raise h2x.DenialOfServiceError(f"Oversized header block: {e}") from e
        except (HPACKError, IndexError, TypeError, UnicodeDecodeError) as e:
            raise h2x.ProtocolError(f"Error decoding header block: {e}") from e
        stand_in = self._decoded
        stand_in.headers = headers
        self.decoder = stand_in
        try:
            return super()._receive_headers_frame(frame)
        except (h2x.StreamClosedError, h2x.StreamIDTooLowError, h2x.TooManyStreamsError):
            raise
        except h2x.ProtocolError as e:
            if frame.stream_id not in self.streams:
                raise
            return [], [_StreamMalformed(frame.stream_id, str(e))]
        finally:
            self.decoder = decoder
            stand_in.headers = ()

    def _receive_data_frame(self, frame: DataFrame) -> tuple[list[Frame], list[h2e.Event]]:
        try:
            return super()._receive_data_frame(frame)
        except h2x.InvalidBodyLengthError as e:  # RFC 9113 §8.1.1: a stream error
            return [], [_StreamMalformed(frame.stream_id, str(e))]


# Frame layout (RFC 9113 §4.1): 24-bit length, type, flags, 31-bit stream id.
_FRAME_HEADER = struct.Struct(">BHBBL")


class _Stream:
    __slots__ = (
        "end_sent",
        "end_wanted",
        "h2",
        "head_request",
        "head_sent",
        "id",
        "pending",
        "pending_len",
        "remote_ended",
        "reset_code",
        "surfaced",
        "trailers",
        "unacked",
    )

    def __init__(self, stream_id: int, h2_stream: H2Stream) -> None:
        self.id = stream_id
        self.h2 = h2_stream
        self.pending: deque[bytes | memoryview] | None = None
        self.pending_len = 0
        self.end_wanted = False
        """The caller ended its side; END_STREAM goes once the queue has drained."""
        self.end_sent = False
        self.trailers: list[_Field] | None = None
        """Trailers waiting for the queue to drain."""
        self.remote_ended = False
        self.reset_code: int | None = None
        """RST_STREAM code to send once our side has ended, if the peer's has not."""
        self.head_sent = False
        self.head_request = False
        self.surfaced = True
        """Events for the stream reach the caller (False: answered and dropped here)."""
        self.unacked = 0


class _Connection:
    """What both machines share: stream bookkeeping, flow control both ways, GOAWAY."""

    _client_side = True

    def __init__(self, settings: Http2Settings | None = None) -> None:
        self.settings = s = settings or Http2Settings()
        config = H2Configuration(
            client_side=self._client_side,
            header_encoding=None,
            validate_inbound_headers=False,
            normalize_inbound_headers=False,
            validate_outbound_headers=False,
            normalize_outbound_headers=False,
        )
        h2 = self._h2 = _H2(config, 4 * s.max_header_list_size)
        initial = {
            SettingCodes.INITIAL_WINDOW_SIZE: s.stream_window,
            SettingCodes.MAX_FRAME_SIZE: s.max_frame_size,
            SettingCodes.MAX_HEADER_LIST_SIZE: s.max_header_list_size,
            SettingCodes.ENABLE_PUSH: 0,
        }
        if not self._client_side:
            initial[SettingCodes.MAX_CONCURRENT_STREAMS] = s.max_concurrent_streams
        h2.local_settings = Settings(client=self._client_side, initial_values=initial)
        h2.max_inbound_frame_size = s.max_frame_size
        h2.initiate_connection()
        if s.connection_window > _DEFAULT_WINDOW:
            h2.increment_flow_control_window(s.connection_window - _DEFAULT_WINDOW)
        self._streams: dict[int, _Stream] = {}
        self._blocked: dict[int, None] = {}
        """Streams with queued data, in the order they are served (an ordered set)."""
        self._out: list[bytes | memoryview] = []
        """Frames in order; everything here precedes what ``h2`` holds (see ``_drain_h2``)."""
        self._events: list[_Event] = []
        self._stream_ack_at = max(1, s.stream_window // 4)
        self._conn_ack_at = max(1, s.connection_window // 4)
        self.goaway_sent: int | None = None
        """The last-stream-id of our GOAWAY, once sent."""
        self.goaway_received: int | None = None
        """The last-stream-id of the peer's GOAWAY, once one arrived."""
        self.closed = False
        """No more frames either way (EOF, a protocol error, or a final GOAWAY)."""

    # -- connection --------------------------------------------------------------------
    @property
    def open_streams(self) -> int:
        """Streams not yet over (counting ones answered here and still draining)."""
        return len(self._streams)

    def data_to_send(self) -> bytes:
        """The bytes to write to the peer, in order; ``b""`` if none."""
        tail = self._h2.data_to_send()
        out = self._out
        if not out:
            return tail
        if tail:
            out.append(tail)
        data = b"".join(out)
        out.clear()
        return data

    def goaway(self, error_code: int = ErrorCodes.NO_ERROR, reason: str = "") -> None:
        """Send GOAWAY. ``NO_ERROR``: graceful, the peer opens no new stream and open ones
        finish (later ones are refused). Any other code: final, nothing more is sent or
        received; open streams are dropped without events."""
        if self.closed:
            return
        last = self._h2.highest_inbound_stream_id
        debug = _clean_text(reason).encode("ascii")
        if error_code != ErrorCodes.NO_ERROR:
            if self.goaway_sent is not None:
                last = min(last, self.goaway_sent)
            self._h2.close_connection(
                error_code, additional_data=debug or None, last_stream_id=last
            )
            self._shut()
            return
        if self.goaway_sent is not None:
            return
        self.goaway_sent = last
        frame = GoAwayFrame(0)
        frame.last_stream_id = last
        frame.error_code = ErrorCodes.NO_ERROR
        frame.additional_data = debug
        self._drain_h2()
        self._out.append(frame.serialize())

    def _receive(self, data: bytes | bytearray | memoryview) -> list[_Event]:
        if self.closed:
            return []
        if not data:
            self._shut()
            return [ConnectionEnded(None, None, "connection closed by the peer")]
        try:
            h2_events = self._h2.receive_data(data)
        except h2x.ProtocolError as e:
            if self._h2.state_machine.state is not ConnectionState.CLOSED:
                # A bad preface fails before h2 queues its GOAWAY.
                self._h2.close_connection(e.error_code)
            events = self._events
            self._events = []
            events.append(ProtocolError(_clean_text(f"HTTP/2 from the peer: {e}")))
            self._shut()
            return events
        window_opened = False
        streams = self._streams
        events = self._events
        for ev in h2_events:  # the most frequent kinds first
            if isinstance(ev, h2e.DataReceived):
                s = streams.get(ev.stream_id)
                if s is None or not s.surfaced:
                    continue
                data_in = ev.data
                pad = ev.flow_controlled_length - len(data_in)
                if pad:
                    self._credit(s, pad)
                ended = ev.stream_ended is not None
                if ended:
                    s.remote_ended = True
                elif not data_in:
                    continue
                events.append(StreamData(s.id, data_in, ended))
                if ended and s.end_sent:
                    self._finish(s)
            elif isinstance(ev, h2e.WindowUpdated):
                window_opened = True
            elif isinstance(ev, h2e.StreamReset):
                s = streams.get(ev.stream_id)
                if s is not None:
                    self._finish(s)
                    if s.surfaced:
                        why = "" if ev.remote_reset else "reset for a protocol error"
                        events.append(StreamReset(s.id, int(ev.error_code), why))
            elif isinstance(ev, h2e.TrailersReceived):
                self._on_trailers(ev.stream_id, ev.headers)
            elif isinstance(ev, h2e.RemoteSettingsChanged):
                window_opened = True
                self._on_settings()
            elif isinstance(ev, _StreamMalformed):
                self._on_malformed(ev.stream_id, _clean_text(ev.reason), 400)
            elif isinstance(ev, h2e.ConnectionTerminated):
                self._on_goaway(ev)
            else:
                self._on_headers(ev)
        if window_opened and self._blocked:
            self._flush_blocked()
        h2 = self._h2
        deficit = self.settings.connection_window - h2.inbound_flow_control_window
        if deficit >= self._conn_ack_at and not self.closed:
            h2.increment_flow_control_window(deficit)
        if events:
            self._events = []
        return events

    def _on_headers(self, ev: h2e.Event) -> None:
        """RequestReceived, ResponseReceived, InformationalResponseReceived (and the
        events that need nothing: PINGs, SETTINGS acks, priority, StreamEnded)."""

    def _on_settings(self) -> None:
        """The peer's SETTINGS changed."""

    def _on_goaway(self, ev: h2e.ConnectionTerminated) -> None:
        last = ev.last_stream_id or 0
        if self.goaway_received is not None:
            last = min(last, self.goaway_received)
        self.goaway_received = last
        mine = 1 if self._client_side else 0  # client-initiated streams are odd
        for s in list(self._streams.values()):
            if s.id > last and s.id % 2 == mine:  # never processed by the peer
                self._reset_h2(s, ErrorCodes.CANCEL)
                self._finish(s)
                if s.surfaced:
                    self._events.append(
                        StreamReset(s.id, ErrorCodes.REFUSED_STREAM, "not processed (GOAWAY)")
                    )
        debug = (ev.additional_data or b"").decode("latin-1")
        self._events.append(ConnectionEnded(last, int(ev.error_code or 0), _clean_text(debug)))

    def _on_trailers(self, stream_id: int, raw: _RawHeaders) -> None:
        s = self._streams.get(stream_id)
        if s is None or not s.surfaced:
            return
        try:
            headers = _parse_trailers(raw, self.settings.max_header_list_size)
        except _Malformed as e:
            self._on_malformed(stream_id, f"malformed trailers: {e.reason}", 400)
            return
        s.remote_ended = True
        self._events.append(StreamTrailers(stream_id, headers))
        if s.end_sent:
            self._finish(s)

    def _on_malformed(self, stream_id: int, reason: str, status: int) -> None:
        """A stream error on a stream the caller knows (or not yet): reset it."""
        s = self._streams.get(stream_id)
        if s is None:
            return
        if s.surfaced:
            self._events.append(StreamReset(stream_id, ErrorCodes.PROTOCOL_ERROR, reason))
        self._reset_h2(s, ErrorCodes.PROTOCOL_ERROR)
        self._finish(s)

    # -- streams: sending --------------------------------------------------------------
    def send_data(self, stream_id: int, data: bytes | memoryview, end_stream: bool = False) -> int:
        """Send body bytes (and END_STREAM with ``end_stream``). Everything is accepted:
        what the windows do not allow now is queued and goes out later (``DataSent``).
        Returns the bytes framed now. Data for a stream that is over is dropped (as a
        closed socket would): 0."""
        s = self._streams.get(stream_id)
        if s is None or not s.surfaced or self.closed:
            return 0
        if s.end_wanted:
            raise RuntimeError(f"stream {stream_id}: data after end_stream")
        if not s.head_sent:
            raise RuntimeError(f"stream {stream_id}: data before the head")
        size = len(data)
        if not s.pending and not end_stream:
            # Fast path: nothing queued, and it fits the windows and one frame.
            h2 = self._h2
            hs = s.h2
            conn_window = h2.outbound_flow_control_window
            if 0 < size <= conn_window and size <= hs.outbound_flow_control_window:
                if size <= h2.max_outbound_frame_size:
                    h2.outbound_flow_control_window = conn_window - size
                    hs.outbound_flow_control_window -= size
                    self._drain_h2()
                    out = self._out
                    out.append(_FRAME_HEADER.pack(size >> 16, size & 0xFFFF, 0, 0, stream_id))
                    out.append(data)
                    return size
            elif not size:
                return 0
        if size:
            if s.pending is None:
                s.pending = deque()
            s.pending.append(data)
            s.pending_len += size
        if end_stream:
            s.end_wanted = True
        sent = self._flush(s)
        if s.pending:
            self._blocked[stream_id] = None
        return sent

    def send_trailers(self, stream_id: int, headers: Iterable[tuple[str, str]]) -> None:
        """End our side of the stream with trailer fields (after any queued data)."""
        s = self._streams.get(stream_id)
        if s is None or not s.surfaced or self.closed:
            return
        if s.end_wanted:
            raise RuntimeError(f"stream {stream_id}: trailers after end_stream")
        if not s.head_sent:
            raise RuntimeError(f"stream {stream_id}: trailers before the head")
        block = _encode_fields([], headers)
        s.end_wanted = True
        if block:
            s.trailers = block
        if not s.pending:
            self._flush(s)

    def reset_stream(self, stream_id: int, error_code: int = ErrorCodes.CANCEL) -> None:
        """Abort the stream now (RST_STREAM); queued data is dropped. No event follows."""
        s = self._streams.get(stream_id)
        if s is None or self.closed:
            return
        self._reset_h2(s, error_code)
        self._finish(s)

    def buffered(self, stream_id: int) -> int:
        """Bytes queued on the stream, waiting for a window."""
        s = self._streams.get(stream_id)
        return s.pending_len if s is not None else 0

    def _drain_h2(self) -> None:
        """Move what ``h2`` has queued to ``_out`` (before a frame built here)."""
        pending = self._h2.data_to_send()
        if pending:
            self._out.append(pending)

    def _flush(self, s: _Stream) -> int:
        """Frame queued data as far as the windows allow, then END_STREAM or trailers once
        the queue is empty and the caller has ended. Returns the bytes framed."""
        h2 = self._h2
        hs = s.h2
        pending = s.pending
        sid = s.id
        sent = 0
        if pending:
            max_frame = h2.max_outbound_frame_size
            out = self._out
            while pending:
                conn_window = h2.outbound_flow_control_window
                window = hs.outbound_flow_control_window
                if conn_window < window:
                    window = conn_window
                if window <= 0:
                    break
                chunk = pending[0]
                size = len(chunk)
                limit = window if window < max_frame else max_frame
                if size <= limit:
                    pending.popleft()
                    piece = chunk
                else:
                    view = chunk if isinstance(chunk, memoryview) else memoryview(chunk)
                    piece = view[:limit]
                    pending[0] = view[limit:]
                    size = limit
                sent += size
                if not pending and s.end_wanted and s.trailers is None:
                    h2.send_data(sid, piece, end_stream=True)  # h2 charges the windows
                    s.end_sent = True
                    break
                h2.outbound_flow_control_window = conn_window - size
                hs.outbound_flow_control_window -= size
                self._drain_h2()
                out.append(_FRAME_HEADER.pack(size >> 16, size & 0xFFFF, 0, 0, sid))
                out.append(piece)
            s.pending_len -= sent
        if not pending and s.end_wanted:
            if not s.end_sent:
                if s.trailers is not None:
                    h2.send_headers(sid, s.trailers, end_stream=True)
                    s.trailers = None
                else:
                    h2.end_stream(sid)
                s.end_sent = True
            self._after_end(s)
        return sent

    def _flush_blocked(self) -> None:
        h2 = self._h2
        streams = self._streams
        for stream_id in list(self._blocked):
            if h2.outbound_flow_control_window <= 0:
                return
            del self._blocked[stream_id]
            s = streams.get(stream_id)
            if s is None:
                continue
            sent = self._flush(s)
            if sent and s.surfaced:
                self._events.append(DataSent(stream_id, sent))
            if s.pending:  # still blocked: served last next time (round robin)
                self._blocked[stream_id] = None

    def _after_end(self, s: _Stream) -> None:
        if s.remote_ended or s.h2.closed:
            self._finish(s)
        elif s.reset_code is not None:
            self._reset_h2(s, s.reset_code)
            self._finish(s)

    def _send_head(self, s: _Stream, block: list[_Field], end_stream: bool) -> None:
        self._h2.send_headers(s.id, block, end_stream=end_stream)
        if end_stream:
            s.end_wanted = s.end_sent = True
            self._after_end(s)

    # -- streams: receiving ------------------------------------------------------------
    def ack_data(self, stream_id: int, size: int) -> None:
        """``size`` bytes of the stream's ``StreamData`` were consumed (forwarded): let
        the peer send as much more."""
        s = self._streams.get(stream_id)
        if s is not None and size > 0:
            self._credit(s, size)

    def _credit(self, s: _Stream, size: int) -> None:
        if s.remote_ended or self.closed:
            return
        s.unacked += size
        if s.unacked >= self._stream_ack_at and not s.h2.closed:
            increment, s.unacked = s.unacked, 0
            self._h2.increment_flow_control_window(increment, stream_id=s.id)

    # -- common ------------------------------------------------------------------------
    def _track(self, stream_id: int, h2_stream: H2Stream) -> _Stream:
        s = self._streams[stream_id] = _Stream(stream_id, h2_stream)
        return s

    def _reset_h2(self, s: _Stream, error_code: int) -> None:
        if not s.h2.closed and not self.closed:
            # (a frame later in the same read may have closed it already)
            with contextlib.suppress(h2x.StreamClosedError):
                self._h2.reset_stream(s.id, error_code)

    def _finish(self, s: _Stream) -> None:
        if self._streams.pop(s.id, None) is not None:
            self._blocked.pop(s.id, None)
            s.pending = None
            s.pending_len = 0

    def _shut(self) -> None:
        self.closed = True
        self._streams.clear()
        self._blocked.clear()


class DownstreamHttp2(_Connection):
    """The proxy's server side of one client connection (h2c with prior knowledge).

    Per stream: ``receive_data`` -> ``StreamRequest``, ``StreamData``*, possibly
    ``StreamTrailers``; the caller answers with ``send_response_head`` (after any
    ``send_informational``), ``send_data``* and ``send_trailers`` or ``end_stream=True``
    -- or ``send_error``. ``StreamReset`` ends a stream early. The server preface
    (SETTINGS) is queued at construction: call ``data_to_send`` first.
    """

    _client_side = False

    def receive_data(self, data: bytes | bytearray | memoryview) -> list[DownstreamEvent]:
        """Feed bytes from the client (``b""`` = EOF); returns the events they caused."""
        return cast("list[DownstreamEvent]", self._receive(data))

    def send_response_head(
        self,
        stream_id: int,
        status: int,
        headers: Iterable[tuple[str, str]],
        end_stream: bool = False,
    ) -> None:
        """The final response head (use ``forwardable_h2_headers`` on a head from
        elsewhere first). ``end_stream``: no body (a gRPC trailers-only response)."""
        s = self._streams.get(stream_id)
        if s is None or not s.surfaced or self.closed:
            return
        if s.head_sent:
            raise RuntimeError(f"stream {stream_id}: response head already sent")
        if not 200 <= status <= 599:
            raise ValueError(f"final status {status} is not in 200..599")
        s.head_sent = True
        self._send_head(s, _encode_fields([(b":status", _STATUS[status])], headers), end_stream)

    def send_informational(
        self, stream_id: int, status: int, headers: Iterable[tuple[str, str]] = ()
    ) -> None:
        """An interim ``1xx`` response (not 101), before the final head."""
        s = self._streams.get(stream_id)
        if s is None or not s.surfaced or self.closed or s.head_sent:
            return
        if not 100 <= status <= 199 or status == 101:
            raise ValueError(f"informational status {status} is not 1xx (other than 101)")
        block = _encode_fields([(b":status", _STATUS[status])], headers)
        self._h2.send_headers(stream_id, block)

    def send_error(
        self,
        stream_id: int,
        status: int,
        body: str,
        flag: str,
        extra: Sequence[tuple[str, str]] = (),
    ) -> bool:
        """A complete response made here: ``status``, a short ``text/plain`` body, the
        ``x-nodeagent-response-flag: <flag>`` header and ``extra`` headers. If the client
        is still sending its request, the stream is then reset with NO_ERROR (RFC 9113
        §8.1: stop sending).

        If the response had already started, nothing can be said any more: the stream is
        reset (INTERNAL_ERROR) and False is returned. Either way the stream is over for the
        caller: no more events come for it.
        """
        if not 200 <= status <= 599:
            raise ValueError(f"error status {status} is not in 200..599")
        s = self._streams.get(stream_id)
        if s is None or not s.surfaced or self.closed:
            return False
        if s.head_sent:
            self.reset_stream(stream_id, ErrorCodes.INTERNAL_ERROR)
            return False
        s.surfaced = False  # what follows (its body going out, request bytes) is ours
        self._respond(s, status, body, flag, ErrorCodes.NO_ERROR, extra)
        return True

    def _respond(
        self,
        s: _Stream,
        status: int,
        body: str,
        flag: str,
        reset_code: int,
        extra: Sequence[tuple[str, str]] = (),
    ) -> None:
        payload = (_clean_text(body) + "\n").encode("ascii")
        fields = [
            ("content-type", "text/plain; charset=utf-8"),
            ("content-length", str(len(payload))),
            (RESPONSE_FLAG_HEADER, _clean_text(flag)),
            *extra,
        ]
        s.reset_code = reset_code
        s.head_sent = True
        block = _encode_fields([(b":status", _STATUS[status])], fields)
        if s.head_request:
            self._send_head(s, block, end_stream=True)
            return
        self._send_head(s, block, end_stream=False)
        if s.pending is None:
            s.pending = deque()
        s.pending.append(payload)
        s.pending_len += len(payload)
        s.end_wanted = True
        self._flush(s)
        if s.pending:
            self._blocked[s.id] = None

    def _on_headers(self, ev: h2e.Event) -> None:
        if not isinstance(ev, h2e.RequestReceived):
            return
        sid = ev.stream_id
        hs = self._h2.streams.get(sid)
        if hs is None or hs.closed:  # reset by a frame later in the same read
            return
        if self.goaway_sent is not None and sid > self.goaway_sent:
            self._h2.reset_stream(sid, ErrorCodes.REFUSED_STREAM)
            return
        s = self._track(sid, hs)
        s.remote_ended = ev.stream_ended is not None
        try:
            method, scheme, authority, path, headers = _parse_request(
                ev.headers, self.settings.max_header_list_size
            )
        except _Malformed as e:
            self._reject(s, e.status, e.reason)
            return
        s.head_request = method == "HEAD"
        self._events.append(
            StreamRequest(sid, method, scheme, authority, path, headers, s.remote_ended)
        )

    def _on_malformed(self, stream_id: int, reason: str, status: int) -> None:
        s = self._streams.get(stream_id)
        if s is None:  # a request h2 refused before reporting it (a bad content-length)
            hs = self._h2.streams.get(stream_id)
            if hs is not None and not hs.closed and not self.closed:
                self._reject(self._track(stream_id, hs), status, reason)
            return
        if not s.surfaced:
            return
        if s.head_sent:  # too late for an answer
            super()._on_malformed(stream_id, reason, status)
            return
        self._events.append(StreamReset(stream_id, ErrorCodes.PROTOCOL_ERROR, reason))
        self._reject(s, status, reason, report=False)

    def _reject(self, s: _Stream, status: int, reason: str, *, report: bool = True) -> None:
        """Answer a malformed request here and reset its stream (PROTOCOL_ERROR)."""
        s.surfaced = False
        if report:
            self._events.append(StreamRejected(s.id, status, reason))
        try:
            self._respond(s, status, reason, "DPE", ErrorCodes.PROTOCOL_ERROR)
        except h2x.ProtocolError:  # the stream cannot take a response any more
            self._reset_h2(s, ErrorCodes.PROTOCOL_ERROR)
            self._finish(s)


class UpstreamHttp2(_Connection):
    """The proxy's client side of one multiplexed connection to an application.

    Per stream: ``send_request`` (then ``send_data``* and ``send_trailers`` or
    ``end_stream=True``); ``receive_data`` -> ``StreamInformational``*,
    ``StreamResponse``, ``StreamData``*, possibly ``StreamTrailers``. ``StreamReset``
    ends a stream early (``refused``: retry elsewhere). The client preface is queued at
    construction: call ``data_to_send`` first.
    """

    _client_side = True

    def __init__(self, settings: Http2Settings | None = None) -> None:
        super().__init__(settings)
        self._peer_settings_seen = False

    def receive_data(self, data: bytes | bytearray | memoryview) -> list[UpstreamEvent]:
        """Feed bytes from the application (``b""`` = EOF); returns the events they caused."""
        return cast("list[UpstreamEvent]", self._receive(data))

    @property
    def max_concurrent_streams(self) -> int:
        """The server's SETTINGS_MAX_CONCURRENT_STREAMS (100 until its SETTINGS arrive)."""
        if not self._peer_settings_seen:
            return _ASSUMED_PEER_STREAMS
        return self._h2.remote_settings.max_concurrent_streams

    def can_open_stream(self) -> bool:
        """False once GOAWAY went either way, the server's stream limit is reached, or
        the stream ids ran out."""
        return (
            not self.closed
            and self.goaway_received is None
            and self.goaway_sent is None
            and len(self._streams) < self.max_concurrent_streams
            and self._h2.highest_outbound_stream_id < _MAX_STREAM_ID - 2
        )

    def send_request(
        self,
        method: str,
        scheme: str,
        authority: str,
        path: str,
        headers: Iterable[tuple[str, str]],
        end_stream: bool = False,
    ) -> int:
        """Open a stream with a request head (use ``forwardable_h2_headers`` first);
        returns its id. For ``CONNECT`` pass ``scheme`` and ``path`` as ``""``."""
        if not self.can_open_stream():
            raise RuntimeError("this HTTP/2 connection cannot open another stream")
        h2 = self._h2
        sid = h2.get_next_available_stream_id()
        block: list[_Field] = [(b":method", method.encode("ascii"))]
        if scheme:
            block.append((b":scheme", scheme.encode("ascii")))
        block.append((b":authority", authority.encode("latin-1")))
        if path:
            block.append((b":path", path.encode("latin-1")))
        h2.send_headers(sid, _encode_fields(block, headers), end_stream=end_stream)
        s = self._track(sid, h2.streams[sid])
        s.head_sent = True
        if end_stream:
            s.end_wanted = s.end_sent = True
        return sid

    def _on_settings(self) -> None:
        self._peer_settings_seen = True

    def _on_headers(self, ev: h2e.Event) -> None:
        if isinstance(ev, h2e.ResponseReceived):
            s = self._streams.get(ev.stream_id)
            if s is None:
                return
            try:
                status, headers = _parse_response(ev.headers, self.settings.max_header_list_size)
            except _Malformed as e:
                self._on_malformed(s.id, f"malformed response: {e.reason}", 502)
                return
            ended = ev.stream_ended is not None
            if ended:
                s.remote_ended = True
            self._events.append(StreamResponse(s.id, status, headers, ended))
            if ended and s.end_sent:
                self._finish(s)
        elif isinstance(ev, h2e.InformationalResponseReceived):
            s = self._streams.get(ev.stream_id)
            if s is None:
                return
            try:
                status, headers = _parse_response(ev.headers, self.settings.max_header_list_size)
            except _Malformed as e:
                self._on_malformed(s.id, f"malformed response: {e.reason}", 502)
                return
            self._events.append(StreamInformational(s.id, status, headers))
