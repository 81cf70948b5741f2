"""HBONE on loopback with real TLS 1.3 and real sockets: the client pool, the server, the
relay on top of streams, refusals with actionable messages, flow control, a foreign
HTTP/2 client (h2 driven directly over an ``ssl`` socket), and peers dying."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import socket
import ssl
import struct
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import cast

import h2.config
import h2.connection
import h2.events
import pytest
import uvloop
from certs import TestCA, make_ca, spiffe_id

from nodeagent.errors import PeerError
from nodeagent.identity.tls import WorkloadCert, client_context, server_context
from nodeagent.identity.tlsread import ReadTracker
from nodeagent.proxy.connections import ConnectionTable
from nodeagent.proxy.hbone import HboneStream
from nodeagent.proxy.hbone_client import HboneClientPool
from nodeagent.proxy.hbone_server import (
    ConnectRefusal,
    ConnectRequest,
    HboneServer,
    start_hbone_server,
)
from nodeagent.proxy.relay import ClientSide, UpstreamSide
from nodeagent.telemetry.metrics import Metrics

SERVER_ID = spiffe_id("shop", "reviews")
CLIENT_ID = spiffe_id("shop", "productpage")


@dataclass
class Mesh:
    ca: TestCA
    server_cert: WorkloadCert
    client_cert: WorkloadCert

    def server_ctx(self, cert: WorkloadCert | None = None) -> ssl.SSLContext:
        return server_context(cert or self.server_cert, self.ca.bundle_pem)

    def client_ctx(self, cert: WorkloadCert | None = None) -> ssl.SSLContext:
        return client_context(cert or self.client_cert, self.ca.bundle_pem)


@pytest.fixture(scope="module")
def mesh() -> Mesh:
    ca = make_ca()
    return Mesh(ca, ca.issue(SERVER_ID), ca.issue(CLIENT_ID))


def run(
    main: Callable[[], Awaitable[None]],
    timeout: float = 60,
    runner: Callable[[Awaitable[None]], None] = uvloop.run,
) -> None:
    runner(asyncio.wait_for(main(), timeout))


def listening() -> socket.socket:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(128)
    s.setblocking(False)
    return s


async def dial(addr: tuple[str, int]) -> socket.socket:
    s = socket.socket()
    s.setblocking(False)
    try:
        await asyncio.get_running_loop().sock_connect(s, addr)
    except OSError:
        s.close()
        raise
    return s


# -- protocols used on streams ------------------------------------------------------------


class Echo(asyncio.Protocol):
    """Echoes, half-closes after the peer did."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.lost: asyncio.Future[Exception | None] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is no subclass

    def data_received(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.write(data)

    def eof_received(self) -> bool:
        assert self.transport is not None
        self.transport.write_eof()
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.lost.done():
            self.lost.set_result(exc)


class Peer(asyncio.Protocol):
    """The client end of a stream: writes honouring back-pressure, hashes what it reads."""

    def __init__(self) -> None:
        loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.digest = hashlib.sha256()
        self.received = 0
        self.eof: asyncio.Future[None] = loop.create_future()
        # a test that never awaits eof (the stream was meant to fail) leaves no warning
        self.eof.add_done_callback(lambda f: f.cancelled() or f.exception())
        self.lost: asyncio.Future[Exception | None] = loop.create_future()
        self.can_write = asyncio.Event()
        self.can_write.set()
        self.pauses = 0
        self.arrived = asyncio.Event()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is no subclass

    def data_received(self, data: bytes) -> None:
        self.digest.update(data)
        self.received += len(data)
        self.arrived.set()

    def eof_received(self) -> bool:
        if not self.eof.done():
            self.eof.set_result(None)
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.eof.done():
            self.eof.set_exception(exc or ConnectionError("lost before EOF"))
        if not self.lost.done():
            self.lost.set_result(exc)

    def pause_writing(self) -> None:
        self.pauses += 1
        self.can_write.clear()

    def resume_writing(self) -> None:
        self.can_write.set()

    async def send(self, payload: bytes, chunk: int = 256 * 1024, eof: bool = True) -> None:
        assert self.transport is not None
        view = memoryview(payload)
        for i in range(0, len(payload), chunk):
            await self.can_write.wait()
            self.transport.write(view[i : i + chunk])
        if eof:
            self.transport.write_eof()


async def open_peer(
    pool: HboneClientPool, server: HboneServer, authority: str = "10.0.0.1:80"
) -> Peer:
    peer = Peer()
    await pool.open_stream(
        source_identity=CLIENT_ID,
        expected_identity=SERVER_ID,
        peer=server.sockets[0].getsockname()[:2],
        authority=authority,
        headers={"forwarded": "for=10.0.0.2"},
        protocol=peer,
    )
    return peer


def pool_for(mesh: Mesh, **kw: float) -> HboneClientPool:
    ctx = mesh.client_ctx()
    return HboneClientPool(dial, lambda identity: ctx, **kw)  # type: ignore[arg-type]


async def echo_server(mesh: Mesh) -> HboneServer:
    async def on_connect(req: ConnectRequest) -> asyncio.BaseProtocol | ConnectRefusal:
        return Echo()

    return await start_hbone_server(listening(), mesh.server_ctx(), on_connect)


# -- the relay on both ends of a tunnel ---------------------------------------------------


async def tcp_echo() -> tuple[asyncio.base_events.Server, list[str]]:
    """A TCP echo server that half-closes after the client did; records digests."""
    digests: list[str] = []

    async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        h = hashlib.sha256()
        while data := await r.read(262144):
            h.update(data)
            w.write(data)
            await w.drain()
        digests.append(h.hexdigest())
        w.write_eof()
        await w.drain()
        w.close()

    return await asyncio.start_server(handle, "127.0.0.1", 0), digests


async def relay_hbone_server(mesh: Mesh, table: ConnectionTable) -> HboneServer:
    """Inbound: CONNECT -> dial the destination over TCP -> relay stream <-> TCP."""
    loop = asyncio.get_running_loop()

    async def on_connect(req: ConnectRequest) -> asyncio.BaseProtocol | ConnectRefusal:
        relay = table.open({"direction": "inbound", "source": req.peer_identity})
        try:
            up, _ = await loop.create_connection(lambda: UpstreamSide(relay), *req.destination)
        except OSError as e:
            relay.close("upstream failed")
            return ConnectRefusal(503, f"destination {req.authority} refused: {e.strerror}")
        up.pause_reading()  # until the stream is wired (a server-first app may talk at once)

        def made(side: ClientSide) -> None:
            up.resume_reading()
            assert side.transport is not None
            side.transport.resume_reading()

        return ClientSide(relay, made)

    return await start_hbone_server(listening(), mesh.server_ctx(), on_connect)


async def relay_outbound(
    pool: HboneClientPool, table: ConnectionTable, hbone: HboneServer, authority: str
) -> asyncio.base_events.Server:
    """Outbound: a TCP listener whose connections are relayed into HBONE streams."""
    loop = asyncio.get_running_loop()
    peer = hbone.sockets[0].getsockname()[:2]

    def make() -> ClientSide:
        relay = table.open({"direction": "outbound"})

        async def connect(side: ClientSide) -> None:
            try:
                await pool.open_stream(
                    source_identity=CLIENT_ID,
                    expected_identity=SERVER_ID,
                    peer=peer,
                    authority=authority,
                    headers={"forwarded": "for=127.0.0.1"},
                    protocol=UpstreamSide(relay),
                )
            except PeerError as e:
                relay.close(str(e))

        tasks: set[asyncio.Task[None]] = set()

        def made(side: ClientSide) -> None:
            task = loop.create_task(connect(side))
            tasks.add(task)
            task.add_done_callback(tasks.discard)

        return ClientSide(relay, made)

    return await loop.create_server(make, "127.0.0.1", 0)


def _tls_pair(mesh: Mesh) -> tuple[ssl.SSLObject, ssl.SSLObject, list[ssl.MemoryBIO]]:
    """A client and a server object of our contexts over memory BIOs, handshake done
    (bios: client in, client out, server in, server out)."""
    bios = [ssl.MemoryBIO() for _ in range(4)]
    client = mesh.client_ctx().wrap_bio(bios[0], bios[1])
    server = mesh.server_ctx().wrap_bio(bios[2], bios[3], server_side=True)
    for _ in range(10):
        done = 0
        for obj in (client, server):
            try:
                obj.do_handshake()
                done += 1
            except ssl.SSLWantReadError:
                pass
        bios[2].write(bios[1].read())
        bios[0].write(bios[3].read())
        if done == 2:
            break
    assert client.version() == "TLSv1.3"
    return client, server, bios


def test_tls_objects_of_our_contexts_read_and_write_through_ssl_directly(mesh: Mesh) -> None:
    """The event loop's TLS transport calls ``read``/``write``/``pending`` on the object
    ``wrap_bio`` makes: ours are ``_ssl``'s C methods (or, for ``read`` and ``pending``,
    a compiled tracker's), not the stdlib's Python wrappers, and 1 MiB each way goes
    through (memory BIOs, real TLS 1.3)."""
    client, server, bios = _tls_pair(mesh)
    for obj in (client, server):
        assert obj.write.__self__ is obj._sslobj  # type: ignore[attr-defined]
        for name in ("read", "pending"):
            assert type(getattr(obj, name).__self__) is ReadTracker, name

    def pump() -> None:
        bios[2].write(bios[1].read())
        bios[0].write(bios[3].read())

    payload = os.urandom(1 << 20)
    for sender, receiver in ((client, server), (server, client)):
        sent = 0
        got = bytearray()
        while len(got) < len(payload):
            if sent < len(payload):
                sent += sender.write(payload[sent : sent + 65536])
            pump()
            while True:
                try:
                    chunk = receiver.read(65536)
                except ssl.SSLWantReadError:
                    break
                got += chunk
        assert hashlib.sha256(got).digest() == hashlib.sha256(payload).digest()


def test_tls_pending_after_a_short_read_is_answered_without_openssl(mesh: Mesh) -> None:
    """``pending()``, which the TLS transport asks before and after each read, says what
    OpenSSL says at every step (records split over BIO writes, several in one, larger than
    the read, a close_notify), and after a read that came back short it answers without
    calling into ``_ssl`` (each call releases and retakes the GIL)."""
    client, server, bios = _tls_pair(mesh)
    raw = server._sslobj  # type: ignore[attr-defined]
    asked: list[str] = []

    def raw_pending() -> int:
        asked.append("pending")
        return int(raw.pending())

    tracker = ReadTracker(raw.read, raw_pending)  # as our contexts' objects hold one

    def read(n: int) -> int:
        buf = bytearray(n)
        count = int(tracker.read(n, buf))
        assert tracker.pending() == raw.pending()
        return count

    def pending() -> int:
        asked.clear()
        return tracker.pending()

    # one record of 100 bytes, handed over in two pieces
    client.write(b"a" * 100)
    record = bios[1].read()
    bios[2].write(record[:20])
    with pytest.raises(ssl.SSLWantReadError):
        read(4096)
    assert pending() == 0 and asked == ["pending"]  # a failed read tells nothing
    bios[2].write(record[20:])
    assert read(4096) == 100  # short: the record is used up
    assert pending() == 0 and asked == []
    # three records in one piece, the first larger than the read
    for chunk in (b"b" * 3000, b"c" * 10, b"d" * 5):
        client.write(chunk)
    bios[2].write(bios[1].read())
    assert read(1000) == 1000  # full: more of the record is left
    assert pending() == 2000 and asked == ["pending"]
    assert read(4096) == 2000
    assert pending() == 0 and asked == []
    assert read(4096) == 10 and read(4096) == 5
    assert pending() == 0 and asked == []
    # a record of exactly the read's size: full, so OpenSSL is asked (and says 0)
    client.write(b"e" * 64)
    bios[2].write(bios[1].read())
    assert read(64) == 64
    assert pending() == 0 and asked == ["pending"]
    # bytes (no buffer): short too
    client.write(b"f" * 30)
    bios[2].write(bios[1].read())
    assert tracker.read(1024) == b"f" * 30
    assert pending() == 0 and asked == []
    # close_notify: the read returns 0, and OpenSSL is asked again
    with contextlib.suppress(ssl.SSLWantReadError):
        client.unwrap()
    bios[2].write(bios[1].read())
    assert read(4096) == 0
    assert pending() == 0 and asked == ["pending"]


# asyncio's own loop too: its SSL transport reads into slices of the buffer HBONE gives
@pytest.mark.parametrize("runner", [uvloop.run, asyncio.run], ids=["uvloop", "asyncio"])
def test_relay_through_a_tunnel_16_mib_each_way_with_half_close(
    mesh: Mesh, runner: Callable[[Awaitable[None]], None]
) -> None:
    payload = os.urandom(16 << 20)

    async def main() -> None:
        table = ConnectionTable(Metrics())
        echo, echo_digests = await tcp_echo()
        echo_addr = echo.sockets[0].getsockname()
        hbone = await relay_hbone_server(mesh, table)
        pool = pool_for(mesh)
        out = await relay_outbound(pool, table, hbone, f"127.0.0.1:{echo_addr[1]}")
        r, w = await asyncio.open_connection(*out.sockets[0].getsockname()[:2])
        got = hashlib.sha256()

        async def read_all() -> None:
            while data := await r.read(262144):
                got.update(data)

        reader = asyncio.create_task(read_all())
        for i in range(0, len(payload), 1 << 20):
            w.write(payload[i : i + (1 << 20)])
            await w.drain()
        w.write_eof()
        await reader
        assert r.at_eof()
        want = hashlib.sha256(payload).hexdigest()
        assert echo_digests == [want]  # client -> server, through the tunnel
        assert got.hexdigest() == want  # and back
        w.close()
        for _ in range(100):
            if not table.live:
                break
            await asyncio.sleep(0.02)
        assert table.live == {}
        assert pool.stats()["streams"] == 0 and hbone.stats()["streams"] == 0
        pool.close()
        hbone.abort()
        out.close()
        echo.close()

    run(main, runner=runner)


# -- pooling ------------------------------------------------------------------------------


def test_100_concurrent_streams_share_one_connection(mesh: Mesh) -> None:
    async def main() -> None:
        server = await echo_server(mesh)
        pool = pool_for(mesh)
        payloads = [os.urandom(32768 + i) for i in range(100)]

        async def one(payload: bytes) -> str:
            peer = await open_peer(pool, server)
            await peer.send(payload)
            await peer.eof
            await peer.lost
            return peer.digest.hexdigest()

        digests = await asyncio.gather(*(one(p) for p in payloads))
        assert digests == [hashlib.sha256(p).hexdigest() for p in payloads]
        assert pool.stats()["connections"] == 1
        assert pool.stats()["dials"] == 1
        assert server.stats()["handshakes"] == 1
        assert server.stats()["streams_total"] == 100
        pool.close()
        server.abort()

    run(main)


def test_idle_connections_close(mesh: Mesh) -> None:
    async def main() -> None:
        server = await echo_server(mesh)
        pool = pool_for(mesh, idle_timeout=0.2)
        peer = await open_peer(pool, server)
        await peer.send(b"ping")
        await peer.eof
        await peer.lost
        assert pool.stats()["connections"] == 1
        await asyncio.sleep(0.5)
        assert pool.stats()["connections"] == 0
        assert server.stats()["connections"] == 0
        pool.close()
        server.abort()

    run(main)


# -- identities and refusals --------------------------------------------------------------


def test_server_with_the_wrong_identity_is_refused(mesh: Mesh) -> None:
    async def main() -> None:
        server = await echo_server(mesh)
        pool = pool_for(mesh)
        expected = spiffe_id("shop", "ratings")
        with pytest.raises(PeerError) as err:
            await pool.open_stream(
                source_identity=CLIENT_ID,
                expected_identity=expected,
                peer=server.sockets[0].getsockname()[:2],
                authority="10.0.0.1:80",
                headers={},
                protocol=Peer(),
            )
        assert f"peer presented {SERVER_ID}, expected {expected}" in str(err.value)
        assert pool.stats()["connections"] == 0
        pool.close()
        server.abort()

    run(main)


def _no_cert_context(mesh: Mesh) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.check_hostname = False
    ctx.load_verify_locations(cadata=mesh.ca.bundle_pem.decode())
    ctx.set_alpn_protocols(["h2"])
    return ctx


@pytest.mark.parametrize(
    ("case", "server_says"),
    [
        ("other trust domain", "not signed by a root in our trust bundle"),
        ("expired", "peer certificate expired"),
        ("no certificate", "peer presented no client certificate"),
        ("no SPIFFE ID", "client certificate carries no SPIFFE ID"),
    ],
)
def test_bad_client_certificates_are_refused_and_others_unaffected(
    mesh: Mesh, case: str, server_says: str, caplog: pytest.LogCaptureFixture
) -> None:
    other = make_ca("other.example")
    contexts = {
        "other trust domain": lambda: client_context(
            other.issue(spiffe_id("shop", "productpage", "other.example")), mesh.ca.bundle_pem
        ),
        "expired": lambda: mesh.client_ctx(mesh.ca.expired(CLIENT_ID)),
        "no certificate": lambda: _no_cert_context(mesh),
        "no SPIFFE ID": lambda: mesh.client_ctx(mesh.ca.issue(None, dns_names=("app.local",))),
    }

    async def main() -> None:
        server = await echo_server(mesh)
        good_pool = pool_for(mesh)
        good = await open_peer(good_pool, server)  # a healthy connection, open throughout
        bad_ctx = contexts[case]()
        bad_pool = HboneClientPool(dial, lambda identity: bad_ctx)
        with pytest.raises(PeerError) as err:
            await open_peer(bad_pool, server)
        if case != "no SPIFFE ID":  # TLS itself failed: the server rejected our certificate
            assert "rejected our certificate" in str(err.value)
        for _ in range(50):
            if server.stats()["handshake_failures"]:
                break
            await asyncio.sleep(0.02)
        assert server.stats()["handshake_failures"] == 1
        warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert any(server_says in m for m in warnings), warnings
        await good.send(b"still fine")
        await good.eof
        assert good.received == len(b"still fine")
        assert server.stats()["handshakes"] == 1
        good_pool.close()
        bad_pool.close()
        server.abort()

    run(main)


def test_refusal_status_and_reason_surface_in_the_error(mesh: Mesh) -> None:
    async def main() -> None:
        async def on_connect(req: ConnectRequest) -> asyncio.BaseProtocol | ConnectRefusal:
            if req.destination[1] == 1:
                return ConnectRefusal(503, f"destination {req.authority} refused the connection")
            return ConnectRefusal(403, f"{req.peer_identity} is not allowed by policy deny-all")

        server = await start_hbone_server(listening(), mesh.server_ctx(), on_connect)
        pool = pool_for(mesh)
        with pytest.raises(PeerError) as err:
            await open_peer(pool, server, "10.0.0.1:1")
        assert "status 503: destination 10.0.0.1:1 refused the connection" in str(err.value)
        with pytest.raises(PeerError) as err:
            await open_peer(pool, server, "10.0.0.1:80")
        assert f"status 403: {CLIENT_ID} is not allowed by policy deny-all" in str(err.value)
        assert pool.stats() | {"dials": 1} == pool.stats()  # both on one connection
        assert server.stats()["streams_refused"] == 2 and server.stats()["streams"] == 0
        pool.close()
        server.abort()

    run(main)


def test_an_unanswered_connect_times_out_or_is_cancelled_and_the_connection_serves_on(
    mesh: Mesh,
) -> None:
    async def main() -> None:
        async def on_connect(req: ConnectRequest) -> asyncio.BaseProtocol | ConnectRefusal:
            if req.destination[1] == 1:
                await asyncio.sleep(30)  # the destination never answers
            return Echo()

        server = await start_hbone_server(listening(), mesh.server_ctx(), on_connect)
        pool = pool_for(mesh, response_timeout=0.3)
        started = time.monotonic()
        with pytest.raises(PeerError) as err:
            await open_peer(pool, server, "10.0.0.1:1")
        assert "did not answer CONNECT 10.0.0.1:1 within 0.3s" in str(err.value)
        assert 0.3 <= time.monotonic() - started < 5
        waiting = asyncio.ensure_future(open_peer(pool, server, "10.0.0.1:1"))
        await asyncio.sleep(0.05)
        waiting.cancel()  # the client left while its tunnel was being opened
        with pytest.raises(asyncio.CancelledError):
            await waiting
        peer = await open_peer(pool, server)  # the same connection still serves
        await peer.send(b"ping")
        await asyncio.wait_for(peer.eof, 5)
        assert peer.digest.digest() == hashlib.sha256(b"ping").digest()
        assert pool.stats()["dials"] == 1
        pool.close()
        server.abort()

    run(main)


class ResetAtOnce(asyncio.Protocol):
    """An upstream that resets as soon as it is connected (an app killed right then)."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        cast(asyncio.Transport, transport).abort()


def test_a_reset_right_after_the_answer_ends_the_stream(mesh: Mesh) -> None:
    """The 200 and the RST_STREAM arrive in one read, before the client wired the stream:
    the caller hears of it (found by tests/e2e/test_chaos.py: the client hung)."""

    async def main() -> None:
        async def on_connect(req: ConnectRequest) -> asyncio.BaseProtocol | ConnectRefusal:
            return ResetAtOnce()

        server = await start_hbone_server(listening(), mesh.server_ctx(), on_connect)
        pool = pool_for(mesh)
        told = 0
        for _ in range(5):
            try:
                peer = await open_peer(pool, server)
            except PeerError as e:
                assert "reset the stream" in str(e) and "10.0.0.1:80" in str(e), e
                told += 1
                continue
            exc = await asyncio.wait_for(peer.lost, 5)  # wired before the reset came
            assert isinstance(exc, ConnectionResetError), exc
        assert told  # the server flushes both frames at once: the case of the chaos test
        healthy = await echo_server(mesh)
        ok = await open_peer(pool, healthy)
        await ok.send(b"x" * 1000)
        await ok.eof
        assert ok.received == 1000
        pool.close()
        server.abort()
        healthy.abort()

    run(main)


def test_unreachable_port_names_the_address(mesh: Mesh) -> None:
    async def main() -> None:
        closed = socket.socket()
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
        closed.close()
        pool = pool_for(mesh)
        with pytest.raises(PeerError) as err:
            await pool.open_stream(
                source_identity=CLIENT_ID,
                expected_identity=SERVER_ID,
                peer=("127.0.0.1", port),
                authority="10.0.0.1:80",
                headers={},
                protocol=Peer(),
            )
        assert (
            f"HBONE port {port} on 127.0.0.1 unreachable: is a network policy blocking it?"
            in str(err.value)
        )
        pool.close()

    run(main)


def test_server_context_is_asked_per_connection(mesh: Mesh) -> None:
    """A rotated certificate serves new connections (and here: a new identity)."""
    rotated_id = spiffe_id("shop", "reviews-v2")
    contexts = iter([mesh.server_ctx(), mesh.server_ctx(mesh.ca.issue(rotated_id))])

    async def main() -> None:
        async def on_connect(req: ConnectRequest) -> asyncio.BaseProtocol | ConnectRefusal:
            return Echo()

        server = await start_hbone_server(listening(), lambda: next(contexts), on_connect)
        pool = pool_for(mesh)
        first = await open_peer(pool, server)
        assert first.transport is not None
        assert first.transport.get_extra_info("peer_identity") == SERVER_ID
        second = Peer()
        await pool.open_stream(
            source_identity=CLIENT_ID,
            expected_identity=rotated_id,
            peer=server.sockets[0].getsockname()[:2],
            authority="10.0.0.1:80",
            headers={},
            protocol=second,
        )
        assert second.transport is not None
        assert second.transport.get_extra_info("peer_identity") == rotated_id
        pool.close()
        server.abort()

    run(main)


# -- flow control -------------------------------------------------------------------------


class Stalled(asyncio.Protocol):
    """A server-side app that stops reading at once (until told to go on)."""

    def __init__(self) -> None:
        self.transport: HboneStream | None = None
        self.digest = hashlib.sha256()
        self.received = 0
        self.eof = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, HboneStream)
        self.transport = transport
        transport.pause_reading()

    def data_received(self, data: bytes) -> None:
        self.digest.update(data)
        self.received += len(data)

    def eof_received(self) -> bool:
        self.eof.set_result(None)
        return True


def test_a_paused_reader_bounds_buffering_and_others_keep_flowing(mesh: Mesh) -> None:
    bulk = os.urandom(32 << 20)
    other = os.urandom(4 << 20)

    async def main() -> None:
        stalled: list[Stalled] = []

        async def on_connect(req: ConnectRequest) -> asyncio.BaseProtocol | ConnectRefusal:
            if req.destination[1] == 1:
                stalled.append(Stalled())
                return stalled[-1]
            return Echo()

        server = await start_hbone_server(listening(), mesh.server_ctx(), on_connect)
        pool = pool_for(mesh)
        writer = await open_peer(pool, server, "10.0.0.1:1")
        sending = asyncio.create_task(writer.send(bulk))
        while not (writer.pauses and not writer.can_write.is_set()):
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.3)  # let everything that can move, move
        (app,) = stalled
        assert app.transport is not None and writer.transport is not None
        window = 4 << 20
        assert app.received == 0
        assert app.transport.get_read_buffer_size() <= window
        assert writer.transport.get_write_buffer_size() <= 256 * 1024 + 256 * 1024
        assert not sending.done()
        # Another stream on the same connection is not held up.
        echo = await open_peer(pool, server, "10.0.0.1:2")
        await echo.send(other)
        await echo.eof
        assert echo.digest.hexdigest() == hashlib.sha256(other).hexdigest()
        assert pool.stats()["connections"] == 1
        # The reader goes on: everything arrives.
        app.transport.resume_reading()
        await sending
        await app.eof
        assert app.received == len(bulk)
        assert app.digest.hexdigest() == hashlib.sha256(bulk).hexdigest()
        pool.close()
        server.abort()

    run(main)


# -- an HTTP/2 stack that is not ours -----------------------------------------------------


@dataclass
class ForeignResult:
    statuses: dict[int, str] = field(default_factory=dict)
    reasons: dict[int, str] = field(default_factory=dict)
    data: dict[int, bytes] = field(default_factory=dict)
    ended: set[int] = field(default_factory=set)


def foreign_client(
    port: int, ctx: ssl.SSLContext, requests: list[tuple[int, list[tuple[str, str]], bytes]]
) -> ForeignResult:
    """h2's client over a blocking ``ssl`` socket, in a thread: no code of ours."""
    result = ForeignResult()
    raw = socket.create_connection(("127.0.0.1", port), timeout=10)
    with ctx.wrap_socket(raw) as sock:
        assert sock.selected_alpn_protocol() == "h2"
        conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        conn.initiate_connection()
        for sid, headers, _ in requests:
            conn.send_headers(sid, headers, end_stream=not _)
        sock.sendall(conn.data_to_send())
        sent: set[int] = set()
        deadline = time.monotonic() + 10
        while len(result.ended) < len(requests) and time.monotonic() < deadline:
            data = sock.recv(65536)
            if not data:
                break
            for ev in conn.receive_data(data):
                if isinstance(ev, h2.events.ResponseReceived):
                    hdrs = {k.decode(): v.decode() for k, v in ev.headers}
                    assert ev.stream_id is not None
                    result.statuses[ev.stream_id] = hdrs[":status"]
                    result.reasons[ev.stream_id] = hdrs.get("x-nodeagent-reason", "")
                    body = next(b for s, _, b in requests if s == ev.stream_id)
                    if hdrs[":status"] == "200" and body and ev.stream_id not in sent:
                        sent.add(ev.stream_id)
                        conn.send_data(ev.stream_id, body, end_stream=True)
                elif isinstance(ev, h2.events.DataReceived):
                    assert ev.stream_id is not None and ev.data is not None
                    result.data[ev.stream_id] = result.data.get(ev.stream_id, b"") + ev.data
                    conn.acknowledge_received_data(ev.flow_controlled_length or 0, ev.stream_id)
                elif isinstance(ev, h2.events.StreamEnded | h2.events.StreamReset):
                    assert ev.stream_id is not None
                    result.ended.add(ev.stream_id)
            sock.sendall(conn.data_to_send())
        conn.close_connection()
        sock.sendall(conn.data_to_send())
    return result


def test_a_foreign_h2_client_can_connect_and_is_told_off_for_get(mesh: Mesh) -> None:
    body = os.urandom(60_000)  # within h2's default 64 KiB send window

    async def main() -> None:
        seen: list[ConnectRequest] = []

        async def on_connect(req: ConnectRequest) -> asyncio.BaseProtocol | ConnectRefusal:
            seen.append(req)
            return Echo()

        server = await start_hbone_server(listening(), mesh.server_ctx(), on_connect)
        port = server.sockets[0].getsockname()[1]
        ctx = mesh.client_ctx()
        result = await asyncio.get_running_loop().run_in_executor(
            None,
            foreign_client,
            port,
            ctx,
            [
                (
                    1,
                    [(":method", "CONNECT"), (":authority", "10.9.8.7:9080"), ("baggage", "k=v")],
                    body,
                ),
                (
                    3,
                    [(":method", "GET"), (":scheme", "https"), (":path", "/"), (":authority", "x")],
                    b"",
                ),
            ],
        )
        assert result.statuses == {1: "200", 3: "405"}
        assert result.data[1] == body
        assert "only CONNECT" in result.reasons[3]
        assert result.ended == {1, 3}
        (req,) = seen
        assert (req.peer_identity, req.authority, req.destination) == (
            CLIENT_ID,
            "10.9.8.7:9080",
            ("10.9.8.7", 9080),
        )
        assert req.headers["baggage"] == "k=v"
        assert server.stats()["requests_rejected"] == 1
        server.abort()

    run(main)


def test_malformed_http2_gets_goaway_on_that_connection_only(mesh: Mesh) -> None:
    def garbage(port: int, ctx: ssl.SSLContext) -> bytes:
        raw = socket.create_connection(("127.0.0.1", port), timeout=10)
        with ctx.wrap_socket(raw) as sock:
            preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"
            bad = b"\x00\x00\x04\x08\x00\x00\x00\x00\x00\x00\x00\x00\x00"  # WINDOW_UPDATE 0
            sock.sendall(preface + bad)
            received = b""
            while chunk := sock.recv(65536):
                received += chunk
            return received

    async def main() -> None:
        server = await echo_server(mesh)
        pool = pool_for(mesh)
        good = await open_peer(pool, server)
        port = server.sockets[0].getsockname()[1]
        received = await asyncio.get_running_loop().run_in_executor(
            None, garbage, port, mesh.client_ctx()
        )
        frames = []
        while len(received) >= 9:
            length = int.from_bytes(received[:3], "big")
            frames.append(received[3])
            received = received[9 + length :]
        assert frames[-1] == 0x7  # GOAWAY, then the connection closed
        assert server.stats()["protocol_errors"] == 1
        await good.send(b"unaffected")
        await good.eof
        assert good.received == len(b"unaffected")
        pool.close()
        server.abort()

    run(main)


# -- peers dying --------------------------------------------------------------------------


def test_a_dead_server_ends_only_its_own_streams(mesh: Mesh) -> None:
    async def main() -> None:
        doomed = await echo_server(mesh)
        healthy = await echo_server(mesh)
        pool = pool_for(mesh)
        on_doomed = [await open_peer(pool, doomed) for _ in range(3)]
        on_healthy = await open_peer(pool, healthy)
        assert pool.stats()["connections"] == 2
        doomed.abort()
        for peer in on_doomed:
            exc = await peer.lost
            assert isinstance(exc, PeerError) and "lost" in str(exc)
        await on_healthy.send(b"x" * 100_000)
        await on_healthy.eof
        assert on_healthy.received == 100_000
        assert pool.stats()["connections"] == 1
        pool.close()
        healthy.abort()

    run(main)


def test_a_dead_client_ends_only_its_own_streams_on_the_server(mesh: Mesh) -> None:
    async def main() -> None:
        apps: list[Echo] = []

        async def on_connect(req: ConnectRequest) -> asyncio.BaseProtocol | ConnectRefusal:
            apps.append(Echo())
            return apps[-1]

        server = await start_hbone_server(listening(), mesh.server_ctx(), on_connect)
        port = server.sockets[0].getsockname()[1]
        pool = pool_for(mesh)
        survivor = await open_peer(pool, server)
        # A foreign client opens a stream, then its process "dies": RST, no GOAWAY.
        ctx = mesh.client_ctx()
        got_200 = threading.Event()

        def die() -> None:
            raw = socket.create_connection(("127.0.0.1", port), timeout=10)
            sock = ctx.wrap_socket(raw)
            conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
            conn.initiate_connection()
            conn.send_headers(1, [(":method", "CONNECT"), (":authority", "10.0.0.5:80")])
            sock.sendall(conn.data_to_send())
            while not got_200.is_set():
                for ev in conn.receive_data(sock.recv(65536)):
                    if isinstance(ev, h2.events.ResponseReceived):
                        got_200.set()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            sock.close()

        await asyncio.get_running_loop().run_in_executor(None, die)
        victim = apps[-1]
        exc = await asyncio.wait_for(victim.lost, 5)
        assert isinstance(exc, PeerError)
        await survivor.send(b"y" * 10_000)
        await survivor.eof
        assert survivor.received == 10_000
        assert server.stats()["connections"] == 1
        pool.close()
        server.abort()

    run(main)


def test_graceful_server_close_lets_open_streams_finish(mesh: Mesh) -> None:
    async def main() -> None:
        server = await echo_server(mesh)
        addr = server.sockets[0].getsockname()[:2]
        pool = pool_for(mesh)
        open_one = await open_peer(pool, server)
        server.close()
        await asyncio.sleep(0.05)
        await open_one.send(b"z" * 300_000)  # the stream carries on after GOAWAY
        await open_one.eof
        assert open_one.received == 300_000
        await open_one.lost
        await asyncio.wait_for(server.wait_closed(), 5)
        with pytest.raises(PeerError, match="unreachable"):
            await pool.open_stream(
                source_identity=CLIENT_ID,
                expected_identity=SERVER_ID,
                peer=addr,
                authority="10.0.0.1:80",
                headers={},
                protocol=Peer(),
            )
        pool.close()

    run(main)


# -- figures ------------------------------------------------------------------------------


@pytest.fixture
def report(capsys: pytest.CaptureFixture[str]) -> Iterator[Callable[[str], None]]:
    lines: list[str] = []
    yield lines.append
    with capsys.disabled():
        for line in lines:
            print(f"\n  {line}", end="")
        print()


def test_figures_bulk_and_round_trips(mesh: Mesh, report: Callable[[str], None]) -> None:
    """Prints throughput and latency on loopback, HBONE next to plain mutual TLS between
    the same two endpoints in the same run (both ends in this process, on one CPU).
    Asserts nothing about timing."""
    total = 64 << 20

    class Sink(asyncio.Protocol):
        """Counts; says "done" once everything arrived."""

        def __init__(self) -> None:
            self.n = 0
            self.t: asyncio.Transport | None = None

        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            self.t = cast(asyncio.Transport, transport)

        def data_received(self, data: bytes) -> None:
            self.n += len(data)
            if self.n == total:
                assert self.t is not None
                self.t.write(b"done")

    async def bulk(peer: Peer) -> tuple[float, float]:
        assert peer.transport is not None
        chunk = os.urandom(256 << 10)
        t0, c0 = time.perf_counter(), time.process_time()
        for _ in range(total // len(chunk)):
            await peer.can_write.wait()
            peer.transport.write(chunk)
        while not peer.received:
            await peer.arrived.wait()
        return time.perf_counter() - t0, time.process_time() - c0

    async def round_trips(peer: Peer, n: int = 2000) -> tuple[float, float]:
        assert peer.transport is not None
        msg = b"x" * 100
        t0, c0 = time.perf_counter(), time.process_time()
        for i in range(n):
            peer.arrived.clear()
            peer.transport.write(msg)
            while peer.received < (i + 1) * len(msg):
                await peer.arrived.wait()
                peer.arrived.clear()
        return (time.perf_counter() - t0) / n, (time.process_time() - c0) / n

    async def main() -> None:
        loop = asyncio.get_running_loop()

        async def on_connect(req: ConnectRequest) -> asyncio.BaseProtocol | ConnectRefusal:
            return Sink() if req.destination[1] == 1 else Echo()

        hbone = await start_hbone_server(listening(), mesh.server_ctx(), on_connect)
        pool = pool_for(mesh)
        tls_sink = await loop.create_server(Sink, sock=listening(), ssl=mesh.server_ctx())
        tls_echo = await loop.create_server(Echo, sock=listening(), ssl=mesh.server_ctx())

        async def tls_peer(server: asyncio.base_events.Server) -> Peer:
            _, peer = await loop.create_connection(
                Peer,
                *server.sockets[0].getsockname()[:2],
                ssl=mesh.client_ctx(),
                server_hostname="127.0.0.1",
            )
            return peer

        tls_peers = [await tls_peer(tls_sink), await tls_peer(tls_echo)]
        tls_wall, tls_cpu = await bulk(tls_peers[0])
        wall, cpu = await bulk(await open_peer(pool, hbone, "10.0.0.1:1"))
        report(
            f"bulk, 64 MiB on one stream: HBONE {total / wall / 1e6:.0f} MB/s "
            f"({total / cpu / 1e6:.0f} MB/s per CPU second); plain mTLS "
            f"{total / tls_wall / 1e6:.0f} MB/s ({total / tls_cpu / 1e6:.0f}); "
            f"HBONE/plain CPU ratio {tls_cpu / cpu:.2f}"
        )
        tls_wall, tls_cpu = await round_trips(tls_peers[1])
        wall, cpu = await round_trips(await open_peer(pool, hbone, "10.0.0.1:2"))
        report(
            f"round trips, 2000 x 100 B on one stream: HBONE {wall * 1e6:.0f} µs each "
            f"({cpu * 1e6:.0f} µs CPU); plain mTLS {tls_wall * 1e6:.0f} µs "
            f"({tls_cpu * 1e6:.0f} µs CPU)"
        )
        pool.close()
        hbone.abort()
        for peer in tls_peers:
            assert peer.transport is not None
            peer.transport.close()
        await asyncio.gather(*(peer.lost for peer in tls_peers))
        tls_sink.close()
        tls_echo.close()
        await tls_sink.wait_closed()
        await tls_echo.wait_closed()

    run(main)


def test_a_connection_accepted_as_the_server_closes_is_served_by_the_next_one(
    mesh: Mesh,
) -> None:
    """A hand-over: the old server closes while it handshakes a connection it accepted,
    and a new server accepts on the same listening socket. The client's stream must not
    fail (the old server serves or refuses it gracefully, and the pool retries)."""

    async def main() -> None:
        sock = listening()
        twin = socket.socket(fileno=os.dup(sock.fileno()))  # the new agent's descriptor
        ctx = mesh.server_ctx()
        old: list[HboneServer] = []
        new: list[asyncio.Task[HboneServer]] = []

        async def on_connect(req: ConnectRequest) -> asyncio.BaseProtocol | ConnectRefusal:
            return Echo()

        def closing_context() -> ssl.SSLContext:
            # the new server starts and the old one lets go during this handshake
            new.append(asyncio.ensure_future(start_hbone_server(twin, ctx, on_connect)))
            old[0].close()
            return ctx

        old.append(await start_hbone_server(sock, closing_context, on_connect))
        addr = twin.getsockname()[:2]
        pool = pool_for(mesh)
        peer = Peer()
        await pool.open_stream(
            source_identity=CLIENT_ID,
            expected_identity=SERVER_ID,
            peer=addr,
            authority="10.0.0.1:80",
            headers={},
            protocol=peer,
        )
        await peer.send(b"q" * 1000)
        await peer.eof
        assert peer.received == 1000
        assert len(new) == 1  # the old server did accept it, and closed meanwhile
        pool.close()
        (await new[0]).abort()
        old[0].abort()

    run(main)


def test_a_closing_server_waits_for_a_handshake_it_began(mesh: Mesh) -> None:
    """An agent going away exits once its HBONE server is drained (``wait_closed``,
    ``busy``): a tunnel accepted before ``close`` but still in its TLS handshake counts.
    Before, it did not: a worker with no live connection exited under such a tunnel, and
    the CONNECTs its client had queued on it failed with 0 bytes answered."""

    async def main() -> None:
        loop = asyncio.get_running_loop()

        async def on_connect(req: ConnectRequest) -> asyncio.BaseProtocol | ConnectRefusal:
            return Echo()

        server = await start_hbone_server(listening(), mesh.server_ctx(), on_connect)
        raw = await dial(server.sockets[0].getsockname()[:2])
        for _ in range(100):  # accepted: its handshake waits for our ClientHello
            if server._tasks:
                break
            await asyncio.sleep(0.01)
        server.close()
        closed = asyncio.ensure_future(server.wait_closed())
        await asyncio.sleep(0.3)
        assert not closed.done() and server.busy()
        # the handshake completes; the server sends its GOAWAY and ends the tunnel
        peer = Peer()
        await loop.create_connection(
            lambda: peer, sock=raw, ssl=mesh.client_ctx(), server_hostname="127.0.0.1"
        )
        with contextlib.suppress(ConnectionError):
            await asyncio.wait_for(peer.eof, 5)
        assert peer.received > 0  # its SETTINGS and GOAWAY, not a cut connection
        assert peer.transport is not None
        peer.transport.close()
        await asyncio.wait_for(closed, 5)
        assert not server.busy()

    run(main)
