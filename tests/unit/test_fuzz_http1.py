"""Fuzzing the HTTP/1.1 machines (``protocol/http1.py``): generated requests (pipelined,
``Content-Length`` and chunked bodies with extensions and trailers, ``Expect``,
``Upgrade``, HTTP/1.0, ``Connection: close``, unknown methods, bad versions) and
responses (1xx, chunked, close-delimited, ``HEAD``, 204/304), whole or with bytes
changed, fed in one read and split at random points: the same events, the same answers
written back, the same error for malformed input, whatever the split."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

from fuzzing import fuzz
from hypothesis import example, given
from hypothesis import strategies as st

from nodeagent.protocol.http1 import (
    BodyChunk,
    DownstreamHttp1,
    Informational,
    ProtocolError,
    RequestHead,
    ResponseEnd,
    ResponseHead,
    Upgraded,
    UpstreamHttp1,
)

# -- what is generated --------------------------------------------------------------------

_TOKEN = st.text("abcdefghijklmnopqrstuvwxyz0123456789-!#$%&'*+.^_`|~", min_size=1, max_size=8)
_VALUE = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=12).map(
    str.strip
)
_BODY = st.binary(max_size=64)
_METHODS = ["GET", "GET", "POST", "PUT", "HEAD", "DELETE", "OPTIONS", "PATCH", "PURGE",
            "CONNECT", "BREW", "get"]  # fmt: skip
_EXTRA_FIELDS = [b"Connection: close", b"Connection: keep-alive", b"Expect: 100-continue",
                 b"Connection: upgrade", b"Upgrade: websocket"]  # fmt: skip


@st.composite
def _fields(draw: st.DrawFn, host: bool) -> list[bytes]:
    lines = [f"{n}: {v}".encode() for n, v in draw(st.lists(st.tuples(_TOKEN, _VALUE), max_size=4))]
    if host:
        lines.insert(draw(st.integers(0, len(lines))), b"Host: svc")
    return lines


@st.composite
def _chunked(draw: st.DrawFn, body: bytes) -> bytes:
    """``body`` as chunks (of random sizes, hex in either case, some with extensions),
    the last chunk, and trailers."""
    out, at = b"", 0
    while at < len(body):
        n = draw(st.integers(1, len(body) - at))
        size = draw(st.sampled_from(["%x", "%X", "%04x"])) % n
        ext = draw(st.sampled_from(["", ";a=b", ';q="x y"']))
        out += f"{size}{ext}\r\n".encode() + body[at : at + n] + b"\r\n"
        at += n
    trailers = draw(st.lists(st.tuples(_TOKEN, _VALUE), max_size=2))
    return out + b"0\r\n" + b"".join(f"{n}: {v}\r\n".encode() for n, v in trailers) + b"\r\n"


@st.composite
def requests(draw: st.DrawFn) -> bytes:
    method = draw(st.sampled_from(_METHODS))
    target = draw(
        st.sampled_from(["/", "/a?b=c", "/x/../y", "*", "http://web/admin", "web:80", "/%41"])
    )
    version = draw(st.sampled_from(["1.1", "1.1", "1.1", "1.0", "2.0", "0.9"]))
    lines = draw(_fields(host=draw(st.integers(0, 9)) > 0))
    if draw(st.integers(0, 9)) == 0:
        lines.append(b"Host: other")
    body = draw(_BODY)
    framing = draw(st.sampled_from(["none", "length", "length", "chunked", "both"]))
    if framing in ("length", "both"):
        lines.append(b"Content-Length: %d" % len(body))
    if framing in ("chunked", "both"):
        lines.append(b"Transfer-Encoding: " + draw(st.sampled_from([b"chunked", b"gzip, chunked"])))
    extra = draw(st.lists(st.sampled_from(_EXTRA_FIELDS), max_size=3))
    head = f"{method} {target} HTTP/{version}\r\n".encode() + b"".join(
        line + b"\r\n" for line in [*lines, *extra]
    )
    if framing == "none":
        return head + b"\r\n"
    if framing == "length":
        return head + b"\r\n" + body
    return head + b"\r\n" + draw(_chunked(body))


@st.composite
def responses(draw: st.DrawFn) -> bytes:
    interims = b"".join(
        b"HTTP/1.1 %d Wait\r\n%s\r\n" % (code, b"link: </a>\r\n" if code == 103 else b"")
        for code in draw(st.lists(st.sampled_from([100, 102, 103]), max_size=2))
    )
    status = draw(st.sampled_from([200, 200, 201, 204, 304, 404, 500, 99, 1000]))
    reason = draw(st.sampled_from(["OK", "", "Not Found", "x\x01y"]))
    version = draw(st.sampled_from(["1.1", "1.1", "1.0", "2.0"]))
    lines = draw(_fields(host=False))
    body = draw(_BODY)
    framing = draw(st.sampled_from(["length", "length", "chunked", "eof", "both"]))
    if framing in ("length", "both"):
        lines.append(b"Content-Length: %d" % len(body))
    if framing in ("chunked", "both"):
        lines.append(b"Transfer-Encoding: " + draw(st.sampled_from([b"chunked", b"gzip"])))
    if draw(st.booleans()):
        lines.append(b"Connection: close")
    head = f"HTTP/{version} {status} {reason}\r\n".encode() + b"".join(f + b"\r\n" for f in lines)
    if framing == "chunked":
        return interims + head + b"\r\n" + draw(_chunked(body))
    return interims + head + b"\r\n" + body


@st.composite
def mutated(draw: st.DrawFn, data: bytes) -> bytes:
    """``data`` with a few bytes replaced, inserted or deleted (or left alone)."""
    out = bytearray(data)
    for _ in range(draw(st.integers(0, 3))):
        at = draw(st.integers(0, len(out)))
        byte = draw(st.sampled_from(b"\r\n :;\t\x00\x7f0aZ\xff"))
        how = draw(st.sampled_from(["replace", "insert", "delete"]))
        if how == "insert" or at == len(out):
            out.insert(at, byte)
        elif how == "replace":
            out[at] = byte
        else:
            del out[at]
    return bytes(out)


@dataclass(frozen=True)
class Input:
    data: bytes
    cuts: tuple[int, ...]
    eof: bool

    def pieces(self) -> list[bytes]:
        bounds = [0, *sorted({c % (len(self.data) + 1) for c in self.cuts}), len(self.data)]
        return [self.data[a:b] for a, b in itertools.pairwise(bounds) if b > a]


@st.composite
def inputs(draw: st.DrawFn, messages: st.SearchStrategy[bytes], most: int) -> Input:
    data = b"".join(draw(st.lists(messages, min_size=1, max_size=most)))
    data = draw(mutated(data)) if draw(st.booleans()) else data
    data += draw(st.sampled_from([b"", b"", b"GET /par", b"\r\n", b"garbage"]))
    cuts = draw(st.lists(st.integers(0, 1 << 16), max_size=12))
    return Input(data, tuple(cuts), draw(st.booleans()))


# -- the drivers: the same decisions whatever the split -----------------------------------


def merged(log: Sequence[object]) -> list[object]:
    out: list[object] = []
    for ev in log:
        if isinstance(ev, BodyChunk) and out and isinstance(out[-1], BodyChunk):
            out[-1] = BodyChunk(out[-1].data + ev.data)
        elif isinstance(ev, Upgraded) and out and isinstance(out[-1], Upgraded):
            out[-1] = Upgraded(out[-1].data + ev.data)
        elif isinstance(ev, bytes) and out and isinstance(out[-1], bytes):
            out[-1] = out[-1] + ev
        else:
            out.append(ev)
    return out


def serve(pieces: list[bytes], eof: bool, answer_upgrades: bool) -> list[object]:
    """The proxy's server side as ``l7http1`` drives it: each complete request answered
    (404, or 101 to an upgrade offer), pipelined ones taken in turn, a protocol error
    answered with ``send_error``. The transcript: events, and the bytes written back."""
    down = DownstreamHttp1()
    log: list[object] = []
    heads: list[RequestHead] = []

    def handle(events: list[object]) -> None:
        while True:
            log.extend(events)
            heads.extend(e for e in events if isinstance(e, RequestHead))
            if any(isinstance(e, ProtocolError) for e in events):
                err = next(e for e in events if isinstance(e, ProtocolError))
                log.append(down.send_error(err.status, err.reason, "DPE"))
                return
            if not down.awaiting_response or down.response_started:
                return
            if answer_upgrades and heads and heads[-1].upgrade is not None:
                log.append(down.send_response_head(101, [("upgrade", heads[-1].upgrade)]))
                log.extend(down.take_events())
                return
            log.append(down.send_response_head(404, [("content-length", "2")]))
            body = b"" if heads[-1].method == "HEAD" else down.send_body(b"no")
            log.append(body + down.send_end())
            if not down.keep_alive:
                return
            events = list(down.start_next_request())

    for piece in pieces:
        handle(list(down.receive_data(piece)))
    if eof:
        handle(list(down.receive_data(b"")))
    log.append(("keep_alive", down.keep_alive, "upgraded", down.upgraded))
    return merged(log)


def fetch(method: str, pieces: list[bytes], eof: bool) -> list[object]:
    """The proxy's client side: one request sent, the application's bytes read."""
    up = UpstreamHttp1()
    up.send_request_head(method, "/", [("host", "svc")])
    up.send_end()
    log: list[object] = []
    for piece in pieces:
        log.extend(up.receive_data(piece))
    if eof:
        log.extend(up.receive_data(b""))
    log.append(("reusable", up.reusable, "upgraded", up.upgraded))
    return merged(log)


# -- the properties ------------------------------------------------------------------------


@fuzz(3)
@given(inputs(requests(), 4), st.booleans())
@example(Input(b"GET / HTTP/1.1\r\nHost: svc\r\nContent-Length: 3\r\n\r\nabcGET /", (40,), True),
         False)  # fmt: skip
def test_requests_give_the_same_events_however_split(inp: Input, upgrades: bool) -> None:
    whole = serve([inp.data] if inp.data else [], inp.eof, upgrades)
    assert serve(inp.pieces(), inp.eof, upgrades) == whole
    byte_by_byte = [inp.data[i : i + 1] for i in range(len(inp.data))]
    assert serve(byte_by_byte, inp.eof, upgrades) == whole
    for ev in whole:
        if isinstance(ev, ProtocolError):
            assert ev.status in (400, 431, 501, 505) and ev.reason
        elif isinstance(ev, RequestHead):
            assert ev.method and ev.target and ev.http_version in ("1.0", "1.1")


@fuzz(3)
@given(
    st.sampled_from(["GET", "GET", "HEAD", "POST", "CONNECT"]),
    inputs(responses(), 1),
)
def test_responses_give_the_same_events_however_split(method: str, inp: Input) -> None:
    whole = fetch(method, [inp.data] if inp.data else [], inp.eof)
    assert fetch(method, inp.pieces(), inp.eof) == whole
    assert fetch(method, [inp.data[i : i + 1] for i in range(len(inp.data))], inp.eof) == whole
    heads = [ev for ev in whole if isinstance(ev, ResponseHead)]
    assert len(heads) <= 1
    for ev in whole:
        if isinstance(ev, ProtocolError):
            assert ev.status == 502 and ev.reason
        elif isinstance(ev, Informational):
            assert 100 <= ev.status < 200
        elif isinstance(ev, ResponseEnd):
            assert heads  # an end only after a head
