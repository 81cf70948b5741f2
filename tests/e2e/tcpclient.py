"""A TCP test client run inside a sandbox pod (``sandbox exec POD -- python tcpclient.py``).

Prints one JSON line with what happened, so tests assert on digests, not on timing.

- ``echo HOST PORT --bytes N --conns C``: C concurrent connections each send N random
  bytes, half-close, read everything back until EOF; digests compared per connection.
- ``stream HOST PORT --seconds S``: send and read back continuously for S seconds, then
  half-close and drain; reports whether every byte came back (or the error that ended it).
- ``serve PORT``: (for a non-mesh host) accept one connection, read until EOF, answer
  ``{"peer": ..., "sha256": ...}`` and close.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import socket
import sys
import time


async def one_echo(host: str, port: int, n: int) -> dict[str, object]:
    payload = os.urandom(n)
    sent = hashlib.sha256(payload).hexdigest()
    got = hashlib.sha256()
    received = 0
    try:
        r, w = await asyncio.open_connection(host, port, limit=1 << 20)

        async def reader() -> None:
            nonlocal received
            while data := await r.read(1 << 18):
                got.update(data)
                received += len(data)

        task = asyncio.create_task(reader())
        view = memoryview(payload)
        for i in range(0, n, 1 << 20):
            w.write(view[i : i + (1 << 20)])
            await w.drain()
        w.write_eof()
        await task
        w.close()
    except OSError as e:
        return {"ok": False, "error": repr(e), "received": received}
    return {
        "ok": got.hexdigest() == sent,
        "sent": sent,
        "got": got.hexdigest(),
        "received": received,
    }


async def echo(args: argparse.Namespace) -> dict[str, object]:
    res = await asyncio.gather(
        *(one_echo(args.host, args.port, args.bytes) for _ in range(args.conns))
    )
    failed = [r for r in res if not r["ok"]]
    return {
        "ok": len(res) - len(failed),
        "failed": failed[:5],
        "nfailed": len(failed),
        "results": res[:2],
    }


async def stream(args: argparse.Namespace) -> dict[str, object]:
    sent = hashlib.sha256()
    got = hashlib.sha256()
    nsent = nrecv = 0
    start = time.monotonic()
    try:
        r, w = await asyncio.open_connection(args.host, args.port)
        eof = asyncio.Event()

        async def reader() -> None:
            nonlocal nrecv
            while data := await r.read(1 << 16):
                got.update(data)
                nrecv += len(data)
            eof.set()

        task = asyncio.create_task(reader())
        print(json.dumps({"event": "connected"}), flush=True)
        while time.monotonic() - start < args.seconds and not eof.is_set():
            chunk = os.urandom(16384)
            sent.update(chunk)
            nsent += len(chunk)
            w.write(chunk)
            await w.drain()
            await asyncio.sleep(0.01)
        if eof.is_set():
            return {
                "ok": False,
                "error": "EOF from upstream mid-stream",
                "sent": nsent,
                "received": nrecv,
                "elapsed": time.monotonic() - start,
            }
        w.write_eof()
        await asyncio.wait_for(task, 30)
        w.close()
    except (TimeoutError, OSError) as e:
        return {
            "ok": False,
            "error": repr(e),
            "sent": nsent,
            "received": nrecv,
            "elapsed": time.monotonic() - start,
        }
    return {
        "ok": sent.hexdigest() == got.hexdigest() and nsent == nrecv,
        "sent": nsent,
        "received": nrecv,
        "elapsed": time.monotonic() - start,
    }


def serve(args: argparse.Namespace) -> dict[str, object]:
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("0.0.0.0", args.port))
    srv.listen(8)
    print(json.dumps({"event": "listening"}), flush=True)
    conn, peer = srv.accept()
    h = hashlib.sha256()
    while data := conn.recv(1 << 16):
        h.update(data)
    answer = {"peer": peer[0], "sha256": h.hexdigest()}
    conn.sendall(json.dumps(answer).encode())
    conn.close()
    return answer


def main() -> int:
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="mode", required=True)
    e = sub.add_parser("echo")
    e.add_argument("host")
    e.add_argument("port", type=int)
    e.add_argument("--bytes", type=int, default=65536)
    e.add_argument("--conns", type=int, default=1)
    s = sub.add_parser("stream")
    s.add_argument("host")
    s.add_argument("port", type=int)
    s.add_argument("--seconds", type=float, default=5)
    v = sub.add_parser("serve")
    v.add_argument("port", type=int)
    args = p.parse_args()
    if args.mode == "serve":
        out = serve(args)
    else:
        out = asyncio.run(echo(args) if args.mode == "echo" else stream(args))
    print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
