"""Traffic-management objects with Istio's shapes: VirtualService and DestinationRule.

Pure, frozen data produced by ``control/traffic.py`` after validation (hosts are FQDNs,
durations are seconds, regexes are compiled). Decisions over them live in ``core/route.py``.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Protocol

from nodeagent.model.objects import Labels

CLUSTER_DOMAIN = "cluster.local"


def qualify_host(host: str, namespace: str, cluster_domain: str = CLUSTER_DOMAIN) -> str:
    """Istio's short-name rule: a name without a dot (``reviews``) is qualified with the
    namespace of the rule (``reviews.default.svc.cluster.local``); others stay as they are."""
    if host == "*" or "." in host:
        return host
    return f"{host}.{namespace}.svc.{cluster_domain}"


class MatchKind(enum.Enum):
    EXACT = "exact"
    PREFIX = "prefix"
    REGEX = "regex"
    PRESENT = "present"
    """Only for headers and query parameters given as ``{}``: the name must be present."""


class Regex(Protocol):
    """A compiled pattern (``core/regex.py``: RE2, linear time in the input)."""

    @property
    def pattern(self) -> str: ...

    def fullmatch(self, text: str) -> bool: ...


@dataclass(frozen=True)
class StringMatch:
    kind: MatchKind
    value: str = ""
    regex: Regex | None = field(default=None, compare=False, repr=False)
    """Compiled ``value`` when ``kind`` is REGEX (matched in full, as Envoy does)."""


@dataclass(frozen=True)
class HTTPMatchRequest:
    """One ``http[].match[]`` entry; every field given must match (AND)."""

    name: str = ""
    uri: StringMatch | None = None
    authority: StringMatch | None = None
    method: StringMatch | None = None
    headers: tuple[tuple[str, StringMatch], ...] = ()
    """Lowercase header name → match."""
    query_params: tuple[tuple[str, StringMatch], ...] = ()
    port: int | None = None
    source_labels: Labels | None = None
    source_namespace: str | None = None
    ignore_uri_case: bool = False


@dataclass(frozen=True)
class Destination:
    host: str
    """FQDN."""
    subset: str | None = None
    port: int | None = None


@dataclass(frozen=True)
class HeaderOperations:
    set: tuple[tuple[str, str], ...] = ()
    add: tuple[tuple[str, str], ...] = ()
    remove: tuple[str, ...] = ()


@dataclass(frozen=True)
class Headers:
    request: HeaderOperations = field(default_factory=HeaderOperations)
    response: HeaderOperations = field(default_factory=HeaderOperations)


@dataclass(frozen=True)
class RouteDestination:
    """One weighted destination of an ``http[].route[]`` or ``tcp[].route[]``."""

    destination: Destination
    weight: int = 100
    """Percent of traffic; a lone destination always gets 100."""
    headers: Headers | None = None


@dataclass(frozen=True)
class HTTPRedirect:
    uri: str | None = None
    authority: str | None = None
    redirect_code: int = 301


@dataclass(frozen=True)
class HTTPRewrite:
    uri: str | None = None
    authority: str | None = None


@dataclass(frozen=True)
class HTTPRetry:
    attempts: int
    per_try_timeout: float | None = None
    """Seconds."""
    retry_on: tuple[str, ...] = ()


DEFAULT_RETRY = HTTPRetry(
    attempts=2, retry_on=("connect-failure", "refused-stream", "unavailable", "cancelled", "503")
)
"""Istio's retry policy when a route gives none."""


@dataclass(frozen=True)
class FaultDelay:
    fixed_delay: float
    """Seconds."""
    percentage: float = 100.0


@dataclass(frozen=True)
class FaultAbort:
    http_status: int
    percentage: float = 100.0


@dataclass(frozen=True)
class HTTPFault:
    delay: FaultDelay | None = None
    abort: FaultAbort | None = None


@dataclass(frozen=True)
class HTTPRoute:
    """One ``http[]`` rule: matches (OR), then where and how to send the request."""

    name: str = ""
    matches: tuple[HTTPMatchRequest, ...] = ()
    """Empty means: every request."""
    routes: tuple[RouteDestination, ...] = ()
    redirect: HTTPRedirect | None = None
    rewrite: HTTPRewrite | None = None
    headers: Headers | None = None
    timeout: float | None = None
    """Seconds; None means no route timeout."""
    retries: HTTPRetry | None = None
    fault: HTTPFault | None = None
    mirror: Destination | None = None
    mirror_percentage: float | None = None


@dataclass(frozen=True)
class L4MatchAttributes:
    port: int | None = None
    source_labels: Labels | None = None


@dataclass(frozen=True)
class TCPRoute:
    matches: tuple[L4MatchAttributes, ...] = ()
    routes: tuple[RouteDestination, ...] = ()


@dataclass(frozen=True)
class VirtualService:
    namespace: str
    name: str
    hosts: tuple[str, ...]
    """FQDNs (or ``*``-wildcards)."""
    http: tuple[HTTPRoute, ...] = ()
    tcp: tuple[TCPRoute, ...] = ()
    source: str = ""

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"


class SimpleLB(enum.Enum):
    ROUND_ROBIN = "ROUND_ROBIN"
    LEAST_REQUEST = "LEAST_REQUEST"
    RANDOM = "RANDOM"
    PASSTHROUGH = "PASSTHROUGH"


@dataclass(frozen=True)
class HTTPCookie:
    name: str
    ttl: float | None = None


@dataclass(frozen=True)
class ConsistentHash:
    """Exactly one of the fields is set."""

    http_header_name: str | None = None
    http_cookie: HTTPCookie | None = None
    use_source_ip: bool = False
    http_query_parameter_name: str | None = None


@dataclass(frozen=True)
class LocalityLbSetting:
    enabled: bool = True
    failover: tuple[tuple[str, str], ...] = ()
    """(from region, to region) pairs."""


@dataclass(frozen=True)
class LoadBalancer:
    simple: SimpleLB | None = None
    consistent_hash: ConsistentHash | None = None
    locality: LocalityLbSetting | None = None


@dataclass(frozen=True)
class ConnectionPool:
    max_connections: int | None = None
    connect_timeout: float | None = None
    http1_max_pending_requests: int | None = None
    http2_max_requests: int | None = None
    max_requests_per_connection: int | None = None
    idle_timeout: float | None = None


@dataclass(frozen=True)
class OutlierDetection:
    consecutive_5xx_errors: int | None = None
    consecutive_gateway_errors: int | None = None
    interval: float | None = None
    base_ejection_time: float | None = None
    max_ejection_percent: int | None = None


@dataclass(frozen=True)
class PortTrafficPolicy:
    port: int
    load_balancer: LoadBalancer | None = None
    connection_pool: ConnectionPool | None = None
    outlier_detection: OutlierDetection | None = None


@dataclass(frozen=True)
class TrafficPolicy:
    load_balancer: LoadBalancer | None = None
    connection_pool: ConnectionPool | None = None
    outlier_detection: OutlierDetection | None = None
    port_level: tuple[PortTrafficPolicy, ...] = ()

    def for_port(self, port: int | None) -> PortTrafficPolicy | None:
        for p in self.port_level:
            if p.port == port:
                return p
        return None


@dataclass(frozen=True)
class Subset:
    name: str
    labels: Labels = field(default_factory=Labels)
    traffic_policy: TrafficPolicy | None = None


@dataclass(frozen=True)
class DestinationRule:
    namespace: str
    name: str
    host: str
    """FQDN."""
    subsets: tuple[Subset, ...] = ()
    traffic_policy: TrafficPolicy | None = None
    source: str = ""

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    def subset(self, name: str) -> Subset | None:
        for s in self.subsets:
            if s.name == name:
                return s
        return None
