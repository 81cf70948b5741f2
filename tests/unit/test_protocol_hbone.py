"""The HBONE machines without sockets: a client and a server machine wired back to back
(and, for interop, h2's own ``H2Connection`` as the peer), bytes shuttled by hand."""

from __future__ import annotations

import os
import random
from collections import defaultdict

import h2.config
import h2.connection
import h2.events
import pytest
from fuzzing import fuzz
from h2.errors import ErrorCodes
from hypothesis import given
from hypothesis import strategies as st

from nodeagent.protocol.hbone import (
    REASON_HEADER,
    ClientConnection,
    ConnectAccepted,
    ConnectionFailed,
    ConnectRefused,
    ConnectRequested,
    DataReceived,
    Event,
    GoAwayReceived,
    HboneSettings,
    RequestRejected,
    ServerConnection,
    StreamClosed,
    StreamEnded,
    connect_headers,
    forwarded_for,
    new_traceparent,
    parse_authority,
)

# -- helpers ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("authority", "expected"),
    [
        ("10.1.2.3:8080", ("10.1.2.3", 8080)),
        ("[fd00::1]:80", ("fd00::1", 80)),
        ("127.0.0.1:65535", ("127.0.0.1", 65535)),
    ],
)
def test_parse_authority_accepts_ip_and_port(authority: str, expected: tuple[str, int]) -> None:
    assert parse_authority(authority) == expected


@pytest.mark.parametrize(
    "authority",
    ["reviews:9080", "10.1.2.3", "10.1.2.3:0", "10.1.2.3:70000", "fd00::1:80", "[10.0.0.1]:80"],
)
def test_parse_authority_refuses_the_rest(authority: str) -> None:
    with pytest.raises(ValueError, match="authority"):
        parse_authority(authority)


def test_headers_helpers() -> None:
    assert forwarded_for("10.0.0.7") == "for=10.0.0.7"
    assert forwarded_for("fd00::7") == 'for="[fd00::7]"'
    tp = new_traceparent(bytes(range(24)))
    assert tp == "00-000102030405060708090a0b0c0d0e0f-1011121314151617-00"
    version, trace, span, flags = new_traceparent().split("-")
    assert (version, len(trace), len(span), flags) == ("00", 32, 16, "00")
    h = connect_headers(source_ip="10.0.0.7", baggage="k=v")
    assert h["forwarded"] == "for=10.0.0.7" and h["baggage"] == "k=v" and "traceparent" in h
    assert connect_headers(traceparent="00-a-b-01")["traceparent"] == "00-a-b-01"


def test_settings_are_validated() -> None:
    with pytest.raises(ValueError, match="max_frame_size"):
        HboneSettings(max_frame_size=1000)
    with pytest.raises(ValueError, match="stream_window"):
        HboneSettings(stream_window=0)


# -- a pair of machines -------------------------------------------------------------------


class Pair:
    """A client and a server machine connected back to back."""

    def __init__(
        self,
        client: HboneSettings | None = None,
        server: HboneSettings | None = None,
        chunk: int | None = None,
    ) -> None:
        self.c = ClientConnection(client)
        self.s = ServerConnection(server)
        self.chunk = chunk
        self.c_events: list[Event] = []
        self.s_events: list[Event] = []
        self.c.initiate()
        self.s.initiate()
        self.pump()

    def _feed(self, data: bytes, into: ClientConnection | ServerConnection) -> list[Event]:
        if not self.chunk:
            return into.receive_data(data)
        out: list[Event] = []
        for i in range(0, len(data), self.chunk):
            out += into.receive_data(data[i : i + self.chunk])
        return out

    def pump(self) -> None:
        """Move bytes both ways until nothing is left to send."""
        for _ in range(10_000):
            self.c_events += self.c.take_events()
            self.s_events += self.s.take_events()
            to_s = self.c.data_to_send()
            to_c = self.s.data_to_send()
            if not to_s and not to_c:
                return
            if to_s:
                self.s_events += self._feed(to_s, self.s)
            if to_c:
                self.c_events += self._feed(to_c, self.c)
        raise AssertionError("the machines never went quiet")

    def open(self, authority: str = "10.0.0.1:80", accept: bool = True) -> int:
        sid = self.c.send_connect(authority, {"forwarded": "for=10.0.0.2", "baggage": "a=b"})
        self.pump()
        req = [e for e in self.s_events if isinstance(e, ConnectRequested)][-1]
        assert req.stream_id == sid
        if accept:
            self.s.accept(sid)
            self.pump()
            assert ConnectAccepted(sid, 200, {}) in self.c_events
        return sid

    def take(self) -> tuple[list[Event], list[Event]]:
        c, s = self.c_events, self.s_events
        self.c_events, self.s_events = [], []
        return c, s


def data_of(events: list[Event], sid: int) -> bytes:
    return b"".join(e.data for e in events if isinstance(e, DataReceived) and e.stream_id == sid)


def test_connect_carries_authority_and_headers() -> None:
    p = Pair()
    sid = p.c.send_connect("10.0.0.1:9080", {"Forwarded": "for=10.0.0.2", "traceparent": "t"})
    p.pump()
    (req,) = [e for e in p.s_events if isinstance(e, ConnectRequested)]
    assert req.authority == "10.0.0.1:9080"
    assert req.destination == ("10.0.0.1", 9080)
    assert req.headers == {"forwarded": "for=10.0.0.2", "traceparent": "t"}
    assert not [e for e in p.c_events if isinstance(e, ConnectAccepted)]  # not before 200
    p.s.accept(sid)
    p.pump()
    assert [e for e in p.c_events if isinstance(e, ConnectAccepted)] == [
        ConnectAccepted(sid, 200, {})
    ]


def test_connect_headers_go_as_plain_literals_and_the_peer_reads_them() -> None:
    p = Pair()
    tp = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00"
    sid = p.c.send_connect("10.0.0.1:9080", {"forwarded": "for=10.0.0.2", "traceparent": tp})
    wire = p.c.data_to_send()
    # no Huffman coding: the values are on the wire as they are
    assert b"10.0.0.1:9080" in wire and tp.encode() in wire and b"for=10.0.0.2" in wire
    p.s_events += p.s.receive_data(wire)
    p.pump()
    (req,) = [e for e in p.s_events if isinstance(e, ConnectRequested)]
    assert req.stream_id == sid and req.authority == "10.0.0.1:9080"
    assert req.headers == {"forwarded": "for=10.0.0.2", "traceparent": tp}
    p.s.accept(sid)
    p.pump()
    assert ConnectAccepted(sid, 200, {}) in p.c_events


def test_bytes_both_ways_and_half_close_in_each_direction() -> None:
    p = Pair()
    sid = p.open()
    p.take()
    p.c.send_data(sid, b"hello ")
    p.c.send_data(sid, b"server")
    p.c.end_stream(sid)
    p.pump()
    c_ev, s_ev = p.take()
    assert data_of(s_ev, sid) == b"hello server"
    assert StreamEnded(sid) in s_ev
    assert not [e for e in s_ev + c_ev if isinstance(e, StreamClosed)]  # server may still send
    p.s.send_data(sid, b"bye")
    p.s.end_stream(sid)
    p.pump()
    c_ev, s_ev = p.take()
    assert data_of(c_ev, sid) == b"bye"
    assert c_ev[-2:] == [StreamEnded(sid), StreamClosed(sid, None, False)]
    assert s_ev == [StreamClosed(sid, None, False)]
    assert p.c.open_streams == p.s.open_streams == 0


def test_refusal_carries_status_and_reason_and_resets() -> None:
    p = Pair()
    sid = p.open(accept=False)
    p.take()
    p.s.refuse(sid, 503, "destination 10.0.0.1:80 refused\r\nthe connection")
    p.pump()
    c_ev, s_ev = p.take()
    assert ConnectRefused(sid, 503, "destination 10.0.0.1:80 refused  the connection") in c_ev
    assert StreamClosed(sid, ErrorCodes.NO_ERROR, True) in c_ev
    assert s_ev == [StreamClosed(sid, ErrorCodes.NO_ERROR, False)]


def test_reset_reaches_the_peer() -> None:
    p = Pair()
    sid = p.open()
    p.take()
    p.c.send_data(sid, b"x" * 100)
    p.c.reset_stream(sid)
    p.pump()
    c_ev, s_ev = p.take()
    assert c_ev == [StreamClosed(sid, ErrorCodes.CANCEL, False)]
    assert s_ev[-1] == StreamClosed(sid, ErrorCodes.CANCEL, True)


def test_close_stream_flushes_then_resets_the_other_direction() -> None:
    p = Pair()
    sid = p.open()
    p.take()
    p.c.send_data(sid, b"last words")
    p.c.close_stream(sid)
    p.pump()
    c_ev, s_ev = p.take()
    assert data_of(s_ev, sid) == b"last words"
    assert s_ev[-2:] == [StreamEnded(sid), StreamClosed(sid, ErrorCodes.NO_ERROR, True)]
    assert c_ev == [StreamClosed(sid, ErrorCodes.NO_ERROR, False)]


# -- flow control -------------------------------------------------------------------------


def test_a_reader_that_does_not_acknowledge_stops_its_sender_after_one_window() -> None:
    window = 100_000
    p = Pair(server=HboneSettings(stream_window=window))
    sid = p.open()
    p.take()
    p.c.send_data(sid, os.urandom(1_000_000))
    p.pump()
    _, s_ev = p.take()
    assert len(data_of(s_ev, sid)) == window  # exactly one window, then nothing
    assert p.c.pending(sid) == 1_000_000 - window
    # A second stream on the same connection is not held up by the first one.
    sid2 = p.open()
    p.take()
    p.c.send_data(sid2, b"y" * 50_000)
    p.pump()
    _, s_ev = p.take()
    assert len(data_of(s_ev, sid2)) == 50_000
    # Acknowledging reopens the window and the rest flows.
    got = window
    for _ in range(100):
        p.s.acknowledge(sid, window)
        p.pump()
        _, s_ev = p.take()
        got += len(data_of(s_ev, sid))
        if got == 1_000_000:
            break
    assert got == 1_000_000
    assert p.c.pending(sid) == 0


def test_unconsumed_data_is_bounded_by_the_connection_window() -> None:
    # The connection window comes back only for bytes consumed (or dropped): five streams
    # whose reader acknowledges nothing hold 16 MiB at most, and a sixth stream waits.
    mib = 1024 * 1024
    p = Pair()
    blocked = [p.open() for _ in range(5)]
    for sid in blocked:
        p.c.send_data(sid, bytes(5 * mib))
    p.pump()
    _, s_ev = p.take()
    held = {b: len(data_of(s_ev, b)) for b in blocked}
    assert sum(held.values()) == 16 * mib
    assert all(n <= 4 * mib for n in held.values())
    sid = p.open()
    p.take()
    p.c.send_data(sid, b"z" * 1000)
    p.pump()
    _, s_ev = p.take()
    assert data_of(s_ev, sid) == b""
    # Two streams' bytes consumed (8 MiB; they and the fifth take 6 MiB of it): room again.
    for b in blocked[:2]:
        p.s.acknowledge(b, held[b])
    p.pump()
    _, s_ev = p.take()
    assert data_of(s_ev, sid) == b"z" * 1000


def test_three_paused_streams_do_not_stall_a_fourth() -> None:
    p = Pair()
    blocked = [p.open() for _ in range(3)]
    for sid in blocked:
        p.c.send_data(sid, bytes(5 * 1024 * 1024))
    p.pump()
    sid = p.open()
    p.take()
    p.c.send_data(sid, b"z" * 1000)
    p.pump()
    _, s_ev = p.take()
    assert data_of(s_ev, sid) == b"z" * 1000
    assert all(p.c.pending(b) == 1024 * 1024 for b in blocked)


def test_output_paused_queues_until_resumed() -> None:
    p = Pair()
    sid = p.open()
    p.take()
    p.c.pause_output()
    p.c.send_data(sid, b"q" * 5000)
    assert p.c.pending(sid) == 5000
    p.pump()
    assert data_of(p.s_events, sid) == b""
    p.c.resume_output()
    p.pump()
    assert data_of(p.s_events, sid) == b"q" * 5000


def test_large_writes_are_split_at_the_peers_frame_size() -> None:
    p = Pair(server=HboneSettings(max_frame_size=16384))
    sid = p.open()
    p.take()
    p.c.send_data(sid, bytes(100_000))
    p.pump()
    _, s_ev = p.take()
    sizes = [len(e.data) for e in s_ev if isinstance(e, DataReceived)]
    assert sum(sizes) == 100_000 and max(sizes) <= 16384


def test_a_socket_reads_worth_goes_in_one_data_frame_between_agents() -> None:
    """uvloop reads a socket up to 256 KiB at a time: between two agents each such read
    is one DATA frame (one write to the receiving app, not four)."""
    p = Pair()
    sid = p.open()
    p.take()
    payload = os.urandom(256 * 1024)
    p.c.send_data(sid, payload)
    p.pump()
    _, s_ev = p.take()
    assert [len(e.data) for e in s_ev if isinstance(e, DataReceived)] == [len(payload)]
    assert data_of(s_ev, sid) == payload


def test_bulk_output_is_not_copied_and_a_reader_keeping_its_buffer_gets_it_intact() -> None:
    """``take_output`` hands large DATA payloads on as views of what was written (no
    join), and ``receive_frames`` leaves an incomplete frame in the caller's buffer: the
    way the I/O layer moves bulk data. 1 MiB goes through in reads of odd sizes."""
    p = Pair()
    sid = p.open()
    p.take()
    payload = os.urandom(1 << 20)
    p.c.send_data(sid, payload)
    pieces = p.c.take_output()
    big = [x for x in pieces if len(x) >= 16384]
    assert sum(len(x) for x in big) == len(payload)
    assert all(isinstance(x, memoryview) and x.obj is payload for x in big)  # not copied
    wire = b"".join(pieces)
    assert len(pieces) <= 2 * len(big) + 1  # frame headers joined, one piece per payload
    buf = bytearray()
    got: list[Event] = []
    rng = random.Random(7)
    pos = 0
    while pos < len(wire):
        n = rng.randint(1, 70_000)
        buf += wire[pos : pos + n]
        pos += n
        events, used = p.s.receive_frames(memoryview(buf))
        got += events
        del buf[:used]  # the caller keeps the incomplete frame
        assert len(buf) < 9 + p.s.settings.max_frame_size
    assert not buf
    assert data_of(got, sid) == payload


# -- GOAWAY -------------------------------------------------------------------------------


def test_drain_lets_open_streams_finish_and_refuses_new_ones() -> None:
    p = Pair()
    sid = p.open()
    p.take()
    p.s.drain()
    p.pump()
    c_ev, _ = p.take()
    assert GoAwayReceived(sid, ErrorCodes.NO_ERROR, "") in c_ev
    assert not p.c.can_open_stream()
    p.c.send_data(sid, b"still here")  # the open stream carries on both ways
    p.s.send_data(sid, b"me too")
    p.pump()
    c_ev, s_ev = p.take()
    assert data_of(s_ev, sid) == b"still here"
    assert data_of(c_ev, sid) == b"me too"


def test_goaway_closes_only_streams_above_last_stream_id() -> None:
    p = Pair()
    first = p.open()
    second = p.c.send_connect("10.0.0.1:80", {})  # not yet seen by the server
    p.take()
    p.s.drain()  # last-stream-id = first
    for e in p.c.receive_data(p.s.data_to_send()):
        p.c_events.append(e)
    c_ev, _ = p.take()
    assert StreamClosed(second, ErrorCodes.REFUSED_STREAM, True) in c_ev
    assert p.c.stream_ids() == [first]


# -- peers that are not us ----------------------------------------------------------------


class H2Client:
    """h2's own client, independent of our framing."""

    def __init__(self) -> None:
        self.h2 = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        self.h2.initiate_connection()


def exchange(peer: H2Client, server: ServerConnection) -> tuple[list[h2.events.Event], list[Event]]:
    h2_events: list[h2.events.Event] = []
    ours: list[Event] = []
    for _ in range(100):
        out = peer.h2.data_to_send()
        if out:
            ours += server.receive_data(out)
        back = server.data_to_send()
        if back:
            h2_events += peer.h2.receive_data(back)
        if not out and not back:
            break
    return h2_events, ours


def test_h2_client_speaks_to_our_server_including_padded_data() -> None:
    server = ServerConnection()
    server.initiate()
    peer = H2Client()
    exchange(peer, server)
    peer.h2.send_headers(1, [(":method", "CONNECT"), (":authority", "10.0.0.9:443")])
    _, ours = exchange(peer, server)
    assert [e.authority for e in ours if isinstance(e, ConnectRequested)] == ["10.0.0.9:443"]
    server.accept(1)
    peer.h2.send_data(1, b"padded", pad_length=10)
    peer.h2.send_data(1, b" plain", end_stream=True)
    theirs, ours = exchange(peer, server)
    assert [type(e) for e in theirs if isinstance(e, h2.events.ResponseReceived)]
    assert data_of(ours, 1) == b"padded plain"
    assert StreamEnded(1) in ours
    server.send_data(1, b"x" * 200_000)  # more than h2's default 64 KiB window
    server.end_stream(1)
    got = b""
    for _ in range(50):
        theirs, ours = exchange(peer, server)
        for e in theirs:
            if isinstance(e, h2.events.DataReceived):
                got += e.data
                peer.h2.acknowledge_received_data(e.flow_controlled_length, 1)
        if len(got) == 200_000:
            break
    exchange(peer, server)
    assert got == b"x" * 200_000
    assert server.open_streams == 0


def test_non_connect_gets_405_and_bad_authority_400() -> None:
    server = ServerConnection()
    server.initiate()
    peer = H2Client()
    peer.h2.send_headers(
        1,
        [(":method", "GET"), (":scheme", "https"), (":path", "/"), (":authority", "x")],
        end_stream=True,
    )
    peer.h2.send_headers(3, [(":method", "CONNECT"), (":authority", "reviews:9080")])
    theirs, ours = exchange(peer, server)
    statuses = {
        e.stream_id: dict(e.headers) for e in theirs if isinstance(e, h2.events.ResponseReceived)
    }
    assert statuses[1][b":status"] == b"405" and statuses[1][b"allow"] == b"CONNECT"
    assert statuses[3][b":status"] == b"400"
    assert b"not <ip>:<port>" in statuses[3][REASON_HEADER.encode()]
    assert [(e.stream_id, e.status) for e in ours if isinstance(e, RequestRejected)] == [
        (1, 405),
        (3, 400),
    ]
    assert server.failed is None  # the connection itself is fine


def test_malformed_bytes_fail_the_connection_with_goaway() -> None:
    p = Pair()
    sid = p.open()
    p.take()
    events = p.s.receive_data(b"\x00\x00\x04\x08\x00\x00\x00\x00\x00\x00\x00\x00\x00")  # WU 0
    assert [type(e) for e in events] == [StreamClosed, ConnectionFailed]
    goaway = p.s.data_to_send()
    assert goaway[3] == 0x7  # a GOAWAY frame
    c_events = p.c.receive_data(goaway)
    assert any(isinstance(e, GoAwayReceived) and e.error_code != 0 for e in c_events)
    assert sid not in p.s.stream_ids()


def test_data_on_an_idle_stream_is_a_connection_error() -> None:
    p = Pair()
    events = p.s.receive_data(b"\x00\x00\x01\x00\x00\x00\x00\x00\x07x")
    assert isinstance(events[-1], ConnectionFailed)
    assert "idle stream 7" in events[-1].reason


# -- properties ---------------------------------------------------------------------------


@fuzz(0.2)
@given(
    seed=st.integers(0, 2**32 - 1),
    window=st.sampled_from([1, 7, 1000, 65535, 300_000, 4 * 1024 * 1024]),
    frame=st.sampled_from([16384, 65536]),
    chunk=st.sampled_from([None, 1, 9, 100, 16393]),
    streams=st.integers(1, 4),
)
def test_random_conversations_deliver_every_byte_in_order(
    seed: int, window: int, frame: int, chunk: int | None, streams: int
) -> None:
    """Random writes, half-closes, partial acknowledgements and chunkings: every byte
    arrives once and in order on both sides, the reader never holds more than a window,
    and nothing stalls once the readers catch up."""
    rnd = random.Random(seed)
    cfg = HboneSettings(stream_window=window, max_frame_size=frame)
    p = Pair(client=cfg, server=cfg, chunk=chunk if chunk != 1 or window < 1000 else 9)
    sids = [p.open() for _ in range(streams)]
    p.take()
    sent: dict[tuple[str, int], bytearray] = defaultdict(bytearray)
    got: dict[tuple[str, int], bytearray] = defaultdict(bytearray)
    unacked: dict[tuple[str, int], int] = defaultdict(int)
    ended: set[tuple[str, int]] = set()
    closed: set[tuple[str, int]] = set()
    machines = {"c": p.c, "s": p.s}

    def absorb() -> None:
        c_ev, s_ev = p.take()
        for side, evs in (("c", c_ev), ("s", s_ev)):
            for e in evs:
                if isinstance(e, DataReceived):
                    got[(side, e.stream_id)] += e.data
                    unacked[(side, e.stream_id)] += len(e.data)
                    assert unacked[(side, e.stream_id)] <= window
                elif isinstance(e, StreamEnded):
                    ended.add((side, e.stream_id))
                elif isinstance(e, StreamClosed):
                    assert e.error_code is None, e
                    closed.add((side, e.stream_id))

    for _ in range(rnd.randint(1, 30)):
        side = rnd.choice("cs")
        sid = rnd.choice(sids)
        action = rnd.random()
        m = machines[side]
        if action < 0.5 and (side, sid) not in ended:
            size = rnd.choice([1, 10, 1000, 70_000, 300_000])
            data = rnd.randbytes(min(size, 64 * window))  # tiny windows: one byte per trip
            m.send_data(sid, data)
            sent[(side, sid)] += data
        elif action < 0.6:
            m.end_stream(sid)
            ended.add((side, sid))  # we stop writing; the peer sees it after the data
        else:
            reader = "s" if side == "c" else "c"
            n = unacked[(reader, sid)]
            k = rnd.randint(0, n)
            machines[reader].acknowledge(sid, k)
            unacked[(reader, sid)] -= k
        p.pump()
        absorb()
    # The readers catch up and everyone half-closes: everything arrives, streams close.
    for side in "cs":
        for sid in sids:
            machines[side].end_stream(sid)
    for _ in range(100_000):
        for (side, sid), n in list(unacked.items()):
            if n:
                machines[side].acknowledge(sid, n)
                unacked[(side, sid)] = 0
        p.pump()
        absorb()
        if not p.c.open_streams and not p.s.open_streams:
            break
    for sid in sids:
        assert bytes(got[("s", sid)]) == bytes(sent[("c", sid)])
        assert bytes(got[("c", sid)]) == bytes(sent[("s", sid)])
        assert ("c", sid) in closed and ("s", sid) in closed
    assert p.c.failed is None and p.s.failed is None


@fuzz(2)
@given(garbage=st.binary(max_size=300), chunk=st.integers(1, 64))
def test_arbitrary_bytes_never_raise(garbage: bytes, chunk: int) -> None:
    server = ServerConnection()
    server.initiate()
    preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
    for data in (preface, garbage):
        for i in range(0, len(data), chunk):
            server.receive_data(data[i : i + chunk])
    server.data_to_send()
    client = ClientConnection()
    client.initiate()
    for i in range(0, len(garbage), chunk):
        client.receive_data(garbage[i : i + chunk])
    client.data_to_send()
