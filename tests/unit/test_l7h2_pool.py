"""``H2Pool``'s dial in progress: requests that wait for it end with their own
cancellation, even when the dial is cancelled in the same pass (a client gone takes all
its streams' tasks at once)."""

from __future__ import annotations

import asyncio
import types
from typing import Any

import uvloop

from nodeagent.proxy.l7h2 import H2Pool
from nodeagent.proxy.pipe import Pipe


def test_waiters_cancelled_with_the_dial_they_wait_for_end_cancelled() -> None:
    dials: list[str] = []

    async def connect(ep: Any, pipe: Pipe) -> tuple[str, str]:
        dials.append(asyncio.current_task().get_name())  # type: ignore[union-attr]
        await asyncio.sleep(3600)  # an endpoint that never answers the dial
        raise AssertionError("unreachable")

    cluster: Any = types.SimpleNamespace(name="c", max_h2_requests=100, connect_timeout=None)
    ep: Any = types.SimpleNamespace(ip="10.0.0.1", port=80)

    async def main() -> None:
        pool = H2Pool()
        args: Any = ("GET", "http", "a", "/", [], True)
        tasks = [
            asyncio.create_task(pool.stream("src", cluster, ep, connect, args), name=n)
            for n in "ABC"
        ]
        await asyncio.sleep(0.01)
        for t in tasks:  # in order, as the session's end cancels its streams
            t.cancel()
        _done, pending = await asyncio.wait(tasks, timeout=1)
        assert not pending, [t.get_name() for t in pending]
        assert all(t.cancelled() for t in tasks)
        assert dials == ["A"]  # nobody dialled again for a request that is gone

    loop = uvloop.new_event_loop()  # not uvloop.run: its clean-up would wait on a task
    try:  # that swallows its cancellation, which is the bug this test is about
        loop.run_until_complete(main())
    finally:
        loop.close()
