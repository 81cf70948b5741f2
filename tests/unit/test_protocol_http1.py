"""The HTTP/1.1 proxy machines without sockets: each test is a script of the conversation
(bytes in -> expected events; command -> expected bytes)."""

from __future__ import annotations

import hashlib
import itertools
import os
from collections.abc import Sequence

import pytest
from fuzzing import fuzz
from hypothesis import given
from hypothesis import strategies as st

from nodeagent.protocol.http1 import (
    RESPONSE_FLAG_HEADER,
    BodyChunk,
    ConnectionClosed,
    DownstreamHttp1,
    Informational,
    LocalProtocolError,
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


def decode_message(wire: bytes) -> tuple[bytes, bytes, bytes]:
    """An independent reader for what the machines write: (head, decoded body, rest) of
    the first message in ``wire``, framed by Content-Length or chunked (trailers skipped).
    """
    end = wire.index(b"\r\n\r\n") + 4
    head, rest = wire[:end], wire[end:]
    fields = dict(line.lower().split(b": ", 1) for line in head.split(b"\r\n")[1:] if line)
    if fields.get(b"transfer-encoding") == b"chunked":
        body = bytearray()
        while True:
            size_line, rest = rest.split(b"\r\n", 1)
            size = int(size_line, 16)
            if size == 0:  # then trailer lines, up to an empty line
                end = 2 if rest.startswith(b"\r\n") else rest.index(b"\r\n\r\n") + 4
                return head, bytes(body), rest[end:]
            body += rest[:size]
            assert rest[size : size + 2] == b"\r\n"
            rest = rest[size + 2 :]
    length = int(fields.get(b"content-length", b"0"))
    return head, rest[:length], rest[length:]


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


def test_every_field_name_is_read_as_its_own_in_lower_case() -> None:
    # more names than the machines remember by slot, in several cases each, interleaved:
    # a name must never come out as another that was read before it
    names = [f"X-Field-{i}-{'a' * (i % 7)}" for i in range(600)]
    down = DownstreamHttp1(max_headers=1000)
    for spelled in (str.title, str.upper, str.lower, str.title):
        fields = "".join(f"{spelled(n)}: {i}\r\n" for i, n in enumerate(names))
        got = down.receive_data(f"GET /a HTTP/1.1\r\nHost: svc\r\n{fields}\r\n".encode())
        assert isinstance(got[0], RequestHead)
        want = (("host", "svc"), *((n.lower(), str(i)) for i, n in enumerate(names)))
        assert got[0].headers == want
        respond_ok(down)
        assert down.start_next_request() == []


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


@fuzz()
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


ADDED = [("traceparent", "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00")]
"""What a proxy adds to a request it forwards."""


def as_read(wire: bytes) -> tuple[str, str, tuple[tuple[str, str], ...]]:
    """A request head as an application reads it: names lower-case, values trimmed."""
    [ev, *_] = DownstreamHttp1().receive_data(wire)
    assert isinstance(ev, RequestHead)
    return ev.method, ev.target, ev.headers


@pytest.mark.parametrize(
    ("request_bytes", "as_sent"),
    [
        (b"GET /a HTTP/1.1\r\nHost: svc\r\nUser-Agent: wrk\r\nAccept:  */* \r\n\r\n", True),
        (b"POST /a HTTP/1.1\r\nhost: svc\r\nContent-Length: 3\r\nX-A: \r\n\r\nabc", True),
        (b"GET /a HTTP/1.1\r\nHost: svc\r\n\r\n" + GET_B, True),  # (the first of two)
        (b"GET /a HTTP/1.1\r\nHost: svc\r\nConnection: keep-alive\r\n\r\n", False),
        (b"GET /a HTTP/1.1\r\nHost: svc\r\nConnection: x-b\r\nX-B: 1\r\nX-C: 2\r\n\r\n", False),
        (
            b"PUT /a HTTP/1.1\r\nHost: svc\r\nExpect: 100-continue\r\nContent-Length: 1\r\n\r\n",
            False,
        ),
        (b"POST /a HTTP/1.1\r\nHost: svc\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", False),
        (b"GET /a HTTP/1.1\r\nHost: svc\r\nUpgrade: h2c\r\n\r\n", False),  # (no switch)
        (b"GET /a HTTP/1.1\r\nHost: svc\r\nTE: trailers\r\n\r\n", False),
        (b"GET /a HTTP/1.1\r\nHost: svc\r\nKeep-Alive: 5\r\n\r\n", False),
        (b"GET /a HTTP/1.1\r\nHost: svc\r\nProxy-Authorization: x\r\n\r\n", False),
        (b"GET /a HTTP/1.0\r\nX-A: 1\r\n\r\n", False),  # no Host
        (b"\r\nGET /a HTTP/1.1\r\nHost: svc\r\n\r\n", False),  # not at the read's start
    ],
)
@pytest.mark.parametrize("target", ["/a", "/t"])
def test_client_heads_go_upstream_as_their_rebuilt_head_would(
    request_bytes: bytes, as_sent: bool, target: str
) -> None:
    [head, *_] = DownstreamHttp1().receive_data(request_bytes)
    assert isinstance(head, RequestHead)
    assert (head.raw is not None) == as_sent
    if head.raw is None:
        return
    fwd = forwardable_headers(head.headers, upgrade=head.upgrade)
    rebuilt_up = UpstreamHttp1()
    rebuilt = rebuilt_up.send_request_head(head.method, target, [*fwd, *ADDED], body=head.has_body)
    up = UpstreamHttp1()
    wire = up.send_request_head(head.method, target, ADDED, raw=head.raw)
    assert as_read(wire) == as_read(rebuilt)
    line, _, rest = request_bytes.partition(b"\r\n")
    if target == "/t":
        line = line.replace(b" /a ", b" /t ")
    assert wire.startswith(line + b"\r\n" + rest[: len(head.raw.wire) - len(line) - 2])
    # the same framing: a Content-Length body, then another request on the connection
    body = b"abc" if head.has_body else b""
    for machine in (up, rebuilt_up):
        assert machine.send_body(body) + machine.send_end() == body
        machine.receive_data(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
        assert machine.reusable


def test_client_heads_as_sent_on_the_wire() -> None:
    request = b"GET /a HTTP/1.1\r\nHost:  svc \r\nX-A:1\r\n\r\n"
    [head, _] = DownstreamHttp1().receive_data(request)
    assert isinstance(head, RequestHead) and head.raw is not None
    added = [("x-forwarded-proto", "http")]
    wire = UpstreamHttp1().send_request_head("GET", "/b", added, raw=head.raw)
    assert wire == b"GET /b HTTP/1.1\r\nHost:  svc \r\nX-A:1\r\nx-forwarded-proto: http\r\n\r\n"
    wire = UpstreamHttp1().send_request_head("GET", "/a", added, raw=head.raw)
    assert wire == request[:-2] + b"x-forwarded-proto: http\r\n\r\n"


@pytest.mark.parametrize(
    "request_bytes",
    [
        b"GET /a HTTP/1.0\r\nHost: svc\r\n\r\n",  # the request line would change
        b"GET  /a HTTP/1.1\r\nHost: svc\r\n\r\n",
        b"GET /a  HTTP/1.1\r\nHost: svc\r\n\r\n",
        b"GET /a RTSP/1.1\r\nHost: svc\r\n\r\n",
    ],
)
def test_request_lines_not_as_written_here_are_rebuilt(request_bytes: bytes) -> None:
    [head, *_] = DownstreamHttp1().receive_data(request_bytes)
    assert isinstance(head, RequestHead) and head.target == "/a" and head.raw is None


@pytest.mark.parametrize(
    "added",
    [[("host", "other")], [("Content-Length", "5")], [("x-a", "1\r\nx-b: 2")], [("x a", "1")]],
)
def test_fields_added_to_a_clients_are_checked(added: list[tuple[str, str]]) -> None:
    [head, _] = DownstreamHttp1().receive_data(GET)
    assert isinstance(head, RequestHead) and head.raw is not None
    up = UpstreamHttp1()
    with pytest.raises(LocalProtocolError):
        up.send_request_head("GET", "/", added, raw=head.raw)
    assert up.send_request_head("GET", "/", [], raw=head.raw) == GET.replace(b"/a", b"/")


def test_a_head_over_two_reads_is_rebuilt() -> None:
    down = DownstreamHttp1()
    assert down.receive_data(GET[:20]) == []
    [head, _] = down.receive_data(GET[20:])
    assert isinstance(head, RequestHead) and head.raw is None
    up = upstream_after_request()
    assert up.receive_data(b"HTTP/1.1 200 OK\r\nContent-") == []
    [resp, *_] = up.receive_data(b"Length: 0\r\n\r\n")
    assert isinstance(resp, ResponseHead) and resp.raw is None


@pytest.mark.parametrize(
    ("response", "as_sent"),
    [
        (b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok", True),
        (b"HTTP/1.1 404 Not  Found \r\nContent-Length:2\r\nX-A: 1\r\n\r\nok", True),
        (b"HTTP/1.1 204 No Content\r\nContent-Length: 0\r\n\r\n", True),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: x-b\r\nX-B: 1\r\n\r\nok", False),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nKeep-Alive: 5\r\n\r\nok", False),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n", False),
        (b"HTTP/1.1 200 OK\r\n\r\nok", False),  # until close
        (b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok", False),
        (b"HTTP/1.1 200\r\nContent-Length: 2\r\n\r\nok", False),  # written with a space
        (b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok", False),
    ],
)
@pytest.mark.parametrize(
    ("request_bytes", "method"),
    [
        (GET, "GET"),
        (b"GET / HTTP/1.0\r\nHost: s\r\n\r\n", "GET"),
        (b"HEAD / HTTP/1.1\r\nHost: s\r\n\r\n", "HEAD"),
    ],
)
def test_upstream_heads_go_to_the_client_as_their_rebuilt_head_would(
    response: bytes, as_sent: bool, request_bytes: bytes, method: str
) -> None:
    up = upstream_after_request(method)
    [*_, resp] = [ev for ev in up.receive_data(response) if not isinstance(ev, Informational)][:1]
    assert isinstance(resp, ResponseHead)
    assert (resp.raw is not None) == (as_sent and method != "HEAD")
    if resp.raw is None:
        return
    cookie = [("set-cookie", "a=1")]
    answers = []
    for headers, raw in ((forwardable_headers(resp.headers) + cookie, None), (cookie, resp.raw)):
        down = DownstreamHttp1()
        down.receive_data(request_bytes)
        wire = down.send_response_head(resp.status, headers, resp.reason, raw=raw)
        body = b"ok" if b"ok" in response and resp.status != 204 else b""
        wire += down.send_body(body) + down.send_end()
        answers.append((wire, down.keep_alive))
        if raw is not None:
            assert wire.startswith(response[: len(resp.raw.wire)])
    [(rebuilt, keep_rebuilt), (forwarded, keep)] = answers
    assert keep == keep_rebuilt
    up = upstream_after_request(method)
    assert [
        ev.headers if isinstance(ev, ResponseHead) else ev for ev in up.receive_data(forwarded)
    ] == [
        ev.headers if isinstance(ev, ResponseHead) else ev
        for ev in upstream_after_request(method).receive_data(rebuilt)
    ]


@pytest.mark.parametrize(
    "request_bytes",
    [
        # no space after the colons, a body of blank lines just where a head of one-space
        # fields would end
        b"POST /a HTTP/1.1\r\nHost:svc\r\nA:1\r\nB:2\r\nC:3\r\nContent-Length: 4\r\n\r\n\r\n\r\n",
        b"GET /a HTTP/1.1\r\nHost:  svc  \r\nX-A:\t1\r\nX-E: \r\nX-F:\r\n\r\n",
        b"GET /a HTTP/1.1\r\nHost: svc\r\nX-A:1 \r\n\r\n" + GET_B,
    ],
)
def test_a_client_head_as_sent_ends_at_its_blank_line(request_bytes: bytes) -> None:
    events = DownstreamHttp1().receive_data(request_bytes)
    head = events[0]
    assert isinstance(head, RequestHead) and head.raw is not None
    assert head.raw.wire == request_bytes[: request_bytes.index(b"\r\n\r\n") + 2]
    wire = UpstreamHttp1().send_request_head("POST", "/a", [], raw=head.raw)
    assert wire == request_bytes[: len(head.raw.wire) + 2]
    if head.has_body:
        assert events[1:] == [BodyChunk(b"\r\n\r\n"), RequestEnd()]


@pytest.mark.parametrize(
    "response",
    [
        b"HTTP/1.1 200 OK\r\nContent-Length:4\r\nA:1\r\nB:2\r\nC:3\r\nD:4\r\n\r\n\r\n\r\n",
        b"HTTP/1.1 201 Made\r\nContent-Length:  004 \r\nX-A:\t1\r\n\r\nabcd",
    ],
)
def test_an_upstream_head_as_sent_ends_at_its_blank_line(response: bytes) -> None:
    up = upstream_after_request()
    [resp, body, end] = up.receive_data(response)
    assert isinstance(resp, ResponseHead) and resp.raw is not None
    assert resp.raw.wire == response[: response.index(b"\r\n\r\n") + 2]
    assert resp.raw.length == 4 and body == BodyChunk(response[-4:]) and end == ResponseEnd()
    assert (
        resp.status == int(response[9:12]) and resp.reason == response[13:].split(b"\r")[0].decode()
    )
    down = DownstreamHttp1()
    down.receive_data(GET)
    wire = down.send_response_head(resp.status, [], resp.reason, raw=resp.raw)
    assert wire + down.send_body(response[-4:]) + down.send_end() == response


@pytest.mark.parametrize(
    ("reason", "refused"),
    [
        (b"O\x01K", True),
        (b"O\x7fK", True),
        (b"O\x1fK", True),
        (b"O\tK", False),
        (b"Caf\xe9", False),
    ],
)
def test_control_characters_in_an_upstreams_reason_are_refused(
    reason: bytes, refused: bool
) -> None:
    up = upstream_after_request()
    [ev, *_] = up.receive_data(b"HTTP/1.1 200 " + reason + b"\r\nContent-Length: 0\r\n\r\n")
    if refused:
        assert ev == ProtocolError(502, "upstream: control character in the reason phrase")
    else:
        assert isinstance(ev, ResponseHead) and ev.reason == reason.decode("latin-1")


def test_an_upstream_status_below_100_is_refused() -> None:
    up = upstream_after_request()
    [ev] = up.receive_data(b"HTTP/1.1 099 Low\r\nContent-Length: 0\r\n\r\n")
    assert ev == ProtocolError(502, "upstream: invalid status 099")


def test_fields_added_to_an_upstreams_are_checked() -> None:
    up = upstream_after_request()
    [resp, *_] = up.receive_data(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
    assert isinstance(resp, ResponseHead) and resp.raw is not None
    for added in ([("content-length", "1")], [("Connection", "x")], [("x-a", "1\rx-b: 2")]):
        down = DownstreamHttp1()
        down.receive_data(GET)
        with pytest.raises(LocalProtocolError):
            down.send_response_head(200, added, "OK", raw=resp.raw)
    down = DownstreamHttp1()
    down.receive_data(b"GET / HTTP/1.1\r\nHost: s\r\nConnection: close\r\n\r\n")
    wire = down.send_response_head(200, [], "OK", raw=resp.raw)
    assert wire == b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\nConnection: close\r\n\r\n"


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
    to_app = bytearray()  # what the application would read
    largest_chunk = 0
    for i in range(0, len(wire_in), 16384):  # socket-sized reads
        for ev in down.receive_data(wire_in[i : i + 16384]):
            if isinstance(ev, RequestHead):
                to_app += up.send_request_head(
                    ev.method, ev.target, forwardable_headers(ev.headers), body=ev.has_body
                )
            elif isinstance(ev, BodyChunk):
                largest_chunk = max(largest_chunk, len(ev.data))
                to_app += up.send_body(ev.data)
            elif isinstance(ev, RequestEnd):
                to_app += up.send_end(ev.trailers)
            else:
                raise AssertionError(ev)
    head, received, rest = decode_message(bytes(to_app))
    assert head.startswith(b"POST /u HTTP/1.1\r\nhost: svc\r\n")
    assert (b"transfer-encoding: chunked" in head) == chunked
    assert rest == b""
    assert hashlib.sha256(received).hexdigest() == hashlib.sha256(body).hexdigest()
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


# -- request smuggling and malformed input ------------------------------------------------


@pytest.mark.parametrize(
    ("request_bytes", "status"),
    [
        (  # both framings: the classic CL.TE / TE.CL desync
            b"POST / HTTP/1.1\r\nHost: s\r\nContent-Length: 3\r\nTransfer-Encoding: chunked"
            b"\r\n\r\n0\r\n\r\n",
            400,
        ),
        (
            b"POST / HTTP/1.1\r\nHost: s\r\nTransfer-Encoding: chunked\r\nContent-Length: 3"
            b"\r\n\r\n0\r\n\r\n",
            400,
        ),
        (b"POST / HTTP/1.1\r\nHost: s\r\nContent-Length: 3x\r\n\r\nabc", 400),
        (b"POST / HTTP/1.1\r\nHost: s\r\nContent-Length: -1\r\n\r\n", 400),
        (b"POST / HTTP/1.1\r\nHost: s\r\nContent-Length: 3, 3\r\n\r\nabc", 400),
        (b"POST / HTTP/1.1\r\nHost: s\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\n", 400),
        (b"POST / HTTP/1.1\r\nHost: s\r\nContent-Length:\r\n\r\n", 400),
        (b"POST / HTTP/1.1\r\nHost: s\r\nContent-Length: 99999999999999999999\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nHost: s\r\nX-A: a\r\n folded\r\n\r\n", 400),  # obs-fold
        (b"GET / HTTP/1.1\r\nHost : s\r\n\r\n", 400),  # space before the colon
        (b"GET / HTTP/1.1\nHost: s\n\n", 400),  # bare LF
        (b"GET / HTTP/1.1\r\nHost: s\rX: y\r\n\r\n", 400),  # bare CR
        (b"GET / HTTP/1.1\r\nHost: a\x00b\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\n Host: s\r\n\r\n", 400),  # whitespace before the first field
        (b"GET /a\tb HTTP/1.1\r\nHost: s\r\n\r\n", 400),
        (b"BREW / HTTP/1.1\r\nHost: s\r\n\r\n", 400),  # a method llhttp does not know
        (b"POST / HTTP/1.1\r\nHost: s\r\nTransfer-Encoding: gzip\r\n\r\nabc", 501),
        (b"POST / HTTP/1.1\r\nHost: s\r\nTransfer-Encoding: chunked, gzip\r\n\r\n", 400),
        (b"GET / HTTP/2.0\r\nHost: s\r\n\r\n", 505),
        (b"GET / HTTP/1.1\r\nX-Host: s\r\n\r\n", 400),  # Host is mandatory in 1.1
        (b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400),
        (b"GET / HTTP/1.0\r\nHost: a\r\nHost: b\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nHost: a\r\nX-A: \x7f\r\n\r\n", 400),  # DEL is a control
    ],
)
def test_smuggling_vectors_and_malformed_requests_are_refused(
    request_bytes: bytes, status: int
) -> None:
    down = DownstreamHttp1()
    events = down.receive_data(request_bytes)
    assert len(events) == 1, events  # no RequestHead escapes before the error
    assert isinstance(events[0], ProtocolError) and events[0].status == status, events
    assert down.receive_data(GET) == []
    wire = down.send_error(events[0].status, "bad request", "DPE")
    assert b"connection: close" in wire
    assert not down.keep_alive


@pytest.mark.parametrize(
    "body",
    [b"5 \r\nhello\r\n", b"5\r\nhelloXX", b"zz\r\n", b"5;\x00\r\nhello\r\n"],
)
def test_malformed_chunked_body_is_400_after_the_head(body: bytes) -> None:
    down = DownstreamHttp1()
    events = down.receive_data(
        b"POST / HTTP/1.1\r\nHost: s\r\nTransfer-Encoding: chunked\r\n\r\n" + body
    )
    assert isinstance(events[0], RequestHead)
    assert isinstance(events[-1], ProtocolError) and events[-1].status == 400
    assert b"connection: close" in down.send_error(400, "bad chunk", "DPE")


def test_a_bad_request_behind_a_good_one_waits_its_turn() -> None:
    down = DownstreamHttp1()
    assert down.receive_data(GET + b"GET / HTTP/1.1\r\nHost : s\r\n\r\n") == [head(), RequestEnd()]
    assert down.keep_alive  # the error belongs to the next request
    respond_ok(down)
    [ev] = down.start_next_request()
    assert isinstance(ev, ProtocolError) and ev.status == 400
    assert not down.keep_alive


def test_http10_request_may_omit_host() -> None:
    events = DownstreamHttp1().receive_data(b"GET / HTTP/1.0\r\n\r\n")
    assert isinstance(events[0], RequestHead) and events[0].headers == ()


def test_header_values_lose_surrounding_whitespace() -> None:
    down = DownstreamHttp1()
    [ev, _] = down.receive_data(
        b"GET / HTTP/1.1\r\nHost:   svc \t \r\nX-Tab: a \tb\t\r\nX-Empty:\r\nX-Blank: \t \r\n\r\n"
    )
    assert isinstance(ev, RequestHead)
    assert ev.headers == (("host", "svc"), ("x-tab", "a \tb"), ("x-empty", ""), ("x-blank", ""))


def test_response_header_values_lose_trailing_whitespace() -> None:
    up = UpstreamHttp1()
    up.send_request_head("GET", "/", (("host", "svc"),))
    up.send_end()
    [head, body, end] = up.receive_data(
        b"HTTP/1.1 200 OK\r\nContent-Length: 2 \r\nX-Tab: a b\t\r\nX-Same: c\r\n\r\nok"
    )
    assert isinstance(head, ResponseHead)
    assert head.headers == (("content-length", "2"), ("x-tab", "a b"), ("x-same", "c"))
    assert body == BodyChunk(b"ok") and isinstance(end, ResponseEnd)


# -- head size limit ----------------------------------------------------------------------


def test_head_limit_is_counted_per_read_for_a_head_that_never_ends() -> None:
    down = DownstreamHttp1(max_header_size=1000)
    assert down.receive_data(b"GET / HTTP/1.1\r\nHost: svc\r\nx-endless: ") == []
    sent = 37
    while sent + 100 <= 1000:  # up to the limit: still waiting for the end of the head
        assert down.receive_data(b"v" * 100) == []
        sent += 100
    [ev] = down.receive_data(b"v" * 100)  # the read that crosses the limit
    assert ev == ProtocolError(431, "request head exceeds 1000 bytes")
    assert down.receive_data(b"v" * 100 + b"\r\n\r\n") == []
    assert down.send_error(431, "request headers too large", "DPE").startswith(b"HTTP/1.1 431 ")


def test_head_at_the_limit_is_accepted() -> None:
    request = b"GET / HTTP/1.1\r\nHost: svc\r\nx-a: " + b"a" * 30 + b"\r\n\r\n"
    assert len(request) == 66
    for pieces in ([request], [request[:20], request[20:]], [request[:-1], request[-1:]]):
        down = DownstreamHttp1(max_header_size=66)
        events = feed(down, pieces)
        assert isinstance(events[0], RequestHead) and events[1:] == [RequestEnd()]
        down = DownstreamHttp1(max_header_size=65)
        assert feed(down, pieces) == [ProtocolError(431, "request head exceeds 65 bytes")]


def test_oversize_pipelined_head_is_431_for_that_request_only() -> None:
    big = b"GET /big HTTP/1.1\r\nHost: svc\r\nx-a: " + b"a" * 200 + b"\r\n\r\n"
    down = DownstreamHttp1(max_header_size=100)
    assert down.receive_data(GET + big) == [head(), RequestEnd()]
    respond_ok(down)
    assert down.start_next_request() == [ProtocolError(431, "request head exceeds 100 bytes")]


def test_body_bytes_do_not_count_against_the_head_limit() -> None:
    down = DownstreamHttp1(max_header_size=100)
    request = b"POST / HTTP/1.1\r\nHost: svc\r\nContent-Length: 1000\r\n\r\n" + b"x" * 1000
    events = feed(down, [request[:60], request[60:500], request[500:]])
    assert events[1:] == [BodyChunk(b"x" * 1000), RequestEnd()]


# -- pipelining ---------------------------------------------------------------------------

PIPELINE = (
    b"POST /one HTTP/1.1\r\nHost: svc\r\nContent-Length: 5\r\n\r\nfirst"
    + CHUNKED_REQUEST
    + b"PUT /three HTTP/1.1\r\nHost: svc\r\nContent-Length: 3\r\n\r\nabc"
    + GET_B
)
PIPELINE_EVENTS = [
    [
        head("/one", (("host", "svc"), ("content-length", "5")), method="POST", has_body=True),
        BodyChunk(b"first"),
        RequestEnd(),
    ],
    CHUNKED_EVENTS,
    [
        head("/three", (("host", "svc"), ("content-length", "3")), method="PUT", has_body=True),
        BodyChunk(b"abc"),
        RequestEnd(),
    ],
    [head("/b"), RequestEnd()],
]


def test_pipelined_requests_with_bodies_come_one_at_a_time() -> None:
    down = DownstreamHttp1()
    assert down.receive_data(PIPELINE) == PIPELINE_EVENTS[0]
    assert down.awaiting_response
    assert down.receive_data(GET) == []  # a fifth: queued too
    for expected in [*PIPELINE_EVENTS[1:], [head(), RequestEnd()]]:
        with pytest.raises(LocalProtocolError):
            down.start_next_request()  # not before the response is complete
        respond_ok(down)
        assert merged(down.start_next_request()) == expected
    respond_ok(down)
    assert down.start_next_request() == []
    assert not down.awaiting_response


@fuzz()
@given(st.lists(st.integers(0, len(PIPELINE)), max_size=10))
def test_pipelined_requests_with_bodies_any_split(cuts: list[int]) -> None:
    bounds = [0, *sorted(cuts), len(PIPELINE)]
    pieces = [PIPELINE[a:b] for a, b in itertools.pairwise(bounds) if b > a]
    down = DownstreamHttp1()
    got = [feed(down, pieces)]
    for _ in PIPELINE_EVENTS[1:]:
        respond_ok(down)
        got.append(merged(down.start_next_request()))
    assert got == PIPELINE_EVENTS


def test_client_eof_with_nothing_pending_is_reported_at_once() -> None:
    down = DownstreamHttp1()
    assert down.receive_data(GET) == [head(), RequestEnd()]
    assert down.receive_data(b"") == [ConnectionClosed()]
    assert not down.keep_alive
    assert respond_ok(down).startswith(b"HTTP/1.1 200 ")  # the answer still goes out


def test_client_eof_inside_a_pipelined_head_waits_its_turn() -> None:
    down = DownstreamHttp1()
    assert down.receive_data(GET + b"GET /b HTTP/1.1\r\nHo") == [head(), RequestEnd()]
    assert down.receive_data(b"") == []
    respond_ok(down)
    assert down.start_next_request() == [ConnectionClosed(clean=False)]


def test_bytes_after_a_connection_close_request_are_ignored() -> None:
    down = DownstreamHttp1()
    events = down.receive_data(b"GET / HTTP/1.1\r\nHost: s\r\nConnection: close\r\n\r\n" + GET_B)
    assert isinstance(events[0], RequestHead) and events[1:] == [RequestEnd()]
    assert b"Connection: close\r\n" in respond_ok(down)
    assert not down.keep_alive
    with pytest.raises(LocalProtocolError):
        down.start_next_request()


# -- responses written downstream --------------------------------------------------------


def test_http10_client_gets_a_close_delimited_body() -> None:
    down = DownstreamHttp1()
    [ev, _] = down.receive_data(b"GET / HTTP/1.0\r\nHost: s\r\n\r\n")
    assert isinstance(ev, RequestHead) and ev.http_version == "1.0" and not ev.keep_alive
    wire = down.send_response_head(200, [("x-a", "1")]) + down.send_body(b"abc") + down.send_end()
    assert wire == b"HTTP/1.1 200 \r\nx-a: 1\r\nConnection: close\r\n\r\nabc"
    assert not down.keep_alive


@pytest.mark.parametrize(
    ("version", "fields", "keep_alive"),
    [
        ("1.1", b"", True),
        ("1.1", b"Connection: close\r\n", False),
        ("1.1", b"Proxy-Connection: close\r\n", True),  # read, but not ours to honour
        ("1.0", b"", False),
        # an HTTP/1.0 keep-alive is not offered to the client (the response says close)
        ("1.0", b"Connection: keep-alive\r\n", False),
        ("1.0", b"Proxy-Connection: keep-alive\r\n", False),
        ("1.0", b"Keep-Alive: timeout=5\r\n", False),
    ],
)
def test_request_version_and_keep_alive(version: str, fields: bytes, keep_alive: bool) -> None:
    down = DownstreamHttp1()
    request = b"GET / HTTP/%b\r\nHost: s\r\n%b\r\n" % (version.encode(), fields)
    [ev, _] = down.receive_data(request)
    assert isinstance(ev, RequestHead)
    assert (ev.http_version, ev.keep_alive) == (version, keep_alive)
    wire = respond_ok(down)
    assert wire.endswith(b"\r\n\r\nok")
    assert (b"Connection: close\r\n" in wire) == (not keep_alive)
    assert down.keep_alive == keep_alive


@pytest.mark.parametrize(
    ("version", "fields", "keep_alive"),
    [
        ("1.1", b"Content-Length: 2\r\n", True),
        ("1.1", b"Content-Length: 2\r\nConnection: close\r\n", False),
        ("1.1", b"Content-Length: 2\r\nProxy-Connection: close\r\n", True),
        ("1.1", b"", True),  # read until close: llhttp's keep-alive says no, 1.1 all the same
        ("1.0", b"Content-Length: 2\r\n", False),
        ("1.0", b"Content-Length: 2\r\nConnection: keep-alive\r\n", False),
        ("1.0", b"Content-Length: 2\r\nProxy-Connection: keep-alive\r\n", False),
    ],
)
def test_response_version_and_keep_alive(version: str, fields: bytes, keep_alive: bool) -> None:
    up = upstream_after_request()
    [ev, *_] = up.receive_data(b"HTTP/%b 200 OK\r\n%b\r\nok" % (version.encode(), fields))
    assert isinstance(ev, ResponseHead)
    assert (ev.http_version, ev.keep_alive) == (version, keep_alive)
    if fields:
        assert up.reusable == keep_alive


@pytest.mark.parametrize("version", [b"0.9", b"2.0"])
def test_versions_other_than_1x_are_refused(version: bytes) -> None:
    [ev] = DownstreamHttp1().receive_data(b"GET / HTTP/%b\r\nHost: s\r\n\r\n" % version)
    assert ev == ProtocolError(505, f"HTTP/{version.decode()} is not supported")
    up = upstream_after_request()
    [ev] = up.receive_data(b"HTTP/%b 200 OK\r\nContent-Length: 0\r\n\r\n" % version)
    assert ev == ProtocolError(502, f"upstream: HTTP/{version.decode()} is not supported")


def test_connection_close_from_the_caller_ends_keep_alive() -> None:
    down = DownstreamHttp1()
    down.receive_data(GET)
    wire = down.send_response_head(200, [("content-length", "0"), ("Connection", "close")])
    assert wire == b"HTTP/1.1 200 \r\ncontent-length: 0\r\nConnection: close\r\n\r\n"
    down.send_end()
    assert not down.keep_alive


@pytest.mark.parametrize(
    ("request_bytes", "status", "framing"),
    [
        (GET, 204, b""),
        (GET, 304, b""),
        # as for a GET (RFC 9110 §9.3.2), but no body follows
        (b"HEAD / HTTP/1.1\r\nHost: s\r\n\r\n", 200, b"Transfer-Encoding: chunked\r\n"),
    ],
)
def test_no_body_for_204_304_and_head(request_bytes: bytes, status: int, framing: bytes) -> None:
    down = DownstreamHttp1()
    down.receive_data(request_bytes)
    wire = down.send_response_head(status, [("etag", '"x"')])
    with pytest.raises(LocalProtocolError):
        down.send_body(b"x")
    wire += down.send_end()
    assert wire == b'HTTP/1.1 %d \r\netag: "x"\r\n%s\r\n' % (status, framing)
    assert down.keep_alive


def test_head_response_without_length_announces_what_get_would_get() -> None:
    down = DownstreamHttp1()
    down.receive_data(b"HEAD / HTTP/1.1\r\nHost: s\r\n\r\n")
    wire = down.send_response_head(200, []) + down.send_end()
    assert wire == b"HTTP/1.1 200 \r\nTransfer-Encoding: chunked\r\n\r\n"


def test_content_length_is_enforced_on_the_body() -> None:
    down = DownstreamHttp1()
    down.receive_data(GET)
    down.send_response_head(200, [("content-length", "3")])
    with pytest.raises(LocalProtocolError):
        down.send_body(b"abcd")
    assert down.send_body(b"ab") == b"ab"
    with pytest.raises(LocalProtocolError):
        down.send_end()
    assert down.send_body(b"c") == b"c"
    assert down.send_end() == b""


def test_trailers_cross_the_proxy_on_chunked_bodies() -> None:
    down = DownstreamHttp1()
    down.receive_data(GET)
    wire = down.send_response_head(200, []) + down.send_body(b"ab")
    wire += down.send_end((("grpc-status", "0"), ("grpc-message", "ok")))
    assert wire.endswith(b"2\r\nab\r\n0\r\ngrpc-status: 0\r\ngrpc-message: ok\r\n\r\n")
    up = UpstreamHttp1()
    up.send_request_head("POST", "/", [("host", "svc")], body=True)
    assert up.send_end((("x-sum", "1"),)) == b"0\r\nx-sum: 1\r\n\r\n"


def test_informational_responses_go_out_before_the_final_one() -> None:
    down = DownstreamHttp1()
    down.receive_data(GET)
    assert down.send_response_head(103, [("link", "</a.css>; rel=preload")]) == (
        b"HTTP/1.1 103 \r\nlink: </a.css>; rel=preload\r\n\r\n"
    )
    assert not down.response_started
    assert respond_ok(down).startswith(b"HTTP/1.1 200 ")


def test_commands_out_of_order_are_refused() -> None:
    down = DownstreamHttp1()
    with pytest.raises(LocalProtocolError):
        down.send_response_head(200, [])  # no request yet
    down.receive_data(GET)
    with pytest.raises(LocalProtocolError):
        down.send_body(b"x")  # no head yet
    with pytest.raises(LocalProtocolError):
        down.send_response_head(101, [])  # nothing offered a switch
    respond_ok(down)
    with pytest.raises(LocalProtocolError):
        down.send_response_head(200, [])  # a second response
    up = UpstreamHttp1()
    with pytest.raises(LocalProtocolError):
        up.send_request_head("GET", "/", [])  # no Host
    up.send_request_head("GET", "/", [("host", "s")])
    with pytest.raises(LocalProtocolError):
        up.send_body(b"x")  # no body declared
    with pytest.raises(LocalProtocolError):
        up.send_request_head("GET", "/", [("host", "s")])  # one request at a time


# -- header injection ---------------------------------------------------------------------

INJECTIONS = [
    [("x-a", "1\r\nx-evil: 1")],
    [("x-a", "1\nx-evil: 1")],
    [("x-a", "1\rx-evil: 1")],
    [("x-a", "1\x00")],
    [("x-a\r\nx-evil", "1")],
    [("x-a: 1\r\nx-evil", "1")],
    [("host: evil", "1")],  # a name that is not a token
    [("", "1")],
    [("x-a", "caf\u20ac")],  # not latin-1
]


@pytest.mark.parametrize("headers", INJECTIONS)
def test_header_injection_is_refused_downstream(headers: list[tuple[str, str]]) -> None:
    down = DownstreamHttp1()
    down.receive_data(GET)
    with pytest.raises(ValueError):
        down.send_response_head(200, headers)
    assert not down.response_started  # nothing was sent: a proper answer still can be
    assert respond_ok(down) == b"HTTP/1.1 200 \r\ncontent-length: 2\r\n\r\nok"


@pytest.mark.parametrize("headers", INJECTIONS)
def test_header_injection_is_refused_upstream(headers: list[tuple[str, str]]) -> None:
    up = UpstreamHttp1()
    with pytest.raises(ValueError):
        up.send_request_head("GET", "/", [("host", "svc"), *headers])
    assert up.send_request_head("GET", "/", [("host", "svc")]) == (
        b"GET / HTTP/1.1\r\nhost: svc\r\n\r\n"
    )


@pytest.mark.parametrize(
    ("method", "target"),
    [
        ("GET", "/a b"),
        ("GET", "/a\r\nx: y"),
        ("GET", ""),
        ("G T", "/"),
        ("GET\r\n", "/"),
        ("GET", "/a\tb"),
        ("GET", "/\x00"),
        ("GET", "/\x7f"),
        ("GET", "/\u0100"),
    ],
)
def test_request_line_injection_is_refused(method: str, target: str) -> None:
    with pytest.raises(LocalProtocolError):
        UpstreamHttp1().send_request_head(method, target, [("host", "svc")])


def test_a_target_is_written_as_given() -> None:
    for target in ("/", "/a/b?c=d&e=%20f#g", "/~!$'()*+,;=:@[]", "/\xe9t\xe9"):
        wire = UpstreamHttp1().send_request_head("GET", target, [("host", "svc")])
        assert wire == f"GET {target} HTTP/1.1\r\nhost: svc\r\n\r\n".encode("latin-1")


def test_reason_and_trailer_injection_is_refused() -> None:
    down = DownstreamHttp1()
    down.receive_data(GET)
    with pytest.raises(LocalProtocolError):
        down.send_response_head(200, [], "OK\r\nx-evil: 1")
    down.send_response_head(200, [], "OK")
    with pytest.raises(LocalProtocolError):
        down.send_end([("x-t", "1\r\n\r\nHTTP/1.1 200 OK")])


# -- switching protocols downstream ------------------------------------------------------


def test_connect_switches_on_2xx_with_the_bytes_behind_the_head() -> None:
    down = DownstreamHttp1()
    events = down.receive_data(b"CONNECT db:5432 HTTP/1.1\r\nHost: db:5432\r\n\r\n\x00\x01")
    assert events == [
        RequestHead("CONNECT", "db:5432", (("host", "db:5432"),), "1.1", True, False, None, False),
        RequestEnd(),
    ]
    assert down.receive_data(b"\x02") == []  # held until the answer
    assert down.send_response_head(200, []) == b"HTTP/1.1 200 \r\n\r\n"
    assert down.upgraded
    assert down.take_events() == [Upgraded(b"\x00\x01\x02")]
    assert down.receive_data(b"more") == [Upgraded(b"more")]


def test_refused_connect_reads_what_followed_as_http() -> None:
    down = DownstreamHttp1()
    down.receive_data(b"CONNECT db:5432 HTTP/1.1\r\nHost: db:5432\r\n\r\n" + GET_B)
    down.send_response_head(403, [("content-length", "0")])
    down.send_end()
    assert not down.upgraded
    assert down.start_next_request() == [head("/b"), RequestEnd()]


def test_client_eof_behind_an_upgrade_request_follows_the_switch() -> None:
    down = DownstreamHttp1()
    down.receive_data(WS_REQUEST + b"bye")
    assert down.receive_data(b"") == []
    down.send_response_head(101, [("connection", "upgrade"), ("upgrade", "websocket")])
    assert down.take_events() == [Upgraded(b"bye"), ConnectionClosed()]


def test_upgrade_request_with_a_counted_body() -> None:
    down = DownstreamHttp1()
    request = (
        b"POST /h2c HTTP/1.1\r\nHost: s\r\nConnection: Upgrade, HTTP2-Settings\r\n"
        b"Upgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQCAAAAAAIAAAAA\r\nContent-Length: 5\r\n\r\n"
    )
    events = feed(down, [request + b"he", b"llo", b"PRI * HTTP/2.0"])
    assert isinstance(events[0], RequestHead)
    assert events[0].upgrade == "h2c" and events[0].has_body
    assert events[1:] == [BodyChunk(b"hello"), RequestEnd()]
    down.send_response_head(101, [("connection", "upgrade"), ("upgrade", "h2c")])
    assert down.take_events() == [Upgraded(b"PRI * HTTP/2.0")]


def test_upgrade_offer_on_a_chunked_request_is_dropped() -> None:
    down = DownstreamHttp1()
    request = (
        b"POST /x HTTP/1.1\r\nHost: s\r\nConnection: upgrade\r\nUpgrade: h2c\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n"
    )
    for i in range(len(request) + 1):
        down = DownstreamHttp1()
        events = feed(down, [p for p in (request[:i], request[i:] + GET_B) if p])
        assert isinstance(events[0], RequestHead), i
        assert events[0].upgrade is None and events[0].has_body
        assert events[1:] == [BodyChunk(b"abc"), RequestEnd()], i
        with pytest.raises(LocalProtocolError):
            down.send_response_head(101, [])
        respond_ok(down)
        assert down.start_next_request() == [head("/b"), RequestEnd()]


@pytest.mark.parametrize(
    ("behind", "status", "reason"),
    [
        (b"garbage", 400, "invalid method"),
        (b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400, "more than one Host header"),
    ],
)
def test_a_bad_request_behind_a_chunked_upgrade_offer_is_400(
    behind: bytes, status: int, reason: str
) -> None:
    """Found by fuzzing (test_fuzz_http1): the chunked body of an Upgrade offer was parsed
    inside the handler of llhttp's ``HttpParserUpgrade``, so an error in the bytes behind
    it had that exception as context, was taken for a bug of ours and raised out of
    ``receive_data`` (the HttpParserUpgrade itself), taking the connection down."""
    request = (
        b"POST /x HTTP/1.1\r\nHost: s\r\nConnection: upgrade\r\nUpgrade: h2c\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n"
    )
    for pieces in ([request + behind], [request[:-3], request[-3:] + behind]):
        down = DownstreamHttp1()
        events = feed(down, pieces)
        assert events[1:] == [BodyChunk(b"abc"), RequestEnd()]
        respond_ok(down)
        [error] = down.start_next_request()
        assert isinstance(error, ProtocolError)
        assert error.status == status and error.reason.startswith(reason), error


def test_the_invalid_method_reason_does_not_depend_on_how_bytes_arrive() -> None:
    """Found by fuzzing (test_fuzz_http1): the 400 named the token at the start of the read
    that failed, so 'garbage' sent a byte at a time was named 'g', and behind a request
    begun in an earlier read, not at all. The reason now names no token."""
    data = GET + b"garbage /x HTTP/1.1\r\n\r\n"
    reasons = set()
    for pieces in ([data], [data[:-30], data[-30:]], [data[:3], data[3:]],
                   [data[i : i + 1] for i in range(len(data))]):  # fmt: skip
        down = DownstreamHttp1()
        feed(down, pieces)
        respond_ok(down)
        [error] = down.start_next_request()
        assert isinstance(error, ProtocolError)
        reasons.add(error.reason)
    assert reasons == {"invalid method: methods are upper-case tokens such as GET"}


def test_connect_with_a_chunked_body_is_400() -> None:
    down = DownstreamHttp1()
    [ev] = down.receive_data(
        b"CONNECT a:1 HTTP/1.1\r\nHost: a:1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
    )
    assert isinstance(ev, ProtocolError) and ev.status == 400


# -- upstream responses -------------------------------------------------------------------

RESPONSE_WITH_INTERIM = (
    b"HTTP/1.1 100 Continue\r\n\r\n"
    b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"3\r\nabc\r\n10\r\n0123456789abcdef\r\n0\r\ngrpc-status: 0\r\ngrpc-message: fine\r\n\r\n"
)
RESPONSE_WITH_INTERIM_EVENTS = [
    Informational(100, ()),
    ResponseHead(
        200, (("content-type", "text/plain"), ("transfer-encoding", "chunked")), "OK", "1.1", True
    ),
    BodyChunk(b"abc0123456789abcdef"),
    ResponseEnd((("grpc-status", "0"), ("grpc-message", "fine"))),
]


def upstream_after_request(method: str = "GET", **kwargs: bool) -> UpstreamHttp1:
    up = UpstreamHttp1()
    up.send_request_head(method, "/", [("host", "svc")], **kwargs)
    up.send_end()
    return up


def test_upstream_response_split_at_every_byte_boundary() -> None:
    data = RESPONSE_WITH_INTERIM
    for i in range(len(data) + 1):
        for j in range(i, len(data) + 1, 7):
            up = upstream_after_request()
            pieces = [p for p in (data[:i], data[i:j], data[j:]) if p]
            assert feed(up, pieces) == RESPONSE_WITH_INTERIM_EVENTS, (i, j)
            assert up.reusable


@fuzz()
@given(st.lists(st.integers(0, len(RESPONSE_WITH_INTERIM)), max_size=15))
def test_upstream_response_any_split(cuts: list[int]) -> None:
    data = RESPONSE_WITH_INTERIM
    bounds = [0, *sorted(cuts), len(data)]
    up = upstream_after_request()
    assert feed(up, [data[a:b] for a, b in itertools.pairwise(bounds) if b > a]) == (
        RESPONSE_WITH_INTERIM_EVENTS
    )
    assert up.reusable


@pytest.mark.parametrize("status", [204, 304])
def test_upstream_204_and_304_have_no_body(status: int) -> None:
    up = upstream_after_request()
    events = up.receive_data(b"HTTP/1.1 %d X\r\nContent-Length: 5\r\n\r\n" % status)
    assert events == [
        ResponseHead(status, (("content-length", "5"),), "X", "1.1", True),
        ResponseEnd(),
    ]
    assert up.reusable


def test_upstream_head_response_split_and_reused() -> None:
    up = upstream_after_request("HEAD")
    assert up.receive_data(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n") == []
    assert up.receive_data(b"\r\n") == [
        ResponseHead(200, (("content-length", "10"),), "OK", "1.1", True),
        ResponseEnd(),
    ]
    assert up.reusable
    up.start_next_request()
    up.send_request_head("GET", "/", [("host", "svc")])
    up.send_end()
    assert up.receive_data(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")[1:] == [
        BodyChunk(b"ok"),
        ResponseEnd(),
    ]


@pytest.mark.parametrize("method", ["GET", "HEAD"])
def test_upstream_empty_lines_after_a_response_keep_it_reusable(method: str) -> None:
    """Found by fuzzing (test_fuzz_http1): llhttp skips empty lines between messages, so
    a CRLF behind a response in its last read left the connection reusable, and in a
    later read made it not reusable. Now reusable either way (as llhttp), while any
    other byte behind a response still spoils it."""
    response = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"
    for pieces in ([response + b"\r\n"], [response, b"\r\n"], [response + b"\r", b"\n"]):
        up = upstream_after_request(method)
        assert feed(up, pieces)[1:] == [ResponseEnd()]
        assert up.reusable, pieces
    for pieces in ([response + b"\r\nx"], [response, b"\r\nx"]):
        up = upstream_after_request(method)
        feed(up, pieces)
        assert not up.reusable, pieces


def test_upstream_head_response_with_a_body_is_not_reused() -> None:
    up = upstream_after_request("HEAD")
    events = up.receive_data(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    assert events[1:] == [ResponseEnd()]
    assert not up.reusable


def test_upstream_bytes_after_the_response_spoil_the_connection() -> None:
    up = upstream_after_request()
    events = up.receive_data(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokHTTP/1.1 200 OK\r\n")
    assert events[1:] == [BodyChunk(b"ok"), ResponseEnd()]
    assert not up.reusable
    up = upstream_after_request()
    up.receive_data(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    assert up.reusable
    assert up.receive_data(b"junk") == []
    assert not up.reusable


@pytest.mark.parametrize("status", [200, 204])
def test_upstream_bytes_after_a_close_response_in_its_last_read_only_spoil_it(
    status: int,
) -> None:
    """Found by fuzzing (test_fuzz_http1): llhttp refuses bytes behind a ``Connection:
    close`` response in the read that ended it, which made a 502 ``ProtocolError`` follow
    the ``ResponseEnd``; in a later read the same bytes only spoil the connection."""
    data = b"HTTP/1.1 %d OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n\x00" % status
    for pieces in ([data], [data[:-1], data[-1:]]):
        up = upstream_after_request()
        fields = (("content-length", "0"), ("connection", "close"))
        assert feed(up, pieces) == [ResponseHead(status, fields, "OK", "1.1", False), ResponseEnd()]
        assert not up.reusable


def test_upstream_connect_tunnel_keeps_the_bytes_behind_the_head() -> None:
    up = UpstreamHttp1()
    up.send_request_head("CONNECT", "db:5432", [("host", "db:5432")])
    up.send_end()
    first = b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 Connection established\r\n"
    assert up.receive_data(first) == [Informational(100, ())]
    assert up.receive_data(b"\r\nbanner") == [
        ResponseHead(200, (), "Connection established", "1.1", True),
        Upgraded(b"banner"),
    ]
    assert up.upgraded and not up.reusable
    assert up.receive_data(b"more") == [Upgraded(b"more")]
    assert up.send_body(b"raw") == b"raw"


def test_upstream_refused_connect_is_an_ordinary_response() -> None:
    up = UpstreamHttp1()
    up.send_request_head("CONNECT", "db:5432", [("host", "db:5432")])
    up.send_end()
    events = up.receive_data(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 2\r\n\r\nno")
    assert events[1:] == [BodyChunk(b"no"), ResponseEnd()]
    assert not up.upgraded


def test_upstream_101_without_an_offer_is_502() -> None:
    up = upstream_after_request()
    [ev] = up.receive_data(
        b"HTTP/1.1 101 Switching Protocols\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n"
    )
    assert isinstance(ev, ProtocolError) and ev.status == 502


@pytest.mark.parametrize(
    "answer",
    [
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 2x\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nX: a\r\n b\r\n\r\n",
        b"HTTP/1.1 200 OK\nContent-Length: 0\n\n",
        b"HTTP/2.0 200 OK\r\n\r\n",
        b"HTTP/1.1 000 OK\r\nContent-Length: 0\r\n\r\n",
        b"HTTP/1.1 099 OK\r\nContent-Length: 0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\nabc",  # would be relayed encoded
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked, gzip\r\n\r\nabc",
        b"HTTP/1.1 200 O\x00K\r\nContent-Length: 0\r\n\r\n",  # a reason that could not be sent on
        b"HTTP/1.1 200 O\x1bK\r\nContent-Length: 0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
    ],
)
def test_malformed_upstream_responses_are_502(answer: bytes) -> None:
    up = upstream_after_request()
    events = up.receive_data(answer)
    assert isinstance(events[-1], ProtocolError) and events[-1].status == 502, events
    assert events[-1].reason.startswith("upstream: ")
    assert not up.reusable
    assert up.receive_data(b"more") == []


def test_upstream_eof_mid_body_is_502() -> None:
    up = upstream_after_request()
    up.receive_data(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
    [ev] = up.receive_data(b"")
    assert isinstance(ev, ProtocolError) and ev.status == 502


def test_upstream_read_until_close_in_pieces() -> None:
    up = upstream_after_request()
    assert feed(up, [b"HTTP/1.0 200 OK\r\n\r\nab", b"cd", b""]) == [
        ResponseHead(200, (), "OK", "1.0", False),
        BodyChunk(b"abcd"),
        ResponseEnd(),
        ConnectionClosed(),
    ]


def test_upstream_response_head_limit() -> None:
    up = UpstreamHttp1(max_header_size=200)
    up.send_request_head("GET", "/", [("host", "svc")])
    up.send_end()
    assert up.receive_data(b"HTTP/1.1 200 OK\r\nx-a: ") == []
    events = up.receive_data(b"a" * 250)
    assert events == [ProtocolError(502, "upstream: response head exceeds 200 bytes")]


def test_upstream_idle_eof_is_clean_and_data_without_a_request_is_502() -> None:
    up = UpstreamHttp1()
    assert up.receive_data(b"") == [ConnectionClosed()]
    up = UpstreamHttp1()
    [ev] = up.receive_data(b"HTTP/1.1 408 Request Timeout\r\n\r\n")
    assert isinstance(ev, ProtocolError) and ev.status == 502


def test_upstream_request_framing() -> None:
    up = UpstreamHttp1()
    wire = up.send_request_head("PUT", "/f", [("host", "s"), ("content-length", "3")], body=True)
    assert wire == b"PUT /f HTTP/1.1\r\nhost: s\r\ncontent-length: 3\r\n\r\n"
    with pytest.raises(LocalProtocolError):
        up.send_body(b"abcd")
    assert up.send_body(b"abc") == b"abc"
    assert up.send_end() == b""
    up = UpstreamHttp1()
    wire = up.send_request_head("POST", "/", [("host", "s")], body=True)
    assert wire.endswith(b"transfer-encoding: chunked\r\n\r\n")
    assert up.send_body(b"x" * 17) == b"11\r\n" + b"x" * 17 + b"\r\n"
    assert up.send_body(b"") == b""
    assert up.send_end() == b"0\r\n\r\n"
    with pytest.raises(LocalProtocolError):
        UpstreamHttp1().send_request_head(
            "POST", "/", [("host", "s"), ("content-length", "1"), ("transfer-encoding", "chunked")]
        )


def test_upstream_connection_close_is_not_reusable() -> None:
    up = upstream_after_request()
    up.receive_data(b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 0\r\n\r\n")
    assert not up.reusable
    up = UpstreamHttp1()
    up.send_request_head("GET", "/", [("host", "s"), ("connection", "close")])
    up.send_end()
    up.receive_data(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
    assert not up.reusable
    with pytest.raises(LocalProtocolError):
        up.start_next_request()


def test_forwardable_headers_any_case_and_connection_named_fields() -> None:
    headers = [
        ("X-Private", "a"),
        ("CONNECTION", "X-Private, close"),
        ("content-length", "0"),
        ("Transfer-Encoding", "chunked"),
        ("x-private", "b"),
    ]
    assert forwardable_headers(headers) == [("content-length", "0")]
    assert forwardable_headers(()) == []


def test_trailers_that_never_end_are_cut_like_a_head() -> None:
    down = DownstreamHttp1(max_header_size=1000)
    down.receive_data(b"POST / HTTP/1.1\r\nHost: s\r\nTransfer-Encoding: chunked\r\n\r\n0\r\nx-t: ")
    sent = 0
    while sent + 100 <= 1000:
        assert down.receive_data(b"v" * 100) == []
        sent += 100
    assert down.receive_data(b"v" * 100) == [
        ProtocolError(431, "request trailers exceed 1000 bytes")
    ]
    up = UpstreamHttp1(max_header_size=1000)
    up.send_request_head("GET", "/", [("host", "svc")])
    up.send_end()
    up.receive_data(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n")
    assert up.receive_data(b"x-t: " + b"v" * 1000) == [
        ProtocolError(502, "upstream: response trailers exceed 1000 bytes")
    ]


def test_big_chunks_in_big_reads_are_not_mistaken_for_trailers() -> None:
    body = os.urandom(200_000)
    wire = (
        b"POST / HTTP/1.1\r\nHost: s\r\nTransfer-Encoding: chunked\r\n\r\n"
        + b"".join(
            b"%x\r\n%s\r\n" % (len(body[i : i + 50_000]), body[i : i + 50_000])
            for i in range(0, len(body), 50_000)
        )
        + b"0\r\n\r\n"
    )
    for size in (3, 1000, 65536):
        pieces = [wire[i : i + size] for i in range(0, len(wire), size)]
        down = DownstreamHttp1(max_header_size=100)
        events = feed(down, pieces)
        assert events[1:] == [BodyChunk(body), RequestEnd()], size
