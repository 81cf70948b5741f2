"""Caps on the downstream connections the proxy holds, as Envoy's overload manager
(``global_downstream_max_connections``) and per-listener ``max_connections`` do: one for
the node, one for each listener of each pod (15001 outbound, 15006 inbound, 15008 HBONE),
so one pod cannot take every slot of the node. A connection past a cap is closed as it is
accepted, before any byte is read, counted in
``nodeagent_downstream_connections_refused_total{listener,reason}`` and logged once per
(listener, reason).

Taking and giving back a slot are two integer updates: the accept path stays flat.
"""

from __future__ import annotations

import asyncio
import logging
from typing import cast

from nodeagent.proxy.inputs import ConnectionLimits
from nodeagent.proxy.peerwarn import warn_once
from nodeagent.telemetry.metrics import Metrics

log = logging.getLogger("nodeagent.proxy")

LISTENERS = ("outbound", "inbound", "hbone")
"""The listeners of a pod whose connections are counted (the metric's ``listener``)."""
REASONS = ("node_limit", "listener_limit")


class ConnectionCaps:
    """The node's count of downstream connections, and the refusals by listener."""

    def __init__(self, limits: ConnectionLimits, metrics: Metrics | None = None) -> None:
        self.limits = limits
        self.max_connections = limits.max_connections
        self.held = 0
        """Downstream connections open now, on every listener of every pod."""
        self.refused = {(li, r): 0 for li in LISTENERS for r in REASONS}
        self._metrics = metrics

    def listener(self, name: str) -> ListenerSlots:
        """The slots of one listener of one pod (``name``: one of ``LISTENERS``)."""
        return ListenerSlots(self, name, self.limits.max_connections_per_listener)

    def refuse(self, listener: str, reason: str, held: int, limit: int) -> None:
        self.refused[listener, reason] += 1
        if self._metrics is not None:
            self._metrics.downstream_refused.labels(listener, reason).inc()
        warn_once(
            log,
            f"{listener}:{reason}",
            "%s connection closed at accept: %d held, the %s is %d",
            listener,
            held,
            "node's cap (--max-connections)"
            if reason == "node_limit"
            else "pod listener's cap (--max-connections-per-listener)",
            limit,
        )


class ListenerSlots:
    """One listener's share: ``take`` before serving an accepted connection (False: close
    it), ``give`` once it is closed."""

    __slots__ = ("caps", "held", "limit", "name")

    def __init__(self, caps: ConnectionCaps, name: str, limit: int) -> None:
        self.caps = caps
        self.name = name
        self.limit = limit
        self.held = 0

    def take(self) -> bool:
        caps = self.caps
        if caps.held >= caps.max_connections:
            caps.refuse(self.name, "node_limit", caps.held, caps.max_connections)
            return False
        if self.held >= self.limit:
            caps.refuse(self.name, "listener_limit", self.held, self.limit)
            return False
        caps.held += 1
        self.held += 1
        return True

    def give(self) -> None:
        if self.held > 0:
            self.held -= 1
            self.caps.held -= 1


class Refused(asyncio.Protocol):
    """The protocol of a connection past a cap: closed as soon as it is made."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        cast(asyncio.Transport, transport).abort()


__all__ = ["LISTENERS", "REASONS", "ConnectionCaps", "ListenerSlots", "Refused"]
