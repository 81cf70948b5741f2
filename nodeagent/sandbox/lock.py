"""The sandbox's lock: one sandbox per machine, so everything that brings one up (the
end-to-end tests' session, ``bench/run.py`` and the benches built on it) holds
``/run/nodeagent/e2e.lock`` while it runs, and finds it already held when an enclosing
``flock /run/nodeagent/e2e.lock CMD`` took it for them."""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Callable, Iterator
from pathlib import Path

LOCK_FILE = "/run/nodeagent/e2e.lock"


def _ancestors() -> set[int]:
    """This process's pid and its ancestors'."""
    pids: set[int] = set()
    pid = os.getpid()
    while pid > 1 and pid not in pids:
        pids.add(pid)
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            break
        pid = int(stat[stat.rfind(")") + 2 :].split()[1])
    return pids


def held_by_us(path: str = LOCK_FILE) -> bool:
    """True when an enclosing ``flock PATH cmd`` (our process or an ancestor) holds it."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False
    # the fd `flock` passes down: locking it again on the same open file succeeds at once
    for name in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError, ValueError):
            fd = int(name)
            fst = os.fstat(fd)
            if (fst.st_dev, fst.st_ino) == (st.st_dev, st.st_ino):
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    return True
                except BlockingIOError:
                    pass
    # `flock -o` closes it in the child: look for an ancestor among the holders
    dev = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    ancestors = _ancestors()
    with contextlib.suppress(OSError):
        for line in Path("/proc/locks").read_text().splitlines():
            parts = line.split()
            if (
                len(parts) >= 6
                and parts[1] == "FLOCK"
                and parts[5] == dev
                and int(parts[4]) in ancestors
            ):
                return True
    return False


@contextlib.contextmanager
def sandbox_lock(
    path: str = LOCK_FILE, waiting: Callable[[str], None] | None = None
) -> Iterator[None]:
    """Hold ``path`` (waiting for another sandbox user to let go; ``waiting`` hears of
    it), unless an enclosing ``flock`` holds it for us already."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    if held_by_us(path):
        yield
        return
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if waiting is not None:
                waiting(f"waiting for {path} (another sandbox user holds it)")
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)
