"""The CNI plugin's calls through the real node agent socket to the agent's ``CniPods``,
over a real file config source, without root: only the capture is a stand-in (it
reports a pod ``ready`` once the snapshot holds the pod and its runtime, as the proxy's
would; tests/e2e/test_cni.py runs the real one)."""

from __future__ import annotations

import asyncio
import io
import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import pytest
from test_admin import FakeView

from nodeagent.admin.server import start_admin_server
from nodeagent.cni import plugin
from nodeagent.control.cnipods import CniPods
from nodeagent.control.files import ConfigWatcher, LoadedConfig
from nodeagent.model.snapshot import MeshSnapshot
from nodeagent.model.status import AgentView

NODE = "node1"
CONFIG = """\
apiVersion: v1
kind: Pod
metadata: {name: web, namespace: shop}
spec: {nodeName: node1, containers: [{name: main, image: web}]}
---
apiVersion: v1
kind: Pod
metadata: {name: batch, namespace: shop, labels: {istio.io/dataplane-mode: none}}
spec: {nodeName: node1, containers: [{name: main, image: batch}]}
---
apiVersion: v1
kind: Pod
metadata: {name: away, namespace: shop}
spec: {nodeName: node2, containers: [{name: main, image: away}]}
---
apiVersion: v1
kind: Pod
metadata: {name: broken, namespace: shop}
spec: {nodeName: node1, containers: [{name: main, image: broken}]}
"""
PREV = {"cniVersion": "1.0.0", "ips": [{"address": "10.1.0.7/24"}]}


@dataclass
class StandInCapture:
    """Captures every local pod the snapshot holds with a runtime; ``broken`` fails."""

    snap: MeshSnapshot = field(default_factory=MeshSnapshot)
    states: dict[str, dict[str, Any]] = field(default_factory=dict)

    def on_update(self, loaded: LoadedConfig) -> None:
        self.snap = loaded.snapshot

    async def capture(self) -> None:
        self.states = {
            p.key: {
                "key": p.key,
                "netns": self.snap.runtimes[p.key].netns,
                "capture": "error: iptables-restore failed" if p.name == "broken" else "ready",
                "mode": "stand-in",
            }
            for p in self.snap.pods_on_node(NODE)
            if p.key in self.snap.runtimes
        }

    def pod_states(self) -> list[dict[str, Any]]:
        return list(self.states.values())


@dataclass
class Agent:
    socket: str
    pods_file: Path


@pytest.fixture
def agent(tmp_path: Path) -> Iterator[Agent]:
    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / "mesh.yaml").write_text(CONFIG)
    pods_file = tmp_path / "state" / "pods.json"
    cap = StandInCapture()
    watcher = ConfigWatcher(tmp_path / "cfg", pods_file, cap.on_update, interval=0.2)
    cap.on_update(watcher.load_once())
    sock = str(tmp_path / "a.sock")
    loop = asyncio.new_event_loop()
    ready = threading.Event()
    stop: asyncio.Event | None = None

    async def serve() -> None:
        nonlocal stop
        stop = asyncio.Event()
        cni = CniPods(
            NODE, pods_file, watcher.reload_now, lambda: cap.snap, cap.capture, cap.pod_states
        )
        # the read-only side is test_admin's; the CNI calls go to ``cni``
        server = await start_admin_server(cast(AgentView, FakeView()), sock, pods=cni)
        task = asyncio.create_task(watcher.run())
        ready.set()
        await stop.wait()
        task.cancel()
        await server.stop(0.1)

    thread = threading.Thread(target=lambda: loop.run_until_complete(serve()), daemon=True)
    thread.start()
    assert ready.wait(10)
    try:
        yield Agent(sock, pods_file)
    finally:
        assert stop is not None
        loop.call_soon_threadsafe(stop.set)
        thread.join(10)
        loop.close()


def call(a: Agent, command: str, pod: str, **conf: Any) -> tuple[int, dict[str, Any] | None]:
    environ = {
        "CNI_COMMAND": command,
        "CNI_CONTAINERID": "c1",
        "CNI_NETNS": f"/var/run/netns/{pod}",
        "CNI_IFNAME": "eth0",
        "CNI_ARGS": f"K8S_POD_NAMESPACE=shop;K8S_POD_NAME={pod};K8S_POD_UID=u-{pod}",
    }
    doc = {"cniVersion": "1.0.0", "name": "n", "type": "nodeagent-cni", "socket": a.socket}
    doc.update(conf)
    out = io.StringIO()
    rc = plugin.main(environ, io.BytesIO(json.dumps(doc).encode()), out)
    text = out.getvalue().strip()
    return rc, json.loads(text) if text else None


def runtimes(a: Agent) -> dict[str, Any]:
    if not a.pods_file.exists():
        return {}
    pods: dict[str, Any] = json.loads(a.pods_file.read_text())["pods"]
    return pods


def test_add_check_del_of_a_mesh_pod(agent: Agent) -> None:
    assert call(agent, "ADD", "web", prevResult=PREV) == (0, PREV)
    assert runtimes(agent)["shop/web"]["ip"] == "10.1.0.7"
    assert call(agent, "CHECK", "web", prevResult=PREV) == (0, None)
    assert call(agent, "DEL", "web") == (0, None)
    assert "shop/web" not in runtimes(agent)
    assert call(agent, "DEL", "web") == (0, None)
    rc, out = call(agent, "CHECK", "web", prevResult=PREV)
    assert rc == 1 and out is not None and out["code"] == 100
    assert "unknown: the agent holds no capture" in out["msg"]


def test_an_opted_out_pod_passes_untouched(agent: Agent) -> None:
    assert call(agent, "ADD", "batch", prevResult=PREV) == (0, PREV)
    assert runtimes(agent) == {}
    assert call(agent, "CHECK", "batch", prevResult=PREV) == (0, None)


@pytest.mark.parametrize(
    ("pod", "says"),
    [
        ("nowhere", "pod shop/nowhere is not in the agent's config after 0.5s (node node1)"),
        ("away", "pod shop/away is placed on node 'node2' in the config, but this agent"),
        ("broken", "pod shop/broken is not captured after 0.5s: error: iptables-restore"),
    ],
)
def test_add_fails_with_the_agents_reason(agent: Agent, pod: str, says: str) -> None:
    rc, out = call(agent, "ADD", pod, prevResult=PREV, timeout=0.5)
    assert rc == 1 and out is not None and out["code"] == 100, out
    assert says in out["msg"], out["msg"]
    assert agent.socket in out["details"]


def test_a_del_of_an_older_sandbox_keeps_the_new_one(agent: Agent) -> None:
    assert call(agent, "ADD", "web", prevResult=PREV)[0] == 0
    environ_netns = "/var/run/netns/old-web"
    doc = {"cniVersion": "1.0.0", "name": "n", "type": "nodeagent-cni", "socket": agent.socket}
    environ = {
        "CNI_COMMAND": "DEL",
        "CNI_CONTAINERID": "c0",
        "CNI_NETNS": environ_netns,
        "CNI_IFNAME": "eth0",
        "CNI_ARGS": "K8S_POD_NAMESPACE=shop;K8S_POD_NAME=web",
    }
    out = io.StringIO()
    assert plugin.main(environ, io.BytesIO(json.dumps(doc).encode()), out) == 0
    assert runtimes(agent)["shop/web"]["netns"] == "/var/run/netns/web"
