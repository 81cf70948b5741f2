"""The relay on loopback (no privileges): bytes intact, half-close, back-pressure, and a
broken upstream ends only its own connection."""

from __future__ import annotations

import asyncio
import hashlib
import os
import socket
import struct
from collections.abc import Awaitable, Callable

import pytest
import uvloop

from nodeagent.proxy.connections import ConnectionTable
from nodeagent.proxy.relay import ClientSide, Relay, UpstreamSide
from nodeagent.telemetry.metrics import Metrics


async def echo_server(reset_after: int | None = None) -> asyncio.base_events.Server:
    async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        seen = 0
        while data := await r.read(65536):
            seen += len(data)
            if reset_after is not None and seen >= reset_after:
                sock = w.get_extra_info("socket")
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                w.transport.abort()
                return
            w.write(data)
            await w.drain()
        w.write_eof()  # half-close: done sending after the client's EOF
        await w.drain()
        w.close()

    return await asyncio.start_server(handle, "127.0.0.1", 0)


async def relay_server(
    table: ConnectionTable, upstream: tuple[str, int], opened: list[Relay] | None = None
) -> asyncio.base_events.Server:
    """A relay to ``upstream``; each connection's ``Relay`` is appended to ``opened``."""
    loop = asyncio.get_running_loop()

    def make() -> ClientSide:
        relay = table.open({"direction": "test"})
        if opened is not None:
            opened.append(relay)

        async def dial(side: ClientSide) -> None:
            await loop.create_connection(lambda: UpstreamSide(relay), *upstream)

        return ClientSide(relay, lambda side: loop.create_task(dial(side)) and None)

    return await loop.create_server(make, "127.0.0.1", 0)


async def send_all_and_hash(port: int, payload: bytes) -> tuple[str, bool]:
    r, w = await asyncio.open_connection("127.0.0.1", port)
    got = hashlib.sha256()

    async def reader() -> None:
        while data := await r.read(262144):
            got.update(data)

    task = asyncio.create_task(reader())
    for i in range(0, len(payload), 1 << 20):
        w.write(payload[i : i + (1 << 20)])
        await w.drain()
    w.write_eof()
    await task
    eof = r.at_eof()
    w.close()
    return got.hexdigest(), eof


def run(main: Callable[[], Awaitable[None]]) -> None:
    uvloop.run(asyncio.wait_for(main(), 60))


def test_bytes_arrive_intact_both_ways_with_half_close() -> None:
    payload = os.urandom(8 << 20)

    async def main() -> None:
        table = ConnectionTable(Metrics())
        echo = await echo_server()
        relay = await relay_server(table, echo.sockets[0].getsockname()[:2])
        port = relay.sockets[0].getsockname()[1]
        digest, eof = await send_all_and_hash(port, payload)
        assert digest == hashlib.sha256(payload).hexdigest()
        assert eof
        await asyncio.sleep(0.05)
        assert table.live == {}

    run(main)


def test_many_concurrent_connections() -> None:
    async def main() -> None:
        table = ConnectionTable(Metrics())
        echo = await echo_server()
        relay = await relay_server(table, echo.sockets[0].getsockname()[:2])
        port = relay.sockets[0].getsockname()[1]
        payloads = [os.urandom(32768 + i) for i in range(200)]
        results = await asyncio.gather(*(send_all_and_hash(port, p) for p in payloads))
        assert [d for d, _ in results] == [hashlib.sha256(p).hexdigest() for p in payloads]

    run(main)


def test_upstream_reset_ends_only_that_connection() -> None:
    async def main() -> None:
        table = ConnectionTable(Metrics())
        good = await echo_server()
        bad = await echo_server(reset_after=1 << 20)
        relay_good = await relay_server(table, good.sockets[0].getsockname()[:2])
        relay_bad = await relay_server(table, bad.sockets[0].getsockname()[:2])
        payload = os.urandom(4 << 20)
        ok_task = asyncio.create_task(
            send_all_and_hash(relay_good.sockets[0].getsockname()[1], payload)
        )
        with pytest.raises((ConnectionError, AssertionError)):
            digest, _ = await send_all_and_hash(relay_bad.sockets[0].getsockname()[1], payload)
            assert digest == hashlib.sha256(payload).hexdigest()
        digest, eof = await ok_task
        assert digest == hashlib.sha256(payload).hexdigest() and eof

    run(main)


def test_relay_counts_bytes() -> None:
    async def main() -> None:
        table = ConnectionTable(Metrics())
        echo = await echo_server()
        relays: list[Relay] = []
        relay = await relay_server(table, echo.sockets[0].getsockname()[:2], relays)
        await send_all_and_hash(relay.sockets[0].getsockname()[1], b"x" * 12345)
        await asyncio.sleep(0.05)
        assert (relays[0].bytes_sent, relays[0].bytes_received) == (12345, 12345)
        assert relays[0].close_reason == "done"

    run(main)


def test_upstream_done_first_then_the_client_both_get_everything_and_a_clean_eof() -> None:
    """The upstream half-closes first (a greeting, then FIN); the client reads it to EOF
    and only then sends and half-closes: the relay forwards each FIN (the second by
    closing both sides), the upstream reads the client's bytes and an EOF, not a reset."""

    async def main() -> None:
        table = ConnectionTable(Metrics())
        heard: list[bytes] = []
        finished = asyncio.Event()

        async def greet_then_listen(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            w.write(b"hello\n")
            w.write_eof()
            heard.append(await r.read())  # to EOF: a reset would raise here
            w.close()
            finished.set()

        upstream = await asyncio.start_server(greet_then_listen, "127.0.0.1", 0)
        relays: list[Relay] = []
        relay = await relay_server(table, upstream.sockets[0].getsockname()[:2], relays)
        r, w = await asyncio.open_connection("127.0.0.1", relay.sockets[0].getsockname()[1])
        assert await r.read() == b"hello\n"  # the upstream's FIN came through
        w.write(b"x" * 100_000)
        w.write_eof()
        await asyncio.wait_for(finished.wait(), 10)
        assert await r.read() == b""
        w.close()
        await asyncio.sleep(0.05)
        assert heard == [b"x" * 100_000]
        assert (relays[0].close_reason, relays[0].bytes_sent) == ("done", 100_000)
        assert table.live == {}

    run(main)
