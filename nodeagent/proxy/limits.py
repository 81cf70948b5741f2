"""Caps on the downstream connections the proxy holds, as Envoy's overload manager
(``global_downstream_max_connections``) and per-listener ``max_connections`` do: one for
the node, one for each listener of each pod (15001 outbound, 15006 inbound, 15008 HBONE),
so one pod cannot take every slot of the node. A connection past a cap is closed as it is
accepted, before any byte is read, counted in
``nodeagent_downstream_connections_refused_total{listener,reason}`` and logged once per
(listener, reason).

Taking and giving back a slot are two integer updates: the accept path stays flat.

With ``--workers N`` each process holds its share, the N-th of each cap rounded up, so
the node holds at most the cap (plus N - 1) without a shared count on the accept path
(the kernel spreads connections by a hash of their addresses, so a process may refuse a
little before the node reaches the cap). The cap per client identity of an HBONE server
(``MAX_CONNECTIONS_PER_IDENTITY``) guards that process's server: it holds per process.
"""

from __future__ import annotations

import asyncio
import logging
import math
from typing import cast

from nodeagent.model.status import LimitStatus
from nodeagent.protocol.http2 import Http2Settings
from nodeagent.proxy.dns import MAX_IN_FLIGHT, MAX_TCP_CONNECTIONS
from nodeagent.proxy.inputs import ConnectionLimits, ProxyInputs
from nodeagent.proxy.peerwarn import warn_once
from nodeagent.telemetry.metrics import Metrics, counts

log = logging.getLogger("nodeagent.proxy")

MAX_CONNECTIONS_PER_IDENTITY = 200
"""Connections one client identity may hold open to one HBONE server (each carries up to
``HboneSettings.max_concurrent_streams`` streams and ``connection_window`` bytes): 200
times 100 streams is a pod listener's own cap (``--max-connections-per-listener``, 20,000)."""

LISTENERS = ("outbound", "inbound", "hbone")
"""The listeners of a pod whose connections are counted (the metric's ``listener``)."""
REASONS = ("node_limit", "listener_limit")


class ConnectionCaps:
    """The node's count of downstream connections, and the refusals by listener."""

    def __init__(self, limits: ConnectionLimits, metrics: Metrics | None = None) -> None:
        self.limits = limits
        self.processes = max(1, limits.processes)
        self.max_connections = share(limits.max_connections, self.processes)
        """This process's share of the node's cap."""
        self.held = 0
        """Downstream connections open now, on every listener of every pod."""
        self.refused = {(li, r): 0 for li in LISTENERS for r in REASONS}
        self._metrics = metrics

    def listener(self, name: str) -> ListenerSlots:
        """The slots of one listener of one pod (``name``: one of ``LISTENERS``)."""
        return ListenerSlots(
            self, name, share(self.limits.max_connections_per_listener, self.processes)
        )

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
            ("" if self.processes == 1 else f"share of one of {self.processes} processes in the ")
            + ("node's cap (--max-connections)" if reason == "node_limit"
               else "pod listener's cap (--max-connections-per-listener)"),
            limit,
        )  # fmt: skip


def share(cap: int, processes: int) -> int:
    """One process's share of a node's cap: the ``processes``-th, rounded up."""
    return math.ceil(cap / processes)


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


def raise_open_files(max_connections: int) -> int:
    """Raise the soft limit on open files to the hard one (as ztunnel and Go's runtime do
    at start): each proxied connection takes two descriptors. Warns when even that is
    short of what ``max_connections`` needs. Returns the soft limit now in force."""
    import resource  # (only at start)

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = 2 * max_connections + 1024
    target = max(soft, want) if hard == resource.RLIM_INFINITY else hard
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError) as e:
            log.debug("cannot raise the open files limit to %d: %s", target, e)
    if soft != resource.RLIM_INFINITY and soft < want:
        log.warning(
            "open files limit %d is below the %d that --max-connections %d needs (two per "
            "connection): past it, new connections fail (EMFILE) before the cap is reached",
            soft,
            want,
            max_connections,
        )
    return soft


def duration(seconds: float) -> str:
    """``1h``, ``5m``, ``10s``, ``0.5s``: a duration as the flags take it."""
    for unit, size in (("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{seconds // size:g}{unit}"
    return f"{seconds:g}s"


def proxy_limits(inputs: ProxyInputs, caps: ConnectionCaps) -> list[LimitStatus]:
    """The proxy's limits on clients, with their values and hits (from the metrics)."""
    m = inputs.metrics
    h1 = inputs.http1_limits
    conn = inputs.connection_limits
    http1 = counts(m.http1_limits)
    peer = counts(m.h2_peer_errors)
    refused = counts(m.downstream_refused)
    timed = counts(m.hbone_timeouts)
    h2 = Http2Settings()

    def per_process(cap: int) -> str:
        n = conn.processes
        return f" ({share(cap, n)} in each of {n} processes)" if n > 1 else ""

    def h1_hits(limit: str) -> int:
        return int(http1.get((limit,), 0))

    def peer_hits(kind: str) -> int:
        return int(sum(n for (_, k), n in peer.items() if k == kind))

    def refused_hits(reason: str) -> int:
        return int(sum(n for (_, r), n in refused.items() if r == reason))

    h1m = "nodeagent_http1_limit_hits_total{limit=%s}"
    return [
        LimitStatus(
            "HTTP/1.1 request head timeout (408)",
            duration(h1.request_headers_timeout),
            "--request-headers-timeout",
            h1m % "request_headers_timeout",
            h1_hits("request_headers_timeout"),
        ),
        LimitStatus(
            "HTTP/1.1 idle keep-alive (closed)",
            duration(h1.idle_timeout),
            "--http-idle-timeout",
            h1m % "idle_timeout",
            h1_hits("idle_timeout"),
        ),
        LimitStatus(
            "HTTP/1.1 header fields (431)",
            str(h1.max_headers),
            "--max-request-headers",
            h1m % "max_headers_count",
            h1_hits("max_headers_count"),
        ),
        LimitStatus(
            "HTTP/1.1 request head size (431)",
            f"{h1.max_header_size // 1024} KiB",
            "--max-request-headers-kb",
            h1m % "max_request_headers_size",
            h1_hits("max_request_headers_size"),
        ),
        LimitStatus(
            "HTTP/2 rapid reset (GOAWAY)",
            f"half of {h2.premature_reset_min_streams}+ streams reset early",
            "",
            "nodeagent_http2_peer_errors_total{kind=rapid_reset}",
            peer_hits("rapid_reset"),
        ),
        LimitStatus(
            "HTTP/2 PING/SETTINGS flood (GOAWAY)",
            f"{h2.max_outbound_control_frames} unread answers",
            "",
            "nodeagent_http2_peer_errors_total{kind=control_flood}",
            peer_hits("control_flood"),
        ),
        LimitStatus(
            "HBONE connections per client identity",
            str(MAX_CONNECTIONS_PER_IDENTITY) + (" per process" if conn.processes > 1 else ""),
            "",
            "nodeagent_http2_peer_errors_total{kind=connection_limit}",
            peer_hits("connection_limit"),
        ),
        LimitStatus(
            "Downstream connections per node",
            str(conn.max_connections) + per_process(conn.max_connections),
            "--max-connections",
            "nodeagent_downstream_connections_refused_total{reason=node_limit}",
            refused_hits("node_limit"),
        ),
        LimitStatus(
            "Downstream connections per pod listener",
            str(conn.max_connections_per_listener) + per_process(conn.max_connections_per_listener),
            "--max-connections-per-listener",
            "nodeagent_downstream_connections_refused_total{reason=listener_limit}",
            refused_hits("listener_limit"),
        ),
        LimitStatus(
            "HBONE idle connection (GOAWAY)",
            duration(conn.hbone_idle_timeout),
            "--hbone-idle-timeout",
            "nodeagent_hbone_timeouts_total{timeout=idle_timeout}",
            int(timed.get(("idle_timeout",), 0)),
        ),
        LimitStatus(
            "HBONE HTTP/2 preface after TLS",
            duration(conn.hbone_preface_timeout),
            "--hbone-preface-timeout",
            "nodeagent_hbone_timeouts_total{timeout=preface_timeout}",
            int(timed.get(("preface_timeout",), 0)),
        ),
        *_dns_limits(inputs),
    ]


def _dns_limits(inputs: ProxyInputs) -> list[LimitStatus]:
    """The DNS proxy's limits, when it runs."""
    if inputs.dns is None:
        return []
    answers = counts(inputs.metrics.dns_requests)
    return [
        LimitStatus(
            "DNS upstream answer (SERVFAIL)",
            duration(inputs.dns.timeout),
            "--dns-timeout",
            "nodeagent_dns_requests_total{answer=failed}",
            int(answers.get(("failed",), 0)),
        ),
        LimitStatus(
            "DNS queries of one pod at once (dropped)",
            f"{MAX_IN_FLIGHT} UDP, {MAX_TCP_CONNECTIONS} TCP connections",
            "",
            "nodeagent_dns_requests_total{answer=dropped}",
            int(answers.get(("dropped",), 0)),
        ),
    ]


__all__ = [
    "LISTENERS",
    "MAX_CONNECTIONS_PER_IDENTITY",
    "REASONS",
    "ConnectionCaps",
    "ListenerSlots",
    "Refused",
    "duration",
    "proxy_limits",
    "raise_open_files",
    "share",
]
