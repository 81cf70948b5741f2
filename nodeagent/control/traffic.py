"""The ``networking.istio.io`` VirtualService and DestinationRule kinds: their shapes (the
supported subset of Istio's fields) and their conversion to ``model.traffic``, each problem
named by its field path."""

from __future__ import annotations

from typing import Any

from nodeagent.control.fields import DNS_LABEL, check_port, read_duration, read_meta
from nodeagent.control.schema import (
    BOOL,
    INT,
    STR,
    STR_MAP,
    Kind,
    ListOf,
    MapOf,
    Obj,
    Problems,
    Scalar,
    Shape,
    resource,
    shorten,
)
from nodeagent.core.regex import RegexError, compile_regex
from nodeagent.model.objects import Labels
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

API_VERSIONS = (
    "networking.istio.io/v1",
    "networking.istio.io/v1beta1",
    "networking.istio.io/v1alpha3",
)

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
VIRTUAL_SERVICE = resource(
    Obj(
        {"hosts": ListOf(STR), "http": ListOf(HTTP_ROUTE), "tcp": ListOf(TCP_ROUTE)},
        required=frozenset({"hosts"}),
    ),
    spec_required=True,
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
DESTINATION_RULE = resource(
    Obj(
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
    spec_required=True,
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
            return StringMatch(kind, value, compile_regex(value))
        except RegexError as e:
            problems.add(
                f"{path}.regex",
                f"invalid regular expression {shorten(value)}: {e} (RE2 syntax is "
                "required, as Istio's: no backreferences, no lookahead or lookbehind)",
            )
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
    check_port(port, f"{path}.port.number", problems)
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
    check_port(port, f"{path}.port", problems)
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
        per_try_timeout=read_duration(raw.get("perTryTimeout"), f"{path}.perTryTimeout", problems),
        retry_on=tuple(retry_on),
    )


def _fault(raw: dict[str, Any] | None, path: str, problems: Problems) -> HTTPFault | None:
    if raw is None:
        return None
    delay = abort = None
    if "delay" in raw:
        d = raw["delay"]
        seconds = read_duration(d.get("fixedDelay"), f"{path}.delay.fixedDelay", problems)
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
        timeout=read_duration(raw.get("timeout"), f"{path}.timeout", problems),
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
        check_port(m.get("port"), f"{path}.match[{i}].port", problems)
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
    ns, name = read_meta(doc, problems)
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
                c["name"], read_duration(c.get("ttl"), f"{cpath}.httpCookie.ttl", problems)
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
        connect_timeout=read_duration(tcp.get("connectTimeout"), f"{tp}.connectTimeout", problems),
        http1_max_pending_requests=_non_negative(http, "http1MaxPendingRequests", hp, problems),
        http2_max_requests=_non_negative(http, "http2MaxRequests", hp, problems),
        max_requests_per_connection=_non_negative(http, "maxRequestsPerConnection", hp, problems),
        idle_timeout=read_duration(http.get("idleTimeout"), f"{hp}.idleTimeout", problems),
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
        interval=read_duration(raw.get("interval"), f"{path}.interval", problems),
        base_ejection_time=read_duration(
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
        check_port(number, f"{ppath}.port.number", problems)
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
    ns, name = read_meta(doc, problems)
    spec = doc.get("spec") or {}
    host = str(spec.get("host", ""))
    if not host:
        problems.add("spec.host", "must not be empty")
    subsets: list[Subset] = []
    names: dict[str, int] = {}
    for i, s in enumerate(spec.get("subsets") or ()):
        path = f"spec.subsets[{i}]"
        sname = str(s.get("name", ""))
        if not DNS_LABEL.match(sname):
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


VIRTUAL_SERVICE_KIND = Kind(
    API_VERSIONS, "VirtualService", VIRTUAL_SERVICE, convert_virtual_service
)
DESTINATION_RULE_KIND = Kind(
    API_VERSIONS, "DestinationRule", DESTINATION_RULE, convert_destination_rule
)
