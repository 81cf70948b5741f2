"""Which mTLS mode applies to a workload's port: Istio's PeerAuthentication precedence.

Workload (selector) policy, then the namespace-wide policy, then the mesh-wide policy
(root namespace, no selector); ``UNSET`` inherits from the next level; a port-level mode
beats the policy's own mode. Nothing at all means PERMISSIVE.
"""

from __future__ import annotations

from dataclasses import dataclass

from nodeagent.model.objects import Pod
from nodeagent.model.security import MtlsMode, PeerAuthentication
from nodeagent.model.snapshot import MeshSnapshot


@dataclass(frozen=True)
class MtlsDecision:
    mode: MtlsMode
    policy: str
    """namespace/name of the policy that decided, or ``default``."""

    @property
    def accepts_plaintext(self) -> bool:
        return self.mode is not MtlsMode.STRICT


def _levels(snap: MeshSnapshot, pod: Pod) -> list[PeerAuthentication]:
    workload = sorted(
        (
            pa
            for pa in snap.peer_authentications
            if pa.namespace == pod.namespace
            and pa.selector is not None
            and pod.labels.matches(pa.selector)
        ),
        key=lambda pa: pa.name,
    )
    namespace = [
        pa
        for pa in snap.peer_authentications
        if pa.namespace == pod.namespace and pa.selector is None
    ]
    mesh = [
        pa
        for pa in snap.peer_authentications
        if pa.namespace == snap.root_namespace and pa.selector is None
    ]
    return workload[:1] + namespace[:1] + mesh[:1]


def effective_mtls(snap: MeshSnapshot, pod: Pod, port: int) -> MtlsDecision:
    """The mode for traffic arriving at ``pod`` on container port ``port``."""
    for pa in _levels(snap, pod):
        for p, mode in pa.port_modes:
            if p == port and mode is not MtlsMode.UNSET:
                return MtlsDecision(mode, pa.key)
        if pa.mode is not MtlsMode.UNSET:
            return MtlsDecision(pa.mode, pa.key)
    return MtlsDecision(MtlsMode.PERMISSIVE, "default")
