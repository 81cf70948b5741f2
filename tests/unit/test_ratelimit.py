"""Local rate limits and quotas: token buckets at their boundaries, keyed buckets and their
cap, which policies apply, state across a policy change, UTC quota windows, the
LocalRateLimit YAML with its mistakes named by field path, and the crash-safe quota store
(reload, torn and damaged files, a writer killed with SIGKILL)."""

from __future__ import annotations

import logging
import math
import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import yaml

from nodeagent.control.ratelimit import API_VERSION, LOCAL_RATE_LIMIT_KIND
from nodeagent.control.schema import validate
from nodeagent.core.ratelimit import (
    UNLIMITED,
    QuotaCharge,
    QuotaCounter,
    RateDecision,
    RateLimiter,
    TokenBucketState,
    applicable,
    strictest,
    window_start,
)
from nodeagent.errors import LocalStateError
from nodeagent.model.objects import Labels
from nodeagent.model.ratelimit import (
    NO_KEY,
    HttpRateLimit,
    KeyKind,
    LocalRateLimit,
    Quota,
    QuotaWindow,
    RateLimitKey,
    TcpRateLimit,
    TokenBucket,
)
from nodeagent.proxy.quotastore import QuotaStore, encode_line, read_journal

ROOT = Path(__file__).resolve().parents[2]


def policy(
    name: str = "p",
    *,
    ns: str = "default",
    http: TokenBucket | None = None,
    key: RateLimitKey = NO_KEY,
    tcp: TokenBucket | None = None,
    quotas: tuple[Quota, ...] = (),
    selector: dict[str, str] | None = None,
    ports: tuple[int, ...] = (),
) -> LocalRateLimit:
    return LocalRateLimit(
        namespace=ns,
        name=name,
        selector=None if selector is None else Labels.of(selector),
        ports=ports,
        http=None if http is None else HttpRateLimit(http, key),
        tcp=None if tcp is None else TcpRateLimit(tcp),
        quotas=quotas,
    )


def http(
    rl: RateLimiter,
    policies: tuple[LocalRateLimit, ...],
    now: float,
    *,
    workload: str = "default/w",
    principal: str | None = None,
    headers: dict[str, str] | None = None,
    route: str = "",
) -> RateDecision:
    return rl.check_http(
        policies,
        workload=workload,
        source_principal=principal,
        header=(headers or {}).get,
        route=route,
        now=now,
    )


# --- token bucket ------------------------------------------------------------------

Step = tuple[float, str, object]
"""(now, "take" | "peek", expected: bool for take, (tokens, reset) for peek)."""

BUCKETS: list[tuple[str, TokenBucket, float, list[Step]]] = [
    (
        "starts full, then empty until the first boundary",
        TokenBucket(3, 1, 0.1),
        100.0,
        [
            (100.0, "take", True),
            (100.0, "take", True),
            (100.05, "take", True),
            (100.05, "take", False),
            (100.0999, "take", False),
            (100.1, "take", True),  # exactly on the boundary: one fill
            (100.1, "take", False),
        ],
    ),
    (
        "fills at boundaries since creation, not since the last take",
        TokenBucket(2, 1, 1.0),
        0.0,
        [
            (0.9, "take", True),
            (0.9, "take", True),
            (0.9, "peek", (0, pytest.approx(0.1))),
            (1.0, "peek", (1, pytest.approx(1.0))),
            (1.5, "take", True),
            (1.99, "take", False),
            (2.0, "take", True),
        ],
    ),
    (
        "float boundaries are exact (0.3 // 0.1 is 2.0 in floats)",
        TokenBucket(5, 1, 0.1),
        0.0,
        [(0.0, "take", True)] * 5 + [(0.3, "peek", (3, pytest.approx(0.1)))],
    ),
    (
        "several fills add up, capped at max_tokens",
        TokenBucket(10, 4, 1.0),
        50.0,
        [(50.0, "take", True)] * 10
        + [
            (51.0, "peek", (4, pytest.approx(1.0))),
            (52.5, "peek", (8, pytest.approx(0.5))),
            (53.0, "peek", (10, pytest.approx(1.0))),
            (500.0, "peek", (10, pytest.approx(1.0))),
        ],
    ),
    (
        "tokensPerFill above maxTokens still caps",
        TokenBucket(2, 50, 0.5),
        0.0,
        [(0.0, "take", True), (0.0, "take", True), (0.0, "take", False), (0.5, "peek", (2, 0.5))],
    ),
    (
        "peek takes nothing",
        TokenBucket(1, 1, 60.0),
        0.0,
        [(0.0, "peek", (1, 60.0)), (0.0, "peek", (1, 60.0)), (10.0, "peek", (1, 50.0))],
    ),
]


@pytest.mark.parametrize(
    ("bucket", "created", "steps"), [b[1:] for b in BUCKETS], ids=[b[0] for b in BUCKETS]
)
def test_token_bucket(bucket: TokenBucket, created: float, steps: list[Step]) -> None:
    state = TokenBucketState(bucket, created)
    for i, (now, op, expected) in enumerate(steps):
        got: object = state.try_take(now) if op == "take" else state.peek(now)
        assert got == expected, f"step {i}: {op} at {now}"


# --- decisions ---------------------------------------------------------------------


def test_decision_headers_and_retry_after() -> None:
    rl = RateLimiter()
    p = (policy(http=TokenBucket(2, 1, 2.5)),)
    first = http(rl, p, 10.0)
    assert first == RateDecision(True, "default/p", 2, 1, 2.5, 0, "http")
    assert first.headers() == (
        ("x-ratelimit-limit", "2"),
        ("x-ratelimit-remaining", "1"),
        ("x-ratelimit-reset", "3"),
    )
    assert http(rl, p, 10.5).remaining == 0
    denied = http(rl, p, 11.0)
    assert (denied.allowed, denied.remaining, denied.reset, denied.retry_after) == (
        False,
        0,
        1.5,
        2,
    )
    assert denied.headers()[-1] == ("retry-after", "2")
    # a short wait still says at least one second
    short = RateLimiter()
    q = (policy(http=TokenBucket(1, 1, 0.1)),)
    http(short, q, 0.0)
    assert http(short, q, 0.05).retry_after == 1
    assert http(short, (), 0.0) is UNLIMITED
    assert UNLIMITED.headers() == ()


def test_strictest() -> None:
    a = RateDecision(True, "a", 10, 5, 1.0)
    b = RateDecision(True, "b", 10, 2, 1.0)
    c = RateDecision(False, "c", 1, 0, 3.0, 3)
    d = RateDecision(False, "d", 1, 0, 7.0, 7)
    assert strictest([a, b]) is b
    assert strictest([a, c, d, b]) is d
    assert strictest([UNLIMITED, a]) is a
    assert strictest([]) is UNLIMITED


def test_all_or_nothing_across_policies() -> None:
    rl = RateLimiter()
    tight = policy("a-tight", http=TokenBucket(1, 1, 60.0))
    loose = policy("b-loose", http=TokenBucket(5, 1, 60.0))
    both = (tight, loose)
    ok = http(rl, both, 0.0)
    assert (ok.allowed, ok.policy, ok.remaining) == (True, "default/a-tight", 0)
    no = http(rl, both, 1.0)
    assert (no.allowed, no.policy) == (False, "default/a-tight")
    # the denied request took nothing from the loose bucket
    left = {v.policy: v.remaining for v in rl.state(1.0)}
    assert left == {"default/a-tight": 0, "default/b-loose": 4}


def test_http_and_tcp_buckets_are_separate_and_per_workload() -> None:
    rl = RateLimiter()
    p = (policy(http=TokenBucket(1, 1, 60.0), tcp=TokenBucket(1, 1, 60.0)),)
    assert rl.check_tcp(p, workload="default/w", now=0.0).scope == "tcp"
    assert not rl.check_tcp(p, workload="default/w", now=0.0).allowed
    assert http(rl, p, 0.0).allowed
    assert not http(rl, p, 0.0).allowed
    assert http(rl, p, 0.0, workload="default/other").allowed  # one bucket per workload
    assert rl.check_tcp((policy(http=TokenBucket(1, 1, 1.0)),), workload="w", now=0) is UNLIMITED


# --- keyed buckets -----------------------------------------------------------------

ONE = TokenBucket(1, 1, 60.0)
KEYED: list[tuple[str, RateLimitKey, dict[str, Any], dict[str, Any], bool]] = [
    # (name, key, first request, second request, second has its own bucket)
    ("none: one bucket", RateLimitKey(), {"principal": "a"}, {"principal": "b"}, False),
    ("principal: another", RateLimitKey(KeyKind.SOURCE_PRINCIPAL), {"principal": "a"},
     {"principal": "b"}, True),
    ("principal: same", RateLimitKey(KeyKind.SOURCE_PRINCIPAL), {"principal": "a"},
     {"principal": "a"}, False),
    ("principal: plaintext callers share", RateLimitKey(KeyKind.SOURCE_PRINCIPAL), {}, {},
     False),
    ("header: another value", RateLimitKey(KeyKind.HEADER, "x-user"),
     {"headers": {"x-user": "alice"}}, {"headers": {"x-user": "bob"}}, True),
    ("header: same value", RateLimitKey(KeyKind.HEADER, "x-user"),
     {"headers": {"x-user": "alice"}}, {"headers": {"x-user": "alice"}}, False),
    ("header: leaving it out does not escape", RateLimitKey(KeyKind.HEADER, "x-user"), {},
     {"headers": {"x-other": "1"}}, False),
    ("header: other headers do not matter", RateLimitKey(KeyKind.HEADER, "x-user"),
     {"headers": {"x-user": "a", "x-n": "1"}}, {"headers": {"x-user": "a", "x-n": "2"}}, False),
    ("route: another", RateLimitKey(KeyKind.ROUTE), {"route": "vs/r1"}, {"route": "vs/r2"},
     True),
    ("route: same", RateLimitKey(KeyKind.ROUTE), {"route": "vs/r1"}, {"route": "vs/r1"}, False),
]  # fmt: skip


@pytest.mark.parametrize(
    ("key", "first", "second", "separate"), [k[1:] for k in KEYED], ids=[k[0] for k in KEYED]
)
def test_keyed_buckets(
    key: RateLimitKey, first: dict[str, Any], second: dict[str, Any], separate: bool
) -> None:
    rl = RateLimiter()
    p = (policy(http=ONE, key=key),)
    assert http(rl, p, 0.0, **first).allowed
    assert http(rl, p, 0.0, **second).allowed is separate


def test_keyed_buckets_are_capped_least_recently_used_first() -> None:
    rl = RateLimiter(max_keyed_buckets=3)
    keyed = policy("k", http=ONE, key=RateLimitKey(KeyKind.HEADER, "x-user"))
    plain = policy("plain", http=TokenBucket(1000, 1, 1.0))
    p = (keyed, plain)
    for user in "abc":
        assert http(rl, p, 0.0, headers={"x-user": user}).allowed
    assert not http(rl, p, 1.0, headers={"x-user": "a"}).allowed  # a is now the most recent
    assert http(rl, p, 2.0, headers={"x-user": "d"}).allowed  # evicts b
    assert len(rl) == 3 + 1  # three keyed, one unkeyed (never evicted)
    assert {v.value for v in rl.state(3.0) if v.policy == "default/k"} == {"a", "c", "d"}
    assert not http(rl, p, 3.0, headers={"x-user": "a"}).allowed
    assert http(rl, p, 3.0, headers={"x-user": "b"}).allowed  # came back full
    for i in range(100):  # a flood of distinct values stays bounded
        http(rl, p, 4.0, headers={"x-user": f"flood-{i}"})
    assert len(rl) == 3 + 1


def test_long_key_values_are_digested() -> None:
    rl = RateLimiter()
    p = (policy(http=ONE, key=RateLimitKey(KeyKind.HEADER, "x-user")),)
    http(rl, p, 0.0, headers={"x-user": "x" * 10_000})
    (view,) = rl.state(0.0)
    assert view.value.startswith("blake2b:") and len(view.value) < 64
    assert not http(rl, p, 0.0, headers={"x-user": "x" * 10_000}).allowed
    assert http(rl, p, 0.0, headers={"x-user": "x" * 9_999 + "y"}).allowed


def test_state_view_takes_nothing() -> None:
    rl = RateLimiter()
    a = policy("a", http=TokenBucket(5, 1, 1.0), key=RateLimitKey(KeyKind.SOURCE_PRINCIPAL))
    b = policy("b", tcp=TokenBucket(3, 1, 1.0))
    http(rl, (a,), 0.0, principal="spiffe://td/ns/default/sa/x")
    rl.check_tcp((b,), workload="default/w", now=0.0)
    views = rl.state(0.25)
    assert [(v.policy, v.scope, v.key, v.value, v.limit, v.remaining) for v in views] == [
        ("default/a", "http", "sourcePrincipal", "spiffe://td/ns/default/sa/x", 5, 4),
        ("default/b", "tcp", "none", "", 3, 2),
    ]
    assert views[0].reset == pytest.approx(0.75)
    assert rl.state(0.25) == views
    assert [v.policy for v in rl.state(0.25, (b,))] == ["default/b"]


# --- applicability -----------------------------------------------------------------

POLICIES = (
    policy("all-of-shop", ns="shop", quotas=(Quota(QuotaWindow.DAY, 1),)),
    policy("web", ns="shop", selector={"app": "web"}, quotas=(Quota(QuotaWindow.DAY, 1),)),
    policy("web-9080", ns="shop", selector={"app": "web"}, ports=(9080, 9443),
           quotas=(Quota(QuotaWindow.DAY, 1),)),
    policy("blog", ns="blog", quotas=(Quota(QuotaWindow.DAY, 1),)),
)  # fmt: skip

APPLICABLE: list[tuple[str, str, dict[str, str], int, list[str]]] = [
    ("namespace-wide and selected", "shop", {"app": "web", "v": "1"}, 8080, ["all-of-shop", "web"]),
    ("port listed", "shop", {"app": "web"}, 9443, ["all-of-shop", "web", "web-9080"]),
    ("selector not matched", "shop", {"app": "db"}, 9080, ["all-of-shop"]),
    ("no labels", "shop", {}, 9080, ["all-of-shop"]),
    ("another namespace", "blog", {"app": "web"}, 9080, ["blog"]),
    ("no policy", "other", {"app": "web"}, 9080, []),
]  # fmt: skip


@pytest.mark.parametrize(
    ("ns", "labels", "port", "expected"),
    [a[1:] for a in APPLICABLE],
    ids=[a[0] for a in APPLICABLE],
)
def test_applicable(ns: str, labels: dict[str, str], port: int, expected: list[str]) -> None:
    got = applicable(POLICIES, ns, Labels.of(labels), port)
    assert [p.name for p in got] == expected
    assert applicable(POLICIES, ns, Labels.of(labels), port) is got  # memoised


def test_applicable_follows_a_new_policy_set() -> None:
    web = Labels.of({"app": "web"})
    assert [p.name for p in applicable(POLICIES, "shop", web, 1)] == ["all-of-shop", "web"]
    fewer = POLICIES[1:]
    assert [p.name for p in applicable(fewer, "shop", web, 1)] == ["web"]


# --- policy changes ----------------------------------------------------------------


def test_state_survives_an_unchanged_policy_and_resets_a_changed_one() -> None:
    rl = RateLimiter()
    v1 = policy("p", http=TokenBucket(2, 1, 60.0), tcp=TokenBucket(1, 1, 60.0))
    other = policy("q", http=TokenBucket(1, 1, 60.0), key=RateLimitKey(KeyKind.ROUTE))
    http(rl, (v1, other), 0.0, route="r")
    http(rl, (v1,), 0.0)
    rl.check_tcp((v1,), workload="default/w", now=0.0)
    assert not http(rl, (v1,), 0.0).allowed

    # a new snapshot: v1 unchanged apart from its ports, other gone
    same = policy("p", http=TokenBucket(2, 1, 60.0), tcp=TokenBucket(1, 1, 60.0), ports=(80,))
    rl.sync((same,))
    assert not http(rl, (same,), 1.0).allowed
    assert not rl.check_tcp((same,), workload="default/w", now=1.0).allowed
    assert {v.policy for v in rl.state(1.0)} == {"default/p"}

    # the http bucket changes, the tcp one does not
    changed = policy("p", http=TokenBucket(3, 1, 60.0), tcp=TokenBucket(1, 1, 60.0))
    rl.sync((changed,))
    assert [v.scope for v in rl.state(2.0)] == ["tcp"]
    decision = http(rl, (changed,), 2.0)
    assert (decision.allowed, decision.limit, decision.remaining) == (True, 3, 2)
    assert not rl.check_tcp((changed,), workload="default/w", now=2.0).allowed

    # a changed key restarts too
    keyed = policy("p", http=TokenBucket(3, 1, 60.0), key=RateLimitKey(KeyKind.HEADER, "x-u"))
    rl.sync((keyed,))
    assert len(rl) == 0


# --- quotas ------------------------------------------------------------------------


def utc(year: int, month: int, day: int, hour: int = 0, minute: int = 0, second: int = 0) -> float:
    return datetime(year, month, day, hour, minute, second, tzinfo=UTC).timestamp()


WINDOWS: list[tuple[QuotaWindow, float, float, float]] = [
    # (window, now, its start, seconds to its end)
    (QuotaWindow.MINUTE, utc(2024, 3, 1, 12, 0, 0), utc(2024, 3, 1, 12, 0, 0), 60.0),
    (QuotaWindow.MINUTE, utc(2024, 3, 1, 12, 0, 59) + 0.5, utc(2024, 3, 1, 12, 0, 0), 0.5),
    (QuotaWindow.HOUR, utc(2024, 3, 1, 12, 59, 59), utc(2024, 3, 1, 12, 0, 0), 1.0),
    (QuotaWindow.HOUR, utc(2024, 3, 1, 13, 0, 0), utc(2024, 3, 1, 13, 0, 0), 3600.0),
    (QuotaWindow.DAY, utc(2024, 2, 29, 23, 59, 59), utc(2024, 2, 29), 1.0),
    (QuotaWindow.DAY, utc(2024, 3, 1, 0, 0, 0), utc(2024, 3, 1), 86400.0),
    (QuotaWindow.DAY, utc(2024, 3, 1, 9, 30, 0), utc(2024, 3, 1), 14.5 * 3600),
]


@pytest.mark.parametrize(("window", "now", "start", "to_end"), WINDOWS)
def test_quota_windows_are_utc_aligned(
    window: QuotaWindow, now: float, start: float, to_end: float
) -> None:
    assert window_start(window, now) == start
    counter = QuotaCounter()
    p = (policy(quotas=(Quota(window, 1),)),)
    assert counter.check(p, "a", now).allowed
    denied = counter.check(p, "a", now)
    assert not denied.allowed
    assert denied.reset == pytest.approx(to_end)
    assert denied.retry_after == max(1, math.ceil(to_end))
    assert denied.scope == f"quota/{window.value}"
    assert counter.check(p, "a", start + window.seconds).allowed  # the next window


def test_quota_counts_per_principal_and_all_or_nothing() -> None:
    counter = QuotaCounter()
    now = utc(2024, 3, 1, 12, 0, 30)
    p = (policy(quotas=(Quota(QuotaWindow.MINUTE, 5), Quota(QuotaWindow.HOUR, 2))),)
    assert counter.check(p, "a", now).allowed
    second = counter.check(p, "a", now)
    assert (second.allowed, second.scope, second.remaining) == (True, "quota/hour", 0)
    third = counter.check(p, "a", now)
    assert (third.allowed, third.scope) == (False, "quota/hour")
    assert counter.check(p, "b", now).allowed  # another principal
    assert counter.check(p, None, now).allowed  # plaintext callers share ""
    assert counter.check(p, "", now).allowed
    assert not counter.check(p, None, now).allowed
    views = {(v.principal, v.window): v.used for v in counter.state(p, now)}
    assert views[("a", QuotaWindow.MINUTE)] == 2  # the denied unit was not counted
    assert views[("", QuotaWindow.HOUR)] == 2
    assert counter.check((policy(http=ONE),), "a", now) is UNLIMITED


def test_quota_plan_counts_nothing_until_applied() -> None:
    counter = QuotaCounter()
    now = utc(2024, 3, 1, 12, 0, 30)
    p = (policy(quotas=(Quota(QuotaWindow.MINUTE, 1),)),)
    decision, charges = counter.plan(p, "a", now)
    assert decision.allowed
    assert charges == (QuotaCharge("default/p", QuotaWindow.MINUTE, int(utc(2024, 3, 1, 12)), "a"),)
    assert counter.plan(p, "a", now)[0].allowed
    counter.apply(charges)
    denied, none = counter.plan(p, "a", now)
    assert not denied.allowed and none == ()


def test_quota_export_import_and_expiry() -> None:
    counter = QuotaCounter()
    now = utc(2024, 3, 1, 12, 0, 30)
    p = (policy(quotas=(Quota(QuotaWindow.MINUTE, 10), Quota(QuotaWindow.DAY, 10))),)
    for principal in ["a", "a", "b"]:
        counter.check(p, principal, now)
    saved = counter.export(now)
    assert [(c.principal, c.window, c.units) for c in saved] == [
        ("a", QuotaWindow.MINUTE, 2),
        ("a", QuotaWindow.DAY, 2),
        ("b", QuotaWindow.MINUTE, 1),
        ("b", QuotaWindow.DAY, 1),
    ]
    assert [QuotaCharge.from_record(c.to_record()) for c in saved] == list(saved)
    restored = QuotaCounter()
    restored.apply(saved)
    assert restored.export(now) == saved
    later = utc(2024, 3, 1, 12, 1, 0)
    assert [c.window for c in restored.export(later)] == [QuotaWindow.DAY, QuotaWindow.DAY]
    # older windows are ignored, newer ones restart the count
    restored.apply([QuotaCharge("default/p", QuotaWindow.DAY, int(utc(2024, 2, 29)), "a", 5)])
    restored.apply([QuotaCharge("default/p", QuotaWindow.DAY, int(utc(2024, 3, 2)), "b", 5)])
    assert [(c.principal, c.units) for c in restored.export(later)] == [("a", 2), ("b", 5)]


def test_quota_keeps_counting_when_the_wall_clock_steps_back() -> None:
    counter = QuotaCounter()
    p = (policy(quotas=(Quota(QuotaWindow.MINUTE, 2),)),)
    counter.check(p, "a", utc(2024, 3, 1, 12, 1, 5))
    counter.check(p, "a", utc(2024, 3, 1, 12, 0, 58))  # NTP stepped back 7s
    assert not counter.check(p, "a", utc(2024, 3, 1, 12, 1, 10)).allowed


@pytest.mark.parametrize(
    "record",
    [
        None,
        [],
        ["p", "minute", 0, "a"],
        ["p", "week", 0, "a", 1],
        ["p", "minute", "0", "a", 1],
        ["p", "minute", 0, "a", 0],
        ["p", "minute", 0, "a", True],
        [1, "minute", 0, "a", 1],
    ],
)
def test_quota_record_rejects_bad_data(record: object) -> None:
    with pytest.raises(ValueError):
        QuotaCharge.from_record(record)


# --- configuration -----------------------------------------------------------------


def doc(spec: str, meta: str = "{name: ratings-limit, namespace: default}") -> dict[str, Any]:
    body = textwrap.indent(textwrap.dedent(spec).strip("\n"), "  ")
    text = f"apiVersion: {API_VERSION}\nkind: LocalRateLimit\nmetadata: {meta}\nspec:\n{body}\n"
    loaded = yaml.safe_load(text)
    assert isinstance(loaded, dict)
    return loaded


def convert(raw: dict[str, Any]) -> tuple[object | None, list[tuple[str, str]]]:
    obj, problems = validate(raw, LOCAL_RATE_LIMIT_KIND, "rl.yaml")
    return obj, problems.items


def test_config_full() -> None:
    obj, problems = convert(
        doc(
            """
            selector: {matchLabels: {app: ratings}}
            ports: [9080, 9080, 8080]
            http:
              tokenBucket: {maxTokens: 100, tokensPerFill: 10, fillInterval: 100ms}
              key: {header: X-User}
            tcp:
              tokenBucket: {maxTokens: 50, fillInterval: 1s}
            quotas:
            - {window: minute, limit: 1000}
            - {window: day, limit: 100000}
            """
        )
    )
    assert problems == []
    assert obj == LocalRateLimit(
        namespace="default",
        name="ratings-limit",
        selector=Labels.of({"app": "ratings"}),
        ports=(8080, 9080),
        http=HttpRateLimit(TokenBucket(100, 10, 0.1), RateLimitKey(KeyKind.HEADER, "x-user")),
        tcp=TcpRateLimit(TokenBucket(50, 1, 1.0)),
        quotas=(Quota(QuotaWindow.MINUTE, 1000), Quota(QuotaWindow.DAY, 100000)),
        source="rl.yaml",
    )
    assert isinstance(obj, LocalRateLimit) and obj.key == "default/ratings-limit"


@pytest.mark.parametrize(
    ("key", "expected"),
    [
        ("{sourcePrincipal: {}}", RateLimitKey(KeyKind.SOURCE_PRINCIPAL)),
        ("{route: {}}", RateLimitKey(KeyKind.ROUTE)),
        ("{header: x-user}", RateLimitKey(KeyKind.HEADER, "x-user")),
    ],
)
def test_config_keys(key: str, expected: RateLimitKey) -> None:
    obj, problems = convert(
        doc(f"http: {{tokenBucket: {{maxTokens: 1, fillInterval: 1s}}, key: {key}}}")
    )
    assert problems == []
    assert isinstance(obj, LocalRateLimit) and obj.http is not None
    assert obj.http.key == expected and obj.selector is None and obj.ports == ()


TB = "tokenBucket: {maxTokens: 1, fillInterval: 1s}"
CONFIG_ERRORS: list[tuple[str, str, str, str]] = [
    # (name, spec, field path, part of the message)
    ("unknown field", f"http: {{{TB}, burst: 5}}", "spec.http.burst", "unknown field"),
    ("unknown spec field", "rules: []", "spec.rules", "unknown field"),
    ("maxTokens 0", "http: {tokenBucket: {maxTokens: 0, fillInterval: 1s}}",
     "spec.http.tokenBucket.maxTokens", "at least 1"),
    ("tokensPerFill 0", "tcp: {tokenBucket: {maxTokens: 1, tokensPerFill: 0, fillInterval: 1s}}",
     "spec.tcp.tokenBucket.tokensPerFill", "at least 1"),
    ("maxTokens a string", "tcp: {tokenBucket: {maxTokens: '5', fillInterval: 1s}}",
     "spec.tcp.tokenBucket.maxTokens", "expected integer"),
    ("bad duration", "tcp: {tokenBucket: {maxTokens: 1, fillInterval: fast}}",
     "spec.tcp.tokenBucket.fillInterval", "not a duration"),
    ("zero duration", "tcp: {tokenBucket: {maxTokens: 1, fillInterval: 0s}}",
     "spec.tcp.tokenBucket.fillInterval", "shorter than 1ms"),
    ("sub-millisecond duration", "tcp: {tokenBucket: {maxTokens: 1, fillInterval: 500us}}",
     "spec.tcp.tokenBucket.fillInterval", "shorter than 1ms"),
    ("no fillInterval", "tcp: {tokenBucket: {maxTokens: 1}}",
     "spec.tcp.tokenBucket.fillInterval", "required"),
    ("no tokenBucket", "http: {key: {route: {}}}", "spec.http.tokenBucket", "required"),
    ("bad window", "quotas: [{window: week, limit: 5}]", "spec.quotas[0].window",
     "unknown window 'week' (one of minute, hour, day)"),
    ("window in capitals", "quotas: [{window: Minute, limit: 5}]", "spec.quotas[0].window",
     "unknown window"),
    ("limit 0", "quotas: [{window: minute, limit: 0}]", "spec.quotas[0].limit", "at least 1"),
    ("window twice", "quotas: [{window: hour, limit: 5}, {window: hour, limit: 9}]",
     "spec.quotas[1].window", "also spec.quotas[0]"),
    ("two keys", f"http: {{{TB}, key: {{route: {{}}, header: x}}}}", "spec.http.key",
     "exactly one of sourcePrincipal, header, route"),
    ("empty key", f"http: {{{TB}, key: {{}}}}", "spec.http.key", "exactly one"),
    ("unknown key", f"http: {{{TB}, key: {{sourceIp: {{}}}}}}", "spec.http.key.sourceIp",
     "unknown field"),
    ("empty header", f"http: {{{TB}, key: {{header: ''}}}}", "spec.http.key.header",
     "not a header name"),
    ("header with a space", f"http: {{{TB}, key: {{header: x user}}}}", "spec.http.key.header",
     "not a header name"),
    ("route with options", f"http: {{{TB}, key: {{route: {{name: x}}}}}}",
     "spec.http.key.route.name", "unknown field"),
    ("port out of range", f"ports: [70000]\ntcp: {{{TB}}}", "spec.ports[0]", "not a port"),
    ("port as a string", f"ports: ['80']\ntcp: {{{TB}}}", "spec.ports[0]", "expected integer"),
    ("nothing to limit", "ports: [80]", "spec", "needs http, tcp or quotas"),
    ("empty selector", f"selector: {{matchLabels: {{}}}}\ntcp: {{{TB}}}",
     "spec.selector.matchLabels", "selects nothing"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("spec", "path", "message"), [c[1:] for c in CONFIG_ERRORS], ids=[c[0] for c in CONFIG_ERRORS]
)
def test_config_errors_name_the_field(spec: str, path: str, message: str) -> None:
    _, problems = convert(doc(spec))
    assert any(p == path and message in m for p, m in problems), problems


def test_config_metadata_and_spec_are_checked() -> None:
    _, problems = convert(doc(f"tcp: {{{TB}}}", meta="{name: Bad_Name}"))
    assert [p for p, _ in problems] == ["metadata.name"]
    raw = doc(f"tcp: {{{TB}}}")
    del raw["spec"]
    assert convert(raw)[1] == [("spec", "required field is missing")]


# --- the quota store ---------------------------------------------------------------

NOW = utc(2024, 3, 1, 12, 0, 30)
QUOTA = policy("q", quotas=(Quota(QuotaWindow.MINUTE, 1000), Quota(QuotaWindow.DAY, 10**9)))


def fixed(now: float) -> Callable[[], float]:
    return lambda: now


def grant(store: QuotaStore, principals: str, now: float = NOW) -> None:
    for principal in principals:
        assert store.check((QUOTA,), principal, now).allowed


def counts(store: QuotaStore, now: float = NOW) -> dict[tuple[str, str], int]:
    return {(c.principal, c.window.value): c.units for c in store.counter.export(now)}


def test_store_persists_and_reloads(tmp_path: Path) -> None:
    path = tmp_path / "state" / "quotas.journal"
    with QuotaStore(path, clock=fixed(NOW)) as store:
        grant(store, "aab")
        before = counts(store)
    assert before == {("a", "minute"): 2, ("a", "day"): 2, ("b", "minute"): 1, ("b", "day"): 1}
    reopened = QuotaStore(path, clock=fixed(NOW))
    assert counts(reopened) == before
    grant(reopened, "a")  # not closed: the journal alone must carry it
    assert counts(QuotaStore(path, clock=fixed(NOW)))[("a", "day")] == 3


def test_store_limit_holds_across_restarts(tmp_path: Path) -> None:
    path = tmp_path / "q.journal"
    p = (policy("q", quotas=(Quota(QuotaWindow.HOUR, 2),)),)
    first = QuotaStore(path, clock=fixed(NOW))
    assert first.check(p, "a", NOW).allowed
    assert first.check(p, "a", NOW).allowed
    again = QuotaStore(path, clock=fixed(NOW))
    denied = again.check(p, "a", NOW)
    assert not denied.allowed and denied.retry_after == 3600 - 30


def test_store_drops_ended_windows_on_load(tmp_path: Path) -> None:
    path = tmp_path / "q.journal"
    with QuotaStore(path, clock=fixed(NOW)) as store:
        grant(store, "ab")
    later = utc(2024, 3, 1, 12, 5)
    assert counts(QuotaStore(path, clock=fixed(later)), later) == {("a", "day"): 1, ("b", "day"): 1}
    assert b"minute" not in path.read_bytes()  # rewritten without them


def test_store_tolerates_a_torn_last_line(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "q.journal"
    store = QuotaStore(path, clock=fixed(NOW))
    grant(store, "aab")
    data = path.read_bytes()
    path.write_bytes(data[:-7])  # the last grant (b) cut short mid-write
    with caplog.at_level(logging.WARNING):
        reloaded = QuotaStore(path, clock=fixed(NOW))
    assert counts(reloaded) == {("a", "minute"): 2, ("a", "day"): 2}
    assert f"quota store {path}: skipped a truncated last line" in caplog.text
    assert not path.with_name("q.journal.corrupt").exists()
    grant(reloaded, "c")  # appends after a clean line, not glued to the torn one
    assert counts(QuotaStore(path, clock=fixed(NOW)))[("c", "day")] == 1


def test_store_skips_a_damaged_line(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "q.journal"
    store = QuotaStore(path, clock=fixed(NOW))
    grant(store, "abc")
    lines = path.read_bytes().splitlines(keepends=True)
    lines[1] = lines[1].replace(b'"b"', b'"B"')  # bit rot: the checksum no longer matches
    path.write_bytes(b"".join(lines))
    with caplog.at_level(logging.WARNING):
        reloaded = QuotaStore(path, clock=fixed(NOW))
    assert counts(reloaded) == {
        ("a", "minute"): 1,
        ("a", "day"): 1,
        ("c", "minute"): 1,
        ("c", "day"): 1,
    }
    assert "skipped 1 damaged line(s) (line 2: checksum mismatch)" in caplog.text
    assert path.with_name("q.journal.corrupt").read_bytes() == b"".join(lines)


@pytest.mark.parametrize(
    "content",
    [
        os.urandom(4096),
        b"\x00" * 100,
        b"not a journal\nat all\n",
        b'00000000 [["x"]]\n',
        encode_line([]).replace(b"[]", b"{}"),
    ],
    ids=["random", "zeros", "text", "bad crc", "not a list"],
)
def test_store_survives_garbage(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, content: bytes
) -> None:
    path = tmp_path / "q.journal"
    path.write_bytes(content)
    with caplog.at_level(logging.WARNING):
        store = QuotaStore(path, clock=fixed(NOW))
    assert counts(store) == {}
    assert f"quota store {path}" in caplog.text
    grant(store, "a")
    assert counts(QuotaStore(path, clock=fixed(NOW)))[("a", "day")] == 1


def test_store_compacts_and_keeps_counts(tmp_path: Path) -> None:
    path = tmp_path / "q.journal"
    store = QuotaStore(path, clock=fixed(NOW), compact_bytes=1024)
    grant(store, "abcd" * 100)
    assert path.stat().st_size < 1024 + 200
    assert not path.with_name("q.journal.tmp").exists()
    assert counts(QuotaStore(path, clock=fixed(NOW))) == counts(store)
    assert counts(store)[("a", "day")] == 100


def test_store_grants_when_it_cannot_write(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store = QuotaStore(tmp_path / "q.journal", clock=fixed(NOW))
    full = os.open("/dev/full", os.O_WRONLY)  # writes fail with ENOSPC, as on a full disk
    os.dup2(full, store._fd)
    os.close(full)
    with caplog.at_level(logging.ERROR):
        grant(store, "aa")
    assert store.write_errors == 2 and counts(store)[("a", "day")] == 2
    assert caplog.text.count("cannot write") == 1
    store.compact()  # a fresh journal
    grant(store, "a")
    assert counts(QuotaStore(store.path, clock=fixed(NOW)))[("a", "day")] == 3


def test_store_that_cannot_be_opened_is_a_local_state_error(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    with pytest.raises(LocalStateError, match="cannot open for writing"):
        QuotaStore(tmp_path / "file" / "q.journal")


def test_a_journal_that_cannot_be_opened_past_its_lock_is_a_local_state_error(
    tmp_path: Path,
) -> None:
    """The lock file opens but the journal does not (a directory in its place): the
    error names the journal, not a descriptor closed under the lock."""
    (tmp_path / "q.journal").mkdir()
    with pytest.raises(LocalStateError, match=r"q\.journal: cannot open for writing"):
        QuotaStore(tmp_path / "q.journal")


def test_read_journal() -> None:
    a = QuotaCharge("ns/p", QuotaWindow.HOUR, 3600, "a", 3)
    b = QuotaCharge("ns/p", QuotaWindow.DAY, 0, "", 1)
    data = encode_line([a, b]) + b"\n" + encode_line([a])
    read = read_journal(data + data[:10])
    assert read.charges == (a, b, a) and read.damaged == () and read.torn_tail
    assert read_journal(data[:-1]).charges == (a, b, a)  # only the newline missing


CHILD = """
import sys
from pathlib import Path
from nodeagent.model.ratelimit import LocalRateLimit, Quota, QuotaWindow
from nodeagent.proxy.quotastore import QuotaStore

now = float(sys.argv[2])
quota = LocalRateLimit("default", "q", quotas=(Quota(QuotaWindow.DAY, 10**9),))
store = QuotaStore(Path(sys.argv[1]), clock=lambda: now, compact_bytes=2048)
i = 0
while True:
    assert store.check((quota,), f"p{i % 7}", now).allowed
    i += 1
    sys.stdout.write(f"{i}\\n")
    sys.stdout.flush()
"""


def test_store_keeps_every_grant_when_the_writer_is_killed(tmp_path: Path) -> None:
    path = tmp_path / "q.journal"
    total = 0
    for stop_after in (1500, 2200, 3100):  # compactions every ~30 grants: kills land anywhere
        child = subprocess.Popen(
            [sys.executable, "-c", CHILD, str(path), str(NOW)],
            stdout=subprocess.PIPE,
            cwd=ROOT,
        )
        assert child.stdout is not None
        granted = 0
        for line in child.stdout:
            granted = int(line)
            if granted >= stop_after:
                child.send_signal(signal.SIGKILL)
                break
        rest = child.stdout.read().split()
        granted = max([granted, *map(int, rest)])
        assert child.wait() == -signal.SIGKILL
        total += granted
        on_disk = sum(c.units for c in QuotaStore(path, clock=fixed(NOW)).counter.export(NOW))
        # every grant, maybe plus the one written but not yet answered, each run
        assert total <= on_disk <= total + 1
        total = on_disk


SHARER = """
import sys
from pathlib import Path
from nodeagent.model.ratelimit import LocalRateLimit, Quota, QuotaWindow
from nodeagent.proxy.quotastore import QuotaStore

now = float(sys.argv[2])
quota = LocalRateLimit("default", "q", quotas=(Quota(QuotaWindow.DAY, 300),))
store = QuotaStore(Path(sys.argv[1]), clock=lambda: now, compact_bytes=1024)
sys.stdout.write("ready\\n"); sys.stdout.flush(); sys.stdin.readline()
print(sum(store.check((quota,), f"p{i % 2}", now).allowed for i in range(400)))
store.close()
"""


def test_processes_sharing_a_journal_grant_a_quota_once_node_wide(tmp_path: Path) -> None:
    """Three processes (workers) grant from one journal at once, compacting it under
    each other: the quota of 300 per principal is granted 600 times in all, not 3x."""
    path = tmp_path / "q.journal"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", SHARER, str(path), str(NOW)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            cwd=ROOT,
        )
        for _ in range(3)
    ]
    try:
        for p in procs:
            assert p.stdout is not None and p.stdout.readline() == "ready\n"
        for p in procs:
            assert p.stdin is not None
            p.stdin.write("go\n")
            p.stdin.flush()
        granted = [int(p.communicate(timeout=120)[0]) for p in procs]
    finally:
        for p in procs:
            p.kill()
            p.wait()
    assert sum(granted) == 600, granted
    used = {c.principal: c.units for c in QuotaStore(path, clock=fixed(NOW)).counter.export(NOW)}
    assert used == {"p0": 300, "p1": 300}
