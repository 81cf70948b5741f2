"""What a new plain TCP connection costs the proxy in event-loop machinery: through both
nodes' real proxies (the loopback rig), the accept, the decision and the dial run in
callbacks (``proxy.plumbing.drive``), without an asyncio Task of their own; the bytes,
the metrics and the "connection complete" lines stay what they were.
"""

from __future__ import annotations

import asyncio
import gc
import hashlib
import os
import weakref
from collections.abc import Coroutine, Generator
from typing import Any

import uvloop
from test_proxy_loopback import SERVICE_IP, TCP_PORT, Rig, eventually, round_trip, run

from nodeagent.proxy.plumbing import UNTRACKED_UVLOOP, untrack_transports

CONNECTIONS = 5


def _proxy_tasks(loop: asyncio.AbstractEventLoop, made: list[str]) -> None:
    """Record the proxy's own Tasks (their coroutine's file is under nodeagent/proxy)."""

    def factory(
        loop: asyncio.AbstractEventLoop,
        coro: Coroutine[Any, Any, Any] | Generator[Any, None, Any],
        **kw: Any,
    ) -> asyncio.Task[Any]:
        code = getattr(coro, "cr_code", None)
        if code is not None and "nodeagent/proxy/" in code.co_filename:
            made.append(code.co_qualname)
        return asyncio.Task(coro, loop=loop, **kw)

    loop.set_task_factory(factory)  # type: ignore[arg-type]


def test_plain_tcp_connections_start_no_task_in_either_proxy() -> None:
    async def body(rig: Rig) -> None:
        made: list[str] = []
        loop = asyncio.get_running_loop()
        _proxy_tasks(loop, made)
        sent = 0
        try:
            for _ in range(CONNECTIONS):
                payload = os.urandom(1000)
                digest, size = await round_trip(*await rig.connect((SERVICE_IP, TCP_PORT)), payload)
                assert (digest, size) == (hashlib.sha256(payload).hexdigest(), len(payload))
                sent += size
        finally:
            loop.set_task_factory(None)
        assert made == [], f"the proxies started Tasks for plain connections: {made}"
        assert rig.echo.accepted == CONNECTIONS
        # both proxies counted every connection, and logged each when it closed
        await eventually(
            lambda: rig.tcp_sent("node2") == {("destination", "unknown", "none"): sent},
            "node2's inbound metrics",
        )
        assert rig.tcp_sent("node1") == {("source", "client", "none"): sent}
        for node in ("node1", "node2"):
            log = rig.proxies[node].access_log.recent_connections
            await eventually(lambda log=log: len(log) == CONNECTIONS, f"{node}'s log lines")
            assert {r["message"] for r in log} == {"connection complete"}
            assert all(r["bytes_sent"] == 1000 for r in log)

    run(False, body)


def test_a_closed_connection_leaves_no_reference_cycle_behind() -> None:
    # a cycle keeps a connection's transports, sockets and buffers until the GC runs, and
    # makes that GC run (and walk them) every few hundred connections
    async def body(rig: Rig) -> None:
        gc.collect()
        gc.disable()
        try:
            for _ in range(20):
                payload = os.urandom(100)
                await round_trip(*await rig.connect((SERVICE_IP, TCP_PORT)), payload)
            await eventually(lambda: not any(p.table.live for p in rig.proxies.values()), "closes")
            unreachable = gc.collect()
        finally:
            gc.enable()
        assert unreachable < 20, f"{unreachable} objects in cycles after 20 connections"

    run(False, body)


def test_closed_connections_leave_no_descriptor_open() -> None:
    # the proxies hand the loop each dialled socket's descriptor, not the socket: the
    # transport closes it when the connection ends, and nothing closes it a second time
    async def body(rig: Rig) -> None:
        payload = os.urandom(100)
        await round_trip(*await rig.connect((SERVICE_IP, TCP_PORT)), payload)  # warm
        await eventually(lambda: not any(p.table.live for p in rig.proxies.values()), "closes")
        before = len(os.listdir("/proc/self/fd"))
        for _ in range(20):
            got = await round_trip(*await rig.connect((SERVICE_IP, TCP_PORT)), payload)
            assert got == (hashlib.sha256(payload).hexdigest(), len(payload))
        await eventually(lambda: not any(p.table.live for p in rig.proxies.values()), "closes")
        await eventually(lambda: len(os.listdir("/proc/self/fd")) <= before, "descriptors")

    run(False, body)


def _tracked(loop: asyncio.AbstractEventLoop) -> int:
    """Transports uvloop records by descriptor (its one ``WeakValueDictionary``)."""
    found = [r for r in gc.get_referents(loop) if isinstance(r, weakref.WeakValueDictionary)]
    assert len(found) == 1
    return len(found[0])


def test_the_proxies_transports_are_not_recorded_by_the_loop() -> None:
    # uvloop records every transport in a WeakValueDictionary (Python code, ~9k
    # instructions a transport); the proxies' connections carry on without it
    async def body(rig: Rig) -> None:
        payload = os.urandom(100)
        await round_trip(*await rig.connect((SERVICE_IP, TCP_PORT)), payload)  # warm
        await eventually(lambda: not any(p.table.live for p in rig.proxies.values()), "closes")
        loop = asyncio.get_running_loop()
        before = _tracked(loop)
        held = [await rig.connect((SERVICE_IP, TCP_PORT)) for _ in range(5)]
        await eventually(
            lambda: sum(len(p.table.live) for p in rig.proxies.values()) == 10, "opens"
        )
        assert _tracked(loop) <= before  # nor the rig's client's and echo app's
        for r, w in held:
            w.write(payload)
            w.write_eof()
            assert await r.read() == payload
            w.close()

    run(False, body)


def test_untracking_is_for_uvloop_releases_that_were_read() -> None:
    # A new uvloop may use its transports' dictionary for more: this fails until someone
    # reads its loop.pyx and adds the release to UNTRACKED_UVLOOP
    assert uvloop.__version__.startswith(UNTRACKED_UVLOOP), (
        f"uvloop {uvloop.__version__}: check its use of Loop._transports, then extend "
        "plumbing.UNTRACKED_UVLOOP"
    )
    loop = uvloop.new_event_loop()
    try:
        assert untrack_transports(loop)
    finally:
        loop.close()
    other = asyncio.new_event_loop()  # asyncio's own loop needs its dictionary
    try:
        assert not untrack_transports(other)
    finally:
        other.close()


DENY_LOOPBACK = """
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: no-loopback, namespace: default}
spec:
  selector: {matchLabels: {app: echo}}
  action: DENY
  rules:
  - from: [{source: {ipBlocks: [127.0.0.0/8]}}]
"""


def test_a_live_plaintext_connection_is_closed_when_a_policy_now_denies_it() -> None:
    # its request for the authorizer is made only then, from what admission recorded
    async def body(rig: Rig) -> None:
        r, w = await rig.connect((SERVICE_IP, TCP_PORT))
        w.write(b"ping")
        assert await r.readexactly(4) == b"ping"
        rig.apply(DENY_LOOPBACK)
        assert await r.read() == b""  # closed by the re-check
        w.close()
        assert rig.failures("node2", "inbound", "RBAC") == 1
        (line,) = rig.proxies["node2"].access_log.recent_connections
        assert line["error"].startswith("RBAC"), line

    run(False, body)
