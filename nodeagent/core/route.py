"""HTTP route selection and traffic policy lookup: Istio's VirtualService and
DestinationRule semantics as small pure functions over a ``MeshSnapshot``.

Owns: matching one request against ``http[]`` rules (first rule wins; a rule's matches
are OR-ed, the fields of one match AND-ed), weighted destination picks, subset label
filters and the rule → subset → port traffic-policy merge. No I/O, no asyncio, no
randomness of its own (callers pass ``rnd``).
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from types import MappingProxyType
from urllib.parse import parse_qsl

from nodeagent.model.objects import Labels
from nodeagent.model.snapshot import MeshSnapshot
from nodeagent.model.traffic import (
    Destination,
    DestinationRule,
    HTTPMatchRequest,
    HTTPRoute,
    MatchKind,
    RouteDestination,
    StringMatch,
    TrafficPolicy,
    VirtualService,
)

__all__ = [
    "RequestInfo",
    "RouteDecision",
    "RouteOutcome",
    "match_request",
    "match_string",
    "pick_weighted",
    "select_route",
    "subset_filter",
    "traffic_policy_for",
    "virtual_service_for",
]


def _no_headers() -> Mapping[str, str]:
    return MappingProxyType({})


@dataclass(frozen=True)
class RequestInfo:
    """What routing may look at in one HTTP request."""

    method: str
    authority: str
    path: str
    """The request target as sent: path plus ``?query``."""
    headers: Mapping[str, str] = field(default_factory=_no_headers)
    """Lowercase names (a repeated header joined with ``,`` by the caller)."""
    port: int = 80
    """The service port the request was sent to."""
    source_labels: Labels = field(default_factory=Labels)
    source_namespace: str = ""

    @cached_property
    def uri_path(self) -> str:
        """The path without query or fragment (what Istio's ``uri`` matches)."""
        return self.path.split("?", 1)[0].split("#", 1)[0]

    @cached_property
    def uri_path_lower(self) -> str:
        return self.uri_path.lower()

    @cached_property
    def query(self) -> str:
        rest = self.path.split("?", 1)
        return rest[1].split("#", 1)[0] if len(rest) == 2 else ""

    @cached_property
    def query_params(self) -> Mapping[str, str]:
        """First value of each query parameter (computed once per request)."""
        out: dict[str, str] = {}
        for k, v in parse_qsl(self.query, keep_blank_values=True):
            out.setdefault(k, v)
        return MappingProxyType(out)


class RouteOutcome(enum.Enum):
    ROUTE = "route"
    """A rule matched: use ``RouteDecision.rule``."""
    DEFAULT = "default"
    """No VirtualService (with http rules) applies: send to the service itself."""
    NO_ROUTE = "no_route"
    """A VirtualService applies but no rule matched: answer 404 (Envoy's ``NR``)."""


@dataclass(frozen=True)
class RouteDecision:
    outcome: RouteOutcome
    service_fqdn: str
    virtual_service: VirtualService | None = None
    rule: HTTPRoute | None = None
    rule_index: int | None = None
    rule_name: str = ""
    match_index: int | None = None
    """Which ``match[]`` entry matched; None when the rule has no matches (matches all)."""
    match_name: str = ""

    @property
    def routes(self) -> tuple[RouteDestination, ...]:
        """Weighted destinations: the rule's, or the service itself by default."""
        if self.outcome is RouteOutcome.DEFAULT:
            return (RouteDestination(Destination(self.service_fqdn), 100),)
        if self.rule is None:
            return ()
        return self.rule.routes


def match_string(m: StringMatch, value: str | None, *, ignore_case: bool = False) -> bool:
    """One StringMatch against a value (None = absent). Regexes match the whole value."""
    if value is None:
        return False
    if m.kind is MatchKind.PRESENT:
        return True
    if m.kind is MatchKind.REGEX:
        return m.regex is not None and m.regex.fullmatch(value) is not None
    expected = m.value
    if ignore_case:
        value, expected = value.lower(), expected.lower()
    if m.kind is MatchKind.EXACT:
        return value == expected
    return value.startswith(expected)


def match_request(m: HTTPMatchRequest, req: RequestInfo) -> bool:
    """True when every field given in ``m`` matches ``req``."""
    if m.port is not None and m.port != req.port:
        return False
    if m.source_namespace is not None and m.source_namespace != req.source_namespace:
        return False
    if m.source_labels is not None and not req.source_labels.matches(m.source_labels):
        return False
    if m.method is not None and not match_string(m.method, req.method):
        return False
    if m.uri is not None and not match_string(m.uri, req.uri_path, ignore_case=m.ignore_uri_case):
        return False
    if m.authority is not None and not match_string(m.authority, req.authority):
        return False
    for name, hm in m.headers:
        if not match_string(hm, req.headers.get(name)):
            return False
    if m.query_params:
        params = req.query_params
        for name, qm in m.query_params:
            if not match_string(qm, params.get(name)):
                return False
    return True


def virtual_service_for(snapshot: MeshSnapshot, host: str) -> VirtualService | None:
    """The VirtualService for a host: an exact host first, then the longest wildcard."""
    index = snapshot.virtual_service_by_host
    vs = index.get(host)
    if vs is not None:
        return vs
    labels = host.split(".")
    for i in range(1, len(labels)):
        vs = index.get("*." + ".".join(labels[i:]))
        if vs is not None:
            return vs
    return index.get("*")


def select_route(snapshot: MeshSnapshot, service_fqdn: str, request: RequestInfo) -> RouteDecision:
    """The first ``http[]`` rule of the host's VirtualService that matches ``request``."""
    vs = virtual_service_for(snapshot, service_fqdn)
    if vs is None or not vs.http:
        return RouteDecision(RouteOutcome.DEFAULT, service_fqdn)
    for index, rule in enumerate(vs.http):
        if not rule.matches:
            return RouteDecision(
                RouteOutcome.ROUTE, service_fqdn, vs, rule, index, rule.name, None, ""
            )
        for mi, m in enumerate(rule.matches):
            if match_request(m, request):
                return RouteDecision(
                    RouteOutcome.ROUTE, service_fqdn, vs, rule, index, rule.name, mi, m.name
                )
    return RouteDecision(RouteOutcome.NO_ROUTE, service_fqdn, vs)


def pick_weighted(routes: Sequence[RouteDestination], rnd: float) -> RouteDestination | None:
    """Pick one destination by weight; ``rnd`` in [0, 1) makes it deterministic.

    Destination *i* is chosen when ``rnd * total`` falls in its ``[start, start + weight)``
    slot, so weight 0 is never chosen. None when there is nothing to pick.
    """
    total = sum(max(r.weight, 0) for r in routes)
    if total <= 0:
        return routes[0] if routes else None
    point = min(max(rnd, 0.0), 1.0) * total
    acc = 0
    for r in routes:
        acc += max(r.weight, 0)
        if point < acc:
            return r
    return next(r for r in reversed(routes) if r.weight > 0)


def _rule(snapshot: MeshSnapshot, host: str) -> DestinationRule | None:
    return snapshot.destination_rule_by_host.get(host)


def subset_filter(snapshot: MeshSnapshot, host: str, subset: str | None) -> Labels:
    """The labels an endpoint of ``host`` must carry to be in ``subset`` (empty: all)."""
    if subset is None:
        return Labels()
    dr = _rule(snapshot, host)
    s = dr.subset(subset) if dr is not None else None
    if s is None:
        raise KeyError(f"subset {subset!r} of {host} is not defined by a DestinationRule")
    return s.labels


def _port_override(policy: TrafficPolicy, port: int | None) -> TrafficPolicy:
    """Port-level settings replace the policy's own (they do not inherit, as in Istio)."""
    p = policy.for_port(port)
    if p is None:
        return TrafficPolicy(policy.load_balancer, policy.connection_pool, policy.outlier_detection)
    return TrafficPolicy(p.load_balancer, p.connection_pool, p.outlier_detection)


def traffic_policy_for(
    snapshot: MeshSnapshot, host: str, subset: str | None, port: int | None
) -> TrafficPolicy:
    """The effective policy for traffic to ``host`` (``subset``, service ``port``).

    Istio's order: the rule's policy, replaced by the rule's port-level settings for that
    port; then each of loadBalancer / connectionPool / outlierDetection the subset sets
    replaces the merged one; then the subset's port-level settings for that port replace
    all three. The result has no port-level settings left.
    """
    dr = _rule(snapshot, host)
    if dr is None:
        return TrafficPolicy()
    merged = _port_override(dr.traffic_policy or TrafficPolicy(), port)
    s = dr.subset(subset) if subset is not None else None
    if s is None or s.traffic_policy is None:
        return merged
    sp = s.traffic_policy
    merged = TrafficPolicy(
        load_balancer=sp.load_balancer or merged.load_balancer,
        connection_pool=sp.connection_pool or merged.connection_pool,
        outlier_detection=sp.outlier_detection or merged.outlier_detection,
    )
    p = sp.for_port(port)
    if p is not None:
        merged = TrafficPolicy(p.load_balancer, p.connection_pool, p.outlier_detection)
    return merged
