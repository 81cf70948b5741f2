"""HTTP/2 and gRPC on the L7 path: h2c (prior knowledge) from the client, each stream
planned on its own by the same ``core.plan`` as HTTP/1.1 (``L7Engine.prepare``), and sent
on a multiplexed HTTP/2 connection per (source pod, endpoint) through the mTLS tunnel.

Owns the per-stream exchange (retries on ``refused-stream``, ``reset``, status codes and
gRPC statuses, route and per-try timeouts, trailers both ways, bidirectional streaming)
and the HTTP/2 upstream pool. Flow control is end to end: bytes received on one side are
acknowledged (``ack_data``) only when the other side's machine framed them, so a slow
reader slows its writer stream by stream, never the whole connection.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable
from typing import Generic, TypeVar

from nodeagent.core.clusters import Cluster
from nodeagent.core.paths import BadTarget, request_target
from nodeagent.core.plan import Plan, Request, apply_header_ops, join_headers
from nodeagent.errors import ConnectRefusedError, PeerError
from nodeagent.model.snapshot import Endpoint
from nodeagent.protocol import http1
from nodeagent.protocol.http2 import (
    ConnectionEnded,
    DataSent,
    DownstreamHttp2,
    ErrorCodes,
    ProtocolError,
    StreamData,
    StreamInformational,
    StreamRejected,
    StreamRequest,
    StreamReset,
    StreamResponse,
    StreamTrailers,
    UpstreamEvent,
    UpstreamHttp2,
    forwardable_h2_headers,
)
from nodeagent.proxy.h1pool import ConnectFn, Overflow, dial
from nodeagent.proxy.l7body import RequestBody
from nodeagent.proxy.l7conn import Downstream, Exchange, begin_exchange
from nodeagent.proxy.l7engine import L7Engine
from nodeagent.proxy.l7retry import (
    LocalReply,
    Redirect,
    deadline,
    policy_refusal,
    retriable_status,
    within,
)
from nodeagent.proxy.peerwarn import warn_once
from nodeagent.proxy.pipe import Pipe, PipeClosed

log = logging.getLogger("nodeagent.proxy.l7")

CLOSE_GRACE = 5.0
"""Seconds a connection closed for a protocol error or abuse may take to hand its GOAWAY
to a client that does not read before it is aborted."""

E = TypeVar("E")


# -- upstream ---------------------------------------------------------------------------


class _Events(Generic[E]):
    """Events of one stream, queued by the connection's reader for the exchange's
    coroutine."""

    __slots__ = ("events", "waiter")

    def __init__(self) -> None:
        self.events: deque[E] = deque()
        self.waiter: asyncio.Future[None] | None = None

    def push(self, ev: E) -> None:
        self.events.append(ev)
        w = self.waiter
        if w is not None and not w.done():
            w.set_result(None)

    def take_now(self) -> E | None:
        return self.events.popleft() if self.events else None

    async def next_event(self) -> E:
        while not self.events:
            self.waiter = asyncio.get_running_loop().create_future()
            try:
                await self.waiter
            finally:
                self.waiter = None
        return self.events.popleft()


class _UpStream(_Events[UpstreamEvent]):
    """One stream of an upstream connection, as the exchange sees it."""

    __slots__ = ("conn", "id", "on_sent", "unacked")

    def __init__(self, conn: H2Conn, stream_id: int) -> None:
        super().__init__()
        self.conn = conn
        self.id = stream_id
        self.on_sent: Callable[[int], None] | None = None
        """Called with the size of request bytes framed later (to ack the client)."""
        self.unacked = 0
        """Response bytes received and not yet acknowledged (``H2Conn.ack``)."""


class H2Conn:
    """One multiplexed HTTP/2 connection to an endpoint, with its reader task."""

    def __init__(self, pipe: Pipe) -> None:
        self.pipe = pipe
        self.machine = UpstreamHttp2()
        self.streams: dict[int, _UpStream] = {}
        self.dead = False
        self.principal = "unknown"
        self.path = ""
        self.reader: asyncio.Task[None] | None = None

    def flush(self) -> None:
        data = self.machine.data_to_send()
        if data:
            self.pipe.write(data)

    def usable(self) -> bool:
        m = self.machine
        return (
            not self.dead
            and not self.pipe.lost
            and m.goaway_received is None
            and m.can_open_stream()
        )

    def open(
        self,
        method: str,
        scheme: str,
        authority: str,
        path: str,
        headers: list[tuple[str, str]],
        end_stream: bool,
    ) -> _UpStream:
        sid = self.machine.send_request(method, scheme, authority, path, headers, end_stream)
        s = self.streams[sid] = _UpStream(self, sid)
        self.flush()
        return s

    def start(self) -> None:
        self.flush()
        self.reader = asyncio.get_running_loop().create_task(self._read())

    async def _read(self) -> None:
        try:
            while True:
                data = await self.pipe.read()
                for ev in self.machine.receive_data(data):
                    self._dispatch(ev)
                self.flush()
                if not data:
                    break
        except (PipeClosed, ConnectionError):
            pass
        finally:
            self.dead = True
            for s in list(self.streams.values()):
                s.push(StreamReset(s.id, ErrorCodes.CANCEL, "upstream connection lost"))
            self.streams.clear()
            self.pipe.close()

    def _dispatch(self, ev: UpstreamEvent) -> None:
        if isinstance(ev, DataSent):
            s = self.streams.get(ev.stream_id)
            if s is not None and s.on_sent is not None:
                s.on_sent(ev.size)
            return
        if isinstance(ev, ConnectionEnded):
            self.dead = True
            return
        if isinstance(ev, ProtocolError):
            self.dead = True
            for s in list(self.streams.values()):
                s.push(StreamReset(s.id, ErrorCodes.PROTOCOL_ERROR, ev.reason))
            self.streams.clear()
            return
        sid = getattr(ev, "stream_id", None)
        s = self.streams.get(sid) if sid is not None else None
        if s is None:
            if type(ev) is StreamData and sid is not None:  # dropped: window back
                self.machine.ack_data(sid, len(ev.data))
            return
        if type(ev) is StreamData:
            s.unacked += len(ev.data)
        s.push(ev)
        if isinstance(ev, StreamReset) or (
            isinstance(ev, StreamTrailers)
            or (isinstance(ev, StreamData | StreamResponse) and ev.end_stream)
        ):
            self.streams.pop(s.id, None)

    def ack(self, s: _UpStream, n: int) -> None:
        """``n`` response bytes of ``s`` were framed to the client (or dropped)."""
        n = min(n, s.unacked)
        if n > 0:
            s.unacked -= n
            self.machine.ack_data(s.id, n)

    def release(self, s: _UpStream) -> None:
        """The exchange is done with ``s``: what it did not forward is dropped, and its
        window comes back (the connection's is returned only for bytes consumed)."""
        if s.unacked:
            self.ack(s, s.unacked)
            self.flush()

    def forget(self, s: _UpStream) -> None:
        """The exchange gave up on ``s``: reset it if still open."""
        self.release(s)
        if self.streams.pop(s.id, None) is not None:
            self.machine.reset_stream(s.id, ErrorCodes.CANCEL)
            self.flush()

    def close(self) -> None:
        self.dead = True
        self.pipe.close()


class H2Pool:
    """Multiplexed connections per (source pod, endpoint); ``http2MaxRequests`` limits the
    requests in flight per cluster. Requests that find no usable connection while one to
    their endpoint is being dialled wait for it rather than dial their own (as Envoy's
    pending requests wait for a connection in progress): a burst of N calls makes one
    connection, not N."""

    def __init__(self) -> None:
        self._conns: dict[tuple[str, str, int], list[H2Conn]] = {}
        self._dialing: dict[tuple[str, str, int], asyncio.Future[H2Conn]] = {}
        self._active: dict[str, int] = {}

    async def stream(
        self,
        source: str,
        cluster: Cluster,
        ep: Endpoint,
        connect: ConnectFn,
        open_args: tuple[str, str, str, str, list[tuple[str, str]], bool],
    ) -> _UpStream:
        limit = cluster.max_h2_requests
        if self._active.get(cluster.name, 0) >= limit:
            raise Overflow(f"{cluster.name}: {limit} requests in flight (http2MaxRequests)")
        key = (source, ep.ip, ep.port)
        conns = self._conns.setdefault(key, [])
        while True:
            conns[:] = [c for c in conns if not c.dead]
            conn = next((c for c in conns if c.usable()), None)
            if conn is not None:
                break
            pending = self._dialing.get(key)
            if pending is None:
                conn = await self._dial(key, conns, cluster, ep, connect)
                break
            try:
                await asyncio.shield(pending)  # its failure is this request's too
            except asyncio.CancelledError:
                me = asyncio.current_task()
                if not pending.cancelled() or (me is not None and me.cancelling()):
                    raise  # this request was cancelled (perhaps with the dial's)
            # the dialled connection may be full already (its peer's stream limit), or
            # the dial was abandoned by its request: look again
        if self._active.get(cluster.name, 0) >= limit:  # others may have opened meanwhile
            raise Overflow(f"{cluster.name}: {limit} requests in flight (http2MaxRequests)")
        self._active[cluster.name] = self._active.get(cluster.name, 0) + 1
        return conn.open(*open_args)

    async def _dial(
        self,
        key: tuple[str, str, int],
        conns: list[H2Conn],
        cluster: Cluster,
        ep: Endpoint,
        connect: ConnectFn,
    ) -> H2Conn:
        """A new connection for ``key``, announced to requests that arrive meanwhile."""
        pending: asyncio.Future[H2Conn] = asyncio.get_running_loop().create_future()
        # a failure nobody waited for is not an "exception never retrieved" warning
        pending.add_done_callback(lambda f: f.cancelled() or f.exception())
        self._dialing[key] = pending
        try:
            pipe = Pipe()
            conn = H2Conn(pipe)
            conn.path, conn.principal = await dial(connect, ep, pipe, cluster)
            conn.start()
            conns.append(conn)
            pending.set_result(conn)
            return conn
        except Exception as e:
            pending.set_exception(e)
            raise
        except BaseException:  # cancelled with its request: the waiters dial again
            pending.cancel()
            raise
        finally:
            del self._dialing[key]

    def done(self, cluster: Cluster) -> None:
        n = self._active.get(cluster.name, 0)
        if n > 0:
            self._active[cluster.name] = n - 1

    def close(self) -> None:
        for conns in self._conns.values():
            for c in conns:
                c.close()
        self._conns.clear()


# -- downstream -------------------------------------------------------------------------


class _DownStream(_Events[http1.DownstreamEvent]):
    """One client stream: its queued events (in the HTTP/1.1 machine's event types, so
    the request-body relay is shared) and the upstream stream it is routed to."""

    __slots__ = ("acked", "id", "received", "task", "upstream")

    def __init__(self, stream_id: int) -> None:
        super().__init__()
        self.id = stream_id
        self.upstream: _UpStream | None = None
        self.received = 0
        self.acked = 0
        self.task: asyncio.Task[None] | None = None


class _H2Sink:
    """The request body of one client stream, written to one upstream stream."""

    def __init__(self, session: _Session, ds: _DownStream, up: _UpStream) -> None:
        self.session = session
        self.ds = ds
        self.up = up
        up.on_sent = lambda n: session.ack_client(ds, n)

    def body(self, data: bytes) -> None:
        conn = self.up.conn
        if self.up.id not in conn.streams:
            return
        framed = conn.machine.send_data(self.up.id, data)
        conn.flush()
        self.session.ack_client(self.ds, framed)

    def end(self, trailers: http1.Headers) -> None:
        conn = self.up.conn
        if self.up.id not in conn.streams and conn.machine.closed:
            return
        try:
            if trailers:
                conn.machine.send_trailers(self.up.id, trailers)
            else:
                conn.machine.send_data(self.up.id, b"", end_stream=True)
        except Exception as e:  # the stream may have been reset by the server meanwhile
            log.debug("cannot end upstream stream %d: %r", self.up.id, e)
        conn.flush()

    async def drain(self) -> None:
        await self.up.conn.pipe.drain()

    def abort(self) -> None:
        self.up.conn.forget(self.up)


class _Session:
    """One client connection speaking HTTP/2."""

    def __init__(self, engine: L7Engine, h2pool: H2Pool, ds: Downstream, pipe: Pipe) -> None:
        self.engine = engine
        self.pool = h2pool
        self.ds = ds
        self.pipe = pipe
        self.down = DownstreamHttp2()
        self.streams: dict[int, _DownStream] = {}

    def flush(self) -> None:
        data = self.down.data_to_send()
        if data:
            self.pipe.write(data)

    def ack_client(self, s: _DownStream, n: int) -> None:
        """Let the client send ``n`` more bytes on ``s`` (never more than it sent)."""
        n = min(n, s.received - s.acked)
        if n > 0:
            s.acked += n
            self.down.ack_data(s.id, n)
            self.flush()

    async def serve(self) -> None:
        self.flush()
        down = self.down
        pipe = self.pipe
        failed = False
        try:
            while True:
                data = await pipe.read()
                down.set_backlogged(pipe.write_backlogged())
                for ev in down.receive_data(data):
                    if type(ev) is ProtocolError:
                        failed = True
                        self._failed(ev)
                    else:
                        self._dispatch(ev)
                self.flush()
                if not data or down.closed:
                    break
        except (PipeClosed, ConnectionError):
            pass
        finally:
            for s in list(self.streams.values()):
                if s.task is not None:
                    s.task.cancel()
            self.flush()
            if down.premature_resets:
                self._count("premature_reset", down.premature_resets)
            if failed:
                await _linger(pipe)
            pipe.close()

    def _failed(self, ev: ProtocolError) -> None:
        kind = ev.abuse or "protocol_error"
        self._count(kind, 1)
        warn_once(log, kind, "HTTP/2 client %s: %s (sent GOAWAY)", self.ds.source_ip, ev.reason)

    def _count(self, kind: str, n: int) -> None:
        self.engine.metrics.h2_peer_errors.labels("http2", kind).inc(n)

    def _dispatch(self, ev: object) -> None:
        if isinstance(ev, StreamRequest):
            s = self.streams[ev.stream_id] = _DownStream(ev.stream_id)
            if ev.end_stream:
                s.push(http1.RequestEnd())
            s.task = asyncio.get_running_loop().create_task(self._exchange(s, ev))
        elif isinstance(ev, StreamData):
            s2 = self.streams.get(ev.stream_id)
            if s2 is None:  # the exchange is over: dropped, and the window comes back
                self.down.ack_data(ev.stream_id, len(ev.data))
                return
            s2.received += len(ev.data)
            if ev.data:
                s2.push(http1.BodyChunk(ev.data))
            if ev.end_stream:
                s2.push(http1.RequestEnd())
        elif isinstance(ev, StreamTrailers):
            s3 = self.streams.get(ev.stream_id)
            if s3 is not None:
                s3.push(http1.RequestEnd(ev.headers))
        elif isinstance(ev, StreamReset):
            s4 = self.streams.pop(ev.stream_id, None)
            if s4 is not None:
                self.ack_client(s4, s4.received)  # dropped (its task may never run)
                s4.push(http1.ConnectionClosed(clean=False))
                if s4.task is not None:
                    s4.task.cancel()
        elif isinstance(ev, DataSent):
            s5 = self.streams.get(ev.stream_id)
            if s5 is not None and s5.upstream is not None:
                up = s5.upstream
                up.conn.ack(up, ev.size)
                up.conn.flush()
        elif isinstance(ev, StreamRejected):
            x = Exchange(time.monotonic(), time.time(), "-", "-", "-", "HTTP/2")
            x.status = ev.status
            x.flag("DPE")
            self.engine.recorder.record(self.ds, x)

    # -- one stream ---------------------------------------------------------------------
    async def _exchange(self, s: _DownStream, head: StreamRequest) -> None:
        hdrs = join_headers(head.headers)
        bad = ""
        try:  # origin-form, normalized: what routing, policy and the app see
            path, authority = request_target(
                head.method, head.path, head.authority, self.engine.path_normalization
            )
        except BadTarget as e:
            path, authority, bad = head.path, head.authority, str(e)
        req = Request(head.method, path, authority, hdrs, self.ds.conn)
        grpc = hdrs.get("content-type", "").startswith("application/grpc")
        x = begin_exchange(req, "HTTP/2", grpc)
        body = RequestBody(s, messages=x.request_messages)
        out = list(forwardable_h2_headers(head.headers))
        try:
            if bad:  # before any policy or upstream sees it
                x.detail = bad
                raise LocalReply(400, "DPE", "invalid request target")
            p = await self.engine.prepare(self.ds, req, x)
            p.edit_request(out)
            await within(p.timeout, self._attempts(s, req.method, out, body, p, x))
        except LocalReply as r:
            x.flag(r.flag)
            x.status = r.status
            x.detail = x.detail or r.body
            self.down.send_error(s.id, r.status, r.body, r.flag, r.headers)
        except Redirect as r:
            x.status = r.status
            self.down.send_response_head(s.id, r.status, [("location", r.location)], True)
        except TimeoutError:
            x.flag("UT")
            if x.status == 0:
                x.status = 504
                self.down.send_error(s.id, 504, "upstream request timeout", "UT")
            else:
                self.down.reset_stream(s.id, ErrorCodes.CANCEL)
        except asyncio.CancelledError:
            x.flag("DC")
            if s.upstream is not None:
                s.upstream.conn.forget(s.upstream)
            raise
        finally:
            body.cancel()
            x.bytes_in = body.total
            self.ack_client(s, s.received)  # what was not forwarded is dropped
            if s.upstream is not None:
                s.upstream.conn.release(s.upstream)
            self.flush()
            self.streams.pop(s.id, None)
            self.engine.recorder.record(self.ds, x)

    async def _attempts(
        self,
        s: _DownStream,
        method: str,
        out: list[tuple[str, str]],
        body: RequestBody,
        p: Plan,
        x: Exchange,
    ) -> None:
        engine = self.engine
        cluster, policy = p.cluster, p.retry
        bal = engine.clusters.balancer(cluster, self.ds.pod)
        tried: set[str] = set()
        retries_left = policy.attempts
        while True:
            host = bal.pick_host(p.hash_key, tried)
            if host is None:
                raise LocalReply(503, "UH", f"no healthy upstream for {cluster.name}")
            ep = host.endpoint
            tried.add(host.addr)
            x.attempts += 1
            x.upstream, x.dst_pod = host.addr, ep.pod
            x.sent_at = time.monotonic()
            host.start()
            failure = ""
            flag = "UF"
            try:
                try:
                    up = await self.pool.stream(
                        self.ds.pool_key,
                        cluster,
                        ep,
                        self.ds.connect,
                        (method, "http", p.authority, p.path, out, False),
                    )
                except Overflow as e:
                    raise LocalReply(503, "UO", str(e)) from None
                except PeerError as e:
                    refusal = policy_refusal(e) if isinstance(e, ConnectRefusedError) else None
                    if refusal is not None:  # the destination's policy said no
                        raise refusal from None
                    bal.report(ep, None, True)
                    failure = "connect-failure"
                    log.info("%s: connect to %s failed: %s", cluster.name, x.upstream, e)
                else:
                    try:
                        x.dst_principal = up.conn.principal
                        s.upstream = up
                        body.attach(_H2Sink(self, s, up))
                        result = await self._response(s, up, body, p, x, retries_left > 0)
                    finally:
                        self.pool.done(cluster)
                    if result is None:
                        bal.report(ep, x.status, False)
                        return
                    failure, flag = result
                    bal.report(ep, 504 if flag == "UT" else 503, False)
            finally:
                host.finish()
            body.detach()
            s.upstream = None
            if await engine.retry_or_fail(
                x, cluster, policy, body, retries_left, failure, flag, flag == "URX"
            ):
                retries_left -= 1
                continue

    async def _response(
        self,
        s: _DownStream,
        up: _UpStream,
        body: RequestBody,
        p: Plan,
        x: Exchange,
        may_retry: bool,
    ) -> tuple[str, str] | None:
        """Relay the response of ``up``; a failure before the head is returned as
        (retryOn kind, flag) for the retry loop (None: the exchange is done)."""
        policy = p.retry
        conn = up.conn
        try:
            async with deadline(policy.per_try_timeout):
                while True:
                    ev = await up.next_event()
                    if isinstance(ev, StreamInformational):
                        continue
                    if isinstance(ev, StreamResponse):
                        break
                    if isinstance(ev, StreamReset):
                        return ("refused-stream" if ev.refused else "reset"), "UC"
                    return "reset", "UC"
        except TimeoutError:
            conn.forget(up)
            return "per-try-timeout", "UT"
        hdrs = join_headers(ev.headers)
        reason = retriable_status(policy, ev.status, hdrs.get("grpc-status"))
        if reason is not None and may_retry and body.replayable:
            conn.forget(up)
            return reason, "URX"
        if reason is not None and x.attempts > 1:
            x.flag("URX")
        x.status = ev.status
        x.answered_at = time.monotonic()
        if x.grpc:
            x.grpc_status = _grpc_status(hdrs.get("grpc-status"), "")
        messages = x.response_messages
        headers = list(forwardable_h2_headers(ev.headers))
        for ops in p.response_ops:
            apply_header_ops(headers, ops)
        if p.set_cookie is not None:
            headers.append(("set-cookie", p.set_cookie))
        down = self.down
        down.send_response_head(s.id, ev.status, headers, ev.end_stream)
        self.flush()
        if ev.end_stream:
            return None
        while True:
            ev2 = await up.next_event()
            if isinstance(ev2, StreamData):
                x.bytes_out += len(ev2.data)
                if messages is not None:
                    messages.feed(ev2.data)
                framed = down.send_data(s.id, ev2.data, ev2.end_stream)
                self.flush()
                conn.ack(up, framed)
                conn.flush()
                if ev2.end_stream:
                    return None
                await self.pipe.drain()
            elif isinstance(ev2, StreamTrailers):
                if x.grpc:
                    trailer = join_headers(ev2.headers).get("grpc-status")
                    x.grpc_status = _grpc_status(trailer, x.grpc_status)
                down.send_trailers(s.id, ev2.headers)
                self.flush()
                return None
            elif isinstance(ev2, StreamReset):
                x.flag("UC")
                down.reset_stream(
                    s.id, ErrorCodes.CANCEL if ev2.error_code == 0 else ev2.error_code
                )
                self.flush()
                return None


def _grpc_status(value: str | None, default: str) -> str:
    """A ``grpc-status`` as the metrics label it: the code (``0``-``16``, two digits at
    most), ``unknown`` for anything else an upstream sends (it must not mint series)."""
    if value is None:
        return default
    return value if value.isdigit() and len(value) <= 2 else "unknown"


async def _linger(pipe: Pipe) -> None:
    """After a final GOAWAY: half-close, then read and drop what the client still sends
    until it closes (or ``CLOSE_GRACE``), so our close is no RST that would discard the
    GOAWAY on its side; a client reading nothing is aborted with its output."""
    pipe.write_eof()
    try:
        async with asyncio.timeout(CLOSE_GRACE):
            while await pipe.read():
                pass
    except (TimeoutError, ConnectionError):
        pipe.abort()


async def serve_h2(engine: L7Engine, h2pool: H2Pool, ds: Downstream, pipe: Pipe) -> None:
    """Serve one client connection speaking h2c (prior knowledge)."""
    await _Session(engine, h2pool, ds, pipe).serve()


__all__ = ["H2Conn", "H2Pool", "serve_h2"]
