"""Spans over OTLP and the Telemetry kind on the data path (one ``Observer`` per agent).

``Observer`` answers, per local workload, what its Telemetry says (``core.telemetry``,
kept per snapshot): whether an access-log record is written, and whether a request is
sampled. A sampled HTTP request gets a span on each node that handles it, as Envoy's:
kind ``CLIENT`` on the caller's node (started where the plan is made, its id sent on in
``traceparent``), kind ``SERVER`` on the destination's node (a child of that), each ended
where the request's record is written; a TCP connection at L4 gets one span when it
closes. Sampling: a ``traceparent``'s sampled flag decides when there is one; otherwise
the workload's ``randomSamplingPercentage`` (Istio's default 1%).

Spans are made and exported by ``proxy/spanexport.py`` (the OpenTelemetry SDK), which is
not imported when no endpoint is configured: then nothing here runs but the Telemetry
look-up (a dict hit per request).
"""

from __future__ import annotations

import logging
import os
import random
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import orjson

from nodeagent.core.plan import Plan, Request
from nodeagent.core.telemetry import keeps, resolve
from nodeagent.model.objects import Pod
from nodeagent.model.snapshot import MeshSnapshot, PerSnapshot
from nodeagent.model.telemetry import DEFAULT_TELEMETRY, TelemetryConfig
from nodeagent.telemetry.metrics import TCP_LABELS

if TYPE_CHECKING:  # the SDK is imported only where spans are exported
    from nodeagent.proxy.spanexport import SpanExport

log = logging.getLogger("nodeagent.proxy.tracing")


def canonical_service(pod: Pod) -> str:
    """Istio's canonical service of a workload (its labels, else its name)."""
    labels = pod.labels
    return (
        labels.get("service.istio.io/canonical-name")
        or labels.get("app.kubernetes.io/name")
        or labels.get("app")
        or pod.name
    )


def canonical_revision(pod: Pod) -> str:
    labels = pod.labels
    return (
        labels.get("service.istio.io/canonical-revision")
        or labels.get("app.kubernetes.io/version")
        or labels.get("version")
        or "latest"
    )


def parse_traceparent(tp: str | None) -> tuple[int, int, bool] | None:
    """(trace id, parent span id, sampled) of a W3C ``traceparent``; None when absent or
    malformed."""
    if tp is None or len(tp) < 55:
        return None
    parts = tp.split("-")
    if len(parts) < 4 or len(parts[1]) != 32 or len(parts[2]) != 16 or len(parts[3]) != 2:
        return None
    try:
        trace, span, flags = int(parts[1], 16), int(parts[2], 16), int(parts[3], 16)
    except ValueError:
        return None
    if trace == 0 or span == 0:
        return None
    return trace, span, bool(flags & 1)


def _send_traceparent(p: Plan, value: str) -> None:
    """The plan sends ``value`` as ``traceparent`` instead of the client's or its own."""
    p.remove_headers = (*p.remove_headers, "traceparent")
    p.add_headers = (*(h for h in p.add_headers if h[0] != "traceparent"), ("traceparent", value))


class Observer:
    """The Telemetry kind and the spans on one agent's data path."""

    def __init__(
        self,
        snapshot: Callable[[], MeshSnapshot],
        export: SpanExport | None = None,
        *,
        rnd: random.Random | None = None,
        environ: dict[str, str] | None = None,
    ) -> None:
        self.snapshot = snapshot
        self.export = export
        self.rnd = rnd or random.Random()
        self.environ = environ if environ is not None else dict(os.environ)
        self._configs: PerSnapshot[dict[str, TelemetryConfig]] = PerSnapshot(_new_configs)

    # -- the Telemetry of a workload ------------------------------------------------------
    def config(self, pod: Pod | None) -> TelemetryConfig:
        snap = self.snapshot()
        if not snap.telemetries:
            return DEFAULT_TELEMETRY
        memo = self._configs.get(snap)
        key = pod.key if pod is not None else ""
        c = memo.get(key)
        if c is None:
            c = memo[key] = resolve(snap, pod)
        return c

    def log_keeps(self, pod: Pod | None, line: bytes) -> bool:
        """Whether ``pod``'s Telemetry keeps this access-log record, given as its JSON
        line (on, and its filter: the line is parsed only for a filter)."""
        c = self.config(pod)
        if not c.access_log:
            return False
        return c.log_filter is None or keeps(c.log_filter, orjson.loads(line))

    def serves_spans(self, pod: Pod) -> bool:
        """Whether ``pod``'s node must see its requests one by one for their SERVER
        spans: spans are exported and its Telemetry reports them (any percentage: a
        caller's sampled flag counts at 0% too). When not, its HTTP ports are relayed as
        bytes unless policy needs HTTP (a parse only for spans costs from a third more to
        twice the CPU per request through both proxies)."""
        return self.export is not None and self.config(pod).report_spans

    # -- HTTP spans -----------------------------------------------------------------------
    def client(self, ds: Any, req: Request, p: Plan, x: Any) -> None:
        """On the caller's node, once the plan is made: a CLIENT span when sampled, its
        id sent on as the parent in ``traceparent``."""
        if self.export is None:
            return
        tp = req.headers.get("traceparent")
        value = self._start(ds.pod, req, x, tp, True, ds.service, ds.port.port)
        if value is not None:
            _send_traceparent(p, value)

    def answered(self, ds: Any, req: Request, x: Any) -> None:
        """On the caller's node, for a request the proxy answers itself (no route, a
        fault's abort, a redirect): its CLIENT span when sampled, ended with the answer
        where the request's record is written."""
        if self.export is None:
            return
        tp = req.headers.get("traceparent")
        self._start(ds.pod, req, x, tp, True, ds.service, ds.port.port)

    def server(self, ds: Any, req: Request, x: Any) -> str | None:
        """On the destination's node, before admission: a SERVER span when sampled; the
        ``traceparent`` the app gets instead (None: unchanged)."""
        if self.export is None:
            return None
        tp = req.headers.get("traceparent")
        return self._start(ds.pod, req, x, tp, False, ds.service, ds.port.port)

    def _start(
        self,
        pod: Pod,
        req: Request,
        x: Any,
        tp: str | None,
        client: bool,
        service: Any,
        port: int,
    ) -> str | None:
        export = self.export
        if export is None:
            return None
        parent = parse_traceparent(tp)
        c = self.config(pod)
        if parent is not None:
            if not parent[2]:
                return None
        elif self.rnd.random() * 100 >= c.sampling:
            return None
        if not c.report_spans:  # sampled and propagated, never reported
            trace, span_id = export.new_ids()
            if parent is not None:
                trace = parent[0]
            x.trace_id = f"{trace:032x}"
            return f"00-{trace:032x}-{span_id:016x}-01"
        host = f"{service.name}.{service.namespace}.svc.cluster.local"
        x.span, trace, span_id = export.start(
            f"{canonical_service(pod)}.{pod.namespace}",
            f"{host}:{port}/*",
            parent=parent[:2] if parent is not None else None,  # None: a new trace
            client=client,
            attributes=self._attributes(pod, req, x, host, port),
        )
        x.trace_id = f"{trace:032x}"
        return f"00-{trace:032x}-{span_id:016x}-01"

    def _attributes(self, pod: Pod, req: Request, x: Any, host: str, port: int) -> dict[str, str]:
        conn = req.conn
        attrs = {
            "component": "proxy",
            "node_id": f"sidecar~{pod.pod_ip or ''}~{pod.name}.{pod.namespace}"
            f"~{pod.namespace}.svc.cluster.local",
            "guid:x-request-id": x.request_id or req.headers.get("x-request-id", ""),
            "http.url": f"http://{req.authority}{req.target}",
            "http.method": req.method,
            "http.protocol": x.protocol,
            "downstream_cluster": "-",
            "user_agent": req.headers.get("user-agent", "-"),
            "peer.address": conn.source_ip,
            "istio.canonical_service": canonical_service(pod),
            "istio.canonical_revision": canonical_revision(pod),
            "istio.namespace": pod.namespace,
            "istio.mesh_id": self.export.mesh_id if self.export else "cluster.local",
        }
        for tag in self.config(pod).custom_tags:
            if tag.kind == "literal":
                attrs[tag.tag] = tag.value
            elif tag.kind == "header":
                attrs[tag.tag] = req.headers.get(tag.value, tag.default)
            else:
                attrs[tag.tag] = self.environ.get(tag.value, tag.default)
        return attrs

    def end(self, x: Any, flags: str) -> None:
        """Where the request's record is written: its outcome on the span, ended."""
        span = x.span
        if span is None or self.export is None:
            return
        x.span = None
        self.export.finish(
            span,
            {
                "http.status_code": str(x.status),
                "response_flags": flags,
                "upstream_cluster": x.cluster or "-",
                "upstream_cluster.name": x.cluster or "-",
                "upstream_address": x.upstream,
                "request_size": str(x.bytes_in),
                "response_size": str(x.bytes_out),
            },
            "" if x.status >= 500 or x.status == 0 else None,
        )

    # -- L4 spans -------------------------------------------------------------------------
    def tcp_opened(self, relay: Any, pod: Pod) -> str | None:
        """On the caller's node, as an L4 connection of ``pod`` goes into an HBONE
        tunnel: sampled at its percentage, its CLIENT span started; the ``traceparent``
        its CONNECT carries (None: not sampled, the tunnel sends an unsampled one)."""
        export = self.export
        if export is None:
            return None
        c = self.config(pod)
        if self.rnd.random() * 100 >= c.sampling:
            relay.meta["sampled"] = False  # decided: no span at close either
            return None
        if not c.report_spans:  # sampled and propagated, never reported
            relay.meta["sampled"] = False
            trace, span_id = export.new_ids()
            return f"00-{trace:032x}-{span_id:016x}-01"
        relay.meta["span"], trace, span_id = self._tcp_span(export, relay, pod, "source", None)
        return f"00-{trace:032x}-{span_id:016x}-01"

    def tcp_closed(self, relay: Any) -> None:
        """A proxied TCP connection (not HTTP: its requests have spans) closed: its span
        ended (started at ``tcp_opened``), or one made for it now when sampled — by the
        CONNECT's ``traceparent`` at an HBONE destination (a child of the caller's span),
        else by its workload's percentage."""
        export = self.export
        if export is None:
            return
        meta = relay.meta
        span = meta.pop("span", None)
        counted = meta.get("counted")
        if span is None:
            if not counted or meta.get("sampled") is False:
                return
            if "http" in str(meta.get("direction")):
                return
            peers = meta.get("peers")
            if peers is None or meta.get("labels") is None:
                return
            pod = peers.src if peers.reporter == "source" else peers.dst  # on this node
            if pod is None:
                return
            parent = parse_traceparent(meta.get("traceparent"))
            c = self.config(pod)
            if parent is not None:  # the caller's node decided
                if not parent[2]:
                    return
            elif self.rnd.random() * 100 >= c.sampling:
                return
            if not c.report_spans:
                return
            span = self._tcp_span(
                export, relay, pod, peers.reporter, parent[:2] if parent is not None else None
            )[0]
        export.finish(
            span,
            {
                "upstream_address": str(meta.get("upstream", meta.get("destination", ""))),
                "bytes_sent": str(relay.bytes_sent),
                "bytes_received": str(relay.bytes_received),
                "close_reason": relay.close_reason,
            },
            None if counted else relay.close_reason,  # not counted: upstream never reached
        )

    def _tcp_span(
        self,
        export: SpanExport,
        relay: Any,
        pod: Pod,
        reporter: str,
        parent: tuple[int, int] | None,
    ) -> tuple[Any, int, int]:
        """The span of one L4 connection, started when it was accepted."""
        meta = relay.meta
        labels = dict(zip(TCP_LABELS, meta["labels"], strict=False))
        service = labels["destination_service"]
        if service == "unknown":  # at the destination: the workload it reached
            service = f"{labels['destination_workload']}.{labels['destination_workload_namespace']}"
        return export.start(
            f"{canonical_service(pod)}.{pod.namespace}",
            f"tcp {service}",
            parent=parent,
            client=reporter == "source",
            start_time=int(relay.opened_at * 1e9),
            attributes={
                "component": "proxy",
                "upstream_cluster": labels["destination_service"],
                "peer.address": str(meta.get("source", "")),
                "response_flags": labels.get("response_flags", "-"),
                "connection_security_policy": labels.get("connection_security_policy", ""),
                "istio.canonical_service": canonical_service(pod),
                "istio.namespace": pod.namespace,
                "istio.mesh_id": export.mesh_id,
            },
        )

    def close(self) -> None:
        if self.export is not None:
            self.export.close()


def _new_configs(_snap: MeshSnapshot) -> dict[str, TelemetryConfig]:
    return {}


__all__ = ["Observer", "canonical_service", "parse_traceparent"]
