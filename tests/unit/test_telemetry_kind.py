"""The ``telemetry.istio.io/v1 Telemetry`` kind: what it accepts (errors naming file,
object and field), the access-log filter's CEL subset, and which object applies to a
workload (workload > namespace > root, field by field), read through the agent's loader."""

from __future__ import annotations

import pytest
from meshyaml import MeshFiles, object_yaml, pod_yaml, service_yaml

from nodeagent.control.files import load_directory
from nodeagent.core.telemetry import keeps, parse_filter, resolve
from nodeagent.model.telemetry import DEFAULT_SAMPLING

API = "telemetry.istio.io/v1"
PODS = (
    pod_yaml("web-1", "shop", app="web")
    + pod_yaml("db-1", "shop", app="db")
    + pod_yaml("other-1", "other", app="web")
    + service_yaml("db", "[{name: http, port: 80}]", "shop", app="db")
)


def telemetry(name: str, namespace: str, spec: str) -> str:
    return object_yaml(API, "Telemetry", name, namespace, spec)


MESH_WIDE = telemetry(
    "mesh-default",
    "istio-system",
    """
tracing:
- randomSamplingPercentage: 10
  customTags: {cluster: {literal: {value: east}}}
accessLogging:
- providers: [{name: envoy}]
""",
)
NAMESPACE = telemetry(
    "ns",
    "shop",
    """
tracing:
- randomSamplingPercentage: 50
  customTags: {team: {header: {name: X-Team, defaultValue: none}}}
accessLogging:
- filter: {expression: "response.code >= 400"}
""",
)
WORKLOAD = telemetry(
    "web-quiet",
    "shop",
    """
selector: {matchLabels: {app: web}}
accessLogging:
- disabled: true
tracing:
- disableSpanReporting: true
""",
)
SERVICE_TARGET = telemetry(
    "db-all",
    "shop",
    """
targetRefs: [{kind: Service, group: "", name: db}]
tracing:
- randomSamplingPercentage: 100
""",
)


def test_workload_beats_namespace_beats_root_field_by_field(mesh: MeshFiles) -> None:
    snap = mesh.load(PODS, MESH_WIDE, NAMESPACE, WORKLOAD, SERVICE_TARGET)
    web = resolve(snap, snap.pod_by_key["shop/web-1"])
    assert web.policies == ("istio-system/mesh-default", "shop/ns", "shop/web-quiet")
    assert not web.access_log and not web.report_spans
    assert web.sampling == 50  # the namespace's: the workload's object leaves it out
    assert {t.tag: (t.kind, t.value) for t in web.custom_tags} == {
        "cluster": ("literal", "east"),
        "team": ("header", "x-team"),
    }
    db = resolve(snap, snap.pod_by_key["shop/db-1"])  # picked by the Service targetRef
    assert db.policies == ("istio-system/mesh-default", "shop/ns", "shop/db-all")
    assert db.sampling == 100 and db.access_log and db.report_spans
    assert db.log_filter is not None and db.log_filter.expression == "response.code >= 400"
    other = resolve(snap, snap.pod_by_key["other/other-1"])  # only the mesh-wide one
    assert other.policies == ("istio-system/mesh-default",)
    assert other.sampling == 10 and other.log_filter is None


def test_without_telemetry_istios_defaults_apply(mesh: MeshFiles) -> None:
    snap = mesh.load(PODS)
    cfg = resolve(snap, snap.pod_by_key["shop/web-1"])
    assert cfg.sampling == DEFAULT_SAMPLING == 1.0
    assert cfg.access_log and cfg.report_spans and cfg.policies == ()


def test_metrics_overrides_are_accepted_and_warned_as_not_applied(mesh: MeshFiles) -> None:
    text = telemetry("m", "shop", "metrics:\n- providers: [{name: prometheus}]")
    mesh.path.write_text(PODS + text)
    loaded = load_directory(mesh.directory)
    assert any("Telemetry shop/m: spec.metrics is not applied" in w for w in loaded.warnings)


@pytest.mark.parametrize(
    ("spec", "field", "reason"),
    [
        ("tracing:\n- randomSampling: 5", "spec.tracing[0].randomSampling", "unknown field"),
        (
            "tracing:\n- randomSamplingPercentage: 101",
            "spec.tracing[0].randomSamplingPercentage",
            "not between 0 and 100",
        ),
        (
            "tracing:\n- customTags: {a: {literal: {value: x}, header: {name: y}}}",
            "spec.tracing[0].customTags.a",
            "exactly one of literal, header, environment",
        ),
        (
            "accessLogging:\n- filter: {expression: 'response.size > 3'}",
            "spec.accessLogging[0].filter.expression",
            "unsupported attribute 'response.size'",
        ),
        (
            "accessLogging:\n- match: {mode: SERVER}",
            "spec.accessLogging[0].match.mode",
            "only CLIENT_AND_SERVER",
        ),
        (
            "targetRefs: [{kind: Gateway, name: gw}]",
            "spec.targetRefs[0].kind",
            "not supported",
        ),
        ("accessLogging:\n- disabled: 'no'", "spec.accessLogging[0].disabled", "boolean"),
    ],
)
def test_a_wrong_field_is_named(mesh: MeshFiles, spec: str, field: str, reason: str) -> None:
    mesh.assert_named(telemetry("t", "shop", spec), "Telemetry shop/t", field, reason)


def test_a_misspelled_version_is_an_error_not_a_skip(mesh: MeshFiles) -> None:
    text = telemetry("t", "shop", "tracing: []").replace(API, "telemetry.istio.io/v2")
    mesh.assert_named(text, "Telemetry shop/t", "apiVersion", "not read for Telemetry")


RECORD = {
    "response_code": 503,
    "method": "GET",
    "path": "/api",
    "authority": "web",
    "user_agent": "curl",
    "request_id": "r1",
    "source_principal": "spiffe://cluster.local/ns/a/sa/b",
    "destination_principal": "unknown",
}


@pytest.mark.parametrize(
    ("expr", "kept"),
    [
        ("response.code >= 500", True),
        ("response.code < 500", False),
        ("response.code >= 400 && request.method == 'POST'", False),
        ("response.code >= 400 && request.method == 'GET'", True),
        ("request.path == '/x' || response.code == 503", True),
        ("!(response.code == 503)", False),
        ("connection.mtls", False),
        ("!connection.mtls && request.host != \"db\"", True),
        ('request.useragent == "curl" && (request.id == "r2" || response.code > 500)', True),
    ],
)
def test_the_filter_subset_evaluates_as_cel_would(expr: str, kept: bool) -> None:
    assert keeps(parse_filter(expr), RECORD) is kept


@pytest.mark.parametrize(
    ("expr", "reason"),
    [
        ("", "empty"),
        ("response.code >=", "ends too early"),
        ("response.code == 'x'", "is a int"),
        ("request.path.startsWith('/a')", "unsupported attribute"),
        ("request.method > 'A'", "only be compared with == or !="),
        ("response.code == 1 response.code == 2", "unexpected"),
        ("(response.code == 1", "not closed"),
        ("response.code in [1, 2]", "unsupported CEL"),
    ],
)
def test_outside_the_subset_is_a_clear_error(expr: str, reason: str) -> None:
    with pytest.raises(ValueError, match=reason.replace("(", r"\(")):
        parse_filter(expr)
