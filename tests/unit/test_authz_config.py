"""AuthorizationPolicy from YAML: what converts, and each kind of mistake named by file,
object and field path."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest
from meshyaml import MeshFiles, object_yaml

from nodeagent.control.files import load_directory
from nodeagent.errors import ConfigErrors
from nodeagent.model.objects import Labels
from nodeagent.model.security import AuthzAction, Condition, Operation, Source


def ap(spec: str, name: str = "p", ns: str = "default", api: str = "security.istio.io/v1") -> str:
    return object_yaml(api, "AuthorizationPolicy", name, ns, spec)


FULL = ap(
    """
selector: {matchLabels: {app: web}}
action: DENY
rules:
- from:
  - source:
      principals: [cluster.local/ns/default/sa/sleep]
      notPrincipals: ["*/sa/bad"]
      namespaces: [default]
      notNamespaces: [kube-*]
      ipBlocks: [10.0.0.0/8, 192.168.1.7]
      notIpBlocks: ["fd00::/8"]
      requestPrincipals: ["issuer/*"]
      notRequestPrincipals: [issuer/evil]
  to:
  - operation:
      hosts: [web.default.svc.cluster.local]
      notHosts: ["*.internal"]
      ports: ["8080", 9090]
      notPorts: ["15000"]
      methods: [POST]
      notMethods: [GET]
      paths: [/api/*]
      notPaths: [/api/health]
  when:
  - {key: "request.headers[X-User]", values: [alice]}
  - {key: source.ip, notValues: [10.1.0.0/16]}
  - {key: destination.port, values: ["8080"]}
- {}
""",
    name="full",
)


def test_full_policy_converts(mesh: MeshFiles) -> None:
    snap = mesh.load(FULL)
    (p,) = snap.authorization_policies
    assert (p.namespace, p.name, p.action) == ("default", "full", AuthzAction.DENY)
    assert p.selector == Labels.of({"app": "web"})
    assert p.source == str(mesh.path)
    r0, r1 = p.rules
    assert r0.from_ == (
        Source(
            principals=("cluster.local/ns/default/sa/sleep",),
            not_principals=("*/sa/bad",),
            namespaces=("default",),
            not_namespaces=("kube-*",),
            ip_blocks=(
                ipaddress.ip_network("10.0.0.0/8"),
                ipaddress.ip_network("192.168.1.7/32"),
            ),
            not_ip_blocks=(ipaddress.ip_network("fd00::/8"),),
            request_principals=("issuer/*",),
            not_request_principals=("issuer/evil",),
        ),
    )
    assert r0.to == (
        Operation(
            hosts=("web.default.svc.cluster.local",),
            not_hosts=("*.internal",),
            ports=(8080, 9090),
            not_ports=(15000,),
            methods=("POST",),
            not_methods=("GET",),
            paths=("/api/*",),
            not_paths=("/api/health",),
        ),
    )
    assert r0.when == (
        Condition("request.headers[X-User]", values=("alice",)),
        Condition("source.ip", not_values=("10.1.0.0/16",)),
        Condition("destination.port", values=("8080",)),
    )
    assert (r1.from_, r1.to, r1.when) == ((), (), ())
    assert snap.authorization_policies_by_namespace == {"default": (p,)}


def test_defaults_and_v1beta1(mesh: MeshFiles) -> None:
    text = ap("{}", name="allow-nothing", api="security.istio.io/v1beta1") + ap(
        "rules: []", name="b", ns="istio-system"
    )
    snap = mesh.load(text)
    a, b = snap.authorization_policies
    assert (a.action, a.selector, a.rules) == (AuthzAction.ALLOW, None, ())
    assert b.rules == ()
    assert set(snap.authorization_policies_by_namespace) == {"default", "istio-system"}


def test_index_sorted_by_name(mesh: MeshFiles) -> None:
    text = ap("{}", name="zz") + ap("{}", name="aa") + ap("{}", name="mm", ns="other")
    snap = mesh.load(text)
    assert [p.name for p in snap.authorization_policies_by_namespace["default"]] == ["aa", "zz"]


OBJ = "AuthorizationPolicy default/p"
SRC = "spec.rules[0].from[0].source"
OP = "spec.rules[0].to[0].operation"


@pytest.mark.parametrize(
    ("spec", "field", "reason"),
    [
        ("action: CUSTOM\nprovider: {name: ext}", "spec.action", "action CUSTOM (ext_authz)"),
        ("provider: {name: ext}", "spec.provider", "not supported"),
        ("action: allow", "spec.action", "unknown action 'allow' (one of ALLOW, DENY, AUDIT)"),
        ("targetRef: {kind: Gateway}", "spec.targetRef", "unknown field"),
        ("selector: {matchLabels: {}}", "spec.selector.matchLabels", "selects nothing"),
        ("selector: {app: web}", "spec.selector.app", "unknown field"),
        ("rules: [{from: [{source: {principal: [x]}}]}]", f"{SRC}.principal", "unknown field"),
        ("rules: [{from: [{principals: [x]}]}]", "spec.rules[0].from[0].principals", "unknown"),
        ("rules: [{from: [{}]}]", "spec.rules[0].from[0].source", "required field is missing"),
        ("rules: [{from: [{source: {}}]}]", SRC, "at least one field"),
        ("rules: [{to: [{operation: {}}]}]", OP, "at least one field"),
        ("rules: [{to: [{operation: {method: [GET]}}]}]", f"{OP}.method", "unknown field"),
        (
            "rules: [{from: [{source: {ipBlocks: [10.0.0.0/8, 10.0.0.300/32]}}]}]",
            f"{SRC}.ipBlocks[1]",
            "'10.0.0.300/32' is not an IP address or CIDR block",
        ),
        (
            "rules: [{from: [{source: {notIpBlocks: [nope]}}]}]",
            f"{SRC}.notIpBlocks[0]",
            "not an IP address",
        ),
        ("rules: [{from: [{source: {principals: ''}}]}]", f"{SRC}.principals", "expected a list"),
        ("rules: [{from: [{source: {principals: ['']}}]}]", f"{SRC}.principals[0]", "empty"),
        ("rules: [{to: [{operation: {paths: ['/a*b']}}]}]", f"{OP}.paths[0]", "only exact"),
        ("rules: [{to: [{operation: {hosts: ['*a*']}}]}]", f"{OP}.hosts[0]", "only exact"),
        ("rules: [{to: [{operation: {ports: ['http']}}]}]", f"{OP}.ports[0]", "not a port"),
        ("rules: [{to: [{operation: {notPorts: [70000]}}]}]", f"{OP}.notPorts[0]", "not a port"),
        (
            "rules: [{when: [{key: request.regex, values: [x]}]}]",
            "spec.rules[0].when[0].key",
            "unsupported key 'request.regex' (supported: request.headers[NAME], source.ip",
        ),
        (
            "rules: [{when: [{key: 'request.headers[]', values: [x]}]}]",
            "spec.rules[0].when[0].key",
            "unsupported key",
        ),
        ("rules: [{when: [{key: source.ip}]}]", "spec.rules[0].when[0]", "values or notValues"),
        (
            "rules: [{from: [{source: {remoteIpBlocks: [10.0.0.0/8]}}]}]",
            f"{SRC}.remoteIpBlocks",
            "remoteIpBlocks is not supported: remote.ip is the client before an edge proxy",
        ),
        (
            "rules: [{from: [{source: {notRemoteIpBlocks: [10.0.0.0/8]}}]}]",
            f"{SRC}.notRemoteIpBlocks",
            "use ipBlocks (source.ip)",
        ),
        (
            "rules: [{when: [{key: remote.ip, values: [10.0.0.1]}]}]",
            "spec.rules[0].when[0].key",
            "key remote.ip is not supported",
        ),
        ("rules: [{when: [{values: [x]}]}]", "spec.rules[0].when[0].key", "required field"),
        (
            "rules: [{when: [{key: destination.ip, values: [bad]}]}]",
            "spec.rules[0].when[0].values[0]",
            "not an IP address",
        ),
        (
            "rules: [{when: [{key: destination.port, notValues: ['0']}]}]",
            "spec.rules[0].when[0].notValues[0]",
            "not a port",
        ),
        (
            "rules: [{when: [{key: source.namespace, valuez: [a]}]}]",
            "spec.rules[0].when[0].valuez",
            "unknown field",
        ),
        ("rules: [{from: [], bogus: 1}]", "spec.rules[0].bogus", "unknown field"),
    ],
)
def test_each_mistake_is_named(mesh: MeshFiles, spec: str, field: str, reason: str) -> None:
    mesh.assert_named(ap(spec), OBJ, field, reason)


def test_bad_metadata_is_named(mesh: MeshFiles) -> None:
    mesh.assert_named(
        ap("{}", name="Bad_Name"),
        "AuthorizationPolicy default/Bad_Name",
        "metadata.name",
        "not a valid name",
    )


def test_duplicate_names(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text(ap("{}"))
    (tmp_path / "b.yaml").write_text(ap("action: DENY"))
    with pytest.raises(ConfigErrors) as info:
        load_directory(tmp_path)
    (err,) = info.value.errors
    assert (err.obj, err.field) == (OBJ, "metadata.name")
    assert err.source == str(tmp_path / "b.yaml")
    assert f"also defined in {tmp_path / 'a.yaml'}" in err.reason


def test_same_name_in_two_namespaces_is_fine(mesh: MeshFiles) -> None:
    text = ap("{}") + ap("{}", ns="istio-system")
    assert len(mesh.load(text).authorization_policies) == 2
