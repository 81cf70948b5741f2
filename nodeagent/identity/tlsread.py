"""The ``read`` and ``pending`` that HBONE's TLS objects give the event loop's TLS transport.

The transport (uvloop's ``SSLProtocol``, as asyncio's) asks ``pending()`` before and after
every ``read`` of a TLS record, and each ``_ssl`` call releases and retakes the GIL around
OpenSSL (~500 instructions, two of three calls per record received). ``ReadTracker`` passes
``read`` on to ``_ssl`` and remembers a short one: OpenSSL's ``SSL_read`` returns less than
asked only once the record it read is used up, and then ``SSL_pending`` is 0 until the next
read (only reads take records in; ``SSL_write`` does not, and the transport asks
``pending`` only while wrapped, never after ``do_handshake`` or ``unwrap`` without a read
first). Any other outcome (a full read, an exception, EOF) asks OpenSSL again. Compiled.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


class ReadTracker:
    """``read`` and ``pending`` of one ``_ssl`` object; ``pending`` is 0 without a call
    into OpenSSL after a read that returned less than it asked for."""

    def __init__(self, read: Callable[..., Any], pending: Callable[[], int]) -> None:
        self._read = read
        self._pending = pending
        self._drained = False
        """The last read came back short: no decrypted byte is left in OpenSSL."""

    def read(self, n: Any = 1024, buffer: Any = None) -> Any:
        """``SSLObject.read``: up to ``n`` bytes, or into ``buffer`` (``n`` <= 0 or beyond
        its size: its size, as ``_ssl`` does); the count or the bytes."""
        # (``n`` and the result stay the objects they are: compiled, no boxing per call)
        self._drained = False
        asked: int = n
        if buffer is None:
            data: bytes = self._read(n)
            self._drained = 0 < len(data) < asked
            return data
        got = self._read(n, buffer)
        count: int = got
        size = len(buffer)
        self._drained = 0 < count < (asked if 0 < asked < size else size)
        return got

    def pending(self) -> int:
        """``SSLObject.pending``: decrypted bytes ready to read."""
        if self._drained:
            return 0
        return self._pending()


__all__ = ["ReadTracker"]
