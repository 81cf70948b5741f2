"""AuthorizationPolicy micro-benchmark: ``evaluate`` with 1,000 policies in the mesh.

    .venv/bin/python bench/authz_bench.py [--decisions 50000] [--seed 1]

No root, no sandbox: builds a ``MeshSnapshot`` in memory with 100 namespaces (one of them
the root namespace ``istio-system``) of 10 policies each, and one pod per (namespace,
app) pair, ``app`` in ``svc-0`` .. ``svc-9``. In each namespace, policy 0 has no selector
(ALLOW from the same namespace or from ``ns-000``, with a ``when`` on a header), and
policies 1-9 select ``app=svc-<k>``: DENY of POST on ``/admin/*`` (k odd) or ALLOW of
GET/HEAD on ``/api/*`` from a principal prefix (k even). The root namespace's policy 0 is a
mesh-wide DENY of ``/internal/*`` from outside the mesh's namespaces. So about four
policies apply to any workload; the other ~996 must cost nothing.

Each decision is timed alone (``perf_counter_ns`` around one ``evaluate`` call) over a mix
of HTTP and TCP requests to random pods of the whole mesh (the worst case for CPU caches:
a node agent only decides for its own node's pods), built before the clock starts, with
random principals, paths, methods and headers; the per-workload cache is filled first
(``prepare``). The whole list is timed ``--passes`` times in a row, and each decision
keeps its fastest time: a decision the scheduler or an interrupt hit in one pass is not
hit in all of them, while each pass is as cold for the caches as the first. Prints p50,
p90, p99 and max in µs of the first pass alone ("raw") and of the per-decision best.

Exit status: 1 when the per-decision-best p99 is 20 µs or more, 0 otherwise.
"""

from __future__ import annotations

import argparse
import gc
import random
import statistics
import sys
import time

from nodeagent.core.authz import AuthzRequest, evaluate, prepare
from nodeagent.model.objects import Labels, Pod
from nodeagent.model.security import (
    AuthorizationPolicy,
    AuthzAction,
    Condition,
    Operation,
    Rule,
    Source,
)
from nodeagent.model.snapshot import MeshSnapshot

ROOT = "istio-system"
NAMESPACES = 100
PER_NAMESPACE = 10
BUDGET_US = 20.0


def namespace(i: int) -> str:
    return ROOT if i == 0 else f"ns-{i:03d}"


def build() -> MeshSnapshot:
    policies: list[AuthorizationPolicy] = []
    pods: list[Pod] = []
    for i in range(NAMESPACES):
        ns = namespace(i)
        if i == 0:
            policies.append(
                AuthorizationPolicy(
                    ns,
                    "mesh-deny-internal",
                    action=AuthzAction.DENY,
                    rules=(
                        Rule(
                            from_=(Source(not_namespaces=("ns-*",)),),
                            to=(Operation(paths=("/internal/*",)),),
                        ),
                    ),
                )
            )
        else:
            policies.append(
                AuthorizationPolicy(
                    ns,
                    "ns-wide",
                    rules=(
                        Rule(
                            from_=(Source(namespaces=(ns, "ns-000")),),
                            when=(Condition("request.headers[x-tenant]", values=(ns, "t-*")),),
                        ),
                    ),
                )
            )
        for k in range(1, PER_NAMESPACE):
            selector = Labels.of({"app": f"svc-{k}"})
            if k % 2:
                policy = AuthorizationPolicy(
                    ns,
                    f"deny-admin-{k}",
                    selector=selector,
                    action=AuthzAction.DENY,
                    rules=(Rule(to=(Operation(methods=("POST",), paths=("/admin/*",)),)),),
                )
            else:
                policy = AuthorizationPolicy(
                    ns,
                    f"allow-api-{k}",
                    selector=selector,
                    rules=(
                        Rule(
                            from_=(Source(principals=(f"cluster.local/ns/{ns}/*",)),),
                            to=(
                                Operation(
                                    methods=("GET", "HEAD"),
                                    paths=("/api/*",),
                                    ports=(8080,),
                                ),
                            ),
                        ),
                        Rule(when=(Condition("source.ip", values=("10.200.0.0/16",)),)),
                    ),
                )
            policies.append(policy)
        for k in range(PER_NAMESPACE):
            pods.append(
                Pod(
                    namespace=ns,
                    name=f"svc-{k}",
                    node_name="n1",
                    labels=Labels.of({"app": f"svc-{k}", "version": "v1"}),
                    pod_ip=f"10.{i // 200}.{i % 200}.{k + 1}",
                )
            )
    assert len(policies) == NAMESPACES * PER_NAMESPACE
    return MeshSnapshot.build(
        version=1, pods=tuple(pods), services=(), authorization_policies=tuple(policies)
    )


def requests(snap: MeshSnapshot, n: int, rng: random.Random) -> list[AuthzRequest]:
    out: list[AuthzRequest] = []
    for _ in range(n):
        pod = rng.choice(snap.pods)
        src_ns = rng.choice((pod.namespace, namespace(rng.randrange(NAMESPACES))))
        principal = rng.choice((f"spiffe://cluster.local/ns/{src_ns}/sa/client", None))
        is_http = rng.random() < 0.8
        out.append(
            AuthzRequest(
                destination=pod,
                destination_port=rng.choice((8080, 9090)),
                source_principal=principal,
                source_ip=rng.choice(("10.200.1.1", "10.1.2.3")),
                destination_ip=pod.pod_ip or "",
                is_http=is_http,
                host=f"{pod.name}.{pod.namespace}.svc.cluster.local" if is_http else None,
                method=rng.choice(("GET", "POST", "HEAD")) if is_http else None,
                path=rng.choice(("/api/items?id=7", "/admin/users", "/internal/x", "/"))
                if is_http
                else None,
                headers={"x-tenant": rng.choice((pod.namespace, "t-1", "other"))}
                if is_http
                else {},
            )
        )
    return out


def report(label: str, times_ns: list[int]) -> float:
    """Print p50/p90/p99/max in µs; return p99."""
    ts = sorted(times_ns)
    q = statistics.quantiles(ts, n=100)
    p50, p90, p99 = q[49] / 1e3, q[89] / 1e3, q[98] / 1e3
    print(
        f"{label}: p50 {p50:.2f} µs, p90 {p90:.2f} µs, p99 {p99:.2f} µs, max {ts[-1] / 1e3:.1f} µs"
    )
    return p99


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--decisions", type=int, default=50_000, help="timed decisions")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--passes", type=int, default=3, help="timed passes (best per decision)")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    snap = build()
    prepare(snap)
    print(
        f"{len(snap.authorization_policies)} policies, {len(snap.pods)} pods, "
        f"{len(snap.authorization_policies_by_namespace)} namespaces; "
        f"build+prepare {(time.perf_counter() - t0) * 1e3:.1f} ms"
    )
    reqs = requests(snap, args.decisions, random.Random(args.seed))
    for r in reqs[:1000]:  # warm-up
        evaluate(snap, r)
    clock = time.perf_counter_ns
    best = [1 << 62] * len(reqs)
    raw: list[int] = []
    allowed = 0
    gc.disable()
    try:
        for n in range(max(1, args.passes)):
            for i, r in enumerate(reqs):
                start = clock()
                d = evaluate(snap, r)
                t = clock() - start
                if t < best[i]:
                    best[i] = t
                if n == 0:
                    raw.append(t)
                    allowed += d.allowed
    finally:
        gc.enable()
    print(f"{len(reqs)} decisions ({allowed} allowed), {args.passes} passes")
    report("raw (first pass)", raw)
    p99 = report("best of passes  ", best)
    print(f"budget: p99 < {BUDGET_US:.0f} µs (best of passes)")
    if p99 >= BUDGET_US:
        print("FAIL: p99 over budget")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
