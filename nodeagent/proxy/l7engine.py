"""The engine of the L7 path (one per agent): what the HTTP/1.1 (``proxy/l7http1.py``)
and HTTP/2 (``proxy/l7h2.py``) exchanges share. Executes each request's plan
(``core/plan.py``) up to its first attempt: waits a fault's delay, raises a local answer,
or, on the called workload's node, has the request admitted (``proxy/admission.py``
through ``Inbound.admit``); then serves the attempts: the upstream HTTP/1.1 pool
(``proxy/h1pool.py``) with the DestinationRule's limits, the balancers with outlier
detection (``core/clusters.py``, ``core/balancer.py``), the retry decision between
attempts, mirroring, and the records (``proxy/l7conn.py``). Decides nothing the plan
decides; never parses bytes.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable
from typing import Any

from nodeagent.core.balancer import BalancerRegistry
from nodeagent.core.clusters import Cluster, ClusterError, Clusters
from nodeagent.core.paths import BASE
from nodeagent.core.plan import NO_RETRY, Answer, Draws, Plan, Planner, Request, trace_id
from nodeagent.errors import ConnectRefusedError, PeerError
from nodeagent.model.snapshot import Endpoint, MeshSnapshot
from nodeagent.model.traffic import Destination, HTTPRetry
from nodeagent.protocol.http1 import ConnectionClosed, ProtocolError, ResponseEnd
from nodeagent.proxy.h1pool import H1Conn, H1Pool, Overflow
from nodeagent.proxy.inputs import Http1Limits
from nodeagent.proxy.l7body import RequestBody
from nodeagent.proxy.l7conn import Downstream, Exchange, Inbound, Recorder
from nodeagent.proxy.l7retry import (
    LocalReply,
    Redirect,
    backoff,
    policy_refusal,
    retriable_failure,
)
from nodeagent.proxy.pipe import PipeClosed
from nodeagent.proxy.tracing import Observer
from nodeagent.telemetry.accesslog import AccessLog
from nodeagent.telemetry.metrics import Metrics

log = logging.getLogger("nodeagent.proxy.l7")


class L7Engine:
    """Executes the plans of local pods' HTTP requests; one per agent (as ``L7Proxy``)."""

    def __init__(
        self,
        snapshot: Callable[[], MeshSnapshot],
        metrics: Metrics,
        access_log: AccessLog,
        *,
        rnd: random.Random | None = None,
        path_normalization: str = BASE,
        http1_limits: Http1Limits | None = None,
        observer: Observer | None = None,
    ) -> None:
        self.snapshot = snapshot
        self.path_normalization = path_normalization
        """Istio's ``pathNormalization`` option: how each request's path is normalized
        (``core.paths.request_target``) before routing and policy."""
        self.metrics = metrics
        self.http1_limits = http1_limits or Http1Limits()
        self._limits_logged: set[str] = set()
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
        self.observer = observer
        self.recorder = Recorder(metrics, access_log, observer)
        self._tasks: set[asyncio.Task[Any]] = set()

    def limit_hit(self, limit: str, ds: Downstream, detail: str) -> None:
        """A client connection was cut by ``limit``: counted; logged the first time only
        (an attacker must not be able to fill the log)."""
        self.metrics.http1_limits.labels(limit=limit).inc()
        if limit not in self._limits_logged:
            self._limits_logged.add(limit)
            log.warning(
                "HTTP/1.1 client %s (%s) to %s cut by %s: %s (logged once; counted in "
                "nodeagent_http1_limit_hits_total)",
                ds.pod.key,
                ds.source_ip,
                ds.service.key,
                limit,
                detail,
            )

    def _on_eject(self, key: object, addr: str, reason: str) -> None:
        host = str(key).rsplit("|", 1)[-1]
        self.metrics.outlier_ejections.labels(destination_service=host).inc()
        log.warning("outlier detection: ejected %s from %s (%s)", addr, key, reason)

    def _on_return(self, key: object, addr: str) -> None:
        log.info("outlier detection: %s is back in %s", addr, key)

    async def prepare(self, ds: Downstream, req: Request, x: Exchange) -> Plan:
        """The plan of ``req`` (``core.plan``; at the called node, its admission),
        executed up to the first attempt: a fault's delay waited, a local answer raised
        as ``LocalReply`` or ``Redirect``."""
        p = self.plan(ds, req, x)
        if isinstance(p, Answer) or p.delay is not None:
            return await self.settle(p, x)
        return p

    def plan(self, ds: Downstream, req: Request, x: Exchange) -> Plan | Answer:
        """``prepare`` without waiting (no coroutine per request): the plan, or the answer
        that ``settle`` raises; a plan with a ``delay`` goes through ``settle`` too."""
        inbound = ds.inbound
        if inbound is not None:
            return self._admit(ds, inbound, req, x)
        p = self.planner.plan(self.snapshot(), req, self.draws)
        x.route_name = p.route_name
        obs = self.observer
        if isinstance(p, Answer):
            if obs is not None:  # answered here: the trace still shows it
                obs.answered(ds, req, x)
            return p
        x.cluster, x.service = p.cluster.name, p.cluster.service
        x.trace_id = p.trace_id
        x.request_id = p.request_id
        # (before a fault's delay: the span covers it; no call at all when no spans are
        # exported, the common case: the observer is interpreted code)
        if obs is not None and obs.export is not None:
            obs.client(ds, req, p, x)
        return p

    async def settle(self, p: Plan | Answer, x: Exchange) -> Plan:
        """A fault's delay waited, then the plan, or its answer raised as ``LocalReply``
        or ``Redirect``."""
        if p.delay is not None:
            x.flag("DI")
            await asyncio.sleep(p.delay)
        if isinstance(p, Answer):
            if p.location is not None:
                raise Redirect(p.status, p.location)
            raise LocalReply(p.status, p.flag, p.body)
        return p

    def _admit(self, ds: Downstream, inbound: Inbound, req: Request, x: Exchange) -> Plan:
        """At the called workload: its policies admit the request (or raise
        ``LocalReply``), then it goes to the app as it is, without retries (the caller's
        node retries)."""
        hdrs = req.headers
        x.trace_id = trace_id(hdrs.get("traceparent"))
        x.request_id = hdrs.get("x-request-id", "")
        x.cluster, x.service = inbound.cluster.name, inbound.cluster.service
        tp = self.observer.server(ds, req, x) if self.observer is not None else None
        a = inbound.admit(req, x)
        if a.request is not None:
            ds.meta.setdefault("inflight", {})[id(x)] = a.request
        p = Plan(
            inbound.cluster,
            a.target,
            req.authority,
            retry=NO_RETRY,
            request_ops=a.request_ops,
            response_ops=a.response_ops,
        )
        if tp is not None:  # the app's parent is this node's span
            p.remove_headers, p.add_headers = ("traceparent",), (("traceparent", tp),)
        return p

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


__all__ = ["L7Engine"]
