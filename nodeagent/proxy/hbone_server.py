"""Inbound HBONE: the listener (port 15008), mutual TLS per accepted connection with the
current certificate, handshake accounting, and each CONNECT handed to ``on_connect``.

Owns accepting, the check of the client's ALPN and SPIFFE ID, the ``ConnectRequest`` /
``ConnectRefusal`` exchange with the proxy, answering 200 or the refusal, and a graceful
drain on close. What a CONNECT may reach is ``on_connect``'s decision, not this module's;
the connection and stream machinery is ``hbone``'s.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import socket
import ssl
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from nodeagent.errors import PeerError
from nodeagent.identity.tls import ALPN, peer_identity
from nodeagent.protocol.hbone import (
    ConnectRequested,
    ErrorCodes,
    Event,
    GoAwayReceived,
    HboneSettings,
    RequestRejected,
    ServerConnection,
)
from nodeagent.proxy.hbone import (
    Addr,
    HboneConn,
    HboneStream,
    describe_tls_error,
    format_addr,
    set_keepalive,
)
from nodeagent.proxy.limits import MAX_CONNECTIONS_PER_IDENTITY, ListenerSlots
from nodeagent.proxy.peerwarn import warn_once
from nodeagent.telemetry.metrics import Metrics

log = logging.getLogger("nodeagent.hbone")


PEER_ERRORS = (
    "stream_error",
    "premature_reset",
    "protocol_error",
    "rapid_reset",
    "control_flood",
    "connection_limit",
)
"""What ``nodeagent_http2_peer_errors_total`` counts (``kind``); ``stats`` has each + "s"."""


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


PREFACE_BYTES = 24 + 9
"""The client's connection preface and the header of its SETTINGS frame."""


class _ServerConn(HboneConn):
    def __init__(self, server: HboneServer, peer: Addr) -> None:
        super().__init__(server.loop, peer)
        self.server = server
        self.server_machine = self.machine = ServerConnection(server.settings)
        self.local_addr: Addr | None = None
        self.counted = False
        """Counted in ``HboneServer._per_identity``."""
        self.slot = False
        """Holds a slot of the connection caps (``HboneServer._slots``)."""
        self.idle_since = self.started = 0.0
        """Loop time the last stream ended (or the connection started)."""
        self._timer: asyncio.TimerHandle | None = None

    def start_timers(self) -> None:
        """After ``attach``: the preface timeout, and the idle timeout."""
        self.idle_since = self.started = self.loop.time()
        self._tick()

    def _tick(self) -> None:
        # One timer, re-armed from ``idle_since``: a stream's start and end cost no timer.
        self._timer = None
        if self.lost or self.machine.closed:
            return
        server = self.server
        now = self.loop.time()
        no_preface = self.bytes_in < PREFACE_BYTES
        if no_preface and now >= self.started + server.preface_timeout - 0.001:
            server._timed_out(self, "preface_timeout")
            return
        if self.streams:
            due = now + server.idle_timeout
        else:
            due = self.idle_since + server.idle_timeout
            if now >= due - 0.001:
                server._timed_out(self, "idle_timeout")
                return
        if no_preface:
            due = min(due, self.started + server.preface_timeout)
        self._timer = self.loop.call_at(due, self._tick)

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

    def refuse(self, transport: asyncio.Transport, identity: str, reason: str) -> None:
        """Our SETTINGS and a final GOAWAY(ENHANCE_YOUR_CALM), then close: nothing the
        client sent is looked at."""
        self.transport = transport
        self.peer_identity = identity
        self._early.clear()
        self.machine.initiate()
        self.machine.close(ErrorCodes.ENHANCE_YOUR_CALM, reason)
        self.flush()

    def on_failed(self, reason: str, abuse: str | None) -> None:
        self.server._count(abuse or "protocol_error")
        if not self.streams and not self.machine.closed:  # a graceful GOAWAY: nothing to finish
            self.shutdown(reason, ErrorCodes.ENHANCE_YOUR_CALM)

    def on_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.server._give_slot(self)
        if self.counted:
            self.server._identity_gone(self.peer_identity)
        m = self.server_machine
        if m.stream_errors:
            self.server._count("stream_error", m.stream_errors)
        if m.premature_resets:
            self.server._count("premature_reset", m.premature_resets)
        self.server._conns.discard(self)
        self.server._check_drained()

    def stream_gone(self, st: HboneStream) -> None:
        super().stream_gone(st)
        if not self.streams:
            self.idle_since = self.loop.time()
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
        metrics: Metrics | None = None,
        max_connections_per_identity: int = MAX_CONNECTIONS_PER_IDENTITY,
        slots: ListenerSlots | None = None,
        idle_timeout: float = 3600.0,
        preface_timeout: float = 10.0,
    ) -> None:
        self.loop = asyncio.get_running_loop()
        self._slots = slots
        self.idle_timeout = idle_timeout
        self.preface_timeout = preface_timeout
        self._timeouts = {"idle_timeout": 0, "preface_timeout": 0}
        self.max_connections_per_identity = max_connections_per_identity
        self._per_identity: dict[str, int] = {}
        self._metrics = metrics
        self._peer_errors = dict.fromkeys(PEER_ERRORS, 0)
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
            if self._slots is not None and not self._slots.take():
                conn_sock.close()  # past a connection cap: counted and logged by the caps
                continue
            conn_sock.setblocking(False)
            set_keepalive(conn_sock)
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
            **{f"{k}s": n for k, n in self._peer_errors.items()},
            **{f"{k}s": n for k, n in self._timeouts.items()},
            # (the metric counts those of a connection when it ends)
            "stream_errors": self._peer_errors["stream_error"]
            + sum(c.server_machine.stream_errors for c in self._conns),
            "premature_resets": self._peer_errors["premature_reset"]
            + sum(c.server_machine.premature_resets for c in self._conns),
        }

    def _count(self, kind: str, n: int = 1) -> None:
        """A peer's error or abuse of ``kind`` (one of ``PEER_ERRORS``), ``n`` times."""
        self._peer_errors[kind] += n
        if self._metrics is not None:
            self._metrics.h2_peer_errors.labels("hbone", kind).inc(n)

    def _spawn(self, coro: Any) -> None:
        task = self.loop.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            exc = task.exception()
            log.error("HBONE server task failed: %r", exc, exc_info=exc)
        self._check_drained()

    def _handshake_failed(self, peer: Any, reason: str) -> None:
        self._handshake_failures += 1
        log.warning("HBONE handshake from %s refused: %s", format_addr(peer), reason)

    async def _handshake(self, sock: socket.socket) -> None:
        try:
            peer = sock.getpeername()
            local = sock.getsockname()
            ctx = self._context() if callable(self._context) else self._context
        except Exception as e:
            sock.close()
            self._give_slot(None)
            log.error("HBONE: cannot serve an accepted connection: %r", e)
            return
        # (accepted before ``close``: served, then drained, like the connections before it;
        # after a hand-over the client would otherwise see its connection cut)
        conn = _ServerConn(self, peer)
        conn.local_addr = local
        conn.slot = self._slots is not None
        try:
            tls, _ = await self.loop.connect_accepted_socket(
                lambda: conn, sock, ssl=ctx, ssl_handshake_timeout=self.handshake_timeout
            )
        except (OSError, TimeoutError) as tls_error:  # ssl.SSLError is an OSError
            self._give_slot(conn)
            self._handshake_failed(peer, describe_tls_error(tls_error))
            return
        except asyncio.CancelledError:  # the server is going: the node's count must not
            self._give_slot(conn)
            raise
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
        self._handshakes += 1
        self._conns.add(conn)
        held = self._per_identity.get(identity, 0)
        if held >= self.max_connections_per_identity:
            self._count("connection_limit")
            warn_once(
                log,
                "connection_limit",
                "HBONE connection from %s (%s) refused: it holds %d already (the limit)",
                format_addr(peer),
                identity,
                held,
            )
            conn.refuse(tls, identity, f"{identity} holds {held} HBONE connections here already")
            return
        self._per_identity[identity] = held + 1
        conn.counted = True
        conn.attach(tls, identity)
        conn.start_timers()
        if self.closing():  # a call: close() may have run during the handshake
            self._drain(conn)

    def _give_slot(self, conn: _ServerConn | None) -> None:
        """An accepted connection is over: its slot of the connection caps comes back
        (``conn`` None: it never got one of its own)."""
        if self._slots is None:
            return
        if conn is None:
            self._slots.give()
        elif conn.slot:
            conn.slot = False
            self._slots.give()

    def _timed_out(self, conn: _ServerConn, which: str) -> None:
        """``conn`` went past its ``which`` (idle or preface) timeout: GOAWAY, close."""
        self._timeouts[which] += 1
        if self._metrics is not None:
            self._metrics.hbone_timeouts.labels(which).inc()
        if which == "idle_timeout":
            why = f"no stream for {self.idle_timeout:g}s"
        else:
            why = f"no HTTP/2 preface within {self.preface_timeout:g}s of the TLS handshake"
        warn_once(
            log,
            which,
            "HBONE connection from %s (%s) closed: %s",
            conn.label,
            conn.peer_identity,
            why,
        )
        conn.shutdown(why)

    def _identity_gone(self, identity: str) -> None:
        n = self._per_identity.get(identity, 0) - 1
        if n > 0:
            self._per_identity[identity] = n
        else:
            self._per_identity.pop(identity, None)

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

    def busy(self) -> bool:
        """Whether a connection is open or still being set up (a TLS handshake, a
        CONNECT being answered): what an agent that is going away waits for."""
        return bool(self._conns or self._tasks)

    def _check_drained(self) -> None:
        if self._closing and not self.busy():
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
            self._drain(conn)
        self._check_drained()

    @staticmethod
    def _drain(conn: _ServerConn) -> None:
        """A graceful GOAWAY: open streams finish, the connection closes once empty."""
        conn.machine.drain()
        if conn.streams:
            conn.flush()
        else:
            conn.shutdown("server closing")

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
    metrics: Metrics | None = None,
    max_connections_per_identity: int = MAX_CONNECTIONS_PER_IDENTITY,
    slots: ListenerSlots | None = None,
    idle_timeout: float = 3600.0,
    preface_timeout: float = 10.0,
) -> HboneServer:
    """Serve HBONE on ``sock`` (bound, listening, non-blocking)."""
    server = HboneServer(
        context,
        on_connect,
        handshake_timeout=handshake_timeout,
        settings=settings,
        metrics=metrics,
        max_connections_per_identity=max_connections_per_identity,
        slots=slots,
        idle_timeout=idle_timeout,
        preface_timeout=preface_timeout,
    )
    await server._start(sock)
    return server


__all__ = ["ConnectRefusal", "ConnectRequest", "HboneServer", "OnConnect", "start_hbone_server"]
