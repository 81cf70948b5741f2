"""The DNS wire format of ``protocol/dnswire.py``, read and written back by dnspython as an
independent implementation: queries as resolvers send them parse to their fields, our
answers parse to what we meant (names, types, TTLs, addresses, flags, EDNS), truncation
stays within a UDP client's size, and bytes that are not DNS raise ``Malformed`` naming
what is wrong, never anything else."""

from __future__ import annotations

import struct

import dns.edns
import dns.flags
import dns.message
import dns.name
import dns.opcode
import dns.rcode
import dns.rdatatype
import dns.rrset
import pytest
from fuzzing import fuzz
from hypothesis import given
from hypothesis import strategies as st

from nodeagent.protocol import dnswire
from nodeagent.protocol.dnswire import Malformed, parse_query

NAME = "reviews.default.svc.cluster.local."


def query_wire(name: str = NAME, rdtype: str = "A", **kw: object) -> bytes:
    return dns.message.make_query(name, rdtype, **kw).to_wire()  # type: ignore[arg-type]


def test_a_query_as_a_resolver_sends_it() -> None:
    q = dns.message.make_query(NAME, "AAAA")
    parsed = parse_query(q.to_wire())
    assert parsed.id == q.id and parsed.flags & dnswire.RD and not parsed.is_response
    assert parsed.opcode == dnswire.OPCODE_QUERY
    (question,) = parsed.questions
    assert question.labels == (b"reviews", b"default", b"svc", b"cluster", b"local")
    assert (question.rdtype, question.rdclass) == (dnswire.TYPE_AAAA, dnswire.CLASS_IN)
    assert question.text() == "reviews.default.svc.cluster.local"
    assert parsed.edns_payload is None and parsed.udp_limit == 512


def test_edns_payload_and_the_udp_limit() -> None:
    assert parse_query(query_wire(use_edns=0, payload=4096)).udp_limit == 4096
    assert parse_query(query_wire(use_edns=0, payload=1232)).edns_payload == 1232
    assert parse_query(query_wire(use_edns=0, payload=100)).udp_limit == 512  # never below


def test_a_name_no_host_has_is_no_text() -> None:
    for name in (dns.name.Name([b"a.b", b"c", b""]), dns.name.Name([b"a b", b""])):
        (q,) = parse_query(dns.message.make_query(name, "A").to_wire()).questions
        assert q.text() is None
    (q,) = parse_query(query_wire("_http._tcp.Reviews.")).questions
    assert q.text() == "_http._tcp.Reviews"  # case kept: the lookup lowers it


def test_an_answer_with_a_cname_and_addresses() -> None:
    query = parse_query(query_wire("reviews.default.other.svc.cluster.local.", use_edns=0))
    cname = dnswire.cname_record(query.questions[0].labels, 30, "reviews.default")
    assert cname.rdata_name is not None
    addrs = [dnswire.address_record(cname.rdata_name, 30, f"10.96.0.{i}") for i in (1, 2)]
    wire = dnswire.response(query, [cname, *addrs], authoritative=True, payload=1232, limit=512)
    msg = dns.message.from_wire(wire)
    assert msg.id == query.id and msg.rcode() == dns.rcode.NOERROR
    assert msg.flags & dns.flags.QR and msg.flags & dns.flags.AA and msg.flags & dns.flags.RA
    assert msg.flags & dns.flags.RD  # copied from the query
    assert msg.question[0].name.to_text() == "reviews.default.other.svc.cluster.local."
    first, second = msg.answer
    assert first.rdtype == dns.rdatatype.CNAME and first[0].to_text() == "reviews.default."
    assert first.name == msg.question[0].name and first.ttl == 30
    assert second.name.to_text() == "reviews.default." and second.ttl == 30
    assert sorted(r.to_text() for r in second) == ["10.96.0.1", "10.96.0.2"]
    assert msg.edns == 0 and msg.payload == 1232


def test_aaaa_records_and_no_edns_without_the_querys() -> None:
    query = parse_query(query_wire("svc.", "AAAA"))
    owner = query.questions[0].labels
    wire = dnswire.response(
        query, [dnswire.address_record(owner, 5, "fd00::1")], payload=1232, limit=512
    )
    msg = dns.message.from_wire(wire)
    assert msg.edns == -1 and not msg.flags & dns.flags.AA
    assert [r.to_text() for r in msg.answer[0]] == ["fd00::1"]


def test_repeated_owners_are_compressed() -> None:
    query = parse_query(query_wire("many.default.svc.cluster.local.", use_edns=0, payload=4096))
    owner = query.questions[0].labels
    records = [dnswire.address_record(owner, 30, f"10.244.7.{i}") for i in range(1, 61)]
    wire = dnswire.response(query, records, payload=1232, limit=4096)
    assert len(wire) < 12 + 36 + 60 * 16 + 11 + 1  # a 2-byte pointer for each owner
    msg = dns.message.from_wire(wire)
    assert len(msg.answer[0]) == 60


def test_an_answer_over_the_limit_is_truncated() -> None:
    query = parse_query(query_wire("many.default.svc.cluster.local.", use_edns=0, payload=600))
    owner = query.questions[0].labels
    records = [dnswire.address_record(owner, 30, f"10.244.7.{i}") for i in range(1, 61)]
    wire = dnswire.response(query, records, payload=1232, limit=query.udp_limit)
    assert len(wire) <= 600
    msg = dns.message.from_wire(wire)
    assert msg.flags & dns.flags.TC and msg.answer == [] and msg.id == query.id
    assert msg.question[0].name.to_text() == "many.default.svc.cluster.local."
    assert msg.edns == 0  # the client still learns our EDNS size


def test_an_upstream_answer_over_the_limit_is_truncated() -> None:
    q = dns.message.make_query("big.test.", "A", use_edns=0)
    r = dns.message.make_response(q)
    r.answer.append(dns.rrset.from_text_list(
        "big.test.", 60, "IN", "A", [f"192.0.2.{i}" for i in range(1, 101)]))  # fmt: skip
    big = r.to_wire(max_size=65535)
    assert len(big) > 512
    cut = dnswire.truncated(big, 512)
    msg = dns.message.from_wire(cut)
    assert msg.flags & dns.flags.TC and msg.id == q.id and msg.answer == []
    assert msg.question == r.question and msg.edns == 0
    assert dnswire.truncated(cut, 512) == cut  # what fits is left as it is


def test_error_answers() -> None:
    query = parse_query(query_wire())
    msg = dns.message.from_wire(
        dnswire.error_response(query, dnswire.SERVFAIL, payload=1232, limit=512)
    )
    assert msg.rcode() == dns.rcode.SERVFAIL and msg.answer == [] and msg.id == query.id
    assert msg.question[0].name.to_text() == NAME


def cut_question() -> bytes:
    return b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\xff"


@pytest.mark.parametrize(
    ("wire", "words"),
    [
        (b"hi", "shorter than a DNS header"),
        (cut_question(), "cut off at byte 12"),
        (b"\xab\xcd\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\x03ab", "label is cut off"),
        (b"\x00\x01\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\xc0\x0c\x00\x01\x00\x01",
         "points forward"),
        (b"\x00\x01\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\x40\x00\x01\x00\x01",
         "unknown label type"),
        (query_wire() + b"junk", "4 bytes after the message"),
        (query_wire()[:-1], "a question is cut off"),
        (b"\x00\x01\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00" + (b"\x3f" + b"a" * 63) * 5
         + b"\x00\x00\x01\x00\x01", "longer than 255"),
    ],
)  # fmt: skip
def test_bytes_that_are_not_a_query_say_what_is_wrong(wire: bytes, words: str) -> None:
    with pytest.raises(Malformed, match=words):
        parse_query(wire)


def test_edns_out_of_place_or_twice() -> None:
    q = dns.message.make_query(NAME, "A", use_edns=0)
    wire = q.to_wire()
    opt = b"\x00" + struct.pack("!HHIH", 41, 1232, 0, 0)
    twice = wire[:10] + struct.pack("!H", 2) + wire[12:] + opt
    with pytest.raises(Malformed, match="EDNS"):
        parse_query(twice)
    plain = query_wire()
    in_answers = plain[:6] + struct.pack("!H", 1) + plain[8:] + opt
    with pytest.raises(Malformed, match="EDNS"):
        parse_query(in_answers)


@fuzz(2)
@given(wire=st.binary(max_size=300))
def test_any_bytes_parse_or_raise_malformed(wire: bytes) -> None:
    try:
        query = parse_query(wire)
    except Malformed:
        return
    for q in query.questions:  # what parses can be answered
        dnswire.response(query, payload=1232, limit=512)
        q.text()


@fuzz()
@given(
    labels=st.lists(st.binary(min_size=1, max_size=20), min_size=1, max_size=6),
    rdtype=st.sampled_from(["A", "AAAA", "TXT", "SRV"]),
    edns=st.sampled_from([-1, 0]),
)
def test_any_query_dnspython_writes_reads_the_same(
    labels: list[bytes], rdtype: str, edns: int
) -> None:
    name = dns.name.Name([*labels, b""])
    q = dns.message.make_query(name, rdtype, use_edns=edns, payload=1400)
    parsed = parse_query(q.to_wire())
    (question,) = parsed.questions
    assert question.labels == tuple(labels)
    assert question.rdtype == dns.rdatatype.from_text(rdtype)
    assert parsed.edns_payload == (1400 if edns == 0 else None)
    # and our answer echoes it so that dnspython matches it to its query
    reply = dns.message.from_wire(dnswire.response(parsed, payload=1232, limit=512))
    assert q.is_response(reply)
