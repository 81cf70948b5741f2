"""The DNS proxy: a UDP and a TCP server on port 15053 in each captured pod's network
(ztunnel's port), fed by capture of the pod's port 53 traffic.

Each query is answered from the current snapshot when it asks ``A`` or ``AAAA`` of a
name the mesh knows (``core/dns.py``: Services, ServiceEntry hosts, pods), as seen from
the asking pod's namespace; everything else — unknown names, other record types, other
classes — goes unchanged to the node's resolver (``Forwarder``), and a resolver that
fails or does not answer in time gets the client a ``SERVFAIL``. A UDP answer larger
than the client can take (512 bytes, or its EDNS size) is truncated with ``TC`` set so
the client retries over TCP. Bytes that are not a DNS query never take the server down:
a message that cannot be parsed gets ``FORMERR`` when it has an ID to answer, else
nothing. Counted in ``nodeagent_dns_requests_total`` by answer (``local``,
``forwarded``, ``failed``, ``malformed``).

The wire format is ``protocol/dnswire.py``'s; the sockets are handed in (opened in the
pod's netns by ``proxy/pods.py``), so the server runs on loopback in tests.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import random
import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Final, cast

from nodeagent.core.dns import TTL, DnsTable
from nodeagent.model.snapshot import MeshSnapshot, PerSnapshot
from nodeagent.model.traffic import CLUSTER_DOMAIN
from nodeagent.protocol import dnswire
from nodeagent.protocol.dnswire import Query, Record
from nodeagent.proxy.peerwarn import warn_once
from nodeagent.telemetry.metrics import Metrics

log = logging.getLogger("nodeagent.dns")

DNS_PORT: Final = 15053
"""The DNS proxy's port in each pod's network (ztunnel's)."""
EDNS_PAYLOAD: Final = 1232
"""The UDP size our answers advertise (the DNS flag day's advice)."""
TCP_IDLE_TIMEOUT: Final = 5.0
"""Seconds a TCP client may wait before its next query (ztunnel's request timeout)."""
MAX_IN_FLIGHT: Final = 256
"""UDP queries of one pod being answered at once; beyond, new ones are dropped (counted
``dropped``) and the client's resolver retries."""
MAX_TCP_CONNECTIONS: Final = 64
"""TCP connections of one pod's DNS listener at once; beyond, new ones are closed."""
SO_MARK: Final = 36
"""``SO_MARK``: the forwarder's queries carry the proxy's mark, so capture passes them."""

Addr = tuple[str, int]


@dataclass(frozen=True)
class DnsSettings:
    """What the DNS proxy of a node is given."""

    upstreams: tuple[Addr, ...]
    """The resolvers other names are forwarded to, tried in order."""
    timeout: float = 5.0
    """Seconds they get, together, to answer one query."""
    mark: int = 0
    """``SO_MARK`` of the forwarded queries (the capture's mark: never captured)."""
    domain: str = CLUSTER_DOMAIN


class ForwardError(Exception):
    """The upstream resolver did not answer, or answered something that is not the answer."""


def parse_upstreams(text: str) -> tuple[Addr, ...]:
    """``--dns-upstream``: comma-separated ``IP``, ``IP:PORT`` or ``[IPv6]:PORT``;
    raises ValueError naming the part that is not one."""
    out: list[Addr] = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        host, port = part, 53
        if part.startswith("["):
            host, _, rest = part[1:].partition("]")
            if rest:
                port = _port(rest.removeprefix(":"), part)
        elif part.count(":") == 1:
            host, raw = part.split(":")
            port = _port(raw, part)
        try:
            ipaddress.ip_address(host)
        except ValueError:
            raise ValueError(f"{part!r} is not an IP address or IP:PORT") from None
        out.append((host, port))
    return tuple(out)


def _port(raw: str, part: str) -> int:
    if not raw.isdigit() or not 0 < int(raw) < 65536:
        raise ValueError(f"{part!r}: {raw!r} is not a port number")
    return int(raw)


def resolv_conf_upstreams(path: str | Path = "/etc/resolv.conf") -> tuple[Addr, ...]:
    """The ``nameserver`` lines of the node's resolv.conf (unreadable or none: empty)."""
    try:
        text = Path(path).read_text(errors="replace")
    except OSError:
        return ()
    out: list[Addr] = []
    for line in text.splitlines():
        words = line.split()
        if len(words) >= 2 and words[0] == "nameserver":
            try:
                out.append((str(ipaddress.ip_address(words[1].split("%")[0])), 53))
            except ValueError:
                continue
    return tuple(out)


class _UdpReply(asyncio.DatagramProtocol):
    def __init__(self, query_id: bytes) -> None:
        self.query_id = query_id
        self.reply: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        # a stray or spoofed datagram without our ID is not the answer
        if data[:2] == self.query_id and len(data) >= 12 and not self.reply.done():
            self.reply.set_result(data)

    def error_received(self, exc: Exception) -> None:
        if not self.reply.done():
            self.reply.set_exception(exc)


class Forwarder:
    """Sends the queries the mesh does not answer to the node's resolvers, in order,
    each given its share of ``timeout``."""

    def __init__(self, upstreams: tuple[Addr, ...], timeout: float = 5.0, mark: int = 0) -> None:
        self.upstreams = upstreams
        self.timeout = timeout
        self.mark = mark

    async def forward(self, query: bytes, tcp: bool) -> bytes:
        """The upstream's answer to ``query`` (over TCP when ``tcp``); raises ForwardError."""
        if not self.upstreams:
            raise ForwardError("no upstream resolver (none in resolv.conf, no --dns-upstream)")
        share = self.timeout / len(self.upstreams)
        problems: list[str] = []
        for upstream in self.upstreams:
            try:
                async with asyncio.timeout(share):
                    if tcp:
                        return await self._tcp(upstream, query)
                    return await self._udp(upstream, query)
            except TimeoutError:
                problems.append(f"{upstream[0]}:{upstream[1]}: no answer in {share:g}s")
            except (OSError, ForwardError) as e:
                problems.append(f"{upstream[0]}:{upstream[1]}: {e}")
        raise ForwardError("; ".join(problems))

    def _socket(self, upstream: Addr, kind: socket.SocketKind) -> socket.socket:
        family = socket.AF_INET6 if ":" in upstream[0] else socket.AF_INET
        s = socket.socket(family, kind)
        try:
            if self.mark:
                s.setsockopt(socket.SOL_SOCKET, SO_MARK, self.mark)
            s.setblocking(False)
        except OSError:
            s.close()
            raise
        return s

    async def _udp(self, upstream: Addr, query: bytes) -> bytes:
        loop = asyncio.get_running_loop()
        s = self._socket(upstream, socket.SOCK_DGRAM)
        try:
            s.connect(upstream)
        except OSError:
            s.close()
            raise
        transport, proto = await loop.create_datagram_endpoint(lambda: _UdpReply(query[:2]), sock=s)
        try:
            transport.sendto(query)
            return await proto.reply
        finally:
            transport.close()

    async def _tcp(self, upstream: Addr, query: bytes) -> bytes:
        loop = asyncio.get_running_loop()
        s = self._socket(upstream, socket.SOCK_STREAM)
        try:
            await loop.sock_connect(s, upstream)
            reader, writer = await asyncio.open_connection(sock=s)
        except BaseException:
            s.close()
            raise
        try:
            writer.write(struct.pack("!H", len(query)) + query)
            (size,) = struct.unpack("!H", await reader.readexactly(2))
            reply = await reader.readexactly(size)
        except asyncio.IncompleteReadError:
            raise ForwardError("closed the connection before its answer") from None
        finally:
            writer.close()
        if reply[:2] != query[:2]:
            raise ForwardError("answered with another query's ID")
        return reply


class DnsProxy:
    """Answers DNS queries for the pods of this node (one instance, shared by every
    pod's listeners, which name the asking pod's namespace)."""

    def __init__(
        self,
        snapshot: Callable[[], MeshSnapshot],
        forwarder: Forwarder,
        metrics: Metrics,
        domain: str = CLUSTER_DOMAIN,
    ) -> None:
        self.snapshot = snapshot
        self.forwarder = forwarder
        self.metrics = metrics
        self._table = PerSnapshot(lambda snap: DnsTable.build(snap, domain))

    async def answer(self, wire: bytes, namespace: str, tcp: bool) -> bytes | None:
        """The answer to one query from a pod of ``namespace`` (None: nothing to say)."""
        try:
            query = dnswire.parse_query(wire)
        except dnswire.Malformed as e:
            return self._malformed(wire, e)
        if query.is_response:
            self._count("malformed")
            return None  # an answer sent to us: answering it could loop
        if query.opcode != dnswire.OPCODE_QUERY:
            self._count("malformed")
            return self._error(query, dnswire.NOTIMP, tcp)
        if len(query.questions) != 1:
            self._count("malformed")
            return self._error(query, dnswire.FORMERR, tcp)
        q = query.questions[0]
        name = q.text()
        if (
            name is not None
            and q.rdclass == dnswire.CLASS_IN
            and q.rdtype in (dnswire.TYPE_A, dnswire.TYPE_AAAA)
        ):
            family = 4 if q.rdtype == dnswire.TYPE_A else 6
            found = self._table.get(self.snapshot()).lookup(name, namespace, family)
            if found is not None:
                self._count("local")
                records: list[Record] = []
                owner = q.labels
                if found.stripped is not None:
                    records.append(dnswire.cname_record(q.labels, TTL, found.stripped))
                    owner = records[0].rdata_name or owner
                addrs = list(found.addresses)
                random.shuffle(addrs)  # as ztunnel: spread clients over a headless set
                records.extend(dnswire.address_record(owner, TTL, a) for a in addrs)
                limit = _limit(query, tcp)
                return dnswire.response(
                    query, records, authoritative=True, payload=EDNS_PAYLOAD, limit=limit
                )
        return await self._forward(query, wire, tcp)

    async def _forward(self, query: Query, wire: bytes, tcp: bool) -> bytes:
        try:
            reply = await self.forwarder.forward(wire, tcp)
        except ForwardError as e:
            self._count("failed")
            warn_once(log, "forward", "DNS upstream failed (answering SERVFAIL): %s", e)
            return self._error(query, dnswire.SERVFAIL, tcp)
        self._count("forwarded")
        if tcp or len(reply) <= query.udp_limit:
            return reply
        try:  # the upstream answered bigger than this client takes over UDP
            return dnswire.truncated(reply, query.udp_limit)
        except dnswire.Malformed:  # an upstream's bytes, whatever they are
            return self._error(query, dnswire.SERVFAIL, tcp)

    def _malformed(self, wire: bytes, error: Exception) -> bytes | None:
        self._count("malformed")
        warn_once(log, "malformed", "DNS query that is not one (answered FORMERR): %s", error)
        if len(wire) < 12 or wire[2] & 0x80:  # no ID to answer, or a response
            return None
        flags = 0x8000 | (wire[2] & 0x79) << 8 | dnswire.FORMERR  # QR, opcode, RD
        return wire[:2] + struct.pack("!HHHHH", flags, 0, 0, 0, 0)

    def _error(self, query: Query, rcode: int, tcp: bool) -> bytes:
        return dnswire.error_response(query, rcode, payload=EDNS_PAYLOAD, limit=_limit(query, tcp))

    def _count(self, answer: str) -> None:
        self.metrics.dns_requests.labels(answer).inc()

    async def serve(
        self, namespace: Callable[[], str], udp: socket.socket, tcp: socket.socket
    ) -> DnsListeners:
        """Serve a pod's UDP socket (bound) and TCP socket (listening); ``namespace``
        reads the pod's namespace when a query comes."""
        loop = asyncio.get_running_loop()
        transport, _ = await loop.create_datagram_endpoint(
            lambda: _UdpServer(self, namespace), sock=udp
        )
        tcp_server = _TcpServer(self, namespace)
        server = await asyncio.start_server(tcp_server.handle, sock=tcp)
        return DnsListeners(transport, server)


def _limit(query: Query, tcp: bool) -> int:
    return 65535 if tcp else query.udp_limit


class DnsListeners:
    """One pod's two DNS listeners; ``close`` when the pod leaves."""

    def __init__(self, udp: asyncio.DatagramTransport, tcp: asyncio.Server) -> None:
        self.udp = udp
        self.tcp = tcp

    @property
    def udp_socket(self) -> socket.socket:
        """The UDP socket (for a hand-over to the next agent)."""
        return cast(socket.socket, self.udp.get_extra_info("socket"))

    @property
    def tcp_socket(self) -> socket.socket:
        """The TCP listener (for a hand-over to the next agent)."""
        return self.tcp.sockets[0]

    def close(self) -> None:
        self.udp.close()
        self.tcp.close()


class _UdpServer(asyncio.DatagramProtocol):
    def __init__(self, proxy: DnsProxy, namespace: Callable[[], str]) -> None:
        self.proxy = proxy
        self.namespace = namespace
        self.transport: asyncio.DatagramTransport | None = None
        self.tasks: set[asyncio.Task[None]] = set()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's UDPTransport is not a DatagramTransport subclass, but is one
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        if len(self.tasks) >= MAX_IN_FLIGHT:
            self.proxy._count("dropped")
            return
        task = asyncio.get_running_loop().create_task(self._answer(data, addr))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _answer(self, data: bytes, addr: tuple[str, int]) -> None:
        reply = await self.proxy.answer(data, self.namespace(), tcp=False)
        if reply is not None and self.transport is not None and not self.transport.is_closing():
            self.transport.sendto(reply, addr)

    def connection_lost(self, exc: Exception | None) -> None:
        for task in self.tasks:
            task.cancel()


class _TcpServer:
    def __init__(self, proxy: DnsProxy, namespace: Callable[[], str]) -> None:
        self.proxy = proxy
        self.namespace = namespace
        self.open = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.open >= MAX_TCP_CONNECTIONS:
            self.proxy._count("dropped")
            writer.close()
            return
        self.open += 1
        try:
            while True:  # queries one after the other until the client is done or idle
                async with asyncio.timeout(TCP_IDLE_TIMEOUT):
                    (size,) = struct.unpack("!H", await reader.readexactly(2))
                    query = await reader.readexactly(size)
                reply = await self.proxy.answer(query, self.namespace(), tcp=True)
                if reply is None:
                    break
                writer.write(struct.pack("!H", len(reply)) + reply)
                await writer.drain()
        except (TimeoutError, asyncio.IncompleteReadError, ConnectionError):
            pass  # idle, or gone: the connection ends
        finally:
            self.open -= 1
            writer.close()
