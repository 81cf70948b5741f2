"""The values of Istio's metric labels for one connection (to one destination): who
reports, the source and the destination as ``core.workload`` names them, the service.
Made once per connection (TCP) or per connection and destination (HTTP), never per
request; the order is ``telemetry.metrics``'s ``PEER_LABELS``.
"""

from __future__ import annotations

from nodeagent.core.workload import UNKNOWN, peer_meta
from nodeagent.model.objects import Pod, Service


def peer_values(
    reporter: str,
    src: Pod | None,
    src_principal: str,
    dst: Pod | None,
    dst_principal: str,
    service: Service | None,
    service_host: str,
) -> tuple[str, ...]:
    """``reporter``, the source's labels, the destination's (``PEER_LABELS`` order).
    ``service_host`` names the destination service (``destination_service``); its name
    and namespace come from ``service`` when the mesh knows it, else from the host
    (``PassthroughCluster`` and unknown hosts keep it as their name)."""
    s = peer_meta(src)
    d = peer_meta(dst)
    if service is not None:
        svc_name, svc_ns = service.name, service.namespace
    else:
        svc_name, svc_ns = service_host or UNKNOWN, UNKNOWN
    return (
        reporter,
        s.workload,
        s.namespace,
        src_principal,
        s.app,
        s.version,
        s.canonical_service,
        s.canonical_revision,
        s.cluster,
        d.workload,
        d.namespace,
        dst_principal,
        d.app,
        d.version,
        service_host or UNKNOWN,
        svc_name,
        svc_ns,
        d.canonical_service,
        d.canonical_revision,
        d.cluster,
    )


def security_policy(src_principal: str, dst_principal: str) -> str:
    """``mutual_tls`` when both ends are known by certificate (HBONE), else ``none``."""
    return "mutual_tls" if src_principal != UNKNOWN and dst_principal != UNKNOWN else "none"
