"""Pure data of the mesh: workloads, services, and the immutable ``MeshSnapshot``.

Nothing here does I/O or imports asyncio, socket, bcc or pyroute2.
"""

from nodeagent.model.objects import (
    Container,
    Labels,
    Pod,
    PodRuntime,
    Service,
    ServicePort,
)
from nodeagent.model.snapshot import Endpoint, MeshSnapshot

__all__ = [
    "Container",
    "Endpoint",
    "Labels",
    "MeshSnapshot",
    "Pod",
    "PodRuntime",
    "Service",
    "ServicePort",
]
