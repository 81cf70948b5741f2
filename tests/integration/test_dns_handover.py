"""An upgrade hands a pod's DNS sockets (UDP 15053 and its TCP listener) to the new agent:
after the hand-over the new agent's proxy answers on the very same port, over UDP and
TCP, and a socket that is not what its kind says is refused (a cold start)."""

from __future__ import annotations

import asyncio
import shutil
import socket
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import dns.asyncquery
import dns.message
import dns.rcode
import pytest
import uvloop

from nodeagent.control.files import load_directory
from nodeagent.model.snapshot import MeshSnapshot
from nodeagent.proxy.dns import DnsListeners, DnsProxy, Forwarder
from nodeagent.proxy.handover import HandoverServer, Inherited, Listener, receive
from nodeagent.telemetry.metrics import Metrics

POD = ("default/client", "/run/netns/client", "10.244.1.5")
SERVICE = """
apiVersion: v1
kind: Service
metadata: {name: reviews, namespace: default}
spec: {clusterIP: 10.96.0.20, selector: {app: reviews}, ports: [{name: http, port: 9080}]}
"""


@pytest.fixture
def root() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="na-dns-ho-", dir="/tmp"))  # short: sun_path limit
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def bound_pair() -> tuple[socket.socket, socket.socket]:
    tcp = socket.socket()
    tcp.bind(("127.0.0.1", 0))
    tcp.listen(16)
    tcp.setblocking(False)
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind(tcp.getsockname())
    udp.setblocking(False)
    return udp, tcp


class OldAgent:
    """An agent's DNS proxy (an empty mesh: every name is SERVFAIL, no upstream) and its
    hand-over server, in an event loop of their own thread."""

    def __init__(self, path: Path, udp: socket.socket, tcp: socket.socket, kind: str) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.listeners: DnsListeners | None = None
        port = tcp.getsockname()[1]

        async def on_ready(pid: int) -> None:
            assert self.listeners is not None
            self.listeners.close()

        async def start() -> HandoverServer:
            proxy = DnsProxy(lambda: MeshSnapshot(), Forwarder(()), Metrics())
            self.listeners = await proxy.serve(lambda: "default", udp, tcp)
            lst = self.listeners
            server = HandoverServer(
                path,
                "node1",
                lambda: [
                    (Listener(kind, port, *POD), lst.udp_socket),
                    (Listener("dns-tcp", port, *POD), lst.tcp_socket),
                ],
                on_ready,
                hello_timeout=1,
                ready_timeout=5,
            )
            server.start()
            return server

        self.server = asyncio.run_coroutine_threadsafe(start(), self.loop).result(5)

    def stop(self) -> None:
        async def close() -> None:
            self.server.close()
            if self.listeners is not None:
                self.listeners.close()

        asyncio.run_coroutine_threadsafe(close(), self.loop).result(5)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()


def test_the_new_agent_answers_on_the_handed_over_dns_sockets(root: Path, tmp_path: Path) -> None:
    (tmp_path / "mesh.yaml").write_text(SERVICE)
    snap = load_directory(tmp_path).snapshot
    udp, tcp = bound_pair()
    port = tcp.getsockname()[1]
    old = OldAgent(root / "handover.sock", udp, tcp, "dns-udp")
    try:
        got = receive(root / "handover.sock", "node1", timeout=3)
        assert isinstance(got, Inherited)
        new_udp = got.take("dns-udp", port, *POD)
        new_tcp = got.take("dns-tcp", port, *POD)
        assert new_udp is not None and new_tcp is not None
        assert new_udp.getsockname() == new_tcp.getsockname() == ("127.0.0.1", port)

        async def main() -> None:
            proxy = DnsProxy(lambda: snap, Forwarder(()), Metrics())
            listeners = await proxy.serve(lambda: "default", new_udp, new_tcp)
            try:
                assert await asyncio.to_thread(got.release, 5) is True
                q = dns.message.make_query("reviews.default.svc.cluster.local.", "A")
                for ask in (dns.asyncquery.udp, dns.asyncquery.tcp):
                    answer = await ask(q, "127.0.0.1", timeout=5, port=port)
                    # the new agent's mesh answers (the old one's would be SERVFAIL)
                    assert answer.rcode() == dns.rcode.NOERROR
                    assert [r.to_text() for s in answer.answer for r in s] == ["10.96.0.20"]
            finally:
                listeners.close()

        uvloop.run(main())
    finally:
        old.stop()


def test_a_udp_socket_said_to_be_a_listener_is_a_cold_start(root: Path) -> None:
    udp, tcp = bound_pair()
    old = OldAgent(root / "handover.sock", udp, tcp, "dns-tcp")  # the UDP one sent as dns-tcp
    try:
        assert receive(root / "handover.sock", "node1", timeout=3) is None
    finally:
        old.stop()
