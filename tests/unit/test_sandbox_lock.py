"""The sandbox lock: taken once per machine, and found held when an enclosing
``flock FILE cmd`` took it (before, an e2e run under ``flock`` waited for itself)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

USER = """
import sys
import time
from nodeagent.sandbox.lock import sandbox_lock
with sandbox_lock(sys.argv[1], lambda m: print(m, flush=True)):
    print("inside", flush=True)
"""


def _user(lock: Path, *wrap: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [*wrap, sys.executable, "-c", USER, str(lock)],
        stdout=subprocess.PIPE,
        text=True,
    )


def test_an_enclosing_flock_is_ours(tmp_path: Path) -> None:
    lock = tmp_path / "e2e.lock"
    lock.touch()
    for wrap in (("flock", str(lock)), ("flock", "-o", str(lock))):
        out, _ = _user(lock, *wrap).communicate(timeout=20)
        assert out.splitlines() == ["inside"], (wrap, out)


def test_another_holder_is_waited_for(tmp_path: Path) -> None:
    lock = tmp_path / "e2e.lock"
    lock.touch()
    # a sibling holds it (an ancestor holding it would count as ours)
    holder = subprocess.Popen(  # -o: only flock holds it, sleep has no fd of it
        ["flock", "-o", str(lock), "sleep", "30"], start_new_session=True
    )
    try:
        for _ in range(100):
            if str(holder.pid) in Path("/proc/locks").read_text().split():
                break
            time.sleep(0.05)
        p = _user(lock)
        assert p.stdout is not None
        assert p.stdout.readline().startswith(f"waiting for {lock}")
        assert p.poll() is None  # still waiting while the sibling holds it
    finally:
        os.killpg(holder.pid, signal.SIGKILL)
        holder.wait()
    out, _ = p.communicate(timeout=20)
    assert out.splitlines() == ["inside"]
