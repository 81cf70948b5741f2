"""Preparing the path of a listening UNIX socket (the node agent socket, the CA socket):
check its length, create its directory, remove a stale socket, refuse to steal a live one.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import stat
from pathlib import Path

from nodeagent.errors import LocalStateError

log = logging.getLogger(__name__)

MAX_UNIX_PATH = 107
"""``sun_path`` holds 108 bytes including the terminating NUL."""


def prepare_unix_socket_path(path_text: str, what: str, owner: str, hint: str) -> Path:
    """Ready ``path_text`` for ``bind``.

    ``what`` names the socket in messages ("node agent socket"), ``owner`` the kind of
    process that would be listening on it ("agent"), ``hint`` how to pick another path
    ("--socket").
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
