"""The access log: one JSON object per line; per HTTP request with the field names of
Istio's default JSON access log (Envoy's meanings), per relayed TCP connection as
ztunnel's "connection complete" (``src.*``, ``dst.*``, ``bytes_sent``, ``bytes_recv``).

Owns the request record's shape (``AccessRecord``, a ``TypedDict``) and its writer. The
L7 path writes a request's line itself (``write_line``: the connection's fixed fields are
JSON once, the request's own go into a format string, ``json_plain`` checks that none
needs an escape); other records are a dict and one ``orjson.dumps`` (the standard
library's ``json`` takes 15 times as long). ``recent`` keeps the lines and parses them only
when read. The writer appends to a binary stream (the agent's stdout by default, or a
file) and flushes at most every ``flush_interval`` seconds from the event loop: on a
buffered stream, one list append per request (the lines are handed to the stream
joined, once per flush or ``BUFFER`` bytes), never a blocking flush on the data path.
Stdout gets a buffer of its own: with ``PYTHONUNBUFFERED=1`` (or ``python -u``, common in
container images) ``sys.stdout.buffer`` is the raw file, which would make every record a
``write`` system call.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import io
import os
import sys
import time
from collections import deque
from collections.abc import Iterator
from typing import Any, BinaryIO, Final, NotRequired, TypedDict

import orjson

_dumps = orjson.dumps
_loads = orjson.loads
_NEWLINE: int = orjson.OPT_APPEND_NEWLINE
"""(Module globals: a look-up of the ``orjson`` module's attributes per record cost more.)"""


def json_plain(s: str) -> bool:
    """Whether ``s`` goes into a JSON string as it is (``orjson`` escapes only quotes,
    backslashes and control characters). Asked of ``orjson`` itself: it writes an ASCII
    ``s`` with nothing to escape as ``s`` between quotes, one byte a character (one call
    in C, ~1 instruction a character; ``str.isprintable`` cost ~20 each); a non-ASCII
    ``s`` takes more bytes, and is plain when printable without quote or backslash."""
    if len(_dumps(s)) == len(s) + 2:
        return True
    return not s.isascii() and s.isprintable() and '"' not in s and "\\" not in s


def json_text(s: str) -> str:
    """What ``orjson`` writes between the quotes of the JSON string ``s``."""
    return _dumps(s)[1:-1].decode()


class AccessRecord(TypedDict):
    start_time: str
    """RFC 3339 UTC time the request head arrived."""
    source_workload: str
    source_namespace: str
    source_principal: str
    destination_service: str
    destination_workload: str
    destination_namespace: str
    destination_principal: str
    method: str
    authority: str
    path: str
    protocol: str
    """``HTTP/1.1`` or ``HTTP/2`` (gRPC too: Envoy's ``%PROTOCOL%``); ``TCP`` for a
    connection refused by policy."""
    response_code: int
    """0 when no response was sent (the client left or the stream was reset)."""
    response_flags: str
    """Envoy's flags: ``-`` none, ``UF`` connect failure, ``UH`` no healthy upstream,
    ``URX`` retries exhausted, ``UT`` upstream timeout, ``UC`` upstream closed, ``DC``
    downstream closed, ``NR`` no route, ``FI`` fault abort, ``DI`` fault delay, ``UO``
    overflow (connection pool), ``DPE`` downstream protocol error, ``UPE`` upstream one."""
    bytes_received: int
    """Request body bytes from the client."""
    bytes_sent: int
    """Response body bytes to the client."""
    duration: int
    """Milliseconds from the request head to the end of the response (Envoy's
    ``%DURATION%``)."""
    upstream_service_time: str | None
    """Milliseconds from the last attempt's start to the upstream's response head, as
    Envoy's ``x-envoy-upstream-service-time``; null when no upstream answered."""
    x_forwarded_for: str | None
    """The request's ``x-forwarded-for``; null when it has none."""
    downstream_remote_address: str | None
    """The client's ``ip:port`` as this proxy saw it."""
    downstream_local_address: str | None
    """The address the client dialled (before capture)."""
    upstream_local_address: str | None
    """Not tracked: null."""
    requested_server_name: str | None
    """TLS SNI of the downstream: null (clients speak plaintext to the node proxy)."""
    connection_termination_details: str | None
    upstream_transport_failure_reason: str | None
    """Why the upstream could not be reached or failed (flags ``UF``, ``URX``, ``UC``,
    ``UT`` with no response from it)."""
    grpc_status: str | None
    """The response's ``grpc-status`` (gRPC only), Envoy's ``%GRPC_STATUS_NUMBER%``."""
    upstream_host: str
    """The endpoint (``ip:port``) of the last attempt, ``-`` if none."""
    upstream_cluster: str
    """``outbound|port|subset|host`` as Istio names clusters."""
    route_name: str
    attempts: int
    trace_id: str
    request_id: str
    user_agent: str
    reporter: str
    """``source``: written by the client's node proxy; ``destination``: by the node proxy
    of the called workload (which enforces its policies)."""
    authz_policy: NotRequired[str]
    """``namespace/name`` of the AuthorizationPolicy that decided a denial (or an
    allow, at the destination), as ``nodeagent ctl explain`` names it."""
    authz_rule: NotRequired[int]
    """The index of that policy's rule that matched (absent: no rule matched)."""
    request_principal: NotRequired[str]
    """The JWT's ``iss/sub`` when a RequestAuthentication accepted a token."""
    detail: NotRequired[str]
    """Why the proxy answered itself (``RBAC: access denied``, ``Jwt is expired``…)."""


class _Second:
    """The last second ``rfc3339`` formatted (a native object: typed fields, no generic
    comparison of a list's items per record)."""

    __slots__ = ("sec", "text")

    def __init__(self) -> None:
        self.sec = -1
        self.text = ""


_second: Final = _Second()


_MILLIS: Final = tuple(f".{ms:03d}Z" for ms in range(1000))
"""The fraction of a second as written, by millisecond (a ``:03d`` format per record cost
more than the rest of the timestamp)."""


def rfc3339(ts: float) -> str:
    """``2026-11-26T03:16:18.123Z`` (the formatted second is cached: one per second)."""
    sec = int(ts)
    last = _second
    if last.sec != sec:
        last.sec = sec
        last.text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(sec))
    return last.text + _MILLIS[int((ts - sec) * 1000)]


BUFFER: Final = 64 * 1024
"""Bytes of records held between flushes (about 90 records)."""


def buffered_stdout() -> BinaryIO:
    """A buffered binary writer on the process's stdout, whatever Python's own stdout
    buffering is; ``sys.stdout.buffer`` when stdout is not a file descriptor (a test's
    captured stream), ``os.devnull`` when there is no stdout at all."""
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):
        buffer = getattr(sys.stdout, "buffer", None)
        return buffer if buffer is not None else open(os.devnull, "wb")
    return io.BufferedWriter(io.FileIO(fd, "wb", closefd=False), buffer_size=BUFFER)


class RecentRecords:
    """A live view of an ``AccessLog``'s last records (``AccessRecord`` for requests, a
    dict for connections): kept as their lines, parsed only when read (``nodeagent ctl
    requests``, tests)."""

    def __init__(self, lines: deque[bytes]) -> None:
        self._lines = lines

    def __len__(self) -> int:
        return len(self._lines)

    def __getitem__(self, i: int) -> Any:
        return _loads(self._lines[i])

    def __iter__(self) -> Iterator[Any]:
        return iter([_loads(line) for line in self._lines])


class AccessLog:
    """Buffered JSON-lines writer; ``recent`` keeps the last request records for
    ``nodeagent ctl requests``, ``recent_connections`` the last connection lines."""

    def __init__(
        self, out: BinaryIO | None = None, *, flush_interval: float = 0.5, keep: int = 200
    ) -> None:
        self.out: BinaryIO = out if out is not None else buffered_stdout()
        self.enabled = True
        self.flush_interval = flush_interval
        self._recent: deque[bytes] = deque(maxlen=keep)
        self.recent = RecentRecords(self._recent)
        """The last request records, oldest first (kept as lines, parsed when read)."""
        self._remember = self._recent.append
        """(Bound once: a method call on the deque by name cost ~900 instructions.)"""
        self._recent_connections: deque[bytes] = deque(maxlen=keep)
        self.recent_connections = RecentRecords(self._recent_connections)
        """The last "connection complete" records, oldest first (as ``recent``)."""
        self._flush_handle: asyncio.TimerHandle | None = None
        self._held: list[bytes] | None = [] if isinstance(self.out, io.BufferedWriter) else None
        """Lines not yet handed to a buffered ``out``: the stream would hold them until
        its flush all the same, and a ``write`` to it costs four times a list append
        (None: another kind of stream, written to per record, as a test's ``BytesIO``)."""
        self._held_size = 0
        if self._held is not None:
            # lines held when the process exits (written after the last flush, as an
            # in-flight request's record at shutdown) still reach the stream, as bytes
            # in the stream's own buffer do when it is finalized
            atexit.register(_write_held, self.out, self._held)

    def write(self, record: AccessRecord) -> None:
        self.write_line(_dumps(record, option=_NEWLINE))

    def write_line(self, line: bytes) -> None:
        """A request record already written as its JSON line, as ``orjson`` would write
        it (``json_plain`` and ``json_text`` help)."""
        self._remember(line)
        self._emit_line(line)

    def write_connection(self, line: bytes) -> None:
        """A relayed connection's "connection complete" line (``proxy.connections``)."""
        self._recent_connections.append(line)
        self._emit_line(line)

    def _emit_line(self, line: bytes) -> None:
        if not self.enabled:
            return
        held = self._held
        if held is None:
            try:
                self.out.write(line)
            except (OSError, ValueError):
                return
        if held is not None:
            held.append(line)
            self._held_size += len(line)
            if self._held_size >= BUFFER and not self._hand_over():
                return
        if self._flush_handle is None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                self.flush()
                return
            self._flush_handle = loop.call_later(self.flush_interval, self.flush)

    def flush(self) -> None:
        """Write out what is buffered (the timer calls this; so does the agent's shutdown)."""
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
        if self._hand_over():
            with contextlib.suppress(OSError, ValueError):
                self.out.flush()

    def _hand_over(self) -> bool:
        """The held lines to ``out`` in one write; False if it failed (they are dropped,
        as a failed write per record dropped its record)."""
        held = self._held
        if not held:
            return True
        self._held_size = 0
        return _write_out(self.out, held)


def _write_out(out: BinaryIO, held: list[bytes]) -> bool:
    """``held`` (an ``AccessLog``'s lines not yet handed over) to ``out`` in one write,
    emptied; False if the write failed."""
    data = b"".join(held)
    held.clear()
    try:
        out.write(data)
    except (OSError, ValueError):
        return False
    return True


def _write_held(out: BinaryIO, held: list[bytes]) -> None:
    """At exit: the lines still held to ``out``, flushed."""
    if held and _write_out(out, held):
        with contextlib.suppress(OSError, ValueError):
            out.flush()
