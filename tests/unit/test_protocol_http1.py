"""The HTTP/1.1 proxy machines without sockets: each test is a script of the conversation
(bytes in -> expected events; command -> expected bytes)."""

from __future__ import annotations

import hashlib
import itertools
import os
from collections.abc import Sequence

import h11
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nodeagent.protocol.http1 import (
    RESPONSE_FLAG_HEADER,
    BodyChunk,
    ConnectionClosed,
    DownstreamHttp1,
    Informational,
    ProtocolError,
    RequestEnd,
    RequestHead,
    ResponseEnd,
    ResponseHead,
    Upgraded,
    UpstreamHttp1,
    forwardable_headers,
)

GET = b"GET /a HTTP/1.1\r\nHost: svc\r\n\r\n"
GET_B = b"GET /b HTTP/1.1\r\nHost: svc\r\n\r\n"


def head(
    target: str = "/a",
    headers: tuple[tuple[str, str], ...] = (("host", "svc"),),
    *,
    method: str = "GET",
    keep_alive: bool = True,
    expect_continue: bool = False,
    upgrade: str | None = None,
    has_body: bool = False,
) -> RequestHead:
    return RequestHead(
        method, target, headers, "1.1", keep_alive, expect_continue, upgrade, has_body
    )


def merged(events: Sequence[object]) -> list[object]:
    """Events with adjacent body pieces joined: what must not depend on how bytes split."""
    out: list[object] = []
    for ev in events:
        if isinstance(ev, BodyChunk) and out and isinstance(out[-1], BodyChunk):
            out[-1] = BodyChunk(out[-1].data + ev.data)
        elif isinstance(ev, Upgraded) and out and isinstance(out[-1], Upgraded):
            out[-1] = Upgraded(out[-1].data + ev.data)
        else:
            out.append(ev)
    return out


def respond_ok(down: DownstreamHttp1, body: bytes = b"ok") -> bytes:
    return (
        down.send_response_head(200, [("content-length", str(len(body)))])
        + down.send_body(body)
        + down.send_end()
    )


# -- downstream ---------------------------------------------------------------------------


def test_get_keep_alive_two_requests() -> None:
    down = DownstreamHttp1()
    assert down.receive_data(GET) == [head(), RequestEnd()]
    assert respond_ok(down) == b"HTTP/1.1 200 \r\ncontent-length: 2\r\n\r\nok"
    assert down.keep_alive
    assert down.start_next_request() == []
    assert down.receive_data(GET_B) == [head("/b"), RequestEnd()]
    respond_ok(down)
    assert down.start_next_request() == []
    assert down.receive_data(b"") == [ConnectionClosed()]


def test_pipelined_pair_in_one_receive_is_buffered_until_next_request() -> None:
    down = DownstreamHttp1()
    assert down.receive_data(GET + GET_B) == [head(), RequestEnd()]
    assert down.receive_data(b"") == []  # EOF after the pair: still nothing lost
    respond_ok(down)
    assert down.start_next_request() == [head("/b"), RequestEnd(), ConnectionClosed()]


def test_connection_close_request_is_not_kept_alive() -> None:
    down = DownstreamHttp1()
    events = down.receive_data(b"GET / HTTP/1.1\r\nHost: s\r\nConnection: close\r\n\r\n")
    assert isinstance(events[0], RequestHead) and not events[0].keep_alive
    wire = respond_ok(down)
    assert wire.startswith(b"HTTP/1.1 200 ")
    assert b"connection: close" in wire.lower()
    assert not down.keep_alive


CHUNKED_REQUEST = (
    b"POST /up HTTP/1.1\r\nHost: svc\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"5\r\nhello\r\n6\r\n world\r\n0\r\nx-sum: 1\r\n\r\n"
)
CHUNKED_EVENTS = [
    head(
        "/up",
        (("host", "svc"), ("transfer-encoding", "chunked")),
        method="POST",
        has_body=True,
    ),
    BodyChunk(b"hello world"),
    RequestEnd((("x-sum", "1"),)),
]


def feed(machine: DownstreamHttp1 | UpstreamHttp1, pieces: list[bytes]) -> list[object]:
    events: list[object] = []
    for p in pieces:
        events.extend(machine.receive_data(p))
    return merged(events)


def test_chunked_request_every_split_point() -> None:
    for i in range(len(CHUNKED_REQUEST) + 1):
        down = DownstreamHttp1()
        pieces = [CHUNKED_REQUEST[:i], CHUNKED_REQUEST[i:]]
        assert feed(down, [p for p in pieces if p]) == CHUNKED_EVENTS, i


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, len(CHUNKED_REQUEST + GET)), max_size=12))
def test_any_split_gives_the_same_events(cuts: list[int]) -> None:
    data = CHUNKED_REQUEST + GET  # a pipelined second request too
    bounds = [0, *sorted(cuts), len(data)]
    pieces = [data[a:b] for a, b in itertools.pairwise(bounds) if b > a]
    down = DownstreamHttp1()
    events = feed(down, pieces)
    assert events == CHUNKED_EVENTS
    respond_ok(down)
    assert down.start_next_request() == [head(), RequestEnd()]


def test_expect_100_continue() -> None:
    down = DownstreamHttp1()
    request = b"PUT /f HTTP/1.1\r\nHost: svc\r\nContent-Length: 3\r\nExpect: 100-continue\r\n\r\n"
    [ev] = down.receive_data(request)
    assert isinstance(ev, RequestHead) and ev.expect_continue and ev.has_body
    assert down.send_continue() == b"HTTP/1.1 100 \r\n\r\n"
    assert down.send_continue() == b""  # only once
    assert down.receive_data(b"abc") == [BodyChunk(b"abc"), RequestEnd()]


def test_malformed_request_line_is_400() -> None:
    down = DownstreamHttp1()
    [ev] = down.receive_data(b"GET /a b c\r\n\r\n")
    assert isinstance(ev, ProtocolError) and ev.status == 400
    wire = down.send_error(400, "bad request line", "DPE")
    assert wire.startswith(b"HTTP/1.1 400 ")
    assert f"{RESPONSE_FLAG_HEADER}: DPE".encode() in wire
    assert b"connection: close" in wire.lower()
    assert wire.endswith(b"\r\n\r\nbad request line\n")
    assert not down.keep_alive
    assert down.receive_data(GET) == []  # nothing more is parsed


@pytest.mark.parametrize("pieces", [1, 70])
def test_70_kib_of_headers_is_431(pieces: int) -> None:
    headers = b"".join(b"x-h%d: %s\r\n" % (i, b"v" * 1000) for i in range(70))
    data = b"GET / HTTP/1.1\r\nHost: svc\r\n" + headers + b"\r\n"
    down = DownstreamHttp1()
    step = -(-len(data) // pieces)
    events = [ev for i in range(0, len(data), step) for ev in down.receive_data(data[i : i + step])]
    assert len(events) == 1 and isinstance(events[0], ProtocolError)
    assert events[0].status == 431
    assert down.send_error(431, "headers too large", "DPE").startswith(b"HTTP/1.1 431 ")


def test_configured_header_limit() -> None:
    down = DownstreamHttp1(max_header_size=64)
    [ev] = down.receive_data(b"GET / HTTP/1.1\r\nHost: svc\r\nx-a: " + b"a" * 60 + b"\r\n\r\n")
    assert ev == ProtocolError(431, "request head exceeds 64 bytes")


def test_client_eof_mid_body_is_unclean_close() -> None:
    down = DownstreamHttp1()
    down.receive_data(b"POST / HTTP/1.1\r\nHost: s\r\nContent-Length: 10\r\n\r\nabc")
    assert down.receive_data(b"") == [ConnectionClosed(clean=False)]


def test_send_error_after_response_started_means_close() -> None:
    down = DownstreamHttp1()
    down.receive_data(GET)
    down.send_response_head(200, [])
    assert down.send_error(502, "upstream reset", "UR") == b""
    assert not down.keep_alive


def test_response_without_length_is_chunked_to_the_client() -> None:
    down = DownstreamHttp1()
    down.receive_data(GET)
    wire = down.send_response_head(200, []) + down.send_body(b"abc") + down.send_end()
    assert wire == b"HTTP/1.1 200 \r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n"


WS_REQUEST = (
    b"GET /chat HTTP/1.1\r\nHost: svc\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
    b"Sec-WebSocket-Key: k\r\nSec-WebSocket-Version: 13\r\n\r\n"
)


def test_websocket_upgrade_switches_to_passthrough() -> None:
    down = DownstreamHttp1()
    events = down.receive_data(WS_REQUEST + b"\x81\x02hi")
    assert isinstance(events[0], RequestHead) and events[0].upgrade == "websocket"
    assert events[1:] == [RequestEnd()]
    # Forward to the app; the app answers 101; both sides switch.
    up = UpstreamHttp1()
    fwd = forwardable_headers(events[0].headers, upgrade=events[0].upgrade)
    wire = up.send_request_head("GET", "/chat", fwd) + up.send_end()
    assert b"connection: upgrade\r\nupgrade: websocket\r\n" in wire
    answer = (
        b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n"
    )
    up_events = up.receive_data(answer + b"\x81\x02yo")
    assert isinstance(up_events[0], ResponseHead) and up_events[0].status == 101
    assert up_events[1:] == [Upgraded(b"\x81\x02yo")]
    assert up.upgraded and not up.reusable
    resp = down.send_response_head(
        101, forwardable_headers(up_events[0].headers, upgrade="websocket")
    )
    assert resp.startswith(b"HTTP/1.1 101 ")
    assert down.upgraded
    assert down.take_events() == [Upgraded(b"\x81\x02hi")]
    assert down.receive_data(b"\x81\x03abc") == [Upgraded(b"\x81\x03abc")]
    assert down.send_body(b"raw") == b"raw"
    assert up.send_body(b"raw") == b"raw"
    assert down.receive_data(b"") == [ConnectionClosed()]
    assert up.receive_data(b"") == [ConnectionClosed()]


def test_upgrade_refused_continues_as_http() -> None:
    down = DownstreamHttp1()
    down.receive_data(WS_REQUEST)
    respond_ok(down)
    assert not down.upgraded
    assert down.start_next_request() == []
    assert down.receive_data(GET) == [head(), RequestEnd()]


# -- hop-by-hop ---------------------------------------------------------------------------


def test_forwardable_headers_strips_hop_by_hop() -> None:
    headers = [
        ("Host", "svc"),
        ("Connection", "keep-alive, X-Private"),
        ("Keep-Alive", "timeout=5"),
        ("Proxy-Connection", "keep-alive"),
        ("TE", "trailers"),
        ("Transfer-Encoding", "chunked"),
        ("Upgrade", "websocket"),
        ("X-Private", "secret"),
        ("Content-Length", "3"),
        ("x-request-id", "1"),
    ]
    assert forwardable_headers(headers) == [
        ("Host", "svc"),
        ("Content-Length", "3"),
        ("x-request-id", "1"),
    ]
    assert forwardable_headers(headers, upgrade="websocket")[-2:] == [
        ("connection", "upgrade"),
        ("upgrade", "websocket"),
    ]


# -- upstream -----------------------------------------------------------------------------


def test_upstream_keep_alive_exchange() -> None:
    up = UpstreamHttp1()
    assert up.send_request_head("GET", "/a", [("host", "svc")]) + up.send_end() == GET.replace(
        b"Host", b"host"
    )
    assert not up.reusable
    events = up.receive_data(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    assert events == [
        ResponseHead(200, (("content-length", "2"),), "OK", "1.1", True),
        BodyChunk(b"ok"),
        ResponseEnd(),
    ]
    assert up.reusable
    up.start_next_request()
    assert up.send_request_head("GET", "/b", [("host", "svc")]) != b""


def test_upstream_chunked_response_every_split_point() -> None:
    response = (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"3\r\nabc\r\n4\r\ndefg\r\n0\r\ngrpc-status: 0\r\n\r\n"
    )
    expected = [
        ResponseHead(200, (("transfer-encoding", "chunked"),), "OK", "1.1", True),
        BodyChunk(b"abcdefg"),
        ResponseEnd((("grpc-status", "0"),)),
    ]
    for i in range(len(response) + 1):
        up = UpstreamHttp1()
        up.send_request_head("GET", "/", [("host", "svc")])
        up.send_end()
        assert feed(up, [p for p in (response[:i], response[i:]) if p]) == expected, i
        assert up.reusable


def test_upstream_read_until_close_body() -> None:
    up = UpstreamHttp1()
    up.send_request_head("GET", "/", [("host", "svc")])
    up.send_end()
    events = up.receive_data(b"HTTP/1.1 200 OK\r\n\r\nall of it")
    assert events[1:] == [BodyChunk(b"all of it")]
    assert up.receive_data(b"") == [ResponseEnd(), ConnectionClosed(clean=True)]
    assert not up.reusable


def test_upstream_interim_100() -> None:
    up = UpstreamHttp1()
    up.send_request_head("PUT", "/", [("host", "svc"), ("expect", "100-continue")], body=True)
    assert up.receive_data(b"HTTP/1.1 100 Continue\r\n\r\n") == [Informational(100, ())]


@pytest.mark.parametrize(
    "answer",
    [b"HTTP/1.1 abc OK\r\n\r\n", b"garbage\r\n\r\n", b"HTTP/1.1 200 OK\r\nbad header\r\n\r\n"],
)
def test_malformed_upstream_status_line_is_502(answer: bytes) -> None:
    up = UpstreamHttp1()
    up.send_request_head("GET", "/", [("host", "svc")])
    up.send_end()
    [ev] = up.receive_data(answer)
    assert isinstance(ev, ProtocolError) and ev.status == 502
    assert ev.reason.startswith("upstream: ")
    assert not up.reusable


def test_upstream_eof_before_response_is_502() -> None:
    up = UpstreamHttp1()
    up.send_request_head("GET", "/", [("host", "svc")])
    up.send_end()
    [ev] = up.receive_data(b"")
    assert isinstance(ev, ProtocolError) and ev.status == 502


# -- through the proxy --------------------------------------------------------------------


@pytest.mark.parametrize("chunked", [True, False])
def test_request_body_streams_downstream_to_upstream_byte_exact(chunked: bool) -> None:
    body = os.urandom(300_000)
    framing = (
        b"Transfer-Encoding: chunked\r\n" if chunked else b"Content-Length: %d\r\n" % len(body)
    )
    wire_in = b"POST /u HTTP/1.1\r\nHost: svc\r\n" + framing + b"\r\n"
    if chunked:
        wire_in += b"".join(
            b"%x\r\n%s\r\n" % (len(body[i : i + 7000]), body[i : i + 7000])
            for i in range(0, len(body), 7000)
        )
        wire_in += b"0\r\n\r\n"
    else:
        wire_in += body

    down, up = DownstreamHttp1(), UpstreamHttp1()
    app = h11.Connection(h11.SERVER)  # the application, a plain h11 server
    received = hashlib.sha256()
    largest_chunk = 0
    ended = False
    for i in range(0, len(wire_in), 16384):  # socket-sized reads
        for ev in down.receive_data(wire_in[i : i + 16384]):
            if isinstance(ev, RequestHead):
                out = up.send_request_head(
                    ev.method, ev.target, forwardable_headers(ev.headers), body=ev.has_body
                )
            elif isinstance(ev, BodyChunk):
                largest_chunk = max(largest_chunk, len(ev.data))
                out = up.send_body(ev.data)
            elif isinstance(ev, RequestEnd):
                out = up.send_end(ev.trailers)
            else:
                raise AssertionError(ev)
            if not out:
                continue  # b"" would mean EOF to h11
            app.receive_data(out)
            while True:
                aev = app.next_event()
                if isinstance(aev, h11.Data):
                    received.update(aev.data)
                elif isinstance(aev, h11.EndOfMessage):
                    ended = True
                elif not isinstance(aev, h11.Request):
                    break
    assert ended
    assert received.hexdigest() == hashlib.sha256(body).hexdigest()
    assert largest_chunk <= 16384  # streamed: never the whole body at once


def test_head_request_response_carries_length_but_no_body() -> None:
    up = UpstreamHttp1()
    up.send_request_head("HEAD", "/", [("host", "svc")])
    up.send_end()
    events = up.receive_data(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n")
    assert events == [
        ResponseHead(200, (("content-length", "1000"),), "OK", "1.1", True),
        ResponseEnd(),
    ]
    down = DownstreamHttp1()
    down.receive_data(b"HEAD / HTTP/1.1\r\nHost: svc\r\n\r\n")
    assert isinstance(events[0], ResponseHead)
    wire = down.send_response_head(200, forwardable_headers(events[0].headers)) + down.send_end()
    assert wire == b"HTTP/1.1 200 \r\ncontent-length: 1000\r\n\r\n"
    assert down.keep_alive


def test_awaiting_response_tells_the_reader_to_pause() -> None:
    down = DownstreamHttp1()
    down.receive_data(b"POST / HTTP/1.1\r\nHost: s\r\nContent-Length: 2\r\n\r\na")
    assert not down.awaiting_response  # still reading the body
    down.receive_data(b"b")
    assert down.awaiting_response  # more input would only be buffered (pipelining)
    respond_ok(down)
    down.start_next_request()
    assert not down.awaiting_response


def test_error_after_a_complete_request_keeps_the_connection() -> None:
    down = DownstreamHttp1()
    down.receive_data(GET + GET_B)
    wire = down.send_error(503, "no healthy upstream", "UH")
    assert wire == (
        b"HTTP/1.1 503 \r\ncontent-type: text/plain; charset=utf-8\r\ncontent-length: 20\r\n"
        b"x-nodeagent-response-flag: UH\r\n\r\nno healthy upstream\n"
    )
    assert down.keep_alive
    assert down.start_next_request() == [head("/b"), RequestEnd()]


def test_error_before_the_body_was_read_closes() -> None:
    down = DownstreamHttp1()
    down.receive_data(b"POST / HTTP/1.1\r\nHost: s\r\nContent-Length: 5\r\n\r\nab")
    wire = down.send_error(504, "upstream request timeout", "UT")
    assert b"connection: close" in wire.lower()
    assert not down.keep_alive


def test_error_to_a_head_request_has_no_body() -> None:
    down = DownstreamHttp1()
    down.receive_data(b"HEAD / HTTP/1.1\r\nHost: svc\r\n\r\n")
    wire = down.send_error(503, "no healthy upstream", "UH")
    assert wire.startswith(b"HTTP/1.1 503 ") and wire.endswith(b"\r\n\r\n")
    assert down.keep_alive
