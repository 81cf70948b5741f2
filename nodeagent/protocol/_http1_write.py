"""How the HTTP/1.1 machines write messages: heads by hand, bodies framed (``Content-Length``,
chunked, or until close), trailers after the last chunk.

Rule: no I/O and no state of a message here: pure functions from what a machine knows of
the exchange to bytes plus the framing chosen; the machine keeps the state. Header names
must be tokens and no name, value, target or reason may contain CR, LF or NUL, so a caller
cannot inject a header or a second message: a misuse raises ``LocalProtocolError`` and
nothing is written.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Final

from nodeagent.protocol._http1_common import (
    NAMES_MAX,
    RESPONSE_FIELDS,
    LocalProtocolError,
    RawHead,
    split_tokens,
)

# Outgoing message states and body framings (kept by the machines).
NOTHING: Final = 0
SENDING: Final = 1  # head sent, body may follow
SENT: Final = 2

LENGTH: Final = 0
CHUNKED: Final = 1
UNTIL_CLOSE: Final = 2

_REQUEST_OUT_FIELDS: Final = frozenset(
    {"host", "connection", "content-length", "transfer-encoding", "upgrade"}
)

_TOKEN: Final = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_TARGET: Final = re.compile(r"[\x21-\x7e\x80-\xff]+")
_NAMES: dict[str, str] = {}
"""Outgoing header names already checked to be tokens, mapped to their lower-case form
(a memo, bounded by ``NAMES_MAX``: names repeat on every message)."""


def _checked_name(name: str) -> str:
    """``name`` lower-cased, after checking it is a token (the slow path of ``_NAMES``)."""
    if _TOKEN.fullmatch(name) is None:
        raise LocalProtocolError(f"invalid header name {name!r}")
    low = name.lower()
    if len(_NAMES) < NAMES_MAX:
        _NAMES[name] = low
    return low


def _checked_length(previous: str | None, value: str) -> str:
    if not (value.isascii() and value.isdigit()):
        raise LocalProtocolError(f"invalid Content-Length {value!r}")
    if previous is not None and int(previous) != int(value):
        raise LocalProtocolError("conflicting Content-Length headers")
    return value


def _wire(lines: list[str]) -> bytes:
    """Lines (each ending in CRLF) plus the blank line, as bytes; refuses any CR, LF or NUL
    inside a line: one count over the whole head instead of a scan per field."""
    lines.append("\r\n")
    text = "".join(lines)
    n = len(lines)
    if text.count("\n") != n or text.count("\r") != n or "\x00" in text:
        bad = next(
            (ln for ln in lines if "\x00" in ln or ln.count("\r") != 1 or ln.count("\n") != 1),
            "",
        )
        raise LocalProtocolError(f"CR, LF or NUL inside a header line: {bad[:-2]!r}")
    try:
        return text.encode("latin-1")
    except UnicodeEncodeError as e:
        raise LocalProtocolError(f"not latin-1: {e.object[e.start : e.end]!r}") from e


def _without(
    lines: list[str], headers: Sequence[tuple[str, str]], drop: tuple[str, ...]
) -> list[str]:
    """``lines`` (a start line, one line per field of ``headers``, then added lines)
    without the lines of the fields named in ``drop``."""
    n = len(headers)
    kept = [
        line
        for (name, _), line in zip(headers, lines[1 : n + 1], strict=True)
        if name.lower() not in drop
    ]
    return [lines[0], *kept, *lines[n + 1 :]]


# -- heads --------------------------------------------------------------------------------


def interim_head(status: int, reason: str, headers: Sequence[tuple[str, str]]) -> bytes:
    """A ``1xx`` response head (``101`` included): its fields as given, no framing."""
    names = _NAMES
    lines = [f"HTTP/1.1 {status} {reason}\r\n"]
    for name, value in headers:
        if name not in names:
            _checked_name(name)
        lines.append(f"{name}: {value}\r\n")
    return _wire(lines)


def response_head(
    status: int,
    reason: str,
    headers: Sequence[tuple[str, str]],
    method: str,
    http11: bool,
    close: bool,
    switch: bool,
) -> tuple[bytes, int, int, bool]:
    """A final response head to a ``method`` request (``""``: none was read) from a client
    speaking HTTP/1.1 (``http11``) or 1.0, and its framing: ``(wire, framing, body bytes
    left, close)``.

    ``close``: the connection ends after this response (``Connection: close`` is added);
    it may come out True when the body is delimited by close. ``switch``: a 2xx to
    ``CONNECT``, no body. Without ``Content-Length`` the body is chunked (HTTP/1.1) or
    delimited by close (HTTP/1.0).
    """
    names = _NAMES
    lines = [f"HTTP/1.1 {status} {reason}\r\n"]
    length: str | None = None
    coding = False
    connection: list[str] | None = None
    for name, value in headers:
        low = names.get(name) or _checked_name(name)
        if low in RESPONSE_FIELDS:
            if low == "content-length":
                length = _checked_length(length, value)
            elif low == "transfer-encoding":
                coding = True
            elif connection is None:
                connection = split_tokens(value)
            else:
                connection += split_tokens(value)
        lines.append(f"{name}: {value}\r\n")

    drop: tuple[str, ...] = ()  # fields of the caller's replaced here
    if switch or status == 204 or status == 304:
        framing, left = LENGTH, 0
    elif length is not None and not coding:
        framing, left = LENGTH, 0 if method == "HEAD" else int(length)
    else:  # a body of unknown length (for HEAD: the fields a GET would get)
        drop = ("content-length", "transfer-encoding")
        left = 0
        if http11:
            lines.append("Transfer-Encoding: chunked\r\n")
            framing = CHUNKED
        else:
            framing = UNTIL_CLOSE
            close = close or method != "HEAD"
        if method == "HEAD":
            framing = LENGTH
    if connection is not None and "close" in connection:
        close = True
    elif close:
        tokens = set(connection or ())
        tokens.discard("keep-alive")
        tokens.add("close")
        drop += ("connection",)
        lines.append(f"Connection: {', '.join(sorted(tokens))}\r\n")
    if drop and (length is not None or coding or connection is not None):
        lines = _without(lines, headers, drop)
    return _wire(lines), framing, left, close


def request_head(
    method: str, target: str, headers: Sequence[tuple[str, str]], body: bool
) -> tuple[bytes, int, int, bool, bool]:
    """A request head and its framing: ``(wire, framing, body bytes left, close, upgrade)``;
    ``close``: it asks to close the connection after the response, ``upgrade``: it offers
    a protocol switch. ``headers`` must include ``Host``. With ``body`` and no
    ``Content-Length``, the body is chunked (``Transfer-Encoding`` is added)."""
    names = _NAMES
    lines = [_request_line(method, target)]
    host = upgrade = False
    length: str | None = None
    coding: str | None = None
    connection: str | None = None
    for name, value in headers:
        low = names.get(name) or _checked_name(name)
        if low in _REQUEST_OUT_FIELDS:
            if low == "host":
                host = True
            elif low == "content-length":
                length = _checked_length(length, value)
            elif low == "transfer-encoding":
                coding = value if coding is None else f"{coding},{value}"
            elif low == "connection":
                connection = value if connection is None else f"{connection},{value}"
            else:
                upgrade = True
        lines.append(f"{name}: {value}\r\n")
    if not host:
        raise LocalProtocolError("a request needs a Host header")
    if coding is not None:
        if split_tokens(coding) != ["chunked"] or length is not None:
            raise LocalProtocolError(f"unsupported framing {coding!r} / {length!r}")
        framing, left = CHUNKED, 0
    elif length is not None:
        framing, left = LENGTH, int(length)
    elif body:
        lines.append("transfer-encoding: chunked\r\n")
        framing, left = CHUNKED, 0
    else:
        framing, left = LENGTH, 0
    close = connection is not None and "close" in split_tokens(connection)
    return _wire(lines), framing, left, close, upgrade


def forwarded_head(
    method: str, target: str, raw: RawHead, added: Sequence[tuple[str, str]]
) -> bytes:
    """A request head made of a client's (``raw``: its request line too when ``target`` is
    its own) and ``added`` fields after its own, checked here; an added field may not
    frame the message or name the host (``Host``, ``Connection``, ``Content-Length``,
    ``Transfer-Encoding``, ``Upgrade``): the client's fields decide those."""
    tail = _added(added, _REQUEST_OUT_FIELDS, _REQUEST_ADDED, False)
    if target == raw.target:
        return b"%b%b\r\n" % (raw.wire, tail)
    line = _request_line(method, target).encode("latin-1")
    return b"%b%b%b\r\n" % (line, raw.wire[raw.line :], tail)


def forwarded_response(raw: RawHead, added: Sequence[tuple[str, str]], close: bool) -> bytes:
    """A response head made of an upstream's (``raw``) and ``added`` fields after its own,
    checked here, then ``Connection: close`` if ``close``; an added field may not frame
    the message (``Connection``, ``Content-Length``, ``Transfer-Encoding``)."""
    if not added and not close:
        return raw.wire + b"\r\n"
    return b"%b%b\r\n" % (raw.wire, _added(added, RESPONSE_FIELDS, _RESPONSE_ADDED, close))


def _added(
    added: Sequence[tuple[str, str]],
    refused: frozenset[str],
    prefixes: dict[str, str],
    close: bool,
) -> bytes:
    """The lines of fields added to a head forwarded as it came (``Connection: close``
    last if ``close``), after checking none is named in ``refused`` and none has a CR,
    LF or NUL inside; ``prefixes``: the names already checked against ``refused``, each
    caller's own memo (``_REQUEST_ADDED``, ``_RESPONSE_ADDED``)."""
    parts: list[str] = []  # (one join of them all: no string built per line)
    for name, value in added:
        prefix = prefixes.get(name)
        if prefix is None:
            prefix = _added_prefix(name, refused, prefixes)
        if "\r" in value or "\n" in value or "\x00" in value:  # (memchr each: no count)
            raise LocalProtocolError(f"CR, LF or NUL inside a header line: {name}: {value!r}")
        parts += (prefix, value, "\r\n")
    if close:
        parts.append("Connection: close\r\n")
    try:
        return "".join(parts).encode("latin-1")
    except UnicodeEncodeError as e:
        raise LocalProtocolError(f"not latin-1: {e.object[e.start : e.end]!r}") from e


_REQUEST_ADDED: Final[dict[str, str]] = {}
_RESPONSE_ADDED: Final[dict[str, str]] = {}
"""Names ``_added`` checked (tokens a request's, or a response's, forwarded head may have
added) mapped to the start of their line, ``name: ``: memos bounded by ``NAMES_MAX``, one
look-up a field."""


def _added_prefix(name: str, refused: frozenset[str], prefixes: dict[str, str]) -> str:
    """The slow path of ``_added``'s memos: ``name`` must be a token not in ``refused``."""
    if (_NAMES.get(name) or _checked_name(name)) in refused:
        raise LocalProtocolError(f"{name} is not added to a head forwarded as it came")
    prefix = f"{name}: "
    if len(prefixes) < NAMES_MAX:
        prefixes[name] = prefix
    return prefix


def _request_line(method: str, target: str) -> str:
    """The request line, after checking the method is a token and the target has no
    space or control character."""
    if method not in _NAMES:
        _checked_name(method)
    # (visible ASCII, the common case, is checked without the regular expression)
    if (
        not (target.isascii() and target.isprintable() and target and " " not in target)
        and _TARGET.fullmatch(target) is None
    ):
        raise LocalProtocolError(f"invalid request target {target!r}")
    return f"{method} {target} HTTP/1.1\r\n"


# -- bodies -------------------------------------------------------------------------------


def chunk(data: bytes) -> bytes:
    """One chunk of a chunked body (``data`` not empty: an empty chunk ends the body)."""
    return b"%x\r\n%b\r\n" % (len(data), data)


def last_chunk(trailers: Sequence[tuple[str, str]]) -> bytes:
    """The end of a chunked body: the empty chunk, then ``trailers``."""
    if not trailers:
        return b"0\r\n\r\n"
    names = _NAMES
    lines = ["0\r\n"]
    for name, value in trailers:
        if name not in names:
            _checked_name(name)
        lines.append(f"{name}: {value}\r\n")
    return _wire(lines)
