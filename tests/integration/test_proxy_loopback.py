"""The real ``Proxy`` on loopback, without root: two nodes' proxies (node1 serves the
client pod, node2 the server pod) built from a mesh in YAML with the agent's own config
loader, real sockets, real TLS. Only the node is swapped out, through the proxy's two
interfaces: a loopback socket factory (each listener on 127.0.0.1 at a free port instead
of 15001/15006/15008 in the pod's netns) and a capture whose original destinations the
test records, keyed by the client's address as eBPF keys them.

The loopback network plays the capture of the destination's netns too: a connection
from one pod to another pod's IP arrives at that pod's inbound listener (15006), as
iptables PREROUTING would send it; a pod's connection to its own IP reaches its app.
"""

from __future__ import annotations

import asyncio
import errno
import hashlib
import io
import os
import socket
import tempfile
import textwrap
from collections.abc import Awaitable, Callable, Set
from pathlib import Path

import uvloop
from certs import spiffe_id

from nodeagent.control.files import load_directory
from nodeagent.errors import PeerError
from nodeagent.identity.ca import TRUST_BUNDLE, CertificateAuthority, csr_identity, init_ca
from nodeagent.identity.store import CertificateStore
from nodeagent.model.objects import HostWorkload, PodRuntime
from nodeagent.model.snapshot import MeshSnapshot
from nodeagent.proxy.connections import ConnectionTable
from nodeagent.proxy.identity import MeshIdentity
from nodeagent.proxy.inputs import OUTBOUND_PORT, ConnectionLimits, ProxyInputs
from nodeagent.proxy.server import Proxy
from nodeagent.proxy.spanexport import SpanExport
from nodeagent.telemetry.accesslog import AccessLog
from nodeagent.telemetry.metrics import Metrics

Addr = tuple[str, int]
CLIENT_IP, SERVER_IP, SERVICE_IP = "10.244.1.10", "10.244.2.20", "10.96.0.20"
INBOUND_PORT, HBONE_PORT = 15006, 15008
TCP_PORT, HTTP_PORT = 9000, 8080

MESH = f"""
apiVersion: v1
kind: Pod
metadata: {{name: client, namespace: default, labels: {{app: client}}}}
spec: {{nodeName: node1, serviceAccountName: client, containers: [{{name: c, image: x}}]}}
---
apiVersion: v1
kind: Pod
metadata: {{name: server, namespace: default, labels: {{app: echo}}}}
spec: {{nodeName: node2, serviceAccountName: server, containers: [{{name: c, image: x}}]}}
---
apiVersion: v1
kind: Service
metadata: {{name: echo, namespace: default}}
spec:
  selector: {{app: echo}}
  clusterIP: {SERVICE_IP}
  ports:
  - {{name: tcp, port: {TCP_PORT}, targetPort: {TCP_PORT}}}
  - {{name: http, port: 80, targetPort: {HTTP_PORT}}}
"""

DENY_CLIENT = """
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: no-client, namespace: default}
spec:
  selector: {matchLabels: {app: echo}}
  action: DENY
  rules:
  - from: [{source: {principals: [cluster.local/ns/default/sa/client]}}]
"""


# -- the node, swapped out ---------------------------------------------------------------


class Network:
    """Loopback standing in for the pods' networks: where each (pod IP, port) listener
    really is, where each app really listens, and the original destinations."""

    def __init__(self) -> None:
        self.listeners: dict[Addr, Addr] = {}
        self.apps: dict[Addr, Addr] = {}
        self.destinations: dict[Addr, Addr] = {}
        """client address → where it was going before capture."""

    def pod(self, runtime: PodRuntime) -> LoopbackPod:  # the SocketFactory
        return LoopbackPod(self, runtime.ip)

    async def dial(self, listener: Addr, dst: Addr, timeout: float = 10.0) -> socket.socket:
        """A connection to ``listener`` whose original destination is ``dst``."""
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        self.destinations[s.getsockname()] = dst
        await connected(s, listener, timeout)
        return s


async def connected(s: socket.socket, addr: Addr, timeout: float) -> None:
    """Connect the new socket ``s`` to ``addr`` (closed on failure) as the node's
    ``connect_in`` does: without ``asyncio.timeout``, since the proxy dials without a
    Task (``proxy.plumbing.drive``)."""
    s.setblocking(False)
    try:
        err = s.connect_ex(addr)
        # on loopback the handshake is usually done within connect() (TCP_INFO's state)
        if (
            err == errno.EINPROGRESS
            and s.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1)[0] == 1
        ):
            err = 0
        elif err == errno.EINPROGRESS:
            loop = asyncio.get_running_loop()
            fut: asyncio.Future[None] = loop.create_future()
            loop.add_writer(s.fileno(), lambda: fut.done() or fut.set_result(None))
            timer = loop.call_later(
                timeout, lambda: fut.done() or fut.set_exception(TimeoutError())
            )
            try:
                await fut
            finally:
                timer.cancel()
                loop.remove_writer(s.fileno())
            err = s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            raise OSError(err, os.strerror(err))
    except BaseException:
        s.close()
        raise


class LoopbackPod:
    """One pod's sockets (a ``PodSockets``)."""

    def __init__(self, net: Network, ip: str) -> None:
        self.net = net
        self.ip = ip

    def listen(self, host: str, port: int) -> socket.socket:
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        s.listen(128)
        s.setblocking(False)
        self.net.listeners[(self.ip, port)] = s.getsockname()
        return s

    def listen_udp(self, host: str, port: int) -> socket.socket:
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind(("127.0.0.1", 0))
        s.setblocking(False)
        return s

    async def connect(self, addr: Addr, timeout: float, source: str | None = None) -> socket.socket:
        net = self.net
        try:
            if addr[1] != HBONE_PORT and addr[0] != self.ip:
                inbound = net.listeners.get((addr[0], INBOUND_PORT))
                if inbound is not None:  # the destination pod's capture
                    return await net.dial(inbound, addr, timeout)
            real = net.listeners.get(addr) or net.apps.get(addr) or addr
            s = socket.socket()
            await connected(s, real, timeout)
            return s
        except (OSError, TimeoutError) as e:
            raise PeerError(f"cannot connect to {addr[0]}:{addr[1]}: {e}") from None

    def close(self) -> None:
        """Nothing held per pod."""


class RecordedCapture:
    """A capture whose original destinations the test recorded (a ``Capture``)."""

    def __init__(self, net: Network) -> None:
        self.net = net
        self.attached: set[str] = set()

    def on_snapshot(self, snap: MeshSnapshot, local: Set[str]) -> None:
        pass

    async def attach(
        self,
        pod_key: str,
        runtime: PodRuntime,
        listener: socket.socket,
        excluded: tuple[frozenset[int], frozenset[int]],
    ) -> str:
        self.attached.add(pod_key)
        return "recorded"

    def exclude(
        self,
        runtime: PodRuntime,
        listener: socket.socket,
        excluded: tuple[frozenset[int], frozenset[int]],
    ) -> None:
        pass

    async def detach(self, pod_key: str, runtime: PodRuntime) -> None:
        self.attached.discard(pod_key)

    def original_destination(self, transport: asyncio.BaseTransport, inbound: bool) -> Addr | None:
        peer = transport.get_extra_info("peername")
        return self.net.destinations.get((peer[0], peer[1]))

    async def attach_host(self, workload: HostWorkload) -> str:
        self.attached.add(workload.key)
        return "recorded host"

    async def detach_host(self, key: str) -> None:
        self.attached.discard(key)

    def host_stale(self) -> bool:
        return False

    async def refresh_hosts(self) -> dict[str, str]:
        return {}


# -- the apps ------------------------------------------------------------------------------


class Echo:
    """A TCP echo that counts the connections it accepted."""

    def __init__(self) -> None:
        self.accepted = 0
        self.server: asyncio.Server | None = None

    async def start(self) -> Addr:
        async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            self.accepted += 1
            while data := await r.read(65536):
                w.write(data)
                await w.drain()
            w.write_eof()
            w.close()

        self.server = await asyncio.start_server(handle, "127.0.0.1", 0)
        return self.server.sockets[0].getsockname()[:2]


async def http_app() -> asyncio.Server:
    """An HTTP/1.1 app answering every request with its path."""

    async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        try:
            while head := await r.readuntil(b"\r\n\r\n"):
                path = head.split(b" ", 2)[1]
                body = b"hello from server: " + path
                w.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body))
                await w.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        w.close()

    return await asyncio.start_server(handle, "127.0.0.1", 0)


# -- the rig -------------------------------------------------------------------------------


class Signer:
    """The mesh CA in process (what ``CertificateStore`` asks)."""

    def __init__(self, ca: CertificateAuthority) -> None:
        self.ca = ca

    async def sign(self, csr_pem: bytes, ttl_seconds: int) -> list[bytes]:
        return [p.encode() for p in self.ca.sign(csr_pem, csr_identity(csr_pem), ttl_seconds)]


class Rig:
    connection_limits = ConnectionLimits()
    """What a subclass may change: the proxies' connection caps and HBONE timeouts."""
    spans: Callable[[Metrics], SpanExport | None] = staticmethod(lambda _m: None)
    """Where each node's spans go (a subclass may export them)."""

    def __init__(self, tmp: Path, mtls: bool) -> None:
        self.dir = tmp / "mesh"
        self.dir.mkdir()
        (self.dir / "mesh.yaml").write_text(MESH)
        self.version = 1
        self.snap = self._load()
        self.mtls = mtls
        self.tmp = tmp
        self.net = Network()
        self.echo = Echo()
        self.proxies: dict[str, Proxy] = {}
        self.metrics: dict[str, Metrics] = {}
        self._log_files: list[io.BufferedWriter] = []
        self.identity: MeshIdentity | None = None
        """The mesh's certificates, with ``mtls`` (all of the rig's identities)."""

    def _load(self) -> MeshSnapshot:
        runtimes = {
            "default/client": PodRuntime("default/client", CLIENT_IP, "node1", "ns-client"),
            "default/server": PodRuntime("default/server", SERVER_IP, "node2", "ns-server"),
            **self.runtimes(),
        }
        return load_directory(self.dir, runtimes=runtimes, version=self.version).snapshot

    def runtimes(self) -> dict[str, PodRuntime]:
        """The runtimes of pods a subclass adds to the mesh."""
        return {}

    async def start(self) -> None:
        self.net.apps[(SERVER_IP, TCP_PORT)] = await self.echo.start()
        self.http = await http_app()
        self.net.apps[(SERVER_IP, HTTP_PORT)] = self.http.sockets[0].getsockname()[:2]
        identity = await self._identity() if self.mtls else None
        for node in ("node1", "node2"):
            metrics = self.metrics[node] = Metrics()
            inputs = ProxyInputs(
                node=node,
                snapshot=lambda: self.snap,
                metrics=metrics,
                table=ConnectionTable(metrics),
                # a file, as the agent's stdout or --access-log file (bench/l4_cost.py counts
                # it: a growing BytesIO cost ~3.6k instructions a request a file does not)
                access_log=AccessLog(self._log_file()),
                sockets=self.net,
                capture=RecordedCapture(self.net),
                identity=identity,
                connect_timeout=2.0,
                connection_limits=self.connection_limits,
                spans=self.spans(metrics),
            )
            proxy = self.proxies[node] = Proxy(inputs)
            await proxy.reconcile(self.snap)
            assert proxy.all_ready(), proxy.pod_states()

    async def _identity(self) -> MeshIdentity:
        ca_dir = init_ca(self.tmp / "ca")
        store = CertificateStore(
            Signer(CertificateAuthority.load(ca_dir)),
            "cluster.local",
            3600,
            str(ca_dir / TRUST_BUNDLE),
        )
        errors = await store.ensure(
            {spiffe_id("default", "client"), spiffe_id("default", "server"), *self.identities()}
        )
        assert not errors, errors
        self.identity = MeshIdentity(store, "cluster.local")
        return self.identity

    def identities(self) -> set[str]:
        """More certificates a subclass needs (a workload that is no pod of the rig)."""
        return set()

    def apply(self, text: str) -> None:
        """A config change, as the agent applies it: new snapshot, policies re-checked."""
        (self.dir / "policy.yaml").write_text(textwrap.dedent(text))
        self.version += 1
        self.snap = self._load()
        for proxy in self.proxies.values():
            proxy.admission.on_snapshot(self.snap)
            proxy.recheck(self.snap)

    async def connect(self, dst: Addr) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """The client pod dials ``dst``: captured to node1's outbound listener."""
        listener = self.net.listeners[(CLIENT_IP, OUTBOUND_PORT)]
        return await asyncio.open_connection(sock=await self.net.dial(listener, dst))

    def failures(self, node: str, direction: str, flag: str) -> float:
        value = self.metrics[node].registry.get_sample_value(
            "nodeagent_connection_failures_total",
            {"direction": direction, "response_flags": flag},
        )
        return value or 0.0

    def tcp_sent(self, node: str) -> dict[tuple[str, str, str], float]:
        """Bytes clients sent over closed connections, by (reporter, source workload,
        connection security policy), from ``node``'s metrics."""
        out: dict[tuple[str, str, str], float] = {}
        for family in self.metrics[node].registry.collect():
            if family.name == "istio_tcp_sent_bytes":
                for sample in family.samples:
                    lb = sample.labels
                    key = (lb["reporter"], lb["source_workload"], lb["connection_security_policy"])
                    out[key] = out.get(key, 0.0) + sample.value
        return out

    def _log_file(self) -> io.BufferedWriter:
        f = open(os.devnull, "wb")  # noqa: SIM115 (closed with the rig)
        self._log_files.append(f)
        return f

    async def close(self) -> None:
        for proxy in self.proxies.values():
            proxy.stop_accepting()
            await proxy.drain(0)
            await proxy.close()
        for f in self._log_files:
            f.close()
        if self.echo.server is not None:
            self.echo.server.close()
        self.http.close()


def run(mtls: bool, body: Callable[[Rig], Awaitable[None]], rig_type: type[Rig] = Rig) -> None:
    async def main() -> None:
        with tempfile.TemporaryDirectory(prefix="na-loop-") as tmp:
            rig = rig_type(Path(tmp), mtls)
            await rig.start()
            try:
                await asyncio.wait_for(body(rig), 15)
            finally:
                await rig.close()

    uvloop.run(main())


async def eventually(check: Callable[[], bool], what: str) -> None:
    for _ in range(200):
        if check():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what}")


async def round_trip(
    r: asyncio.StreamReader, w: asyncio.StreamWriter, payload: bytes
) -> tuple[str, int]:
    """Send ``payload``, half-close, read to EOF: (SHA-256 of what came back, its size)."""

    async def send() -> None:
        w.write(payload)
        await w.drain()
        w.write_eof()

    sender = asyncio.ensure_future(send())
    got = hashlib.sha256()
    size = 0
    while data := await r.read(65536):
        got.update(data)
        size += len(data)
    await sender
    w.close()
    return got.hexdigest(), size


async def closed_without_data(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> bool:
    """Whether the proxy closed the connection before sending anything."""
    w.write(b"hello?")
    try:
        data = await r.read(65536)
    except ConnectionError:
        data = b""
    w.close()
    return data == b""


# -- the tests -----------------------------------------------------------------------------


def test_tcp_to_a_service_reaches_the_app_intact() -> None:
    async def body(rig: Rig) -> None:
        payload = os.urandom(1 << 20)
        digest, size = await round_trip(*await rig.connect((SERVICE_IP, TCP_PORT)), payload)
        assert (digest, size) == (hashlib.sha256(payload).hexdigest(), len(payload))
        assert rig.echo.accepted == 1
        # node1's outbound, then node2's plaintext inbound listener, counted by both (the
        # source address node2 sees is 127.0.0.1, no pod's: its source workload unknown)
        await eventually(
            lambda: rig.tcp_sent("node2") == {("destination", "unknown", "none"): size},
            "node2's inbound metrics",
        )
        assert rig.tcp_sent("node1") == {("source", "client", "none"): size}

    run(False, body)


def test_a_refused_destination_is_closed_and_counted() -> None:
    async def body(rig: Rig) -> None:
        assert await closed_without_data(*await rig.connect((SERVICE_IP, 9999)))
        assert rig.failures("node1", "outbound", "NR") == 1
        assert rig.echo.accepted == 0

    run(False, body)


def test_passthrough_to_a_non_mesh_address() -> None:
    async def body(rig: Rig) -> None:
        outside = Echo()
        addr = await outside.start()
        try:
            payload = os.urandom(100_000)
            digest, _ = await round_trip(*await rig.connect(addr), payload)
            assert digest == hashlib.sha256(payload).hexdigest()
            assert outside.accepted == 1
        finally:
            assert outside.server is not None
            outside.server.close()

    run(False, body)


def test_an_http_service_port_is_served_by_the_l7_path() -> None:
    async def body(rig: Rig) -> None:
        r, w = await rig.connect((SERVICE_IP, 80))
        w.write(b"GET /hi HTTP/1.1\r\nhost: echo.default\r\nconnection: close\r\n\r\n")
        response = await r.read()
        w.close()
        head, _, content = response.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200"), response
        assert content == b"hello from server: /hi"
        out = [dict(x) for x in rig.proxies["node1"].access_log.recent]
        assert [(x["method"], x["path"], x["response_code"]) for x in out] == [("GET", "/hi", 200)]
        assert out[0]["reporter"] == "source"

    run(False, body)


def test_mtls_goes_through_hbone_and_a_deny_policy_closes_it() -> None:
    async def body(rig: Rig) -> None:
        r, w = await rig.connect((SERVICE_IP, TCP_PORT))
        w.write(b"ping")
        assert await r.readexactly(4) == b"ping"
        (conn,) = [c for c in rig.proxies["node2"].table.snapshot() if c.direction == "inbound"]
        assert conn.peer_workload == spiffe_id("default", "client")  # from its certificate
        assert conn.destination == f"{SERVER_IP}:{TCP_PORT}"
        (out,) = rig.proxies["node1"].table.snapshot()
        assert out.upstream == f"hbone {SERVER_IP}:{HBONE_PORT} -> {SERVER_IP}:{TCP_PORT}"

        rig.apply(DENY_CLIENT)
        assert await r.read() == b""  # the live connection: closed by the re-check
        w.close()
        accepted = rig.echo.accepted
        assert await closed_without_data(*await rig.connect((SERVICE_IP, TCP_PORT)))
        assert rig.echo.accepted == accepted  # the app never saw the new one
        assert rig.failures("node2", "inbound", "RBAC") == 2
        assert rig.tcp_sent("node2") == {("destination", "client", "mutual_tls"): 4}
        assert rig.failures("node1", "outbound", "UF") == 1  # the CONNECT answered 403

    run(True, body)


def test_a_pod_labelled_out_of_the_mesh_is_released_and_reached_in_plain_tcp() -> None:
    async def body(rig: Rig) -> None:
        out = "labels: {app: echo, istio.io/dataplane-mode: none}"
        (rig.dir / "mesh.yaml").write_text(MESH.replace("labels: {app: echo}", out))
        rig.version += 1
        rig.snap = rig._load()
        node2 = rig.proxies["node2"]
        await node2.reconcile(rig.snap)
        assert "default/server" not in {p["key"] for p in node2.pod_states()}
        del rig.net.listeners[(SERVER_IP, INBOUND_PORT)]  # what a released capture means
        r, w = await rig.connect((SERVICE_IP, TCP_PORT))
        w.write(b"ping")
        assert await r.readexactly(4) == b"ping"
        (out,) = rig.proxies["node1"].table.snapshot()
        assert out.upstream == f"{SERVER_IP}:{TCP_PORT}"  # no HBONE to a pod out of the mesh
        assert not [c for c in node2.table.snapshot() if c.direction == "inbound"]
        w.close()

    run(True, body)
