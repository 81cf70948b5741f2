"""Where an idle proxied connection's memory goes in the two agents: tracemalloc of the
real ``Proxy`` pair on loopback (``tests/integration/test_proxy_loopback.py``'s rig: node1
and node2 in this process, HBONE with mutual TLS between them), holding ``--conns`` idle
connections to a TCP echo in another process.

    .venv/bin/python bench/conn_memory.py                 # 2,000 connections, ~30 s, no root

Prints the Python allocations added per connection (both agents together: halve for one)
by what holds them, the allocation sites that add the most, and what one of each
per-connection object measures (``sys.getsizeof``). What tracemalloc cannot see is left
out: OpenSSL's own allocations (per TLS connection, not per stream) and the kernel's
socket buffers (not in RSS). Set ``NODEAGENT_PURE=1`` to measure the pure-Python modules
(the compiled ones allocate the same objects, without their frames). One client identity
holds at most 6,400 streams to one server (64 HBONE connections of 100 streams): keep
``--conns`` below that. ``bench/conns10k.py`` measures the RSS of real agents.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import gc
import linecache
import resource
import socket
import subprocess
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "integration"))

import uvloop
from test_proxy_loopback import CLIENT_IP, SERVER_IP, SERVICE_IP, TCP_PORT, Rig

from nodeagent.proxy.inputs import OUTBOUND_PORT

ROOT = Path(__file__).resolve().parents[1]

WARM = 200
"""Connections opened before the first snapshot: pools, HBONE connections, caches."""

ECHO = """\
import asyncio, sys
class Echo(asyncio.Protocol):
    def connection_made(self, t): self.t = t
    def data_received(self, d): self.t.write(d)
async def main():
    srv = await asyncio.get_running_loop().create_server(Echo, "127.0.0.1", 0, backlog=4096)
    print(srv.sockets[0].getsockname()[1], flush=True)
    await asyncio.sleep(3600)
asyncio.run(main())
"""

PARTS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("h2 and HBONE stream state", ("/h2/", "/hpack/", "protocol/hbone.py", "protocol/h2base.py")),
    ("HboneStream (a stream's transport)", ("proxy/hbone.py",)),
    (
        "relay, its meta, connection table, labels",
        ("proxy/connections.py", "proxy/relay.py", "telemetry/", "model/", "peerlabels.py"),
    ),
    ("socket transports (uvloop, in C)", ("asyncio/runners.py",)),
    ("the bench's client sockets", ("test_proxy_loopback.py", "conn_memory.py")),
)
"""What holds an allocation, by where it was made (a substring of its file name), the
first that matches wins; see ``part_of`` for the connections' TLS and transports."""
TLS = "TLS of the HBONE connections (one per 100 streams)"
OTHER = "the rest: closures, futures, CONNECT requests, authz inputs, ..."


def part_of(frames: Sequence[tracemalloc.Frame]) -> str:
    """Which part of ``PARTS`` (or ``TLS``) an allocation with this traceback is."""
    for f in frames:
        if "nodeagent/proxy/" in f.filename:
            line = linecache.getline(f.filename, f.lineno)
            if "create_connection(" in line or "connect_accepted_socket(" in line:
                return TLS if "hbone" in f.filename else "socket transports (uvloop, in C)"
    site = frames[-1].filename
    for name, needles in PARTS:
        if any(n in site for n in needles):
            return name
    return OTHER


def short(frame: tracemalloc.Frame) -> str:
    name = frame.filename.split("site-packages/")[-1].split(str(ROOT) + "/")[-1]
    return f"{name}:{frame.lineno}"


async def hold(rig: Rig, conns: int, first: int, socks: list[socket.socket]) -> None:
    """Open ``conns`` connections through node1's outbound listener, each echoing once."""
    loop = asyncio.get_running_loop()
    listener = rig.net.listeners[(CLIENT_IP, OUTBOUND_PORT)]
    gate = asyncio.Semaphore(100)

    async def one(i: int) -> None:
        async with gate:
            s = await rig.net.dial(listener, (SERVICE_IP, TCP_PORT))
            sent = b"%08d" % i
            await loop.sock_sendall(s, sent)
            got = b""
            while len(got) < len(sent):
                data = await loop.sock_recv(s, len(sent) - len(got))
                if not data:
                    raise ConnectionError(f"connection {i} closed before its echo")
                got += data
            if got != sent:
                raise ConnectionError(f"connection {i} echoed {got!r}, sent {sent!r}")
            socks.append(s)

    await asyncio.gather(*(one(i) for i in range(first, first + conns)))


def sizes() -> list[str]:
    """``sys.getsizeof`` of one of each per-connection object (and its dicts)."""
    from h2.stream import H2Stream

    from nodeagent.proxy.hbone import HboneStream
    from nodeagent.proxy.relay import Relay

    out: list[str] = []
    seen: set[type] = set()
    for o in gc.get_objects():
        kind = type(o)
        if kind in seen:
            continue
        if isinstance(o, HboneStream):
            out.append(
                f"HboneStream {sys.getsizeof(o)} B, its extra info {sys.getsizeof(o._info)} B "
                f"(CONNECT headers {sys.getsizeof(o._info['headers'])} B), receive deque "
                f"{sys.getsizeof(o._rbuf)} B"
            )
        elif isinstance(o, H2Stream):
            out.append(
                f"h2 H2Stream {sys.getsizeof(o)} B + __dict__ {sys.getsizeof(o.__dict__)} B "
                f"+ state machine {sys.getsizeof(o.state_machine)} B"
            )
        elif isinstance(o, Relay):
            meta = o.meta
            out.append(
                f"Relay {sys.getsizeof(o)} B, its meta {sys.getsizeof(meta)} B ({len(meta)} keys)"
            )
        else:
            continue
        seen.add(kind)
    return out


async def measure(conns: int, top: int) -> None:
    echo = subprocess.Popen([sys.executable, "-c", ECHO], stdout=subprocess.PIPE, text=True)
    try:
        assert echo.stdout is not None
        echo_port = int(echo.stdout.readline())
        with tempfile.TemporaryDirectory(prefix="na-connmem-") as tmp:
            rig = Rig(Path(tmp), mtls=True)
            await rig.start()
            rig.net.apps[(SERVER_IP, TCP_PORT)] = ("127.0.0.1", echo_port)
            socks: list[socket.socket] = []
            try:
                await hold(rig, WARM, 0, socks)
                gc.collect()
                tracemalloc.start(8)
                before = tracemalloc.take_snapshot()
                started = time.monotonic()
                await hold(rig, conns, WARM, socks)
                took = time.monotonic() - started
                await asyncio.sleep(0.5)
                gc.collect()
                after = tracemalloc.take_snapshot()
                tracemalloc.stop()
                report(after.compare_to(before, "traceback"), conns, took, top)
                print("\n".join(["one of each:", *("  " + s for s in sizes())]))
            finally:
                for s in socks:
                    s.close()
                await rig.close()
    finally:
        echo.kill()
        echo.wait()


def report(stats: list[tracemalloc.StatisticDiff], conns: int, took: float, top: int) -> None:
    parts: collections.Counter[str] = collections.Counter()
    sites: collections.Counter[str] = collections.Counter()
    for st in stats:
        if st.size_diff <= 0:
            continue
        frames = list(st.traceback)  # (oldest first: the last is where it was allocated)
        parts[part_of(frames)] += st.size_diff
        sites[short(frames[-1])] += st.size_diff
    total = sum(parts.values())
    print(f"{conns} idle connections held (opened in {took:.1f} s), both agents together:")
    print(f"  {total / conns:7.0f} B per connection traced by tracemalloc")
    for name, size in parts.most_common():
        print(f"  {size / conns:7.0f}  {name}")
    print("top allocation sites (B per connection):")
    for site, size in sites.most_common(top):
        print(f"  {size / conns:7.0f}  {site}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--conns", type=int, default=2000, help="idle connections to hold (< 6,400)")
    p.add_argument("--top", type=int, default=15, help="allocation sites to list")
    args = p.parse_args(argv)
    # four descriptors per connection in this process: client, two agents' sockets, tunnel
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    uvloop.run(measure(args.conns, args.top))
    return 0


if __name__ == "__main__":
    sys.exit(main())
