"""How an L7 exchange ends when the upstream's answer is not relayed, and when it tries
again; shared by the HTTP/1.1 and HTTP/2 paths.

Owns the local replies (``LocalReply``, ``Redirect``, the answer to a destination policy's
refusal), Istio's ``retryOn`` conditions, Envoy's jittered back-off between attempts, and
the route and per-try deadlines. Decides nothing of the plan (``core/plan.py``) and sends
nothing itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import Awaitable
from typing import TypeVar

from nodeagent.errors import ConnectRefusedError
from nodeagent.model.traffic import HTTPRetry

T = TypeVar("T")

RETRY_BACKOFF_BASE = 0.025
RETRY_BACKOFF_MAX = 0.25
"""Envoy's defaults: fully jittered exponential back-off between attempts."""
GRPC_RETRY_STATUS = {
    "cancelled": "1",
    "deadline-exceeded": "4",
    "internal": "13",
    "resource-exhausted": "8",
    "unavailable": "14",
}
"""``retryOn`` names of gRPC status codes (matched on ``grpc-status`` of the response)."""


class LocalReply(Exception):
    """End the exchange with a local response."""

    def __init__(
        self, status: int, flag: str, body: str, headers: tuple[tuple[str, str], ...] = ()
    ) -> None:
        super().__init__(body)
        self.status = status
        self.flag = flag
        self.body = body
        self.headers = headers


def policy_refusal(e: ConnectRefusedError) -> LocalReply | None:
    """The answer for the client when the destination's policy refused the tunnel: 403
    (an AuthorizationPolicy) or 429 (a connection rate limit); None for other failures."""
    if e.status == 403:
        return LocalReply(403, "RBAC", "RBAC: access denied")
    if e.status == 429:
        return LocalReply(429, "RL", "local_rate_limited", (("retry-after", "1"),))
    return None


class Redirect(Exception):
    """End the exchange with a redirect to ``location``."""

    def __init__(self, status: int, location: str) -> None:
        super().__init__(location)
        self.status = status
        self.location = location


def retriable_status(policy: HTTPRetry, status: int, grpc: str | None) -> str | None:
    """The ``retryOn`` condition a response with ``status`` and the ``grpc-status``
    header ``grpc`` (None: absent) meets, or None."""
    on = policy.retry_on
    if status >= 500 and "5xx" in on:
        return "5xx"
    if status in (502, 503, 504) and "gateway-error" in on:
        return "gateway-error"
    if status == 409 and "retriable-4xx" in on:
        return "retriable-4xx"
    code = str(status)
    if code in on:
        return code
    if grpc is not None:
        for name, value in GRPC_RETRY_STATUS.items():
            if grpc == value and name in on:
                return name
    return None


def retriable_failure(policy: HTTPRetry, kind: str) -> bool:
    """Whether a failure before any response (``connect-failure``, ``reset``,
    ``refused-stream``, ``per-try-timeout``) may be retried under ``retryOn``."""
    on = policy.retry_on
    if kind in on:
        return True
    if kind in ("connect-failure", "reset", "per-try-timeout"):
        return "5xx" in on or "gateway-error" in on
    return False


def deadline(seconds: float | None) -> contextlib.AbstractAsyncContextManager[object]:
    """``asyncio.timeout(seconds)``, or nothing at all when there is no limit (most
    routes: the timer machinery costs a few microseconds per request). For one awaitable,
    ``within`` is cheaper."""
    if seconds is None:
        return contextlib.nullcontext()
    return asyncio.timeout(seconds)


async def within(seconds: float | None, aw: Awaitable[T]) -> T:
    """``await aw`` under ``asyncio.timeout(seconds)``, or plainly when there is no limit:
    no context manager to enter and leave per request (``deadline(None)``'s nullcontext
    cost ~3 % of the HTTP/1.1 path's instructions, ``bench/l7_cost.py``)."""
    if seconds is None:
        return await aw
    async with asyncio.timeout(seconds):
        return await aw


def backoff(attempt: int) -> float:
    cap = min(RETRY_BACKOFF_MAX, RETRY_BACKOFF_BASE * (2 ** max(attempt - 1, 0)))
    return random.uniform(0, cap)


__all__ = [
    "LocalReply",
    "Redirect",
    "backoff",
    "deadline",
    "policy_refusal",
    "retriable_failure",
    "retriable_status",
    "within",
]
