"""CPU per MB of a bulk transfer through both nodes' proxies over HBONE: the figure of
issue 20's bulk target, without the sandbox and steadier than MB/s on a shared VM.

One process runs the loopback rig of ``tests/integration/test_proxy_loopback.py`` (the
real ``Proxy`` of node1 and of node2, mutual TLS between them; only the socket factory and
the capture are loopback stand-ins) and nothing else: the app that sends the bytes and
the client that reads them (1 MiB ``recv_into``, as ``bulk_client.py``) are child
processes, so the process's CPU time (``getrusage``) is the two proxies' alone. The bytes
go app → node2's inbound → HBONE → node1's outbound → client (a download, as
``run.py``'s bulk test); the client checks their SHA-256.

    .venv/bin/python bench/bulk_cost.py                    # CPU µs per MB, 3 transfers of 256 MB
    .venv/bin/python bench/bulk_cost.py --profile out.prof # + cProfile of the proxies
    .venv/bin/python bench/bulk_cost.py --callgrind        # user-space instructions per MB
    .venv/bin/python bench/bulk_cost.py --plain            # the plain TCP hop instead
    .venv/bin/python bench/bulk_cost.py --default-malloc   # glibc's thresholds (heap.py)

``--callgrind`` counts what load on the box cannot move: the difference between two
transfer sizes under valgrind, divided by the extra MB (start-up removed).
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import gc
import hashlib
import os
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MB = 1_000_000
BUF = 1 << 20
CHUNK = bytes(range(256)) * 4096  # 1 MiB the app sends again and again


def _pattern(n: int) -> str:
    """The SHA-256 of the ``n`` bytes the app sends."""
    h = hashlib.sha256()
    full, rest = divmod(n, len(CHUNK))
    for _ in range(full):
        h.update(CHUNK)
    h.update(CHUNK[:rest])
    return h.hexdigest()


def _source(n: int) -> int:
    """Child: listen on loopback, print the port, send ``n`` bytes to the one client."""
    with socket.create_server(("127.0.0.1", 0)) as srv:
        print(srv.getsockname()[1], flush=True)
        conn, _ = srv.accept()
        with conn:
            view = memoryview(CHUNK)
            left = n
            while left:
                k = conn.send(view[: min(left, len(view))])
                left -= k
                view = view[k:] if k < len(view) else memoryview(CHUNK)
            conn.shutdown(socket.SHUT_WR)
            conn.recv(1)
    return 0


def _sink(fd: int, n: int) -> int:
    """Child: read from the inherited socket to EOF; exit 1 unless ``n`` bytes of the
    pattern arrived."""
    sock = socket.socket(fileno=fd)
    sock.setblocking(True)
    buf = bytearray(BUF)
    view = memoryview(buf)
    h = hashlib.sha256()
    total = 0
    while k := sock.recv_into(view):
        h.update(view[:k])
        total += k
    sock.close()
    if total != n or h.hexdigest() != _pattern(n):
        print(f"sink: {total} bytes of {n}, digest wrong or short", file=sys.stderr)
        return 1
    return 0


def _syscalls() -> int:
    """Read and write system calls of this process so far (``/proc/self/io``)."""
    with open("/proc/self/io") as f:
        fields = dict(line.split(": ") for line in f.read().splitlines())
    return int(fields["syscr"]) + int(fields["syscw"])


async def _transfer(rig: object, n: int, loopback: object) -> tuple[float, int, int]:
    """One download of ``n`` bytes through the rig; the proxies' CPU seconds it took,
    their minor page faults and their read and write system calls."""
    src = await asyncio.create_subprocess_exec(
        sys.executable, __file__, "--source", str(n), stdout=subprocess.PIPE
    )
    assert src.stdout is not None
    port = int((await src.stdout.readline()).decode())
    net = rig.net  # type: ignore[attr-defined]
    net.apps[(loopback.SERVER_IP, loopback.TCP_PORT)] = ("127.0.0.1", port)  # type: ignore[attr-defined]
    listener = net.listeners[(loopback.CLIENT_IP, loopback.OUTBOUND_PORT)]  # type: ignore[attr-defined]
    sock = await net.dial(listener, (loopback.SERVICE_IP, loopback.TCP_PORT))  # type: ignore[attr-defined]
    before = resource.getrusage(resource.RUSAGE_SELF)
    calls = _syscalls()
    sink = await asyncio.create_subprocess_exec(
        sys.executable, __file__, "--sink", str(sock.fileno()), str(n), pass_fds=[sock.fileno()]
    )
    sock.close()
    rc = await sink.wait()
    after = resource.getrusage(resource.RUSAGE_SELF)
    calls = _syscalls() - calls
    await src.wait()
    if rc != 0:
        raise SystemExit("the sink did not get the bytes intact")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return cpu, after.ru_minflt - before.ru_minflt, calls


async def _inner(sizes: list[int], mtls: bool, profile: str | None, tune: bool) -> None:
    sys.path[:0] = [str(ROOT / "tests" / "integration"), str(ROOT / "tests")]
    import test_proxy_loopback as loopback  # the rig of the integration tests

    from nodeagent.app import GC_THRESHOLDS
    from nodeagent.heap import tune_malloc

    inputs = loopback.ProxyInputs  # under valgrind a handshake takes seconds
    loopback.ProxyInputs = lambda **kw: inputs(**{**kw, "connect_timeout": 120.0})
    with tempfile.TemporaryDirectory(prefix="bulkcost-") as tmp:
        rig = loopback.Rig(Path(tmp), mtls)
        await rig.start()
        try:
            await _transfer(rig, 4 * MB, loopback)  # the tunnel up, the caches warm
            gc.freeze()  # as the agent does once started (app.py)
            gc.set_threshold(*GC_THRESHOLDS)
            if tune:
                tune_malloc()  # as the agent does (app.py)
            prof = cProfile.Profile() if profile else None
            for n in sizes:
                if prof is not None:
                    prof.enable()
                t0 = time.perf_counter()
                cpu, faults, calls = await _transfer(rig, n, loopback)
                wall = time.perf_counter() - t0
                if prof is not None:
                    prof.disable()
                print(
                    f"{n / MB:8.0f} MB  {cpu / (n / MB) * 1e6:8.0f} µs CPU per MB"
                    f"  {faults / (n / MB):6.1f} page faults, {calls / (n / MB):5.1f} reads and"
                    f" writes per MB  {n / MB / wall:6.1f} MB/s",
                    flush=True,
                )
            if prof is not None and profile is not None:
                prof.dump_stats(profile)
        finally:
            await rig.close()


def _instructions(argv: list[str]) -> int:
    from l4_cost import instructions  # (this directory is the script's: sys.path[0])

    return instructions(argv, None, "")


def main() -> int:
    ap = argparse.ArgumentParser(prog="bench/bulk_cost.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("--source", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--sink", nargs=2, type=int, help=argparse.SUPPRESS)
    ap.add_argument("--inner", help=argparse.SUPPRESS)
    ap.add_argument("--mb", type=int, default=256, help="MB per transfer (default 256)")
    ap.add_argument("--times", type=int, default=3, help="transfers (default 3)")
    ap.add_argument("--plain", action="store_true", help="the plain TCP hop, not HBONE")
    ap.add_argument("--profile", metavar="FILE", help="write a cProfile of the transfers")
    ap.add_argument("--callgrind", action="store_true", help="instructions per MB (valgrind)")
    ap.add_argument(
        "--default-malloc", action="store_true", help="glibc's thresholds, not the agent's"
    )
    a = ap.parse_args()
    if a.source is not None:
        return _source(a.source)
    if a.sink is not None:
        return _sink(*a.sink)
    import uvloop

    if a.inner is not None:
        sizes = [int(x) for x in a.inner.split(",")]
        uvloop.run(_inner(sizes, not a.plain, a.profile, not a.default_malloc))
        return 0
    if not a.callgrind:
        uvloop.run(_inner([a.mb * MB] * a.times, not a.plain, a.profile, not a.default_malloc))
        return 0
    if shutil.which("valgrind") is None:
        print("--callgrind needs valgrind")
        return 2
    small, large = 4 * MB, 20 * MB
    base = [sys.executable, __file__] + (["--plain"] if a.plain else [])
    base += ["--default-malloc"] if a.default_malloc else []
    n_small = _instructions([*base, "--inner", str(small)])
    n_large = _instructions([*base, "--inner", str(large)])
    per_mb = (n_large - n_small) / ((large - small) / MB)
    hop = "plain TCP" if a.plain else "HBONE (mTLS)"
    print(f"both proxies, {hop} hop: {per_mb:,.0f} instructions per MB (user space, callgrind)")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONHASHSEED", "0")
    raise SystemExit(main())
