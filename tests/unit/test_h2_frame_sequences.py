"""Fuzzing the HTTP/2 server machines with frame sequences a hostile client writes by
hand (its own HPACK encoder, no state machine): the HBONE server (``protocol/hbone.py``)
and the L7 path's HTTP/2 server (``protocol/http2.py``).

- Any interleaving of HEADERS (CONNECT or GET, valid or malformed, split into
  CONTINUATIONs), DATA, RST_STREAM, WINDOW_UPDATE, PING, SETTINGS, PRIORITY, GOAWAY and
  unknown frames on many streams, the bytes split at random points, the server answering
  as it goes: nothing raises out of ``receive_data`` (nor fails the connection as an
  internal error), a stream is closed once, nothing is reported for it after, and
  nothing at all once the connection failed.
- An error confined to one stream by RFC 9113 (a reset, a malformed or refused request,
  a window overrun, DATA or HEADERS after END_STREAM, a window overflow), with the frames
  a client may still send on it after our reset, never ends the connection or another
  stream: the streams beside it get every byte, and stay open.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass

import hpack
from fuzzing import fuzz
from hyperframe.frame import (
    ContinuationFrame,
    DataFrame,
    ExtensionFrame,
    Frame,
    GoAwayFrame,
    HeadersFrame,
    PingFrame,
    PriorityFrame,
    RstStreamFrame,
    SettingsFrame,
    WindowUpdateFrame,
)
from hypothesis import example, given
from hypothesis import strategies as st

from nodeagent.protocol import hbone
from nodeagent.protocol.hbone import ConnectionFailed, ConnectRequested, ServerConnection
from nodeagent.protocol.http2 import (
    ConnectionEnded,
    DownstreamHttp2,
    Http2Settings,
    ProtocolError,
    StreamData,
    StreamRejected,
    StreamRequest,
    StreamReset,
    StreamTrailers,
)

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
WINDOW = 65535
"""The stream window both machines are given here (so a few frames overrun it)."""
Fields = list[tuple[str, str]]


def request(hbone_: bool, **over: str) -> Fields:
    if hbone_:
        block = {":method": "CONNECT", ":authority": "10.0.0.1:80"}
    else:
        block = {":method": "GET", ":scheme": "http", ":path": "/", ":authority": "x"}
    block.update(over)
    return [(k, v) for k, v in block.items() if v != "-"]


def malformed(hbone_: bool, how: int) -> Fields:
    """A request head the RFC makes a stream error (or HBONE refuses), by ``how``."""
    cases: list[Fields] = [
        request(hbone_, **{":authority": "-"}),
        request(hbone_, **{":method": "-"}),
        [*request(hbone_), ("Upper", "x")],
        [*request(hbone_), ("connection", "close")],
        [*request(hbone_), ("te", "gzip")],
        [("x-a", "1"), *request(hbone_)],  # a pseudo-header after a regular one
        [*request(hbone_), (":foo", "1")],
        [*request(hbone_), (":method", "GET")],
        request(hbone_, **{":path": ""}) if not hbone_ else request(True, **{":method": "GET"}),
        request(hbone_, **{":authority": "web:80" if hbone_ else "a b"}),
        [*request(hbone_), ("content-length", "x")],
    ]
    return cases[how % len(cases)]


class Peer:
    """A client writing frames as it likes; ``out`` is what it sent."""

    def __init__(self) -> None:
        self.enc = hpack.Encoder()
        self.out = bytearray(PREFACE)
        self.send(SettingsFrame(0), SettingsFrame(0, flags=["ACK"]))

    def send(self, *frames: Frame) -> None:
        for f in frames:
            self.out += f.serialize()

    def headers(self, sid: int, fields: Fields, end: bool = False, split: int = 0) -> None:
        block = self.enc.encode(fields)
        flags = ["END_STREAM"] if end else []
        if 0 < split < len(block):
            self.send(HeadersFrame(sid, block[:split], flags=flags))
            self.send(ContinuationFrame(sid, block[split:], flags=["END_HEADERS"]))
        else:
            self.send(HeadersFrame(sid, block, flags=[*flags, "END_HEADERS"]))

    def data(self, sid: int, n: int, end: bool = False, byte: int = 0x61) -> None:
        while True:
            size = min(n, 16384)
            n -= size
            flags = ["END_STREAM"] if end and not n else []
            self.send(DataFrame(sid, bytes([byte]) * size, flags=flags))
            if not n:
                return


# -- any sequence: never raises, events stay consistent ----------------------------------

KINDS = 4 * ["open", "open_end", "bad", "rst", "data", "end", "trailers", "wu", "ping",
              "settings", "priority", "unknown"] + [
    "big", "wu0", "wu_huge", "ping_ack", "goaway", "even", "garbage"]  # fmt: skip
"""Each kind of frame a client sends; the ones that end the connection are rarer."""
Op = tuple[str, int, int]
ops = st.lists(st.tuples(st.sampled_from(KINDS), st.integers(0, 15), st.integers(0, 2**31)),
               max_size=60)  # fmt: skip
SETTING_IDS = [0x1, 0x2, 0x3, 0x4, 0x5, 0x6, 0x8, 0x9, 0xFF]


def chaos(ops_: list[Op], hbone_: bool) -> bytes:
    peer = Peer()
    opened: list[int] = []
    next_id = 1
    for kind, which, n in ops_:
        sid = opened[which % len(opened)] if opened else 1 + 2 * which
        if kind in ("open", "open_end", "bad"):
            block = malformed(hbone_, n) if kind == "bad" else request(hbone_)
            peer.headers(next_id, block, end=kind == "open_end" or n % 5 == 0, split=n % 7)
            opened.append(next_id)
            next_id += 2
        elif kind == "rst":
            peer.send(RstStreamFrame(sid, error_code=n % 16))
        elif kind in ("data", "end", "big"):
            peer.data(sid, WINDOW + 1 if kind == "big" else n % 3000, end=kind == "end")
        elif kind == "trailers":
            peer.headers(sid, [("x-t", "1")], end=True)
        elif kind in ("wu", "wu0", "wu_huge"):
            inc = {"wu": 1 + n % 100_000, "wu0": 0, "wu_huge": 2**31 - 1}[kind]
            peer.send(WindowUpdateFrame(sid if which % 3 else 0, window_increment=inc))
        elif kind in ("ping", "ping_ack"):
            peer.send(PingFrame(0, b"12345678", flags=["ACK"] if kind == "ping_ack" else []))
        elif kind == "settings":
            peer.send(SettingsFrame(0, settings={SETTING_IDS[which % 9]: n}))
        elif kind == "priority":
            peer.send(PriorityFrame(sid, depends_on=(n % 20) or sid, stream_weight=n % 256))
        elif kind == "goaway":
            peer.send(GoAwayFrame(0, last_stream_id=n % 64, error_code=n % 16))
        elif kind == "even":
            peer.headers(2 + 2 * which, request(hbone_))
        elif kind == "unknown":
            peer.send(ExtensionFrame(0x20 + which, sid, flag_byte=n % 256, body=b"x" * (n % 40)))
        else:
            peer.out += n.to_bytes(4, "big") * (1 + which % 3)
    return bytes(peer.out)


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    bounds = [0, *sorted({c % (len(data) + 1) for c in cuts}), len(data)]
    return [data[a:b] for a, b in itertools.pairwise(bounds) if b > a] or [b""]


@dataclass
class Seen:
    """What a machine reported, checked as it comes."""

    closed: set[int]
    failed: bool = False

    def stream_event(self, sid: int, closing: bool) -> None:
        assert not self.failed, f"stream {sid}: an event after the connection failed"
        assert sid not in self.closed, f"stream {sid}: an event after it closed"
        if closing:
            self.closed.add(sid)


def run_hbone(data: bytes, cuts: list[int], answer: Callable[[int], int]) -> Seen:
    m = ServerConnection(hbone.HboneSettings(stream_window=WINDOW))
    m.initiate()
    seen = Seen(set())

    def check(events: list[hbone.Event]) -> None:
        for ev in events:
            if isinstance(ev, ConnectionFailed):
                assert "internal error" not in ev.reason, ev.reason
                assert not seen.failed
                seen.failed = True
            elif isinstance(ev, hbone.GoAwayReceived):
                assert not seen.failed
            else:
                seen.stream_event(ev.stream_id, isinstance(ev, hbone.StreamClosed))
            if isinstance(ev, ConnectRequested):
                how = answer(ev.stream_id)
                if how == 1:
                    m.accept(ev.stream_id)
                elif how == 2:
                    m.refuse(ev.stream_id, 503, "no")
            elif isinstance(ev, hbone.DataReceived):
                m.acknowledge(ev.stream_id, len(ev.data))

    for piece in split(data, cuts):
        check(m.receive_data(piece))
        m.data_to_send()
        check(m.take_events())
    return seen


def run_l7(data: bytes, cuts: list[int], answer: Callable[[int], int]) -> Seen:
    m = DownstreamHttp2()
    m.data_to_send()
    seen = Seen(set())
    for piece in split(data, cuts):
        ours: list[int] = []
        for ev in m.receive_data(piece):
            if isinstance(ev, ProtocolError):
                assert not seen.failed
                seen.failed = True
                continue
            if isinstance(ev, StreamRequest | StreamData | StreamTrailers | StreamReset
                          | StreamRejected):  # fmt: skip
                seen.stream_event(ev.stream_id, isinstance(ev, StreamReset | StreamRejected))
            if isinstance(ev, StreamRequest):
                how = answer(ev.stream_id)
                if how == 1:
                    m.send_response_head(ev.stream_id, 200, [])
                elif how == 2:
                    m.send_error(ev.stream_id, 503, "no", "UO")
                    ours.append(ev.stream_id)  # over: nothing after this read's events
            elif isinstance(ev, StreamData):
                m.ack_data(ev.stream_id, len(ev.data))
        seen.closed.update(ours)
        m.data_to_send()
    return seen


ANSWERS: list[Callable[[int], int]] = [lambda s: 0, lambda s: 1, lambda s: 2, lambda s: s % 3]


@fuzz(3)
@given(ops, st.lists(st.integers(0, 2**20), max_size=8), st.integers(0, 3))
@example([("open", 0, 1), ("rst", 0, 8), ("open", 0, 1)], [], 0)  # issue 17: KeyError
@example([("bad", 0, 1), ("rst", 0, 8), ("open", 0, 1)], [], 0)  # a refusal, then RST
def test_hbone_server_never_raises(ops_: list[Op], cuts: list[int], answer: int) -> None:
    run_hbone(chaos(ops_, hbone_=True), cuts, ANSWERS[answer])


@fuzz(3)
@given(ops, st.lists(st.integers(0, 2**20), max_size=8), st.integers(0, 3))
@example([("open", 0, 1), ("rst", 0, 8), ("open", 0, 1)], [], 1)
@example([("bad", 0, 1), ("rst", 0, 8), ("open", 0, 1)], [], 1)
def test_l7_http2_server_never_raises(ops_: list[Op], cuts: list[int], answer: int) -> None:
    run_l7(chaos(ops_, hbone_=False), cuts, ANSWERS[answer])


# -- an error on one stream ends that stream only ----------------------------------------

ERRORS = ["rst", "data_after_end", "headers_after_end", "wu_overflow"]
"""Stream errors by RFC 9113 the machines keep to their stream (and, on HBONE, refused
requests and a stream window overrun, which the RFC lets a receiver take for a
connection error, as ``h2`` does on the L7 path; there, malformed requests). (``h2`` makes these
connection errors, so they are left out: a WINDOW_UPDATE of 0 or a PRIORITY on itself on
a stream, and on HBONE a header block ``h2`` finds malformed.)"""
AFTER = ["data", "rst", "wu"]
"""Frames a client may still have in flight on a stream we reset: to be ignored."""


@st.composite
def isolation(draw: st.DrawFn, hbone_: bool) -> Case:
    """Bystander streams (a request and DATA) and streams that each make one stream
    error (then, perhaps, frames in flight), interleaved; plus PINGs, SETTINGS, PRIORITY
    and WINDOW_UPDATEs. Returns the bytes and the bytes sent per bystander."""
    errors = ERRORS + (["overrun", "refused_method", "refused_authority"] if hbone_ else
                       ["l7_bad_head", "l7_length"])  # fmt: skip
    scripts: list[list[tuple[str, int]]] = []
    for _ in range(draw(st.integers(1, 4))):
        datas = draw(st.lists(st.integers(1, 2000), max_size=4))
        scripts.append([("open", 0), *(("data", n) for n in datas)])
    bystanders = len(scripts)
    for _ in range(draw(st.integers(1, 6))):
        error = draw(st.sampled_from(errors))
        tail = [] if error == "rst" else draw(st.lists(st.sampled_from(AFTER), max_size=2))
        scripts.append([(error, 0), *((t, 1) for t in tail)])
        if error != "rst":
            scripts[-1][0] = (error, draw(st.integers(0, 2**16)))
    scripts.append(draw(st.lists(st.tuples(st.sampled_from(["ping", "settings", "priority",
                                                            "wu"]), st.integers(1, 2**16)),
                                 max_size=6)))  # fmt: skip
    peer, ids, sent, next_id, log = Peer(), {}, {}, 1, []
    while live := [i for i, script in enumerate(scripts) if script]:
        i = live[draw(st.integers(0, len(live) - 1))]
        kind, n = scripts[i].pop(0)
        if i not in ids and i < len(scripts) - 1:
            ids[i], next_id = next_id, next_id + 2
        sid = ids.get(i, 0) if kind != "priority" else ids.get(0, 0)
        if sid or kind != "priority":
            emit(peer, kind, sid, n, hbone_)
            log.append(f"{kind}({sid}, {n})")
        if i < bystanders and kind == "data":
            sent[sid] = sent.get(sid, 0) + n
        elif i < bystanders:
            sent.setdefault(sid, 0)
    return Case(bytes(peer.out), sent, " ".join(log))


@dataclass(frozen=True)
class Case:
    data: bytes
    sent: dict[int, int]
    """Bytes sent on each bystander stream."""
    script: str

    def __repr__(self) -> str:
        return f"Case({self.script!r}, bystanders={self.sent})"


def emit(peer: Peer, kind: str, sid: int, n: int, hbone_: bool) -> None:
    if kind == "open":
        peer.headers(sid, request(hbone_), split=n % 5)
    elif kind == "data":
        peer.data(sid, n)
    elif kind == "rst" and n:
        peer.send(RstStreamFrame(sid, error_code=n % 16))
    elif kind == "rst":  # as the stream error: on a stream it opens
        peer.headers(sid, request(hbone_))
        peer.send(RstStreamFrame(sid, error_code=1 + n % 15))
    elif kind == "overrun":
        peer.headers(sid, request(hbone_))
        peer.data(sid, WINDOW + 1 + n % 100)
    elif kind in ("data_after_end", "headers_after_end"):
        peer.headers(sid, request(hbone_), end=True)
        if kind == "data_after_end":
            peer.data(sid, 1 + n % 100)
        else:
            peer.headers(sid, [("x-t", "1")], end=True)
    elif kind == "wu_overflow":
        peer.headers(sid, request(hbone_))
        peer.send(WindowUpdateFrame(sid, window_increment=2**31 - 1))
    elif kind == "refused_method":
        peer.headers(sid, request(True, **{":method": "GET", ":scheme": "http", ":path": "/"}))
    elif kind == "refused_authority":
        peer.headers(sid, request(True, **{":authority": ["web:80", "10.0.0.1", "[::1]:0",
                                                            "1.2.3.4:99999"][n % 4]}))
    elif kind == "l7_bad_head":
        peer.headers(sid, malformed(False, n))
    elif kind == "l7_length":
        peer.headers(sid, [*request(False, **{":method": "POST"}), ("content-length", "5")])
        peer.data(sid, 1 + n % 4 if n % 2 else 6 + n % 4, end=True)
    elif kind == "wu":
        peer.send(WindowUpdateFrame(sid, window_increment=n))
    elif kind == "ping":
        peer.send(PingFrame(0, n.to_bytes(8, "big")))
    elif kind == "settings":
        peer.send(SettingsFrame(0, settings={SettingsFrame.INITIAL_WINDOW_SIZE: n,
                                             SettingsFrame.MAX_FRAME_SIZE: 16384 + n}))  # fmt: skip
    else:
        peer.send(PriorityFrame(sid, depends_on=0, stream_weight=n % 256))


@fuzz(2)
@given(isolation(hbone_=True), st.lists(st.integers(0, 2**20), max_size=6))
def test_hbone_a_stream_error_ends_that_stream_only(
    case: Case, cuts: list[int]
) -> None:
    data, sent = case.data, case.sent
    m = ServerConnection(hbone.HboneSettings(stream_window=WINDOW))
    m.initiate()
    got = dict.fromkeys(sent, 0)
    for piece in split(data, cuts):
        for ev in [*m.receive_data(piece), *m.take_events()]:
            assert not isinstance(ev, ConnectionFailed | hbone.GoAwayReceived), ev
            if isinstance(ev, ConnectRequested):
                m.accept(ev.stream_id)
            elif isinstance(ev, hbone.DataReceived):
                m.acknowledge(ev.stream_id, len(ev.data))
                if ev.stream_id in got:
                    got[ev.stream_id] += len(ev.data)
            elif isinstance(ev, hbone.StreamClosed | hbone.StreamEnded):
                assert ev.stream_id not in sent, ev
        m.data_to_send()
    assert got == sent
    assert set(sent) <= set(m.stream_ids())
    assert not m.has_failed() and not m.closed


@fuzz(2)
@given(isolation(hbone_=False), st.lists(st.integers(0, 2**20), max_size=6))
def test_l7_http2_a_stream_error_ends_that_stream_only(
    case: Case, cuts: list[int]
) -> None:
    data, sent = case.data, case.sent
    m = DownstreamHttp2(Http2Settings(stream_window=WINDOW))
    m.data_to_send()
    got = dict.fromkeys(sent, 0)
    for piece in split(data, cuts):
        for ev in m.receive_data(piece):
            assert not isinstance(ev, ProtocolError | ConnectionEnded), ev
            if isinstance(ev, StreamRequest):
                m.send_response_head(ev.stream_id, 200, [])
            elif isinstance(ev, StreamData):
                m.ack_data(ev.stream_id, len(ev.data))
                if ev.stream_id in got:
                    got[ev.stream_id] += len(ev.data)
                assert not ev.end_stream or ev.stream_id not in sent
            elif isinstance(ev, StreamReset | StreamRejected | StreamTrailers):
                assert ev.stream_id not in sent, ev
        m.data_to_send()
    assert got == sent
    assert m.open_streams >= len(sent) and not m.closed
