"""The Kubernetes API source (``control/kube.py``) with the real lightkube client against
the test API server (``tests/kubeapi.py``, HTTPS): first list, watch, resume after the
server restarts, relist on 410, bookmarks, malformed and unserved objects, readiness."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from kubeapi import KubeApiServer, ResourceType
from kubeobjects import namespace, node, pod, service, virtual_service

from nodeagent.control.files import LoadedConfig
from nodeagent.control.kube import KubeSource
from nodeagent.control.kubeclient import KubeClient, credentials
from nodeagent.control.runtime import write_runtimes
from nodeagent.core.telemetry import resolve
from nodeagent.model.objects import PodRuntime
from nodeagent.model.snapshot import MeshSnapshot

NODE = "node1"


@pytest.fixture(scope="module")
def server() -> Iterator[KubeApiServer]:
    with KubeApiServer(endpointslices=True) as api:
        yield api


@pytest.fixture
def api(server: KubeApiServer) -> Iterator[KubeApiServer]:
    """The shared server, running and emptied."""
    server.start()
    with server.store.lock:
        for key, obj in list(server.store.objects.items()):
            if key in server.store.objects:  # (a Service's slice goes with it)
                server.store.delete(obj)
    server.create(namespace("default"))  # in the mesh, as Istio ambient's label says
    yield server
    server.start()


@pytest.fixture
def kubeconfig(api: KubeApiServer, tmp_path: Path) -> Path:
    return api.kubeconfig(tmp_path / "kubeconfig")


def cluster(api: KubeApiServer) -> None:
    """Two nodes; web: a pod on each; db: one remote pod; a VirtualService for web (the
    server's EndpointSlice controller keeps a slice per Service)."""
    api.create(node(NODE, zone="zone-a"))
    api.create(node("node2", zone="zone-b"))
    web1 = pod("web-1", NODE, "10.244.1.5")
    web2 = pod("web-2", "node2", "10.244.2.5")
    db1 = pod("db-1", "node2", "10.244.2.9", app="db", sa="db")
    for p in (web1, web2, db1):
        api.create(p)
    api.create(service("web"))
    api.create(service("db", app="db", port=5432))
    api.create(virtual_service("web", "web.default.svc.cluster.local"))


@dataclass
class Running:
    source: KubeSource
    first: LoadedConfig
    updates: list[LoadedConfig] = field(default_factory=list)

    @property
    def snapshot(self) -> MeshSnapshot:
        return self.updates[-1].snapshot if self.updates else self.first.snapshot

    async def until(
        self, check: Callable[[MeshSnapshot], bool], timeout: float = 5.0
    ) -> MeshSnapshot:
        """The first snapshot ``check`` accepts, waiting up to ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while not check(self.snapshot):
            if time.monotonic() > deadline:
                raise AssertionError(f"no such snapshot within {timeout}s: {self.status()}")
            await asyncio.sleep(0.01)
        return self.snapshot

    async def settle(self, quiet: float = 0.3) -> None:
        """Wait until no snapshot has come for ``quiet`` seconds."""
        seen = -1
        while seen != len(self.updates):
            seen = len(self.updates)
            await asyncio.sleep(quiet)

    def status(self) -> dict[str, Any]:
        st = self.source.status(self.snapshot.version)
        return {
            "watches": {w.kind: w for w in st.watches},
            "warnings": st.warnings,
            "last_error": st.last_error,
        }

    def watch(self, kind: str) -> Any:
        return self.status()["watches"][kind]


@asynccontextmanager
async def running(
    kubeconfig: Path, *, pods_file: Path | None = None, timeout_seconds: int = 300
) -> AsyncIterator[Running]:
    client = KubeClient(credentials(kubeconfig))
    updates: list[LoadedConfig] = []
    source = KubeSource(
        client,
        node=NODE,
        pods_file=pods_file,
        on_update=updates.append,
        interval=0.05,
        timeout_seconds=timeout_seconds,
    )
    first = await source.start()
    task = asyncio.create_task(source.run())
    try:
        yield Running(source, first, updates)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


def service_port(snap: MeshSnapshot, key: str) -> int:
    return snap.service_by_key[key].ports[0].port


def test_first_list_builds_the_snapshot(api: KubeApiServer, kubeconfig: Path) -> None:
    cluster(api)

    async def main() -> None:
        async with running(kubeconfig) as r:
            snap = r.first.snapshot
            assert snap.version == 1
            assert sorted(p.key for p in snap.pods) == [
                "default/db-1",
                "default/web-1",
                "default/web-2",
            ]
            assert [p.key for p in snap.pods_on_node(NODE)] == ["default/web-1"]
            web = snap.service_by_key["default/web"]
            assert web.cluster_ip is not None and web.cluster_ip.startswith("10.9")
            eps = snap.endpoints(web, web.ports[0])
            assert sorted(str(e) for e in eps) == [
                "10.244.1.5:8080 (default/web-1)",
                "10.244.2.5:8080 (default/web-2)",
            ]
            assert snap.pod_by_ip["10.244.2.9"].service_account == "db"
            assert sorted(n.name for n in snap.node_objects) == [NODE, "node2"]
            # every node watched, so every pod has its node's zone (locality failover)
            assert snap.pod_by_key["default/web-2"].locality == ("region-1", "zone-b", "")
            assert [vs.key for vs in snap.virtual_services] == ["default/web"]
            assert all("managedFields" not in o["metadata"] for o in r.first.objects)
            await r.until(lambda _s: r.watch("v1 Pod").state == "watching")
            watches = r.status()["watches"]
            assert watches["v1 Pod"].objects == 3
            assert watches["v1 Service"].resource_version != ""
            assert "discovery.k8s.io/v1 EndpointSlice" in watches

    asyncio.run(main())


def test_a_service_edit_reaches_a_snapshot_within_2s(api: KubeApiServer, kubeconfig: Path) -> None:
    cluster(api)

    async def main() -> None:
        async with running(kubeconfig) as r:
            svc = api.get(service("web"))
            svc["spec"]["ports"][0]["port"] = 8000
            t0 = time.monotonic()
            api.replace(svc)
            snap = await r.until(lambda s: service_port(s, "default/web") == 8000, timeout=2.0)
            elapsed = time.monotonic() - t0
            assert elapsed < 2.0
            assert snap.version == 2  # one edit, one snapshot
            assert 0 < r.watch("v1 Service").lag_seconds < 2.0

    asyncio.run(main())


def test_an_api_server_restart_loses_no_update(api: KubeApiServer, kubeconfig: Path) -> None:
    cluster(api)

    async def main() -> None:
        async with running(kubeconfig) as r:
            api.stop()
            await r.until(lambda _s: r.watch("v1 Service").state == "backoff")
            svc = api.get(service("web"))
            svc["spec"]["ports"][0]["port"] = 9999
            api.replace(svc)  # while the server is away
            assert service_port(r.snapshot, "default/web") == 80  # the last snapshot serves
            api.start()
            await r.until(lambda s: service_port(s, "default/web") == 9999, timeout=10.0)
            w = r.watch("v1 Service")
            assert w.relists == 0  # resumed from its resourceVersion, no relist
            assert w.state == "watching"

    asyncio.run(main())


def test_410_gone_relists(api: KubeApiServer, kubeconfig: Path) -> None:
    cluster(api)

    async def main() -> None:
        async with running(kubeconfig) as r:
            api.stop()
            api.delete(service("db", app="db"))  # gone while no watch runs
            api.expire_history()  # and the history no longer reaches our resourceVersion
            api.start()
            snap = await r.until(lambda s: "default/db" not in s.service_by_key, timeout=10.0)
            assert "default/web" in snap.service_by_key
            assert r.watch("v1 Service").relists == 1

    asyncio.run(main())


def test_an_error_event_410_relists(api: KubeApiServer, kubeconfig: Path) -> None:
    cluster(api)

    async def main() -> None:
        async with running(kubeconfig) as r:
            await r.until(lambda _s: api.open_watches("services") == 1)
            gone = {
                "type": "ERROR",
                "object": {
                    "kind": "Status",
                    "apiVersion": "v1",
                    "status": "Failure",
                    "message": "too old resource version: 5 (9)",
                    "reason": "Expired",
                    "code": 410,
                },
            }
            api.inject_watch_line("services", gone)
            await r.until(lambda _s: r.watch("v1 Service").relists == 1)
            await r.until(lambda _s: r.watch("v1 Service").state == "watching")

    asyncio.run(main())


def test_a_bookmark_advances_the_resource_version(api: KubeApiServer, kubeconfig: Path) -> None:
    cluster(api)

    async def main() -> None:
        async with running(kubeconfig) as r:
            await r.until(lambda _s: api.open_watches("services") == 1)
            before = r.watch("v1 Service").resource_version
            api.create(pod("other", "node3", "10.244.3.1", app="other"))  # another kind moves rv
            api.bookmark_now()
            target = str(api.resource_version)
            await r.until(lambda _s: r.watch("v1 Service").resource_version == target)
            assert target != before
            # history compacted up to now: only a watch resuming from the bookmark's
            # resourceVersion goes on without a relist
            api.compact()
            watches, lists = api.requests["watch", "services"], api.requests["list", "services"]
            api.drop_watches()
            await r.until(lambda _s: api.requests["watch", "services"] > watches)
            await r.until(lambda _s: api.open_watches("services") == 1)
            await asyncio.sleep(0.2)
            assert api.requests["list", "services"] == lists
            assert r.watch("v1 Service").relists == 0

    asyncio.run(main())


def test_a_malformed_object_is_skipped_and_the_rest_serves(
    api: KubeApiServer, kubeconfig: Path
) -> None:
    cluster(api)

    async def main() -> None:
        async with running(kubeconfig) as r:
            api.create(virtual_service("bad", "db.default.svc.cluster.local", timeout=5))
            svc = api.get(service("web"))
            svc["spec"]["ports"][0]["port"] = 8000
            api.replace(svc)
            snap = await r.until(lambda s: service_port(s, "default/web") == 8000)
            assert [vs.key for vs in snap.virtual_services] == ["default/web"]
            warnings = r.status()["warnings"]
            bad = [w for w in warnings if "VirtualService default/bad" in w]
            assert len(bad) == 1
            assert "spec.http[0].timeout" in bad[0] and "skipped" in bad[0]

            # a good object turned bad: its last good version keeps serving
            vs = api.get(virtual_service("web", "web.default.svc.cluster.local"))
            vs["spec"]["http"][0]["timeout"] = ["1s"]
            api.replace(vs)
            await r.until(lambda _s: any("default/web" in w for w in r.status()["warnings"]))
            assert [vs.key for vs in r.snapshot.virtual_services] == ["default/web"]
            assert any(
                "previous version keeps serving" in w and "VirtualService default/web" in w
                for w in r.status()["warnings"]
            )

    asyncio.run(main())


def test_a_malformed_watch_event_does_not_stop_the_watch(
    api: KubeApiServer, kubeconfig: Path
) -> None:
    cluster(api)

    async def main() -> None:
        async with running(kubeconfig) as r:
            await r.until(lambda _s: api.open_watches("virtualservices") == 1)
            broken = virtual_service("ghost", "ghost.default.svc.cluster.local")
            broken["metadata"]["resourceVersion"] = str(api.resource_version)
            broken["spec"]["hosts"] = "ghost"  # a string where a list belongs
            api.inject_watch_line("virtualservices", {"type": "ADDED", "object": broken})
            await r.until(lambda _s: any("default/ghost" in w for w in r.status()["warnings"]))
            api.create(virtual_service("db", "db.default.svc.cluster.local"))
            snap = await r.until(lambda s: len(s.virtual_services) == 2)
            assert sorted(vs.key for vs in snap.virtual_services) == ["default/db", "default/web"]

    asyncio.run(main())


def test_hostile_watch_lines_are_skipped_and_the_watch_goes_on(
    api: KubeApiServer, kubeconfig: Path
) -> None:
    """Lines Python's json cannot read (an integer past 4,300 digits, nesting past its
    recursion limit, no JSON at all) are skipped with a warning on the same watch: not a
    watch restarted, which a real API server would answer with the same line again."""
    cluster(api)

    async def main() -> None:
        async with running(kubeconfig) as r:
            await r.until(lambda _s: api.open_watches("virtualservices") == 1)
            watches = api.requests["watch", "virtualservices"]
            vs = virtual_service("ghost", "ghost.default.svc.cluster.local")
            vs["metadata"]["resourceVersion"] = str(api.resource_version)
            huge = json.dumps({"type": "ADDED", "object": vs}).replace(
                '"ghost"', '"ghost", "retries": ' + "9" * 5000, 1
            )
            deep = '{"type": "ADDED", "object": ' + "[" * 100_000 + "]" * 100_000 + "}"
            for line in (huge.encode(), deep.encode(), b"{not json", b'["an", "array"]'):
                api.inject_watch_line("virtualservices", line)
            api.create(virtual_service("db", "db.default.svc.cluster.local"))
            snap = await r.until(lambda s: len(s.virtual_services) == 2)
            assert sorted(vs.key for vs in snap.virtual_services) == ["default/db", "default/web"]
            skipped = [w for w in r.status()["warnings"] if "malformed watch event" in w]
            assert len(skipped) == 1 and "4 malformed watch event(s) skipped" in skipped[0]
            assert len(skipped[0]) < 500
            assert api.requests["watch", "virtualservices"] == watches  # never restarted
            assert r.watch("networking.istio.io/v1 VirtualService").state == "watching"

    asyncio.run(main())


def test_an_object_nested_too_deep_is_skipped_naming_the_field(
    api: KubeApiServer, kubeconfig: Path
) -> None:
    """JSON Python reads but no object needs: nested 150 deep (in metadata the mesh
    ignores) or an integer beyond 64 bits. Left out with a warning naming the field."""
    cluster(api)

    async def main() -> None:
        async with running(kubeconfig) as r:
            deep: dict[str, Any] = {}
            inner = deep
            for _ in range(150):
                inner["k"] = {}
                inner = inner["k"]
            odd = pod("odd-1", "node2", "10.244.2.30", app="odd")
            odd["metadata"]["ownerReferences"] = [deep]
            api.create(odd)
            big = virtual_service("big", "db.default.svc.cluster.local")
            big["spec"]["http"][0]["retries"] = {"attempts": 2**70}
            api.create(big)
            api.create(service("late", app="late"))
            await r.until(lambda s: "default/late" in s.service_by_key)
            warnings = r.status()["warnings"]
            assert any(
                "Pod default/odd-1: metadata.ownerReferences[0].k.k" in w
                and "nest deeper than 100" in w
                for w in warnings
            ), warnings
            assert any(
                "VirtualService default/big: spec.http[0].retries.attempts: an integer "
                "beyond 64 bits" in w
                for w in warnings
            ), warnings
            assert "default/odd-1" not in r.snapshot.pod_by_key

    asyncio.run(main())


def test_an_unserved_crd_is_a_warning(api: KubeApiServer, kubeconfig: Path) -> None:
    cluster(api)  # the test server has no LocalRateLimit CRD

    async def main() -> None:
        async with running(kubeconfig) as r:
            w = r.watch("nodeagent.io/v1alpha1 LocalRateLimit")
            assert w.state == "unserved"
            assert any("LocalRateLimit" in x and "not serve" in x for x in r.status()["warnings"])
            assert r.first.snapshot.services  # the rest serves

    asyncio.run(main())


def test_a_clash_across_objects_leaves_one_out(api: KubeApiServer, kubeconfig: Path) -> None:
    cluster(api)

    async def main() -> None:
        async with running(kubeconfig) as r:
            api.create(virtual_service("web-too", "web.default.svc.cluster.local"))
            await r.until(lambda _s: any("web-too" in w for w in r.status()["warnings"]))
            await r.settle(0.2)
            snap = r.snapshot
            assert [vs.key for vs in snap.virtual_services] == ["default/web"]
            assert r.status()["last_error"] == ""
            api.delete(virtual_service("web-too", "x"))
            await r.until(lambda _s: not any("web-too" in w for w in r.status()["warnings"]))

    asyncio.run(main())


def not_ready(api: KubeApiServer, name: str) -> None:
    """The pod's readiness probe fails: kubelet marks it not Ready (and the
    EndpointSlice controller its endpoint)."""
    p = api.get(pod(name, NODE, None))
    for c in p["status"]["conditions"]:
        if c["type"] in ("Ready", "ContainersReady"):
            c["status"] = "False"
    api.replace(p)


def test_readiness_decides_remote_endpoints_not_local_pods(
    api: KubeApiServer, kubeconfig: Path
) -> None:
    cluster(api)

    async def main() -> None:
        async with running(kubeconfig) as r:
            not_ready(api, "web-1")
            not_ready(api, "web-2")
            snap = await r.until(lambda s: "default/web-2" not in s.pod_by_key)
            assert "default/web-1" in snap.pod_by_key  # local: captured while not ready
            assert "default/db-1" in snap.pod_by_key
            # new pods, no IP yet: the local one is captured (its IP from the runtime)
            api.create(pod("web-3", NODE, None, phase="Pending", ready=False))
            api.create(pod("web-4", "node2", None, phase="Pending", ready=False))
            snap = await r.until(lambda s: "default/web-3" in s.pod_by_key)
            assert "default/web-4" not in snap.pod_by_key
            assert snap.pod_by_key["default/web-3"].pod_ip is None

    asyncio.run(main())


def test_reload_now_reads_the_pod_runtime_file(
    api: KubeApiServer, kubeconfig: Path, tmp_path: Path
) -> None:
    cluster(api)
    api.create(pod("web-3", NODE, None, phase="Pending", ready=False))
    pods_file = tmp_path / "pods.json"

    async def main() -> None:
        async with running(kubeconfig, pods_file=pods_file) as r:
            assert r.first.snapshot.pod_by_key["default/web-3"].pod_ip is None
            rt = PodRuntime("default/web-3", "10.244.1.7", NODE, "/var/run/netns/w3")
            write_runtimes(pods_file, {rt.key: rt})
            loaded = await r.source.reload_now()
            assert loaded is not None
            assert loaded.snapshot.pod_by_key["default/web-3"].pod_ip == "10.244.1.7"
            assert r.updates[-1] is loaded

    asyncio.run(main())


def test_a_relist_of_many_objects_builds_one_snapshot(api: KubeApiServer, kubeconfig: Path) -> None:
    cluster(api)
    for i in range(1000):  # two pages of a list (500 each)
        ip = f"10.245.{i // 250}.{i % 250 + 1}"
        api.create(pod(f"many-{i}", "node2", ip, app="many", ns="batch"))

    async def main() -> None:
        async with running(kubeconfig) as r:
            assert len(r.first.snapshot.pods) == 1003
            pages = [x for x in api.request_log if x.target.startswith("/api/v1/pods?")]
            assert any("continue" in x.query for x in pages)  # listed in pages
            api.stop()
            api.create(pod("many-new", "node2", "10.245.9.9", app="many", ns="batch"))
            api.expire_history()
            api.start()
            snap = await r.until(lambda s: "batch/many-new" in s.pod_by_key, timeout=10.0)
            await r.settle()
            assert len(r.updates) == 1  # the relist of 1001 pods: one snapshot
            assert snap.version == 2 and len(snap.pods) == 1004
            assert r.watch("v1 Pod").relists == 1

    asyncio.run(main())


def test_a_watch_the_server_ends_resumes_without_a_relist(
    api: KubeApiServer, kubeconfig: Path
) -> None:
    cluster(api)

    async def main() -> None:
        async with running(kubeconfig, timeout_seconds=1) as r:
            watches, lists = api.requests["watch", "services"], api.requests["list", "services"]
            await asyncio.sleep(2.5)  # the server ends each watch after 1 s
            assert api.requests["watch", "services"] >= watches + 2
            assert api.requests["list", "services"] == lists
            assert r.watch("v1 Service").relists == 0
            svc = api.get(service("web"))
            svc["spec"]["ports"][0]["port"] = 8000
            api.replace(svc)
            await r.until(lambda s: service_port(s, "default/web") == 8000, timeout=2.0)

    asyncio.run(main())


def test_a_service_without_serving_pods_still_serves(api: KubeApiServer, kubeconfig: Path) -> None:
    cluster(api)

    async def main() -> None:
        async with running(kubeconfig) as r:
            api.create(service("idle", app="scaled-to-zero"))
            snap = await r.until(lambda s: "default/idle" in s.service_by_key)
            idle = snap.service_by_key["default/idle"]
            assert snap.endpoints(idle, idle.ports[0]) == ()
            assert any("Service default/idle" in w for w in r.status()["warnings"])

    asyncio.run(main())


LOCAL_RATE_LIMITS = ResourceType(
    "nodeagent.io", ("v1alpha1",), "localratelimits", "LocalRateLimit", True
)


def test_a_crd_removed_while_watched_empties_its_kind(api: KubeApiServer, kubeconfig: Path) -> None:
    cluster(api)
    api.add_resource(LOCAL_RATE_LIMITS)  # the CRD installed
    try:
        api.create(
            {
                "apiVersion": "nodeagent.io/v1alpha1",
                "kind": "LocalRateLimit",
                "metadata": {"name": "web", "namespace": "default"},
                "spec": {
                    "selector": {"matchLabels": {"app": "web"}},
                    "tcp": {
                        "tokenBucket": {"maxTokens": 10, "tokensPerFill": 10, "fillInterval": "1s"}
                    },
                },
            }
        )

        async def main() -> None:
            async with running(kubeconfig) as r:
                assert [x.key for x in r.first.snapshot.local_rate_limits] == ["default/web"]
                kind = "nodeagent.io/v1alpha1 LocalRateLimit"
                await r.until(lambda _s: r.watch(kind).state == "watching")
                with api.store.lock:  # the CRD deleted
                    del api.store.by_path[("nodeagent.io", "v1alpha1", "localratelimits")]
                    del api.store.by_kind[("nodeagent.io/v1alpha1", "LocalRateLimit")]
                api.drop_watches()
                snap = await r.until(lambda s: not s.local_rate_limits)
                assert r.watch(kind).state == "unserved"
                assert snap.services  # the rest serves

        asyncio.run(main())
    finally:
        with api.store.lock:
            for key in [k for k in api.store.objects if k[1] == "localratelimits"]:
                del api.store.objects[key]
            api.store.by_path.pop(("nodeagent.io", "v1alpha1", "localratelimits"), None)
            api.store.by_kind.pop(("nodeagent.io/v1alpha1", "LocalRateLimit"), None)


def test_namespaces_join_the_mesh_by_istios_label(api: KubeApiServer, kubeconfig: Path) -> None:
    api.create(node(NODE))
    api.create(namespace("legacy", ambient=False))  # as kube-system is: not in the mesh
    api.create(pod("old", NODE, "10.244.1.7", ns="legacy"))
    api.create(pod("one", NODE, "10.244.1.8", ns="legacy"))
    api.patch(pod("one", NODE, None, ns="legacy"),
              {"metadata": {"labels": {"istio.io/dataplane-mode": "ambient"}}})  # fmt: skip
    api.create(pod("web-1", NODE, "10.244.1.5"))
    api.create(pod("out", NODE, "10.244.1.6"))
    api.patch(pod("out", NODE, None), {"metadata": {"labels": {"istio.io/dataplane-mode": "none"}}})

    def meshed(snap: MeshSnapshot) -> set[str]:
        return {p.key for p in snap.pods_on_node(NODE) if p.in_mesh}

    async def main() -> None:
        async with running(kubeconfig) as r:
            # on this node all four are known (endpoints); only the enrolled are captured
            assert {p.key for p in r.snapshot.pods_on_node(NODE)} == {
                "legacy/old", "legacy/one", "default/web-1", "default/out",
            }  # fmt: skip
            assert meshed(r.snapshot) == {"legacy/one", "default/web-1"}
            api.patch(namespace("legacy"),
                      {"metadata": {"labels": {"istio.io/dataplane-mode": "ambient"}}})  # fmt: skip
            await r.until(lambda s: "legacy/old" in meshed(s), timeout=2.0)
            api.patch(namespace("default"),
                      {"metadata": {"labels": {"istio.io/dataplane-mode": None}}})  # fmt: skip
            snap = await r.until(lambda s: "default/web-1" not in meshed(s), timeout=2.0)
            assert meshed(snap) == {"legacy/old", "legacy/one"}
            assert r.watch("v1 Namespace").state == "watching"

    asyncio.run(main())


def test_a_telemetry_from_the_api_is_applied_and_hot_reloaded(
    api: KubeApiServer, kubeconfig: Path
) -> None:
    cluster(api)
    tel = {
        "apiVersion": "telemetry.istio.io/v1",
        "kind": "Telemetry",
        "metadata": {"name": "mesh-default", "namespace": "istio-system"},
        "spec": {"tracing": [{"randomSamplingPercentage": 100}]},
    }

    async def main() -> None:
        async with running(kubeconfig) as r:
            web = r.first.snapshot.pod_by_key["default/web-1"]
            assert resolve(r.first.snapshot, web).sampling == 1.0  # Istio's default
            api.create(tel)
            snap = await r.until(lambda s: resolve(s, web).sampling == 100.0, timeout=2.0)
            assert resolve(snap, web).policies == ("istio-system/mesh-default",)
            current = api.get(tel)
            current["spec"] = {"accessLogging": [{"disabled": True}]}
            api.replace(current)
            snap = await r.until(lambda s: not resolve(s, web).access_log, timeout=2.0)
            assert resolve(snap, web).sampling == 1.0

    asyncio.run(main())
