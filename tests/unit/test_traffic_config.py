"""VirtualService and DestinationRule from YAML: what converts, and each kind of mistake
named by file, object and field path."""

from __future__ import annotations

import pytest
from meshyaml import REVIEWS, MeshFiles, object_yaml

from nodeagent.control.fields import parse_duration
from nodeagent.control.files import load_directory
from nodeagent.model.traffic import MatchKind, SimpleLB


def vs(spec: str, name: str = "r", api: str = "networking.istio.io/v1") -> str:
    return object_yaml(api, "VirtualService", name, spec=spec)


def dr(spec: str, name: str = "d", api: str = "networking.istio.io/v1beta1") -> str:
    return object_yaml(api, "DestinationRule", name, spec=spec)


MESH = REVIEWS + dr(
    """
host: reviews
subsets:
- {name: v1, labels: {version: v1}}
- {name: v2, labels: {version: v2}}
""",
    name="reviews",
    api="networking.istio.io/v1",
)
"""The reviews Service and Pods, and subsets v1 and v2 (the last list: a test adds to it)."""


FULL_VS = vs(
    """
hosts: [reviews]
http:
- name: jason
  match:
  - headers: {end-user: {exact: jason}}
    uri: {prefix: /api}
    ignoreUriCase: true
  - queryParams: {debug: {regex: "1|yes"}}
    method: {exact: GET}
    port: 9080
    sourceLabels: {app: productpage}
    sourceNamespace: default
  route:
  - destination: {host: reviews, subset: v2, port: {number: 9080}}
    headers: {request: {set: {X-Canary: "1"}}}
  timeout: 7s
  retries: {attempts: 3, perTryTimeout: 500ms, retryOn: "5xx,connect-failure,503"}
  fault:
    delay: {fixedDelay: 2s, percentage: {value: 50}}
    abort: {httpStatus: 500, percentage: {value: 10.5}}
  mirror: {host: reviews, subset: v1}
  mirrorPercentage: {value: 25}
  headers: {response: {add: {X-Via: mesh}, remove: [Server]}}
- name: canary
  route:
  - {destination: {host: reviews, subset: v1}, weight: 90}
  - {destination: {host: reviews.default.svc.cluster.local, subset: v2}, weight: 10}
tcp:
- match: [{port: 9090}]
  route: [{destination: {host: reviews}}]
""",
    api="networking.istio.io/v1alpha3",
)


def test_full_virtual_service_converts(mesh: MeshFiles) -> None:
    snap = mesh.load(MESH, FULL_VS)
    host = "reviews.default.svc.cluster.local"
    v = snap.virtual_service_by_host[host]
    assert v.hosts == (host,)
    first, second = v.http
    m0, m1 = first.matches
    assert m0.headers[0][0] == "end-user" and m0.uri is not None
    assert (m0.uri.kind, m0.uri.value, m0.ignore_uri_case) == (MatchKind.PREFIX, "/api", True)
    assert m1.query_params[0][1].regex is not None and m1.port == 9080
    assert first.routes[0].weight == 100 and first.routes[0].destination.subset == "v2"
    assert first.timeout == 7.0
    assert first.retries is not None and first.retries.per_try_timeout == 0.5
    assert first.retries.retry_on == ("5xx", "connect-failure", "503")
    assert first.fault is not None and first.fault.abort is not None
    assert first.fault.abort.percentage == 10.5
    assert first.mirror is not None and first.mirror.host == host
    assert first.mirror_percentage == 25.0
    assert [r.weight for r in second.routes] == [90, 10]
    assert {r.destination.host for r in second.routes} == {host}
    assert v.tcp[0].routes[0].weight == 100


def test_full_destination_rule_converts(mesh: MeshFiles) -> None:
    rule = dr(
        """
host: ratings.prod.svc.cluster.local
trafficPolicy:
  loadBalancer:
    consistentHash: {httpCookie: {name: user, ttl: 60s}}
    localityLbSetting: {enabled: true, failover: [{from: us-east, to: eu-west}]}
  connectionPool:
    tcp: {maxConnections: 100, connectTimeout: 30ms}
    http: {http1MaxPendingRequests: 10, http2MaxRequests: 1000,
           maxRequestsPerConnection: 10, idleTimeout: 1m30s}
  outlierDetection: {consecutive5xxErrors: 5, consecutiveGatewayErrors: 3, interval: 10s,
                     baseEjectionTime: 30s, maxEjectionPercent: 50}
  portLevelSettings:
  - port: {number: 80}
    loadBalancer: {simple: LEAST_REQUEST}
subsets:
- name: v1
  labels: {version: v1}
  trafficPolicy: {loadBalancer: {simple: RANDOM}}
"""
    )
    snap = mesh.load(MESH, rule)
    d = snap.destination_rule_by_host["ratings.prod.svc.cluster.local"]
    tp = d.traffic_policy
    assert tp is not None and tp.load_balancer is not None
    ch = tp.load_balancer.consistent_hash
    assert ch is not None and ch.http_cookie is not None and ch.http_cookie.ttl == 60.0
    assert tp.load_balancer.locality is not None
    assert tp.load_balancer.locality.failover == (("us-east", "eu-west"),)
    assert tp.connection_pool is not None and tp.connection_pool.idle_timeout == 90.0
    assert tp.connection_pool.connect_timeout == pytest.approx(0.03)
    assert tp.outlier_detection is not None and tp.outlier_detection.max_ejection_percent == 50
    pl = tp.for_port(80)
    assert pl is not None and pl.load_balancer is not None
    assert pl.load_balancer.simple is SimpleLB.LEAST_REQUEST


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("7s", 7.0), ("500ms", 0.5), ("1m30s", 90.0), ("1.5s", 1.5), ("2h", 7200.0), ("0s", 0.0)],
)
def test_durations(text: str, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "7", "s", "7 s", "-1s", "1d", "7sx"])
def test_bad_durations(text: str) -> None:
    with pytest.raises(ValueError):
        parse_duration(text)


OBJ = "VirtualService default/r"
R0 = "hosts: [reviews]\nhttp:\n- "


@pytest.mark.parametrize(
    ("extra", "obj", "field", "reason"),
    [
        # unknown field, from the schema checker
        (
            vs(R0 + "route: [{destination: {host: reviews}}]\n  corsPolicy: {}"),
            OBJ,
            "spec.http[0].corsPolicy",
            "unknown field",
        ),
        (
            vs(
                R0 + "route: [{destination: {host: reviews}, weight: 60}, "
                "{destination: {host: reviews}, weight: 30}]"
            ),
            OBJ,
            "spec.http[0].route",
            "must sum to 100, not 90",
        ),
        (
            vs(R0 + "route: [{destination: {host: reviews}, weight: 101}]"),
            OBJ,
            "spec.http[0].route[0].weight",
            "not a percentage",
        ),
        (
            vs(R0 + "match: [{uri: {exact: /a, prefix: /b}}]\n  route: [{destination: {host: x}}]"),
            OBJ,
            "spec.http[0].match[0].uri",
            "exactly one of exact, prefix, regex (got exact, prefix)",
        ),
        (
            vs(R0 + "match: [{method: {}}]\n  route: [{destination: {host: x}}]"),
            OBJ,
            "spec.http[0].match[0].method",
            "exactly one of exact, prefix, regex",
        ),
        (
            vs(R0 + 'match: [{uri: {regex: "(unclosed"}}]\n  route: [{destination: {host: x}}]'),
            OBJ,
            "spec.http[0].match[0].uri.regex",
            "invalid regular expression '(unclosed': missing ): (unclosed (RE2 syntax",
        ),
        (
            vs(
                R0 + r'match: [{uri: {regex: "/(a+)/\\1"}}]'
                "\n  route: [{destination: {host: x}}]"
            ),
            OBJ,
            "spec.http[0].match[0].uri.regex",
            r"invalid regular expression '/(a+)/\\1': invalid escape sequence: \1 (RE2 syntax is "
            "required, as Istio's: no backreferences, no lookahead or lookbehind)",
        ),
        (
            vs(
                R0 + 'match: [{headers: {x-user: {regex: "(?!admin).*"}}}]\n'
                "  route: [{destination: {host: x}}]"
            ),
            OBJ,
            "spec.http[0].match[0].headers.x-user.regex",
            "invalid perl operator: (?! (RE2 syntax is required",
        ),
        (
            vs(
                R0 + "match: [{queryParams: {q: {prefix: a}}}]\n  route: [{destination: {host: x}}]"
            ),
            OBJ,
            "spec.http[0].match[0].queryParams.q.prefix",
            "exact or regex only",
        ),
        (
            vs(R0 + "route: [{destination: {host: x}}]\n  timeout: 7 seconds"),
            OBJ,
            "spec.http[0].timeout",
            "'7 seconds' is not a duration",
        ),
        (
            vs(
                R0
                + "route: [{destination: {host: x}}]\n  retries: {attempts: 2, retryOn: '5xx,oops'}"
            ),
            OBJ,
            "spec.http[0].retries.retryOn",
            "unknown retry condition 'oops'",
        ),
        (
            vs(
                R0 + "route: [{destination: {host: x}}]\n  retries: {attempts: 2, perTryTimeout: 2}"
            ),
            OBJ,
            "spec.http[0].retries.perTryTimeout",
            "expected string",
        ),
        (
            vs(
                R0 + "route: [{destination: {host: x}}]\n"
                "  fault: {abort: {httpStatus: 503, percentage: {value: 150}}}"
            ),
            OBJ,
            "spec.http[0].fault.abort.percentage.value",
            "150 is not a percentage",
        ),
        (
            vs(R0 + "route: [{destination: {host: x}}]\n  mirrorPercentage: {value: -1}"),
            OBJ,
            "spec.http[0].mirrorPercentage.value",
            "not a percentage",
        ),
        (
            vs(R0 + "route: [{destination: {host: x}}]\n  redirect: {uri: /new}"),
            OBJ,
            "spec.http[0].redirect",
            "either route or redirect, not both",
        ),
        (
            vs(R0 + "redirect: {uri: /new, redirectCode: 200}"),
            OBJ,
            "spec.http[0].redirect.redirectCode",
            "200 is not a redirect code",
        ),
        (
            vs(R0 + "name: empty"),
            OBJ,
            "spec.http[0]",
            "a rule needs route or redirect",
        ),
        (
            vs(R0 + "route: [{destination: {host: reviews, subset: v9}}]"),
            OBJ,
            "spec.http[0].route[0].destination.subset",
            "subset 'v9' is not defined by DestinationRule default/reviews",
        ),
        (
            vs(R0 + "route: [{destination: {host: ratings, subset: v1}}]"),
            OBJ,
            "spec.http[0].route[0].destination.subset",
            "no DestinationRule for ratings.default.svc.cluster.local",
        ),
        (
            vs(
                "hosts: [reviews]\ntcp:\n"
                "- route: [{destination: {host: reviews, port: {number: 0}}}]"
            ),
            OBJ,
            "spec.tcp[0].route[0].destination.port.number",
            "out of range",
        ),
        (
            vs(R0 + "route: [{destination: {host: reviews}}]")
            + vs(R0 + "route: [{destination: {host: reviews}}]", name="s"),
            "VirtualService default/s",
            "spec.hosts[0]",
            "also routed by VirtualService default/r",
        ),
        (
            vs(R0 + "route: [{destination: {host: reviews, port: {number: 80}}}]"),
            OBJ,
            "spec.http[0].route[0].destination.port.number",
            "Service default/reviews has no port 80 (its ports: 9080)",
        ),
        # DestinationRule mistakes
        (
            dr("host: reviews\nsubsets: [{name: v3, labels: {version: v3}}]"),
            "DestinationRule default/d",
            "spec.host",
            "already has DestinationRule default/reviews",
        ),
        (
            dr("host: ratings\nsubsets: [{name: v1}, {name: v1}]"),
            "DestinationRule default/d",
            "spec.subsets[1].name",
            "subset 'v1' is also spec.subsets[0]",
        ),
        (
            dr("host: ratings\ntrafficPolicy: {loadBalancer: {simple: FASTEST}}"),
            "DestinationRule default/d",
            "spec.trafficPolicy.loadBalancer.simple",
            "unknown policy 'FASTEST'",
        ),
        (
            dr(
                "host: ratings\ntrafficPolicy: {loadBalancer: {simple: RANDOM, "
                "consistentHash: {useSourceIp: true}}}"
            ),
            "DestinationRule default/d",
            "spec.trafficPolicy.loadBalancer",
            "simple and consistentHash cannot both be set",
        ),
        (
            dr(
                "host: ratings\ntrafficPolicy: {loadBalancer: {consistentHash: "
                "{httpHeaderName: x, httpQueryParameterName: y}}}"
            ),
            "DestinationRule default/d",
            "spec.trafficPolicy.loadBalancer.consistentHash",
            "needs exactly one of",
        ),
        (
            dr("host: ratings\ntrafficPolicy: {outlierDetection: {maxEjectionPercent: 120}}"),
            "DestinationRule default/d",
            "spec.trafficPolicy.outlierDetection.maxEjectionPercent",
            "120 is not a percentage",
        ),
        (
            dr("host: ratings\ntrafficPolicy: {connectionPool: {http: {idleTimeout: soon}}}"),
            "DestinationRule default/d",
            "spec.trafficPolicy.connectionPool.http.idleTimeout",
            "'soon' is not a duration",
        ),
        (
            dr(
                "host: ratings\ntrafficPolicy: {portLevelSettings: "
                "[{port: {number: 80}}, {port: {number: 80}}]}"
            ),
            "DestinationRule default/d",
            "spec.trafficPolicy.portLevelSettings[1].port.number",
            "port 80 is listed twice",
        ),
        (
            dr("host: ratings\ntrafficPolicy: {tls: {mode: ISTIO_MUTUAL}}"),
            "DestinationRule default/d",
            "spec.trafficPolicy.tls",
            "unknown field",
        ),
    ],
)
def test_each_mistake_is_named(
    mesh: MeshFiles, extra: str, obj: str, field: str, reason: str
) -> None:
    mesh.assert_named(MESH + extra, obj, field, reason)


def test_subset_selecting_no_pod_is_a_warning(mesh: MeshFiles) -> None:
    """Istio accepts it (a rollout may leave a version without pods for a while): the
    config loads, and the warning names the subset."""
    mesh.path.write_text(MESH + "  - {name: v3, labels: {version: v3}}\n")
    loaded = load_directory(mesh.directory)
    assert loaded.warnings == (
        f"{mesh.path}: DestinationRule default/reviews: spec.subsets[2].labels: labels "
        "version=v3 select no Pod of Service default/reviews (selector app=reviews)",
    )


def test_short_and_full_host_names_are_the_same_host(mesh: MeshFiles) -> None:
    extra = vs(
        "hosts: [reviews.default.svc.cluster.local]\nhttp:\n- route: "
        "[{destination: {host: reviews, subset: v1}}]"
    )
    snap = mesh.load(MESH, extra)
    assert set(snap.destination_rule_by_host) == {"reviews.default.svc.cluster.local"}
