"""Many concurrent echo connections from one process, run inside a sandbox pod
(``sandbox exec POD -- python manyconns.py HOST PORT --conns N``): one asyncio loop, one
non-blocking socket per connection, no threads.

1. Opens N connections (at most ``--parallel`` being opened at once), sends each its own
   payload (its index and random bytes) and compares what comes back; then prints
   ``{"event": "open", "ok": ..., "failed": ..., "errors": [...], "seconds": ...}`` and
   holds every connection open, idle.
2. On a line (or EOF) on stdin: sends each still-open connection a second payload of its
   own and compares the echo (it still carries its own bytes), half-closes it and expects
   the echo server's EOF (nothing was left over or lost); prints
   ``{"event": "done", "ok": ..., "failed": ..., "errors": [...], "seconds": ...}``.

Failures are reported per connection (the first few errors, and a count), never raised,
so a test asserts on counts. Raises its own open-files limit to the hard limit.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import socket
import sys
import time

PAYLOAD = 64
"""Bytes per payload: 8 of the connection's index, the rest random."""


def payload(index: int, round_: int) -> bytes:
    return f"{round_}:{index:06d}".encode().ljust(16, b".") + os.urandom(PAYLOAD - 16)


async def recv_exact(loop: asyncio.AbstractEventLoop, sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        data = await loop.sock_recv(sock, n - len(buf))
        if not data:
            raise ConnectionError(f"EOF after {len(buf)} of {n} echoed bytes")
        buf += data
    return bytes(buf)


class Conns:
    def __init__(self, host: str, port: int, timeout: float) -> None:
        self.host = host
        self.port = port
        self.timeout = timeout
        self.socks: dict[int, socket.socket] = {}
        self.errors: dict[int, str] = {}

    def fail(self, i: int, stage: str, e: BaseException) -> None:
        self.errors[i] = f"{stage}: {e!r}"
        sock = self.socks.pop(i, None)
        if sock is not None:
            sock.close()

    async def echo(self, i: int, round_: int) -> None:
        loop = asyncio.get_running_loop()
        sock = self.socks[i]
        sent = payload(i, round_)
        await loop.sock_sendall(sock, sent)
        got = await recv_exact(loop, sock, len(sent))
        if got != sent:
            raise ValueError(f"echoed {got[:16]!r}..., sent {sent[:16]!r}...")

    async def open_one(self, i: int, gate: asyncio.Semaphore) -> None:
        loop = asyncio.get_running_loop()
        async with gate:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setblocking(False)
            self.socks[i] = sock
            try:
                async with asyncio.timeout(self.timeout):
                    await loop.sock_connect(sock, (self.host, self.port))
                    await self.echo(i, 1)
            except (OSError, ValueError, TimeoutError) as e:
                self.fail(i, "open", e)

    async def check_one(self, i: int, gate: asyncio.Semaphore) -> None:
        loop = asyncio.get_running_loop()
        async with gate:
            try:
                async with asyncio.timeout(self.timeout):
                    await self.echo(i, 2)
                    self.socks[i].shutdown(socket.SHUT_WR)
                    rest = await loop.sock_recv(self.socks[i], 1024)
                    if rest:
                        raise ValueError(f"{len(rest)} bytes past the echo before EOF")
            except (OSError, ValueError, TimeoutError) as e:
                self.fail(i, "check", e)
                return
            self.socks.pop(i).close()

    def report(self, event: str, n: int, started: float) -> str:
        errors = sorted(self.errors.items())
        return json.dumps(
            {
                "event": event,
                "ok": n - len(errors),
                "failed": len(errors),
                "errors": [f"#{i} {e}" for i, e in errors[:5]],
                "seconds": round(time.monotonic() - started, 2),
            }
        )


def raise_nofile() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


async def run(args: argparse.Namespace) -> int:
    conns = Conns(args.host, args.port, args.timeout)
    gate = asyncio.Semaphore(args.parallel)
    started = time.monotonic()
    await asyncio.gather(*(conns.open_one(i, gate) for i in range(args.conns)))
    print(conns.report("open", args.conns, started), flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    started = time.monotonic()
    await asyncio.gather(*(conns.check_one(i, gate) for i in sorted(conns.socks)))
    print(conns.report("done", args.conns, started), flush=True)
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("host")
    p.add_argument("port", type=int)
    p.add_argument("--conns", type=int, default=10_000)
    p.add_argument("--parallel", type=int, default=200, help="connections opened at once")
    p.add_argument("--timeout", type=float, default=30.0, help="seconds per connection step")
    args = p.parse_args()
    raise_nofile()
    return asyncio.run(run(args))


if __name__ == "__main__":
    sys.exit(main())
