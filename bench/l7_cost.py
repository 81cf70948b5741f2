"""Instructions per request of the L7 path alone, counted by callgrind: a figure that does
not move with this VM's speed (its CPU time per request swings up to 2x within an hour).

One process runs the real ``L7Proxy`` (config from YAML through the agent's own loader,
one VirtualService route match, access log and metrics on) on 127.0.0.1 in front of
nginx, and a client coroutine that sends N GETs one after the other, on one keep-alive
connection or on a new connection each. The capture, the tunnel and the kernel are left
out: callgrind counts user-space instructions only. Each case runs for two values of N;
the difference divided by the extra requests removes start-up; the same client against
nginx directly is subtracted, leaving the proxy's share.

    .venv/bin/python bench/l7_cost.py            # needs valgrind and nginx; ~5 minutes
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CONFIG = """
apiVersion: v1
kind: Pod
metadata: {name: client, namespace: default, labels: {app: client}}
spec: {nodeName: node1, containers: [{name: main, command: [sleep]}]}
---
apiVersion: v1
kind: Pod
metadata: {name: web-v1-0, namespace: default, labels: {app: web, version: v1}}
spec: {nodeName: node2, containers: [{name: main, command: [app]}]}
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: default}
spec:
  selector: {app: web}
  clusterIP: 10.96.0.10
  ports:
  - {name: http, port: 80, targetPort: 8080}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: web, namespace: default}
spec:
  hosts: [web.default.svc.cluster.local]
  http:
  - name: bench
    match: [{uri: {prefix: /}}]
    route: [{destination: {host: web.default.svc.cluster.local, port: {number: 80}}}]
"""

NGINX = """
worker_processes 1;
daemon off;
pid {dir}/nginx.pid;
error_log {dir}/error.log;
events {{ worker_connections 1024; }}
http {{
  access_log off;
  keepalive_requests 100000000;
  server {{ listen 127.0.0.1:{port}; location / {{ return 200 "ok\\n"; }} }}
}}
"""

REQUEST = (
    b"GET /productpage HTTP/1.1\r\nHost: web:80\r\nUser-Agent: curl/7.88.1\r\nAccept: */*\r\n\r\n"
)
SMALL, LARGE = 100, 300
"""Requests in the two runs of a case (their difference is what is counted)."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


async def _client(port: int, n: int, new_connections: bool) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    for i in range(n):
        if new_connections and i:
            writer.close()
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(REQUEST)
        head = await reader.readuntil(b"\r\n\r\n")
        m = re.search(rb"(?i)\r\ncontent-length: *(\d+)", head)
        if m is None or not head.startswith(b"HTTP/1.1 200"):
            raise SystemExit(f"unexpected response: {head[:200]!r}")
        await reader.readexactly(int(m.group(1)))
    writer.close()


async def _inner(config: Path, upstream: int, n: int, direct: bool, new: bool) -> None:
    """The measured process: the proxy (unless ``direct``) and the client."""
    from nodeagent.control.files import load_directory
    from nodeagent.errors import PeerError
    from nodeagent.model.objects import PodRuntime
    from nodeagent.model.snapshot import Endpoint
    from nodeagent.proxy.l7 import Downstream, L7Proxy
    from nodeagent.proxy.pipe import Pipe
    from nodeagent.telemetry.accesslog import AccessLog
    from nodeagent.telemetry.metrics import Metrics

    if direct:
        await _client(upstream, n, new)
        return
    runtimes = {
        "default/web-v1-0": PodRuntime("default/web-v1-0", "10.244.0.1", "node2", ""),
        "default/client": PodRuntime("default/client", "10.244.9.9", "node1", ""),
    }
    snap = load_directory(config, runtimes=runtimes, version=1).snapshot
    loop = asyncio.get_running_loop()
    with open(os.devnull, "wb") as sink:
        proxy = L7Proxy(lambda: snap, Metrics(), AccessLog(sink))
        client = snap.pod_by_key["default/client"]
        svc = snap.service_by_key["default/web"]

        async def connect(ep: Endpoint, pipe: Pipe) -> tuple[str, str]:
            try:
                await loop.create_connection(lambda: pipe, "127.0.0.1", upstream)
            except OSError as e:
                raise PeerError(str(e)) from None
            return f"127.0.0.1:{upstream}", "unknown"

        tasks: set[asyncio.Task[None]] = set()

        def accepted() -> Pipe:
            pipe = Pipe()
            ds = Downstream(
                pod=client,
                source_principal="unknown",
                source_ip="10.244.9.9",
                service=svc,
                port=svc.ports[0],
                connect=connect,
            )
            t = loop.create_task(proxy.serve_http1(ds, pipe))
            tasks.add(t)
            t.add_done_callback(tasks.discard)
            return pipe

        server = await loop.create_server(accepted, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        await _client(port, n, new)
        server.close()
        proxy.close()


def _per_request(config: Path, upstream: int, *, direct: bool, new: bool) -> float:
    from l4_cost import instructions  # (this directory is the script's: sys.path[0])

    def run(n: int) -> int:
        argv = [sys.executable, __file__, "--inner", str(config), str(upstream), str(n)]
        argv += (["--direct"] if direct else []) + (["--new"] if new else [])
        return instructions(argv, None, "")

    return (run(LARGE) - run(SMALL)) / (LARGE - SMALL)


def main() -> int:
    ap = argparse.ArgumentParser(prog="bench/l7_cost.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("--inner", nargs=3, metavar=("CONFIG", "PORT", "N"), help=argparse.SUPPRESS)
    ap.add_argument("--direct", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--new", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.inner:
        import uvloop

        uvloop.run(_inner(Path(a.inner[0]), int(a.inner[1]), int(a.inner[2]), a.direct, a.new))
        return 0
    missing = [t for t in ("valgrind", "nginx") if shutil.which(t) is None]
    if missing:
        print(f"bench/l7_cost.py needs {' and '.join(missing)} (apt-get install ...)")
        return 2
    with tempfile.TemporaryDirectory(prefix="l7cost-") as tmp:
        work = Path(tmp)
        (work / "config").mkdir()
        (work / "config" / "mesh.yaml").write_text(CONFIG)
        port = _free_port()
        (work / "nginx.conf").write_text(NGINX.format(dir=work, port=port))
        nginx = subprocess.Popen(
            ["nginx", "-c", str(work / "nginx.conf"), "-p", str(work)],
            stderr=subprocess.DEVNULL,
        )
        try:
            for _ in range(50):
                with socket.socket() as s:
                    if s.connect_ex(("127.0.0.1", port)) == 0:
                        break
                time.sleep(0.1)
            print("L7Proxy alone, instructions per request (callgrind, user space only):")
            for label, new in (("keep-alive", False), ("new connection each", True)):
                through = _per_request(work / "config", port, direct=False, new=new)
                client = _per_request(work / "config", port, direct=True, new=new)
                print(f"  {label:<20} {through - client:>9,.0f}   (client alone {client:,.0f})")
        finally:
            nginx.terminate()
            nginx.wait(timeout=10)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
