"""Local rate limiting and quotas, as pure decisions: which ``LocalRateLimit`` policies
apply to a workload's port, token buckets with Envoy's semantics, and fixed-window quota
counts. Clocks are passed in (``now``: monotonic seconds for buckets, ``now_wall``: UNIX
seconds for quota windows); nothing here reads a clock, a file or a socket.

How a proxy uses it, on the destination node, for one connection or request::

    policies = applicable(snapshot_policies, pod.namespace, pod.labels, port)  # memoised
    d = limiter.check_http(policies, workload=pod.key, source_principal=peer,
                           header=headers.get, route=route_name, now=time.monotonic())
    if d.allowed:
        d = strictest((d, quota_store.check(policies, peer, time.time())))
    if not d.allowed: answer 429 (HTTP) or close (TCP); either way add d.headers()

Rate limits are checked before quotas: a request a bucket turns away uses no quota.

Buckets (``RateLimiter``): one per (policy, HTTP or TCP, destination workload, key value).
A request or connection is admitted only when every applicable bucket has a token, and
then takes one from each: a denied request takes nothing. Unkeyed buckets live as long as
their policy; keyed ones (per principal, header value or route) are capped, least recently
used first out, so a flood of distinct header values cannot exhaust memory (an evicted
bucket comes back full, as a new key would). A bucket is identified by its policy's key
and its parameters, so a new snapshot keeps the state of unchanged limits and restarts a
changed one; ``sync`` drops the buckets of policies that are gone. With ``shared`` (a
``SharedBuckets``: ``proxy.sharedbuckets``, for ``--workers``), a bucket's tokens live
where every process of the node sees them, and this limiter keeps only its references.

Quotas (``QuotaCounter``): a count per (policy, window, source principal) in the current
UTC-aligned window; a unit is granted when every applicable quota is under its limit, and
counts against each. ``plan`` decides without counting and says what to count, so a
store can write that down before ``apply`` (see ``nodeagent.proxy.quotastore``); counts
go in and out as ``QuotaCharge`` records of plain data.

Not thread-safe: one event loop owns a ``RateLimiter`` and a ``QuotaCounter``.
"""

from __future__ import annotations

import hashlib
import math
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from itertools import chain
from typing import Protocol, cast

from nodeagent.model.objects import Labels
from nodeagent.model.ratelimit import (
    NO_KEY,
    KeyKind,
    LocalRateLimit,
    QuotaWindow,
    RateLimitKey,
    TokenBucket,
)

_NS = 1_000_000_000
MAX_KEYED_BUCKETS = 10_000
MAX_KEY_LENGTH = 256
"""Longer key values (header values) are kept as a digest, to bound memory per bucket."""
_MEMO_SIZE = 4096


def _ns(seconds: float) -> int:
    # Integer nanoseconds: interval boundaries are exact (0.3 // 0.1 is 2.0 in floats).
    return round(seconds * _NS)


# --- decisions ---------------------------------------------------------------------


@dataclass(frozen=True)
class RateDecision:
    """Whether one request or connection may go on, and what to tell the client."""

    allowed: bool
    policy: str = ""
    """namespace/name of the deciding policy; empty when no limit applies."""
    limit: int = 0
    """The bucket's ``maxTokens`` or the quota's ``limit`` (``x-ratelimit-limit``)."""
    remaining: int = 0
    """Tokens or units left after this request (``x-ratelimit-remaining``)."""
    reset: float = 0.0
    """Seconds until the bucket's next fill or the quota window's end."""
    retry_after: int = 0
    """Whole seconds, ≥ 1 when denied (``retry-after``); 0 when allowed."""
    scope: str = ""
    """``http``, ``tcp`` or ``quota/<window>``: which limit decided (for logs)."""

    def headers(self) -> tuple[tuple[str, str], ...]:
        """``x-ratelimit-limit``, ``-remaining``, ``-reset`` (whole seconds, rounded up),
        and ``retry-after`` when denied; nothing when no limit applies."""
        if not self.policy:
            return ()
        out = (
            ("x-ratelimit-limit", str(self.limit)),
            ("x-ratelimit-remaining", str(self.remaining)),
            ("x-ratelimit-reset", str(math.ceil(self.reset))),
        )
        return out if self.allowed else (*out, ("retry-after", str(self.retry_after)))


UNLIMITED = RateDecision(allowed=True)
"""The decision when no limit applies."""


def strictest(decisions: Iterable[RateDecision]) -> RateDecision:
    """The decision to report: a denial with the longest wait, else the allowance with
    the fewest left; ``UNLIMITED`` when none applies."""
    denied: RateDecision | None = None
    tightest: RateDecision | None = None
    for d in decisions:
        if not d.policy:
            continue
        if not d.allowed:
            if denied is None or d.reset > denied.reset:
                denied = d
        elif tightest is None or d.remaining < tightest.remaining:
            tightest = d
    return denied or tightest or UNLIMITED


_Part = tuple[str, str, int, int, float]
"""One applicable limit before the request: (policy, scope, limit, available, reset)."""


def _verdict(parts: Sequence[_Part]) -> tuple[bool, RateDecision]:
    """All-or-nothing over ``parts``: admitted only when each has one available."""
    ok = all(p[3] >= 1 for p in parts)

    def decision(part: _Part) -> RateDecision:
        policy, scope, limit, available, reset = part
        return RateDecision(
            allowed=available >= 1,
            policy=policy,
            limit=limit,
            remaining=available - 1 if ok else available,
            reset=reset,
            retry_after=0 if available >= 1 else max(1, math.ceil(reset)),
            scope=scope,
        )

    if len(parts) == 1:  # the usual case, without building the others
        return ok, decision(parts[0])
    return ok, strictest(map(decision, parts))


# --- applicability -----------------------------------------------------------------


class _Index:
    """One policy set, grouped by namespace, with memoised answers per workload port."""

    __slots__ = ("by_namespace", "memo", "policies")

    def __init__(self, policies: Sequence[LocalRateLimit]) -> None:
        self.policies = policies
        by_ns: dict[str, list[LocalRateLimit]] = {}
        for p in sorted(policies, key=lambda p: p.key):
            by_ns.setdefault(p.namespace, []).append(p)
        self.by_namespace = {ns: tuple(ps) for ns, ps in by_ns.items()}
        self.memo: dict[tuple[str, Labels, int], tuple[LocalRateLimit, ...]] = {}


_last_index: list[_Index] = []
"""The index of the last policy set seen (one slot: the mesh has one current snapshot)."""


def applicable(
    policies: Sequence[LocalRateLimit], pod_namespace: str, pod_labels: Labels, port: int
) -> tuple[LocalRateLimit, ...]:
    """The policies for traffic to container ``port`` of a workload, sorted by key: those
    of its namespace whose selector is absent or matches its labels and whose ``ports``
    are empty or hold ``port``. Memoised per ``policies`` object (pass the snapshot's
    tuple itself, not a copy), so a repeat is one dictionary lookup."""
    index = _last_index[0] if _last_index else None
    if index is None or index.policies is not policies:
        index = _Index(policies)
        _last_index[:] = [index]
    memo_key = (pod_namespace, pod_labels, port)
    hit = index.memo.get(memo_key)
    if hit is None:
        hit = tuple(
            p
            for p in index.by_namespace.get(pod_namespace, ())
            if (p.selector is None or pod_labels.matches(p.selector))
            and (not p.ports or port in p.ports)
        )
        if len(index.memo) >= _MEMO_SIZE:
            index.memo.clear()
        index.memo[memo_key] = hit
    return hit


# --- token buckets -----------------------------------------------------------------


class TokenBucketState:
    """One bucket's tokens. Starts full; fills happen at whole multiples of
    ``fill_interval`` after ``created`` (like Envoy's fill timer), each adding
    ``tokens_per_fill`` up to ``max_tokens``."""

    __slots__ = ("_fills", "_interval", "_origin", "bucket", "tokens")

    def __init__(self, bucket: TokenBucket, created: float) -> None:
        self.bucket = bucket
        self.tokens = bucket.max_tokens
        self._origin = _ns(created)
        self._interval = max(1, _ns(bucket.fill_interval))
        self._fills = 0
        """Fills applied so far (boundaries passed since ``created``)."""

    def _refill(self, now: float) -> int:
        """Apply the fills due by ``now``; return nanoseconds since creation."""
        elapsed = _ns(now) - self._origin
        fills = elapsed // self._interval
        if fills > self._fills:
            b = self.bucket
            self.tokens = min(b.max_tokens, self.tokens + (fills - self._fills) * b.tokens_per_fill)
            self._fills = fills
        return elapsed

    def peek(self, now: float) -> tuple[int, float]:
        """(tokens left, seconds until the next fill), taking nothing."""
        elapsed = self._refill(now)
        return self.tokens, ((self._fills + 1) * self._interval - elapsed) / _NS

    def try_take(self, now: float) -> bool:
        """Take one token if there is one."""
        self._refill(now)
        if self.tokens < 1:
            return False
        self.tokens -= 1
        return True


class SharedRef:
    """A bucket kept by a ``SharedBuckets``: its identity (a digest of the policy, scope,
    bucket parameters, key, workload and key value) and where the store last found it."""

    __slots__ = ("bucket", "ident", "local", "slot")

    def __init__(self, ident: bytes, bucket: TokenBucket) -> None:
        self.ident = ident
        self.bucket = bucket
        self.slot = -1
        """The store's place for it (-1: not looked up yet); the store's to keep."""
        self.local: TokenBucketState | None = None
        """A bucket of this process alone, when the store has no room (the store's)."""


class SharedBuckets(Protocol):
    """Token buckets that several processes take from (``proxy.sharedbuckets``)."""

    def take_all(self, refs: Sequence[SharedRef], now: float) -> list[tuple[int, float]]:
        """Each bucket's (tokens, seconds to the next fill) before this request, taking
        one token from each when every one has a token, none otherwise: atomically."""
        ...

    def peek(self, ref: SharedRef, now: float) -> tuple[int, float]:
        """(tokens, seconds to the next fill), taking nothing."""
        ...


def shared_ident(limit_key: tuple[object, ...], workload: str, value: str) -> bytes:
    """A bucket's identity across processes: the same limit and key value give the same
    16 bytes in every process (a changed bucket or key is another bucket)."""
    text = repr((*limit_key, workload, value)).encode()
    return hashlib.blake2b(text, digest_size=16).digest()


class _Limit:
    """One (policy, scope, bucket, key), interned by ``RateLimiter``: bucket ids hold it
    and hash it by identity, which is cheaper than hashing its parameters per request."""

    __slots__ = ("bucket", "key", "keyed", "policy", "scope", "shared_key")

    def __init__(self, policy: str, scope: str, bucket: TokenBucket, key: RateLimitKey) -> None:
        self.policy = policy
        self.scope = scope
        self.bucket = bucket
        self.key = key
        self.keyed = key.kind is not KeyKind.NONE
        b = bucket
        self.shared_key = (
            policy,
            scope,
            b.max_tokens,
            b.tokens_per_fill,
            b.fill_interval,
            str(key),
        )


_LimitSpec = tuple[str, str, TokenBucket, RateLimitKey]
_State = TokenBucketState | SharedRef
_BucketId = tuple[_Limit, str, str]
"""(limit, destination workload, key value)."""


@dataclass(frozen=True)
class BucketView:
    """One live bucket, for an operator (``ctl explain``); a bucket not listed is full."""

    policy: str
    scope: str
    """``http`` or ``tcp``."""
    workload: str
    key: str
    """How the policy splits buckets (``none``, ``sourcePrincipal``, ``header:x-user``,
    ``route``)."""
    value: str
    """This bucket's key value (empty for ``none``, or a request without one)."""
    limit: int
    remaining: int
    reset: float
    """Seconds until the next fill."""


def key_value(
    key: RateLimitKey,
    source_principal: str | None,
    header: Callable[[str], str | None],
    route: str,
) -> str:
    """Which bucket of a keyed limit a request takes (``BucketView.value``)."""
    kind = key.kind
    if kind is KeyKind.NONE:
        return ""
    if kind is KeyKind.SOURCE_PRINCIPAL:
        value = source_principal or ""
    elif kind is KeyKind.HEADER:
        value = header(key.header) or ""
    else:
        value = route
    if len(value) <= MAX_KEY_LENGTH:
        return value
    return "blake2b:" + hashlib.blake2b(value.encode(), digest_size=16).hexdigest()


def _specs(policy: LocalRateLimit) -> tuple[_LimitSpec | None, _LimitSpec | None]:
    """What the policy's HTTP and TCP buckets are made from (None: no such limit)."""
    http = tcp = None
    if policy.http is not None:
        http = (policy.key, "http", policy.http.bucket, policy.http.key)
    if policy.tcp is not None:
        tcp = (policy.key, "tcp", policy.tcp.bucket, NO_KEY)
    return http, tcp


class RateLimiter:
    """Every token bucket of this node's proxy (see the module docstring)."""

    def __init__(
        self, max_keyed_buckets: int = MAX_KEYED_BUCKETS, shared: SharedBuckets | None = None
    ) -> None:
        self.max_keyed_buckets = max_keyed_buckets
        self.shared = shared
        """Where the tokens are kept when several processes share them (None: here)."""
        self._buckets: dict[_BucketId, _State] = {}
        """Unkeyed buckets: as many as (policy, scope, workload) triples."""
        self._keyed: OrderedDict[_BucketId, _State] = OrderedDict()
        """Keyed buckets, least recently used first."""
        self._interned: dict[_LimitSpec, _Limit] = {}
        self._compiled: dict[int, tuple[LocalRateLimit, _Limit | None, _Limit | None]] = {}
        """id(policy) → (the policy, its HTTP limit, its TCP limit)."""

    def __len__(self) -> int:
        return len(self._buckets) + len(self._keyed)

    def _intern(self, spec: _LimitSpec | None) -> _Limit | None:
        if spec is None:
            return None
        limit = self._interned.get(spec)
        if limit is None:
            limit = self._interned[spec] = _Limit(*spec)
        return limit

    def _limits(
        self, policy: LocalRateLimit
    ) -> tuple[LocalRateLimit, _Limit | None, _Limit | None]:
        hit = self._compiled.get(id(policy))
        if hit is None or hit[0] is not policy:
            if len(self._compiled) >= _MEMO_SIZE:
                self._compiled.clear()
            http, tcp = _specs(policy)
            hit = self._compiled[id(policy)] = (policy, self._intern(http), self._intern(tcp))
        return hit

    def _new(self, limit: _Limit, workload: str, value: str, now: float) -> _State:
        if self.shared is None:
            return TokenBucketState(limit.bucket, now)
        return SharedRef(shared_ident(limit.shared_key, workload, value), limit.bucket)

    def _bucket(self, limit: _Limit, workload: str, value: str, now: float) -> _State:
        ident = (limit, workload, value)
        if not limit.keyed:
            state = self._buckets.get(ident)
            if state is None:
                state = self._buckets[ident] = self._new(limit, workload, value, now)
            return state
        keyed = self._keyed
        state = keyed.get(ident)
        if state is None:
            state = keyed[ident] = self._new(limit, workload, value, now)
            if len(keyed) > self.max_keyed_buckets:
                keyed.popitem(last=False)
        else:
            keyed.move_to_end(ident)
        return state

    def _admit(self, entries: Sequence[tuple[_Limit, _State]], now: float) -> RateDecision:
        if not entries:
            return UNLIMITED
        parts: list[_Part] = []
        if self.shared is not None:  # taken there, under its locks
            got = self.shared.take_all(cast("list[SharedRef]", [s for _, s in entries]), now)
            for (limit, _), (tokens, reset) in zip(entries, got, strict=True):
                parts.append((limit.policy, limit.scope, limit.bucket.max_tokens, tokens, reset))
            return _verdict(parts)[1]
        for limit, state in entries:
            tokens, reset = cast(TokenBucketState, state).peek(now)
            parts.append((limit.policy, limit.scope, limit.bucket.max_tokens, tokens, reset))
        ok, decision = _verdict(parts)
        if ok:
            for _, state in entries:
                cast(TokenBucketState, state).tokens -= 1
        return decision

    def check_http(
        self,
        policies: Sequence[LocalRateLimit],
        *,
        workload: str,
        source_principal: str | None,
        header: Callable[[str], str | None],
        route: str,
        now: float,
    ) -> RateDecision:
        """One HTTP request to ``workload`` (a pod key) under ``policies`` (from
        ``applicable``). ``header`` looks a lowercase header name up (``dict.get`` of the
        request's headers); ``route`` names the route taken (e.g. ``<VirtualService
        key>/<http route name>``, empty when none)."""
        entries: list[tuple[_Limit, _State]] = []
        for p in policies:
            limit = self._limits(p)[1]
            if limit is not None:
                value = key_value(limit.key, source_principal, header, route)
                entries.append((limit, self._bucket(limit, workload, value, now)))
        return self._admit(entries, now)

    def check_tcp(
        self, policies: Sequence[LocalRateLimit], *, workload: str, now: float
    ) -> RateDecision:
        """One new connection to ``workload`` under ``policies`` (from ``applicable``)."""
        entries: list[tuple[_Limit, _State]] = []
        for p in policies:
            limit = self._limits(p)[2]
            if limit is not None:
                entries.append((limit, self._bucket(limit, workload, "", now)))
        return self._admit(entries, now)

    def look(
        self,
        policies: Sequence[LocalRateLimit],
        *,
        workload: str,
        http: bool,
        source_principal: str | None = None,
        header: Callable[[str], str | None] = lambda _: None,
        route: str = "",
    ) -> None:
        """With shared buckets: know the buckets a request would take, so that ``state``
        shows them as every process left them (``ctl explain``); nothing otherwise."""
        if self.shared is None:
            return
        for p in policies:
            _, for_http, for_tcp = self._limits(p)
            limit = for_http if http else for_tcp
            if limit is not None:
                value = key_value(limit.key, source_principal, header, route) if http else ""
                self._bucket(limit, workload, value, 0.0)

    def sync(self, policies: Sequence[LocalRateLimit]) -> None:
        """Forget the buckets of limits not in ``policies`` (the new snapshot's set):
        removed policies, and changed buckets or keys (which restart full)."""
        live = {spec for p in policies for spec in _specs(p) if spec is not None}
        self._interned = {spec: lim for spec, lim in self._interned.items() if spec in live}
        self._compiled.clear()
        kept = set(self._interned.values())
        for table in (self._buckets, self._keyed):
            for ident in [i for i in table if i[0] not in kept]:
                del table[ident]

    def state(
        self, now: float, policies: Sequence[LocalRateLimit] | None = None
    ) -> tuple[BucketView, ...]:
        """The live buckets (of ``policies`` only, when given), sorted, taking nothing and
        leaving the eviction order alone."""
        wanted = None if policies is None else {p.key for p in policies}
        views: list[BucketView] = []
        for (limit, workload, value), state in chain(self._buckets.items(), self._keyed.items()):
            if wanted is not None and limit.policy not in wanted:
                continue
            if isinstance(state, SharedRef):
                assert self.shared is not None
                tokens, reset = self.shared.peek(state, now)
            else:
                tokens, reset = state.peek(now)
            views.append(
                BucketView(
                    policy=limit.policy,
                    scope=limit.scope,
                    workload=workload,
                    key=str(limit.key),
                    value=value,
                    limit=limit.bucket.max_tokens,
                    remaining=tokens,
                    reset=reset,
                )
            )
        views.sort(key=lambda v: (v.policy, v.scope, v.workload, v.value))
        return tuple(views)


# --- quotas ------------------------------------------------------------------------


def window_start(window: QuotaWindow, now_wall: float) -> int:
    """The UNIX time at which the window holding ``now_wall`` began (UTC-aligned: POSIX
    time has no leap seconds, so minutes, hours and days divide it evenly)."""
    return math.floor(now_wall / window.seconds) * window.seconds


@dataclass(frozen=True)
class QuotaCharge:
    """``units`` counted against one quota window: a grant to persist, or a saved count."""

    policy: str
    window: QuotaWindow
    start: int
    """The window's start, UNIX seconds."""
    principal: str
    """The source principal; empty for plaintext callers."""
    units: int = 1

    def to_record(self) -> list[str | int]:
        """Plain data (JSON-ready): ``[policy, window, start, principal, units]``."""
        return [self.policy, self.window.value, self.start, self.principal, self.units]

    @classmethod
    def from_record(cls, record: object) -> QuotaCharge:
        """The inverse of ``to_record``; ValueError when ``record`` is not one."""
        if not isinstance(record, list) or len(record) != 5:
            raise ValueError(f"expected [policy, window, start, principal, units]: {record!r}")
        policy, window, start, principal, units = record
        if not (
            isinstance(policy, str)
            and isinstance(principal, str)
            and type(start) is int
            and type(units) is int
            and units >= 1
        ):
            raise ValueError(f"bad field types or values: {record!r}")
        return cls(policy, QuotaWindow(window), start, principal, units)

    @property
    def end(self) -> int:
        return self.start + self.window.seconds


@dataclass(frozen=True)
class QuotaView:
    """One live quota count, for an operator."""

    policy: str
    window: QuotaWindow
    principal: str
    limit: int
    used: int
    reset: float
    """Seconds until the window ends."""


class QuotaCounter:
    """Counts per (policy, window, principal) in the current window (see the module
    docstring). Counts of windows that ended are dropped by ``expire`` and ``export``."""

    def __init__(self) -> None:
        self._counts: dict[tuple[str, QuotaWindow, str], tuple[int, int]] = {}
        """(policy, window, principal) → (window start, units used)."""

    def __len__(self) -> int:
        return len(self._counts)

    def _used(self, key: tuple[str, QuotaWindow, str], start: int) -> tuple[int, int]:
        """(window start, used) now; a count of a later window than the clock says (the
        wall clock stepped back) is kept rather than started again."""
        current = self._counts.get(key)
        if current is not None and current[0] >= start:
            return current
        return start, 0

    def plan(
        self, policies: Sequence[LocalRateLimit], source_principal: str | None, now_wall: float
    ) -> tuple[RateDecision, tuple[QuotaCharge, ...]]:
        """Decide one unit without counting it: the decision, and the charges to
        ``apply`` when it is allowed (none when denied or when no quota applies)."""
        principal = source_principal or ""
        parts: list[_Part] = []
        charges: list[QuotaCharge] = []
        for p in policies:
            for q in p.quotas:
                start, used = self._used(
                    (p.key, q.window, principal), window_start(q.window, now_wall)
                )
                reset = start + q.window.seconds - now_wall
                parts.append((p.key, f"quota/{q.window.value}", q.limit, q.limit - used, reset))
                charges.append(QuotaCharge(p.key, q.window, start, principal))
        if not parts:
            return UNLIMITED, ()
        ok, decision = _verdict(parts)
        return decision, tuple(charges) if ok else ()

    def apply(self, charges: Iterable[QuotaCharge]) -> None:
        """Count ``charges`` (grants, or saved counts being loaded); a charge for a window
        older than the one counted is ignored, a newer one starts it again."""
        counts = self._counts
        for c in charges:
            key = (c.policy, c.window, c.principal)
            current = counts.get(key)
            if current is None or current[0] < c.start:
                counts[key] = (c.start, c.units)
            elif current[0] == c.start:
                counts[key] = (c.start, current[1] + c.units)

    def check(
        self, policies: Sequence[LocalRateLimit], source_principal: str | None, now_wall: float
    ) -> RateDecision:
        """``plan`` then ``apply``: decide one unit and count it when allowed."""
        decision, charges = self.plan(policies, source_principal, now_wall)
        self.apply(charges)
        return decision

    def expire(self, now_wall: float) -> None:
        """Drop the counts of windows that have ended."""
        for key in [
            k for k, (start, _) in self._counts.items() if start + k[1].seconds <= now_wall
        ]:
            del self._counts[key]

    def export(self, now_wall: float) -> tuple[QuotaCharge, ...]:
        """The live counts as charges (``units`` = the count), sorted; ``apply`` on an
        empty counter restores them."""
        self.expire(now_wall)
        return tuple(
            sorted(
                (
                    QuotaCharge(p, w, start, u, used)
                    for (p, w, u), (start, used) in self._counts.items()
                ),
                key=lambda c: (c.policy, c.principal, c.window.seconds),
            )
        )

    def state(self, policies: Sequence[LocalRateLimit], now_wall: float) -> tuple[QuotaView, ...]:
        """The live counts of ``policies``' quotas, sorted, counting nothing."""
        limits = {(p.key, q.window): q.limit for p in policies for q in p.quotas}
        views = [
            QuotaView(
                c.policy,
                c.window,
                c.principal,
                limits[c.policy, c.window],
                c.units,
                c.end - now_wall,
            )
            for c in self.export(now_wall)
            if (c.policy, c.window) in limits
        ]
        return tuple(views)
