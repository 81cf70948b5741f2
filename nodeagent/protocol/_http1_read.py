"""What both HTTP/1.1 machines do alike with llhttp (through ``httptools``): the phases of
a message being read, the parser callbacks for header fields and chunk framing, and the
limits on the parts llhttp would buffer in Python (a head, and the trailers: bytes are
counted per read while one is incomplete, so a never-ending one is cut after the read that
crosses ``max_header_size``).

Rule: no I/O here; ``Reader`` is the base of ``DownstreamHttp1`` and ``UpstreamHttp1`` and
holds only the parsing state they share, never what a message means.
"""

from __future__ import annotations

from typing import Final

# httptools >= 0.7 ships type hints (used then); 0.6.x has none, hence the ignore, which
# is unused, and allowed to be, with a typed version.
import httptools  # type: ignore[import-untyped, unused-ignore]

from nodeagent.protocol._http1_common import DEFAULT_MAX_HEADER_SIZE, NAMES_MAX, Headers

# Message phases.
IDLE: Final = 0  # between messages
HEAD: Final = 1  # a head began
BODY: Final = 2  # the head is complete
DONE: Final = 3  # upstream: the response is complete

FIELD_NAMES: Final[dict[bytes, str]] = {}
"""Incoming field names (llhttp checked they are tokens) decoded and lower-cased: a memo
bounded by ``NAMES_MAX`` (``Final``: compiled code reads it from a C static, not the
module's dictionary)."""


def field_name(name: bytes) -> str:
    low = name.decode("latin-1").lower()
    if len(FIELD_NAMES) < NAMES_MAX:
        FIELD_NAMES[name] = low
    return low


_RECENT_NAMES: Final[list[tuple[bytes, str]]] = [(b"", "")] * 256
"""The names last met, each in a slot chosen by its length and three of its bytes, with
its decoded form: a name read again (a request's or a response's usual fields) is found
by one comparison. A fresh ``bytes`` has no hash yet: ``FIELD_NAMES`` costs some 400
instructions a name, hashing it (it stays behind this, for names that share a slot)."""


def _slot(name: bytes) -> int:
    n = len(name)
    return (n + name[0] * 4 + name[n >> 1] * 7 + name[n - 1] * 2) & 255 if n else 0


def field(name: bytes, value: bytes) -> tuple[str, str]:
    """A field as llhttp gave it, decoded: the name lower-cased, the value without the
    trailing whitespace llhttp keeps.

    Runs for every field: ``bytes.rstrip`` is a generic method call in compiled code
    (some hundreds of instructions), while most values end in neither space nor tab."""
    i = _slot(name)
    seen, low = _RECENT_NAMES[i]
    if seen != name:
        got = FIELD_NAMES.get(name)
        low = got if got is not None else field_name(name)
        _RECENT_NAMES[i] = (name, low)
    end = len(value) - 1
    if end >= 0 and (value[end] == 32 or value[end] == 9):
        value = value.rstrip(b" \t")
    return low, value.decode("latin-1")


def head_end(data: bytes, line: int, headers: Headers) -> int:
    """Where the field lines of the head that begins ``data`` end (after the last one's
    CRLF, before the blank line), or -1; ``line``: where its start line ends, ``headers``
    its fields as ``field`` made them. llhttp checked the head: CRLF line ends, no CR or
    LF inside a line, the head ends at the first empty line.

    Each line is first taken to be ``name: value`` (one space, no trailing whitespace),
    checked by the CR at its end: a line laid out otherwise puts that position on its LF
    or inside it, where no CR is, so a CR there is the line's own end (no search of the
    bytes: ``bytes.find`` is a generic method call in compiled code, some 1.2k
    instructions). Otherwise the blank line is searched for."""
    n = len(data)
    pos = line
    for k, v in headers:
        pos += len(k) + len(v) + 4
        if pos > n or data[pos - 2] != 13:
            break
    else:
        if pos + 2 <= n and data[pos] == 13 and data[pos + 1] == 10:
            return pos
    end = data.find(b"\r\n\r\n", line - 2)
    return end + 2 if end >= 0 else -1


def content_length(value: str) -> int:
    """A ``Content-Length`` value llhttp accepted (digits) as a number: ``int`` parses a
    string through a generic path (some 500 instructions); a short one is summed here."""
    n = len(value)
    if n == 0 or n > 9:
        return int(value)
    total = 0
    for c in value:
        d = ord(c) - 48
        if d < 0 or d > 9:
            return int(value)
        total = total * 10 + d
    return total


def head_size(first: int, headers: Headers) -> int:
    """The size of a head as sent: the start line plus ``name: value\\r\\n`` per field."""
    return first + sum(len(k) + len(v) + 4 for k, v in headers) + 2


def message_version(
    parser: httptools.HttpRequestParser | httptools.HttpResponseParser, no_connection: bool
) -> str:
    """The HTTP version of the head llhttp just read (from its ``on_headers_complete``);
    ``no_connection``: the head has neither ``Connection`` nor ``Proxy-Connection``.

    ``get_http_version`` formats a string each call (some 2k instructions); llhttp's
    keep-alive answer is a flag test. llhttp accepts only the versions 0.9, 1.0, 1.1 and
    2.0, and without those two fields only 1.1 keeps a connection alive (a 1.x minor
    above 0, and the message framed without EOF), so that answer names 1.1 then."""
    if no_connection and parser.should_keep_alive():
        return "1.1"
    version: str = parser.get_http_version()
    return version


class Stop(Exception):
    """Raised in a parser callback to stop llhttp (it becomes an ``HttpParserError``)."""


def reraise_bug(error: Exception) -> None:
    """A callback that failed for another reason than ``Stop`` is a bug here: surface it
    rather than blame the peer."""
    cause = error.__context__
    if cause is not None and not isinstance(cause, Stop):
        raise cause


class Reader:
    """The parsing state both machines keep: the phase, the fields of the head (then of the
    trailers) being read, and the bytes charged to an incomplete head or trailer part."""

    __slots__ = (
        "_chunk_new",
        "_chunk_open",
        "_data",
        "_feed_len",
        "_fields",
        "_head_new",
        "_head_seen",
        "_phase",
        "_read_start",
        "_tail_seen",
        "max_header_size",
    )

    def __init__(self, max_header_size: int = DEFAULT_MAX_HEADER_SIZE) -> None:
        self.max_header_size = max_header_size
        self._phase = IDLE
        self._fields: list[tuple[str, str]] = []
        self._head_seen = 0  # bytes charged to the incomplete head
        self._head_new = False  # that head began in the current read
        self._feed_len = 0
        self._chunk_open = False  # a chunk-size line was read, no data yet (trailers?)
        self._chunk_new = False  # ... in the current read
        self._tail_seen = 0  # bytes charged to the chunk-size line and what follows
        self._data = b""
        """The read being parsed, while a head that began at its start may end in it."""
        self._read_start = False

    def _note_read(self, data: bytes) -> None:
        """Keep ``data`` when a message begins at its first byte (llhttp skips CRLFs
        between messages): a head that ends in it can be forwarded as it came."""
        if self._phase == IDLE and data[0] != 13 and data[0] != 10:
            self._read_start = True
            self._data = data
        elif self._read_start:
            self._read_start = False
            self._data = b""

    def _take_read(self) -> bytes:
        """For a head just completed: the read it began at the start of, once (only the
        read's first head; empty when it began elsewhere)."""
        data = self._data
        if self._read_start:
            self._read_start = False
            self._data = b""
        return data

    def _head_over(self, n: int, alone: bool) -> bool:
        """Charge a read of ``n`` bytes that left a head incomplete to that head; ``alone``:
        no other message began in this read. True when the head is over the limit."""
        if not self._head_new:
            self._head_seen += n
        elif alone:
            self._head_seen = n
        else:  # began behind another message: its share of this read is unknown
            self._head_seen = 0
        return self._head_seen > self.max_header_size

    def _complete_head_over(self, first: int, headers: Headers) -> bool:
        """A head just completed is over the limit (``first``: its start line's size)."""
        limit = self.max_header_size
        seen = self._feed_len if self._head_new else self._head_seen + self._feed_len
        return seen > limit and head_size(first, headers) > limit

    def _over_tail(self, n: int) -> bool:
        """Charge a read to what follows a chunk-size line while no data came: the
        trailers after the last chunk, which llhttp (via httptools) buffers field by
        field, so they are bounded like a head. A read in which the line ended is not
        charged (its share is unknown)."""
        if not self._chunk_new:
            self._tail_seen += n
        return self._tail_seen > self.max_header_size

    # -- llhttp callbacks --------------------------------------------------------------
    def _on_header(self, name: bytes, value: bytes) -> None:
        self._fields.append(field(name, value))

    def _on_chunk_header(self) -> None:
        self._chunk_open = self._chunk_new = True
        self._tail_seen = 0

    def _on_chunk_complete(self) -> None:
        self._chunk_open = False
