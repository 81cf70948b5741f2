"""The upstream HTTP/1.1 connection pool of the L7 path: idle keep-alive connections per
(source pod, endpoint), and the per-cluster limits of a DestinationRule's
``connectionPool`` (``tcp.maxConnections``, ``http.http1MaxPendingRequests``,
``maxRequestsPerConnection``, ``idleTimeout``); and ``Events``, the queue of what an
HTTP/1.1 machine read and its connection's user has not taken yet (both sides').
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Awaitable, Callable
from time import monotonic
from typing import Any, Final, Generic, TypeVar

from nodeagent.core.balancer import endpoint_address
from nodeagent.core.clusters import Cluster
from nodeagent.errors import PeerError
from nodeagent.model.snapshot import Endpoint
from nodeagent.protocol.http1 import ConnectionClosed, UpstreamEvent, UpstreamHttp1
from nodeagent.proxy.pipe import Pipe


async def dial(connect: ConnectFn, ep: Endpoint, pipe: Pipe, cluster: Cluster) -> tuple[str, str]:
    """``connect`` within the cluster's ``connectTimeout`` (when the DestinationRule sets
    one); a timeout is a ``PeerError`` like any other connect failure."""
    if cluster.connect_timeout is None:
        return await connect(ep, pipe)
    try:
        async with asyncio.timeout(cluster.connect_timeout):
            return await connect(ep, pipe)
    except TimeoutError:
        pipe.abort()
        raise PeerError(
            f"connect to {ep} timed out after {cluster.connect_timeout:g}s "
            f"(connectionPool.tcp.connectTimeout of {cluster.name})"
        ) from None


E = TypeVar("E")

_DRAINED: Final[list[Any]] = []
"""What an ``Events`` holds once all is taken (never changed: ``put`` replaces it)."""


class Events(Generic[E]):
    """The events a machine's ``receive_data`` returned, taken one by one. Its lists are
    fresh each call: one is kept as it came and read by position (a deque's methods, or
    a list's ``pop(0)``, cost some 300-400 instructions a call compiled)."""

    __slots__ = ("_at", "_items")

    def __init__(self) -> None:
        self._items: list[E] = _DRAINED
        self._at = 0

    def __len__(self) -> int:
        return len(self._items) - self._at

    def put(self, events: list[E]) -> None:
        """Queue ``events`` (a list the caller hands over and no longer changes)."""
        if not events:
            return
        if self._at >= len(self._items):
            self._items = events
        else:
            self._items = [*self._items[self._at :], *events]
        self._at = 0

    def take(self) -> E | None:
        """The next event, or None."""
        items, i = self._items, self._at
        if i >= len(items):
            return None
        if i + 1 == len(items):  # (the events taken are not kept alive)
            self._items = _DRAINED
            self._at = 0
        else:
            self._at = i + 1
        return items[i]

    def take_all(self) -> list[E]:
        items = self._items[self._at :]
        self._items = _DRAINED
        self._at = 0
        return items


class Overflow(Exception):
    """The cluster's connection pool and its pending queue are full (503, flag ``UO``)."""


ConnectFn = Callable[[Endpoint, Pipe], Awaitable[tuple[str, str]]]
"""Dial ``endpoint`` (through the HBONE tunnel or plain TCP) wired to ``pipe``; returns
(a description of the upstream path, the destination principal or ``unknown``)."""


class H1Conn:
    """One upstream HTTP/1.1 connection."""

    __slots__ = (
        "cluster",
        "events",
        "idle",
        "idle_since",
        "key",
        "machine",
        "path",
        "pipe",
        "principal",
        "requests",
    )

    def __init__(self, key: tuple[str, str], cluster: str, pipe: Pipe) -> None:
        self.key = key
        """(source, ``endpoint_address``): the pool's key."""
        self.idle: list[H1Conn] | None = None
        """The pool's idle connections of ``key``, once this one has been there."""
        self.cluster = cluster
        self.pipe = pipe
        self.machine = UpstreamHttp1()
        self.events: Events[UpstreamEvent] = Events()
        self.requests = 0
        self.idle_since = 0.0
        self.path = ""
        self.principal = "unknown"

    async def next_event(self) -> UpstreamEvent:
        events = self.events
        while True:
            ev = events.take()
            if ev is not None:
                return ev
            data = await self.pipe.read()
            evs = self.machine.receive_data(data)
            if not evs and not data:
                return ConnectionClosed(clean=False)
            events.put(evs)


class H1Pool:
    """Idle keep-alive connections per (source pod, endpoint), and per-cluster limits."""

    def __init__(self) -> None:
        self._idle: dict[tuple[str, str], list[H1Conn]] = {}
        self._active: dict[str, int] = {}
        self._waiters: dict[str, deque[asyncio.Future[None]]] = {}

    async def acquire(
        self, source: str, cluster: Cluster, ep: Endpoint, connect: ConnectFn
    ) -> tuple[H1Conn, bool]:
        """A connection to ``ep`` (reused when one is idle) and whether it was reused."""
        addr = endpoint_address(ep)
        conn = self.reuse(source, cluster, addr, monotonic())
        if conn is not None:
            return conn, True
        key = (source, addr)
        name = cluster.name
        while self._active.get(name, 0) >= cluster.max_connections:
            if self._close_idle_of(name):
                continue  # an idle connection to another endpoint made room
            waiters = self._waiters.setdefault(name, deque())
            if len(waiters) >= cluster.max_pending:
                raise Overflow(
                    f"{name}: {cluster.max_connections} connections open and "
                    f"{len(waiters)} requests pending (DestinationRule connectionPool)"
                )
            fut = asyncio.get_running_loop().create_future()
            waiters.append(fut)
            try:
                await fut
            finally:
                with contextlib.suppress(ValueError):
                    waiters.remove(fut)
            idle = self._idle.get(key)
            if idle:
                return idle.pop(), True
        self._active[name] = self._active.get(name, 0) + 1
        pipe = Pipe()
        conn = H1Conn(key, name, pipe)
        try:
            conn.path, conn.principal = await dial(connect, ep, pipe, cluster)
        except BaseException:
            self._discard(conn)
            raise
        return conn, False

    def reuse(self, source: str, cluster: Cluster, addr: str, now: float) -> H1Conn | None:
        """An idle connection to the endpoint at ``addr`` (``endpoint_address``) still fit
        to reuse at ``now`` (``time.monotonic()``), or None (``acquire``'s first step,
        without a coroutine: a keep-alive request usually finds one)."""
        idle = self._idle.get((source, addr))
        if not idle:
            return None
        return self.take_idle(idle, cluster, now)

    def take_idle(self, idle: list[H1Conn], cluster: Cluster, now: float) -> H1Conn | None:
        """``reuse`` from ``idle``, the idle connections of one (source, endpoint) (an
        ``H1Conn.idle``: a caller that kept it skips hashing the key)."""
        while idle:
            conn = idle.pop()
            stale = now - conn.idle_since > cluster.idle_timeout
            if conn.pipe.lost or conn.pipe.has_input() or stale:
                self._discard(conn)
                continue
            return conn
        return None

    def _close_idle_of(self, cluster: str) -> bool:
        for conns in self._idle.values():
            for i, c in enumerate(conns):
                if c.cluster == cluster:
                    del conns[i]
                    self._discard(c)
                    return True
        return False

    def release(self, conn: H1Conn, cluster: Cluster) -> None:
        """Back to the pool when reusable, else closed."""
        conn.requests += 1
        limit = cluster.max_requests_per_connection
        if (
            conn.machine.reusable
            and not conn.pipe.has_input()
            and not conn.pipe.lost
            and (limit <= 0 or conn.requests < limit)
        ):
            conn.machine.start_next_request()
            conn.idle_since = monotonic()
            idle = conn.idle
            if idle is None:  # (then kept: no key to hash on each release)
                idle = conn.idle = self._idle.setdefault(conn.key, [])
            idle.append(conn)
            if self._waiters:
                self._wake(conn.cluster)
            return
        self._discard(conn)

    def _discard(self, conn: H1Conn) -> None:
        conn.pipe.close()
        n = self._active.get(conn.cluster, 0)
        if n > 0:
            self._active[conn.cluster] = n - 1
        self._wake(conn.cluster)

    def discard(self, conn: H1Conn, *, abort: bool = False) -> None:
        if abort:
            conn.pipe.abort()
        self._discard(conn)

    def _wake(self, cluster: str) -> None:
        waiters = self._waiters.get(cluster)
        while waiters:
            fut = waiters.popleft()
            if not fut.done():
                fut.set_result(None)
                return

    def close(self) -> None:
        for conns in self._idle.values():
            for c in conns:
                c.pipe.close()
            conns.clear()  # (the lists stay: a connection keeps its own, ``H1Conn.idle``)
