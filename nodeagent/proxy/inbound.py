"""The called workload's side of the L7 path: which of its ports carry HTTP and need
request-level policy, and the policy stage every request on such a port passes on the
workload's own node before it reaches the app: authorization (``core.authz``) with the
mTLS-proven caller identity.

A port is handled here, request by request, only when it is an HTTP port of a Service
selecting the pod *and* some policy of the workload needs HTTP attributes; otherwise the
connection is authorized once, at L4, and relayed as bytes (cheaper, and what ztunnel
does). The per-port index is built once per snapshot.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from dataclasses import dataclass

from nodeagent.core import authz
from nodeagent.core.authz import AuthzRequest
from nodeagent.model.objects import Pod, Service, ServicePort
from nodeagent.model.snapshot import Endpoint, MeshSnapshot
from nodeagent.model.traffic import TrafficPolicy
from nodeagent.proxy.clusters import Cluster, fqdn, port_protocol
from nodeagent.proxy.l7 import Downstream, Exchange, LocalReply

RBAC_DENIED = "RBAC: access denied"


@dataclass(frozen=True)
class HttpPort:
    """One HTTP port of a local workload, as the Service that exposes it names it."""

    service: Service
    port: ServicePort
    protocol: str
    """``http1`` or ``h2``."""
    cluster: Cluster
    """``inbound|<port>||<service host>``: the app itself, one endpoint."""


def _http_ports(snap: MeshSnapshot) -> dict[tuple[str, int], HttpPort]:
    """(pod key, container port) → the HTTP Service port that targets it (the first
    Service by name when several do)."""
    out: dict[tuple[str, int], HttpPort] = {}
    for svc in sorted(snap.services, key=lambda s: s.key):
        for sp in svc.ports:
            proto = port_protocol(sp)
            if proto is None:
                continue
            for ep in snap.endpoints(svc, sp):
                key = (ep.pod.key, ep.port)
                if key in out:
                    continue
                host = fqdn(svc)
                out[key] = HttpPort(
                    service=svc,
                    port=sp,
                    protocol=proto,
                    cluster=Cluster(
                        name=f"inbound|{ep.port}||{host}",
                        host=host,
                        service=svc,
                        port=sp,
                        subset=None,
                        endpoints=(Endpoint(pod=ep.pod, ip=ep.ip, port=ep.port),),
                        policy=TrafficPolicy(),
                    ),
                )
    return out


class InboundPolicy:
    """Per-request admission at the called workload; one instance per agent."""

    def __init__(self, snapshot: Callable[[], MeshSnapshot]) -> None:
        self.snapshot = snapshot
        self._ports: tuple[weakref.ref[MeshSnapshot], dict[tuple[str, int], HttpPort]] | None
        self._ports = None

    def http_port(self, snap: MeshSnapshot, pod: Pod, port: int) -> HttpPort | None:
        cached = self._ports
        if cached is None or cached[0]() is not snap:
            cached = self._ports = (weakref.ref(snap), _http_ports(snap))
        return cached[1].get((pod.key, port))

    def l7_port(self, snap: MeshSnapshot, pod: Pod, port: int) -> HttpPort | None:
        """The HTTP port to serve request by request, or None: authorize the connection
        once and relay bytes."""
        hp = self.http_port(snap, pod, port)
        if hp is None:
            return None
        if authz.needs_http(snap, pod):
            return hp
        return None

    def admit(
        self,
        ds: Downstream,
        method: str,
        path: str,
        hdrs: dict[str, str],
        out: list[tuple[str, str]],
        x: Exchange,
    ) -> None:
        """Let one request through to the app, or raise the ``LocalReply`` it gets."""
        snap = self.snapshot()
        pod = snap.pod_by_key.get(ds.pod.key, ds.pod)
        inbound = ds.inbound
        assert inbound is not None
        principal = ds.source_principal if ds.source_principal != "unknown" else None
        req = AuthzRequest(
            destination=pod,
            destination_port=inbound.cluster.endpoints[0].port,
            source_principal=principal,
            source_ip=ds.source_ip,
            destination_ip=pod.pod_ip or "",
            is_http=True,
            host=x.authority,
            method=method,
            path=path,
            headers=hdrs,
        )
        decision = authz.evaluate(snap, req)
        x.policy = decision.policy
        x.policy_rule = decision.rule_index
        if not decision.allowed:
            x.detail = f"{RBAC_DENIED}: {decision.reason}"
            raise LocalReply(403, "RBAC", RBAC_DENIED)
