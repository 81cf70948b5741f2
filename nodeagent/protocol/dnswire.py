"""DNS messages as the DNS proxy reads and writes them (RFC 1035, EDNS of RFC 6891).

Owns the wire format the proxy needs: a query's header, its questions and the UDP size
its EDNS record offers (every other record is walked over, checked, not kept); answers
of ``A``, ``AAAA`` and ``CNAME`` records, and error answers, each echoing the question
and offering our own EDNS size when the query had EDNS; and truncation to what a UDP
client takes (``TC`` set, the records dropped, so the client asks again over TCP) — also
of an upstream's answer. Which names are answered, and with what, is ``core/dns.py``'s;
the sockets are ``proxy/dns.py``'s.

Written here rather than taken from dnspython: importing it (with the
``importlib.metadata`` it loads) held 3.2 MiB of every agent's memory for a handful of
fields of three record types. dnspython stays the tests' independent reader and writer.
"""

from __future__ import annotations

import ipaddress
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

__all__ = [
    "Malformed",
    "Query",
    "Question",
    "Record",
    "address_record",
    "cname_record",
    "error_response",
    "parse_query",
    "response",
    "truncated",
]

QR: Final = 0x8000
AA: Final = 0x0400
TC: Final = 0x0200
RD: Final = 0x0100
RA: Final = 0x0080
OPCODE_MASK: Final = 0x7800
OPCODE_QUERY: Final = 0

NOERROR: Final = 0
FORMERR: Final = 1
SERVFAIL: Final = 2
NOTIMP: Final = 4

TYPE_A: Final = 1
TYPE_CNAME: Final = 5
TYPE_AAAA: Final = 28
TYPE_OPT: Final = 41
CLASS_IN: Final = 1

UDP_PAYLOAD: Final = 512
"""What a client without EDNS can take over UDP (RFC 1035)."""
MAX_NAME: Final = 255
"""Longest name on the wire, length bytes included (RFC 1035 §2.3.4)."""

_HEADER: Final = struct.Struct("!HHHHHH")
_RR_FIXED: Final = struct.Struct("!HHIH")
_QUESTION_FIXED: Final = struct.Struct("!HH")
_HOST_BYTES: Final = frozenset(b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_*")


class Malformed(ValueError):
    """Bytes that are not a DNS message; the text says what is wrong and at which byte."""


@dataclass(frozen=True, slots=True)
class Question:
    """One question: the name as asked (its labels, case kept), its type and class."""

    labels: tuple[bytes, ...]
    rdtype: int
    rdclass: int

    def text(self) -> str | None:
        """The name as text without the final dot; None when a label holds a byte no
        host name has (a dot, a space, a control byte): no name the mesh knows."""
        for label in self.labels:
            if not _HOST_BYTES.issuperset(label):
                return None
        return ".".join(label.decode("ascii") for label in self.labels)


@dataclass(frozen=True, slots=True)
class Query:
    """What the proxy reads of a query."""

    id: int
    flags: int
    questions: tuple[Question, ...]
    question_wire: bytes
    """The question section as sent, echoed in the answer."""
    edns_payload: int | None
    """The UDP size the client's EDNS record offers; None when it sent none."""

    @property
    def opcode(self) -> int:
        return (self.flags & OPCODE_MASK) >> 11

    @property
    def is_response(self) -> bool:
        return bool(self.flags & QR)

    @property
    def udp_limit(self) -> int:
        """The largest answer this client takes over UDP."""
        if self.edns_payload is None:
            return UDP_PAYLOAD
        return max(UDP_PAYLOAD, self.edns_payload)


@dataclass(frozen=True, slots=True)
class Record:
    """One answer record: owner name (labels), type, TTL and its data in wire form; a
    name inside ``rdata_name`` (a CNAME's target) may be pointed at by later records."""

    owner: tuple[bytes, ...]
    rdtype: int
    ttl: int
    rdata: bytes = b""
    rdata_name: tuple[bytes, ...] | None = None


def _name_labels(name: str) -> tuple[bytes, ...]:
    labels = tuple(p.encode("ascii") for p in name.rstrip(".").split(".") if p)
    if any(len(label) > 63 for label in labels) or sum(len(x) + 1 for x in labels) + 1 > MAX_NAME:
        raise ValueError(f"{name!r} is too long for a DNS name")
    return labels


def cname_record(owner: tuple[bytes, ...], ttl: int, target: str) -> Record:
    """``owner CNAME target``."""
    return Record(owner, TYPE_CNAME, ttl, rdata_name=_name_labels(target))


def address_record(owner: tuple[bytes, ...], ttl: int, address: str) -> Record:
    """An ``A`` record for an IPv4 address, an ``AAAA`` one for IPv6."""
    packed = ipaddress.ip_address(address).packed
    return Record(owner, TYPE_A if len(packed) == 4 else TYPE_AAAA, ttl, packed)


# -- reading -----------------------------------------------------------------------------


def _read_name(wire: bytes, at: int) -> tuple[tuple[bytes, ...], int]:
    """The name at ``at`` (following compression pointers) and the offset after it."""
    labels: list[bytes] = []
    end = -1
    size = 1
    pos = at
    while True:
        if pos >= len(wire):
            raise Malformed(f"a name is cut off at byte {pos}")
        n = wire[pos]
        if n & 0xC0 == 0xC0:
            if pos + 1 >= len(wire):
                raise Malformed(f"a compression pointer is cut off at byte {pos}")
            target = (n & 0x3F) << 8 | wire[pos + 1]
            if target >= pos:  # only backwards, so a pointer cannot loop
                raise Malformed(f"a compression pointer at byte {pos} points forward")
            if end < 0:
                end = pos + 2
            pos = target
            continue
        if n & 0xC0:
            raise Malformed(f"unknown label type {n >> 6:#x} at byte {pos}")
        pos += 1
        if n == 0:
            break
        if pos + n > len(wire):
            raise Malformed(f"a label is cut off at byte {pos}")
        size += n + 1
        if size > MAX_NAME:
            raise Malformed(f"a name longer than {MAX_NAME} bytes at byte {at}")
        labels.append(wire[pos : pos + n])
        pos += n
    return tuple(labels), (end if end >= 0 else pos)


def _fixed(wire: bytes, at: int, st: struct.Struct, what: str) -> tuple[int, ...]:
    if at + st.size > len(wire):
        raise Malformed(f"{what} is cut off at byte {at}")
    return st.unpack_from(wire, at)


def _questions(wire: bytes) -> tuple[tuple[int, ...], tuple[Question, ...], int]:
    """The header's fields, the questions, and the offset after them."""
    if len(wire) < _HEADER.size:
        raise Malformed(f"{len(wire)} bytes: shorter than a DNS header (12)")
    header = _HEADER.unpack_from(wire)
    at = _HEADER.size
    questions = []
    for _ in range(header[2]):
        labels, at = _read_name(wire, at)
        rdtype, rdclass = _fixed(wire, at, _QUESTION_FIXED, "a question")
        at += _QUESTION_FIXED.size
        questions.append(Question(labels, rdtype, rdclass))
    return header, tuple(questions), at


def _record(wire: bytes, at: int) -> tuple[tuple[bytes, ...], int, int, int, int]:
    """The record at ``at``: its owner, type, class, TTL, and the offset after it."""
    labels, at = _read_name(wire, at)
    rdtype, rdclass, ttl, rdlength = _fixed(wire, at, _RR_FIXED, "a record")
    at += _RR_FIXED.size + rdlength
    if at > len(wire):
        raise Malformed(f"a record's data is cut off at byte {len(wire)}")
    return labels, rdtype, rdclass, ttl, at


def parse_query(wire: bytes) -> Query:
    """The query in ``wire``; raises ``Malformed`` naming what is wrong and where."""
    (ident, flags, _qd, ancount, nscount, arcount), questions, at = _questions(wire)
    question_wire = wire[_HEADER.size : at]
    edns: int | None = None
    for i in range(ancount + nscount + arcount):
        labels, rdtype, rdclass, _ttl, at = _record(wire, at)
        if rdtype == TYPE_OPT:
            if i < ancount + nscount or labels or edns is not None:
                raise Malformed("an EDNS (OPT) record out of place, or more than one")
            edns = rdclass
    if at != len(wire):
        raise Malformed(f"{len(wire) - at} bytes after the message's end (byte {at})")
    return Query(ident, flags, questions, question_wire, edns)


# -- writing -----------------------------------------------------------------------------


class _Writer:
    """A message being written, with compression of whole names written before."""

    def __init__(self, head: bytes) -> None:
        self.out = bytearray(head)
        self.names: dict[tuple[bytes, ...], int] = {}

    def written(self, labels: tuple[bytes, ...], at: int) -> None:
        """The name ``labels`` is at ``at``: later ones point there."""
        self.names.setdefault(tuple(label.lower() for label in labels), at)

    def name(self, labels: tuple[bytes, ...]) -> None:
        seen = self.names.get(tuple(label.lower() for label in labels))
        if seen is not None:
            self.out += struct.pack("!H", 0xC000 | seen)
            return
        if labels and len(self.out) < 0x3FFF:
            self.written(labels, len(self.out))
        for label in labels:
            self.out.append(len(label))
            self.out += label
        self.out.append(0)

    def record(self, r: Record) -> None:
        self.name(r.owner)
        if r.rdata_name is None:
            self.out += _RR_FIXED.pack(r.rdtype, CLASS_IN, r.ttl, len(r.rdata))
            self.out += r.rdata
            return
        at = len(self.out)
        self.out += _RR_FIXED.pack(r.rdtype, CLASS_IN, r.ttl, 0)
        self.name(r.rdata_name)
        length = len(self.out) - at - _RR_FIXED.size
        struct.pack_into("!H", self.out, at + 8, length)


def _opt(payload: int, ttl: int = 0) -> bytes:
    """An EDNS record offering ``payload`` bytes over UDP (``ttl``: extended flags), no
    options."""
    return b"\x00" + _RR_FIXED.pack(TYPE_OPT, payload, ttl, 0)


def response(
    query: Query,
    records: Sequence[Record] = (),
    *,
    rcode: int = NOERROR,
    authoritative: bool = False,
    payload: int,
    limit: int,
) -> bytes:
    """The answer to ``query``: its ID, opcode and RD, ``RA``, ``AA`` when
    ``authoritative``, ``rcode``, the question echoed, ``records``, and an EDNS record
    offering ``payload`` when the query had one; truncated to ``limit`` bytes."""
    flags = QR | (query.flags & (OPCODE_MASK | RD)) | RA | (AA if authoritative else 0) | rcode
    opt = _opt(payload) if query.edns_payload is not None else b""
    head = _HEADER.pack(query.id, flags, len(query.questions), len(records), 0, 1 if opt else 0)
    w = _Writer(head)
    if query.questions:  # the first question's name starts after the header
        w.written(query.questions[0].labels, _HEADER.size)
    w.out += query.question_wire
    for r in records:
        w.record(r)
    w.out += opt
    wire = bytes(w.out)
    return wire if len(wire) <= limit else truncated(wire, limit)


def error_response(query: Query, rcode: int, *, payload: int, limit: int) -> bytes:
    """An answer of ``rcode`` and no records to ``query``."""
    return response(query, rcode=rcode, payload=payload, limit=limit)


def truncated(wire: bytes, limit: int) -> bytes:
    """A message too big for a UDP client cut to its header (``TC`` set), its question
    and its EDNS record: the client asks again over TCP. Raises ``Malformed`` when
    ``wire`` is not a message whose question can be read."""
    if len(wire) <= limit:
        return wire
    (ident, flags, qdcount, ancount, nscount, arcount), _, at = _questions(wire)
    question_end = at
    opt = b""
    for _ in range(ancount + nscount + arcount):
        labels, rdtype, rdclass, ttl, at = _record(wire, at)
        if rdtype == TYPE_OPT and not labels:
            opt = _opt(rdclass, ttl)  # its options dropped
    head = _HEADER.pack(ident, flags | TC, qdcount, 0, 0, 1 if opt else 0)
    cut = head + wire[_HEADER.size : question_end] + opt
    if len(cut) > limit:  # a question bigger than the limit: the header alone
        return _HEADER.pack(ident, flags | TC, 0, 0, 0, 0)
    return cut
