"""The supported config kinds: their shapes (the documented subset) and their conversion
to model objects. One function per kind; each reports problems with field paths."""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from nodeagent.control.schema import (
    BOOL,
    INT,
    INT_OR_STR,
    STR,
    STR_MAP,
    AnyShape,
    ListOf,
    MapOf,
    Obj,
    Problems,
    Scalar,
    Shape,
    check,
)
from nodeagent.model.objects import (
    NODE_ANNOTATIONS,
    Container,
    Labels,
    Node,
    Pod,
    Service,
    ServicePort,
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
from nodeagent.model.traffic import (
    ConnectionPool,
    ConsistentHash,
    Destination,
    DestinationRule,
    FaultAbort,
    FaultDelay,
    HeaderOperations,
    Headers,
    HTTPCookie,
    HTTPFault,
    HTTPMatchRequest,
    HTTPRedirect,
    HTTPRetry,
    HTTPRewrite,
    HTTPRoute,
    L4MatchAttributes,
    LoadBalancer,
    LocalityLbSetting,
    MatchKind,
    OutlierDetection,
    PortTrafficPolicy,
    RouteDestination,
    SimpleLB,
    StringMatch,
    Subset,
    TCPRoute,
    TrafficPolicy,
    VirtualService,
    qualify_host,
)

METADATA = Obj(
    {
        "name": STR,
        "namespace": STR,
        "labels": STR_MAP,
        "annotations": STR_MAP,
    },
    required=frozenset({"name"}),
)

POD = Obj(
    {
        "apiVersion": STR,
        "kind": STR,
        "metadata": METADATA,
        "spec": Obj(
            {
                "nodeName": STR,
                "serviceAccountName": STR,
                "containers": ListOf(
                    Obj(
                        {
                            "name": STR,
                            "image": STR,
                            "command": ListOf(STR),
                            "args": ListOf(STR),
                            "env": ListOf(Obj({"name": STR, "value": STR}, frozenset({"name"}))),
                            "ports": ListOf(
                                Obj(
                                    {"name": STR, "containerPort": INT, "protocol": STR},
                                    frozenset({"containerPort"}),
                                )
                            ),
                        },
                        required=frozenset({"name"}),
                    )
                ),
            },
            required=frozenset({"nodeName", "containers"}),
        ),
        "status": Obj({"podIP": STR}),
    },
    required=frozenset({"metadata", "spec"}),
)

NODE = Obj(
    {
        "apiVersion": STR,
        "kind": STR,
        "metadata": METADATA,
        "spec": Obj({"podCIDR": STR, "podCIDRs": ListOf(STR)}),
    },
    required=frozenset({"metadata"}),
)
"""A ``v1 Node``: the agent reads its own node's ``nodeagent.io/`` annotations."""

SERVICE = Obj(
    {
        "apiVersion": STR,
        "kind": STR,
        "metadata": METADATA,
        "spec": Obj(
            {
                "selector": STR_MAP,
                "clusterIP": STR,
                "type": STR,
                "ports": ListOf(
                    Obj(
                        {
                            "name": STR,
                            "port": INT,
                            "targetPort": INT_OR_STR,
                            "protocol": STR,
                            "appProtocol": STR,
                        },
                        required=frozenset({"port"}),
                    )
                ),
            },
            required=frozenset({"ports"}),
        ),
    },
    required=frozenset({"metadata", "spec"}),
)

MTLS = Obj({"mode": STR})
PEER_AUTHENTICATION = Obj(
    {
        "apiVersion": STR,
        "kind": STR,
        "metadata": METADATA,
        "spec": Obj(
            {
                "selector": Obj({"matchLabels": STR_MAP}),
                "mtls": MTLS,
                "portLevelMtls": MapOf(MTLS, int_keys=True),
            }
        ),
    },
    required=frozenset({"metadata"}),
)

_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")


@dataclass(frozen=True)
class Kind:
    api_versions: tuple[str, ...]
    kind: str
    shape: Shape
    convert: Callable[[dict[str, Any], str, Problems], object | None]


def _check_port(value: Any, path: str, problems: Problems) -> None:
    if isinstance(value, int) and not 1 <= value <= 65535:
        problems.add(path, f"port {value} is out of range 1-65535")


def workload_selector(spec: dict[str, Any], problems: Problems) -> Labels | None:
    """``spec.selector.matchLabels`` of a policy: None (no selector: the whole namespace,
    or the mesh in the root namespace); an empty one is an error (it selects nothing)."""
    if "selector" not in spec:
        return None
    selector = Labels.of((spec.get("selector") or {}).get("matchLabels"))
    if not selector:
        problems.add("spec.selector.matchLabels", "an empty selector selects nothing")
    return selector


def _meta(doc: dict[str, Any], problems: Problems) -> tuple[str, str]:
    meta = doc.get("metadata") or {}
    name = meta.get("name", "")
    ns = meta.get("namespace", "default")
    if isinstance(name, str) and name and not _DNS_SUBDOMAIN.match(name):
        problems.add("metadata.name", f"{name!r} is not a valid name (lowercase a-z, 0-9, -, .)")
    if isinstance(ns, str) and not _DNS_LABEL.match(ns):
        problems.add("metadata.namespace", f"{ns!r} is not a valid namespace name")
    return str(ns), str(name)


def convert_node(doc: dict[str, Any], source: str, problems: Problems) -> Node | None:
    meta = doc.get("metadata") or {}
    _, name = _meta(doc, problems)
    if "namespace" in meta:
        problems.add("metadata.namespace", "a Node is cluster-scoped: it has no namespace")
    annotations = meta.get("annotations") or {}
    for key, value in annotations.items():
        if not key.startswith("nodeagent.io/"):
            continue
        allowed = NODE_ANNOTATIONS.get(key)
        if allowed is None:
            known = ", ".join(sorted(NODE_ANNOTATIONS))
            problems.add(f"metadata.annotations.{key}", f"unknown annotation (known: {known})")
        elif value not in allowed:
            problems.add(
                f"metadata.annotations.{key}", f"{value!r}: expected one of {', '.join(allowed)}"
            )
    return Node(
        name=name,
        labels=Labels.of(meta.get("labels")),
        annotations=Labels.of(annotations),
        source=source,
    )


def convert_pod(doc: dict[str, Any], source: str, problems: Problems) -> Pod | None:
    ns, name = _meta(doc, problems)
    meta = doc.get("metadata") or {}
    spec = doc.get("spec") or {}
    containers: list[Container] = []
    names: set[str] = set()
    for i, c in enumerate(spec.get("containers") or []):
        cname = c.get("name", "")
        if cname in names:
            problems.add(f"spec.containers[{i}].name", f"duplicate container name {cname!r}")
        names.add(cname)
        ports: list[tuple[str, int]] = []
        for j, p in enumerate(c.get("ports") or []):
            _check_port(p.get("containerPort"), f"spec.containers[{i}].ports[{j}]", problems)
            proto = p.get("protocol", "TCP")
            if proto != "TCP":
                problems.add(
                    f"spec.containers[{i}].ports[{j}].protocol",
                    f"only TCP is supported, got {proto!r}",
                )
            ports.append((str(p.get("name", "")), int(p.get("containerPort", 0))))
        containers.append(
            Container(
                name=cname,
                command=tuple(c.get("command") or ()),
                args=tuple(c.get("args") or ()),
                env=tuple((e["name"], str(e.get("value", ""))) for e in c.get("env") or ()),
                image=str(c.get("image", "")),
                ports=tuple(ports),
            )
        )
    if not containers:
        problems.add("spec.containers", "a Pod needs at least one container")
    pod_ip = (doc.get("status") or {}).get("podIP")
    if pod_ip is not None:
        try:
            pod_ip = str(ipaddress.ip_address(pod_ip))
        except ValueError:
            problems.add("status.podIP", f"{pod_ip!r} is not an IP address")
            pod_ip = None
    for key in meta.get("annotations") or {}:
        if key.startswith("traffic.sidecar.istio.io/exclude") and key.endswith("Ports"):
            raw = meta["annotations"][key]
            for part in str(raw).split(","):
                if part.strip() and not (part.strip().isdigit() and 0 < int(part) < 65536):
                    problems.add(
                        f"metadata.annotations.{key}",
                        f"{raw!r}: expected comma-separated port numbers",
                    )
                    break
    return Pod(
        namespace=ns,
        name=name,
        node_name=str(spec.get("nodeName", "")),
        service_account=str(spec.get("serviceAccountName", "default")),
        labels=Labels.of(meta.get("labels")),
        annotations=Labels.of(meta.get("annotations")),
        containers=tuple(containers),
        pod_ip=pod_ip,
        source=source,
    )


def convert_service(doc: dict[str, Any], source: str, problems: Problems) -> Service | None:
    ns, name = _meta(doc, problems)
    if name and not _DNS_LABEL.match(name):
        problems.add("metadata.name", f"{name!r}: a Service name must be a DNS label")
    spec = doc.get("spec") or {}
    svc_type = spec.get("type", "ClusterIP")
    if svc_type != "ClusterIP":
        problems.add("spec.type", f"only ClusterIP is supported, got {svc_type!r}")
    cluster_ip = spec.get("clusterIP")
    if cluster_ip in ("None", ""):
        cluster_ip = None
    if cluster_ip is not None:
        try:
            cluster_ip = str(ipaddress.ip_address(cluster_ip))
        except ValueError:
            problems.add("spec.clusterIP", f"{cluster_ip!r} is not an IP address")
            cluster_ip = None
    ports: list[ServicePort] = []
    seen: dict[int, int] = {}
    for i, p in enumerate(spec.get("ports") or []):
        path = f"spec.ports[{i}]"
        _check_port(p.get("port"), f"{path}.port", problems)
        number = p.get("port", 0)
        if number in seen:
            problems.add(f"{path}.port", f"port {number} is also spec.ports[{seen[number]}]")
        seen[number] = i
        target = p.get("targetPort", number)
        if isinstance(target, int):
            _check_port(target, f"{path}.targetPort", problems)
        elif isinstance(target, str) and target.isdigit():
            target = int(target)
        proto = p.get("protocol", "TCP")
        if proto != "TCP":
            problems.add(f"{path}.protocol", f"only TCP is supported, got {proto!r}")
        ports.append(
            ServicePort(
                port=int(number) if isinstance(number, int) else 0,
                target_port=target,
                name=str(p.get("name", "")),
                protocol=str(proto),
                app_protocol=p.get("appProtocol"),
            )
        )
    if not ports and "ports" in spec:
        problems.add("spec.ports", "a Service needs at least one port")
    if len(ports) > 1:
        for i, sp in enumerate(ports):
            if not sp.name:
                problems.add(f"spec.ports[{i}].name", "required when a Service has several ports")
    return Service(
        namespace=ns,
        name=name,
        ports=tuple(ports),
        selector=Labels.of(spec.get("selector")),
        cluster_ip=cluster_ip,
        source=source,
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
    ns, name = _meta(doc, problems)
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


# --- security.istio.io: AuthorizationPolicy ------------------------------------------

STR_LIST = ListOf(STR)
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
AUTHORIZATION_POLICY = Obj(
    {
        "apiVersion": STR,
        "kind": STR,
        "metadata": METADATA,
        "spec": Obj(
            {
                "selector": Obj({"matchLabels": STR_MAP}),
                "action": STR,
                "rules": ListOf(AUTHZ_RULE),
                "provider": AnyShape(),
            }
        ),
    },
    required=frozenset({"metadata"}),
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


def _ports(raw: dict[str, Any], key: str, path: str, problems: Problems) -> tuple[int, ...]:
    out: list[int] = []
    for i, v in enumerate(raw.get(key) or ()):
        if isinstance(v, str) and v.isdigit():
            v = int(v)
        if not isinstance(v, int) or not 1 <= v <= 65535:
            problems.add(f"{path}.{key}[{i}]", f"{v!r} is not a port number (1-65535)")
            continue
        out.append(v)
    return tuple(out)


def _authz_source(raw: dict[str, Any], path: str, problems: Problems) -> Source:
    if not raw:
        problems.add(path, "a source needs at least one field")

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
        ports=_ports(raw, "ports", path, problems),
        not_ports=_ports(raw, "notPorts", path, problems),
        methods=m("methods"),
        not_methods=m("notMethods"),
        paths=m("paths"),
        not_paths=m("notPaths"),
    )


def _authz_condition(raw: dict[str, Any], path: str, problems: Problems) -> Condition:
    key = str(raw.get("key", ""))
    if not condition_key_supported(key):
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
        values = tuple(str(p) for p in _ports(raw, "values", path, problems))
        not_values = tuple(str(p) for p in _ports(raw, "notValues", path, problems))
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
    ns, name = _meta(doc, problems)
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


# --- networking.istio.io: VirtualService and DestinationRule -------------------------

NUMBER = Scalar((int, float), "number")
STRING_MATCH = Obj({"exact": STR, "prefix": STR, "regex": STR})
PERCENT = Obj({"value": NUMBER})
PORT_SELECTOR = Obj({"number": INT})
DESTINATION = Obj({"host": STR, "subset": STR, "port": PORT_SELECTOR}, required=frozenset({"host"}))
HEADER_OPS = Obj({"set": STR_MAP, "add": STR_MAP, "remove": ListOf(STR)})
HEADERS = Obj({"request": HEADER_OPS, "response": HEADER_OPS})
HTTP_MATCH = Obj(
    {
        "name": STR,
        "uri": STRING_MATCH,
        "authority": STRING_MATCH,
        "method": STRING_MATCH,
        "headers": MapOf(STRING_MATCH),
        "queryParams": MapOf(STRING_MATCH),
        "port": INT,
        "sourceLabels": STR_MAP,
        "sourceNamespace": STR,
        "ignoreUriCase": BOOL,
    }
)
HTTP_ROUTE = Obj(
    {
        "name": STR,
        "match": ListOf(HTTP_MATCH),
        "route": ListOf(
            Obj(
                {"destination": DESTINATION, "weight": INT, "headers": HEADERS},
                required=frozenset({"destination"}),
            )
        ),
        "redirect": Obj({"uri": STR, "authority": STR, "redirectCode": INT}),
        "rewrite": Obj({"uri": STR, "authority": STR}),
        "headers": HEADERS,
        "timeout": STR,
        "retries": Obj(
            {"attempts": INT, "perTryTimeout": STR, "retryOn": STR},
            required=frozenset({"attempts"}),
        ),
        "fault": Obj(
            {
                "delay": Obj(
                    {"fixedDelay": STR, "percentage": PERCENT},
                    required=frozenset({"fixedDelay"}),
                ),
                "abort": Obj(
                    {"httpStatus": INT, "percentage": PERCENT},
                    required=frozenset({"httpStatus"}),
                ),
            }
        ),
        "mirror": DESTINATION,
        "mirrorPercentage": PERCENT,
    }
)
TCP_ROUTE = Obj(
    {
        "match": ListOf(Obj({"port": INT, "sourceLabels": STR_MAP})),
        "route": ListOf(
            Obj({"destination": DESTINATION, "weight": INT}, required=frozenset({"destination"}))
        ),
    }
)
VIRTUAL_SERVICE = Obj(
    {
        "apiVersion": STR,
        "kind": STR,
        "metadata": METADATA,
        "spec": Obj(
            {"hosts": ListOf(STR), "http": ListOf(HTTP_ROUTE), "tcp": ListOf(TCP_ROUTE)},
            required=frozenset({"hosts"}),
        ),
    },
    required=frozenset({"metadata", "spec"}),
)

LOAD_BALANCER = Obj(
    {
        "simple": STR,
        "consistentHash": Obj(
            {
                "httpHeaderName": STR,
                "httpCookie": Obj({"name": STR, "ttl": STR}, required=frozenset({"name"})),
                "useSourceIp": BOOL,
                "httpQueryParameterName": STR,
            }
        ),
        "localityLbSetting": Obj(
            {
                "enabled": BOOL,
                "failover": ListOf(Obj({"from": STR, "to": STR}, frozenset({"from", "to"}))),
            }
        ),
    }
)
CONNECTION_POOL = Obj(
    {
        "tcp": Obj({"maxConnections": INT, "connectTimeout": STR}),
        "http": Obj(
            {
                "http1MaxPendingRequests": INT,
                "http2MaxRequests": INT,
                "maxRequestsPerConnection": INT,
                "idleTimeout": STR,
            }
        ),
    }
)
OUTLIER_DETECTION = Obj(
    {
        "consecutive5xxErrors": INT,
        "consecutiveGatewayErrors": INT,
        "interval": STR,
        "baseEjectionTime": STR,
        "maxEjectionPercent": INT,
    }
)
_POLICIES: dict[str, Shape] = {
    "loadBalancer": LOAD_BALANCER,
    "connectionPool": CONNECTION_POOL,
    "outlierDetection": OUTLIER_DETECTION,
}
TRAFFIC_POLICY = Obj(
    {
        **_POLICIES,
        "portLevelSettings": ListOf(
            Obj({"port": PORT_SELECTOR, **_POLICIES}, required=frozenset({"port"}))
        ),
    }
)
DESTINATION_RULE = Obj(
    {
        "apiVersion": STR,
        "kind": STR,
        "metadata": METADATA,
        "spec": Obj(
            {
                "host": STR,
                "subsets": ListOf(
                    Obj(
                        {"name": STR, "labels": STR_MAP, "trafficPolicy": TRAFFIC_POLICY},
                        required=frozenset({"name"}),
                    )
                ),
                "trafficPolicy": TRAFFIC_POLICY,
            },
            required=frozenset({"host"}),
        ),
    },
    required=frozenset({"metadata", "spec"}),
)

RETRY_ON = frozenset(
    {
        "5xx",
        "gateway-error",
        "reset",
        "connect-failure",
        "refused-stream",
        "retriable-4xx",
        "retriable-status-codes",
        "retriable-headers",
        "envoy-ratelimited",
        "unavailable",
        "cancelled",
        "deadline-exceeded",
        "resource-exhausted",
        "internal",
    }
)
REDIRECT_CODES = frozenset({301, 302, 303, 307, 308})
_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(h|ms|us|µs|ns|m|s)")
_UNIT_SECONDS = {
    "h": 3600.0,
    "m": 60.0,
    "s": 1.0,
    "ms": 1e-3,
    "us": 1e-6,
    "µs": 1e-6,
    "ns": 1e-9,
}


def parse_duration(text: str) -> float:
    """A Go/protobuf duration (``7s``, ``500ms``, ``1m30s``, ``1.5s``) in seconds;
    raises ValueError."""
    pos, total = 0, 0.0
    while pos < len(text):
        m = _DURATION_PART.match(text, pos)
        if m is None:
            break
        total += float(m.group(1)) * _UNIT_SECONDS[m.group(2)]
        pos = m.end()
    if not text or pos != len(text):
        raise ValueError(f"{text!r} is not a duration (like 7s, 500ms, 1m30s)")
    return total


def _duration(value: object, path: str, problems: Problems) -> float | None:
    if value is None:
        return None
    try:
        return parse_duration(str(value))
    except ValueError as e:
        problems.add(path, str(e))
        return None


def _string_match(
    raw: dict[str, Any], path: str, problems: Problems, *, presence_ok: bool = False
) -> StringMatch:
    given = [k for k in ("exact", "prefix", "regex") if k in raw]
    if not given and presence_ok:
        return StringMatch(MatchKind.PRESENT)
    if len(given) != 1:
        problems.add(
            path,
            "a string match needs exactly one of exact, prefix, regex"
            + (f" (got {', '.join(given)})" if given else ""),
        )
        return StringMatch(MatchKind.EXACT, "")
    kind = MatchKind(given[0])
    value = str(raw[given[0]])
    if kind is MatchKind.REGEX:
        try:
            return StringMatch(kind, value, re.compile(value))
        except re.error as e:
            problems.add(f"{path}.regex", f"invalid regular expression {value!r}: {e}")
            return StringMatch(MatchKind.EXACT, "")
    return StringMatch(kind, value)


def _percent(raw: dict[str, Any] | None, path: str, problems: Problems) -> float | None:
    if raw is None:
        return None
    value = raw.get("value", 0)
    if not 0 <= value <= 100:
        problems.add(f"{path}.value", f"{value} is not a percentage (0-100)")
    return float(value)


def _destination(raw: dict[str, Any], ns: str, path: str, problems: Problems) -> Destination:
    host = str(raw.get("host", ""))
    if not host:
        problems.add(f"{path}.host", "must not be empty")
    port = (raw.get("port") or {}).get("number")
    _check_port(port, f"{path}.port.number", problems)
    subset = raw.get("subset")
    return Destination(host=qualify_host(host, ns), subset=subset or None, port=port)


def _header_ops(raw: dict[str, Any] | None) -> HeaderOperations:
    raw = raw or {}
    return HeaderOperations(
        set=tuple((k.lower(), v) for k, v in (raw.get("set") or {}).items()),
        add=tuple((k.lower(), v) for k, v in (raw.get("add") or {}).items()),
        remove=tuple(h.lower() for h in raw.get("remove") or ()),
    )


def _headers(raw: dict[str, Any] | None) -> Headers | None:
    if raw is None:
        return None
    return Headers(
        request=_header_ops(raw.get("request")), response=_header_ops(raw.get("response"))
    )


def _route_destinations(
    raw: list[dict[str, Any]], ns: str, path: str, problems: Problems
) -> tuple[RouteDestination, ...]:
    out: list[RouteDestination] = []
    for j, r in enumerate(raw):
        rpath = f"{path}[{j}]"
        weight = r.get("weight")
        if weight is not None and not 0 <= weight <= 100:
            problems.add(f"{rpath}.weight", f"{weight} is not a percentage (0-100)")
        out.append(
            RouteDestination(
                destination=_destination(
                    r.get("destination") or {}, ns, f"{rpath}.destination", problems
                ),
                weight=int(weight or 0),
                headers=_headers(r.get("headers")),
            )
        )
    if len(out) == 1:
        return (RouteDestination(out[0].destination, 100, out[0].headers),)
    if out:
        total = sum(r.weight for r in out)
        if total != 100:
            problems.add(path, f"weights of several destinations must sum to 100, not {total}")
    return tuple(out)


def _source_labels(raw: dict[str, Any], path: str, problems: Problems) -> Labels | None:
    if "sourceLabels" not in raw:
        return None
    labels = Labels.of(raw.get("sourceLabels"))
    if not labels:
        problems.add(f"{path}.sourceLabels", "an empty selector selects nothing")
    return labels


def _http_match(raw: dict[str, Any], path: str, problems: Problems) -> HTTPMatchRequest:
    def sm(key: str) -> StringMatch | None:
        return _string_match(raw[key], f"{path}.{key}", problems) if key in raw else None

    query: list[tuple[str, StringMatch]] = []
    for k, v in (raw.get("queryParams") or {}).items():
        qpath = f"{path}.queryParams.{k}"
        if "prefix" in v:
            problems.add(f"{qpath}.prefix", "query parameters match by exact or regex only")
        query.append((k, _string_match(v, qpath, problems, presence_ok=True)))
    port = raw.get("port")
    _check_port(port, f"{path}.port", problems)
    return HTTPMatchRequest(
        name=str(raw.get("name", "")),
        uri=sm("uri"),
        authority=sm("authority"),
        method=sm("method"),
        headers=tuple(
            (k.lower(), _string_match(v, f"{path}.headers.{k}", problems, presence_ok=True))
            for k, v in (raw.get("headers") or {}).items()
        ),
        query_params=tuple(query),
        port=port,
        source_labels=_source_labels(raw, path, problems),
        source_namespace=raw.get("sourceNamespace"),
        ignore_uri_case=bool(raw.get("ignoreUriCase", False)),
    )


def _retries(raw: dict[str, Any] | None, path: str, problems: Problems) -> HTTPRetry | None:
    if raw is None:
        return None
    attempts = raw.get("attempts", 0)
    if attempts < 0:
        problems.add(f"{path}.attempts", f"{attempts} must not be negative")
    retry_on: list[str] = []
    for part in str(raw.get("retryOn", "")).split(","):
        cond = part.strip()
        if not cond:
            continue
        if cond not in RETRY_ON and not (cond.isdigit() and 100 <= int(cond) <= 599):
            problems.add(
                f"{path}.retryOn",
                f"unknown retry condition {cond!r} (one of {', '.join(sorted(RETRY_ON))}, "
                "or an HTTP status code)",
            )
        retry_on.append(cond)
    return HTTPRetry(
        attempts=attempts,
        per_try_timeout=_duration(raw.get("perTryTimeout"), f"{path}.perTryTimeout", problems),
        retry_on=tuple(retry_on),
    )


def _fault(raw: dict[str, Any] | None, path: str, problems: Problems) -> HTTPFault | None:
    if raw is None:
        return None
    delay = abort = None
    if "delay" in raw:
        d = raw["delay"]
        seconds = _duration(d.get("fixedDelay"), f"{path}.delay.fixedDelay", problems)
        pct = _percent(d.get("percentage"), f"{path}.delay.percentage", problems)
        delay = FaultDelay(seconds or 0.0, 100.0 if pct is None else pct)
    if "abort" in raw:
        a = raw["abort"]
        status = a.get("httpStatus", 0)
        if not 200 <= status <= 599:
            problems.add(f"{path}.abort.httpStatus", f"{status} is not an HTTP status (200-599)")
        pct = _percent(a.get("percentage"), f"{path}.abort.percentage", problems)
        abort = FaultAbort(status, 100.0 if pct is None else pct)
    if delay is None and abort is None:
        problems.add(path, "a fault needs delay or abort")
    return HTTPFault(delay=delay, abort=abort)


def _http_route(raw: dict[str, Any], ns: str, path: str, problems: Problems) -> HTTPRoute:
    if "route" in raw and "redirect" in raw:
        problems.add(f"{path}.redirect", "a rule has either route or redirect, not both")
    if "route" not in raw and "redirect" not in raw:
        problems.add(path, "a rule needs route or redirect")
    if "redirect" in raw and "rewrite" in raw:
        problems.add(f"{path}.rewrite", "rewrite cannot be used with redirect")
    redirect = None
    if "redirect" in raw:
        rd = raw["redirect"]
        code = rd.get("redirectCode", 301)
        if code not in REDIRECT_CODES:
            problems.add(
                f"{path}.redirect.redirectCode",
                f"{code} is not a redirect code ({', '.join(map(str, sorted(REDIRECT_CODES)))})",
            )
        redirect = HTTPRedirect(
            uri=rd.get("uri"), authority=rd.get("authority"), redirect_code=code
        )
    rewrite = None
    if "rewrite" in raw:
        rewrite = HTTPRewrite(
            uri=raw["rewrite"].get("uri"), authority=raw["rewrite"].get("authority")
        )
    mirror = None
    if "mirror" in raw:
        mirror = _destination(raw["mirror"], ns, f"{path}.mirror", problems)
    return HTTPRoute(
        name=str(raw.get("name", "")),
        matches=tuple(
            _http_match(m, f"{path}.match[{i}]", problems)
            for i, m in enumerate(raw.get("match") or ())
        ),
        routes=_route_destinations(raw.get("route") or [], ns, f"{path}.route", problems),
        redirect=redirect,
        rewrite=rewrite,
        headers=_headers(raw.get("headers")),
        timeout=_duration(raw.get("timeout"), f"{path}.timeout", problems),
        retries=_retries(raw.get("retries"), f"{path}.retries", problems),
        fault=_fault(raw.get("fault"), f"{path}.fault", problems),
        mirror=mirror,
        mirror_percentage=_percent(
            raw.get("mirrorPercentage"), f"{path}.mirrorPercentage", problems
        ),
    )


def _tcp_route(raw: dict[str, Any], ns: str, path: str, problems: Problems) -> TCPRoute:
    matches: list[L4MatchAttributes] = []
    for i, m in enumerate(raw.get("match") or ()):
        _check_port(m.get("port"), f"{path}.match[{i}].port", problems)
        matches.append(
            L4MatchAttributes(
                port=m.get("port"), source_labels=_source_labels(m, f"{path}.match[{i}]", problems)
            )
        )
    if not raw.get("route"):
        problems.add(f"{path}.route", "a tcp rule needs at least one route")
    return TCPRoute(
        matches=tuple(matches),
        routes=_route_destinations(raw.get("route") or [], ns, f"{path}.route", problems),
    )


def convert_virtual_service(
    doc: dict[str, Any], source: str, problems: Problems
) -> VirtualService | None:
    ns, name = _meta(doc, problems)
    spec = doc.get("spec") or {}
    hosts: list[str] = []
    for i, h in enumerate(spec.get("hosts") or ()):
        if not h:
            problems.add(f"spec.hosts[{i}]", "must not be empty")
            continue
        hosts.append(qualify_host(h, ns))
    if not hosts:
        problems.add("spec.hosts", "a VirtualService needs at least one host")
    http = tuple(
        _http_route(r, ns, f"spec.http[{i}]", problems)
        for i, r in enumerate(spec.get("http") or ())
    )
    tcp = tuple(
        _tcp_route(r, ns, f"spec.tcp[{i}]", problems) for i, r in enumerate(spec.get("tcp") or ())
    )
    if not http and not tcp:
        problems.add("spec", "a VirtualService needs http or tcp rules")
    return VirtualService(
        namespace=ns, name=name, hosts=tuple(hosts), http=http, tcp=tcp, source=source
    )


def _load_balancer(
    raw: dict[str, Any] | None, path: str, problems: Problems
) -> LoadBalancer | None:
    if raw is None:
        return None
    simple = None
    if "simple" in raw:
        try:
            simple = SimpleLB(raw["simple"])
        except ValueError:
            allowed = ", ".join(m.value for m in SimpleLB)
            problems.add(f"{path}.simple", f"unknown policy {raw['simple']!r} (one of {allowed})")
    chash = None
    if "consistentHash" in raw:
        ch = raw["consistentHash"]
        cpath = f"{path}.consistentHash"
        given = [k for k in ch if k != "useSourceIp" or ch[k]]
        if len(given) != 1:
            problems.add(
                cpath,
                "needs exactly one of httpHeaderName, httpCookie, useSourceIp, "
                "httpQueryParameterName",
            )
        cookie = None
        if "httpCookie" in ch:
            c = ch["httpCookie"]
            cookie = HTTPCookie(
                c["name"], _duration(c.get("ttl"), f"{cpath}.httpCookie.ttl", problems)
            )
        chash = ConsistentHash(
            http_header_name=ch.get("httpHeaderName"),
            http_cookie=cookie,
            use_source_ip=bool(ch.get("useSourceIp", False)),
            http_query_parameter_name=ch.get("httpQueryParameterName"),
        )
        if simple is not None:
            problems.add(path, "simple and consistentHash cannot both be set")
    locality = None
    if "localityLbSetting" in raw:
        ls = raw["localityLbSetting"]
        locality = LocalityLbSetting(
            enabled=bool(ls.get("enabled", True)),
            failover=tuple((f["from"], f["to"]) for f in ls.get("failover") or ()),
        )
    return LoadBalancer(simple=simple, consistent_hash=chash, locality=locality)


def _non_negative(raw: dict[str, Any], key: str, path: str, problems: Problems) -> int | None:
    value = raw.get(key)
    if value is not None and value < 0:
        problems.add(f"{path}.{key}", f"{value} must not be negative")
    return value if isinstance(value, int) else None


def _connection_pool(
    raw: dict[str, Any] | None, path: str, problems: Problems
) -> ConnectionPool | None:
    if raw is None:
        return None
    tcp, http = raw.get("tcp") or {}, raw.get("http") or {}
    tp, hp = f"{path}.tcp", f"{path}.http"
    return ConnectionPool(
        max_connections=_non_negative(tcp, "maxConnections", tp, problems),
        connect_timeout=_duration(tcp.get("connectTimeout"), f"{tp}.connectTimeout", problems),
        http1_max_pending_requests=_non_negative(http, "http1MaxPendingRequests", hp, problems),
        http2_max_requests=_non_negative(http, "http2MaxRequests", hp, problems),
        max_requests_per_connection=_non_negative(http, "maxRequestsPerConnection", hp, problems),
        idle_timeout=_duration(http.get("idleTimeout"), f"{hp}.idleTimeout", problems),
    )


def _outlier(raw: dict[str, Any] | None, path: str, problems: Problems) -> OutlierDetection | None:
    if raw is None:
        return None
    pct = _non_negative(raw, "maxEjectionPercent", path, problems)
    if pct is not None and pct > 100:
        problems.add(f"{path}.maxEjectionPercent", f"{pct} is not a percentage (0-100)")
    return OutlierDetection(
        consecutive_5xx_errors=_non_negative(raw, "consecutive5xxErrors", path, problems),
        consecutive_gateway_errors=_non_negative(raw, "consecutiveGatewayErrors", path, problems),
        interval=_duration(raw.get("interval"), f"{path}.interval", problems),
        base_ejection_time=_duration(
            raw.get("baseEjectionTime"), f"{path}.baseEjectionTime", problems
        ),
        max_ejection_percent=pct,
    )


def _traffic_policy(
    raw: dict[str, Any] | None, path: str, problems: Problems
) -> TrafficPolicy | None:
    if raw is None:
        return None
    ports: list[PortTrafficPolicy] = []
    seen: set[int] = set()
    for i, p in enumerate(raw.get("portLevelSettings") or ()):
        ppath = f"{path}.portLevelSettings[{i}]"
        number = (p.get("port") or {}).get("number")
        if number is None:
            problems.add(f"{ppath}.port.number", "required field is missing")
            continue
        _check_port(number, f"{ppath}.port.number", problems)
        if number in seen:
            problems.add(f"{ppath}.port.number", f"port {number} is listed twice")
        seen.add(number)
        ports.append(
            PortTrafficPolicy(
                port=number,
                load_balancer=_load_balancer(
                    p.get("loadBalancer"), f"{ppath}.loadBalancer", problems
                ),
                connection_pool=_connection_pool(
                    p.get("connectionPool"), f"{ppath}.connectionPool", problems
                ),
                outlier_detection=_outlier(
                    p.get("outlierDetection"), f"{ppath}.outlierDetection", problems
                ),
            )
        )
    return TrafficPolicy(
        load_balancer=_load_balancer(raw.get("loadBalancer"), f"{path}.loadBalancer", problems),
        connection_pool=_connection_pool(
            raw.get("connectionPool"), f"{path}.connectionPool", problems
        ),
        outlier_detection=_outlier(
            raw.get("outlierDetection"), f"{path}.outlierDetection", problems
        ),
        port_level=tuple(ports),
    )


def convert_destination_rule(
    doc: dict[str, Any], source: str, problems: Problems
) -> DestinationRule | None:
    ns, name = _meta(doc, problems)
    spec = doc.get("spec") or {}
    host = str(spec.get("host", ""))
    if not host:
        problems.add("spec.host", "must not be empty")
    subsets: list[Subset] = []
    names: dict[str, int] = {}
    for i, s in enumerate(spec.get("subsets") or ()):
        path = f"spec.subsets[{i}]"
        sname = str(s.get("name", ""))
        if not _DNS_LABEL.match(sname):
            problems.add(f"{path}.name", f"{sname!r} is not a valid subset name")
        if sname in names:
            problems.add(f"{path}.name", f"subset {sname!r} is also spec.subsets[{names[sname]}]")
        names[sname] = i
        subsets.append(
            Subset(
                name=sname,
                labels=Labels.of(s.get("labels")),
                traffic_policy=_traffic_policy(
                    s.get("trafficPolicy"), f"{path}.trafficPolicy", problems
                ),
            )
        )
    return DestinationRule(
        namespace=ns,
        name=name,
        host=qualify_host(host, ns),
        subsets=tuple(subsets),
        traffic_policy=_traffic_policy(spec.get("trafficPolicy"), "spec.trafficPolicy", problems),
        source=source,
    )


_NETWORKING = (
    "networking.istio.io/v1",
    "networking.istio.io/v1beta1",
    "networking.istio.io/v1alpha3",
)


KINDS: tuple[Kind, ...] = (
    Kind(("v1",), "Pod", POD, convert_pod),
    Kind(("v1",), "Service", SERVICE, convert_service),
    Kind(("v1",), "Node", NODE, convert_node),
    Kind(
        ("security.istio.io/v1", "security.istio.io/v1beta1"),
        "PeerAuthentication",
        PEER_AUTHENTICATION,
        convert_peer_authentication,
    ),
    Kind(
        ("security.istio.io/v1", "security.istio.io/v1beta1"),
        "AuthorizationPolicy",
        AUTHORIZATION_POLICY,
        convert_authorization_policy,
    ),
    Kind(_NETWORKING, "VirtualService", VIRTUAL_SERVICE, convert_virtual_service),
    Kind(_NETWORKING, "DestinationRule", DESTINATION_RULE, convert_destination_rule),
)


def validate(doc: dict[str, Any], kind: Kind, source: str) -> tuple[object | None, Problems]:
    problems = Problems()
    check(doc, kind.shape, "", problems)
    if problems.items:
        return None, problems
    obj = kind.convert(doc, source, problems)
    return obj, problems
