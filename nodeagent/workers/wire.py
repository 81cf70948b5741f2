"""The main process ↔ worker channel: messages over one end of a UNIX socketpair each,
sockets riding along as descriptors (``SCM_RIGHTS``, as the hand-over's).

A message is an 8-byte header (body length, descriptor count; big-endian) and a pickled
dict with an ``op``; its descriptors ride on the header's first byte. Pickle is safe
here: the socketpair is made by the main process and only it and its own child hold an
end (no path, no listening socket), and both run the same code. Snapshots hold
``MappingProxyType`` indexes, which pickle cannot name: they travel as dicts.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import copyreg
import io
import os
import pickle
import socket
import struct
from types import MappingProxyType
from typing import Any

from nodeagent.unixsocket import received_fds

_HEAD = struct.Struct(">II")
MAX_MESSAGE = 256 << 20
"""Bytes of one message (a snapshot of a big mesh is a few MiB): beyond, a broken peer."""
MAX_FDS = 200
"""Descriptors per message (the kernel takes at most 253 per ``sendmsg``)."""


class ChannelClosed(Exception):
    """The other process closed its end (or died), or sent what is not a message."""


def _mapping(d: dict[Any, Any]) -> MappingProxyType[Any, Any]:
    return MappingProxyType(d)


def _reduce_mapping(m: MappingProxyType[Any, Any]) -> tuple[Any, tuple[dict[Any, Any]]]:
    return _mapping, (dict(m),)


def dumps(msg: dict[str, Any]) -> bytes:
    """``msg`` pickled, read-only mappings as dicts wrapped again on load."""
    out = io.BytesIO()
    p = pickle.Pickler(out, protocol=pickle.HIGHEST_PROTOCOL)
    table = copyreg.dispatch_table.copy()
    table[MappingProxyType] = _reduce_mapping
    p.dispatch_table = table
    p.dump(msg)
    return out.getvalue()


class Channel:
    """One end of the socketpair, on the running event loop: ``send`` (serialized by a
    lock) and ``recv`` (one reader at a time)."""

    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        self.sock = sock
        self._lock = asyncio.Lock()
        self._buf = bytearray()
        self._fds: list[int] = []
        self.closed = False

    async def send(self, msg: dict[str, Any], socks: list[socket.socket] | None = None) -> None:
        """Send ``msg`` with ``socks`` (descriptors: the sender keeps its own copies)."""
        body = dumps(msg)
        fds = [s.fileno() for s in socks or []]
        if len(fds) > MAX_FDS:
            raise ValueError(f"{len(fds)} descriptors in one message (at most {MAX_FDS})")
        data = _HEAD.pack(len(body), len(fds)) + body
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
        loop = asyncio.get_running_loop()
        async with self._lock:
            if self.closed:
                raise ChannelClosed("the channel is closed")
            try:
                while True:
                    try:
                        sent = self.sock.sendmsg([data], anc)
                        break
                    except BlockingIOError:
                        await _writable(self.sock)
                if sent < len(data):
                    await loop.sock_sendall(self.sock, data[sent:])
            except OSError as e:
                raise ChannelClosed(f"cannot send: {e}") from None

    async def recv(self) -> tuple[dict[str, Any], list[socket.socket]]:
        """The next message and its sockets; ``ChannelClosed`` at the end."""
        await self._fill(_HEAD.size)
        n, nfds = _HEAD.unpack_from(self._buf)
        if n > MAX_MESSAGE or nfds > MAX_FDS:
            raise ChannelClosed(f"a message of {n} bytes and {nfds} descriptors")
        await self._fill(_HEAD.size + n)
        body = bytes(self._buf[_HEAD.size : _HEAD.size + n])
        del self._buf[: _HEAD.size + n]
        if len(self._fds) < nfds:
            raise ChannelClosed(f"{len(self._fds)} descriptors arrived, {nfds} announced")
        fds, self._fds = self._fds[:nfds], self._fds[nfds:]
        socks = [socket.socket(fileno=fd) for fd in fds]
        try:
            msg = pickle.loads(body)
        except Exception as e:
            for s in socks:
                s.close()
            raise ChannelClosed(f"not a message: {type(e).__name__}: {e}") from None
        if not isinstance(msg, dict) or not isinstance(msg.get("op"), str):
            for s in socks:
                s.close()
            raise ChannelClosed("a message without an op")
        return msg, socks

    async def _fill(self, n: int) -> None:
        space = socket.CMSG_SPACE(MAX_FDS * 4)
        while len(self._buf) < n:
            try:
                data, anc, flags, _ = self.sock.recvmsg(1 << 16, space)
            except BlockingIOError:
                await _readable(self.sock)
                continue
            except OSError as e:
                raise ChannelClosed(f"cannot receive: {e}") from None
            self._fds.extend(received_fds(anc))
            if flags & socket.MSG_CTRUNC:
                raise ChannelClosed("descriptors were cut off")
            if not data:
                raise ChannelClosed("the other process closed the channel")
            self._buf += data

    def close(self) -> None:
        self.closed = True
        for fd in self._fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        self._fds.clear()
        self.sock.close()


async def _readable(s: socket.socket) -> None:
    await _wait(s, reader=True)


async def _writable(s: socket.socket) -> None:
    await _wait(s, reader=False)


async def _wait(s: socket.socket, *, reader: bool) -> None:
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[None] = loop.create_future()
    fd = s.fileno()

    def ready() -> None:
        if not fut.done():
            fut.set_result(None)

    if reader:
        loop.add_reader(fd, ready)
    else:
        loop.add_writer(fd, ready)
    try:
        await fut
    finally:
        if reader:
            loop.remove_reader(fd)
        else:
            loop.remove_writer(fd)
