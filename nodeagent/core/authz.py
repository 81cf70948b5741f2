"""Whether a request may reach a workload: Istio's AuthorizationPolicy semantics, as a pure
function of a ``MeshSnapshot`` and an ``AuthzRequest`` (no I/O, no data-path wiring).

Applicable policies: those of the root namespace (no selector: every workload of the mesh;
a selector: the pods with those labels in any namespace) and those of the workload's own
namespace (no selector: all its workloads). Then, as in Istio: AUDIT policies do not change
the decision; any matching DENY rule denies; when any ALLOW policy applies, some ALLOW rule
must match; no ALLOW policy allows.

A policy matches when one of its rules does (none when it has no rules); a rule matches
when ``from`` (any source), ``to`` (any operation) and every ``when`` condition do, an
empty field matching anything. Strings match Istio's way: exact, ``prefix*``, ``*suffix``,
or ``*`` for any non-empty value. Principals are SPIFFE IDs without ``spiffe://``.

A TCP (non-HTTP) request cannot be checked against HTTP-only fields (hosts, methods,
paths, requestPrincipals, ``request.*`` conditions): an ALLOW rule with any of them never
matches it, and a DENY rule is evaluated without them (so it matches more broadly), as
Istio does - fail closed either way.

Speed: each policy is compiled once per snapshot into one predicate per rule (closures
over sets and prefix/suffix tuples, HTTP and TCP variants), and each workload's rules
(DENY first, then ALLOW, with the decision each would give) once per (snapshot, namespace,
labels), found from the snapshot's by-namespace index; both are kept while the snapshot
lives (like ``core.route``'s index). A decision is then a few predicate calls, whatever
the number of policies in the mesh (``bench/authz_bench.py``).
"""

from __future__ import annotations

import ipaddress
import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from operator import attrgetter
from types import MappingProxyType

from nodeagent.model.objects import Labels, Pod
from nodeagent.model.security import (
    AuthorizationPolicy,
    AuthzAction,
    Condition,
    IPNetwork,
    Operation,
    Rule,
    Source,
)
from nodeagent.model.snapshot import MeshSnapshot

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

_EMPTY_HEADERS: Mapping[str, str] = MappingProxyType({})


@dataclass(frozen=True)
class AuthzRequest:
    """What the evaluator may look at for one connection (TCP) or one request (HTTP)."""

    destination: Pod
    """The workload being called."""
    destination_port: int
    source_principal: str | None = None
    """The peer's SPIFFE ID (``spiffe://td/ns/N/sa/S``), None for a plaintext peer."""
    source_namespace: str | None = None
    """The peer's namespace from its identity; None: taken from ``source_principal``.
    Ignored for a plaintext peer (no identity, no namespace)."""
    source_ip: str = ""
    destination_ip: str = ""
    is_http: bool = False
    host: str | None = None
    method: str | None = None
    path: str | None = None
    """The request target; the query and fragment are not matched (as Envoy's url_path)."""
    headers: Mapping[str, str] = field(default_factory=lambda: _EMPTY_HEADERS)
    """Request headers, names in lowercase."""
    request_principal: str | None = None
    """The JWT's ``iss/sub``, None without a (valid) JWT."""
    claims: Mapping[str, str | Sequence[str]] | None = None
    sni: str | None = None


@dataclass(frozen=True)
class AuthzDecision:
    allowed: bool
    policy: str = ""
    """``namespace/name`` of the deciding policy; for a denial because no ALLOW rule
    matched, the ALLOW policies that applied (comma-separated); '' when none applied."""
    rule_index: int | None = None
    action: AuthzAction | None = None
    reason: str = ""


# --- matching primitives -------------------------------------------------------------


def string_match(pattern: str, value: str | None) -> bool:
    """Istio string matching: exact, ``prefix*``, ``*suffix``, ``*`` (any non-empty)."""
    if value is None:
        return False
    if pattern == "*":
        return value != ""
    if pattern.endswith("*"):
        return value.startswith(pattern[:-1])
    if pattern.startswith("*"):
        return value.endswith(pattern[1:])
    return value == pattern


@lru_cache(maxsize=4096)
def _address(value: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(value)
    except ValueError:
        return None


@lru_cache(maxsize=4096)
def _network(value: str) -> IPNetwork | None:
    try:
        return ipaddress.ip_network(value, strict=False)
    except ValueError:
        return None


def _in(nets: Sequence[IPNetwork | None], addr: IPAddress | None) -> bool:
    return addr is not None and any(n is not None and addr in n for n in nets)


# --- one request's view ---------------------------------------------------------------


class _View:
    """The request, and the values the matchers derive from it (once per decision)."""

    __slots__ = ("host", "namespace", "path", "principal", "req")

    def __init__(self, req: AuthzRequest) -> None:
        self.req = req
        principal = namespace = None
        if req.source_principal is not None:
            principal = req.source_principal.removeprefix("spiffe://")
            namespace = req.source_namespace
            if namespace is None:
                parts = principal.split("/")
                if len(parts) >= 5 and parts[1] == "ns":
                    namespace = parts[2]
        self.principal = principal
        self.namespace = namespace
        path = req.path
        if path is not None and ("?" in path or "#" in path):
            path = path.split("?", 1)[0].split("#", 1)[0]
        self.path = path
        self.host = req.host.lower() if req.host is not None else None


Pred = Callable[[_View], bool]
Matcher = Callable[[str | None], bool]


def _matcher(patterns: Sequence[str], *, lower: bool = False) -> Matcher:
    """``string_match`` against any of ``patterns``, with set and tuple look-ups."""
    pats = [p.lower() for p in patterns] if lower else list(patterns)
    presence = "*" in pats
    prefixes = tuple(p[:-1] for p in pats if p.endswith("*") and p != "*")
    suffixes = tuple(p[1:] for p in pats if p.startswith("*") and not p.endswith("*"))
    exact = frozenset(p for p in pats if not p.startswith("*") and not p.endswith("*"))

    def match(value: str | None) -> bool:
        if value is None:
            return False
        if value in exact or (presence and value):
            return True
        if prefixes and value.startswith(prefixes):
            return True
        return bool(suffixes) and value.endswith(suffixes)

    return match


def _field_pred(
    values: Sequence[str], not_values: Sequence[str], attr: str, *, lower: bool = False
) -> Pred | None:
    """Some of ``values`` (when given) and none of ``not_values`` match ``view.<attr>``."""
    if not values and not not_values:
        return None
    m = _matcher(values, lower=lower) if values else None
    n = _matcher(not_values, lower=lower) if not_values else None
    return _in_not_in(attrgetter(attr), m, n)


def _in_not_in(get: Callable[[_View], str | None], m: Matcher | None, n: Matcher | None) -> Pred:
    """``get(view)`` matches ``m`` (when given) and not ``n`` (when given)."""
    if n is None:
        assert m is not None
        return lambda v: m(get(v))
    if m is None:
        return lambda v: not n(get(v))
    return lambda v: m(x := get(v)) and not n(x)


def _ip_pred(
    nets: Sequence[IPNetwork | None], not_nets: Sequence[IPNetwork | None], attr: str
) -> Pred | None:
    if not nets and not not_nets:
        return None
    get = attrgetter(attr)

    def pred(v: _View) -> bool:
        ip = get(v)
        addr = _address(ip) if ip else None
        if nets and not _in(nets, addr):
            return False
        return not (not_nets and _in(not_nets, addr))

    return pred


def _all(preds: Sequence[Pred | None]) -> Pred | None:
    """All of ``preds`` (None: always true)."""
    ps = tuple(p for p in preds if p is not None)
    if not ps:
        return None
    if len(ps) == 1:
        return ps[0]

    def pred(v: _View) -> bool:
        for p in ps:  # noqa: SIM110 - a loop is faster than all() over a generator
            if not p(v):
                return False
        return True

    return pred


def _any_of(preds: Sequence[Pred | None]) -> Pred | None:
    """Any of ``preds``, where a None is always true (so the whole is None, too)."""
    if not preds or any(p is None for p in preds):
        return None
    ps = tuple(p for p in preds if p is not None)
    if len(ps) == 1:
        return ps[0]

    def pred(v: _View) -> bool:
        for p in ps:  # noqa: SIM110 - a loop is faster than any() over a generator
            if p(v):
                return True
        return False

    return pred


def _always(v: _View) -> bool:
    return True


def _never(v: _View) -> bool:
    return False


def _ports_pred(ports: tuple[int, ...], not_ports: tuple[int, ...]) -> Pred | None:
    if not ports and not not_ports:
        return None
    want, avoid = frozenset(ports), frozenset(not_ports)
    get = attrgetter("req.destination_port")
    if not avoid:
        return lambda v: get(v) in want
    return lambda v: (not want or get(v) in want) and get(v) not in avoid


def _source_pred(s: Source, http: bool) -> Pred | None:
    return _all(
        (
            _field_pred(s.principals, s.not_principals, "principal"),
            _field_pred(s.namespaces, s.not_namespaces, "namespace"),
            _ip_pred(s.ip_blocks, s.not_ip_blocks, "req.source_ip"),
            _field_pred(s.request_principals, s.not_request_principals, "req.request_principal")
            if http
            else None,
        )
    )


def _operation_pred(o: Operation, http: bool) -> Pred | None:
    preds = [_ports_pred(o.ports, o.not_ports)]
    if http:
        preds += [
            _field_pred(o.hosts, o.not_hosts, "host", lower=True),
            _field_pred(o.methods, o.not_methods, "req.method"),
            _field_pred(o.paths, o.not_paths, "path"),
        ]
    return _all(preds)


def _claim_values(key: str, v: _View) -> tuple[str, ...]:
    """The JWT claim values a ``request.auth.claims[...]``, ``.audiences`` or ``.presenter``
    key names (none without a JWT or without the claim)."""
    claims = v.req.claims or {}
    if key.startswith("request.auth.claims["):
        raw = claims.get(key[len("request.auth.claims[") : -1])
    elif key == "request.auth.audiences":
        raw = claims.get("aud")
    elif key == "request.auth.presenter":
        raw = claims.get("azp")
    else:
        raw = None
    if raw is None:
        return ()
    return (raw,) if isinstance(raw, str) else tuple(str(x) for x in raw)


def _single_getter(key: str) -> Callable[[_View], str | None] | None:
    """A getter for a single-valued ``when`` key (None: a claim key, see ``_claim_values``)."""
    if key.startswith("request.headers[") and key.endswith("]"):
        name = key[len("request.headers[") : -1].lower()
        return lambda v: v.req.headers.get(name)
    if key == "destination.port":
        return lambda v: str(v.req.destination_port)
    attr = {
        "source.namespace": "namespace",
        "source.principal": "principal",
        "request.auth.principal": "req.request_principal",
        "connection.sni": "req.sni",
    }.get(key)
    return attrgetter(attr) if attr is not None else None


def _condition_pred(c: Condition) -> Pred:
    if c.key in ("source.ip", "destination.ip"):
        ip_pred = _ip_pred(
            [_network(x) for x in c.values],
            [_network(x) for x in c.not_values],
            "req.source_ip" if c.key == "source.ip" else "req.destination_ip",
        )
        return ip_pred if ip_pred is not None else _always
    key = c.key
    m = _matcher(c.values) if c.values else None
    n = _matcher(c.not_values) if c.not_values else None
    get = _single_getter(key)
    if get is not None:
        return _in_not_in(get, m, n)

    def pred(v: _View) -> bool:
        got = _claim_values(key, v)
        if m is not None and not any(m(x) for x in got):
            return False
        return not (n is not None and any(n(x) for x in got))

    return pred


_KNOWN_KEYS = frozenset(
    {
        "source.ip",
        "source.namespace",
        "source.principal",
        "destination.port",
        "destination.ip",
        "connection.sni",
        "request.auth.principal",
        "request.auth.audiences",
        "request.auth.presenter",
    }
)


def _key_known(key: str) -> bool:
    return key in _KNOWN_KEYS or (
        key.endswith("]") and key.startswith(("request.headers[", "request.auth.claims["))
    )


def _http_only_condition(c: Condition) -> bool:
    """A condition a TCP connection cannot answer (also: a key the evaluator does not
    know, which is treated the same way, fail closed)."""
    return c.key.startswith("request.") or not _key_known(c.key)


def _has_http_fields(rule: Rule) -> bool:
    return (
        any(s.request_principals or s.not_request_principals for s in rule.from_)
        or any(
            o.hosts or o.not_hosts or o.methods or o.not_methods or o.paths or o.not_paths
            for o in rule.to
        )
        or any(_http_only_condition(c) for c in rule.when)
    )


def _rule_pred(rule: Rule, http: bool, action: AuthzAction) -> Pred:
    """The rule as one predicate, for HTTP requests or for TCP connections."""
    if not http and action is AuthzAction.ALLOW and _has_http_fields(rule):
        return _never
    when = rule.when if http else tuple(c for c in rule.when if not _http_only_condition(c))
    pred = _all(
        (
            _any_of([_source_pred(s, http) for s in rule.from_]) if rule.from_ else None,
            _any_of([_operation_pred(o, http) for o in rule.to]) if rule.to else None,
            *(_condition_pred(c) for c in when),
        )
    )
    return pred if pred is not None else _always


_Check = tuple[Pred, AuthzDecision]
"""One rule as a predicate, with the decision when it matches."""


def _checks(policies: Sequence[AuthorizationPolicy], http: bool) -> tuple[_Check, ...]:
    """The rules of ``policies`` in order, for HTTP requests or TCP connections (ALLOW
    rules that can never match a TCP connection are left out)."""
    out: list[_Check] = []
    for policy in policies:
        action, key = policy.action, policy.key
        for i, rule in enumerate(policy.rules):
            pred = _rule_pred(rule, http, action)
            if pred is _never:
                continue
            reason = f"{action.value} policy {key} rule {i} matched"
            out.append((pred, AuthzDecision(action is AuthzAction.ALLOW, key, i, action, reason)))
    return tuple(out)


@dataclass(frozen=True)
class _Applicable:
    """One workload's rules, flattened: DENY ones first, then ALLOW ones."""

    http: tuple[_Check, ...]
    tcp: tuple[_Check, ...]
    no_match: AuthzDecision
    """The decision when no rule matches."""
    needs_http: bool = False
    """Some applicable rule looks at HTTP attributes: an HTTP port of this workload must
    be authorized request by request, not per connection."""


def _applies(policy: AuthorizationPolicy, labels: Labels) -> bool:
    return policy.selector is None or labels.matches(policy.selector)


def applicable_policies(snapshot: MeshSnapshot, pod: Pod) -> tuple[AuthorizationPolicy, ...]:
    """The policies that apply to ``pod``: root namespace first, then its own, by name."""
    by_ns = snapshot.authorization_policies_by_namespace
    found = [p for p in by_ns.get(snapshot.root_namespace, ()) if _applies(p, pod.labels)]
    if pod.namespace != snapshot.root_namespace:
        found += [p for p in by_ns.get(pod.namespace, ()) if _applies(p, pod.labels)]
    return tuple(found)


_Cache = dict[object, object]
_CACHES: dict[int, tuple[weakref.ref[MeshSnapshot], _Cache]] = {}
"""id(MeshSnapshot) → (a weak reference to it, its workload cache). The workload cache
maps (namespace, labels) → ``_Applicable``; for the snapshot's own Pod objects,
id(pod) → (pod, ``_Applicable``) (a faster key; the pod is kept, so its id stays its);
and ("policy", id(policy)) → (policy, HTTP checks, TCP checks)."""


def _workload_cache(snapshot: MeshSnapshot) -> _Cache:
    key = id(snapshot)
    cached = _CACHES.get(key)
    if cached is not None and cached[0]() is snapshot:
        return cached[1]
    cache: _Cache = {}

    def forget(ref: weakref.ref[MeshSnapshot]) -> None:
        entry = _CACHES.get(key)
        if entry is not None and entry[0] is ref:
            _CACHES.pop(key, None)

    _CACHES[key] = (weakref.ref(snapshot, forget), cache)
    return cache


_NOTHING_APPLIES = AuthzDecision(True, reason="no ALLOW or DENY policy applies")
_NO_ALLOW_POLICY = AuthzDecision(
    True, reason="no DENY policy rule matched, no ALLOW policy applies"
)


def _policy_checks(
    cache: _Cache, policy: AuthorizationPolicy
) -> tuple[tuple[_Check, ...], tuple[_Check, ...]]:
    """(HTTP checks, TCP checks) of one policy, compiled once per snapshot and shared by
    every workload it applies to."""
    hit = cache.get(("policy", id(policy)))
    if isinstance(hit, tuple) and hit[0] is policy:
        return hit[1], hit[2]
    http, tcp = _checks((policy,), True), _checks((policy,), False)
    cache[("policy", id(policy))] = (policy, http, tcp)
    return http, tcp


def _build_applicable(snapshot: MeshSnapshot, cache: _Cache, pod: Pod) -> _Applicable:
    policies = applicable_policies(snapshot, pod)
    allow = [p for p in policies if p.action is AuthzAction.ALLOW]
    deny = [p for p in policies if p.action is AuthzAction.DENY]
    if allow:
        names = ", ".join(p.key for p in allow)
        no_match = AuthzDecision(
            False,
            policy=",".join(p.key for p in allow),
            action=AuthzAction.ALLOW,
            reason=f"no ALLOW policy rule matched (policies: {names})",
        )
    else:
        no_match = _NO_ALLOW_POLICY if deny else _NOTHING_APPLIES
    http: list[_Check] = []
    tcp: list[_Check] = []
    for policy in deny + allow:
        h, t = _policy_checks(cache, policy)
        http += h
        tcp += t
    needs_http = any(_has_http_fields(r) for p in deny + allow for r in p.rules)
    return _Applicable(http=tuple(http), tcp=tuple(tcp), no_match=no_match, needs_http=needs_http)


def _applicable(snapshot: MeshSnapshot, pod: Pod) -> _Applicable:
    cache = _workload_cache(snapshot)
    hit = cache.get(id(pod))
    if hit is not None:
        assert isinstance(hit, tuple)
        if hit[0] is pod:
            found: _Applicable = hit[1]
            return found
    wkey = (pod.namespace, pod.labels)
    by_labels = cache.get(wkey)
    if isinstance(by_labels, _Applicable):
        found = by_labels
    else:
        found = _build_applicable(snapshot, cache, pod)
        cache[wkey] = found
    if snapshot.pod_by_key.get(pod.key) is pod:
        cache[id(pod)] = (pod, found)
    return found


def evaluate(snapshot: MeshSnapshot, req: AuthzRequest) -> AuthzDecision:
    """Allow or deny ``req`` under the snapshot's AuthorizationPolicies, and why."""
    app = _applicable(snapshot, req.destination)
    checks = app.http if req.is_http else app.tcp
    if checks:
        v = _View(req)
        for pred, decision in checks:
            if pred(v):
                return decision
    return app.no_match


def needs_http(snapshot: MeshSnapshot, pod: Pod) -> bool:
    """Whether a policy applying to ``pod`` has a rule with HTTP attributes (methods,
    paths, hosts, request principals, ``request.*`` conditions)."""
    return _applicable(snapshot, pod).needs_http


# --- explain: each policy, each rule, the first field that did not match ----------------


def _source_fields(s: Source, http: bool) -> list[tuple[str, Pred | None, str]]:
    """(field name as in YAML, predicate, what of the request it looks at)."""
    out = [
        ("principals", _field_pred(s.principals, (), "principal"), "principal"),
        ("notPrincipals", _field_pred((), s.not_principals, "principal"), "principal"),
        ("namespaces", _field_pred(s.namespaces, (), "namespace"), "namespace"),
        ("notNamespaces", _field_pred((), s.not_namespaces, "namespace"), "namespace"),
        ("ipBlocks", _ip_pred(s.ip_blocks, (), "req.source_ip"), "req.source_ip"),
        ("notIpBlocks", _ip_pred((), s.not_ip_blocks, "req.source_ip"), "req.source_ip"),
    ]
    if http:
        rp = "req.request_principal"
        out += [
            ("requestPrincipals", _field_pred(s.request_principals, (), rp), rp),
            ("notRequestPrincipals", _field_pred((), s.not_request_principals, rp), rp),
        ]
    return out


def _operation_fields(o: Operation, http: bool) -> list[tuple[str, Pred | None, str]]:
    port = "req.destination_port"
    out: list[tuple[str, Pred | None, str]] = [
        ("ports", _ports_pred(o.ports, ()), port),
        ("notPorts", _ports_pred((), o.not_ports), port),
    ]
    if http:
        out += [
            ("hosts", _field_pred(o.hosts, (), "host", lower=True), "host"),
            ("notHosts", _field_pred((), o.not_hosts, "host", lower=True), "host"),
            ("methods", _field_pred(o.methods, (), "req.method"), "req.method"),
            ("notMethods", _field_pred((), o.not_methods, "req.method"), "req.method"),
            ("paths", _field_pred(o.paths, (), "path"), "path"),
            ("notPaths", _field_pred((), o.not_paths, "path"), "path"),
        ]
    return out


def _first_miss(
    fields: list[tuple[str, Pred | None, str]], obj: object, where: str, v: _View
) -> str | None:
    for name, pred, attr in fields:
        if pred is not None and not pred(v):
            want = [str(x) for x in getattr(obj, _snake(name))]
            return f"{where}.{name} {want} vs {attrgetter(attr)(v)!r}"
    return None


def _snake(name: str) -> str:
    return "".join("_" + c.lower() if c.isupper() else c for c in name)


def explain_rule(rule: Rule, req: AuthzRequest, action: AuthzAction) -> tuple[bool, str]:
    """Whether ``rule`` matches ``req`` and, when it does not, the first field (YAML path
    in the rule and the value it saw) that did not."""
    http = req.is_http
    if not http and action is AuthzAction.ALLOW and _has_http_fields(rule):
        return False, "uses HTTP attributes, which a TCP connection does not have"
    v = _View(req)
    sources = [
        _first_miss(_source_fields(s, http), s, f"from[{j}].source", v)
        for j, s in enumerate(rule.from_)
    ]
    operations = [
        _first_miss(_operation_fields(o, http), o, f"to[{j}].operation", v)
        for j, o in enumerate(rule.to)
    ]
    for misses in (sources, operations):  # a list matches when any of its items does
        if misses and all(m is not None for m in misses):
            return False, "; ".join(m for m in misses if m)
    for k, c in enumerate(rule.when):
        if not http and _http_only_condition(c):
            continue
        if not _condition_pred(c)(v):
            seen: object = (
                _claim_values(c.key, v)
                if (get := _single_getter(c.key)) is None and c.key.startswith("request.auth")
                else (
                    get(v)
                    if get is not None
                    else (req.source_ip if c.key == "source.ip" else req.destination_ip)
                )
            )
            want = f"values {list(c.values)}" if c.values else f"notValues {list(c.not_values)}"
            return False, f"when[{k}] {c.key}: {want} vs {seen!r}"
    return True, "matched"


def explain(snapshot: MeshSnapshot, req: AuthzRequest) -> list[dict[str, object]]:
    """Every policy that applies to ``req.destination``, in evaluation order (DENY, then
    ALLOW, then AUDIT), with each rule's outcome; ``evaluate`` gives the verdict."""
    policies = applicable_policies(snapshot, req.destination)
    order = {AuthzAction.DENY: 0, AuthzAction.ALLOW: 1, AuthzAction.AUDIT: 2}
    out: list[dict[str, object]] = []
    for p in sorted(policies, key=lambda p: order[p.action]):
        rules = []
        for i, rule in enumerate(p.rules):
            matched, why = explain_rule(rule, req, p.action)
            rules.append({"index": i, "matched": matched, "why": why})
        out.append(
            {
                "policy": p.key,
                "action": p.action.value,
                "selector": dict(p.selector.items()) if p.selector is not None else None,
                "rules": rules if p.rules else "no rules: matches nothing",
                "matched": any(r["matched"] for r in rules),
            }
        )
    return out


def prepare(snapshot: MeshSnapshot) -> None:
    """Compute the applicable policies of every pod of ``snapshot`` now, so the first
    request after a config change does not pay for it."""
    for pod in snapshot.pods:
        _applicable(snapshot, pod)
