"""Prometheus metrics with Istio's names and labels: TCP connections and HTTP requests.

TCP counters are updated once per connection (open, close), not per chunk, to keep the
data path cheap; live byte counts are on the node agent socket. HTTP metrics are updated
once per request (``istio_requests_total``, ``istio_request_duration_milliseconds``) with
the labels of ``HTTP_LABELS``; byte counts per request are in the access log.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Final

from prometheus_client import CollectorRegistry, Counter
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric

TCP_LABELS = (
    "reporter",
    "source_workload",
    "source_workload_namespace",
    "source_principal",
    "destination_workload",
    "destination_workload_namespace",
    "destination_service",
    "destination_principal",
    "response_flags",
    "connection_security_policy",
)

HTTP_LABELS = (
    *TCP_LABELS[:8],
    "destination_version",
    "request_protocol",
    "response_code",
    "response_flags",
    "connection_security_policy",
    "route_name",
)
"""Istio's request labels, plus ``route_name`` (the VirtualService rule that matched)."""

DURATION_BUCKETS_MS = (0.5, 1, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000)
_BUCKET_NAMES: Final = (*(f"{float(b)}" for b in DURATION_BUCKETS_MS), "+Inf")

COUNT: Final = 0
"""Index of the request count in a ``RequestStats`` series."""
SUM: Final = 1
"""Index of the sum of durations (ms)."""
BUCKET0: Final = 2
"""Index of the first duration bucket: a request of ``d`` ms counts in
``series[BUCKET0 + bisect_left(DURATION_BUCKETS_MS, d)]`` (the last one is ``+Inf``)."""


class _SeriesCollector:
    """Plain lists of numbers per label set (values in ``LABELS`` order), turned into
    metric families when scraped (``collect``, by the subclass). Labelled
    ``prometheus_client`` children cost a lock and about ten Python calls per update; a
    list costs an index."""

    KIND = ""
    """What the series count, for errors (``HTTP``, ``TCP``)."""
    LABELS: tuple[str, ...] = ()
    WIDTH = 0
    """Numbers per label set."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self._series: dict[tuple[str, ...], list[float]] = {}
        registry.register(self)

    def series(self, labels: tuple[str, ...]) -> list[float]:
        """The list to update for these label values (in ``LABELS`` order)."""
        s = self._series.get(labels)
        if s is None:
            if len(labels) != len(self.LABELS):
                raise ValueError(f"{len(self.LABELS)} label values expected, got {labels!r}")
            s = self._series[labels] = [0.0] * self.WIDTH
        return s

    def series_of(self, labels: Mapping[str, str]) -> list[float]:
        """``series`` for labels by name, which must be ``LABELS`` in that order."""
        key = tuple(labels.values())
        s = self._series.get(key)
        if s is None:
            if tuple(labels) != self.LABELS:
                raise ValueError(
                    f"{self.KIND} metric labels must be {self.LABELS}, got {tuple(labels)}"
                )
            s = self.series(key)
        return s

    def collect(self) -> Iterator[Metric]:
        raise NotImplementedError


class RequestStats(_SeriesCollector):
    """``istio_requests_total`` and ``istio_request_duration_milliseconds``: per label set
    the count, the sum of durations and one count per bucket (``COUNT``, ``SUM``,
    ``BUCKET0``...); a request costs three list updates."""

    KIND = "HTTP"
    LABELS: tuple[str, ...] = HTTP_LABELS
    WIDTH = BUCKET0 + len(_BUCKET_NAMES)

    def collect(self) -> Iterator[Metric]:
        total = CounterMetricFamily("istio_requests", "HTTP requests proxied", labels=HTTP_LABELS)
        duration = HistogramMetricFamily(
            "istio_request_duration_milliseconds",
            "HTTP request duration, from the request head to the end of the response",
            labels=HTTP_LABELS,
        )
        for labels, s in list(self._series.items()):
            total.add_metric(labels, s[COUNT])
            buckets, seen = [], 0.0
            for name, n in zip(_BUCKET_NAMES, s[BUCKET0:], strict=True):
                seen += n
                buckets.append((name, seen))
            duration.add_metric(labels, buckets, s[SUM])
        yield total
        yield duration


OPENED: Final = 0
"""Index of connections opened in a ``TcpStats`` series."""
CLOSED: Final = 1
"""Index of connections closed."""
SENT: Final = 2
"""Index of bytes from the client to the upstream (of closed connections)."""
RECEIVED: Final = 3
"""Index of bytes from the upstream to the client (of closed connections)."""

_TCP_FAMILIES: Final = (
    ("istio_tcp_connections_opened", "TCP connections opened"),
    ("istio_tcp_connections_closed", "TCP connections closed"),
    ("istio_tcp_sent_bytes", "Bytes sent by the client to the upstream"),
    ("istio_tcp_received_bytes", "Bytes sent by the upstream to the client"),
)


class TcpStats(_SeriesCollector):
    """``istio_tcp_connections_{opened,closed}_total`` and
    ``istio_tcp_{sent,received}_bytes_total``: per label set the four counts, indexed by
    ``OPENED``, ``CLOSED``, ``SENT``, ``RECEIVED``."""

    KIND = "TCP"
    LABELS: tuple[str, ...] = TCP_LABELS
    WIDTH = 4

    def collect(self) -> Iterator[Metric]:
        families = [CounterMetricFamily(n, h, labels=TCP_LABELS) for n, h in _TCP_FAMILIES]
        for labels, s in list(self._series.items()):
            for family, value in zip(families, s, strict=True):
                family.add_metric(labels, value)
        yield from families


def counts(counter: Counter) -> dict[tuple[str, ...], float]:
    """A labelled counter's counts so far, by label values (in its labels' order); read
    for ``ctl status``, not on the data path."""
    out: dict[tuple[str, ...], float] = {}
    for family in counter.collect():
        for sample in family.samples:
            if sample.name.endswith("_total"):
                out[tuple(sample.labels.values())] = sample.value
    return out


class Metrics:
    """All counters of one agent, in their own registry."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.tcp = TcpStats(r)
        self.failures = Counter(
            "nodeagent_connection_failures",
            "Proxied connections that failed, by direction and Envoy-style flag "
            "(UH no endpoints, UF connect failure, NR no route, DC downstream gone)",
            ("direction", "response_flags"),
            registry=r,
        )
        self.config_reloads = Counter(
            "nodeagent_config_reloads", "Config loads by result", ("result",), registry=r
        )
        self.requests = RequestStats(r)
        self.retries = Counter(
            "nodeagent_http_retries",
            "HTTP request attempts beyond the first, by destination service and reason",
            ("destination_service", "reason"),
            registry=r,
        )
        self.h2_peer_errors = Counter(
            "nodeagent_http2_peer_errors",
            "HTTP/2 peers' protocol errors and abuse, by listener (hbone, http2) and kind: "
            "stream_error (one stream reset), premature_reset (a stream reset by the peer "
            "before our answer), protocol_error, rapid_reset and control_flood (connections "
            "closed with GOAWAY)",
            ("listener", "kind"),
            registry=r,
        )
        self.http1_limits = Counter(
            "nodeagent_http1_limit_hits",
            "HTTP/1.1 client connections cut by a limit: request_headers_timeout (408), "
            "idle_timeout (closed), max_headers_count and max_request_headers_size (431)",
            ("limit",),
            registry=r,
        )
        self.downstream_refused = Counter(
            "nodeagent_downstream_connections_refused",
            "Downstream connections closed at accept by a connection cap, by listener "
            "(outbound, inbound, hbone) and reason (node_limit, listener_limit)",
            ("listener", "reason"),
            registry=r,
        )
        self.hbone_timeouts = Counter(
            "nodeagent_hbone_timeouts",
            "HBONE connections closed by a timeout: idle_timeout (no stream for that long, "
            "GOAWAY) and preface_timeout (no HTTP/2 preface after the TLS handshake)",
            ("timeout",),
            registry=r,
        )
        self.dns_requests = Counter(
            "nodeagent_dns_requests",
            "DNS queries of the local pods by answer: local (the mesh's names), forwarded "
            "(the upstream resolver answered), failed (SERVFAIL: the upstream did not), "
            "malformed (not a query: FORMERR, NOTIMP or no answer), dropped (too many at once)",
            ("answer",),
            registry=r,
        )
        self.outlier_ejections = Counter(
            "nodeagent_outlier_ejections",
            "Endpoints ejected by outlier detection",
            ("destination_service",),
            registry=r,
        )
