"""The plan of one HTTP request (``core/plan.py``): answers made without sending (no
route, redirect, fault, bad destination), the destination and its cluster, rewrites,
retries, header operations, ids, the consistent-hash key, the mirror; and the memo of
route decisions. Pure: a snapshot from YAML, a request value, scripted draws."""

from __future__ import annotations

import gc
import random
import re
import weakref
from pathlib import Path

import pytest

from nodeagent.control.files import load_directory
from nodeagent.core.balancer import BalancerRegistry
from nodeagent.core.clusters import Clusters
from nodeagent.core.plan import (
    NO_RETRY,
    ROUTE_HEADER,
    Answer,
    Connection,
    Draws,
    Likeliest,
    Plan,
    Planner,
    Request,
    join_headers,
    trace_id,
)
from nodeagent.core.route import RouteOutcome
from nodeagent.model.objects import PodRuntime
from nodeagent.model.snapshot import MeshSnapshot
from nodeagent.model.traffic import DEFAULT_RETRY, HeaderOperations

HOST = "web.default.svc.cluster.local"

MESH = """
apiVersion: v1
kind: Pod
metadata: {name: client, namespace: default, labels: {app: client}}
spec: {nodeName: n1, containers: [{name: c, command: [x]}]}
---
apiVersion: v1
kind: Pod
metadata: {name: web-v1, namespace: default, labels: {app: web, version: v1}}
spec: {nodeName: n2, containers: [{name: c, command: [x]}]}
---
apiVersion: v1
kind: Pod
metadata: {name: web-v2, namespace: default, labels: {app: web, version: v2}}
spec: {nodeName: n2, containers: [{name: c, command: [x]}]}
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: default}
spec:
  selector: {app: web}
  ports: [{name: http, port: 80, targetPort: 8080}]
---
apiVersion: v1
kind: Service
metadata: {name: plain, namespace: default}
spec:
  selector: {app: web}
  ports: [{name: http, port: 80, targetPort: 8080}]
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: web, namespace: default}
spec:
  host: web.default.svc.cluster.local
  subsets:
  - {name: v1, labels: {version: v1}}
  - name: v2
    labels: {version: v2}
    trafficPolicy: {loadBalancer: {consistentHash: {httpHeaderName: x-user}}}
  - name: bycookie
    labels: {version: v2}
    trafficPolicy: {loadBalancer: {consistentHash: {httpCookie: {name: u, ttl: 60s}}}}
  - name: byquery
    labels: {version: v2}
    trafficPolicy: {loadBalancer: {consistentHash: {httpQueryParameterName: q}}}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: web, namespace: default}
spec:
  hosts: [web.default.svc.cluster.local]
  http:
  - name: moved
    match: [{uri: {prefix: /old}}]
    redirect: {uri: /new, redirectCode: 302}
  - name: faulty
    match: [{uri: {prefix: /fault}}]
    fault:
      delay: {fixedDelay: 2s, percentage: {value: 50}}
      abort: {httpStatus: 418, percentage: {value: 50}}
    route: [{destination: {host: web.default.svc.cluster.local, subset: v1}}]
  - name: split
    match: [{headers: {x-split: {exact: "1"}}}]
    route:
    - {destination: {host: web.default.svc.cluster.local, subset: v1}, weight: 30}
    - {destination: {host: web.default.svc.cluster.local, subset: v2}, weight: 70}
  - name: gone
    match: [{uri: {prefix: /gone}}]
    route: [{destination: {host: nowhere.default.svc.cluster.local}}]
  - name: api
    match: [{uri: {prefix: /api/}}]
    rewrite: {uri: /v2/, authority: api.internal}
    retries: {attempts: 5, perTryTimeout: 1s, retryOn: 5xx}
    timeout: 3s
    headers:
      request: {set: {x-route: api}, remove: [x-drop]}
      response: {add: {x-served-by: api}}
    route:
    - destination: {host: web.default.svc.cluster.local, subset: v2}
      headers:
        request: {add: {x-dest: v2}}
        response: {set: {x-dest: v2}}
  - name: cookie
    match: [{uri: {prefix: /cookie}}]
    route: [{destination: {host: web.default.svc.cluster.local, subset: bycookie}}]
  - name: query
    match: [{uri: {prefix: /query}}]
    route: [{destination: {host: web.default.svc.cluster.local, subset: byquery}}]
  - name: mirrored
    match: [{uri: {prefix: /mirror}}]
    route: [{destination: {host: web.default.svc.cluster.local, subset: v1}}]
    mirror: {host: web.default.svc.cluster.local, subset: v2}
    mirrorPercentage: {value: 25}
  - name: home
    match: [{uri: {exact: /}}]
    route: [{destination: {host: web.default.svc.cluster.local, subset: v1}}]
"""

ROUTE_KEYED_LIMIT = """
apiVersion: nodeagent.io/v1alpha1
kind: LocalRateLimit
metadata: {name: per-route, namespace: default}
spec:
  selector: {matchLabels: {app: web}}
  http:
    tokenBucket: {maxTokens: 5, tokensPerFill: 5, fillInterval: 1s}
    key: {route: {}}
"""


def load(tmp: Path, *docs: str) -> MeshSnapshot:
    for i, doc in enumerate((MESH, *docs)):
        (tmp / f"{i}.yaml").write_text(doc)
    runtimes = {
        "default/client": PodRuntime("default/client", "10.1.0.9", "n1", ""),
        "default/web-v1": PodRuntime("default/web-v1", "10.1.0.1", "n2", ""),
        "default/web-v2": PodRuntime("default/web-v2", "10.1.0.2", "n2", ""),
    }
    return load_directory(tmp, runtimes=runtimes).snapshot


@pytest.fixture(scope="module")
def snap(tmp_path_factory: pytest.TempPathFactory) -> MeshSnapshot:
    return load(tmp_path_factory.mktemp("plan"))


def planner() -> Planner:
    return Planner(Clusters(BalancerRegistry(lambda: 0.0, random.Random(1))))


def request(
    snap: MeshSnapshot,
    target: str = "/",
    *headers: tuple[str, str],
    method: str = "GET",
    service: str = "default/web",
) -> Request:
    client = snap.pod_by_key["default/client"]
    conn = Connection(client, "unknown", "10.1.0.9", snap.service_by_key[service], 80, "c1")
    hdrs = join_headers((("host", "web"), *headers))
    return Request(method, target, hdrs["host"], hdrs, conn)


class Scripted(random.Random):
    """``random()`` returns the values given, in turn (bits come from the seed)."""

    def __init__(self, *values: float) -> None:
        super().__init__(7)
        self.values = list(values)

    def random(self) -> float:
        return self.values.pop(0)


def scripted(*values: float) -> Draws:
    return Draws(Scripted(*values))


def planned(snap: MeshSnapshot, req: Request, draws: Draws | None = None) -> Plan:
    p = planner().plan(snap, req, draws or Likeliest())
    assert isinstance(p, Plan), p
    return p


def answered(snap: MeshSnapshot, req: Request, draws: Draws | None = None) -> Answer:
    a = planner().plan(snap, req, draws or Likeliest())
    assert isinstance(a, Answer), a
    return a


def test_no_rule_matches_is_a_404_answer(snap: MeshSnapshot) -> None:
    a = answered(snap, request(snap, "/nothing"))
    assert (a.status, a.flag, a.location, a.delay) == (404, "NR", None, None)
    assert a.body == f"no VirtualService route of {HOST} matches this request"
    assert a.decision.outcome is RouteOutcome.NO_ROUTE and a.route_name == ""


def test_a_redirect_is_an_answer_with_a_location(snap: MeshSnapshot) -> None:
    a = answered(snap, request(snap, "/old/page"))
    assert (a.status, a.location, a.route_name) == (302, "http://web/new", "moved")


@pytest.mark.parametrize(
    ("draws", "delay", "aborted"),
    [((0.9, 0.9), None, False), ((0.1, 0.9), 2.0, False), ((0.1, 0.1), 2.0, True)],
)
def test_a_fault_delays_then_aborts_as_drawn(
    snap: MeshSnapshot, draws: tuple[float, float], delay: float | None, aborted: bool
) -> None:
    p = planner().plan(snap, request(snap, "/fault"), scripted(*draws))
    assert p.delay == delay
    if aborted:
        assert isinstance(p, Answer) and (p.status, p.flag) == (418, "FI")
    else:
        assert isinstance(p, Plan) and p.cluster.name == f"outbound|80|v1|{HOST}"


def test_the_weighted_destination_is_drawn(snap: MeshSnapshot) -> None:
    req = request(snap, "/", ("x-split", "1"))
    assert planned(snap, req, scripted(0.29)).cluster.subset == "v1"
    assert planned(snap, req, scripted(0.31)).cluster.subset == "v2"
    assert planned(snap, req).cluster.subset == "v2"  # Likeliest: the heaviest


def test_a_destination_that_does_not_exist_is_a_503_nc_answer(snap: MeshSnapshot) -> None:
    a = answered(snap, request(snap, "/gone"))
    assert (a.status, a.flag, a.route_name) == (503, "NC", "gone")
    assert "nowhere.default.svc.cluster.local" in a.body


def test_rewrites_retries_timeout_and_header_operations(snap: MeshSnapshot) -> None:
    p = planned(snap, request(snap, "/api/items?x=1"))
    assert (p.path, p.authority) == ("/v2/items?x=1", "api.internal")
    assert (p.retry.attempts, p.retry.per_try_timeout, p.timeout) == (5, 1.0, 3.0)
    assert p.route_name == "api"
    headers = [("host", "web"), ("x-drop", "1"), ("x-route", "client")]
    p.edit_request(headers)
    names = [k for k, _ in headers]
    assert "x-drop" not in names and ("x-route", "api") in headers and ("x-dest", "v2") in headers
    assert names.index("x-forwarded-proto") < names.index("x-route") < names.index("x-dest")
    assert p.response_ops == (
        HeaderOperations(add=(("x-served-by", "api"),)),
        HeaderOperations(set=(("x-dest", "v2"),)),
    )


def test_the_default_route_has_istios_retry_policy_and_no_timeout(snap: MeshSnapshot) -> None:
    p = planned(snap, request(snap, "/x", service="default/plain"))
    assert p.decision is not None and p.decision.outcome is RouteOutcome.DEFAULT
    assert (p.retry, p.timeout, p.route_name) == (DEFAULT_RETRY, None, "")
    assert p.cluster.name == "outbound|80||plain.default.svc.cluster.local"
    assert NO_RETRY.attempts == 0


def test_new_ids_are_added_and_the_clients_are_kept(snap: MeshSnapshot) -> None:
    p = planned(snap, request(snap))
    added = dict(p.add_headers)
    assert added["traceparent"] == f"00-{p.trace_id}-{added['traceparent'][36:52]}-00"
    assert len(p.trace_id) == 32 and p.trace_id != "0" * 32
    rid = added["x-request-id"]
    assert rid == p.request_id and rid[14] == "4" and rid[19] in "89ab" and len(rid) == 36
    assert added["x-forwarded-proto"] == "http"
    tp = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    p = planned(snap, request(snap, "/", ("traceparent", tp), ("x-request-id", "r-1")))
    assert p.add_headers == (("x-forwarded-proto", "http"),)
    assert (p.trace_id, p.request_id) == ("0af7651916cd43dd8448eb211c80319c", "r-1")
    assert trace_id("garbage") == trace_id(None) == ""


def test_each_request_gets_new_ids_of_its_own_in_the_w3c_and_uuid_formats(
    snap: MeshSnapshot,
) -> None:
    planner_, draws = planner(), Draws(random.Random(3))
    traceparent = re.compile(r"00-([0-9a-f]{32})-([0-9a-f]{16})-00")
    uuid4 = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}")
    seen: set[str] = set()
    variants: set[str] = set()
    for _ in range(300):  # ids are made many requests at a time: several batches
        p = planner_.plan(snap, request(snap), draws)
        assert isinstance(p, Plan)
        added = dict(p.add_headers)
        m = traceparent.fullmatch(added["traceparent"])
        assert m is not None and m[1] == p.trace_id
        assert int(m[1], 16) != 0 and int(m[2], 16) != 0
        assert uuid4.fullmatch(p.request_id) and added["x-request-id"] == p.request_id
        seen.update((p.trace_id, m[2], p.request_id))
        variants.add(p.request_id[19])
    assert len(seen) == 900 and variants == set("89ab")
    # a client's trace context is kept, a request id is still made for it
    tp = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    p = planner_.plan(snap, request(snap, "/", ("traceparent", tp)), draws)
    assert isinstance(p, Plan) and "traceparent" not in dict(p.add_headers)
    assert uuid4.fullmatch(p.request_id) and p.request_id not in seen


def test_the_route_header_goes_only_where_a_limit_is_keyed_by_route(
    snap: MeshSnapshot, tmp_path: Path
) -> None:
    claimed = request(snap, "/", (ROUTE_HEADER, "forged"))
    p = planned(snap, claimed)
    assert p.remove_headers == (ROUTE_HEADER,)
    assert ROUTE_HEADER not in dict(p.add_headers)
    keyed = load(tmp_path, ROUTE_KEYED_LIMIT)
    p = planned(keyed, request(keyed, "/", (ROUTE_HEADER, "forged")))
    headers = [("host", "web"), (ROUTE_HEADER, "forged")]
    p.edit_request(headers)
    assert [v for k, v in headers if k == ROUTE_HEADER] == ["home"]


@pytest.mark.parametrize(
    ("target", "headers", "key", "cookie"),
    [
        ("/api/x", (("x-user", "ann"),), "ann", False),
        ("/api/x", (), None, False),
        ("/cookie", (("cookie", "a=1; u=bob"),), "bob", False),
        ("/cookie", (), "generated", True),
        ("/query?q=7&q=8", (), "7", False),
    ],
)
def test_the_consistent_hash_key_is_planned(
    snap: MeshSnapshot,
    target: str,
    headers: tuple[tuple[str, str], ...],
    key: str | None,
    cookie: bool,
) -> None:
    p = planned(snap, request(snap, target, *headers))
    if key == "generated":
        assert p.hash_key is not None and p.set_cookie is not None
        assert p.set_cookie.startswith(f'u="{p.hash_key}"')
    else:
        assert p.hash_key == key and (p.set_cookie is not None) == cookie


def test_the_mirror_is_drawn_by_its_percentage(snap: MeshSnapshot) -> None:
    req = request(snap, "/mirror")
    p = planned(snap, req, scripted(0.24))
    assert p.mirror is not None and p.mirror.subset == "v2"
    assert planned(snap, req, scripted(0.26)).mirror is None
    assert planned(snap, req).mirror is None  # Likeliest: no chance fires


def test_what_is_remembered_of_a_snapshot_goes_with_it(tmp_path: Path) -> None:
    pl = planner()
    old = load(tmp_path)
    first = pl.route(old, request(old, "/api/x", service="default/plain"))
    new = load(tmp_path)
    again = pl.route(new, request(new, "/api/x", service="default/plain"))
    assert again is not first and again.name == first.name  # decided again for the new one
    assert pl.route(new, request(new, "/api/x", service="default/plain")) is again
    gone = weakref.ref(old)
    del old, first
    gc.collect()
    assert gone() is None  # the planner does not keep the old snapshot alive


def test_route_decisions_are_remembered_per_request_line(
    snap: MeshSnapshot, tmp_path: Path
) -> None:
    pl = planner()
    plain = load(tmp_path)  # no match looks at headers: remembered
    first = pl.route(plain, request(plain, "/api/x", service="default/plain"))
    assert pl.route(plain, request(plain, "/api/x", service="default/plain")) is first
    # the web VirtualService matches a header: asked every time
    one = pl.route(snap, request(snap, "/api/x"))
    assert pl.route(snap, request(snap, "/api/x")) is not one
    assert pl.route(snap, request(snap, "/api/x")).name == one.name == "api"


PLAIN_ROUTES = """
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: plain, namespace: default}
spec:
  hosts: [plain.default.svc.cluster.local]
  http:
  - name: %s
    match: [{uri: {prefix: /a}}]
    route: [{destination: {host: plain.default.svc.cluster.local}}]
  - name: posts
    match: [{method: {exact: POST}}]
    route: [{destination: {host: plain.default.svc.cluster.local}}]
  - name: other-host
    match: [{authority: {exact: other}}]
    route: [{destination: {host: plain.default.svc.cluster.local}}]
  - name: rest
    route: [{destination: {host: plain.default.svc.cluster.local}}]
"""


def test_each_request_on_a_connection_is_routed_by_its_own_line_and_snapshot(
    tmp_path: Path,
) -> None:
    pl = planner()
    (tmp_path / "old").mkdir()
    (tmp_path / "new").mkdir()
    old = load(tmp_path / "old", PLAIN_ROUTES % "a")
    conn = request(old, service="default/plain").conn

    def on(snap: MeshSnapshot, target: str, method: str = "GET", host: str = "plain") -> str:
        return pl.route(snap, Request(method, target, host, {"host": host}, conn)).name

    # a request like the last one on the connection, then each part of the line changed
    assert [on(old, "/a"), on(old, "/a"), on(old, "/b"), on(old, "/a")] == ["a", "a", "rest", "a"]
    assert [on(old, "/b", "POST"), on(old, "/b"), on(old, "/b", host="other")] == [
        "posts",
        "rest",
        "other-host",
    ]
    new = load(tmp_path / "new", PLAIN_ROUTES % "renamed")
    assert [on(new, "/a"), on(new, "/a"), on(old, "/a")] == ["renamed", "renamed", "a"]
