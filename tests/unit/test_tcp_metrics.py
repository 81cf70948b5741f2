"""Istio's TCP metrics as the connection table counts them: names, labels and values in
the Prometheus exposition."""

from __future__ import annotations

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from nodeagent.proxy.connections import ConnectionTable
from nodeagent.telemetry.metrics import TCP_LABELS, Metrics


def labels(dst: str) -> dict[str, str]:
    values = ("source", "client", "default", "unknown", dst, "default", "web", "unknown", "-")
    return dict(zip(TCP_LABELS, (*values, "none"), strict=True))


def sample(text: str, name: str, dst: str) -> float | None:
    """The value of ``name`` for the labels of ``dst``, read back from the exposition."""
    for family in text_string_to_metric_families(text):
        for smp in family.samples:
            if smp.name == name and smp.labels == labels(dst):
                return float(smp.value)
    return None


def test_opened_closed_and_bytes_count_each_destination_apart() -> None:
    m = Metrics()
    table = ConnectionTable(m)
    for dst, sent, received in (("web-1", 100, 2000), ("web-1", 5, 7), ("web-2", 1, 1)):
        relay = table.open({"labels": labels(dst)})
        relay.meta["counted"] = True
        table.counted(relay)
        relay.bytes_sent, relay.bytes_received = sent, received
        relay.close("done")
    open_one = table.open({"labels": labels("web-2")})
    open_one.meta["counted"] = True
    table.counted(open_one)  # still open: opened, not closed, no bytes yet
    never = table.open({"labels": labels("web-3")})
    never.close("UF: refused")  # never reached its upstream: not counted at all
    text = generate_latest(m.registry).decode()
    assert sample(text, "istio_tcp_connections_opened_total", "web-1") == 2
    assert sample(text, "istio_tcp_connections_closed_total", "web-1") == 2
    assert sample(text, "istio_tcp_sent_bytes_total", "web-1") == 105
    assert sample(text, "istio_tcp_received_bytes_total", "web-1") == 2007
    assert sample(text, "istio_tcp_connections_opened_total", "web-2") == 2
    assert sample(text, "istio_tcp_connections_closed_total", "web-2") == 1
    assert sample(text, "istio_tcp_sent_bytes_total", "web-2") == 1
    assert sample(text, "istio_tcp_connections_opened_total", "web-3") is None
    assert "# TYPE istio_tcp_connections_opened_total counter" in text


def test_labels_out_of_order_are_an_error_not_a_wrong_series() -> None:
    table = ConnectionTable(Metrics())
    relay = table.open({"labels": dict(reversed(labels("web-1").items()))})
    with pytest.raises(ValueError, match="TCP metric labels must be"):
        table.counted(relay)
