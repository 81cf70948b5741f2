"""The Kubernetes API source with Istio's VM kinds and MeshConfig, the real lightkube
client against the test API server: WorkloadEntries and ServiceEntries are listed and
watched like VirtualServices, and only the ``istio`` ConfigMap of the root namespace is
read (one namespace, one name: what the agent's Role allows), live."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from kubeapi import KubeApiServer
from kubeobjects import namespace, node, service
from test_kube_source import NODE, api, kubeconfig, running, server

__all__ = ["api", "kubeconfig", "server"]  # the fixtures, shared with test_kube_source


def config_map(name: str, ns: str, mode: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": name, "namespace": ns},
        "data": {"mesh": f"outboundTrafficPolicy:\n  mode: {mode}\n"},
    }


VM = {
    "apiVersion": "networking.istio.io/v1",
    "kind": "WorkloadEntry",
    "metadata": {
        "name": "web-vm",
        "namespace": "default",
        "annotations": {"nodeagent.io/node": "vm-1"},
    },
    "spec": {
        "address": "10.10.0.7",
        "ports": {"http": 8081},
        "labels": {"app": "web"},
        "serviceAccount": "web",
    },
}
GITHUB = {
    "apiVersion": "networking.istio.io/v1",
    "kind": "ServiceEntry",
    "metadata": {"name": "github", "namespace": "default"},
    "spec": {
        "hosts": ["api.github.com"],
        "ports": [{"number": 443, "name": "https", "protocol": "TLS"}],
        "resolution": "DNS",
    },
}


def test_vm_kinds_and_the_mesh_config_come_from_the_api(
    api: KubeApiServer, kubeconfig: Path
) -> None:
    api.create(node(NODE))
    api.create(namespace("istio-system", ambient=False))
    api.create(config_map("istio", "istio-system", "REGISTRY_ONLY"))
    api.create(config_map("istio", "default", "ALLOW_ANY"))  # not the root namespace's
    api.create(config_map("istio-sidecar-injector", "istio-system", "ALLOW_ANY"))
    api.create(service("web"))
    api.create(VM)
    api.create(GITHUB)

    async def main() -> None:
        async with running(kubeconfig) as r:
            snap = r.first.snapshot
            assert snap.registry_only
            web = snap.service_by_key["default/web"]
            (ep,) = snap.endpoints(web, web.ports[0])
            assert (ep.ip, ep.port, ep.pod.kind) == ("10.10.0.7", 8081, "WorkloadEntry")
            assert [w.key for w in snap.workload_entries_on_node("vm-1")] == ["default/web-vm"]
            host = snap.service_for_host("api.github.com")
            assert host is not None and host.cluster_ip is not None
            assert host.cluster_ip.startswith("240.240.")
            watches = r.status()["watches"]
            assert watches["v1 ConfigMap in namespace istio-system"].objects == 1
            assert watches["networking.istio.io/v1 WorkloadEntry"].objects == 1
            assert watches["networking.istio.io/v1 ServiceEntry"].objects == 1
            assert "networking.istio.io/v1 WorkloadGroup" in watches

            cm = api.get(config_map("istio", "istio-system", ""))
            cm["data"]["mesh"] = "outboundTrafficPolicy: {mode: ALLOW_ANY}\n"
            api.replace(cm)
            await r.until(lambda s: not s.registry_only, timeout=2.0)
            api.delete(VM)
            snap = await r.until(lambda s: not s.workload_entries, timeout=2.0)
            assert snap.endpoints(web, web.ports[0]) == ()

    asyncio.run(main())
