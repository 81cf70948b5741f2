"""Socket helpers for the data path: the original destination of a captured connection,
listening and upstream sockets inside a pod's netns (with the proxy's mark)."""

from __future__ import annotations

import asyncio
import errno
import socket
import struct

from nodeagent.errors import PeerError
from nodeagent.redirect.iptables import PROXY_MARK
from nodeagent.redirect.netns import NetnsHandle

SO_ORIGINAL_DST = 80
SO_MARK = 36


def original_dst(sock: socket.socket) -> tuple[str, int] | None:
    """The address the client dialled before capture, or None if it was not redirected."""
    try:
        raw = sock.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
    except OSError as e:
        if e.errno in (errno.ENOENT, errno.ENOPROTOOPT):
            return None
        raise
    port = struct.unpack_from("!H", raw, 2)[0]
    ip = socket.inet_ntoa(raw[4:8])
    return ip, port


def listen_in(ns: NetnsHandle, host: str, port: int, backlog: int = 4096) -> socket.socket:
    s = ns.socket()
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((host, port))
        s.listen(backlog)
        s.setblocking(False)
    except OSError:
        s.close()
        raise
    return s


async def connect_in(
    ns: NetnsHandle, addr: tuple[str, int], timeout: float, mark: int = PROXY_MARK
) -> socket.socket:
    """Connect from inside ``ns``, marked so our own capture rules let it pass."""
    loop = asyncio.get_running_loop()
    s = ns.socket()
    try:
        s.setsockopt(socket.SOL_SOCKET, SO_MARK, mark)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        s.setblocking(False)
        async with asyncio.timeout(timeout):  # no extra Task, unlike wait_for
            await loop.sock_connect(s, addr)
    except TimeoutError:
        s.close()
        raise PeerError(
            f"timed out after {timeout:g}s connecting to {addr[0]}:{addr[1]}: is the "
            f"destination's node reachable, or is a network policy dropping it?"
        ) from None
    except ConnectionRefusedError:
        s.close()
        raise PeerError(
            f"connection to {addr[0]}:{addr[1]} refused: is the app listening on port {addr[1]}?"
        ) from None
    except OSError as e:
        s.close()
        raise PeerError(f"cannot connect to {addr[0]}:{addr[1]}: {e.strerror or e}") from None
    return s
