"""The data path's socket helpers in a network namespace of the test's own:
``connect_in`` (numeric connect, the handshake often done inside ``connect()``, a wait only
when it is not) and ``NetnsHandle``'s batches of sockets made inside the netns.

Traffic stays on the test netns's loopback and on a veth pair inside it; the netns (and
with it the link) is removed afterwards, also on failure.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import socket
import subprocess
from collections.abc import Iterator

import pytest

from nodeagent.errors import PeerError
from nodeagent.proxy.plumbing import drive
from nodeagent.redirect import netns as netns_mod
from nodeagent.redirect.ebpf import netns_cookie
from nodeagent.redirect.netns import SOCKET_BATCH, SOCKET_BATCH_MAX, NetnsHandle, netns_path
from nodeagent.redirect.sockets import connect_in, listen_in

pytestmark = pytest.mark.privileged


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=10)


@pytest.fixture
def netns() -> Iterator[str]:
    name = f"nat-sock-{os.getpid()}"
    _ip("netns", "add", name)
    try:
        _ip("-n", name, "link", "set", "lo", "up")
        # a veth pair whose far end has no address: nobody answers ARP for 10.77.0.2,
        # so a connect there never completes
        _ip("-n", name, "link", "add", "v0", "type", "veth", "peer", "name", "v1")
        _ip("-n", name, "addr", "add", "10.77.0.1/24", "dev", "v0")
        _ip("-n", name, "link", "set", "v0", "up")
        _ip("-n", name, "link", "set", "v1", "up")
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=10)


def test_connect_in_carries_bytes_intact_inside_the_netns(netns: str) -> None:
    h = NetnsHandle(netns)
    payload = os.urandom(3 * 1024 * 1024 + 17)

    async def main() -> bytes:
        lsock = listen_in(h, "127.0.0.1", 0)
        port = lsock.getsockname()[1]
        got = bytearray()
        done = asyncio.Event()

        async def serve(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            while chunk := await r.read(1 << 16):
                got.extend(chunk)
            w.close()
            done.set()

        srv = await asyncio.start_server(serve, sock=lsock)
        try:
            s = await connect_in(h, ("127.0.0.1", port), 5.0)
            assert netns_cookie(s) == netns_cookie(lsock)  # made inside the netns, not the test's
            _, w = await asyncio.open_connection(sock=s)
            # connect_in leaves TCP_NODELAY to the loop's transport, which sets it
            # (asyncio's only on a socket made IPPROTO_TCP by name, uvloop's on any)
            assert s.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
            w.write(payload)
            await w.drain()
            w.write_eof()
            await asyncio.wait_for(done.wait(), 10)
            w.close()
        finally:
            srv.close()
        return bytes(got)

    try:
        got = asyncio.run(main())
    finally:
        h.close()
    assert hashlib.sha256(got).hexdigest() == hashlib.sha256(payload).hexdigest()


def test_connect_in_refused_says_so_and_names_the_address(netns: str) -> None:
    h = NetnsHandle(netns)
    try:
        free = h.socket()
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
        free.close()  # nobody listens there now
        with pytest.raises(PeerError, match=rf"127\.0\.0\.1:{port} refused"):
            asyncio.run(connect_in(h, ("127.0.0.1", port), 5.0))
    finally:
        h.close()


def test_connect_in_to_a_silent_peer_times_out_with_a_hint(netns: str) -> None:
    h = NetnsHandle(netns)
    try:
        with pytest.raises(PeerError, match=r"timed out after 0\.3s connecting to 10\.77\.0\.2:80"):
            asyncio.run(connect_in(h, ("10.77.0.2", 80), 0.3))
    finally:
        h.close()


def test_connect_in_times_out_when_run_without_a_task(netns: str) -> None:
    # the proxy dials from a listener's callback, by ``drive``: no Task to time out
    h = NetnsHandle(netns)

    async def main() -> BaseException | None:
        loop = asyncio.get_running_loop()
        ended: asyncio.Future[BaseException | None] = loop.create_future()
        coro = connect_in(h, ("10.77.0.2", 80), 0.3)
        loop.call_soon(drive, coro, ended.set_result)
        return await ended

    try:
        err = asyncio.run(main())
    finally:
        h.close()
    assert isinstance(err, PeerError), err
    assert "timed out after 0.3s connecting to 10.77.0.2:80" in str(err)


def test_netns_handle_makes_sockets_in_batches_and_closes_the_spares(netns: str) -> None:
    h = NetnsHandle(netns)
    with open(netns_path(netns), "rb") as f:
        assert os.fstat(f.fileno()).st_ino  # the netns exists
    first = h.socket()
    spares = list(h._spare)
    assert len(spares) == SOCKET_BATCH - 1
    made = [first, *(h.socket() for _ in range(SOCKET_BATCH - 1))]
    assert not h._spare  # the batch is used up before a new one is made
    assert {netns_cookie(s) for s in made} == {netns_cookie(first)}
    # non-blocking from socket() on (SOCK_NONBLOCK), a TCP stream as asyncio expects
    assert all(not s.getblocking() and s.type == socket.SOCK_STREAM for s in made)
    assert all(s.proto == socket.IPPROTO_TCP for s in made)  # asyncio's TCP_NODELAY needs it
    made[0].setblocking(False)  # already so: no system call, still non-blocking
    assert not made[0].getblocking() and not os.get_blocking(made[0].fileno())
    made[0].setblocking(True)  # the file descriptor itself becomes blocking
    assert made[0].getblocking() and os.get_blocking(made[0].fileno())
    extra = h.socket()  # a second batch, twice the first: the first was used up at once
    assert len(h._spare) == 2 * SOCKET_BATCH - 1
    left = list(h._spare)
    h.close()
    assert all(s.fileno() == -1 for s in left), "spare sockets must not outlive the handle"
    for s in (*made, extra):
        s.close()


def test_a_busy_pods_socket_batch_grows_and_an_idle_ones_shrinks_back(
    netns: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Fewer ``setns`` pairs per connection for a pod that dials fast; few spare
    sockets held for one that does not."""
    h = NetnsHandle(netns)
    made: list[socket.socket] = []
    batches: list[int] = []
    try:
        for _ in range(4):  # each batch used up at once: 8, 16, 32, then 32 again
            made.append(h.socket())
            batches.append(len(h._spare) + 1)
            made += [h.socket() for _ in range(len(h._spare))]
        assert batches == [SOCKET_BATCH, 2 * SOCKET_BATCH, SOCKET_BATCH_MAX, SOCKET_BATCH_MAX]
        assert {netns_cookie(s) for s in made} == {netns_cookie(made[0])}
        monkeypatch.setattr(netns_mod, "BUSY_REFILL", 0.0)  # the pod went quiet
        made.append(h.socket())
        assert len(h._spare) == SOCKET_BATCH - 1
    finally:
        h.close()
        for s in made:
            s.close()
