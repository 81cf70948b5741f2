"""The DNS proxy on loopback, over real UDP and TCP, asked by dnspython as a pod's
resolver would ask: the mesh's names answered locally, the rest forwarded to a resolver
this test runs, SERVFAIL when that resolver fails, truncation for UDP, and bytes that
are not DNS never stopping it."""

from __future__ import annotations

import asyncio
import socket
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import dns.asyncquery
import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdatatype
import dns.rrset
import pytest
import uvloop
from fuzzing import fuzz
from hypothesis import given
from hypothesis import strategies as st

from nodeagent.control.files import load_directory
from nodeagent.model.snapshot import MeshSnapshot
from nodeagent.proxy.dns import DnsProxy, Forwarder, parse_upstreams, resolv_conf_upstreams
from nodeagent.telemetry.metrics import Metrics

HEADLESS_PODS = 60

MESH = """
apiVersion: v1
kind: Service
metadata: {name: reviews, namespace: default}
spec: {clusterIP: 10.96.0.20, selector: {app: reviews}, ports: [{name: http, port: 9080}]}
---
apiVersion: v1
kind: Service
metadata: {name: reviews, namespace: other}
spec: {clusterIP: 10.96.0.21, selector: {app: reviews}, ports: [{name: http, port: 9080}]}
---
apiVersion: v1
kind: Service
metadata: {name: many, namespace: default}
spec: {clusterIP: None, selector: {app: many}, ports: [{name: tcp, port: 7}]}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: httpbin, namespace: default}
spec:
  hosts: [httpbin.example.com]
  ports: [{number: 80, name: http, protocol: HTTP}]
  resolution: DNS
""" + "".join(
    f"""---
apiVersion: v1
kind: Pod
metadata: {{name: many-{i}, namespace: default, labels: {{app: many}}}}
spec: {{nodeName: n1, containers: [{{name: c}}]}}
status: {{podIP: 10.244.7.{i + 1}}}
"""
    for i in range(HEADLESS_PODS)
)

UPSTREAM_NAMES = {"example.test.": "192.0.2.1"}
"""What the test's upstream resolver knows; ``big.test`` answers 100 addresses
whatever the client can take, other names NXDOMAIN."""


def upstream_answer(wire: bytes) -> bytes:
    query = dns.message.from_wire(wire)
    response = dns.message.make_response(query)
    q = query.question[0]
    name = q.name.to_text().lower()
    if name == "big.test.":
        addrs = [f"192.0.2.{i}" for i in range(1, 101)]
        response.answer.append(dns.rrset.from_text_list(q.name, 60, "IN", "A", addrs))
    elif name in UPSTREAM_NAMES and q.rdtype == dns.rdatatype.A:
        response.answer.append(dns.rrset.from_text(q.name, 60, "IN", "A", UPSTREAM_NAMES[name]))
    elif name not in UPSTREAM_NAMES:
        response.set_rcode(dns.rcode.NXDOMAIN)
    return response.to_wire()


class _Upstream(asyncio.DatagramProtocol):
    transport: asyncio.DatagramTransport

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's UDPTransport is not a DatagramTransport subclass, but is one
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.transport.sendto(upstream_answer(data), addr)


@asynccontextmanager
async def upstream_resolver() -> AsyncIterator[tuple[str, int]]:
    """A resolver on loopback, UDP and TCP on one port."""
    loop = asyncio.get_running_loop()

    async def tcp(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        (size,) = struct.unpack("!H", await r.readexactly(2))
        reply = upstream_answer(await r.readexactly(size))
        w.write(struct.pack("!H", len(reply)) + reply)
        await w.drain()
        w.close()

    server = await asyncio.start_server(tcp, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    transport, _ = await loop.create_datagram_endpoint(_Upstream, local_addr=("127.0.0.1", port))
    try:
        yield "127.0.0.1", port
    finally:
        transport.close()
        server.close()


@dataclass
class Running:
    port: int
    metrics: Metrics

    def count(self, answer: str) -> float:
        return (
            self.metrics.registry.get_sample_value(
                "nodeagent_dns_requests_total", {"answer": answer}
            )
            or 0.0
        )

    async def udp(self, name: str, rdtype: str = "A", **kw: object) -> dns.message.Message:
        q = dns.message.make_query(name, rdtype, **kw)  # type: ignore[arg-type]
        return await dns.asyncquery.udp(q, "127.0.0.1", timeout=5, port=self.port)

    async def tcp(self, name: str, rdtype: str = "A") -> dns.message.Message:
        q = dns.message.make_query(name, rdtype)
        return await dns.asyncquery.tcp(q, "127.0.0.1", timeout=5, port=self.port)


@pytest.fixture(scope="module")
def snapshot(tmp_path_factory: pytest.TempPathFactory) -> MeshSnapshot:
    d: Path = tmp_path_factory.mktemp("mesh")
    (d / "mesh.yaml").write_text(MESH)
    return load_directory(d).snapshot


def bound_pair() -> tuple[socket.socket, socket.socket]:
    """A UDP socket and a TCP listener on one free loopback port."""
    tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    tcp.bind(("127.0.0.1", 0))
    tcp.listen(16)
    tcp.setblocking(False)
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind(tcp.getsockname())
    udp.setblocking(False)
    return udp, tcp


def run(
    snapshot: MeshSnapshot,
    body: Callable[[Running], Awaitable[None]],
    upstreams: tuple[tuple[str, int], ...] | None = None,
    namespace: str = "default",
    timeout: float = 1.0,
) -> None:
    async def main() -> None:
        async with upstream_resolver() as resolver:
            metrics = Metrics()
            forwarder = Forwarder(upstreams if upstreams is not None else (resolver,), timeout)
            proxy = DnsProxy(lambda: snapshot, forwarder, metrics)
            udp, tcp = bound_pair()
            listeners = await proxy.serve(lambda: namespace, udp, tcp)
            try:
                await body(Running(tcp.getsockname()[1], metrics))
            finally:
                listeners.close()

    uvloop.run(main())


def addresses(msg: dns.message.Message) -> list[str]:
    return sorted(r.to_text() for rrset in msg.answer for r in rrset if rrset.rdtype != 5)


def test_a_service_name_is_answered_locally_over_udp_and_tcp(snapshot: MeshSnapshot) -> None:
    async def body(p: Running) -> None:
        for ask in (p.udp, p.tcp):
            msg = await ask("reviews.default.svc.cluster.local.")
            assert msg.rcode() == dns.rcode.NOERROR and addresses(msg) == ["10.96.0.20"]
            assert msg.flags & dns.flags.AA and msg.answer[0].ttl == 30
        assert p.count("local") == 2 and p.count("forwarded") == 0

    run(snapshot, body)


def test_the_askers_namespace_and_search_domains(snapshot: MeshSnapshot) -> None:
    async def body(p: Running) -> None:
        msg = await p.udp("reviews.other.svc.cluster.local.")
        assert addresses(msg) == ["10.96.0.21"]
        # "reviews.default" from a pod of "other": its resolver appends its first search domain
        msg = await p.udp("reviews.default.other.svc.cluster.local.")
        cname, a = msg.answer
        assert cname.rdtype == dns.rdatatype.CNAME and cname[0].to_text() == "reviews.default."
        assert a.name.to_text() == "reviews.default." and addresses(msg) == ["10.96.0.20"]

    run(snapshot, body, namespace="other")


def test_a_service_entry_host_gets_its_allocated_address(snapshot: MeshSnapshot) -> None:
    async def body(p: Running) -> None:
        msg = await p.udp("httpbin.example.com.")
        (addr,) = addresses(msg)
        assert addr.startswith("240.240.")
        assert snapshot.service_for_address(addr) is not None

    run(snapshot, body)


def test_aaaa_of_a_v4_name_is_an_empty_noerror(snapshot: MeshSnapshot) -> None:
    async def body(p: Running) -> None:
        msg = await p.udp("reviews.default.svc.cluster.local.", "AAAA")
        assert msg.rcode() == dns.rcode.NOERROR and msg.answer == []
        assert p.count("local") == 1

    run(snapshot, body)


def test_other_names_and_types_go_to_the_upstream(snapshot: MeshSnapshot) -> None:
    async def body(p: Running) -> None:
        assert addresses(await p.udp("example.test.")) == ["192.0.2.1"]
        assert addresses(await p.tcp("example.test.")) == ["192.0.2.1"]
        assert (await p.udp("nosuch.test.")).rcode() == dns.rcode.NXDOMAIN
        # a record type the mesh does not answer, even for a mesh name
        msg = await p.udp("reviews.default.svc.cluster.local.", "TXT")
        assert msg.rcode() == dns.rcode.NXDOMAIN  # the upstream's word, not ours
        assert p.count("forwarded") == 4 and p.count("local") == 0

    run(snapshot, body)


def test_an_upstream_that_fails_gets_the_client_servfail(snapshot: MeshSnapshot) -> None:
    silent = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)  # never answers
    silent.bind(("127.0.0.1", 0))
    closed = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)  # nobody there: refused
    closed.bind(("127.0.0.1", 0))
    closed_addr = closed.getsockname()
    closed.close()

    async def body(p: Running) -> None:
        loop = asyncio.get_running_loop()
        start = loop.time()
        msg = await p.udp("example.test.")
        assert msg.rcode() == dns.rcode.SERVFAIL
        assert loop.time() - start < 2.0, "the forwarder's timeout bounds the wait"
        assert (await p.tcp("example.test.")).rcode() == dns.rcode.SERVFAIL
        # the mesh's names are still answered
        assert addresses(await p.udp("reviews.default.svc.cluster.local.")) == ["10.96.0.20"]
        assert p.count("failed") == 2 and p.count("local") == 1

    try:
        run(snapshot, body, upstreams=(silent.getsockname(), closed_addr), timeout=1.0)
    finally:
        silent.close()


def test_udp_answers_are_truncated_to_what_the_client_takes(snapshot: MeshSnapshot) -> None:
    async def body(p: Running) -> None:
        msg = await p.udp("many.default.svc.cluster.local.")
        assert msg.flags & dns.flags.TC
        assert len(msg.to_wire()) <= 512
        msg = await p.udp("many.default.svc.cluster.local.", use_edns=0, payload=4096)
        assert not msg.flags & dns.flags.TC and len(addresses(msg)) == HEADLESS_PODS
        msg = await p.tcp("many.default.svc.cluster.local.")
        assert len(addresses(msg)) == HEADLESS_PODS
        # the upstream's answer too, when it is bigger than the client asked for
        big = await p.udp("big.test.")
        assert big.flags & dns.flags.TC and len(big.to_wire()) <= 512
        assert len(addresses(await p.tcp("big.test."))) == 100

    run(snapshot, body)


def test_bytes_that_are_not_dns_never_stop_the_server(snapshot: MeshSnapshot) -> None:
    async def body(p: Running) -> None:
        loop = asyncio.get_running_loop()
        raw = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        raw.setblocking(False)
        raw.connect(("127.0.0.1", p.port))
        try:
            raw.send(b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\xff")  # cut question
            reply = await asyncio.wait_for(loop.sock_recv(raw, 4096), 5)
            assert reply[:2] == b"\x12\x34" and reply[3] & 0x0F == dns.rcode.FORMERR
            raw.send(b"hi")  # too short to have an ID: no answer
        finally:
            raw.close()
        r, w = await asyncio.open_connection("127.0.0.1", p.port)
        cut = b"\xab\xcd\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\x03ab"
        w.write(struct.pack("!H", len(cut)) + cut)  # TCP: a cut message gets FORMERR
        (size,) = struct.unpack("!H", await asyncio.wait_for(r.readexactly(2), 5))
        reply = await r.readexactly(size)
        assert reply[:2] == b"\xab\xcd" and reply[3] & 0x0F == dns.rcode.FORMERR
        w.write(b"\x00\x05junk!")  # a frame without even an ID: the connection ends
        assert await asyncio.wait_for(r.read(), 5) == b""
        w.close()
        assert addresses(await p.udp("reviews.default.svc.cluster.local.")) == ["10.96.0.20"]
        assert p.count("malformed") == 4

    run(snapshot, body)


@fuzz(1.5)
@given(wire=st.binary(max_size=600))
def test_any_bytes_get_a_well_formed_answer_or_none(wire: bytes) -> None:
    proxy = DnsProxy(lambda: MeshSnapshot(), Forwarder(()), Metrics())
    for tcp in (False, True):
        reply = asyncio.run(proxy.answer(wire, "default", tcp))
        if reply is not None:
            assert reply[:2] == wire[:2] and reply[2] & 0x80  # our ID, a response
            if not tcp:
                assert len(reply) <= 65535


@fuzz()
@given(
    name=st.lists(st.binary(min_size=1, max_size=20), min_size=1, max_size=6),
    rdtype=st.sampled_from(["A", "AAAA"]),
)
def test_any_name_asked_is_answered(name: list[bytes], rdtype: str) -> None:
    qname = dns.name.Name([*name, b""])
    proxy = DnsProxy(lambda: MeshSnapshot(), Forwarder(()), Metrics())
    query = dns.message.make_query(qname, rdtype)
    wire = asyncio.run(proxy.answer(query.to_wire(), "default", False))
    assert wire is not None
    reply = dns.message.from_wire(wire)
    assert reply.rcode() == dns.rcode.SERVFAIL  # no upstream, not ours: SERVFAIL, no crash


def test_upstreams_from_the_flag_and_resolv_conf(tmp_path: Path) -> None:
    assert parse_upstreams("10.0.0.1, 10.0.0.2:5353,[fd00::1]:53,fd00::2") == (
        ("10.0.0.1", 53),
        ("10.0.0.2", 5353),
        ("fd00::1", 53),
        ("fd00::2", 53),
    )
    with pytest.raises(ValueError, match=r"'dns\.google'"):
        parse_upstreams("dns.google")
    with pytest.raises(ValueError, match="'99999'"):
        parse_upstreams("10.0.0.1:99999")
    conf = tmp_path / "resolv.conf"
    conf.write_text("search a.b\nnameserver 10.0.0.53\nnameserver bogus\nnameserver fe80::1%eth0\n")
    assert resolv_conf_upstreams(conf) == (("10.0.0.53", 53), ("fe80::1", 53))
    assert resolv_conf_upstreams(tmp_path / "missing") == ()
