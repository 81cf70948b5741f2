"""CPU cost of one proxied HTTP/1.1 keep-alive exchange through both sans-I/O machines of
``nodeagent.protocol.http1`` (no sockets, no event loop: the data path's parsing and
serialisation only).

One exchange, as the proxy does it:

    client request bytes -> DownstreamHttp1.receive_data -> RequestHead, RequestEnd
    -> UpstreamHttp1.send_request_head(forwardable_headers(...)) + send_end
    app response bytes -> UpstreamHttp1.receive_data -> ResponseHead, BodyChunk, ResponseEnd
    -> DownstreamHttp1.send_response_head(forwardable_headers(...)) + send_body + send_end
    -> UpstreamHttp1.start_next_request, DownstreamHttp1.start_next_request

with a wrk-like GET and a ~300 byte JSON response from an nginx-like server (the garbage
collector stays on, as in the agent). Prints the best and median µs per exchange over
several rounds, as CPU time of this process (the figure to compare: a busy machine
inflates wall time, which is printed too, much more than CPU time) and as wall time.

    .venv/bin/python bench/http1_parse_bench.py [--exchanges N] [--rounds R]
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time

from nodeagent.protocol.http1 import (
    BodyChunk,
    DownstreamHttp1,
    RequestEnd,
    RequestHead,
    ResponseEnd,
    ResponseHead,
    UpstreamHttp1,
    forwardable_headers,
)

REQUEST = (
    b"GET /api/v1/items?id=42 HTTP/1.1\r\n"
    b"Host: server.default.svc.cluster.local:8080\r\n"
    b"User-Agent: wrk/4.2.0\r\n"
    b"Accept: */*\r\n"
    b"\r\n"
)

_BODY = json.dumps(
    {
        "id": 42,
        "name": "widget",
        "tags": ["alpha", "beta", "gamma"],
        "price": {"amount": 1999, "currency": "EUR"},
        "stock": {"warehouse": "fra-1", "available": 1234, "reserved": 56},
        "updated": "2024-05-01T12:34:56Z",
        "description": "A perfectly ordinary widget used to benchmark the data path.",
    },
    separators=(",", ":"),
).encode()
BODY = _BODY + b" " * max(0, 300 - len(_BODY))

RESPONSE = (
    b"HTTP/1.1 200 OK\r\n"
    b"Server: nginx/1.24.0\r\n"
    b"Date: Wed, 01 May 2024 12:34:56 GMT\r\n"
    b"Content-Type: application/json\r\n"
    b"Content-Length: %d\r\n"
    b"Connection: keep-alive\r\n"
    b"\r\n" % len(BODY)
) + BODY


def exchange(down: DownstreamHttp1, up: UpstreamHttp1) -> tuple[bytes, bytes]:
    """One proxied exchange; returns (bytes to the app, bytes to the client)."""
    to_app = b""
    for ev in down.receive_data(REQUEST):
        if isinstance(ev, RequestHead):
            to_app = up.send_request_head(
                ev.method, ev.target, forwardable_headers(ev.headers), body=ev.has_body
            )
        elif isinstance(ev, RequestEnd):
            to_app += up.send_end(ev.trailers)
    to_client = b""
    for ev in up.receive_data(RESPONSE):
        if isinstance(ev, ResponseHead):
            to_client = down.send_response_head(
                ev.status, forwardable_headers(ev.headers), ev.reason
            )
        elif isinstance(ev, BodyChunk):
            to_client += down.send_body(ev.data)
        elif isinstance(ev, ResponseEnd):
            to_client += down.send_end(ev.trailers)
    up.start_next_request()
    down.start_next_request()
    return to_app, to_client


def run(exchanges: int) -> tuple[float, float]:
    """(CPU, wall) µs per exchange over ``exchanges`` exchanges on one keep-alive
    connection pair."""
    down, up = DownstreamHttp1(), UpstreamHttp1()
    gc.collect()
    cpu0, wall0 = time.process_time_ns(), time.perf_counter_ns()
    for _ in range(exchanges):
        exchange(down, up)
    cpu, wall = time.process_time_ns() - cpu0, time.perf_counter_ns() - wall0
    return cpu / exchanges / 1000, wall / exchanges / 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--exchanges", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()

    to_app, to_client = exchange(DownstreamHttp1(), UpstreamHttp1())  # sanity + warm-up
    assert to_app.startswith(b"GET /api/v1/items?id=42 HTTP/1.1\r\n"), to_app
    assert to_client.startswith(b"HTTP/1.1 200 OK\r\n") and to_client.endswith(BODY), to_client
    run(2_000)  # warm-up

    results = [run(args.exchanges) for _ in range(args.rounds)]
    cpu = [c for c, _ in results]
    wall = [w for _, w in results]
    print(
        f"http1 proxied keep-alive exchange (request {len(REQUEST)} B, "
        f"response {len(RESPONSE)} B, body {len(BODY)} B)"
    )
    print(f"  {args.rounds} rounds x {args.exchanges} exchanges, Python {sys.version.split()[0]}")
    print(f"  CPU  best {min(cpu):6.2f}  median {statistics.median(cpu):6.2f} µs/exchange")
    print(f"  wall best {min(wall):6.2f}  median {statistics.median(wall):6.2f} µs/exchange")


if __name__ == "__main__":
    main()
