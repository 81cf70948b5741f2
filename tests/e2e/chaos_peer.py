"""Both ends of the chaos test's transfers (tests/e2e/test_chaos.py), run inside pods.

``serve --port P``: a digest server. Per connection: a header (``MAGIC``, up length, down
length, transfer id), ``up`` bytes, the client's sha256 of them; it answers the sha256 of
what it received, ``down`` random bytes and their sha256, then closes. Every accepted
connection is logged with its peer address, the transfer id (or the first bytes, when
they are not a header), and the interface and TTL its first bytes came with: a proxy on
the app's node (in the pod, or in the node's netns) reaches it without crossing a
router (TTL 64); a connection around the mesh from another node crosses two (TTL 62).

``load --target HOST:PORT --count N --workers W --rate R --seed S --marker M``: N
transfers over W threads, each a new connection, transfer i not started before i/R s.
One JSON line per transfer on stdout: id, sizes, outcome (``ok``, or the visible failure:
``refused``, ``reset``, ``eof``, ``timeout``, ``error``, or ``corrupt`` for bytes that
arrived whole but wrong), start and end times (``CLOCK_MONOTONIC``, comparable with the
test's), the local port (to find the connection in the agents' logs). A worker waits
``BACKOFF`` seconds after a failure, as a retrying client would. Every payload carries
``marker`` every ``MARKER_EVERY`` bytes, so a capture of cleartext would contain it.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import socket
import struct
import sys
import threading
import time

MAGIC = b"CHAOSv1 "
HEADER = struct.Struct("!8sQQQ")
MARKER_EVERY = 1024
IP_TTL = 2
IP_PKTINFO = 8
IP_PKTOPTIONS = 9
IP_RECVTTL = 12
"""Linux: with ``IP_PKTINFO`` and ``IP_RECVTTL`` on, ``getsockopt(IP_PKTOPTIONS)`` of a TCP
socket gives the interface and the TTL of the last packet it received."""
BACKOFF = 2.0
TIMEOUT = 20.0
_print_lock = threading.Lock()


def emit(obj: dict[str, object]) -> None:
    with _print_lock:
        sys.stdout.write(json.dumps(obj) + "\n")
        sys.stdout.flush()


def recv_exact(s: socket.socket, n: int, h: hashlib._Hash | None = None) -> bytes | None:
    """``n`` bytes (hashed into ``h`` and dropped when given); None at EOF before them."""
    buf = bytearray()
    left = n
    while left:
        d = s.recv(min(left, 262144))
        if not d:
            return None
        left -= len(d)
        if h is not None:
            h.update(d)
        else:
            buf += d
    return bytes(buf)


# -- the server ----------------------------------------------------------------------------


def ingress(c: socket.socket) -> dict[str, int]:
    """``ifindex`` (1 is ``lo``) and ``ttl`` of the last packet that arrived on ``c``."""
    raw = c.getsockopt(socket.IPPROTO_IP, IP_PKTOPTIONS, 256)
    out = {}
    i = 0
    while i + 16 <= len(raw):  # struct cmsghdr {size_t len; int level; int type;}
        length, level, ctype = struct.unpack_from("@Qii", raw, i)
        if level == socket.IPPROTO_IP and ctype == IP_PKTINFO and length >= 28:
            out["ifindex"] = int(struct.unpack_from("@i", raw, i + 16)[0])
        elif level == socket.IPPROTO_IP and ctype == IP_TTL and length >= 20:
            out["ttl"] = int(struct.unpack_from("@i", raw, i + 16)[0])
        i += max((length + 7) & ~7, 16)
    return out


def serve_one(c: socket.socket, peer: str) -> None:
    with c:
        c.settimeout(TIMEOUT)
        try:
            head = recv_exact(c, HEADER.size)
            if head is None or not head.startswith(MAGIC):
                first = (head or b"")[:32].hex()
                emit({"accept": peer, "first": first, "id": None, **ingress(c)})
                return
            _, up, down, tid = HEADER.unpack(head)
            emit({"accept": peer, "id": tid, **ingress(c)})
            h = hashlib.sha256()
            if recv_exact(c, up, h) is None:
                emit({"short": tid})
                return
            theirs = recv_exact(c, 32)
            ours = h.digest()
            if theirs != ours:
                emit({"badup": tid})
                return
            body = os.urandom(down)
            c.sendall(ours + body + hashlib.sha256(body).digest())
            emit({"done": tid})
        except OSError as e:
            emit({"oserror": str(e), "id": None})


def serve(port: int) -> None:
    ls = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    ls.setsockopt(socket.IPPROTO_IP, IP_PKTINFO, 1)  # inherited by accepted sockets
    ls.setsockopt(socket.IPPROTO_IP, IP_RECVTTL, 1)
    ls.bind(("0.0.0.0", port))
    ls.listen(128)
    while True:
        c, addr = ls.accept()
        threading.Thread(target=serve_one, args=(c, f"{addr[0]}:{addr[1]}"), daemon=True).start()


# -- the load ------------------------------------------------------------------------------


def payload(rng: random.Random, n: int, marker: bytes) -> bytes:
    b = bytearray(rng.randbytes(n))
    for i in range(0, n - len(marker), MARKER_EVERY):
        b[i : i + len(marker)] = marker
    return bytes(b)


def transfer(host: str, port: int, tid: int, data: bytes, down: int, local: list[int]) -> str:
    try:
        s = socket.create_connection((host, port), timeout=TIMEOUT)
        local.append(s.getsockname()[1])
    except ConnectionRefusedError:
        return "refused"
    except TimeoutError:
        return "timeout"
    except ConnectionResetError:
        return "reset"
    except OSError:
        return "error"
    try:
        with s:
            digest = hashlib.sha256(data).digest()
            s.sendall(HEADER.pack(MAGIC, len(data), down, tid) + data + digest)
            theirs = recv_exact(s, 32)
            if theirs is None:
                return "eof"
            if theirs != digest:
                return "corrupt"
            h = hashlib.sha256()
            if recv_exact(s, down, h) is None:
                return "eof"
            trailer = recv_exact(s, 32)
            if trailer is None:
                return "eof"
            if trailer != h.digest():
                return "corrupt"
            if s.recv(1):
                return "corrupt"  # more than was sent
            return "ok"
    except ConnectionRefusedError:
        return "refused"
    except (ConnectionResetError, BrokenPipeError):
        return "reset"
    except TimeoutError:
        return "timeout"
    except OSError:
        return "error"


def load(
    host: str, port: int, count: int, workers: int, rate: float, seed: int, marker: bytes
) -> None:
    plan = random.Random(seed)
    # log-uniform sizes: many small transfers, some of a few MiB
    jobs = [
        (i, int(2 ** plan.uniform(10, 21)), int(2 ** plan.uniform(10, 17)), plan.getrandbits(64))
        for i in range(count)
    ]
    lock = threading.Lock()
    start = time.monotonic()

    def worker() -> None:
        while True:
            with lock:
                if not jobs:
                    return
                tid, up, down, pseed = jobs.pop(0)
            time.sleep(max(0.0, start + tid / rate - time.monotonic()))
            data = payload(random.Random(pseed), up, marker)
            t0 = time.monotonic()
            local: list[int] = []
            outcome = transfer(host, port, tid, data, down, local)
            t1 = time.monotonic()
            emit({"id": tid, "up": up, "down": down, "outcome": outcome, "t0": t0, "t1": t1,
                  "port": local[0] if local else 0})
            if outcome != "ok":
                time.sleep(BACKOFF)

    threads = [threading.Thread(target=worker) for _ in range(workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def main() -> None:
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("serve")
    s.add_argument("--port", type=int, required=True)
    ld = sub.add_parser("load")
    ld.add_argument("--target", required=True)
    ld.add_argument("--count", type=int, required=True)
    ld.add_argument("--workers", type=int, required=True)
    ld.add_argument("--rate", type=float, required=True)
    ld.add_argument("--seed", type=int, required=True)
    ld.add_argument("--marker", required=True)
    a = ap.parse_args()
    if a.cmd == "serve":
        serve(a.port)
    else:
        host, _, port = a.target.rpartition(":")
        load(host, int(port), a.count, a.workers, a.rate, a.seed, a.marker.encode())


if __name__ == "__main__":
    main()
