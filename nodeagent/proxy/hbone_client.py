"""Outbound HBONE: the client pool, mutual-TLS HTTP/2 connections per (source identity,
expected peer identity, peer address), each carrying many CONNECT streams.

Owns dialling, TLS with the source's certificate, the check of the server's SPIFFE ID and
ALPN, stream slots per connection, retries of streams that were never processed, idle
close and GOAWAY handling. The connection and stream machinery is ``hbone``'s; this
module must not accept connections (``hbone_server`` does).
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from nodeagent.errors import ConnectRefusedError, NodeAgentError, PeerError
from nodeagent.identity.tls import ALPN, peer_identity
from nodeagent.protocol.hbone import (
    ClientConnection,
    ConnectAccepted,
    ConnectRefused,
    ErrorCodes,
    Event,
    GoAwayReceived,
    HboneSettings,
    new_traceparent,
)
from nodeagent.proxy.hbone import (
    Addr,
    HboneConn,
    HboneStream,
    StreamNotAnswered,
    describe_tls_error,
    error_code_name,
    format_addr,
    set_keepalive,
)

PoolKey = tuple[str, str, Addr]


class _ClientConn(HboneConn):
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
        self.goaway = ""
        """The peer's GOAWAY, for messages (``""`` until one arrived)."""
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
            debug = f": {ev.debug}" if ev.debug else ""
            self.goaway = f"GOAWAY ({error_code_name(ev.error_code)}){debug}"
            if ev.error_code != ErrorCodes.NO_ERROR:
                self.shutdown(f"HBONE peer {self.label} sent {self.goaway}")
            elif self.reserved <= 0:
                self.shutdown("peer sent GOAWAY")

    def on_failed(self, reason: str, abuse: str | None) -> None:
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


async def _answer(
    loop: asyncio.AbstractEventLoop, response: asyncio.Future[None], timeout: float
) -> None:
    """Wait for a CONNECT's answer for at most ``timeout`` seconds (then ``TimeoutError``).
    A timer, not ``wait_for(shield(...))``: those two build three futures and four
    callbacks per tunnel in Python. Cancelled, the response is cancelled too: its setters
    all check ``done()``."""
    timer = loop.call_later(timeout, _time_out, response)
    try:
        await response
    finally:
        timer.cancel()


def _time_out(fut: asyncio.Future[None]) -> None:
    """No answer to a CONNECT in time (``open_stream``'s timer)."""
    if not fut.done():
        fut.set_exception(TimeoutError())


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
        refusal = ""
        for _attempt in range(3):
            conn, reused = await self._acquire(key)
            if not conn.client_machine.can_open_stream():
                # The peer's stream limit arrived lower than ours, or it is going away.
                conn.usable = conn.usable and conn.client_machine.goaway_received is None
                conn.unreserve()
                refusal = conn.goaway or refusal
                continue
            stream = conn.open(authority, headers)
            response = stream._response
            assert response is not None
            try:
                await _answer(conn.loop, response, self.response_timeout)
            except TimeoutError:
                stream.abort()
                raise PeerError(
                    f"HBONE peer {format_addr(peer)} did not answer CONNECT {authority} within "
                    f"{self.response_timeout:g}s"
                ) from None
            except asyncio.CancelledError:
                stream.abort()
                raise
            except StreamNotAnswered as e:
                if e.error_code == ErrorCodes.REFUSED_STREAM:
                    refusal = conn.goaway or str(e)
                    continue  # never processed: safe to retry on another connection
                raise PeerError(f"HBONE peer {format_addr(peer)}: {e}") from None
            except PeerError:
                if not stream._lost:
                    stream.abort()
                if reused and conn.lost and _attempt == 0:
                    continue  # a pooled connection died under us: one more try on a new one
                raise
            if stream._lost:  # the 200 and a RST_STREAM came in one read: nothing to wire
                raise PeerError(
                    f"HBONE peer {format_addr(peer)} accepted CONNECT {authority}, then reset "
                    "the stream before any byte (the destination closed the connection)"
                )
            stream._attach(protocol)
            return stream
        last = f" (last: {refusal})" if refusal else ""
        raise PeerError(
            f"HBONE peer {format_addr(peer)} kept refusing new streams for CONNECT {authority}"
            f"{last}"
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
                    f"HBONE peer {format_addr(peer)} did not negotiate ALPN {ALPN} (got {alpn})"
                )
            if got != expected:
                transport.abort()
                raise PeerError(
                    f"HBONE {format_addr(peer)}: peer presented {got or 'no SPIFFE ID'}, "
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
                    err = PeerError(f"HBONE {format_addr(peer)}: {e!r}")
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
            set_keepalive(sock)
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
                f"HBONE TLS with {format_addr(peer)} failed: {describe_tls_error(tls_error)}"
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


__all__ = ["HboneClientPool"]
