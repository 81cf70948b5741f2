"""The access log's writer: records are buffered even when Python's stdout is not
(``PYTHONUNBUFFERED=1``, ``python -u``), reach stdout within the flush interval, and a
shutdown flush writes what is left."""

from __future__ import annotations

import asyncio
import io
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import orjson
from hypothesis import given
from hypothesis import strategies as st

from nodeagent.telemetry.accesslog import BUFFER, AccessLog, json_plain, json_text

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


def test_a_file_gets_every_line_in_order_and_full_buffers_without_waiting(
    tmp_path: Path,
) -> None:
    path = tmp_path / "access.log"
    records = [{"path": f"/p/{i}", "pad": "x" * 1000} for i in range(100)]  # ~100 KiB

    async def main() -> bytes:
        with open(path, "ab", buffering=BUFFER) as out:
            log = AccessLog(out, flush_interval=60)
            for r in records:
                log.write(r)  # type: ignore[arg-type]  # (a record's shape is not checked)
            before_flush = path.read_bytes()
            log.flush()
        return before_flush

    before_flush = asyncio.run(main())
    lines = path.read_bytes().splitlines()
    assert [json.loads(line)["path"] for line in lines] == [r["path"] for r in records]
    # a buffer's worth went out before the timer's flush, in whole lines
    assert len(before_flush) >= BUFFER - 1100 and before_flush.endswith(b"\n")


def test_a_line_written_after_the_last_flush_reaches_the_file_at_exit(tmp_path: Path) -> None:
    # as at the agent's shutdown: the access log flushed, then a cancelled request's
    # record written, then the loop ends and the process exits
    path = tmp_path / "access.log"
    script = textwrap.dedent(
        f"""
        import asyncio
        from nodeagent.workers.inputs import access_log

        log = access_log({str(path)!r})

        async def main() -> None:
            log.write({{"path": "/before"}})
            log.flush()
            log.write({{"path": "/after"}})

        asyncio.run(main())
        """
    )
    subprocess.run([sys.executable, "-c", script], check=True, timeout=60)
    lines = [json.loads(line)["path"] for line in path.read_bytes().splitlines()]
    assert lines == ["/before", "/after"]


@given(st.text())
def test_json_text_is_what_orjson_writes_and_plain_text_needs_no_escape(s: str) -> None:
    assert f'"{json_text(s)}"'.encode() == orjson.dumps(s)
    if json_plain(s):
        assert json_text(s) == s


def test_recent_records_are_the_lines_written_parsed_back() -> None:
    log = AccessLog(io.BytesIO())
    log.write({"method": "GET", "path": '/a"b', "response_code": 200})  # type: ignore[typeddict-item]
    log.write_line(b'{"method":"POST","path":"/c\\\\d","response_code":503}\n')
    assert list(log.recent) == [
        {"method": "GET", "path": '/a"b', "response_code": 200},
        {"method": "POST", "path": "/c\\d", "response_code": 503},
    ]
