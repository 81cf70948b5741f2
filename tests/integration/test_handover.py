"""Listener hand-over (``proxy/handover.py``) over a real UNIX socket with real
descriptors: the new side gets the very listening sockets the old one serves (a client
connecting all along is never refused), the old one lets go only on ``ready``; no old
agent, or a wrong or hostile peer on either side, is a cold start or a dropped peer,
never a crash, a leaked descriptor or an early let-go."""

from __future__ import annotations

import array
import asyncio
import json
import os
import shutil
import socket
import stat
import struct
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from nodeagent.proxy.handover import (
    FDS_PER_MESSAGE,
    HandoverServer,
    Inherited,
    Listener,
    receive,
)


@pytest.fixture
def root() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="na-ho-", dir="/tmp"))  # short: sun_path limit
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def _listen() -> socket.socket:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(64)
    s.setblocking(False)
    return s


def _port(s: socket.socket) -> int:
    return int(s.getsockname()[1])


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def _settled_fds(most: int, timeout: float = 5.0) -> int:
    """The open descriptors' count once it is at most ``most``, or at ``timeout``: other
    threads of the test run (gRPC's, executors) may hold one for a moment."""
    deadline = time.monotonic() + timeout
    while (n := _open_fds()) > most and time.monotonic() < deadline:
        time.sleep(0.01)
    return n


class OldAgent:
    """A ``HandoverServer`` in an event loop of its own thread, serving ``socks``."""

    def __init__(self, path: Path, socks: list[tuple[Listener, socket.socket]]) -> None:
        self.socks = socks
        self.let_go: list[int] = []
        self.loop = asyncio.new_event_loop()
        self.server: HandoverServer | None = None
        started = threading.Event()

        async def on_ready(pid: int) -> None:
            self.let_go.append(pid)
            for _, s in self.socks:  # what the agent does: close its own descriptors
                s.close()

        async def main() -> None:
            self.server = HandoverServer(
                path, "node1", lambda: self.socks, on_ready, hello_timeout=0.5, ready_timeout=3
            )
            self.server.start()
            started.set()

        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        asyncio.run_coroutine_threadsafe(main(), self.loop).result(5)
        assert started.is_set()

    def stop(self) -> None:
        async def close() -> None:
            assert self.server is not None
            self.server.close()

        asyncio.run_coroutine_threadsafe(close(), self.loop).result(5)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()


def _connects(port: int, stop: threading.Event, failures: list[str], made: list[int]) -> None:
    while not stop.is_set():
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=2):
                made.append(1)
        except OSError as e:
            failures.append(str(e))
        time.sleep(0.005)


def test_the_new_agent_gets_the_very_listeners_and_no_connect_is_refused(root: Path) -> None:
    path = root / "handover.sock"
    a, b = _listen(), _listen()
    listeners = [
        (Listener("outbound", _port(a), "default/web", "/run/netns/web", "10.0.0.5"), a),
        (Listener("metrics", _port(b)), b),
    ]
    old = OldAgent(path, listeners)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    failures: list[str] = []
    made: list[int] = []
    stop = threading.Event()
    client = threading.Thread(target=_connects, args=(_port(a), stop, failures, made))
    client.start()
    try:
        time.sleep(0.1)
        got = receive(path, "node1", timeout=3)
        assert isinstance(got, Inherited)
        assert got.old_pid == os.getpid()
        mine = got.take("outbound", _port(a), "default/web", "/run/netns/web", "10.0.0.5")
        assert mine is not None
        assert got.take("outbound", _port(a), "default/web", "/run/netns/web", "10.0.0.5") is None
        # the same kernel socket: same address, and it holds the connects queued before
        assert mine.getsockname() == ("127.0.0.1", _port(a))
        assert got.take("metrics", _port(b)) is not None
        assert old.let_go == []  # nothing is let go before ready
        assert got.release(timeout=3) is True
        assert old.let_go == [os.getpid()]
        assert a.fileno() == -1  # the old side closed its descriptor ...
        mine.setblocking(True)
        mine.settimeout(2)
        accepted = 0
        deadline = time.monotonic() + 0.5
        while time.monotonic() < deadline:  # ... and the new one accepts every connect
            conn, _ = mine.accept()
            conn.close()
            accepted += 1
    finally:
        stop.set()
        client.join(5)
        old.stop()
    assert failures == []
    assert len(made) > 20 and accepted > 10


def test_no_old_agent_is_a_cold_start(root: Path) -> None:
    assert receive(root / "none.sock", "node1", timeout=1) is None
    stale = root / "stale.sock"
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(stale))  # a socket file nobody listens on (an agent killed -9)
    s.close()
    t0 = time.monotonic()
    assert receive(stale, "node1", timeout=1) is None
    assert time.monotonic() - t0 < 1


def _raw_peer(path: Path, data: bytes, fds: list[int] | None = None) -> bytes:
    """Connect to the old agent, send ``data`` (with ``fds``), return what it answers."""
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(2)
        s.connect(str(path))
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
        if data or anc:
            s.sendmsg([data or b"\0"], anc)
        out = b""
        try:
            while chunk := s.recv(65536):
                out += chunk
        except OSError:
            pass
        return out


def _msg(obj: object) -> bytes:
    body = json.dumps(obj).encode()
    return struct.pack(">I", len(body)) + body


@pytest.mark.parametrize(
    "data",
    [
        b"",  # connects and says nothing (hello timeout)
        b"GET / HTTP/1.1\r\n\r\n",
        struct.pack(">I", 1 << 31) + b"x",  # a huge length
        _msg([1, 2]),  # JSON, not an object
        _msg({"hello": 1, "node": "node2"}),  # another node's agent
        _msg({"hello": 99, "node": "node1"}),  # another protocol version
        _msg({"hello": 1, "node": "node1"}) + _msg({"ready": 1}),  # ready, not its pid
        b"{" * 100_000,
    ],
    ids=["silent", "http", "huge", "array", "node", "version", "wrong-ready", "garbage"],
)
def test_a_wrong_peer_never_makes_the_old_agent_let_go(root: Path, data: bytes) -> None:
    path = root / "handover.sock"
    a = _listen()
    old = OldAgent(path, [(Listener("inbound", _port(a), "p", "n", "1.2.3.4"), a)])
    try:
        _raw_peer(path, data)
        assert old.let_go == []
        assert a.fileno() != -1
        # and it still hands over to the right peer afterwards
        got = receive(path, "node1", timeout=3)
        assert got is not None and got.release(timeout=3)
        assert old.let_go == [os.getpid()]
        got.close_untaken()
    finally:
        old.stop()


def test_descriptors_sent_to_the_old_agent_are_dropped(root: Path) -> None:
    path = root / "handover.sock"
    a = _listen()
    old = OldAgent(path, [(Listener("inbound", _port(a), "p", "n", "1.2.3.4"), a)])
    r, w = os.pipe()
    try:
        _raw_peer(path, _msg({"hello": 1, "node": "node1"}), [r, w])
        assert old.let_go == []
    finally:
        os.close(r)
        os.close(w)
        old.stop()


def test_many_listeners_go_in_several_messages(root: Path) -> None:
    path = root / "handover.sock"
    socks = [_listen() for _ in range(FDS_PER_MESSAGE + 5)]
    old = OldAgent(
        path, [(Listener("hbone", _port(s), f"ns/p{i}", "n", "ip"), s) for i, s in enumerate(socks)]
    )
    try:
        got = receive(path, "node1", timeout=3)
        assert got is not None and got.count == len(socks)
        assert got.take("hbone", _port(socks[-1]), f"ns/p{len(socks) - 1}", "n", "ip")
        # pods that left meanwhile: the new agent closes what it does not want
        assert got.close_untaken() == len(socks) - 1
        got.abandon()
    finally:
        old.stop()
        for s in socks:
            s.close()


class FakeOldAgent:
    """A hostile or broken "old agent": answers a hello with ``reply`` and ``fds``."""

    def __init__(self, path: Path, reply: bytes, fds: list[int]) -> None:
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.bind(str(path))
        self.sock.listen(1)
        self.reply, self.fds = reply, fds
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        conn, _ = self.sock.accept()
        with conn:
            conn.recv(4096)
            anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", self.fds))]
            if self.reply:
                conn.sendmsg([self.reply], anc if self.fds else [])
            time.sleep(1.2)

    def close(self) -> None:
        self.thread.join(5)
        self.sock.close()


def _cases() -> list[tuple[str, object, str]]:
    return [
        ("count", {"listeners": [], "pid": 1}, "listen"),  # descriptors, no listeners
        ("pipe", {"listeners": [{"kind": "outbound", "port": 1}], "pid": 1}, "pipe"),
        ("not-listening", {"listeners": [{"kind": "outbound", "port": 1}]}, "plain"),
        ("wrong-port", {"listeners": [{"kind": "inbound", "port": 1}]}, "listen"),
        ("kind", {"listeners": [{"kind": "shell", "port": 1}]}, "listen"),
        ("port-type", {"listeners": [{"kind": "hbone", "port": "15008"}]}, "listen"),
        ("error", {"error": "busy"}, "none"),
        ("silence", None, "none"),
    ]


@pytest.mark.parametrize(("case", "reply", "fd_kind"), _cases(), ids=[c[0] for c in _cases()])
def test_a_broken_old_agent_means_a_cold_start_and_no_leaked_descriptor(
    root: Path, case: str, reply: object, fd_kind: str
) -> None:
    path = root / "handover.sock"
    mine: list[socket.socket] = []
    fds: list[int] = []
    if fd_kind == "listen":
        mine.append(_listen())
    elif fd_kind == "plain":
        mine.append(socket.socket())
    elif fd_kind == "pipe":
        r, w = os.pipe()
        fds += [r]
        os.close(w)
    fds += [s.fileno() for s in mine]
    before = _open_fds()
    fake = FakeOldAgent(path, _msg(reply) if reply is not None else b"", fds)
    try:
        assert receive(path, "node1", timeout=1) is None
    finally:
        fake.close()
    for s in mine:
        s.close()
    for fd in fds[: len(fds) - len(mine)]:
        os.close(fd)
    assert _settled_fds(before - len(fds)) <= before - len(fds)  # all received was closed
