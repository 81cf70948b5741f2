"""The destination's admission stage per request: ``InboundPolicy.decide`` with a JWT
(ES256 or RS256), an AuthorizationPolicy and a LocalRateLimit applying to the workload,
among the 1,000 policies of ``authz_bench``'s mesh.

    .venv/bin/python bench/admission_bench.py [--requests 20000] [--alg ES256]

No root, no sandbox. Prints the median and p99 in µs per decision for: authorization
alone (no JWT rule, no limit), + a rate limit, + a valid JWT (the same token each time,
as a client sends it: its parse and signature check are remembered, its ``exp`` is
checked every time). Informational: no exit-status budget.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import time

from authz_bench import build

from nodeagent.core.authz import prepare
from nodeagent.model.authn import JWTRule, RequestAuthentication
from nodeagent.model.objects import Labels
from nodeagent.model.ratelimit import HttpRateLimit, LocalRateLimit, TokenBucket
from nodeagent.model.snapshot import MeshSnapshot
from nodeagent.proxy.admission import InboundPolicy
from nodeagent.samples.jwtmint import generate_key, mint


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=20000)
    ap.add_argument("--alg", choices=["ES256", "RS256"], default="ES256")
    args = ap.parse_args()
    base = build()
    pod = next(p for p in base.pods if p.namespace == "ns-001" and p.labels.get("app") == "svc-2")
    key, jwks = generate_key(args.alg, "k")
    now = int(time.time())
    token = mint(key, args.alg, "k", {"iss": "https://i", "sub": "alice", "exp": now + 3600})
    ra = RequestAuthentication(
        namespace="ns-001",
        name="jwt",
        selector=Labels.of({"app": "svc-2"}),
        jwt_rules=(JWTRule(issuer="https://i", jwks=json.dumps(json.loads(jwks))),),
    )
    rl = LocalRateLimit(
        namespace="ns-001",
        name="rl",
        selector=Labels.of({"app": "svc-2"}),
        http=HttpRateLimit(TokenBucket(10**9, 10**9, 1.0)),
    )
    variants = {
        "authorization only": MeshSnapshot.build(
            version=1,
            pods=base.pods,
            services=(),
            authorization_policies=base.authorization_policies,
        ),
        "+ rate limit": MeshSnapshot.build(
            version=2,
            pods=base.pods,
            services=(),
            authorization_policies=base.authorization_policies,
            local_rate_limits=(rl,),
        ),
        f"+ rate limit + JWT {args.alg}": MeshSnapshot.build(
            version=3,
            pods=base.pods,
            services=(),
            authorization_policies=base.authorization_policies,
            local_rate_limits=(rl,),
            request_authentications=(ra,),
        ),
    }
    headers = {"authorization": f"Bearer {token}", "x-user": "alice"}
    for name, snap in variants.items():
        prepare(snap)
        policy = InboundPolicy(lambda snap=snap: snap)
        pod_ = snap.pod_by_key[pod.key]
        times = []
        gc.disable()
        for _ in range(args.requests):
            t = time.perf_counter_ns()
            a = policy.decide(
                snap,
                pod_,
                8080,
                "spiffe://cluster.local/ns/ns-001/sa/x",
                "10.0.0.1",
                http=True,
                host="svc-2",
                method="GET",
                path="/api/items",
                headers=headers,
            )
            times.append(time.perf_counter_ns() - t)
        gc.enable()
        times.sort()
        p50 = statistics.median(times) / 1000
        p99 = times[int(len(times) * 0.99)] / 1000
        print(f"{name:32s} p50 {p50:7.1f} µs  p99 {p99:7.1f} µs  (allowed={a.allowed})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
