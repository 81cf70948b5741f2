"""AuthorizationPolicy evaluation: the Istio security tasks as tables (policies parsed
from YAML), and a property test against a small reference implementation."""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from meshyaml import MeshFiles, object_yaml, pod_yaml

from nodeagent.core.authz import (
    AuthzDecision,
    AuthzRequest,
    applicable_policies,
    evaluate,
    prepare,
    string_match,
)
from nodeagent.model.objects import Labels, Pod
from nodeagent.model.security import (
    AuthorizationPolicy,
    AuthzAction,
    Condition,
    Operation,
    Rule,
    Source,
)
from nodeagent.model.snapshot import MeshSnapshot

PODS = (
    pod_yaml("web", "shop", app="web")
    + pod_yaml("db", "shop", app="db")
    + pod_yaml("blog", "blog", app="web")
)

SLEEP = "spiffe://cluster.local/ns/shop/sa/sleep"
BLOG = "spiffe://cluster.local/ns/blog/sa/writer"


def ap(name: str, ns: str, spec: str) -> str:
    return object_yaml("security.istio.io/v1", "AuthorizationPolicy", name, ns, spec)


def http(
    snap: MeshSnapshot,
    pod: str = "shop/web",
    *,
    principal: str | None = SLEEP,
    method: str = "GET",
    path: str = "/",
    port: int = 8080,
    headers: dict[str, str] | None = None,
    host: str = "web.shop.svc.cluster.local",
    source_ip: str = "10.0.0.5",
) -> AuthzRequest:
    return AuthzRequest(
        destination=snap.pod_by_key[pod],
        destination_port=port,
        source_principal=principal,
        source_ip=source_ip,
        destination_ip="10.0.1.1",
        is_http=True,
        host=host,
        method=method,
        path=path,
        headers=headers or {},
    )


def tcp(
    snap: MeshSnapshot, pod: str = "shop/web", *, principal: str | None = SLEEP, port: int = 5432
) -> AuthzRequest:
    return AuthzRequest(
        destination=snap.pod_by_key[pod],
        destination_port=port,
        source_principal=principal,
        source_ip="10.0.0.5",
        destination_ip="10.0.1.1",
    )


DENY_NOTHING = ap("deny-nothing", "shop", "action: DENY")
DENY_ALL = ap("deny-all", "shop", "action: DENY\nrules: [{}]")
ALLOW_NOTHING = ap("allow-nothing", "shop", "{}")
ALLOW_ALL = ap("allow-all", "shop", "rules: [{}]")


def test_no_policy_allows(mesh: MeshFiles) -> None:
    d = evaluate(mesh.load(PODS), http(mesh.load(PODS)))
    assert d == AuthzDecision(True, reason="no ALLOW or DENY policy applies")


def test_allow_nothing_denies_everything(mesh: MeshFiles) -> None:
    snap = mesh.load(PODS, ALLOW_NOTHING)
    d = evaluate(snap, http(snap))
    assert not d.allowed and d.policy == "shop/allow-nothing" and d.rule_index is None
    assert d.reason == "no ALLOW policy rule matched (policies: shop/allow-nothing)"
    assert not evaluate(snap, tcp(snap)).allowed
    assert evaluate(snap, http(snap, "blog/blog")).allowed  # another namespace


def test_allow_all_and_deny_all(mesh: MeshFiles) -> None:
    snap = mesh.load(PODS, ALLOW_ALL)
    d = evaluate(snap, tcp(snap, principal=None))
    assert (d.allowed, d.policy, d.rule_index) == (True, "shop/allow-all", 0)
    snap = mesh.load(PODS, ALLOW_ALL, DENY_ALL)
    d = evaluate(snap, http(snap))
    assert (d.allowed, d.policy, d.rule_index, d.action) == (
        False,
        "shop/deny-all",
        0,
        AuthzAction.DENY,
    )
    assert d.reason == "DENY policy shop/deny-all rule 0 matched"


def test_deny_without_rules_matches_nothing(mesh: MeshFiles) -> None:
    snap = mesh.load(PODS, ap("d", "shop", "action: DENY"))
    assert evaluate(snap, http(snap)).allowed


ALLOW_SLEEP_GET_API = ap(
    "viewer",
    "shop",
    """
selector: {matchLabels: {app: web}}
rules:
- from: [{source: {principals: [cluster.local/ns/shop/sa/sleep]}}]
  to: [{operation: {methods: [GET], paths: [/api/*]}}]
""",
)


@pytest.mark.parametrize(
    ("principal", "method", "path", "allowed"),
    [
        (SLEEP, "GET", "/api/items", True),
        (SLEEP, "GET", "/api/items?x=1", True),
        (SLEEP, "GET", "/api", False),
        (SLEEP, "POST", "/api/items", False),
        (SLEEP, "GET", "/admin", False),
        (BLOG, "GET", "/api/items", False),
        (None, "GET", "/api/items", False),
    ],
)
def test_allow_get_from_principal(
    mesh: MeshFiles, principal: str | None, method: str, path: str, allowed: bool
) -> None:
    snap = mesh.load(PODS, ALLOW_SLEEP_GET_API)
    d = evaluate(snap, http(snap, principal=principal, method=method, path=path))
    assert d.allowed is allowed, d.reason
    # the db pod is not selected: no policy applies to it
    assert evaluate(snap, http(snap, "shop/db", principal=principal, method=method)).allowed


def test_deny_by_source_namespace(mesh: MeshFiles) -> None:
    snap = mesh.load(
        PODS,
        ap("no-blog", "shop", "action: DENY\nrules: [{from: [{source: {namespaces: [blog]}}]}]"),
        ap(
            "not-shop", "shop", "action: DENY\nrules: [{from: [{source: {notNamespaces: [shop]}}]}]"
        ),
    )
    d = evaluate(snap, http(snap, principal=BLOG))
    assert (d.allowed, d.policy) == (False, "shop/no-blog")
    assert evaluate(snap, http(snap, principal=SLEEP)).allowed
    # plaintext: namespaces cannot match, notNamespaces does
    d = evaluate(snap, http(snap, principal=None))
    assert (d.allowed, d.policy) == (False, "shop/not-shop")


def test_require_mtls_with_not_principals(mesh: MeshFiles) -> None:
    snap = mesh.load(
        PODS,
        ap("mtls", "shop", "action: DENY\nrules: [{from: [{source: {notPrincipals: ['*']}}]}]"),
    )
    assert not evaluate(snap, tcp(snap, principal=None)).allowed
    assert evaluate(snap, tcp(snap)).allowed


def test_when_header(mesh: MeshFiles) -> None:
    snap = mesh.load(
        PODS,
        ap(
            "alice",
            "shop",
            """
rules:
- when:
  - {key: "request.headers[X-User]", values: [alice, "admin-*"]}
  - {key: source.ip, notValues: [10.9.0.0/16]}
""",
        ),
    )
    assert evaluate(snap, http(snap, headers={"x-user": "alice"})).allowed
    assert evaluate(snap, http(snap, headers={"x-user": "admin-bob"})).allowed
    assert not evaluate(snap, http(snap, headers={"x-user": "bob"})).allowed
    assert not evaluate(snap, http(snap)).allowed
    assert not evaluate(snap, http(snap, headers={"x-user": "alice"}, source_ip="10.9.1.1")).allowed


def test_ip_blocks_and_hosts(mesh: MeshFiles) -> None:
    snap = mesh.load(
        PODS,
        ap(
            "ips",
            "shop",
            """
rules:
- from: [{source: {ipBlocks: [10.0.0.0/24], notIpBlocks: [10.0.0.9]}}]
  to: [{operation: {hosts: ["WEB.shop.svc.*"]}}]
""",
        ),
    )
    assert evaluate(snap, http(snap, source_ip="10.0.0.5")).allowed
    assert not evaluate(snap, http(snap, source_ip="10.0.0.9")).allowed
    assert not evaluate(snap, http(snap, source_ip="10.0.1.5")).allowed
    assert not evaluate(snap, http(snap, host="web.blog.svc.cluster.local")).allowed


TCP_ALLOW = ap(
    "tcp",
    "shop",
    """
rules:
- to: [{operation: {ports: ["5432"]}}]
- to: [{operation: {ports: ["9000"], methods: [GET]}}]
""",
)
TCP_DENY = ap(
    "tcp-deny",
    "shop",
    """
action: DENY
rules:
- to: [{operation: {ports: ["9000"], methods: [POST]}}]
""",
)


def test_tcp_http_only_fields_allow_never_matches(mesh: MeshFiles) -> None:
    snap = mesh.load(PODS, TCP_ALLOW)
    d = evaluate(snap, tcp(snap, port=5432))
    assert (d.allowed, d.rule_index) == (True, 0)
    assert not evaluate(snap, tcp(snap, port=9000)).allowed  # rule 1 has methods
    assert evaluate(snap, http(snap, port=9000, method="GET")).allowed


def test_tcp_http_only_fields_deny_ignored(mesh: MeshFiles) -> None:
    snap = mesh.load(PODS, TCP_DENY)
    d = evaluate(snap, tcp(snap, port=9000))
    assert (d.allowed, d.policy) == (False, "shop/tcp-deny")  # methods ignored: broader
    assert evaluate(snap, tcp(snap, port=5432)).allowed
    assert evaluate(snap, http(snap, port=9000, method="GET")).allowed
    assert not evaluate(snap, http(snap, port=9000, method="POST")).allowed


def test_tcp_deny_with_http_when_key(mesh: MeshFiles) -> None:
    snap = mesh.load(
        PODS,
        ap(
            "d",
            "shop",
            "action: DENY\nrules: [{when: [{key: request.auth.principal, values: [x]}]}]",
        ),
    )
    assert not evaluate(snap, tcp(snap)).allowed
    assert evaluate(snap, http(snap)).allowed


def test_root_namespace_policies(mesh: MeshFiles) -> None:
    snap = mesh.load(
        PODS,
        ap(
            "global-deny-post",
            "istio-system",
            "action: DENY\nrules: [{to: [{operation: {methods: [POST]}}]}]",
        ),
        ap(
            "web-only-sleep",
            "istio-system",
            "selector: {matchLabels: {app: web}}\n"
            "rules: [{from: [{source: {principals: ['*/sa/sleep']}}]}]",
        ),
    )
    for pod in ("shop/web", "shop/db", "blog/blog"):
        d = evaluate(snap, http(snap, pod, method="POST"))
        assert (d.allowed, d.policy) == (False, "istio-system/global-deny-post")
    # the selector applies in every namespace, to pods with app=web
    assert evaluate(snap, http(snap, "shop/web")).allowed
    assert not evaluate(snap, http(snap, "blog/blog", principal=BLOG)).allowed
    assert evaluate(snap, http(snap, "shop/db", principal=BLOG)).allowed


def test_selector_scoping_and_other_namespace(mesh: MeshFiles) -> None:
    snap = mesh.load(
        PODS,
        ap(
            "db",
            "shop",
            "selector: {matchLabels: {app: db}}\nrules: [{from: [{source: {namespaces: [shop]}}]}]",
        ),
        ap("blog-web", "blog", "selector: {matchLabels: {app: web}}"),
    )
    assert evaluate(snap, http(snap, "shop/web", principal=BLOG)).allowed
    assert not evaluate(snap, http(snap, "shop/db", principal=BLOG)).allowed
    assert evaluate(snap, http(snap, "shop/db")).allowed
    assert not evaluate(snap, http(snap, "blog/blog")).allowed


def test_audit_is_ignored(mesh: MeshFiles) -> None:
    snap = mesh.load(PODS, ap("audit", "shop", "action: AUDIT\nrules: [{}]"))
    assert evaluate(snap, http(snap)) == AuthzDecision(
        True, reason="no ALLOW or DENY policy applies"
    )
    snap = mesh.load(PODS, ap("audit", "shop", "action: AUDIT\nrules: [{}]"), DENY_NOTHING)
    assert evaluate(snap, http(snap)).reason == (
        "no DENY policy rule matched, no ALLOW policy applies"
    )
    snap = mesh.load(PODS, ap("audit", "shop", "action: AUDIT\nrules: [{}]"), ALLOW_NOTHING)
    assert not evaluate(snap, http(snap)).allowed


def test_jwt_fields(mesh: MeshFiles) -> None:
    snap = mesh.load(
        PODS,
        ap(
            "jwt",
            "shop",
            """
rules:
- from: [{source: {requestPrincipals: ["https://issuer/*"]}}]
  when:
  - {key: "request.auth.claims[groups]", values: [admins]}
  - {key: request.auth.audiences, values: [shop]}
""",
        ),
    )
    base = http(snap)
    ok = AuthzRequest(
        **{
            **base.__dict__,
            "request_principal": "https://issuer/alice",
            "claims": {"groups": ["dev", "admins"], "aud": "shop"},
        }
    )
    assert evaluate(snap, ok).allowed
    assert not evaluate(snap, base).allowed
    no_group = AuthzRequest(**{**ok.__dict__, "claims": {"groups": ["dev"], "aud": "shop"}})
    assert not evaluate(snap, no_group).allowed


def test_listing_of_allow_policies_in_reason(mesh: MeshFiles) -> None:
    snap = mesh.load(
        PODS,
        ap("b", "shop", "rules: [{from: [{source: {principals: [nobody]}}]}]"),
        ap("a", "istio-system", "rules: [{from: [{source: {principals: [nobody]}}]}]"),
    )
    d = evaluate(snap, http(snap))
    assert d.reason == "no ALLOW policy rule matched (policies: istio-system/a, shop/b)"


@pytest.mark.parametrize(
    ("pattern", "value", "hit"),
    [
        ("abc", "abc", True),
        ("abc", "abcd", False),
        ("ab*", "abc", True),
        ("ab*", "ab", True),
        ("ab*", "a", False),
        ("*bc", "abc", True),
        ("*bc", "abd", False),
        ("*", "x", True),
        ("*", "", False),
        ("*", None, False),
        ("abc", None, False),
    ],
)
def test_string_match(pattern: str, value: str | None, hit: bool) -> None:
    assert string_match(pattern, value) is hit


# --- property test: evaluate agrees with a reference implementation ------------------

ROOT = "istio-system"
NAMESPACES = (ROOT, "a", "b")
PRINCIPAL_PATTERNS = ("cluster.local/ns/a/sa/x", "cluster.local/ns/b/*", "*/sa/x", "*")
NS_PATTERNS = ("a", "b", "a*", "*")
PATHS = ("/api/*", "/admin", "*", "*/x")
METHODS = ("GET", "POST")
HOSTS = ("web", "web*", "*")
PORTS = (80, 8080)
CIDRS = ("10.0.0.0/24", "10.0.1.0/24")
WHEN_KEYS = (
    "request.headers[x-user]",
    "source.namespace",
    "source.principal",
    "destination.port",
    "source.ip",
)
WHEN_VALUES = {
    "request.headers[x-user]": ("alice", "bo*"),
    "source.namespace": ("a", "b"),
    "source.principal": ("cluster.local/ns/a/sa/x", "*"),
    "destination.port": ("80", "8080"),
    "source.ip": ("10.0.0.0/24", "10.0.1.7"),
}


def _sub(options: Sequence[str | int]) -> st.SearchStrategy[tuple[str | int, ...]]:
    return st.lists(st.sampled_from(options), max_size=2, unique=True).map(tuple)


sources = st.builds(
    Source,
    principals=_sub(PRINCIPAL_PATTERNS),
    not_principals=_sub(PRINCIPAL_PATTERNS),
    namespaces=_sub(NS_PATTERNS),
    not_namespaces=_sub(NS_PATTERNS),
    ip_blocks=_sub(CIDRS).map(lambda t: tuple(ipaddress.ip_network(c) for c in t)),
    not_ip_blocks=_sub(CIDRS).map(lambda t: tuple(ipaddress.ip_network(c) for c in t)),
    request_principals=_sub(("iss/alice", "iss/*")),
    not_request_principals=_sub(("iss/bob",)),
)
operations = st.builds(
    Operation,
    hosts=_sub(HOSTS),
    not_hosts=_sub(HOSTS),
    ports=_sub(PORTS),
    not_ports=_sub(PORTS),
    methods=_sub(METHODS),
    not_methods=_sub(METHODS),
    paths=_sub(PATHS),
    not_paths=_sub(PATHS),
)


@st.composite
def conditions(draw: st.DrawFn) -> Condition:
    key = draw(st.sampled_from(WHEN_KEYS))
    values = draw(_sub(WHEN_VALUES[key]))
    not_values = draw(_sub(WHEN_VALUES[key]))
    if not values and not not_values:
        values = (WHEN_VALUES[key][0],)
    return Condition(key, tuple(map(str, values)), tuple(map(str, not_values)))


rules = st.builds(
    Rule,
    from_=st.lists(sources, max_size=2).map(tuple),
    to=st.lists(operations, max_size=2).map(tuple),
    when=st.lists(conditions(), max_size=2).map(tuple),
)


@st.composite
def policies(draw: st.DrawFn) -> tuple[AuthorizationPolicy, ...]:
    out = []
    for i in range(draw(st.integers(0, 4))):
        app = draw(st.sampled_from((None, "web", "db")))
        out.append(
            AuthorizationPolicy(
                namespace=draw(st.sampled_from(NAMESPACES)),
                name=f"p{i}",
                selector=None if app is None else Labels.of({"app": app}),
                action=draw(st.sampled_from(tuple(AuthzAction))),
                rules=tuple(draw(st.lists(rules, max_size=3))),
            )
        )
    return tuple(out)


@st.composite
def requests(draw: st.DrawFn) -> AuthzRequest:
    pod = Pod(
        namespace=draw(st.sampled_from(NAMESPACES)),
        name="w",
        node_name="n1",
        labels=Labels.of({"app": draw(st.sampled_from(("web", "db")))}),
    )
    user = draw(st.sampled_from((None, "alice", "bob")))
    return AuthzRequest(
        destination=pod,
        destination_port=draw(st.sampled_from(PORTS)),
        source_principal=draw(
            st.sampled_from(
                (None, "spiffe://cluster.local/ns/a/sa/x", "spiffe://cluster.local/ns/b/sa/y")
            )
        ),
        source_ip=draw(st.sampled_from(("10.0.0.5", "10.0.1.7", "10.0.2.1"))),
        destination_ip="10.1.0.1",
        is_http=draw(st.booleans()),
        host=draw(st.sampled_from(("web", "webx", "db"))),
        method=draw(st.sampled_from(METHODS)),
        path=draw(st.sampled_from(("/api/v1", "/admin", "/x", "/"))),
        headers={} if user is None else {"x-user": user},
        request_principal=draw(st.sampled_from((None, "iss/alice", "iss/bob"))),
    )


def ref_str(pattern: str, value: str | None) -> bool:
    if value is None:
        return False
    if pattern == "*":
        return len(value) > 0
    if pattern[-1] == "*":
        return value[: len(pattern) - 1] == pattern[:-1]
    if pattern[0] == "*":
        n = len(pattern) - 1
        return len(value) >= n and value[len(value) - n :] == pattern[1:]
    return value == pattern


def ref_field(values: Sequence[object], not_values: Sequence[object], ok: object) -> bool:
    """``ok(x)`` tells whether pattern ``x`` matches the request's value."""
    assert callable(ok)
    if len(values) > 0 and not any(ok(x) for x in values):
        return False
    return not any(ok(x) for x in not_values)


def ref_allowed(
    pols: tuple[AuthorizationPolicy, ...], req: AuthzRequest
) -> tuple[bool, set[tuple[str, int]]]:
    """(allowed, the DENY (policy, rule) pairs that match) - written straight from the
    Istio docs, with no shortcuts."""
    pod = req.destination
    principal = req.source_principal[len("spiffe://") :] if req.source_principal else None
    ns = req.source_principal.split("/")[4] if req.source_principal else None
    src_ip = ipaddress.ip_address(req.source_ip)
    h = req.is_http

    def applies(p: AuthorizationPolicy) -> bool:
        if p.namespace not in (ROOT, pod.namespace):
            return False
        if p.selector is None:
            return True
        return all(dict(pod.labels).get(k) == v for k, v in p.selector.items())

    def source_ok(s: Source) -> bool:
        return (
            ref_field(s.principals, s.not_principals, lambda x: ref_str(x, principal))
            and ref_field(s.namespaces, s.not_namespaces, lambda x: ref_str(x, ns))
            and ref_field(s.ip_blocks, s.not_ip_blocks, lambda n: src_ip in n)
            and (
                not h
                or ref_field(
                    s.request_principals,
                    s.not_request_principals,
                    lambda x: ref_str(x, req.request_principal),
                )
            )
        )

    def op_ok(o: Operation) -> bool:
        port_ok = ref_field(o.ports, o.not_ports, lambda p: p == req.destination_port)
        if not h:
            return port_ok
        return (
            port_ok
            and ref_field(o.hosts, o.not_hosts, lambda x: ref_str(x, req.host))
            and ref_field(o.methods, o.not_methods, lambda x: ref_str(x, req.method))
            and ref_field(o.paths, o.not_paths, lambda x: ref_str(x, req.path))
        )

    def cond_ok(c: Condition) -> bool:
        if c.key == "source.ip":
            return ref_field(c.values, c.not_values, lambda x: src_ip in ipaddress.ip_network(x))
        value = {
            "request.headers[x-user]": req.headers.get("x-user"),
            "source.namespace": ns,
            "source.principal": principal,
            "destination.port": str(req.destination_port),
        }[c.key]
        return ref_field(c.values, c.not_values, lambda x: ref_str(x, value))

    def uses_http(r: Rule) -> bool:
        return (
            any(s.request_principals or s.not_request_principals for s in r.from_)
            or any(
                o.hosts or o.not_hosts or o.methods or o.not_methods or o.paths or o.not_paths
                for o in r.to
            )
            or any(c.key.startswith("request.") for c in r.when)
        )

    def rule_ok(r: Rule, action: AuthzAction) -> bool:
        if not h and action is AuthzAction.ALLOW and uses_http(r):
            return False
        when = [c for c in r.when if h or not c.key.startswith("request.")]
        return (
            (len(r.from_) == 0 or any(source_ok(s) for s in r.from_))
            and (len(r.to) == 0 or any(op_ok(o) for o in r.to))
            and all(cond_ok(c) for c in when)
        )

    mine = [p for p in pols if applies(p)]
    denies = {
        (p.key, i)
        for p in mine
        if p.action is AuthzAction.DENY
        for i, r in enumerate(p.rules)
        if rule_ok(r, p.action)
    }
    if denies:
        return False, denies
    allows = [p for p in mine if p.action is AuthzAction.ALLOW]
    if not allows:
        return True, denies
    return any(rule_ok(r, p.action) for p in allows for r in p.rules), denies


@settings(max_examples=400, deadline=None)
@given(pols=policies(), req=requests())
def test_evaluate_agrees_with_reference(
    pols: tuple[AuthorizationPolicy, ...], req: AuthzRequest
) -> None:
    snap = MeshSnapshot.build(
        version=1, pods=(req.destination,), services=(), authorization_policies=pols
    )
    decision = evaluate(snap, req)
    allowed, denies = ref_allowed(pols, req)
    assert decision.allowed is allowed, decision.reason
    if decision.action is AuthzAction.DENY:
        assert (decision.policy, decision.rule_index) in denies
    elif decision.rule_index is not None:
        assert decision.allowed and decision.action is AuthzAction.ALLOW
    elif not decision.allowed:  # no ALLOW rule matched: the ALLOW policies are named
        allow = {p.key for p in pols if p.action is AuthzAction.ALLOW}
        assert set(decision.policy.split(",")) <= allow and decision.policy


def test_pod_objects_not_from_the_snapshot(mesh: MeshFiles) -> None:
    snap = mesh.load(PODS, ap("web", "shop", "selector: {matchLabels: {app: web}}"))
    twin = Pod(namespace="shop", name="other", node_name="n2", labels=Labels.of({"app": "web"}))
    req = AuthzRequest(destination=twin, destination_port=80)
    assert not evaluate(snap, req).allowed
    stranger = Pod(namespace="shop", name="x", node_name="n2", labels=Labels.of({"app": "x"}))
    assert evaluate(snap, AuthzRequest(destination=stranger, destination_port=80)).allowed


def test_prepare_and_new_snapshot(mesh: MeshFiles) -> None:
    snap = mesh.load(PODS, ALLOW_NOTHING)
    prepare(snap)
    assert not evaluate(snap, http(snap)).allowed
    snap2 = mesh.load(PODS, ALLOW_ALL)  # a new snapshot is not served from the old cache
    assert evaluate(snap2, http(snap2)).allowed
    assert applicable_policies(snap2, snap2.pod_by_key["shop/web"])[0].name == "allow-all"
