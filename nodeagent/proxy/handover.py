"""Listener hand-over between two agents of one node: an upgrade that refuses no
connection (as Envoy's hot restart and HAProxy's ``-x`` do).

The running agent serves a UNIX socket (``HandoverServer``, mode 0600 from its first
moment). A new agent of the same node connects to it at start (``receive``) and gets
every listening socket the old one serves (each pod's 15001, 15006 and 15008, its DNS
proxy's 15053 UDP socket and TCP listener, the metrics and readiness ports) as file
descriptors (``SCM_RIGHTS``), with what each is (``Listener``). It uses them instead of
opening its own (``Inherited.take``), and once it accepts on them it says ``ready``: the
old agent then closes its own descriptors (the kernel sockets live on in the new
process, so no connection attempt is refused; the backlog is accepted by whichever
process accepts), drains its live connections and exits. No socket, no answer within
the bound, or a peer that breaks the protocol: a normal cold start. Nothing a peer sends
can take either agent down.

The wire: messages of a 4-byte big-endian length and a JSON object, descriptors riding
on the first byte of a message.

- new → old ``{"hello": VERSION, "node": NODE}``
- old → new ``{"listeners": [Listener…], "more": bool, "pid": PID}`` (descriptors
  attached, in the same order; at most ``FDS_PER_MESSAGE`` per message)
- new → old ``{"ready": PID}`` once it accepts on them
- old → new ``{"released": PID}`` once it closed its own
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import json
import logging
import os
import socket
import struct
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from nodeagent.unixsocket import (
    bind_owner_only,
    prepare_unix_socket_path,
    received_fds,
    unlink_if_same,
)

log = logging.getLogger("nodeagent.handover")

VERSION = 1
FDS_PER_MESSAGE = 200
"""Descriptors per message (the kernel takes at most 253 per ``sendmsg``)."""
MAX_MESSAGE = 4 << 20
"""Bytes of one message: beyond, the peer is not an agent."""
MAX_LISTENERS = 16_384
"""Listeners one hand-over may carry (five per pod, and the node's)."""
KINDS = frozenset({"outbound", "inbound", "hbone", "dns-udp", "dns-tcp", "metrics", "ready"})
"""What a listener may be: a pod's five (``dns-udp`` a bound UDP socket, the rest
listening TCP sockets), the node's HTTP two."""
READY_TIMEOUT = 60.0
"""Seconds a new agent waits for its pods (certificates, capture) before taking over."""
RELEASE_TIMEOUT = 10.0
"""Seconds a new agent then waits for the old one to confirm it let go."""
_LEN = struct.Struct(">I")


class HandoverError(Exception):
    """The peer broke the protocol or went away (the message says how)."""


@dataclass(frozen=True)
class Listener:
    """What one handed-over socket is: ``kind`` (one of ``KINDS``), its port, and for a
    pod's listeners the pod key and the pod's runtime (netns, IP) it was opened in."""

    kind: str
    port: int
    pod: str = ""
    netns: str = ""
    ip: str = ""

    @classmethod
    def parse(cls, raw: Any) -> Listener:
        """From the wire; raises ``HandoverError`` naming what is wrong."""
        if not isinstance(raw, dict):
            raise HandoverError(f"a listener is not an object: {str(raw)[:80]!r}")
        kind, port = raw.get("kind"), raw.get("port")
        if kind not in KINDS:
            raise HandoverError(f"unknown listener kind {str(kind)[:40]!r}")
        if not isinstance(port, int) or isinstance(port, bool) or not 0 < port < 65536:
            raise HandoverError(f"listener {kind}: bad port {str(port)[:20]!r}")
        text = {k: raw.get(k, "") for k in ("pod", "netns", "ip")}
        if not all(isinstance(v, str) and len(v) < 1024 for v in text.values()):
            raise HandoverError(f"listener {kind}:{port}: pod, netns and ip must be short text")
        return cls(kind, port, text["pod"], text["netns"], text["ip"])


# -- framing -----------------------------------------------------------------------------


def _encode(msg: dict[str, Any]) -> bytes:
    body = json.dumps(msg, separators=(",", ":")).encode()
    return _LEN.pack(len(body)) + body


def _decode(body: bytes) -> dict[str, Any]:
    try:
        msg = json.loads(body)
    except (ValueError, RecursionError) as e:
        raise HandoverError(f"not a JSON message: {str(e)[:80]}") from None
    if not isinstance(msg, dict):
        raise HandoverError("a message is not a JSON object")
    return msg


class _BlockingPeer:
    """The new agent's side: a blocking socket with a deadline, and the descriptors that
    arrived (all closed by ``close_fds`` unless taken)."""

    def __init__(self, sock: socket.socket, deadline: float) -> None:
        self.sock = sock
        self.deadline = deadline
        self.fds: list[int] = []

    def _timeout(self) -> None:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise HandoverError("no answer within the hand-over timeout")
        self.sock.settimeout(left)

    def _recv(self, n: int) -> bytes:
        out = b""
        space = socket.CMSG_SPACE(FDS_PER_MESSAGE * 4)
        while len(out) < n:
            self._timeout()
            data, anc, flags, _ = self.sock.recvmsg(n - len(out), space)
            self.fds.extend(received_fds(anc))
            if flags & socket.MSG_CTRUNC:
                raise HandoverError("the peer sent more descriptors than a message may carry")
            if not data:
                raise HandoverError("the peer closed the connection")
            out += data
        return out

    def read(self) -> dict[str, Any]:
        (n,) = _LEN.unpack(self._recv(4))
        if n > MAX_MESSAGE:
            raise HandoverError(f"a message of {n} bytes (more than {MAX_MESSAGE})")
        return _decode(self._recv(n))

    def send(self, msg: dict[str, Any]) -> None:
        self._timeout()
        self.sock.sendall(_encode(msg))

    def close_fds(self) -> None:
        for fd in self.fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        self.fds.clear()


# -- the new agent's side ----------------------------------------------------------------


class Inherited:
    """The listening sockets received from the old agent. ``take`` hands one out (once);
    ``close_untaken`` closes the others (pods gone or changed meanwhile); ``release``
    tells the old agent this one is serving."""

    def __init__(
        self, listeners: list[tuple[Listener, socket.socket]], peer: _BlockingPeer, pid: int
    ) -> None:
        self._listeners = dict(listeners)
        self._peer: _BlockingPeer | None = peer
        self.old_pid = pid
        self.count = len(listeners)

    def take(
        self, kind: str, port: int, pod: str = "", netns: str = "", ip: str = ""
    ) -> socket.socket | None:
        """The received listener that is exactly this one, or None."""
        return self._listeners.pop(Listener(kind, port, pod, netns, ip), None)

    def untaken(self) -> list[Listener]:
        return list(self._listeners)

    def close_untaken(self) -> int:
        """Close every listener nobody took; how many."""
        n = len(self._listeners)
        for lst, sock in self._listeners.items():
            log.info(
                "hand-over: closing %s listener %s:%d not wanted here", lst.kind, lst.pod, lst.port
            )
            sock.close()
        self._listeners.clear()
        return n

    def release(self, timeout: float) -> bool:
        """Tell the old agent this one accepts on the listeners; True once it answered
        that it closed its own (blocking, up to ``timeout`` seconds)."""
        peer, self._peer = self._peer, None
        if peer is None:
            return False
        try:
            peer.deadline = time.monotonic() + timeout
            peer.send({"ready": os.getpid()})
            answer = peer.read()
            return answer.get("released") == self.old_pid
        except (OSError, HandoverError) as e:
            log.warning("hand-over: the old agent did not confirm it let go: %s", e)
            return False
        finally:
            peer.close_fds()
            peer.sock.close()

    def abandon(self) -> None:
        """Give up (the old agent keeps serving): close every received socket."""
        self.close_untaken()
        if self._peer is not None:
            self._peer.sock.close()
            self._peer = None


def check_listener(lst: Listener, sock: socket.socket) -> str | None:
    """Why ``sock`` cannot be the listener ``lst`` says it is (None: it can)."""
    try:
        if lst.kind == "dns-udp":
            if sock.family != socket.AF_INET or sock.type != socket.SOCK_DGRAM:
                return f"not a UDP/IPv4 socket ({sock.family!r}, {sock.type!r})"
        elif sock.family != socket.AF_INET or sock.type != socket.SOCK_STREAM:
            return f"not a TCP/IPv4 socket ({sock.family!r}, {sock.type!r})"
        elif not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
            return "not listening"
        port = sock.getsockname()[1]
    except OSError as e:
        return str(e)
    if port != lst.port:
        return f"bound to port {port}, not {lst.port}"
    return None


def receive(path: Path, node: str, timeout: float) -> Inherited | None:
    """The old agent's listeners, over its hand-over socket at ``path``; None (logged)
    when there is none, it does not answer within ``timeout`` seconds, or it breaks the
    protocol: then the agent starts cold. Blocking."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    peer = _BlockingPeer(sock, time.monotonic() + timeout)
    try:
        sock.settimeout(timeout)
        sock.connect(str(path))
    except OSError as e:
        sock.close()
        log.info("hand-over: no running agent at %s (%s): cold start", path, e.strerror or e)
        return None
    got: list[tuple[Listener, socket.socket]] = []
    try:
        peer.send({"hello": VERSION, "node": node})
        pid = 0
        while True:
            msg = peer.read()
            if "error" in msg:
                raise HandoverError(f"the old agent refused: {str(msg['error'])[:200]}")
            raw, fds = msg.get("listeners"), peer.fds
            raw_pid = msg.get("pid")
            pid = raw_pid if isinstance(raw_pid, int) else 0
            if not isinstance(raw, list) or len(raw) != len(fds):
                raise HandoverError(
                    f"{len(fds)} descriptor(s) for a list of "
                    f"{len(raw) if isinstance(raw, list) else 'no'} listener(s)"
                )
            if len(got) + len(raw) > MAX_LISTENERS:
                raise HandoverError(f"more than {MAX_LISTENERS} listeners")
            for item in raw:
                lst = Listener.parse(item)
                fd = peer.fds.pop(0)
                try:
                    s = socket.socket(fileno=fd)
                except OSError:
                    os.close(fd)
                    raise HandoverError(
                        f"the {lst.kind} listener {lst.pod}:{lst.port}: not a socket"
                    ) from None
                got.append((lst, s))
                why = check_listener(lst, s)
                if why is not None:
                    raise HandoverError(f"the {lst.kind} listener {lst.pod}:{lst.port}: {why}")
            if msg.get("more") is not True:
                break
        for _, s in got:
            s.setblocking(False)
        inherited = Inherited(got, peer, pid)
        log.info(
            "hand-over: received %d listener(s) from the agent at %s (pid %d)",
            len(got),
            path,
            pid,
        )
        return inherited
    except (OSError, HandoverError) as e:
        for _, s in got:
            s.close()
        peer.close_fds()
        sock.close()
        log.warning("hand-over from %s failed (%s): cold start", path, e)
        return None


# -- the old agent's side ----------------------------------------------------------------


Listeners = Callable[[], Iterable[tuple[Listener, socket.socket]]]
"""What the agent serves now, as (what it is, the listening socket)."""


class HandoverServer:
    """The running agent's hand-over socket. ``listeners`` says what to hand over;
    ``on_ready`` runs once a new agent serves them (it closes this agent's own and starts
    its drain). One hand-over at a time; a peer that breaks the protocol is logged and
    dropped, and this agent goes on serving."""

    def __init__(
        self,
        path: Path,
        node: str,
        listeners: Listeners,
        on_ready: Callable[[int], Awaitable[None]],
        *,
        hello_timeout: float = 5.0,
        ready_timeout: float = 120.0,
    ) -> None:
        self.path = path
        self.node = node
        self._listeners = listeners
        self._on_ready = on_ready
        self.hello_timeout = hello_timeout
        self.ready_timeout = ready_timeout
        """How long a new agent may take from receiving the listeners to ``ready``."""
        self._sock: socket.socket | None = None
        self._inode = (0, 0)
        self._task: asyncio.Task[None] | None = None
        self._serving: asyncio.Task[None] | None = None
        self._busy = False
        self.handed_over = False

    def start(self) -> None:
        """Listen on ``path`` (replacing the socket of an agent this one took over from)."""
        path = prepare_unix_socket_path(
            str(self.path), "hand-over socket", "agent", "--handover-socket", replace_live=True
        )
        self._sock, self._inode = bind_owner_only(path, "hand-over socket", "--handover-socket")
        self._sock.setblocking(False)
        self._task = asyncio.get_running_loop().create_task(self._accept_loop(self._sock))
        log.info("hand-over socket listening on %s", self.path)

    async def _accept_loop(self, sock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                conn, _ = await loop.sock_accept(sock)
            except OSError as e:
                log.warning("hand-over socket: accept failed: %s", e)
                await asyncio.sleep(0.5)
                continue
            conn.setblocking(False)
            if self._busy or self.handed_over:
                with contextlib.suppress(OSError):
                    conn.send(_encode({"error": "a hand-over is under way already"}))
                conn.close()
                continue
            self._busy = True
            self._serving = loop.create_task(self._serve(conn))

    async def _serve(self, conn: socket.socket) -> None:
        try:
            await self._hand_over(conn)
        except (OSError, HandoverError, TimeoutError) as e:
            log.warning("hand-over: a peer broke off (%s); this agent goes on serving", e)
        except Exception as e:  # never take the serving agent down
            log.error("hand-over failed: %r; this agent goes on serving", e, exc_info=e)
        finally:
            conn.close()
            self._busy = False

    async def _hand_over(self, conn: socket.socket) -> None:
        pid, uid, _gid = struct.unpack(
            "3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        )
        if uid != os.geteuid():
            raise HandoverError(f"peer pid {pid} runs as uid {uid}, not {os.geteuid()}")
        hello = await asyncio.wait_for(_read_async(conn), self.hello_timeout)
        if hello.get("hello") != VERSION or hello.get("node") != self.node:
            await _send_async(
                conn, _encode({"error": f"expected hello {VERSION} for node {self.node}"})
            )
            raise HandoverError(f"pid {pid}: unexpected hello {str(hello)[:120]}")
        held = list(self._listeners())
        log.info("hand-over: handing %d listener(s) to the agent of pid %d", len(held), pid)
        chunks = [held[i : i + FDS_PER_MESSAGE] for i in range(0, len(held), FDS_PER_MESSAGE)]
        for i, chunk in enumerate(chunks or [[]]):
            msg = {
                "listeners": [asdict(lst) for lst, _ in chunk],
                "more": i < len(chunks) - 1,
                "pid": os.getpid(),
            }
            await _send_async(conn, _encode(msg), [s.fileno() for _, s in chunk])
        ready = await asyncio.wait_for(_read_async(conn), self.ready_timeout)
        if ready.get("ready") != pid:
            raise HandoverError(f"pid {pid} answered {str(ready)[:120]} instead of ready")
        self.handed_over = True
        log.info("hand-over: the agent of pid %d serves now; letting go", pid)
        await self._on_ready(pid)
        await _send_async(conn, _encode({"released": os.getpid()}))

    def close(self) -> None:
        """Stop listening; the socket file goes unless a successor's replaced it."""
        if self._task is not None:
            self._task.cancel()
            self._task = None
        if self._sock is not None:
            self._sock.close()
            self._sock = None
            unlink_if_same(self.path, self._inode)


async def _read_async(conn: socket.socket) -> dict[str, Any]:
    loop = asyncio.get_running_loop()

    async def exactly(n: int) -> bytes:
        out = b""
        while len(out) < n:
            data = await loop.sock_recv(conn, n - len(out))
            if not data:
                raise HandoverError("the peer closed the connection")
            out += data
        return out

    (n,) = _LEN.unpack(await exactly(4))
    if n > 65536:  # the new agent's messages are tiny
        raise HandoverError(f"a message of {n} bytes")
    return _decode(await exactly(n))


async def _send_async(conn: socket.socket, data: bytes, fds: list[int] | None = None) -> None:
    """Send ``data``, ``fds`` riding on its first byte."""
    loop = asyncio.get_running_loop()
    anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
    while True:
        try:
            sent = conn.sendmsg([data], anc)
            break
        except BlockingIOError:
            await asyncio.wait_for(_writable(conn.fileno()), 10.0)
    if sent < len(data):
        await asyncio.wait_for(loop.sock_sendall(conn, data[sent:]), 10.0)


async def _writable(fd: int) -> None:
    loop = asyncio.get_running_loop()
    waiter: asyncio.Future[None] = loop.create_future()

    def wake() -> None:
        if not waiter.done():
            waiter.set_result(None)

    loop.add_writer(fd, wake)
    try:
        await waiter
    finally:
        loop.remove_writer(fd)


def default_path(state_dir: Path) -> Path:
    """``<state-dir>/handover.sock``."""
    return state_dir / "handover.sock"


__all__ = [
    "HandoverError",
    "HandoverServer",
    "Inherited",
    "Listener",
    "default_path",
    "receive",
]
