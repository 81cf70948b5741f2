"""The node agent socket and the CA socket: mode 0600 from their first moment whatever
the umask (a thread watches the path while the server starts under umask 0), nobody but
their owner can connect (an unprivileged user is refused), and the socket goes when the
server stops."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import socket
import stat
import tempfile
import threading
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import cast

import grpc.aio
import pytest

from nodeagent.admin.server import start_admin_server
from nodeagent.identity.ca import CertificateAuthority, init_ca
from nodeagent.identity.ca_server import (
    NodeTokenAuthenticator,
    PlacementAuthorizer,
    start_ca_server,
)
from nodeagent.model.status import AgentView

NOBODY = 65534
Start = Callable[[Path, Path], Awaitable[grpc.aio.Server]]


@pytest.fixture
def root() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="na-sock-", dir="/tmp"))  # short: sun_path limit
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


async def _admin(root: Path, path: Path) -> grpc.aio.Server:
    return await start_admin_server(cast(AgentView, object()), str(path))


async def _ca(root: Path, path: Path) -> grpc.aio.Server:
    (root / "mesh").mkdir(exist_ok=True)
    tokens = root / "tokens.json"
    tokens.write_text(json.dumps({"node1": "t0k3n"}))
    tokens.chmod(0o600)
    ca_dir = root / "ca" if (root / "ca").exists() else init_ca(root / "ca")
    ca = CertificateAuthority.load(ca_dir)
    authorizer = PlacementAuthorizer(root / "mesh")
    return await start_ca_server(ca, f"unix:{path}", NodeTokenAuthenticator(tokens), authorizer)


class ModeWatcher(threading.Thread):
    """Every mode the path shows while it runs (as fast as it can look)."""

    def __init__(self, path: Path) -> None:
        super().__init__(daemon=True)
        self.path, self.modes, self.running = path, set[int](), True

    def run(self) -> None:
        while self.running:
            with contextlib.suppress(FileNotFoundError):
                self.modes.add(stat.S_IMODE(os.lstat(self.path).st_mode))

    def stop(self) -> set[int]:
        self.running = False
        self.join()
        return self.modes


@pytest.mark.parametrize("start", [_admin, _ca], ids=["admin", "ca"])
def test_the_socket_is_0600_from_its_first_moment(root: Path, start: Start) -> None:
    path = root / "run" / "x.sock"
    path.parent.mkdir()
    before = os.umask(0)  # the worst umask: a socket bound under it is 0777
    watcher = ModeWatcher(path)
    watcher.start()
    try:

        async def main() -> None:
            for _ in range(5):  # a few times: the window, if any, is short
                server = await start(root, path)
                assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
                assert os.listdir(path.parent) == ["x.sock"]  # no private directory left
                await server.stop(None)
                assert not path.exists()  # removed with the server

        asyncio.run(main())
    finally:
        os.umask(before)
        seen = watcher.stop()
    assert seen == {0o600}


def _connect_as(uid: int, path: Path) -> tuple[Callable[[], None], Callable[[], int]]:
    """A child forked now that becomes ``uid`` and, once ``go()`` is called, connects to
    ``path``; ``result()``: 0 (connected), 13 (permission denied) or 1 (another error).
    Forked before the server starts, the child only makes system calls."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: no Python-level cleanup, no pytest
        code = 1
        try:
            os.close(w)
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
            os.read(r, 1)
            s = socket.socket(socket.AF_UNIX)
            try:
                s.connect(str(path))
                code = 0
            except PermissionError:
                code = 13
        finally:
            os._exit(code)
    os.close(r)

    def go() -> None:
        os.write(w, b"x")
        os.close(w)

    def result() -> int:
        return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])

    return go, result


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run a child as another user")
@pytest.mark.parametrize("start", [_admin, _ca], ids=["admin", "ca"])
def test_only_the_owner_can_connect(root: Path, start: Start) -> None:
    """The socket's mode is the access control (grpc cannot tell a UNIX peer's uid): a
    user other than the owner cannot connect, so no RPC (among them the state-changing
    ``CniAdd``, ``CniDel`` and ``Bpf`` with ``bypass``) is theirs to call."""
    path = root / "x.sock"
    root.chmod(0o755)  # the directory lets anyone through: only the socket's mode refuses
    children = {uid: _connect_as(uid, path) for uid in (NOBODY, 0)}

    async def main() -> None:
        server = await start(root, path)
        try:
            for go, _ in children.values():
                go()
            codes = {uid: await asyncio.to_thread(result) for uid, (_, result) in children.items()}
            assert codes == {NOBODY: 13, 0: 0}
        finally:
            await server.stop(None)

    asyncio.run(main())
