"""A hostile HTTP/2 client against the L7 path's h2c listener (the real ``L7Proxy`` and
``serve_h2`` in front of a real gRPC app, ``L7Rig``): a reset in the same read ends only
its stream; rapid reset (CVE-2023-44487) and a PING flood that reads nothing end in
GOAWAY(ENHANCE_YOUR_CALM), counted, with the proxy's output bounded; a gRPC call alongside
completes with its bytes intact."""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import h2.config
import h2.connection
import h2.events
import pytest
from l7harness import L7Rig
from test_hbone_abuse import ENHANCE_YOUR_CALM, goaway_of, ping, rst

from nodeagent.samples.samplegrpc import call_unary

REQUEST = [
    (":method", "POST"),
    (":scheme", "http"),
    (":path", "/nodeagent.sample.Echo/Unary"),
    (":authority", "web"),
    ("content-type", "application/grpc"),
    ("te", "trailers"),
]


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[L7Rig]:
    with L7Rig(Path(tmp_path_factory.mktemp("h2abuse")), {"v1": 1}) as r:
        # Accepted sockets inherit it: the kernel holds little, the rest stays in the proxy.
        r._h2server.sockets[0].setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 32 * 1024)
        yield r


def peer_errors(rig: L7Rig, kind: str) -> float:
    labels = {"listener": "http2", "kind": kind}
    value = rig.metrics.registry.get_sample_value("nodeagent_http2_peer_errors_total", labels)
    return value or 0.0


def dial(rig: L7Rig, rcvbuf: int = 0) -> socket.socket:
    sock = socket.socket()
    if rcvbuf:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.settimeout(10)
    sock.connect(rig.grpc_address)
    return sock


def read_all(sock: socket.socket, limit: float = 10) -> bytes:
    received = bytearray()
    deadline = time.monotonic() + limit
    sock.settimeout(1)
    while time.monotonic() < deadline:
        try:
            chunk = sock.recv(1 << 16)
        except TimeoutError:
            continue
        except OSError:
            break
        if not chunk:
            break
        received += chunk
    return bytes(received)


def client() -> h2.connection.H2Connection:
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    conn.initiate_connection()
    return conn


def test_a_reset_in_the_same_read_ends_only_that_stream(rig: L7Rig) -> None:
    conn = client()
    with dial(rig) as sock:
        conn.send_headers(1, REQUEST)
        burst = conn.data_to_send() + rst(1)
        conn.send_headers(3, [*REQUEST[:3], (":authority", "web")], end_stream=True)
        burst += conn.data_to_send()
        sock.sendall(burst)
        status = None
        while status is None:
            for ev in conn.receive_data(sock.recv(1 << 16)):
                if isinstance(ev, h2.events.ResponseReceived) and ev.stream_id == 3:
                    status = dict(ev.headers or [])[b":status"]
                assert not isinstance(ev, h2.events.ConnectionTerminated), ev
            sock.sendall(conn.data_to_send())
        assert status is not None  # stream 3 was answered on the same connection


def test_rapid_reset_is_answered_with_goaway_and_counted(rig: L7Rig) -> None:
    payload = os.urandom(3 << 20)

    def attack() -> bytes:
        conn = client()
        with dial(rig) as sock:
            sock.sendall(conn.data_to_send())
            try:
                for first in range(0, 10_000, 100):
                    batch = b""
                    for i in range(first, first + 100):
                        conn.send_headers(2 * i + 1, REQUEST)
                        batch += conn.data_to_send() + rst(2 * i + 1)
                    sock.sendall(batch)
                sock.shutdown(socket.SHUT_WR)
            except OSError:
                pass
            return read_all(sock)

    target = f"{rig.grpc_address[0]}:{rig.grpc_address[1]}"
    with ThreadPoolExecutor(2) as pool:
        attacked = pool.submit(attack)
        good = pool.submit(call_unary, target, "good", payload=payload)
        received = attacked.result(60)
        assert good.result(60).payload == payload
    goaway = goaway_of(received)
    assert goaway is not None, "no GOAWAY after 10,000 HEADERS+RST pairs"
    assert goaway.error_code == ENHANCE_YOUR_CALM
    assert peer_errors(rig, "rapid_reset") == 1
    assert 100 <= peer_errors(rig, "premature_reset") < 10_000


def test_a_ping_flood_is_bounded_and_ends_in_goaway(rig: L7Rig) -> None:
    count = 200_000  # 3.4 MB of answers

    def flood() -> bytes:
        with dial(rig, rcvbuf=4096) as sock:
            sock.sendall(client().data_to_send())
            chunk = ping() * 1000
            sock.settimeout(1)
            try:
                for _ in range(count // 1000):
                    sock.sendall(chunk)
                sock.shutdown(socket.SHUT_WR)
            except OSError:  # the proxy stopped reading (closed): read what it said
                pass
            return read_all(sock)

    received = flood()
    # Everything the proxy queued for this client, since it read nothing until then.
    assert len(received) <= 768 * 1024, f"{len(received)} bytes queued for the flooder"
    goaway = goaway_of(received)
    assert goaway is not None, f"no GOAWAY after {count} unread PINGs"
    assert goaway.error_code == ENHANCE_YOUR_CALM
    assert peer_errors(rig, "control_flood") == 1
