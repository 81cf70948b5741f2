"""Counting gRPC messages in a stream's DATA: each message is a 5-byte prefix (a
compressed flag and a 4-byte big-endian length) and that many bytes, and messages split
or join across DATA frames freely. Sans-I/O: bytes in, a count out."""

from __future__ import annotations

PREFIX = 5


class GrpcMessages:
    """The messages seen so far in one direction of one gRPC call (a message counts
    when its prefix has arrived)."""

    __slots__ = ("_head", "_skip", "count")

    def __init__(self) -> None:
        self.count = 0
        self._skip = 0
        """Bytes of the current message still to pass."""
        self._head = b""
        """A prefix split across chunks, so far."""

    def feed(self, data: bytes) -> None:
        i, n = 0, len(data)
        while i < n:
            if self._skip:
                take = min(self._skip, n - i)
                self._skip -= take
                i += take
                continue
            need = PREFIX - len(self._head)
            head = self._head + data[i : i + need]
            i += len(head) - len(self._head)
            if len(head) < PREFIX:
                self._head = head
                return
            self._head = b""
            self.count += 1
            self._skip = int.from_bytes(head[1:PREFIX], "big")
