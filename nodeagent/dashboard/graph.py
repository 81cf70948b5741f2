"""The service graph, from metric samples: workloads and services as nodes, traffic as edges.

Pure: samples in (``Sample``: a series' labels, its count so far and its rate per
second), a ``Graph`` out. Both sources feed it the same way: the agents' own metrics
(``dashboard/agents.py``, rates from successive scrapes) and a Prometheus server
(``dashboard/prom.py``, rates from PromQL). Labels are read defensively: those of
Istio's full set (``destination_service_name``, ``destination_service_namespace``) when
present, else the ``destination_service`` host.

Each request is counted by the client's node (``reporter="source"``) and, where the
called node serves it at L7, by that node too (``reporter="destination"``): an edge takes
the source's count when there is one (it sees failures that never reached the
destination), else the destination's, so nothing is counted twice.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = ["Edge", "Graph", "Node", "Sample", "build_graph", "quantile"]

REQUESTS = "istio_requests_total"
DURATION_BUCKET = "istio_request_duration_milliseconds_bucket"
TCP_OPENED = "istio_tcp_connections_opened_total"
TCP_SENT = "istio_tcp_sent_bytes_total"
TCP_RECEIVED = "istio_tcp_received_bytes_total"
METRICS = (REQUESTS, DURATION_BUCKET, TCP_OPENED, TCP_SENT, TCP_RECEIVED)
"""The series the graph reads (their names as Prometheus' text format writes them)."""

UNKNOWN = ("", "unknown")


@dataclass(frozen=True)
class Sample:
    """One series: its name, labels, count so far and rate per second over the window."""

    name: str
    labels: Mapping[str, str]
    total: float
    rate: float


@dataclass(frozen=True)
class Node:
    id: str
    kind: str
    """``workload``, ``service`` or ``unknown`` (a caller outside the mesh)."""
    name: str
    namespace: str


@dataclass
class _Acc:
    """What one edge has summed so far."""

    requests: float = 0.0
    requests_total: float = 0.0
    errors: float = 0.0
    mtls: float = 0.0
    plain: float = 0.0
    connections: float = 0.0
    connections_total: float = 0.0
    bytes_rate: float = 0.0
    buckets: dict[float, float] = field(default_factory=dict)
    """Requests per second at or under each bound (``le``), summed over series."""
    codes: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Edge:
    id: str
    source: str
    target: str
    protocol: str
    """``http`` (requests seen) or ``tcp``."""
    rps: float
    """Requests per second (HTTP) over the window."""
    error_rate: float
    """Share of those requests answered 5xx or 4xx, or not answered (code 0)."""
    p99_ms: float | None
    """The 99th percentile of request duration (None: no requests in the window)."""
    mtls: bool
    """All of the edge's traffic was mutual TLS (``connection_security_policy``)."""
    mtls_share: float
    requests_total: float
    """Requests counted since the agents started (an idle edge still shows who talked)."""
    cps: float
    """TCP connections opened per second."""
    connections_total: float
    bytes_per_second: float
    """TCP bytes both ways per second (counted when connections close)."""
    codes: Mapping[str, float]
    """Requests per second by response code."""
    match: Mapping[str, str]
    """The access-log fields that pick this edge's requests (``source_workload``, …)."""

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "source": self.source,
            "target": self.target,
            "protocol": self.protocol,
            "rps": self.rps,
            "error_rate": self.error_rate,
            "p99_ms": self.p99_ms,
            "mtls": self.mtls,
            "mtls_share": self.mtls_share,
            "requests_total": self.requests_total,
            "cps": self.cps,
            "connections_total": self.connections_total,
            "bytes_per_second": self.bytes_per_second,
            "codes": dict(self.codes),
            "match": dict(self.match),
        }


@dataclass(frozen=True)
class Graph:
    nodes: Sequence[Node]
    edges: Sequence[Edge]

    def to_json(self) -> dict[str, Any]:
        return {
            "nodes": [asdict(n) for n in self.nodes],
            "edges": [e.to_json() for e in self.edges],
        }


def quantile(q: float, buckets: Mapping[float, float]) -> float | None:
    """``histogram_quantile`` as Prometheus computes it, over cumulative bucket counts by
    upper bound (``+Inf`` included); None when the buckets count nothing."""
    bounds = sorted(buckets)
    if not bounds or not math.isinf(bounds[-1]):
        return None
    total = buckets[bounds[-1]]
    if total <= 0:
        return None
    rank = q * total
    prev_bound, prev_count = 0.0, 0.0
    for b in bounds:
        count = buckets[b]
        if count >= rank:
            if math.isinf(b):
                return prev_bound  # the highest finite bound, as Prometheus answers
            if count == prev_count:
                return b
            return prev_bound + (b - prev_bound) * (rank - prev_count) / (count - prev_count)
        prev_bound, prev_count = b, count
    return prev_bound


def _workload(labels: Mapping[str, str], side: str) -> Node:
    name = labels.get(f"{side}_workload", "")
    ns = labels.get(f"{side}_workload_namespace", "") or labels.get(f"{side}_namespace", "")
    if name in UNKNOWN:
        return Node(f"unknown:{side}", "unknown", "unknown", "")
    return Node(f"workload:{ns}/{name}", "workload", name, ns)


def _service(labels: Mapping[str, str]) -> Node | None:
    host = labels.get("destination_service", "")
    name = labels.get("destination_service_name", "")
    ns = labels.get("destination_service_namespace", "")
    if host in UNKNOWN and name in UNKNOWN:
        return None
    if host in UNKNOWN:
        host = f"{name}.{ns}.svc.cluster.local" if ns not in UNKNOWN else name
    parts = host.split(".")
    if name in UNKNOWN:
        name = parts[0]
    if ns in UNKNOWN:
        ns = parts[1] if len(parts) > 2 and parts[2] == "svc" else ""
    return Node(f"service:{host}", "service", name, ns)


def _is_error(code: str) -> bool:
    return code == "0" or code[:1] in ("4", "5")


def _hops(labels: Mapping[str, str]) -> tuple[tuple[Node, Node, dict[str, str]], ...]:
    """The edges one series adds to: client → service → workload (or client → workload
    where no service is named), with the access-log fields that pick their requests."""
    src, dst, svc = _workload(labels, "source"), _workload(labels, "destination"), _service(labels)
    src_match = {"source_workload": src.name} if src.kind == "workload" else {}
    dst_match = {"destination_workload": dst.name} if dst.kind == "workload" else {}
    if svc is None:
        return ((src, dst, src_match | dst_match),)
    svc_match = {"destination_service": svc.id.removeprefix("service:")}
    hops = [(src, svc, src_match | svc_match)]
    if dst.kind == "workload":
        hops.append((svc, dst, svc_match | dst_match))
    return tuple(hops)


def _reporters(samples: Sequence[Sample]) -> set[tuple[str, ...]]:
    """The (metric, source, service, destination) the source's side reports."""
    out: set[tuple[str, ...]] = set()
    for s in samples:
        if s.labels.get("reporter") == "source":
            out.add(_triple_of(s))
    return out


def _triple(name: str, labels: Mapping[str, str]) -> tuple[str, ...]:
    svc = _service(labels)
    return (
        name,
        _workload(labels, "source").id,
        svc.id if svc else "",
        _workload(labels, "destination").id,
    )


def _triple_of(s: Sample) -> tuple[str, ...]:
    return _triple(REQUESTS if s.name == DURATION_BUCKET else s.name, s.labels)


def build_graph(samples: Iterable[Sample]) -> Graph:
    """The graph of every series of ``METRICS`` in ``samples`` (others are ignored)."""
    wanted = [s for s in samples if s.name in METRICS]
    by_source = _reporters(wanted)
    # the connections that carry HTTP requests are counted as TCP too: draw the requests
    http_pairs = {(t[1], t[3]) for t in map(_triple_of, wanted) if t[0] == REQUESTS}
    nodes: dict[str, Node] = {}
    accs: dict[tuple[str, str], _Acc] = {}
    matches: dict[tuple[str, str], dict[str, str]] = {}
    for s in wanted:
        triple = _triple_of(s)
        if s.labels.get("reporter") == "destination" and triple in by_source:
            continue  # counted by the client's side already
        if s.name not in (REQUESTS, DURATION_BUCKET) and (triple[1], triple[3]) in http_pairs:
            continue
        for a, b, match in _hops(s.labels):
            nodes.setdefault(a.id, a)
            nodes.setdefault(b.id, b)
            key = (a.id, b.id)
            acc = accs.get(key)
            if acc is None:
                acc = accs[key] = _Acc()
                matches[key] = match
            _add(acc, s)
    edges = [_edge(a, b, acc, matches[(a, b)]) for (a, b), acc in accs.items()]
    edges = [e for e in edges if e.requests_total or e.connections_total or e.rps or e.cps]
    used = {e.source for e in edges} | {e.target for e in edges}
    return Graph(
        nodes=sorted((n for n in nodes.values() if n.id in used), key=lambda n: n.id),
        edges=sorted(edges, key=lambda e: e.id),
    )


def _add(acc: _Acc, s: Sample) -> None:
    if s.name == REQUESTS:
        acc.requests += s.rate
        acc.requests_total += s.total
        code = s.labels.get("response_code", "")
        acc.codes[code] = acc.codes.get(code, 0.0) + s.rate
        if _is_error(code):
            acc.errors += s.rate
        if s.labels.get("connection_security_policy") == "mutual_tls":
            acc.mtls += s.rate or s.total * 1e-9
        else:
            acc.plain += s.rate or s.total * 1e-9
    elif s.name == DURATION_BUCKET:
        try:
            le = float(s.labels.get("le", ""))
        except ValueError:
            return
        acc.buckets[le] = acc.buckets.get(le, 0.0) + s.rate
    elif s.name == TCP_OPENED:
        acc.connections += s.rate
        acc.connections_total += s.total
        # a connection's weight: its rate, or a trace of its count for an idle edge
        if s.labels.get("connection_security_policy") == "mutual_tls":
            acc.mtls += s.rate or s.total * 1e-9
        else:
            acc.plain += s.rate or s.total * 1e-9
    else:
        acc.bytes_rate += s.rate


def _edge(a: str, b: str, acc: _Acc, match: Mapping[str, str]) -> Edge:
    weight = acc.mtls + acc.plain
    share = acc.mtls / weight if weight else 0.0
    return Edge(
        id=f"{a}>{b}",
        source=a,
        target=b,
        protocol="http" if acc.requests_total or acc.requests else "tcp",
        rps=acc.requests,
        error_rate=acc.errors / acc.requests if acc.requests else 0.0,
        p99_ms=quantile(0.99, acc.buckets),
        mtls=weight > 0 and share >= 0.999,
        mtls_share=share,
        requests_total=acc.requests_total,
        cps=acc.connections,
        connections_total=acc.connections_total,
        bytes_per_second=acc.bytes_rate,
        codes={c: r for c, r in sorted(acc.codes.items()) if r},
        match=dict(match),
    )
