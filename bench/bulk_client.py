"""Bulk download client for ``bench/run.py``: one keep-alive HTTP/1.1 connection that fetches
the same large file again and again for a fixed time, reading into a 1 MiB buffer so the
client's own per-byte cost stays far below any proxy's.

Run inside the client pod (``run.py`` does this), prints one JSON line::

    python bench/bulk_client.py HOST PORT PATH SECONDS
    {"bytes": 1073741824, "seconds": 5.01, "files": 8}

Only complete files are counted; the clock stops after the file that crosses ``SECONDS``.
Exits 1 (with a message on stderr) on a non-200 answer, a short body or a socket error.
"""

from __future__ import annotations

import json
import socket
import sys
import time

BUF = 1 << 20
HEAD_LIMIT = 64 * 1024


def _read_head(sock: socket.socket) -> tuple[int, bytes]:
    """Read up to the end of the response head; return (Content-Length, body bytes read)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("connection closed before the response head")
        data += chunk
        if len(data) > HEAD_LIMIT:
            raise ConnectionError("response head larger than 64 KiB")
    head, _, rest = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = lines[0].split(" ", 2)
    if len(status) < 2 or status[1] != "200":
        raise ConnectionError(f"unexpected status line {lines[0]!r}")
    for line in lines[1:]:
        name, _, value = line.partition(":")
        if name.strip().lower() == "content-length":
            return int(value.strip()), rest
    raise ConnectionError("response without Content-Length")


def download(host: str, port: int, path: str, seconds: float) -> dict[str, float]:
    request = f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUser-Agent: bench\r\n\r\n".encode()
    buf = bytearray(BUF)
    view = memoryview(buf)
    total = 0
    files = 0
    with socket.create_connection((host, port), timeout=30) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        start = time.perf_counter()
        deadline = start + seconds
        while True:
            sock.sendall(request)
            length, rest = _read_head(sock)
            remaining = length - len(rest)
            while remaining > 0:
                n = sock.recv_into(view[: min(remaining, BUF)])
                if n == 0:
                    raise ConnectionError(f"connection closed with {remaining} bytes missing")
                remaining -= n
            total += length
            files += 1
            if time.perf_counter() >= deadline:
                break
        elapsed = time.perf_counter() - start
    return {"bytes": total, "seconds": elapsed, "files": files}


def main(argv: list[str]) -> int:
    if len(argv) != 4:
        print("usage: bulk_client.py HOST PORT PATH SECONDS", file=sys.stderr)
        return 2
    host, port, path, seconds = argv[0], int(argv[1]), argv[2], float(argv[3])
    try:
        result = download(host, port, path, seconds)
    except (OSError, ValueError) as e:
        print(f"bulk_client: {host}:{port}{path}: {e}", file=sys.stderr)
        return 1
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
