"""Traffic that an agent upgrade must not disturb, run inside a sandbox pod
(``sandbox exec POD -- python upgradeclient.py HOST PORT``) against a TCP echo server.

Until its stdin closes it keeps two things going:

- a new connection every ``--every`` seconds (on a schedule, concurrently), each sending
  a random request, half-closing and checking that the echoed answer is exactly the
  request (any error is a failure);
- one long stream: random bytes sent at ``--rate`` bytes/s while the echo is read back;
  when stdin closes the stream half-closes and drains, and the SHA-256 of what came back
  must be that of what was sent (the echo server got every byte, in order).

Then it prints one JSON line: connections made, failures (with the first errors and when
they happened), the stream's byte count and digests.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import socket
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor


def one_connection(host: str, port: int) -> None:
    """One connection: a random request, half-close, the echo must be exactly it."""
    request = os.urandom(64)
    with socket.create_connection((host, port), timeout=5) as s:
        s.sendall(request)
        s.shutdown(socket.SHUT_WR)
        answer = b""
        while chunk := s.recv(4096):
            answer += chunk
    if answer != request:
        raise ValueError(f"answer of {len(answer)} bytes is not the request")


def connections(
    host: str, port: int, every: float, stop: threading.Event, out: dict[str, object]
) -> None:
    """Start a connection every ``every`` seconds (on a schedule, whatever the others
    take); record when each successful one started (``time.monotonic``, the system's
    clock: the test compares it with its own) and every failure."""
    made: list[float] = []
    errors: list[str] = []
    failed = 0
    lock = threading.Lock()

    def run(started: float) -> None:
        nonlocal failed
        try:
            one_connection(host, port)
        except (OSError, ValueError) as e:
            with lock:
                failed += 1
                if len(errors) < 10:
                    errors.append(f"at {started:.3f}: {e!r}")
            return
        with lock:
            made.append(round(started, 3))

    with ThreadPoolExecutor(max_workers=64) as pool:
        next_at = time.monotonic()
        while not stop.is_set():
            pool.submit(run, time.monotonic())
            next_at += every
            time.sleep(max(0.0, next_at - time.monotonic()))
    out.update(made=len(made), failed=failed, errors=errors, starts=sorted(made))


def stream(
    host: str, port: int, rate: float, stop: threading.Event, out: dict[str, object]
) -> None:
    sent, got = hashlib.sha256(), hashlib.sha256()
    counts = {"sent": 0, "received": 0}
    error = ""
    try:
        s = socket.create_connection((host, port), timeout=30)
    except OSError as e:
        out.update(ok=False, error=repr(e))
        return

    def reader() -> None:
        nonlocal error
        try:
            while chunk := s.recv(1 << 16):
                got.update(chunk)
                counts["received"] += len(chunk)
        except OSError as e:
            error = repr(e)

    r = threading.Thread(target=reader)
    r.start()
    chunk_size = 16384
    t0 = time.monotonic()
    try:
        while not stop.is_set():
            data = os.urandom(chunk_size)
            s.sendall(data)
            sent.update(data)
            counts["sent"] += len(data)
            ahead = counts["sent"] / rate - (time.monotonic() - t0)
            if ahead > 0:
                time.sleep(ahead)
        s.shutdown(socket.SHUT_WR)
    except OSError as e:
        error = repr(e)
    r.join(60)
    s.close()
    out.update(
        ok=not error and sent.hexdigest() == got.hexdigest(),
        error=error,
        seconds=round(time.monotonic() - t0, 1),
        sha256_sent=sent.hexdigest(),
        sha256_echoed=got.hexdigest(),
        **counts,
    )


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("host")
    ap.add_argument("port", type=int)
    ap.add_argument("--every", type=float, default=0.01)
    ap.add_argument("--rate", type=float, default=2e6)
    args = ap.parse_args()
    stop = threading.Event()
    conns: dict[str, object] = {}
    long: dict[str, object] = {}
    threads = [
        threading.Thread(target=connections, args=(args.host, args.port, args.every, stop, conns)),
        threading.Thread(target=stream, args=(args.host, args.port, args.rate, stop, long)),
    ]
    for t in threads:
        t.start()
    print("started", flush=True)
    sys.stdin.read()  # until the test closes our stdin
    stop.set()
    for t in threads:
        t.join(90)
    print(json.dumps({"connections": conns, "stream": long}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
