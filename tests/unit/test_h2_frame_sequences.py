"""Random HTTP/2 frame sequences (CONNECT or GET, RST_STREAM, DATA, PING, SETTINGS,
WINDOW_UPDATE interleaved on a few streams, the bytes split at random points) fed to the
HBONE server machine and the L7 path's HTTP/2 server machine, with the server answering
some streams as it goes: nothing ever raises out of ``receive_data``, a stream is closed
at most once, and nothing is reported after the connection failed. Bounded here (a few
hundred examples); ``HYPOTHESIS_PROFILE=long`` runs more."""

from __future__ import annotations

import os

import h2.config
import h2.connection
from hyperframe.frame import (
    DataFrame,
    PingFrame,
    RstStreamFrame,
    SettingsFrame,
    WindowUpdateFrame,
)
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from nodeagent.protocol.hbone import (
    ConnectionFailed,
    ConnectRequested,
    ServerConnection,
    StreamClosed,
)
from nodeagent.protocol.http2 import DownstreamHttp2, ProtocolError, StreamRequest

EXAMPLES = 5000 if os.environ.get("HYPOTHESIS_PROFILE") == "long" else 300

Op = tuple[str, int, int]
ops = st.lists(
    st.tuples(
        st.sampled_from(
            ["open", "open", "open", "bad", "rst", "rst", "data", "end", "ping", "settings", "wu"]
        ),
        st.integers(0, 5),  # which stream (index into the ones opened)
        st.integers(0, 70_000),  # a size or a code
    ),
    max_size=40,
)


def frames_of(ops_: list[Op], hbone: bool) -> bytes:
    client = h2.connection.H2Connection(
        h2.config.H2Configuration(client_side=True, validate_outbound_headers=False)
    )
    client.initiate_connection()
    out = client.data_to_send()
    opened: list[int] = []
    next_id = 1
    for op, which, n in ops_:
        sid = opened[which % len(opened)] if opened else 1
        if op in ("open", "bad"):
            if hbone:
                block = [(":method", "CONNECT"), (":authority", "10.0.0.1:80")]
            else:
                block = [
                    (":method", "GET"),
                    (":scheme", "http"),
                    (":path", "/"),
                    (":authority", "x"),
                ]
            if op == "bad":
                block = block[:1]
            client.send_headers(next_id, block, end_stream=n % 3 == 0)
            out += client.data_to_send()
            opened.append(next_id)
            next_id += 2
        elif op == "rst":
            f = RstStreamFrame(sid)
            f.error_code = n % 14
            out += f.serialize()
        elif op in ("data", "end"):
            d = DataFrame(sid)
            d.data = bytes(n % 20_000)
            if op == "end":
                d.flags.add("END_STREAM")
            out += d.serialize()
        elif op == "ping":
            p = PingFrame(0)
            p.opaque_data = b"12345678"
            out += p.serialize()
        elif op == "settings":
            out += SettingsFrame(0, settings={SettingsFrame.INITIAL_WINDOW_SIZE: n}).serialize()
        else:
            w = WindowUpdateFrame(sid if n % 2 else 0)
            w.window_increment = max(1, n)
            out += w.serialize()
    return bytes(out)


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops, st.lists(st.integers(1, 4000), max_size=6), st.integers(0, 3))
@example([("open", 0, 1), ("rst", 0, 8), ("open", 0, 1)], [], 0)  # issue 17: KeyError
@example([("bad", 0, 1), ("rst", 0, 8), ("open", 0, 1)], [], 0)  # a refusal, then RST
def test_hbone_server_never_raises(ops_: list[Op], cuts: list[int], answer: int) -> None:
    data = frames_of(ops_, hbone=True)
    m = ServerConnection()
    m.initiate()
    closed: set[int] = set()
    failed = False
    for piece in split(data, cuts):
        for ev in m.receive_data(piece):
            assert not failed, f"{ev} after the connection failed"
            if isinstance(ev, StreamClosed):
                assert ev.stream_id not in closed
                closed.add(ev.stream_id)
            elif isinstance(ev, ConnectionFailed):
                failed = True
            elif isinstance(ev, ConnectRequested) and answer:
                if answer == 1:
                    m.accept(ev.stream_id)
                elif answer == 2:
                    m.refuse(ev.stream_id, 503, "no")
        m.data_to_send()
        for ev in m.take_events():
            if isinstance(ev, StreamClosed):
                assert ev.stream_id not in closed
                closed.add(ev.stream_id)


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops, st.lists(st.integers(1, 4000), max_size=6), st.booleans())
@example([("open", 0, 1), ("rst", 0, 8), ("open", 0, 1)], [], True)
@example([("bad", 0, 1), ("rst", 0, 8), ("open", 0, 1)], [], True)
def test_l7_http2_server_never_raises(ops_: list[Op], cuts: list[int], answer: bool) -> None:
    data = frames_of(ops_, hbone=False)
    m = DownstreamHttp2()
    m.data_to_send()
    failed = False
    for piece in split(data, cuts):
        for ev in m.receive_data(piece):
            assert not failed, f"{ev} after the connection failed"
            if isinstance(ev, ProtocolError):
                failed = True
            elif isinstance(ev, StreamRequest) and answer:
                m.send_response_head(ev.stream_id, 200, [("content-length", "2")])
                m.send_data(ev.stream_id, b"ok", end_stream=True)
        m.data_to_send()


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    pieces, at = [], 0
    for c in sorted(cuts):
        if at < c < len(data):
            pieces.append(data[at:c])
            at = c
    pieces.append(data[at:])
    return pieces
