"""``NetnsHandle``'s batches of spare sockets near the process's descriptor limit: a batch
that cannot be made whole gives the sockets it could make, rather than none (run in the
agent's own netns, as host mode does: no ``setns``, no root)."""

from __future__ import annotations

import os
import resource
import socket

import pytest

from nodeagent.redirect.netns import NetnsHandle


def _is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


def test_a_batch_near_the_descriptor_limit_gives_what_it_could_make() -> None:
    handle = NetnsHandle("/proc/self/ns/net")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    got: list[socket.socket] = []
    try:
        # the limit bounds descriptor numbers: leave exactly three free below it, fewer
        # than a batch (8)
        free = [n for n in range(4096) if not _is_open(n)][:4]
        resource.setrlimit(resource.RLIMIT_NOFILE, (free[3], hard))
        got.append(handle.socket())  # a batch of 8 asked, 3 made: one out, two spare
        got += [handle.socket(), handle.socket()]
        assert len({s.fileno() for s in got}) == 3
        with pytest.raises(OSError):  # none left at all: that one is an error
            handle.socket()
    finally:
        for s in got:
            s.close()
        handle.close()
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
