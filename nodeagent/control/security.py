"""The ``security.istio.io`` PeerAuthentication and AuthorizationPolicy kinds: their shapes
(the supported subset of Istio's fields) and their conversion to ``model.security``, each
problem named by its field path. (RequestAuthentication, of the same group, is ``authn``.)"""

from __future__ import annotations

import ipaddress
import re
from typing import Any

from nodeagent.control.fields import read_meta, read_ports, workload_selector
from nodeagent.control.schema import (
    INT_OR_STR,
    STR,
    STR_LIST,
    STR_MAP,
    AnyShape,
    Kind,
    ListOf,
    MapOf,
    Obj,
    Problems,
    resource,
)
from nodeagent.model.security import (
    AuthorizationPolicy,
    AuthzAction,
    Condition,
    IPNetwork,
    MtlsMode,
    Operation,
    PeerAuthentication,
    Rule,
    Source,
)

API_VERSIONS = ("security.istio.io/v1", "security.istio.io/v1beta1")

# --- PeerAuthentication ----------------------------------------------------------------

MTLS = Obj({"mode": STR})
PEER_AUTHENTICATION = resource(
    Obj(
        {
            "selector": Obj({"matchLabels": STR_MAP}),
            "mtls": MTLS,
            "portLevelMtls": MapOf(MTLS, int_keys=True),
        }
    ),
)


def _mode(value: object, path: str, problems: Problems) -> MtlsMode:
    try:
        return MtlsMode(str(value).upper() if value is not None else "UNSET")
    except ValueError:
        allowed = ", ".join(m.value for m in MtlsMode)
        problems.add(path, f"unknown mode {value!r} (one of {allowed})")
        return MtlsMode.UNSET


def convert_peer_authentication(
    doc: dict[str, Any], source: str, problems: Problems
) -> PeerAuthentication | None:
    ns, name = read_meta(doc, problems)
    spec = doc.get("spec") or {}
    selector = workload_selector(spec, problems)
    mode = _mode((spec.get("mtls") or {}).get("mode"), "spec.mtls.mode", problems)
    ports: list[tuple[int, MtlsMode]] = []
    for key, value in (spec.get("portLevelMtls") or {}).items():
        path = f"spec.portLevelMtls.{key}"
        if not str(key).isdigit() or not 0 < int(key) < 65536:
            problems.add(path, f"{key!r} is not a port number")
            continue
        ports.append((int(key), _mode((value or {}).get("mode"), f"{path}.mode", problems)))
    if ports and selector is None:
        problems.add(
            "spec.portLevelMtls",
            "portLevelMtls needs a workload selector (as in Istio)",
        )
    return PeerAuthentication(
        namespace=ns,
        name=name,
        mode=mode,
        selector=selector,
        port_modes=tuple(sorted(ports)),
        source=source,
    )


# --- AuthorizationPolicy ---------------------------------------------------------------

AUTHZ_SOURCE = Obj(
    {
        "principals": STR_LIST,
        "notPrincipals": STR_LIST,
        "namespaces": STR_LIST,
        "notNamespaces": STR_LIST,
        "ipBlocks": STR_LIST,
        "notIpBlocks": STR_LIST,
        "requestPrincipals": STR_LIST,
        "notRequestPrincipals": STR_LIST,
        "remoteIpBlocks": AnyShape(),
        "notRemoteIpBlocks": AnyShape(),
    }
)
AUTHZ_OPERATION = Obj(
    {
        "hosts": STR_LIST,
        "notHosts": STR_LIST,
        "ports": ListOf(INT_OR_STR),
        "notPorts": ListOf(INT_OR_STR),
        "methods": STR_LIST,
        "notMethods": STR_LIST,
        "paths": STR_LIST,
        "notPaths": STR_LIST,
    }
)
AUTHZ_RULE = Obj(
    {
        "from": ListOf(Obj({"source": AUTHZ_SOURCE}, required=frozenset({"source"}))),
        "to": ListOf(Obj({"operation": AUTHZ_OPERATION}, required=frozenset({"operation"}))),
        "when": ListOf(
            Obj(
                {"key": STR, "values": STR_LIST, "notValues": STR_LIST},
                required=frozenset({"key"}),
            )
        ),
    }
)
AUTHORIZATION_POLICY = resource(
    Obj(
        {
            "selector": Obj({"matchLabels": STR_MAP}),
            "action": STR,
            "rules": ListOf(AUTHZ_RULE),
            "provider": AnyShape(),
        }
    ),
)

CONDITION_KEYS = (
    "request.headers[NAME]",
    "source.ip",
    "source.namespace",
    "source.principal",
    "destination.port",
    "destination.ip",
    "request.auth.principal",
    "request.auth.claims[NAME]",
    "request.auth.audiences",
    "request.auth.presenter",
    "connection.sni",
)
_PLAIN_CONDITION_KEYS = frozenset(k for k in CONDITION_KEYS if "[" not in k)
_BRACKET_KEY = re.compile(r"^(request\.headers|request\.auth\.claims)\[([^\[\]]+)\]$")
IP_CONDITION_KEYS = frozenset({"source.ip", "destination.ip"})


def condition_key_supported(key: str) -> bool:
    """True for a ``when`` key the evaluator knows (see ``CONDITION_KEYS``)."""
    return key in _PLAIN_CONDITION_KEYS or _BRACKET_KEY.match(key) is not None


def _match_values(raw: dict[str, Any], key: str, path: str, problems: Problems) -> tuple[str, ...]:
    """An Istio string-match list: exact, ``prefix*``, ``*suffix`` or ``*``."""
    out: list[str] = []
    for i, v in enumerate(raw.get(key) or ()):
        if not v:
            problems.add(f"{path}.{key}[{i}]", "must not be empty")
            continue
        if "*" in v[1:-1] or (len(v) > 1 and v.startswith("*") and v.endswith("*")):
            problems.add(
                f"{path}.{key}[{i}]",
                f"{v!r}: only exact, prefix (abc*), suffix (*abc) or * are supported",
            )
            continue
        out.append(v)
    return tuple(out)


def _networks(
    raw: dict[str, Any], key: str, path: str, problems: Problems
) -> tuple[IPNetwork, ...]:
    out: list[IPNetwork] = []
    for i, v in enumerate(raw.get(key) or ()):
        try:
            out.append(ipaddress.ip_network(v, strict=False))
        except ValueError:
            problems.add(f"{path}.{key}[{i}]", f"{v!r} is not an IP address or CIDR block")
    return tuple(out)


REMOTE_IP_UNSUPPORTED = (
    "is not supported: remote.ip is the client before an edge proxy (X-Forwarded-For, "
    "PROXY protocol), and nodeagent has no edge proxy to trust; use ipBlocks (source.ip)"
)


def _authz_source(raw: dict[str, Any], path: str, problems: Problems) -> Source:
    if not raw:
        problems.add(path, "a source needs at least one field")
    for key in ("remoteIpBlocks", "notRemoteIpBlocks"):
        if key in raw:
            problems.add(f"{path}.{key}", f"{key} {REMOTE_IP_UNSUPPORTED}")

    def m(key: str) -> tuple[str, ...]:
        return _match_values(raw, key, path, problems)

    return Source(
        principals=m("principals"),
        not_principals=m("notPrincipals"),
        namespaces=m("namespaces"),
        not_namespaces=m("notNamespaces"),
        ip_blocks=_networks(raw, "ipBlocks", path, problems),
        not_ip_blocks=_networks(raw, "notIpBlocks", path, problems),
        request_principals=m("requestPrincipals"),
        not_request_principals=m("notRequestPrincipals"),
    )


def _authz_operation(raw: dict[str, Any], path: str, problems: Problems) -> Operation:
    if not raw:
        problems.add(path, "an operation needs at least one field")

    def m(key: str) -> tuple[str, ...]:
        return _match_values(raw, key, path, problems)

    return Operation(
        hosts=m("hosts"),
        not_hosts=m("notHosts"),
        ports=read_ports(raw, "ports", path, problems),
        not_ports=read_ports(raw, "notPorts", path, problems),
        methods=m("methods"),
        not_methods=m("notMethods"),
        paths=m("paths"),
        not_paths=m("notPaths"),
    )


def _authz_condition(raw: dict[str, Any], path: str, problems: Problems) -> Condition:
    key = str(raw.get("key", ""))
    if key == "remote.ip":
        problems.add(f"{path}.key", f"key remote.ip {REMOTE_IP_UNSUPPORTED}")
    elif not condition_key_supported(key):
        problems.add(
            f"{path}.key",
            f"unsupported key {key!r} (supported: {', '.join(CONDITION_KEYS)})",
        )
    if not raw.get("values") and not raw.get("notValues"):
        problems.add(path, "a condition needs values or notValues")
    if key in IP_CONDITION_KEYS:
        _networks(raw, "values", path, problems)
        _networks(raw, "notValues", path, problems)
        values = tuple(raw.get("values") or ())
        not_values = tuple(raw.get("notValues") or ())
    elif key == "destination.port":
        values = tuple(str(p) for p in read_ports(raw, "values", path, problems))
        not_values = tuple(str(p) for p in read_ports(raw, "notValues", path, problems))
    else:
        values = _match_values(raw, "values", path, problems)
        not_values = _match_values(raw, "notValues", path, problems)
    return Condition(key=key, values=values, not_values=not_values)


def _authz_rule(raw: dict[str, Any], path: str, problems: Problems) -> Rule:
    return Rule(
        from_=tuple(
            _authz_source(f.get("source") or {}, f"{path}.from[{i}].source", problems)
            for i, f in enumerate(raw.get("from") or ())
        ),
        to=tuple(
            _authz_operation(t.get("operation") or {}, f"{path}.to[{i}].operation", problems)
            for i, t in enumerate(raw.get("to") or ())
        ),
        when=tuple(
            _authz_condition(c, f"{path}.when[{i}]", problems)
            for i, c in enumerate(raw.get("when") or ())
        ),
    )


def convert_authorization_policy(
    doc: dict[str, Any], source: str, problems: Problems
) -> AuthorizationPolicy | None:
    ns, name = read_meta(doc, problems)
    spec = doc.get("spec") or {}
    selector = workload_selector(spec, problems)
    raw_action = spec.get("action", "ALLOW")
    action = AuthzAction.ALLOW
    if raw_action == "CUSTOM":
        problems.add("spec.action", "action CUSTOM (ext_authz) is not supported")
    else:
        try:
            action = AuthzAction(raw_action)
        except ValueError:
            allowed = ", ".join(a.value for a in AuthzAction)
            problems.add("spec.action", f"unknown action {raw_action!r} (one of {allowed})")
    if "provider" in spec:
        problems.add("spec.provider", "provider (action CUSTOM, ext_authz) is not supported")
    rules = tuple(
        _authz_rule(r, f"spec.rules[{i}]", problems) for i, r in enumerate(spec.get("rules") or ())
    )
    return AuthorizationPolicy(
        namespace=ns, name=name, selector=selector, action=action, rules=rules, source=source
    )


PEER_AUTHENTICATION_KIND = Kind(
    API_VERSIONS, "PeerAuthentication", PEER_AUTHENTICATION, convert_peer_authentication
)
AUTHORIZATION_POLICY_KIND = Kind(
    API_VERSIONS, "AuthorizationPolicy", AUTHORIZATION_POLICY, convert_authorization_policy
)
