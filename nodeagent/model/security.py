"""Security policy objects with Istio's shapes: PeerAuthentication (mTLS mode) and
AuthorizationPolicy (who may call what) with its rules, sources, operations and conditions."""

from __future__ import annotations

import enum
import ipaddress
from dataclasses import dataclass
from typing import TypeAlias

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


# --- AuthorizationPolicy (security.istio.io/v1) ------------------------------------

IPNetwork: TypeAlias = ipaddress.IPv4Network | ipaddress.IPv6Network


class AuthzAction(enum.Enum):
    ALLOW = "ALLOW"
    DENY = "DENY"
    AUDIT = "AUDIT"


@dataclass(frozen=True)
class Source:
    """``rules[].from[].source``: who sends. Every non-empty field must match (AND); a
    field matches when any of its values does; a ``not`` field when none does."""

    principals: tuple[str, ...] = ()
    """SPIFFE IDs without the ``spiffe://`` scheme (``cluster.local/ns/default/sa/x``)."""
    not_principals: tuple[str, ...] = ()
    namespaces: tuple[str, ...] = ()
    not_namespaces: tuple[str, ...] = ()
    ip_blocks: tuple[IPNetwork, ...] = ()
    not_ip_blocks: tuple[IPNetwork, ...] = ()
    request_principals: tuple[str, ...] = ()
    """JWT ``iss/sub`` (HTTP only)."""
    not_request_principals: tuple[str, ...] = ()


@dataclass(frozen=True)
class Operation:
    """``rules[].to[].operation``: what is asked. ``hosts``, ``methods`` and ``paths``
    (and their ``not`` forms) are HTTP only; ``ports`` apply to any connection."""

    hosts: tuple[str, ...] = ()
    not_hosts: tuple[str, ...] = ()
    ports: tuple[int, ...] = ()
    not_ports: tuple[int, ...] = ()
    methods: tuple[str, ...] = ()
    not_methods: tuple[str, ...] = ()
    paths: tuple[str, ...] = ()
    not_paths: tuple[str, ...] = ()


@dataclass(frozen=True)
class Condition:
    """``rules[].when[]``: ``key`` (e.g. ``request.headers[x-user]``) must have one of
    ``values`` (when given) and none of ``not_values``."""

    key: str
    values: tuple[str, ...] = ()
    not_values: tuple[str, ...] = ()


@dataclass(frozen=True)
class Rule:
    """One rule: ``from`` (OR over sources) AND ``to`` (OR over operations) AND every
    ``when`` condition; an empty field matches anything."""

    from_: tuple[Source, ...] = ()
    to: tuple[Operation, ...] = ()
    when: tuple[Condition, ...] = ()


@dataclass(frozen=True)
class AuthorizationPolicy:
    namespace: str
    name: str
    selector: Labels | None = None
    """``spec.selector.matchLabels``; None means every workload of the namespace (or of
    the mesh, in the root namespace)."""
    action: AuthzAction = AuthzAction.ALLOW
    rules: tuple[Rule, ...] = ()
    """No rules: the policy matches nothing (an ALLOW of nothing denies everything)."""
    source: str = ""

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"
