"""Connection caps and HBONE timeouts, driven the way a client would, with bytes on real
sockets: past the node's cap or a pod listener's cap a connection is closed at accept
(the real ``Proxy`` on loopback for 15001, the real HBONE server for 15008), counted by
listener and reason; an HBONE connection that never sends its HTTP/2 preface after TLS,
or that stays without a stream, is closed (GOAWAY), counted."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import ssl
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

import h2.config
import h2.connection
import h2.events
import pytest
from certs import make_ca
from test_admin import FakeView
from test_hbone import CLIENT_ID, SERVER_ID, Echo, Mesh, listening, open_peer, pool_for, run
from test_hbone_abuse import CONNECT, goaway_of, read_all, tls
from test_proxy_loopback import SERVICE_IP, TCP_PORT, Rig
from test_proxy_loopback import run as run_proxy

from nodeagent import cli
from nodeagent.admin.server import start_admin_server
from nodeagent.control.yamlload import bounds_limit
from nodeagent.model.status import LimitStatus
from nodeagent.proxy.hbone_server import ConnectRefusal, ConnectRequest, start_hbone_server
from nodeagent.proxy.inputs import ConnectionLimits
from nodeagent.proxy.limits import ConnectionCaps, proxy_limits
from nodeagent.telemetry.metrics import Metrics

NO_ERROR = 0


@pytest.fixture(scope="module")
def mesh() -> Mesh:
    ca = make_ca()
    return Mesh(ca, ca.issue(SERVER_ID), ca.issue(CLIENT_ID))


def refused(metrics: Metrics, listener: str, reason: str) -> float:
    labels = {"listener": listener, "reason": reason}
    value = metrics.registry.get_sample_value(
        "nodeagent_downstream_connections_refused_total", labels
    )
    return value or 0.0


def timeouts(metrics: Metrics, which: str) -> float:
    value = metrics.registry.get_sample_value("nodeagent_hbone_timeouts_total", {"timeout": which})
    return value or 0.0


# -- 15001: the real proxy -------------------------------------------------------------------


class NodeCapped(Rig):
    connection_limits = ConnectionLimits(max_connections=2)


class ListenerCapped(Rig):
    connection_limits = ConnectionLimits(max_connections_per_listener=2)


async def held_open(rig: Rig) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A client connection through the proxy to the echo app, proven live."""
    r, w = await rig.connect((SERVICE_IP, TCP_PORT))
    w.write(b"ping")
    assert await r.readexactly(4) == b"ping"
    return r, w


async def closed_at_accept(rig: Rig) -> bool:
    """A new client connection gets no byte back: closed before it is served."""
    r, w = await rig.connect((SERVICE_IP, TCP_PORT))
    try:
        w.write(b"ping")
        data = await asyncio.wait_for(r.read(100), 5)
    except ConnectionError:
        data = b""
    w.close()
    return data == b""


@pytest.mark.parametrize(
    ("rig_type", "reason"), [(NodeCapped, "node_limit"), (ListenerCapped, "listener_limit")]
)
def test_connections_past_a_cap_are_closed_at_accept_and_counted(
    rig_type: type[Rig], reason: str
) -> None:
    async def body(rig: Rig) -> None:
        first = [await held_open(rig) for _ in range(2)]
        echoed = rig.echo.accepted
        for _ in range(3):
            assert await closed_at_accept(rig)
        assert rig.echo.accepted == echoed  # nothing reached the app
        metrics = rig.metrics["node1"]
        assert refused(metrics, "outbound", reason) == 3
        assert rig.proxies["node1"].caps.held == 2
        # The first two still work; once one closes, its slot serves a new client.
        _, w = first.pop()
        w.close()
        caps = rig.proxies["node1"].caps
        for _ in range(200):
            if caps.held < 2:
                break
            await asyncio.sleep(0.01)
        _, w = await held_open(rig)
        w.close()
        r0, w0 = first[0]
        w0.write(b"still")
        assert await r0.readexactly(5) == b"still"
        w0.close()

    run_proxy(False, body, rig_type)


def test_ctl_status_shows_the_caps_and_their_hits(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Through the real node agent socket: the limits of the real proxy, with the hits
    its metrics counted."""
    short_dir = tempfile.mkdtemp(prefix="na-", dir="/tmp")  # sun_path is 108 bytes
    path = os.path.join(short_dir, "agent.sock")
    out: list[str] = []

    async def body(rig: Rig) -> None:
        held = [await held_open(rig) for _ in range(2)]
        assert await closed_at_accept(rig)
        proxy = rig.proxies["node1"]

        @dataclass
        class View(FakeView):
            def limits(self) -> list[LimitStatus]:
                return [*proxy_limits(proxy.inputs, proxy.caps), bounds_limit(0)]

        server = await start_admin_server(View(), path)
        try:
            rc = await asyncio.to_thread(cli.main, ["ctl", "--socket", path, "status"])
            assert rc == 0
            out.append(capsys.readouterr().out)
        finally:
            await server.stop(None)
        for _, w in held:
            w.close()

    try:
        run_proxy(False, body, NodeCapped)
    finally:
        shutil.rmtree(short_dir, ignore_errors=True)
    lines = out[0].splitlines()
    table = lines[lines.index("Limits:") + 1 :]
    assert re.match(r"  LIMIT +VALUE +FLAG +HITS$", table[0])
    cells = [re.split(r"\s{2,}", line.strip()) for line in table[1:]]
    rows = {c[0]: c for c in cells}
    assert rows["Downstream connections per node"][1:] == ["2", "--max-connections", "1"]
    assert rows["Downstream connections per pod listener"][1:] == [
        "20000",
        "--max-connections-per-listener",
        "0",
    ]
    assert rows["HTTP/1.1 request head timeout (408)"][1:] == [
        "10s",
        "--request-headers-timeout",
        "0",
    ]
    assert rows["HBONE idle connection (GOAWAY)"][1:] == ["1h", "--hbone-idle-timeout", "0"]
    assert rows["HBONE connections per client identity"][1:] == ["200", "-", "0"]
    assert rows["Config files (reload rejected)"][-2:] == ["-", "0"]
    assert len(rows) == 12, rows


# -- 15008: the real HBONE server ------------------------------------------------------------


async def hbone_server(mesh: Mesh, metrics: Metrics, **kw: object):  # type: ignore[no-untyped-def]
    async def on_connect(req: ConnectRequest) -> asyncio.BaseProtocol | ConnectRefusal:
        return Echo()

    return await start_hbone_server(
        listening(),
        mesh.server_ctx(),
        on_connect,
        metrics=metrics,
        **kw,  # type: ignore[arg-type]
    )


def test_hbone_connections_past_the_cap_are_closed_at_accept(mesh: Mesh) -> None:
    async def main() -> None:
        metrics = Metrics()
        caps = ConnectionCaps(ConnectionLimits(max_connections=2), metrics)
        server = await hbone_server(mesh, metrics, slots=caps.listener("hbone"))
        port = server.sockets[0].getsockname()[1]
        ctx = mesh.client_ctx()
        held = [await asyncio.to_thread(tls, port, ctx) for _ in range(2)]
        with pytest.raises((ssl.SSLError, OSError)):
            extra = await asyncio.to_thread(tls, port, ctx)
            await asyncio.to_thread(extra.recv, 100)  # TLS 1.3: the close shows here
        assert refused(metrics, "hbone", "node_limit") >= 1
        assert caps.held == 2
        held.pop().close()
        for _ in range(300):
            if caps.held < 2:
                break
            await asyncio.sleep(0.01)
        assert caps.held == 1
        again = await asyncio.to_thread(tls, port, ctx)
        again.close()
        for s in held:
            s.close()
        server.abort()

    run(main)


def preface_never_sent(port: int, ctx: ssl.SSLContext) -> tuple[bytes, float]:
    with tls(port, ctx) as sock:
        start = time.monotonic()
        out = read_all(sock)
        return out, time.monotonic() - start


def test_an_hbone_connection_without_a_preface_is_closed(mesh: Mesh) -> None:
    async def main() -> None:
        metrics = Metrics()
        server = await hbone_server(mesh, metrics, preface_timeout=0.5, idle_timeout=60)
        port = server.sockets[0].getsockname()[1]
        out, took = await asyncio.to_thread(preface_never_sent, port, mesh.client_ctx())
        assert 0.4 <= took < 3, took
        goaway = goaway_of(out)
        assert goaway is not None and goaway.error_code == NO_ERROR
        assert b"preface" in goaway.additional_data
        assert timeouts(metrics, "preface_timeout") == 1
        assert server.stats()["preface_timeouts"] == 1
        server.abort()

    run(main)


def tunnel_then_idle(port: int, ctx: ssl.SSLContext, hold: float) -> tuple[bytes, float, bool]:
    """One tunnel, open (and silent) for ``hold`` seconds, then ended; then wait for the
    server. Returns (what came after, seconds from the end of the tunnel to the close,
    whether anything but the tunnel's frames came while it was open)."""
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    conn.initiate_connection()
    conn.send_headers(1, CONNECT)
    with tls(port, ctx) as sock:
        sock.sendall(conn.data_to_send())
        sock.settimeout(0.2)
        deadline = time.monotonic() + hold
        early_goaway = False
        while time.monotonic() < deadline:
            try:
                data = sock.recv(65536)
            except TimeoutError:
                continue
            if not data:
                return b"", 0.0, True
            for ev in conn.receive_data(data):
                early_goaway |= isinstance(ev, h2.events.ConnectionTerminated)
            sock.sendall(conn.data_to_send())
        conn.end_stream(1)
        sock.sendall(conn.data_to_send())
        start = time.monotonic()
        out = read_all(sock)
        return out, time.monotonic() - start, early_goaway


def test_an_idle_hbone_connection_is_closed_with_goaway(mesh: Mesh) -> None:
    async def main() -> None:
        metrics = Metrics()
        server = await hbone_server(mesh, metrics, idle_timeout=0.6)
        port = server.sockets[0].getsockname()[1]
        # A tunnel open twice as long as the idle timeout keeps the connection.
        out, took, early = await asyncio.to_thread(tunnel_then_idle, port, mesh.client_ctx(), 1.3)
        assert not early, "the connection was closed while a tunnel was open"
        assert 0.4 <= took < 3, took
        goaway = goaway_of(out)
        assert goaway is not None and goaway.error_code == NO_ERROR
        assert b"no stream for 0.6s" in goaway.additional_data
        assert timeouts(metrics, "idle_timeout") == 1
        server.abort()

    run(main)


def test_the_hbone_client_pool_closes_idle_connections_before_the_server(mesh: Mesh) -> None:
    """Aligned timeouts: a pooled client connection is closed by the client (60 s)
    long before the server's idle timeout (1 h) would; here scaled down."""

    async def main() -> None:
        metrics = Metrics()
        server = await hbone_server(mesh, metrics, idle_timeout=5)
        pool = pool_for(mesh, idle_timeout=0.3)
        peer = await open_peer(pool, server)
        assert peer.transport is not None
        peer.transport.close()
        for _ in range(300):
            if server.stats()["connections"] == 0:
                break
            await asyncio.sleep(0.01)
        assert server.stats()["connections"] == 0
        assert timeouts(metrics, "idle_timeout") == 0
        pool.close()
        server.abort()

    run(main)


def test_the_open_files_limit_is_raised_for_the_cap() -> None:
    """In a child process (the limit is per process): the soft limit goes up to the hard
    one, and a hard limit short of the cap is a warning naming the flag."""
    code = (
        "import logging, resource, sys\n"
        "logging.basicConfig(stream=sys.stdout, format='%(message)s')\n"
        "from nodeagent.proxy.limits import raise_open_files\n"
        "resource.setrlimit(resource.RLIMIT_NOFILE, (256, 4096))\n"
        "print(raise_open_files(100), resource.getrlimit(resource.RLIMIT_NOFILE)[0])\n"
        "print(raise_open_files(100_000))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    lines = done.stdout.splitlines()
    assert lines[0] == "4096 4096"
    assert "open files limit 4096 is below the 201024 that --max-connections 100000" in lines[1]
    assert lines[2] == "4096"
