"""A byte relay between two TCP transports, with correct half-close and back-pressure.

Each direction is a small ``asyncio.Protocol``: bytes read on one side are written to the
other; when the writer's buffer is full the reader is paused. An EOF (FIN) on one side is
forwarded as ``write_eof`` on the other and the relay ends when both directions are done
(the second EOF closes both sides at once: the close sends that FIN, one ``shutdown``
fewer per connection).
A reset or error on either side aborts the other, so one broken peer ends only its own
connection.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any, cast

WRITE_HIGH_WATER = 256 * 1024


class Relay:
    """One proxied connection: the client transport, the upstream transport, counters."""

    __slots__ = (
        "_done_cb",
        "bytes_received",
        "bytes_sent",
        "client",
        "client_eof",
        "close_reason",
        "closed",
        "id",
        "meta",
        "opened_at",
        "pending",
        "upstream",
        "upstream_eof",
    )

    def __init__(self, conn_id: int, meta: dict[str, Any], done: Callable[[Relay], None]) -> None:
        self.id = conn_id
        self.meta = meta
        self.client: asyncio.Transport | None = None
        self.upstream: asyncio.Transport | None = None
        self.bytes_sent = 0
        self.bytes_received = 0
        self.client_eof = False
        self.upstream_eof = False
        self.closed = False
        self.close_reason = ""
        self.opened_at = time.time()
        self.pending: list[bytes] = []
        """Client bytes read before the upstream was connected (uvloop may deliver data
        even though reading was paused in ``connection_made``)."""
        self._done_cb = done

    # -- lifecycle -------------------------------------------------------------------
    def attach_upstream(self, transport: asyncio.Transport) -> None:
        self.upstream = transport
        transport.set_write_buffer_limits(WRITE_HIGH_WATER)  # (high: a keyword costs more)
        if self.pending:
            transport.writelines(self.pending)
            self.pending.clear()
        if self.client_eof and transport.can_write_eof():
            transport.write_eof()
        if self.client is not None and not self.closed and not self.client_eof:
            self.client.resume_reading()

    def _finish(self, reason: str) -> None:
        if self.closed:
            return
        self.closed = True
        self.close_reason = reason
        self._done_cb(self)

    def abort(self, reason: str) -> None:
        """End both sides now (reset), e.g. on a peer error or a policy change."""
        for t in (self.client, self.upstream):
            if t is not None:
                t.abort()
        self._finish(reason)

    def close(self, reason: str) -> None:
        """End both sides gracefully (flush what is buffered)."""
        for t in (self.client, self.upstream):
            if t is not None:
                t.close()
        self._finish(reason)


class ClientSide(asyncio.Protocol):
    """The accepted (downstream) side of a relay."""

    __slots__ = ("on_made", "relay", "transport")

    def __init__(self, relay: Relay, on_made: Callable[[ClientSide], None]) -> None:
        self.relay = relay
        self.on_made = on_made
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        self.transport = transport
        self.relay.client = transport
        transport.set_write_buffer_limits(WRITE_HIGH_WATER)  # (high)
        transport.pause_reading()  # until the upstream is connected
        self.on_made(self)

    def data_received(self, data: bytes) -> None:
        r = self.relay
        r.bytes_sent += len(data)
        up = r.upstream
        if up is not None:
            up.write(data)
        else:
            r.pending.append(data)
            if self.transport is not None:
                self.transport.pause_reading()

    def eof_received(self) -> bool:
        r = self.relay
        r.client_eof = True
        if r.upstream_eof:  # both done: closing sends the FIN, no shutdown before it
            r.close("done")
            return True
        up = r.upstream
        if up is not None and up.can_write_eof():
            up.write_eof()
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        r = self.relay
        if r.closed:
            return
        if exc is not None:
            r.abort(f"client reset: {exc}")
        elif r.upstream is None:
            r.close("client left before the upstream was connected")
        else:
            r.close("client closed")

    def pause_writing(self) -> None:
        if self.relay.upstream is not None:
            self.relay.upstream.pause_reading()

    def resume_writing(self) -> None:
        if self.relay.upstream is not None and not self.relay.upstream_eof:
            self.relay.upstream.resume_reading()


class UpstreamSide(asyncio.Protocol):
    """The side the proxy dialled."""

    __slots__ = ("relay",)

    def __init__(self, relay: Relay) -> None:
        self.relay = relay

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.relay.attach_upstream(cast(asyncio.Transport, transport))

    def data_received(self, data: bytes) -> None:
        r = self.relay
        r.bytes_received += len(data)
        c = r.client
        if c is not None:
            c.write(data)

    def eof_received(self) -> bool:
        r = self.relay
        r.upstream_eof = True
        if r.client_eof:  # both done: closing sends the FIN, no shutdown before it
            r.close("done")
            return True
        c = r.client
        if c is not None and c.can_write_eof():
            c.write_eof()
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        r = self.relay
        if r.closed:
            return
        if exc is not None:
            r.abort(f"upstream reset: {exc}")
        else:
            r.close("upstream closed")

    def pause_writing(self) -> None:
        if self.relay.client is not None:
            self.relay.client.pause_reading()

    def resume_writing(self) -> None:
        if self.relay.client is not None and not self.relay.client_eof:
            self.relay.client.resume_reading()
