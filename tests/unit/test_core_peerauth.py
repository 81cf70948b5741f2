"""PeerAuthentication precedence, table-driven, with policies parsed from YAML."""

from __future__ import annotations

import pytest
from meshyaml import MeshFiles, object_yaml, pod_yaml

from nodeagent.core.peerauth import effective_mtls
from nodeagent.model.security import MtlsMode

PODS = (
    pod_yaml("web", "shop", app="web")
    + pod_yaml("db", "shop", app="db")
    + pod_yaml("other", "blog", app="web")
)


def pa(name: str, ns: str, mode: str, selector: str = "", ports: str = "") -> str:
    spec = f"mtls: {{mode: {mode}}}\n"
    if selector:
        spec += f"selector: {{matchLabels: {{app: {selector}}}}}\n"
    if ports:
        spec += f"portLevelMtls: {{{ports}}}\n"
    return object_yaml("security.istio.io/v1", "PeerAuthentication", name, ns, spec)


MESH_STRICT = pa("default", "istio-system", "STRICT")
SHOP_PERMISSIVE = pa("default", "shop", "PERMISSIVE")
WEB_DISABLE_8080 = pa("web", "shop", "UNSET", selector="web", ports="8080: {mode: DISABLE}")


@pytest.mark.parametrize(
    ("policies", "pod", "port", "mode", "policy"),
    [
        ("", "shop/web", 80, MtlsMode.PERMISSIVE, "default"),
        (MESH_STRICT, "shop/web", 80, MtlsMode.STRICT, "istio-system/default"),
        (MESH_STRICT + SHOP_PERMISSIVE, "shop/web", 80, MtlsMode.PERMISSIVE, "shop/default"),
        (MESH_STRICT + SHOP_PERMISSIVE, "blog/other", 80, MtlsMode.STRICT, "istio-system/default"),
        # port-level wins for that port only; UNSET inherits the namespace's mode otherwise
        (
            MESH_STRICT + SHOP_PERMISSIVE + WEB_DISABLE_8080,
            "shop/web",
            8080,
            MtlsMode.DISABLE,
            "shop/web",
        ),
        (
            MESH_STRICT + SHOP_PERMISSIVE + WEB_DISABLE_8080,
            "shop/web",
            9090,
            MtlsMode.PERMISSIVE,
            "shop/default",
        ),
        (MESH_STRICT + WEB_DISABLE_8080, "shop/db", 8080, MtlsMode.STRICT, "istio-system/default"),
    ],
)
def test_precedence(
    mesh: MeshFiles, policies: str, pod: str, port: int, mode: MtlsMode, policy: str
) -> None:
    snap = mesh.load(PODS, policies)
    d = effective_mtls(snap, snap.pod_by_key[pod], port)
    assert (d.mode, d.policy) == (mode, policy)
    assert d.accepts_plaintext is (mode is not MtlsMode.STRICT)


@pytest.mark.parametrize(
    ("policy", "error"),
    [
        (pa("x", "shop", "STRICTEST"), "spec.mtls.mode: unknown mode 'STRICTEST'"),
        (
            pa("x", "shop", "STRICT", ports="8080: {mode: DISABLE}"),
            "portLevelMtls needs a workload selector",
        ),
        (
            pa("x", "shop", "STRICT", selector="web", ports="http: {mode: DISABLE}"),
            "spec.portLevelMtls.http: 'http' is not a port number",
        ),
        (
            SHOP_PERMISSIVE + pa("y", "shop", "STRICT"),
            "already has a namespace-wide PeerAuthentication shop/default",
        ),
    ],
)
def test_bad_policies_are_named(mesh: MeshFiles, policy: str, error: str) -> None:
    errors = mesh.errors(PODS, policy)
    assert any(error in str(e) for e in errors), errors
