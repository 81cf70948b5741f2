"""HBONE as sans-I/O machines: HTTP/2 ``CONNECT`` tunnels, one stream per proxied TCP
connection, on the HTTP/2 base ``h2base`` (python-hyper's ``h2`` underneath).

Rule: **no I/O here**. No asyncio, no sockets, no clocks, no logging side effects. Bytes
from the peer go in with ``receive_data`` and come out as events; the caller's actions
(``send_connect``, ``accept``, ``send_data``, ``end_stream``, ...) queue bytes that
``data_to_send`` hands back. ``nodeagent.proxy.hbone`` owns the sockets and TLS.

What this module owns beyond ``h2base``, which frames the data written to a stream as the
send windows allow and handles GOAWAY both ways:

- the HBONE request shape (``:method CONNECT``, ``:authority <ip>:<port>``, ``baggage``,
  ``forwarded``, ``traceparent``) and its answers (``200``, or an error status with an
  ``x-nodeagent-reason`` header, then the stream reset; ``405`` for anything but CONNECT,
  ``400`` for an authority that is not ``<ip>:<port>``);
- outbound flow control as the I/O layer sees it: ``pending(stream_id)``, the bytes queued
  on a stream for a window, is what it compares with its high/low water marks, and
  ``pause_output`` stops framing stream data while the transport below is full;
- inbound flow control: windows are returned only for bytes the application has consumed
  (``acknowledge``), or that were dropped: a paused reader stops its sender after one
  stream window, and all the bytes held for a connection's streams never exceed its
  connection window (16 MiB; a stream's is 4 MiB, so it takes four stalled streams to
  stall the others, as with ztunnel);
- graceful GOAWAY: ``drain()`` sends one while letting open streams finish, ``close()``
  the final one; a received GOAWAY ends only the streams above its last-stream-id;
- the DATA fast path (see ``_Connection``): DATA frames are parsed here, not by ``h2``,
  whose per-frame cost was several times that of TLS itself (``h2base`` builds them).

Coupling to ``h2`` beyond its public API (pin ``h2<5``): that of ``h2base``, and feeding
``h2`` each END_STREAM received on a DATA frame as an empty DATA frame of our making.
"""

from __future__ import annotations

import ipaddress
import secrets
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

import h2.events as h2e
import h2.exceptions as h2x
from h2.config import H2Configuration
from h2.errors import ErrorCodes
from hpack.hpack import Encoder
from mypy_extensions import mypyc_attr

from nodeagent.protocol.h2base import (
    DATA,
    FRAME_HEADER,
    H2,
    Connection,
    Stream,
    check_settings,
    clean_text,
)

if TYPE_CHECKING:
    from h2.stream import H2Stream

__all__ = [
    "REASON_HEADER",
    "ClientConnection",
    "ConnectAccepted",
    "ConnectRefused",
    "ConnectRequested",
    "ConnectionFailed",
    "DataReceived",
    "ErrorCodes",
    "Event",
    "GoAwayReceived",
    "HboneSettings",
    "RequestRejected",
    "ServerConnection",
    "StreamClosed",
    "StreamEnded",
    "connect_headers",
    "forwarded_for",
    "new_traceparent",
    "parse_authority",
]

REASON_HEADER = "x-nodeagent-reason"
"""Response header carrying a human-readable reason with an error status."""

MiB = 1024 * 1024


@dataclass(frozen=True, slots=True)
class HboneSettings:
    """The HTTP/2 parameters one side announces (and enforces) on a connection."""

    stream_window: int = 4 * MiB
    """SETTINGS_INITIAL_WINDOW_SIZE: bytes a peer may send on one stream before we
    acknowledge them; also the most a paused stream can make us buffer."""
    connection_window: int = 16 * MiB
    """Connection-level receive window (raised from 64 KiB by a WINDOW_UPDATE)."""
    max_frame_size: int = 256 * 1024
    """SETTINGS_MAX_FRAME_SIZE: the largest DATA frame we accept. As large as uvloop's
    socket reads, so that each goes as one frame and reaches the app in one write (at
    64 KiB, a bulk MB cost the two agents twice the reads and writes)."""
    max_concurrent_streams: int = 100
    """SETTINGS_MAX_CONCURRENT_STREAMS: streams the peer may open towards us."""
    max_header_list_size: int = 64 * 1024
    max_outbound_control_frames: int = 1000
    """PING/SETTINGS answers queued while the peer reads nothing before the connection
    is closed with GOAWAY(ENHANCE_YOUR_CALM) (Envoy's ``max_outbound_control_frames``)."""
    premature_reset_min_streams: int = 100
    """Streams a peer may open before resets ahead of our answer count as rapid reset
    (CVE-2023-44487): from then on, half of its streams reset early closes it."""

    def __post_init__(self) -> None:
        check_settings(self)


# -- events -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ConnectRequested:
    """Server: a well-formed CONNECT arrived; answer with ``accept`` or ``refuse``."""

    stream_id: int
    authority: str
    destination: tuple[str, int]
    headers: Mapping[str, str]
    """Regular (non-pseudo) request headers, names lower-case; repeated names joined
    with ``", "``."""


@dataclass(frozen=True, slots=True)
class RequestRejected:
    """Server: a request that is not a valid HBONE CONNECT was answered here already."""

    stream_id: int
    status: int
    reason: str


@dataclass(frozen=True, slots=True)
class ConnectAccepted:
    """Client: the server answered the CONNECT with a 2xx: the tunnel is open."""

    stream_id: int
    status: int
    headers: Mapping[str, str]


@dataclass(frozen=True, slots=True)
class ConnectRefused:
    """Client: the server answered the CONNECT with an error status."""

    stream_id: int
    status: int
    reason: str
    """The ``x-nodeagent-reason`` header, or ``""``."""


class DataReceived:
    """Tunnel bytes. Call ``acknowledge(stream_id, len(data))`` once they are consumed.

    A plain class, not changed once made (one per DATA frame: compiled, a dataclass's
    generated ``__init__`` would stay interpreted); equal and shown as a dataclass is."""

    __slots__ = ("data", "stream_id")

    def __init__(self, stream_id: int, data: bytes) -> None:
        self.stream_id = stream_id
        self.data = data

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, DataReceived)
            and self.stream_id == other.stream_id
            and self.data == other.data
        )

    def __hash__(self) -> int:
        return hash((self.stream_id, self.data))

    def __repr__(self) -> str:
        return f"DataReceived(stream_id={self.stream_id!r}, data={self.data!r})"


@dataclass(frozen=True, slots=True)
class StreamEnded:
    """The peer half-closed the stream (END_STREAM): EOF in that direction."""

    stream_id: int


@dataclass(frozen=True, slots=True)
class StreamClosed:
    """The stream is over; the last event for ``stream_id``."""

    stream_id: int
    error_code: int | None
    """None: both directions ended cleanly. Otherwise the RST_STREAM code (NO_ERROR for
    a graceful close of a direction still open, REFUSED_STREAM for a stream a GOAWAY
    said was never processed)."""
    by_peer: bool
    """True if the peer reset the stream (or refused it with GOAWAY)."""


@dataclass(frozen=True, slots=True)
class GoAwayReceived:
    """The peer sent GOAWAY: open no new streams here. Streams above
    ``last_stream_id`` were closed (``StreamClosed(..., REFUSED_STREAM, True)``)."""

    last_stream_id: int
    error_code: int
    debug: str


@dataclass(frozen=True, slots=True)
class ConnectionFailed:
    """The peer broke the protocol, or abused it (``abuse``: ``rapid_reset``,
    ``control_flood``); a GOAWAY is queued. Flush it and close the connection, or with
    ``graceful`` (rapid reset) once the streams still open have finished: the GOAWAY
    refuses new ones, and a peer that goes on opening them fails the connection."""

    reason: str
    abuse: str | None = None
    graceful: bool = False


Event = (
    ConnectRequested
    | RequestRejected
    | ConnectAccepted
    | ConnectRefused
    | DataReceived
    | StreamEnded
    | StreamClosed
    | GoAwayReceived
    | ConnectionFailed
)


# -- helpers ------------------------------------------------------------------------------


def parse_authority(authority: str) -> tuple[str, int]:
    """``"10.1.2.3:8080"`` or ``"[fd00::1]:80"`` -> (ip, port); ValueError otherwise."""
    host, sep, port_text = authority.rpartition(":")
    if not sep or not port_text.isdigit():
        raise ValueError(f"authority {authority!r} is not <ip>:<port>")
    port = int(port_text)
    if not 1 <= port <= 65535:
        raise ValueError(f"authority {authority!r} has port {port} out of range")
    try:
        bracketed = host.startswith("[") and host.endswith("]")
        addr = ipaddress.ip_address(host[1:-1] if bracketed else host)
    except ValueError:
        raise ValueError(f"authority {authority!r} is not <ip>:<port>") from None
    if bracketed != (addr.version == 6):
        raise ValueError(f"authority {authority!r}: IPv6 goes in brackets, IPv4 does not")
    return str(addr), port


def forwarded_for(ip: str) -> str:
    """The RFC 7239 ``Forwarded`` value naming the source address."""
    return f'for="[{ip}]"' if ":" in ip else f"for={ip}"


def new_traceparent(random: bytes | None = None) -> str:
    """A fresh W3C ``traceparent`` (not sampled), from 24 random bytes if given."""
    rnd = random if random is not None else secrets.token_bytes(24)
    trace, span = rnd[:16].hex(), rnd[16:24].hex()
    if trace == "0" * 32 or span == "0" * 16:  # all-zero ids are invalid
        trace, span = "0" * 31 + "1", "0" * 15 + "1"
    return f"00-{trace}-{span}-00"


def connect_headers(
    *,
    source_ip: str | None = None,
    baggage: str | None = None,
    traceparent: str | None = None,
    extra: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """The regular headers of an HBONE CONNECT (a ``traceparent`` is made if not given)."""
    headers: dict[str, str] = {}
    if baggage:
        headers["baggage"] = baggage
    if source_ip:
        headers["forwarded"] = forwarded_for(source_ip)
    headers["traceparent"] = traceparent or new_traceparent()
    if extra:
        headers.update({k.lower(): v for k, v in extra.items()})
    return headers


def _decode_headers(
    raw: Iterable[tuple[bytes | str, bytes | str]],
) -> tuple[dict[str, str], dict[str, str]]:
    pseudo: dict[str, str] = {}
    regular: dict[str, str] = {}
    for k, v in raw:
        name = k.decode("latin-1") if isinstance(k, bytes) else k
        value = v.decode("latin-1") if isinstance(v, bytes) else v
        if name.startswith(":"):
            pseudo[name] = value
        elif name in regular:
            regular[name] = f"{regular[name]}, {value}"
        else:
            regular[name] = value
    return pseudo, regular


# -- machines -----------------------------------------------------------------------------

# What the DATA fast path (``_frames``) reads of a frame header, and the WINDOW_UPDATE it writes.
# (``Final``: compiled, constants and statics, not lookups in the module dict per frame)
_WINDOW_UPDATE: Final = struct.Struct(">BHBBLL")
_UNPACK_HEADER: Final = FRAME_HEADER.unpack_from
_HEADERS: Final = 0x1
_PUSH_PROMISE: Final = 0x5
_CONTINUATION: Final = 0x9
_END_STREAM: Final = 0x1
_END_HEADERS: Final = 0x4
_PADDED: Final = 0x8


def _data_header(length: int, stream_id: int, flags: int = 0) -> bytes:
    return FRAME_HEADER.pack(length >> 16, length & 0xFFFF, DATA, flags, stream_id)


def _window_update(stream_id: int, increment: int) -> bytes:
    return _WINDOW_UPDATE.pack(0, 4, 0x8, 0, stream_id, increment)


class _Stream(Stream):
    __slots__ = ("answered", "discard", "recv_window")

    def __init__(self, stream_id: int, h2_stream: H2Stream, recv_window: int) -> None:
        super().__init__(stream_id, h2_stream)
        self.recv_window = recv_window
        self.answered = False
        """Server: ``accept`` or ``refuse`` was called (a reset before is premature)."""
        self.discard = False
        """Bytes arriving are dropped (and their window returned), not reported."""


@mypyc_attr(native_class=False)  # a subclass of hpack's (Python) class
class LiteralEncoder(Encoder):
    """HPACK without Huffman coding. A CONNECT's values are mostly new to the table (the
    authority, ``traceparent``, ``forwarded``): ``hpack`` Huffman-codes each of them
    character by character in Python, which cost more per tunnel (~20 µs each side) than
    the ~30 bytes it saves; every HPACK decoder reads plain literals."""

    def encode(self, headers: Any, huffman: bool = False) -> bytes:
        return super().encode(headers, huffman=False)


class _Connection(Connection[_Stream]):
    """What client and server share beyond ``h2base.Connection``: the receive path, both
    ways of ending a stream, and the events. Not used directly: see ``ClientConnection``
    and ``ServerConnection``.

    DATA frames, the hot path, are framed (in the base) and parsed (here) without ``h2``
    (its per-frame cost was ~20 µs each way, more than TLS); ``h2`` does everything else
    (HEADERS, SETTINGS, WINDOW_UPDATE received, RST_STREAM, GOAWAY, PING) and its
    stream state machine sees each END_STREAM received as an empty DATA frame. Send
    windows are ``h2``'s (updated by the peer's WINDOW_UPDATEs and SETTINGS, consumed by
    the base); receive windows and the WINDOW_UPDATEs that reopen them are this class's.
    """

    _client_side = True

    def __init__(self, settings: HboneSettings | None = None) -> None:
        self.settings = s = settings or HboneSettings()
        config = H2Configuration(
            client_side=self._client_side,
            header_encoding=None,
            validate_inbound_headers=True,
            normalize_inbound_headers=True,
            # every header we send is ours (``send_connect``'s callers, ``accept``,
            # ``_respond_error``): lower-case names, clean values; h2's checks of them
            # cost each tunnel more than its HPACK encoding
            validate_outbound_headers=False,
            normalize_outbound_headers=False,
        )
        super().__init__(H2(config=config), s)
        self._h2.encoder = LiteralEncoder()
        self._graceful_reset = True  # a pooled connection carries other workloads' tunnels
        self._after_goaway = 0
        self._events: list[Event] = []
        self._inbuf = b""
        """The start of a frame whose end has not arrived yet."""
        self._preface_left = 0 if self._client_side else 24
        self._header_block = False
        self._window_opened = False
        self._conn_recv_window = s.connection_window
        self._conn_unacked = 0
        self.failed: str | None = None

    # -- connection ------------------------------------------------------------------
    def initiate(self) -> None:
        """Queue our preface: SETTINGS, and the connection window update."""
        self._start()

    def has_failed(self) -> bool:
        """Whether the connection failed (a call, so a check after ``_frames`` is not
        narrowed away by the check before it: compiled, that would be a wrong type)."""
        return self.failed is not None

    def take_events(self) -> list[Event]:
        """Events caused by local actions since the last call (``receive_data`` returns
        these too)."""
        events = self._events
        if events:
            self._events = []
        return events

    def receive_data(self, data: bytes | bytearray | memoryview) -> list[Event]:
        """Feed bytes from the peer; returns the events they caused. Never raises: a
        stream's error resets that stream, anything else fails the connection (GOAWAY)."""
        if self.failed is not None or self.closed:
            return self.take_events()
        try:
            return self._receive(data)
        except Exception as e:  # a bug of ours must not take more than this connection
            self._fail(f"internal error on the peer's frames: {e!r}", ErrorCodes.INTERNAL_ERROR)
            return self.take_events()

    def receive_frames(self, data: memoryview) -> tuple[list[Event], int]:
        """``receive_data`` for a caller that keeps its own buffer (the I/O layer reads
        TLS straight into one): complete frames are handled, an incomplete one at the
        end is left to the caller, who hands its bytes again followed by the next ones.
        Returns the events and how many bytes were used. No byte of ``data`` is kept."""
        if self.failed is not None or self.closed:
            return self.take_events(), len(data)
        if self._inbuf:  # (bytes from receive_data before: that path completes them)
            return self.receive_data(data), len(data)
        try:
            pos = self._preface(data)
            if pos < 0:
                return self.take_events(), len(data)
            rest = self._frames(data, pos) if pos < len(data) else pos
            if self.has_failed():
                return self.take_events(), len(data)
            return self._received(), rest
        except Exception as e:  # a bug of ours must not take more than this connection
            self._fail(f"internal error on the peer's frames: {e!r}", ErrorCodes.INTERNAL_ERROR)
            return self.take_events(), len(data)

    def _preface(self, mv: memoryview) -> int:
        """Server: skip (and check, in h2) the client's connection preface; where frames
        start in ``mv``, or -1 if the preface was wrong."""
        if not self._preface_left:
            return 0
        pos = min(self._preface_left, len(mv))
        self._preface_left -= pos
        return pos if self._to_h2(mv[:pos]) else -1

    def _received(self) -> list[Event]:
        if self._window_opened or self._conn_unacked >= self._conn_ack_at:
            return self._after_receive()
        events = self._events
        if events:
            self._events = []
        return events

    def _receive(self, data: bytes | bytearray | memoryview) -> list[Event]:
        mv = memoryview(data)
        pos = self._preface(mv)
        if pos < 0:
            return self.take_events()
        if self._inbuf:
            # Complete the frame left over from the last read, copying only that frame.
            head = self._inbuf
            if len(head) < 9:
                take = min(9 - len(head), len(mv) - pos)
                head += mv[pos : pos + take]
                pos += take
            if len(head) >= 9:
                need = 9 + ((head[0] << 16) | (head[1] << 8) | head[2]) - len(head)
                take = min(max(need, 0), len(mv) - pos)
                head += mv[pos : pos + take]
                pos += take
            self._inbuf = b""
            rest = self._frames(memoryview(head), 0)
            if self.has_failed():
                return self.take_events()
            if rest < len(head):  # still incomplete: all of ``data`` went into it
                self._inbuf = head[rest:]
                return self._after_receive()
        if pos < len(mv):
            rest = self._frames(mv, pos)
            if self.has_failed():
                return self.take_events()
            if rest < len(mv):
                self._inbuf = mv[rest:].tobytes()
        return self._received()

    def _frames(self, mv: memoryview, pos: int) -> int:
        """Handle the complete frames in ``mv`` from ``pos``; the offset where they end."""
        n = len(mv)
        run = pos  # start of a run of frames for h2
        max_in = self.settings.max_frame_size
        unpack = _UNPACK_HEADER
        while n - pos >= 9:
            # (typed: compiled, the arithmetic below is on machine ints, not objects)
            head: tuple[int, int, int, int, int] = unpack(mv, pos)
            hi, lo, ftype, flags, sid = head
            length = (hi << 16) | lo
            if length > max_in:
                self._to_h2(mv[run:])  # h2 answers FRAME_SIZE_ERROR
                if self.failed is None:
                    self._fail(
                        f"frame of {length} bytes exceeds our maximum", ErrorCodes.FRAME_SIZE_ERROR
                    )
                return n
            end = pos + 9 + length
            if end > n:
                break
            if ftype == DATA and not self._header_block:
                if run < pos and not self._to_h2(mv[run:pos]):
                    return n
                self._on_data_frame(mv, pos + 9, end, flags, sid & 0x7FFFFFFF)
                if self.failed is not None:
                    return n
                run = end
            elif ftype in (_HEADERS, _PUSH_PROMISE):
                self._header_block = not flags & _END_HEADERS
            elif ftype == _CONTINUATION and flags & _END_HEADERS:
                self._header_block = False
            pos = end
        if run < pos:
            self._to_h2(mv[run:pos])
        return pos

    def _after_receive(self) -> list[Event]:
        if self._window_opened:
            self._window_opened = False
            if self._blocked and not self._output_paused:
                self._flush_blocked()
        if self._conn_unacked >= self._conn_ack_at and not self.closed:
            increment, self._conn_unacked = self._conn_unacked, 0
            self._conn_recv_window += increment
            self._emit(_window_update(0, increment))
        return self.take_events()

    def _to_h2(self, frames: memoryview | bytes) -> bool:
        """Feed complete non-DATA frames to h2 and act on its events; False if it failed."""
        try:
            h2_events = self._h2.receive_data(frames)
        except h2x.ProtocolError as e:  # h2 has queued a GOAWAY
            self._fail(f"malformed HTTP/2 from the peer: {e}", None)
            return False
        for ev in h2_events:
            t = type(ev)
            if t is h2e.WindowUpdated:
                self._window_opened = True
            elif t is h2e.RemoteSettingsChanged or t is h2e.PingReceived:
                self._window_opened = True
                self._control_reply()
            elif t is not h2e.DataReceived:  # only the empty END_STREAM ones we made
                try:
                    self._on_event(ev)
                except h2x.ProtocolError as e:  # our answer on a stream that just ended
                    self._stream_error(getattr(ev, "stream_id", None), str(e))
            if self.closed:  # abuse, or a GOAWAY of ours
                return not self.has_failed()
        return True

    def _stream_error(self, stream_id: int | None, reason: str) -> None:
        """A protocol error confined to one stream: reset it (PROTOCOL_ERROR), counted."""
        self.stream_errors += 1
        if not stream_id:
            return
        s = self._streams.get(stream_id)
        if s is not None:
            self.reset_stream(stream_id, ErrorCodes.PROTOCOL_ERROR)
            return
        hs = self._h2.streams.get(stream_id)
        if hs is not None and not hs.closed:
            self._h2.reset_stream(stream_id, ErrorCodes.PROTOCOL_ERROR)

    def _on_data_frame(self, mv: memoryview, start: int, stop: int, flags: int, sid: int) -> None:
        length = stop - start
        padding = 0
        if flags & _PADDED:
            pad = mv[start] if length else 256
            if pad >= length:
                self._fail("DATA frame padding exceeds its length", ErrorCodes.PROTOCOL_ERROR)
                return
            start += 1
            stop -= pad
            padding = pad + 1
        if sid == 0:
            self._fail("DATA frame on stream 0", ErrorCodes.PROTOCOL_ERROR)
            return
        self._conn_recv_window -= length
        if self._conn_recv_window < 0:
            self._fail("the peer overran the connection window", ErrorCodes.FLOW_CONTROL_ERROR)
            return
        s = self._streams.get(sid)
        if s is None:
            ours = (sid % 2 == 1) == self._client_side
            h2 = self._h2
            if sid > (h2.highest_outbound_stream_id if ours else h2.highest_inbound_stream_id):
                self._fail(f"DATA frame on idle stream {sid}", ErrorCodes.PROTOCOL_ERROR)
            self._conn_unacked += length  # a stream that is over (we reset or answered it)
            return
        if s.remote_ended:
            self.stream_errors += 1
            self._conn_unacked += length
            self.reset_stream(sid, ErrorCodes.STREAM_CLOSED)
            return
        s.recv_window -= length
        if s.recv_window < 0:
            self.stream_errors += 1
            self._conn_unacked += length
            self.reset_stream(sid, ErrorCodes.FLOW_CONTROL_ERROR)
            return
        if padding:
            self.acknowledge(sid, padding)
        if stop > start:
            if s.discard:
                self.acknowledge(sid, stop - start)
            else:
                self._events.append(DataReceived(sid, mv[start:stop].tobytes()))
        if flags & _END_STREAM:
            self._to_h2(_data_header(0, sid, _END_STREAM))

    def pause_output(self) -> None:
        """Stop framing stream data (the transport below is full); control frames still go,
        up to ``max_outbound_control_frames`` of them."""
        self._output_paused = True
        self.set_backlogged(True)

    def resume_output(self) -> None:
        self._output_paused = False
        self.set_backlogged(False)
        if self._blocked:
            self._flush_blocked()

    def drain(self) -> None:
        """Graceful GOAWAY: the peer may open no new streams; open ones may finish."""
        self._drain(b"")

    def close(self, error_code: int = ErrorCodes.NO_ERROR, reason: str = "") -> None:
        """Final GOAWAY; no more frames after it. Streams still open are dropped silently
        (the I/O layer ends them)."""
        self._close(error_code, reason.encode()[:256])

    def stream_ids(self) -> list[int]:
        return list(self._streams)

    # -- streams: sending ------------------------------------------------------------
    def send_data(self, stream_id: int, data: bytes | memoryview) -> int:
        """Queue tunnel bytes; they are framed as far as the windows allow, now or later.
        Returns the bytes still queued on the stream (``pending``). Data for a stream that
        is already over is dropped (as a closed socket would)."""
        s = self._streams.get(stream_id)
        if s is None or self.closed:
            return 0
        if s.end_wanted:
            raise ValueError(f"stream {stream_id}: data after end_stream")
        self._write(s, data, False)
        return s.pending_len

    def end_stream(self, stream_id: int) -> None:
        """Half-close our direction once the queued data has gone (END_STREAM)."""
        s = self._streams.get(stream_id)
        if s is None or s.end_wanted or self.closed:
            return
        s.end_wanted = True
        if not s.pending:
            self._flush(s)

    def close_stream(self, stream_id: int) -> None:
        """Graceful close: flush, END_STREAM, then reset (NO_ERROR) if the peer's
        direction is still open; bytes arriving meanwhile are dropped."""
        s = self._streams.get(stream_id)
        if s is None or self.closed:
            return
        s.discard = True
        s.reset_code = ErrorCodes.NO_ERROR
        if s.end_sent:
            self._after_end(s)
        else:
            self.end_stream(stream_id)

    # -- streams: receiving ----------------------------------------------------------
    def acknowledge(self, stream_id: int, size: int) -> None:
        """The application consumed (or dropped) ``size`` bytes of the stream, over or not:
        let the peer send more. Every byte of ``DataReceived`` must be acknowledged once:
        the connection window is returned only so."""
        if self.closed:
            return
        self._conn_unacked += size
        if self._conn_unacked >= self._conn_ack_at:
            increment, self._conn_unacked = self._conn_unacked, 0
            self._conn_recv_window += increment
            self._emit(_window_update(0, increment))
        s = self._streams.get(stream_id)
        if s is None or s.remote_ended:
            return
        s.unacked += size
        if s.unacked >= self._stream_ack_at:
            increment, s.unacked = s.unacked, 0
            s.recv_window += increment
            self._emit(_window_update(stream_id, increment))

    def _on_event(self, ev: h2e.Event) -> None:
        if isinstance(ev, h2e.StreamEnded):
            s = self._streams.get(ev.stream_id or 0)
            if s is None:
                return
            s.remote_ended = True
            if not s.discard:
                self._events.append(StreamEnded(s.id))
            if s.end_sent:
                self._finish(s, None, by_peer=False)
        elif isinstance(ev, h2e.StreamReset):
            s = self._streams.get(ev.stream_id or 0)
            if s is not None:
                self._finish(s, int(ev.error_code or 0), by_peer=True)
                if not s.answered and ev.remote_reset:
                    self._premature_reset()
        elif isinstance(ev, h2e.ConnectionTerminated):
            last, _ = self._receive_goaway(ev)
            debug = (ev.additional_data or b"").decode("utf-8", "replace")
            self._events.append(GoAwayReceived(last, int(ev.error_code or 0), debug))
        elif isinstance(ev, h2e.RequestReceived):
            self._on_request(ev.stream_id or 0, ev.headers or [])
        elif isinstance(ev, h2e.ResponseReceived):
            self._on_response(ev.stream_id or 0, ev.headers or [])
        # Everything else (PINGs, SETTINGS acks, priority, trailers, 1xx) needs nothing.

    def _on_request(self, stream_id: int, raw: Iterable[tuple[bytes | str, bytes | str]]) -> None:
        # A client gets no requests: h2 already refuses server-initiated streams.
        self._h2.reset_stream(stream_id, ErrorCodes.PROTOCOL_ERROR)

    def _on_response(self, stream_id: int, raw: Iterable[tuple[bytes | str, bytes | str]]) -> None:
        self._h2.reset_stream(stream_id, ErrorCodes.PROTOCOL_ERROR)

    def _track(self, stream_id: int, h2_stream: H2Stream) -> _Stream:
        s = _Stream(stream_id, h2_stream, self.settings.stream_window)
        self._streams[stream_id] = s
        return s

    # -- common ----------------------------------------------------------------------
    def _on_closed(self, s: _Stream, error_code: int | None, by_peer: bool) -> None:
        self._events.append(StreamClosed(s.id, error_code, by_peer))

    def _fail(self, reason: str, error_code: int | None) -> None:
        """The peer broke the protocol: GOAWAY (h2 queued one already if code is None)."""
        self._fail_connection(error_code, reason.encode()[:256])
        self.failed = reason
        self._events.append(ConnectionFailed(reason))

    def _on_abuse(self, reason: str, graceful: bool) -> None:
        if graceful:
            self._events.append(ConnectionFailed(reason, self.abuse, graceful=True))
            return
        self._fail_connection(None)
        self.failed = reason
        self._events.append(ConnectionFailed(reason, self.abuse))


class ClientConnection(_Connection):
    """The initiating side: opens CONNECT streams and waits for their answers."""

    _client_side = True

    def can_open_stream(self) -> bool:
        """False once GOAWAY went either way, or the peer's stream limit is reached."""
        if self.closed or self.goaway_received is not None or self.goaway_sent is not None:
            return False
        h2 = self._h2
        return h2.open_outbound_streams < h2.remote_settings.max_concurrent_streams

    @property
    def peer_max_streams(self) -> int:
        """The peer's SETTINGS_MAX_CONCURRENT_STREAMS (huge until its SETTINGS arrive)."""
        return self._h2.remote_settings.max_concurrent_streams

    def send_connect(self, authority: str, headers: Mapping[str, str]) -> int:
        """Open a stream with ``CONNECT authority``; returns its id. The answer arrives
        as ``ConnectAccepted`` or ``ConnectRefused``."""
        if not self.can_open_stream():
            raise RuntimeError("this HBONE connection cannot open more streams")
        sid = self._h2.get_next_available_stream_id()
        block: list[tuple[str, str]] = [(":method", "CONNECT"), (":authority", authority)]
        block.extend((k.lower(), v) for k, v in headers.items())
        self._h2.send_headers(sid, block)
        self._track(sid, self._h2.streams[sid])
        return sid

    def _on_response(self, stream_id: int, raw: Iterable[tuple[bytes | str, bytes | str]]) -> None:
        s = self._streams.get(stream_id)
        if s is None:
            return
        pseudo, headers = _decode_headers(raw)
        status = int(pseudo.get(":status", "0"))
        if 200 <= status < 300:
            self._events.append(ConnectAccepted(stream_id, status, headers))
        else:
            s.discard = True
            self._events.append(ConnectRefused(stream_id, status, headers.get(REASON_HEADER, "")))


class ServerConnection(_Connection):
    """The accepting side: turns CONNECT requests into ``ConnectRequested`` and answers."""

    _client_side = False

    def accept(self, stream_id: int, headers: Mapping[str, str] | None = None) -> None:
        """Answer ``200``: the tunnel is open (after the destination was connected)."""
        s = self._streams.get(stream_id)
        if s is None or self.closed or s.answered:
            return
        s.answered = True
        block = [(":status", "200")]
        if headers:
            block.extend((k.lower(), v) for k, v in headers.items())
        self._h2.send_headers(stream_id, block)

    def refuse(self, stream_id: int, status: int, reason: str) -> None:
        """Answer an error status with ``x-nodeagent-reason`` and reset the stream."""
        s = self._streams.get(stream_id)
        if s is None or self.closed or s.answered:
            return
        s.answered = True
        self._respond_error(stream_id, status, reason)
        self._finish(s, ErrorCodes.NO_ERROR, by_peer=False)

    def _respond_error(self, stream_id: int, status: int, reason: str) -> None:
        if not 400 <= status <= 599:
            raise ValueError(f"refusal status {status} is not 4xx/5xx")
        block = [(":status", str(status)), (REASON_HEADER, clean_text(reason))]
        if status == 405:
            block.append(("allow", "CONNECT"))
        self._h2.send_headers(stream_id, block, end_stream=True)
        hs = self._h2.streams.get(stream_id)
        if hs is not None and not hs.closed:
            self._h2.reset_stream(stream_id, ErrorCodes.NO_ERROR)

    def _on_request(self, stream_id: int, raw: Iterable[tuple[bytes | str, bytes | str]]) -> None:
        self.peer_streams += 1
        hs = self._h2.streams.get(stream_id)
        ended = hs is None or hs.closed  # reset by a later frame of the same read
        if self.goaway_sent is not None and stream_id > self.goaway_sent:
            if not ended:
                self._h2.reset_stream(stream_id, ErrorCodes.REFUSED_STREAM)
            self._after_goaway += 1
            if self.abuse is not None and self._after_goaway > self._reset_min:
                self._fail("kept opening streams after GOAWAY", ErrorCodes.ENHANCE_YOUR_CALM)
            return
        if hs is None or hs.closed:
            self._premature_reset()
            return
        pseudo, headers = _decode_headers(raw)
        method = pseudo.get(":method", "")
        if method != "CONNECT":
            reason = f"{method or 'a request without a method'}: only CONNECT is served here"
            self._respond_error(stream_id, 405, reason)
            self._events.append(RequestRejected(stream_id, 405, reason))
            return
        authority = pseudo.get(":authority", "")
        try:
            destination = parse_authority(authority)
        except ValueError as e:
            self._respond_error(stream_id, 400, str(e))
            self._events.append(RequestRejected(stream_id, 400, str(e)))
            return
        self._track(stream_id, hs)
        self._events.append(ConnectRequested(stream_id, authority, destination, headers))
