"""The proxy's inputs from the agent's settings: one recipe for the main process and
each worker process, so that both serve connections alike."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

from nodeagent.config import AgentSettings
from nodeagent.model.snapshot import MeshSnapshot
from nodeagent.proxy.connections import ConnectionTable
from nodeagent.proxy.dns import DnsSettings, resolv_conf_upstreams
from nodeagent.proxy.identity import MeshIdentity
from nodeagent.proxy.inputs import Capture, ConnectionLimits, Http1Limits, ProxyInputs
from nodeagent.redirect.iptables import PROXY_MARK
from nodeagent.redirect.sockets import NetnsSockets
from nodeagent.telemetry.accesslog import BUFFER, AccessLog
from nodeagent.telemetry.metrics import Metrics

if TYPE_CHECKING:
    from nodeagent.proxy.spanexport import SpanExport

log = logging.getLogger("nodeagent")


def proxy_inputs(
    settings: AgentSettings,
    snapshot: Callable[[], MeshSnapshot],
    metrics: Metrics,
    capture: Capture,
    identity: MeshIdentity | None,
    *,
    dns: DnsSettings | None,
    reuseport: bool = False,
) -> ProxyInputs:
    """What the proxy of this process reads; ``reuseport``: its listeners join
    ``SO_REUSEPORT`` groups (``--workers`` above 1)."""
    return ProxyInputs(
        node=settings.node,
        snapshot=snapshot,
        metrics=metrics,
        table=ConnectionTable(metrics),
        access_log=access_log(settings.access_log),
        sockets=NetnsSockets(reuseport=reuseport),
        capture=capture,
        identity=identity,
        connect_timeout=settings.connect_timeout,
        path_normalization=settings.path_normalization,
        jwks_ca_bundle=settings.jwks_ca_bundle,
        http1_limits=Http1Limits(
            request_headers_timeout=settings.request_headers_timeout,
            idle_timeout=settings.http_idle_timeout,
            max_headers=settings.max_request_headers,
            max_header_size=settings.max_request_headers_kb * 1024,
        ),
        connection_limits=ConnectionLimits(
            max_connections=settings.max_connections,
            max_connections_per_listener=settings.max_connections_per_listener,
            processes=settings.workers,
            hbone_idle_timeout=settings.hbone_idle_timeout,
            hbone_preface_timeout=settings.hbone_preface_timeout,
        ),
        dns=dns,
        spans=span_export(settings, metrics),
    )


def span_export(settings: AgentSettings, metrics: Metrics) -> SpanExport | None:
    """Where spans go (``--otlp-endpoint``); None, and the OpenTelemetry SDK not even
    imported (2.3 MiB), without one."""
    if not settings.otlp_endpoint:
        return None
    from nodeagent.proxy.spanexport import SpanExport

    return SpanExport.otlp(settings.otlp_endpoint, metrics.registry, mesh_id=settings.trust_domain)


def dns_settings(settings: AgentSettings) -> DnsSettings | None:
    """The DNS proxy's settings (None: ``--dns-proxy off``); its upstreams from the flag,
    else the node's resolv.conf, read once at start."""
    if not settings.dns_proxy:
        return None
    upstreams = settings.dns_upstreams
    if upstreams is None:
        upstreams = resolv_conf_upstreams()
        if not upstreams:  # the mesh's names still answer; the rest gets SERVFAIL
            log.warning("DNS proxy: no nameserver in /etc/resolv.conf and no --dns-upstream")
    return DnsSettings(upstreams, settings.dns_timeout, PROXY_MARK)


def access_log(target: str) -> AccessLog:
    """``-`` is stdout, ``off`` keeps only the recent records for ``nodeagent ctl``."""
    if target in ("", "-"):
        return AccessLog()
    if target == "off":
        log_ = AccessLog()
        log_.enabled = False
        return log_
    return AccessLog(open(target, "ab", buffering=BUFFER))
