"""Prometheus metrics with Istio's names and labels: TCP connections and HTTP requests.

TCP counters are updated once per connection (open, close), not per chunk, to keep the
data path cheap; live byte counts are on the node agent socket. HTTP metrics are updated
once per request (``istio_requests_total``, the duration and size histograms, gRPC
message counts) with the labels of ``HTTP_LABELS``. Label values are made once per
connection and destination by the proxy; the number of label sets is bounded
(``MAX_SERIES``, then one overflow series per reporter).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Final

from prometheus_client import CollectorRegistry, Counter
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric

SOURCE_LABELS = (
    "source_workload",
    "source_workload_namespace",
    "source_principal",
    "source_app",
    "source_version",
    "source_canonical_service",
    "source_canonical_revision",
    "source_cluster",
)
DESTINATION_LABELS = (
    "destination_workload",
    "destination_workload_namespace",
    "destination_principal",
    "destination_app",
    "destination_version",
    "destination_service",
    "destination_service_name",
    "destination_service_namespace",
    "destination_canonical_service",
    "destination_canonical_revision",
    "destination_cluster",
)
PEER_LABELS = ("reporter", *SOURCE_LABELS, *DESTINATION_LABELS)
"""Who talked to whom: the labels fixed for one connection (to one destination)."""

TCP_LABELS = (*PEER_LABELS, "request_protocol", "response_flags", "connection_security_policy")
"""Istio's TCP metric labels (``request_protocol`` is ``tcp``)."""

HTTP_LABELS = (
    *PEER_LABELS,
    "request_protocol",
    "response_code",
    "grpc_response_status",
    "response_flags",
    "connection_security_policy",
    "route_name",
)
"""Istio's request labels, plus ``route_name`` (the VirtualService rule that matched)."""

BUCKETS = (
    0.5, 1, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000,
    60000, 300000, 600000, 1800000, 3600000,
)  # fmt: skip
"""Envoy's default histogram buckets, which Istio's duration and size histograms use."""
DURATION_BUCKETS_MS = BUCKETS
_BOUNDS: Final[tuple[float, ...]] = tuple(float(b) for b in BUCKETS)


def bucket(value: float) -> int:
    """``bisect_left(BUCKETS, value)``: the index of the first bucket ``value`` counts in
    (``len(BUCKETS)``: ``+Inf``). Compiled, a loop over a few bounds costs less than a
    call to ``bisect_left`` (most values fall in the first buckets)."""
    i = 0
    for b in _BOUNDS:
        if value <= b:
            return i
        i += 1
    return i


_BUCKET_NAMES: Final = (*(f"{float(b)}" for b in BUCKETS), "+Inf")
_NB: Final = len(BUCKETS) + 1

MAX_SERIES = 10_000
"""Label sets kept per collector (HTTP, TCP); past it new ones fold into one overflow
series per reporter (``OVERFLOW``), counted in ``nodeagent_metric_series_overflow_total``."""
OVERFLOW = "overflow"
"""Every label value but ``reporter`` of the series new label sets fold into."""

COUNT: Final = 0
"""Index of the request count in a ``RequestStats`` series."""
SUM: Final = 1
"""Index of the sum of durations (ms)."""
BUCKET0: Final = 2
"""Index of the first duration bucket: a request of ``d`` ms counts in
``series[BUCKET0 + bucket(d)]`` (the last one is ``+Inf``)."""
REQUEST_BYTES_SUM: Final = BUCKET0 + _NB
"""Index of the sum of request body sizes; the request size buckets follow it."""
REQUEST_BYTES0: Final = REQUEST_BYTES_SUM + 1
RESPONSE_BYTES_SUM: Final = REQUEST_BYTES0 + _NB
"""Index of the sum of response body sizes; the response size buckets follow it."""
RESPONSE_BYTES0: Final = RESPONSE_BYTES_SUM + 1
REQUEST_MESSAGES: Final = RESPONSE_BYTES0 + _NB
"""Index of gRPC messages from the client (exposed for ``request_protocol="grpc"``)."""
RESPONSE_MESSAGES: Final = REQUEST_MESSAGES + 1
"""Index of gRPC messages to the client."""


class _SeriesCollector:
    """Plain lists of numbers per label set (values in ``LABELS`` order), turned into
    metric families when scraped (``collect``, by the subclass). Labelled
    ``prometheus_client`` children cost a lock and about ten Python calls per update; a
    list costs an index. At most ``limit`` label sets: past it a new one is folded into
    the overflow series of its reporter and ``overflow`` counts it."""

    KIND = ""
    """What the series count, for errors (``HTTP``, ``TCP``)."""
    LABELS: tuple[str, ...] = ()
    WIDTH = 0
    """Numbers per label set."""

    def __init__(self, registry: CollectorRegistry, overflow: Counter, limit: int) -> None:
        self._series: dict[tuple[str, ...], list[float]] = {}
        self.overflow = overflow
        """The ``nodeagent_metric_series_overflow_total`` child to count folds in."""
        self.limit = limit
        registry.register(self)

    def series(self, labels: tuple[str, ...]) -> list[float]:
        """The list to update for these label values (in ``LABELS`` order); callers
        keep it for the connection, so this runs once per connection and destination."""
        s = self._series.get(labels)
        if s is None:
            if len(labels) != len(self.LABELS):
                raise ValueError(f"{len(self.LABELS)} label values expected, got {labels!r}")
            if len(self._series) >= self.limit:
                self.overflow.inc()
                labels = (labels[0], *([OVERFLOW] * (len(labels) - 1)))
                s = self._series.get(labels)
                if s is not None:
                    return s
            s = self._series[labels] = [0.0] * self.WIDTH
        return s

    def series_of(self, labels: Mapping[str, str]) -> list[float]:
        """``series`` for labels by name, which must be ``LABELS`` in that order."""
        if tuple(labels) != self.LABELS:
            raise ValueError(
                f"{self.KIND} metric labels must be {self.LABELS}, got {tuple(labels)}"
            )
        return self.series(tuple(labels.values()))

    def collect(self) -> Iterator[Metric]:
        raise NotImplementedError


def _buckets(s: list[float], first: int) -> list[tuple[str, float]]:
    """Cumulative ``(le, count)`` pairs of the buckets from ``s[first]``."""
    out, seen = [], 0.0
    for name, n in zip(_BUCKET_NAMES, s[first : first + _NB], strict=True):
        seen += n
        out.append((name, seen))
    return out


_PROTOCOL = HTTP_LABELS.index("request_protocol")


class RequestStats(_SeriesCollector):
    """``istio_requests_total``, ``istio_request_duration_milliseconds``,
    ``istio_request_bytes``, ``istio_response_bytes`` and, for gRPC,
    ``istio_{request,response}_messages_total``: per label set the count, then sum and
    buckets of each histogram (``COUNT``, ``SUM``, ``BUCKET0``, ``REQUEST_BYTES_SUM``...);
    a request costs seven list updates."""

    KIND = "HTTP"
    LABELS: tuple[str, ...] = HTTP_LABELS
    WIDTH = RESPONSE_MESSAGES + 1

    def collect(self) -> Iterator[Metric]:
        labels = HTTP_LABELS
        total = CounterMetricFamily("istio_requests", "HTTP requests proxied", labels=labels)
        duration = HistogramMetricFamily(
            "istio_request_duration_milliseconds",
            "HTTP request duration, from the request head to the end of the response",
            labels=labels,
        )
        req_bytes = HistogramMetricFamily(
            "istio_request_bytes", "HTTP request body sizes", labels=labels
        )
        resp_bytes = HistogramMetricFamily(
            "istio_response_bytes", "HTTP response body sizes", labels=labels
        )
        req_msgs = CounterMetricFamily(
            "istio_request_messages", "gRPC messages sent by the client", labels=labels
        )
        resp_msgs = CounterMetricFamily(
            "istio_response_messages", "gRPC messages sent by the server", labels=labels
        )
        for values, s in list(self._series.items()):
            total.add_metric(values, s[COUNT])
            duration.add_metric(values, _buckets(s, BUCKET0), s[SUM])
            req_bytes.add_metric(values, _buckets(s, REQUEST_BYTES0), s[REQUEST_BYTES_SUM])
            resp_bytes.add_metric(values, _buckets(s, RESPONSE_BYTES0), s[RESPONSE_BYTES_SUM])
            if values[_PROTOCOL] == "grpc":
                req_msgs.add_metric(values, s[REQUEST_MESSAGES])
                resp_msgs.add_metric(values, s[RESPONSE_MESSAGES])
        yield from (total, duration, req_bytes, resp_bytes, req_msgs, resp_msgs)


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

    def __init__(
        self, registry: CollectorRegistry | None = None, *, max_series: int = MAX_SERIES
    ) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.series_overflow = Counter(
            "nodeagent_metric_series_overflow",
            "New label sets of Istio's metrics folded into the overflow series (every label "
            f"but reporter {OVERFLOW!r}) because the metric already had max_series label sets",
            ("metric",),
            registry=r,
        )
        self.tcp = TcpStats(r, self.series_overflow.labels("tcp"), max_series)
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
        self.requests = RequestStats(r, self.series_overflow.labels("http"), max_series)
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
