"""Instructions per new connection (or, with ``--l7``, per keep-alive HTTP request) through
both nodes' proxies, counted by callgrind: the figures for ``Connection: close`` and L7
keep-alive workloads that this VM's speed swings cannot move.

One process runs the loopback rig of ``tests/integration/test_proxy_loopback.py`` (the
real ``Proxy`` of node1 and of node2, built from YAML by the agent's loader; only the
socket factory and the capture are loopback stand-ins) and a client that opens N
connections one after the other to the Service's TCP port, each sending a few bytes,
half-closing and reading the echo to EOF: outbound listener → node2's inbound (plain TCP,
or HBONE with ``--mtls``) → the echo app. Each case runs for two values of N; the
difference divided by the extra connections removes start-up; the same client straight
to the echo app is subtracted, leaving the two proxies' share (and the rig's stand-ins
for capture, a dictionary lookup and a loopback connect). User space only: the kernel's
work per connection is not counted.

``--l7`` measures what ``bench/run.py --l7`` sets up: the Service's HTTP port with a
VirtualService route match (rule ``bench``, ``uri: {prefix: /}``), mTLS between the nodes;
the client sends N GETs one after the other on one keep-alive connection: node1's L7 path
(route, policy, metrics, access log, the upstream pool) → HBONE → node2, which relays the
stream's bytes (no HTTP policy or spans for the server, as in run.py) → the HTTP app. The
same client straight to the app is subtracted. Only the N requests are counted (callgrind's
instrumentation is switched on after a first request and off after the last, with
``callgrind_control``): the start of the rig, its TLS handshakes and certificates, some
2.8G instructions that vary by tens of millions from run to run, would otherwise be
subtracted from itself, a noise of tens of thousands per request.

    .venv/bin/python bench/l4_cost.py                 # plain TCP hop and HBONE; ~3 minutes
    .venv/bin/python bench/l4_cost.py --l7            # L7 keep-alive through HBONE; ~2 minutes
    .venv/bin/python bench/l4_cost.py --keep DIR      # + callgrind files for callgrind_annotate
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SMALL, LARGE = 100, 400
"""Connections in the two runs of a case (their difference is what is counted)."""
PAYLOAD = b"GET / HTTP/1.1\r\nHost: echo\r\nConnection: close\r\n\r\n"
REQUEST = b"GET /productpage HTTP/1.1\r\nHost: echo\r\nUser-Agent: wrk\r\nAccept: */*\r\n\r\n"
"""``--l7``: the keep-alive request (its answer: ``hello from server: /productpage``)."""
ROUTE = """
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: echo, namespace: default}
spec:
  hosts: [echo.default.svc.cluster.local]
  http:
  - name: bench
    match: [{uri: {prefix: /}}]
    route: [{destination: {host: echo.default.svc.cluster.local, port: {number: 80}}}]
"""
"""``--l7``: bench/run.py's route match, on the rig's HTTP Service port."""


def _instrument(on: bool) -> None:
    """Callgrind's instrumentation of this process on or off (``--l7``'s counted window)."""
    cmd = ["callgrind_control", "-i", "on" if on else "off", str(os.getpid())]
    subprocess.run(cmd, check=True, capture_output=True, timeout=120)


async def _requests(r: asyncio.StreamReader, w: asyncio.StreamWriter, n: int) -> None:
    """N keep-alive GETs one after the other, each answer read whole."""
    want = b"hello from server: /productpage"
    for _ in range(n):
        w.write(REQUEST)
        head = await r.readuntil(b"\r\n\r\n")
        m = re.search(rb"(?i)\r\ncontent-length: *(\d+)", head)
        if m is None or not head.startswith(b"HTTP/1.1 200"):
            raise SystemExit(f"unexpected response: {head[:200]!r}")
        if (body := await r.readexactly(int(m.group(1)))) != want:
            raise SystemExit(f"unexpected body: {body[:200]!r}")


async def _inner(n: int, mtls: bool, direct: bool, l7: bool = False) -> None:
    """The measured process: the two proxies (the rig) and the client."""
    sys.path[:0] = [str(ROOT / "tests" / "integration"), str(ROOT / "tests")]
    import test_proxy_loopback as loopback  # the rig of the integration tests

    # under callgrind a TLS handshake takes seconds: the rig's 2 s timeout would cut it
    inputs = loopback.ProxyInputs
    loopback.ProxyInputs = lambda **kw: inputs(**{**kw, "connect_timeout": 120.0})
    with tempfile.TemporaryDirectory(prefix="l4cost-") as tmp:
        rig = loopback.Rig(Path(tmp), mtls)
        await rig.start()
        try:
            if l7:
                rig.apply(ROUTE)
                if direct:
                    app = rig.net.apps[(loopback.SERVER_IP, loopback.HTTP_PORT)]
                    r, w = await asyncio.open_connection(*app)
                else:
                    r, w = await rig.connect((loopback.SERVICE_IP, 80))
                await _requests(r, w, 1)  # the connections, tunnel and pool: not counted
                _instrument(True)
                await _requests(r, w, n)
                _instrument(False)
                w.close()
                if not direct:
                    _l7_seen(rig, n + 1)
                return
            echo = rig.net.apps[(loopback.SERVER_IP, loopback.TCP_PORT)]
            for _ in range(n):
                if direct:
                    r, w = await asyncio.open_connection(*echo)
                else:
                    r, w = await rig.connect((loopback.SERVICE_IP, loopback.TCP_PORT))
                w.write(PAYLOAD)
                w.write_eof()
                got = b""
                while data := await r.read(65536):
                    got += data
                if got != PAYLOAD:
                    raise SystemExit(f"echo came back as {got!r}")
                w.close()
            if rig.echo.accepted != n:
                raise SystemExit(f"the echo app saw {rig.echo.accepted} connections, not {n}")
        finally:
            await rig.close()


def _l7_seen(rig: object, n: int) -> None:
    """node1 counted the requests under the VirtualService rule: it took its L7 path (node2,
    with no HTTP policy or spans for the server, relays the tunnel's bytes, as in run.py)."""
    seen: dict[str, float] = {}
    for family in rig.metrics["node1"].registry.collect():  # type: ignore[attr-defined]
        for sample in family.samples:
            if sample.name == "istio_requests_total":
                seen[sample.labels.get("route_name", "")] = sample.value
    if seen != {"bench": n}:
        raise SystemExit(f"node1 counted {seen} requests by route, not {n} under 'bench'")


def instructions(argv: list[str], keep: Path | None, name: str, window: bool = False) -> int:
    """User-space instructions callgrind counts running ``argv`` (``l7_cost.py`` too);
    with ``window``, only while ``argv`` has switched the instrumentation on."""
    out_file = str(keep / f"callgrind.{name}") if keep else "/dev/null"
    start = ["--instr-atstart=no"] if window else []
    # a fixed hash seed: dictionary probes otherwise move a run by ~10k per connection
    env = {**os.environ, "PYTHONHASHSEED": os.environ.get("PYTHONHASHSEED", "0")}
    out = subprocess.run(
        ["valgrind", "--tool=callgrind", *start, f"--callgrind-out-file={out_file}", *argv],
        env=env,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    m = re.search(r"Collected : (\d+)", out.stderr)
    if out.returncode != 0 or m is None:
        raise SystemExit(f"callgrind failed ({out.returncode}): {out.stderr[-2000:]}")
    return int(m.group(1))


def _per_unit(mtls: bool, direct: bool, keep: Path | None, l7: bool = False) -> float:
    """Instructions per connection (per request with ``l7``): two runs, the difference."""

    def run(n: int) -> int:
        argv = [sys.executable, __file__, "--inner", str(n)]
        argv += ["--mtls"] if mtls else []
        argv += ["--direct"] if direct else []
        argv += ["--l7"] if l7 else []
        kind = "l7" if l7 else "mtls" if mtls else "plain"
        return instructions(argv, keep, f"{kind}-{'direct' if direct else 'mesh'}-{n}", l7)

    return (run(LARGE) - run(SMALL)) / (LARGE - SMALL)


def main() -> int:
    ap = argparse.ArgumentParser(prog="bench/l4_cost.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("--inner", type=int, metavar="N", help=argparse.SUPPRESS)
    ap.add_argument("--direct", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--mtls", action="store_true", help="only the HBONE hop (default: both)")
    ap.add_argument("--plain", action="store_true", help="only the plain TCP hop")
    ap.add_argument("--l7", action="store_true", help="per keep-alive request, L7 through HBONE")
    ap.add_argument("--keep", type=Path, help="write the callgrind files into this directory")
    a = ap.parse_args()
    if a.inner is not None:
        import uvloop

        uvloop.run(_inner(a.inner, a.mtls or a.l7, a.direct, a.l7))
        return 0
    if shutil.which("valgrind") is None:
        print("bench/l4_cost.py needs valgrind (apt-get install valgrind)")
        return 2
    if a.keep:
        a.keep.mkdir(parents=True, exist_ok=True)
    if a.l7:
        client = _per_unit(True, True, a.keep, l7=True)
        through = _per_unit(True, False, a.keep, l7=True)
        print("Both proxies, instructions per keep-alive request (callgrind, user space only):")
        label = "L7 through HBONE"
        print(f"  {label:<18} {through - client:>11,.0f}   (client alone {client:,.0f})")
        return 0
    hops = [m for m, on in ((False, not a.mtls), (True, not a.plain)) if on] or [False, True]
    client = _per_unit(False, True, a.keep)
    print("Both proxies, instructions per new connection (callgrind, user space only):")
    for mtls in hops:
        through = _per_unit(mtls, False, a.keep)
        label = "HBONE (mTLS) hop" if mtls else "plain TCP hop"
        print(f"  {label:<18} {through - client:>11,.0f}   (client alone {client:,.0f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
