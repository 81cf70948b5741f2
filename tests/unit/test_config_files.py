"""Config directory loading: each kind of mistake is named by file, object and field."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from fuzzing import fuzz
from hypothesis import given
from hypothesis import strategies as st

from nodeagent.control.files import load_directory, parse_documents
from nodeagent.errors import ConfigErrors

POD = """
apiVersion: v1
kind: Pod
metadata: {name: web-1, namespace: shop, labels: {app: web, version: v1}}
spec:
  nodeName: node1
  serviceAccountName: web
  containers:
  - name: app
    command: [nodeagent, sample-app]
    args: [--port, "8080"]
    env: [{name: A, value: b}]
    ports: [{name: http, containerPort: 8080}]
"""
SERVICE = """
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec:
  selector: {app: web}
  clusterIP: 10.96.0.20
  ports: [{name: http, port: 80, targetPort: http, appProtocol: http}]
"""


def write(tmp_path: Path, **files: str) -> Path:
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    return tmp_path


def errors_of(tmp_path: Path) -> list[str]:
    with pytest.raises(ConfigErrors) as info:
        load_directory(tmp_path)
    return [str(e) for e in info.value.errors]


def test_valid_directory_builds_an_indexed_snapshot(tmp_path: Path) -> None:
    loaded = load_directory(write(tmp_path, **{"pod.yaml": POD, "svc.yml": SERVICE}))
    snap = loaded.snapshot
    pod = snap.pod_by_key["shop/web-1"]
    assert pod.service_account == "web"
    assert pod.identity() == "spiffe://cluster.local/ns/shop/sa/web"
    assert pod.containers[0].command == ("nodeagent", "sample-app")
    svc = snap.service_by_ip["10.96.0.20"]
    assert snap.service_by_host["web.shop.svc.cluster.local"] is svc
    assert snap.endpoints_by_service[svc.key] == (pod,)
    # no IP yet: no ready endpoint; the named targetPort resolves through containerPort
    assert snap.endpoints(svc, svc.ports[0]) == ()
    assert len(loaded.objects) == 2


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            POD.replace("kind: Pod", "kind: Pods"),
            "kind: unknown kind 'Pods': did you mean Pod?",
        ),
        (
            POD.replace("nodeName: node1", "nodeName: node1\n  hostNetwrok: true"),
            "spec.hostNetwrok: unknown field",
        ),
        (
            SERVICE.replace("port: 80,", "port: eighty,"),
            "spec.ports[0].port: expected integer, got string 'eighty'",
        ),
        (
            SERVICE.replace("port: 80,", "port: 70000,"),
            "spec.ports[0].port: port 70000 is out of range",
        ),
        (
            SERVICE.replace("10.96.0.20", "10.96.0.999"),
            "spec.clusterIP: '10.96.0.999' is not an IP address",
        ),
        (POD.replace("  nodeName: node1\n", ""), "spec.nodeName: required field is missing"),
        (
            POD.replace("containerPort: 8080", "containerPort: '8080'"),
            "spec.containers[0].ports[0].containerPort: expected integer",
        ),
        ("apiVersion: v1\nkind: Pod\nmetadata: {name: x\n", "invalid YAML"),
    ],
)
def test_each_mistake_names_file_object_and_field(tmp_path: Path, text: str, expected: str) -> None:
    write(tmp_path, **{"a.yaml": text, "pod0.yaml": POD if "kind: Service" in text else ""})
    errs = errors_of(tmp_path)
    assert any(expected in e for e in errs), errs
    assert all(str(tmp_path / "a.yaml") in e for e in errs if expected in e)


def test_object_name_in_message(tmp_path: Path) -> None:
    write(tmp_path, **{"pod.yaml": POD, "svc.yaml": SERVICE.replace("port: 80,", "port: x,")})
    (err,) = errors_of(tmp_path)
    assert err.startswith(f"{tmp_path / 'svc.yaml'}: Service shop/web: spec.ports[0].port:")


def test_selector_matching_nothing_is_a_warning(tmp_path: Path) -> None:
    """Kubernetes accepts it (a Deployment scaled to zero): the config loads, with a warning."""
    write(tmp_path, **{"pod.yaml": POD, "svc.yaml": SERVICE.replace("{app: web}", "{app: nope}")})
    (warning,) = load_directory(tmp_path).warnings
    assert warning == (
        f"{tmp_path / 'svc.yaml'}: Service shop/web: spec.selector: selector app=nope matches "
        "no Pod in namespace shop"
    )


def test_duplicate_name_names_both_files(tmp_path: Path) -> None:
    write(tmp_path, **{"a.yaml": POD, "b.yaml": POD})
    (err,) = errors_of(tmp_path)
    assert "duplicate name: also defined in" in err and "a.yaml" in err and "b.yaml" in err


def test_cluster_ip_clash(tmp_path: Path) -> None:
    other = SERVICE.replace("name: web,", "name: web2,")
    write(tmp_path, **{"p.yaml": POD, "s1.yaml": SERVICE, "s2.yaml": other})
    (err,) = errors_of(tmp_path)
    assert "spec.clusterIP: clusterIP 10.96.0.20 is already used by Service shop/web" in err


def test_all_errors_reported_at_once(tmp_path: Path) -> None:
    bad1 = POD.replace("kind: Pod", "kind: Pods")
    bad2 = SERVICE.replace("clusterIP", "clusterIp")
    write(tmp_path, **{"a.yaml": bad1, "b.yaml": bad2})
    assert len(errors_of(tmp_path)) >= 2


def test_multi_document_file_names_the_document(tmp_path: Path) -> None:
    write(tmp_path, **{"all.yaml": POD + "---\n" + SERVICE.replace("port: 80,", "port: x,")})
    (err,) = errors_of(tmp_path)
    assert "all.yaml (document 2)" in err


def test_not_a_directory(tmp_path: Path) -> None:
    with pytest.raises(ConfigErrors, match="not a directory"):
        load_directory(tmp_path / "missing")


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=8),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)


@fuzz(1.5)
@given(
    kind=st.sampled_from(["Pod", "Service", "Other"]),
    body=st.dictionaries(
        st.sampled_from(["metadata", "spec", "status", "extra"]), json_values, max_size=4
    ),
)
def test_parser_never_crashes_on_arbitrary_objects(kind: str, body: dict[str, object]) -> None:
    doc = {"apiVersion": "v1", "kind": kind, **body}
    pairs, errors, warnings = parse_documents(yaml.safe_dump(doc), "fuzz.yaml")
    # a valid object, errors naming the file, or one warning (skipped): never an exception
    assert pairs or errors or len(warnings) == 1
    assert all("fuzz.yaml" in str(e) for e in [*errors, *warnings])


@fuzz()
@given(text=st.text(max_size=200))
def test_parser_never_crashes_on_arbitrary_text(text: str) -> None:
    _pairs, errors, warnings = parse_documents(text, "fuzz.yaml")
    assert all("fuzz.yaml" in str(e) for e in [*errors, *warnings])


def test_endpoints_are_per_snapshot(tmp_path: Path) -> None:
    """``endpoints()`` is memoised on the (immutable) snapshot: the next snapshot, built
    after a pod got its IP, answers from its own pods, not from the last one's memo."""
    from nodeagent.model.objects import PodRuntime
    from nodeagent.model.snapshot import MeshSnapshot

    snap = load_directory(write(tmp_path, **{"pod.yaml": POD, "svc.yml": SERVICE})).snapshot
    svc = snap.service_by_ip["10.96.0.20"]
    assert snap.endpoints(svc, svc.ports[0]) == ()
    rt = PodRuntime(key="shop/web-1", ip="10.244.1.5", node="node1", netns="x")
    nxt = MeshSnapshot.build(
        version=2, pods=snap.pods, services=snap.services, runtimes={rt.key: rt}
    )
    eps = nxt.endpoints(svc, svc.ports[0])
    assert [(e.pod.key, e.ip, e.port) for e in eps] == [("shop/web-1", "10.244.1.5", 8080)]
    assert nxt.endpoints(svc, svc.ports[0]) is eps
    assert snap.endpoints(svc, svc.ports[0]) == ()
