"""The table of live proxied connections, and per-connection accounting on close: the
TCP metrics and one "connection complete" log line (as ztunnel writes it) per relayed
connection whose peers are known (``meta["peers"]``, set with ``meta["labels"]`` by
``tcp_telemetry``), unless the Telemetry kind's access logging of the workload on this
node turns it off or filters it out."""

from __future__ import annotations

import itertools
import logging
import time
from typing import Any, NamedTuple

import orjson

from nodeagent.core.telemetry import keeps
from nodeagent.model.objects import Pod, Service
from nodeagent.model.status import ConnectionInfo
from nodeagent.proxy.peerlabels import peer_values, security_policy
from nodeagent.proxy.relay import Relay
from nodeagent.proxy.tracing import Observer
from nodeagent.telemetry.accesslog import AccessLog, json_plain, json_text, rfc3339
from nodeagent.telemetry.metrics import CLOSED, OPENED, RECEIVED, SENT, Metrics

log = logging.getLogger("nodeagent.proxy")

CLEAN_ENDS = frozenset({"done", "client closed", "upstream closed"})
"""Close reasons of a connection that ended normally (no ``error`` in its log line)."""


class Peers(NamedTuple):
    """Who a relayed connection joins, for its "connection complete" line; with the
    line's fields that depend only on them (``peers_of``), made once per set of peers."""

    reporter: str
    src: Pod | None
    src_principal: str
    dst: Pod | None
    dst_principal: str
    service_host: str
    start: str
    """The line's JSON after ``start_time``, up to ``src.addr``: ``"message"``,
    ``"reporter"``, ``"direction"``, each followed by a comma."""
    src_fields: str
    """``,"src.workload":…``, ``src.namespace``, ``src.identity`` as far as known."""
    dst_fields: str
    """``,"dst.service":…``, ``dst.workload``, ``dst.namespace``, ``dst.identity``."""
    policy: str
    """``,"connection_security_policy":…``."""


def peers_of(
    reporter: str,
    src: Pod | None,
    src_principal: str,
    dst: Pod | None,
    dst_principal: str,
    service_host: str,
) -> Peers:
    """``Peers`` with its part of the log line made, as JSON (ztunnel leaves out what it
    does not know: an empty or ``unknown`` value)."""
    direction = "outbound" if reporter == "source" else "inbound"
    start = {"message": "connection complete", "reporter": reporter, "direction": direction}
    src_fields: dict[str, str] = {}
    if src is not None:
        src_fields["src.workload"], src_fields["src.namespace"] = src.name, src.namespace
    _put(src_fields, "src.identity", src_principal)
    dst_fields: dict[str, str] = {}
    _put(dst_fields, "dst.service", service_host)
    if dst is not None:
        dst_fields["dst.workload"], dst_fields["dst.namespace"] = dst.name, dst.namespace
    _put(dst_fields, "dst.identity", dst_principal)
    policy = {"connection_security_policy": security_policy(src_principal, dst_principal)}
    return Peers(
        reporter,
        src,
        src_principal,
        dst,
        dst_principal,
        service_host,
        _json_fields(start) + ",",
        "," + _json_fields(src_fields) if src_fields else "",
        "," + _json_fields(dst_fields) if dst_fields else "",
        "," + _json_fields(policy),
    )


def _json_fields(fields: dict[str, str]) -> str:
    """``"name":value`` of each field, comma-separated, as ``orjson`` writes them."""
    return orjson.dumps(fields)[1:-1].decode()


def tcp_telemetry(
    meta: dict[str, Any],
    reporter: str,
    src: Pod | None,
    dst: Pod | None,
    service: Service | None,
    service_host: str,
    *,
    src_principal: str = "unknown",
    dst_principal: str = "unknown",
) -> None:
    """Give a connection its TCP metric labels (Istio's, ``TCP_LABELS`` order) and the
    peers its log line names; made once for each set of peers (``_TELEMETRY``), not per
    connection."""
    key = (reporter, id(src), src_principal, id(dst), dst_principal, id(service), service_host)
    made = _TELEMETRY.get(key)
    if made is None:
        labels = (
            *peer_values(reporter, src, src_principal, dst, dst_principal, service, service_host),
            "tcp",
            "-",
            security_policy(src_principal, dst_principal),
        )
        peers = peers_of(reporter, src, src_principal, dst, dst_principal, service_host)
        if len(_TELEMETRY) >= TELEMETRY_KEPT:
            _TELEMETRY.clear()  # pods of old snapshots go with it
        # the entry holds src, dst and service (in peers): their ids in the key stay theirs
        made = _TELEMETRY[key] = (labels, peers, service)
    meta["labels"] = made[0]
    meta["peers"] = made[1]


TELEMETRY_KEPT = 4096
"""Sets of peers whose TCP labels are kept (a pod's and Service's objects are the same
until the next snapshot replaces them)."""
_TELEMETRY: dict[tuple[object, ...], tuple[tuple[str, ...], Peers, Service | None]] = {}


def _put(rec: dict[str, Any], key: str, value: str) -> None:
    if value and value != "unknown":  # ztunnel leaves out what it does not know
        rec[key] = value


def connection_line(relay: Relay, peers: Peers, now: float) -> bytes:
    """The "connection complete" line of a relayed connection, as JSON: ztunnel's fields
    (``src.*``, ``dst.*``, ``direction``, ``bytes_sent``/``bytes_recv``, ``duration``,
    ``error``) plus the start time, reporter, security policy and how it ended (the
    peers' fields are JSON already; a format string costs less than a dict and its
    ``orjson.dumps``)."""
    m = relay.meta
    upstream = m.get("upstream") or m.get("destination") or ""
    source = m.get("source", "")
    reason = relay.close_reason
    tunnel = ""
    hbone = upstream.startswith("hbone ")
    if hbone:  # "hbone <peer>:15008 -> <target>"
        upstream, _, tunnel = upstream[6:].partition(" -> ")
    if not json_plain(f"{upstream}{tunnel}{source}{reason}"):
        upstream, tunnel = json_text(upstream), json_text(tunnel)
        source, reason = json_text(source), json_text(reason)
    hbone_addr = f',"dst.hbone_addr":"{tunnel}"' if hbone else ""
    error = f',"error":"{reason}"' if relay.close_reason not in CLEAN_ENDS else ""
    # one string built at once: each ``+=`` would copy the line so far
    return (
        f'{{"start_time":"{rfc3339(relay.opened_at)}",{peers.start}"src.addr":"{source}"'
        f'{peers.src_fields},"dst.addr":"{upstream}"{hbone_addr}{peers.dst_fields},'
        f'"bytes_sent":{relay.bytes_sent},"bytes_recv":{relay.bytes_received},'
        f'"duration":"{round((now - relay.opened_at) * 1000)}ms"{peers.policy},'
        f'"connection_termination_details":"{reason}"{error}}}\n'
    ).encode()


class ConnectionTable:
    def __init__(self, metrics: Metrics, access_log: AccessLog | None = None) -> None:
        self.metrics = metrics
        self.observer: Observer | None = None
        """Spans of L4 connections (set by the proxy)."""
        self.access_log = access_log
        """Where "connection complete" lines go (the proxy sets its access log)."""
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
            s = relay.meta["series"] = self.metrics.tcp.series(labels)
            s[OPENED] += 1

    def _closed(self, relay: Relay) -> None:
        self.live.pop(relay.id, None)
        slots = relay.meta.get("slots")
        if slots is not None:  # an accepted connection: its slot of the caps comes back
            slots.give()
        s = relay.meta.get("series")
        if s is not None and relay.meta.get("counted"):
            s[CLOSED] += 1
            s[SENT] += relay.bytes_sent
            s[RECEIVED] += relay.bytes_received
        if self.observer is not None:
            self.observer.tcp_closed(relay)
        peers = relay.meta.get("peers")
        if peers is not None and self.access_log is not None:
            self._log(relay, peers, self.access_log)
        if relay.close_reason not in CLEAN_ENDS:
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

    def _log(self, relay: Relay, peers: Peers, access_log: AccessLog) -> None:
        """The connection's line, as its workload's Telemetry says (on/off, filter)."""
        obs = self.observer
        pod = peers.src if peers.reporter == "source" else peers.dst  # the one on this node
        c = obs.config(pod) if obs is not None else None
        if c is not None and not c.access_log:
            return  # (before the record is made: an off switch costs a dict hit)
        line = connection_line(relay, peers, time.time())
        if c is None or c.log_filter is None or keeps(c.log_filter, orjson.loads(line)):
            access_log.write_connection(line)

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
