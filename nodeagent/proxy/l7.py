"""The L7 path of the shared proxy: HTTP requests routed per VirtualService and
DestinationRule on the client's node, then sent through the mTLS tunnels.

Owns, per request: route selection (``core/route.py``), redirects and rewrites, header
operations, fault injection, the weighted destination pick, endpoint choice by the
destination's load balancer and outlier detection (``core/balancer.py``), retries with
Istio's default policy, route and per-try timeouts, mirroring, the upstream connection
pool with DestinationRule ``connectionPool`` limits, the access-log record and the
request metrics. Protocol machines (``protocol/http1.py``, ``protocol/http2.py``) do the
framing; this module never parses bytes itself.

Each downstream connection is one coroutine; each exchange streams its request body to
the upstream while keeping a copy of at most ``RETRY_BUFFER`` bytes, so a request can be
retried only while its body fits (as Envoy's retry buffer).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from bisect import bisect_left
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Protocol, TypeVar

from nodeagent.core.balancer import BalancerRegistry, endpoint_address, hash_key_for
from nodeagent.core.clusters import Cluster, ClusterError, Clusters, fqdn
from nodeagent.core.route import (
    MEMO_MAX,
    RequestInfo,
    RouteDecision,
    RouteOutcome,
    decided_by_request_line,
    pick_weighted,
    select_route,
)
from nodeagent.errors import ConnectRefusedError, PeerError
from nodeagent.model.objects import Pod, Service, ServicePort
from nodeagent.model.ratelimit import KeyKind
from nodeagent.model.snapshot import Endpoint, MeshSnapshot, PerSnapshot
from nodeagent.model.traffic import (
    DEFAULT_RETRY,
    HeaderOperations,
    HTTPRetry,
    HTTPRoute,
    MatchKind,
    RouteDestination,
)
from nodeagent.protocol.http1 import (
    BodyChunk,
    ConnectionClosed,
    DownstreamEvent,
    DownstreamHttp1,
    Headers,
    Informational,
    ProtocolError,
    RequestEnd,
    RequestHead,
    ResponseEnd,
    ResponseHead,
    Upgraded,
    forwardable_headers,
)
from nodeagent.proxy.h1pool import ConnectFn, H1Conn, H1Pool, Overflow
from nodeagent.proxy.pipe import Pipe, PipeClosed
from nodeagent.telemetry.accesslog import AccessLog, AccessRecord, rfc3339
from nodeagent.telemetry.metrics import BUCKET0, COUNT, DURATION_BUCKETS_MS, SUM, Metrics

log = logging.getLogger("nodeagent.proxy.l7")

T = TypeVar("T")

RETRY_BUFFER = 64 * 1024
"""Request body bytes kept for a retry; a longer body is streamed and not retried."""
RETRY_BACKOFF_BASE = 0.025
RETRY_BACKOFF_MAX = 0.25
"""Envoy's defaults: fully jittered exponential back-off between attempts."""
GRPC_RETRY_STATUS = {
    "cancelled": "1",
    "deadline-exceeded": "4",
    "internal": "13",
    "resource-exhausted": "8",
    "unavailable": "14",
}
"""``retryOn`` names of gRPC status codes (matched on ``grpc-status`` of the response)."""

# -- per-request bookkeeping ---------------------------------------------------------------


NO_RETRY = HTTPRetry(attempts=0)


@dataclass
class Downstream:
    """What the L7 path knows about one client connection: on the client's node
    (``inbound`` None: ``pod`` is the caller, requests are routed) or on the called
    workload's node (``inbound`` set: ``pod`` is the callee, requests are admitted by its
    policies and go to the app)."""

    pod: Pod
    source_principal: str
    source_ip: str
    service: Service
    port: ServicePort
    connect: ConnectFn
    meta: dict[str, Any] = field(default_factory=dict)
    """The connection-table record, for ``nodeagent ctl connections``."""
    inbound: Inbound | None = None
    pool_key: str = ""
    """Whose upstream connections these requests may share (default: the pod's)."""
    telemetry: dict[tuple[object, ...], _RecordContext] = field(default_factory=dict)
    """``L7Proxy.record``'s per-destination contexts for this connection."""

    def __post_init__(self) -> None:
        if not self.pool_key:
            self.pool_key = f"in|{self.pod.key}" if self.inbound else self.pod.key


Admit = Callable[
    ["Downstream", str, str, dict[str, str], list[tuple[str, str]], "Exchange"],
    tuple[str, HeaderOperations | None],
]
"""The destination's policy stage for one request (method, target, headers, the headers
to send on, the record): returns to let it through (the normalized target to send, and
headers for its response), raises ``LocalReply`` to answer it."""

ROUTE_HEADER = "x-nodeagent-route"
"""Set by the caller's node proxy on each request it routes (the route taken), read and
removed by the called node (rate limits keyed by route)."""


@dataclass
class Inbound:
    """A connection that reached the called workload's node (after mTLS)."""

    peer_pod: Pod | None
    """The calling pod, when the mesh knows it (from its identity or its address)."""
    cluster: Cluster
    """The workload's own port: one endpoint, the app."""
    admit: Admit
    principal: str
    """The called workload's own identity."""


@dataclass
class Exchange:
    """Everything measured about one request, for the access log and the metrics."""

    start: float
    start_wall: float
    method: str
    authority: str
    path: str
    protocol: str
    route_name: str = ""
    cluster: str = ""
    status: int = 0
    flags: list[str] = field(default_factory=list)
    bytes_in: int = 0
    bytes_out: int = 0
    upstream: str = "-"
    dst_pod: Pod | None = None
    dst_principal: str = "unknown"
    attempts: int = 0
    trace_id: str = ""
    request_id: str = ""
    user_agent: str = ""
    policy: str = ""
    """The AuthorizationPolicy that decided (``namespace/name``), for the access log."""
    policy_rule: int | None = None
    request_principal: str = ""
    detail: str = ""
    """Why the proxy answered itself."""

    def flag(self, f: str) -> None:
        if f not in self.flags:
            self.flags.append(f)


def join_headers(headers: tuple[tuple[str, str], ...]) -> dict[str, str]:
    out: dict[str, str] = {}
    for k, v in headers:
        if k in out:
            out[k] = f"{out[k]}, {v}" if k != "cookie" else f"{out[k]}; {v}"
        else:
            out[k] = v
    return out


def apply_header_ops(headers: list[tuple[str, str]], ops: HeaderOperations | None) -> None:
    """Istio's header operations, in place: ``set`` replaces, ``add`` appends, ``remove``
    drops (names are case-insensitive)."""
    if ops is None:
        return
    if ops.remove or ops.set:
        drop = {n.lower() for n in ops.remove} | {n.lower() for n, _ in ops.set}
        headers[:] = [(k, v) for k, v in headers if k.lower() not in drop]
    for n, v in ops.set:
        headers.append((n.lower(), v))
    for n, v in ops.add:
        headers.append((n.lower(), v))


def _cookies(header: str | None) -> dict[str, str]:
    out: dict[str, str] = {}
    if not header:
        return out
    for part in header.split(";"):
        k, sep, v = part.strip().partition("=")
        if sep and k not in out:
            out[k] = v
    return out


def _rewrite_path(decision: RouteDecision, path: str, new: str) -> str:
    """Istio's ``rewrite.uri``: replaces the matched prefix for a prefix match, else the
    whole path (the query string is kept)."""
    rule = decision.rule
    query = ""
    p, sep, q = path.partition("?")
    if sep:
        query = "?" + q
    if rule is not None and decision.match_index is not None:
        m = rule.matches[decision.match_index].uri
        if m is not None and m.kind is MatchKind.PREFIX and p.startswith(m.value):
            return new + p[len(m.value) :] + query
    return new + query


def _retry_policy(rule: HTTPRoute | None) -> HTTPRetry:
    if rule is None or rule.retries is None:
        return DEFAULT_RETRY
    return rule.retries


def header_value(headers: tuple[tuple[str, str], ...], name: str) -> str | None:
    """The first value of ``name`` (lower case) in a parsed head, without joining them all."""
    for k, v in headers:
        if k == name:
            return v
    return None


def retriable_status(policy: HTTPRetry, status: int, grpc: str | None) -> str | None:
    """The ``retryOn`` condition a response with ``status`` and the ``grpc-status``
    header ``grpc`` (None: absent) meets, or None."""
    on = policy.retry_on
    if status >= 500 and "5xx" in on:
        return "5xx"
    if status in (502, 503, 504) and "gateway-error" in on:
        return "gateway-error"
    if status == 409 and "retriable-4xx" in on:
        return "retriable-4xx"
    code = str(status)
    if code in on:
        return code
    if grpc is not None:
        for name, value in GRPC_RETRY_STATUS.items():
            if grpc == value and name in on:
                return name
    return None


def retriable_failure(policy: HTTPRetry, kind: str) -> bool:
    """Whether a failure before any response (``connect-failure``, ``reset``,
    ``refused-stream``, ``per-try-timeout``) may be retried under ``retryOn``."""
    on = policy.retry_on
    if kind in on:
        return True
    if kind in ("connect-failure", "reset", "per-try-timeout"):
        return "5xx" in on or "gateway-error" in on
    return False


def deadline(seconds: float | None) -> contextlib.AbstractAsyncContextManager[object]:
    """``asyncio.timeout(seconds)``, or nothing at all when there is no limit (most
    routes: the timer machinery costs a few microseconds per request). For one awaitable,
    ``within`` is cheaper."""
    if seconds is None:
        return contextlib.nullcontext()
    return asyncio.timeout(seconds)


async def within(seconds: float | None, aw: Awaitable[T]) -> T:
    """``await aw`` under ``asyncio.timeout(seconds)``, or plainly when there is no limit:
    no context manager to enter and leave per request (``deadline(None)``'s nullcontext
    cost ~3 % of the HTTP/1.1 path's instructions, ``bench/l7_cost.py``)."""
    if seconds is None:
        return await aw
    async with asyncio.timeout(seconds):
        return await aw


def backoff(attempt: int) -> float:
    cap = min(RETRY_BACKOFF_MAX, RETRY_BACKOFF_BASE * (2 ** max(attempt - 1, 0)))
    return random.uniform(0, cap)


class BodySink(Protocol):
    """Where a request body goes: one upstream attempt (an HTTP/1.1 connection or an
    HTTP/2 stream)."""

    def body(self, data: bytes) -> None: ...

    def end(self, trailers: Headers) -> None: ...

    async def drain(self) -> None: ...

    def abort(self) -> None: ...


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


class RequestBody:
    """The request body of one exchange (up to and including its end), read from the
    client as the upstream takes it, with a bounded copy kept for retries."""

    def __init__(
        self,
        next_event: Callable[[], Awaitable[DownstreamEvent]],
        take_now: Callable[[], DownstreamEvent | None],
        limit: int = RETRY_BUFFER,
    ) -> None:
        self._next = next_event
        self._take_now = take_now
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
            ev = self._take_now()
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
                ev = await self._next()
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


class LocalReply(Exception):
    """End the exchange with a local response."""

    def __init__(
        self, status: int, flag: str, body: str, headers: tuple[tuple[str, str], ...] = ()
    ) -> None:
        super().__init__(body)
        self.status = status
        self.flag = flag
        self.body = body
        self.headers = headers


def policy_refusal(e: ConnectRefusedError) -> LocalReply | None:
    """The answer for the client when the destination's policy refused the tunnel: 403
    (an AuthorizationPolicy) or 429 (a connection rate limit); None for other failures."""
    if e.status == 403:
        return LocalReply(403, "RBAC", "RBAC: access denied")
    if e.status == 429:
        return LocalReply(429, "RL", "local_rate_limited", (("retry-after", "1"),))
    return None


class Redirect(Exception):
    def __init__(self, status: int, location: str) -> None:
        super().__init__(location)
        self.status = status
        self.location = location


class _RecordContext:
    """What the access log and the metrics say the same way for every request of one
    client connection to one destination (workload, cluster, route, identity, protocol):
    made once, not per request. ``series`` holds the metric series by (status, flags)."""

    __slots__ = ("dst", "fields", "labels_head", "labels_tail", "series")

    def __init__(self, ds: Downstream, x: Exchange, dst: Pod | None) -> None:
        inbound = ds.inbound
        src: Pod | None
        if inbound is None:
            reporter, src = "source", ds.pod
        else:
            reporter, src = "destination", inbound.peer_pod
        src_name, src_ns = (src.name, src.namespace) if src else ("unknown", "unknown")
        dst_name, dst_ns = (dst.name, dst.namespace) if dst else ("unknown", "unknown")
        mtls = ds.source_principal != "unknown" and x.dst_principal != "unknown"
        svc_host = x.cluster.rsplit("|", 1)[-1] if x.cluster else fqdn(ds.service)
        self.dst = dst
        self.series: dict[tuple[int, str], list[float]] = {}
        # HTTP_LABELS order, around response_code and response_flags
        self.labels_head = (
            reporter,
            src_name,
            src_ns,
            ds.source_principal,
            dst_name,
            dst_ns,
            svc_host,
            x.dst_principal,
            dst.labels.get("version", "unknown") if dst else "unknown",
            "grpc" if x.protocol == "gRPC" else "http",
        )
        self.labels_tail = ("mutual_tls" if mtls else "none", x.route_name or "default")
        self.fields = {
            "source_workload": src_name,
            "source_namespace": src_ns,
            "source_principal": ds.source_principal,
            "destination_service": svc_host,
            "destination_workload": dst_name,
            "destination_namespace": dst_ns,
            "destination_principal": x.dst_principal,
            "protocol": x.protocol,
            "upstream_cluster": x.cluster or "-",
            "route_name": x.route_name or "-",
            "reporter": reporter,
        }


class Routed(NamedTuple):
    """What routing decided for a request line (remembered per snapshot when nothing else,
    headers or the source, could change it)."""

    decision: RouteDecision
    name: str
    """``route_name(decision)``."""
    cluster: Cluster | None
    """The cluster of the rule's only destination; None: pick by weight per request."""
    by_request_line: bool


@dataclass
class Plan:
    """What routing decided for one request, before the first attempt."""

    snap: MeshSnapshot
    rule: HTTPRoute | None
    cluster: Cluster
    path: str
    """The request target after ``rewrite.uri``."""
    authority: str
    """The authority after ``rewrite.authority``."""
    retry: HTTPRetry = DEFAULT_RETRY
    timeout: float | None = None
    hash_key: str | None = None
    set_cookie: str | None = None
    response_ops: list[HeaderOperations | None] = field(default_factory=list)


# -- the engine ----------------------------------------------------------------------------


class L7Proxy:
    """Routes HTTP requests of local pods; one instance per agent."""

    def __init__(
        self,
        snapshot: Callable[[], MeshSnapshot],
        metrics: Metrics,
        access_log: AccessLog,
        *,
        rnd: random.Random | None = None,
    ) -> None:
        self.snapshot = snapshot
        self.metrics = metrics
        self.access_log = access_log
        self.rnd = rnd or random.Random()
        # Istio's minHealthPercent defaults to 0: no panic mode, ejected hosts stay out
        self.clusters = Clusters(
            BalancerRegistry(
                time.monotonic,
                self.rnd,
                panic_threshold=0,
                on_eject=self._on_eject,
                on_return=self._on_return,
            )
        )
        self.pool = H1Pool()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._routed: PerSnapshot[dict[tuple[str, int, str, str, str], Routed]]
        self._routed = PerSnapshot(lambda snap: {})
        """Route decisions by (service, port, method, target, authority), for routes that
        only look at those (bounded by ``MEMO_MAX``)."""
        self._route_keyed = PerSnapshot(_route_keyed)
        """Whether some LocalRateLimit is keyed by route (then the route taken goes along
        to the destination's node)."""

    def _on_eject(self, key: object, addr: str, reason: str) -> None:
        host = str(key).rsplit("|", 1)[-1]
        self.metrics.outlier_ejections.labels(destination_service=host).inc()
        log.warning("outlier detection: ejected %s from %s (%s)", addr, key, reason)

    def _on_return(self, key: object, addr: str) -> None:
        log.info("outlier detection: %s is back in %s", addr, key)

    # -- HTTP/1.1 ---------------------------------------------------------------------------
    async def serve_http1(self, ds: Downstream, pipe: Pipe) -> None:
        """Serve one client connection until it closes or a response says close."""
        down = DownstreamHttp1()
        events: deque[DownstreamEvent] = deque()

        async def next_event() -> DownstreamEvent:
            while not events:
                data = await pipe.read()
                evs = down.receive_data(data)
                if not evs and not data:
                    return ConnectionClosed(clean=False)
                events.extend(evs)
            return events.popleft()

        def take_now() -> DownstreamEvent | None:
            return events.popleft() if events else None

        try:
            while True:
                try:
                    ev = await next_event()
                except PipeClosed:
                    return
                if isinstance(ev, RequestHead):
                    keep = await self._exchange1(ds, pipe, down, ev, next_event, take_now)
                    if not keep or not down.keep_alive:
                        return
                    events.extend(down.start_next_request())
                elif isinstance(ev, ProtocolError):
                    flag = "DPE"
                    pipe.write(down.send_error(ev.status, ev.reason, flag))
                    log.warning(
                        "malformed request from %s (%s) to %s: %d %s",
                        ds.pod.key,
                        ds.source_ip,
                        ds.service.key,
                        ev.status,
                        ev.reason,
                    )
                    x = Exchange(
                        time.monotonic(),
                        time.time(),
                        "-",
                        "-",
                        "-",
                        "HTTP/1.1",
                        status=ev.status,
                        flags=[flag],
                    )
                    self.record(ds, x)
                    return
                else:  # EOF between requests, or stray bytes
                    return
        finally:
            pipe.write_eof()
            pipe.close()

    async def _exchange1(
        self,
        ds: Downstream,
        pipe: Pipe,
        down: DownstreamHttp1,
        head: RequestHead,
        next_event: Callable[[], Awaitable[DownstreamEvent]],
        take_now: Callable[[], DownstreamEvent | None],
    ) -> bool:
        """One request/response; returns False when the client connection must close."""
        hdrs = join_headers(head.headers)
        x = Exchange(
            start=time.monotonic(),
            start_wall=time.time(),
            method=head.method,
            authority=hdrs.get("host", ""),
            path=head.target,
            protocol=f"HTTP/{head.http_version}",
            user_agent=hdrs.get("user-agent", ""),
        )
        body = RequestBody(next_event, take_now)
        if head.expect_continue:  # Envoy's default: answer 100 ourselves
            pipe.write(down.send_continue())
        keep = True
        try:
            keep = await self._route1(ds, pipe, down, head, hdrs, body, x)
        except LocalReply as r:
            keep = await self._local_reply(pipe, down, body, x, r)
        except (PipeClosed, ConnectionError):
            x.flag("DC")
            keep = False
        finally:
            body.cancel()
            x.bytes_in = body.total
            self.record(ds, x)
        return keep and not body.client_gone

    async def _local_reply(
        self, pipe: Pipe, down: DownstreamHttp1, body: RequestBody, x: Exchange, r: LocalReply
    ) -> bool:
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

    async def plan(
        self,
        ds: Downstream,
        method: str,
        path: str,
        hdrs: dict[str, str],
        out: list[tuple[str, str]],
        x: Exchange,
    ) -> Plan:
        """Route one request: everything decided before the first attempt. ``out`` (the
        headers to send upstream) is completed in place. Raises ``LocalReply`` for answers made
        here (no route, fault abort, a bad destination) and ``Redirect``."""
        if ds.inbound is not None:
            return self._plan_inbound(ds, ds.inbound, method, path, hdrs, out, x)
        snap = self.snapshot()
        info: RequestInfo | None = None
        memo = self._routed.get(snap)
        key = (ds.service.key, ds.port.port, method, path, x.authority)
        routed = memo.get(key)
        if routed is None:
            info = self._request_info(ds, method, path, hdrs, x)
            routed = self._route(snap, ds, info)
            if routed.by_request_line:
                if len(memo) >= MEMO_MAX:
                    memo.clear()
                memo[key] = routed
        decision = routed.decision
        if decision.outcome is RouteOutcome.NO_ROUTE:
            raise LocalReply(
                404,
                "NR",
                f"no VirtualService route of {decision.service_fqdn} matches this request",
            )
        rule = decision.rule
        x.route_name = routed.name
        if rule is not None and rule.redirect is not None:
            rd = rule.redirect
            target = rd.uri if rd.uri is not None else path
            raise Redirect(rd.redirect_code, f"http://{rd.authority or x.authority}{target}")
        if rule is not None and rule.fault is not None:
            await self._fault(rule, x)
        rdest: RouteDestination | None
        if routed.cluster is not None:  # one destination: decided with the route
            rdest, cluster = decision.routes[0], routed.cluster
        else:
            rdest = pick_weighted(decision.routes, self.rnd.random())
            if rdest is None:
                raise LocalReply(
                    503, "NR", f"route {x.route_name or decision.service_fqdn} has no destinations"
                )
            try:
                cluster = self.clusters.cluster(snap, rdest.destination, ds.port.port)
            except ClusterError as e:
                raise LocalReply(503, "NC", str(e)) from None
        x.cluster = cluster.name
        p = Plan(snap=snap, rule=rule, cluster=cluster, path=path, authority=x.authority)
        if rule is not None and rule.rewrite is not None:
            if rule.rewrite.uri is not None:
                p.path = _rewrite_path(decision, path, rule.rewrite.uri)
            if rule.rewrite.authority is not None:
                p.authority = rule.rewrite.authority
        tp = hdrs.get("traceparent")
        rid = hdrs.get("x-request-id")
        if tp is None or rid is None:
            # ids for correlation, not secrets: the seeded PRNG, not a syscall per request
            h = f"{self.rnd.getrandbits(320) | _NONZERO_IDS:080x}"
            if tp is None:  # W3C trace context, not sampled
                x.trace_id = h[:32]
                out.append(("traceparent", f"00-{x.trace_id}-{h[32:48]}-00"))
            if rid is None:  # a version 4 UUID
                rid = f"{h[48:56]}-{h[56:60]}-4{h[61:64]}-{_UUID_VARIANT[h[64]]}{h[65:68]}-{h[68:]}"
                out.append(("x-request-id", rid))
        if tp is not None:
            x.trace_id = tp.split("-")[1] if tp.count("-") >= 3 else ""
        x.request_id = rid
        out.append(("x-forwarded-proto", "http"))
        if ROUTE_HEADER in hdrs:
            out[:] = [(k, v) for k, v in out if k != ROUTE_HEADER]
        if x.route_name and self._route_keyed.get(snap):
            out.append((ROUTE_HEADER, x.route_name))
        if rule is not None and rule.headers is not None:
            apply_header_ops(out, rule.headers.request)
            p.response_ops.append(rule.headers.response)
        if rdest.headers is not None:
            apply_header_ops(out, rdest.headers.request)
            p.response_ops.append(rdest.headers.response)
        # consistent hashing needs the key before the pick
        lb = cluster.policy.load_balancer
        if lb is not None and lb.consistent_hash is not None:
            if info is None:
                info = self._request_info(ds, method, path, hdrs, x)
            p.hash_key, cookie = hash_key_for(
                lb.consistent_hash,
                hdrs,
                _cookies(hdrs.get("cookie")),
                ds.source_ip,
                info.query_params,
                connection=str(ds.meta.get("source", "")),
            )
            if cookie is not None:
                p.set_cookie = cookie.header_value()
        p.retry = _retry_policy(rule)
        p.timeout = rule.timeout if rule is not None else None
        return p

    @staticmethod
    def _request_info(
        ds: Downstream, method: str, path: str, hdrs: dict[str, str], x: Exchange
    ) -> RequestInfo:
        return RequestInfo(
            method=method,
            authority=x.authority,
            path=path,
            headers=hdrs,
            port=ds.port.port,
            source_labels=ds.pod.labels,
            source_namespace=ds.pod.namespace,
        )

    def _route(self, snap: MeshSnapshot, ds: Downstream, info: RequestInfo) -> Routed:
        """The route decision for a request, with its single destination's cluster already
        built when the rule has one destination (and that cluster exists)."""
        decision = select_route(snap, fqdn(ds.service), info)
        cluster: Cluster | None = None
        routes = decision.routes
        if decision.outcome is not RouteOutcome.NO_ROUTE and len(routes) == 1:
            with contextlib.suppress(ClusterError):  # raised again per request, on the slow path
                cluster = self.clusters.cluster(snap, routes[0].destination, ds.port.port)
        return Routed(decision, route_name(decision), cluster, decided_by_request_line(decision))

    def _plan_inbound(
        self,
        ds: Downstream,
        inbound: Inbound,
        method: str,
        path: str,
        hdrs: dict[str, str],
        out: list[tuple[str, str]],
        x: Exchange,
    ) -> Plan:
        """At the called workload: its policies admit the request (or raise
        ``LocalReply``), then it goes to the app as it is, without retries (the caller's
        node retries)."""
        tp = hdrs.get("traceparent")
        x.trace_id = tp.split("-")[1] if tp is not None and tp.count("-") >= 3 else ""
        x.request_id = hdrs.get("x-request-id", "")
        x.cluster = inbound.cluster.name
        target, response_ops = inbound.admit(ds, method, path, hdrs, out, x)
        return Plan(
            snap=self.snapshot(),
            rule=None,
            cluster=inbound.cluster,
            path=target,
            authority=x.authority,
            retry=NO_RETRY,
            response_ops=[response_ops] if response_ops is not None else [],
        )

    async def _route1(
        self,
        ds: Downstream,
        pipe: Pipe,
        down: DownstreamHttp1,
        head: RequestHead,
        hdrs: dict[str, str],
        body: RequestBody,
        x: Exchange,
    ) -> bool:
        out = forwardable_headers(head.headers, upgrade=head.upgrade)
        if head.expect_continue:
            out = [(k, v) for k, v in out if k != "expect"]
        try:
            p = await self.plan(ds, head.method, head.target, hdrs, out, x)
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
        if p.authority != x.authority:
            out = [("host", p.authority), *((k, v) for k, v in out if k != "host")]
        if head.upgrade is not None:
            return await self._upgrade1(ds, pipe, down, head, p.path, out, p.cluster, x)
        try:
            return await within(p.timeout, self._attempts1(ds, pipe, down, head, out, body, p, x))
        except TimeoutError:
            x.flag("UT")
            if down.response_started:
                pipe.abort()
                return False
            raise LocalReply(504, "UT", f"upstream request timeout ({p.timeout:g}s)") from None
        finally:
            if p.rule is not None and p.rule.mirror is not None:
                self._maybe_mirror(ds, p.snap, p.rule, head.method, p.path, out, body)

    async def _fault(self, rule: HTTPRoute, x: Exchange) -> None:
        f = rule.fault
        assert f is not None
        if f.delay is not None and self.rnd.random() * 100 < f.delay.percentage:
            x.flag("DI")
            await asyncio.sleep(f.delay.fixed_delay)
        if f.abort is not None and self.rnd.random() * 100 < f.abort.percentage:
            raise LocalReply(f.abort.http_status, "FI", "fault filter abort")

    async def _attempts1(
        self,
        ds: Downstream,
        pipe: Pipe,
        down: DownstreamHttp1,
        head: RequestHead,
        out: list[tuple[str, str]],
        body: RequestBody,
        p: Plan,
        x: Exchange,
    ) -> bool:
        cluster, policy, target = p.cluster, p.retry, p.path
        bal = self.clusters.balancer(cluster, ds.pod)
        tried: set[str] = set()
        retries_left = policy.attempts
        last_flag = "UF"
        while True:
            ep = bal.pick(p.hash_key, tried)
            if ep is None:
                raise LocalReply(503, "UH", f"no healthy upstream for {cluster.name}")
            addr = endpoint_address(ep)
            tried.add(addr)
            x.attempts += 1
            x.upstream = addr
            x.dst_pod = ep.pod
            failure: str | None = None
            status_retry = False
            bal.started(ep)
            conn: H1Conn | None = None
            try:
                try:
                    conn, reused = await self._acquire(ds, cluster, ep)
                    x.dst_principal = conn.principal
                    resp, fail = await self._send1(conn, head, target, out, body, policy)
                    if fail is not None and fail[1] == "UC" and reused and body.replayable:
                        # a pooled connection the peer had closed: once more, on a new one
                        self.pool.discard(conn)
                        conn = None
                        conn, _ = await self._acquire(ds, cluster, ep)
                        resp, fail = await self._send1(conn, head, target, out, body, policy)
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
                            policy, resp.status, header_value(resp.headers, "grpc-status")
                        )
                        if reason is not None and retries_left > 0 and body.replayable:
                            failure, last_flag, status_retry = reason, "URX", True
                        else:
                            if reason is not None and x.attempts > 1:
                                x.flag("URX")
                            c = conn
                            conn = None
                            return await self._respond1(
                                pipe,
                                down,
                                c,
                                cluster,
                                resp,
                                body,
                                p.set_cookie,
                                p.response_ops,
                                x,
                            )
            finally:
                bal.finished(ep)
                if conn is not None:
                    self.pool.discard(conn, abort=True)
            # a failed attempt: retry, or tell the client
            body.detach()
            if await self.retry_or_fail(
                x, cluster, policy, body, retries_left, failure or "", last_flag, status_retry
            ):
                retries_left -= 1
                continue

    async def _acquire(self, ds: Downstream, cluster: Cluster, ep: Endpoint) -> tuple[H1Conn, bool]:
        """A pooled or new connection to ``ep`` and whether it was reused. A full pool and
        a destination policy's refusal are answers for the client (``LocalReply``); any
        other failure to connect is a ``PeerError``."""
        try:
            return await self.pool.acquire(ds.pool_key, cluster, ep, ds.connect)
        except Overflow as overflow:  # (one name per exception type: see nodeagent/native.py)
            raise LocalReply(503, "UO", str(overflow)) from None
        except ConnectRefusedError as e:
            refusal = policy_refusal(e)
            if refusal is None:
                raise
            raise refusal from None

    async def retry_or_fail(
        self,
        x: Exchange,
        cluster: Cluster,
        policy: HTTPRetry,
        body: RequestBody,
        retries_left: int,
        failure: str,
        flag: str,
        status_retry: bool,
    ) -> bool:
        """After a failed attempt (``failure`` is its ``retryOn`` kind, ``flag`` its
        response flag): True once the back-off has passed when another attempt may go;
        otherwise raises the ``LocalReply`` the client gets."""
        if (
            retries_left > 0
            and body.replayable
            and (status_retry or retriable_failure(policy, failure))
        ):
            self.metrics.retries.labels(destination_service=cluster.host, reason=failure).inc()
            await asyncio.sleep(backoff(x.attempts))
            return True
        final = "URX" if x.attempts > 1 else flag
        if failure == "per-try-timeout":
            raise LocalReply(504, "UT", f"upstream {x.upstream} did not answer in time")
        if failure == "connect-failure":
            raise LocalReply(
                503,
                final,
                f"upstream connect error: cannot reach {x.upstream} ({cluster.name}) "
                f"after {x.attempts} attempt(s)",
            )
        raise LocalReply(
            502 if flag == "UPE" else 503,
            final,
            f"upstream {x.upstream} reset before response headers ({failure})",
        )

    async def _send1(
        self,
        conn: H1Conn,
        head: RequestHead,
        target: str,
        out: list[tuple[str, str]],
        body: RequestBody,
        policy: HTTPRetry,
    ) -> tuple[ResponseHead | None, tuple[str, str] | None]:
        """Send the request on ``conn`` and wait for the response head; a failure is
        (retryOn kind, response flag)."""
        conn.pipe.write(
            conn.machine.send_request_head(head.method, target, out, body=head.has_body)
        )
        body.attach(H1Sink(conn))
        try:
            return await within(policy.per_try_timeout, _response_head(conn))
        except TimeoutError:
            return None, ("per-try-timeout", "UT")
        except (PipeClosed, ConnectionError):
            return None, ("reset", "UC")

    async def _respond1(
        self,
        pipe: Pipe,
        down: DownstreamHttp1,
        conn: H1Conn,
        cluster: Cluster,
        resp: ResponseHead,
        body: RequestBody,
        set_cookie: str | None,
        resp_ops: list[HeaderOperations | None],
        x: Exchange,
    ) -> bool:
        x.status = resp.status
        headers = forwardable_headers(resp.headers)
        for ops in resp_ops:
            apply_header_ops(headers, ops)
        if set_cookie is not None:
            headers.append(("set-cookie", set_cookie))
        ok = False
        try:
            # Bytes are gathered while events are already buffered and written once: a
            # small response (head, body, end in one read) costs one write, not three.
            out = [down.send_response_head(resp.status, headers, resp.reason)]
            while True:
                if conn.events:
                    ev = conn.events.popleft()
                else:
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
                self.pool.release(conn, cluster)
            else:
                self.pool.discard(conn, abort=not ok)
        # the upstream may answer before the request body ended: then close
        return body.complete

    async def _upgrade1(
        self,
        ds: Downstream,
        pipe: Pipe,
        down: DownstreamHttp1,
        head: RequestHead,
        target: str,
        out: list[tuple[str, str]],
        cluster: Cluster,
        x: Exchange,
    ) -> bool:
        """A protocol switch (WebSocket): one attempt, then raw bytes both ways."""
        bal = self.clusters.balancer(cluster, ds.pod)
        ep = bal.pick(None, set())
        if ep is None:
            raise LocalReply(503, "UH", f"no healthy upstream for {cluster.name}")
        x.attempts, x.upstream, x.dst_pod = 1, endpoint_address(ep), ep.pod
        try:
            conn, _ = await self._acquire(ds, cluster, ep)
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
            if ev.status != 101:
                # refused: an ordinary response
                return await self._respond1(
                    pipe, down, conn, cluster, ev, _done_body(), None, [], x
                )
            upgrade = next((v for k, v in ev.headers if k == "upgrade"), head.upgrade)
            pipe.write(
                down.send_response_head(101, forwardable_headers(ev.headers, upgrade=upgrade))
            )
            for item in down.take_events():
                if isinstance(item, Upgraded):
                    conn.pipe.write(item.data)
            for up_item in list(conn.events):
                if isinstance(up_item, Upgraded):
                    pipe.write(up_item.data)
            conn.events.clear()
            await asyncio.gather(_copy(pipe, conn.pipe), _copy(conn.pipe, pipe))
            return False
        finally:
            self.pool.discard(conn)

    # -- mirroring ----------------------------------------------------------------------------
    def _maybe_mirror(
        self,
        ds: Downstream,
        snap: MeshSnapshot,
        rule: HTTPRoute,
        method: str,
        target: str,
        out: list[tuple[str, str]],
        body: RequestBody,
    ) -> None:
        """After the exchange: a copy of the request to ``rule.mirror`` (host suffixed
        ``-shadow``), when its body was read whole and fits the retry buffer."""
        pct = rule.mirror_percentage if rule.mirror_percentage is not None else 100.0
        if rule.mirror is None or self.rnd.random() * 100 >= pct:
            return
        if not body.complete or not body.replayable:
            return
        try:
            cluster = self.clusters.cluster(snap, rule.mirror, ds.port.port)
        except ClusterError as e:
            log.info("mirror skipped: %s", e)
            return
        headers = [
            (k, f"{v}-shadow" if k == "host" else v) for k, v in out if k != "content-length"
        ]
        data = b"".join(body.chunks)
        headers.append(("content-length", str(len(data))))
        task = asyncio.get_running_loop().create_task(
            self._mirror(ds, cluster, method, target, headers, data)
        )
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _mirror(
        self,
        ds: Downstream,
        cluster: Cluster,
        method: str,
        target: str,
        headers: list[tuple[str, str]],
        data: bytes,
    ) -> None:
        """Send the copy; the answer is read and dropped."""
        ep = self.clusters.balancer(cluster, ds.pod).pick(None, set())
        if ep is None:
            return
        try:
            conn, _ = await self._acquire(ds, cluster, ep)
        except (PeerError, LocalReply):
            return
        ok = False
        try:
            m = conn.machine
            conn.pipe.write(m.send_request_head(method, target, headers, body=bool(data)))
            if data:
                conn.pipe.write(m.send_body(data))
            conn.pipe.write(m.send_end())
            async with asyncio.timeout(30):
                while True:
                    ev = await conn.next_event()
                    if isinstance(ev, ResponseEnd):
                        ok = True
                        break
                    if isinstance(ev, ConnectionClosed | ProtocolError):
                        break
        except (TimeoutError, PipeClosed, ConnectionError):
            pass
        finally:
            if ok:
                self.pool.release(conn, cluster)
            else:
                self.pool.discard(conn, abort=True)

    # -- telemetry ----------------------------------------------------------------------------
    def record(self, ds: Downstream, x: Exchange) -> None:
        duration_ms = (time.monotonic() - x.start) * 1000
        flags = (",".join(f for f in x.flags if f != "-") or "-") if x.flags else "-"
        inbound = ds.inbound
        if inbound is None:
            dst = x.dst_pod
        else:
            dst = ds.pod
            x.dst_principal = inbound.principal
            inflight = ds.meta.get("inflight")
            if inflight:
                inflight.pop(id(x), None)
        k = (id(dst), x.cluster, x.route_name, x.dst_principal, x.protocol)
        ctx = ds.telemetry.get(k)
        if ctx is None or ctx.dst is not dst:
            ctx = ds.telemetry[k] = _RecordContext(ds, x, dst)
        series = ctx.series.get((x.status, flags))
        if series is None:
            series = ctx.series[(x.status, flags)] = self.metrics.requests.series(
                (*ctx.labels_head, str(x.status), flags, *ctx.labels_tail)
            )
        series[COUNT] += 1
        series[SUM] += duration_ms
        series[BUCKET0 + bisect_left(DURATION_BUCKETS_MS, duration_ms)] += 1
        # the fields fixed for this connection and destination, then this request's own
        rec: AccessRecord = {
            **ctx.fields,  # type: ignore[typeddict-item]  # (the keys not listed here)
            "start_time": rfc3339(x.start_wall),
            "method": x.method,
            "authority": x.authority,
            "path": x.path,
            "response_code": x.status,
            "response_flags": flags,
            "bytes_received": x.bytes_in,
            "bytes_sent": x.bytes_out,
            "duration_ms": round(duration_ms, 3),
            "upstream_host": x.upstream,
            "attempts": x.attempts,
            "trace_id": x.trace_id,
            "request_id": x.request_id,
            "user_agent": x.user_agent,
        }
        if x.policy:
            rec["authz_policy"] = x.policy
            if x.policy_rule is not None:
                rec["authz_rule"] = x.policy_rule
        if x.request_principal:
            rec["request_principal"] = x.request_principal
        if x.detail:
            rec["detail"] = x.detail
        self.access_log.write(rec)

    def close(self) -> None:
        self.pool.close()
        for t in self._tasks:
            t.cancel()


_NONZERO_IDS = (1 << 192) | (1 << 128)
"""OR-ed into the 320 random bits of new ids: the trace id (the top 128 bits) and the span
id (the next 64) must not be all zeros."""
_UUID_VARIANT = {c: "89ab"[int(c, 16) & 3] for c in "0123456789abcdef"}
"""A random hex digit as the RFC 4122 variant digit of a UUID."""


def _route_keyed(snap: MeshSnapshot) -> bool:
    return any(
        p.http is not None and p.http.key.kind is KeyKind.ROUTE for p in snap.local_rate_limits
    )


def route_name(d: RouteDecision) -> str:
    """The route name of the access log, metrics and rate-limit keys."""
    if d.virtual_service is None or d.rule_index is None:
        return ""
    return d.rule_name or f"{d.virtual_service.key}#{d.rule_index}"


async def _response_head(
    conn: H1Conn,
) -> tuple[ResponseHead | None, tuple[str, str] | None]:
    """The next response head on ``conn``, or why there is none (retryOn kind, flag)."""
    while True:
        ev = await conn.next_event()
        if isinstance(ev, ResponseHead):
            return ev, None
        if isinstance(ev, Informational):
            continue
        if isinstance(ev, ProtocolError):
            log.info("upstream protocol error: %s", ev.reason)
            return None, ("reset", "UPE")
        return None, ("reset", "UC")


async def _never() -> DownstreamEvent:
    return ConnectionClosed()


def _done_body() -> RequestBody:
    b = RequestBody(_never, lambda: None)
    b.complete = b.ended_upstream = True
    return b


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


__all__ = [
    "BodySink",
    "Downstream",
    "Exchange",
    "H1Sink",
    "L7Proxy",
    "LocalReply",
    "Plan",
    "Redirect",
    "RequestBody",
    "apply_header_ops",
    "backoff",
    "deadline",
    "join_headers",
    "retriable_failure",
    "retriable_status",
    "within",
]
