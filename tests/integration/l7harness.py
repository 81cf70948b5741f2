"""A loopback rig for the L7 path: real sample-app processes as endpoints, the real
``L7Proxy`` on an asyncio loop in a thread, config from YAML (the same loader the agent
uses). Only the capture and the tunnel are left out: the proxy listens on 127.0.0.1 and
dials each endpoint's real loopback port instead of its pod IP.

    with L7Rig(tmp_path, {"v1": 1, "v2": 1}) as rig:
        rig.apply(VIRTUAL_SERVICE_YAML)
        http.client.HTTPConnection(*rig.address).request("GET", "/")
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import re
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

from nodeagent.control.files import load_directory
from nodeagent.model.objects import PodRuntime
from nodeagent.model.snapshot import Endpoint, MeshSnapshot
from nodeagent.proxy.l7 import Downstream, L7Proxy
from nodeagent.proxy.l7h2 import H2Pool, serve_h2
from nodeagent.proxy.pipe import Pipe
from nodeagent.telemetry.accesslog import AccessLog
from nodeagent.telemetry.metrics import Metrics

LISTENING = re.compile(r"^listening (http|grpc) (\S+):(\d+)", re.MULTILINE)

BASE = """
apiVersion: v1
kind: Pod
metadata: {{name: client, namespace: default, labels: {{app: client}}}}
spec: {{nodeName: node1, containers: [{{name: main, command: [sleep]}}]}}
---
apiVersion: v1
kind: Service
metadata: {{name: web, namespace: default}}
spec:
  selector: {{app: web}}
  clusterIP: 10.96.0.10
  ports:
  - {{name: http, port: 80, targetPort: 8080}}
  - {{name: grpc, port: 50051, targetPort: 50051, appProtocol: grpc}}
{pods}
"""

POD = """
---
apiVersion: v1
kind: Pod
metadata: {{name: {name}, namespace: default, labels: {{app: web, version: {version}}}}}
spec: {{nodeName: node2, containers: [{{name: main, command: [app]}}]}}
"""


class L7Rig:
    def __init__(self, tmp: Path, versions: dict[str, int], *, app_args: tuple[str, ...] = ()):
        self.dir = tmp / "config"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.apps: dict[str, subprocess.Popen[str]] = {}
        self.app_port: dict[str, int] = {}
        self.grpc_port: dict[str, int] = {}
        self.pod_ip: dict[str, str] = {}
        pods = ""
        n = 0
        for version, count in versions.items():
            for i in range(count):
                n += 1
                name = f"web-{version}-{i}"
                pods += POD.format(name=name, version=version)
                self.pod_ip[name] = f"10.244.0.{n}"
                self._start_app(name, version, app_args)
        (self.dir / "base.yaml").write_text(BASE.format(pods=pods))
        self.log_buffer = io.BytesIO()
        self.access_log = AccessLog(self.log_buffer)
        self.metrics = Metrics()
        self._version = 1
        self._snap = self._load()
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()
        self.h2pool = H2Pool()
        self.dial_delay = 0.0  # seconds each upstream dial takes before it connects
        self.dials = 0
        self.proxy = L7Proxy(lambda: self._snap, self.metrics, self.access_log)
        self._tasks: set[asyncio.Task[None]] = set()
        self.address = self._call(self._listen())

    def _start_app(self, name: str, version: str, extra: tuple[str, ...]) -> None:
        p = subprocess.Popen(
            [sys.executable, "-m", "nodeagent", "sample-app", "--host", "127.0.0.1", "--port",
             "0", "--grpc-port", "0", "--service", "web", "--version", version, *extra],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            env={**os.environ, "POD_NAME": name, "POD_NAMESPACE": "default"},
        )
        assert p.stdout is not None
        self.apps[name] = p
        for _ in range(2):
            line = p.stdout.readline()
            m = LISTENING.match(line)
            assert m, line
            if m.group(1) == "http":
                self.app_port[name] = int(m.group(3))
            else:
                self.grpc_port[name] = int(m.group(3))
        threading.Thread(target=lambda: p.stdout and p.stdout.read(), daemon=True).start()

    def _load(self) -> MeshSnapshot:
        runtimes = {
            f"default/{name}": PodRuntime(f"default/{name}", ip, "node2", "")
            for name, ip in self.pod_ip.items()
        }
        runtimes["default/client"] = PodRuntime("default/client", "10.244.9.9", "node1", "")
        return load_directory(self.dir, runtimes=runtimes, version=self._version).snapshot

    def apply(self, text: str, name: str = "routing.yaml") -> None:
        (self.dir / name).write_text(textwrap.dedent(text))
        self._version += 1
        self._snap = self._load()

    def remove(self, name: str = "routing.yaml") -> None:
        (self.dir / name).unlink()
        self._version += 1
        self._snap = self._load()

    def _call(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(30)

    async def _listen(self) -> tuple[str, int]:
        snap = self._snap
        client = snap.pod_by_key["default/client"]
        svc = snap.service_by_key["default/web"]

        async def connect(ep: Endpoint, pipe: Pipe) -> tuple[str, str]:
            name = ep.pod.name
            port = self.grpc_port[name] if ep.port == 50051 else self.app_port[name]
            self.dials += 1
            if self.dial_delay:
                await asyncio.sleep(self.dial_delay)
            loop = asyncio.get_running_loop()
            try:
                await loop.create_connection(lambda: pipe, "127.0.0.1", port)
            except OSError as e:
                from nodeagent.errors import PeerError

                raise PeerError(f"{name}: {e}") from None
            return f"127.0.0.1:{port}", "unknown"

        def factory(h2: bool) -> Pipe:
            pipe = Pipe()
            ds = Downstream(
                pod=client,
                source_principal="unknown",
                source_ip="10.244.9.9",
                service=svc,
                port=svc.ports[1 if h2 else 0],
                connect=connect,
            )

            def start() -> None:
                if h2:
                    coro = serve_h2(self.proxy, self.h2pool, ds, pipe)
                else:
                    coro = self.proxy.serve_http1(ds, pipe)
                task = asyncio.ensure_future(coro)
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)

            asyncio.get_running_loop().call_soon(start)
            return pipe

        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(lambda: factory(False), "127.0.0.1", 0)
        self._h2server = await loop.create_server(lambda: factory(True), "127.0.0.1", 0)
        self.grpc_address: tuple[str, int] = self._h2server.sockets[0].getsockname()[:2]
        sock = self._server.sockets[0].getsockname()
        return sock[0], sock[1]

    def records(self, n: int = 0) -> list[dict[str, Any]]:
        """The access-log records so far, flushed by the proxy's loop; with ``n``, waiting
        up to 5 s for at least that many (a record is written after its response)."""

        async def flush() -> None:
            self.access_log.flush()

        deadline = time.monotonic() + 5
        while True:
            time.sleep(0.05)
            self._call(flush())
            recs = [json.loads(x) for x in self.log_buffer.getvalue().splitlines() if x]
            if len(recs) >= n or time.monotonic() > deadline:
                return recs

    def close(self) -> None:
        async def stop() -> None:
            self._server.close()
            self._h2server.close()
            self.proxy.close()
            self.h2pool.close()
            for t in list(self._tasks):
                t.cancel()

        try:
            self._call(stop())
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(5)
            for p in self.apps.values():
                p.terminate()
            for p in self.apps.values():
                try:
                    p.wait(5)
                except subprocess.TimeoutExpired:
                    p.kill()

    def __enter__(self) -> L7Rig:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
