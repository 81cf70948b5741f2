"""``DownstreamHttp1``: the proxy's server side of the HTTP/1.1 layer, facing the client
(see ``nodeagent.protocol.http1`` for the layer and its rules): requests read, pipelined
ones held back, ``Expect: 100-continue``, the ``Upgrade``/``CONNECT`` switch to a raw
passthrough, and the state of the response being written (``_http1_write`` writes it).

Rule: no I/O here; bytes in, events out, commands return the bytes to write.
"""

from __future__ import annotations

from collections.abc import Sequence
from types import SimpleNamespace
from typing import Final

# httptools >= 0.7 ships type hints (used then); 0.6.x has none, hence the ignore, which
# is unused, and allowed to be, with a typed version.
import httptools  # type: ignore[import-untyped, unused-ignore]

from nodeagent.protocol._http1_common import (
    CLOSED,
    CLOSED_CUT,
    DEFAULT_MAX_HEADER_SIZE,
    DEFAULT_MAX_HEADERS,
    HOP_BY_HOP,
    REQUEST_END,
    RESPONSE_FLAG_HEADER,
    BodyChunk,
    ConnectionClosed,
    DownstreamEvent,
    Headers,
    LocalProtocolError,
    ProtocolError,
    RawHead,
    RequestEnd,
    RequestHead,
    Upgraded,
    clean_reason,
    has_token,
    split_tokens,
)
from nodeagent.protocol._http1_read import (
    BODY,
    HEAD,
    IDLE,
    Reader,
    Stop,
    content_length,
    field,
    head_end,
    message_version,
    reraise_bug,
)
from nodeagent.protocol._http1_write import (
    CHUNKED,
    LENGTH,
    NOTHING,
    SENDING,
    SENT,
    chunk,
    forwarded_response,
    interim_head,
    last_chunk,
    response_head,
)

_METHODS: Final = {
    m.encode(): m for m in ("GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS")
}

INVALID_METHOD: Final = "invalid method: methods are upper-case tokens such as GET"
"""The 400 reason for a request line llhttp refused at its method (an unknown or
lower-case one: methods are case-sensitive, RFC 9110 §9.1). It does not name the method:
llhttp stops at the first byte that cannot start a known one, so how much of the token
was seen depends on how the client's bytes were split into reads."""


# Parser modes: what happens to the next bytes.
_PARSING: Final = 0  # they go to llhttp
_COUNTED: Final = 1  # the Content-Length body of an Upgrade/CONNECT request
_RAW: Final = 2  # llhttp stopped at a protocol switch: they wait for the decision
_DEAD: Final = 3  # an error or EOF: nothing more is read

# What follows an Upgrade/CONNECT head (llhttp stops right after it, even with a body).
_NO_BODY: Final = 0
_COUNTED_BODY: Final = 1
_CHUNKED_BODY: Final = 2
_CHUNKED_HEAD: Final = b"PUT / HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\n"
"""Primes a fresh parser to read the chunked body of a request whose head the first
parser already consumed (the Upgrade offer of such a request is dropped)."""

_REQUEST_FIELDS: Final = HOP_BY_HOP | {"host", "content-length", "expect"}
"""The fields a request head is checked for: its framing, the switch and ``Expect`` it
asks for, and whether a proxy forwards each of its fields unchanged."""


_HTTP11_END: Final = b" HTTP/1.1\r\n"


def _raw_head(
    data: bytes, line: int, length: str | None, target: str, headers: Headers
) -> RawHead | None:
    """The head that begins ``data`` (a read, the head ended in it), whose request line,
    ``line`` bytes, is ``method target HTTP/1.1``, as a ``RawHead``; None if the head is
    not found (cannot be: llhttp read it there)."""
    end = head_end(data, line, headers)
    if end < 0:
        return None
    return RawHead(data[:end], line, content_length(length) if length is not None else 0, target)


def _http11_line(data: bytes, start: int) -> bool:
    """The request line that begins ``data`` is ``start`` bytes up to `` HTTP/1.1`` and its
    CRLF (method, one space, target): not if that line has more spaces (llhttp lets them
    through) or another protocol."""
    return data[start : start + len(_HTTP11_END)] == _HTTP11_END


class RequestReader(Reader):
    """Client bytes parsed into the events of each request, queued per request: the
    reading half of ``DownstreamHttp1``, which hands the queues out one request at a time.

    ``_backlog`` holds one list per request, the last one (``_sink``) being filled by the
    parser. llhttp stops right after an ``Upgrade``/``CONNECT`` head: the body of such a
    request is read here (counted, or by a parser primed for a chunked body), then what
    follows is held raw (``_raw``) until the response decides whether the switch happens.
    """

    __slots__ = (
        "_backlog",
        "_body_left",
        "_completed",
        "_mode",
        "_parser",
        "_raw",
        "_raw_eof",
        "_sink",
        "_switch_body",
        "_synthetic",
        "_url",
        "max_headers",
    )

    def __init__(self, max_header_size: int, max_headers: int) -> None:
        super().__init__(max_header_size)
        self.max_headers = max_headers
        self._parser = self._new_parser()
        self._mode = _PARSING
        self._url = b""
        self._sink: list[DownstreamEvent] = []
        self._backlog: list[list[DownstreamEvent]] = [self._sink]
        self._completed = 0  # requests the parser finished
        self._switch_body = _NO_BODY
        self._body_left = 0
        self._synthetic = False
        self._raw = bytearray()
        self._raw_eof = False

    def _new_parser(self) -> httptools.HttpRequestParser:
        callbacks = SimpleNamespace(
            on_message_begin=self._on_message_begin,
            on_url=self._on_url,
            on_header=self._on_header,
            on_headers_complete=self._on_headers_complete,
            on_body=self._on_body,
            on_message_complete=self._on_message_complete,
            on_chunk_header=self._on_chunk_header,
            on_chunk_complete=self._on_chunk_complete,
        )
        return httptools.HttpRequestParser(callbacks)

    # -- parsing ---------------------------------------------------------------------
    def _input(self, data: bytes) -> None:
        mode = self._mode
        if mode == _PARSING:
            if data:
                self._feed(data)
            else:
                self._sink.append(CLOSED if self._phase == IDLE else CLOSED_CUT)
                self._mode = _DEAD
        elif mode == _COUNTED:
            if data:
                self._counted(data)
            else:
                self._sink.append(CLOSED_CUT)
                self._mode = _DEAD
        elif mode == _RAW:
            if data:
                self._raw += data
            else:
                self._raw_eof = True

    def _feed(self, data: bytes) -> None:
        self._note_read(data)
        self._head_new = self._chunk_new = False
        self._feed_len = n = len(data)
        completed = self._completed
        offset = -1
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade as e:
            offset = e.args[0]
        except httptools.HttpParserError as e:
            reraise_bug(e)
            if self._mode == _PARSING:  # not stopped by a callback that already said why
                why = str(e) or "malformed request"
                if "method" in why:  # llhttp's "Invalid method encountered" and kin
                    why = INVALID_METHOD
                self._fail(400, why)
            return
        if offset >= 0:
            # Out of the handler: an error parsing what follows must not have the
            # HttpParserUpgrade as its context (``reraise_bug`` would take it for a bug).
            self._switch_stop(data[offset:])
            return
        if self._phase == HEAD:  # a head is still incomplete: charge this read to it
            if self._head_over(n, self._completed == completed):
                self._fail(431, f"request head exceeds {self.max_header_size} bytes")
        elif self._chunk_open and self._over_tail(n):
            self._fail(431, f"request trailers exceed {self.max_header_size} bytes")

    def _fail(self, status: int, reason: str) -> None:
        """The request is refused with ``status``: the connection reads nothing more."""
        self._sink.append(ProtocolError(status, clean_reason(reason)))
        self._mode = _DEAD

    def _switch_stop(self, rest: bytes) -> None:
        """llhttp stopped right after an Upgrade/CONNECT head: read its body, if any, then
        hold what follows raw until the response decides."""
        body, self._switch_body = self._switch_body, _NO_BODY
        if body == _COUNTED_BODY:
            self._mode = _COUNTED
            if rest:
                self._counted(rest)
        elif body == _CHUNKED_BODY:
            self._parser = self._new_parser()
            self._synthetic = True
            self._parser.feed_data(_CHUNKED_HEAD)
            if rest:
                self._feed(rest)
        else:
            self._mode = _RAW
            self._raw = bytearray(rest)

    def _counted(self, data: bytes) -> None:
        left = self._body_left
        if len(data) < left:
            self._body_left = left - len(data)
            self._sink.append(BodyChunk(data))
            return
        if left:
            self._sink.append(BodyChunk(data[:left]))
        self._body_left = 0
        self._end_request(())
        self._mode = _RAW
        self._raw = bytearray(data[left:])

    def _end_request(self, trailers: Headers) -> None:
        self._sink.append(RequestEnd(trailers) if trailers else REQUEST_END)
        self._sink = []
        self._backlog.append(self._sink)
        self._completed += 1
        self._phase = IDLE

    def _resume(self) -> None:
        """Parse what followed a head whose switch was refused: HTTP after all."""
        raw, eof = bytes(self._raw), self._raw_eof
        self._raw = bytearray()
        self._raw_eof = False
        self._parser = self._new_parser()
        self._mode = _PARSING
        self._phase = IDLE
        if raw:
            self._input(raw)
        if eof:
            self._input(b"")

    # -- llhttp callbacks --------------------------------------------------------------
    def _on_header(self, name: bytes, value: bytes) -> None:
        fields = self._fields
        if len(fields) >= self.max_headers:  # each field costs CPU all along the path
            what = "header" if self._phase == HEAD else "trailer"
            self._fail(431, f"request has more than {self.max_headers} {what} fields")
            raise Stop
        fields.append(field(name, value))

    def _on_message_begin(self) -> None:
        self._phase = HEAD
        self._head_new = True
        self._url = b""
        self._fields = []

    def _on_url(self, url: bytes) -> None:
        self._url += url

    def _on_headers_complete(self) -> None:
        self._phase = BODY
        headers = tuple(self._fields)
        self._fields = []  # trailers, if any, go here
        data = self._take_read()
        if self._synthetic:
            self._synthetic = False
            return
        parser = self._parser
        url = self._url
        if len(data) > 4 and data[0] == 71 and data[1] == 69 and data[2] == 84 and data[3] == 32:
            method = "GET"  # the read begins with this head: "GET " without asking llhttp
        else:
            raw_method = parser.get_method()
            if raw_method == b"GET":  # (a comparison: a fresh bytes' hash costs some 400)
                method = "GET"
            else:
                method = _METHODS.get(raw_method) or raw_method.decode("ascii")
        # ``method target HTTP/1.1`` CRLF at the start of the read: the version is read there
        start = len(method) + len(url) + 1
        plain_line = len(data) > 0 and _http11_line(data, start)
        if self._complete_head_over(start + 11, headers):
            self._fail(431, f"request head exceeds {self.max_header_size} bytes")
            raise Stop
        connection = expect = upgrade = length = coding = None
        hosts = 0
        hop = False  # another hop-by-hop field
        for k, v in headers:
            if k in _REQUEST_FIELDS:
                if k == "host":
                    hosts += 1
                elif k == "content-length":
                    length = v
                elif k == "transfer-encoding":
                    coding = v if coding is None else f"{coding},{v}"
                elif k == "connection":
                    connection = v if connection is None else f"{connection},{v}"
                elif k == "upgrade":
                    hop = True  # (``upgrade`` is reset below when llhttp sees no switch)
                    if upgrade is None:
                        upgrade = v
                elif k == "expect":
                    expect = v if expect is None else f"{expect},{v}"
                else:  # (Proxy-Connection among them: llhttp reads it for keep-alive)
                    hop = True
        version = "1.1" if plain_line else message_version(parser, connection is None and not hop)
        if version != "1.1" and version != "1.0":
            self._fail(505, f"HTTP/{version} is not supported")
            raise Stop
        if hosts != 1 and (hosts or version == "1.1"):  # RFC 9112 §3.2
            self._fail(400, "no Host header" if not hosts else "more than one Host header")
            raise Stop
        chunked = coding is not None
        if chunked and split_tokens(coding or "") != ["chunked"]:
            self._fail(501, f"Transfer-Encoding {coding!r} is not supported")
            raise Stop
        has_body = chunked or (length is not None and content_length(length) > 0)
        # llhttp stops after this head; without an Upgrade field, for CONNECT only
        if (upgrade is not None or method == "CONNECT") and parser.should_upgrade():
            if method == "CONNECT":
                upgrade = None
                if chunked:
                    self._fail(400, "CONNECT with a chunked body")
                    raise Stop
            elif chunked:
                upgrade = None  # the body must be parsed: the switch cannot happen
            if chunked:
                self._switch_body = _CHUNKED_BODY
            elif has_body:
                self._switch_body = _COUNTED_BODY
                self._body_left = int(length or 0)
        else:
            upgrade = None
        http11 = version == "1.1"
        target = url.decode("latin-1")
        raw = None
        if (
            plain_line
            and hosts == 1
            and connection is None
            and coding is None
            and expect is None
            and not hop
        ):
            raw = _raw_head(data, start + len(_HTTP11_END), length, target, headers)
        self._sink.append(
            RequestHead(  # positional: measurably cheaper for a frozen dataclass
                method,
                target,
                headers,
                version,
                http11 and (connection is None or not has_token(connection, "close")),
                http11 and expect is not None and has_token(expect, "100-continue"),
                upgrade,
                has_body,
                raw,
            )
        )

    def _on_body(self, body: bytes) -> None:
        self._chunk_open = False
        self._sink.append(BodyChunk(body))

    def _on_message_complete(self) -> None:
        if self._switch_body != _NO_BODY:  # llhttp skipped the body of a switching request
            return
        fields = self._fields
        self._end_request(tuple(fields) if fields else ())


class DownstreamHttp1(RequestReader):
    """The proxy's server side of one client connection.

    Script of an exchange: ``receive_data`` -> ``RequestHead``, ``BodyChunk``*,
    ``RequestEnd``; the caller writes ``send_response_head`` + ``send_body``* +
    ``send_end``; then, if ``keep_alive`` is still True, ``start_next_request()`` returns
    the events of the next request already buffered (pipelining) and reading goes on.

    Inside: events are queued per message (``_backlog``: one list per request, the last
    one being filled by the parser); only the first list is ever handed out, and the
    next one only after ``start_next_request``.
    """

    __slots__ = (
        "_closed",
        "_cur",
        "_expect",
        "_failed",
        "_pending",
        "_request_done",
        "_resp",
        "_resp_close",
        "_resp_framing",
        "_resp_left",
        "_upgraded",
    )

    def __init__(
        self,
        *,
        max_header_size: int = DEFAULT_MAX_HEADER_SIZE,
        max_headers: int = DEFAULT_MAX_HEADERS,
    ) -> None:
        super().__init__(max_header_size, max_headers)
        self._cur: RequestHead | None = None
        self._request_done = False
        self._expect = False
        self._resp = NOTHING
        self._resp_framing = LENGTH
        self._resp_left = 0
        self._resp_close = False
        self._failed = False
        self._closed = False
        self._upgraded = False
        self._pending: list[DownstreamEvent] = []

    # -- state -----------------------------------------------------------------------
    @property
    def upgraded(self) -> bool:
        """A protocol switch happened: all input now comes out as ``Upgraded``."""
        return self._upgraded

    @property
    def keep_alive(self) -> bool:
        """Another request may follow the current one on this connection."""
        cur = self._cur
        return not (
            self._failed
            or self._closed
            or self._upgraded
            or self._resp_close
            or (cur is not None and not cur.keep_alive)
        )

    @property
    def awaiting_response(self) -> bool:
        """The current request has been read completely: stop reading until the response
        is done and ``start_next_request`` is called. Bytes fed meanwhile (a pipelined
        request) are parsed and queued here without a bound, so the I/O layer pauses its
        reads."""
        return self._request_done and not self._upgraded

    @property
    def response_started(self) -> bool:
        """A final response head (or a ``101``) has been sent for the current request."""
        return self._resp != NOTHING

    # -- input -----------------------------------------------------------------------
    def receive_data(self, data: bytes) -> list[DownstreamEvent]:
        """Feed bytes from the client (``b""`` = EOF); returns what they completed."""
        if self._failed or self._closed:
            return []
        if self._upgraded:
            if data:
                return [Upgraded(data)]
            self._closed = True
            return [CLOSED]
        if self._mode == _PARSING and data:
            self._feed(data)
        else:
            self._input(data)
        return self._deliver()

    def take_events(self) -> list[DownstreamEvent]:
        """Events made ready by a command rather than by input: after a ``101``, the bytes
        the client sent behind its upgrade request (as ``Upgraded``)."""
        events, self._pending = self._pending, []
        return events

    def start_next_request(self) -> list[DownstreamEvent]:
        """After a complete exchange on a keep-alive connection: reset for the next
        request and return the events of any bytes already received (pipelined)."""
        if not (self._request_done and self._resp == SENT and self.keep_alive):
            raise LocalProtocolError("no complete exchange on a keep-alive connection")
        self._request_done = False
        self._resp = NOTHING
        self._cur = None
        self._expect = False
        if self._mode == _RAW and len(self._backlog) == 1:
            self._resume()  # the request just answered offered a switch that was refused
        return self._deliver()

    def _deliver(self) -> list[DownstreamEvent]:
        """The events the caller may see now: the rest of the current request; nothing of
        a later one before ``start_next_request``, except a clean EOF with nothing
        pending."""
        backlog = self._backlog
        if self._request_done:
            events: list[DownstreamEvent] = []
        else:
            events = backlog[0]
            if len(backlog) > 1:  # complete: it ends with RequestEnd
                del backlog[0]
                self._request_done = True
            elif events:
                self._sink = backlog[0] = []
                last = events[-1]
                if isinstance(last, ProtocolError):
                    self._failed = True
                elif isinstance(last, ConnectionClosed):
                    self._closed = True
            else:
                return []
            self._expect = False  # whatever follows a head: the client did not wait
            first = events[0]
            if isinstance(first, RequestHead):
                self._cur = first
                self._expect = first.expect_continue and len(events) == 1
            if not self._request_done:
                return events
        sink = backlog[0]
        if len(backlog) == 1 and len(sink) == 1 and sink[0] is CLOSED:
            self._sink = backlog[0] = []
            self._closed = True
            events.append(CLOSED)
        return events

    # -- output ----------------------------------------------------------------------
    def send_continue(self) -> bytes:
        """``100 Continue`` for a client that sent ``Expect: 100-continue``."""
        if not self._expect or self._resp != NOTHING:
            return b""
        self._expect = False
        return b"HTTP/1.1 100 \r\n\r\n"

    def send_response_head(
        self,
        status: int,
        headers: Sequence[tuple[str, str]],
        reason: str = "",
        *,
        raw: RawHead | None = None,
    ) -> bytes:
        """A response head (use ``forwardable_headers`` on an upstream head first).

        Without ``Content-Length`` the body is chunked (HTTP/1.1) or delimited by close
        (HTTP/1.0). ``Connection: close`` is added when the connection ends after this
        response. ``101`` (or 2xx to ``CONNECT``) switches to passthrough; then call
        ``take_events`` for the client bytes that followed the request.

        With ``raw`` (an upstream's final head, ``ResponseHead.raw``, whose ``status`` and
        ``reason`` these are), its start line and fields go as they came and ``headers``
        are only the fields added after them.
        """
        if self._upgraded or self._resp != NOTHING:
            raise LocalProtocolError("a response was already sent for this request")
        cur = self._cur
        if cur is None and not self._failed:
            raise LocalProtocolError("no request to respond to")
        if not 100 <= status <= 999:
            raise LocalProtocolError(f"invalid status {status}")
        method = cur.method if cur is not None else ""
        switch = status == 101 or (method == "CONNECT" and 200 <= status < 300)
        if switch and not (
            self._mode == _RAW
            and self._request_done
            and len(self._backlog) == 1
            and (status != 101 or (cur is not None and cur.upgrade is not None))
        ):
            raise LocalProtocolError(f"{status} without a complete request to switch")
        if status < 200:
            wire = interim_head(status, reason, headers)
            self._expect = False
            if switch:
                self._switch()
            return wire
        if raw is not None:
            if switch:
                raise LocalProtocolError(f"{status} switches: its head is written here")
            close = self._failed or cur is None or not cur.keep_alive
            wire = forwarded_response(raw, headers, close)
            framing = LENGTH
            left = 0 if status == 204 or status == 304 or method == "HEAD" else raw.length
        else:
            wire, framing, left, close = response_head(
                status,
                reason,
                headers,
                method,
                cur is not None and cur.http_version == "1.1",
                self._failed or cur is None or not cur.keep_alive,
                switch,
            )
        self._expect = False
        self._resp_close = close
        self._resp_framing = framing
        self._resp_left = left
        self._resp = SENDING
        if switch:
            self._switch()
        return wire

    def _switch(self) -> None:
        self._upgraded = True
        self._resp = SENT
        if self._raw:
            self._pending.append(Upgraded(bytes(self._raw)))
            self._raw = bytearray()
        if self._raw_eof:
            self._closed = True
            self._pending.append(CLOSED)

    def send_body(self, data: bytes) -> bytes:
        """A piece of the response body (raw bytes once upgraded)."""
        if self._upgraded:
            return data
        if self._resp != SENDING:
            raise LocalProtocolError("no response body is being sent")
        if not data:
            return b""
        framing = self._resp_framing
        if framing == CHUNKED:
            return chunk(data)
        if framing == LENGTH:
            left = self._resp_left - len(data)
            if left < 0:
                raise LocalProtocolError("more body than the response allows")
            self._resp_left = left
        return data

    def send_end(self, trailers: Sequence[tuple[str, str]] = ()) -> bytes:
        """The end of the response body. Trailers only go out on a chunked body; on any
        other they are dropped."""
        if self._upgraded:
            return b""
        if self._resp != SENDING:
            raise LocalProtocolError("no response body is being sent")
        framing = self._resp_framing
        if framing == LENGTH and self._resp_left:
            raise LocalProtocolError(f"{self._resp_left} bytes of the body are missing")
        self._resp = SENT
        if framing == CHUNKED:
            return last_chunk(trailers)
        return b""

    def send_error(
        self, status: int, body: str, flag: str, extra: Sequence[tuple[str, str]] = ()
    ) -> bytes:
        """A complete response made here: ``status``, a short ``text/plain`` body, the
        ``x-nodeagent-response-flag: <flag>`` header and ``extra`` headers (lowercase
        names, e.g. ``retry-after``); ``Connection: close`` is added after
        a protocol error (then close the connection once the bytes are written).

        If the response had already started, nothing can be said any more: returns
        ``b""`` and ``keep_alive`` becomes False (close the connection).
        """
        if self.response_started or self._upgraded:
            self._failed = True
            return b""
        payload = (clean_reason(body) + "\n").encode("ascii")
        headers = [
            ("content-type", "text/plain; charset=utf-8"),
            ("content-length", str(len(payload))),
            (RESPONSE_FLAG_HEADER, clean_reason(flag)),
            *extra,
        ]
        if self._failed or (self._cur is not None and not self._request_done):
            # The request body was not (or could not be) read: this connection is done.
            headers.append(("connection", "close"))
            self._failed = True
        try:
            wire = self.send_response_head(status, headers)
            if self._cur is None or self._cur.method != "HEAD":
                wire += self.send_body(payload)
            return wire + self.send_end()
        except LocalProtocolError:
            self._failed = True
            return b""
