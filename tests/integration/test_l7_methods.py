"""Request methods that are not upper-case tokens (``get``, ``G@T``), against the real
``L7Proxy`` on loopback (``l7harness``): HTTP/1.1 and HTTP/2 alike get a 400 naming the
method, and the app never sees the request. Methods are case-sensitive (RFC 9110 §9.1):
an app that folds ``get`` into ``GET`` would otherwise serve what a policy on ``GET``
was meant to decide."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import h2.config
import h2.connection
import h2.events
import pytest
from l7harness import L7Rig


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[L7Rig]:
    with L7Rig(Path(tmp_path_factory.mktemp("methods")), {"v1": 1}) as r:
        yield r


def exchange(rig: L7Rig, data: bytes) -> bytes:
    with socket.create_connection(rig.address, timeout=10) as s:
        s.sendall(data)
        out = b""
        while d := s.recv(65536):
            out += d
        return out


@pytest.mark.parametrize("method", [b"get", b"Get", b"G@T", b"GET\x01"])
def test_http1_invalid_method_is_400(rig: L7Rig, method: bytes) -> None:
    out = exchange(rig, method + b" / HTTP/1.1\r\nhost: web\r\nconnection: close\r\n\r\n")
    assert out.startswith(b"HTTP/1.1 400"), out[:200]
    assert b"invalid method: methods are upper-case tokens" in out, out
    assert b"x-nodeagent-response-flag: DPE" in out
    assert b"nodeagent-sample-app" not in out  # the app never saw it


def test_http1_pipelined_invalid_method_is_400(rig: L7Rig) -> None:
    good = b"GET / HTTP/1.1\r\nhost: web\r\n\r\n"
    out = exchange(rig, good + b"delete /x HTTP/1.1\r\nhost: web\r\n\r\n")
    assert out.startswith(b"HTTP/1.1 200"), out[:200]
    assert b"HTTP/1.1 400" in out
    assert b"invalid method: methods are upper-case tokens" in out


def h2_request(rig: L7Rig, method: str) -> tuple[bytes, bytes]:
    """(status, body) of one HTTP/2 request with ``method`` on the h2c listener."""
    conn = h2.connection.H2Connection(
        h2.config.H2Configuration(client_side=True, validate_outbound_headers=False)
    )
    conn.initiate_connection()
    conn.send_headers(
        1,
        [(":method", method), (":scheme", "http"), (":path", "/"), (":authority", "web")],
        end_stream=True,
    )
    status, body = b"", b""
    with socket.create_connection(rig.grpc_address, timeout=10) as s:
        s.sendall(conn.data_to_send())
        done = False
        while not done:
            data = s.recv(65536)
            assert data, "connection closed before the answer"
            for ev in conn.receive_data(data):
                if isinstance(ev, h2.events.ResponseReceived):
                    status = dict(ev.headers or [])[b":status"]
                elif isinstance(ev, h2.events.DataReceived):
                    body += ev.data
                elif isinstance(ev, h2.events.StreamEnded | h2.events.StreamReset):
                    done = True
            s.sendall(conn.data_to_send())
    return status, body


@pytest.mark.parametrize("method", ["get", "pOST", "G@T"])
def test_http2_invalid_method_is_400_naming_it(rig: L7Rig, method: str) -> None:
    status, body = h2_request(rig, method)
    assert status == b"400", (status, body)
    assert f"invalid :method '{method}'".encode() in body, body


def test_http2_upper_case_extension_method_passes(rig: L7Rig) -> None:
    status, _ = h2_request(rig, "GET")
    assert status != b"400"
