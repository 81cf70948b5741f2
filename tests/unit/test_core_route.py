"""Route selection over VirtualServices parsed from YAML: match semantics, first rule
wins, weighted splits, and the DestinationRule policy merge."""

from __future__ import annotations

import gc
import re
import time
from collections import Counter
from pathlib import Path
from typing import TypeVar

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from meshyaml import MeshFiles, pod_yaml, service_yaml

from nodeagent.core.regex import compile_regex
from nodeagent.core.route import (
    _INDEXES,
    INDEX_MEMO_MAX,
    RequestInfo,
    RouteOutcome,
    _regex_literal_prefix,
    _route_index,
    pick_weighted,
    select_route,
    select_route_linear,
    subset_filter,
    traffic_policy_for,
    virtual_service_for,
)
from nodeagent.model.objects import Labels
from nodeagent.model.snapshot import MeshSnapshot
from nodeagent.model.traffic import (
    Destination,
    HTTPMatchRequest,
    HTTPRoute,
    MatchKind,
    RouteDestination,
    SimpleLB,
    StringMatch,
    VirtualService,
)

T = TypeVar("T")
HOST = "reviews.default.svc.cluster.local"

MESH = (
    service_yaml("reviews", "[{name: http, port: 9080}, {name: admin, port: 9090}]", app="reviews")
    + pod_yaml("reviews-v1", app="reviews", version="v1")
    + pod_yaml("reviews-v2", app="reviews", version="v2")
    + service_yaml("ratings", "[{name: http, port: 9080}]", app="reviews")
    + """---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: reviews, namespace: default}
spec:
  host: reviews
  trafficPolicy:
    loadBalancer: {simple: LEAST_REQUEST}
    connectionPool: {tcp: {maxConnections: 100}}
    outlierDetection: {consecutive5xxErrors: 7}
    portLevelSettings:
    - port: {number: 9090}
      loadBalancer: {simple: RANDOM}
  subsets:
  - name: v1
    labels: {version: v1}
    trafficPolicy:
      loadBalancer: {simple: ROUND_ROBIN}
      portLevelSettings:
      - port: {number: 9080}
        connectionPool: {tcp: {maxConnections: 5}}
  - name: v2
    labels: {version: v2}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: reviews, namespace: default}
spec:
  hosts: [reviews]
  http:
  - name: exact-uri
    match: [{uri: {exact: /exact}}]
    route: [{destination: {host: reviews, subset: v1}}]
  - name: prefix-uri-nocase
    match: [{uri: {prefix: /Api/}, ignoreUriCase: true, name: api}]
    route: [{destination: {host: reviews, subset: v1}}]
  - name: regex-uri
    match: [{uri: {regex: "/items/[0-9]+"}}]
    route: [{destination: {host: reviews, subset: v1}}]
  - name: header-or-query
    match:
    - {name: by-header, headers: {end-user: {exact: jason}}}
    - {name: by-query, queryParams: {user: {regex: "ja.*"}}}
    route: [{destination: {host: reviews, subset: v2}}]
  - name: header-present
    match: [{headers: {x-debug: {}}}]
    route: [{destination: {host: reviews, subset: v2}}]
  - name: method-and-port
    match: [{method: {exact: DELETE}, port: 9090}]
    route: [{destination: {host: reviews, subset: v2}}]
  - name: source
    match: [{sourceLabels: {app: productpage}, sourceNamespace: front}]
    route: [{destination: {host: reviews, subset: v2}}]
  - name: authority
    match: [{authority: {prefix: "reviews.internal"}}]
    route: [{destination: {host: reviews, subset: v2}}]
  - name: first-of-two
    match: [{uri: {prefix: /both}}]
    route: [{destination: {host: reviews, subset: v1}}]
  - name: second-of-two
    match: [{uri: {prefix: /both}}]
    route: [{destination: {host: reviews, subset: v2}}]
  - name: canary
    match: [{uri: {prefix: /canary}}]
    route:
    - {destination: {host: reviews, subset: v1}, weight: 90}
    - {destination: {host: reviews, subset: v2}, weight: 10}
"""
)


@pytest.fixture(scope="module")
def snap(tmp_path_factory: pytest.TempPathFactory) -> MeshSnapshot:
    return MeshFiles(tmp_path_factory.mktemp("route")).load(MESH)


def req(
    path: str = "/",
    *,
    method: str = "GET",
    headers: dict[str, str] | None = None,
    port: int = 9080,
    authority: str = "reviews:9080",
    labels: dict[str, str] | None = None,
    ns: str = "default",
) -> RequestInfo:
    return RequestInfo(
        method=method,
        authority=authority,
        path=path,
        headers=headers or {},
        port=port,
        source_labels=Labels.of(labels),
        source_namespace=ns,
    )


@pytest.mark.parametrize(
    ("request_", "rule", "match"),
    [
        (req("/exact"), "exact-uri", 0),
        (req("/exact?x=1"), "exact-uri", 0),  # the query is not part of the uri
        (req("/API/list"), "prefix-uri-nocase", 0),
        (req("/api/list"), "prefix-uri-nocase", 0),
        (req("/items/42"), "regex-uri", 0),
        (req("/p", headers={"end-user": "jason"}), "header-or-query", 0),
        (req("/p?user=jane&x=1"), "header-or-query", 1),
        (req("/p", headers={"x-debug": ""}), "header-present", 0),
        (req("/p", method="DELETE", port=9090), "method-and-port", 0),
        (req("/p", labels={"app": "productpage", "v": "1"}, ns="front"), "source", 0),
        (req("/p", authority="reviews.internal:80"), "authority", 0),
        (req("/both"), "first-of-two", 0),
    ],
)
def test_first_matching_rule_wins(
    snap: MeshSnapshot, request_: RequestInfo, rule: str, match: int
) -> None:
    d = select_route(snap, HOST, request_)
    assert d.outcome is RouteOutcome.ROUTE
    assert (d.rule_name, d.match_index) == (rule, match)
    assert d.virtual_service is not None and d.virtual_service.key == "default/reviews"
    assert d.rule_index is not None and d.virtual_service.http[d.rule_index].name == rule


@pytest.mark.parametrize(
    "request_",
    [
        req("/exact/more"),  # exact is exact
        req("/Exact"),  # case matters without ignoreUriCase
        req("/items/42x"),  # a regex matches the whole path
        req("/items/"),
        req("/p", headers={"end-user": "jasonx"}),
        req("/p?user=bob"),
        req("/p", method="DELETE"),  # method alone; the port must also match (AND)
        req("/p", method="delete", port=9090),  # methods are case-sensitive
        req("/p", labels={"app": "productpage"}, ns="default"),
        req("/p", labels={"app": "other"}, ns="front"),
        req("/p", authority="reviews:9080"),
    ],
)
def test_no_rule_matches(snap: MeshSnapshot, request_: RequestInfo) -> None:
    d = select_route(snap, HOST, request_)
    assert d.outcome is RouteOutcome.NO_ROUTE
    assert d.routes == ()


def test_match_name_and_rule_without_matches(snap: MeshSnapshot) -> None:
    assert select_route(snap, HOST, req("/api/x")).match_name == "api"
    assert select_route(snap, HOST, req("/p?user=jack")).match_name == "by-query"


def test_without_virtual_service_the_service_is_the_default_route(snap: MeshSnapshot) -> None:
    host = "ratings.default.svc.cluster.local"
    d = select_route(snap, host, req("/anything"))
    assert d.outcome is RouteOutcome.DEFAULT
    assert d.routes == (RouteDestination(Destination(host), 100),)


def test_wildcard_hosts_exact_first_then_longest_suffix() -> None:
    def v(name: str, host: str) -> VirtualService:
        route = HTTPRoute(routes=(RouteDestination(Destination(name)),))
        return VirtualService("default", name, (host,), http=(route,))

    snap = MeshSnapshot.build(
        version=1,
        pods=(),
        services=(),
        virtual_services=(
            v("exact", "a.example.com"),
            v("narrow", "*.b.example.com"),
            v("wide", "*.example.com"),
            v("all", "*"),
        ),
    )
    for host, name in [
        ("a.example.com", "exact"),
        ("x.b.example.com", "narrow"),
        ("x.example.com", "wide"),
        ("example.org", "all"),
    ]:
        found = virtual_service_for(snap, host)
        assert found is not None and found.name == name
        assert select_route(snap, host, req()).rule_index == 0


def test_weighted_split_proportions(snap: MeshSnapshot) -> None:
    routes = select_route(snap, HOST, req("/canary")).routes
    picks = Counter(
        p.destination.subset
        for i in range(1000)
        if (p := pick_weighted(routes, i / 1000)) is not None
    )
    assert picks == {"v1": 900, "v2": 100}


def test_pick_weighted_edges() -> None:
    a = RouteDestination(Destination("a"), 0)
    b = RouteDestination(Destination("b"), 100)
    assert pick_weighted([], 0.5) is None
    assert {pick_weighted([a, b], r) for r in (0.0, 0.5, 0.999999, 1.0)} == {b}
    assert pick_weighted([b], 0.0) is b


def test_subset_filter(snap: MeshSnapshot) -> None:
    assert subset_filter(snap, HOST, "v2") == Labels.of({"version": "v2"})
    assert subset_filter(snap, HOST, None) == Labels()
    with pytest.raises(KeyError):
        subset_filter(snap, HOST, "v9")


@pytest.mark.parametrize(
    ("subset", "port", "lb", "max_conns", "consecutive_5xx"),
    [
        (None, 9080, SimpleLB.LEAST_REQUEST, 100, 7),  # rule level
        (None, 9090, SimpleLB.RANDOM, None, None),  # rule port level replaces all three
        ("v2", 9080, SimpleLB.LEAST_REQUEST, 100, 7),  # subset without policy inherits
        ("v1", 9090, SimpleLB.ROUND_ROBIN, None, None),  # subset field over rule port level
        ("v1", 7000, SimpleLB.ROUND_ROBIN, 100, 7),  # subset field over rule level
        ("v1", 9080, None, 5, None),  # subset port level replaces all three
    ],
)
def test_policy_merge_precedence(
    snap: MeshSnapshot,
    subset: str | None,
    port: int,
    lb: SimpleLB | None,
    max_conns: int | None,
    consecutive_5xx: int | None,
) -> None:
    p = traffic_policy_for(snap, HOST, subset, port)
    assert (p.load_balancer.simple if p.load_balancer else None) is lb
    assert (p.connection_pool.max_connections if p.connection_pool else None) == max_conns
    got_5xx = p.outlier_detection.consecutive_5xx_errors if p.outlier_detection else None
    assert got_5xx == consecutive_5xx
    assert p.port_level == ()


def test_no_destination_rule_means_no_policy(snap: MeshSnapshot) -> None:
    p = traffic_policy_for(snap, "ratings.default.svc.cluster.local", None, 9080)
    assert p.load_balancer is None and p.connection_pool is None


text = st.text(max_size=40)


@settings(max_examples=300, deadline=None)
@given(
    method=text,
    authority=text,
    path=text,
    headers=st.dictionaries(text, text, max_size=4),
    port=st.integers(min_value=-1, max_value=70000),
    labels=st.dictionaries(text, text, max_size=3),
    ns=text,
    host=st.sampled_from([HOST, "ratings.default.svc.cluster.local", "", "*", "a.b"]),
    rnd=st.floats(allow_nan=True, allow_infinity=True),
)
def test_select_route_never_raises(
    snap: MeshSnapshot,
    method: str,
    authority: str,
    path: str,
    headers: dict[str, str],
    port: int,
    labels: dict[str, str],
    ns: str,
    host: str,
    rnd: float,
) -> None:
    r = RequestInfo(method, authority, path, headers, port, Labels.of(labels), ns)
    d = select_route(snap, host, r)
    assert d.outcome in RouteOutcome
    if d.routes:
        assert pick_weighted(d.routes, rnd) in d.routes


# --- the route index: same answers as the linear walk ---------------------------------

REGEXES = (
    "/a.*",
    "/a/b",
    "^/a.*",
    r"/a\.b.*",
    "/ab*",
    "/a?b",
    "/a{2}.*",
    "/a|/b.*",
    "(?i)/a.*",
    ".*",
    "/[ab]+",
    "/İ.*",
    "/(a|b)/.*",
    "/a/b/c+",
    "/A.*",
    "/K/.*",
)
"""Regex uris for the generated rules: literal prefixes of every shape the index reads."""


@settings(max_examples=300, deadline=None)
@given(pattern=st.sampled_from(REGEXES), data=st.data())
def test_regex_literal_prefix_starts_every_full_match(pattern: str, data: st.DataObject) -> None:
    compiled = compile_regex(pattern)
    value = data.draw(st.from_regex(re.compile(pattern), fullmatch=True))
    assert compiled.fullmatch(value)
    assert value.startswith(_regex_literal_prefix(compiled))


@pytest.mark.parametrize(
    ("pattern", "prefix"),
    [
        ("/api/v1/[0-9]+", "/api/v1/"),
        ("^/api/.*", "/api/"),
        (r"/v1\.0/x", "/v1.0/x"),
        ("/items?", "/item"),
        ("/a{2}", "/"),
        ("/a|/b", ""),
        ("/api/(x|y)", ""),
        ("(?i)/api", ""),
        ("/a(?i)pi", "/a"),
        (r"\Q/api\E", ""),
        (r"/\d+", "/"),
        (".*", ""),
    ],
)
def test_regex_literal_prefix(pattern: str, prefix: str) -> None:
    assert _regex_literal_prefix(compile_regex(pattern)) == prefix


SEGMENTS = ("a", "A", "b", "ab", "a.b", "İ", "i̇", "K", "k", "ß", "SS")


def _uri_text(parts: list[str]) -> str:
    return "/" + "/".join(parts)


uri_text = st.lists(st.sampled_from(SEGMENTS), max_size=2).map(_uri_text)
small = st.sampled_from(("", "1", "2", "12"))


def _regex(pattern: str) -> StringMatch:
    return StringMatch(MatchKind.REGEX, pattern, compile_regex(pattern))


def _string_match(values: st.SearchStrategy[str]) -> st.SearchStrategy[StringMatch]:
    return st.one_of(
        values.map(lambda v: StringMatch(MatchKind.EXACT, v)),
        values.map(lambda v: StringMatch(MatchKind.PREFIX, v)),
        values.map(lambda v: _regex(re.escape(v) + ".*")),
    )


uri_match = st.integers(0, 9).flatmap(
    lambda k: (
        st.none()
        if k == 0
        else st.sampled_from(("", "/")).map(lambda v: StringMatch(MatchKind.PREFIX, v))
        if k == 1
        else uri_text.map(lambda v: StringMatch(MatchKind.EXACT, v))
        if k < 5
        else uri_text.filter(lambda v: v != "/").map(lambda v: StringMatch(MatchKind.PREFIX, v))
        if k < 8
        else st.sampled_from(REGEXES).map(_regex)
    )
)
"""Mostly exact, prefix and regex uris; now and then none, or a prefix every path has."""
method_match = st.one_of(
    st.none(),
    st.sampled_from(("GET", "POST", "get")).map(lambda v: StringMatch(MatchKind.EXACT, v)),
    st.just(StringMatch(MatchKind.PREFIX, "G")),
    st.just(_regex("P.*")),
)
header_match = st.tuples(
    st.sampled_from(("x-a", "x-b")),
    st.one_of(_string_match(small), st.just(StringMatch(MatchKind.PRESENT))),
)


def _rarely(strategy: st.SearchStrategy[T], otherwise: T) -> st.SearchStrategy[T]:
    """``strategy`` one time in four, else ``otherwise`` (so that many matches can be true)."""
    return st.integers(0, 3).flatmap(lambda k: strategy if k == 0 else st.just(otherwise))


match_request_ = st.builds(
    HTTPMatchRequest,
    name=st.sampled_from(("", "m")),
    uri=uri_match,
    method=_rarely(method_match, None),
    headers=_rarely(st.lists(header_match, min_size=1, max_size=2).map(tuple), ()),
    query_params=_rarely(
        st.lists(st.tuples(st.just("q"), _string_match(small)), max_size=1).map(tuple), ()
    ),
    port=_rarely(st.sampled_from((80, 8080)), None),
    ignore_uri_case=st.booleans(),
)
rule_matches = st.integers(0, 9).flatmap(
    lambda k: st.just(()) if k == 0 else st.lists(match_request_, min_size=1, max_size=3).map(tuple)
)
rules = st.lists(
    st.builds(HTTPRoute, name=st.sampled_from(("", "r")), matches=rule_matches),
    min_size=1,
    max_size=25,
)
requests = st.builds(
    RequestInfo,
    method=st.sampled_from(("GET", "POST", "get", "PUT")),
    authority=st.just("h"),
    path=st.tuples(uri_text, st.sampled_from(("", "?q=1", "?q=12", "#x"))).map("".join),
    headers=st.dictionaries(st.sampled_from(("x-a", "x-b", "x-c")), small, max_size=3),
    port=st.sampled_from((80, 8080)),
)


@settings(max_examples=300, deadline=None)
@given(http=rules, reqs=st.lists(requests, min_size=1, max_size=12))
def test_indexed_selection_is_the_linear_one(
    http: list[HTTPRoute], reqs: list[RequestInfo]
) -> None:
    vs = VirtualService("default", "gen", ("gen.example.com",), http=tuple(http))
    snap = MeshSnapshot.build(version=1, pods=(), services=(), virtual_services=(vs,))
    # twice: the second time answers may come from the memo of request lines
    for r in [*reqs, *reqs]:
        assert select_route(snap, "gen.example.com", r) == select_route_linear(
            snap, "gen.example.com", r
        )


def test_request_lines_are_remembered_only_when_nothing_else_can_decide() -> None:
    by_path = HTTPRoute(
        name="p", matches=(HTTPMatchRequest(uri=StringMatch(MatchKind.PREFIX, "/a")),)
    )
    by_query = HTTPRoute(
        name="q",
        matches=(HTTPMatchRequest(query_params=(("v", StringMatch(MatchKind.EXACT, "2")),)),),
    )
    by_header = HTTPRoute(
        name="h",
        matches=(HTTPMatchRequest(headers=(("x-user", StringMatch(MatchKind.EXACT, "jason")),)),),
    )
    line_only = VirtualService("default", "l", ("l.example.com",), http=(by_path, by_query))
    with_header = VirtualService("default", "h", ("h.example.com",), http=(by_header, by_path))
    snap = MeshSnapshot.build(
        version=1, pods=(), services=(), virtual_services=(line_only, with_header)
    )
    memo = _route_index(line_only).memo
    assert memo is not None and _route_index(with_header).memo is None
    for path, name in (("/a/1", "p"), ("/b?v=2", "q"), ("/b?v=3", None), ("/a/1", "p")):
        d = select_route(snap, "l.example.com", req(path))
        assert (d.rule_name if d.rule else None) == name
    assert len(memo) == 3  # one entry per distinct request line
    for i in range(INDEX_MEMO_MAX + 10):  # any number of paths: the memo stays bounded
        assert select_route(snap, "l.example.com", req(f"/a/{i}")).rule_name == "p"
    assert 0 < len(memo) <= INDEX_MEMO_MAX
    jason = RequestInfo("GET", "h", "/a", headers={"x-user": "jason"}, port=80)
    other = RequestInfo("GET", "h", "/a", headers={"x-user": "ann"}, port=80)
    assert select_route(snap, "h.example.com", jason).rule_name == "h"
    assert select_route(snap, "h.example.com", other).rule_name == "p"
    assert select_route(snap, "h.example.com", jason).rule_name == "h"


def _numbered(n: int, target: str) -> VirtualService:
    http = tuple(
        HTTPRoute(
            name=f"r{i}",
            matches=(HTTPMatchRequest(uri=StringMatch(MatchKind.EXACT, f"/r/{i}")),),
            routes=(RouteDestination(Destination(target)),),
        )
        for i in range(n)
    )
    return VirtualService("default", "numbered", ("n.example.com",), http=http)


def test_index_is_built_once_per_virtual_service_and_dropped_with_it() -> None:
    vs = _numbered(50, "a")
    twin = _numbered(50, "a")
    assert vs == twin and vs is not twin
    index = _route_index(vs)
    assert _route_index(vs) is index
    assert _route_index(twin) is not index  # by identity: no hashing of a big object
    key = id(vs)
    del vs, index
    gc.collect()
    assert key not in _INDEXES


def test_a_new_snapshot_routes_by_its_own_virtual_service() -> None:
    def snap_for(target: str) -> MeshSnapshot:
        vs = _numbered(300, target)
        return MeshSnapshot.build(version=1, pods=(), services=(), virtual_services=(vs,))

    old, new = snap_for("old"), snap_for("new")
    for snap, target in ((old, "old"), (new, "new")):
        d = select_route(snap, "n.example.com", req("/r/299"))
        assert (d.rule_index, d.routes[0].destination.host) == (299, target)
        assert select_route(snap, "n.example.com", req("/r/300")).outcome is RouteOutcome.NO_ROUTE


def test_a_regex_uri_sees_the_path_as_sent_even_with_ignore_uri_case() -> None:
    def rule(name: str, uri: StringMatch, nocase: bool) -> HTTPRoute:
        return HTTPRoute(name=name, matches=(HTTPMatchRequest(uri=uri, ignore_uri_case=nocase),))

    vs = VirtualService(
        "default",
        "v",
        ("v.example.com",),
        http=(
            rule("regex", _regex("/Api/[0-9]+"), True),
            rule("prefix", StringMatch(MatchKind.PREFIX, "/API/"), True),
        ),
    )
    snap = MeshSnapshot.build(version=1, pods=(), services=(), virtual_services=(vs,))
    for path, name in (("/Api/7", "regex"), ("/api/7", "prefix"), ("/aPI/x", "prefix")):
        d = select_route(snap, "v.example.com", req(path))
        assert d.rule_name == name
        assert d == select_route_linear(snap, "v.example.com", req(path))


def test_nothing_after_a_rule_without_matches_is_chosen() -> None:
    catch_all = HTTPRoute(name="all")
    exact = HTTPRoute(name="x", matches=(HTTPMatchRequest(uri=StringMatch(MatchKind.EXACT, "/x")),))
    vs = VirtualService("default", "v", ("v.example.com",), http=(exact, catch_all, exact))
    snap = MeshSnapshot.build(version=1, pods=(), services=(), virtual_services=(vs,))
    assert select_route(snap, "v.example.com", req("/x")).rule_index == 0
    d = select_route(snap, "v.example.com", req("/y"))
    assert (d.rule_name, d.rule_index, d.match_index) == ("all", 1, None)


def test_prepare_builds_the_index_before_the_first_request(snap: MeshSnapshot) -> None:
    from nodeagent.core import route as route_mod

    vss = [vs for vs in snap.virtual_services if vs.http]
    assert vss
    for vs in vss:  # earlier tests of this module may have built them already
        route_mod._INDEXES.pop(id(vs), None)
    route_mod.prepare(snap)
    assert all(id(vs) in route_mod._INDEXES for vs in vss)


def test_a_catastrophic_regex_matches_in_linear_time(tmp_path: Path) -> None:
    """``/api/([a-z0-9]+/?)*`` against 30 characters that do not match took Python's
    backtracking ``re`` 1.7 s of the event loop; RE2 (as Envoy) takes microseconds."""
    snap = MeshFiles(tmp_path).load(
        service_yaml("api", "[{name: http, port: 80}]", app="api"),
        """---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: api, namespace: default}
spec:
  hosts: [api]
  http:
  - name: nested
    match:
    - uri: {regex: "/api/([a-z0-9]+/?)*"}
    - headers: {x-id: {regex: "([a-z0-9]+/?)*"}}
    - queryParams: {id: {regex: "([a-z0-9]+/?)*"}}
    route: [{destination: {host: api}}]
""",
    )
    host = "api.default.svc.cluster.local"
    slow = "a" * 25 + "!"
    started = time.perf_counter()
    for request in (
        req(f"/api/{slow}", authority="api"),
        req("/x", headers={"x-id": slow}, authority="api"),
        req(f"/x?id={slow}", authority="api"),
    ):
        assert select_route(snap, host, request).outcome is RouteOutcome.NO_ROUTE
    assert time.perf_counter() - started < 0.5
    assert select_route(snap, host, req("/api/v1/items/", authority="api")).rule_name == "nested"
