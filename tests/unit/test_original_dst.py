"""``original_dst``: the destination a captured connection was redirected from, read on
the socket's file descriptor (no privileges: a plain loopback connection was not
redirected)."""

from __future__ import annotations

import errno
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from nodeagent.redirect.sockets import original_dst


def test_a_connection_that_was_not_redirected_has_no_original_destination() -> None:
    with socket.create_server(("127.0.0.1", 0)) as server:
        client = socket.create_connection(server.getsockname())
        accepted, _ = server.accept()
        with client, accepted:
            assert original_dst(accepted) is None
            assert original_dst(client) is None


def test_a_closed_socket_is_an_error_not_a_missing_destination() -> None:
    s = socket.socket()
    s.close()
    with pytest.raises(OSError) as e:
        original_dst(s)
    assert e.value.errno is not None and e.value.strerror


class _Number:
    """A descriptor number, as uvloop's transport socket hands it (``fileno`` only)."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def fileno(self) -> int:
        return self.fd


def test_a_descriptor_number_taken_by_another_file_is_read_afresh() -> None:
    with socket.create_server(("127.0.0.1", 0)) as server:
        client = socket.create_connection(server.getsockname())
        accepted, _ = server.accept()
        with client:
            fd = accepted.fileno()
            assert original_dst(_Number(fd)) is None
            accepted.close()
            r, w = os.pipe()
            if r != fd:
                os.dup2(r, fd)  # the number is a pipe's now
            try:
                with pytest.raises(OSError) as e:
                    original_dst(_Number(fd))
                assert e.value.errno == errno.ENOTSOCK
            finally:
                for n in {r, w, fd}:
                    os.close(n)


COUNTED = """
import socket
from nodeagent.redirect.sockets import original_dst
with socket.create_server(("127.0.0.1", 0)) as server:
    addr = server.getsockname()
    for _ in range(50):
        client = socket.create_connection(addr)
        accepted, _ = server.accept()
        with client, accepted:
            assert original_dst(accepted) is None
"""


@pytest.mark.skipif(shutil.which("strace") is None, reason="needs strace")
def test_reading_the_destination_checks_no_descriptor_per_connection(tmp_path: Path) -> None:
    """One ``getsockopt`` per connection: the ``getsockname`` that a new C socket makes
    to check its descriptor happens once per descriptor number, not per connection."""
    out = tmp_path / "trace"
    root = Path(__file__).resolve().parents[2]
    argv = ["strace", "-f", "-qq", "-e", "trace=getsockname,getsockopt", "-o", str(out)]
    subprocess.run([*argv, sys.executable, "-c", COUNTED], check=True, cwd=root, timeout=120)
    calls = out.read_text().splitlines()
    assert sum("SO_ORIGINAL_DST" in c or "0x50" in c for c in calls) == 50
    # one per accept (``socket.socket`` checks what ``accept`` made), a few at start
    assert sum("getsockname(" in c for c in calls) <= 55
