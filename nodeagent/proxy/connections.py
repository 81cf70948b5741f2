"""The table of live proxied connections, and per-connection accounting on close."""

from __future__ import annotations

import itertools
import logging
from typing import Any

from nodeagent.model.status import ConnectionInfo
from nodeagent.proxy.relay import Relay
from nodeagent.proxy.tracing import Observer
from nodeagent.telemetry.metrics import CLOSED, OPENED, RECEIVED, SENT, Metrics

log = logging.getLogger("nodeagent.proxy")


class ConnectionTable:
    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics
        self.observer: Observer | None = None
        """Spans of L4 connections (set by the proxy)."""
        self._ids = itertools.count(1)
        self.live: dict[int, Relay] = {}

    def open(self, meta: dict[str, Any]) -> Relay:
        relay = Relay(next(self._ids), meta, self._closed)
        self.live[relay.id] = relay
        return relay

    def counted(self, relay: Relay) -> None:
        """The relay reached its upstream: count it as opened."""
        labels = relay.meta.get("labels")
        if labels is not None:
            self.metrics.tcp.series_of(labels)[OPENED] += 1

    def _closed(self, relay: Relay) -> None:
        self.live.pop(relay.id, None)
        slots = relay.meta.get("slots")
        if slots is not None:  # an accepted connection: its slot of the caps comes back
            slots.give()
        labels = relay.meta.get("labels")
        if labels is not None and relay.meta.get("counted"):
            s = self.metrics.tcp.series_of(labels)
            s[CLOSED] += 1
            s[SENT] += relay.bytes_sent
            s[RECEIVED] += relay.bytes_received
            if self.observer is not None:
                self.observer.tcp_closed(relay)
        if relay.close_reason not in ("done", "client closed", "upstream closed"):
            log.info(
                "conn %d %s %s -> %s closed: %s (sent %d, received %d)",
                relay.id,
                relay.meta.get("direction"),
                relay.meta.get("source"),
                relay.meta.get("destination"),
                relay.close_reason,
                relay.bytes_sent,
                relay.bytes_received,
            )

    def snapshot(self) -> list[ConnectionInfo]:
        out = []
        for r in list(self.live.values()):
            m = r.meta
            out.append(
                ConnectionInfo(
                    id=r.id,
                    direction=str(m.get("direction", "")),
                    pod=str(m.get("pod", "")),
                    source=str(m.get("source", "")),
                    destination=str(m.get("destination", "")),
                    upstream=str(m.get("upstream", "")),
                    service=str(m.get("service", "")),
                    peer_workload=str(m.get("peer", "")),
                    bytes_sent=r.bytes_sent,
                    bytes_received=r.bytes_received,
                    opened_at=r.opened_at,
                )
            )
        return out
