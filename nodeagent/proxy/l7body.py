"""The request body of one L7 exchange, shared by the HTTP/1.1 and HTTP/2 paths: read
from the client as the upstream takes it, with a copy of at most ``RETRY_BUFFER`` bytes
kept so the request can be sent again (as Envoy's retry buffer: a longer body is streamed
and not retried).

Owns ``RequestBody``, what it reads (``BodySource``: the events of a client connection or
stream) and where it writes (``BodySink``: one upstream attempt). Never parses bytes nor
opens connections.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Protocol

from nodeagent.protocol.grpcframes import GrpcMessages
from nodeagent.protocol.http1 import (
    BodyChunk,
    ConnectionClosed,
    DownstreamEvent,
    Headers,
    RequestEnd,
)
from nodeagent.proxy.pipe import PipeClosed

log = logging.getLogger("nodeagent.proxy.l7")

RETRY_BUFFER = 64 * 1024
"""Request body bytes kept for a retry; a longer body is streamed and not retried."""


class BodySource(Protocol):
    """The client's side of a request body: the events of its connection or stream (in
    the HTTP/1.1 machine's event types)."""

    async def next_event(self) -> DownstreamEvent: ...

    def take_now(self) -> DownstreamEvent | None:
        """The next event if it was already read (no waiting)."""
        ...


class BodySink(Protocol):
    """Where a request body goes: one upstream attempt (an HTTP/1.1 connection or an
    HTTP/2 stream)."""

    def body(self, data: bytes) -> None: ...

    def end(self, trailers: Headers) -> None: ...

    async def drain(self) -> None: ...

    def abort(self) -> None: ...


class RequestBody:
    """The request body of one exchange (up to and including its end), read from the
    client as the upstream takes it, with a bounded copy kept for retries."""

    def __init__(
        self, source: BodySource, limit: int = RETRY_BUFFER, messages: GrpcMessages | None = None
    ) -> None:
        self._source = source
        self.chunks: list[bytes] = []
        self.size = 0
        self.total = 0
        self.complete = False
        self.overflow = False
        """More than ``limit`` bytes: no retry (the copy is dropped once sent)."""
        self.discard = False
        """The exchange is over: read the rest only to keep the connection in sync."""
        self.client_gone = False
        self.limit = limit
        self.target: BodySink | None = None
        self.messages = messages
        """Counts a gRPC call's request messages as the client sends them."""
        self.ended_upstream = False
        self.task: asyncio.Task[None] | None = None
        self._attached_event: asyncio.Event | None = None
        self._drain_ready()

    @property
    def replayable(self) -> bool:
        return not self.overflow and not self.client_gone

    @property
    def _attached(self) -> asyncio.Event:
        """Set while an upstream takes the body (made on first use: most requests have
        no body to wait for)."""
        if self._attached_event is None:
            self._attached_event = asyncio.Event()
        return self._attached_event

    def _drain_ready(self) -> None:
        """Take the events already read (a small body and its end usually arrive with
        the head) without a task switch."""
        while not self.complete and not self.client_gone:
            if self._must_wait():
                return
            ev = self._source.take_now()
            if ev is None:
                return
            self._consume(ev)

    def _must_wait(self) -> bool:
        """No upstream to send to and the buffer is full: stop reading the client."""
        return self.target is None and not self.discard and self.size >= self.limit

    def _consume(self, ev: DownstreamEvent) -> None:
        t = self.target
        if isinstance(ev, BodyChunk):
            data = ev.data
            self.total += len(data)
            if self.messages is not None:
                self.messages.feed(data)
            if t is None:
                if not self.discard:  # kept until an upstream takes it
                    self.chunks.append(data)
                    self.size += len(data)
                    self.overflow = self.overflow or self.size > self.limit
            else:
                if not self.overflow:
                    if self.size + len(data) > self.limit:
                        self.overflow = True
                        self.chunks.clear()
                        self.size = 0
                    else:
                        self.chunks.append(data)
                        self.size += len(data)
                t.body(data)
        elif isinstance(ev, RequestEnd):
            self.complete = True
            if t is not None:
                t.end(ev.trailers)
                self.ended_upstream = True
        else:  # a malformed body, ConnectionClosed mid-body, or a stray event
            self.client_gone = True

    def attach(self, sink: BodySink) -> None:
        """Send what is buffered to ``sink`` and stream the rest of the body to it."""
        self.target = sink
        self.ended_upstream = False
        for c in self.chunks:
            sink.body(c)
        if self.overflow:  # sent, but too much to keep for a retry
            self.chunks.clear()
            self.size = 0
        if self.complete:
            sink.end(())
            self.ended_upstream = True
        else:
            self._drain_ready()
        if self._attached_event is not None:
            self._attached_event.set()
        if not self.complete and not self.client_gone and self.task is None:
            self.task = asyncio.get_running_loop().create_task(self._pump())

    def detach(self) -> None:
        self.target = None
        if self._attached_event is not None:
            self._attached_event.clear()

    async def _pump(self) -> None:
        try:
            await self._pump_events()
        except Exception as e:  # a bug must end this exchange, not hang it
            log.error("request body relay failed: %r", e, exc_info=e)
            self.client_gone = True
            if self.target is not None:
                self.target.abort()

    async def _pump_events(self) -> None:
        while not self.complete and not self.client_gone:
            if self._must_wait():
                await self._attached.wait()
                continue
            try:
                ev = await self._source.next_event()
            except (PipeClosed, ConnectionError):
                self.client_gone = True
                return
            self._consume(ev)
            t = self.target
            if t is not None and isinstance(ev, BodyChunk):
                await t.drain()

    async def finish(self) -> None:
        """Read the rest of the body (discarding it) so the connection stays in sync."""
        self.detach()
        self.discard = self.overflow = True
        self.chunks.clear()
        self.size = 0
        self._drain_ready()
        if self.task is None and not self.complete and not self.client_gone:
            self.task = asyncio.get_running_loop().create_task(self._pump())
        if self.task is not None:
            self._attached.set()
            await self.task

    def cancel(self) -> None:
        if self.task is not None and not self.task.done():
            self.task.cancel()


class _Ended:
    """A source with nothing more to read."""

    async def next_event(self) -> DownstreamEvent:
        return ConnectionClosed()

    def take_now(self) -> DownstreamEvent | None:
        return None


def done_body() -> RequestBody:
    """A body already sent whole (a request without one)."""
    b = RequestBody(_Ended())
    b.complete = b.ended_upstream = True
    return b


__all__ = ["RETRY_BUFFER", "BodySink", "BodySource", "RequestBody", "done_body"]
