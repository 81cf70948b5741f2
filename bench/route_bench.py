"""Router micro-benchmark: ``select_route`` over one VirtualService with 1,000 ``http[]`` rules.

    .venv/bin/python bench/route_bench.py [--repeat 101] [--number 200]

No root, no sandbox: builds a ``MeshSnapshot`` in memory (one Service, one VirtualService)
and times the router decision for a handful of requests, with the indexed ``select_route``
and, for comparison, the linear ``select_route_linear``.

The rules, in order (rule *i*, 0 ≤ i < 1000):

- ``i % 50 == 13``: header only, ``x-canary: exact v<i>`` (20 rules share one header name);
- ``i % 200 == 111``: uri ``regex /legacy/<i>/[0-9]+`` (indexed by ``/legacy/<i>/``);
- ``i % 10 == 5``: uri ``prefix /api/v2/group-<i>/``;
- ``i % 25 == 7``: uri exact ``/api/v1/resource-<i>`` and ``x-tenant: exact t<i>``;
- ``i % 20 == 2``: uri exact ``/api/v1/resource-<i>``, method ``POST``, ``ignoreUriCase``;
- otherwise: uri exact ``/api/v1/resource-<i>``.

Each timed call gets a RequestInfo of its own, built before the clock starts, so the
per-request work the router caches on it (the uri path without the query) is measured and
building the request is not. The index is built before timing (its cost is printed once).
Figure: the median over ``--repeat`` runs of the mean per call over ``--number`` calls (and
the fastest run). Runs are short on purpose: a run the scheduler preempts is an outlier the
median ignores, where one long run would average the preemptions in. Wall-clock time
(timeit's default timer): on a busy box the figures grow, so compare within one run.

Exit status: 1 when a case takes 20 µs or more with the index, or a decision is not the
expected rule (or differs from the linear one); 0 otherwise.
"""

from __future__ import annotations

import argparse
import re
import statistics
import sys
import time
import timeit
from collections.abc import Callable
from dataclasses import dataclass

from nodeagent.core.route import (
    RequestInfo,
    RouteDecision,
    select_route,
    select_route_linear,
)
from nodeagent.model.objects import Labels, Service, ServicePort
from nodeagent.model.snapshot import MeshSnapshot
from nodeagent.model.traffic import (
    Destination,
    HTTPMatchRequest,
    HTTPRoute,
    MatchKind,
    RouteDestination,
    StringMatch,
    VirtualService,
)

RULES = 1000
BUDGET_US = 20.0
HOST = "api.default.svc.cluster.local"
COMMON_HEADERS = {
    "user-agent": "bench/1.0",
    "accept": "*/*",
    "x-request-id": "0b4f3c2e-5d6a-4e7f-8a9b-0c1d2e3f4a5b",
    "content-length": "0",
}

Router = Callable[[MeshSnapshot, str, RequestInfo], RouteDecision]


def exact(value: str) -> StringMatch:
    return StringMatch(MatchKind.EXACT, value)


def rule(i: int) -> HTTPRoute:
    resource = f"/api/v1/resource-{i}"
    if i % 50 == 13:
        m = HTTPMatchRequest(headers=(("x-canary", exact(f"v{i}")),))
    elif i % 200 == 111:
        pattern = f"/legacy/{i}/[0-9]+"
        m = HTTPMatchRequest(uri=StringMatch(MatchKind.REGEX, pattern, re.compile(pattern)))
    elif i % 10 == 5:
        m = HTTPMatchRequest(uri=StringMatch(MatchKind.PREFIX, f"/api/v2/group-{i}/"))
    elif i % 25 == 7:
        m = HTTPMatchRequest(uri=exact(resource), headers=(("x-tenant", exact(f"t{i}")),))
    elif i % 20 == 2:
        m = HTTPMatchRequest(uri=exact(resource), method=exact("POST"), ignore_uri_case=True)
    else:
        m = HTTPMatchRequest(uri=exact(resource))
    dest = RouteDestination(Destination(HOST, subset=f"s{i % 3}"))
    return HTTPRoute(name=f"rule-{i}", matches=(m,), routes=(dest,))


def build_snapshot() -> MeshSnapshot:
    service = Service(
        namespace="default",
        name="api",
        ports=(ServicePort(8080, 8080, "http"),),
        selector=Labels.of({"app": "api"}),
        cluster_ip="10.96.0.10",
    )
    vs = VirtualService("default", "api", (HOST,), http=tuple(rule(i) for i in range(RULES)))
    return MeshSnapshot.build(version=1, pods=(), services=(service,), virtual_services=(vs,))


@dataclass(frozen=True)
class Case:
    name: str
    method: str
    path: str
    headers: dict[str, str]
    expect: int | None
    """The rule index that must win; None: no rule matches."""

    def request(self) -> RequestInfo:
        return RequestInfo(self.method, "api:8080", self.path, self.headers, 8080)


CASES = (
    Case("first rule", "GET", "/api/v1/resource-0", COMMON_HEADERS, 0),
    Case("middle rule", "GET", "/api/v1/resource-500?page=2", COMMON_HEADERS, 500),
    Case("last rule", "GET", "/api/v1/resource-999", COMMON_HEADERS, 999),
    Case("no match", "GET", "/api/v1/nothing-here", COMMON_HEADERS, None),
    Case("prefix rule", "GET", "/api/v2/group-995/items/7", COMMON_HEADERS, 995),
    Case("header rule", "GET", "/web/home", {**COMMON_HEADERS, "x-canary": "v963"}, 963),
    Case("uri+header rule", "GET", "/api/v1/resource-982", {"x-tenant": "t982"}, 982),
    Case("nocase+method", "POST", "/API/V1/Resource-942", COMMON_HEADERS, 942),
    Case("regex rule", "GET", "/legacy/911/42", COMMON_HEADERS, 911),
)


def per_call_us(
    router: Router, snap: MeshSnapshot, case: Case, repeat: int, number: int
) -> tuple[float, float]:
    """(median, min) over ``repeat`` runs of the mean µs per call, ``number`` calls a run."""
    timer = timeit.Timer(
        stmt="for r in reqs: route(snap, host, r)",
        setup="reqs = [make() for _ in range(number)]",
        globals={
            "route": router,
            "snap": snap,
            "host": HOST,
            "make": case.request,
            "number": number,
        },
    )
    runs = [t / number * 1e6 for t in timer.repeat(repeat=repeat, number=1)]
    return statistics.median(runs), min(runs)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--repeat", type=int, default=101, help="timed runs per case (median)")
    ap.add_argument("--number", type=int, default=200, help="calls per run, indexed router")
    args = ap.parse_args(argv)

    snap = build_snapshot()
    t0 = time.perf_counter()
    select_route(snap, HOST, CASES[0].request())  # builds the index
    build_ms = (time.perf_counter() - t0) * 1e3

    wrong: list[str] = []
    rows: list[tuple[str, str, float, float, float]] = []
    for case in CASES:
        got = select_route(snap, HOST, case.request())
        ref = select_route_linear(snap, HOST, case.request())
        if got != ref or got.rule_index != case.expect:
            wrong.append(f"{case.name}: rule {got.rule_index} (linear {ref.rule_index})")
        indexed, fastest = per_call_us(select_route, snap, case, args.repeat, args.number)
        linear, _ = per_call_us(select_route_linear, snap, case, 7, 10)
        winner = "-" if got.rule_index is None else str(got.rule_index)
        rows.append((case.name, winner, indexed, fastest, linear))

    print(
        f"select_route, {RULES} http rules, {HOST}; python {sys.version.split()[0]}; "
        f"index built in {build_ms:.1f} ms"
    )
    print(
        f"{'case':<16} {'rule':>5} {'median µs':>10} {'min µs':>7} "
        f"{'linear µs':>10} {'speed-up':>9}"
    )
    for name, winner, indexed, fastest, linear in rows:
        print(
            f"{name:<16} {winner:>5} {indexed:>10.2f} {fastest:>7.2f} "
            f"{linear:>10.1f} {linear / indexed:>8.1f}x"
        )
    slow = [name for name, _, indexed, _, _ in rows if indexed >= BUDGET_US]
    for w in wrong:
        print(f"WRONG decision: {w}", file=sys.stderr)
    if slow:
        print(f"over budget ({BUDGET_US:.0f} µs): {', '.join(slow)}", file=sys.stderr)
    else:
        print(f"every case under {BUDGET_US:.0f} µs")
    return 1 if slow or wrong else 0


if __name__ == "__main__":
    sys.exit(main())
