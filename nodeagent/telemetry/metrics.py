"""Prometheus metrics with Istio's names and labels (TCP subset for now).

Counters are updated once per connection (open, close), not per chunk, to keep the
data path cheap; live byte counts are on the node agent socket.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter

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


class Metrics:
    """All counters of one agent, in their own registry."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.tcp_opened = Counter(
            "istio_tcp_connections_opened", "TCP connections opened", TCP_LABELS, registry=r
        )
        self.tcp_closed = Counter(
            "istio_tcp_connections_closed", "TCP connections closed", TCP_LABELS, registry=r
        )
        self.tcp_sent = Counter(
            "istio_tcp_sent_bytes",
            "Bytes sent by the client to the upstream",
            TCP_LABELS,
            registry=r,
        )
        self.tcp_received = Counter(
            "istio_tcp_received_bytes",
            "Bytes sent by the upstream to the client",
            TCP_LABELS,
            registry=r,
        )
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
