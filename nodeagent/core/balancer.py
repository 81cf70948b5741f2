"""Endpoint choice per cluster with Istio/Envoy semantics: load-balancing policies,
consistent hashing, locality failover and panic mode, over hosts whose health
``core.outlier`` tracks.

Owns, per cluster (service FQDN, subset, port):

- the *policy*: ``LEAST_REQUEST`` (Istio's default since 1.14 when a DestinationRule sets
  nothing: power of two choices over active requests), ``ROUND_ROBIN``, ``RANDOM``, and a
  ring hash for ``consistentHash`` (the key comes from ``core.hashkey``). ``PASSTHROUGH``
  is rejected by the config layer; if it reaches this module it is treated as
  ``ROUND_ROBIN``.
- *locality priority*: Istio turns locality failover on only when the rule also sets
  ``outlierDetection`` (without it, health is never known and failover can never happen);
  a missing ``localityLbSetting`` means the mesh default, which is enabled. Tiers, best
  first: same region, zone and subzone as the source pod, same region and zone, same
  region, each ``failover`` target of the source region in the order written, then
  everything else. A pick uses the best tier that has a healthy host (Envoy's priority
  levels, without the 1.4 overprovisioning spill-over). A pod's locality
  (``Pod.locality``) is its node's, worked out once per snapshot by the model
  (``model.objects.pod_locality``); this module only compares them.
- *panic mode*: when fewer than ``panic_threshold`` percent of the hosts are healthy (Envoy's
  default 50 %), ejections are ignored and the pick is over all hosts of the best tier.
  Note: Istio documents ``outlierDetection.minHealthPercent`` (which it maps to the panic
  threshold) as defaulting to 0 %; a registry built with ``panic_threshold=0`` behaves that
  way (no healthy host left means no pick).
- per-host bookkeeping that survives config reloads: state is keyed by endpoint address
  (``ip:port``); hosts that leave the endpoint set are forgotten.

Not owned: connection pools and their limits (the proxy), the hash input of a request
(``core.hashkey``; ``hash_key_for`` is re-exported here for the proxy), when a host is
ejected and returns (``core.outlier``), retries themselves (the proxy passes the addresses
it already tried as ``exclude``). No I/O and no asyncio; time and randomness are injected.

Use: the proxy keeps one :class:`BalancerRegistry` and per request calls
``registry.get(key, endpoints, lb, outlier, source_pod)``, then ``pick()``, ``started()``
before forwarding, ``finished()`` and ``report()`` when the upstream answered or failed
(or ``pick_host()``, then the ``Host``'s ``start()`` and ``finish()``).
"""

from __future__ import annotations

import enum
import random
from bisect import bisect_left
from collections.abc import Callable, Hashable, Iterable, Sequence
from collections.abc import Set as AbstractSet
from typing import Final, TypeAlias

from nodeagent.core.hashkey import hash_key_for, stable_hash
from nodeagent.core.outlier import (
    EjectHook,
    HostHealth,
    OutlierDetector,
    OutlierSettings,
    ReturnHook,
)
from nodeagent.model.objects import (
    NO_LOCALITY,
    Locality,
    Pod,
    format_locality,
)
from nodeagent.model.snapshot import Endpoint
from nodeagent.model.traffic import LoadBalancer, OutlierDetection, SimpleLB

__all__ = [
    "DEFAULT_PANIC_THRESHOLD",
    "RING_POINTS_PER_HOST",
    "Balancer",
    "BalancerRegistry",
    "ClusterKey",
    "Host",
    "Policy",
    "endpoint_address",
    "hash_key_for",
    "locality_enabled",
    "locality_of",
    "policy_of",
]

ClusterKey: TypeAlias = Hashable
"""What identifies a cluster; the proxy uses ``(service fqdn, subset | None, port)``."""

DEFAULT_PANIC_THRESHOLD: Final = 50.0
"""Envoy's default ``healthy_panic_threshold``, in percent."""
RING_POINTS_PER_HOST: Final = 160
"""Ring entries per host. A fixed count (Envoy scales it to a minimum ring size) keeps
every surviving host's points in place when hosts come and go: only the keys of a
removed host move, and only keys taken over by an added host move."""

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


def locality_of(pod: Pod | None) -> Locality:
    """``(region, zone, subzone)`` of a pod as its snapshot placed it (its node's topology
    labels or its own locality label, see ``model.objects.pod_locality``)."""
    return NO_LOCALITY if pod is None else pod.locality


def endpoint_address(ep: Endpoint) -> str:
    """``ip:port`` (``[ip]:port`` for IPv6): the key of per-host state and of ``exclude``."""
    if ":" in ep.ip:
        return f"[{ep.ip}]:{ep.port}"
    return f"{ep.ip}:{ep.port}"


# ------------------------------------------------------------------------- per host


class Host(HostHealth):
    """Per-address state (health in ``HostHealth``); identity-hashed (used in sets).
    ``Balancer.pick_host`` returns one: its ``endpoint``, its ``addr``
    (``endpoint_address``), and ``start``/``finish`` for a request to it, with no look-up
    by address (the proxy's L7 path, per request)."""

    __slots__ = ("active", "endpoint", "locality", "points")

    def __init__(self, endpoint: Endpoint, addr: str) -> None:
        super().__init__(addr)
        self.endpoint = endpoint
        self.locality = endpoint.pod.locality
        self.active = 0
        self.points: tuple[int, ...] | None = None

    def start(self) -> None:
        """A request to this host is now in flight (for ``LEAST_REQUEST``)."""
        self.active += 1

    def finish(self) -> None:
        """A request to this host is over, whatever its outcome."""
        if self.active > 0:
            self.active -= 1

    def ring_points(self) -> tuple[int, ...]:
        if self.points is None:
            self.points = tuple(
                stable_hash(f"{self.addr}_{i}") for i in range(RING_POINTS_PER_HOST)
            )
        return self.points


class _Ring:
    """A sorted hash ring over some hosts: ``hashes[i]`` belongs to ``hosts[i]``."""

    __slots__ = ("hashes", "hosts")

    def __init__(self, hashes: list[int], hosts: list[Host]) -> None:
        self.hashes = hashes
        self.hosts = hosts

    @classmethod
    def build(cls, hosts: Iterable[Host]) -> _Ring:
        entries = sorted((p, i, h) for i, h in enumerate(hosts) for p in h.ring_points())
        return cls([e[0] for e in entries], [e[2] for e in entries])

    def subset(self, members: set[Host]) -> _Ring:
        hashes: list[int] = []
        hosts: list[Host] = []
        for hv, h in zip(self.hashes, self.hosts, strict=True):
            if h in members:
                hashes.append(hv)
                hosts.append(h)
        return _Ring(hashes, hosts)

    def lookup(self, hv: int, exclude: AbstractSet[str]) -> Host:
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
        self.endpoints: tuple[Endpoint, ...] = ()
        self.hosts: list[Host] = []
        self.by_key: dict[tuple[str, int], Host] = {}
        self.lb: LoadBalancer | None = None
        self.outlier: OutlierDetection | None = None
        self.policy = Policy.LEAST_REQUEST
        self.kind = _LR
        self.locality_on = False
        self.failover: tuple[tuple[str, str], ...] = ()
        self.detector = OutlierDetector(key, clock, on_eject, on_return)
        self.version = 0
        """Bumped whenever the hosts, their health or the tiering rules change."""
        self.rr = rnd.randrange(1 << 16)
        """Envoy starts round robin at a random offset so that proxies do not march in step."""
        self.ring: _Ring | None = None
        self.views: dict[Locality, Balancer] = {}
        self.last_source: Pod | None = None
        self.last_view: Balancer | None = None

    # ---- refresh

    def set_endpoints(self, endpoints: tuple[Endpoint, ...]) -> None:
        old = self.by_key
        by_key: dict[tuple[str, int], Host] = {}
        hosts: list[Host] = []
        for ep in endpoints:
            k = (ep.ip, ep.port)
            if k in by_key:
                continue
            h = old.get(k)
            if h is None:
                h = Host(ep, endpoint_address(ep))
            else:
                h.endpoint = ep
                h.locality = ep.pod.locality
            by_key[k] = h
            hosts.append(h)
        if [h.addr for h in hosts] != [h.addr for h in self.hosts]:
            self.ring = None
        self.endpoints = endpoints
        self.hosts = hosts
        self.by_key = by_key
        self.detector.count(hosts)
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
        self.detector.configure(settings, self.hosts)
        self.version += 1

    # ---- outlier detection

    def advance(self, now: float) -> None:
        """The outlier sweep due by ``now``; a host coming back changes the tiers."""
        if self.detector.advance(now, self.hosts):
            self.version += 1

    def report(self, ep: Endpoint, status: int | None, connect_failure: bool) -> None:
        od = self.detector
        if od.settings is None:
            return
        h = self.by_key.get((ep.ip, ep.port))
        if h is not None and od.report(h, status, connect_failure, self.hosts):
            self.version += 1

    def ejected(self) -> list[tuple[str, float]]:
        if self.detector.settings is None:
            return []
        now = self.clock()
        self.advance(now)
        return self.detector.ejected(now, self.hosts)

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

    def __init__(self, cluster: _Cluster, locality: Locality) -> None:
        self._c = cluster
        self._locality = locality
        self._version = -1
        self._tiers: tuple[tuple[Host, ...], ...] = ()
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
        healthy = [h for h in hosts if not h.ejected] if c.detector.n_ejected else hosts
        panic = bool(hosts) and len(healthy) * 100.0 < c.panic_threshold * len(hosts)
        pool = hosts if panic else healthy
        if c.locality_on and self._locality != NO_LOCALITY and pool:
            region, zone, subzone = self._locality
            targets = [to for frm, to in c.failover if frm == region]
            rest = 3 + len(targets)
            buckets: dict[int, list[Host]] = {}
            for h in pool:
                r, z, sz = h.locality
                if r == region:
                    rank = (0 if sz == subzone else 1) if z == zone else 2
                elif r in targets:
                    rank = 3 + targets.index(r)
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
        host = self.pick_host(hash_key, exclude)
        return None if host is None else host.endpoint

    def pick_host(
        self, hash_key: str | None = None, exclude: AbstractSet[str] = frozenset()
    ) -> Host | None:
        """``pick``, as the chosen endpoint's ``Host``."""
        c = self._c
        od = c.detector
        if od.settings is not None:
            now = c.clock()
            if now >= od.next_sweep:
                c.advance(now)
        if self._version != c.version:
            self._refresh()
        tiers = self._tiers
        if not tiers:
            return None
        ti = 0
        hosts: Sequence[Host] = tiers[0]
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
                return hosts[0]
            r = c.rnd.random
            a = hosts[int(r() * n)]
            b = hosts[int(r() * n)]
            return b if b.active < a.active else a
        if kind == _RR:
            i = c.rr
            c.rr = i + 1
            return hosts[i % n]
        if kind == _RANDOM:
            return hosts[int(c.rnd.random() * n)]
        ring = self._rings[ti]
        if ring is None:
            ring = self._rings[ti] = c.master_ring().subset(set(tiers[ti]))
        hv = stable_hash(hash_key) if hash_key is not None else c.rnd.getrandbits(64)
        return ring.lookup(hv, exclude)

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
                    "locality": format_locality(h.locality),
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
            hv = stable_hash(hash_key) if hash_key is not None else 0
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

    def host(self, ep: Endpoint) -> Host | None:
        """``ep``'s host in this cluster (None for an endpoint it does not hold). The proxy
        keeps the ``Host`` that ``pick_host`` gave; this finds one by address."""
        return self._c.by_key.get((ep.ip, ep.port))

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
            f"ejected={self._c.detector.n_ejected}, locality={self._locality})"
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
