"""Security policy objects: PeerAuthentication (Istio's shape)."""

from __future__ import annotations

import enum
from dataclasses import dataclass

from nodeagent.model.objects import Labels

DEFAULT_ROOT_NAMESPACE = "istio-system"


class MtlsMode(enum.Enum):
    UNSET = "UNSET"
    STRICT = "STRICT"
    PERMISSIVE = "PERMISSIVE"
    DISABLE = "DISABLE"


@dataclass(frozen=True)
class PeerAuthentication:
    namespace: str
    name: str
    mode: MtlsMode = MtlsMode.UNSET
    selector: Labels | None = None
    """``spec.selector.matchLabels``; None means the whole namespace (or mesh)."""
    port_modes: tuple[tuple[int, MtlsMode], ...] = ()
    """``portLevelMtls``: container port → mode."""
    source: str = ""

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"
