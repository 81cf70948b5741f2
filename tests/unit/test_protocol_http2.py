"""The HTTP/2 proxy machines without sockets, against real ``h2`` peers: an ``h2`` client
connection feeding ``DownstreamHttp2``, an ``h2`` server connection behind
``UpstreamHttp2``, and between them a small bridge standing in for the proxy's I/O layer
(route each stream, forward, acknowledge bytes only once forwarded). Bytes are shuttled
by hand in a loop until nothing moves."""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import h2.config
import h2.connection
import h2.events as h2e
import h2.settings
import pytest
from fuzzing import fuzz
from h2.errors import ErrorCodes
from hyperframe.frame import Frame, GoAwayFrame, RstStreamFrame
from hypothesis import assume, given
from hypothesis import strategies as st

from nodeagent.protocol.http2 import (
    H2C_PREFACE,
    RESPONSE_FLAG_HEADER,
    ConnectionEnded,
    DataSent,
    DownstreamEvent,
    DownstreamHttp2,
    Http2Settings,
    ProtocolError,
    StreamData,
    StreamInformational,
    StreamRejected,
    StreamRequest,
    StreamReset,
    StreamResponse,
    StreamTrailers,
    UpstreamEvent,
    UpstreamHttp2,
    forwardable_h2_headers,
)

MiB = 1024 * 1024
Raw = list[tuple[bytes, bytes]]

# -- peers --------------------------------------------------------------------------------


class Peer(h2.connection.H2Connection):
    """A real h2 endpoint that, unlike stock h2, keeps going after a graceful GOAWAY
    (python-hyper/h2#1181), so the streams it allows can be seen to finish."""

    def _receive_goaway_frame(self, frame: GoAwayFrame) -> tuple[list[Frame], list[h2e.Event]]:
        event = h2e.ConnectionTerminated()
        event.error_code = frame.error_code
        event.last_stream_id = frame.last_stream_id
        event.additional_data = frame.additional_data or None
        return [], [event]


def peer(client: bool, *, strict: bool = True, max_streams: int | None = None) -> Peer:
    """``strict=False``: a client that sends whatever header block it is given."""
    config = h2.config.H2Configuration(
        client_side=client,
        header_encoding=None,
        validate_outbound_headers=strict,
        normalize_outbound_headers=strict,
    )
    conn = Peer(config=config)
    if max_streams is not None:
        conn.local_settings = h2.settings.Settings(
            client=client, initial_values={h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: 2}
        )
    conn.initiate_connection()
    return conn


def request(path: str = "/", method: str = "GET", *extra: tuple[str, str]) -> Raw:
    block = [(b":method", method.encode()), (b":scheme", b"http")]
    block += [(b":authority", b"reviews:9080"), (b":path", path.encode())]
    return block + [(k.encode(), v.encode()) for k, v in extra]


GRPC_REQUEST = request(
    "/reviews.Reviews/Get", "POST", ("content-type", "application/grpc"), ("te", "trailers")
)


def frames(data: bytes) -> list[Frame]:
    out: list[Frame] = []
    view = memoryview(data)
    while view:
        frame, length = Frame.parse_frame_header(view[:9])
        frame.parse_body(view[9 : 9 + length])
        out.append(frame)
        view = view[9 + length :]
    return out


_NOISE = (
    h2e.WindowUpdated,
    h2e.RemoteSettingsChanged,
    h2e.SettingsAcknowledged,
    h2e.PingAckReceived,
    h2e.PriorityUpdated,
)


def relevant(events: list[h2e.Event]) -> list[h2e.Event]:
    """A peer's events minus connection housekeeping (SETTINGS, WINDOW_UPDATE, ...)."""
    return [e for e in events if not isinstance(e, _NOISE)]


def of_stream(events: Iterable[object], stream_id: int) -> list[object]:
    return [e for e in events if getattr(e, "stream_id", None) == stream_id]


def headers_of(ev: h2e.Event) -> dict[bytes, bytes]:
    assert isinstance(ev, h2e.ResponseReceived | h2e.RequestReceived | h2e.TrailersReceived)
    return dict(ev.headers)


# -- one side at a time -------------------------------------------------------------------


class Front:
    """An h2 client talking to a ``DownstreamHttp2``."""

    def __init__(self, cfg: Http2Settings | None = None, *, strict: bool = True) -> None:
        self.client = peer(True, strict=strict)
        self.down = DownstreamHttp2(cfg)
        self.events: list[DownstreamEvent] = []
        self.client_events: list[h2e.Event] = []
        self.exchange()

    def exchange(self) -> None:
        while True:
            a = self.client.data_to_send()
            if a:
                self.events += self.down.receive_data(a)
            b = self.down.data_to_send()
            if b:
                self.client_events += self.client.receive_data(b)
            if not a and not b:
                return

    def take(self) -> list[DownstreamEvent]:
        events, self.events = self.events, []
        return events

    def take_client(self) -> list[h2e.Event]:
        events, self.client_events = self.client_events, []
        return relevant(events)


class Back:
    """An ``UpstreamHttp2`` talking to an h2 server."""

    def __init__(self, cfg: Http2Settings | None = None, *, max_streams: int | None = None):
        self.up = UpstreamHttp2(cfg)
        self.server = peer(False, max_streams=max_streams)
        self.events: list[UpstreamEvent] = []
        self.server_events: list[h2e.Event] = []
        self.exchange()

    def exchange(self, inject: bytes = b"") -> None:
        if inject:
            self.events += self.up.receive_data(inject)
        while True:
            a = self.up.data_to_send()
            if a:
                self.server_events += self.server.receive_data(a)
            b = self.server.data_to_send()
            if b:
                self.events += self.up.receive_data(b)
            if not a and not b:
                return

    def take(self) -> list[UpstreamEvent]:
        events, self.events = self.events, []
        return events

    def take_server(self) -> list[h2e.Event]:
        events, self.server_events = self.server_events, []
        return relevant(events)


# -- both sides, with a bridge ------------------------------------------------------------


@dataclass
class Bridge:
    """What the proxy's I/O layer does with the two machines: route each downstream
    stream to an upstream one, forward everything, and acknowledge bytes on the stream
    they came from only when they were framed on the other side."""

    down: DownstreamHttp2
    up: UpstreamHttp2
    d2u: dict[int, int] = field(default_factory=dict)
    u2d: dict[int, int] = field(default_factory=dict)
    requests: list[StreamRequest] = field(default_factory=list)
    resets: list[StreamReset] = field(default_factory=list)

    def on_down(self, ev: DownstreamEvent) -> None:
        down, up = self.down, self.up
        if isinstance(ev, StreamRequest):
            self.requests.append(ev)
            sid = up.send_request(
                ev.method, ev.scheme, ev.authority, ev.path,
                forwardable_h2_headers(ev.headers), ev.end_stream,
            )  # fmt: skip
            self.d2u[ev.stream_id], self.u2d[sid] = sid, ev.stream_id
        elif isinstance(ev, StreamData):
            sent = up.send_data(self.d2u[ev.stream_id], ev.data, ev.end_stream)
            down.ack_data(ev.stream_id, sent)
        elif isinstance(ev, StreamTrailers):
            up.send_trailers(self.d2u[ev.stream_id], ev.headers)
        elif isinstance(ev, DataSent):
            up.ack_data(self.d2u[ev.stream_id], ev.size)
        elif isinstance(ev, StreamReset):
            self.resets.append(ev)
            if ev.stream_id in self.d2u:
                up.reset_stream(self.d2u[ev.stream_id])

    def on_up(self, ev: UpstreamEvent) -> None:
        down, up = self.down, self.up
        if isinstance(ev, StreamResponse):
            headers = forwardable_h2_headers(ev.headers)
            down.send_response_head(self.u2d[ev.stream_id], ev.status, headers, ev.end_stream)
        elif isinstance(ev, StreamInformational):
            down.send_informational(self.u2d[ev.stream_id], ev.status, ev.headers)
        elif isinstance(ev, StreamData):
            sent = down.send_data(self.u2d[ev.stream_id], ev.data, ev.end_stream)
            up.ack_data(ev.stream_id, sent)
        elif isinstance(ev, StreamTrailers):
            down.send_trailers(self.u2d[ev.stream_id], ev.headers)
        elif isinstance(ev, DataSent):
            down.ack_data(self.u2d[ev.stream_id], ev.size)
        elif isinstance(ev, StreamReset):
            self.resets.append(ev)
            d = self.u2d.get(ev.stream_id)
            if d is not None:  # answers 502, or resets if the response had started
                down.send_error(d, 502, "upstream reset", "UR")


class Mesh:
    """client <-> DownstreamHttp2 <-> Bridge <-> UpstreamHttp2 <-> server, in memory."""

    def __init__(self, down_cfg: Http2Settings | None = None, up_cfg: Http2Settings | None = None):
        self.client = peer(True)
        self.server = peer(False)
        self.down = DownstreamHttp2(down_cfg)
        self.up = UpstreamHttp2(up_cfg)
        self.bridge = Bridge(self.down, self.up)
        self.client_events: list[h2e.Event] = []
        self.server_events: list[h2e.Event] = []
        self.max_queued_down = 0
        """The most bytes the proxy held queued on one stream towards the client."""
        self.max_queued_up = 0
        """... and towards the server."""
        self.pump()

    def pump(self, tick: Callable[[], object] | None = None, rounds: int = 100_000) -> None:
        for _ in range(rounds):
            moved = False
            if tick is not None:
                tick()
            if a := self.client.data_to_send():
                for ev in self.down.receive_data(a):
                    self.bridge.on_down(ev)
            if b := self.up.data_to_send():
                self.server_events += self.server.receive_data(b)
            if c := self.server.data_to_send():
                for uev in self.up.receive_data(c):
                    self.bridge.on_up(uev)
            if d := self.down.data_to_send():
                self.client_events += self.client.receive_data(d)
            for sid in self.bridge.d2u:
                self.max_queued_down = max(self.max_queued_down, self.down.buffered(sid))
            for sid in self.bridge.u2d:
                self.max_queued_up = max(self.max_queued_up, self.up.buffered(sid))
            moved = bool(a or b or c or d)
            if not moved and (tick is None or not tick()):
                return
        raise AssertionError("the loop did not settle")

    def take_client(self) -> list[h2e.Event]:
        events, self.client_events = self.client_events, []
        return relevant(events)

    def take_server(self) -> list[h2e.Event]:
        events, self.server_events = self.server_events, []
        return relevant(events)


# -- helpers ------------------------------------------------------------------------------


def test_forwardable_h2_headers_drops_connection_specific_fields() -> None:
    fields = [
        ("Connection", "keep-alive, X-Hop"),
        ("keep-alive", "timeout=5"),
        ("proxy-connection", "keep-alive"),
        ("transfer-encoding", "chunked"),
        ("upgrade", "h2c"),
        ("http2-settings", "AAMAAABkAAQAoAAAAAIAAAAA"),
        ("x-hop", "1"),
        ("Content-Type", "application/grpc"),
        ("te", "trailers, deflate"),
        ("x-b3-traceid", "abc"),
    ]
    assert forwardable_h2_headers(fields) == (
        ("content-type", "application/grpc"),
        ("te", "trailers"),
        ("x-b3-traceid", "abc"),
    )
    assert forwardable_h2_headers([("te", "gzip")]) == ()
    assert fields[0] == ("Connection", "keep-alive, X-Hop")  # pure


def test_forwardable_h2_headers_returns_a_clean_tuple_unchanged() -> None:
    clean = (("content-type", "application/grpc"), ("te", "trailers"), ("grpc-timeout", "1S"))
    assert forwardable_h2_headers(clean) is clean
    assert forwardable_h2_headers(list(clean)) == clean


def test_settings_are_validated() -> None:
    with pytest.raises(ValueError, match="stream_window"):
        Http2Settings(stream_window=0)
    with pytest.raises(ValueError, match="max_frame_size"):
        Http2Settings(max_frame_size=1000)
    with pytest.raises(ValueError, match="connection_window"):
        Http2Settings(connection_window=1000)


# -- gRPC through the proxy ---------------------------------------------------------------


def test_unary_grpc_with_trailers() -> None:
    m = Mesh()
    m.client.send_headers(1, [*GRPC_REQUEST, (b"x-note", b"caf\xe9")])
    m.client.send_data(1, b"\x00\x00\x00\x00\x03abc", end_stream=True)
    m.pump()
    req, data, ended = m.take_server()
    assert isinstance(req, h2e.RequestReceived)
    sid = req.stream_id
    got = headers_of(req)
    assert got[b":path"] == b"/reviews.Reviews/Get" and got[b":authority"] == b"reviews:9080"
    assert got[b"te"] == b"trailers" and got[b"x-note"] == b"caf\xe9"  # bytes kept as sent
    assert isinstance(data, h2e.DataReceived) and data.data == b"\x00\x00\x00\x00\x03abc"
    assert isinstance(ended, h2e.StreamEnded)
    m.server.send_headers(sid, [(b":status", b"200"), (b"content-type", b"application/grpc")])
    m.server.send_data(sid, b"\x00\x00\x00\x00\x02ok")
    m.server.send_headers(sid, [(b"grpc-status", b"0"), (b"grpc-message", b"")], end_stream=True)
    m.pump()
    resp, body, trailers, end = m.take_client()
    assert isinstance(resp, h2e.ResponseReceived) and headers_of(resp)[b":status"] == b"200"
    assert isinstance(body, h2e.DataReceived) and body.data == b"\x00\x00\x00\x00\x02ok"
    assert isinstance(trailers, h2e.TrailersReceived)
    assert headers_of(trailers) == {b"grpc-status": b"0", b"grpc-message": b""}
    assert isinstance(end, h2e.StreamEnded)
    assert m.down.open_streams == 0 and m.up.open_streams == 0


def test_trailers_only_response_passes_through() -> None:
    m = Mesh()
    m.client.send_headers(1, GRPC_REQUEST)
    m.client.send_data(1, b"\x00\x00\x00\x00\x00", end_stream=True)
    m.pump()
    sid = m.take_server()[0].stream_id  # type: ignore[attr-defined]
    m.server.send_headers(
        sid,
        [
            (b":status", b"200"),
            (b"content-type", b"application/grpc"),
            (b"grpc-status", b"5"),
            (b"grpc-message", b"no such review"),
        ],
        end_stream=True,
    )
    m.pump()
    resp, end = m.take_client()
    assert isinstance(resp, h2e.ResponseReceived) and resp.stream_ended is not None
    assert headers_of(resp)[b"grpc-status"] == b"5"
    assert isinstance(end, h2e.StreamEnded)
    assert m.down.open_streams == 0 and m.up.open_streams == 0


def test_bidirectional_streaming_interleaves() -> None:
    m = Mesh()
    m.client.send_headers(1, GRPC_REQUEST)
    m.pump()
    (req,) = m.take_server()
    sid = req.stream_id  # type: ignore[attr-defined]
    m.server.send_headers(sid, [(b":status", b"200"), (b"content-type", b"application/grpc")])
    m.pump()
    assert isinstance(m.take_client()[0], h2e.ResponseReceived)
    for i in range(5):
        ping = f"ping {i}".encode()
        m.client.send_data(1, ping)
        m.pump()
        (got,) = m.take_server()  # arrives while the request is still open
        assert isinstance(got, h2e.DataReceived) and got.data == ping
        m.server.acknowledge_received_data(got.flow_controlled_length, sid)
        m.server.send_data(sid, b"pong " + ping)
        m.pump()
        (back,) = m.take_client()  # arrives while the response is still open
        assert isinstance(back, h2e.DataReceived) and back.data == b"pong " + ping
        m.client.acknowledge_received_data(back.flow_controlled_length, 1)
    m.client.end_stream(1)
    m.pump()
    assert isinstance(m.take_server()[-1], h2e.StreamEnded)
    m.server.send_data(sid, b"last")  # the server may go on after the client is done
    m.server.send_headers(sid, [(b"grpc-status", b"0")], end_stream=True)
    m.pump()
    kinds = [type(e) for e in m.take_client()]
    assert kinds == [h2e.DataReceived, h2e.TrailersReceived, h2e.StreamEnded]
    assert m.down.open_streams == 0 and m.up.open_streams == 0


# -- large bodies and flow control ----------------------------------------------------------


@dataclass
class Sender:
    """Sends ``body`` on a stream of a real h2 connection as its windows allow."""

    conn: Peer
    stream_id: int
    body: bytes
    pos: int = 0

    def step(self) -> bool:
        moved = False
        while self.pos < len(self.body):
            window = self.conn.local_flow_control_window(self.stream_id)
            size = min(window, self.conn.max_outbound_frame_size, len(self.body) - self.pos)
            if size <= 0:
                return moved
            end = self.pos + size == len(self.body)
            self.conn.send_data(self.stream_id, self.body[self.pos : self.pos + size], end)
            self.pos += size
            moved = True
        return moved


@dataclass
class Reader:
    """Reads a stream of a real h2 connection, acknowledging at most ``rate`` bytes per
    round (a slow reader when small)."""

    conn: Peer
    rate: int
    digest: hashlib._Hash = field(default_factory=hashlib.sha256)
    received: int = 0
    unacked: dict[int, int] = field(default_factory=dict)
    ended: bool = False

    def feed(self, events: list[h2e.Event]) -> None:
        for ev in events:
            if isinstance(ev, h2e.DataReceived):
                self.digest.update(ev.data)
                self.received += len(ev.data)
                sid = ev.stream_id
                self.unacked[sid] = self.unacked.get(sid, 0) + ev.flow_controlled_length
            elif isinstance(ev, h2e.StreamEnded):
                self.ended = True

    def step(self) -> bool:
        budget = self.rate
        moved = False
        for sid, n in list(self.unacked.items()):
            take = min(n, budget)
            if take:
                self.conn.acknowledge_received_data(take, sid)
                self.unacked[sid] -= take
                budget -= take
                moved = True
        return moved


@pytest.mark.parametrize(
    ("down_cfg", "up_cfg", "client_rate", "server_rate"),
    [
        pytest.param(None, None, 1 << 30, 1 << 30, id="default-windows"),
        pytest.param(
            Http2Settings(stream_window=48 * 1024, connection_window=65535),
            Http2Settings(stream_window=40 * 1024, connection_window=65535),
            1 << 30,
            1 << 30,
            id="small-windows",
        ),
        pytest.param(
            Http2Settings(stream_window=256 * 1024),
            Http2Settings(stream_window=128 * 1024),
            16 * 1024,
            24 * 1024,
            id="slow-readers",
        ),
    ],
)
def test_ten_mib_each_way_with_flow_control(
    down_cfg: Http2Settings | None, up_cfg: Http2Settings | None, client_rate: int, server_rate: int
) -> None:
    rnd = random.Random(7)
    upload, download = rnd.randbytes(10 * MiB), rnd.randbytes(10 * MiB)
    m = Mesh(down_cfg, up_cfg)
    m.client.send_headers(1, request("/blob", "PUT", ("content-type", "application/octet-stream")))
    client_out = Sender(m.client, 1, upload)
    client_in = Reader(m.client, client_rate)
    server_in = Reader(m.server, server_rate)
    server_out: list[Sender] = []
    server_blocked = False

    def tick() -> bool:
        nonlocal server_blocked
        server_events = m.take_server()
        for ev in server_events:
            if isinstance(ev, h2e.RequestReceived):  # answer at once: both ways at a time
                m.server.send_headers(ev.stream_id, [(b":status", b"200")])
                server_out.append(Sender(m.server, ev.stream_id, download))
        server_in.feed(server_events)
        client_in.feed(m.take_client())
        moved = client_out.step() | client_in.step() | server_in.step()
        for s in server_out:
            moved |= s.step()
            if s.pos < len(download) and m.server.local_flow_control_window(s.stream_id) <= 0:
                server_blocked = True
        return moved

    m.pump(tick)
    assert client_in.ended and server_in.ended
    assert client_in.received == server_in.received == 10 * MiB
    assert server_in.digest.hexdigest() == hashlib.sha256(upload).hexdigest()
    assert client_in.digest.hexdigest() == hashlib.sha256(download).hexdigest()
    # What the proxy queues on a stream never exceeds the window of the stream feeding it.
    assert m.max_queued_down <= (up_cfg or Http2Settings()).stream_window
    assert m.max_queued_up <= (down_cfg or Http2Settings()).stream_window
    assert m.max_queued_down + m.max_queued_up > 0  # ... and it did queue
    # The slow client held the server back through the proxy (no unbounded buffering).
    assert server_blocked
    assert m.down.open_streams == 0 and m.up.open_streams == 0


def test_many_concurrent_streams_share_small_windows() -> None:
    rnd = random.Random(11)
    small = Http2Settings(stream_window=20_000, connection_window=65535)
    m = Mesh(small, small)
    uploads = {1 + 2 * i: rnd.randbytes(rnd.randrange(0, 300_000)) for i in range(24)}
    senders = []
    for sid, body in uploads.items():
        m.client.send_headers(sid, request(f"/{sid}", "POST"), end_stream=not body)
        if body:
            senders.append(Sender(m.client, sid, body))
    got_up: dict[int, bytearray] = {}
    got_down: dict[int, bytearray] = {}
    answers: dict[int, bytes] = {}
    server_out: list[Sender] = []
    client_in = Reader(m.client, 50_000)
    server_in = Reader(m.server, 70_000)

    def tick() -> bool:
        server_events = m.take_server()
        for ev in server_events:
            if isinstance(ev, h2e.RequestReceived):
                answers[ev.stream_id] = rnd.randbytes(rnd.randrange(1, 200_000))
                m.server.send_headers(ev.stream_id, [(b":status", b"200")])
                server_out.append(Sender(m.server, ev.stream_id, answers[ev.stream_id]))
            elif isinstance(ev, h2e.DataReceived):
                got_up.setdefault(ev.stream_id, bytearray()).extend(ev.data)
        server_in.feed(server_events)
        client_events = m.take_client()
        for ev in client_events:
            if isinstance(ev, h2e.DataReceived):
                got_down.setdefault(ev.stream_id, bytearray()).extend(ev.data)
        client_in.feed(client_events)
        moved = client_in.step() | server_in.step()
        for snd in [*senders, *server_out]:
            moved |= snd.step()
        return moved

    m.pump(tick)
    routed = {r.path: r.stream_id for r in m.bridge.requests}
    for sid, body in uploads.items():
        upstream = m.bridge.d2u[routed[f"/{sid}"]]
        assert bytes(got_up.get(upstream, b"")) == body
        assert bytes(got_down[sid]) == answers[upstream]
    assert m.max_queued_down <= small.stream_window and m.max_queued_up <= small.stream_window
    assert m.down.open_streams == 0 and m.up.open_streams == 0


def test_unacknowledged_stream_stops_its_sender_but_not_other_streams() -> None:
    f = Front(Http2Settings(stream_window=64 * 1024, connection_window=96 * 1024))
    f.client.increment_flow_control_window(1 << 20)
    f.client.send_headers(1, request("/a", "POST"))
    f.client.send_headers(3, request("/b", "POST"))
    stalled = Sender(f.client, 1, bytes(200 * 1024))
    stalled.step()
    f.exchange()
    assert sum(len(e.data) for e in f.take() if isinstance(e, StreamData)) == 64 * 1024
    assert f.client.local_flow_control_window(1) == 0  # no ack: the stream's window is shut
    other = Sender(f.client, 3, bytes(150 * 1024))  # more than the connection window
    for _ in range(20):
        other.step()
        f.exchange()
        for ev in f.take():
            if isinstance(ev, StreamData) and ev.stream_id == 3:
                f.down.ack_data(3, len(ev.data))
    assert other.pos == 150 * 1024  # the connection window came back without stream 1
    f.down.ack_data(1, 64 * 1024)
    f.exchange()
    stalled.step()
    f.exchange()
    assert sum(len(e.data) for e in f.take() if isinstance(e, StreamData)) == 64 * 1024


def test_send_data_queues_beyond_the_window_and_reports_what_goes_later() -> None:
    f = Front()
    f.client.send_headers(1, request("/big"), end_stream=True)
    f.exchange()
    (req,) = f.take()
    assert isinstance(req, StreamRequest) and req.end_stream
    f.down.send_response_head(1, 200, [("content-type", "application/octet-stream")])
    body = bytes(range(256)) * 1024  # 256 KiB against the client's 64 KiB default window
    sent = f.down.send_data(1, body, end_stream=True)
    assert sent == 65535 and f.down.buffered(1) == len(body) - 65535
    received = bytearray()
    reported = sent
    for _ in range(50):
        f.exchange()
        for ev in f.take_client():
            if isinstance(ev, h2e.DataReceived):
                received += ev.data
                f.client.acknowledge_received_data(ev.flow_controlled_length, 1)
        f.exchange()
        reported += sum(e.size for e in f.take() if isinstance(e, DataSent))
        if len(received) == len(body):
            break
    assert bytes(received) == body and reported == len(body)
    assert f.down.buffered(1) == 0 and f.down.open_streams == 0


# -- malformed requests ---------------------------------------------------------------------

MALFORMED: dict[str, Raw] = {
    "uppercase name": request("/", "GET", ("X-Upper", "1")),
    "connection header": request("/", "GET", ("connection", "keep-alive")),
    "te gzip": request("/", "GET", ("te", "gzip")),
    "missing path": [(b":method", b"GET"), (b":scheme", b"http"), (b":authority", b"a")],
    "empty path": request("", "GET"),
    "relative path": request("index.html", "GET"),
    "unknown pseudo": [*request("/"), (b":protocol", b"websocket")],
    "pseudo after regular": [(b":method", b"GET"), (b"x-a", b"1"), (b":path", b"/")],
    "duplicate method": [(b":method", b"GET"), *request("/")],
    "response pseudo": [*request("/")[:4], (b":status", b"200")],
    "newline in value": request("/", "GET", ("x-a", "1\r\nx-b: 2")),
    "space around value": request("/", "GET", ("x-a", " 1")),
    "bad content-length": request("/", "GET", ("content-length", "abc")),
    "authority and host differ": request("/", "GET", ("host", "ratings:9080")),
    "userinfo": [(b":method", b"GET"), (b":scheme", b"http"), (b":authority", b"u@a"),
                 (b":path", b"/")],
}  # fmt: skip


@pytest.mark.parametrize("block", MALFORMED.values(), ids=MALFORMED.keys())
def test_malformed_request_gets_400_and_only_its_stream_is_reset(block: Raw) -> None:
    f = Front(strict=False)
    f.client.send_headers(1, GRPC_REQUEST)  # a call in progress on another stream
    f.client.send_data(1, b"part one")
    f.client.send_headers(3, block, end_stream=True)
    f.exchange()
    events = f.take()
    assert [type(e) for e in of_stream(events, 1)] == [StreamRequest, StreamData]
    (rejected,) = of_stream(events, 3)
    assert isinstance(rejected, StreamRejected) and rejected.status == 400
    resp, body, end = of_stream(f.take_client(), 3)
    assert headers_of(resp)[b":status"] == b"400"  # type: ignore[arg-type]
    assert headers_of(resp)[RESPONSE_FLAG_HEADER.encode()] == b"DPE"  # type: ignore[arg-type]
    assert isinstance(body, h2e.DataReceived) and isinstance(end, h2e.StreamEnded)
    # stream 1 is unaffected and completes
    f.client.send_data(1, b"part two", end_stream=True)
    f.exchange()
    assert [e.data for e in f.take() if isinstance(e, StreamData)] == [b"part two"]
    f.down.send_response_head(1, 200, [("content-type", "application/grpc")])
    f.down.send_trailers(1, [("grpc-status", "0")])
    f.exchange()
    kinds = [type(e) for e in f.take_client()]
    assert kinds == [h2e.ResponseReceived, h2e.TrailersReceived, h2e.StreamEnded]
    assert f.down.open_streams == 0 and not f.down.closed


def test_body_not_matching_content_length_resets_the_stream_with_400() -> None:
    f = Front()
    f.client.send_headers(1, request("/upload", "POST", ("content-length", "10")))
    f.client.send_data(1, b"hello", end_stream=True)
    f.exchange()
    req, reset = f.take()
    assert isinstance(req, StreamRequest)
    assert isinstance(reset, StreamReset) and reset.error_code == ErrorCodes.PROTOCOL_ERROR
    assert reset.reason and not reset.refused
    resp = f.take_client()[0]
    assert headers_of(resp)[b":status"] == b"400"
    f.client.send_headers(3, request("/next"), end_stream=True)  # the connection lives on
    f.exchange()
    assert isinstance(f.take()[0], StreamRequest)


def test_malformed_trailers_after_the_request_was_routed() -> None:
    f = Front(strict=False)
    f.client.send_headers(1, GRPC_REQUEST)
    f.client.send_headers(1, [(b":path", b"/x")], end_stream=True)  # pseudo in trailers
    f.exchange()
    req, reset = f.take()
    assert isinstance(req, StreamRequest)
    assert isinstance(reset, StreamReset) and reset.error_code == ErrorCodes.PROTOCOL_ERROR
    assert headers_of(f.take_client()[0])[b":status"] == b"400"
    f.down.send_response_head(1, 200, [])  # the I/O layer was told: nothing goes out now
    assert f.down.data_to_send() == b""


def test_oversize_header_list_gets_431_on_that_stream_only() -> None:
    f = Front(Http2Settings(max_header_list_size=16 * 1024), strict=False)
    f.client.send_headers(1, GRPC_REQUEST)
    f.client.send_headers(3, request("/", "GET", ("cookie", "c" * 20_000)), end_stream=True)
    f.exchange()
    events = f.take()
    assert isinstance(of_stream(events, 1)[0], StreamRequest)
    (rejected,) = of_stream(events, 3)
    assert isinstance(rejected, StreamRejected) and rejected.status == 431
    resp = of_stream(f.take_client(), 3)[0]
    assert headers_of(resp)[b":status"] == b"431"  # type: ignore[arg-type]
    # stream 1 goes on, and later requests (HPACK state intact) too
    f.client.send_headers(5, request("/after", "GET", ("x-a", "1")), end_stream=True)
    f.client.end_stream(1)
    f.exchange()
    events = f.take()
    assert [type(e) for e in events] == [StreamRequest, StreamData]
    assert isinstance(events[0], StreamRequest) and events[0].path == "/after"
    assert events[0].headers == (("x-a", "1"),)


def test_an_hpack_bomb_fails_the_connection() -> None:
    f = Front(Http2Settings(max_header_list_size=4 * 1024), strict=False)
    f.client.send_headers(1, request("/", "GET", ("x-big", "b" * 20_000)), end_stream=True)
    f.exchange()
    (err,) = f.take()
    assert isinstance(err, ProtocolError) and f.down.closed
    assert any(isinstance(e, h2e.ConnectionTerminated) for e in f.take_client())


def test_split_cookies_are_joined() -> None:
    f = Front(strict=False)
    block = request("/", "GET", ("x-a", "1"), ("cookie", "a=1"), ("x-b", "2"), ("cookie", "b=2"))
    f.client.send_headers(1, block, end_stream=True)
    f.exchange()
    (req,) = f.take()
    assert isinstance(req, StreamRequest)
    assert req.headers == (("x-a", "1"), ("cookie", "a=1; b=2"), ("x-b", "2"))


def test_authority_falls_back_to_host() -> None:
    f = Front(strict=False)
    block = [(b":method", b"GET"), (b":scheme", b"http"), (b":path", b"/"), (b"host", b"a:1")]
    f.client.send_headers(1, block, end_stream=True)
    f.exchange()
    (req,) = f.take()
    assert isinstance(req, StreamRequest) and req.authority == "a:1"


@fuzz()
@given(
    name=st.binary(min_size=0, max_size=12),
    value=st.binary(min_size=0, max_size=12),
)
def test_any_header_field_is_a_stream_matter(name: bytes, value: bytes) -> None:
    # h2's client itself refuses to send a 1xx ``:status`` with END_STREAM: not our input
    assume(name != b":status")
    f = Front(strict=False)
    f.client.send_headers(1, [*request("/"), (name, value)], end_stream=True)
    f.client.send_headers(3, request("/next"), end_stream=True)
    f.exchange()
    events = f.take()
    first = of_stream(events, 1)
    assert len(first) == 1 and isinstance(first[0], StreamRequest | StreamRejected)
    assert [type(e) for e in of_stream(events, 3)] == [StreamRequest]
    assert not f.down.closed


@fuzz(0.5)
@given(cuts=st.lists(st.integers(min_value=0, max_value=2000), max_size=12))
def test_events_do_not_depend_on_how_bytes_arrive(cuts: list[int]) -> None:
    client = peer(True)
    client.send_headers(1, GRPC_REQUEST)
    client.send_data(1, b"a" * 300)
    client.send_headers(3, request("/b", "GET", ("x-a", "1")), end_stream=True)
    client.send_data(1, b"b" * 300)
    client.send_headers(1, [(b"x-checksum", b"1")], end_stream=True)
    wire = client.data_to_send()
    whole = DownstreamHttp2().receive_data(wire)
    down = DownstreamHttp2()
    pieces: list[DownstreamEvent] = []
    last = 0
    for cut in [*sorted({min(c, len(wire)) for c in cuts}), len(wire)]:
        pieces += down.receive_data(wire[last:cut]) if cut > last else []
        last = cut
    assert pieces == whole
    assert [type(e) for e in whole] == [
        StreamRequest, StreamData, StreamRequest, StreamData, StreamTrailers,
    ]  # fmt: skip


def test_a_request_reset_in_the_same_read_is_dropped() -> None:
    f = Front()
    f.client.send_headers(1, request("/a", "POST"))
    f.client.send_data(1, b"x" * 100)
    f.client.reset_stream(1, ErrorCodes.CANCEL)
    f.client.send_headers(3, request("/b"), end_stream=True)
    f.client.send_headers(5, request("/c"), end_stream=True)
    f.exchange()
    events = f.take()
    assert [type(e) for e in of_stream(events, 1)] in ([], [StreamRequest, StreamReset])
    assert [type(e) for e in events if getattr(e, "stream_id", 0) > 1] == [StreamRequest] * 2
    assert f.down.open_streams == 2


# -- connection-level ----------------------------------------------------------------------


def test_not_http2_is_a_protocol_error_with_goaway() -> None:
    down = DownstreamHttp2()
    down.data_to_send()
    (err,) = down.receive_data(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
    assert isinstance(err, ProtocolError) and down.closed
    assert any(isinstance(fr, GoAwayFrame) for fr in frames(down.data_to_send()))
    assert down.receive_data(H2C_PREFACE) == []


def test_eof_ends_the_connection() -> None:
    f = Front()
    (ev,) = f.down.receive_data(b"")
    assert ev == ConnectionEnded(None, None, "connection closed by the peer")
    assert f.down.closed


def test_downstream_goaway_lets_open_streams_finish_and_refuses_new_ones() -> None:
    f = Front()
    f.client.send_headers(1, request("/slow"), end_stream=True)
    f.exchange()
    f.take()
    f.down.goaway()
    f.exchange()
    (term,) = f.take_client()
    assert isinstance(term, h2e.ConnectionTerminated) and term.last_stream_id == 1
    f.client.send_headers(3, request("/late"), end_stream=True)  # raced the GOAWAY
    f.exchange()
    assert f.take() == []
    (refused,) = f.take_client()
    assert isinstance(refused, h2e.StreamReset) and refused.error_code == ErrorCodes.REFUSED_STREAM
    f.down.send_response_head(1, 200, [])
    f.down.send_data(1, b"done", end_stream=True)
    f.exchange()
    assert [type(e) for e in f.take_client()] == [
        h2e.ResponseReceived, h2e.DataReceived, h2e.StreamEnded,
    ]  # fmt: skip
    assert f.down.open_streams == 0


def test_final_goaway_closes_the_connection() -> None:
    f = Front()
    f.client.send_headers(1, request("/"), end_stream=True)
    f.exchange()
    f.take()
    f.down.goaway(ErrorCodes.ENHANCE_YOUR_CALM, "too many resets")
    assert f.down.closed and f.down.open_streams == 0
    (goaway,) = frames(f.down.data_to_send())
    assert isinstance(goaway, GoAwayFrame) and goaway.last_stream_id == 1
    assert goaway.error_code == ErrorCodes.ENHANCE_YOUR_CALM
    assert goaway.additional_data == b"too many resets"
    assert f.down.receive_data(b"more") == []


def test_client_goaway_is_reported() -> None:
    f = Front()
    f.client.close_connection(ErrorCodes.NO_ERROR, additional_data=b"bye")
    f.exchange()
    assert f.take() == [ConnectionEnded(0, 0, "bye")]


# -- send_error -----------------------------------------------------------------------------


def test_send_error_is_a_complete_response_for_a_real_client() -> None:
    f = Front()
    f.client.send_headers(1, request("/nowhere"), end_stream=True)
    f.exchange()
    f.take()
    assert f.down.send_error(1, 404, "no VirtualService route\nmatches", "NR")
    f.exchange()
    resp, body, end = f.take_client()
    got = headers_of(resp)
    assert got[b":status"] == b"404" and got[RESPONSE_FLAG_HEADER.encode()] == b"NR"
    assert got[b"content-type"] == b"text/plain; charset=utf-8"
    assert isinstance(body, h2e.DataReceived)
    assert body.data == b"no VirtualService route matches\n"
    assert got[b"content-length"] == str(len(body.data)).encode()
    assert isinstance(end, h2e.StreamEnded) and f.down.open_streams == 0


def test_send_error_while_the_client_still_sends_stops_it_with_no_error() -> None:
    f = Front()
    f.client.send_headers(1, request("/upload", "POST"))
    f.client.send_data(1, b"x" * 1000)
    f.exchange()
    f.take()
    assert f.down.send_error(1, 503, "no healthy upstream", "UH")
    out = f.down.data_to_send()
    assert isinstance(frames(out)[-1], RstStreamFrame)
    events = f.client.receive_data(out)
    assert [type(e) for e in events] == [
        h2e.ResponseReceived, h2e.DataReceived, h2e.StreamEnded, h2e.StreamReset,
    ]  # fmt: skip
    assert events[-1].error_code == ErrorCodes.NO_ERROR  # type: ignore[attr-defined]
    assert f.down.open_streams == 0


def test_send_error_body_waits_for_the_window_and_reports_nothing() -> None:
    f = Front()
    f.client.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 8})
    f.client.send_headers(1, request("/"), end_stream=True)
    f.exchange()
    f.take()
    assert f.down.send_error(1, 503, "upstream connect error", "UF")
    f.exchange()
    resp, first = f.take_client()
    assert headers_of(resp)[b":status"] == b"503"
    assert isinstance(first, h2e.DataReceived) and first.data == b"upstream"
    assert f.down.buffered(1) == len(b" connect error\n")
    f.client.acknowledge_received_data(8, 1)
    f.client.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 65535})
    f.exchange()
    rest = b"".join(e.data for e in f.take_client() if isinstance(e, h2e.DataReceived))
    assert rest == b" connect error\n"
    assert f.take() == []  # no DataSent: those bytes were never the caller's
    assert f.down.open_streams == 0


def test_send_error_to_a_head_request_has_no_body() -> None:
    f = Front()
    f.client.send_headers(1, request("/", "HEAD"), end_stream=True)
    f.exchange()
    f.take()
    assert f.down.send_error(1, 404, "not found", "NR")
    f.exchange()
    resp, _end = f.take_client()
    assert isinstance(resp, h2e.ResponseReceived) and resp.stream_ended is not None


def test_send_error_after_the_response_started_resets_the_stream() -> None:
    f = Front()
    f.client.send_headers(1, request("/"), end_stream=True)
    f.exchange()
    f.take()
    f.down.send_response_head(1, 200, [])
    f.down.send_data(1, b"partial")
    assert not f.down.send_error(1, 502, "upstream reset", "UR")
    f.exchange()
    kinds = [type(e) for e in f.take_client()]
    assert kinds == [h2e.ResponseReceived, h2e.DataReceived, h2e.StreamReset]


# -- upstream -------------------------------------------------------------------------------


def test_refused_stream_is_distinguishable_from_other_resets() -> None:
    b = Back()
    s1 = b.up.send_request("POST", "http", "reviews:9080", "/a", [("te", "trailers")])
    s3 = b.up.send_request("GET", "http", "reviews:9080", "/b", [], end_stream=True)
    b.exchange()
    b.server.reset_stream(s1, ErrorCodes.REFUSED_STREAM)
    b.server.reset_stream(s3, ErrorCodes.CANCEL)
    b.exchange()
    r1, r3 = b.take()
    assert r1 == StreamReset(s1, ErrorCodes.REFUSED_STREAM) and r1.refused
    assert r3 == StreamReset(s3, ErrorCodes.CANCEL) and not r3.refused
    assert b.up.open_streams == 0


def test_goaway_refuses_unprocessed_streams_and_lets_the_others_finish() -> None:
    b = Back()
    first = b.up.send_request("GET", "http", "a", "/1", [], end_stream=True)
    second = b.up.send_request("GET", "http", "a", "/2", [], end_stream=True)
    b.exchange()
    goaway = GoAwayFrame(0)
    goaway.last_stream_id = first
    goaway.error_code = ErrorCodes.NO_ERROR
    goaway.additional_data = b"draining"
    b.exchange(goaway.serialize())
    refused, ended = b.take()
    assert isinstance(refused, StreamReset) and refused.stream_id == second and refused.refused
    assert ended == ConnectionEnded(first, ErrorCodes.NO_ERROR, "draining")
    assert not b.up.can_open_stream()
    with pytest.raises(RuntimeError):
        b.up.send_request("GET", "http", "a", "/3", [])
    b.server.send_headers(first, [(b":status", b"204")], end_stream=True)
    b.exchange()
    assert b.take() == [StreamResponse(first, 204, (), True)]
    assert b.up.open_streams == 0


def test_upstream_goaway_is_graceful() -> None:
    b = Back()
    sid = b.up.send_request("GET", "http", "a", "/", [], end_stream=True)
    b.up.goaway()
    b.exchange()
    assert any(isinstance(e, h2e.ConnectionTerminated) for e in b.take_server())
    assert not b.up.can_open_stream()
    b.server.send_headers(sid, [(b":status", b"200")], end_stream=True)
    b.exchange()
    assert b.take() == [StreamResponse(sid, 200, (), True)]


def test_stream_limit_of_the_server_is_respected() -> None:
    b = Back(max_streams=2)
    assert b.up.max_concurrent_streams == 2
    s1 = b.up.send_request("GET", "http", "a", "/", [])
    b.up.send_request("GET", "http", "a", "/", [])
    assert not b.up.can_open_stream()
    b.up.reset_stream(s1)
    assert b.up.can_open_stream()


def test_informational_responses_are_reported_and_forwarded() -> None:
    m = Mesh()
    m.client.send_headers(1, request("/upload", "POST", ("expect", "100-continue")))
    m.pump()
    sid = m.take_server()[0].stream_id  # type: ignore[attr-defined]
    m.server.send_headers(sid, [(b":status", b"100")])
    m.server.send_headers(sid, [(b":status", b"201")], end_stream=True)
    m.pump()
    interim, final, _end = m.take_client()
    assert isinstance(interim, h2e.InformationalResponseReceived)
    assert isinstance(final, h2e.ResponseReceived)
    assert headers_of(final)[b":status"] == b"201"


@pytest.mark.parametrize(
    "block",
    [
        [(b":status", b"20")],
        [(b":status", b"101")],
        [(b":status", b"200"), (b":path", b"/")],
        [(b":status", b"200"), (b"connection", b"close")],
        [(b":status", b"200"), (b"X-Upper", b"1")],
    ],
    ids=["short status", "101", "request pseudo", "connection header", "uppercase"],
)
def test_malformed_response_resets_its_stream_only(block: Raw) -> None:
    b = Back()
    b.server.config.validate_outbound_headers = False
    b.server.config.normalize_outbound_headers = False
    bad = b.up.send_request("GET", "http", "a", "/bad", [], end_stream=True)
    good = b.up.send_request("GET", "http", "a", "/good", [], end_stream=True)
    b.exchange()
    b.server.send_headers(bad, block)
    b.server.send_headers(good, [(b":status", b"200")], end_stream=True)
    b.exchange()
    reset, ok = b.take()
    assert isinstance(reset, StreamReset) and reset.stream_id == bad
    assert reset.error_code == ErrorCodes.PROTOCOL_ERROR and "malformed response" in reset.reason
    assert ok == StreamResponse(good, 200, (), True)
    assert not b.up.closed


def test_upstream_acks_only_what_was_forwarded() -> None:
    b = Back(Http2Settings(stream_window=32 * 1024))
    sid = b.up.send_request("GET", "http", "a", "/", [], end_stream=True)
    b.exchange()
    b.server.send_headers(sid, [(b":status", b"200")])
    body = Sender(b.server, sid, bytes(100 * 1024))
    body.step()
    b.exchange()
    got = sum(len(e.data) for e in b.take() if isinstance(e, StreamData))
    assert got == 32 * 1024 and b.server.local_flow_control_window(sid) == 0
    b.up.ack_data(sid, 8 * 1024)  # the stream's threshold (a quarter of the window)
    b.exchange()
    body.step()
    b.exchange()
    assert sum(len(e.data) for e in b.take() if isinstance(e, StreamData)) == 8 * 1024
