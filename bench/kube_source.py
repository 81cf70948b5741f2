"""How fast the Kubernetes API source follows a cluster (issue 16's "a service edit
reaches the agents within 2 s"): the agent's real ``KubeSource`` and lightkube client
against the test API server (``tests/kubeapi.py``, HTTPS on loopback).

Prints, for a cluster of ``--pods`` pods over ``--services`` services on two nodes:
the first list and snapshot; the time from a Service edit on the API server to the
snapshot that holds it being published (``--edits`` edits, median/p99/max); and a relist
after 410 Gone (history compacted) with the number of snapshots it built.

    .venv/bin/python bench/kube_source.py --pods 1000 --services 100 --edits 50
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from kubeapi import KubeApiServer
from kubeobjects import namespace, node, pod, service

from nodeagent.control.files import LoadedConfig
from nodeagent.control.kube import KubeSource
from nodeagent.control.kubeclient import KubeClient, credentials

NODE = "node1"


def fill(api: KubeApiServer, pods: int, services: int) -> None:
    api.create(namespace("default"))
    api.create(node(NODE, zone="zone-a"))
    api.create(node("node2", zone="zone-b"))
    for i in range(pods):
        where = NODE if i % 2 == 0 else "node2"
        ip = f"10.{100 + i // 62500}.{i // 250 % 250}.{2 + i % 250}"  # one per pod
        api.create(pod(f"p{i}", where, ip, app=f"app{i % services}"))
    for s in range(services):
        api.create(service(f"app{s}", app=f"app{s}"))


async def measure(kubeconfig: Path, api: KubeApiServer, edits: int) -> dict[str, object]:
    updates: list[tuple[float, LoadedConfig]] = []
    source = KubeSource(
        KubeClient(credentials(kubeconfig)),
        node=NODE,
        pods_file=None,
        on_update=lambda loaded: updates.append((time.monotonic(), loaded)),
    )
    t0 = time.monotonic()
    first = await source.start()
    first_list = time.monotonic() - t0
    task = asyncio.create_task(source.run())
    try:
        await asyncio.sleep(0.5)
        latencies: list[float] = []
        for i in range(edits):
            svc = await asyncio.to_thread(api.get, service("app0"))
            port = 8100 + i
            svc["spec"]["ports"][0]["port"] = port
            seen = len(updates)
            sent = time.monotonic()
            await asyncio.to_thread(api.replace, svc)
            while True:
                done = [
                    at
                    for at, loaded in updates[seen:]
                    if loaded.snapshot.service_by_key["default/app0"].ports[0].port == port
                ]
                if done:
                    latencies.append(done[0] - sent)
                    break
                if time.monotonic() - sent > 10:
                    raise SystemExit(f"edit {i} not served within 10 s")
                await asyncio.sleep(0.002)
        await asyncio.sleep(0.3)
        before = len(updates)
        api.expire_history()
        t1 = time.monotonic()
        await asyncio.to_thread(api.restart)  # the watches reconnect: 410, relist
        watch = next(w for w in source.watches if w.resource.kind == "Pod")
        relists = watch.status().relists
        while watch.status().relists == relists and time.monotonic() - t1 < 30:
            await asyncio.sleep(0.01)
        relist = time.monotonic() - t1  # restart, back-off, 410, the list again
        await asyncio.sleep(1.0)  # any snapshot the relist would make
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    latencies.sort()
    return {
        "objects": len(first.objects),
        "first_list_s": round(first_list, 3),
        "edit_to_served_ms": {
            "median": round(statistics.median(latencies) * 1000, 1),
            "p99": round(latencies[int(0.99 * (len(latencies) - 1))] * 1000, 1),
            "max": round(latencies[-1] * 1000, 1),
        },
        "relist_after_410_s": round(relist, 2),
        "snapshots_during_relist": len(updates) - before,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pods", type=int, default=1000)
    ap.add_argument("--services", type=int, default=100)
    ap.add_argument("--edits", type=int, default=50)
    args = ap.parse_args()
    with KubeApiServer(endpointslices=True, bookmark_interval=1.0) as api:
        fill(api, args.pods, args.services)
        with tempfile.TemporaryDirectory() as tmp:
            kubeconfig = api.kubeconfig(Path(tmp) / "kubeconfig")
            result = asyncio.run(measure(kubeconfig, api, args.edits))
    for key, value in result.items():
        print(f"{key}: {value}")


if __name__ == "__main__":
    main()
