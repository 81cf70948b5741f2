"""The agent's own health as metrics, read from its ``AgentView`` when scraped.

Owns the gauges a node-agent dashboard needs that no data-path counter holds: the
process (``process_*``: CPU seconds, resident memory, open files), the live proxied
connections by direction, each workload certificate's expiry and readiness. They are
computed at scrape time (``collect``), so they cost the data path nothing.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterator

from prometheus_client import ProcessCollector
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import CollectorRegistry

from nodeagent.model.status import AgentView

__all__ = ["AgentCollector", "register_agent_metrics"]

log = logging.getLogger(__name__)

DIRECTIONS = ("outbound", "inbound", "passthrough")


class AgentCollector:
    """``nodeagent_active_connections``, ``nodeagent_certificate_expiry_timestamp_seconds``
    and ``nodeagent_ready`` from one agent's view."""

    def __init__(self, view: AgentView) -> None:
        self._view = view

    def collect(self) -> Iterator[Metric]:
        conns = GaugeMetricFamily(
            "nodeagent_active_connections",
            "Proxied connections open now, by direction (outbound, inbound, passthrough)",
            labels=("direction",),
        )
        certs = GaugeMetricFamily(
            "nodeagent_certificate_expiry_timestamp_seconds",
            "Unix time each workload certificate this agent holds expires (renewed at half-life)",
            labels=("identity",),
        )
        ready = GaugeMetricFamily(
            "nodeagent_ready", "1 when the agent is ready (its readiness probe answers 200)"
        )
        try:
            by_direction = Counter(c.direction for c in self._view.connections())
            for d in (*DIRECTIONS, *sorted(set(by_direction) - set(DIRECTIONS))):
                conns.add_metric((d,), by_direction.get(d, 0))
            for c in self._view.certificates():
                if c.get("not_after"):
                    certs.add_metric((str(c["identity"]),), float(c["not_after"]))
            ready.add_metric((), 1.0 if self._view.ready() else 0.0)
        except Exception:  # a scrape never fails for a view still being built
            log.exception("agent metrics: cannot read the agent's state")
        yield conns
        yield certs
        yield ready


def register_agent_metrics(registry: CollectorRegistry, view: AgentView) -> None:
    """Add the agent's health (``AgentCollector``) and its process (``process_*``) to
    ``registry``."""
    registry.register(AgentCollector(view))
    ProcessCollector(registry=registry)
