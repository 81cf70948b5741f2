"""Instructions per new connection through both nodes' proxies, counted by callgrind: the
figure for ``Connection: close`` workloads that this VM's speed swings cannot move.

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

    .venv/bin/python bench/l4_cost.py                 # plain TCP hop and HBONE; ~3 minutes
    .venv/bin/python bench/l4_cost.py --keep DIR      # + callgrind files for callgrind_annotate
"""

from __future__ import annotations

import argparse
import asyncio
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


async def _inner(n: int, mtls: bool, direct: bool) -> None:
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


def _instructions(argv: list[str], keep: Path | None, name: str) -> int:
    out_file = str(keep / f"callgrind.{name}") if keep else "/dev/null"
    out = subprocess.run(
        ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out_file}", *argv],
        capture_output=True,
        text=True,
        timeout=1800,
    )
    m = re.search(r"Collected : (\d+)", out.stderr)
    if out.returncode != 0 or m is None:
        raise SystemExit(f"callgrind failed ({out.returncode}): {out.stderr[-2000:]}")
    return int(m.group(1))


def _per_connection(mtls: bool, direct: bool, keep: Path | None) -> float:
    def run(n: int) -> int:
        argv = [sys.executable, __file__, "--inner", str(n)]
        argv += ["--mtls"] if mtls else []
        argv += ["--direct"] if direct else []
        name = f"{'mtls' if mtls else 'plain'}-{'direct' if direct else 'mesh'}-{n}"
        return _instructions(argv, keep, name)

    return (run(LARGE) - run(SMALL)) / (LARGE - SMALL)


def main() -> int:
    ap = argparse.ArgumentParser(prog="bench/l4_cost.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("--inner", type=int, metavar="N", help=argparse.SUPPRESS)
    ap.add_argument("--direct", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--mtls", action="store_true", help="only the HBONE hop (default: both)")
    ap.add_argument("--plain", action="store_true", help="only the plain TCP hop")
    ap.add_argument("--keep", type=Path, help="write the callgrind files into this directory")
    a = ap.parse_args()
    if a.inner is not None:
        import uvloop

        uvloop.run(_inner(a.inner, a.mtls, a.direct))
        return 0
    if shutil.which("valgrind") is None:
        print("bench/l4_cost.py needs valgrind (apt-get install valgrind)")
        return 2
    if a.keep:
        a.keep.mkdir(parents=True, exist_ok=True)
    hops = [m for m, on in ((False, not a.mtls), (True, not a.plain)) if on] or [False, True]
    client = _per_connection(False, True, a.keep)
    print("Both proxies, instructions per new connection (callgrind, user space only):")
    for mtls in hops:
        through = _per_connection(mtls, False, a.keep)
        label = "HBONE (mTLS) hop" if mtls else "plain TCP hop"
        print(f"  {label:<18} {through - client:>11,.0f}   (client alone {client:,.0f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
