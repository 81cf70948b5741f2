"""The access log's writer: records are buffered even when Python's stdout is not
(``PYTHONUNBUFFERED=1``, ``python -u``), reach stdout within the flush interval, and a
shutdown flush writes what is left."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

# Runs with ``python -u``: stdout is swapped for a pipe (same fd 1) whose read end the
# script watches with FIONREAD, and reports what it saw on stderr as JSON.
SCRIPT = textwrap.dedent(
    """
    import asyncio, fcntl, json, os, sys, termios
    from nodeagent.telemetry.accesslog import AccessLog

    r, w = os.pipe()
    os.dup2(w, 1)
    os.set_blocking(r, False)

    def pending() -> int:
        return int.from_bytes(fcntl.ioctl(r, termios.FIONREAD, b"\\0" * 4), "little")

    def record(i: int) -> dict:
        return {"method": "GET", "path": f"/item/{i}", "response_code": 200}

    async def main() -> dict:
        log = AccessLog(flush_interval=0.3)
        seen = {}
        for i in range(50):
            log.write(record(i))
        seen["before_interval"] = pending()
        await asyncio.sleep(0.6)
        seen["after_interval"] = pending()
        lines = os.read(r, 1 << 20).decode().splitlines()
        seen["paths"] = [json.loads(line)["path"] for line in lines]
        log.write(record(50))
        log.flush()  # what the agent's shutdown does
        seen["after_close_flush"] = os.read(r, 1 << 20).decode()
        return seen

    sys.stderr.write(json.dumps(asyncio.run(main())))
    """
)


def test_records_are_buffered_even_with_unbuffered_stdout_and_flushed_in_time() -> None:
    p = subprocess.run(
        [sys.executable, "-u", "-c", SCRIPT], capture_output=True, text=True, timeout=30
    )
    assert p.returncode == 0, p.stderr
    seen = json.loads(p.stderr)
    # one write per flush, not a system call per request
    assert seen["before_interval"] == 0
    assert seen["after_interval"] > 0
    assert seen["paths"] == [f"/item/{i}" for i in range(50)]
    assert json.loads(seen["after_close_flush"])["path"] == "/item/50"
