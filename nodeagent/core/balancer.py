"""Endpoint choice per cluster with Istio/Envoy semantics: load-balancing policies,
consistent hashing, locality failover, outlier detection and panic mode.

Owns, per cluster (service FQDN, subset, port):

- the *policy*: ``LEAST_REQUEST`` (Istio's default since 1.14 when a DestinationRule sets
  nothing: power of two choices over active requests), ``ROUND_ROBIN``, ``RANDOM``, and a
  ring hash for ``consistentHash``. ``PASSTHROUGH`` is rejected by the config layer; if it
  reaches this module it is treated as ``ROUND_ROBIN``.
- *locality priority*: Istio turns locality failover on only when the rule also sets
  ``outlierDetection`` (without it, health is never known and failover can never happen);
  a missing ``localityLbSetting`` means the mesh default, which is enabled. Tiers, best
  first: same region and zone as the source pod, same region, each ``failover`` target of
  the source region in the order written, then everything else. A pick uses the best tier
  that has a healthy host (Envoy's priority levels, without the 1.4 overprovisioning
  spill-over).
- *outlier detection*: consecutive 5xx and consecutive gateway errors per host, ejection
  for ``baseEjectionTime * multiplier`` (capped at Envoy's ``max_ejection_time`` of 300 s),
  the ``maxEjectionPercent`` guard, and un-ejection on the ``interval`` sweep.
- *panic mode*: when fewer than ``panic_threshold`` percent of the hosts are healthy (Envoy's
  default 50 %), ejections are ignored and the pick is over all hosts of the best tier.
  Note: Istio documents ``outlierDetection.minHealthPercent`` (which it maps to the panic
  threshold) as defaulting to 0 %; a registry built with ``panic_threshold=0`` behaves that
  way (no healthy host left means no pick).
- per-host bookkeeping that survives config reloads: state is keyed by endpoint address
  (``ip:port``); hosts that leave the endpoint set are forgotten.

Not owned: connection pools and their limits (the proxy), computing the hash input from a
request beyond :func:`hash_key_for`, retries themselves (the proxy passes the addresses it
already tried as ``exclude``). No I/O and no asyncio; time and randomness are injected.

Use: the proxy keeps one :class:`BalancerRegistry` and per request calls
``registry.get(key, endpoints, lb, outlier, source_pod)``, then ``pick()``, ``started()``
before forwarding, ``finished()`` and ``report()`` when the upstream answered or failed.
"""

from __future__ import annotations

import enum
import math
import random
from bisect import bisect_left
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from hashlib import blake2b
from typing import Final, TypeAlias

from nodeagent.model.objects import Pod
from nodeagent.model.snapshot import Endpoint
from nodeagent.model.traffic import (
    ConsistentHash,
    LoadBalancer,
    OutlierDetection,
    SimpleLB,
)

__all__ = [
    "DEFAULT_BASE_EJECTION_TIME",
    "DEFAULT_CONSECUTIVE_5XX",
    "DEFAULT_CONSECUTIVE_GATEWAY",
    "DEFAULT_INTERVAL",
    "DEFAULT_MAX_EJECTION_PERCENT",
    "DEFAULT_PANIC_THRESHOLD",
    "MAX_EJECTION_TIME",
    "REASON_CONSECUTIVE_5XX",
    "REASON_CONSECUTIVE_GATEWAY",
    "REGION_LABEL",
    "RING_POINTS_PER_HOST",
    "ZONE_LABEL",
    "Balancer",
    "BalancerRegistry",
    "ClusterKey",
    "OutlierSettings",
    "Policy",
    "SetCookie",
    "endpoint_address",
    "hash_key_for",
    "locality_enabled",
    "locality_of",
    "policy_of",
]

ClusterKey: TypeAlias = Hashable
"""What identifies a cluster; the proxy uses ``(service fqdn, subset | None, port)``."""

REGION_LABEL: Final = "topology.kubernetes.io/region"
ZONE_LABEL: Final = "topology.kubernetes.io/zone"

DEFAULT_CONSECUTIVE_5XX: Final = 5
DEFAULT_CONSECUTIVE_GATEWAY: Final = 0
"""0 disables the check (Istio's default)."""
DEFAULT_INTERVAL: Final = 10.0
DEFAULT_BASE_EJECTION_TIME: Final = 30.0
DEFAULT_MAX_EJECTION_PERCENT: Final = 10
MAX_EJECTION_TIME: Final = 300.0
"""Envoy's default ``max_ejection_time`` (Istio does not expose it)."""
DEFAULT_PANIC_THRESHOLD: Final = 50.0
"""Envoy's default ``healthy_panic_threshold``, in percent."""
RING_POINTS_PER_HOST: Final = 160
"""Ring entries per host. A fixed count (Envoy scales it to a minimum ring size) keeps
every surviving host's points in place when hosts come and go: only the keys of a
removed host move, and only keys taken over by an added host move."""

REASON_CONSECUTIVE_5XX: Final = "consecutive_5xx"
REASON_CONSECUTIVE_GATEWAY: Final = "consecutive_gateway_failure"

EjectHook: TypeAlias = Callable[[ClusterKey, str, str], None]
"""``on_eject(cluster key, address, reason)``; reason is one of the ``REASON_*`` names."""
ReturnHook: TypeAlias = Callable[[ClusterKey, str], None]
"""``on_return(cluster key, address)``."""

_EPS: Final = 1e-9
_NO_LOCALITY: Final = ("", "")
_GATEWAY_ERRORS: Final = frozenset({502, 503, 504})
# pick() dispatches on small ints: comparing enum members costs a class attribute lookup
_LR: Final = 0
_RR: Final = 1
_RANDOM: Final = 2
_HASH: Final = 3


class Policy(enum.Enum):
    """The algorithm a cluster balances with (after defaults are applied)."""

    LEAST_REQUEST = "LEAST_REQUEST"
    ROUND_ROBIN = "ROUND_ROBIN"
    RANDOM = "RANDOM"
    RING_HASH = "RING_HASH"


_KIND: Final = {
    Policy.LEAST_REQUEST: _LR,
    Policy.ROUND_ROBIN: _RR,
    Policy.RANDOM: _RANDOM,
    Policy.RING_HASH: _HASH,
}


def policy_of(lb: LoadBalancer | None) -> Policy:
    """The effective policy of a DestinationRule ``loadBalancer``: consistent hash wins,
    nothing set means ``LEAST_REQUEST`` (Istio ≥ 1.14), ``PASSTHROUGH`` falls back to
    ``ROUND_ROBIN``."""
    if lb is None:
        return Policy.LEAST_REQUEST
    if lb.consistent_hash is not None:
        return Policy.RING_HASH
    if lb.simple is None or lb.simple is SimpleLB.LEAST_REQUEST:
        return Policy.LEAST_REQUEST
    if lb.simple is SimpleLB.RANDOM:
        return Policy.RANDOM
    return Policy.ROUND_ROBIN


def locality_enabled(lb: LoadBalancer | None, outlier: OutlierDetection | None) -> bool:
    """Istio's rule: locality failover needs ``outlierDetection``; an absent
    ``localityLbSetting`` means the mesh default (enabled)."""
    if outlier is None:
        return False
    return lb is None or lb.locality is None or lb.locality.enabled


def locality_of(pod: Pod | None) -> tuple[str, str]:
    """``(region, zone)`` from the pod's topology labels; missing parts are ``""``."""
    if pod is None:
        return _NO_LOCALITY
    region = zone = ""
    for k, v in pod.labels.items_:
        if k == REGION_LABEL:
            region = v
        elif k == ZONE_LABEL:
            zone = v
    return region, zone


def endpoint_address(ep: Endpoint) -> str:
    """``ip:port`` (``[ip]:port`` for IPv6): the key of per-host state and of ``exclude``."""
    if ":" in ep.ip:
        return f"[{ep.ip}]:{ep.port}"
    return f"{ep.ip}:{ep.port}"


def _h64(value: str) -> int:
    """A stable 64-bit hash (not Python's per-process ``hash``)."""
    return int.from_bytes(blake2b(value.encode(), digest_size=8).digest(), "big")


# --------------------------------------------------------------------------- hash keys


@dataclass(frozen=True)
class SetCookie:
    """A cookie Envoy generates for ``httpCookie`` with a ``ttl`` when the request had none."""

    name: str
    value: str
    max_age: int
    """Seconds; 0 makes a session cookie (no ``Max-Age``)."""
    path: str = ""

    def header_value(self) -> str:
        """The ``Set-Cookie`` header value, formatted as Envoy does."""
        out = f'{self.name}="{self.value}"'
        if self.max_age:
            out += f"; Max-Age={self.max_age}"
        if self.path:
            out += f"; Path={self.path}"
        return out + "; HttpOnly"

    def __str__(self) -> str:
        return self.header_value()


def _unquote(value: str) -> str:
    if len(value) >= 2 and value[0] == '"' and value[-1] == '"':
        return value[1:-1]
    return value


def hash_key_for(
    ch: ConsistentHash,
    headers: Mapping[str, str],
    cookies: Mapping[str, str],
    source_ip: str,
    query: Mapping[str, str],
    *,
    connection: str = "",
) -> tuple[str | None, SetCookie | None]:
    """The string to pass to :meth:`Balancer.pick` as ``hash_key``, and a cookie to set on
    the response (only for ``httpCookie`` with a ``ttl`` when the request carried none).

    ``headers`` has lowercase names. ``None`` as key means "no hash" (the header, cookie
    or query parameter is absent): the pick is then random, as in Envoy. A generated
    cookie value is a hash of the source IP and ``connection`` (pass something that tells
    client connections apart, e.g. ``"peer-ip:port>local-ip:port"``; Envoy hashes the
    remote and local addresses), so requests racing on one connection get the same value.
    """
    if ch.http_header_name is not None:
        name = ch.http_header_name
        value = headers.get(name.lower())
        if value is None:
            value = headers.get(name)
        return value, None
    if ch.http_cookie is not None:
        cookie = ch.http_cookie
        present = cookies.get(cookie.name)
        if present is not None:
            return _unquote(present), None
        if cookie.ttl is None:
            return None, None
        generated = f"{_h64(source_ip + '|' + connection):016x}"
        return generated, SetCookie(cookie.name, generated, max(0, int(cookie.ttl)))
    if ch.use_source_ip:
        return (source_ip or None), None
    if ch.http_query_parameter_name is not None:
        return query.get(ch.http_query_parameter_name), None
    return None, None


# --------------------------------------------------------------------- outlier settings


@dataclass(frozen=True)
class OutlierSettings:
    """``OutlierDetection`` with Istio's defaults filled in (0 disables a check)."""

    consecutive_5xx: int = DEFAULT_CONSECUTIVE_5XX
    consecutive_gateway: int = DEFAULT_CONSECUTIVE_GATEWAY
    interval: float = DEFAULT_INTERVAL
    base_ejection_time: float = DEFAULT_BASE_EJECTION_TIME
    max_ejection_percent: int = DEFAULT_MAX_EJECTION_PERCENT

    @classmethod
    def of(cls, od: OutlierDetection) -> OutlierSettings:
        def pick(v: int | None, default: int) -> int:
            return default if v is None else v

        def pickf(v: float | None, default: float) -> float:
            return default if v is None or v <= 0 else v

        return cls(
            consecutive_5xx=pick(od.consecutive_5xx_errors, DEFAULT_CONSECUTIVE_5XX),
            consecutive_gateway=pick(od.consecutive_gateway_errors, DEFAULT_CONSECUTIVE_GATEWAY),
            interval=pickf(od.interval, DEFAULT_INTERVAL),
            base_ejection_time=pickf(od.base_ejection_time, DEFAULT_BASE_EJECTION_TIME),
            max_ejection_percent=min(
                100, pick(od.max_ejection_percent, DEFAULT_MAX_EJECTION_PERCENT)
            ),
        )

    @property
    def max_ejection_time(self) -> float:
        return max(MAX_EJECTION_TIME, self.base_ejection_time)


# ------------------------------------------------------------------------- per host


class _Host:
    """Per-address state; identity-hashed (used in sets)."""

    __slots__ = (
        "active",
        "addr",
        "c5xx",
        "cgw",
        "ejected",
        "endpoint",
        "last_return_tick",
        "locality",
        "points",
        "return_at",
        "return_tick",
        "times",
    )

    def __init__(self, endpoint: Endpoint, addr: str) -> None:
        self.endpoint = endpoint
        self.addr = addr
        self.locality = locality_of(endpoint.pod)
        self.active = 0
        self.c5xx = 0
        self.cgw = 0
        self.ejected = False
        self.return_at = 0.0
        self.return_tick = 0
        self.times = 0
        """Envoy's ejection backoff multiplier."""
        self.last_return_tick: int | None = None
        self.points: tuple[int, ...] | None = None

    def ring_points(self) -> tuple[int, ...]:
        if self.points is None:
            self.points = tuple(_h64(f"{self.addr}_{i}") for i in range(RING_POINTS_PER_HOST))
        return self.points


class _Ring:
    """A sorted hash ring over some hosts: ``hashes[i]`` belongs to ``hosts[i]``."""

    __slots__ = ("hashes", "hosts")

    def __init__(self, hashes: list[int], hosts: list[_Host]) -> None:
        self.hashes = hashes
        self.hosts = hosts

    @classmethod
    def build(cls, hosts: Iterable[_Host]) -> _Ring:
        entries = sorted((p, i, h) for i, h in enumerate(hosts) for p in h.ring_points())
        return cls([e[0] for e in entries], [e[2] for e in entries])

    def subset(self, members: set[_Host]) -> _Ring:
        hashes: list[int] = []
        hosts: list[_Host] = []
        for hv, h in zip(self.hashes, self.hosts, strict=True):
            if h in members:
                hashes.append(hv)
                hosts.append(h)
        return _Ring(hashes, hosts)

    def lookup(self, hv: int, exclude: AbstractSet[str]) -> _Host:
        """The first host at or after ``hv`` (wrapping) whose address is not excluded; the
        caller guarantees one exists."""
        hashes = self.hashes
        n = len(hashes)
        i = bisect_left(hashes, hv)
        if i == n:
            i = 0
        host = self.hosts[i]
        if exclude:
            while host.addr in exclude:
                i = i + 1 if i + 1 < n else 0
                host = self.hosts[i]
        return host


# ------------------------------------------------------------------------- cluster


class _Cluster:
    """State shared by every :class:`Balancer` view of one cluster."""

    def __init__(
        self,
        key: ClusterKey,
        clock: Callable[[], float],
        rnd: random.Random,
        panic_threshold: float,
        on_eject: EjectHook | None,
        on_return: ReturnHook | None,
    ) -> None:
        self.key = key
        self.clock = clock
        self.rnd = rnd
        self.panic_threshold = panic_threshold
        self.on_eject = on_eject
        self.on_return = on_return
        self.endpoints: tuple[Endpoint, ...] = ()
        self.hosts: list[_Host] = []
        self.by_key: dict[tuple[str, int], _Host] = {}
        self.lb: LoadBalancer | None = None
        self.outlier: OutlierDetection | None = None
        self.policy = Policy.LEAST_REQUEST
        self.kind = _LR
        self.locality_on = False
        self.failover: tuple[tuple[str, str], ...] = ()
        self.settings: OutlierSettings | None = None
        self.n_ejected = 0
        self.version = 0
        """Bumped whenever the hosts, their health or the tiering rules change."""
        self.rr = rnd.randrange(1 << 16)
        """Envoy starts round robin at a random offset so that proxies do not march in step."""
        self.ring: _Ring | None = None
        # the sweep grid: tick m happens at t0 + m * interval
        self.t0 = 0.0
        self.tick = 0
        self.next_sweep = math.inf
        self.views: dict[tuple[str, str], Balancer] = {}
        self.last_source: Pod | None = None
        self.last_view: Balancer | None = None

    # ---- refresh

    def set_endpoints(self, endpoints: tuple[Endpoint, ...]) -> None:
        old = self.by_key
        by_key: dict[tuple[str, int], _Host] = {}
        hosts: list[_Host] = []
        for ep in endpoints:
            k = (ep.ip, ep.port)
            if k in by_key:
                continue
            h = old.get(k)
            if h is None:
                h = _Host(ep, endpoint_address(ep))
            else:
                h.endpoint = ep
                h.locality = locality_of(ep.pod)
            by_key[k] = h
            hosts.append(h)
        if [h.addr for h in hosts] != [h.addr for h in self.hosts]:
            self.ring = None
        self.endpoints = endpoints
        self.hosts = hosts
        self.by_key = by_key
        self.n_ejected = sum(1 for h in hosts if h.ejected)
        self.version += 1

    def set_policy(self, lb: LoadBalancer | None, outlier: OutlierDetection | None) -> None:
        changed = lb != self.lb or outlier != self.outlier
        self.lb = lb
        self.outlier = outlier
        if not changed:
            return
        self.policy = policy_of(lb)
        self.kind = _KIND[self.policy]
        self.locality_on = locality_enabled(lb, outlier)
        self.failover = lb.locality.failover if lb and lb.locality else ()
        settings = OutlierSettings.of(outlier) if outlier is not None else None
        if settings is None:
            for h in self.hosts:
                h.c5xx = h.cgw = h.times = 0
                h.last_return_tick = None
                if h.ejected:
                    h.ejected = False
                    if self.on_return is not None:
                        self.on_return(self.key, h.addr)
            self.n_ejected = 0
            self.next_sweep = math.inf
        elif self.settings is None or settings.interval != self.settings.interval:
            now = self.clock()
            self.t0, self.tick = now, 0
            self.next_sweep = now + settings.interval
            for h in self.hosts:
                h.last_return_tick = None
                if h.ejected:
                    h.return_tick = self._tick_at_or_after(h.return_at, settings.interval)
        self.settings = settings
        self.version += 1

    # ---- outlier detection

    def _tick_at_or_after(self, t: float, interval: float) -> int:
        return max(self.tick + 1, math.ceil((t - self.t0) / interval - _EPS))

    def advance(self, now: float) -> None:
        """Run every interval tick due by ``now`` (Envoy's interval timer, lazily)."""
        s = self.settings
        if s is None or now < self.next_sweep:
            return
        last = int((now - self.t0) / s.interval + _EPS)
        first = self.tick + 1
        if last < first:
            last = first
        self.tick = last
        self.next_sweep = self.t0 + (last + 1) * s.interval
        changed = False
        for h in self.hosts:
            if h.ejected:
                if h.return_tick > last:
                    continue
                r = h.return_tick
                h.ejected = False
                h.c5xx = h.cgw = 0
                h.last_return_tick = r
                self.n_ejected -= 1
                changed = True
                if self.on_return is not None:
                    self.on_return(self.key, h.addr)
                # healthy ticks after the one that returned it, at least one interval later
                h.times = max(0, h.times - (last - r))
            elif h.times and h.last_return_tick is not None:
                start = max(first, h.last_return_tick + 1)
                if last >= start:
                    h.times = max(0, h.times - (last - start + 1))
        if changed:
            self.version += 1

    def report(self, ep: Endpoint, status: int | None, connect_failure: bool) -> None:
        s = self.settings
        if s is None:
            return
        h = self.by_key.get((ep.ip, ep.port))
        if h is None:
            return
        if connect_failure:
            status = 503
        elif status is None:
            status = 200
        if status < 500:
            h.c5xx = h.cgw = 0
            return
        now = self.clock()
        self.advance(now)
        if status in _GATEWAY_ERRORS:
            h.cgw += 1
            if h.cgw == s.consecutive_gateway and s.consecutive_gateway > 0 and not h.ejected:
                self._try_eject(h, now, s, REASON_CONSECUTIVE_GATEWAY)
                h.cgw = 0
        else:
            h.cgw = 0
        h.c5xx += 1
        if h.c5xx == s.consecutive_5xx and s.consecutive_5xx > 0 and not h.ejected:
            self._try_eject(h, now, s, REASON_CONSECUTIVE_5XX)
            h.c5xx = 0

    def _try_eject(self, h: _Host, now: float, s: OutlierSettings, reason: str) -> None:
        # Envoy's guard, checked before ejecting: the fraction already ejected must stay
        # below maxEjectionPercent (so with 2 hosts and 10 %, the first one may go).
        if 100.0 * self.n_ejected / len(self.hosts) >= s.max_ejection_percent:
            return
        max_time = s.max_ejection_time
        if h.times * s.base_ejection_time < max_time + s.base_ejection_time:
            h.times += 1
        h.ejected = True
        h.return_at = now + min(s.base_ejection_time * h.times, max_time)
        h.return_tick = self._tick_at_or_after(h.return_at, s.interval)
        self.n_ejected += 1
        self.version += 1
        if self.on_eject is not None:
            self.on_eject(self.key, h.addr, reason)

    def ejected(self) -> list[tuple[str, float]]:
        s = self.settings
        if s is None:
            return []
        now = self.clock()
        self.advance(now)
        return [
            (h.addr, max(0.0, self.t0 + h.return_tick * s.interval - now))
            for h in self.hosts
            if h.ejected
        ]

    def master_ring(self) -> _Ring:
        if self.ring is None:
            self.ring = _Ring.build(self.hosts)
        return self.ring


# ------------------------------------------------------------------------- balancer


class Balancer:
    """Endpoint choice for one cluster, as seen from one source locality.

    Views of one cluster (one per source locality) share all host state: active request
    counts, outlier counters and ejections. Obtain them from :class:`BalancerRegistry`.
    """

    __slots__ = ("_c", "_locality", "_panic", "_rings", "_tiers", "_version")

    def __init__(self, cluster: _Cluster, locality: tuple[str, str]) -> None:
        self._c = cluster
        self._locality = locality
        self._version = -1
        self._tiers: tuple[tuple[_Host, ...], ...] = ()
        self._rings: list[_Ring | None] = []
        self._panic = False

    @property
    def key(self) -> ClusterKey:
        return self._c.key

    @property
    def policy(self) -> Policy:
        return self._c.policy

    @property
    def endpoints(self) -> tuple[Endpoint, ...]:
        return self._c.endpoints

    @property
    def in_panic(self) -> bool:
        """True when fewer than the panic threshold of hosts are healthy (so ejected hosts
        are picked too)."""
        self._refresh()
        return self._panic

    # ---- picking

    def _refresh(self) -> None:
        c = self._c
        if self._version == c.version:
            return
        hosts = c.hosts
        healthy = [h for h in hosts if not h.ejected] if c.n_ejected else hosts
        panic = bool(hosts) and len(healthy) * 100.0 < c.panic_threshold * len(hosts)
        pool = hosts if panic else healthy
        if c.locality_on and self._locality != _NO_LOCALITY and pool:
            region, zone = self._locality
            targets = [to for frm, to in c.failover if frm == region]
            rest = 2 + len(targets)
            buckets: dict[int, list[_Host]] = {}
            for h in pool:
                r, z = h.locality
                if r == region:
                    rank = 0 if z == zone else 1
                elif r in targets:
                    rank = 2 + targets.index(r)
                else:
                    rank = rest
                buckets.setdefault(rank, []).append(h)
            tiers = tuple(tuple(buckets[k]) for k in sorted(buckets))
        else:
            tiers = (tuple(pool),) if pool else ()
        self._tiers = tiers
        self._rings = [None] * len(tiers)
        self._panic = panic
        self._version = c.version

    def pick(
        self, hash_key: str | None = None, exclude: AbstractSet[str] = frozenset()
    ) -> Endpoint | None:
        """Choose an endpoint, or None when there is none (or none healthy with panic mode
        off). ``hash_key`` is used by consistent-hash clusters only (None → random pick).
        ``exclude`` holds addresses already tried (``endpoint_address``): they are avoided
        while another usable host exists, moving to a worse tier if need be (Envoy's
        ``previous_hosts`` / ``previous_priorities``); if every host was tried, the pick
        ignores ``exclude``."""
        c = self._c
        if c.settings is not None:
            now = c.clock()
            if now >= c.next_sweep:
                c.advance(now)
        if self._version != c.version:
            self._refresh()
        tiers = self._tiers
        if not tiers:
            return None
        ti = 0
        hosts: Sequence[_Host] = tiers[0]
        if exclude:
            for i, tier in enumerate(tiers):
                avail = [h for h in tier if h.addr not in exclude]
                if avail:
                    ti, hosts = i, avail
                    break
            else:
                exclude = frozenset()
        kind = c.kind
        n = len(hosts)
        if kind == _LR:
            if n == 1:
                return hosts[0].endpoint
            r = c.rnd.random
            a = hosts[int(r() * n)]
            b = hosts[int(r() * n)]
            return (b if b.active < a.active else a).endpoint
        if kind == _RR:
            i = c.rr
            c.rr = i + 1
            return hosts[i % n].endpoint
        if kind == _RANDOM:
            return hosts[int(c.rnd.random() * n)].endpoint
        ring = self._rings[ti]
        if ring is None:
            ring = self._rings[ti] = c.master_ring().subset(set(tiers[ti]))
        hv = _h64(hash_key) if hash_key is not None else c.rnd.getrandbits(64)
        return ring.lookup(hv, exclude).endpoint

    def explain(self, hash_key: str | None = None) -> dict[str, object]:
        """What ``pick`` would do now, without doing it (no counter moves): the hosts by
        locality tier with their in-flight requests and ejection, the algorithm, and the
        endpoint a pick would return when that is determined (round robin's next host,
        the ring's host for ``hash_key``; least request: the least loaded of the first
        tier, the one two random choices favour)."""
        c = self._c
        self._refresh()
        tiers = [
            [
                {
                    "endpoint": h.addr,
                    "pod": h.endpoint.pod.key,
                    "active_requests": h.active,
                    "ejected": h.ejected,
                    "locality": "/".join(x for x in h.locality if x),
                }
                for h in tier
            ]
            for tier in self._tiers
        ]
        ejected = [h.addr for h in c.hosts if h.ejected and not self._panic]
        out: dict[str, object] = {
            "algorithm": c.policy.value,
            "tiers": tiers,
            "excluded_as_ejected": ejected,
            "panic": self._panic,
        }
        if not self._tiers:
            out["pick"] = None
            out["why"] = "no usable endpoint (none ready, or all ejected)"
            return out
        hosts = self._tiers[0]
        locality = " (nearest locality tier)" if len(self._tiers) > 1 else ""
        if c.kind == _RR:
            h = hosts[c.rr % len(hosts)]
            why = f"ROUND_ROBIN: next in turn among {len(hosts)} host(s){locality}"
        elif c.kind == _LR:
            h = min(hosts, key=lambda x: x.active)
            why = (
                f"LEAST_REQUEST: two random choices among {len(hosts)} host(s){locality}, "
                f"the one with fewer requests in flight wins ({h.active} here)"
            )
        elif c.kind == _RANDOM:
            h = hosts[0]
            why = f"RANDOM: any of {len(hosts)} host(s){locality}, e.g. this one"
        else:
            ring = c.master_ring().subset(set(hosts))
            hv = _h64(hash_key) if hash_key is not None else 0
            h = ring.lookup(hv, frozenset())
            why = (
                f"consistent hash of {hash_key!r}{locality}"
                if hash_key is not None
                else "consistent hash: no hash key in this request, a random host"
            )
        out["pick"] = {"endpoint": h.addr, "pod": h.endpoint.pod.key}
        out["why"] = why
        return out

    # ---- bookkeeping reported by the proxy

    def started(self, ep: Endpoint) -> None:
        """A request to ``ep`` is now in flight (for ``LEAST_REQUEST``)."""
        h = self._c.by_key.get((ep.ip, ep.port))
        if h is not None:
            h.active += 1

    def finished(self, ep: Endpoint) -> None:
        """A request to ``ep`` is over (whatever its outcome)."""
        h = self._c.by_key.get((ep.ip, ep.port))
        if h is not None and h.active > 0:
            h.active -= 1

    def active(self, ep: Endpoint) -> int:
        """Requests in flight to ``ep`` (0 for an unknown endpoint)."""
        h = self._c.by_key.get((ep.ip, ep.port))
        return h.active if h is not None else 0

    def report(self, ep: Endpoint, status: int | None, connect_failure: bool = False) -> None:
        """The outcome of one request, for outlier detection. ``status`` is the upstream
        HTTP status; ``connect_failure`` (connection refused, reset or timed out before a
        response) counts as a 503, as Envoy maps local-origin errors. ``status=None``
        without a connect failure is a successful non-HTTP (TCP) connection. Requests that
        fail without a response after connecting should be reported with the status the
        proxy answers with (503 for a reset, 504 for a timeout)."""
        self._c.report(ep, status, connect_failure)

    # ---- outlier observability

    def sweep(self, now: float) -> None:
        """Run the outlier ``interval`` ticks due by ``now``: ejected hosts whose time is up
        return, and the ejection multiplier of hosts healthy for a full interval after
        returning decays by one per tick. ``pick()`` calls this lazily."""
        self._c.advance(now)

    def ejected(self) -> list[tuple[str, float]]:
        """``(address, seconds until the sweep that returns it)`` per ejected host."""
        return self._c.ejected()

    def __repr__(self) -> str:
        return (
            f"Balancer({self._c.key!r}, {self._c.policy.value}, hosts={len(self._c.hosts)}, "
            f"ejected={self._c.n_ejected}, locality={self._locality})"
        )


class BalancerRegistry:
    """One cluster state per key, refreshed from the config on every ``get``."""

    def __init__(
        self,
        clock: Callable[[], float],
        rnd: random.Random,
        *,
        panic_threshold: float = DEFAULT_PANIC_THRESHOLD,
        on_eject: EjectHook | None = None,
        on_return: ReturnHook | None = None,
    ) -> None:
        self._clock = clock
        self._rnd = rnd
        self._panic_threshold = panic_threshold
        self._on_eject = on_eject
        self._on_return = on_return
        self._clusters: dict[ClusterKey, _Cluster] = {}

    def get(
        self,
        key: ClusterKey,
        endpoints: tuple[Endpoint, ...],
        policy: LoadBalancer | None,
        outlier: OutlierDetection | None,
        source_pod: Pod | None,
    ) -> Balancer:
        """The balancer for ``key`` seen from ``source_pod``'s locality, brought up to date
        with ``endpoints`` and the policy (cheap when nothing changed)."""
        c = self._clusters.get(key)
        if c is None:
            c = self._clusters[key] = _Cluster(
                key,
                self._clock,
                self._rnd,
                self._panic_threshold,
                self._on_eject,
                self._on_return,
            )
        if policy is not c.lb or outlier is not c.outlier:
            c.set_policy(policy, outlier)
        if endpoints is not c.endpoints and endpoints != c.endpoints:
            c.set_endpoints(endpoints)
        else:
            c.endpoints = endpoints
        if source_pod is c.last_source and c.last_view is not None:
            return c.last_view
        loc = locality_of(source_pod)
        view = c.views.get(loc)
        if view is None:
            view = c.views[loc] = Balancer(c, loc)
        c.last_source = source_pod
        c.last_view = view
        return view

    def retain(self, keys: Iterable[ClusterKey]) -> None:
        """Forget the clusters not in ``keys`` (call after a config change)."""
        keep = set(keys)
        for k in [k for k in self._clusters if k not in keep]:
            del self._clusters[k]

    def ejected(self) -> dict[ClusterKey, list[tuple[str, float]]]:
        """Ejected hosts of every cluster that has some."""
        out: dict[ClusterKey, list[tuple[str, float]]] = {}
        for k, c in self._clusters.items():
            e = c.ejected()
            if e:
                out[k] = e
        return out

    def __len__(self) -> int:
        return len(self._clusters)

    def __contains__(self, key: object) -> bool:
        return key in self._clusters
