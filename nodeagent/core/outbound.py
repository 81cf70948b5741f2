"""Outbound destination resolution: a dialled address becomes a decision.

``resolve`` maps (source pod, original destination) to one of: a mesh destination with a
chosen endpoint, a pass-through (not a mesh address), or a refusal with a reason a person
can act on. Endpoint choice is round robin over ready endpoints, per service port.
"""

from __future__ import annotations

import enum
import itertools
from typing import NamedTuple

from nodeagent.model.objects import Pod, Service, ServicePort
from nodeagent.model.snapshot import Endpoint, MeshSnapshot


class Action(enum.Enum):
    MESH = "mesh"
    PASSTHROUGH = "passthrough"
    REFUSE = "refuse"


class OutboundDecision(NamedTuple):
    """Made once per outbound connection: a tuple, cheaper to build than a frozen
    dataclass (whose ``__init__`` sets each field through ``object.__setattr__``)."""

    action: Action
    endpoint: Endpoint | None = None
    service: Service | None = None
    port: ServicePort | None = None
    flag: str = ""
    """Envoy-style response flag on refusal: ``UH`` no healthy upstream, ``NR`` no route."""
    reason: str = ""


class RoundRobin:
    """Round robin per (service, port), stable across snapshots."""

    def __init__(self) -> None:
        self._counters: dict[tuple[str, int], itertools.count[int]] = {}

    def pick(self, key: tuple[str, int], endpoints: tuple[Endpoint, ...]) -> Endpoint:
        c = self._counters.get(key)
        if c is None:
            c = self._counters[key] = itertools.count()
        return endpoints[next(c) % len(endpoints)]


def resolve(
    snap: MeshSnapshot,
    source: Pod | None,
    dst_ip: str,
    dst_port: int,
    rr: RoundRobin,
) -> OutboundDecision:
    """Decide where a connection from ``source`` to ``dst_ip:dst_port`` goes."""
    svc = snap.service_by_ip.get(dst_ip)
    if svc is not None:
        sp = svc.port(dst_port)
        if sp is None:
            ports = ", ".join(str(p.port) for p in svc.ports)
            return OutboundDecision(
                Action.REFUSE,
                service=svc,
                flag="NR",
                reason=f"service {svc.key} has no port {dst_port} (its ports: {ports})",
            )
        eps = snap.endpoints(svc, sp)
        if not eps:
            return OutboundDecision(
                Action.REFUSE,
                service=svc,
                port=sp,
                flag="UH",
                reason=(
                    f"service {svc.key} port {dst_port} has no ready endpoints: no Pod "
                    f"matching {svc.selector or '(no selector)'} has an IP and port "
                    f"{sp.target_port} (is it scheduled and running?)"
                ),
            )
        ep = rr.pick((svc.key, sp.port), eps)
        return OutboundDecision(Action.MESH, endpoint=ep, service=svc, port=sp)
    pod = snap.pod_by_ip.get(dst_ip)
    if pod is not None:
        return OutboundDecision(Action.MESH, endpoint=Endpoint(pod=pod, ip=dst_ip, port=dst_port))
    return OutboundDecision(Action.PASSTHROUGH, reason="not a mesh address")
