"""HTTP/2 messages for the L7 machines (``http2``) as RFC 9113 §8 has them: the checks of a
received header block, the fields of an outgoing one, which fields cross onto HTTP/2, and
``MessageH2``, ``h2`` made to treat a malformed message as an error of its stream only.

A received block is checked in one pass that also builds the event's fields, so that a
malformed block is a *stream* error the machine answers per stream (RFC 9113 §8.1.1),
not ``h2``'s connection error: ``h2``'s own validation is off. Outgoing fields have their
names lower-cased, and ``authorization`` and short ``cookie`` values never enter the HPACK
table; dropping connection-specific fields is the job of ``forwardable_h2_headers``.
Multiple ``cookie`` fields are joined (RFC 9113 §8.2.3).

Coupling to ``h2`` beyond its public API, in ``MessageH2`` (pin ``h2<5``): the HPACK block
is decoded before ``h2`` sees it (a stand-in decoder returns the result), so oversized
header lists can be refused per stream with the HPACK state intact; stream-level errors
``h2`` raises as connection errors (a bad ``content-length``, a body not matching it,
trailers without END_STREAM) become ``StreamMalformed`` events. A client opening more
streams than ``max_concurrent_streams`` still fails the connection, as in ``h2``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import TYPE_CHECKING

import h2.events as h2e
import h2.exceptions as h2x
from h2.config import H2Configuration
from hpack import HeaderTuple, NeverIndexedHeaderTuple
from hpack.exceptions import HPACKError, OversizedHeaderListError
from hpack.hpack import Decoder

from nodeagent.protocol.h2base import H2, Field
from nodeagent.protocol.http1 import Headers

if TYPE_CHECKING:
    from hyperframe.frame import DataFrame, Frame, HeadersFrame

# -- header fields ------------------------------------------------------------------------

_CONNECTION_SPECIFIC = frozenset(
    {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "upgrade"}
)
"""Fields HTTP/2 forbids (RFC 9113 §8.2.2); ``te`` is allowed only as ``trailers``."""

_NOT_FORWARDED = _CONNECTION_SPECIFIC | {"http2-settings"}
_SPECIAL_OUT = _NOT_FORWARDED | {"te"}


def forwardable_h2_headers(headers: Iterable[tuple[str, str]]) -> Headers:
    """The header fields of a head to copy onto HTTP/2 (either direction).

    Removed: ``connection``, ``keep-alive``, ``proxy-connection``, ``transfer-encoding``,
    ``upgrade``, ``http2-settings``, every field the ``connection`` header names, and
    ``te`` unless it lists ``trailers`` (then exactly ``te: trailers`` is kept, as gRPC
    needs). Names come out lower-case; everything else is kept in order. Pure; a tuple
    with nothing to change (any head from ``DownstreamHttp2``) is returned as it is.
    """
    items = headers if isinstance(headers, tuple) else tuple(headers)
    for k, v in items:
        n = k.lower()
        if n != k or (n in _SPECIAL_OUT and (n != "te" or v != "trailers")):
            break
    else:
        return items
    named = {t.strip().lower() for k, v in items if k.lower() == "connection" for t in v.split(",")}
    out: list[tuple[str, str]] = []
    for k, v in items:
        n = k.lower()
        if n in _NOT_FORWARDED or n in named:
            continue
        if n == "te":
            if "trailers" in {t.split(";")[0].strip().lower() for t in v.split(",")}:
                out.append(("te", "trailers"))
            continue
        out.append((n, v))
    return tuple(out)


class Malformed(Exception):
    """A header block that makes its message malformed (RFC 9113 §8.1.1)."""

    def __init__(self, reason: str, status: int = 400) -> None:
        super().__init__(reason)
        self.reason = reason
        self.status = status


_BAD_NAME = re.compile(rb"[^\x21-\x39\x3b-\x40\x5b-\x7e]").search
"""RFC 9113 §8.2.1: no controls, space, upper case, ``:`` or non-ASCII in a field name."""
_BAD_VALUE = re.compile(rb"[\x00\n\r]").search
"""RFC 9113 §8.2.1: no NUL/CR/LF in a value (nor whitespace at either end: ``_EDGE``)."""
_EDGE = (0x20, 0x09)
_BAD_TOKEN = re.compile(rb"[^!#$%&'*+\-.^_`|~0-9A-Za-z]").search
_BAD_METHOD = re.compile(rb"[^!#$%&'*+\-.^_`|~0-9A-Z]").search
"""A method is a token without lower case: ``get`` is no ``GET`` (RFC 9110 §9.1: methods
are case-sensitive) and would slip past a policy's ``methods`` on an app that folds case."""
_FIELD_OVERHEAD = 32

_F_CONNECTION, _F_TE, _F_COOKIE, _F_HOST = 1, 2, 3, 4
_SPECIAL_IN = {n.encode(): _F_CONNECTION for n in _CONNECTION_SPECIFIC} | {
    b"te": _F_TE,
    b"cookie": _F_COOKIE,
    b"host": _F_HOST,
}

RawHeaders = Iterable[tuple[bytes, bytes]]


def _split(
    raw: RawHeaders, limit: int
) -> tuple[list[tuple[bytes, bytes]], list[tuple[str, str]], bytes | None]:
    """One pass over a received header block: (pseudo-headers, regular fields decoded,
    the ``host`` value). Raises ``Malformed`` (431 when only the size is wrong)."""
    pseudo: list[tuple[bytes, bytes]] = []
    regular: list[tuple[str, str]] = []
    size = 0
    host: bytes | None = None
    cookies = 0
    special = _SPECIAL_IN.get
    for name, value in raw:
        size += len(name) + len(value) + _FIELD_OVERHEAD
        if not name:
            raise Malformed("empty header name")
        if value and (_BAD_VALUE(value) or value[0] in _EDGE or value[-1] in _EDGE):
            raise Malformed(f"invalid value of {_show(name)}")
        if name[0] == 0x3A:  # ":"
            if regular:
                raise Malformed(f"pseudo-header {_show(name)} after a regular field")
            pseudo.append((name, value))
            continue
        if _BAD_NAME(name):
            raise Malformed(f"invalid header name {_show(name)}")
        kind = special(name)
        if kind is not None:
            if kind == _F_CONNECTION:
                raise Malformed(f"connection-specific header {_show(name)}")
            if kind == _F_TE and value.lower() != b"trailers":
                raise Malformed("te other than trailers")
            if kind == _F_COOKIE:
                cookies += 1
            elif kind == _F_HOST:
                if host is not None:
                    raise Malformed("more than one host header")
                host = value
        regular.append((name.decode("latin-1"), value.decode("latin-1")))
    if size > limit:
        raise Malformed(f"header list of {size} bytes exceeds {limit}", 431)
    if cookies > 1:  # RFC 9113 §8.2.3: one field again, where the first one was
        crumbs = [v for k, v in regular if k == "cookie"]
        first = next(i for i, (k, _) in enumerate(regular) if k == "cookie")
        regular = [f for f in regular if f[0] != "cookie"]
        regular.insert(first, ("cookie", "; ".join(crumbs)))
    return pseudo, regular, host


def _show(name: bytes) -> str:
    return repr(name.decode("latin-1")[:64])


def parse_request(raw: RawHeaders, limit: int) -> tuple[str, str, str, str, Headers]:
    pseudo, regular, host = _split(raw, limit)
    method = scheme = authority = path = None
    for name, value in pseudo:
        if name == b":method" and method is None:
            method = value
        elif name == b":path" and path is None:
            path = value
        elif name == b":scheme" and scheme is None:
            scheme = value
        elif name == b":authority" and authority is None:
            authority = value
        else:
            raise Malformed(f"unexpected or repeated pseudo-header {_show(name)}")
    if not method:
        raise Malformed("missing :method")
    if _BAD_METHOD(method):
        raise Malformed(f"invalid :method {_show(method)} (methods are upper case, e.g. GET)")
    if authority is None:
        authority = host
    elif host is not None and host != authority:
        raise Malformed(":authority and host differ")
    if method == b"CONNECT":
        if scheme is not None or path is not None or not authority:
            raise Malformed("CONNECT needs :authority and no :scheme or :path")
        scheme = path = b""
    else:
        if not scheme or _BAD_TOKEN(scheme):
            raise Malformed("missing or invalid :scheme")
        if not path or (path[0] != 0x2F and (path != b"*" or method != b"OPTIONS")):
            raise Malformed("missing or invalid :path")
        if authority is None:
            raise Malformed("no :authority and no host")
    if b"@" in authority:
        raise Malformed(":authority with userinfo")
    return (
        method.decode("ascii"),
        scheme.decode("ascii"),
        authority.decode("latin-1"),
        path.decode("latin-1"),
        tuple(regular),
    )


def parse_response(raw: RawHeaders, limit: int) -> tuple[int, Headers]:
    pseudo, regular, _ = _split(raw, limit)
    if len(pseudo) != 1 or pseudo[0][0] != b":status":
        raise Malformed("a response needs exactly one pseudo-header, :status")
    text = pseudo[0][1]
    if len(text) != 3 or not text.isdigit() or text == b"101" or text[0] == 0x30:
        raise Malformed(f"invalid :status {text.decode('latin-1')[:16]!r}")
    return int(text), tuple(regular)


def parse_trailers(raw: RawHeaders, limit: int) -> Headers:
    pseudo, regular, _ = _split(raw, limit)
    if pseudo:
        raise Malformed("pseudo-header in trailers")
    return tuple(regular)


_SENSITIVE = frozenset({b"authorization", b"proxy-authorization"})
STATUS = {s: str(s).encode() for s in range(100, 600)}


def encode_fields(block: list[Field], headers: Iterable[tuple[str, str]]) -> list[Field]:
    """Append regular fields to an outgoing block: names lower-cased, latin-1 as received
    (h2's own normalization is off); credentials never enter the HPACK table."""
    for k, v in headers:
        name = k.lower().encode("latin-1")
        value = v.encode("latin-1")
        if name in _SENSITIVE or (name == b"cookie" and len(value) < 20):
            block.append(NeverIndexedHeaderTuple(name, value))
        else:
            block.append((name, value))
    return block


# -- h2 -----------------------------------------------------------------------------------


class StreamMalformed(h2e.Event):
    """Raised-as-event by ``MessageH2``: ``h2`` found a stream-level error it would treat
    as fatal."""

    def __init__(self, stream_id: int, reason: str) -> None:
        self.stream_id = stream_id
        self.reason = reason


class _Decoded(Decoder):
    """Stands in for the HPACK decoder while ``h2`` handles a block decoded already."""

    def __init__(self) -> None:
        super().__init__()
        self.headers: Iterable[HeaderTuple] = ()

    def decode(self, data: bytes, raw: bool = False) -> Iterable[HeaderTuple]:
        return self.headers


class MessageH2(H2):
    """``h2base.H2`` (GOAWAY as RFC 9113 has it) with per-stream errors where RFC 9113 has
    them: see the module docstring."""

    def __init__(self, config: H2Configuration, hpack_limit: int) -> None:
        super().__init__(config=config)
        self._hpack_limit = hpack_limit
        self._decoded = _Decoded()

    def _receive_headers_frame(self, frame: HeadersFrame) -> tuple[list[Frame], list[h2e.Event]]:
        decoder = self.decoder
        # h2 lowers this to our advertised limit when the SETTINGS are acknowledged; the
        # advertised limit is enforced per stream instead, after a complete decode.
        decoder.max_header_list_size = self._hpack_limit
        try:
            headers = decoder.decode(frame.data, raw=True)
        except OversizedHeaderListError as e:
            raise h2x.DenialOfServiceError(f"Oversized header block: {e}") from e
        except (HPACKError, IndexError, TypeError, UnicodeDecodeError) as e:
            raise h2x.ProtocolError(f"Error decoding header block: {e}") from e
        stand_in = self._decoded
        stand_in.headers = headers
        self.decoder = stand_in
        try:
            return super()._receive_headers_frame(frame)
        except (h2x.StreamClosedError, h2x.StreamIDTooLowError, h2x.TooManyStreamsError):
            raise
        except h2x.ProtocolError as e:
            if frame.stream_id not in self.streams:
                raise
            return [], [StreamMalformed(frame.stream_id, str(e))]
        finally:
            self.decoder = decoder
            stand_in.headers = ()

    def _receive_data_frame(self, frame: DataFrame) -> tuple[list[Frame], list[h2e.Event]]:
        try:
            return super()._receive_data_frame(frame)
        except h2x.InvalidBodyLengthError as e:  # RFC 9113 §8.1.1: a stream error
            return [], [StreamMalformed(frame.stream_id, str(e))]
