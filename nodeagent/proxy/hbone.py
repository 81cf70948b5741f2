"""One HBONE connection and its streams over asyncio: what the client pool
(``hbone_client``) and the server (``hbone_server``) share.

Owns the I/O around ``nodeagent.protocol.hbone`` (which owns framing and flow-control
rules) for one mutual-TLS HTTP/2 connection, whichever side opened it:

- ``HboneStream``: one CONNECT stream as an ``asyncio.Transport`` driving an
  ``asyncio.Protocol``, so the relay's ``UpstreamSide``/``ClientSide`` run on a tunnel
  unchanged. Writes beyond the stream's send window are queued (``pause_writing`` above the
  high-water mark); ``pause_reading`` stops acknowledging, so the peer stops after one
  stream window.
- ``HboneConn``: the asyncio protocol under TLS that feeds the machine, dispatches its
  events to the streams and batches all bytes for the TLS transport into one ``write`` per
  event-loop callback. Its subclasses (``hbone_client._ClientConn``,
  ``hbone_server._ServerConn``) answer the side's own events and drive streams through
  their underscore methods; nothing outside the three HBONE modules does.
- ``describe_tls_error``: a failed handshake as a message a person can act on.

Knows nothing of pools, listeners or who is allowed to connect.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
from collections import deque
from collections.abc import Mapping
from typing import Any, Final

from nodeagent.errors import PeerError
from nodeagent.identity.tls import describe_verify_error
from nodeagent.protocol.hbone import (
    ClientConnection,
    ConnectionFailed,
    DataReceived,
    ErrorCodes,
    Event,
    ServerConnection,
    StreamClosed,
    StreamEnded,
)
from nodeagent.proxy.peerwarn import warn_once

log = logging.getLogger("nodeagent.hbone")

# (``Final``: compiled, constants, not lookups in the module dict per read or write)
HBONE_PORT: Final = 15008
"""Where a node's proxy serves HBONE for its pods, and so where clients dial."""
STREAM_HIGH_WATER: Final = 256 * 1024
"""Default write high-water mark of a stream (bytes queued waiting for window)."""
TLS_HIGH_WATER: Final = 1024 * 1024
"""Write high-water mark of the TLS transport under all streams of a connection."""
READ_MIN: Final = 16 * 1024 + 256
"""The least room offered to TLS for a read (a record's plaintext, and some)."""
READ_GRANULE: Final = 64 * 1024
"""The read buffer grows in steps of this (TLS asks for what it holds, up to ~256 KiB)."""
WRITE_CHUNK: Final = 64 * 1024
"""Bytes handed to TLS per write (see ``HboneConn._write``)."""
CLOSE_GRACE: Final = 5.0
"""Seconds a closed connection may take to hand its last bytes (GOAWAY) to a peer that
does not read before it is aborted (its unsent output would otherwise stay forever)."""


Addr = tuple[str, int]


def format_addr(a: Any) -> str:
    """``ip:port`` (``[ip]:port`` for IPv6) for messages; anything else as ``str``."""
    if isinstance(a, tuple) and len(a) >= 2:
        return f"[{a[0]}]:{a[1]}" if ":" in str(a[0]) else f"{a[0]}:{a[1]}"
    return str(a)


def set_keepalive(sock: socket.socket) -> None:
    """TCP keepalive, so a peer that vanished without a FIN or RST is noticed (~2 min)."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, 60)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, 10)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, 6)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except OSError:
        pass


def describe_tls_error(err: BaseException) -> str:
    """``describe_verify_error`` plus the cases it does not name (no client certificate,
    the peer rejecting *our* certificate, timeouts, resets)."""
    if isinstance(err, ssl.SSLError):
        text = str(err)
        if "PEER_DID_NOT_RETURN_A_CERTIFICATE" in text or "did not return a certificate" in text:
            return "peer presented no client certificate (is it a mesh workload?)"
        if "ALERT" in text.upper() and "alert" in text:
            return (
                f"the peer rejected our certificate ({getattr(err, 'reason', None) or text}): "
                "does it trust our CA, and is our certificate still valid?"
            )
        return describe_verify_error(err)
    if isinstance(err, ConnectionAbortedError | TimeoutError) and "handshake" in str(err).lower():
        return f"TLS handshake did not complete in time ({err})"
    return (
        f"the peer closed the connection during the TLS handshake ({err!r}): "
        "did it reject our certificate?"
    )


# -- one stream as a transport ------------------------------------------------------------


class HboneStream(asyncio.Transport):
    """One HBONE stream as the ``asyncio.Transport`` subset the relay uses.

    ``get_extra_info``: ``peername``/``sockname`` (of the tunnel's TCP connection),
    ``peer_identity`` (the other side's SPIFFE ID), ``authority``, ``headers`` (the
    CONNECT request's), ``stream_id``. ``socket`` is None: there is no socket per stream.
    """

    __slots__ = (
        "_closing",
        "_conn",
        "_deliver_handle",
        "_eof_delivered",
        "_eof_pending",
        "_eof_written",
        "_h2_closed",
        "_high",
        "_info",
        "_lost",
        "_low",
        "_protocol",
        "_rbuf",
        "_read_paused",
        "_response",
        "_write_paused",
        "authority",
        "id",
    )

    def __init__(
        self,
        conn: HboneConn,
        stream_id: int,
        authority: str,
        headers: Mapping[str, str],
    ) -> None:
        t = conn.transport
        super().__init__()
        self._info: dict[str, Any] = {
            "peername": t.get_extra_info("peername") if t is not None else None,
            "sockname": t.get_extra_info("sockname") if t is not None else None,
            "peer_identity": conn.peer_identity,
            "authority": authority,
            "headers": dict(headers),
            "stream_id": stream_id,
            "socket": None,
        }
        self._conn = conn
        self.id = stream_id
        self.authority = authority
        self._protocol: asyncio.BaseProtocol | None = None
        self._rbuf: deque[bytes] = deque()
        self._read_paused = False
        self._eof_pending = False
        self._eof_delivered = False
        self._eof_written = False
        self._closing = False
        self._lost = False
        self._h2_closed = False
        self._write_paused = False
        self._high = STREAM_HIGH_WATER
        self._low = STREAM_HIGH_WATER // 4
        self._deliver_handle: asyncio.Handle | None = None
        self._response: asyncio.Future[None] | None = None

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self._info.get(name, default)

    def __repr__(self) -> str:
        return f"<HboneStream {self.id} {self.authority} via {format_addr(self._info['peername'])}>"

    # -- asyncio.Transport: reading ----------------------------------------------------
    def is_reading(self) -> bool:
        return not (self._read_paused or self._closing or self._lost)

    def pause_reading(self) -> None:
        self._read_paused = True

    def resume_reading(self) -> None:
        if not self._read_paused:
            return
        self._read_paused = False
        self._schedule_deliver()

    # -- asyncio.Transport: writing ----------------------------------------------------
    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self._eof_written:
            raise RuntimeError("Cannot call write() after write_eof()")
        if self._closing or self._lost or not data:
            return
        if type(data) is not bytes:
            data = bytes(data)
        conn = self._conn
        pending = conn.machine.send_data(self.id, data)
        if not conn._flush_scheduled:
            conn.schedule_flush()
        if pending > self._high and not self._write_paused:
            self._write_paused = True
            conn.write_paused.add(self)
            self._call("pause_writing")

    def writelines(self, list_of_data: Any) -> None:
        for data in list_of_data:
            self.write(data)

    def write_eof(self) -> None:
        if self._eof_written or self._closing or self._lost:
            return
        self._eof_written = True
        self._conn.machine.end_stream(self.id)
        self._conn.schedule_flush()

    def can_write_eof(self) -> bool:
        return True

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        if high is None:
            high = 64 * 1024 if low is None else 4 * low
        if low is None:
            low = high // 4
        if not high >= low >= 0:
            raise ValueError(f"high ({high!r}) must be >= low ({low!r}) must be >= 0")
        self._high, self._low = high, low
        pending = self._conn.machine.pending(self.id)
        if not self._write_paused and pending > high:
            self._write_paused = True
            self._conn.write_paused.add(self)
            self._call("pause_writing")
        elif self._write_paused and pending <= low:
            self._resume_writing()

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return self._low, self._high

    def get_write_buffer_size(self) -> int:
        return self._conn.machine.pending(self.id)

    def get_read_buffer_size(self) -> int:
        """Bytes received but not yet delivered (reading paused): at most one window."""
        return sum(len(b) for b in self._rbuf)

    # -- asyncio.BaseTransport -------------------------------------------------------
    def is_closing(self) -> bool:
        return self._closing or self._lost

    def close(self) -> None:
        """Flush what is queued, END_STREAM, then reset the peer's direction if it is
        still open (as closing a socket does). ``connection_lost(None)`` follows."""
        if self._closing or self._lost:
            return
        self._closing = True
        self._drop_rbuf()
        if self._h2_closed:  # both directions are over already
            self._lose(None)
            return
        self._conn.machine.close_stream(self.id)
        self._conn.schedule_flush()

    def abort(self) -> None:
        """RST_STREAM(CANCEL) now, dropping queued data. ``connection_lost(None)`` follows."""
        if self._lost:
            return
        self._closing = True
        self._drop_rbuf()
        if self._h2_closed:
            self._lose(None)
            return
        self._conn.machine.reset_stream(self.id, ErrorCodes.CANCEL)
        self._conn.schedule_flush()

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self._protocol = protocol

    def get_protocol(self) -> asyncio.BaseProtocol:
        assert self._protocol is not None
        return self._protocol

    # -- driven by the connection ----------------------------------------------------
    def _attach(self, protocol: asyncio.BaseProtocol) -> None:
        self._protocol = protocol
        try:
            protocol.connection_made(self)
        except Exception:
            log.exception("HBONE stream %s: connection_made failed", self)
            self.abort()
            return
        if self._rbuf or self._eof_pending or self._h2_closed:
            self._schedule_deliver()

    def _on_data(self, data: bytes) -> None:
        if self._closing:
            self._conn.machine.acknowledge(self.id, len(data))  # dropped: window back
            return
        protocol = self._protocol
        if self._read_paused or protocol is None or self._rbuf:
            self._rbuf.append(data)
            return
        self._conn.machine.acknowledge(self.id, len(data))
        try:
            protocol.data_received(data)  # type: ignore[attr-defined]
        except Exception:
            log.exception("HBONE stream %s: data_received failed", self)
            self.abort()

    def _on_eof(self) -> None:
        if self._closing:
            return
        self._eof_pending = True
        if not (self._read_paused or self._protocol is None or self._rbuf):
            self._deliver()

    def _on_closed(self, error_code: int | None, by_peer: bool) -> None:
        self._h2_closed = True
        if self._response is not None and not self._response.done():
            if by_peer and error_code == ErrorCodes.REFUSED_STREAM:
                reason = "refused the stream (REFUSED_STREAM: it is draining or at its limit)"
            elif by_peer:
                reason = f"reset the stream ({error_code_name(error_code)}) before answering"
            else:
                reason = "stream closed locally before the answer"
            self._response.set_exception(StreamNotAnswered(reason, error_code))
        if self._protocol is None:  # never wired (refused, or answered too late)
            self._lose(None)
            return
        if self._closing or (by_peer and error_code not in (None, ErrorCodes.NO_ERROR)):
            exc = None
            if by_peer and not self._closing:
                exc = ConnectionResetError(
                    f"HBONE stream reset by {format_addr(self._info['peername'])} "
                    f"({error_code_name(error_code)})"
                )
            self._lose(exc)
            return
        # Graceful end: deliver what is buffered and the EOF first.
        if not self._eof_delivered:
            self._eof_pending = True
        self._schedule_deliver()

    def _drop_rbuf(self) -> None:
        """Forget what was received and not delivered, giving its window back."""
        rbuf = self._rbuf
        if rbuf:
            self._conn.machine.acknowledge(self.id, sum(len(b) for b in rbuf))
            rbuf.clear()

    def _schedule_deliver(self) -> None:
        if self._deliver_handle is None and not self._lost:
            self._deliver_handle = self._conn.loop.call_soon(self._deliver)

    def _deliver(self) -> None:
        self._deliver_handle = None
        protocol = self._protocol
        if protocol is None or self._lost:
            return
        machine = self._conn.machine
        rbuf = self._rbuf
        while rbuf and not self._read_paused and not self._closing:
            data = rbuf.popleft()
            machine.acknowledge(self.id, len(data))
            try:
                protocol.data_received(data)  # type: ignore[attr-defined]
            except Exception:
                log.exception("HBONE stream %s: data_received failed", self)
                self.abort()
                return
        if self._eof_pending and not rbuf and not self._read_paused and not self._closing:
            self._eof_pending = False
            self._eof_delivered = True
            try:
                keep_open = protocol.eof_received()  # type: ignore[attr-defined]
            except Exception:
                log.exception("HBONE stream %s: eof_received failed", self)
                self.abort()
                return
            if not keep_open:
                self.close()
        if self._h2_closed and (self._closing or (self._eof_delivered and not rbuf)):
            self._lose(None)
        self._conn.schedule_flush()  # acknowledgements may have queued WINDOW_UPDATEs

    def _resume_writing(self) -> None:
        self._write_paused = False
        self._conn.write_paused.discard(self)
        self._call("resume_writing")

    def _call(self, name: str) -> None:
        protocol = self._protocol
        if protocol is None:
            return
        try:
            getattr(protocol, name)()
        except Exception:
            log.exception("HBONE stream %s: %s failed", self, name)
            self.abort()

    def _lose(self, exc: BaseException | None) -> None:
        """The end: the protocol hears ``connection_lost`` exactly once."""
        if self._lost:
            return
        self._lost = True
        self._closing = True
        self._drop_rbuf()
        if self._deliver_handle is not None:
            self._deliver_handle.cancel()
            self._deliver_handle = None
        if self._response is not None and not self._response.done():
            self._response.set_exception(
                exc
                if isinstance(exc, PeerError)
                else StreamNotAnswered(f"stream ended before the answer ({exc})", None)
            )
        self._conn.stream_gone(self)
        protocol = self._protocol
        if protocol is not None:
            try:
                protocol.connection_lost(exc if isinstance(exc, Exception) else None)
            except Exception:
                log.exception("HBONE stream %s: connection_lost failed", self)


class StreamNotAnswered(Exception):
    """The stream ended before the peer answered its CONNECT; ``error_code`` is the
    RST_STREAM code when the peer reset it (``REFUSED_STREAM``: safe to retry)."""

    def __init__(self, reason: str, error_code: int | None) -> None:
        super().__init__(reason)
        self.error_code = error_code


def error_code_name(code: int | None) -> str:
    """An HTTP/2 error code's name for messages (``closed`` when there is none)."""
    if code is None:
        return "closed"
    try:
        return ErrorCodes(code).name
    except ValueError:
        return f"error {code}"


# -- one TLS connection -------------------------------------------------------------------


class HboneConn(asyncio.BufferedProtocol):
    """The asyncio protocol of one HBONE TLS connection; the app protocol under TLS. The
    client and server connections subclass it (``on_event`` and the other hooks below).

    A buffered protocol: TLS decrypts straight into the connection's read buffer (no
    bytes object per TLS record, no join of them), the machine handles the complete
    frames there and the start of an incomplete one stays for the next read."""

    machine: ClientConnection | ServerConnection
    """The connection's sans-I/O machine; subclasses keep it also under a name of its
    own type (``client_machine``, ``server_machine``): compiled, a subclass cannot narrow it."""

    def __init__(self, loop: asyncio.AbstractEventLoop, peer: Addr) -> None:
        self.loop = loop
        self.peer = peer
        self.transport: asyncio.Transport | None = None
        self.peer_identity = ""
        self.streams: dict[int, HboneStream] = {}
        self.write_paused: set[HboneStream] = set()
        self.lost = False
        self.received_any = False
        self._early: list[bytes] = []
        self._rbuf: bytearray | None = None
        """The read buffer (made on the first read, grown to what TLS asks for: a new one,
        never resized in place, so a view of it may live as long as it does)."""
        self._rview: memoryview | None = None
        """A view of all of ``_rbuf`` (made with it: slicing it costs one view per read)."""
        self._rkeep = 0
        """Bytes at the start of ``_rbuf``: an incomplete frame, completed by the next read."""
        self._flush_scheduled = False
        self._abort_handle: asyncio.TimerHandle | None = None
        self.bytes_out = 0
        """HTTP/2 bytes handed to the TLS transport (what a peer that reads nothing makes
        us hold, with the kernel's share)."""
        self.bytes_in = 0
        """HTTP/2 bytes received (the server's preface timeout looks for the client's)."""

    @property
    def label(self) -> str:
        return format_addr(self.peer)

    def attach(self, transport: asyncio.Transport, identity: str) -> None:
        """TLS is up and the peer is acceptable: start HTTP/2."""
        self.transport = transport
        self.peer_identity = identity
        transport.set_write_buffer_limits(high=TLS_HIGH_WATER)
        self.machine.initiate()
        early, self._early = self._early, []
        for data in early:
            self._receive(data)
        self.flush()

    # -- asyncio.BufferedProtocol ----------------------------------------------------
    def get_buffer(self, sizehint: int) -> memoryview:
        keep = self._rkeep
        want = keep + max(sizehint, READ_MIN)
        buf = self._rbuf
        view = self._rview
        if buf is None or view is None or len(buf) < want:
            grown = bytearray((want + READ_GRANULE - 1) // READ_GRANULE * READ_GRANULE)
            if keep and buf is not None:
                grown[:keep] = buf[:keep]
            self._rbuf = buf = grown
            self._rview = view = memoryview(grown)
        # the kept view, not the bytearray: asyncio's SSL transport reads into slices of
        # what it is given, and a bytearray's slice is a copy (the bytes would be lost)
        return view[keep:] if keep else view

    def buffer_updated(self, nbytes: int) -> None:
        buf = self._rbuf
        view = self._rview
        if buf is None or view is None or nbytes <= 0:
            return
        end = self._rkeep + nbytes
        # (try/finally, not ``with``: compiled, no __enter__/__exit__ calls per read)
        mv = view[:end]
        try:
            if self.transport is None:  # TLS finished but we have not attached yet
                self._early.append(mv.tobytes())
                return
            # Writes made by stream protocols while we dispatch go out with the flush
            # below, not in a callback of their own.
            scheduled, self._flush_scheduled = self._flush_scheduled, True
            self.received_any = True
            self.bytes_in += nbytes
            events, used = self.machine.receive_frames(mv)
            left = end - used
            if left and used:
                view[:left] = mv[used:end]  # the incomplete frame to the front
            self._rkeep = left
        finally:
            mv.release()
        self.dispatch(events)
        self.flush()
        self._flush_scheduled = scheduled and not self.lost

    def _receive(self, data: bytes) -> None:
        self.received_any = True
        self.bytes_in += len(data)
        self.dispatch(self.machine.receive_data(data))

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if self.lost:
            return
        self.lost = True
        if self._abort_handle is not None:
            self._abort_handle.cancel()
            self._abort_handle = None
        self._rbuf = None
        self._rview = None
        self._rkeep = 0
        err = self.lost_error(exc)
        for st in list(self.streams.values()):
            st._lose(err)
        self.streams.clear()
        self.write_paused.clear()
        self.on_lost(exc)

    def pause_writing(self) -> None:
        self.machine.pause_output()

    def resume_writing(self) -> None:
        self.machine.resume_output()
        self.schedule_flush()

    # -- batching ----------------------------------------------------------------------
    def schedule_flush(self) -> None:
        if not self._flush_scheduled and not self.lost:
            self._flush_scheduled = True
            self.loop.call_soon(self.flush)

    def flush(self) -> None:
        """Run events caused by local actions, then write everything queued at once."""
        transport = self.transport
        if transport is None or self.lost:
            self._flush_scheduled = False
            return
        machine = self.machine
        events = machine.take_events()
        while events:
            self.dispatch(events)
            events = machine.take_events()
        self._flush_scheduled = False
        pieces = machine.take_output()
        if pieces:
            self._write(transport, pieces)
        if self.write_paused:
            for st in list(self.write_paused):
                if machine.pending(st.id) <= st._low:
                    st._resume_writing()
        if machine.closed and not transport.is_closing():
            transport.close()
            self._abort_handle = self.loop.call_later(CLOSE_GRACE, self._abort_stuck)

    def _write(self, transport: asyncio.Transport, pieces: list[bytes | memoryview]) -> None:
        """Hand ``pieces`` to TLS in writes of about ``WRITE_CHUNK`` bytes: each write's
        records are read out of TLS as one new bytes object, which stays small enough to
        be reused from the heap rather than mapped and unmapped (page faults) every time."""
        if len(pieces) == 1:  # (the common case: no batch list to build)
            transport.writelines(pieces)
            self.bytes_out += len(pieces[0])
            return
        total = 0
        batch: list[bytes | memoryview] = []
        size = 0
        for piece in pieces:
            batch.append(piece)
            size += len(piece)
            if size >= WRITE_CHUNK:
                transport.writelines(batch)
                total += size
                batch = []
                size = 0
        if batch:
            transport.writelines(batch)
            total += size
        self.bytes_out += total

    def _abort_stuck(self) -> None:
        self._abort_handle = None
        if self.transport is not None and not self.lost:
            self.transport.abort()

    def dispatch(self, events: list[Event]) -> None:
        streams = self.streams
        for ev in events:
            if type(ev) is DataReceived:
                st = streams.get(ev.stream_id)
                if st is not None:
                    st._on_data(ev.data)
                else:  # dropped: the connection window must come back all the same
                    self.machine.acknowledge(ev.stream_id, len(ev.data))
            elif type(ev) is StreamEnded:
                st = streams.get(ev.stream_id)
                if st is not None:
                    st._on_eof()
            elif isinstance(ev, StreamClosed):
                st = streams.get(ev.stream_id)
                if st is not None:
                    st._on_closed(ev.error_code, ev.by_peer)
            elif isinstance(ev, ConnectionFailed):
                warn_once(
                    log,
                    ev.abuse or "protocol_error",
                    "HBONE connection with %s (%s): %s (sent GOAWAY)",
                    self.label,
                    self.peer_identity,
                    ev.reason,
                )
                self.on_failed(ev.reason, ev.abuse)
            else:
                self.on_event(ev)

    # -- for the subclasses ------------------------------------------------------------
    def on_event(self, ev: Event) -> None:
        raise NotImplementedError

    def on_failed(self, reason: str, abuse: str | None) -> None:
        """The peer broke the protocol (``abuse``: or abused it); a GOAWAY went."""

    def on_lost(self, exc: Exception | None) -> None:
        pass

    def lost_error(self, exc: Exception | None) -> Exception:
        return PeerError(f"HBONE connection with {self.label} lost: {exc or 'closed by the peer'}")

    def stream_gone(self, st: HboneStream) -> None:
        self.streams.pop(st.id, None)
        self.write_paused.discard(st)

    def shutdown(self, reason: str, error_code: int = ErrorCodes.NO_ERROR) -> None:
        """End every stream, send the final GOAWAY and close."""
        for st in list(self.streams.values()):
            st._lose(PeerError(reason))
        self.machine.close(error_code, reason)
        if self.transport is not None and not self.lost:
            self.flush()
            self.transport.close()


__all__ = [
    "HBONE_PORT",
    "Addr",
    "HboneConn",
    "HboneStream",
    "StreamNotAnswered",
    "describe_tls_error",
    "error_code_name",
    "format_addr",
    "set_keepalive",
]
