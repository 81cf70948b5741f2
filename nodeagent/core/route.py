"""HTTP route selection and traffic policy lookup: Istio's VirtualService and
DestinationRule semantics as small pure functions over a ``MeshSnapshot``.

Owns: matching one request against ``http[]`` rules (first rule wins; a rule's matches
are OR-ed, the fields of one match AND-ed), weighted destination picks, subset label
filters and the rule → subset → port traffic-policy merge. No I/O, no asyncio, no
randomness of its own (callers pass ``rnd``).

Also owns the route index (``_RouteIndex``) that keeps ``select_route`` cheap with many
rules: with 1,000 rules about 6 µs a request instead of 1-2 ms on the 2-CPU dev box, whether
the first, the last or no rule matches (``bench/route_bench.py``). It is built once per
VirtualService object, on first use, and kept in a side table keyed by the object's
*identity* and held through a weak reference: a VirtualService is frozen, so its index never
goes stale, and the entry goes when the object does (a config change brings a new snapshot
with new objects, hence new indexes). Not keyed by value: hashing a 1,000-rule
VirtualService costs milliseconds. The index holds no reference to the VirtualService.

The index puts each ``match[]`` entry in one bucket, keyed by the first of these conditions
it has (each is necessary for the match to be true): uri exact; a header's exact value; uri
prefix, or the literal text a regex uri starts with; method exact; a header's presence (any
header match needs it). Uris with ``ignoreUriCase`` go to lowercased tables (a regex ignores
that flag and sees the path as sent). Entries with none of these go to a "scan" bucket every
request evaluates. A rule without matches matches every request, so nothing after it is
indexed: it is the answer when no earlier match is true. A request looks up the buckets it
can match, evaluates their entries with ``match_request``, and keeps the lowest true
``(rule, match)`` position: exactly what the linear walk, ``select_route_linear`` (kept as
the reference), returns.
"""

from __future__ import annotations

import enum
import functools
import string
import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Final, Generic, Self, TypeVar, overload
from urllib.parse import parse_qsl

from nodeagent.model.objects import Labels
from nodeagent.model.snapshot import MeshSnapshot
from nodeagent.model.traffic import (
    Destination,
    DestinationRule,
    HTTPMatchRequest,
    HTTPRoute,
    MatchKind,
    Regex,
    RouteDestination,
    StringMatch,
    TCPRoute,
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
    "select_route_linear",
    "select_tcp_route",
    "subset_filter",
    "traffic_policy_for",
    "virtual_service_for",
]


_O = TypeVar("_O")
_T = TypeVar("_T")


class _cached(Generic[_O, _T]):
    """``functools.cached_property`` without the lock Python 3.11 takes on every first read
    (~1.4 µs here; 3.12 dropped it): the first read computes and puts the value in the
    instance's ``__dict__``, where later reads find it before this descriptor. Two threads
    racing on one instance compute twice, harmlessly.
    """

    def __init__(self, func: Callable[[_O], _T]) -> None:
        self.func = func
        self.name = func.__name__
        self.__doc__ = func.__doc__

    def __set_name__(self, owner: type[_O], name: str) -> None:
        self.name = name

    @overload
    def __get__(self, obj: None, owner: type[_O] | None = None) -> Self: ...
    @overload
    def __get__(self, obj: _O, owner: type[_O] | None = None) -> _T: ...
    def __get__(self, obj: _O | None, owner: type[_O] | None = None) -> Self | _T:
        if obj is None:
            return self
        value = self.func(obj)
        obj.__dict__[self.name] = value
        return value


def _no_headers() -> Mapping[str, str]:
    return MappingProxyType({})


@dataclass(eq=False)
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

    @_cached
    def uri_path(self) -> str:
        """The path without query or fragment (what Istio's ``uri`` matches)."""
        return self.path.split("?", 1)[0].split("#", 1)[0]

    @_cached
    def uri_path_lower(self) -> str:
        return self.uri_path.lower()

    @_cached
    def query(self) -> str:
        rest = self.path.split("?", 1)
        return rest[1].split("#", 1)[0] if len(rest) == 2 else ""

    @_cached
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


@dataclass(slots=True)  # not frozen (a frozen __init__ is slow): made per request
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
            return _default_routes(self.service_fqdn)
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
        return m.regex is not None and m.regex.fullmatch(value)
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
    if vs is not None or not snapshot.virtual_service_wildcards:
        return vs
    labels = host.split(".")
    for i in range(1, len(labels)):
        vs = index.get("*." + ".".join(labels[i:]))
        if vs is not None:
            return vs
    return index.get("*")


def select_route(snapshot: MeshSnapshot, service_fqdn: str, request: RequestInfo) -> RouteDecision:
    """The first ``http[]`` rule of the host's VirtualService that matches ``request``.

    Same result as ``select_route_linear``; looks only at the rules the route index says
    can match (the index is built on the VirtualService's first request).
    """
    vs = virtual_service_for(snapshot, service_fqdn)
    if vs is None or not vs.http:
        return RouteDecision(RouteOutcome.DEFAULT, service_fqdn)
    route_index = _route_index(vs)
    memo = route_index.memo
    if memo is None:
        hit = route_index.first_match(request)
    else:
        key = (request.path, request.method, request.authority, request.port)
        hit = memo.get(key, _UNKNOWN)
        if hit is _UNKNOWN:
            if len(memo) >= INDEX_MEMO_MAX:
                memo.clear()
            hit = memo[key] = route_index.first_match(request)
    if hit is None:
        return RouteDecision(RouteOutcome.NO_ROUTE, service_fqdn, vs)
    index, mi, m = hit
    rule = vs.http[index]
    return RouteDecision(
        RouteOutcome.ROUTE,
        service_fqdn,
        vs,
        rule,
        index,
        rule.name,
        mi,
        m.name if m is not None else "",
    )


def decided_by_request_line(d: RouteDecision) -> bool:
    """Whether every request with the same target, method, authority and port gets the
    same decision as the one ``d`` was made for (no match of the VirtualService looks at
    headers or the source)."""
    vs = d.virtual_service
    return vs is None or _route_index(vs).memo is not None


MEMO_MAX = 4096
"""Entries of a memo of route decisions shared by all services (per snapshot, or of
default routes), cleared when full: a bound on memory whatever paths clients send."""

INDEX_MEMO_MAX = 512
"""Request lines remembered per VirtualService, cleared when full (each VirtualService
that sees traffic has a memo of its own: a few hundred KiB at most for a hundred)."""

_UNKNOWN: Final = (-1, None, None)
"""Not in the memo (None there means: no rule matches)."""


@functools.lru_cache(maxsize=MEMO_MAX)
def _default_routes(service_fqdn: str) -> tuple[RouteDestination, ...]:
    return (RouteDestination(Destination(service_fqdn), 100),)


def select_route_linear(
    snapshot: MeshSnapshot, service_fqdn: str, request: RequestInfo
) -> RouteDecision:
    """``select_route`` by walking every rule in order: the reference semantics."""
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


_Hit = tuple[int, int | None, HTTPMatchRequest | None]
"""(rule index, match index, match); the indexes are None for a rule without matches."""
_Entry = tuple[int, HTTPMatchRequest]
"""(position in linear order, the match): one candidate of a bucket."""
_Bucket = tuple[_Entry, ...]
"""Entries in ascending position."""

_REGEX_SPECIAL = frozenset(".^$*+?{}[]\\|()")
_REGEX_REPEAT = frozenset("*+?{")
_PUNCTUATION = frozenset(string.punctuation)


def _regex_literal_prefix(pattern: Regex) -> str:
    """Text every full match of ``pattern`` starts with ("" when unsure; never too long).

    Conservative on purpose: no prefix for a pattern with ``|`` anywhere; reads a leading
    ``^``, plain characters and backslash-escaped punctuation, and stops at the first other
    construct (a flag group such as ``(?i)`` too; dropping a character a quantifier
    applies to).
    """
    src = pattern.pattern
    if "|" in src:
        return ""
    out: list[str] = []
    i = 1 if src.startswith("^") else 0
    n = len(src)
    while i < n:
        c = src[i]
        if c == "\\" and i + 1 < n and src[i + 1] in _PUNCTUATION:
            out.append(src[i + 1])
            i += 2
        elif c in _REGEX_SPECIAL:
            break
        else:
            out.append(c)
            i += 1
    if out and i < n and src[i] in _REGEX_REPEAT:
        out.pop()
    return "".join(out)


def _freeze(table: dict[str, list[_Entry]]) -> dict[str, _Bucket]:
    return {k: tuple(v) for k, v in table.items()}


class _RouteIndex:
    """Candidate ``match[]`` entries of one VirtualService's ``http[]`` by what they need.

    Positions number the (rule, match) pairs in the order the linear walk tries them;
    ``hits[p]`` is what position ``p`` stands for. Each match is in exactly one bucket, keyed
    by a condition the request must meet for the match to be true (the first of: uri exact,
    header exact, uri prefix or a regex uri's literal prefix, method exact, header present);
    the rest go to ``scan``. So the lowest true position over the buckets a request looks
    up is the linear walk's answer.
    """

    __slots__ = (
        "exact",
        "exact_nocase",
        "fallback",
        "header_any",
        "header_exact",
        "hits",
        "memo",
        "method",
        "prefix",
        "prefix_lengths",
        "prefix_nocase",
        "prefix_nocase_lengths",
        "scan",
    )

    def __init__(self, http: Sequence[HTTPRoute]) -> None:
        exact: dict[str, list[_Entry]] = {}
        exact_nocase: dict[str, list[_Entry]] = {}
        prefix: dict[str, list[_Entry]] = {}
        prefix_nocase: dict[str, list[_Entry]] = {}
        header_exact: dict[str, dict[str, list[_Entry]]] = {}
        method: dict[str, list[_Entry]] = {}
        header_any: dict[str, list[_Entry]] = {}
        scan: list[_Entry] = []
        hits: list[_Hit] = []
        for index, rule in enumerate(http):
            if not rule.matches:
                # Matches every request: the answer when no earlier match is true, and
                # nothing after it can ever be chosen.
                hits.append((index, None, None))
                break
            for mi, m in enumerate(rule.matches):
                entry = (len(hits), m)
                hits.append((index, mi, m))
                uri, nocase = m.uri, m.ignore_uri_case
                uri_prefix = ""
                if uri is not None and uri.kind is MatchKind.PREFIX:
                    uri_prefix = uri.value.lower() if nocase else uri.value
                elif uri is not None and uri.kind is MatchKind.REGEX and uri.regex is not None:
                    # A regex ignores ignoreUriCase: it sees the path as sent.
                    uri_prefix, nocase = _regex_literal_prefix(uri.regex), False
                header = next((h for h in m.headers if h[1].kind is MatchKind.EXACT), None)
                if uri is not None and uri.kind is MatchKind.EXACT:
                    if nocase:
                        exact_nocase.setdefault(uri.value.lower(), []).append(entry)
                    else:
                        exact.setdefault(uri.value, []).append(entry)
                elif header is not None:
                    by_value = header_exact.setdefault(header[0], {})
                    by_value.setdefault(header[1].value, []).append(entry)
                elif uri_prefix:
                    table = prefix_nocase if nocase else prefix
                    table.setdefault(uri_prefix, []).append(entry)
                elif m.method is not None and m.method.kind is MatchKind.EXACT:
                    method.setdefault(m.method.value, []).append(entry)
                elif m.headers:
                    header_any.setdefault(m.headers[0][0], []).append(entry)
                else:
                    scan.append(entry)
        self.hits: tuple[_Hit, ...] = tuple(hits)
        self.memo: dict[tuple[str, str, str, int], _Hit | None] | None = (
            {} if all(_request_line_only(h[2]) for h in hits) else None
        )
        """``first_match`` answers by (target, method, authority, port) when no match
        looks at anything else (headers, the source): the same request line always picks
        the same rule. None: ask the index every request."""
        self.fallback: int = len(hits) - 1 if hits and hits[-1][2] is None else len(hits)
        """The position to beat: the rule without matches, or past the end (no route)."""
        self.exact: dict[str, _Bucket] = _freeze(exact)
        self.exact_nocase: dict[str, _Bucket] = _freeze(exact_nocase)
        self.prefix: dict[str, _Bucket] = _freeze(prefix)
        self.prefix_lengths: tuple[int, ...] = tuple(sorted({len(k) for k in prefix}))
        self.prefix_nocase: dict[str, _Bucket] = _freeze(prefix_nocase)
        self.prefix_nocase_lengths: tuple[int, ...] = tuple(sorted({len(k) for k in prefix_nocase}))
        self.header_exact: dict[str, dict[str, _Bucket]] = {
            name: _freeze(by_value) for name, by_value in header_exact.items()
        }
        self.method: dict[str, _Bucket] = _freeze(method)
        self.header_any: dict[str, _Bucket] = _freeze(header_any)
        self.scan: _Bucket = tuple(scan)

    def buckets(self, req: RequestInfo) -> list[_Bucket]:
        """Every bucket holding a match that could be true for ``req``."""
        out: list[_Bucket] = []
        if self.exact or self.prefix:
            path = req.uri_path
            if (b := self.exact.get(path)) is not None:
                out.append(b)
            if self.prefix:
                table, n = self.prefix, len(path)
                for length in self.prefix_lengths:
                    if length > n:
                        break
                    if (b := table.get(path[:length])) is not None:
                        out.append(b)
        if self.exact_nocase or self.prefix_nocase:
            lower = req.uri_path_lower
            if (b := self.exact_nocase.get(lower)) is not None:
                out.append(b)
            if self.prefix_nocase:
                table, n = self.prefix_nocase, len(lower)
                for length in self.prefix_nocase_lengths:
                    if length > n:
                        break
                    if (b := table.get(lower[:length])) is not None:
                        out.append(b)
        if self.header_exact or self.header_any:
            _with_header(self.header_exact, self.header_any, req.headers, out)
        if self.method and (b := self.method.get(req.method)) is not None:
            out.append(b)
        if self.scan:
            out.append(self.scan)
        return out

    def first_match(self, req: RequestInfo) -> _Hit | None:
        """The first true match in linear order; None: no rule matches."""
        best = self.fallback
        for bucket in self.buckets(req):
            for pos, m in bucket:
                if pos >= best:
                    break
                if match_request(m, req):
                    best = pos
                    break
        return self.hits[best] if best < len(self.hits) else None


def _request_line_only(m: HTTPMatchRequest | None) -> bool:
    """The match depends only on the request line (query parameters included), the
    authority and the port."""
    return m is None or (not m.headers and m.source_labels is None and m.source_namespace is None)


def _with_header(
    exact: Mapping[str, Mapping[str, _Bucket]],
    present: Mapping[str, _Bucket],
    headers: Mapping[str, str],
    out: list[_Bucket],
) -> None:
    """Append the buckets of the headers ``headers`` has (by value for ``exact``).

    Walks whichever side is shorter: the index's header names or the request's headers.
    """
    if len(exact) + len(present) <= len(headers):
        for name, by_value in exact.items():
            value = headers.get(name)
            if value is not None and (b := by_value.get(value)) is not None:
                out.append(b)
        for name, b in present.items():
            if headers.get(name) is not None:
                out.append(b)
        return
    for name, value in headers.items():
        values = exact.get(name)
        if values is not None and (b := values.get(value)) is not None:
            out.append(b)
        if (b := present.get(name)) is not None:
            out.append(b)


_INDEXES: dict[int, tuple[weakref.ref[VirtualService], _RouteIndex]] = {}
"""id(VirtualService) → (a weak reference to it, its index); an entry goes with its object."""


def _route_index(vs: VirtualService) -> _RouteIndex:
    """The index of ``vs.http``, built on first use and kept while ``vs`` lives."""
    key = id(vs)
    cached = _INDEXES.get(key)
    if cached is not None and cached[0]() is vs:
        return cached[1]
    index = _RouteIndex(vs.http)

    def forget(ref: weakref.ref[VirtualService]) -> None:
        entry = _INDEXES.get(key)
        if entry is not None and entry[0] is ref:
            _INDEXES.pop(key, None)

    _INDEXES[key] = (weakref.ref(vs, forget), index)
    return index


def prepare(snapshot: MeshSnapshot) -> None:
    """Build the route index of every VirtualService of ``snapshot`` now (3-7 ms for 1,000
    rules), so that the first request after a config change does not pay for it."""
    for vs in snapshot.virtual_services:
        if vs.http:
            _route_index(vs)


def select_tcp_route(
    snapshot: MeshSnapshot, service_fqdn: str, port: int, source_labels: Labels
) -> TCPRoute | None:
    """The first ``tcp[]`` rule of the host's VirtualService that matches a connection to
    ``port`` from a pod with ``source_labels`` (None: no rule, use the service itself)."""
    vs = virtual_service_for(snapshot, service_fqdn)
    if vs is None:
        return None
    for rule in vs.tcp:
        if not rule.matches:
            return rule
        for m in rule.matches:
            if m.port is not None and m.port != port:
                continue
            if m.source_labels is not None and not source_labels.matches(m.source_labels):
                continue
            return rule
    return None


def pick_weighted(routes: Sequence[RouteDestination], rnd: float) -> RouteDestination | None:
    """Pick one destination by weight; ``rnd`` in [0, 1) makes it deterministic.

    Destination *i* is chosen when ``rnd * total`` falls in its ``[start, start + weight)``
    slot, so weight 0 is never chosen. None when there is nothing to pick.
    """
    if len(routes) == 1:  # the common case: one destination, whatever its weight
        return routes[0]
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
