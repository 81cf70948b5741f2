"""``nodeagent ctl explain``: why a request from a pod to a host would be routed where it
goes, and allowed or denied, answered from the live snapshot and the proxy's live state
(balancer counters, outlier ejections, rate-limit buckets) without sending anything.

Each step is the function the data path itself calls (``core.plan`` with its likeliest
draws: no fault fires, the heaviest destination; the balancer's ``explain`` with the
plan's hash key; ``core.peerauth``; admission's ``decide``), so the answer and the
traffic agree; the access log names the same policy and rule for a real request.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from nodeagent.core import authz
from nodeagent.core.clusters import ClusterError, fqdn, port_protocol
from nodeagent.core.outbound import tunnels
from nodeagent.core.paths import BadTarget, request_target
from nodeagent.core.peerauth import effective_mtls
from nodeagent.core.plan import Answer, Connection, Likeliest, Plan, Request
from nodeagent.core.ratelimit import key_value
from nodeagent.core.route import RouteOutcome, select_tcp_route
from nodeagent.model.objects import NO_LOCALITY, Pod, Service, ServicePort, format_locality
from nodeagent.model.security import MtlsMode
from nodeagent.model.snapshot import Endpoint, MeshSnapshot
from nodeagent.model.status import ExplainQuery
from nodeagent.model.traffic import Destination, RouteDestination

if TYPE_CHECKING:
    from nodeagent.proxy.server import Proxy


class ExplainError(ValueError):
    """The question names something the mesh does not have (a clear message for the user)."""


def _find_pod(snap: MeshSnapshot, name: str) -> Pod:
    """The calling workload: a pod or a WorkloadEntry (a VM's), by key or unique name."""
    workloads = (*snap.pods, *snap.workload_entries)
    if "/" in name:
        found = [w for w in workloads if w.key == name][:1]  # a pod before an entry
        if not found:
            raise ExplainError(f"no pod {name} in the mesh, nor a WorkloadEntry")
        return found[0]
    found = [w for w in workloads if w.name == name]
    if not found:
        raise ExplainError(f"no pod named {name} in the mesh, nor a WorkloadEntry")
    if len(found) > 1:
        keys = ", ".join(f"{w.kind} {w.key}" for w in found)
        raise ExplainError(f"workload name {name} is ambiguous ({keys}): use namespace/name")
    return found[0]


def _find_target(
    snap: MeshSnapshot, src: Pod, to: str
) -> tuple[Service | None, ServicePort | None, Pod | None, int]:
    """(service, service port, or a pod addressed directly, port) for ``host[:port]``."""
    host, _, port_s = to.rpartition(":") if ":" in to else (to, "", "")
    if port_s and not port_s.isdigit():
        raise ExplainError(f"bad port in {to!r}")
    port = int(port_s) if port_s else None
    svc = (
        snap.service_for_host(f"{host}.{src.namespace}")
        or snap.service_for_host(host)
        or snap.service_for_address(host)
    )
    if svc is not None:
        if port is None:
            if len(svc.ports) != 1:
                ports = ", ".join(str(p.port) for p in svc.ports)
                raise ExplainError(f"{svc.key} has several ports ({ports}): say {host}:PORT")
            port = svc.ports[0].port
        sp = svc.port(port)
        if sp is None:
            raise ExplainError(f"service {svc.key} has no port {port}")
        return svc, sp, None, port
    pod = snap.pod_by_ip.get(host)
    if pod is None and snap.registry_only:
        raise ExplainError(
            f"{host} is not a service, ServiceEntry host or workload of the mesh: refused: "
            "outboundTrafficPolicy is REGISTRY_ONLY (NR, BlackHoleCluster)"
        )
    if pod is None:
        raise ExplainError(f"{host} is not a service or pod of the mesh (traffic passes through)")
    return None, None, pod, port or 80


def explain(proxy: Proxy, q: ExplainQuery) -> dict[str, Any]:
    """The whole answer, as JSON-ready data; raises ``ExplainError`` for a bad question."""
    snap = proxy.snapshot()
    src = _find_pod(snap, q.from_pod)
    svc, sp, direct, port = _find_target(snap, src, q.to)
    headers = {k.lower(): v for k, v in q.headers}
    # the authority a client such as curl sends: the name it dialled, with a port unless 80
    headers.setdefault("host", q.to if port != 80 else q.to.rsplit(":", 1)[0])
    out: dict[str, Any] = {
        "source": {
            "pod": src.key,
            "node": src.node_name,
            "principal": proxy.identity_principal(src),
        },
        "request": {"to": q.to, "method": q.method, "path": q.path, "headers": headers},
    }
    if src.locality != NO_LOCALITY:  # what the endpoint tiers below are ranked against
        out["source"]["locality"] = format_locality(src.locality)
    try:  # the path routing, policy and the app see (as the L7 path normalizes it)
        path, authority = request_target(
            q.method, q.path, headers["host"], proxy.l7.path_normalization
        )
    except BadTarget as e:
        return _verdict(out, False, 400, f"request target {q.path!r} refused: {e}")
    headers["host"] = authority
    if path != q.path:
        out["request"]["normalized_path"] = path
    dst_pod: Pod | None = direct
    dst_port = port
    proto = port_protocol(sp) if sp is not None else None
    out["protocol"] = {"http1": "HTTP/1.1", "h2": "HTTP/2"}.get(proto or "", "TCP")
    if svc is not None and sp is not None:
        host = fqdn(svc)
        out["service"] = {"name": svc.key, "host": host, "port": sp.port}
        hash_key = None
        if proto is not None:
            conn = Connection(src, out["source"]["principal"], src.pod_ip or "", svc, sp.port)
            request = Request(q.method, path, headers["host"], headers, conn)
            p = proxy.l7.planner.plan(snap, request, Likeliest())
            out["route"] = _route(p)
            if isinstance(p, Answer):
                return _verdict(out, False, *_why_not(p))
            cluster, hash_key = p.cluster, p.hash_key
        else:
            trule = select_tcp_route(snap, host, sp.port, src.labels)
            dests = trule.routes if trule else (RouteDestination(Destination(host), 100),)
            out["route"] = {"tcp_rule": trule is not None, "destinations": _destinations(dests)}
            best = Likeliest().pick(dests)
            if best is None:
                return _verdict(out, False, 503, "the route has no destination")
            try:
                cluster = proxy.l7.clusters.cluster(snap, best.destination, sp.port)
            except ClusterError as e:
                return _verdict(out, False, 503, f"{e} (NC)")
        lbx = proxy.l7.clusters.balancer(cluster, src).explain(hash_key)
        out["endpoints"] = {"cluster": cluster.name, **lbx}
        pick = lbx.get("pick")
        if not isinstance(pick, dict):
            return _verdict(out, False, 503, f"no healthy upstream for {cluster.name} (UH)")
        # the picked endpoint's workload: a pod, a WorkloadEntry or a ServiceEntry endpoint
        dst_pod = next((e.pod for e in cluster.endpoints if e.pod.key == pick["pod"]), None)
        dst_port = int(str(pick["endpoint"]).rsplit(":", 1)[1])
    if dst_pod is None:
        return _verdict(out, False, 503, "no destination pod")
    # outside the mesh (a ServiceEntry's external endpoint): no identity to expect there
    dst_principal = proxy.identity_principal(dst_pod) if dst_pod.in_mesh else "none"
    out["destination"] = {
        "pod": dst_pod.key,
        "node": dst_pod.node_name,
        "port": dst_port,
        "principal": dst_principal,
    }
    if dst_pod.locality != NO_LOCALITY:
        out["destination"]["locality"] = format_locality(dst_pod.locality)
    mtls = effective_mtls(snap, dst_pod, dst_port)
    # the data path's own choice (core.outbound.tunnels), not a second reading of it
    tunnel = tunnels(
        snap, Endpoint(dst_pod, dst_pod.pod_ip or "", dst_port), proxy.identity is not None
    )
    out["peer_authentication"] = {
        "mode": mtls.mode.value,
        "policy": mtls.policy,
        "hop": "HBONE mTLS (port 15008)" if tunnel else "plaintext",
    }
    if not tunnel and mtls.mode is MtlsMode.STRICT:
        return _verdict(out, False, 0, f"plaintext refused: {mtls.policy} requires mTLS")
    http_at_dst = proxy.admission.l7_port(snap, dst_pod, dst_port) is not None
    principal = proxy.identity_principal(src) if tunnel else None
    r = out.get("route") or {}
    route_name = r.get("route_name", "")
    adm = proxy.admission.decide(
        snap,
        dst_pod,
        dst_port,
        principal,
        src.pod_ip or "",
        http=http_at_dst,
        host=headers["host"],
        method=q.method,
        path=path,
        headers=headers,
        route=route_name,
        consume=False,
    )
    rules = proxy.admission.jwt_rules(snap, dst_pod) if http_at_dst else ()
    if rules:
        a = adm.authn
        out["authentication"] = {
            "issuers": [rule.issuer for rule in rules],
            "token": a.status.value if a is not None else "not checked",
            "reason": a.reason if a is not None else "",
            "request_principal": a.principal if a is not None else None,
            "claims": dict(a.claims) if a is not None else {},
        }
        remote = proxy.admission.jwks.state()
        fetched = {r.jwks_uri: remote[r.jwks_uri] for r in rules if r.jwks_uri in remote}
        if fetched:
            out["authentication"]["jwks_uri"] = fetched
        if a is not None and not a.allowed:
            return _verdict(out, False, 401, f"JWT: {a.reason}")
    decision, req = adm.authz, adm.request
    assert decision is not None and req is not None
    out["authorization"] = {
        "enforced": "per request (HTTP attributes)" if http_at_dst else "per connection (L4)",
        "policies": authz.explain(snap, req),
        "decision": {
            "allowed": decision.allowed,
            "policy": decision.policy,
            "rule": decision.rule_index,
            "reason": decision.reason,
        },
    }
    if not decision.allowed:
        return _verdict(out, False, 403, f"RBAC: access denied ({decision.reason})")
    limited = _rate_limits(
        proxy, snap, out, dst_pod, dst_port, http_at_dst, principal, headers, route_name
    )
    if limited:
        return _verdict(out, False, 429, limited)
    how = "HBONE mTLS" if tunnel else "plaintext"
    return _verdict(
        out, True, 0, f"to {dst_pod.key} port {dst_port} on {dst_pod.node_name} ({how})"
    )


def _route(p: Plan | Answer) -> dict[str, Any]:
    """The route section: the plan's route decision, with the rule's settings."""
    d = p.decision
    assert d is not None
    if d.outcome is RouteOutcome.NO_ROUTE:
        return {"outcome": "no rule matches"}
    route: dict[str, Any] = {"virtual_service": None}
    rule = d.rule
    if d.virtual_service is None:
        route["outcome"] = "no VirtualService: the service itself"
    else:
        route["virtual_service"] = d.virtual_service.key
        route["rule"] = d.rule_index
        route["rule_name"] = d.rule_name
        route["match"] = d.match_index
        route["route_name"] = p.route_name
    if rule is not None and rule.redirect is not None:
        route["redirect"] = rule.redirect.uri or rule.redirect.authority
    if rule is not None and rule.fault is not None:
        f = rule.fault
        abort = f.abort
        route["fault"] = {
            "delay": f.delay.percentage if f.delay else None,
            "abort": {"status": abort.http_status, "percent": abort.percentage} if abort else None,
        }
    if rule is not None:
        route["timeout"] = rule.timeout
        route["retries"] = rule.retries.attempts if rule.retries else "default (2)"
    route["destinations"] = _destinations(d.routes)
    return route


def _why_not(a: Answer) -> tuple[int, str]:
    """(status, why) of a request the plan answers without a destination."""
    vs = a.decision.virtual_service
    if a.decision.outcome is RouteOutcome.NO_ROUTE and vs is not None:
        return 404, f"no http[] rule of {vs.key} matches (NR)"
    if a.flag == "NC":
        return 503, f"{a.body} (NC)"
    return 503, "the route has no destination"  # a redirect, or no destinations


def _destinations(dests: tuple[RouteDestination, ...]) -> list[dict[str, Any]]:
    return [
        {"host": r.destination.host, "subset": r.destination.subset, "weight": r.weight}
        for r in dests
    ]


def _rate_limits(
    proxy: Proxy,
    snap: MeshSnapshot,
    out: dict[str, Any],
    pod: Pod,
    port: int,
    http: bool,
    principal: str | None,
    headers: dict[str, str],
    route: str,
) -> str:
    """Fill ``out["rate_limits"]``; return why the request would be limited ('' if not)."""
    limits = proxy.admission.rate_limits(snap, pod, port)
    if not limits:
        return ""
    section: dict[str, Any] = {"policies": [p.key for p in limits]}
    out["rate_limits"] = section
    if pod.key not in proxy.pods:
        section["state"] = (
            f"buckets and quotas are kept by the agent of {pod.node_name}: ask it "
            f"(nodeagent ctl --node {pod.node_name} explain ...)"
        )
        return ""
    scope = "http" if http else "tcp"
    # the bucket each limit would charge this request (the data path's own rule)
    charged = {
        p.key: key_value(p.http.key, principal, headers.get, route) if http and p.http else ""
        for p in limits
    }
    buckets = []
    why = ""
    limiter = proxy.admission.limiter  # (with --workers: the node's buckets, looked up)
    limiter.look(limits, workload=pod.key, http=http, source_principal=principal,
                 header=headers.get, route=route)  # fmt: skip
    for v in proxy.admission.limiter.state(time.monotonic(), limits):
        if v.workload != pod.key or v.scope != scope:
            continue
        mine = v.value == charged.get(v.policy)
        buckets.append(
            {
                "policy": v.policy,
                "scope": v.scope,
                "key": v.key,
                "value": v.value,
                "limit": v.limit,
                "remaining": v.remaining,
                "next_fill_in": round(v.reset, 3),
                "this_request": mine,
            }
        )
        if mine and v.remaining < 1 and not why:
            why = f"local_rate_limited: {v.scope} bucket of {v.policy} is empty"
    section["buckets"] = buckets or "every bucket is full (none used yet)"
    store = proxy.admission.quota_store() if any(p.quotas for p in limits) else None
    if store is not None:
        quotas = []
        for qv in store.state(limits, time.time()):
            mine = qv.principal == (principal or "")
            quotas.append(
                {
                    "policy": qv.policy,
                    "window": qv.window.value,
                    "principal": qv.principal,
                    "limit": qv.limit,
                    "used": qv.used,
                    "window_ends_in": round(qv.reset),
                    "this_request": mine,
                }
            )
            if mine and qv.used >= qv.limit and not why:
                why = f"local_rate_limited: {qv.window.value} quota of {qv.policy} is used up"
        section["quotas"] = quotas or "no unit used in the current windows"
    return why


def _verdict(out: dict[str, Any], allowed: bool, status: int, why: str) -> dict[str, Any]:
    out["verdict"] = {"allowed": allowed, "status": status or None, "why": why}
    return out
