"""HTTP/1.1 clients that are slow, silent or send too many headers, and upstreams that are
slow, against the real ``L7Proxy`` on loopback (``l7harness``): a request head cut by the
head timeout gets 408, an idle kept-alive connection is closed, too many or too large
header fields get 431 (each counted in ``nodeagent_http1_limit_hits_total`` and logged
once); a route's timeout and its retries' per-try timeout answer 504 in time."""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from l7harness import L7Rig

from nodeagent.proxy.inputs import Http1Limits

HEAD_TIMEOUT, IDLE_TIMEOUT = 0.5, 1.0


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[L7Rig]:
    with L7Rig(tmp_path, {"v1": 1}) as r:
        r.proxy.http1_limits = Http1Limits(
            request_headers_timeout=HEAD_TIMEOUT, idle_timeout=IDLE_TIMEOUT
        )
        yield r


def hits(rig: L7Rig, limit: str) -> float:
    value = rig.metrics.registry.get_sample_value(
        "nodeagent_http1_limit_hits_total", {"limit": limit}
    )
    return value or 0.0


def read_until_closed(s: socket.socket) -> bytes:
    out = b""
    while d := s.recv(65536):
        out += d
    return out


def exchange(rig: L7Rig, data: bytes) -> bytes:
    with socket.create_connection(rig.address, timeout=10) as s:
        s.sendall(data)
        return read_until_closed(s)


def head(fields: int, size: int = 1) -> bytes:
    """A request head of ``fields`` header fields, all but two of ``size`` bytes."""
    extra = b"".join(b"x-h%d: %s\r\n" % (i, b"v" * size) for i in range(fields - 2))
    return b"GET / HTTP/1.1\r\nhost: web\r\nconnection: close\r\n" + extra + b"\r\n"


def test_too_many_header_fields_get_431(rig: L7Rig, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, "nodeagent.proxy.l7")
    assert exchange(rig, head(90)).startswith(b"HTTP/1.1 200")
    out = exchange(rig, head(100))  # passed on (the sample app, http.server, then refuses
    assert b"x-nodeagent-response-flag" not in out  # it with its own 431: the proxy added
    assert hits(rig, "max_headers_count") == 0  # its trace headers)
    for _ in range(3):
        out = exchange(rig, head(101))
        assert out.startswith(b"HTTP/1.1 431"), out[:200]
        assert b"request has more than 100 header fields" in out
    assert hits(rig, "max_headers_count") == 3
    logged = [r for r in caplog.records if "max_headers_count" in r.getMessage()]
    assert len(logged) == 1  # once, however many clients hit it


def test_a_head_larger_than_60_kib_gets_431(rig: L7Rig) -> None:
    assert exchange(rig, head(4, 20_000)).startswith(b"HTTP/1.1 200")  # 40 kB
    out = exchange(rig, head(5, 21_000))  # 63 kB
    assert out.startswith(b"HTTP/1.1 431"), out[:200]
    assert hits(rig, "max_request_headers_size") == 1


def test_a_slow_request_head_gets_408(rig: L7Rig) -> None:
    with socket.create_connection(rig.address, timeout=10) as s:
        start = time.monotonic()
        s.sendall(b"GET / HTTP/1.1\r\nhost: web\r\n")  # ... and the rest never comes
        out = read_until_closed(s)
        took = time.monotonic() - start
    assert out.startswith(b"HTTP/1.1 408 Request Timeout\r\n"), out
    assert out.endswith(b"request head not received within 0.5s\n")
    assert HEAD_TIMEOUT <= took < IDLE_TIMEOUT  # the head's clock, not the idle one
    assert hits(rig, "request_headers_timeout") == 1
    assert rig.records()[-1]["response_code"] == 408


def test_an_idle_connection_is_closed_quietly(rig: L7Rig) -> None:
    with socket.create_connection(rig.address, timeout=10) as s:
        s.sendall(b"GET / HTTP/1.1\r\nhost: web\r\n\r\n")
        first = s.recv(65536)
        assert first.startswith(b"HTTP/1.1 200"), first
        start = time.monotonic()
        rest = read_until_closed(s)  # kept alive, then closed when idle
        took = time.monotonic() - start
    assert b"HTTP/1.1" not in rest  # no response: closed quietly
    assert IDLE_TIMEOUT * 0.9 <= took < IDLE_TIMEOUT + 2
    with socket.create_connection(rig.address, timeout=10) as s:  # silent from the start
        assert read_until_closed(s) == b""
    assert hits(rig, "idle_timeout") == 2
    assert hits(rig, "request_headers_timeout") == 0


def test_kept_alive_requests_share_one_timer(rig: L7Rig) -> None:
    """The head and idle timeouts move one timer per connection: a request arms none
    (``asyncio.timeout`` per request cost two timer handles and its context manager)."""
    armed: list[float] = []
    call_at = rig.loop.call_at

    def counting(when: float, *args: Any, **kwargs: Any) -> asyncio.TimerHandle:
        armed.append(when)
        return call_at(when, *args, **kwargs)

    with socket.create_connection(rig.address, timeout=10) as s:
        f = s.makefile("rb")

        def get() -> None:
            s.sendall(b"GET / HTTP/1.1\r\nhost: web\r\n\r\n")
            status, length = f.readline(), 0
            while (line := f.readline()) != b"\r\n":
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":")[1])
            assert status.startswith(b"HTTP/1.1 200") and len(f.read(length)) == length

        get()
        rig.loop.call_at = counting  # type: ignore[method-assign]
        try:
            for _ in range(20):
                get()
        finally:
            del rig.loop.call_at
    assert len(armed) <= 3, armed  # (the access log's flush timer may be among them)
    assert hits(rig, "idle_timeout") == hits(rig, "request_headers_timeout") == 0


def test_route_and_per_try_timeouts_cut_a_slow_upstream(rig: L7Rig) -> None:
    """A route's ``timeout`` and its retries' ``perTryTimeout`` answer 504 in time (the
    timed paths beside the untimed one most routes take); a quick answer still passes."""

    def get(path: str) -> tuple[bytes, float]:
        start = time.monotonic()
        request = f"GET {path} HTTP/1.1\r\nhost: web\r\nconnection: close\r\n\r\n"
        out = exchange(rig, request.encode())
        return out, time.monotonic() - start

    route = """
        apiVersion: networking.istio.io/v1
        kind: VirtualService
        metadata: {name: web, namespace: default}
        spec:
          hosts: [web]
          http:
          - route: [{destination: {host: web}}]
            %s
    """
    rig.apply(route % "timeout: 0.4s")
    assert get("/")[0].startswith(b"HTTP/1.1 200")
    out, took = get("/delay/3")
    assert out.startswith(b"HTTP/1.1 504"), out[:200]
    assert took < 2.5, took
    assert rig.records()[-1]["response_flags"] == "UT"
    rig.apply(route % 'retries: {attempts: 2, perTryTimeout: 0.3s, retryOn: "5xx,reset"}')
    assert get("/")[0].startswith(b"HTTP/1.1 200")
    out, took = get("/delay/3")
    assert out.startswith(b"HTTP/1.1 504"), out[:200]
    assert took < 2.5, took  # 3 tries of 0.3 s plus back-off, not 3 s
    assert rig.records()[-1]["attempts"] == 3
