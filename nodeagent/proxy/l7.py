"""The L7 path of the shared proxy: HTTP requests of local pods, each planned by
``core/plan.py`` (route, fault, destination, rewrites, retries, header operations) on
the client's node, or admitted by the called workload's policies on its node
(``proxy/admission.py``), then executed.

Owns the engine (``L7Proxy``: one per agent) and what the HTTP/1.1 (``proxy/l7http1.py``)
and HTTP/2 (``proxy/l7h2.py``) exchanges share through it: executing a plan up to its
first attempt (a fault's delay, local answers, admission at the called node), the
upstream HTTP/1.1 pool (``proxy/h1pool.py``) with the DestinationRule's limits, the
balancers with outlier detection (``core/balancer.py`` through ``core/clusters.py``), the
retry decision between attempts, mirroring, and the records (``proxy/l7record.py``). Also
the client connection as the L7 path sees it (``Downstream``, ``Inbound``). Decides
nothing itself that the plan decides; never parses bytes.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any, NamedTuple

from nodeagent.core.authz import AuthzRequest
from nodeagent.core.balancer import BalancerRegistry
from nodeagent.core.clusters import Cluster, ClusterError, Clusters
from nodeagent.core.plan import (
    NO_RETRY,
    Answer,
    Connection,
    Draws,
    Plan,
    Planner,
    Request,
    trace_id,
)
from nodeagent.errors import ConnectRefusedError, PeerError
from nodeagent.model.objects import Pod, Service, ServicePort
from nodeagent.model.snapshot import Endpoint, MeshSnapshot
from nodeagent.model.traffic import Destination, HeaderOperations, HTTPRetry
from nodeagent.protocol.http1 import ConnectionClosed, ProtocolError, ResponseEnd
from nodeagent.proxy.h1pool import ConnectFn, H1Conn, H1Pool, Overflow
from nodeagent.proxy.l7body import RequestBody
from nodeagent.proxy.l7http1 import Http1Session
from nodeagent.proxy.l7record import Exchange, RecordContext, Recorder
from nodeagent.proxy.l7retry import (
    LocalReply,
    Redirect,
    backoff,
    policy_refusal,
    retriable_failure,
)
from nodeagent.proxy.pipe import Pipe, PipeClosed
from nodeagent.telemetry.accesslog import AccessLog
from nodeagent.telemetry.metrics import Metrics

log = logging.getLogger("nodeagent.proxy.l7")


class Downstream:
    """What the L7 path knows about one client connection: on the client's node
    (``inbound`` None: ``pod`` is the caller, requests are routed) or on the called
    workload's node (``inbound`` set: ``pod`` is the callee, requests are admitted by its
    policies and go to the app). A plain class: compiled, a dataclass's ``__init__``
    stays interpreted."""

    def __init__(
        self,
        pod: Pod,
        source_principal: str,
        source_ip: str,
        service: Service,
        port: ServicePort,
        connect: ConnectFn,
        meta: dict[str, Any] | None = None,
        inbound: Inbound | None = None,
        pool_key: str = "",
    ) -> None:
        self.pod = pod
        self.source_principal = source_principal
        self.source_ip = source_ip
        self.service = service
        self.port = port
        self.connect = connect
        self.meta: dict[str, Any] = meta if meta is not None else {}
        """The connection-table record, for ``nodeagent ctl connections``."""
        self.inbound = inbound
        self.pool_key = pool_key or (f"in|{pod.key}" if inbound else pod.key)
        """Whose upstream connections these requests may share (default: the pod's)."""
        self.telemetry: dict[tuple[object, ...], RecordContext] = {}
        """``Recorder.record``'s per-destination contexts for this connection."""
        self.conn = Connection(
            pod,
            source_principal,
            source_ip,
            service,
            port.port if inbound is None else inbound.cluster.endpoints[0].port,
            str(self.meta.get("source", "")),
        )
        """What the plan and admission read of this connection (each ``Request`` holds
        it)."""


class Admitted(NamedTuple):
    """A request the called workload's policies let through."""

    target: str
    """The normalized request target to send to the app."""
    request_ops: tuple[HeaderOperations, ...]
    """Changes to the headers the app gets (RequestAuthentication's, the route header
    dropped)."""
    response_ops: tuple[HeaderOperations, ...]
    """Headers for its response (rate-limit headers)."""
    request: AuthzRequest | None
    """What authorization looked at (kept in the connection table while in flight, for
    live re-checks)."""


Admit = Callable[[Request, Exchange], Admitted]
"""The destination's policy stage for one request: returns what it lets through, raises
``LocalReply`` to answer it."""


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
        self.planner = Planner(self.clusters)
        self.draws = Draws(self.rnd)
        self.pool = H1Pool()
        self.recorder = Recorder(metrics, access_log)
        self._tasks: set[asyncio.Task[Any]] = set()

    def _on_eject(self, key: object, addr: str, reason: str) -> None:
        host = str(key).rsplit("|", 1)[-1]
        self.metrics.outlier_ejections.labels(destination_service=host).inc()
        log.warning("outlier detection: ejected %s from %s (%s)", addr, key, reason)

    def _on_return(self, key: object, addr: str) -> None:
        log.info("outlier detection: %s is back in %s", addr, key)

    def serve_http1(self, ds: Downstream, pipe: Pipe) -> Coroutine[Any, Any, None]:
        """Serve one client connection speaking HTTP/1.1 until it closes or a response
        says close (the session's own coroutine: no frame of ours to pass through each
        time it resumes)."""
        return Http1Session(self, ds, pipe).serve()

    async def prepare(self, ds: Downstream, req: Request, x: Exchange) -> Plan:
        """The plan of ``req`` (``core.plan``; at the called node, its admission),
        executed up to the first attempt: a fault's delay waited, a local answer raised
        as ``LocalReply`` or ``Redirect``."""
        inbound = ds.inbound
        if inbound is not None:
            return self._admit(ds, inbound, req, x)
        p = self.planner.plan(self.snapshot(), req, self.draws)
        x.route_name = p.route_name
        if p.delay is not None:
            x.flag("DI")
            await asyncio.sleep(p.delay)
        if isinstance(p, Answer):
            if p.location is not None:
                raise Redirect(p.status, p.location)
            raise LocalReply(p.status, p.flag, p.body)
        x.cluster = p.cluster.name
        x.trace_id = p.trace_id
        x.request_id = p.request_id
        return p

    def _admit(self, ds: Downstream, inbound: Inbound, req: Request, x: Exchange) -> Plan:
        """At the called workload: its policies admit the request (or raise
        ``LocalReply``), then it goes to the app as it is, without retries (the caller's
        node retries)."""
        hdrs = req.headers
        x.trace_id = trace_id(hdrs.get("traceparent"))
        x.request_id = hdrs.get("x-request-id", "")
        x.cluster = inbound.cluster.name
        a = inbound.admit(req, x)
        if a.request is not None:
            ds.meta.setdefault("inflight", {})[id(x)] = a.request
        return Plan(
            inbound.cluster,
            a.target,
            req.authority,
            retry=NO_RETRY,
            request_ops=a.request_ops,
            response_ops=a.response_ops,
        )

    async def acquire(self, ds: Downstream, cluster: Cluster, ep: Endpoint) -> tuple[H1Conn, bool]:
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

    # -- mirroring ----------------------------------------------------------------------------
    def maybe_mirror(
        self,
        ds: Downstream,
        mirror: Destination,
        method: str,
        target: str,
        out: list[tuple[str, str]],
        body: RequestBody,
    ) -> None:
        """After the exchange: a copy of the request to the plan's ``mirror`` (host
        suffixed ``-shadow``), when its body was read whole and fits the retry buffer."""
        if not body.complete or not body.replayable:
            return
        try:
            cluster = self.clusters.cluster(self.snapshot(), mirror, ds.port.port)
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
            conn, _ = await self.acquire(ds, cluster, ep)
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

    def close(self) -> None:
        self.pool.close()
        for t in self._tasks:
            t.cancel()


__all__ = ["Admit", "Admitted", "Downstream", "Inbound", "L7Proxy"]
