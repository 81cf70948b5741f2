"""``ctl explain`` (``proxy/explain.py``) against a snapshot from YAML, with the real
``L7Proxy`` and ``InboundPolicy`` behind a stand-in for the Proxy: each section comes
from the same calls the data path makes (the plan with its likeliest draws, the balancer,
admission), so its answer and the traffic agree."""

from __future__ import annotations

import io
import random
from typing import Any, cast

import pytest

from nodeagent.control.files import load_directory
from nodeagent.model.objects import Pod, PodRuntime
from nodeagent.model.snapshot import MeshSnapshot
from nodeagent.model.status import ExplainQuery
from nodeagent.proxy.admission import InboundPolicy
from nodeagent.proxy.explain import ExplainError, explain
from nodeagent.proxy.l7 import L7Proxy
from nodeagent.telemetry.accesslog import AccessLog
from nodeagent.telemetry.metrics import Metrics

MESH = """
apiVersion: v1
kind: Pod
metadata: {name: client, namespace: default, labels: {app: client}}
spec: {nodeName: node1, containers: [{name: main, command: [sleep]}]}
---
apiVersion: v1
kind: Pod
metadata: {name: web-v1-0, namespace: default, labels: {app: web, version: v1}}
spec: {nodeName: node2, containers: [{name: main, command: [app]}]}
---
apiVersion: v1
kind: Pod
metadata: {name: web-v2-0, namespace: default, labels: {app: web, version: v2}}
spec: {nodeName: node2, containers: [{name: main, command: [app]}]}
---
apiVersion: v1
kind: Pod
metadata: {name: other-0, namespace: default, labels: {app: other}}
spec: {nodeName: node1, containers: [{name: main, command: [app]}]}
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: default}
spec:
  selector: {app: web}
  clusterIP: 10.96.0.10
  ports:
  - {name: http, port: 80, targetPort: 8080}
  - {name: grpc, port: 50051, targetPort: 50051, appProtocol: grpc}
  - {name: tcp, port: 9000, targetPort: 9000}
---
apiVersion: v1
kind: Service
metadata: {name: other, namespace: default}
spec:
  selector: {app: other}
  clusterIP: 10.96.0.11
  ports:
  - {name: http, port: 80, targetPort: 8080}
---
apiVersion: v1
kind: Service
metadata: {name: strict, namespace: default}
spec:
  selector: {app: other}
  clusterIP: 10.96.0.12
  ports:
  - {name: http, port: 80, targetPort: 8080}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: web, namespace: default}
spec:
  hosts: [web.default.svc.cluster.local]
  http:
  - name: old
    match: [{uri: {prefix: /old}}]
    redirect: {uri: /new, authority: example.com}
  - name: faulty
    match: [{uri: {prefix: /fault}}]
    fault:
      delay: {fixedDelay: 1s, percentage: {value: 50}}
      abort: {httpStatus: 503, percentage: {value: 100}}
    route: [{destination: {host: web.default.svc.cluster.local, subset: v1}}]
  - name: canary
    match: [{headers: {x-canary: {exact: "yes"}}}]
    route:
    - {destination: {host: web.default.svc.cluster.local, subset: v1}, weight: 10}
    - {destination: {host: web.default.svc.cluster.local, subset: v2}, weight: 90}
    retries: {attempts: 3, perTryTimeout: 2s, retryOn: 5xx}
    timeout: 10s
  - name: missing
    match: [{uri: {prefix: /missing}}]
    route: [{destination: {host: nothere.default.svc.cluster.local}}]
  - match: [{uri: {prefix: /api}}, {uri: {exact: /hashed}}]
    rewrite: {uri: /v2/api}
    route: [{destination: {host: web.default.svc.cluster.local}}]
  - match: [{uri: {prefix: /}, method: {exact: GET}}]
    route: [{destination: {host: web.default.svc.cluster.local, subset: v2}}]
  tcp:
  - match: [{port: 9000}]
    route: [{destination: {host: web.default.svc.cluster.local, subset: v1}}]
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: web, namespace: default}
spec:
  host: web.default.svc.cluster.local
  trafficPolicy:
    loadBalancer: {consistentHash: {httpHeaderName: x-user}}
  subsets:
  - name: v1
    labels: {version: v1}
  - name: v2
    labels: {version: v2}
    trafficPolicy:
      loadBalancer: {simple: ROUND_ROBIN}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: other, namespace: default}
spec:
  host: other.default.svc.cluster.local
  trafficPolicy:
    loadBalancer: {consistentHash: {httpCookie: {name: user, ttl: 60s}}}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: no-put, namespace: default}
spec:
  selector: {matchLabels: {app: web}}
  action: DENY
  rules:
  - to: [{operation: {methods: [PUT]}}]
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: strict, namespace: default}
spec:
  selector: {matchLabels: {app: other}}
  mtls: {mode: STRICT}
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {name: ratings-vm-1, namespace: default, annotations: {nodeagent.io/node: vm-1}}
spec: {address: 192.168.121.10, labels: {app: ratings}, serviceAccount: ratings}
---
apiVersion: nodeagent.io/v1alpha1
kind: LocalRateLimit
metadata: {name: web-per-user, namespace: default}
spec:
  selector: {matchLabels: {app: web}}
  http:
    tokenBucket: {maxTokens: 1, tokensPerFill: 1, fillInterval: 60s}
    key: {header: x-user}
"""


class Identity:
    trust_domain = "cluster.local"


class FakeProxy:
    """What ``explain`` uses of the Proxy."""

    def __init__(self, snap: MeshSnapshot, identity: Identity | None) -> None:
        self.snap = snap
        self.identity = identity
        self.l7 = L7Proxy(self.snapshot, Metrics(), AccessLog(io.BytesIO()), rnd=random.Random(1))
        self.admission = InboundPolicy(self.snapshot)
        self.pods = {"default/web-v1-0": object(), "default/client": object()}

    def snapshot(self) -> MeshSnapshot:
        return self.snap

    def identity_principal(self, pod: Pod) -> str:
        return pod.identity("cluster.local")


@pytest.fixture(scope="module")
def snap(tmp_path_factory: pytest.TempPathFactory) -> MeshSnapshot:
    d = tmp_path_factory.mktemp("explain")
    (d / "mesh.yaml").write_text(MESH)
    runtimes = {
        "default/web-v1-0": PodRuntime("default/web-v1-0", "10.244.0.1", "node2", ""),
        "default/web-v2-0": PodRuntime("default/web-v2-0", "10.244.0.2", "node2", ""),
        "default/other-0": PodRuntime("default/other-0", "10.244.0.3", "node1", ""),
        "default/client": PodRuntime("default/client", "10.244.9.9", "node1", ""),
    }
    return load_directory(d, runtimes=runtimes).snapshot


def ask(
    snap: MeshSnapshot,
    to: str,
    path: str = "/",
    *headers: tuple[str, str],
    method: str = "GET",
    mtls: bool = True,
) -> dict[str, Any]:
    proxy = FakeProxy(snap, Identity() if mtls else None)
    q = ExplainQuery(from_pod="client", to=to, method=method, path=path, headers=headers)
    return explain(cast(Any, proxy), q)


def verdict(ans: dict[str, Any]) -> tuple[bool, int | None, str]:
    v = ans["verdict"]
    return v["allowed"], v["status"], v["why"]


def test_a_routed_request_names_rule_destination_endpoint_and_hop(snap: MeshSnapshot) -> None:
    ans = ask(snap, "web:80")
    r = ans["route"]
    assert (r["virtual_service"], r["rule"], r["match"], r["route_name"]) == (
        "default/web",
        5,
        0,
        "default/web#5",
    )
    assert (r["timeout"], r["retries"]) == (None, "default (2)")
    assert ans["endpoints"]["cluster"] == "outbound|80|v2|web.default.svc.cluster.local"
    assert ans["destination"]["pod"] == "default/web-v2-0"
    assert ans["peer_authentication"]["hop"].startswith("HBONE mTLS")
    assert verdict(ans) == (True, None, "to default/web-v2-0 port 8080 on node2 (HBONE mTLS)")
    assert verdict(ask(snap, "web:80", mtls=False))[2].endswith("(plaintext)")


@pytest.mark.parametrize(
    ("path", "method", "want"),
    [
        ("/", "POST", (False, 404, "no http[] rule of default/web matches (NR)")),
        ("/old/x", "GET", (False, 503, "the route has no destination")),
        (
            "/missing",
            "GET",
            (
                False,
                503,
                "route destination nothere.default.svc.cluster.local is not a known service (NC)",
            ),
        ),
        (
            "/api/items",
            "PUT",
            (False, 403, "RBAC: access denied (DENY policy default/no-put rule 0 matched)"),
        ),
    ],
)
def test_answers_without_a_destination(
    snap: MeshSnapshot, path: str, method: str, want: tuple[bool, int, str]
) -> None:
    assert verdict(ask(snap, "web:80", path, method=method)) == want


def test_a_fault_is_shown_and_never_fires(snap: MeshSnapshot) -> None:
    ans = ask(snap, "web:80", "/fault")
    assert ans["route"]["fault"] == {"delay": 50.0, "abort": {"status": 503, "percent": 100.0}}
    assert verdict(ans)[0] is True


def test_the_heaviest_destination_is_shown(snap: MeshSnapshot) -> None:
    ans = ask(snap, "web:80", "/x", ("x-canary", "yes"))
    assert [d["weight"] for d in ans["route"]["destinations"]] == [10, 90]
    assert (ans["route"]["retries"], ans["route"]["timeout"]) == (3, 10.0)
    assert ans["endpoints"]["cluster"] == "outbound|80|v2|web.default.svc.cluster.local"


def test_the_hash_key_is_the_data_paths(snap: MeshSnapshot) -> None:
    assert ask(snap, "web:80", "/hashed", ("x-user", "bob"))["endpoints"]["why"] == (
        "consistent hash of 'bob'"
    )
    # the cookie the request carries, as the data path hashes it (not a generated one)
    ans = ask(snap, "other", "/a?b=c", ("cookie", "user=abc"))
    assert ans["endpoints"]["why"] == "consistent hash of 'abc'"


def test_a_tcp_port_shows_its_tcp_rule(snap: MeshSnapshot) -> None:
    ans = ask(snap, "web:9000")
    assert ans["protocol"] == "TCP" and ans["route"]["tcp_rule"] is True
    assert ans["endpoints"]["cluster"] == "outbound|9000|v1|web.default.svc.cluster.local"


def test_plaintext_to_a_strict_workload_is_refused(snap: MeshSnapshot) -> None:
    assert verdict(ask(snap, "strict:80", mtls=False)) == (
        False,
        None,
        "plaintext refused: default/strict requires mTLS",
    )


def test_a_bad_question_is_an_explain_error(snap: MeshSnapshot) -> None:
    with pytest.raises(ExplainError, match="several ports"):
        ask(snap, "web")
    with pytest.raises(ExplainError, match="not a service or pod of the mesh"):
        ask(snap, "nothing:80")


def test_the_path_is_explained_as_the_data_path_normalizes_it(snap: MeshSnapshot) -> None:
    ans = ask(snap, "web:80", "HTTP://web/x/..\\api/items", method="PUT")
    assert ans["request"]["normalized_path"] == "/api/items"
    assert verdict(ans) == verdict(ask(snap, "web:80", "/api/items", method="PUT"))
    allowed, status, why = verdict(ask(snap, "web:80", "/a%00"))
    assert (allowed, status) == (False, 400) and "%00" in why


def test_a_vms_workload_is_explained_as_a_caller(snap: MeshSnapshot) -> None:
    proxy = cast(Any, FakeProxy(snap, Identity()))
    for name in ("ratings-vm-1", "default/ratings-vm-1"):
        q = ExplainQuery(from_pod=name, to="web:80", method="PUT", path="/api/items", headers=())
        ans = explain(proxy, q)
        assert ans["source"] == {
            "pod": "default/ratings-vm-1",
            "node": "vm-1",
            "principal": "spiffe://cluster.local/ns/default/sa/ratings",
        }
        assert verdict(ans)[:2] == (False, 403)
    q = ExplainQuery(from_pod="nobody", to="web:80", method="GET", path="/", headers=())
    with pytest.raises(ExplainError, match="no pod named nobody in the mesh, nor a WorkloadEntry"):
        explain(proxy, q)
