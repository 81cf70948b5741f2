"""``Events``: the queue between an HTTP/1.1 machine's reads and the L7 session taking
them one at a time (pipelined requests, a response read with its body)."""

from __future__ import annotations

from nodeagent.proxy.h1pool import Events


def test_events_come_out_in_the_order_they_were_read() -> None:
    q: Events[str] = Events()
    assert q.take() is None and len(q) == 0
    q.put(["a", "b"])
    assert q.take() == "a"
    q.put([])  # a read that completed nothing
    q.put(["c"])  # behind what is still queued
    assert len(q) == 2
    assert [q.take(), q.take(), q.take()] == ["b", "c", None]
    q.put(["d", "e", "f"])
    assert q.take() == "d"
    assert q.take_all() == ["e", "f"] and q.take() is None


def test_a_queue_keeps_no_event_once_all_are_taken() -> None:
    first = ["a"]
    q: Events[str] = Events()
    q.put(first)
    assert q.take() == "a"
    q.put(["b"])  # the first list is not appended to: it may still be someone's
    assert first == ["a"] and q.take() == "b"
