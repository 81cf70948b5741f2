"""``H2Pool``'s dial in progress: requests that wait for it end with their own
cancellation, even when the dial is cancelled in the same pass (a client gone takes all
its streams' tasks at once)."""

from __future__ import annotations

import asyncio
import random
from pathlib import Path
from typing import Any

import uvloop

from nodeagent.control.files import load_directory
from nodeagent.core.balancer import BalancerRegistry
from nodeagent.core.clusters import Cluster, Clusters
from nodeagent.model.objects import PodRuntime
from nodeagent.model.traffic import Destination
from nodeagent.proxy.l7h2 import H2Pool
from nodeagent.proxy.pipe import Pipe

MESH = """
apiVersion: v1
kind: Pod
metadata: {name: web, namespace: default, labels: {app: web}}
spec: {nodeName: n2, containers: [{name: c, command: [x]}]}
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: default}
spec:
  selector: {app: web}
  ports: [{name: grpc, port: 50051, appProtocol: grpc}]
"""


def web_cluster(tmp: Path) -> Cluster:
    (tmp / "mesh.yaml").write_text(MESH)
    runtimes = {"default/web": PodRuntime("default/web", "10.1.0.1", "n2", "")}
    snap = load_directory(tmp, runtimes=runtimes).snapshot
    clusters = Clusters(BalancerRegistry(lambda: 0.0, random.Random(1)))
    return clusters.cluster(snap, Destination("web.default.svc.cluster.local"), 50051)


def test_waiters_cancelled_with_the_dial_they_wait_for_end_cancelled(tmp_path: Path) -> None:
    dials: list[str] = []

    async def connect(ep: Any, pipe: Pipe) -> tuple[str, str]:
        dials.append(asyncio.current_task().get_name())  # type: ignore[union-attr]
        await asyncio.sleep(3600)  # an endpoint that never answers the dial
        raise AssertionError("unreachable")

    cluster = web_cluster(tmp_path)
    (ep,) = cluster.endpoints

    async def main() -> None:
        pool = H2Pool()
        args: Any = ("GET", "http", "a", "/", [], True)
        tasks = [
            asyncio.create_task(pool.stream("src", cluster, ep, connect, args), name=n)
            for n in "ABC"
        ]
        await asyncio.sleep(0.01)
        for t in tasks:  # in order, as the session's end cancels its streams
            t.cancel()
        _done, pending = await asyncio.wait(tasks, timeout=1)
        assert not pending, [t.get_name() for t in pending]
        assert all(t.cancelled() for t in tasks)
        assert dials == ["A"]  # nobody dialled again for a request that is gone

    loop = uvloop.new_event_loop()  # not uvloop.run: its clean-up would wait on a task
    try:  # that swallows its cancellation, which is the bug this test is about
        loop.run_until_complete(main())
    finally:
        loop.close()
