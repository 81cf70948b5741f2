"""One client connection of the L7 path: what the path knows about it (``Downstream``;
``Inbound`` on the called workload's node, with the admission each request passes there),
and what it records of each exchange on it (``Exchange``, which ``Recorder`` turns into
the request metrics and one access-log line, with contexts per destination kept on the
connection). Decides nothing about a request.
"""

from __future__ import annotations

import time as _time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final, NamedTuple

from orjson import dumps as _dumps

from nodeagent.core.authz import AuthzRequest
from nodeagent.core.clusters import Cluster, fqdn
from nodeagent.core.plan import Connection, Request
from nodeagent.model.objects import Pod, Service, ServicePort
from nodeagent.model.traffic import HeaderOperations
from nodeagent.protocol.grpcframes import GrpcMessages
from nodeagent.proxy.h1pool import ConnectFn
from nodeagent.proxy.peerlabels import peer_values, security_policy
from nodeagent.proxy.tracing import Observer
from nodeagent.telemetry.accesslog import AccessLog, json_plain, json_text, rfc3339
from nodeagent.telemetry.metrics import (
    BUCKET0,
    COUNT,
    REQUEST_BYTES0,
    REQUEST_BYTES_SUM,
    REQUEST_MESSAGES,
    RESPONSE_BYTES0,
    RESPONSE_BYTES_SUM,
    RESPONSE_MESSAGES,
    SUM,
    Metrics,
    bucket,
)

_monotonic: Final = _time.monotonic
_wall: Final = _time.time
"""(Final names: no look-up in the module's dict per request, as an imported name has.)"""


class Exchange:
    """Everything measured about one request, for the access log and the metrics (a
    plain class: compiled, a dataclass's ``__init__`` stays interpreted)."""

    def __init__(
        self,
        start: float,
        start_wall: float,
        method: str,
        authority: str,
        path: str,
        protocol: str,
        user_agent: str = "",
        forwarded_for: str | None = None,
        grpc: bool = False,
    ) -> None:
        self.start = start
        self.start_wall = start_wall
        self.method = method
        self.authority = authority
        self.path = path
        self.protocol = protocol
        """Envoy's ``%PROTOCOL%``: ``HTTP/1.1``, ``HTTP/2`` (gRPC too)."""
        self.user_agent = user_agent
        self.forwarded_for = forwarded_for
        self.grpc = grpc
        self.grpc_status = ""
        """The response's ``grpc-status`` (trailers, or the head of a trailers-only one)."""
        self.request_messages: GrpcMessages | None = GrpcMessages() if grpc else None
        self.response_messages: GrpcMessages | None = GrpcMessages() if grpc else None
        self.route_name = ""
        self.cluster = ""
        self.service: Service | None = None
        """The Service of ``cluster`` (None: not a known one)."""
        self.sent_at = 0.0
        """When the last attempt started (monotonic; 0: no attempt)."""
        self.answered_at = 0.0
        """When the upstream's response head arrived (monotonic; 0: none did)."""
        self.status = 0
        self.flags: list[str] = []
        self.bytes_in = 0
        self.bytes_out = 0
        self.upstream = "-"
        self.dst_pod: Pod | None = None
        self.dst_principal = "unknown"
        self.attempts = 0
        self.trace_id = ""
        self.request_id = ""
        self.policy = ""
        """The AuthorizationPolicy that decided (``namespace/name``), for the access log."""
        self.policy_rule: int | None = None
        self.request_principal = ""
        self.detail = ""
        """Why the proxy answered itself."""
        self.span: Any = None
        """Its span when sampled (``proxy/tracing.py``), ended with the record."""

    def flag(self, f: str) -> None:
        if f not in self.flags:
            self.flags.append(f)


def begin_exchange(req: Request, protocol: str, grpc: bool = False) -> Exchange:
    """The record of ``req``, started now (the HTTP/1.1 and HTTP/2 paths alike)."""
    hdrs = req.headers
    return Exchange(
        _monotonic(),
        _wall(),
        req.method,
        req.authority,
        req.target,
        protocol,
        hdrs.get("user-agent", ""),
        hdrs.get("x-forwarded-for"),
        grpc,
    )


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
        self.last_record: RecordContext | None = None
        """The context of the previous request's record: the next one most likely has
        the same destination, checked without hashing a key."""
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


class RecordContext:
    """What the access log and the metrics say the same way for every request of one
    client connection to one destination (workload, cluster, route, identity, protocol):
    made once, not per request. ``series`` holds the metric series by (status, gRPC
    status, flags)."""

    __slots__ = (
        "cluster",
        "dst",
        "dst_principal",
        "grpc",
        "head",
        "labels_head",
        "labels_tail",
        "last_flags",
        "last_grpc_status",
        "last_series",
        "last_status",
        "protocol",
        "route_name",
        "series",
    )

    def __init__(self, ds: Downstream, x: Exchange, dst: Pod | None) -> None:
        inbound = ds.inbound
        src: Pod | None
        if inbound is None:
            reporter, src = "source", ds.pod
        else:
            reporter, src = "destination", inbound.peer_pod
        src_name, src_ns = (src.name, src.namespace) if src else ("unknown", "unknown")
        dst_name, dst_ns = (dst.name, dst.namespace) if dst else ("unknown", "unknown")
        svc_host = x.cluster.rsplit("|", 1)[-1] if x.cluster else fqdn(ds.service)
        service = x.service if x.cluster else ds.service
        self.dst = dst
        # what ``Recorder.record`` keys contexts by, for ``fits``
        self.cluster, self.route_name, self.dst_principal = x.cluster, x.route_name, x.dst_principal
        self.protocol, self.grpc = x.protocol, x.grpc
        self.series: dict[tuple[int, str, str], list[float]] = {}
        # the last series used and its (status, gRPC status, flags): the next request's
        # most likely, checked without hashing a key
        self.last_series: list[float] | None = None
        self.last_status = -1
        self.last_grpc_status = ""
        self.last_flags = ""
        # HTTP_LABELS order, around response_code, grpc_response_status and response_flags
        self.labels_head = (
            *peer_values(
                reporter, src, ds.source_principal, dst, x.dst_principal, service, svc_host
            ),
            "grpc" if x.grpc else "http",
        )
        self.labels_tail = (
            security_policy(ds.source_principal, x.dst_principal),
            x.route_name or "default",
        )
        meta = ds.meta
        fixed: dict[str, Any] = {
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
            "downstream_remote_address": meta.get("source") or None,
            "downstream_local_address": meta.get("destination") or None,
            "upstream_local_address": None,
            "requested_server_name": None,
            "connection_termination_details": None,
        }
        self.head = _dumps(fixed)[:-1].decode() + ","
        """The access-log line's fields fixed for this context, as JSON: ``{`` and
        ``"name":value,`` each (``Recorder.record`` writes the request's own after them)."""

    def fits(self, x: Exchange, dst: Pod | None) -> bool:
        """Whether ``x``'s record belongs to this context (what its key would say)."""
        return (
            self.dst is dst
            and self.cluster == x.cluster
            and self.route_name == x.route_name
            and self.dst_principal == x.dst_principal
            and self.protocol == x.protocol
            and self.grpc == x.grpc
        )


_DECIMAL: Final = tuple(str(i) for i in range(1024))
"""Small numbers as text: an index for the access log's status, byte counts, duration
and attempts (``int.__str__`` cost ~200 instructions each)."""


def _decimal(i: int) -> str:
    return _DECIMAL[i] if 0 <= i < 1024 else str(i)


_FAILED_UPSTREAM = frozenset({"UF", "URX", "UC", "UT"})
"""Flags of a request whose upstream failed: its ``detail`` is the transport's reason."""


class Recorder:
    """Writes each ended exchange to the request metrics and the access log."""

    def __init__(
        self, metrics: Metrics, access_log: AccessLog, observer: Observer | None = None
    ) -> None:
        self.metrics = metrics
        self.access_log = access_log
        self.observer = observer
        """The Telemetry kind's access-log switch and filter, and the spans."""

    def record(self, ds: Downstream, x: Exchange) -> None:
        now = _monotonic()
        duration_ms = (now - x.start) * 1000
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
        ctx = ds.last_record
        if ctx is None or not ctx.fits(x, dst):
            k = (id(dst), x.cluster, x.route_name, x.dst_principal, x.protocol, x.grpc)
            ctx = ds.telemetry.get(k)
            if ctx is None or ctx.dst is not dst:
                ctx = ds.telemetry[k] = RecordContext(ds, x, dst)
            ds.last_record = ctx
        series = ctx.last_series
        status, grpc_status = x.status, x.grpc_status
        if (
            series is None
            or ctx.last_status != status
            or ctx.last_grpc_status != grpc_status
            or ctx.last_flags != flags
        ):
            series = ctx.series.get((status, grpc_status, flags))
            if series is None:
                series = ctx.series[(status, grpc_status, flags)] = self.metrics.requests.series(
                    (*ctx.labels_head, str(status), grpc_status, flags, *ctx.labels_tail)
                )
            ctx.last_series, ctx.last_status = series, status
            ctx.last_grpc_status, ctx.last_flags = grpc_status, flags
        # (``a[i] = a[i] + 1.0``, not ``a[i] += 1``: compiled, float arithmetic, not a
        # generic in-place add)
        bytes_in, bytes_out = float(x.bytes_in), float(x.bytes_out)
        series[COUNT] = series[COUNT] + 1.0
        series[SUM] = series[SUM] + duration_ms
        i = BUCKET0 + bucket(duration_ms)
        series[i] = series[i] + 1.0
        series[REQUEST_BYTES_SUM] = series[REQUEST_BYTES_SUM] + bytes_in
        i = REQUEST_BYTES0 + bucket(bytes_in)
        series[i] = series[i] + 1.0
        series[RESPONSE_BYTES_SUM] = series[RESPONSE_BYTES_SUM] + bytes_out
        i = RESPONSE_BYTES0 + bucket(bytes_out)
        series[i] = series[i] + 1.0
        req_msgs, resp_msgs = x.request_messages, x.response_messages
        if req_msgs is not None and resp_msgs is not None:
            series[REQUEST_MESSAGES] += req_msgs.count
            series[RESPONSE_MESSAGES] += resp_msgs.count
        answered = x.answered_at
        method, authority, path, upstream = x.method, x.authority, x.path, x.upstream
        trace_id, request_id, agent, xff = x.trace_id, x.request_id, x.user_agent, x.forwarded_for
        detail, policy, principal = x.detail, x.policy, x.request_principal
        # the strings as JSON writes them: as they are when none needs an escape (one
        # check over all of them, but those most requests have empty or none: the
        # client's are almost always plain)
        plain = f"{method}{authority}{path}{upstream}{trace_id}{request_id}{agent}"
        if xff is not None or grpc_status or detail or policy or principal or flags != "-":
            plain = f"{plain}{flags}{xff or ''}{grpc_status}{detail}{policy}{principal}"
        if not json_plain(plain):
            method, authority, path = json_text(method), json_text(authority), json_text(path)
            upstream, flags, trace_id = json_text(upstream), json_text(flags), json_text(trace_id)
            request_id, agent = json_text(request_id), json_text(agent)
            xff = None if xff is None else json_text(xff)
            grpc_status, detail = json_text(grpc_status), json_text(detail)
            policy, principal = json_text(policy), json_text(principal)
        service_time = (
            f'"{int((answered - x.sent_at) * 1000)}"' if answered and x.sent_at else "null"
        )
        failure = (
            f'"{detail}"'
            if detail and not answered and _FAILED_UPSTREAM.intersection(x.flags)
            else "null"
        )
        forwarded = "null" if xff is None else f'"{xff}"'
        grpc = f'"{grpc_status}"' if grpc_status else "null"
        # the line: the fields fixed for this context, then this request's own, in the
        # order of Istio's JSON access log (a format string costs less than a dict of
        # every field and its ``orjson.dumps``; the dict is parsed back only if asked for)
        end = "}\n"  # (the fields only some requests have, then: one string built)
        if policy or principal or detail:
            end = _optional_fields(policy, x.policy_rule, principal, detail)
        line = (
            f'{ctx.head}"start_time":"{rfc3339(x.start_wall)}","method":"{method}",'
            f'"authority":"{authority}","path":"{path}","response_code":{_decimal(status)},'
            f'"response_flags":"{flags}","bytes_received":{_decimal(x.bytes_in)},'
            f'"bytes_sent":{_decimal(x.bytes_out)},"duration":{_decimal(int(duration_ms))},'
            f'"upstream_service_time":{service_time},"upstream_host":"{upstream}",'
            f'"upstream_transport_failure_reason":{failure},"x_forwarded_for":{forwarded},'
            f'"attempts":{_decimal(x.attempts)},"trace_id":"{trace_id}","request_id":"{request_id}",'
            f'"user_agent":"{agent}","grpc_status":{grpc}{end}'
        )
        data = line.encode()
        obs = self.observer
        if obs is None:
            self.access_log.write_line(data)
            return
        if x.span is not None:
            obs.end(x, flags)
        if obs.log_keeps(ds.pod, data):
            self.access_log.write_line(data)


def _optional_fields(policy: str, rule: int | None, principal: str, detail: str) -> str:
    """The end of an access-log line: the fields only some requests have (already as JSON
    writes them), then ``}`` and the newline."""
    line = ""
    if policy:
        line += f',"authz_policy":"{policy}"'
        if rule is not None:
            line += f',"authz_rule":{rule}'
    if principal:
        line += f',"request_principal":"{principal}"'
    if detail:
        line += f',"detail":"{detail}"'
    return line + "}\n"


__all__ = [
    "Admit",
    "Admitted",
    "Downstream",
    "Exchange",
    "Inbound",
    "RecordContext",
    "Recorder",
]
