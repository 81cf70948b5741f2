"""Config as real clusters produce it: ``kubectl get -o yaml`` exports load (what the API
server fills in and the Pod and Service fields that do not touch the mesh are accepted),
kinds the mesh does not serve are skipped with one warning each, and a misspelled or
mistyped field of an object the mesh serves is still an error naming file, object, field.

The exports are in ``data/kubectl/``, written as kubectl prints them.
"""

from __future__ import annotations

import shutil
import textwrap
from pathlib import Path

import msgspec
import pytest
from lightkube.models import core_v1, meta_v1

from nodeagent.control.files import ConfigWatcher, load_directory, parse_object
from nodeagent.control.objects import NODE, POD, SERVICE
from nodeagent.control.schema import METADATA, ListOf, Obj, Shape
from nodeagent.control.traffic import VIRTUAL_SERVICE
from nodeagent.errors import ConfigErrors
from nodeagent.model.objects import Service

EXPORTS = Path(__file__).parent / "data" / "kubectl"


@pytest.fixture
def exports(tmp_path: Path) -> Path:
    """A config directory holding every export of ``data/kubectl``."""
    for f in EXPORTS.glob("*.yaml"):
        shutil.copy(f, tmp_path / f.name)
    return tmp_path


def errors_of(directory: Path) -> list[str]:
    with pytest.raises(ConfigErrors) as info:
        load_directory(directory)
    return [str(e) for e in info.value.errors]


def edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text, old
    path.write_text(text.replace(old, new, 1))


def test_kubectl_exports_load_as_the_mesh_needs_them(exports: Path) -> None:
    loaded = load_directory(exports)
    snap = loaded.snapshot
    pod = snap.pod_by_key["shop/web-7c9d8b6f5d-x2x9k"]
    assert (pod.node_name, pod.pod_ip, pod.service_account) == ("node1", "10.244.1.7", "web")
    assert pod.identity() == "spiffe://cluster.local/ns/shop/sa/web"
    assert pod.labels.matches(snap.service_by_ip["10.96.143.27"].selector)
    (web,) = pod.containers
    assert web.ports == (("http", 8080),)
    # an env var from valueFrom has no value outside a cluster: left out, the rest kept
    assert web.env == (("GREETING", "hello"),)
    svc = snap.service_by_host["web.shop.svc.cluster.local"]
    assert svc.cluster_ip == "10.96.143.27"
    (port,) = svc.ports
    assert (port.port, port.target_port, port.protocol) == (80, "http", "TCP")
    assert [e.port for e in snap.endpoints(svc, port)] == [8080]
    # kube-dns from the kind: List export: port 53 is UDP and TCP; the mesh serves TCP
    dns = snap.service_by_ip["10.96.0.10"]
    assert [(p.name, p.port) for p in dns.ports] == [("dns-tcp", 53), ("metrics", 9153)]
    coredns = snap.pod_by_key["kube-system/coredns-6f6b679f8f-lq4mz"]
    assert coredns.containers[0].ports == (("dns-tcp", 53), ("metrics", 9153))
    assert "kube-system/kube-proxy-8wz5d" not in snap.pod_by_key


def test_what_the_mesh_does_not_serve_is_one_warning_each(exports: Path) -> None:
    warnings = load_directory(exports).warnings
    assert sorted(warnings) == [
        f"{exports / 'configmap-web.yaml'}: v1 ConfigMap shop/web-config: "
        "not served by the mesh, skipped",
        f"{exports / 'deployment-web.yaml'}: apps/v1 Deployment shop/web: "
        "not served by the mesh, skipped",
        f"{exports / 'kube-system-list.yaml'} (items[1]): Pod kube-system/kube-proxy-8wz5d: "
        "hostNetwork Pod: it shares its node's network and is not captured, skipped",
    ]


def test_ctl_status_lists_the_warnings(exports: Path) -> None:
    watcher = ConfigWatcher(directory=exports, pods_file=None, on_update=lambda _: None)
    watcher.load_once()
    status = watcher.status(watcher.version)
    assert status.source == "files"
    assert len(status.warnings) == 3
    assert any("apps/v1 Deployment shop/web" in w for w in status.warnings)


UNSERVED = """
apiVersion: v1
kind: Namespace
metadata: {name: shop, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: v1
kind: ServiceAccount
metadata: {name: web, namespace: shop}
---
apiVersion: v1
kind: Secret
metadata: {name: web-tls, namespace: shop}
type: kubernetes.io/tls
data: {tls.crt: "", tls.key: ""}
---
apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {name: public, namespace: shop}
spec: {selector: {istio: ingressgateway}, servers: []}
---
apiVersion: serving.knative.dev/v1
kind: Service
metadata: {name: hello, namespace: shop}
spec: {template: {spec: {containers: [{image: hello}]}}}
"""


def test_any_other_kind_is_skipped_with_a_warning_naming_it(tmp_path: Path) -> None:
    (tmp_path / "more.yaml").write_text(UNSERVED)
    loaded = load_directory(tmp_path)
    where = tmp_path / "more.yaml"
    assert loaded.warnings == (
        f"{where} (document 1): v1 Namespace shop: not served by the mesh, skipped",
        f"{where} (document 2): v1 ServiceAccount shop/web: not served by the mesh, skipped",
        f"{where} (document 3): v1 Secret shop/web-tls: not served by the mesh, skipped",
        f"{where} (document 4): networking.istio.io/v1 Gateway shop/public: "
        "not served by the mesh, skipped",
        f"{where} (document 5): serving.knative.dev/v1 Service shop/hello: "
        "not served by the mesh, skipped",
    )
    assert loaded.objects == ()


@pytest.mark.parametrize(
    ("file", "old", "new", "expected"),
    [
        (
            "svc-web.yaml",
            "  selector:\n",
            "  portz:\n  - port: 81\n  selector:\n",
            "svc-web.yaml: Service shop/web: spec.portz: unknown field",
        ),
        (
            "svc-web.yaml",
            "    port: 80\n",
            "    port: eighty\n",
            "svc-web.yaml: Service shop/web: spec.ports[0].port: expected integer, "
            "got string 'eighty'",
        ),
        (
            "svc-web.yaml",
            "    protocol: TCP\n",
            "    protocol: HTTP\n",
            "svc-web.yaml: Service shop/web: spec.ports[0].protocol: expected one of TCP, "
            "UDP, SCTP, got 'HTTP'",
        ),
        (
            "svc-web.yaml",
            "  type: ClusterIP\n",
            "  type: Clusterip\n",
            "svc-web.yaml: Service shop/web: spec.type: expected one of ClusterIP, NodePort, "
            "LoadBalancer or ExternalName, got 'Clusterip'",
        ),
        (
            "pod-web.yaml",
            "  nodeName: node1\n",
            "  nodeName: node1\n  nodename: node2\n",
            "pod-web.yaml: Pod shop/web-7c9d8b6f5d-x2x9k: spec.nodename: unknown field",
        ),
        (
            "pod-web.yaml",
            "    - containerPort: 8080\n",
            "    - containerPort: '8080'\n",
            "Pod shop/web-7c9d8b6f5d-x2x9k: spec.containers[0].ports[0].containerPort: "
            "expected integer",
        ),
        (
            "pod-web.yaml",
            "  podIP: 10.244.1.7\n",
            "  podIP: 10.244.1.777\n",
            "Pod shop/web-7c9d8b6f5d-x2x9k: status.podIP: '10.244.1.777' is not an IP address",
        ),
        (
            "pod-web.yaml",
            "  uid: 9b3f6c1e",
            "  uuid: 9b3f6c1e",
            "Pod shop/web-7c9d8b6f5d-x2x9k: metadata.uuid: unknown field",
        ),
        (
            "kube-system-list.yaml",
            "    - name: metrics\n      port: 9153\n",
            "    - name: metrics\n      port: 9153\n      targetport: 9153\n",
            "kube-system-list.yaml (items[2]): Service kube-system/kube-dns: "
            "spec.ports[2].targetport: unknown field",
        ),
    ],
)
def test_a_mistake_in_an_export_is_still_an_error(
    exports: Path, file: str, old: str, new: str, expected: str
) -> None:
    edit(exports / file, old, new)
    errors = errors_of(exports)
    assert any(expected in e and e.startswith(str(exports / file)) for e in errors), errors


VIRTUAL_SERVICE_EXPORT = """
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  annotations:
    kubectl.kubernetes.io/last-applied-configuration: '{"apiVersion":"networking.istio.io/v1"}'
  creationTimestamp: "2026-12-06T07:40:11Z"
  generation: 2
  name: web
  namespace: shop
  resourceVersion: "49001"
  uid: 0a1b2c3d-4e5f-4a6b-8c7d-9e0f1a2b3c4d
spec:
  hosts:
  - web
  http:
  - route:
    - destination:
        host: web
        port:
          number: 80
status:
  observedGeneration: 2
  validationMessages:
  - documentationUrl: https://istio.io/latest/docs/reference/config/analysis/ist0101/
    level: ERROR
    type:
      code: IST0101
"""


def test_an_istio_export_with_status_loads_and_its_typos_are_errors(exports: Path) -> None:
    vs = exports / "vs.yaml"
    vs.write_text(VIRTUAL_SERVICE_EXPORT)
    loaded = load_directory(exports)
    assert [v.key for v in loaded.snapshot.virtual_services] == ["shop/web"]

    vs.write_text(VIRTUAL_SERVICE_EXPORT.replace("  - route:", "  - routes:"))
    (err,) = errors_of(exports)
    assert err.startswith(f"{vs}: VirtualService shop/web: spec.http[0].routes: unknown field")

    vs.write_text(VIRTUAL_SERVICE_EXPORT.replace("  hosts:\n  - web\n", "  hosts: web\n"))
    (err,) = errors_of(exports)
    assert err.startswith(f"{vs}: VirtualService shop/web: spec.hosts: expected a list")

    vs.write_text(VIRTUAL_SERVICE_EXPORT.replace("kind: VirtualService", "kind: VirtualSevice"))
    (err,) = errors_of(exports)
    assert "VirtualSevice shop/web: kind: unknown kind 'VirtualSevice': did you mean " in err


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("kind: Pod\nmetadata: {name: x}\n", "apiVersion and kind are required strings"),
        ("apiVersion: v1\nmetadata: {name: x}\n", "apiVersion and kind are required strings"),
        ("- just\n- a list\n", "expected a mapping with apiVersion and kind"),
        (
            "apiVersion: v2\nkind: Service\nmetadata: {name: x}\n",
            "Service default/x: apiVersion: apiVersion 'v2' is not read for Service (use v1)",
        ),
        (
            "apiVersion: security.istio.io/v2\nkind: AuthorizationPolicy\nmetadata: {name: x}\n",
            "apiVersion 'security.istio.io/v2' is not read for AuthorizationPolicy",
        ),
        (
            "apiVersion: v1\nkind: Servcie\nmetadata: {name: x}\n",
            "kind: unknown kind 'Servcie': did you mean Service?",
        ),
        (
            "apiVersion: v1\nkind: List\nitems:\n- apiVersion: v1\n  kind: Pod\n  metadata:"
            " {name: a}\n  spec: {nodeName: n1, containers: [{name: c}]}\n- {kind: Pod}\n",
            "(items[1]): apiVersion and kind are required strings",
        ),
    ],
)
def test_what_is_not_an_object_of_a_kind_is_an_error(
    tmp_path: Path, text: str, expected: str
) -> None:
    (tmp_path / "x.yaml").write_text(text)
    errors = errors_of(tmp_path)
    assert any(expected in e for e in errors), errors


def test_a_typed_list_from_the_api_is_unpacked(tmp_path: Path) -> None:
    """``GET /api/v1/namespaces/shop/pods`` returns a PodList whose items name no kind."""
    (tmp_path / "pods.yaml").write_text(
        textwrap.dedent(
            """
            apiVersion: v1
            kind: PodList
            metadata: {resourceVersion: "50112"}
            items:
            - metadata: {name: a, namespace: shop, uid: u1}
              spec: {nodeName: n1, containers: [{name: c}]}
            - metadata: {name: b, namespace: shop, uid: u2}
              spec: {nodeName: n2, containers: [{name: c}]}
            """
        )
    )
    snap = load_directory(tmp_path).snapshot
    assert sorted(snap.pod_by_key) == ["shop/a", "shop/b"]


def test_pods_the_mesh_leaves_out_are_skipped_with_why(tmp_path: Path) -> None:
    pod = "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}}}\n{rest}"
    docs = [
        pod.format(
            name="done",
            rest="spec: {nodeName: n1, containers: [{name: c}]}\n"
            "status: {phase: Succeeded, podIP: 10.244.1.9}\n",
        ),
        pod.format(
            name="reused",
            rest="spec: {nodeName: n1, containers: [{name: c}]}\n"
            "status: {phase: Running, podIP: 10.244.1.9}\n",
        ),
        pod.format(
            name="pending", rest="spec: {containers: [{name: c}]}\nstatus: {phase: Pending}\n"
        ),
    ]
    (tmp_path / "pods.yaml").write_text("---\n".join(docs))
    loaded = load_directory(tmp_path)
    assert [p.key for p in loaded.snapshot.pods] == ["default/reused"]
    assert [w.split(": ", 2)[2] for w in loaded.warnings] == [
        "phase Succeeded: the Pod has finished, skipped",
        "phase Pending and no spec.nodeName: not scheduled to a node yet, skipped",
    ]


def test_parse_object_gives_the_pair_errors_and_warnings() -> None:
    """What the API source calls for each object it is given."""
    doc = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "web", "namespace": "shop", "uid": "u", "resourceVersion": "7"},
        "spec": {"clusterIP": "None", "ports": [{"port": 80}], "sessionAffinity": "None"},
        "status": {"loadBalancer": {}},
    }
    pair, errors, warnings = parse_object(doc, "api")
    assert pair is not None and (errors, warnings) == ([], [])
    raw, svc = pair
    assert raw["_source"] == "api"
    assert isinstance(svc, Service) and svc.cluster_ip is None  # headless

    pair, errors, warnings = parse_object({**doc, "spec": {"ports": "80"}}, "api")
    assert pair is None and warnings == []
    assert [str(e) for e in errors] == [
        "api: Service shop/web: spec.ports: expected a list, got string"
    ]

    deploy = {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "w"}}
    assert parse_object(deploy, "api") == (
        None,
        [],
        ["api: apps/v1 Deployment w: not served by the mesh, skipped"],
    )


@pytest.mark.parametrize(
    ("spec", "ports"),
    [
        ("type: NodePort\nports: [{port: 80, nodePort: 30080}]", [80]),
        (
            "type: LoadBalancer\nports: [{port: 443, name: https}, {port: 80, name: http}]",
            [443, 80],
        ),
        ("clusterIP: None\nports: [{port: 5432, protocol: TCP}]", [5432]),
    ],
)
def test_real_service_types_load(tmp_path: Path, spec: str, ports: list[int]) -> None:
    body = textwrap.indent(spec, "  ")
    (tmp_path / "s.yaml").write_text(
        f"apiVersion: v1\nkind: Service\nmetadata: {{name: s}}\nspec:\n{body}\n"
    )
    (svc,) = load_directory(tmp_path).snapshot.services
    assert [p.port for p in svc.ports] == ports


def test_an_external_name_service_is_skipped(tmp_path: Path) -> None:
    (tmp_path / "s.yaml").write_text(
        "apiVersion: v1\nkind: Service\nmetadata: {name: db}\n"
        "spec: {type: ExternalName, externalName: db.example.com}\n"
    )
    loaded = load_directory(tmp_path)
    assert loaded.snapshot.services == ()
    (warning,) = loaded.warnings
    assert warning.endswith(
        "Service default/db: type ExternalName: a DNS alias the mesh does not serve, skipped"
    )


# --- the shapes cover the real v1 types -------------------------------------------------


def _obj(shape: Shape, *path: str) -> Obj:
    """The ``Obj`` at ``path`` below ``shape`` (through lists)."""
    for key in path:
        assert isinstance(shape, Obj), path
        shape = shape.fields[key]
        while isinstance(shape, ListOf):
            shape = shape.item
    assert isinstance(shape, Obj), path
    return shape


def _api_fields(model: type) -> set[str]:
    return {f.encode_name for f in msgspec.structs.fields(model)}


@pytest.mark.parametrize(
    ("shape", "model"),
    [
        (METADATA, meta_v1.ObjectMeta),
        (_obj(POD), core_v1.Pod),
        (_obj(POD, "spec"), core_v1.PodSpec),
        (_obj(POD, "spec", "containers"), core_v1.Container),
        (_obj(POD, "spec", "containers", "ports"), core_v1.ContainerPort),
        (_obj(POD, "spec", "containers", "env"), core_v1.EnvVar),
        (_obj(POD, "status"), core_v1.PodStatus),
        (_obj(SERVICE), core_v1.Service),
        (_obj(SERVICE, "spec"), core_v1.ServiceSpec),
        (_obj(SERVICE, "spec", "ports"), core_v1.ServicePort),
        (_obj(NODE), core_v1.Node),
        (_obj(NODE, "spec"), core_v1.NodeSpec),
    ],
    ids=lambda v: getattr(v, "__name__", ""),
)
def test_every_field_of_the_real_v1_type_is_read_or_ignored(shape: Obj, model: type) -> None:
    """Against lightkube-models' Kubernetes 1.37 types: nothing kubectl prints is unknown."""
    assert _api_fields(model) <= set(shape.fields) | shape.ignored
    assert not set(shape.fields) & shape.ignored


def test_istio_kinds_accept_status_and_server_metadata() -> None:
    assert "status" in VIRTUAL_SERVICE.ignored
    assert _obj(VIRTUAL_SERVICE, "metadata") is METADATA
