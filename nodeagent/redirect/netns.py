"""Network namespaces: enter one for the calling thread, make a socket inside one, or
run a command inside one (``run_in``: iptables, ip, sysctl).

A socket keeps the netns it was created in, so the agent (living in its node's netns)
creates listeners and upstream sockets inside pod netns by switching the calling thread
with ``setns(2)`` just for the ``socket()`` call, and switching back.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import socket
import threading
import time
from pathlib import Path

from nodeagent.errors import LocalStateError

CLONE_NEWNET = 0x40000000
NETNS_DIR = Path("/var/run/netns")

_libc = ctypes.CDLL(None, use_errno=True)
_lock = threading.Lock()
SOCKET_BATCH = 8
"""IPv4 TCP sockets a ``NetnsHandle`` makes per pair of ``setns`` calls, at first."""
SOCKET_BATCH_MAX = 32
"""The most it makes at once: a busy pod's batch doubles up to this (a pair of ``setns``
costs more than a ``socket`` call; a spare socket holds ~3 KB of kernel memory)."""
BUSY_REFILL = 1.0
"""Seconds: a batch used up within this after it was made doubles the next one; a
slower pod's batch goes back to ``SOCKET_BATCH``."""


class _Socket(socket.socket):
    """``socket.socket`` (inside ``NetnsHandle``, ``socket`` names its method) whose
    ``setblocking`` makes no system call when the socket is already in that mode: the
    event loop sets every socket it is handed non-blocking again (an ``ioctl`` per
    proxied connection), though these are made ``SOCK_NONBLOCK``."""

    __slots__ = ()

    def setblocking(self, flag: bool) -> None:
        if flag or self.gettimeout() != 0.0:
            super().setblocking(flag)


async def run_in(netns: str, argv: list[str], stdin: str | None = None) -> str:
    """``argv`` inside ``netns`` (a path) through ``nsenter``, fed ``stdin``; its output,
    or ``LocalStateError`` naming the command, the netns and what it said. In the calling
    thread's own netns (host mode) ``argv`` runs as it is: entering a netns takes
    ``CAP_SYS_ADMIN``, which the host's systemd unit does not grant."""
    cmd = list(argv) if is_current(netns) else ["nsenter", f"--net={netns}", *argv]
    try:
        proc = await asyncio.create_subprocess_exec(
            *cmd,
            stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
    except OSError as e:  # nsenter itself missing
        raise LocalStateError(f"cannot run nsenter {' '.join(argv)}: {e}") from None
    out, err = await proc.communicate(stdin.encode() if stdin is not None else None)
    if proc.returncode != 0:
        raise LocalStateError(
            f"{' '.join(argv)} in netns {netns} failed (exit {proc.returncode}): "
            f"{err.decode(errors='replace').strip()}"
        )
    return out.decode()


def _same(a: os.stat_result, b: os.stat_result) -> bool:
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def is_current(netns: str) -> bool:
    """Whether ``netns`` (a name or path) is the calling thread's own network namespace."""
    try:
        return _same(os.stat(netns_path(netns)), os.stat("/proc/thread-self/ns/net"))
    except OSError:
        return False


def netns_path(name_or_path: str) -> str:
    """``na-n-node1`` → ``/var/run/netns/na-n-node1``; a path is returned unchanged."""
    return name_or_path if "/" in name_or_path else str(NETNS_DIR / name_or_path)


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise LocalStateError(f"setns failed: {os.strerror(err)}")


def enter(name_or_path: str) -> None:
    """Move the calling thread (at start: the whole agent) into a netns for good."""
    path = netns_path(name_or_path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise LocalStateError(f"network namespace {path} does not exist") from None
    try:
        _setns(fd)
    finally:
        os.close(fd)


class NetnsHandle:
    """An open handle on a netns, to create sockets inside it cheaply and repeatedly."""

    def __init__(self, name_or_path: str) -> None:
        self.path = netns_path(name_or_path)
        try:
            self.fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            raise LocalStateError(f"network namespace {self.path} does not exist") from None
        self._home = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        self._spare: list[_Socket] = []
        self.batch = SOCKET_BATCH
        """IPv4 TCP sockets the next batch makes (``SOCKET_BATCH`` … ``SOCKET_BATCH_MAX``)."""
        self._made_at = 0.0
        """When the last batch was made (``time.monotonic``)."""
        self._here = _same(os.fstat(self._home), os.fstat(self.fd))
        """The netns is the agent's own (host mode): no ``setns``, which would need
        ``CAP_SYS_ADMIN``."""

    def socket(self, family: int = socket.AF_INET, type: int = socket.SOCK_STREAM) -> _Socket:
        """A new socket that lives in this netns. IPv4 TCP sockets (one per proxied
        connection) are made in batches (``SOCKET_BATCH``, doubled up to
        ``SOCKET_BATCH_MAX`` while the pod uses them up within ``BUSY_REFILL``): one pair of
        ``setns`` calls, not two per connection; non-blocking (``SOCK_NONBLOCK``: no ``setblocking``
        system call after); and ``IPPROTO_TCP`` by name, so that asyncio's own loop sets
        ``TCP_NODELAY`` on their transports as uvloop's does on every TCP socket."""
        if family != socket.AF_INET or type != socket.SOCK_STREAM:
            return self._make(family, type, 1)[0]
        try:
            return self._spare.pop()
        except IndexError:
            pass
        now = time.monotonic()
        busy = now - self._made_at < BUSY_REFILL
        self.batch = min(self.batch * 2, SOCKET_BATCH_MAX) if busy else SOCKET_BATCH
        self._made_at = now
        batch = self._make(family, type | socket.SOCK_NONBLOCK, self.batch, socket.IPPROTO_TCP)
        s = batch.pop()
        self._spare.extend(batch)
        return s

    def _make(self, family: int, type: int, n: int, proto: int = 0) -> list[_Socket]:
        """Up to ``n`` sockets; fewer when one fails after the first (near the process's
        descriptor limit a batch of 32 must not fail where one socket would do)."""
        if self._here:
            return self._make_here(family, type, n, proto)
        with _lock:
            _setns(self.fd)
            try:
                return self._make_here(family, type, n, proto)
            finally:
                _setns(self._home)

    @staticmethod
    def _make_here(family: int, type: int, n: int, proto: int) -> list[_Socket]:
        out: list[_Socket] = []
        for _ in range(n):
            try:
                out.append(_Socket(family, type, proto))
            except OSError:
                if not out:
                    raise
                break
        return out

    def close(self) -> None:
        """Close the handle and the spare sockets (each holds the netns alive)."""
        spare, self._spare = self._spare, []
        for s in spare:
            s.close()
        for fd in (self.fd, self._home):
            with contextlib.suppress(OSError):
                os.close(fd)
        self.fd = self._home = -1
