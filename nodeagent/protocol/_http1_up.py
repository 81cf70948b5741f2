"""``UpstreamHttp1``: the proxy's client side of the HTTP/1.1 layer, facing the
application (see ``nodeagent.protocol.http1`` for the layer and its rules): one request at
a time written (``_http1_write`` writes it), its response read, the ``HEAD`` / ``204`` /
``304`` / ``CONNECT`` rules the response parser does not know, and whether the connection
may carry another request.

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
    DEFAULT_MAX_HEADER_SIZE,
    HOP_BY_HOP,
    RESPONSE_END,
    RESPONSE_FIELDS,
    BodyChunk,
    Headers,
    Informational,
    LocalProtocolError,
    ProtocolError,
    RawHead,
    ResponseEnd,
    ResponseHead,
    Upgraded,
    UpstreamEvent,
    clean_reason,
    has_token,
    split_tokens,
)
from nodeagent.protocol._http1_read import (
    BODY,
    DONE,
    HEAD,
    IDLE,
    Reader,
    Stop,
    content_length,
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
    forwarded_head,
    last_chunk,
    request_head,
)

_HEAD_FIELDS: Final = RESPONSE_FIELDS | HOP_BY_HOP
"""The fields a response head is checked for: its framing, and whether a proxy forwards
each of its fields unchanged (``Proxy-Connection`` among them: llhttp reads it for
keep-alive, ``message_version``)."""


# Why a callback stopped the response parser.
_STOP_NONE: Final = 0  # it did not: llhttp found an error
_STOP_FAILED: Final = 1  # a ProtocolError is already queued
_STOP_HEAD: Final = 2  # the final head of a HEAD response: the response is complete
_STOP_TUNNEL: Final = 3  # a 2xx to CONNECT: what follows the head is tunnel data
_STOP_EXTRA: Final = 4  # bytes after a complete response


_HTTP11: Final = b"HTTP/1.1 "


def _status_line(data: bytes, reason: int) -> int:
    """The status code of the head that begins ``data`` (a read) when its status line is
    ``HTTP/1.1 <status> <reason>`` as written here, ``reason`` bytes of reason phrase
    (llhttp checked the three digits); 0 if it is another (llhttp also takes ``RTSP/``,
    and a line without a reason phrase or its space)."""
    line = 13 + reason + 2
    if (
        len(data) < line
        or data[:9] != _HTTP11
        or data[12] != 32
        or data[line - 2] != 13
        or data[line - 1] != 10
    ):
        return 0
    return data[9] * 100 + data[10] * 10 + data[11] - 5328  # (ord("0") * 111)


def _raw_head(data: bytes, reason: int, length: int, headers: Headers) -> RawHead | None:
    """The head that begins ``data`` (a read, the head ended in it), whose status line
    ``_status_line`` found, as a ``RawHead``; None if the head is not found (cannot be:
    llhttp read it there)."""
    line = 13 + reason + 2
    end = head_end(data, line, headers)
    if end < 0:
        return None
    return RawHead(data[:end], line, length, "")


def _has_control(reason: str) -> bool:
    """A control character other than tab in a reason phrase (llhttp lets them through)."""
    for c in reason:
        o = ord(c)
        if (o < 32 and o != 9) or o == 127:
            return True
    return False


class UpstreamHttp1(Reader):
    """The proxy's client side of one connection to an application (one request at a
    time; ``reusable`` after ``ResponseEnd`` says whether another may follow).

    Script: ``send_request_head`` + ``send_body``* + ``send_end``; ``receive_data`` ->
    ``Informational``*, ``ResponseHead``, ``BodyChunk``*, ``ResponseEnd``; then
    ``start_next_request`` if ``reusable``.

    Bytes the application sends after a complete response (before the next request) make
    the connection not ``reusable``; no event is made of them.
    """

    __slots__ = (
        "_closed",
        "_failed",
        "_headbuf",
        "_interim",
        "_interims",
        "_method",
        "_parser",
        "_parser_ok",
        "_proposed_upgrade",
        "_reason",
        "_req",
        "_req_close",
        "_req_framing",
        "_req_left",
        "_resp_keep_alive",
        "_reuse_ok",
        "_sink",
        "_stop",
        "_until_eof",
        "_upgraded",
    )

    def __init__(self, *, max_header_size: int = DEFAULT_MAX_HEADER_SIZE) -> None:
        super().__init__(max_header_size)
        self._parser = self._new_parser()
        self._parser_ok = True  # may parse the next response
        self._sink: list[UpstreamEvent] = []
        self._reason = b""
        self._interim = False
        self._until_eof = False
        self._stop = _STOP_NONE
        self._headbuf: bytearray | None = None  # response bytes, kept for HEAD and CONNECT
        self._interims = 0  # 1xx heads in _headbuf
        self._req = NOTHING
        self._req_framing = LENGTH
        self._req_left = 0
        self._method = ""
        self._req_close = False
        self._proposed_upgrade = False
        self._resp_keep_alive = False
        self._reuse_ok = True
        self._failed = False
        self._upgraded = False
        self._closed = False

    def _new_parser(self) -> httptools.HttpResponseParser:
        callbacks = SimpleNamespace(
            on_message_begin=self._on_message_begin,
            on_status=self._on_status,
            on_header=self._on_header,
            on_headers_complete=self._on_headers_complete,
            on_body=self._on_body,
            on_message_complete=self._on_message_complete,
            on_chunk_header=self._on_chunk_header,
            on_chunk_complete=self._on_chunk_complete,
        )
        return httptools.HttpResponseParser(callbacks)

    @property
    def upgraded(self) -> bool:
        return self._upgraded

    @property
    def reusable(self) -> bool:
        """The exchange is complete and both sides allow another request here."""
        return (
            self._req == SENT
            and self._phase == DONE
            and self._reuse_ok
            and self._resp_keep_alive
            and not (self._req_close or self._failed or self._upgraded or self._closed)
        )

    def start_next_request(self) -> None:
        """Reset for the next request (only when ``reusable``)."""
        if not self.reusable:
            raise LocalProtocolError("the connection is not reusable")
        self._req = NOTHING
        self._phase = IDLE
        self._method = ""
        self._proposed_upgrade = False
        self._headbuf = None
        if not self._parser_ok:
            self._parser = self._new_parser()
            self._parser_ok = True

    # -- output ----------------------------------------------------------------------
    def send_request_head(
        self,
        method: str,
        target: str,
        headers: Sequence[tuple[str, str]],
        *,
        body: bool = False,
        raw: RawHead | None = None,
    ) -> bytes:
        """The request head. ``headers`` must include ``Host``. With ``body`` and no
        ``Content-Length``, the body is sent chunked (``Transfer-Encoding`` is added).

        With ``raw`` (a client's head, ``RequestHead.raw``, of a request by ``method``),
        its fields go as they came and ``headers`` are only the fields added after them;
        the body is framed by its ``Content-Length``."""
        if self._req != NOTHING or self._failed or self._closed or self._upgraded:
            raise LocalProtocolError("a request was already sent on this connection")
        if raw is not None:
            wire = forwarded_head(method, target, raw, headers)
            framing, left, close, upgrade = LENGTH, raw.length, False, False
        else:
            wire, framing, left, close, upgrade = request_head(method, target, headers, body)
        self._req = SENDING
        self._req_framing = framing
        self._req_left = left
        self._method = method
        self._req_close = close
        self._proposed_upgrade = upgrade
        if method == "HEAD" or method == "CONNECT":
            self._headbuf = bytearray()
            self._interims = 0
        return wire

    def send_body(self, data: bytes) -> bytes:
        if self._upgraded:
            return data
        if self._req != SENDING:
            raise LocalProtocolError("no request body is being sent")
        if not data:
            return b""
        if self._req_framing == CHUNKED:
            return chunk(data)
        left = self._req_left - len(data)
        if left < 0:
            raise LocalProtocolError("more body than the request allows")
        self._req_left = left
        return data

    def send_end(self, trailers: Sequence[tuple[str, str]] = ()) -> bytes:
        """The end of the request body. Trailers only go out on a chunked body; on any
        other they are dropped."""
        if self._upgraded:
            return b""
        if self._req != SENDING:
            raise LocalProtocolError("no request body is being sent")
        if self._req_framing == LENGTH and self._req_left:
            raise LocalProtocolError(f"{self._req_left} bytes of the body are missing")
        self._req = SENT
        if self._req_framing == CHUNKED:
            return last_chunk(trailers)
        return b""

    # -- input -----------------------------------------------------------------------
    def receive_data(self, data: bytes) -> list[UpstreamEvent]:
        """Feed bytes from the application (``b""`` = EOF)."""
        if self._failed or self._closed:
            return []
        if self._upgraded:
            if data:
                return [Upgraded(data)]
            self._closed = True
            return [CLOSED]
        if not data:
            return self._eof()
        if self._phase == DONE:  # nothing was asked: the connection is out of step
            if data.strip(b"\r\n"):  # empty lines between messages: llhttp skips them too
                self._reuse_ok = False
            return []
        if self._req == NOTHING:
            self._failed = True
            return [ProtocolError(502, "upstream: data before any request")]
        events: list[UpstreamEvent] = []
        self._sink = events
        self._feed(data)
        return events

    def _eof(self) -> list[UpstreamEvent]:
        self._closed = True
        phase = self._phase
        if phase == DONE or self._req == NOTHING:
            return [CLOSED]
        if phase == BODY and self._until_eof:
            self._phase = DONE
            return [RESPONSE_END, CLOSED]
        self._failed = True
        return [ProtocolError(502, "upstream: connection closed before the response ended")]

    def _feed(self, data: bytes) -> None:
        self._note_read(data)
        if self._headbuf is not None:
            self._headbuf += data
        self._head_new = self._chunk_new = False
        self._feed_len = n = len(data)
        interims = self._interims
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade as e:  # after a 101
            offset: int = e.args[0]
            self._parser_ok = False
            self._upgraded = True
            if rest := data[offset:]:
                self._sink.append(Upgraded(rest))
            return
        except httptools.HttpParserError as e:
            self._parser_ok = False
            stop, self._stop = self._stop, _STOP_NONE
            if stop == _STOP_NONE:
                reraise_bug(e)
                if self._phase == DONE:  # llhttp refuses bytes after a `close` response
                    self._reuse_ok = False  # as when they arrive in a later read
                else:
                    self._fail(f"upstream: {e}")
            elif stop == _STOP_HEAD:
                if self._after_head().strip(b"\r\n"):
                    self._reuse_ok = False
            elif stop == _STOP_TUNNEL:
                self._upgraded = True
                if rest := self._after_head():
                    self._sink.append(Upgraded(rest))
            return
        phase = self._phase
        if phase == HEAD:
            if self._head_over(n, self._interims == interims):
                self._fail(f"upstream: response head exceeds {self.max_header_size} bytes")
                self._parser_ok = False
        elif self._chunk_open and self._over_tail(n):
            self._fail(f"upstream: response trailers exceed {self.max_header_size} bytes")
            self._parser_ok = False
        elif phase == IDLE and self._headbuf is not None:
            self._headbuf.clear()  # only whole 1xx heads so far
            self._interims = 0

    def _after_head(self) -> bytes:
        """The bytes behind the final head (llhttp does not say where it stopped): skip
        the 1xx heads and the final head in the bytes kept since the request."""
        buf = self._headbuf or bytearray()
        self._headbuf = None
        pos = 0
        for _ in range(self._interims + 1):
            while pos < len(buf) and buf[pos] in b"\r\n":
                pos += 1
            end = buf.find(b"\r\n\r\n", pos)
            if end < 0:  # cannot happen after a head llhttp accepted
                return b""
            pos = end + 4
        return bytes(buf[pos:])

    def _fail(self, reason: str) -> None:
        self._sink.append(ProtocolError(502, clean_reason(reason)))
        self._failed = True
        self._stop = _STOP_FAILED

    # -- llhttp callbacks --------------------------------------------------------------
    def _on_message_begin(self) -> None:
        if self._phase == DONE:
            self._reuse_ok = False
            self._stop = _STOP_EXTRA
            raise Stop
        self._phase = HEAD
        self._head_new = True
        self._reason = b""
        self._fields = []

    def _on_status(self, status: bytes) -> None:
        self._reason += status

    def _on_headers_complete(self) -> None:
        self._phase = BODY
        headers = tuple(self._fields)
        self._fields = []  # trailers, if any, go here
        data = self._take_read()
        parser = self._parser
        # ``HTTP/1.1 <status> <reason>`` CRLF at the start of the read: read there
        status = _status_line(data, len(self._reason)) if data else 0
        plain_line = status != 0
        if not plain_line:
            status = parser.get_status_code()
        reason = self._reason.decode("latin-1")
        if self._complete_head_over(len(reason) + 15, headers):
            self._fail(f"upstream: response head exceeds {self.max_header_size} bytes")
            raise Stop
        connection = length = coding = None
        hop = False  # another hop-by-hop field
        for k, v in headers:
            if k in _HEAD_FIELDS:
                if k == "content-length":
                    length = v
                elif k == "transfer-encoding":
                    coding = v if coding is None else f"{coding},{v}"
                elif k == "connection":
                    connection = v if connection is None else f"{connection},{v}"
                else:
                    hop = True
        version = "1.1" if plain_line else message_version(parser, connection is None and not hop)
        if version != "1.1" and version != "1.0":
            self._fail(f"upstream: HTTP/{version} is not supported")
            raise Stop
        if status < 100:  # llhttp takes any three digits
            self._fail(f"upstream: invalid status {status:03d}")
            raise Stop
        if reason and _has_control(reason):  # llhttp lets them through
            self._fail("upstream: control character in the reason phrase")
            raise Stop
        if status < 200:
            self._interim = True
            if status != 101:
                self._sink.append(Informational(status, headers))
                return
            if not (self._proposed_upgrade and parser.should_upgrade()):
                self._fail("upstream: 101 without an upgrade to switch to")
                raise Stop
        if coding is not None and split_tokens(coding) != ["chunked"]:
            # llhttp would read such a body until close, but the coding is hop-by-hop:
            # relayed without it, the body would reach the client still encoded.
            self._fail(f"upstream: Transfer-Encoding {coding!r} is not supported")
            raise Stop
        keep_alive = version == "1.1" and (connection is None or not has_token(connection, "close"))
        method = self._method
        raw = None
        if (
            plain_line
            and keep_alive
            and status >= 200
            and connection is None
            and length is not None
            and coding is None
            and not hop
            and method != "HEAD"
            and method != "CONNECT"
        ):
            raw = _raw_head(data, len(self._reason), content_length(length), headers)
        self._sink.append(ResponseHead(status, headers, reason, version, keep_alive, raw))
        if status < 200:  # 101: llhttp stops after this head (HttpParserUpgrade)
            return
        self._resp_keep_alive = keep_alive
        if method == "HEAD":
            self._sink.append(RESPONSE_END)
            self._phase = DONE
            self._stop = _STOP_HEAD
            raise Stop
        if method == "CONNECT" and status < 300:
            self._stop = _STOP_TUNNEL
            raise Stop
        self._headbuf = None
        self._until_eof = status != 204 and status != 304 and length is None and coding is None

    def _on_body(self, body: bytes) -> None:
        self._chunk_open = False
        self._sink.append(BodyChunk(body))

    def _on_message_complete(self) -> None:
        if self._interim:
            self._interim = False
            self._phase = IDLE
            self._interims += 1
            return
        fields = self._fields
        self._sink.append(ResponseEnd(tuple(fields)) if fields else RESPONSE_END)
        self._phase = DONE
