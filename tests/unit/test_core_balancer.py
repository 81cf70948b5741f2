"""Endpoint choice per cluster: policies, consistent hashing, locality failover, outlier
detection, panic mode, retries and state across endpoint refreshes. Fake clock and seeded
randomness throughout: no sleeps."""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Hashable, Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nodeagent.core.balancer import (
    Balancer,
    BalancerRegistry,
    Host,
    Policy,
    endpoint_address,
    locality_of,
    policy_of,
)
from nodeagent.core.hashkey import SetCookie, hash_key_for
from nodeagent.core.outlier import (
    REASON_CONSECUTIVE_5XX,
    REASON_CONSECUTIVE_GATEWAY,
    OutlierSettings,
)
from nodeagent.model import Endpoint, Labels, Pod
from nodeagent.model.traffic import (
    ConsistentHash,
    HTTPCookie,
    LoadBalancer,
    LocalityLbSetting,
    OutlierDetection,
    SimpleLB,
)

KEY = ("web.default.svc.cluster.local", None, 80)
RR = LoadBalancer(simple=SimpleLB.ROUND_ROBIN)
RANDOM = LoadBalancer(simple=SimpleLB.RANDOM)
HASH = LoadBalancer(consistent_hash=ConsistentHash(http_header_name="x-user"))
OD = OutlierDetection()
OD_ALL = OutlierDetection(max_ejection_percent=100)


class Clock:
    def __init__(self, t: float = 0.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


class Events:
    def __init__(self) -> None:
        self.ejected: list[tuple[Hashable, str, str]] = []
        self.returned: list[tuple[Hashable, str]] = []

    def on_eject(self, key: Hashable, addr: str, reason: str) -> None:
        self.ejected.append((key, addr, reason))

    def on_return(self, key: Hashable, addr: str) -> None:
        self.returned.append((key, addr))


def pod(name: str, ip: str, region: str = "", zone: str = "", subzone: str = "") -> Pod:
    """A pod as a snapshot places it: ``locality`` is what its node's labels gave it."""
    return Pod(
        namespace="default",
        name=name,
        node_name="n1",
        labels=Labels.of({"app": "web"}),
        pod_ip=ip,
        locality=(region, zone, subzone),
    )


def ep(
    name: str, ip: str, region: str = "", zone: str = "", port: int = 8080, subzone: str = ""
) -> Endpoint:
    return Endpoint(pod=pod(name, ip, region, zone, subzone), ip=ip, port=port)


def eps(n: int) -> tuple[Endpoint, ...]:
    return tuple(ep(f"p{i}", f"10.0.0.{i + 1}") for i in range(n))


def addr(e: Endpoint) -> str:
    return endpoint_address(e)


class Env:
    """A registry with a fake clock, a seeded Random and recorded ejection events."""

    def __init__(self, seed: int = 7, panic_threshold: float = 50.0) -> None:
        self.clock = Clock()
        self.events = Events()
        self.reg = BalancerRegistry(
            self.clock,
            random.Random(seed),
            panic_threshold=panic_threshold,
            on_eject=self.events.on_eject,
            on_return=self.events.on_return,
        )

    def get(
        self,
        endpoints: tuple[Endpoint, ...],
        lb: LoadBalancer | None = None,
        od: OutlierDetection | None = None,
        source: Pod | None = None,
        key: Hashable = KEY,
    ) -> Balancer:
        return self.reg.get(key, endpoints, lb, od, source)


def picks(b: Balancer, n: int, hash_key: str | None = None) -> Counter[str]:
    out: Counter[str] = Counter()
    for _ in range(n):
        e = b.pick(hash_key)
        assert e is not None
        out[e.pod.name] += 1
    return out


def start(b: Balancer, e: Endpoint) -> Host:
    """A request to ``e`` starts, as the proxy starts one on the host it picked."""
    host = b.host(e)
    assert host is not None, e
    host.start()
    return host


def fail(b: Balancer, e: Endpoint, times: int, status: int = 500) -> None:
    for _ in range(times):
        b.report(e, status, False)


def ejected_names(b: Balancer, endpoints: Sequence[Endpoint]) -> set[str]:
    by_addr = {addr(e): e.pod.name for e in endpoints}
    return {by_addr[a] for a, _ in b.ejected()}


# ------------------------------------------------------------------------- policies


def test_policy_defaults_follow_istio() -> None:
    assert policy_of(None) is Policy.LEAST_REQUEST
    assert policy_of(LoadBalancer()) is Policy.LEAST_REQUEST
    assert policy_of(RR) is Policy.ROUND_ROBIN
    assert policy_of(RANDOM) is Policy.RANDOM
    assert policy_of(LoadBalancer(simple=SimpleLB.PASSTHROUGH)) is Policy.ROUND_ROBIN
    both = LoadBalancer(simple=SimpleLB.RANDOM, consistent_hash=ConsistentHash(use_source_ip=True))
    assert policy_of(both) is Policy.RING_HASH
    assert Env().get(eps(2)).policy is Policy.LEAST_REQUEST


def test_round_robin_cycles_evenly() -> None:
    b = Env().get(eps(3), RR)
    seq = [b.pick() for _ in range(9)]
    assert all(len({e.pod.name for e in seq[i : i + 3] if e}) == 3 for i in range(7))
    assert picks(b, 300) == {"p0": 100, "p1": 100, "p2": 100}


def test_random_is_roughly_uniform() -> None:
    got = picks(Env().get(eps(4), RANDOM), 4000)
    assert set(got) == {"p0", "p1", "p2", "p3"}
    assert all(850 <= c <= 1150 for c in got.values()), got


def test_least_request_prefers_idle_endpoints() -> None:
    endpoints = eps(2)
    b = Env().get(endpoints)
    for _ in range(3):
        host = start(b, endpoints[0])
    assert b.active(endpoints[0]) == 3
    got = picks(b, 2000)
    # power of two choices: the busy one wins only when both samples land on it (1/4)
    assert 1350 <= got["p1"] <= 1650, got
    for _ in range(3):
        host.finish()
    host.finish()  # one too many is harmless
    assert b.active(endpoints[0]) == 0
    got = picks(b, 2000)
    assert 850 <= got["p0"] <= 1150, got


def test_a_picked_host_counts_its_requests_in_flight_across_a_refresh() -> None:
    env = Env()
    b = env.get(eps(1))
    host = b.pick_host()
    assert host is not None and host.endpoint is b.pick() and host.addr == "10.0.0.1:8080"
    host.start()
    host.start()
    assert b.active(host.endpoint) == 2
    b = env.get((*eps(1), ep("p1", "10.0.0.2")))  # refreshed: the host's state stays
    host.finish()
    assert b.active(host.endpoint) == 1
    host.finish()
    host.finish()  # one too many is harmless
    assert b.active(host.endpoint) == 0


def test_least_request_finds_the_single_idle_endpoint_more_often() -> None:
    endpoints = eps(10)
    b = Env().get(endpoints)
    for e in endpoints[1:]:
        start(b, e)
    got = picks(b, 2000)
    # 1 - 0.9² = 19 % instead of 10 %
    assert 300 <= got["p0"] <= 460, got


def test_least_request_balances_a_simulated_load() -> None:
    endpoints = eps(5)
    b = Env().get(endpoints)
    rnd = random.Random(3)
    in_flight: list[Host] = []
    for _ in range(2000):
        h = b.pick_host()
        assert h is not None
        h.start()
        in_flight.append(h)
        if len(in_flight) > 20:
            in_flight.pop(rnd.randrange(len(in_flight))).finish()
    loads = [b.active(e) for e in endpoints]
    assert sum(loads) == 20 and max(loads) - min(loads) <= 3, loads


def test_no_endpoints_picks_nothing() -> None:
    b = Env().get(())
    assert b.pick() is None and b.pick("k") is None and b.ejected() == []


def test_endpoint_address_brackets_ipv6() -> None:
    assert endpoint_address(ep("a", "10.0.0.1")) == "10.0.0.1:8080"
    assert endpoint_address(ep("a", "fd00::1")) == "[fd00::1]:8080"


# ------------------------------------------------------------------- consistent hash


KEYS = [f"user-{i}" for i in range(2000)]


def mapping(b: Balancer, keys: Sequence[str] = KEYS) -> dict[str, str]:
    out: dict[str, str] = {}
    for k in keys:
        e = b.pick(k)
        assert e is not None
        out[k] = e.pod.name
    return out


def test_same_key_same_endpoint_across_calls_refreshes_and_instances() -> None:
    env = Env()
    endpoints = eps(10)
    first = mapping(env.get(endpoints, HASH))
    assert mapping(env.get(endpoints, HASH)) == first
    rebuilt = tuple(reversed(eps(10)))  # equal endpoints, new objects, other order
    assert mapping(env.get(rebuilt, HASH)) == first
    assert mapping(Env(seed=99).get(eps(10), HASH)) == first


def test_hash_spreads_keys_over_endpoints() -> None:
    got = Counter(mapping(Env().get(eps(10), HASH)).values())
    assert len(got) == 10
    assert all(100 <= c <= 300 for c in got.values()), got


@settings(max_examples=10, deadline=None)
@given(st.integers(min_value=0, max_value=9))
def test_removing_an_endpoint_moves_only_its_keys(gone: int) -> None:
    env = Env()
    endpoints = eps(10)
    before = mapping(env.get(endpoints, HASH))
    after = mapping(env.get(endpoints[:gone] + endpoints[gone + 1 :], HASH))
    name = f"p{gone}"
    moved = {k for k in KEYS if before[k] != after[k]}
    assert moved == {k for k in KEYS if before[k] == name}
    assert len({after[k] for k in moved}) >= 5  # spread, not dumped on one neighbour


def test_adding_an_endpoint_only_takes_keys() -> None:
    env = Env()
    endpoints = eps(10)
    before = mapping(env.get(endpoints, HASH))
    after = mapping(env.get((*endpoints, ep("p10", "10.0.0.11")), HASH))
    moved = [k for k in KEYS if before[k] != after[k]]
    assert all(after[k] == "p10" for k in moved)
    assert 0.04 * len(KEYS) <= len(moved) <= 0.15 * len(KEYS)


def test_missing_hash_key_falls_back_to_random() -> None:
    assert len(picks(Env().get(eps(10), HASH), 500)) >= 9


def test_hash_retry_excludes_previous_hosts_deterministically() -> None:
    endpoints = eps(5)
    b = Env().get(endpoints, HASH)
    first = b.pick("alice")
    assert first is not None
    second = b.pick("alice", {addr(first)})
    assert second is not None and second != first
    assert b.pick("alice", {addr(first)}) == second
    third = b.pick("alice", {addr(first), addr(second)})
    assert third not in (None, first, second)
    assert b.pick("alice", {addr(e) for e in endpoints}) is not None


def test_hash_ejection_moves_only_the_ejected_hosts_keys() -> None:
    env = Env()
    endpoints = eps(10)
    b = env.get(endpoints, HASH, OD_ALL)
    before = mapping(b)
    fail(b, endpoints[4], 5)
    assert ejected_names(b, endpoints) == {"p4"}
    after = mapping(b)
    assert {k for k in KEYS if before[k] != after[k]} == {k for k in KEYS if before[k] == "p4"}


# ----------------------------------------------------------------------- hash keys


def test_hash_key_from_header_query_and_source_ip() -> None:
    headers = {"x-user": "alice"}
    by_header = ConsistentHash(http_header_name="X-User")
    assert hash_key_for(by_header, headers, {}, "10.0.0.9", {}) == ("alice", None)
    assert hash_key_for(by_header, {}, {}, "10.0.0.9", {}) == (None, None)
    by_query = ConsistentHash(http_query_parameter_name="session")
    assert hash_key_for(by_query, {}, {}, "", {"session": "s1"}) == ("s1", None)
    assert hash_key_for(by_query, {}, {}, "", {}) == (None, None)
    by_ip = ConsistentHash(use_source_ip=True)
    assert hash_key_for(by_ip, {}, {}, "10.0.0.9", {}) == ("10.0.0.9", None)


def test_hash_key_from_cookie_present_or_absent_without_ttl() -> None:
    ch = ConsistentHash(http_cookie=HTTPCookie(name="sticky"))
    assert hash_key_for(ch, {}, {"sticky": "abc"}, "10.0.0.9", {}) == ("abc", None)
    assert hash_key_for(ch, {}, {"sticky": '"abc"'}, "10.0.0.9", {}) == ("abc", None)
    assert hash_key_for(ch, {}, {}, "10.0.0.9", {}) == (None, None)


def test_cookie_with_ttl_is_generated_and_then_sticks() -> None:
    ch = ConsistentHash(http_cookie=HTTPCookie(name="sticky", ttl=60.0))
    conn = "10.0.0.9:40000>10.96.0.1:80"
    value, cookie = hash_key_for(ch, {}, {}, "10.0.0.9", {}, connection=conn)
    assert value is not None and len(value) == 16
    assert cookie == SetCookie("sticky", value, 60)
    assert cookie.header_value() == f'sticky="{value}"; Max-Age=60; HttpOnly' == str(cookie)
    assert hash_key_for(ch, {}, {}, "10.0.0.9", {}, connection=conn)[0] == value
    assert hash_key_for(ch, {}, {}, "10.0.0.9", {}, connection=conn + "x")[0] != value
    # the browser sends the cookie back (quoted, as set): same key, same endpoint
    b = Env().get(eps(10), LoadBalancer(consistent_hash=ch))
    again, none = hash_key_for(ch, {}, {"sticky": f'"{value}"'}, "10.0.0.9", {})
    assert again == value and none is None
    assert b.pick(value) == b.pick(again)
    session = ConsistentHash(http_cookie=HTTPCookie(name="s", ttl=0.0))
    _, c = hash_key_for(session, {}, {}, "10.0.0.9", {})
    assert c is not None and c.header_value() == f's="{c.value}"; HttpOnly'


# ------------------------------------------------------------------------ locality

SRC = pod("client", "10.1.0.1", "us-east", "a")
A = ep("A", "10.0.0.1", "us-east", "a")
B = ep("B", "10.0.0.2", "us-east", "b")
C = ep("C", "10.0.0.3", "eu-west", "x")
D = ep("D", "10.0.0.4", "ap-south", "y")
E = ep("E", "10.0.0.5", "ap-south", "y")
F = ep("F", "10.0.0.6", "ap-south", "y")
WORLD = (F, E, D, C, B, A)
FAILOVER = LoadBalancer(
    simple=SimpleLB.ROUND_ROBIN,
    locality=LocalityLbSetting(failover=(("us-east", "eu-west"),)),
)


def test_locality_of_is_the_locality_the_snapshot_gave_the_pod() -> None:
    assert locality_of(SRC) == ("us-east", "a", "")
    assert locality_of(pod("p", "10.0.0.1")) == ("", "", "")
    assert locality_of(None) == ("", "", "")


def test_locality_is_ignored_without_outlier_detection() -> None:
    b = Env().get(WORLD, FAILOVER, None, SRC)
    assert set(picks(b, 60)) == {"A", "B", "C", "D", "E", "F"}


def test_locality_can_be_disabled_and_needs_a_source_locality() -> None:
    off = LoadBalancer(simple=SimpleLB.ROUND_ROBIN, locality=LocalityLbSetting(enabled=False))
    assert len(picks(Env().get(WORLD, off, OD_ALL, SRC), 60)) == 6
    assert len(picks(Env().get(WORLD, RR, OD_ALL, None), 60)) == 6
    assert len(picks(Env().get(WORLD, RR, OD_ALL, pod("c", "10.1.0.2")), 60)) == 6


def test_locality_is_on_by_default_once_outlier_detection_is_set() -> None:
    assert set(picks(Env().get(WORLD, None, OD, SRC), 50)) == {"A"}


def test_locality_order_zone_region_failover_then_any() -> None:
    b = Env().get(WORLD, FAILOVER, OD_ALL, SRC)
    assert set(picks(b, 12)) == {"A"}
    fail(b, A, 5)
    assert set(picks(b, 12)) == {"B"}
    fail(b, B, 5)
    assert set(picks(b, 12)) == {"C"}  # the failover region before the others
    fail(b, C, 5)  # 3 of 6 healthy: not yet panic
    assert not b.in_panic
    assert set(picks(b, 12)) == {"D", "E", "F"}


def test_subzone_is_the_first_tier_then_the_zone() -> None:
    src = pod("client", "10.1.0.1", "us-east", "a", "rack1")
    same = ep("same", "10.0.0.7", "us-east", "a", subzone="rack1")
    rack2 = ep("rack2", "10.0.0.8", "us-east", "a", subzone="rack2")
    b = Env().get((B, rack2, same), RR, OD_ALL, src)
    assert set(picks(b, 6)) == {"same"}
    fail(b, same, 5)
    assert set(picks(b, 6)) == {"rack2"}  # same zone, other subzone, before zone b
    tiers = b.explain()["tiers"]
    assert isinstance(tiers, list)
    assert [[h["locality"] for h in t] for t in tiers] == [["us-east/a/rack2"], ["us-east/b"]]


def test_locality_without_failover_goes_to_any_region() -> None:
    b = Env().get(WORLD, RR, OD_ALL, SRC)
    fail(b, A, 5)
    fail(b, B, 5)
    assert set(picks(b, 40)) == {"C", "D", "E", "F"}


def test_sources_in_other_localities_share_host_state() -> None:
    env = Env()
    here = env.get(WORLD, RR, OD_ALL, SRC)
    there = env.get(WORLD, RR, OD_ALL, pod("eu-client", "10.1.0.3", "eu-west", "x"))
    assert there is not here
    assert env.get(WORLD, RR, OD_ALL, SRC) is here
    assert set(picks(there, 6)) == {"C"}
    start(here, C)
    assert there.active(C) == 1
    fail(here, C, 5)
    assert ejected_names(there, WORLD) == {"C"}
    assert "C" not in picks(there, 30)


# ---------------------------------------------------------------- outlier detection


def test_outlier_settings_defaults() -> None:
    s = OutlierSettings.of(OutlierDetection())
    assert (s.consecutive_5xx, s.consecutive_gateway) == (5, 0)
    assert (s.interval, s.base_ejection_time, s.max_ejection_percent) == (10.0, 30.0, 10)


def test_ejected_after_consecutive_5xx_and_avoided() -> None:
    env = Env()
    endpoints = eps(10)
    b = env.get(endpoints, RR, OD)
    fail(b, endpoints[3], 4)
    assert b.ejected() == []
    fail(b, endpoints[3], 1)
    assert env.events.ejected == [(KEY, addr(endpoints[3]), REASON_CONSECUTIVE_5XX)]
    assert "p3" not in picks(b, 90)


def test_success_resets_the_counter() -> None:
    endpoints = eps(10)
    b = Env().get(endpoints, RR, OD)
    fail(b, endpoints[0], 4)
    b.report(endpoints[0], 200)
    fail(b, endpoints[0], 4)
    b.report(endpoints[0], 404)  # a 4xx is not an upstream failure
    fail(b, endpoints[0], 4)
    b.report(endpoints[0], None)  # a TCP connection that went through
    fail(b, endpoints[0], 4)
    assert b.ejected() == []


def test_zero_consecutive_5xx_disables_the_check() -> None:
    endpoints = eps(10)
    b = Env().get(endpoints, RR, OutlierDetection(consecutive_5xx_errors=0))
    fail(b, endpoints[0], 50)
    assert b.ejected() == []


def test_gateway_errors_and_connect_failures() -> None:
    env = Env()
    endpoints = eps(10)
    od = OutlierDetection(consecutive_gateway_errors=3, consecutive_5xx_errors=0)
    b = env.get(endpoints, RR, od)
    for status in (502, 503, 500, 504, 502):  # the 500 breaks the gateway streak
        b.report(endpoints[0], status)
    assert b.ejected() == []
    b.report(endpoints[1], 502)
    b.report(endpoints[1], 504)
    b.report(endpoints[1], None, connect_failure=True)
    assert env.events.ejected == [(KEY, addr(endpoints[1]), REASON_CONSECUTIVE_GATEWAY)]


def test_connect_failures_count_as_5xx_too() -> None:
    endpoints = eps(10)
    b = Env().get(endpoints, RR, OD)
    for _ in range(5):
        b.report(endpoints[2], None, connect_failure=True)
    assert ejected_names(b, endpoints) == {"p2"}


def test_ejected_host_returns_on_the_sweep_after_base_time() -> None:
    env = Env()
    endpoints = eps(10)
    b = env.get(endpoints, RR, OD)
    env.clock.t = 1.0
    fail(b, endpoints[0], 5)  # back at 31 s, i.e. at the sweep of 40 s
    assert b.ejected() == [(addr(endpoints[0]), 39.0)]
    for t in (10.0, 30.9, 39.9):
        env.clock.t = t
        assert "p0" not in picks(b, 20)
    assert env.events.returned == []
    env.clock.t = 40.0
    assert "p0" in picks(b, 10)
    assert env.events.returned == [(KEY, addr(endpoints[0]))]
    assert b.ejected() == []


def test_returning_host_starts_with_fresh_counters() -> None:
    env = Env()
    endpoints = eps(10)
    b = env.get(endpoints, RR, OD)
    fail(b, endpoints[0], 5)
    fail(b, endpoints[0], 3)  # answers of requests still in flight while ejected
    env.clock.t = 30.0
    assert b.ejected() == []
    fail(b, endpoints[0], 4)
    assert b.ejected() == []
    fail(b, endpoints[0], 1)
    assert len(b.ejected()) == 1


def test_explicit_sweep_is_idempotent_and_lazy_sweeps_catch_up() -> None:
    env = Env()
    endpoints = eps(10)
    b = env.get(endpoints, RR, OD)
    fail(b, endpoints[0], 5)
    b.sweep(29.0)
    b.sweep(29.0)
    assert len(b.ejected()) == 1
    b.sweep(1000.0)  # long idle: every due tick at once
    env.clock.t = 1000.0
    assert b.ejected() == [] and env.events.returned == [(KEY, addr(endpoints[0]))]


def test_ejection_time_grows_with_repeated_ejections_and_decays() -> None:
    env = Env()
    endpoints = eps(10)
    b = env.get(endpoints, RR, OD)
    fail(b, endpoints[0], 5)
    assert b.ejected() == [(addr(endpoints[0]), 30.0)]
    env.clock.t = 30.0
    assert b.ejected() == []
    fail(b, endpoints[0], 5)  # again right away: 2 x base
    assert b.ejected() == [(addr(endpoints[0]), 60.0)]
    env.clock.t = 90.0
    assert b.ejected() == []
    env.clock.t = 115.0  # healthy through the sweeps of 100 s and 110 s: multiplier back to 0
    fail(b, endpoints[0], 5)
    assert b.ejected() == [(addr(endpoints[0]), 35.0)]  # 30 s → back at the 150 s sweep


def test_ejection_time_is_capped_at_max_ejection_time() -> None:
    env = Env()
    endpoints = eps(10)
    b = env.get(endpoints, RR, OutlierDetection(base_ejection_time=100.0, interval=1.0))
    durations = []
    for _ in range(5):
        fail(b, endpoints[0], 5)
        (_, left), *_ = b.ejected()
        durations.append(left)
        env.clock.t += left
        assert b.ejected() == []
    assert durations == [100.0, 200.0, 300.0, 300.0, 300.0]


def test_max_ejection_percent_default_lets_the_first_of_two_go() -> None:
    env = Env()
    endpoints = eps(2)
    b = env.get(endpoints, RR, OD)
    fail(b, endpoints[0], 5)
    fail(b, endpoints[1], 5)  # 50 % already ejected ≥ 10 %: refused
    assert ejected_names(b, endpoints) == {"p0"}
    env.clock.t = 30.0
    assert b.ejected() == []
    fail(b, endpoints[1], 4)  # the refused attempt reset the counter
    assert b.ejected() == []
    fail(b, endpoints[1], 1)
    assert ejected_names(b, endpoints) == {"p1"}


def test_max_ejection_percent_limits_how_many_go() -> None:
    endpoints = eps(10)
    b = Env().get(endpoints, RR, OutlierDetection(max_ejection_percent=20))
    for e in endpoints[:5]:
        fail(b, e, 5)
    assert ejected_names(b, endpoints) == {"p0", "p1"}  # 0 % < 20, 10 % < 20, 20 % is not


@settings(max_examples=60, deadline=None)
@given(
    hosts=st.integers(min_value=1, max_value=12),
    max_pct=st.integers(min_value=0, max_value=100),
    reports=st.lists(
        st.tuples(st.integers(min_value=0, max_value=11), st.sampled_from([200, 500, 503])),
        max_size=300,
    ),
)
def test_ejections_never_exceed_max_ejection_percent(
    hosts: int, max_pct: int, reports: list[tuple[int, int]]
) -> None:
    endpoints = eps(hosts)
    b = Env().get(
        endpoints, RR, OutlierDetection(consecutive_5xx_errors=2, max_ejection_percent=max_pct)
    )
    for i, status in reports:
        b.report(endpoints[i % hosts], status)
        n = len(b.ejected())
        assert n == 0 or 100.0 * (n - 1) / hosts < max_pct


def test_panic_mode_balances_over_all_hosts() -> None:
    endpoints = eps(4)
    b = Env().get(endpoints, RR, OD_ALL)
    fail(b, endpoints[0], 5)
    fail(b, endpoints[1], 5)
    assert not b.in_panic  # 50 % healthy is not below the threshold
    assert set(picks(b, 20)) == {"p2", "p3"}
    fail(b, endpoints[2], 5)
    assert b.in_panic
    assert set(picks(b, 20)) == {"p0", "p1", "p2", "p3"}


def test_without_panic_threshold_no_healthy_host_means_no_pick() -> None:
    endpoints = eps(2)
    b = Env(panic_threshold=0.0).get(endpoints, RR, OD_ALL)
    fail(b, endpoints[0], 5)
    fail(b, endpoints[1], 5)
    assert not b.in_panic and b.pick() is None


def test_removing_outlier_detection_returns_ejected_hosts() -> None:
    env = Env()
    endpoints = eps(4)
    b = env.get(endpoints, RR, OD_ALL)
    fail(b, endpoints[0], 5)
    b = env.get(endpoints, RR, None)
    assert b.ejected() == [] and env.events.returned == [(KEY, addr(endpoints[0]))]
    assert set(picks(b, 8)) == {"p0", "p1", "p2", "p3"}


def test_reports_for_unknown_endpoints_are_ignored() -> None:
    b = Env().get(eps(2), RR, OD)
    stranger = ep("x", "10.9.9.9")
    fail(b, stranger, 10)
    assert b.host(stranger) is None
    assert b.active(stranger) == 0 and b.ejected() == []


# ----------------------------------------------------------------------- retries


@pytest.mark.parametrize("lb", [None, RR, RANDOM, HASH], ids=["least", "rr", "random", "hash"])
def test_retries_avoid_previous_hosts(lb: LoadBalancer | None) -> None:
    endpoints = eps(3)
    b = Env().get(endpoints, lb)
    tried = {addr(endpoints[0]), addr(endpoints[1])}
    for i in range(100):
        e = b.pick(f"k{i}", tried)
        assert e == endpoints[2]
    everything = {addr(e) for e in endpoints}
    assert b.pick("k", everything) is not None  # every host tried: retry one anyway


def test_retry_moves_to_the_next_locality_tier() -> None:
    b = Env().get(WORLD, FAILOVER, OD_ALL, SRC)
    assert b.pick(None, {addr(A)}) == B
    assert b.pick(None, {addr(A), addr(B)}) == C


def test_retry_does_not_prefer_an_ejected_host_over_a_tried_one() -> None:
    endpoints = eps(2)
    b = Env().get(endpoints, RR, OD)
    fail(b, endpoints[0], 5)
    assert b.pick(None, {addr(endpoints[1])}) == endpoints[1]


# ------------------------------------------------------------ refresh and registry


def test_state_survives_an_endpoint_refresh() -> None:
    env = Env()
    endpoints = eps(10)
    b = env.get(endpoints, RR, OD)
    start(b, endpoints[0])
    start(b, endpoints[0])
    fail(b, endpoints[1], 3)
    fail(b, endpoints[2], 5)
    refreshed = (*eps(10), ep("p10", "10.0.0.11"))  # new objects, one more endpoint
    b = env.get(refreshed, RR, OD)
    assert b.active(refreshed[0]) == 2
    assert ejected_names(b, refreshed) == {"p2"}
    fail(b, refreshed[1], 2)  # 3 before the refresh + 2 = 5
    assert ejected_names(b, refreshed) == {"p1", "p2"}


def test_state_of_removed_endpoints_is_dropped() -> None:
    env = Env()
    endpoints = eps(10)
    b = env.get(endpoints, RR, OD)
    gone = start(b, endpoints[9])
    fail(b, endpoints[9], 5)
    fail(b, endpoints[8], 4)
    b = env.get(endpoints[:8], RR, OD)
    assert b.ejected() == [] and b.active(endpoints[9]) == 0
    gone.finish()  # a request that outlived its endpoint
    b = env.get(endpoints, RR, OD)
    assert b.ejected() == [] and b.active(endpoints[9]) == 0
    fail(b, endpoints[8], 4)  # counting starts over
    assert b.ejected() == []
    assert len(picks(b, 10)) == 10


def test_ejected_host_leaving_frees_its_ejection_slot() -> None:
    env = Env()
    endpoints = eps(10)
    b = env.get(endpoints, RR, OD)
    fail(b, endpoints[0], 5)
    fail(b, endpoints[1], 5)
    assert ejected_names(b, endpoints) == {"p0"}
    b = env.get(endpoints[1:], RR, OD)
    fail(b, endpoints[1], 5)
    assert ejected_names(b, endpoints) == {"p1"}


def test_relabelled_pod_changes_its_locality_on_refresh() -> None:
    env = Env()
    moved = ep("B", "10.0.0.2", "us-east", "a")
    b = env.get((A, B), RR, OD_ALL, SRC)
    assert set(picks(b, 6)) == {"A"}
    b = env.get((A, moved), RR, OD_ALL, SRC)
    assert set(picks(b, 6)) == {"A", "B"}


def test_policy_change_on_reload_keeps_host_state() -> None:
    env = Env()
    endpoints = eps(3)
    b = env.get(endpoints, RR, OD)
    start(b, endpoints[0])
    b = env.get(endpoints, HASH, OD)
    assert b.policy is Policy.RING_HASH and b.active(endpoints[0]) == 1
    assert len({b.pick("same") for _ in range(20)}) == 1


def test_registry_keys_clusters_and_retain_forgets_the_rest() -> None:
    env = Env()
    other = ("api.default.svc.cluster.local", "v2", 8080)
    endpoints = eps(2)
    b1 = env.get(endpoints)
    b2 = env.get(endpoints, key=other)
    start(b1, endpoints[0])
    assert b2.active(endpoints[0]) == 0 and b1.key == KEY and b2.key == other
    assert len(env.reg) == 2 and other in env.reg
    fail(b2, endpoints[0], 5)
    b2 = env.get(endpoints, None, OD, key=other)
    fail(b2, endpoints[0], 5)
    assert list(env.reg.ejected()) == [other]
    env.reg.retain([other])
    assert len(env.reg) == 1 and KEY not in env.reg
    assert env.get(endpoints).active(endpoints[0]) == 0
