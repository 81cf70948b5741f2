"""The API source's back-off while the API server is away: exponential, capped, with
jitter (so that the agents of a whole cluster do not come back in step)."""

from __future__ import annotations

from nodeagent.control.kubewatch import BACKOFF_BASE, BACKOFF_CAP, backoff_delay


def test_the_back_off_doubles_up_to_the_cap() -> None:
    for attempt in range(12):
        ceiling = min(BACKOFF_CAP, BACKOFF_BASE * 2**attempt)
        delays = [backoff_delay(attempt) for _ in range(200)]
        assert all(ceiling / 2 <= d <= ceiling for d in delays)
    assert max(backoff_delay(1000) for _ in range(50)) <= BACKOFF_CAP


def test_the_back_off_is_jittered() -> None:
    delays = {round(backoff_delay(3), 6) for _ in range(50)}
    assert len(delays) > 40
