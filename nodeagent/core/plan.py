"""The plan of one HTTP request: everything decided about it before its first attempt,
as data, by one pure function that the data path and ``ctl explain`` both call.

Owns: the ``Request`` value (what routing and admission read of one request and of the
``Connection`` it came on), ``Planner.plan`` and what it returns (a ``Plan`` to send, or
an ``Answer`` the proxy gives itself: no route, a redirect, a fault's abort, a bad
destination), the memo of route decisions per snapshot, the random draws a plan makes
(``Draws``; ``Likeliest`` for ``ctl explain``) and the header operations a plan carries.

A plan names the route (``core.route``) and its name, a fault's delay, the weighted
destination and its cluster (``core.clusters``), ``rewrite.uri`` and
``rewrite.authority``, the retry policy and the route timeout, the trace context and
request id headers to add, request and response header operations, the consistent-hash
key (``core.balancer``) and where a copy of the request goes (``mirror``). No I/O, no
asyncio, no clock: the proxy executes a plan (waits the delay, gives the answer, runs
the attempts) and decides none of it again.
"""

from __future__ import annotations

import itertools
import random
import weakref
from typing import Final, NamedTuple

from nodeagent.core.balancer import hash_key_for
from nodeagent.core.clusters import Cluster, ClusterError, Clusters, fqdn
from nodeagent.core.route import (
    MEMO_MAX,
    RequestInfo,
    RouteDecision,
    RouteOutcome,
    decided_by_request_line,
    pick_weighted,
    select_route,
)
from nodeagent.model.objects import Pod, Service
from nodeagent.model.ratelimit import KeyKind
from nodeagent.model.snapshot import MeshSnapshot
from nodeagent.model.traffic import (
    DEFAULT_RETRY,
    Destination,
    HeaderOperations,
    Headers,
    HTTPRetry,
    HTTPRoute,
    MatchKind,
    RouteDestination,
)

ROUTE_HEADER = "x-nodeagent-route"
"""Set by the caller's node proxy on each request it routes (the route taken), read and
removed by the called node (rate limits keyed by route)."""

NO_RETRY = HTTPRetry(attempts=0)
"""At the called workload: the caller's node retries, not this one."""


# Values made per request (and per connection) are plain classes, not dataclasses:
# compiled, a dataclass's __init__ stays interpreted (~3,000 instructions a call).


class Connection:
    """The client connection a request came on, as the mesh knows it (one per
    connection)."""

    def __init__(
        self,
        pod: Pod,
        source_principal: str,
        source_ip: str,
        service: Service,
        port: int,
        key: str = "",
    ) -> None:
        self.pod = pod
        """The local workload: the caller on its own node, the callee on the called
        node."""
        self.source_principal = source_principal
        """The caller's identity; ``unknown`` without mTLS."""
        self.source_ip = source_ip
        self.service = service
        self.port = port
        """The port the connection was made to: the service port on the caller's node,
        the workload's own port on the called node."""
        self.key = key
        """Tells client connections apart (``peer-ip:port>local-ip:port``): a generated
        consistent-hash cookie is a hash of it."""
        self.last_routed: Routed | None = None
        """The remembered route decision of this connection's last request, for the next
        one with the same request line (most are), found without a key's tuple and hash;
        valid for the ``_Memo`` numbered ``last_memo`` (``Planner._route``)."""
        self.last_memo = -1
        self.last_method = ""
        self.last_target = ""
        self.last_authority = ""


class Request:
    """One HTTP request, as routing and admission read it."""

    def __init__(
        self, method: str, target: str, authority: str, headers: dict[str, str], conn: Connection
    ) -> None:
        self.method = method
        self.target = target
        """Path and query in origin-form, normalized (``core.paths.request_target``)."""
        self.authority = authority
        """``:authority`` or ``Host`` (an absolute-form target's own authority)."""
        self.headers = headers
        """Lowercase names, a repeated header joined (``join_headers``)."""
        self.conn = conn


def join_headers(headers: tuple[tuple[str, str], ...]) -> dict[str, str]:
    """A request's headers as ``Request.headers``: repeated ones joined with ``,`` (a
    cookie with ``;``)."""
    out: dict[str, str] = {}
    for k, v in headers:
        if k in out:
            out[k] = f"{out[k]}, {v}" if k != "cookie" else f"{out[k]}; {v}"
        else:
            out[k] = v
    return out


def apply_header_ops(headers: list[tuple[str, str]], ops: HeaderOperations) -> None:
    """Istio's header operations, in place: ``set`` replaces, ``add`` appends, ``remove``
    drops (names are case-insensitive)."""
    if ops.remove or ops.set:
        drop = {n.lower() for n in ops.remove} | {n.lower() for n, _ in ops.set}
        headers[:] = [(k, v) for k, v in headers if k.lower() not in drop]
    for n, v in ops.set:
        headers.append((n.lower(), v))
    for n, v in ops.add:
        headers.append((n.lower(), v))


class Answer:
    """A request the proxy answers itself instead of sending it on."""

    def __init__(
        self,
        status: int,
        flag: str,
        body: str,
        decision: RouteDecision,
        route_name: str,
        location: str | None = None,
        delay: float | None = None,
    ) -> None:
        self.status = status
        self.flag = flag
        """Envoy's response flag: ``NR`` (no route, no destination), ``FI`` (a fault's
        abort), ``NC`` (a destination that does not exist); empty for a redirect."""
        self.body = body
        self.decision = decision
        self.route_name = route_name
        self.location = location
        """Where a redirect sends the client."""
        self.delay = delay
        """A fault's delay to wait before answering."""


class Plan:
    """A request to send upstream, and how."""

    def __init__(
        self,
        cluster: Cluster,
        path: str,
        authority: str,
        decision: RouteDecision | None = None,
        route_name: str = "",
        delay: float | None = None,
        *,
        retry: HTTPRetry = DEFAULT_RETRY,
        request_ops: tuple[HeaderOperations, ...] = (),
        response_ops: tuple[HeaderOperations, ...] = (),
    ) -> None:
        self.cluster = cluster
        self.path = path
        """The request target after ``rewrite.uri``."""
        self.authority = authority
        """The authority after ``rewrite.authority``."""
        self.decision = decision
        """None at the called workload's node: requests are admitted there, not routed."""
        self.route_name = route_name
        self.delay = delay
        """A fault's delay to wait before the first attempt."""
        self.retry = retry
        self.timeout: float | None = None
        """The route's timeout (seconds), for all attempts together."""
        self.hash_key: str | None = None
        self.set_cookie: str | None = None
        """A consistent-hash cookie to set on the response."""
        self.trace_id = ""
        self.request_id = ""
        self.mirror: Destination | None = None
        """Where a copy of the request goes (``mirror``, drawn by ``mirrorPercentage``)."""
        self.remove_headers: tuple[str, ...] = ()
        """Dropped from the client's headers first (a client cannot claim a route)."""
        self.add_headers: tuple[tuple[str, str], ...] = ()
        """Then added: trace context, request id, ``x-forwarded-proto``, the route taken."""
        self.request_ops = request_ops
        """Then applied in order: the rule's, then the destination's."""
        self.response_ops = response_ops

    def only_adds(self) -> bool:
        """``edit_request`` only appends ``add_headers``: each of the client's fields stays
        as it is, in its place (so its lines may go upstream as they came)."""
        return not self.remove_headers and not self.request_ops

    def edit_request(self, headers: list[tuple[str, str]]) -> None:
        """The plan's changes to the headers sent upstream, in place."""
        if self.remove_headers:
            drop = self.remove_headers
            headers[:] = [(k, v) for k, v in headers if k not in drop]
        headers.extend(self.add_headers)
        for ops in self.request_ops:
            apply_header_ops(headers, ops)


class Routed(NamedTuple):
    """What routing decided for a request line (remembered per snapshot when nothing else,
    headers or the source, could change it)."""

    decision: RouteDecision
    name: str
    """``route_name(decision)``."""
    cluster: Cluster | None
    """The cluster of the rule's only destination; None: pick by weight per request."""
    by_request_line: bool
    plain: bool
    """The rule asks for nothing but its destinations (no redirect, fault, rewrite,
    retries, timeout, mirror or header operations): ``plan`` reads none of those fields
    (model objects: each read is an interpreted attribute lookup)."""
    direct: bool
    """``plain``, to ``cluster``, with no header operations on the destination and no
    consistent hashing: a plan is the cluster and the headers every request gets."""


def _plain(rule: HTTPRoute | None) -> bool:
    return rule is None or (
        rule.redirect is None
        and rule.fault is None
        and rule.rewrite is None
        and rule.retries is None
        and rule.timeout is None
        and rule.mirror is None
        and rule.headers is None
    )


def route_name(d: RouteDecision) -> str:
    """The route name of the access log, metrics and rate-limit keys."""
    if d.virtual_service is None or d.rule_index is None:
        return ""
    return d.rule_name or f"{d.virtual_service.key}#{d.rule_index}"


def trace_id(traceparent: str | None) -> str:
    """The trace id of a W3C ``traceparent`` header ("" when absent or malformed)."""
    if traceparent is None or traceparent.count("-") < 3:
        return ""
    return traceparent.split("-")[1]


class Draws:
    """The random choices of a plan, from one generator (the data path's)."""

    def __init__(self, rnd: random.Random) -> None:
        self.rnd = rnd
        self.ids = ""
        """New ids for ``_ID_BATCH`` requests, ``ID_WIDTH`` characters each: a
        ``traceparent`` value, then a request id (``new_ids``)."""
        self._at = _BATCH_CHARS  # (none drawn yet)

    def chance(self, percent: float) -> bool:
        """True ``percent`` % of the time (a fault's delay or abort)."""
        return self.rnd.random() * 100 < percent

    def pick(self, routes: tuple[RouteDestination, ...]) -> RouteDestination | None:
        """A destination by weight."""
        return pick_weighted(routes, self.rnd.random())

    def new_ids(self) -> int:
        """Where a request's new ids start in ``ids``: for correlation, not secrets (the
        seeded generator, not a syscall per request). Drawn and formatted ``_ID_BATCH``
        requests at a time, in place: a request takes slices of the batch, no draw, format
        or join of its own (those cost more than the rest of its plan)."""
        at = self._at
        if at >= _BATCH_CHARS:
            self.ids = _id_batch(self.rnd)
            at = 0
        self._at = at + ID_WIDTH
        return at


def _id_batch(rnd: random.Random) -> str:
    """``_ID_BATCH`` requests' new ids, ``ID_WIDTH`` characters each: random hex digits,
    then the fixed characters of each id written over their columns."""
    n = _BATCH_CHARS // 2
    ids = bytearray(rnd.getrandbits(n * 8).to_bytes(n, "little").hex(), "ascii")
    for at, fixed in _FIXED:
        ids[at::ID_WIDTH] = fixed
    for at, table in _MAPPED:
        ids[at::ID_WIDTH] = ids[at::ID_WIDTH].translate(table)
    return ids.decode("ascii")


class Likeliest(Draws):
    """What ``ctl explain`` shows: no fault fires, the heaviest destination is taken."""

    def __init__(self) -> None:
        super().__init__(random.Random(0))

    def chance(self, percent: float) -> bool:
        return False

    def pick(self, routes: tuple[RouteDestination, ...]) -> RouteDestination | None:
        return max(routes, key=_weight) if routes else None


def _weight(r: RouteDestination) -> int:
    return r.weight


ID_WIDTH: Final = 91
"""Characters a request's new ids take in a batch (``_LAYOUT``)."""
_TRACEPARENT: Final = 55
"""Where the request id starts (the ``traceparent`` value ends)."""
_LAYOUT = "00-" + "x" * 31 + "o-" + "x" * 15 + "o-00" + "xxxxxxxx-xxxx-4xxx-vxxx-" + "x" * 12
"""A request's new ids in a batch: ``00-{trace id}-{span id}-00``, the ``traceparent``
of a trace that is not sampled, then the request id (a version 4 UUID). ``x``: a random
hex digit; ``o``: a random odd one (neither id may be all zeros); ``v``: the UUID's
variant digit."""
_ID_BATCH: Final = 64
_BATCH_CHARS: Final = ID_WIDTH * _ID_BATCH
_FIXED = tuple((at, c.encode() * _ID_BATCH) for at, c in enumerate(_LAYOUT) if c not in "xov")
"""The columns of a batch that are the same for every request, and their bytes."""
_ODD = bytes.maketrans(b"02468ace", b"13579bdf")
_VARIANT = bytes.maketrans(b"0123456789abcdef", b"89ab" * 4)
_MAPPED = tuple((at, _ODD if c == "o" else _VARIANT) for at, c in enumerate(_LAYOUT) if c in "ov")
"""The columns of a batch whose random digit is mapped, and how."""


class Planner:
    """Plans the requests of local pods (one per agent): keeps the route decisions of
    the serving snapshot, and the clusters and balancers through ``Clusters``."""

    def __init__(self, clusters: Clusters) -> None:
        self.clusters = clusters
        self._memo: _Memo | None = None
        """What is remembered of the serving snapshot (``memo``)."""

    def memo(self, snap: MeshSnapshot) -> _Memo:
        """What is remembered of ``snap``: made on first use, made again when the snapshot
        changes, held without keeping an old snapshot alive (``PerSnapshot``'s rule, kept
        here: compiled, no interpreted call per request)."""
        memo = self._memo
        if memo is None or memo.of() is not snap:
            memo = self._memo = _Memo(snap)
        return memo

    def route(self, snap: MeshSnapshot, req: Request) -> Routed:
        """The route decision for ``req`` (remembered when only its request line counts)."""
        return self._route(snap, req, self.memo(snap))

    def _route(self, snap: MeshSnapshot, req: Request, remembered: _Memo) -> Routed:
        conn = req.conn
        method, target, authority = req.method, req.target, req.authority
        routed = conn.last_routed
        if (
            routed is not None
            and conn.last_memo == remembered.number
            and conn.last_target == target
            and conn.last_method == method
            and conn.last_authority == authority
        ):
            return routed
        memo = remembered.routed
        key = (conn.service.key, conn.port, method, target, authority)
        routed = memo.get(key)
        if routed is None:
            decision = select_route(snap, fqdn(conn.service), _request_info(req))
            cluster: Cluster | None = None
            routes = decision.routes
            if decision.outcome is not RouteOutcome.NO_ROUTE and len(routes) == 1:
                try:
                    cluster = self.clusters.cluster(snap, routes[0].destination, conn.port)
                except ClusterError:  # raised again per request, on the slow path
                    cluster = None
            plain = _plain(decision.rule)
            direct = False
            if cluster is not None and plain and routes[0].headers is None:
                lb = cluster.policy.load_balancer
                direct = lb is None or lb.consistent_hash is None
            routed = Routed(
                decision,
                route_name(decision),
                cluster,
                decided_by_request_line(decision),
                plain,
                direct,
            )
            if routed.by_request_line:
                if len(memo) >= MEMO_MAX:
                    memo.clear()
                memo[key] = routed
        if routed.by_request_line:
            conn.last_routed, conn.last_memo = routed, remembered.number
            conn.last_method, conn.last_target, conn.last_authority = method, target, authority
        return routed

    def plan(self, snap: MeshSnapshot, req: Request, draws: Draws) -> Plan | Answer:
        """Everything decided about ``req`` before its first attempt."""
        memo = self.memo(snap)
        routed = self._route(snap, req, memo)
        decision, name = routed.decision, routed.name
        if routed.direct and routed.cluster is not None:  # (no model object read per request)
            p = Plan(routed.cluster, req.target, req.authority, decision, name)
            _add_headers(p, req.headers, draws, name, memo.route_keyed)
            return p
        if decision.outcome is RouteOutcome.NO_ROUTE:
            return Answer(
                404,
                "NR",
                f"no VirtualService route of {decision.service_fqdn} matches this request",
                decision,
                name,
            )
        rule = None if routed.plain else decision.rule  # (None: nothing of it to apply)
        delay: float | None = None
        if rule is not None and rule.redirect is not None:
            rd = rule.redirect
            target = rd.uri if rd.uri is not None else req.target
            location = f"http://{rd.authority or req.authority}{target}"
            return Answer(rd.redirect_code, "", "", decision, name, location)
        if rule is not None and rule.fault is not None:
            f = rule.fault
            if f.delay is not None and draws.chance(f.delay.percentage):
                delay = f.delay.fixed_delay
            if f.abort is not None and draws.chance(f.abort.percentage):
                return Answer(
                    f.abort.http_status, "FI", "fault filter abort", decision, name, None, delay
                )
        rdest: RouteDestination | None
        conn = req.conn
        if routed.cluster is not None:  # one destination: decided with the route
            rdest, cluster = decision.routes[0], routed.cluster
        else:
            rdest = draws.pick(decision.routes)
            if rdest is None:
                why = f"route {name or decision.service_fqdn} has no destinations"
                return Answer(503, "NR", why, decision, name, None, delay)
            try:
                cluster = self.clusters.cluster(snap, rdest.destination, conn.port)
            except ClusterError as e:
                return Answer(503, "NC", str(e), decision, name, None, delay)
        p = Plan(cluster, req.target, req.authority, decision, name, delay)
        if rule is not None:
            rewrite = rule.rewrite
            if rewrite is not None:
                if rewrite.uri is not None:
                    p.path = _rewrite_path(decision, req.target, rewrite.uri)
                if rewrite.authority is not None:
                    p.authority = rewrite.authority
            if rule.retries is not None:
                p.retry = rule.retries
            p.timeout = rule.timeout
            pct = rule.mirror_percentage
            if rule.mirror is not None and draws.chance(100.0 if pct is None else pct):
                p.mirror = rule.mirror
        hdrs = req.headers
        _add_headers(p, hdrs, draws, name, memo.route_keyed)
        rule_headers = rule.headers if rule is not None else None
        if rule_headers is not None or rdest.headers is not None:
            p.request_ops, p.response_ops = _header_ops(rule_headers, rdest.headers)
        # consistent hashing needs the key before the pick
        lb = cluster.policy.load_balancer
        if lb is not None and lb.consistent_hash is not None:
            key, cookie = hash_key_for(
                lb.consistent_hash,
                hdrs,
                _cookies(hdrs.get("cookie")),
                conn.source_ip,
                _request_info(req).query_params,
                connection=conn.key,
            )
            p.hash_key = key
            if cookie is not None:
                p.set_cookie = cookie.header_value()
        return p


def _add_headers(p: Plan, hdrs: dict[str, str], draws: Draws, name: str, route_keyed: bool) -> None:
    """The headers every routed request gets: ids, ``x-forwarded-proto``, the route taken
    (when a limit is keyed by route; a client's own claim is dropped)."""
    if (name and route_keyed) or "traceparent" in hdrs or "x-request-id" in hdrs:
        add = _ids(p, hdrs, draws)
        add.append(_FORWARDED_PROTO)
        if name and route_keyed:
            add.append((ROUTE_HEADER, name))
        p.add_headers = tuple(add)
    else:  # new ids, the common case: the tuple made at once (no list, appends, copy)
        o = draws.new_ids()
        ids = draws.ids
        p.trace_id = ids[o + 3 : o + 35]
        p.request_id = rid = ids[o + _TRACEPARENT : o + ID_WIDTH]
        p.add_headers = (
            ("traceparent", ids[o : o + _TRACEPARENT]),
            ("x-request-id", rid),
            _FORWARDED_PROTO,
        )
    if ROUTE_HEADER in hdrs:
        p.remove_headers = (ROUTE_HEADER,)


_FORWARDED_PROTO: Final = ("x-forwarded-proto", "http")


def _ids(p: Plan, hdrs: dict[str, str], draws: Draws) -> list[tuple[str, str]]:
    """Trace context and request id: the client's, else new ones (headers to add).
    ``hdrs`` is ``Request.headers`` (typed ``dict``: compiled, its lookups skip a method
    call each)."""
    add: list[tuple[str, str]] = []
    tp = hdrs.get("traceparent")
    rid = hdrs.get("x-request-id")
    if tp is None or rid is None:
        o = draws.new_ids()
        ids = draws.ids
        if tp is None:  # W3C trace context, not sampled
            p.trace_id = ids[o + 3 : o + 35]
            add.append(("traceparent", ids[o : o + _TRACEPARENT]))
        if rid is None:  # a version 4 UUID
            rid = ids[o + _TRACEPARENT : o + ID_WIDTH]
            add.append(("x-request-id", rid))
    if tp is not None:
        p.trace_id = trace_id(tp)
    p.request_id = rid
    return add


def _header_ops(
    rule: Headers | None, dest: Headers | None
) -> tuple[tuple[HeaderOperations, ...], tuple[HeaderOperations, ...]]:
    """(request, response) header operations: the rule's, then the destination's."""
    both = tuple(h for h in (rule, dest) if h is not None)
    return tuple(h.request for h in both), tuple(h.response for h in both)


def _request_info(req: Request) -> RequestInfo:
    conn = req.conn
    return RequestInfo(
        method=req.method,
        authority=req.authority,
        path=req.target,
        headers=req.headers,
        port=conn.port,
        source_labels=conn.pod.labels,
        source_namespace=conn.pod.namespace,
    )


def _rewrite_path(decision: RouteDecision, path: str, new: str) -> str:
    """Istio's ``rewrite.uri``: replaces the matched prefix for a prefix match, else the
    whole path (the query string is kept)."""
    rule = decision.rule
    query = ""
    p, sep, q = path.partition("?")
    if sep:
        query = "?" + q
    if rule is not None and decision.match_index is not None:
        m = rule.matches[decision.match_index].uri
        if m is not None and m.kind is MatchKind.PREFIX and p.startswith(m.value):
            return new + p[len(m.value) :] + query
    return new + query


def _cookies(header: str | None) -> dict[str, str]:
    out: dict[str, str] = {}
    if not header:
        return out
    for part in header.split(";"):
        k, sep, v = part.strip().partition("=")
        if sep and k not in out:
            out[k] = v
    return out


_MEMO_NUMBERS = itertools.count()


class _Memo:
    """What the planner remembers of one snapshot."""

    def __init__(self, snap: MeshSnapshot) -> None:
        self.of = weakref.ref(snap)
        self.number = next(_MEMO_NUMBERS)
        """Tells this memo from the ones before (what ``Connection.last_memo`` holds: no
        reference that would keep an old memo alive)."""
        self.routed: dict[tuple[str, int, str, str, str], Routed] = {}
        """Route decisions by (service, port, method, target, authority), for routes that
        only look at those (bounded by ``MEMO_MAX``)."""
        self.route_keyed = any(
            p.http is not None and p.http.key.kind is KeyKind.ROUTE for p in snap.local_rate_limits
        )
        """Whether some LocalRateLimit is keyed by route (then the route taken goes along
        to the destination's node)."""


__all__ = [
    "NO_RETRY",
    "ROUTE_HEADER",
    "Answer",
    "Connection",
    "Draws",
    "Likeliest",
    "Plan",
    "Planner",
    "Request",
    "Routed",
    "apply_header_ops",
    "join_headers",
    "route_name",
    "trace_id",
]
