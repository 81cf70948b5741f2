"""What the outbound and inbound handlers share: an accepted connection becomes a
``Relay`` in the connection table, its original destination is read from the capture, a
refusal is counted and logged, an upstream is dialled from a pod's network and wired to
the relay, and a connection is handed to the L7 engine; plus the per-snapshot identity
and service lookups both directions use.

It decides nothing about where a connection goes (``core.outbound`` and the inbound
policy do) and holds no pod lifecycle (``proxy.pods``).
"""

from __future__ import annotations

import _socket
import asyncio
import gc
import logging
import os
import socket
import weakref
from collections.abc import Callable, Coroutine, Generator
from dataclasses import dataclass
from functools import partial
from typing import Any, Final

from nodeagent.errors import PeerError
from nodeagent.model.objects import Pod, Service
from nodeagent.model.snapshot import Endpoint, MeshSnapshot, PerSnapshot
from nodeagent.proxy.inputs import Addr, PodSockets, ProxyInputs
from nodeagent.proxy.l7 import Downstream, L7Proxy
from nodeagent.proxy.l7h2 import H2Pool, serve_h2
from nodeagent.proxy.limits import ConnectionCaps, Refused
from nodeagent.proxy.pipe import Pipe
from nodeagent.proxy.pods import PodProxy
from nodeagent.proxy.relay import ClientSide, Relay, UpstreamSide

log = logging.getLogger("nodeagent.proxy")

Handler = Callable[[PodProxy, ClientSide], None]
"""Serves one accepted connection of a pod's listener: called from its ``connection_made``
(no Task: what must wait, a dial, goes on by callbacks, see ``drive``)."""


def drive(coro: Coroutine[Any, Any, object], done: Callable[[BaseException | None], None]) -> None:
    """Run ``coro`` without a Task: its first step now, each later one when the future it
    waits on is done; then ``done(None)``, or ``done(error)``. A connection's dial usually
    ends in the first step; a Task would cost a loop turn and its own bookkeeping.
    ``coro`` must not need ``current_task()`` (no ``asyncio.timeout``); its result is
    dropped: what it makes, it hands on itself (so its end is seen without a
    ``StopIteration`` to catch: an exception caught in compiled code costs a traceback
    entry, ~2.5k instructions)."""
    _Driver(coro.__await__(), done).step()


_END = object()
"""What ``next`` gives for a driven coroutine that has ended."""


class _Driver:
    """One ``drive``: an object, not a closure, as a closure naming itself (to be called
    again) is a reference cycle that keeps the whole connection until the GC runs."""

    __slots__ = ("done", "steps")

    def __init__(
        self, steps: Generator[Any, None, object], done: Callable[[BaseException | None], None]
    ) -> None:
        self.steps = steps
        self.done = done

    def step(self, _: object = None) -> None:
        try:
            waiting: Any = next(self.steps, _END)
        except BaseException as e:  # handed to ``done``, which decides
            self.done(e)
            return
        if waiting is _END:
            self.done(None)
        elif waiting is None:  # a bare yield (``asyncio.sleep(0)``): again next turn
            asyncio.get_running_loop().call_soon(self.step)
        else:
            waiting.add_done_callback(self.step)


class Descriptor:
    """A connected socket's descriptor, as the event loop's ``create_connection(sock=)``
    is handed it: what uvloop asks of a socket (``family``, ``type``, ``fileno``,
    ``setblocking``; ``detach`` or ``close`` once its transport has closed the
    descriptor) as plain attributes and no-ops. ``socket.socket`` answers ``family`` and
    ``type`` with enum conversions in Python and ``setblocking`` with a system call (libuv
    makes the descriptor non-blocking itself), and is detached in Python on close.

    For uvloop only (the agent's loop): the standard library's loop asks a socket for
    more (``getsockname``…). uvloop from 0.23 calls ``detach`` when ``create_connection``
    fails after libuv closed the descriptor, which ``close_unowned`` relies on."""

    __slots__ = ("family", "fd", "type")

    def __init__(self, sock: socket.socket) -> None:
        self.family: int = _FAMILY.__get__(sock)
        self.type: int = _STREAM
        self.fd: int = _DETACH(sock)

    def fileno(self) -> int:
        return self.fd

    def setblocking(self, flag: bool) -> None:
        """Nothing: libuv's ``uv_tcp_open`` makes the descriptor non-blocking."""

    def detach(self) -> int:
        """The transport closed the descriptor (its dial failed)."""
        fd, self.fd = self.fd, -1
        return fd

    def close(self) -> None:
        """The transport closed the descriptor (the connection ended)."""
        self.fd = -1

    def close_unowned(self) -> None:
        """``create_connection`` failed before its transport took the descriptor."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


_FAMILY: Final[Any] = _socket.socket.__dict__["family"]
"""The C socket's own ``family`` (an int), under ``socket.socket``'s enum property."""
_DETACH: Final = _socket.socket.detach
"""The C socket's own ``detach`` (``socket.socket``'s is a Python frame more)."""
_STREAM: Final = int(socket.SOCK_STREAM)


def untrack_transports(loop: asyncio.AbstractEventLoop) -> bool:
    """Stop uvloop's ``loop`` recording each new transport by its descriptor: uvloop keeps
    them in a ``weakref.WeakValueDictionary``, whose ``__setitem__`` (a ``KeyedRef`` made
    in Python) and removal callback cost ~9k instructions a transport, four per proxied
    connection, only so that ``add_reader``/``add_writer`` can refuse a transport's own
    descriptor (the proxy never asks for one). The dictionary (no attribute of uvloop's
    ``Loop`` reaches it from Python) is found among the loop's references and becomes an
    ``_Untracked`` one, which drops new entries; what it holds stays. Returns whether it
    did (False: another loop, a uvloop laid out otherwise, or a uvloop release whose use of
    that dictionary nobody has read yet: ``UNTRACKED_UVLOOP``)."""
    if not type(loop).__module__.startswith("uvloop"):
        return False  # (asyncio's own loop uses its dictionary for more)
    if not _uvloop_version().startswith(UNTRACKED_UVLOOP):
        return False
    kinds = (weakref.WeakValueDictionary, _Untracked)
    found = [r for r in gc.get_referents(loop) if type(r) in kinds]
    if len(found) != 1:
        return False
    found[0].__class__ = _Untracked
    return True


UNTRACKED_UVLOOP: Final = "0.23."
"""The uvloop releases whose loop.pyx was read for ``untrack_transports`` (its dictionary
is written by ``_track_transport`` and read only by ``_ensure_fd_no_transport``)."""


def _uvloop_version() -> str:
    import uvloop  # (already imported by whoever made a uvloop loop)

    return str(getattr(uvloop, "__version__", ""))


def _drop(fd: object, transport: object) -> None:
    """``_Untracked``'s ``__setitem__``: nothing is recorded."""


_Untracked: Final[Any] = type(
    "_Untracked",
    (weakref.WeakValueDictionary,),
    {"__slots__": (), "__module__": __name__, "__setitem__": staticmethod(_drop)},
)
"""uvloop's dictionary of transports, made to drop new entries (``untrack_transports``)."""


def _ran(exc: BaseException | None) -> None:
    """The end of a handler run by ``Plumbing.run``: an error is a bug, logged."""
    if exc is not None:
        log.error("connection handler failed: %r", exc, exc_info=exc)


def _ip_order(ip: str) -> tuple[int, ...]:
    return tuple(int(x) for x in ip.split(".")) if "." in ip else (0,)


@dataclass(frozen=True)
class IdentityIndex:
    """Per-snapshot lookups by workload identity, over pods and the WorkloadEntries that
    own an IP address (``MeshSnapshot.pod_by_ip``): a VM's workload is a peer like a pod."""

    tunnel_peer: dict[tuple[str, str], str]
    """(node, identity) → the lowest workload IP of that identity on that node (a
    WorkloadEntry without a node is tunnelled to at its own address)."""
    pod_by_identity: dict[str, Pod]
    """identity → the first workload (pods in config order, then entries) running as it."""
    identity_at: dict[str, str]
    """workload IP → the identity of the workload there."""
    service_at: dict[tuple[str, int], Service]
    """(pod key, container port) → the Service whose port targets it (the first by name
    when several do): the ``destination_service`` of an inbound connection."""

    @classmethod
    def build(cls, snap: MeshSnapshot, identity_of: Callable[[Pod], str]) -> IdentityIndex:
        peers: dict[tuple[str, str], str] = {}
        by_identity: dict[str, Pod] = {}
        at: dict[str, str] = {}
        services: dict[tuple[str, int], Service] = {}
        for svc in sorted(snap.services, key=lambda s: s.key):
            for sp in svc.ports:
                for ep in snap.endpoints(svc, sp):
                    services.setdefault((ep.pod.key, ep.port), svc)
        by_ip = snap.pod_by_ip
        # an entry counts only at an address it owns: not a DNS name, not a pod's address
        owners = [w for w in snap.workload_entries if w.pod_ip and by_ip.get(w.pod_ip) is w]
        for p in (*snap.pods, *owners):
            ident = identity_of(p)
            by_identity.setdefault(ident, p)
            if p.pod_ip:
                at.setdefault(p.pod_ip, ident)
                if not p.node_name:
                    continue  # a remote entry: its own address is its peer
                key = (p.node_name, ident)
                if key not in peers or _ip_order(p.pod_ip) < _ip_order(peers[key]):
                    peers[key] = p.pod_ip
        return cls(
            tunnel_peer=peers, pod_by_identity=by_identity, identity_at=at, service_at=services
        )

    def source_pod(self, snap: MeshSnapshot, identity: str, ip: str | None) -> Pod | None:
        """The workload a tunnelled connection came from: the one at the client's address
        when it runs as the peer certificate's identity (the replicas of a Deployment
        share one), else the first workload running as that identity."""
        if ip and self.identity_at.get(ip) == identity:
            return snap.pod_by_ip.get(ip)
        return self.pod_by_identity.get(identity)

    def tunnel_source(
        self, snap: MeshSnapshot, identity: str, claimed: str | None, peer_ip: str
    ) -> tuple[str, Pod | None] | str:
        """Where a connection tunnelled by a peer running as ``identity`` comes from:
        (``source.ip``, source workload), or why its claim is refused. The ``claimed``
        client address (``forwarded: for=``, normalized) is believed when the workload
        there (a pod or a WorkloadEntry) runs as ``identity``; an address of no known
        workload proves nothing, so ``peer_ip`` (the tunnel's own source) stands instead;
        a workload of another identity is refused."""
        if claimed is None or claimed not in self.identity_at:
            return peer_ip, self.source_pod(snap, identity, peer_ip)
        owner = self.identity_at[claimed]
        if owner != identity:
            pod = snap.pod_by_ip.get(claimed)
            name = f"{_kind(pod)} {pod.key}" if pod is not None else claimed
            return f"forwarded for={claimed} is {name}, running as {owner}, not {identity}"
        return claimed, self.source_pod(snap, identity, claimed)


def _kind(w: Pod) -> str:
    return "pod" if w.kind == "Pod" else w.kind


class Plumbing:
    """The connection machinery of one proxy, shared by both directions."""

    def __init__(
        self, inputs: ProxyInputs, l7: L7Proxy, h2pool: H2Pool, caps: ConnectionCaps
    ) -> None:
        self.inputs = inputs
        self.caps = caps
        self.l7 = l7
        self.h2pool = h2pool
        self._identities = PerSnapshot(lambda snap: IdentityIndex.build(snap, inputs.principal))
        self._tasks: set[asyncio.Task[None]] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        """The proxy's event loop, taken once: ``get_running_loop`` makes a ``getpid``
        system call each time, and this runs a few times per connection."""

    def _running_loop(self) -> asyncio.AbstractEventLoop:
        self._loop = loop = asyncio.get_running_loop()
        untrack_transports(loop)  # (once per proxy: the loop's transports from here on)
        return loop

    def index(self, snap: MeshSnapshot) -> IdentityIndex:
        """Identity lookups for ``snap``, built once per snapshot, not per connection."""
        return self._identities.get(snap)

    def accept(
        self, pp: PodProxy, direction: str, handler: Handler
    ) -> Callable[[], asyncio.Protocol]:
        """The protocol factory of ``pp``'s ``direction`` listener: each connection takes
        a slot of the connection caps (past them it is closed at once), gets a table
        entry (which gives the slot back when it closes), and ``handler`` runs once it is
        accepted."""
        table = self.inputs.table
        slots = self.caps.listener(direction)
        serve = partial(handler, pp)  # one per listener, not one per connection
        key = pp.pod.key

        def make() -> asyncio.Protocol:
            if not slots.take():
                return Refused()
            relay = table.open({"direction": direction, "pod": key, "slots": slots})
            return ClientSide(relay, serve)

        return make

    def spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = (self._loop or self._running_loop()).create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("connection handler failed: %r", task.exception(), exc_info=task.exception())

    def run(self, coro: Coroutine[Any, Any, None]) -> None:
        """``spawn`` without a Task (``drive``): for a handler that waits only on futures
        (no ``asyncio.timeout``, no cancellation), its first step now."""
        drive(coro, _ran)

    def refuse(self, relay: Relay, direction: str, flag: str, reason: str) -> None:
        self.inputs.metrics.failures.labels(direction=direction, response_flags=flag).inc()
        log.warning(
            "%s %s from %s to %s refused [%s]: %s",
            direction,
            relay.meta.get("pod"),
            relay.meta.get("source"),
            relay.meta.get("destination"),
            flag,
            reason,
        )
        relay.close(f"{flag}: {reason}")

    def captured(
        self, side: ClientSide, direction: str, own_ports: tuple[int, ...] = ()
    ) -> tuple[Addr, Addr | None] | None:
        """Record the client's address and return the address it dialled before capture,
        and the client's (read once); refuse the connection (and return None) when there
        is none."""
        relay = side.relay
        t = side.transport
        assert t is not None
        peer = t.get_extra_info("peername")
        relay.meta["source"] = f"{peer[0]}:{peer[1]}" if peer else "?"
        try:
            dst = self.inputs.capture.original_destination(t, direction == "inbound")
        except OSError as e:
            self.refuse(relay, direction, "NR", f"cannot read the original destination: {e}")
            return None
        if dst is None or dst[1] in own_ports:
            self.refuse(relay, direction, "NR", "connection was not redirected by capture")
            return None
        relay.meta["destination"] = f"{dst[0]}:{dst[1]}"
        return dst, peer

    def dial(
        self, pp: PodProxy, relay: Relay, addr: Addr, direction: str, source: str | None = None
    ) -> None:
        """Connect ``relay`` to ``addr`` over plain TCP from ``pp``'s network (from the
        client's address ``source`` when given), by callbacks (``drive``)."""
        sockets = pp.sockets
        if sockets is None:
            self.refuse(relay, direction, "UF", f"pod {pp.pod.key} is no longer captured")
            return
        relay.meta["upstream"] = f"{addr[0]}:{addr[1]}"
        drive(self._dial(sockets, relay, addr, direction, source), _ran)

    async def _dial(
        self, sockets: PodSockets, relay: Relay, addr: Addr, direction: str, source: str | None
    ) -> None:
        try:
            sock = await sockets.connect(addr, self.inputs.connect_timeout, source)
        except PeerError as e:
            if not relay.closed:
                self.refuse(relay, direction, "UF", str(e))
            return
        except BaseException as err:  # a bug: this connection ends, the proxy goes on
            relay.abort(f"upstream {addr[0]}:{addr[1]}: {err!r}")
            log.error("dialling %s failed: %r", addr, err, exc_info=err)
            return
        if relay.closed:  # the client left while we were connecting
            sock.close()
            self.inputs.metrics.failures.labels(direction=direction, response_flags="DC").inc()
            return
        self.attach(relay, sock, partial(self._unwired, relay, direction, addr))

    def _unwired(self, relay: Relay, direction: str, addr: Addr, e: OSError) -> None:
        self.refuse(relay, direction, "UF", f"upstream {addr}: {e}")

    def attach(self, relay: Relay, sock: socket.socket, failed: Callable[[OSError], None]) -> None:
        """Make the connected ``sock`` the relay's upstream and count the connection as
        opened (by callbacks: no Task); on failure the socket is closed and ``failed``
        called. The event loop is handed the socket's descriptor (``Descriptor``), not
        the socket."""
        table = self.inputs.table
        fd: Any = Descriptor(sock)

        def made(exc: BaseException | None) -> None:
            if isinstance(exc, OSError):
                fd.close_unowned()
                failed(exc)
                return
            if exc is not None:  # a bug: this connection ends, the proxy goes on
                fd.close_unowned()
                relay.abort(f"upstream: {exc!r}")
                log.error("connection handler failed: %r", exc, exc_info=exc)
                return
            relay.meta["counted"] = True
            table.counted(relay)

        loop = self._loop or self._running_loop()
        drive(loop.create_connection(partial(UpstreamSide, relay), sock=fd), made)

    async def connect_plain(
        self, pp: PodProxy, ep: Endpoint, pipe: Pipe, source: str | None = None
    ) -> None:
        """Connect ``pipe`` to ``ep`` over plain TCP from ``pp``'s network (from the
        client's address ``source`` when given)."""
        sockets = pp.sockets
        if sockets is None:
            raise PeerError(f"pod {pp.pod.key} is no longer captured")
        sock = await sockets.connect((ep.ip, ep.port), self.inputs.connect_timeout, source)
        try:
            await (self._loop or self._running_loop()).create_connection(lambda: pipe, sock=sock)
        except OSError as e:
            sock.close()
            raise PeerError(f"upstream {ep}: {e}") from None

    async def serve_http(self, ds: Downstream, pipe: Pipe, relay: Relay, proto: str) -> None:
        """Serve one client connection (either side) with the L7 engine in ``proto``
        (``h2`` or ``http1``); then record its byte counts (from the client's side:
        sent = read from the client) and close its table entry."""
        try:
            if proto == "h2":
                await serve_h2(self.l7, self.h2pool, ds, pipe)
            else:
                await self.l7.serve_http1(ds, pipe)
        finally:
            relay.bytes_sent, relay.bytes_received = pipe.bytes_in, pipe.bytes_out
            relay.close("done")
