"""``plumbing.drive``: a coroutine run to its end without a Task (how the proxy dials a
new connection), its end or error handed to a callback (what it makes, it hands on itself)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any

import pytest

from nodeagent.proxy.plumbing import drive


def _run(
    make: Callable[[asyncio.Future[int], list[int]], Coroutine[Any, Any, object]],
) -> tuple[list[int], BaseException | None, bool]:
    """Drive ``make(fut, out)``; (what it put in ``out``, the error handed over, whether
    no Task was made)."""

    async def main() -> tuple[list[int], BaseException | None, bool]:
        loop = asyncio.get_running_loop()
        ended: asyncio.Future[BaseException | None] = loop.create_future()
        fut: asyncio.Future[int] = loop.create_future()
        out: list[int] = []
        coro = make(fut, out)
        tasks_before = len(asyncio.all_tasks())
        loop.call_soon(drive, coro, ended.set_result)
        loop.call_later(0.01, fut.set_result, 41)
        await asyncio.sleep(0)
        no_task = len(asyncio.all_tasks()) == tasks_before
        err = await ended
        return out, err, no_task

    return asyncio.run(main())


def test_a_coroutine_runs_to_its_end_through_yields_futures_and_timers() -> None:
    async def steps(fut: asyncio.Future[int], out: list[int]) -> str:
        await asyncio.sleep(0)  # a bare yield
        got = await fut  # a future done later
        await asyncio.sleep(0.01)  # a timer
        out.append(got + 1)
        return "dropped"  # (a result is not handed over)

    assert _run(steps) == ([42], None, True)


def test_an_error_inside_is_handed_over_not_raised() -> None:
    async def fails(fut: asyncio.Future[int], out: list[int]) -> None:
        out.append(await fut)
        raise ConnectionRefusedError("refused")

    out, err, _ = _run(fails)
    assert out == [41] and isinstance(err, ConnectionRefusedError)


def test_a_coroutine_ending_at_once_is_done_in_its_first_step() -> None:
    async def at_once(fut: asyncio.Future[int], out: list[int]) -> None:
        out.append(1)

    assert _run(at_once) == ([1], None, True)


def test_a_coroutine_that_needs_a_task_says_so() -> None:
    # why connect_in waits with a timer: asyncio.timeout needs the current Task
    async def timed(fut: asyncio.Future[int], out: list[int]) -> int:
        async with asyncio.timeout(1):
            return await fut

    out, err, _ = _run(timed)
    assert out == [] and isinstance(err, RuntimeError)
    with pytest.raises(RuntimeError, match="inside a task"):
        raise err
