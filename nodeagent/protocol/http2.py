"""HTTP/2 for the proxy (h2c, gRPC included) as two sans-I/O machines on the HTTP/2 base
``h2base`` (python-hyper's ``h2`` underneath): one per side of a proxied exchange, streams
multiplexed.

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
stream window (``Http2Settings.stream_window``). The *connection* window is returned
the same way, for bytes acknowledged or dropped here (a stream that is over, padding), so
all a connection can make the proxy hold is its connection window (16 MiB), not a stream
window per stream; a stream's is 1 MiB, so it takes 16 stalled streams to stall the
others. Every byte of ``StreamData`` must be acknowledged once, consumed or dropped.

*Sending* (``h2base``). ``send_data`` accepts everything: it frames what the peer's windows
allow now and queues the rest on the stream; queued bytes are framed as WINDOW_UPDATEs
arrive (round-robin over streams when the connection window is the limit). The return
value of ``send_data`` is the number of bytes framed at once, and ``DataSent(stream_id,
size)`` events (from ``receive_data``) report the queued bytes framed later. The I/O layer
acks the source stream by exactly these amounts (``other.ack_data(source, n)``), which
closes the loop: a stream's queue here never holds more than the window of the stream
feeding it, so no separate buffer bound or high-water mark is needed. (``buffered(stream_id)``
reports it.) When the socket itself is backed up, the I/O layer defers those acks until it
drains.

Header handling and cost
------------------------
``h2``'s own header validation is off in both directions: ``h2messages`` checks each
received block in one pass that also builds the event's fields (a malformed block is a
*stream* error, answered per stream, as RFC 9113 §8.1.1 wants, instead of ``h2``'s
connection error) and builds the outgoing ones. Outgoing DATA frames are built by
``h2base``, not by ``h2`` (whose per-frame cost is several times that); incoming frames
all go through ``h2``. Events are plain slotted dataclasses.

Coupling to ``h2`` beyond its public API (pin ``h2<5``): that of ``h2base`` (GOAWAY, DATA
frames) and of ``h2messages`` (``MessageH2``: malformed messages are stream errors).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, cast

import h2.events as h2e
import h2.exceptions as h2x
from h2.config import H2Configuration
from h2.connection import ConnectionState
from h2.errors import ErrorCodes

from nodeagent.protocol.h2base import (
    Connection,
    Field,
    Stream,
    check_settings,
    clean_text,
)
from nodeagent.protocol.h2messages import (
    STATUS,
    Malformed,
    MessageH2,
    RawHeaders,
    StreamMalformed,
    encode_fields,
    forwardable_h2_headers,
    parse_request,
    parse_response,
    parse_trailers,
)
from nodeagent.protocol.http1 import RESPONSE_FLAG_HEADER, Headers

if TYPE_CHECKING:
    from h2.stream import H2Stream

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

_MAX_STREAM_ID = 2**31 - 1
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
    max_outbound_control_frames: int = 1000
    """PING/SETTINGS answers queued while the peer reads nothing before the connection
    is closed with GOAWAY(ENHANCE_YOUR_CALM) (Envoy's ``max_outbound_control_frames``)."""
    premature_reset_min_streams: int = 100
    """Streams a client may open before resets ahead of our response head count as
    rapid reset (CVE-2023-44487): from then on, half of its streams reset early closes it."""

    def __post_init__(self) -> None:
        check_settings(self)
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
    """The peer broke HTTP/2 at the connection level, or abused it (``abuse``:
    ``rapid_reset``, ``control_flood``). A GOAWAY is queued: write ``data_to_send()`` and
    close. Every open stream is lost; no further events."""

    reason: str
    abuse: str | None = None


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


class _Stream(Stream):
    __slots__ = ("head_request", "head_sent", "surfaced")

    def __init__(self, stream_id: int, h2_stream: H2Stream) -> None:
        super().__init__(stream_id, h2_stream)
        self.head_sent = False
        self.head_request = False
        self.surfaced = True
        """Events for the stream reach the caller (False: answered and dropped here)."""


class _Connection(Connection[_Stream]):
    """What both machines share beyond ``h2base.Connection``: the receive path (all of it
    through ``h2``), trailers, malformed messages, and the events."""

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
        h2 = MessageH2(config, 4 * s.max_header_list_size)
        super().__init__(h2, s, limit_streams=not self._client_side)
        self._events: list[_Event] = []
        self._conn_unacked = 0
        """Bytes acknowledged or dropped since the connection window was last returned."""
        self._conn_return_at = max(1, s.stream_window // 4)
        """Returned in steps this small (not a quarter of the connection window): with
        stalled streams holding most of it, the rest must still reach a step."""
        self._start()

    # -- connection --------------------------------------------------------------------
    def goaway(self, error_code: int = ErrorCodes.NO_ERROR, reason: str = "") -> None:
        """Send GOAWAY. ``NO_ERROR``: graceful, the peer opens no new stream and open ones
        finish (later ones are refused). Any other code: final, nothing more is sent or
        received; open streams are dropped without events."""
        debug = clean_text(reason).encode("ascii")
        if error_code == ErrorCodes.NO_ERROR:
            self._drain(debug)
        elif not self.closed:
            self._close(error_code, debug)
            self._shut()

    def _receive(self, data: bytes | bytearray | memoryview) -> list[_Event]:
        if self.closed:
            return []
        if not data:
            self._shut()
            return [ConnectionEnded(None, None, "connection closed by the peer")]
        try:
            h2_events = self._h2.receive_data(data)
        except h2x.ProtocolError as e:
            # A bad preface fails before h2 queues its GOAWAY.
            queued = self._h2.state_machine.state is ConnectionState.CLOSED
            self._fail_connection(None if queued else e.error_code)
            events = self._events
            self._events = []
            events.append(ProtocolError(clean_text(f"HTTP/2 from the peer: {e}")))
            return events
        window_opened = False
        streams = self._streams
        events = self._events
        for ev in h2_events:  # the most frequent kinds first
            if isinstance(ev, h2e.DataReceived):
                s = streams.get(ev.stream_id)
                if s is None or not s.surfaced:  # dropped: the window comes back now
                    self._conn_unacked += ev.flow_controlled_length
                    continue
                data_in = ev.data
                pad = ev.flow_controlled_length - len(data_in)
                if pad:
                    self._conn_unacked += pad
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
                    self._finish(s, int(ev.error_code), by_peer=ev.remote_reset)
                    if ev.remote_reset and not s.head_sent:  # downstream, before our answer
                        self._premature_reset()
                        if self.closed:
                            break
                    if s.surfaced:
                        why = "" if ev.remote_reset else "reset for a protocol error"
                        events.append(StreamReset(s.id, int(ev.error_code), why))
            elif isinstance(ev, h2e.TrailersReceived):
                self._on_trailers(ev.stream_id, ev.headers)
            elif isinstance(ev, h2e.RemoteSettingsChanged):
                window_opened = True
                self._on_settings()
                self._control_reply()
                if self.closed:
                    break
            elif isinstance(ev, h2e.PingReceived):
                self._control_reply()
                if self.closed:
                    break
            elif isinstance(ev, StreamMalformed):
                self._on_malformed(ev.stream_id, clean_text(ev.reason), 400)
            elif isinstance(ev, h2e.ConnectionTerminated):
                self._on_goaway(ev)
            else:
                self._on_headers(ev)
                if self.closed:
                    break
        if window_opened and self._blocked:
            self._flush_blocked()
        if self._conn_unacked >= self._conn_return_at:
            self._return_connection_window()
        if events:
            self._events = []
        return events

    def _on_headers(self, ev: h2e.Event) -> None:
        """RequestReceived, ResponseReceived, InformationalResponseReceived (and the
        events that need nothing: SETTINGS acks, priority, StreamEnded)."""

    def _on_abuse(self, reason: str, graceful: bool) -> None:
        self._shut()
        self._events.clear()  # the streams of this read are dropped with the connection
        self._events.append(ProtocolError(clean_text(reason), self.abuse))

    def _on_settings(self) -> None:
        """The peer's SETTINGS changed."""

    def _on_goaway(self, ev: h2e.ConnectionTerminated) -> None:
        last, refused = self._receive_goaway(ev)
        for s in refused:
            if s.surfaced:
                self._events.append(
                    StreamReset(s.id, ErrorCodes.REFUSED_STREAM, "not processed (GOAWAY)")
                )
        debug = (ev.additional_data or b"").decode("latin-1")
        self._events.append(ConnectionEnded(last, int(ev.error_code or 0), clean_text(debug)))

    def _on_trailers(self, stream_id: int, raw: RawHeaders) -> None:
        s = self._streams.get(stream_id)
        if s is None or not s.surfaced:
            return
        try:
            headers = parse_trailers(raw, self.settings.max_header_list_size)
        except Malformed as e:
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
        self._finish(s, ErrorCodes.PROTOCOL_ERROR)

    def _on_sent(self, s: _Stream, size: int) -> None:
        if s.surfaced:
            self._events.append(DataSent(s.id, size))

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
        return self._write(s, data, end_stream)

    def send_trailers(self, stream_id: int, headers: Iterable[tuple[str, str]]) -> None:
        """End our side of the stream with trailer fields (after any queued data)."""
        s = self._streams.get(stream_id)
        if s is None or not s.surfaced or self.closed:
            return
        if s.end_wanted:
            raise RuntimeError(f"stream {stream_id}: trailers after end_stream")
        if not s.head_sent:
            raise RuntimeError(f"stream {stream_id}: trailers before the head")
        block = encode_fields([], headers)
        s.end_wanted = True
        if block:
            s.trailers = block
        if not s.pending:
            self._flush(s)

    def buffered(self, stream_id: int) -> int:
        """Bytes queued on the stream, waiting for a window (``pending``)."""
        return self.pending(stream_id)

    def _send_head(self, s: _Stream, block: list[Field], end_stream: bool) -> None:
        self._h2.send_headers(s.id, block, end_stream=end_stream)
        if end_stream:
            s.end_wanted = s.end_sent = True
            self._after_end(s)

    # -- streams: receiving ------------------------------------------------------------
    def ack_data(self, stream_id: int, size: int) -> None:
        """``size`` bytes of the stream's ``StreamData`` were consumed (forwarded) or
        dropped, the stream over or not: let the peer send as much more."""
        if size <= 0 or self.closed:
            return
        self._conn_unacked += size
        if self._conn_unacked >= self._conn_return_at:
            self._return_connection_window()
        s = self._streams.get(stream_id)
        if s is not None:
            self._credit(s, size)

    def _return_connection_window(self) -> None:
        """Give the peer back the connection window of the bytes consumed or dropped
        (never beyond the configured window: ``h2`` returns some on its own, for frames
        on streams it closed)."""
        h2 = self._h2
        room = self.settings.connection_window - h2.inbound_flow_control_window
        increment = min(self._conn_unacked, room)
        self._conn_unacked = 0
        if increment > 0 and not self.closed:
            h2.increment_flow_control_window(increment)

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
        self._send_head(s, encode_fields([(b":status", STATUS[status])], headers), end_stream)

    def send_informational(
        self, stream_id: int, status: int, headers: Iterable[tuple[str, str]] = ()
    ) -> None:
        """An interim ``1xx`` response (not 101), before the final head."""
        s = self._streams.get(stream_id)
        if s is None or not s.surfaced or self.closed or s.head_sent:
            return
        if not 100 <= status <= 199 or status == 101:
            raise ValueError(f"informational status {status} is not 1xx (other than 101)")
        block = encode_fields([(b":status", STATUS[status])], headers)
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
        payload = (clean_text(body) + "\n").encode("ascii")
        fields = [
            ("content-type", "text/plain; charset=utf-8"),
            ("content-length", str(len(payload))),
            (RESPONSE_FLAG_HEADER, clean_text(flag)),
            *extra,
        ]
        s.reset_code = reset_code
        s.head_sent = True
        block = encode_fields([(b":status", STATUS[status])], fields)
        if s.head_request:
            self._send_head(s, block, end_stream=True)
            return
        self._send_head(s, block, end_stream=False)
        self._write(s, payload, True)

    def _on_headers(self, ev: h2e.Event) -> None:
        if not isinstance(ev, h2e.RequestReceived):
            return
        sid = ev.stream_id
        self.peer_streams += 1
        hs = self._h2.streams.get(sid)
        if hs is None or hs.closed:  # reset by a frame later in the same read
            self._premature_reset()
            return
        if self.goaway_sent is not None and sid > self.goaway_sent:
            self._h2.reset_stream(sid, ErrorCodes.REFUSED_STREAM)
            return
        s = self._track(sid, hs)
        s.remote_ended = ev.stream_ended is not None
        try:
            method, scheme, authority, path, headers = parse_request(
                ev.headers, self.settings.max_header_list_size
            )
        except Malformed as e:
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
        block: list[Field] = [(b":method", method.encode("ascii"))]
        if scheme:
            block.append((b":scheme", scheme.encode("ascii")))
        block.append((b":authority", authority.encode("latin-1")))
        if path:
            block.append((b":path", path.encode("latin-1")))
        h2.send_headers(sid, encode_fields(block, headers), end_stream=end_stream)
        s = self._track(sid, h2.streams[sid])
        s.head_sent = True
        if end_stream:
            s.end_wanted = s.end_sent = True
        return sid

    def _on_settings(self) -> None:
        self._peer_settings_seen = True

    def _on_headers(self, ev: h2e.Event) -> None:
        if not isinstance(ev, (h2e.ResponseReceived, h2e.InformationalResponseReceived)):
            return
        s = self._streams.get(ev.stream_id)
        if s is None:
            return
        try:
            status, headers = parse_response(ev.headers, self.settings.max_header_list_size)
        except Malformed as e:
            self._on_malformed(s.id, f"malformed response: {e.reason}", 502)
            return
        if isinstance(ev, h2e.InformationalResponseReceived):
            self._events.append(StreamInformational(s.id, status, headers))
            return
        ended = ev.stream_ended is not None
        if ended:
            s.remote_ended = True
        self._events.append(StreamResponse(s.id, status, headers, ended))
        if ended and s.end_sent:
            self._finish(s)
