"""``plumbing.drive``: a coroutine run to its end without a Task (how the proxy dials a
new connection), its result or error handed to a callback."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any

import pytest

from nodeagent.proxy.plumbing import drive


async def _steps(fut: asyncio.Future[int]) -> int:
    await asyncio.sleep(0)  # a bare yield
    got = await fut  # a future done later
    await asyncio.sleep(0.01)  # a timer
    return got + 1


def _run(
    make: Callable[[asyncio.Future[int]], Coroutine[Any, Any, int]],
) -> tuple[object, BaseException | None, bool]:
    async def main() -> tuple[object, BaseException | None, bool]:
        loop = asyncio.get_running_loop()
        ended: asyncio.Future[tuple[object, BaseException | None]] = loop.create_future()
        fut: asyncio.Future[int] = loop.create_future()
        coro = make(fut)
        tasks_before = len(asyncio.all_tasks())
        loop.call_soon(drive, coro, lambda r, e: ended.set_result((r, e)))
        loop.call_later(0.01, fut.set_result, 41)
        await asyncio.sleep(0)
        no_task = len(asyncio.all_tasks()) == tasks_before
        result, err = await ended
        return result, err, no_task

    return asyncio.run(main())


def test_a_coroutine_runs_to_its_result_through_yields_futures_and_timers() -> None:
    assert _run(_steps) == (42, None, True)


def test_an_error_inside_is_handed_over_not_raised() -> None:
    async def fails(fut: asyncio.Future[int]) -> int:
        await fut
        raise ConnectionRefusedError("refused")

    result, err, _ = _run(fails)
    assert result is None and isinstance(err, ConnectionRefusedError)


def test_a_coroutine_that_needs_a_task_says_so() -> None:
    # why connect_in waits with a timer: asyncio.timeout needs the current Task
    async def timed(fut: asyncio.Future[int]) -> int:
        async with asyncio.timeout(1):
            return await fut

    result, err, _ = _run(timed)
    assert result is None and isinstance(err, RuntimeError)
    with pytest.raises(RuntimeError, match="inside a task"):
        raise err
