"""Network namespaces: enter one for the calling thread, or make a socket inside one.

A socket keeps the netns it was created in, so the agent (living in its node's netns)
creates listeners and upstream sockets inside pod netns by switching the calling thread
with ``setns(2)`` just for the ``socket()`` call, and switching back.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import socket
import threading
from pathlib import Path

from nodeagent.errors import LocalStateError

CLONE_NEWNET = 0x40000000
NETNS_DIR = Path("/var/run/netns")

_libc = ctypes.CDLL(None, use_errno=True)
_lock = threading.Lock()


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

    def socket(self, family: int = socket.AF_INET, type: int = socket.SOCK_STREAM) -> socket.socket:
        """A new socket that lives in this netns."""
        with _lock:
            _setns(self.fd)
            try:
                return socket.socket(family, type)
            finally:
                _setns(self._home)

    def close(self) -> None:
        for fd in (self.fd, self._home):
            with contextlib.suppress(OSError):
                os.close(fd)
        self.fd = self._home = -1
