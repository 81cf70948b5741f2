"""``--workers``: real worker processes (``python -m nodeagent.workers``) fed by the
main process's ``WorkerPool`` over their socketpairs, without root.

The workload is a host-mode WorkloadEntry (its listeners in this process's own netns,
on a loopback address of its own, so no netns and no privilege is needed); this test
process plays the main process (worker 0): it captures the entry with the real
``Proxy``, whose listeners join ``SO_REUSEPORT`` groups, and the pool sends each worker
a second socket per port, the snapshot and the certificates. Clients are real HBONE
tunnels (mutual TLS with a test CA's certificates), one TCP connection each, to the
entry's port 15008; its app echoes.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import socket
import sys
import tempfile
from collections.abc import Awaitable, Callable
from pathlib import Path

import uvloop
from certs import TestCA, make_ca, spiffe_id
from test_source_ip import Collect

from nodeagent.config import AgentSettings
from nodeagent.control.files import load_directory
from nodeagent.core import authz, route
from nodeagent.errors import PeerError
from nodeagent.model.snapshot import MeshSnapshot
from nodeagent.proxy.hbone_client import HboneClientPool
from nodeagent.proxy.identity import MeshIdentity
from nodeagent.proxy.server import Proxy
from nodeagent.telemetry.metrics import Metrics
from nodeagent.workers.child import SentCerts, WorkerCapture
from nodeagent.workers.inputs import proxy_inputs
from nodeagent.workers.metrics import MergedRegistry
from nodeagent.workers.pool import ASK_TIMEOUT, WorkerPool

Addr = tuple[str, int]
HBONE_PORT, APP_PORT = 15008, 9080
VM_ID, CLIENT_ID = spiffe_id("default", "vm"), spiffe_id("default", "client")


LIMIT = 10
"""New connections the vm admits per hour (``LocalRateLimit``'s tcp bucket), node-wide."""


def mesh(vm_ip: str) -> str:
    return f"""
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata:
  name: vm
  namespace: default
  annotations: {{nodeagent.io/node: node1}}
spec:
  address: {vm_ip}
  labels: {{app: vm}}
  serviceAccount: vm
"""


RATE_LIMIT = f"""
---
apiVersion: nodeagent.io/v1alpha1
kind: LocalRateLimit
metadata:
  name: vm-connections
  namespace: default
spec:
  selector: {{matchLabels: {{app: vm}}}}
  ports: [{APP_PORT}]
  tcp:
    tokenBucket: {{maxTokens: {LIMIT}, tokensPerFill: 1, fillInterval: 1h}}
"""


class EchoApp(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.transport.write(data)  # type: ignore[attr-defined]


class Tunnel:
    """One client connection: its own HBONE tunnel (one TCP connection), one stream."""

    def __init__(self, rig: Rig, pool: HboneClientPool, proto: Collect) -> None:
        self.rig = rig
        self.pool = pool
        self.proto = proto
        self.port = 0

    async def echo(self, data: bytes) -> bool:
        """Whether ``data`` comes back (the connection is alive)."""
        t = self.proto.transport
        if t is None or t.is_closing():
            return False
        before = len(self.proto.data)
        t.write(data)
        deadline = asyncio.get_running_loop().time() + 10  # a worker on a loaded box is slow
        while asyncio.get_running_loop().time() < deadline:
            if self.proto.data[before:] == data:
                return True
            if self.proto.done.done():
                return False
            await asyncio.sleep(0.01)
        return False

    def close(self) -> None:
        self.pool.close()


class Rig:
    def __init__(self, tmp: Path, workers: int, extra: str = "", per_listener: int = 0) -> None:
        a, b, c = random.randint(100, 250), random.randint(0, 255), random.randint(2, 250)
        self.vm_ip = f"127.{a}.{b}.{c}"  # its own: other tests may serve 15008 elsewhere
        (tmp / "mesh.yaml").write_text(mesh(self.vm_ip) + extra)
        snap = load_directory(tmp).snapshot
        route.prepare(snap)
        authz.prepare(snap)
        self.snap: MeshSnapshot = snap
        self.ca: TestCA = make_ca()
        self.certs = SentCerts()
        self.certs.update([self.ca.issue(VM_ID)], self.ca.bundle_pem)
        self.client_certs = SentCerts()
        self.client_certs.update([self.ca.issue(CLIENT_ID)], self.ca.bundle_pem)
        self.settings = AgentSettings(
            node="node1",
            config_dir=tmp,
            ca_addr="unix:/nonexistent",  # mTLS on: the workers get their certificates sent
            dns_proxy=False,
            access_log="off",
            drain_seconds=0.5,
            handover=False,
            workers=workers,
            max_connections_per_listener=per_listener or 20_000,
        )
        inputs = proxy_inputs(
            self.settings,
            lambda: self.snap,
            Metrics(),
            WorkerCapture("iptables"),
            MeshIdentity(self.certs, "cluster.local"),
            dns=None,
            reuseport=workers > 1,
        )
        self.proxy = Proxy(inputs)
        self.pool = WorkerPool(
            self.settings,
            workers,
            "iptables",
            self.proxy.local,
            lambda: self.snap,
            lambda: (list(self.certs.certs.values()), self.certs.bundle),
        )
        self.proxy.admission.share(self.pool.buckets)
        self.tunnels: list[Tunnel] = []

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self.app = await loop.create_server(EchoApp, self.vm_ip, APP_PORT)
        await self.proxy.reconcile(self.snap)
        assert self.proxy.pod_states()[0]["capture"] == "ready", self.proxy.pod_states()
        self.pool.start()
        self.pool.sync()

    async def connect(self) -> Tunnel:
        ip = self.vm_ip

        async def dial(addr: Addr) -> socket.socket:
            s = socket.socket()
            s.setblocking(False)
            try:
                await asyncio.get_running_loop().sock_connect(s, addr)
            except OSError:
                s.close()
                raise
            return s

        identity = MeshIdentity(self.client_certs, "cluster.local")
        pool = HboneClientPool(dial, identity.client_context, 5.0)
        proto = Collect()
        await pool.open_stream(
            source_identity=CLIENT_ID,
            expected_identity=VM_ID,
            peer=(ip, HBONE_PORT),
            authority=f"{ip}:{APP_PORT}",
            headers={},
            protocol=proto,
        )
        tunnel = Tunnel(self, pool, proto)
        self.tunnels.append(tunnel)
        return tunnel

    async def by_worker(self) -> dict[int, int]:
        """Live inbound connections per process (0: this one), as the pool gathers them."""
        await self.pool.gather()
        out: dict[int, int] = {}
        for c in [*self.proxy.table.snapshot(), *self.pool.connections()]:
            out[c.worker] = out.get(c.worker, 0) + 1
        return out

    async def close(self) -> None:
        for t in self.tunnels:
            t.close()
        await self.pool.stop(0.5)
        self.proxy.stop_accepting()
        await self.proxy.close()
        self.app.close()


def run(
    workers: int,
    body: Callable[[Rig], Awaitable[None]],
    before: Callable[[Rig], None] = print,
    extra: str = "",
    per_listener: int = 0,
) -> None:
    async def main() -> None:
        with tempfile.TemporaryDirectory() as tmp:
            rig = Rig(Path(tmp), workers, extra, per_listener)
            before(rig)
            try:
                await rig.start()
                await body(rig)
            finally:
                await rig.close()

    uvloop.run(asyncio.wait_for(main(), 120))


async def until(check: Callable[[], Awaitable[bool]], what: str, seconds: float = 15) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    while loop.time() < deadline:
        if await check():
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


async def serving(rig: Rig) -> bool:
    return all(s.state == "serving" and s.sent for s in rig.pool.slots)


async def spread(rig: Rig, n: int) -> list[Tunnel]:
    """``n`` connections that each echo, until every process holds some (new ones are
    opened while one process has none: the kernel's reuseport hash decides)."""
    tunnels: list[Tunnel] = []
    for _ in range(n):
        t = await rig.connect()
        assert await t.echo(b"hello"), "a connection through a worker does not echo"
        tunnels.append(t)
    await until(lambda: _covered(rig), "connections on every process", 20)
    return tunnels


async def _covered(rig: Rig) -> bool:
    counts = await rig.by_worker()
    if len(counts) == rig.pool.count:
        return True
    t = await rig.connect()  # one more: the hash of its address picks a process
    assert await t.echo(b"more"), "a connection through a worker does not echo"
    return False  # counted on the next look


def test_workers_get_listeners_snapshot_and_certs_and_serve_connections() -> None:
    async def body(rig: Rig) -> None:
        await until(lambda: serving(rig), "the workers to get the pod's listeners", 40)
        await spread(rig, 12)
        counts = await rig.by_worker()
        assert set(counts) == {0, 1, 2}, counts
        pids = {s.pid for s in rig.pool.status(0)}
        assert len(pids) == 3 and os.getpid() in pids

    run(3, body)


def test_a_killed_worker_takes_only_its_connections_and_is_replaced() -> None:
    async def body(rig: Rig) -> None:
        await until(lambda: serving(rig), "the workers to get the pod's listeners", 40)
        await spread(rig, 8)
        await rig.pool.gather()
        victim = rig.pool.slots[0]
        assert victim.proc is not None
        old_pid = victim.proc.pid
        before = len(victim.last.get("connections", []))
        assert before > 0
        os.kill(old_pid, signal.SIGKILL)
        alive = [await t.echo(b"after") for t in rig.tunnels]
        # exactly the victim's connections are gone, the others still echo
        assert alive.count(False) == before, (alive, before)

        async def replaced() -> bool:
            return (
                victim.proc is not None
                and victim.proc.pid != old_pid
                and victim.state == "serving"
                and bool(victim.sent)
            )

        await until(replaced, "a replacement worker")

        async def replacement_serves() -> bool:
            t = await rig.connect()
            assert await t.echo(b"new")
            await rig.pool.gather()
            return bool(victim.last.get("connections"))

        await until(replacement_serves, "the replacement to serve a new connection", 20)

    run(2, body)


def test_metrics_of_every_process_read_as_one() -> None:
    async def body(rig: Rig) -> None:
        await until(lambda: serving(rig), "the workers to get the pod's listeners", 40)
        await spread(rig, 6)
        for t in rig.tunnels:
            t.close()

        async def all_counted() -> bool:
            await rig.pool.gather("metrics")
            merged = MergedRegistry(rig.proxy.inputs.metrics.registry, rig.pool.metric_families)
            total = 0.0
            for fam in merged.collect():
                for s in fam.samples:
                    if s.name == "istio_tcp_connections_opened_total":
                        total += s.value
            return total == len(rig.tunnels)

        await until(all_counted, "every process's connections counted once in one view")

    run(2, body)


def test_a_worker_that_never_says_hello_is_killed_and_started_again() -> None:
    silent = [sys.executable, "-c", "import time; time.sleep(60)"]  # gets the fd, says nothing

    def mute(rig: Rig) -> None:
        rig.pool.command = silent
        rig.pool.hello_timeout = 0.5

    async def body(rig: Rig) -> None:
        slot = rig.pool.slots[0]
        await until(lambda: _restarted(rig), "a silent worker to be given up on")
        assert slot.proc is not None
        first = slot.proc.pid
        rig.pool.command = [sys.executable, "-m", "nodeagent.workers"]
        rig.pool.hello_timeout = 30.0
        await until(lambda: serving(rig), "a real worker in its place", 20)
        assert slot.proc.pid != first and not _running(first)
        t = await rig.connect()
        assert await t.echo(b"after")

    run(2, body, mute)


async def _restarted(rig: Rig) -> bool:
    return rig.pool.slots[0].restarts >= 1


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_an_ask_that_times_out_leaves_a_later_one_its_answer() -> None:
    """Two asks overlap (the background gathering and a ``ctl`` call) while a worker is
    slow: the first one's timeout must not take the second one's answer away (it forgot
    the newest ask's id instead of its own, so the second timed out too)."""

    async def body(rig: Rig) -> None:
        await until(lambda: serving(rig), "the workers to get the pod's listeners", 40)
        slot = rig.pool.slots[0]
        assert slot.proc is not None
        os.kill(slot.proc.pid, signal.SIGSTOP)
        try:
            first = asyncio.ensure_future(rig.pool._ask(slot, "metrics"))
            await asyncio.sleep(ASK_TIMEOUT / 2)
            second = asyncio.ensure_future(rig.pool._ask(slot, "metrics"))
            assert await first == {}  # timed out
        finally:
            os.kill(slot.proc.pid, signal.SIGCONT)
        answer = await second
        assert "metrics" in answer, answer
        assert slot.answers == {}

    run(2, body, lambda rig: setattr(rig.pool, "refresh_every", 3600.0))


def test_the_workers_connections_are_gathered_in_the_background() -> None:
    """What ``/metrics`` reads between two ``ctl`` calls: the agent's own gauge of live
    connections counts the workers' too, as of the last background gathering."""

    def often(rig: Rig) -> None:
        rig.pool.refresh_every = 0.2

    async def body(rig: Rig) -> None:
        await until(lambda: serving(rig), "the workers to get the pod's listeners", 40)
        tunnels = await spread(rig, 6)
        live = len(rig.proxy.table.live)
        await asyncio.sleep(0.5)  # past the gathering of spread(): the background ones

        async def counted() -> bool:  # no gather() here: the pool's own
            return live + len(rig.pool.connections()) == len(rig.tunnels)

        await until(counted, "every process's live connections, gathered by the pool")
        assert tunnels

    run(2, body, often)


def test_a_rate_limit_holds_across_the_workers() -> None:
    """A LocalRateLimit of LIMIT new connections an hour admits LIMIT in all, however
    the kernel spreads the connections over the processes (each refused one counted)."""

    async def body(rig: Rig) -> None:
        await until(lambda: serving(rig), "the workers to get the pod's listeners", 40)
        admitted, refused = 0, 0
        for _ in range(3 * LIMIT):
            try:
                t = await rig.connect()
            except PeerError as e:
                assert "429" in str(e), e
                refused += 1
                continue
            assert await t.echo(b"hello")
            admitted += 1
        counts = await rig.by_worker()
        assert set(counts) == {0, 1}, f"the admitted connections all on one process: {counts}"
        assert (admitted, refused) == (LIMIT, 2 * LIMIT)
        await rig.pool.gather("metrics")
        merged = MergedRegistry(rig.proxy.inputs.metrics.registry, rig.pool.metric_families)
        limited = sum(
            s.value
            for fam in merged.collect()
            for s in fam.samples
            if s.name == "nodeagent_connection_failures_total"
            and s.labels.get("response_flags") == "RL"
        )
        assert limited == 2 * LIMIT
        # each refusal is a record of ``ctl requests``, the workers' too (gathered)
        await rig.pool.gather()
        records = [dict(r) for r in rig.proxy.access_log.recent] + rig.pool.requests()
        refusals = [r for r in records if r.get("response_flags") == "RL"]
        assert len(refusals) == 2 * LIMIT, records
        assert any(r.get("worker") == 1 for r in refusals), refusals

    run(2, body, extra=RATE_LIMIT)


def test_each_process_holds_its_share_of_a_connection_cap() -> None:
    """--max-connections-per-listener 4 with two processes: each holds 2 of the pod's
    HBONE connections, the node 4; the rest are closed at accept and counted."""

    async def body(rig: Rig) -> None:
        await until(lambda: serving(rig), "the workers to get the pod's listeners", 40)
        refused = 0
        for _ in range(16):
            try:
                t = await rig.connect()
            except PeerError:
                refused += 1
                continue
            assert await t.echo(b"hello")
        assert await rig.by_worker() == {0: 2, 1: 2}
        assert refused == 12
        await rig.pool.gather("metrics")
        merged = MergedRegistry(rig.proxy.inputs.metrics.registry, rig.pool.metric_families)
        counted = sum(
            s.value
            for fam in merged.collect()
            for s in fam.samples
            if s.name == "nodeagent_downstream_connections_refused_total"
            and s.labels == {"listener": "hbone", "reason": "listener_limit"}
        )
        assert counted == 12

    run(2, body, per_listener=4)
