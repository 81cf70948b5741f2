"""One transport seen from a coroutine: ``await pipe.read()`` and ``pipe.write(...)``.

The L7 path (``proxy/l7.py``) drives each exchange as a coroutine (retries, timeouts and
faults read naturally that way), while asyncio and uvloop deliver bytes to protocols.
``Pipe`` is the protocol that bridges the two for any transport: an accepted TCP
connection, a dialled one, or an HBONE stream. Reads are bounded: past ``read_limit``
buffered bytes the transport is paused, so a fast peer cannot fill memory; writes past the
transport's high-water mark make ``drain()`` wait, so a slow peer slows its sender.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from typing import cast

from mypy_extensions import mypyc_attr

READ_LIMIT = 256 * 1024
WRITE_HIGH_WATER = 256 * 1024


@mypyc_attr(native_class=False)  # compiled, a class cannot derive from ConnectionError
class PipeClosed(ConnectionError):
    """The transport was reset or lost before an orderly EOF."""


class Pipe(asyncio.Protocol):
    __slots__ = (
        "_buf",
        "_drain_waiter",
        "_eof",
        "_error",
        "_loop",
        "_read_paused",
        "_size",
        "_waiter",
        "_write_paused",
        "bytes_in",
        "bytes_out",
        "lost",
        "read_limit",
        "transport",
    )

    def __init__(self, read_limit: int = READ_LIMIT) -> None:
        self.transport: asyncio.Transport | None = None
        self.read_limit = read_limit
        self._buf: deque[bytes] = deque()
        self._size = 0
        self._eof = False
        self._error: BaseException | None = None
        # Python 3.11's get_running_loop() makes a getpid() syscall: asked once per pipe
        self._loop: asyncio.AbstractEventLoop | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._drain_waiter: asyncio.Future[None] | None = None
        self._read_paused = False
        self._write_paused = False
        self.lost = False
        self.bytes_in = 0
        self.bytes_out = 0

    # -- protocol callbacks --------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        t = cast(asyncio.Transport, transport)
        self.transport = t
        t.set_write_buffer_limits(high=WRITE_HIGH_WATER)

    def adopt(self, transport: asyncio.Transport, buffered: list[bytes]) -> None:
        """Take over an already connected transport (``set_protocol``) with the bytes an
        earlier protocol read but did not use."""
        transport.set_protocol(self)
        self.connection_made(transport)
        for data in buffered:
            self.data_received(data)
        transport.resume_reading()

    def data_received(self, data: bytes) -> None:
        self._buf.append(data)
        self._size += len(data)
        self.bytes_in += len(data)
        if self._size > self.read_limit and not self._read_paused and self.transport:
            self._read_paused = True
            self.transport.pause_reading()
        self._wake()

    def eof_received(self) -> bool:
        self._eof = True
        self._wake()
        return True  # keep our write side open (half-close)

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        if exc is not None and not self._eof:
            self._error = exc
        self._eof = True
        self._wake()
        w = self._drain_waiter
        if w is not None and not w.done():
            w.set_result(None)

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        w = self._drain_waiter
        if w is not None and not w.done():
            w.set_result(None)

    def _wake(self) -> None:
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)

    # -- coroutine side -------------------------------------------------------------------
    def has_input(self) -> bool:
        """Bytes or an EOF arrived and were not read (for an idle pooled connection this
        means it can no longer be used)."""
        return bool(self._buf) or self._eof

    def take_buffered(self) -> bytes:
        """Everything buffered, without waiting (``b""`` if nothing)."""
        if not self._buf:
            return b""
        data = b"".join(self._buf) if len(self._buf) > 1 else self._buf[0]
        self._buf.clear()
        self._size = 0
        self._maybe_resume()
        return data

    async def read(self) -> bytes:
        """The next bytes (everything buffered, joined); ``b""`` at EOF. Raises
        ``PipeClosed`` when the peer reset the connection."""
        while not self._buf:
            if self._eof:
                if self._error is not None:
                    raise PipeClosed(str(self._error) or type(self._error).__name__)
                return b""
            loop = self._loop
            if loop is None:
                loop = self._loop = asyncio.get_running_loop()
            self._waiter = loop.create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        return self.take_buffered()

    def _maybe_resume(self) -> None:
        if self._read_paused and self._size <= self.read_limit // 2 and self.transport:
            self._read_paused = False
            if not self.lost:
                self.transport.resume_reading()

    def write(self, data: bytes) -> None:
        t = self.transport
        if t is None or self.lost or not data:
            return
        self.bytes_out += len(data)
        t.write(data)

    def write_backlogged(self) -> bool:
        """The transport's write buffer is above its high-water mark (the peer is not
        reading what we write)."""
        return self._write_paused

    async def drain(self) -> None:
        """Wait while the transport's write buffer is above its high-water mark."""
        while self._write_paused and not self.lost:
            self._drain_waiter = asyncio.get_running_loop().create_future()
            try:
                await self._drain_waiter
            finally:
                self._drain_waiter = None

    def write_eof(self) -> None:
        t = self.transport
        if t is not None and not self.lost and t.can_write_eof():
            with contextlib.suppress(OSError, RuntimeError):
                t.write_eof()

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()
