"""The service graph from metric samples (``nodeagent/dashboard/graph.py``): nodes, edges,
rates, errors, p99, mutual TLS, one count per request whoever reported it, and both
label sets (today's ``destination_service`` host, Istio's ``destination_service_name``)."""

from __future__ import annotations

import math

import pytest

from nodeagent.dashboard.agents import parse_metrics, rates
from nodeagent.dashboard.graph import Sample, build_graph, quantile
from nodeagent.telemetry.metrics import DURATION_BUCKETS_MS, HTTP_LABELS, Metrics

BASE = {
    "reporter": "source",
    "source_workload": "client",
    "source_workload_namespace": "default",
    "destination_workload": "web-v1",
    "destination_workload_namespace": "default",
    "destination_service": "web.default.svc.cluster.local",
    "response_code": "200",
    "connection_security_policy": "mutual_tls",
}


def req(rate: float, total: float = 100.0, **labels: str) -> Sample:
    return Sample("istio_requests_total", BASE | labels, total, rate)


def bucket(le: float, rate: float, **labels: str) -> Sample:
    return Sample("istio_request_duration_milliseconds_bucket",
                  BASE | labels | {"le": "+Inf" if math.isinf(le) else str(le)}, 0.0, rate)


def test_a_request_series_makes_client_service_and_workload_nodes() -> None:
    g = build_graph([req(4.0), req(1.0, response_code="503"), req(0.0, response_code="404")])
    assert [(n.id, n.kind, n.name, n.namespace) for n in g.nodes] == [
        ("service:web.default.svc.cluster.local", "service", "web", "default"),
        ("workload:default/client", "workload", "client", "default"),
        ("workload:default/web-v1", "workload", "web-v1", "default"),
    ]
    first, second = (e for e in g.edges if e.source == "workload:default/client"), (
        e for e in g.edges if e.target == "workload:default/web-v1")
    a, b = next(first), next(second)
    assert a.target == b.source == "service:web.default.svc.cluster.local"
    for e in (a, b):
        assert e.rps == pytest.approx(5.0)
        assert e.error_rate == pytest.approx(0.2)
        assert e.mtls and e.protocol == "http"
        assert e.requests_total == 300.0
        assert e.codes == {"200": 4.0, "503": 1.0}
    assert a.match == {"source_workload": "client",
                       "destination_service": "web.default.svc.cluster.local"}
    assert b.match == {"destination_service": "web.default.svc.cluster.local",
                       "destination_workload": "web-v1"}


def test_each_request_counts_once_when_both_sides_report_it() -> None:
    g = build_graph([req(3.0), req(3.0, reporter="destination"),
                     req(2.0, reporter="destination", source_workload="other")])
    by = {(e.source, e.target): e.rps for e in g.edges}
    assert by[("workload:default/client", "service:web.default.svc.cluster.local")] == 3.0
    assert by[("workload:default/other", "service:web.default.svc.cluster.local")] == 2.0
    assert by[("service:web.default.svc.cluster.local", "workload:default/web-v1")] == 5.0


def test_istios_full_label_set_names_the_service() -> None:
    full = {"destination_service_name": "web", "destination_service_namespace": "shop",
            "destination_service": "web.shop.svc.cluster.local"}
    only_name = {"destination_service_name": "web", "destination_service_namespace": "shop",
                 "destination_service": "unknown"}
    for labels in (full, only_name):
        g = build_graph([Sample("istio_requests_total", BASE | labels, 100.0, 1.0)])
        svc = next(n for n in g.nodes if n.kind == "service")
        assert (svc.id, svc.name, svc.namespace) == (
            "service:web.shop.svc.cluster.local", "web", "shop")


def test_plain_text_traffic_has_no_padlock_and_unknown_callers_are_their_own_node() -> None:
    g = build_graph([req(1.0, connection_security_policy="none", source_workload="unknown")])
    e = next(e for e in g.edges if e.target.startswith("service:"))
    assert e.source == "unknown:source" and not e.mtls and e.mtls_share == 0.0


def test_an_edge_that_talked_before_the_window_is_shown_idle_and_silence_is_not() -> None:
    g = build_graph([req(0.0, total=7.0), req(0.0, total=0.0, source_workload="never")])
    assert {e.source for e in g.edges} == {"workload:default/client",
                                          "service:web.default.svc.cluster.local"}
    assert all(e.rps == 0 and e.requests_total == 7.0 for e in g.edges)


def test_tcp_edges_show_connections_and_bytes() -> None:
    tcp = {k: v for k, v in BASE.items() if k != "response_code"}
    g = build_graph([
        Sample("istio_tcp_connections_opened_total", tcp, 10.0, 0.5),
        Sample("istio_tcp_sent_bytes_total", tcp, 1e6, 100.0),
        Sample("istio_tcp_received_bytes_total", tcp, 1e6, 300.0),
    ])
    e = g.edges[0]
    assert (e.protocol, e.cps, e.bytes_per_second, e.connections_total, e.mtls) == (
        "tcp", 0.5, 400.0, 10.0, True)


def test_p99_is_prometheus_histogram_quantile() -> None:
    # 100 requests: 90 under 5 ms, 9 in (5, 10], 1 in (10, 25]
    cum = {1.0: 0.0, 5.0: 90.0, 10.0: 99.0, 25.0: 100.0, math.inf: 100.0}
    assert quantile(0.99, cum) == pytest.approx(10.0)
    assert quantile(0.5, cum) == pytest.approx(1 + 4 * 50 / 90)
    assert quantile(0.995, cum) == pytest.approx(17.5)
    assert quantile(0.99, {1.0: 0.0, math.inf: 0.0}) is None
    assert quantile(0.99, {1.0: 0.0, math.inf: 5.0}) == 1.0  # all in +Inf: the last bound
    g = build_graph([req(1.0)] + [bucket(le, r) for le, r in cum.items()])
    assert all(e.p99_ms == pytest.approx(10.0) for e in g.edges)


def test_rates_from_the_agents_own_exposition() -> None:
    """Two scrapes of a real registry, 10 s apart: counts, rates and a counter reset."""
    m = Metrics()
    labels = dict.fromkeys(HTTP_LABELS, "x") | {
        "reporter": "source", "source_workload": "client", "destination_workload": "web-v1",
        "destination_service": "web.default.svc.cluster.local", "response_code": "200",
        "connection_security_policy": "mutual_tls"}
    from prometheus_client import generate_latest

    s = m.requests.series_of(labels)
    s[0] = 10
    first = parse_metrics(generate_latest(m.registry).decode())
    s[0] = 60
    s[2 + DURATION_BUCKETS_MS.index(5)] = 50  # 50 requests of 1-5 ms
    second = parse_metrics(generate_latest(m.registry).decode())
    got = {x.name: x for x in rates((0.0, first), (10.0, second)) if not x.labels.get("le")}
    assert got["istio_requests_total"].total == 60.0
    assert got["istio_requests_total"].rate == pytest.approx(5.0)
    restarted = {k: v / 10 for k, v in first.items()}  # lower than before: the agent restarted
    again = {x.name: x for x in rates((0.0, second), (10.0, restarted)) if not x.labels.get("le")}
    assert again["istio_requests_total"].rate == pytest.approx(0.1)
    g = build_graph(rates((0.0, first), (10.0, second)))
    assert all(e.rps == pytest.approx(5.0) and 1 < (e.p99_ms or 0) <= 5 for e in g.edges)


def test_the_connections_that_carry_requests_are_not_drawn_beside_them() -> None:
    tcp = {k: v for k, v in BASE.items() if k != "response_code"}
    carrier = tcp | {"destination_service": "unknown"}  # the HBONE connection to the pod
    other = tcp | {"destination_workload": "db", "destination_service": "unknown"}
    g = build_graph([
        req(2.0),
        Sample("istio_tcp_connections_opened_total", carrier, 3.0, 0.1),
        Sample("istio_tcp_connections_opened_total", other, 3.0, 0.1),
    ])
    assert sorted((e.source, e.target, e.protocol) for e in g.edges) == [
        ("service:web.default.svc.cluster.local", "workload:default/web-v1", "http"),
        ("workload:default/client", "service:web.default.svc.cluster.local", "http"),
        ("workload:default/client", "workload:default/db", "tcp"),
    ]
