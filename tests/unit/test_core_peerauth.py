"""PeerAuthentication precedence, table-driven, with policies parsed from YAML."""

from __future__ import annotations

from pathlib import Path

import pytest

from nodeagent.control.files import load_directory
from nodeagent.core.peerauth import effective_mtls
from nodeagent.errors import ConfigErrors
from nodeagent.model.security import MtlsMode

PODS = """
apiVersion: v1
kind: Pod
metadata: {name: web, namespace: shop, labels: {app: web}}
spec: {nodeName: n1, containers: [{name: c, command: [x]}]}
---
apiVersion: v1
kind: Pod
metadata: {name: db, namespace: shop, labels: {app: db}}
spec: {nodeName: n1, containers: [{name: c, command: [x]}]}
---
apiVersion: v1
kind: Pod
metadata: {name: other, namespace: blog, labels: {app: web}}
spec: {nodeName: n1, containers: [{name: c, command: [x]}]}
"""


def pa(name: str, ns: str, mode: str, selector: str = "", ports: str = "") -> str:
    spec = f"  mtls: {{mode: {mode}}}\n"
    if selector:
        spec += f"  selector: {{matchLabels: {{app: {selector}}}}}\n"
    if ports:
        spec += f"  portLevelMtls: {{{ports}}}\n"
    return (
        f"---\napiVersion: security.istio.io/v1\nkind: PeerAuthentication\n"
        f"metadata: {{name: {name}, namespace: {ns}}}\nspec:\n{spec}"
    )


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
    tmp_path: Path, policies: str, pod: str, port: int, mode: MtlsMode, policy: str
) -> None:
    (tmp_path / "m.yaml").write_text(PODS + policies)
    snap = load_directory(tmp_path).snapshot
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
def test_bad_policies_are_named(tmp_path: Path, policy: str, error: str) -> None:
    (tmp_path / "m.yaml").write_text(PODS + policy)
    with pytest.raises(ConfigErrors) as info:
        load_directory(tmp_path)
    assert error in str(info.value)
