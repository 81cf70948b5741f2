"""An HTTP/2 client streaming request bodies on many streams into an upstream that never
reads, against the real ``L7Proxy`` and ``serve_h2`` on loopback: the proxy grants the
client only as much as its connection window (16 MiB) beyond what went upstream, not a
stream window (1 MiB) per stream, and holds no more than that."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import h2.config
import h2.connection
import h2.events
import pytest
from l7harness import L7Rig

from nodeagent.model.snapshot import Endpoint
from nodeagent.proxy.l7 import Downstream
from nodeagent.proxy.l7h2 import H2Pool, serve_h2
from nodeagent.proxy.pipe import Pipe

MiB = 1 << 20
STREAMS = 30


class Blackhole:
    """An upstream that accepts connections and reads nothing from them."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.address = self.sock.getsockname()

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[tuple[L7Rig, tuple[str, int], H2Pool]]:
    hole = Blackhole()
    with L7Rig(tmp_path, {"v1": 1}) as r:
        pool = H2Pool()

        async def listen() -> tuple[str, int]:
            snap = r._snap
            svc = snap.service_by_key["default/web"]

            async def connect(ep: Endpoint, pipe: Pipe) -> tuple[str, str]:
                loop = asyncio.get_running_loop()
                await loop.create_connection(lambda: pipe, *hole.address)
                return f"{hole.address[0]}:{hole.address[1]}", "unknown"

            def factory() -> Pipe:
                pipe = Pipe()
                ds = Downstream(
                    pod=snap.pod_by_key["default/client"],
                    source_principal="unknown",
                    source_ip="10.244.9.9",
                    service=svc,
                    port=svc.ports[1],
                    connect=connect,
                )

                def start() -> None:  # once the pipe is connected
                    task = asyncio.ensure_future(serve_h2(r.proxy, pool, ds, pipe))
                    r._tasks.add(task)
                    task.add_done_callback(r._tasks.discard)

                asyncio.get_running_loop().call_soon(start)
                return pipe

            server = await asyncio.get_running_loop().create_server(factory, "127.0.0.1", 0)
            r._servers = [server]  # type: ignore[attr-defined]
            addr = server.sockets[0].getsockname()
            return addr[0], addr[1]

        address = r._call(listen())
        try:
            yield r, address, pool
        finally:

            async def stop() -> None:
                pool.close()
                for srv in r._servers:  # type: ignore[attr-defined]
                    srv.close()

            r._call(stop())
            hole.close()


def upstream_view(rig: L7Rig, pool: H2Pool) -> tuple[int, int]:
    """(bytes the proxy wrote to its upstream connections, request bytes it queues on
    them waiting for a window)."""

    async def count() -> tuple[int, int]:
        conns = [c for cs in pool._conns.values() for c in cs]
        written = sum(c.pipe.bytes_out for c in conns)
        return written, sum(c.machine.buffered(sid) for c in conns for sid in c.streams)

    written, queued = rig._call(count())
    return int(written), int(queued)


def test_streams_into_a_silent_upstream_hold_one_connection_window(
    rig: tuple[L7Rig, tuple[str, int], H2Pool],
) -> None:
    r, address, pool = rig
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    conn.initiate_connection()
    sent = 0
    chunk = bytes(16 * 1024)
    with socket.create_connection(address, timeout=10) as s:
        for i in range(STREAMS):
            conn.send_headers(
                2 * i + 1,
                [
                    (":method", "POST"),
                    (":scheme", "http"),
                    (":path", f"/upload/{i}"),
                    (":authority", "web"),
                    ("content-type", "application/grpc"),
                ],
            )
        s.sendall(conn.data_to_send())
        s.settimeout(0.05)
        quiet_since = time.monotonic()
        while time.monotonic() - quiet_since < 2.0:  # under load a window update is late
            progressed = False
            for i in range(STREAMS):
                sid = 2 * i + 1
                room = min(conn.local_flow_control_window(sid), len(chunk))
                if room > 0:
                    conn.send_data(sid, chunk[:room])
                    sent += room
                    progressed = True
            out = conn.data_to_send()
            if out:  # a busy proxy may take a while to read: not a quiet spell's short wait
                s.settimeout(10)
                s.sendall(out)
                s.settimeout(0.05)
            try:
                data = s.recv(1 << 16)
            except TimeoutError:
                data = b""
            if data:
                for ev in conn.receive_data(data):
                    assert not isinstance(ev, h2.events.ConnectionTerminated), ev
                    assert not isinstance(ev, h2.events.StreamReset), ev
            if progressed:
                quiet_since = time.monotonic()
        written, queued = upstream_view(r, pool)
    # What the proxy accepted and did not pass on: its 16 MiB connection window (and the
    # initial 64 KiB), not 30 streams x 1 MiB.
    held = sent - written
    assert held <= 16 * MiB + 64 * 1024 + 256 * 1024, f"the proxy holds {held} bytes"
    assert held >= 15 * MiB, f"only {held} bytes held: did the client send?"
    # (what was written upstream includes the preface and frame headers, not only body)
    assert queued <= held + 16 * 1024
