"""The HTTP/1.1 side of the L7 path: one client connection served request after request
(``Http1Session``), each executed as its plan says (``L7Engine.prepare``): the attempts to
the endpoints the balancer picks over pooled upstream connections (``proxy/h1pool.py``),
the response relayed with the plan's header operations, local replies, and protocol
switches (WebSocket) relayed as bytes.

Decides nothing about where a request goes or whether it may (``core/plan.py``,
``proxy/admission.py``); the HTTP/1.1 machines (``protocol/http1.py``) do the framing.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Coroutine, Sequence
from collections.abc import Set as AbstractSet
from typing import Final

from nodeagent.core.balancer import endpoint_address
from nodeagent.core.clusters import Cluster
from nodeagent.core.paths import BadTarget, request_target
from nodeagent.core.plan import Answer, Plan, Request, apply_header_ops, join_headers
from nodeagent.errors import PeerError
from nodeagent.model.traffic import HeaderOperations, HTTPRetry
from nodeagent.protocol.http1 import (
    BodyChunk,
    ConnectionClosed,
    DownstreamEvent,
    DownstreamHttp1,
    Headers,
    Informational,
    ProtocolError,
    RawHead,
    RequestHead,
    ResponseEnd,
    ResponseHead,
    Upgraded,
    forwardable_headers,
)
from nodeagent.proxy.h1pool import Events, H1Conn
from nodeagent.proxy.l7body import RETRY_BUFFER, RequestBody, done_body
from nodeagent.proxy.l7conn import Downstream, Exchange, begin_exchange
from nodeagent.proxy.l7engine import L7Engine
from nodeagent.proxy.l7retry import LocalReply, Redirect, retriable_status, within
from nodeagent.proxy.pipe import Pipe, PipeClosed

log = logging.getLogger("nodeagent.proxy.l7")

_monotonic: Final = time.monotonic
"""(``Final``: compiled code reads it from a C static, not through the module ``time``.)"""

_NO_HOSTS: Final[frozenset[str]] = frozenset()
"""The hosts a request's first attempt excludes (a set is made only for a retry)."""


class H1Sink:
    """A request body written to an upstream HTTP/1.1 connection."""

    __slots__ = ("conn",)

    def __init__(self, conn: H1Conn) -> None:
        self.conn = conn

    def body(self, data: bytes) -> None:
        self.conn.pipe.write(self.conn.machine.send_body(data))

    def end(self, trailers: Headers) -> None:
        self.conn.pipe.write(self.conn.machine.send_end(trailers))

    async def drain(self) -> None:
        await self.conn.pipe.drain()

    def abort(self) -> None:
        self.conn.pipe.abort()


class Http1Session:
    """One client connection speaking HTTP/1.1, served until it closes or a response
    says close; its events are the request bodies' ``BodySource``."""

    def __init__(self, engine: L7Engine, ds: Downstream, pipe: Pipe) -> None:
        self.engine = engine
        self.ds = ds
        self.pipe = pipe
        limits = engine.http1_limits
        self.down = DownstreamHttp1(
            max_header_size=limits.max_header_size, max_headers=limits.max_headers
        )
        self.events: Events[DownstreamEvent] = Events()
        self.timed_out = ""
        """Why ``next_request`` gave up waiting: ``idle_timeout`` or
        ``request_headers_timeout`` (empty: it did not)."""
        self._deadline = 0.0
        """When ``next_request``'s wait ends (loop time): idle, then the head's clock."""
        self._tick = min(limits.idle_timeout, limits.request_headers_timeout)
        """The shortest a deadline can be from when it is set: the timer fires at least
        this often while the connection lives, never after a deadline."""
        self._timer: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        """Asked once: Python 3.11's ``get_running_loop()`` makes a ``getpid()`` syscall."""
        self._task: asyncio.Task[object] | None = None
        self._waiting = False
        self._head = False
        self._expired = False
        self._idle_addr = ""
        self._idle: list[H1Conn] | None = None
        """The pool's idle connections to ``_idle_addr`` from this client's pod (the
        endpoint of the last request, usually the next one's too)."""

    async def next_event(self) -> DownstreamEvent:
        events = self.events
        while True:
            ev = events.take()
            if ev is not None:
                return ev
            data = await self.pipe.read()
            evs = self.down.receive_data(data)
            if not evs and not data:
                return ConnectionClosed(clean=False)
            events.put(evs)

    async def next_request(self) -> DownstreamEvent | None:
        """The next request's first event; None when the client stayed silent for the
        idle timeout, or took longer than the head timeout from the request's first byte
        to the end of its head (``timed_out`` says which)."""
        events = self.events
        ev = events.take()
        if ev is not None:
            return ev
        limits = self.engine.http1_limits
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        # one lazy timer per connection (``_expire``), not one per request: here only the
        # deadline moves
        self._deadline = loop.time() + limits.idle_timeout
        self._head = False
        if self._timer is None:
            self._task = asyncio.current_task()
            self._timer = loop.call_at(loop.time() + self._tick, self._expire)
        self._waiting = True
        try:
            while True:
                data = await self.pipe.read()
                evs = self.down.receive_data(data)
                if evs:
                    events.put(evs)
                    break
                if not data:
                    return ConnectionClosed(clean=False)
                if not self._head:  # the head's clock starts at its first byte
                    self._head = True
                    self._deadline = loop.time() + limits.request_headers_timeout
        except asyncio.CancelledError:
            task = self._task
            if not self._expired or task is None or task.uncancel() > 0:
                raise
            self._expired = False
            self.timed_out = "request_headers_timeout" if self._head else "idle_timeout"
            return None
        finally:
            self._waiting = False
        return events.take()

    def _expire(self) -> None:
        """The connection's timer: cancels ``next_request``'s wait once its deadline has
        passed; otherwise fires again no later than any deadline that may be set before."""
        loop = self._loop or asyncio.get_running_loop()
        now = loop.time()
        if self._waiting and now >= self._deadline and self._task is not None:
            self._expired = True
            self._timer = None
            self._task.cancel()
            return
        due = now + self._tick
        if self._waiting and self._deadline < due:
            due = self._deadline
        self._timer = loop.call_at(due, self._expire)

    def take_now(self) -> DownstreamEvent | None:
        return self.events.take()

    async def serve(self) -> None:
        pipe, down, ds = self.pipe, self.down, self.ds
        try:
            while True:
                try:
                    ev = await self.next_request()
                except PipeClosed:
                    return
                if ev is None:
                    self._timed_out()
                    return
                if isinstance(ev, RequestHead):
                    keep = await self._exchange(ev)
                    if not keep or not down.keep_alive:
                        return
                    self.events.put(down.start_next_request())
                elif isinstance(ev, ProtocolError):
                    flag = "DPE"
                    pipe.write(down.send_error(ev.status, ev.reason, flag))
                    if ev.status == 431:  # a limit, not a broken client: counted, logged once
                        many = "fields" in ev.reason
                        limit = "max_headers_count" if many else "max_request_headers_size"
                        self.engine.limit_hit(limit, ds, ev.reason)
                    else:
                        log.warning(
                            "malformed request from %s (%s) to %s: %d %s",
                            ds.pod.key,
                            ds.source_ip,
                            ds.service.key,
                            ev.status,
                            ev.reason,
                        )
                    x = Exchange(_monotonic(), time.time(), "-", "-", "-", "HTTP/1.1")
                    x.status = ev.status
                    x.flag(flag)
                    self.engine.recorder.record(ds, x)
                    return
                else:  # EOF between requests, or stray bytes
                    return
        finally:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            pipe.write_eof()
            pipe.close()

    def _timed_out(self) -> None:
        """``next_request`` gave up: an idle connection is closed quietly (as Envoy's
        ``idle_timeout``); a head that is too slow gets 408 (``request_headers_timeout``)."""
        limits, limit = self.engine.http1_limits, self.timed_out
        if limit == "idle_timeout":
            self.engine.limit_hit(limit, self.ds, f"no request for {limits.idle_timeout:g}s")
            return
        reason = f"request head not received within {limits.request_headers_timeout:g}s"
        body = f"{reason}\n".encode()  # (no request head: the machine has no exchange to answer)
        self.pipe.write(
            b"HTTP/1.1 408 Request Timeout\r\ncontent-type: text/plain; charset=utf-8\r\n"
            b"content-length: %d\r\nconnection: close\r\n\r\n%s" % (len(body), body)
        )
        self.engine.limit_hit(limit, self.ds, reason)
        x = Exchange(_monotonic(), time.time(), "-", "-", "-", "HTTP/1.1")
        x.status = 408
        self.engine.recorder.record(self.ds, x)

    async def _exchange(self, head: RequestHead) -> bool:
        """One request/response; returns False when the client connection must close."""
        hdrs = join_headers(head.headers)
        host = hdrs.get("host", "")
        bad = ""
        try:  # origin-form, normalized: what routing, policy and the app see
            target, authority = request_target(
                head.method, head.target, host, self.engine.path_normalization
            )
        except BadTarget as e:
            target, authority, bad = head.target, host, str(e)
        if authority != host:  # absolute-form: its authority replaces Host (RFC 9112 §3.2.2)
            hdrs["host"] = authority
            head.headers = (("host", authority), *((k, v) for k, v in head.headers if k != "host"))
            head.raw = None
        req = Request(head.method, target, authority, hdrs, self.ds.conn)
        version = head.http_version
        x = begin_exchange(req, "HTTP/1.1" if version == "1.1" else f"HTTP/{version}")
        body = RequestBody(self)
        if head.expect_continue and not bad:  # Envoy's default: answer 100 ourselves
            self.pipe.write(self.down.send_continue())
        keep = True
        try:
            if bad:  # before any policy or upstream sees it; the connection then closes
                x.detail = bad
                keep = False
                raise LocalReply(400, "DPE", "invalid request target")
            keep = await self._route(head, req, body, x)
        except LocalReply as r:
            keep = await self._local_reply(body, x, r) and not bad
        except (PipeClosed, ConnectionError):
            x.flag("DC")
            keep = False
        finally:
            body.cancel()
            x.bytes_in = body.total
            self.engine.recorder.record(self.ds, x)
        return keep and not body.client_gone

    async def _local_reply(self, body: RequestBody, x: Exchange, r: LocalReply) -> bool:
        pipe, down = self.pipe, self.down
        x.flag(r.flag)
        x.status = r.status
        x.detail = x.detail or r.body
        data = down.send_error(r.status, r.body, r.flag, r.headers)
        if not data:  # a response had already started: all we can do is close
            pipe.abort()
            return False
        pipe.write(data)
        x.bytes_out += len(r.body) + 1
        if not down.keep_alive:
            return False
        if not body.complete and not body.client_gone:
            if body.total > 4 * RETRY_BUFFER:
                return False  # do not read a huge body just to throw it away
            await body.finish()
        return down.keep_alive and body.complete

    async def _route(self, head: RequestHead, req: Request, body: RequestBody, x: Exchange) -> bool:
        pipe, down = self.pipe, self.down
        try:
            planned = self.engine.plan(self.ds, req, x)
            if isinstance(planned, Answer) or planned.delay is not None:
                p = await self.engine.settle(planned, x)
            else:
                p = planned
        except Redirect as r:
            x.status = r.status
            pipe.write(
                down.send_response_head(
                    r.status, [("location", r.location), ("content-length", "0")]
                )
                + down.send_end()
            )
            if not body.complete:
                await body.finish()
            return True
        raw = head.raw
        out: Sequence[tuple[str, str]]
        if raw is not None and p.mirror is None and p.authority == req.authority and p.only_adds():
            # the client's head goes upstream as it came, the plan's fields after its own:
            # the head ``forwardable_headers`` and ``edit_request`` would make, but for the
            # case of names and the spaces around values
            out = p.add_headers
        else:
            raw = None
            fields = forwardable_headers(head.headers, upgrade=head.upgrade)
            if head.expect_continue:
                fields = [(k, v) for k, v in fields if k != "expect"]
            p.edit_request(fields)
            if p.authority != req.authority:
                fields = [("host", p.authority), *((k, v) for k, v in fields if k != "host")]
            out = fields
        if head.upgrade is not None:
            return await self._upgrade(head, p.path, out, p.cluster, x)
        try:
            if p.timeout is None:  # (most routes: no coroutine layer for ``within``)
                return await self._attempts(head, out, raw, body, p, x)
            return await within(p.timeout, self._attempts(head, out, raw, body, p, x))
        except TimeoutError:
            x.flag("UT")
            if down.response_started:
                pipe.abort()
                return False
            raise LocalReply(504, "UT", f"upstream request timeout ({p.timeout:g}s)") from None
        finally:
            if p.mirror is not None:
                self.engine.maybe_mirror(self.ds, p.mirror, head.method, p.path, list(out), body)

    async def _attempts(
        self,
        head: RequestHead,
        out: Sequence[tuple[str, str]],
        raw: RawHead | None,
        body: RequestBody,
        p: Plan,
        x: Exchange,
    ) -> bool:
        """The attempts of a request: ``out`` are the headers sent upstream, or with
        ``raw`` (the client's head, sent as it came) the ones added after its own."""
        engine, ds = self.engine, self.ds
        cluster, policy, target = p.cluster, p.retry, p.path
        bal = engine.clusters.balancer(cluster, ds.pod)
        tried: AbstractSet[str] = _NO_HOSTS
        retries_left = policy.attempts
        last_flag = "UF"
        while True:
            host = bal.pick_host(p.hash_key, tried)
            if host is None:
                raise LocalReply(503, "UH", f"no healthy upstream for {cluster.name}")
            ep, addr = host.endpoint, host.addr
            x.attempts += 1
            x.upstream = addr
            x.dst_pod = ep.pod
            x.sent_at = now = _monotonic()
            failure: str | None = None
            status_retry = False
            host.start()
            conn: H1Conn | None = None
            try:
                try:
                    idle = self._idle if addr == self._idle_addr else None
                    if idle is not None:
                        conn = engine.pool.take_idle(idle, cluster, now)
                    else:
                        conn = engine.pool.reuse(ds.pool_key, cluster, addr, now)
                    if conn is not None:
                        reused = True
                        if idle is None:  # (a pooled connection has been in its list)
                            self._idle_addr, self._idle = addr, conn.idle
                    else:
                        conn, reused = await engine.acquire(ds, cluster, ep)
                    x.dst_principal = conn.principal
                    resp, fail = await _send(conn, head, target, out, raw, body, policy)
                    if fail is not None and fail[1] == "UC" and reused and body.replayable:
                        # a pooled connection the peer had closed: once more, on a new one
                        engine.pool.discard(conn)
                        conn = None
                        conn, _ = await engine.acquire(ds, cluster, ep)
                        resp, fail = await _send(conn, head, target, out, raw, body, policy)
                except PeerError as e:
                    bal.report(ep, None, True)
                    failure, last_flag = "connect-failure", "UF"
                    log.info("%s: connect to %s failed: %s", cluster.name, addr, e)
                else:
                    # (a connection not handed on is discarded in ``finally``)
                    if fail is not None:
                        failure, last_flag = fail
                        bal.report(ep, 504 if last_flag == "UT" else 503, False)
                    else:
                        assert resp is not None and conn is not None
                        bal.report(ep, resp.status, False)
                        reason = retriable_status(
                            policy, resp.status, _header_value(resp.headers, "grpc-status")
                        )
                        if reason is not None and retries_left > 0 and body.replayable:
                            failure, last_flag, status_retry = reason, "URX", True
                        else:
                            if reason is not None and x.attempts > 1:
                                x.flag("URX")
                            c = conn
                            conn = None
                            return await self._respond(
                                c, cluster, resp, body, p.set_cookie, p.response_ops, x
                            )
            finally:
                host.finish()
                if conn is not None:
                    engine.pool.discard(conn, abort=True)
            # a failed attempt: retry, or tell the client
            body.detach()
            if await engine.retry_or_fail(
                x, cluster, policy, body, retries_left, failure or "", last_flag, status_retry
            ):
                retries_left -= 1
                tried = {*tried, addr}  # the next attempt goes elsewhere when it can
                continue

    async def _respond(
        self,
        conn: H1Conn,
        cluster: Cluster,
        resp: ResponseHead,
        body: RequestBody,
        set_cookie: str | None,
        response_ops: tuple[HeaderOperations, ...],
        x: Exchange,
    ) -> bool:
        pipe, down = self.pipe, self.down
        x.status = resp.status
        x.answered_at = _monotonic()
        raw = resp.raw if not response_ops else None
        if raw is not None:  # the upstream's head goes as it came, a cookie after it
            headers = [] if set_cookie is None else [("set-cookie", set_cookie)]
        else:
            headers = forwardable_headers(resp.headers)
            for ops in response_ops:
                apply_header_ops(headers, ops)
            if set_cookie is not None:
                headers.append(("set-cookie", set_cookie))
        ok = False
        try:
            # Bytes are gathered while events are already buffered and written once: a
            # small response (head, body, end in one read) costs one write, not three.
            out = [down.send_response_head(resp.status, headers, resp.reason, raw=raw)]
            while True:
                ev = conn.events.take()
                if ev is None:
                    if out:
                        pipe.write(b"".join(out))
                        out = []
                        if pipe.lost:
                            x.flag("DC")
                            return False
                        await pipe.drain()
                    ev = await conn.next_event()
                if isinstance(ev, BodyChunk):
                    x.bytes_out += len(ev.data)
                    out.append(down.send_body(ev.data))
                elif isinstance(ev, ResponseEnd):
                    out.append(down.send_end(ev.trailers))
                    ok = True
                    break
                elif isinstance(ev, ConnectionClosed) and ev.clean:
                    out.append(down.send_end())
                    ok = True
                    break
                else:
                    x.flag("UC")
                    pipe.abort()
                    return False
            pipe.write(b"".join(out))
        finally:
            if ok and body.complete and body.ended_upstream:
                self.engine.pool.release(conn, cluster)
            else:
                self.engine.pool.discard(conn, abort=not ok)
        # the upstream may answer before the request body ended: then close
        return body.complete

    async def _upgrade(
        self,
        head: RequestHead,
        target: str,
        out: Sequence[tuple[str, str]],
        cluster: Cluster,
        x: Exchange,
    ) -> bool:
        """A protocol switch (WebSocket): one attempt, then raw bytes both ways."""
        engine, pipe, down = self.engine, self.pipe, self.down
        ep = engine.clusters.balancer(cluster, self.ds.pod).pick(None, set())
        if ep is None:
            raise LocalReply(503, "UH", f"no healthy upstream for {cluster.name}")
        x.attempts, x.upstream, x.dst_pod = 1, endpoint_address(ep), ep.pod
        try:
            conn, _ = await engine.acquire(self.ds, cluster, ep)
        except PeerError as e:
            raise LocalReply(503, "UF", f"upstream connect error: {e}") from None
        x.dst_principal = conn.principal
        try:
            conn.pipe.write(conn.machine.send_request_head(head.method, target, out))
            while True:
                ev = await conn.next_event()
                if isinstance(ev, ResponseHead):
                    break
                if not isinstance(ev, Informational):
                    raise LocalReply(503, "UC", "upstream closed before answering the upgrade")
            x.status = ev.status
            if ev.status != 101:  # refused: an ordinary response
                return await self._respond(conn, cluster, ev, done_body(), None, (), x)
            upgrade = next((v for k, v in ev.headers if k == "upgrade"), head.upgrade)
            pipe.write(
                down.send_response_head(101, forwardable_headers(ev.headers, upgrade=upgrade))
            )
            for item in down.take_events():
                if isinstance(item, Upgraded):
                    conn.pipe.write(item.data)
            for up_item in conn.events.take_all():
                if isinstance(up_item, Upgraded):
                    pipe.write(up_item.data)
            await asyncio.gather(_copy(pipe, conn.pipe), _copy(conn.pipe, pipe))
            return False
        finally:
            engine.pool.discard(conn)


Sent = tuple[ResponseHead | None, tuple[str, str] | None]
"""A response head, or why there is none (retryOn kind, response flag)."""


def _send(
    conn: H1Conn,
    head: RequestHead,
    target: str,
    out: Sequence[tuple[str, str]],
    raw: RawHead | None,
    body: RequestBody,
    policy: HTTPRetry,
) -> Coroutine[None, None, Sent]:
    """Send the request on ``conn`` now; what to await for the response head (a plain
    function: no coroutine of its own per request)."""
    wire = conn.machine.send_request_head(head.method, target, out, body=head.has_body, raw=raw)
    conn.pipe.write(wire)
    body.attach(H1Sink(conn))
    return _response_head(conn, policy.per_try_timeout)


async def _response_head(conn: H1Conn, per_try_timeout: float | None) -> Sent:
    """The next response head on ``conn``, or why there is none."""
    try:
        if per_try_timeout is not None:
            async with asyncio.timeout(per_try_timeout):
                return await _response_head(conn, None)
        events, machine, pipe = conn.events, conn.machine, conn.pipe
        while True:
            ev = events.take()
            while ev is None:  # ``conn.next_event`` inlined: one coroutine less per request
                data = await pipe.read()
                evs = machine.receive_data(data)
                if not evs and not data:
                    return None, ("reset", "UC")
                events.put(evs)
                ev = events.take()
            if isinstance(ev, ResponseHead):
                return ev, None
            if isinstance(ev, Informational):
                continue
            if isinstance(ev, ProtocolError):
                log.info("upstream protocol error: %s", ev.reason)
                return None, ("reset", "UPE")
            return None, ("reset", "UC")
    except TimeoutError:
        return None, ("per-try-timeout", "UT")
    except (PipeClosed, ConnectionError):
        return None, ("reset", "UC")


def _header_value(headers: tuple[tuple[str, str], ...], name: str) -> str | None:
    """The first value of ``name`` (lower case) in a parsed head, without joining them all."""
    for k, v in headers:
        if k == name:
            return v
    return None


async def _copy(src: Pipe, dst: Pipe) -> None:
    try:
        while True:
            data = await src.read()
            if not data:
                dst.write_eof()
                return
            dst.write(data)
            await dst.drain()
    except (PipeClosed, ConnectionError):
        dst.abort()


__all__ = ["H1Sink", "Http1Session"]
