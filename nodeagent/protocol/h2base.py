"""The HTTP/2 both sans-I/O machines stand on: HBONE's CONNECT tunnels (``hbone``) and the
L7 proxy's request streams (``http2``), on top of python-hyper's ``h2``. No I/O here either.

What the two share, and is here:

- ``H2``: ``h2``'s connection with RFC 9113 §6.8 GOAWAY semantics, which ``h2`` does not
  model (python-hyper/h2#1181: it closes the connection on any GOAWAY). A received GOAWAY
  is reported (``ConnectionTerminated``) and ends only the streams above its
  last-stream-id; ``_drain`` sends one while letting open streams finish.
- ``Stream``: a stream's sending side (data queued for a window; how our side ends) and
  the bytes consumed but not yet returned to the peer as window.
- ``Connection``: the streams, outbound flow control and the connection's end. Data
  written to a stream is framed as far as the stream's and the connection's send windows
  allow and queued beyond; queued data goes as windows open (round-robin over streams
  when the connection window is the limit), then END_STREAM (on the last DATA frame when
  it can) or trailers. DATA frames are built here, not by ``h2``, whose per-frame cost
  was several times that of TLS. Also: the settings announced, GOAWAY both ways, a
  protocol failure, ``data_to_send``.

What stays in the machines: the receive path (``hbone`` parses DATA frames itself and keeps
its own receive windows; ``http2`` leaves them to ``h2``), the requests and responses, and
the events; a machine learns of a stream's end, of data framed late and of GOAWAY
through the hooks ``_on_closed`` and ``_on_sent`` and the result of ``_receive_goaway``.

Coupling to ``h2`` beyond its public API (pin ``h2<5``): the GOAWAY override, reading
``H2Connection._data_to_send`` to keep frame order without a copy, and charging the public
``outbound_flow_control_window`` attributes for the frames built here.

Compiled with mypyc together with ``hbone`` (``nodeagent.native``), while ``http2`` is not:
its classes are interpreted subclasses of ``Stream`` and ``Connection``, hence
``allow_interpreted_subclasses`` on both (without it, compiled code would take an instance
of such a subclass for a wrong type; compiled subclasses still call through the vtable),
and of ``H2``, a Python class (see there). A subclass passes what the base keeps through
``__init__``: compiled code reads the instance's own slot, so a class attribute of an
interpreted subclass would not override it.
"""

from __future__ import annotations

import contextlib
import struct
from collections import deque
from collections.abc import Sequence
from typing import TYPE_CHECKING, Final, Generic, Protocol, TypeVar

import h2.events as h2e
import h2.exceptions as h2x
import h2.settings as h2s
from h2.connection import H2Connection
from h2.errors import ErrorCodes
from hyperframe.frame import GoAwayFrame
from mypy_extensions import mypyc_attr

if TYPE_CHECKING:
    from h2.stream import H2Stream
    from hyperframe.frame import Frame

MAX_WINDOW: Final = 2**31 - 1
DEFAULT_WINDOW: Final = 65535
"""A window before any SETTINGS or WINDOW_UPDATE (RFC 9113 §6.9.2)."""

# Frame layout (RFC 9113 §4.1): 24-bit length, type, flags, 31-bit stream id.
# (``Final``: compiled, a constant or a static, not a lookup in the module dict per use)
FRAME_HEADER: Final = struct.Struct(">BHBBL")
DATA: Final = 0x0

OWN_PIECE: Final = 16 * 1024
"""``take_output`` hands a DATA payload this large on as it is (a TLS record's worth: a
smaller one costs less copied into its neighbours than written as a record of its own)."""

Field = tuple[bytes, bytes]
"""A header field as sent (an hpack ``HeaderTuple`` is one too)."""


class Settings(Protocol):
    """The HTTP/2 parameters one side announces (and enforces): what ``HboneSettings``
    and ``Http2Settings`` have in common."""

    @property
    def stream_window(self) -> int: ...
    @property
    def connection_window(self) -> int: ...
    @property
    def max_frame_size(self) -> int: ...
    @property
    def max_concurrent_streams(self) -> int: ...
    @property
    def max_header_list_size(self) -> int: ...
    @property
    def max_outbound_control_frames(self) -> int: ...
    @property
    def premature_reset_min_streams(self) -> int: ...


def check_settings(s: Settings) -> None:
    """ValueError unless every parameter is one HTTP/2 allows."""
    if not 1 <= s.stream_window <= MAX_WINDOW:
        raise ValueError(f"stream_window {s.stream_window} is not in 1..2^31-1")
    if not DEFAULT_WINDOW <= s.connection_window <= MAX_WINDOW:
        raise ValueError(f"connection_window {s.connection_window} is not in 65535..2^31-1")
    if not 16384 <= s.max_frame_size <= 2**24 - 1:
        raise ValueError(f"max_frame_size {s.max_frame_size} is not in 16384..2^24-1")
    if s.max_concurrent_streams < 1:
        raise ValueError("max_concurrent_streams must be at least 1")
    if s.max_outbound_control_frames < 1:
        raise ValueError("max_outbound_control_frames must be at least 1")
    if s.premature_reset_min_streams < 1:
        raise ValueError("premature_reset_min_streams must be at least 1")


def clean_text(text: str) -> str:
    """A header-safe text (a reason, GOAWAY debug data): printable ASCII, one line, bounded."""
    return "".join(c if " " <= c <= "~" else " " for c in text).strip()[:512]


@mypyc_attr(native_class=False)
class H2(H2Connection):
    """``h2`` with RFC 9113 §6.8 GOAWAY semantics: a received GOAWAY is reported but does
    not close the connection, so streams at or below its last-stream-id can finish
    (python-hyper/h2#1181).

    A Python class even when compiled: ``h2``'s own code reads its attributes many times
    per frame, and the interpreter's fast attribute paths do not apply to native classes.
    ``self`` is typed as ``H2Connection`` because compiled code checks a non-native
    class's instances for that exact class, and ``http2`` subclasses this one."""

    def _receive_goaway_frame(
        self: H2Connection, frame: GoAwayFrame
    ) -> tuple[list[Frame], list[h2e.Event]]:
        event = h2e.ConnectionTerminated()
        event.error_code = frame.error_code
        event.last_stream_id = frame.last_stream_id
        event.additional_data = frame.additional_data or None
        return [], [event]


@mypyc_attr(allow_interpreted_subclasses=True)
class Stream:
    """A stream as ``Connection`` sends on it; the machines' records extend it."""

    __slots__ = (
        "data_tail",
        "end_sent",
        "end_wanted",
        "h2",
        "id",
        "pending",
        "pending_len",
        "remote_ended",
        "reset_code",
        "trailers",
        "unacked",
    )

    def __init__(self, stream_id: int, h2_stream: H2Stream) -> None:
        self.id = stream_id
        self.h2 = h2_stream
        self.data_tail = b"\x00\x00" + stream_id.to_bytes(4, "big")
        """A DATA frame header after its length: type, no flags, the stream id (made once:
        a ``struct`` pack per frame cost more than the rest of the fast path)."""
        self.pending: deque[bytes | memoryview] | None = None
        """Data waiting for a window (made on first use)."""
        self.pending_len = 0
        self.end_wanted = False
        """The caller ended our side; END_STREAM (or the trailers) go once ``pending`` has."""
        self.end_sent = False
        self.trailers: Sequence[Field] | None = None
        """A header block that ends our side instead of END_STREAM on a DATA frame."""
        self.reset_code: int | None = None
        """RST_STREAM code to send once our side has ended, if the peer's has not."""
        self.remote_ended = False
        self.unacked = 0
        """Bytes the caller consumed that the peer has not been given window for yet."""


S = TypeVar("S", bound=Stream)


@mypyc_attr(allow_interpreted_subclasses=True)
class Connection(Generic[S]):
    """Streams, outbound flow control and the connection's end; see the module docstring.
    Not used directly: ``hbone`` and ``http2`` make their machines of it."""

    def __init__(self, h2: H2Connection, settings: Settings, *, limit_streams: bool = True) -> None:
        """Drive ``h2``, an ``H2`` made with the machine's configuration (typed as its
        base, see ``H2``), announcing ``settings``; SETTINGS_MAX_CONCURRENT_STREAMS only
        with ``limit_streams``."""
        self._h2 = h2
        initial = {
            h2s.SettingCodes.INITIAL_WINDOW_SIZE: settings.stream_window,
            h2s.SettingCodes.MAX_FRAME_SIZE: settings.max_frame_size,
            h2s.SettingCodes.MAX_HEADER_LIST_SIZE: settings.max_header_list_size,
            h2s.SettingCodes.ENABLE_PUSH: 0,
        }
        if limit_streams:
            initial[h2s.SettingCodes.MAX_CONCURRENT_STREAMS] = settings.max_concurrent_streams
        h2.local_settings = h2s.Settings(client=h2.config.client_side, initial_values=initial)
        h2.max_inbound_frame_size = settings.max_frame_size
        self._connection_window = settings.connection_window
        self._stream_ack_at = max(1, settings.stream_window // 4)
        self._conn_ack_at = max(1, settings.connection_window // 4)
        self._streams: dict[int, S] = {}
        self._blocked: dict[int, None] = {}
        """Streams with queued data, in the order they will be served (an ordered set)."""
        self._out: list[bytes | memoryview] = []
        """Frames built here, in order with h2's (see ``_emit``)."""
        self._output_paused = False
        """No stream data is framed (the transport below is full); control frames still go."""
        self.goaway_sent: int | None = None
        """The last-stream-id of our GOAWAY, once sent."""
        self.goaway_received: int | None = None
        """The last-stream-id of a GOAWAY from the peer, once one arrived."""
        self.closed = False
        """No more frames either way (a final GOAWAY, a protocol failure, or EOF)."""
        self._max_control = settings.max_outbound_control_frames
        self._reset_min = settings.premature_reset_min_streams
        self._backlogged = False
        self._control_backlog = 0
        self.peer_streams = 0
        """Streams the peer opened (requests received, answered or not)."""
        self.premature_resets = 0
        """Streams the peer reset (or opened already reset) before we answered them."""
        self.stream_errors = 0
        """Streams we reset because the peer broke the protocol on that stream alone."""
        self.abuse: str | None = None
        """``rapid_reset`` or ``control_flood`` once the connection was closed for it."""
        self._graceful_reset = False
        """Rapid reset drains (``_abuse(graceful=True)``) rather than closes at once."""

    # -- connection ------------------------------------------------------------------
    def _start(self) -> None:
        """Queue our preface: SETTINGS, and the connection window update."""
        self._h2.initiate_connection()
        increment = self._connection_window - self._h2.inbound_flow_control_window
        if increment > 0:
            # Through h2, so that its own view of the connection window (used for frames
            # it would see on closed streams) is as large as the real one.
            self._h2.increment_flow_control_window(increment)

    @property
    def open_streams(self) -> int:
        """Streams not yet over (counting ones answered here and still draining)."""
        return len(self._streams)

    def data_to_send(self) -> bytes:
        """The bytes to write to the peer, in order; ``b""`` if none."""
        h2 = self._h2
        out = self._out
        if not out:
            return h2.data_to_send() if h2._data_to_send else b""
        if h2._data_to_send:
            out.append(h2.data_to_send())
        data = b"".join(out)
        out.clear()
        return data

    def take_output(self) -> list[bytes | memoryview]:
        """``data_to_send`` without copying stream data: the bytes to write, in order, as
        pieces; each run of small ones (frame headers, control frames) joined into one,
        larger DATA payloads as they were written (slices of them). ``[]`` if none."""
        h2 = self._h2
        out = self._out
        if h2._data_to_send:
            out.append(h2.data_to_send())
        if not out:
            return []
        self._out = []
        if len(out) == 1:
            return out
        pieces: list[bytes | memoryview] = []
        start = 0  # first piece of the current run of small ones
        for i, piece in enumerate(out):
            if len(piece) >= OWN_PIECE:
                if i - start == 1:
                    pieces.append(out[start])
                elif i > start:
                    pieces.append(b"".join(out[start:i]))
                pieces.append(piece)
                start = i + 1
        if len(out) - start == 1:
            pieces.append(out[start])
        elif len(out) > start:
            pieces.append(b"".join(out[start:]))
        return pieces

    def _emit(self, frame: bytes | memoryview) -> None:
        """Queue a frame built here, after everything h2 has queued so far."""
        if self._h2._data_to_send:  # h2's output buffer (checked to skip a copy)
            self._out.append(self._h2.data_to_send())
        self._out.append(frame)

    def _drain(self, debug: bytes, error_code: int = ErrorCodes.NO_ERROR) -> None:
        """Graceful GOAWAY: the peer may open no new streams; open ones may finish."""
        if self.goaway_sent is not None or self.closed:
            return
        last = self._h2.highest_inbound_stream_id
        self.goaway_sent = last
        frame = GoAwayFrame(0)
        frame.last_stream_id = last
        frame.error_code = error_code
        frame.additional_data = debug
        self._emit(frame.serialize())

    def _close(self, error_code: int, debug: bytes) -> None:
        """Final GOAWAY; no more frames after it. Streams still open stay as they are,
        without events (the machine or the I/O layer ends them)."""
        if self.closed:
            return
        self.closed = True
        last = self._h2.highest_inbound_stream_id
        if self.goaway_sent is not None:
            last = min(last, self.goaway_sent)
        self._h2.close_connection(error_code, additional_data=debug or None, last_stream_id=last)
        self._blocked.clear()

    def _fail_connection(self, error_code: int | None, debug: bytes = b"") -> None:
        """The peer broke the protocol: a final GOAWAY with ``error_code`` (None: ``h2``
        queued one already), and every stream is over (PROTOCOL_ERROR, by the peer)."""
        if error_code is not None and not self.closed:
            self._h2.close_connection(error_code, additional_data=debug or None)
        self.closed = True
        for s in list(self._streams.values()):
            self._finish(s, ErrorCodes.PROTOCOL_ERROR, by_peer=True)

    # -- abuse (CVE-2023-44487 rapid reset, PING/SETTINGS floods) ---------------------
    def set_backlogged(self, backlogged: bool) -> None:
        """The transport below holds more unsent bytes than its high-water mark (the
        peer is not reading), or no longer does; while it does, the ACKs our peer's PING
        and SETTINGS frames queue are counted (``max_outbound_control_frames``)."""
        self._backlogged = backlogged
        if not backlogged:
            self._control_backlog = 0

    def _control_reply(self) -> None:
        """A PING or SETTINGS from the peer queued an ACK: past the limit of ACKs queued
        while the peer reads nothing, the connection is closed (ENHANCE_YOUR_CALM)."""
        if not self._backlogged:
            return
        self._control_backlog += 1
        if self._control_backlog > self._max_control:
            self._abuse(
                "control_flood",
                f"more than {self._max_control} PING/SETTINGS answers queued "
                "while the peer reads nothing",
            )

    def _premature_reset(self) -> None:
        """The peer reset a stream before we answered it: past half of its streams (once
        it opened ``premature_reset_min_streams``), that is the rapid reset attack."""
        self.premature_resets += 1
        n = self.peer_streams
        if n >= self._reset_min and self.premature_resets * 2 >= n and self.abuse is None:
            self._abuse(
                "rapid_reset",
                f"{self.premature_resets} of {n} streams reset by the peer before an answer",
                graceful=self._graceful_reset,
            )

    def _abuse(self, kind: str, reason: str, *, graceful: bool = False) -> None:
        """Close for abuse: drop the output queued so far (the flood's answers), final
        GOAWAY(ENHANCE_YOUR_CALM) naming the last stream processed; ``_on_abuse`` follows.
        ``graceful``: a GOAWAY(ENHANCE_YOUR_CALM) that lets the streams still open finish
        (other connections of a pool share this one: only new streams are refused)."""
        if self.closed:
            return
        self.abuse = kind
        if graceful:
            self._drain(reason.encode()[:256], ErrorCodes.ENHANCE_YOUR_CALM)
            self._on_abuse(reason, True)
            return
        self._h2.clear_outbound_data_buffer()
        self._out.clear()
        self._close(ErrorCodes.ENHANCE_YOUR_CALM, reason.encode()[:256])
        self._on_abuse(reason, False)

    def _receive_goaway(self, ev: h2e.ConnectionTerminated) -> tuple[int, list[S]]:
        """The peer's GOAWAY: no new streams here. Ours above its last-stream-id were never
        processed: they are reset (CANCEL) and over (REFUSED_STREAM, by the peer). Returns
        the last-stream-id (the lowest one received) and those streams."""
        last = ev.last_stream_id or 0
        if self.goaway_received is not None:
            last = min(last, self.goaway_received)
        self.goaway_received = last
        mine = 1 if self._h2.config.client_side else 0  # client-initiated streams are odd
        refused = [s for s in self._streams.values() if s.id > last and s.id % 2 == mine]
        for s in refused:
            self._reset_h2(s, ErrorCodes.CANCEL)
            self._finish(s, ErrorCodes.REFUSED_STREAM, by_peer=True)
        return last, refused

    # -- streams ---------------------------------------------------------------------
    def pending(self, stream_id: int) -> int:
        """Bytes queued on the stream and not yet framed (waiting for a window)."""
        s = self._streams.get(stream_id)
        return s.pending_len if s is not None else 0

    def reset_stream(self, stream_id: int, error_code: int = ErrorCodes.CANCEL) -> None:
        """Abort the stream now (RST_STREAM); queued data is dropped."""
        s = self._streams.get(stream_id)
        if s is None:
            return
        self._reset_h2(s, error_code)
        self._finish(s, error_code, by_peer=False)

    def _write(self, s: S, data: bytes | memoryview, end: bool) -> int:
        """Frame ``data`` as far as the windows allow and queue the rest; with ``end``,
        our side of the stream ends after it. Returns the bytes framed now."""
        size = len(data)
        if not s.pending and not end and not self._output_paused:
            if not size:
                return 0
            # Fast path: nothing queued, and it fits the windows and one frame.
            h2 = self._h2
            hs = s.h2
            conn_window: int = h2.outbound_flow_control_window
            stream_window: int = hs.outbound_flow_control_window
            if size <= conn_window and size <= stream_window and size <= h2.max_outbound_frame_size:
                h2.outbound_flow_control_window = conn_window - size
                hs.outbound_flow_control_window = stream_window - size
                out = self._out
                if h2._data_to_send:  # h2's frames (HEADERS, ...) go first
                    out.append(h2.data_to_send())
                head = size.to_bytes(3, "big") + s.data_tail
                if size < OWN_PIECE and isinstance(data, bytes):
                    out.append(head + data)  # one piece: nothing for take_output to join
                else:
                    out.append(head)
                    out.append(data)
                return size
        if size:
            pending = s.pending
            if pending is None:
                pending = s.pending = deque()
            pending.append(data)
            s.pending_len += size
        if end:
            s.end_wanted = True
        sent = 0 if self._output_paused else self._flush(s)
        if s.pending:
            self._blocked[s.id] = None
        return sent

    def _flush(self, s: S) -> int:
        """Frame queued data as far as the windows allow; once the queue is empty and the
        caller has ended, END_STREAM (on the last DATA frame if it goes now) or the
        trailers. Returns the bytes framed."""
        h2 = self._h2
        pending = s.pending
        sent = 0
        if pending:
            hs = s.h2
            sid = s.id
            max_frame = h2.max_outbound_frame_size
            out = self._out
            end = s.end_wanted and s.trailers is None
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
                if end and not pending:
                    h2.send_data(sid, piece, end_stream=True)  # h2 charges the windows
                    s.end_sent = True
                    break
                h2.outbound_flow_control_window = conn_window - size
                hs.outbound_flow_control_window -= size
                if h2._data_to_send:  # h2's frames (HEADERS, ...) go first
                    out.append(h2.data_to_send())
                out.append(size.to_bytes(3, "big") + s.data_tail)
                out.append(piece)
            s.pending_len -= sent
        if not pending and s.end_wanted:
            if not s.end_sent:
                if s.trailers is not None:
                    h2.send_headers(s.id, s.trailers, end_stream=True)
                    s.trailers = None
                else:
                    h2.end_stream(s.id)
                s.end_sent = True
            self._after_end(s)
        return sent

    def _flush_blocked(self) -> None:
        """Serve the streams with queued data while the connection window lasts."""
        h2 = self._h2
        streams = self._streams
        blocked = self._blocked
        for stream_id in list(blocked):
            if self._output_paused or h2.outbound_flow_control_window <= 0:
                return
            del blocked[stream_id]
            s = streams.get(stream_id)
            if s is None:
                continue
            sent = self._flush(s)
            if sent:
                self._on_sent(s, sent)
            if s.pending:  # still blocked: served last next time (round robin)
                blocked[stream_id] = None

    def _after_end(self, s: S) -> None:
        """Our side has ended: the stream is over if the peer's has too, or is reset
        if that was asked for (``reset_code``)."""
        if s.remote_ended or s.h2.closed:
            self._finish(s, None, by_peer=False)
        elif s.reset_code is not None:
            self._reset_h2(s, s.reset_code)
            self._finish(s, s.reset_code, by_peer=False)

    def _reset_h2(self, s: S, error_code: int) -> None:
        if not s.h2.closed and not self.closed:
            # (a frame later in the same read may have closed it already)
            with contextlib.suppress(h2x.StreamClosedError):
                self._h2.reset_stream(s.id, error_code)

    def _finish(self, s: S, error_code: int | None = None, *, by_peer: bool = False) -> None:
        """The stream is over: forget it and what it had queued."""
        if self._streams.pop(s.id, None) is None:
            return
        self._blocked.pop(s.id, None)
        s.pending = None
        s.pending_len = 0
        self._on_closed(s, error_code, by_peer)

    # -- for the machines ------------------------------------------------------------
    def _on_closed(self, s: S, error_code: int | None, by_peer: bool) -> None:
        """The stream is over. ``error_code``: None when both sides ended cleanly, else
        the RST_STREAM code (REFUSED_STREAM for one a GOAWAY refused); ``by_peer``: the
        peer reset or refused it."""

    def _on_sent(self, s: S, size: int) -> None:
        """``size`` bytes queued on the stream were framed, as a window opened."""

    def _on_abuse(self, reason: str, graceful: bool) -> None:
        """The connection was closed for abuse (``abuse``): end the streams, tell the caller;
        ``graceful``: only a GOAWAY went, the streams still open may finish."""
