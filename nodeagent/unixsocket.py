"""Listening UNIX sockets (the node agent socket, the CA socket): preparing the path
(check its length, create its directory, remove a stale socket, refuse to steal a live
one) and serving gRPC on it with mode 0600 from the socket's first moment
(``serve_owner_only``): only the socket's owner (root, for the agent) can ever connect.
"""

from __future__ import annotations

import array
import contextlib
import errno
import logging
import os
import socket
import stat
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import grpc
import grpc.aio

from nodeagent.errors import LocalStateError

log = logging.getLogger(__name__)

MAX_UNIX_PATH = 107
"""``sun_path`` holds 108 bytes including the terminating NUL."""


def prepare_unix_socket_path(
    path_text: str, what: str, owner: str, hint: str, replace_live: bool = False
) -> Path:
    """Ready ``path_text`` for ``bind``.

    ``what`` names the socket in messages ("node agent socket"), ``owner`` the kind of
    process that would be listening on it ("agent"), ``hint`` how to pick another path
    ("--socket"). ``replace_live``: a live socket there is left for the placing rename to
    replace (an upgrade: the agent taking over from the one listening there).
    """
    size = len(os.fsencode(path_text))
    if size > MAX_UNIX_PATH:
        raise LocalStateError(
            f"{what} path is too long for a UNIX socket ({size} > {MAX_UNIX_PATH} bytes): "
            f"{path_text}; choose a shorter {hint}"
        )
    path = Path(path_text)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise LocalStateError(
            f"cannot create the directory of the {what} {path.parent}: {e}"
        ) from e
    try:
        st = path.lstat()
    except FileNotFoundError:
        return path
    if not stat.S_ISSOCK(st.st_mode):
        raise LocalStateError(
            f"{path} exists and is not a socket: remove it or choose another {hint}"
        )
    if replace_live:
        return path
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(1.0)
        try:
            probe.connect(str(path))
        except OSError as e:
            if e.errno not in (errno.ECONNREFUSED, errno.ENOENT):
                raise LocalStateError(f"cannot check the {what} {path}: {e}") from e
        else:
            raise LocalStateError(
                f"another {owner} is already listening on {path}: stop it first "
                f"(or give this one another {hint})"
            )
    log.info("removing stale %s %s", what, path)
    path.unlink(missing_ok=True)
    return path


def _place_owner_only(
    path: Path, what: str, hint: str, bind: Callable[[str], None]
) -> tuple[int, int]:
    """``bind`` a socket at a path in a fresh directory of mode 0700 next to ``path``,
    make it 0600 there and rename it over ``path`` (see ``serve_owner_only``); the
    (device, inode) placed. Raises ``LocalStateError``."""
    try:
        private = tempfile.mkdtemp(prefix=".", dir=path.parent)  # mode 0700
    except OSError as e:
        raise LocalStateError(f"cannot create a private directory next to {path}: {e}") from e
    inner = os.path.join(private, "s")
    try:
        if len(os.fsencode(inner)) > MAX_UNIX_PATH:
            raise LocalStateError(
                f"the {what} is bound first at {inner}, too long for a UNIX socket "
                f"({len(os.fsencode(inner))} > {MAX_UNIX_PATH} bytes): choose a shorter {hint}"
            )
        bind(inner)
        try:
            os.chmod(inner, 0o600)
            os.rename(inner, path)
            st = os.stat(path)
        except OSError as e:
            raise LocalStateError(f"cannot place the {what} at {path}: {e}") from e
    finally:
        with contextlib.suppress(OSError):
            os.unlink(inner)  # (gone after the rename)
        with contextlib.suppress(OSError):
            os.rmdir(private)
    return st.st_dev, st.st_ino


def serve_owner_only(server: grpc.aio.Server, path: Path, what: str, hint: str) -> OwnedSocket:
    """Bind ``server`` (not started) to ``unix:path``, a socket of mode 0600 from its first
    moment; returns the server to use, which removes the socket when it stops.

    Not bind-then-chmod: in between, the umask decides who may connect. Not a umask around
    the bind either: the umask is the whole process's, shared by every thread (grpc's, the
    executor's), whose files created meanwhile would get our mode. So the socket is bound
    in a fresh directory of mode 0700 next to ``path`` (no one else can reach into it),
    made 0600 there, and renamed into place (atomic: same directory tree, same file
    system). Raises ``LocalStateError``.
    """
    def bind(inner: str) -> None:
        try:
            bound = server.add_insecure_port(f"unix:{inner}")
        except RuntimeError as e:
            raise LocalStateError(f"cannot listen on the {what} {path}: {e}") from e
        if not bound:
            raise LocalStateError(f"cannot listen on the {what} {path}")

    return OwnedSocket(server, path, _place_owner_only(path, what, hint, bind))


def bind_owner_only(path: Path, what: str, hint: str) -> tuple[socket.socket, tuple[int, int]]:
    """A listening UNIX stream socket at ``path`` of mode 0600 from its first moment, and
    its (device, inode): placed as ``serve_owner_only`` places gRPC's (bound in a private
    directory, then renamed over ``path``, replacing what was there in one step).
    Raises ``LocalStateError``."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)

    def bind(inner: str) -> None:
        try:
            sock.bind(inner)
            sock.listen(16)
        except OSError as e:
            raise LocalStateError(f"cannot listen on the {what} {path}: {e}") from e

    try:
        return sock, _place_owner_only(path, what, hint, bind)
    except BaseException:
        sock.close()
        raise


def unlink_if_same(path: Path, inode: tuple[int, int]) -> None:
    """Remove the socket at ``path`` if it is still the one of ``inode`` (not a successor's)."""
    try:
        st = os.lstat(path)
        if (st.st_dev, st.st_ino) == inode:
            os.unlink(path)
    except OSError:
        pass


class OwnedSocket(grpc.aio.Server):
    """A gRPC server on a socket ``serve_owner_only`` placed: the server itself, but its
    ``stop`` also removes the socket file, if it is still the one placed (grpc removes
    only the path it bound, which the rename emptied)."""

    def __init__(self, server: grpc.aio.Server, path: Path, inode: tuple[int, int]) -> None:
        self.server = server
        self.path = path
        self._inode = inode

    async def stop(self, grace: float | None = None) -> None:
        await self.server.stop(grace)
        unlink_if_same(self.path, self._inode)  # not a successor's socket

    async def start(self) -> None:
        await self.server.start()

    async def wait_for_termination(self, timeout: float | None = None) -> bool:
        return await self.server.wait_for_termination(timeout)

    def add_generic_rpc_handlers(
        self, generic_rpc_handlers: Iterable[grpc.GenericRpcHandler[Any, Any]]
    ) -> None:
        self.server.add_generic_rpc_handlers(generic_rpc_handlers)

    def add_insecure_port(self, address: str) -> int:
        return self.server.add_insecure_port(address)

    def add_secure_port(self, address: str, server_credentials: grpc.ServerCredentials) -> int:
        return self.server.add_secure_port(address, server_credentials)

    def add_registered_method_handlers(self, service_name: str, method_handlers: Any) -> None:
        """(Called by the generated ``add_*Servicer_to_server`` on recent grpc.)"""
        self.server.add_registered_method_handlers(service_name, method_handlers)  # type: ignore[attr-defined]


def received_fds(ancdata: Iterable[tuple[int, int, bytes]]) -> list[int]:
    """The descriptors an ``SCM_RIGHTS`` message carried (``recvmsg``'s ancillary data;
    a trailing partial int is ignored)."""
    out: list[int] = []
    for level, kind, cdata in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds = array.array("i")
            fds.frombytes(cdata[: len(cdata) - (len(cdata) % fds.itemsize)])
            out.extend(fds)
    return out
