"""cgroup v2 directories of the sandbox: finding the v2 root, making, listing, killing and
removing our subtree (``<root>/nodeagent/``). Nothing outside that subtree is touched."""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import time
from pathlib import Path

from nodeagent.errors import LocalStateError
from nodeagent.sandbox.topology import CGROUP_SUBTREE

_CANDIDATES = ("/sys/fs/cgroup", "/sys/fs/cgroup/unified")


def find_root() -> Path:
    """The cgroup v2 mount: ``/sys/fs/cgroup`` (unified layout) or its ``unified`` (hybrid)."""
    for c in _CANDIDATES:
        if os.path.exists(os.path.join(c, "cgroup.controllers")):
            return Path(c)
    raise LocalStateError(
        "no cgroup v2 hierarchy at /sys/fs/cgroup or /sys/fs/cgroup/unified: mount one with "
        "`mkdir -p /sys/fs/cgroup/unified && mount -t cgroup2 none /sys/fs/cgroup/unified` "
        "(scripts/setup.sh does this)"
    )


def subtree(root: Path) -> Path:
    return root / CGROUP_SUBTREE


def create(path: Path) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise LocalStateError(f"cannot create cgroup {path}: {e}") from e


def procs(path: Path) -> list[int]:
    """PIDs directly in one cgroup (empty when it does not exist)."""
    try:
        text = (path / "cgroup.procs").read_text()
    except FileNotFoundError:
        return []
    except OSError as e:
        if e.errno == errno.ENODEV:  # removed while reading
            return []
        raise
    return [int(x) for x in text.split()]


def tree(path: Path) -> list[Path]:
    """``path`` and every cgroup below it, parents before children (empty if missing)."""
    if not path.is_dir():
        return []
    out: list[Path] = []
    for dirpath, dirnames, _ in os.walk(path):
        dirnames.sort()
        out.append(Path(dirpath))
    return out


def all_procs(path: Path) -> list[int]:
    """PIDs anywhere in the subtree at ``path``."""
    out: list[int] = []
    for cg in tree(path):
        out.extend(procs(cg))
    return out


def populated(path: Path) -> bool:
    """True while any process lives in the subtree (``cgroup.events`` ``populated 1``)."""
    try:
        for line in (path / "cgroup.events").read_text().splitlines():
            key, _, value = line.partition(" ")
            if key == "populated":
                return value.strip() == "1"
    except FileNotFoundError:
        return False
    return bool(all_procs(path))


def signal_all(path: Path, sig: int) -> None:
    for pid in all_procs(path):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)


def kill(path: Path, timeout: float = 5.0) -> None:
    """Kill every process in the subtree and wait until it is empty."""
    if not path.is_dir():
        return
    deadline = time.monotonic() + timeout
    while True:
        kill_file = path / "cgroup.kill"
        if kill_file.exists():
            try:
                kill_file.write_text("1")
            except FileNotFoundError:
                return
        else:
            signal_all(path, signal.SIGKILL)
        if not populated(path):
            return
        if time.monotonic() > deadline:
            left = all_procs(path)
            raise LocalStateError(
                f"processes {left} in cgroup {path} survived SIGKILL for {timeout:.0f}s: "
                "look at them with `ps -o pid,stat,cmd -p PID`"
            )
        time.sleep(0.05)


def wait_empty(path: Path, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while populated(path):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def remove_tree(path: Path, timeout: float = 5.0) -> list[str]:
    """rmdir the subtree deepest first; return the directories that could not be removed."""
    failed: list[str] = []
    for cg in reversed(tree(path)):
        deadline = time.monotonic() + timeout
        while True:
            try:
                cg.rmdir()
                break
            except FileNotFoundError:
                break
            except OSError as e:
                if e.errno == errno.EBUSY and time.monotonic() < deadline:
                    time.sleep(0.05)
                    continue
                failed.append(f"{cg} ({e.strerror})")
                break
    return failed
