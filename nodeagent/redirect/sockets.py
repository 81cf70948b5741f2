"""Sockets in pods' network namespaces for the proxy's data path: ``NetnsSockets`` (the
proxy's socket factory: listeners and marked upstream sockets inside each pod's netns) and
``original_dst``, the destination of a captured connection (``SO_ORIGINAL_DST``, which the
eBPF capture answers too).
"""

from __future__ import annotations

import _socket
import asyncio
import atexit
import errno
import os
import socket
from collections.abc import Coroutine
from typing import Any

from nodeagent.errors import PeerError
from nodeagent.model.objects import HOST_NETNS, PodRuntime
from nodeagent.redirect.iptables import PROXY_MARK
from nodeagent.redirect.netns import NetnsHandle
from nodeagent.redirect.srcroute import TRANSPARENT_MARK

SO_ORIGINAL_DST = 80
SO_MARK = 36
IP_TRANSPARENT = 19


def original_dst(sock: socket.socket) -> tuple[str, int] | None:
    """The address the client dialled before capture, or None if it was not redirected.

    Read on the file descriptor, through the C socket ``_on_fd`` keeps for its number: an
    event loop transport's socket (uvloop's) makes a whole ``socket.socket`` for each
    ``getsockopt``, with a Python frame more; a C socket made on the descriptor checks it
    with a ``getsockname`` system call; and ``ctypes`` costs a few microseconds a call."""
    fd = sock.fileno()
    if fd < 0:
        raise OSError(errno.EBADF, os.strerror(errno.EBADF))
    on = _ON_FD.get(fd) or _on_fd(fd)
    try:
        raw = on.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
    except OSError as e:
        if e.errno in (errno.ENOENT, errno.ENOPROTOOPT):
            return None
        raise
    return socket.inet_ntoa(raw[4:8]), raw[2] << 8 | raw[3]


_ON_FD: dict[int, _socket.socket] = {}
"""Descriptor number → a C socket made on it once and kept: ``getsockopt`` hands the
kernel only the number, so it reads whichever socket holds that number when called (the
next connection accepted on a closed one's number); held for the process's life, and
detached at exit (``_forget``), since a C socket closes its descriptor when freed."""


def _on_fd(fd: int) -> _socket.socket:
    on = _ON_FD[fd] = _socket.socket(socket.AF_INET, socket.SOCK_STREAM, 0, fd)
    return on


@atexit.register
def _forget() -> None:
    """Detach the kept C sockets: none may close a number another file holds by then."""
    for on in _ON_FD.values():
        on.detach()
    _ON_FD.clear()


def listen_in(
    ns: NetnsHandle, host: str, port: int, backlog: int = 4096, reuseport: bool = False
) -> socket.socket:
    """A listener in ``ns``; with ``reuseport``, one of a ``SO_REUSEPORT`` group (each
    worker process accepts on its own socket of the group, the kernel spreads
    connections over them)."""
    s = ns.socket()
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuseport:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        s.bind((host, port))
        s.listen(backlog)
        s.setblocking(False)
    except OSError:
        s.close()
        raise
    return s


def listen_udp_in(ns: NetnsHandle, host: str, port: int) -> socket.socket:
    s = ns.socket(type=socket.SOCK_DGRAM)
    try:
        s.bind((host, port))
        s.setblocking(False)
    except OSError:
        s.close()
        raise
    return s


TCP_ESTABLISHED = 1
"""``tcpi_state`` of an established connection (the first byte of ``TCP_INFO``)."""


PORT_TRIES = 4
"""Ports a transparent connection tries when the kernel refuses its port (EPERM from the
eBPF ``connect4_proxy``: a plaintext client's own connection to that app holds the same
tuple in the pod's netns)."""


IP_BIND_ADDRESS_NO_PORT = 24

IN_PROGRESS = frozenset({errno.EINPROGRESS, errno.EAGAIN, errno.EALREADY})
"""``connect`` errors of a non-blocking connect still under way (``BlockingIOError``'s)."""
NOT_PERMITTED = frozenset({errno.EPERM, errno.EACCES})
"""``connect`` errors of a port refused (``PermissionError``'s)."""


def _prepare(s: socket.socket, mark: int, source: str | None, bind: str | None = None) -> None:
    """Mark ``s``, and bind it to the client's address ``source`` when given, else to
    the local address ``bind`` when given (a host workload's own)."""
    # a transparent socket's mark tells the pod's routing to bring the answers back
    s.setsockopt(socket.SOL_SOCKET, SO_MARK, mark if source is None else TRANSPARENT_MARK)
    # no TCP_NODELAY here: the event loop's transport sets it (uvloop's on any TCP
    # socket, asyncio's on an IPPROTO_TCP one, as NetnsHandle makes them)
    if source is not None:
        s.setsockopt(socket.SOL_IP, IP_TRANSPARENT, 1)
        s.bind((source, 0))
    elif bind is not None:
        # the port is picked at connect(), per destination, not reserved by bind()
        s.setsockopt(socket.SOL_IP, IP_BIND_ADDRESS_NO_PORT, 1)
        s.bind((bind, 0))
    if s.gettimeout() != 0.0:  # (``NetnsHandle.socket``'s are made non-blocking)
        s.setblocking(False)


async def connect_in(
    ns: NetnsHandle,
    addr: tuple[str, int],
    timeout: float,
    mark: int = PROXY_MARK,
    source: str | None = None,
    bind: str | None = None,
) -> socket.socket:
    """Connect from inside ``ns``, marked so our own capture rules let it pass; from
    ``source`` (a client's address, not this netns's: ``IP_TRANSPARENT``) when given,
    then marked ``TRANSPARENT_MARK`` so the app's answers are routed back to us; else from
    the local address ``bind`` when given (a host workload's, so its peers see it).

    ``addr`` is a numeric address (a pod, endpoint or original destination): the socket
    connects directly, without the event loop's resolver (uvloop's ``sock_connect`` runs
    ``getaddrinfo`` even for an IP, ~45 µs a connection). A peer on this box (loopback,
    veths) usually completes the handshake within ``connect()`` itself; only a connect
    still in progress waits for the socket to become writable."""
    s = ns.socket()
    refused: list[socket.socket] = []  # held until done: the next bind picks another port
    try:
        _prepare(s, mark, source, bind)
        while True:
            # connect_ex: an error number, not an exception made and caught per connection
            err = s.connect_ex(addr)
            if err in IN_PROGRESS:
                err = 0
                if s.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1)[0] != TCP_ESTABLISHED:
                    await _writable(s, timeout)
                    err = s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            elif err in NOT_PERMITTED and source is not None and len(refused) + 1 < PORT_TRIES:
                refused.append(s)
                s = ns.socket()
                _prepare(s, mark, source, bind)
                continue
            break
        if err:
            raise OSError(err, os.strerror(err))
    except TimeoutError:
        s.close()
        raise PeerError(
            f"timed out after {timeout:g}s connecting to {addr[0]}:{addr[1]}: is the "
            f"destination's node reachable, or is a network policy dropping it?"
        ) from None
    except OSError as e:
        s.close()
        if e.errno == errno.ECONNREFUSED:
            raise PeerError(
                f"connection to {addr[0]}:{addr[1]} refused: is the app listening on port "
                f"{addr[1]}?"
            ) from None
        if e.errno == errno.EPERM and source is not None:
            raise PeerError(
                f"cannot connect to {addr[0]}:{addr[1]} from {source}: {PORT_TRIES} ports "
                f"refused (each held by that client's own connection to it)"
            ) from None
        raise PeerError(f"cannot connect to {addr[0]}:{addr[1]}: {e.strerror or e}") from None
    except BaseException:  # cancelled: do not leak the socket
        s.close()
        raise
    finally:
        for r in refused:
            r.close()
    return s


async def _writable(s: socket.socket, timeout: float) -> None:
    """Wait until ``s`` is writable (a non-blocking connect finished, or failed); raises
    ``TimeoutError`` after ``timeout`` seconds. A timer, not ``asyncio.timeout``: the
    proxy runs a dial without a Task (``proxy.plumbing.drive``)."""
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[None] = loop.create_future()
    fd = s.fileno()

    def ready() -> None:
        if not fut.done():
            fut.set_result(None)

    def expired() -> None:
        if not fut.done():
            fut.set_exception(TimeoutError())

    loop.add_writer(fd, ready)
    timer = loop.call_later(timeout, expired)
    try:
        await fut
    finally:
        timer.cancel()
        loop.remove_writer(fd)


class PodNetns:
    """The sockets of one pod: made inside its netns through one open handle; with
    ``bind`` (a host workload's address), its upstream connections come from there."""

    def __init__(self, netns: str, bind: str | None = None, reuseport: bool = False) -> None:
        self.ns = NetnsHandle(netns)
        self.bind = bind
        self.reuseport = reuseport

    def listen(self, host: str, port: int) -> socket.socket:
        return listen_in(self.ns, host, port, reuseport=self.reuseport)

    def listen_udp(self, host: str, port: int) -> socket.socket:
        return listen_udp_in(self.ns, host, port)

    def connect(
        self, addr: tuple[str, int], timeout: float, source: str | None = None
    ) -> Coroutine[Any, Any, socket.socket]:
        # returns connect_in's coroutine itself: no extra frame per connection
        return connect_in(self.ns, addr, timeout, PROXY_MARK, source, self.bind)

    def close(self) -> None:
        self.ns.close()


class NetnsSockets:
    """The proxy's socket factory on a node: each pod's sockets live in its netns; with
    ``reuseport`` its TCP listeners join ``SO_REUSEPORT`` groups (``--workers``)."""

    def __init__(self, reuseport: bool = False) -> None:
        self.reuseport = reuseport

    def pod(self, runtime: PodRuntime) -> PodNetns:
        if runtime.netns == HOST_NETNS:  # the host's own: many workloads, many addresses
            return PodNetns(runtime.netns, bind=runtime.ip, reuseport=self.reuseport)
        return PodNetns(runtime.netns, reuseport=self.reuseport)
