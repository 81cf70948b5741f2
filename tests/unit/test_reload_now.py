"""``ConfigWatcher.reload_now``: the file source publishes a pod the CNI path just recorded
at once, not at its next poll."""

from __future__ import annotations

import asyncio
from pathlib import Path

from nodeagent.control.files import ConfigWatcher, LoadedConfig
from nodeagent.control.runtime import load_runtimes, set_runtime
from nodeagent.model.objects import PodRuntime

POD = """\
apiVersion: v1
kind: Pod
metadata: {name: web, namespace: shop}
spec: {nodeName: n1, containers: [{name: main, image: web}]}
"""

RT = PodRuntime(key="shop/web", ip="10.1.0.7", node="n1", netns="/var/run/netns/web")


def test_reload_now_publishes_the_recorded_runtime_before_returning(tmp_path: Path) -> None:
    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / "mesh.yaml").write_text(POD)
    pods = tmp_path / "state" / "pods.json"
    published: list[LoadedConfig] = []
    watcher = ConfigWatcher(tmp_path / "cfg", pods, published.append, interval=3600)
    first = watcher.load_once()
    assert first.snapshot.runtimes == {}

    async def scenario() -> tuple[LoadedConfig | None, LoadedConfig | None]:
        assert set_runtime(pods, RT.key, RT) is None
        added = await watcher.reload_now()
        (tmp_path / "cfg" / "mesh.yaml").write_text("kind: [")
        rejected = await watcher.reload_now()
        return added, rejected

    added, rejected = asyncio.run(scenario())
    assert added is not None and published == [added]
    assert added.snapshot.runtimes["shop/web"] == RT
    assert added.snapshot.pod_by_key["shop/web"].pod_ip == "10.1.0.7"
    assert rejected is None and "invalid YAML" in watcher.last_error
    assert watcher.status(added.snapshot.version).last_error


def test_a_bad_edit_does_not_hold_back_pod_runtimes(tmp_path: Path) -> None:
    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / "mesh.yaml").write_text(POD)
    pods = tmp_path / "pods.json"
    published: list[LoadedConfig] = []
    watcher = ConfigWatcher(tmp_path / "cfg", pods, published.append, interval=3600)
    first = watcher.load_once()
    (tmp_path / "cfg" / "broken.yaml").write_text("kind: [")
    set_runtime(pods, RT.key, RT)
    loaded = asyncio.run(watcher.reload_now())
    # the last good objects, with the pod placed: the error is still reported
    assert loaded is not None and published == [loaded]
    assert loaded.snapshot.version == first.snapshot.version + 1
    assert loaded.snapshot.runtimes == {RT.key: RT}
    assert loaded.objects == first.objects
    assert "broken.yaml" in watcher.status(loaded.snapshot.version).last_error
    # nothing new in the runtime file: nothing to publish
    assert asyncio.run(watcher.reload_now()) is None


def test_set_runtime_replaces_and_drops(tmp_path: Path) -> None:
    path = tmp_path / "pods.json"
    moved = PodRuntime(key=RT.key, ip="10.1.0.8", node="n1", netns="/var/run/netns/web2")
    assert set_runtime(path, RT.key, RT) is None
    assert set_runtime(path, RT.key, moved) == RT
    assert load_runtimes(path) == {RT.key: moved}
    assert set_runtime(path, RT.key, None) == moved
    assert set_runtime(path, RT.key, None) is None
    assert load_runtimes(path) == {}
