"""HBONE over asyncio: mutual-TLS 1.3 HTTP/2 connections carrying one CONNECT stream per
proxied TCP connection.

Owns the I/O around ``nodeagent.protocol.hbone`` (which owns framing and flow-control
rules):

- ``HboneStream``: one stream as an ``asyncio.Transport`` driving an ``asyncio.Protocol``,
  so the relay's ``UpstreamSide``/``ClientSide`` run on a tunnel unchanged. Writes beyond
  the stream's send window are queued (``pause_writing`` above the high-water mark);
  ``pause_reading`` stops acknowledging, so the peer stops after one stream window.
- ``HboneClientPool``: connections per (source identity, expected peer identity, peer
  address), each carrying many streams; dial, TLS with the source's certificate, check of
  the server's SPIFFE ID, idle close, GOAWAY handling.
- ``start_hbone_server``/``HboneServer``: accept, TLS per connection with the current
  certificate, handshake accounting, CONNECT dispatch to ``on_connect``.

All bytes for the TLS transport are batched into one ``write`` per event-loop callback.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import socket
import ssl
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from nodeagent.errors import ConnectRefusedError, NodeAgentError, PeerError
from nodeagent.identity.tls import ALPN, describe_verify_error, peer_identity
from nodeagent.protocol.hbone import (
    ClientConnection,
    ConnectAccepted,
    ConnectionFailed,
    ConnectRefused,
    ConnectRequested,
    DataReceived,
    ErrorCodes,
    Event,
    GoAwayReceived,
    HboneSettings,
    RequestRejected,
    ServerConnection,
    StreamClosed,
    StreamEnded,
    new_traceparent,
)

log = logging.getLogger("nodeagent.hbone")

HBONE_PORT = 15008
STREAM_HIGH_WATER = 256 * 1024
"""Default write high-water mark of a stream (bytes queued waiting for window)."""
TLS_HIGH_WATER = 1024 * 1024
"""Write high-water mark of the TLS transport under all streams of a connection."""

Addr = tuple[str, int]
PoolKey = tuple[str, str, Addr]


def _addr(a: Any) -> str:
    if isinstance(a, tuple) and len(a) >= 2:
        return f"[{a[0]}]:{a[1]}" if ":" in str(a[0]) else f"{a[0]}:{a[1]}"
    return str(a)


def _keepalive(sock: socket.socket) -> None:
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
        conn: _Conn,
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
        return f"<HboneStream {self.id} {self.authority} via {_addr(self._info['peername'])}>"

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
        self._rbuf.clear()
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
        self._rbuf.clear()
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
                reason = f"reset the stream ({_code_name(error_code)}) before answering"
            else:
                reason = "stream closed locally before the answer"
            self._response.set_exception(_StreamNotAnswered(reason, error_code))
        if self._protocol is None:  # never wired (refused, or answered too late)
            self._lose(None)
            return
        if self._closing or (by_peer and error_code not in (None, ErrorCodes.NO_ERROR)):
            exc = None
            if by_peer and not self._closing:
                exc = ConnectionResetError(
                    f"HBONE stream reset by {_addr(self._info['peername'])} "
                    f"({_code_name(error_code)})"
                )
            self._lose(exc)
            return
        # Graceful end: deliver what is buffered and the EOF first.
        if not self._eof_delivered:
            self._eof_pending = True
        self._schedule_deliver()

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
        self._rbuf.clear()
        if self._deliver_handle is not None:
            self._deliver_handle.cancel()
            self._deliver_handle = None
        if self._response is not None and not self._response.done():
            self._response.set_exception(
                exc
                if isinstance(exc, PeerError)
                else _StreamNotAnswered(f"stream ended before the answer ({exc})", None)
            )
        self._conn.stream_gone(self)
        protocol = self._protocol
        if protocol is not None:
            try:
                protocol.connection_lost(exc if isinstance(exc, Exception) else None)
            except Exception:
                log.exception("HBONE stream %s: connection_lost failed", self)


class _StreamNotAnswered(Exception):
    def __init__(self, reason: str, error_code: int | None) -> None:
        super().__init__(reason)
        self.error_code = error_code


def _code_name(code: int | None) -> str:
    if code is None:
        return "closed"
    try:
        return ErrorCodes(code).name
    except ValueError:
        return f"error {code}"


# -- one TLS connection -------------------------------------------------------------------


class _Conn(asyncio.Protocol):
    """The asyncio protocol of one HBONE TLS connection; the app protocol under TLS."""

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
        self._flush_scheduled = False

    @property
    def label(self) -> str:
        return _addr(self.peer)

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

    # -- asyncio.Protocol ------------------------------------------------------------
    def data_received(self, data: bytes) -> None:
        if self.transport is None:  # TLS finished but we have not attached yet
            self._early.append(data)
            return
        # Writes made by stream protocols while we dispatch go out with the flush below,
        # not in a callback of their own.
        scheduled, self._flush_scheduled = self._flush_scheduled, True
        self.received_any = True
        self.dispatch(self.machine.receive_data(data))
        self.flush()
        self._flush_scheduled = scheduled and not self.lost

    def _receive(self, data: bytes) -> None:
        self.received_any = True
        self.dispatch(self.machine.receive_data(data))

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if self.lost:
            return
        self.lost = True
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
        data = machine.data_to_send()
        if data:
            transport.write(data)
        if self.write_paused:
            for st in list(self.write_paused):
                if machine.pending(st.id) <= st._low:
                    st._resume_writing()
        if machine.closed and not transport.is_closing():
            transport.close()

    def dispatch(self, events: list[Event]) -> None:
        streams = self.streams
        for ev in events:
            if type(ev) is DataReceived:
                st = streams.get(ev.stream_id)
                if st is not None:
                    st._on_data(ev.data)
            elif type(ev) is StreamEnded:
                st = streams.get(ev.stream_id)
                if st is not None:
                    st._on_eof()
            elif isinstance(ev, StreamClosed):
                st = streams.get(ev.stream_id)
                if st is not None:
                    st._on_closed(ev.error_code, ev.by_peer)
            elif isinstance(ev, ConnectionFailed):
                log.warning("HBONE connection with %s: %s (sent GOAWAY)", self.label, ev.reason)
                self.on_failed(ev.reason)
            else:
                self.on_event(ev)

    # -- for the subclasses ------------------------------------------------------------
    def on_event(self, ev: Event) -> None:
        raise NotImplementedError

    def on_failed(self, reason: str) -> None:
        pass

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


# -- client pool --------------------------------------------------------------------------


class _ClientConn(_Conn):
    def __init__(
        self,
        pool: HboneClientPool,
        key: PoolKey,
        settings: HboneSettings,
    ) -> None:
        super().__init__(pool.loop, key[2])
        self.pool = pool
        self.key = key
        self.client_machine = self.machine = ClientConnection(settings)
        self.ready: asyncio.Future[None] = pool.loop.create_future()
        self.ready.add_done_callback(_retrieve)
        self.reserved = 0
        self.usable = True
        self._idle: asyncio.TimerHandle | None = None

    @property
    def capacity(self) -> int:
        return min(self.pool.max_streams_per_conn, self.client_machine.peer_max_streams)

    def reserve(self) -> None:
        self.reserved += 1
        if self._idle is not None:
            self._idle.cancel()
            self._idle = None

    def unreserve(self) -> None:
        self.reserved -= 1
        if self.reserved <= 0 and not self.lost:
            if not self.usable:
                self.shutdown("HBONE connection retired")
            elif self.ready.done() and self._idle is None:
                self._idle = self.loop.call_later(self.pool.idle_timeout, self._idle_close)

    def _idle_close(self) -> None:
        self._idle = None
        if self.reserved <= 0:
            self.pool._forget(self)
            self.shutdown("idle")

    def stream_gone(self, st: HboneStream) -> None:
        if st.id in self.streams:
            super().stream_gone(st)
            self.unreserve()

    def open(self, authority: str, headers: Mapping[str, str]) -> HboneStream:
        sid = self.client_machine.send_connect(authority, headers)
        st = HboneStream(self, sid, authority, headers)
        st._response = self.loop.create_future()
        st._response.add_done_callback(_retrieve)
        self.streams[sid] = st
        self.schedule_flush()
        return st

    def on_event(self, ev: Event) -> None:
        if isinstance(ev, ConnectAccepted):
            st = self.streams.get(ev.stream_id)
            if st is not None and st._response is not None and not st._response.done():
                st._response.set_result(None)
        elif isinstance(ev, ConnectRefused):
            st = self.streams.get(ev.stream_id)
            if st is not None and st._response is not None and not st._response.done():
                reason = f": {ev.reason}" if ev.reason else ""
                st._response.set_exception(
                    ConnectRefusedError(
                        f"HBONE peer {self.label} ({self.peer_identity}) refused CONNECT "
                        f"{st.authority} with status {ev.status}{reason}",
                        ev.status,
                    )
                )
        elif isinstance(ev, GoAwayReceived):
            self.usable = False
            self.pool._forget(self)
            if ev.error_code != ErrorCodes.NO_ERROR:
                debug = f": {ev.debug}" if ev.debug else ""
                self.shutdown(
                    f"HBONE peer {self.label} sent GOAWAY ({_code_name(ev.error_code)}){debug}"
                )
            elif self.reserved <= 0:
                self.shutdown("peer sent GOAWAY")

    def on_failed(self, reason: str) -> None:
        self.usable = False
        self.pool._forget(self)

    def on_lost(self, exc: Exception | None) -> None:
        self.usable = False
        if self._idle is not None:
            self._idle.cancel()
            self._idle = None
        self.pool._forget(self)
        self.pool._all.discard(self)

    def lost_error(self, exc: Exception | None) -> Exception:
        if not self.received_any:
            detail = f" ({describe_tls_error(exc)})" if isinstance(exc, ssl.SSLError) else ""
            return PeerError(
                f"HBONE peer {self.label} closed the connection right after the TLS "
                f"handshake{detail}: it probably rejected our certificate for {self.key[0]} "
                "(expired? not from a CA it trusts? its HBONE log names the reason)"
            )
        return super().lost_error(exc)


def _retrieve(fut: asyncio.Future[Any]) -> None:
    """Mark a shared future's exception as seen (several waiters, or none)."""
    if not fut.cancelled():
        fut.exception()


class HboneClientPool:
    """Outbound HBONE: pooled mutual-TLS HTTP/2 connections, one CONNECT stream per
    proxied connection.

    ``dial(addr)`` returns a connected non-blocking TCP socket to ``addr`` (the proxy dials
    from the source pod's netns with its mark). ``context_for(source_identity)`` returns
    the client ``SSLContext`` presenting that identity.
    """

    def __init__(
        self,
        dial: Callable[[Addr], Awaitable[socket.socket]],
        context_for: Callable[[str], ssl.SSLContext],
        connect_timeout: float = 5.0,
        max_streams_per_conn: int = 100,
        *,
        response_timeout: float = 10.0,
        idle_timeout: float = 60.0,
        settings: HboneSettings | None = None,
    ) -> None:
        self.loop = asyncio.get_running_loop()
        self._dial = dial
        self._context_for = context_for
        self.connect_timeout = connect_timeout
        self.max_streams_per_conn = max_streams_per_conn
        self.response_timeout = response_timeout
        self.idle_timeout = idle_timeout
        self.settings = settings or HboneSettings()
        self._conns: dict[PoolKey, list[_ClientConn]] = {}
        self._all: set[_ClientConn] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._closed = False
        self._dials = 0
        self._dial_failures = 0

    async def open_stream(
        self,
        *,
        source_identity: str,
        expected_identity: str,
        peer: Addr,
        authority: str,
        headers: Mapping[str, str],
        protocol: asyncio.BaseProtocol,
    ) -> HboneStream:
        """A CONNECT stream to ``authority`` through the HBONE server at ``peer``, wired
        to ``protocol`` (``connection_made`` has been called) once the server said 200.

        Raises ``PeerError`` for every failure, naming the peer and what to check.
        """
        if "traceparent" not in headers:
            headers = {**headers, "traceparent": new_traceparent()}
        key: PoolKey = (source_identity, expected_identity, peer)
        for _attempt in range(3):
            conn, reused = await self._acquire(key)
            if not conn.client_machine.can_open_stream():
                # The peer's stream limit arrived lower than ours, or it is going away.
                conn.usable = conn.usable and conn.client_machine.goaway_received is None
                conn.unreserve()
                continue
            stream = conn.open(authority, headers)
            response = stream._response
            assert response is not None
            try:
                await asyncio.wait_for(asyncio.shield(response), self.response_timeout)
            except TimeoutError:
                stream.abort()
                raise PeerError(
                    f"HBONE peer {_addr(peer)} did not answer CONNECT {authority} within "
                    f"{self.response_timeout:g}s"
                ) from None
            except asyncio.CancelledError:
                stream.abort()
                raise
            except _StreamNotAnswered as e:
                if e.error_code == ErrorCodes.REFUSED_STREAM:
                    continue  # never processed: safe to retry on another connection
                raise PeerError(f"HBONE peer {_addr(peer)}: {e}") from None
            except PeerError:
                if not stream._lost:
                    stream.abort()
                if reused and conn.lost and _attempt == 0:
                    continue  # a pooled connection died under us: one more try on a new one
                raise
            stream._attach(protocol)
            return stream
        raise PeerError(
            f"HBONE peer {_addr(peer)} kept refusing new streams for CONNECT {authority}"
        )

    async def _acquire(self, key: PoolKey) -> tuple[_ClientConn, bool]:
        """A connection with a stream slot reserved, and whether it was already up."""
        if self._closed:
            raise PeerError("HBONE client pool is closed")
        conns = self._conns.setdefault(key, [])
        for conn in conns:
            if conn.usable and conn.reserved < conn.capacity:
                conn.reserve()
                break
        else:
            conn = _ClientConn(self, key, self.settings)
            conns.append(conn)
            self._all.add(conn)
            conn.reserve()
            self._spawn(self._connect(conn))
        reused = conn.ready.done()
        try:
            await asyncio.shield(conn.ready)
        except BaseException:
            conn.unreserve()
            raise
        return conn, reused

    def _spawn(self, coro: Any) -> None:
        task = self.loop.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _connect(self, conn: _ClientConn) -> None:
        source, expected, peer = conn.key
        self._dials += 1
        try:
            transport = await self._handshake(conn, source, peer)
            ssl_object = transport.get_extra_info("ssl_object")
            got = peer_identity(ssl_object) if ssl_object is not None else None
            alpn = ssl_object.selected_alpn_protocol() if ssl_object is not None else None
            if alpn != ALPN:
                transport.abort()
                raise PeerError(
                    f"HBONE peer {_addr(peer)} did not negotiate ALPN {ALPN} (got {alpn})"
                )
            if got != expected:
                transport.abort()
                raise PeerError(
                    f"HBONE {_addr(peer)}: peer presented {got or 'no SPIFFE ID'}, "
                    f"expected {expected}"
                )
            if self._closed:
                transport.abort()
                raise PeerError("HBONE client pool is closed")
        except BaseException as e:
            self._dial_failures += 1
            conn.usable = False
            self._forget(conn)
            self._all.discard(conn)
            if not conn.ready.done():
                if isinstance(e, NodeAgentError):
                    err: Exception = e
                elif isinstance(e, asyncio.CancelledError):
                    err = PeerError("HBONE client pool is closed")
                else:
                    err = PeerError(f"HBONE {_addr(peer)}: {e!r}")
                conn.ready.set_exception(err)
            if not isinstance(e, Exception):
                raise
            return
        conn.attach(transport, got)
        conn.ready.set_result(None)
        if conn.reserved <= 0:
            conn.reserve()
            conn.unreserve()  # everyone left while we connected: start the idle timer

    async def _handshake(self, conn: _ClientConn, source: str, peer: Addr) -> asyncio.Transport:
        """Dial and TLS within ``connect_timeout``; every failure as an actionable PeerError."""
        unreachable = (
            f"HBONE port {peer[1]} on {peer[0]} unreachable: is a network policy blocking it?"
        )
        try:
            async with asyncio.timeout(self.connect_timeout):
                sock = await self._dial(peer)
        except TimeoutError:
            raise PeerError(f"{unreachable} (timed out after {self.connect_timeout:g}s)") from None
        except PeerError as e:
            raise PeerError(f"{unreachable} ({e})") from None
        except OSError as os_error:  # (one name per exception type: see nodeagent/native.py)
            raise PeerError(f"{unreachable} ({os_error.strerror or os_error})") from None
        try:
            _keepalive(sock)
            ctx = self._context_for(source)
        except BaseException:
            sock.close()
            raise
        try:
            # ``server_hostname`` is an IP literal: Python then sends no SNI, and the
            # contexts check no hostname (the SPIFFE ID is checked after the handshake).
            # ``conn`` buffers what TLS hands it before ``attach`` (see data_received).
            tls, _ = await self.loop.create_connection(
                lambda: conn,
                sock=sock,
                ssl=ctx,
                server_hostname=peer[0],
                ssl_handshake_timeout=self.connect_timeout,
            )
        except (OSError, TimeoutError) as tls_error:  # ssl.SSLError is an OSError
            sock.close()
            raise PeerError(
                f"HBONE TLS with {_addr(peer)} failed: {describe_tls_error(tls_error)}"
            ) from None
        except BaseException:
            sock.close()
            raise
        return tls

    def _forget(self, conn: _ClientConn) -> None:
        """No new streams on ``conn`` (its live streams carry on)."""
        conns = self._conns.get(conn.key)
        if conns is not None and conn in conns:
            conns.remove(conn)
            if not conns:
                del self._conns[conn.key]

    def stats(self) -> dict[str, int]:
        live = [c for c in self._all if not c.lost]
        return {
            "connections": sum(1 for c in live if c.ready.done() and c.transport is not None),
            "connecting": sum(1 for c in live if not c.ready.done()),
            "streams": sum(len(c.streams) for c in live),
            "dials": self._dials,
            "dial_failures": self._dial_failures,
        }

    def close(self) -> None:
        """Close every connection now; their streams see ``connection_lost``."""
        self._closed = True
        for task in list(self._tasks):
            task.cancel()
        for conn in list(self._all):
            if conn.transport is not None and not conn.lost:
                conn.shutdown("HBONE client pool closed")
        self._all.clear()
        self._conns.clear()


# -- server -------------------------------------------------------------------------------


@dataclass(frozen=True)
class ConnectRequest:
    """One CONNECT received on the HBONE port, from a verified mesh workload."""

    peer_identity: str
    """The client's SPIFFE ID, from its verified certificate."""
    peer_addr: Addr
    """The tunnel's source address (the other node's proxy)."""
    authority: str
    """``<destination ip>:<port>`` as the client sent it."""
    destination: Addr
    """The authority parsed: (ip, port)."""
    headers: Mapping[str, str] = field(default_factory=dict)
    """Regular request headers (``baggage``, ``forwarded``, ``traceparent``, ...)."""
    local_addr: Addr | None = None
    """The address the client dialled (this node's, port 15008)."""
    stream_id: int = 0


@dataclass(frozen=True)
class ConnectRefusal:
    """``on_connect``'s answer when the stream must not be opened."""

    status: int
    """503 destination refused/unreachable, 401/403 identity or policy, ..."""
    reason: str


OnConnect = Callable[[ConnectRequest], Awaitable[asyncio.BaseProtocol | ConnectRefusal]]


class _ServerConn(_Conn):
    def __init__(self, server: HboneServer, peer: Addr) -> None:
        super().__init__(server.loop, peer)
        self.server = server
        self.server_machine = self.machine = ServerConnection(server.settings)
        self.local_addr: Addr | None = None

    def on_event(self, ev: Event) -> None:
        if isinstance(ev, ConnectRequested):
            st = HboneStream(self, ev.stream_id, ev.authority, ev.headers)
            self.streams[ev.stream_id] = st
            req = ConnectRequest(
                peer_identity=self.peer_identity,
                peer_addr=self.peer,
                authority=ev.authority,
                destination=ev.destination,
                headers=ev.headers,
                local_addr=self.local_addr,
                stream_id=ev.stream_id,
            )
            self.server._streams_total += 1
            self.server._spawn(self.server._serve_stream(self, st, req))
        elif isinstance(ev, RequestRejected):
            self.server._rejected += 1
            log.info(
                "HBONE %s (%s) stream %d answered %d: %s",
                self.label,
                self.peer_identity,
                ev.stream_id,
                ev.status,
                ev.reason,
            )
        elif isinstance(ev, GoAwayReceived) and (
            ev.error_code != ErrorCodes.NO_ERROR or not self.streams
        ):
            self.shutdown("client went away")

    def on_failed(self, reason: str) -> None:
        self.server._protocol_errors += 1

    def on_lost(self, exc: Exception | None) -> None:
        self.server._conns.discard(self)
        self.server._check_drained()

    def stream_gone(self, st: HboneStream) -> None:
        super().stream_gone(st)
        m = self.machine
        going = m.goaway_sent is not None or m.goaway_received is not None
        if going and not self.streams and not self.lost:
            self.shutdown("drained")


class HboneServer:
    """The HBONE listener (port 15008): mutual TLS, then CONNECT streams to ``on_connect``.

    ``context`` is an ``SSLContext`` or a callable returning the current one; it is asked
    per accepted connection, so a rotated certificate serves new connections.
    """

    def __init__(
        self,
        context: ssl.SSLContext | Callable[[], ssl.SSLContext],
        on_connect: OnConnect,
        *,
        handshake_timeout: float = 10.0,
        settings: HboneSettings | None = None,
    ) -> None:
        self.loop = asyncio.get_running_loop()
        self._context = context
        self._on_connect = on_connect
        self.handshake_timeout = handshake_timeout
        self.settings = settings or HboneSettings()
        self._sock: socket.socket | None = None
        self._accepting: asyncio.Task[None] | None = None
        self._conns: set[_ServerConn] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._closing = False
        self._drained = asyncio.Event()
        self._handshakes = 0
        self._handshake_failures = 0
        self._streams_total = 0
        self._refused = 0
        self._rejected = 0
        self._protocol_errors = 0

    async def _start(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        self._sock = sock
        self._accepting = self.loop.create_task(self._accept_loop(sock))

    async def _accept_loop(self, sock: socket.socket) -> None:
        # Sockets are accepted here and TLS is layered with ``connect_accepted_socket``
        # (not ``create_server(ssl=...)``, whose handshake failures nobody hears about, nor
        # ``start_tls`` on a raw transport, which uvloop may feed bytes before it is called).
        while True:
            try:
                conn_sock, _ = await self.loop.sock_accept(sock)
            except OSError as e:
                if self._closing:
                    return
                if e.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    log.error("HBONE accept failed: %s; pausing accepts for 1s", e)
                    await asyncio.sleep(1.0)
                continue
            conn_sock.setblocking(False)
            _keepalive(conn_sock)
            self._spawn(self._handshake(conn_sock))

    @property
    def sockets(self) -> tuple[socket.socket, ...]:
        return (self._sock,) if self._sock is not None and not self._closing else ()

    def stats(self) -> dict[str, int]:
        return {
            "connections": len(self._conns),
            "streams": sum(len(c.streams) for c in self._conns),
            "handshakes": self._handshakes,
            "handshake_failures": self._handshake_failures,
            "streams_total": self._streams_total,
            "streams_refused": self._refused,
            "requests_rejected": self._rejected,
            "protocol_errors": self._protocol_errors,
        }

    def _spawn(self, coro: Any) -> None:
        task = self.loop.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            exc = task.exception()
            log.error("HBONE server task failed: %r", exc, exc_info=exc)

    def _handshake_failed(self, peer: Any, reason: str) -> None:
        self._handshake_failures += 1
        log.warning("HBONE handshake from %s refused: %s", _addr(peer), reason)

    async def _handshake(self, sock: socket.socket) -> None:
        try:
            peer = sock.getpeername()
            local = sock.getsockname()
            ctx = self._context() if callable(self._context) else self._context
        except Exception as e:
            sock.close()
            log.error("HBONE: cannot serve an accepted connection: %r", e)
            return
        if self._closing:
            sock.close()
            return
        conn = _ServerConn(self, peer)
        conn.local_addr = local
        try:
            tls, _ = await self.loop.connect_accepted_socket(
                lambda: conn, sock, ssl=ctx, ssl_handshake_timeout=self.handshake_timeout
            )
        except (OSError, TimeoutError) as tls_error:  # ssl.SSLError is an OSError
            self._handshake_failed(peer, describe_tls_error(tls_error))
            return
        ssl_object = tls.get_extra_info("ssl_object")
        alpn = ssl_object.selected_alpn_protocol() if ssl_object is not None else None
        identity = peer_identity(ssl_object) if ssl_object is not None else None
        if alpn != ALPN:
            tls.abort()
            self._handshake_failed(peer, f"client did not negotiate ALPN {ALPN} (got {alpn})")
            return
        if identity is None:
            tls.abort()
            self._handshake_failed(
                peer, "client certificate carries no SPIFFE ID (exactly one spiffe:// URI SAN)"
            )
            return
        if self.closing():  # a call: close() may have run during the handshake
            tls.abort()
            return
        self._handshakes += 1
        self._conns.add(conn)
        conn.attach(tls, identity)

    async def _serve_stream(self, conn: _ServerConn, st: HboneStream, req: ConnectRequest) -> None:
        try:
            result = await self._on_connect(req)
        except Exception as e:
            log.exception("HBONE on_connect failed for %s -> %s", req.peer_identity, req.authority)
            result = ConnectRefusal(500, f"internal error: {e!r}")
        machine = conn.server_machine
        if isinstance(result, ConnectRefusal):
            self._refused += 1
            if not st._lost:
                machine.refuse(st.id, result.status, result.reason)
                conn.schedule_flush()
            return
        if st._lost or st._closing:
            # The client reset the stream meanwhile: give the protocol its whole life.
            result.connection_made(st)
            result.connection_lost(
                PeerError(f"HBONE stream to {req.authority} ended by the client before the answer")
            )
            return
        machine.accept(st.id)
        conn.schedule_flush()
        st._attach(result)

    def closing(self) -> bool:
        """Whether ``close`` was called."""
        return self._closing

    def _check_drained(self) -> None:
        if self._closing and not self._conns:
            self._drained.set()

    def close(self) -> None:
        """Stop accepting (and close the listening socket); send a graceful GOAWAY on
        every connection: open streams finish, new ones are refused, and each connection
        closes once it is empty."""
        if self._closing:
            return
        self._closing = True
        if self._accepting is not None:
            self._accepting.cancel()
        if self._sock is not None:
            self._sock.close()
        for conn in list(self._conns):
            conn.machine.drain()
            if conn.streams:
                conn.flush()
            else:
                conn.shutdown("server closing")
        self._check_drained()

    def abort(self) -> None:
        """Close every connection now (streams see ``connection_lost``)."""
        self.close()
        for task in list(self._tasks):
            task.cancel()
        for conn in list(self._conns):
            conn.shutdown("HBONE server shutting down")
            if conn.transport is not None:
                conn.transport.abort()
        self._conns.clear()
        self._check_drained()

    async def wait_closed(self) -> None:
        """Until the listener is closed and every connection has ended."""
        if self._accepting is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._accepting
        self._check_drained()
        await self._drained.wait()


async def start_hbone_server(
    sock: socket.socket,
    context: ssl.SSLContext | Callable[[], ssl.SSLContext],
    on_connect: OnConnect,
    *,
    handshake_timeout: float = 10.0,
    settings: HboneSettings | None = None,
) -> HboneServer:
    """Serve HBONE on ``sock`` (bound, listening, non-blocking)."""
    server = HboneServer(
        context, on_connect, handshake_timeout=handshake_timeout, settings=settings
    )
    await server._start(sock)
    return server


__all__ = [
    "HBONE_PORT",
    "ConnectRefusal",
    "ConnectRequest",
    "HboneClientPool",
    "HboneServer",
    "HboneStream",
    "describe_tls_error",
    "start_hbone_server",
]
