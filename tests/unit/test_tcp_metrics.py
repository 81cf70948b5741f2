"""Istio's TCP metrics as the connection table counts them: names, labels and values in
the Prometheus exposition; and the bound on label sets."""

from __future__ import annotations

import orjson
import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from nodeagent.model.objects import Labels, Pod
from nodeagent.proxy.connections import ConnectionTable, connection_line, peers_of, tcp_telemetry
from nodeagent.proxy.peerlabels import security_policy
from nodeagent.proxy.relay import Relay
from nodeagent.telemetry.accesslog import rfc3339
from nodeagent.telemetry.metrics import TCP_LABELS, Metrics

CLIENT = Pod("default", "client", "node1", labels=Labels.of({"app": "client"}))
SRC_ID = "spiffe://cluster.local/ns/default/sa/client"
DST_ID = "spiffe://cluster.local/ns/default/sa/web"


def server(name: str) -> Pod:
    return Pod("default", name, "node2", labels=Labels.of({"app": "web", "version": "v1"}))


def meta(dst: str) -> dict[str, object]:
    m: dict[str, object] = {}
    tcp_telemetry(m, "source", CLIENT, server(dst), None, "web.default.svc.cluster.local")
    return m


def sample(text: str, name: str, **want: str) -> float | None:
    """The sum of ``name`` over the series whose labels include ``want``."""
    found = None
    for family in text_string_to_metric_families(text):
        for smp in family.samples:
            if smp.name == name and want.items() <= smp.labels.items():
                found = (found or 0.0) + float(smp.value)
    return found


def test_opened_closed_and_bytes_count_each_destination_apart() -> None:
    m = Metrics()
    table = ConnectionTable(m)
    for dst, sent, received in (("web-1", 100, 2000), ("web-1", 5, 7), ("web-2", 1, 1)):
        relay = table.open(meta(dst))
        relay.meta["counted"] = True
        table.counted(relay)
        relay.bytes_sent, relay.bytes_received = sent, received
        relay.close("done")
    open_one = table.open(meta("web-2"))
    open_one.meta["counted"] = True
    table.counted(open_one)  # still open: opened, not closed, no bytes yet
    never = table.open(meta("web-3"))
    never.close("UF: refused")  # never reached its upstream: not counted at all
    text = generate_latest(m.registry).decode()
    w1, w2 = {"destination_workload": "web-1"}, {"destination_workload": "web-2"}
    assert sample(text, "istio_tcp_connections_opened_total", **w1) == 2
    assert sample(text, "istio_tcp_connections_closed_total", **w1) == 2
    assert sample(text, "istio_tcp_sent_bytes_total", **w1) == 105
    assert sample(text, "istio_tcp_received_bytes_total", **w1) == 2007
    assert sample(text, "istio_tcp_connections_opened_total", **w2) == 2
    assert sample(text, "istio_tcp_connections_closed_total", **w2) == 1
    assert sample(text, "istio_tcp_sent_bytes_total", **w2) == 1
    assert sample(text, "istio_tcp_connections_opened_total", destination_workload="web-3") is None
    assert "# TYPE istio_tcp_connections_opened_total counter" in text
    (family,) = [f for f in m.registry.collect() if f.name == "istio_tcp_connections_opened"]
    assert set(family.samples[0].labels) == set(TCP_LABELS)
    assert family.samples[0].labels == {
        "reporter": "source",
        "source_workload": "client",
        "source_workload_namespace": "default",
        "source_principal": "unknown",
        "source_app": "client",
        "source_version": "unknown",
        "source_canonical_service": "client",
        "source_canonical_revision": "latest",
        "source_cluster": "Kubernetes",
        "destination_workload": "web-1",
        "destination_workload_namespace": "default",
        "destination_principal": "unknown",
        "destination_app": "web",
        "destination_version": "v1",
        "destination_service": "web.default.svc.cluster.local",
        "destination_service_name": "web.default.svc.cluster.local",
        "destination_service_namespace": "unknown",
        "destination_canonical_service": "web",
        "destination_canonical_revision": "v1",
        "destination_cluster": "Kubernetes",
        "request_protocol": "tcp",
        "response_flags": "-",
        "connection_security_policy": "none",
    }


def test_label_sets_past_the_bound_fold_into_an_overflow_series_and_are_counted() -> None:
    m = Metrics(max_series=3)
    table = ConnectionTable(m)
    for i in range(5):
        relay = table.open(meta(f"web-{i}"))
        relay.meta["counted"] = True
        table.counted(relay)
        relay.bytes_sent = 10
        relay.close("done")
    text = generate_latest(m.registry).decode()
    opened = "istio_tcp_connections_opened_total"
    assert sample(text, opened) == 5  # nothing is lost...
    for i in range(3):
        assert sample(text, opened, destination_workload=f"web-{i}") == 1
    # ...the two label sets past the bound share one series, all but reporter "overflow"
    assert sample(text, opened, reporter="source", destination_workload="overflow") == 2
    assert sample(text, "istio_tcp_sent_bytes_total", destination_workload="overflow") == 20
    assert sample(text, "nodeagent_metric_series_overflow_total", metric="tcp") == 2
    assert sample(text, "nodeagent_metric_series_overflow_total", metric="http") == 0


def test_each_connection_ends_in_one_line_saying_how() -> None:
    import io

    from nodeagent.telemetry.accesslog import AccessLog

    log = AccessLog(io.BytesIO())
    table = ConnectionTable(Metrics(), log)
    ok = table.open({**meta("web-1"), "source": "10.0.0.1:5555", "upstream": "10.0.0.2:80"})
    ok.meta["counted"] = True
    table.counted(ok)
    ok.bytes_sent, ok.bytes_received = 3, 4
    ok.close("done")
    failed = table.open(meta("web-2"))
    failed.close("UF: connection refused")  # never reached its upstream: logged, not counted
    table.open({}).close("NR: no route")  # refused before its peers were known: no line
    first, second = log.recent_connections
    assert first["message"] == "connection complete" and first["direction"] == "outbound"
    assert (first["src.addr"], first["src.workload"], first["dst.addr"]) == (
        "10.0.0.1:5555",
        "client",
        "10.0.0.2:80",
    )
    assert (first["bytes_sent"], first["bytes_recv"]) == (3, 4) and "error" not in first
    assert "src.identity" not in first  # plain TCP: no identity, left out as ztunnel does
    assert second["dst.workload"] == "web-2" and second["error"] == "UF: connection refused"
    assert second["connection_termination_details"] == "UF: connection refused"
    assert not log.recent  # connection lines are not request records


def labels_of(m: dict[str, object]) -> dict[str, str]:
    values = m["labels"]
    assert isinstance(values, tuple)
    return dict(zip(TCP_LABELS, values, strict=True))


def test_the_labels_of_one_set_of_peers_are_made_once_and_follow_a_new_snapshot() -> None:
    web = server("web-1")
    host = "web.default.svc.cluster.local"
    first: dict[str, object] = {}
    again: dict[str, object] = {}
    tcp_telemetry(first, "source", CLIENT, web, None, host)
    tcp_telemetry(again, "source", CLIENT, web, None, host)
    assert again["labels"] is first["labels"] and again["peers"] is first["peers"]
    # the next snapshot's object for the same pod, relabelled: its own labels, not the old
    v2 = Pod("default", "web-1", "node2", labels=Labels.of({"app": "web", "version": "v2"}))
    later: dict[str, object] = {}
    tcp_telemetry(later, "source", CLIENT, v2, None, host)
    assert labels_of(later)["destination_version"] == "v2"
    assert labels_of(first)["destination_version"] == "v1"
    other: dict[str, object] = {}
    tcp_telemetry(other, "destination", CLIENT, web, None, host)
    assert labels_of(other)["reporter"] == "destination"
    assert labels_of(first)["reporter"] == "source"


def _ztunnel_record(
    relay: Relay, src: Pod | None, src_id: str, dst: Pod | None, dst_id: str, host: str
) -> dict[str, object]:
    """The "connection complete" record field by field, in ztunnel's order (the spec the
    line is checked against)."""
    m = relay.meta
    upstream = str(m.get("upstream") or "")
    rec: dict[str, object] = {"start_time": rfc3339(relay.opened_at)}
    rec["message"] = "connection complete"
    rec["reporter"] = "source"
    rec["direction"] = "outbound"
    rec["src.addr"] = m.get("source", "")
    if src is not None:
        rec["src.workload"], rec["src.namespace"] = src.name, src.namespace
    if src_id not in ("", "unknown"):
        rec["src.identity"] = src_id
    if upstream.startswith("hbone "):
        rec["dst.addr"], _, rec["dst.hbone_addr"] = upstream[6:].partition(" -> ")
    else:
        rec["dst.addr"] = upstream
    if host:
        rec["dst.service"] = host
    if dst is not None:
        rec["dst.workload"], rec["dst.namespace"] = dst.name, dst.namespace
    if dst_id not in ("", "unknown"):
        rec["dst.identity"] = dst_id
    rec["bytes_sent"], rec["bytes_recv"] = relay.bytes_sent, relay.bytes_received
    rec["duration"] = "1500ms"
    rec["connection_security_policy"] = security_policy(src_id, dst_id)
    rec["connection_termination_details"] = relay.close_reason
    if relay.close_reason not in ("done", "client closed", "upstream closed"):
        rec["error"] = relay.close_reason
    return rec


@pytest.mark.parametrize("hbone", [False, True])
@pytest.mark.parametrize("src", [None, CLIENT])
@pytest.mark.parametrize("ids", [("unknown", "unknown"), (SRC_ID, DST_ID)])
@pytest.mark.parametrize(
    "reason", ["done", "UF: connection refused", 'reset: "peer" said \\ no\n', "caf\xe9 \u2028"]
)
def test_a_connection_line_is_what_orjson_writes_for_its_record(
    hbone: bool, src: Pod | None, ids: tuple[str, str], reason: str
) -> None:
    dst = server("web-1")
    m: dict[str, object] = {"source": "10.0.0.1:5555"}
    m["upstream"] = "hbone 10.0.1.2:15008 -> 10.0.1.9:80" if hbone else "10.0.1.9:80"
    relay = Relay(1, m, lambda r: None)
    relay.bytes_sent, relay.bytes_received, relay.close_reason = 3, 40000, reason
    peers = peers_of("source", src, ids[0], dst, ids[1], "web.default.svc.cluster.local")
    line = connection_line(relay, peers, relay.opened_at + 1.5)
    want = _ztunnel_record(relay, src, ids[0], dst, ids[1], "web.default.svc.cluster.local")
    assert line == orjson.dumps(want, option=orjson.OPT_APPEND_NEWLINE)
