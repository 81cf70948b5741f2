"""The called workload's side of the proxy: which of its ports carry HTTP and need
request-level policy, and the policy stages, in Istio's order, that every request (or,
on other ports, every connection) passes on the workload's own node before it reaches
the app:

1. RequestAuthentication: a JWT present must be valid (else 401 with Envoy's reason);
   its ``iss/sub`` and claims feed authorization (``core.jwt``);
2. AuthorizationPolicy with the mTLS-proven caller identity (else 403 ``RBAC: access
   denied``; ``core.authz``);
3. LocalRateLimit token buckets (else 429 with ``retry-after`` and ``x-ratelimit-*``;
   for TCP: new connections per interval), then quotas per source principal, counted in
   a journal under the agent's state directory (``core.ratelimit``,
   ``nodeagent.proxy.quotastore``).

A port is handled request by request only when it is an HTTP port of a Service
selecting the pod *and* some policy of the workload needs HTTP (HTTP attributes in an
AuthorizationPolicy, a RequestAuthentication, an HTTP rate limit or a quota); otherwise
the connection is admitted once, at L4, and relayed as bytes (cheaper, and what ztunnel
does). Indexes are built once per snapshot; key sets come from ``proxy.jwks``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from nodeagent.core import authz, jwt, ratelimit
from nodeagent.core.authz import AuthzRequest
from nodeagent.core.clusters import Cluster, fqdn, port_protocol
from nodeagent.core.jwt import AuthnResult, AuthnStatus, KeySet
from nodeagent.core.plan import ROUTE_HEADER, Request
from nodeagent.core.ratelimit import UNLIMITED, RateDecision, RateLimiter, strictest
from nodeagent.errors import LocalStateError
from nodeagent.model.authn import JWTRule
from nodeagent.model.objects import Pod, Service, ServicePort
from nodeagent.model.ratelimit import LocalRateLimit
from nodeagent.model.snapshot import Endpoint, MeshSnapshot, PerSnapshot
from nodeagent.model.traffic import HeaderOperations, TrafficPolicy
from nodeagent.proxy.jwks import JwksCache
from nodeagent.proxy.l7conn import Admitted, Exchange
from nodeagent.proxy.l7retry import LocalReply
from nodeagent.proxy.quotastore import QuotaStore
from nodeagent.proxy.sharedbuckets import SharedBuckets

log = logging.getLogger("nodeagent.policy")

L4_KEPT = 4096
"""Admissions of connections (``admit_connection``) remembered per snapshot at most (past
it, all are dropped: callers from many addresses)."""
RBAC_DENIED = "RBAC: access denied"
RATE_LIMITED = "local_rate_limited"


@dataclass(frozen=True)
class HttpPort:
    """One HTTP port of a local workload, as the Service that exposes it names it."""

    service: Service
    port: ServicePort
    protocol: str
    """``http1`` or ``h2``."""
    cluster: Cluster
    """``inbound|<port>||<service host>``: the app itself, one endpoint."""


def _http_ports(snap: MeshSnapshot) -> dict[tuple[str, int], HttpPort]:
    """(pod key, container port) → the HTTP Service port that targets it (the first
    Service by name when several do)."""
    out: dict[tuple[str, int], HttpPort] = {}
    for svc in sorted(snap.services, key=lambda s: s.key):
        for sp in svc.ports:
            proto = port_protocol(sp)
            if proto is None:
                continue
            for ep in snap.endpoints(svc, sp):
                key = (ep.pod.key, ep.port)
                if key in out:
                    continue
                host = fqdn(svc)
                out[key] = HttpPort(
                    service=svc,
                    port=sp,
                    protocol=proto,
                    cluster=Cluster(
                        name=f"inbound|{ep.port}||{host}",
                        host=host,
                        service=svc,
                        port=sp,
                        subset=None,
                        endpoints=(Endpoint(pod=ep.pod, ip=ep.ip, port=ep.port),),
                        policy=TrafficPolicy(),
                    ),
                )
    return out


@dataclass(frozen=True)
class Admission:
    """The outcome of the policy stages for one request or connection."""

    allowed: bool
    status: int = 0
    """401, 403 or 429 when denied (0 for a TCP connection: it is closed)."""
    flag: str = ""
    body: str = ""
    reason: str = ""
    authn: AuthnResult | None = None
    authz: authz.AuthzDecision | None = None
    rate: RateDecision = UNLIMITED
    request: AuthzRequest | None = None
    """What authorization looked at (for ``ctl explain`` and live re-checks)."""

    def deciding(self) -> tuple[str, int | None]:
        """(policy, rule index) that decided: the AuthorizationPolicy, or the rate limit."""
        if self.authz is not None and (not self.authz.allowed or not self.rate.policy):
            return self.authz.policy, self.authz.rule_index
        return self.rate.policy, None


def _route_names(snap: MeshSnapshot) -> frozenset[str]:
    return frozenset(
        r.name or f"{vs.key}#{i}" for vs in snap.virtual_services for i, r in enumerate(vs.http)
    )


class InboundPolicy:
    """Admission at the called workload (JWT, authorization, rate limits, quotas); one
    instance per agent, on its event loop."""

    def __init__(
        self,
        snapshot: Callable[[], MeshSnapshot],
        state_dir: Path | None = None,
        jwks_ca_bundle: str = "",
    ) -> None:
        self.snapshot = snapshot
        self._ports = PerSnapshot(_http_ports)
        self.limiter = RateLimiter()
        self.state_dir = state_dir
        self._quotas: QuotaStore | None = None
        self._quota_error = ""
        self.jwks = JwksCache(snapshot, jwks_ca_bundle)
        self.spans_for: Callable[[Pod], bool] | None = None
        """Whether a workload's requests may get SERVER spans here (spans are exported
        and its Telemetry reports some): its HTTP ports are then served request by
        request; None: spans are off."""
        self._jwt_rules: PerSnapshot[dict[str, tuple[JWTRule, ...]]] = PerSnapshot(lambda snap: {})
        """pod key → the JWT rules that apply to it, filled as pods are asked about."""
        self._routes = PerSnapshot(_route_names)
        self._l4: PerSnapshot[dict[tuple[int, int, str | None, str], tuple[Admission, Pod]]]
        self._l4 = PerSnapshot(lambda snap: {})
        """(pod, port, caller's principal and IP) → the admission of a connection to a
        port without rate limits."""

    def on_snapshot(self, snap: MeshSnapshot) -> None:
        """A new snapshot: rate-limit buckets of changed or removed limits are dropped;
        in-mesh JWKS URLs are fetched now, before the first request needs them."""
        self.limiter.sync(snap.local_rate_limits)
        self.jwks.prefetch(
            [r.jwks_uri for p in snap.request_authentications for r in p.jwt_rules if r.jwks_uri]
        )

    def share(self, table: SharedBuckets) -> None:
        """Take tokens from ``table``, which the node's other processes take from too
        (``--workers``), rather than from buckets of this process's own."""
        self.limiter = RateLimiter(shared=table)

    def close(self) -> None:
        if self._quotas is not None:
            self._quotas.close()

    def quota_store(self) -> QuotaStore | None:
        """The journal under the state directory, opened (and its counts loaded) the
        first time a quota applies; None without a state directory or when it cannot be
        opened (logged once; quotas are then not enforced)."""
        if self._quotas is None and self.state_dir is not None and not self._quota_error:
            try:
                self._quotas = QuotaStore(self.state_dir / "quotas.journal")
            except LocalStateError as e:
                self._quota_error = str(e)
                log.error("quotas are not enforced: %s", e)
        return self._quotas

    # -- which ports, which rules -----------------------------------------------------
    def http_port(self, snap: MeshSnapshot, pod: Pod, port: int) -> HttpPort | None:
        return self._ports.get(snap).get((pod.key, port))

    def rate_limits(self, snap: MeshSnapshot, pod: Pod, port: int) -> Sequence[LocalRateLimit]:
        if not snap.local_rate_limits:
            return ()
        return ratelimit.applicable(snap.local_rate_limits, pod.namespace, pod.labels, port)

    def jwt_rules(self, snap: MeshSnapshot, pod: Pod) -> tuple[JWTRule, ...]:
        if not snap.request_authentications:
            return ()
        by_pod = self._jwt_rules.get(snap)
        rules = by_pod.get(pod.key)
        if rules is None:
            policies = jwt.applicable_policies(
                snap.request_authentications, pod, snap.root_namespace
            )
            rules = by_pod[pod.key] = tuple(r for p in policies for r in p.jwt_rules)
        return rules

    def l7_port(self, snap: MeshSnapshot, pod: Pod, port: int) -> HttpPort | None:
        """The HTTP port to serve request by request, or None: admit the connection once
        and relay bytes."""
        hp = self.http_port(snap, pod, port)
        if hp is None:
            return None
        if self.spans_for is not None and self.spans_for(pod):
            return hp
        if authz.needs_http(snap, pod) or self.jwt_rules(snap, pod):
            return hp
        if any(p.http is not None or p.quotas for p in self.rate_limits(snap, pod, port)):
            return hp
        return None

    def keys(self, rule: JWTRule) -> KeySet:
        """The rule's key set (``proxy.jwks``): inline JWKS parsed once, a file re-read
        when it changed, an in-mesh URL fetched in the background."""
        if rule.jwks is not None:
            return self.jwks.inline(rule.jwks, rule.issuer)
        return self.jwks.uri(rule.jwks_uri or "", rule.issuer)

    # -- the stages -------------------------------------------------------------------
    def decide(
        self,
        snap: MeshSnapshot,
        pod: Pod,
        port: int,
        source_principal: str | None,
        source_ip: str,
        *,
        http: bool,
        host: str | None = None,
        method: str | None = None,
        path: str = "",
        headers: dict[str, str] | None = None,
        route: str = "",
        consume: bool = True,
    ) -> Admission:
        """The policy stages for one request (``http``) or one new connection; with
        ``consume`` False nothing is taken from buckets or quotas (``ctl explain``).
        ``path`` is the normalized request target (``core.paths.request_target``)."""
        hdrs = headers if headers is not None else {}
        authn: AuthnResult | None = None
        if http:
            rules = self.jwt_rules(snap, pod)
            if rules:
                query = path.split("?", 1)[1] if "?" in path else ""
                authn = jwt.authenticate(
                    [(r, self.keys(r)) for r in rules], hdrs, query, time.time()
                )
                if authn.status is AuthnStatus.INVALID:
                    return Admission(
                        False, 401, "UAEX", authn.reason, f"JWT: {authn.reason}", authn
                    )
                # authorization sees the headers the app will see: tokens the rule does
                # not forward and client-sent copies of output headers are gone
                hdrs = _apply_authn_headers(hdrs, authn)
        valid = authn is not None and authn.status is AuthnStatus.VALID
        req = AuthzRequest(
            destination=pod,
            destination_port=port,
            source_principal=source_principal,
            source_ip=source_ip,
            destination_ip=pod.pod_ip or "",
            is_http=http,
            host=host,
            method=method,
            path=path if http else None,
            headers=hdrs,
            request_principal=authn.principal if valid and authn is not None else None,
            claims=dict(authn.claims) if valid and authn is not None else None,
        )
        decision = authz.evaluate(snap, req)
        if not decision.allowed:
            why = f"{RBAC_DENIED}: {decision.reason}"
            return Admission(False, 403, "RBAC", RBAC_DENIED, why, authn, decision, request=req)
        rate = UNLIMITED
        limits = self.rate_limits(snap, pod, port)
        if limits and consume:
            now = time.monotonic()
            if http:
                rate = self.limiter.check_http(
                    limits,
                    workload=pod.key,
                    source_principal=source_principal,
                    header=hdrs.get,
                    route=route,
                    now=now,
                )
            else:
                rate = self.limiter.check_tcp(limits, workload=pod.key, now=now)
            store = self.quota_store() if any(p.quotas for p in limits) else None
            if rate.allowed and store is not None:
                rate = strictest((rate, store.check(limits, source_principal, time.time())))
            if not rate.allowed:
                why = f"{RATE_LIMITED}: {rate.scope} limit of {rate.policy}"
                return Admission(
                    False, 429, "RL", RATE_LIMITED, why, authn, decision, rate, request=req
                )
        return Admission(True, authn=authn, authz=decision, rate=rate, request=req)

    def route_names(self, snap: MeshSnapshot) -> frozenset[str]:
        """Every route name the snapshot's VirtualServices define (``core.plan.route_name``)."""
        return self._routes.get(snap)

    def admit(self, req: Request, x: Exchange) -> Admitted:
        """Let one request through to the app (what the app gets, and headers for its
        response); or raise the ``LocalReply`` it gets."""
        snap = self.snapshot()
        conn = req.conn
        pod = snap.pod_by_key.get(conn.pod.key, conn.pod)
        principal = conn.source_principal if conn.source_principal != "unknown" else None
        hdrs = req.headers
        route = hdrs.pop(ROUTE_HEADER, "")
        route_sent = bool(route)
        if route and (principal is None or route not in self.route_names(snap)):
            route = ""  # only a meshed caller's node says which route it took
        upgrade = hdrs.get("upgrade")
        if upgrade is not None and upgrade.strip().lower() != "websocket":
            x.detail = f"Upgrade: {upgrade} refused where per-request policy applies"
            raise LocalReply(403, "RBAC", RBAC_DENIED)
        target = req.target  # origin-form, normalized by the L7 path (``core.paths``)
        try:
            a = self.decide(
                snap,
                pod,
                conn.port,
                principal,
                conn.source_ip,
                http=True,
                host=req.authority,
                method=req.method,
                path=target,
                headers=hdrs,
                route=route,
            )
        except Exception as e:  # a bug must not let a request through, nor kill the loop
            log.exception("policy check of %s %s failed", req.method, req.target[:100])
            x.detail = f"policy check failed: {type(e).__name__}: {e}"
            raise LocalReply(500, "UAEX", "policy check failed") from None
        if a.authz is not None:
            x.policy = a.authz.policy
            x.policy_rule = a.authz.rule_index
        if a.authn is not None:
            x.request_principal = a.authn.principal or ""
        rate_headers = a.rate.headers()
        if not a.allowed:
            x.detail = a.reason
            extra: tuple[tuple[str, str], ...] = rate_headers
            if a.status == 401:
                extra = (("www-authenticate", 'Bearer realm="nodeagent", error="invalid_token"'),)
            raise LocalReply(a.status, a.flag, a.body, extra)
        ops = _authn_ops(a.authn) if a.authn is not None else None
        if route_sent:  # the caller's node's word is for this node only
            ops = HeaderOperations(
                set=ops.set if ops is not None else (),
                remove=(ROUTE_HEADER, *(ops.remove if ops is not None else ())),
            )
        return Admitted(
            target,
            (ops,) if ops is not None else (),
            (HeaderOperations(set=rate_headers),) if rate_headers else (),
            a.request,
        )

    def connection_rate(self, snap: MeshSnapshot, pod: Pod, port: int) -> RateDecision:
        """The new-connection limit (``spec.tcp``) for a port served request by request."""
        limits = [p for p in self.rate_limits(snap, pod, port) if p.tcp is not None]
        if not limits:
            return UNLIMITED
        return self.limiter.check_tcp(limits, workload=pod.key, now=time.monotonic())

    def admit_connection(
        self, snap: MeshSnapshot, pod: Pod, port: int, principal: str | None, source_ip: str
    ) -> Admission:
        """One new TCP connection (a port served as bytes): authorization, then the
        connection rate limit. Without a rate limit on the port the answer depends on the
        snapshot and the caller only: it is remembered (``L4_KEPT``) until the snapshot
        changes."""
        try:
            if self.rate_limits(snap, pod, port):  # tokens are taken per connection
                return self.decide(snap, pod, port, principal, source_ip, http=False)
            known = self._l4.get(snap)
            key = (id(pod), port, principal, source_ip)
            hit = known.get(key)
            if hit is None:
                if len(known) >= L4_KEPT:
                    known.clear()
                # the entry holds the pod: its id in the key stays its own
                adm = self.decide(snap, pod, port, principal, source_ip, http=False)
                hit = known[key] = (adm, pod)
            return hit[0]
        except Exception as e:
            log.exception("policy check of a connection to %s port %d failed", pod.key, port)
            why = f"policy check failed: {type(e).__name__}: {e}"
            return Admission(False, 403, "UAEX", why, why)


def _authn_ops(a: AuthnResult) -> HeaderOperations | None:
    """The request header changes RequestAuthentication makes (remove, then set)."""
    if not a.remove_headers and not a.set_headers:
        return None
    return HeaderOperations(set=a.set_headers, remove=a.remove_headers)


def _apply_authn_headers(hdrs: dict[str, str], a: AuthnResult) -> dict[str, str]:
    ops = _authn_ops(a)
    if ops is None:
        return hdrs
    out = {k: v for k, v in hdrs.items() if k not in {n.lower() for n in ops.remove}}
    out.update((k.lower(), v) for k, v in ops.set)
    return out
