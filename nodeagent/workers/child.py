"""A worker process (``python -m nodeagent.workers FD``): serves the connections the
kernel gives its sockets of each pod's ``SO_REUSEPORT`` groups, with the proxy the main
process runs (``proxy.server.Proxy``), built from the settings, snapshot and
certificates the main process sends over the channel ``FD`` (``wire``).

It opens no listener of its own and enters no netns for one (its listeners come from
the main process); it makes its upstream sockets in the pods' netns as the main
process does. It captures nothing: capture is the main process's. When the channel
closes (the main process ended) it stops accepting, drains and exits.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Set
from dataclasses import replace
from typing import Any

import uvloop

from nodeagent.config import AgentSettings
from nodeagent.core import authz, route
from nodeagent.errors import LocalStateError
from nodeagent.heap import tune_malloc
from nodeagent.identity.tls import WorkloadCert
from nodeagent.model.objects import HostWorkload, PodRuntime
from nodeagent.model.snapshot import MeshSnapshot
from nodeagent.proxy.handover import Listener, check_listener
from nodeagent.proxy.identity import MeshIdentity
from nodeagent.proxy.server import Proxy
from nodeagent.proxy.sharedbuckets import SharedBuckets
from nodeagent.redirect.capture import ebpf_original_destination
from nodeagent.redirect.sockets import original_dst
from nodeagent.telemetry.metrics import Metrics
from nodeagent.workers.inputs import proxy_inputs
from nodeagent.workers.wire import Channel, ChannelClosed

log = logging.getLogger("nodeagent.worker")

Addr = tuple[str, int]
Excluded = tuple[frozenset[int], frozenset[int]]


class SentCerts:
    """The certificates and trust bundle the main process sent (a ``CertSource``)."""

    def __init__(self) -> None:
        self.certs: dict[str, WorkloadCert] = {}
        self.bundle = b""

    def update(self, certs: list[WorkloadCert], bundle: bytes) -> None:
        for c in certs:
            self.certs[c.identity] = c
        if bundle:
            self.bundle = bundle

    def cached(self, identity: str) -> WorkloadCert | None:
        cert = self.certs.get(identity)
        return cert if cert is not None and time.time() < cert.not_after else None

    def trust_bundle(self) -> bytes:
        if not self.bundle:
            raise LocalStateError("no trust bundle yet from the main process")
        return self.bundle


class SentListeners:
    """The pods' listeners the main process sent (a ``ListenerSource``), by pod."""

    def __init__(self) -> None:
        self.pods: dict[str, dict[Listener, socket.socket]] = {}

    def put(self, key: str, items: list[tuple[Listener, socket.socket]]) -> None:
        self.drop(key)
        self.pods[key] = dict(items)

    def drop(self, key: str) -> None:
        for sock in self.pods.pop(key, {}).values():
            sock.close()

    def take(
        self, kind: str, port: int, pod: str = "", netns: str = "", ip: str = ""
    ) -> socket.socket | None:
        return self.pods.get(pod, {}).pop(Listener(kind, port, pod, netns, ip), None)

    def serves(self, key: str) -> bool:
        return key in self.pods


class WorkerCapture:
    """A worker's ``Capture``: the main process captures; a worker only reads where an
    accepted connection was going, as the node's capture (``mode``) tells it."""

    no_source = ""

    def __init__(self, mode: str) -> None:
        self.mode = mode

    def on_snapshot(self, snap: MeshSnapshot, local: Set[str]) -> None:
        pass

    async def attach(
        self, pod_key: str, runtime: PodRuntime, listener: socket.socket, excluded: Excluded
    ) -> str:
        return f"{self.mode}, worker"

    def exclude(self, runtime: PodRuntime, listener: socket.socket, excluded: Excluded) -> None:
        pass

    async def detach(self, pod_key: str, runtime: PodRuntime) -> None:
        pass

    def original_destination(self, transport: asyncio.BaseTransport, inbound: bool) -> Addr | None:
        if self.mode == "ebpf":
            return ebpf_original_destination(transport, inbound)
        return original_dst(transport.get_extra_info("socket"))

    async def attach_host(self, workload: HostWorkload) -> str:
        return f"{self.mode}, worker"

    async def detach_host(self, key: str) -> None:
        pass

    def host_stale(self) -> bool:
        return False

    async def refresh_hosts(self) -> dict[str, str]:
        return {}


class Worker:
    """One worker process's proxy, fed by the main process over ``channel``."""

    def __init__(
        self, channel: Channel, setup: dict[str, Any], buckets: SharedBuckets | None = None
    ) -> None:
        self.channel = channel
        self.settings: AgentSettings = setup["settings"]
        self.index: int = setup["index"]
        self._snapshot: MeshSnapshot = setup["snapshot"]
        route.prepare(self._snapshot)
        authz.prepare(self._snapshot)
        self.certs = SentCerts()
        self.certs.update(setup.get("certs", []), setup.get("bundle", b""))
        self.listeners = SentListeners()
        self.metrics = Metrics()
        identity = MeshIdentity(self.certs, self.settings.trust_domain) if setup["mtls"] else None
        inputs = proxy_inputs(
            self.settings,
            self.snapshot,
            self.metrics,
            WorkerCapture(setup["mode"]),
            identity,
            dns=None,  # the pods' DNS proxies are the main process's
        )
        self.proxy = Proxy(inputs, state_dir=self.settings.state_dir)  # the node's quotas
        if buckets is not None:
            self.proxy.admission.share(buckets)
        self.proxy.inherit(self.listeners)
        self.proxy.local.serves = self.listeners.serves
        self._stop = asyncio.Event()
        self._lock = asyncio.Lock()

    def snapshot(self) -> MeshSnapshot:
        return self._snapshot

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, self._stop.set)
        reader = loop.create_task(self._read())
        await self.reconcile()
        await self._stop.wait()
        reader.cancel()
        self.proxy.stop_accepting()
        await self.proxy.drain(self.settings.drain_seconds)
        await self.proxy.close()
        self.channel.close()
        return 0

    async def reconcile(self) -> None:
        async with self._lock:
            await self.proxy.reconcile(self._snapshot)

    async def _read(self) -> None:
        try:
            while True:
                msg, socks = await self.channel.recv()
                await self._handle(msg, socks)
        except ChannelClosed as e:
            log.info("worker %d: the main process is gone (%s): draining", self.index, e)
        except Exception:
            log.exception("worker %d: cannot go on", self.index)
        self._stop.set()

    async def _handle(self, msg: dict[str, Any], socks: list[socket.socket]) -> None:
        op = msg["op"]
        if op == "snapshot":
            snap: MeshSnapshot = msg["snapshot"]
            route.prepare(snap)
            authz.prepare(snap)
            self._snapshot = snap  # one assignment, as in the main process
            self.proxy.admission.on_snapshot(snap)
            self.proxy.recheck(snap)
            asyncio.get_running_loop().create_task(self.reconcile())
        elif op == "certs":
            self.certs.update(msg["certs"], msg["bundle"])
        elif op == "pod":
            self._pod(msg["key"], msg["listeners"], socks)
            await self.reconcile()
        elif op == "unpod":
            self.listeners.drop(msg["key"])
            await self.reconcile()
        elif op == "ask":
            await self.channel.send(self._answer(msg))
        elif op == "stop":
            self._stop.set()
        else:
            log.warning("worker %d: unknown message %r", self.index, op)
        for s in socks:  # (listeners kept by _pod were detached from this list)
            s.close()

    def _pod(self, key: str, raw: list[Any], socks: list[socket.socket]) -> None:
        """A pod's listeners; each checked to be what the main process says it is."""
        items: list[tuple[Listener, socket.socket]] = []
        for item, sock in zip(raw, list(socks), strict=True):
            lst = Listener.parse(item)
            why = check_listener(lst, sock)
            if why is not None or lst.pod != key:
                log.error("worker %d: %s listener of %s: %s", self.index, lst.kind, key, why)
                continue
            sock.setblocking(False)
            items.append((lst, sock))
            socks.remove(sock)
        self.listeners.put(key, items)
        # a pod whose runtime changed is captured again with the new listeners
        pp = self.proxy.pods.get(key)
        if pp is not None and items and items[0][0].netns != pp.runtime.netns:
            pp.close()
            del self.proxy.pods[key]

    def _answer(self, msg: dict[str, Any]) -> dict[str, Any]:
        out: dict[str, Any] = {"op": "answer", "id": msg.get("id"), "pid": os.getpid()}
        out["metrics"] = list(self.metrics.registry.collect())
        if msg.get("what") == "all":
            out["connections"] = [
                replace(c, worker=self.index) for c in self.proxy.table.snapshot()
            ]
            out["pods"] = self.proxy.pod_states()
            out["requests"] = [dict(r) for r in self.proxy.access_log.recent]
        return out


def main(fd: int, buckets_fd: int) -> int:
    """The worker process: set up from the main process's first message, then serve;
    ``buckets_fd``: the node's token buckets (``proxy.sharedbuckets``)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # ^C is for the main process to handle
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )

    async def run() -> int:
        channel = Channel(socket.socket(fileno=fd))
        try:
            setup, _ = await channel.recv()
        except ChannelClosed as e:
            log.error("worker: no setup from the main process: %s", e)
            return 1
        if setup.get("op") != "setup":
            log.error("worker: the first message is %r, not setup", setup.get("op"))
            return 1
        logging.getLogger().setLevel(
            getattr(logging, str(setup["settings"].log_level).upper(), logging.INFO)
        )
        named = logging.Formatter(
            f"%(asctime)s %(levelname)s %(name)s[worker {setup['index']}]: %(message)s"
        )
        for handler in logging.getLogger().handlers:  # whose line is whose, in one log
            handler.setFormatter(named)
        try:
            buckets = SharedBuckets(buckets_fd)
        except (OSError, ValueError) as e:
            log.error("worker: no token buckets from the main process: %s", e)
            return 1
        worker = Worker(channel, setup, buckets)
        gc.collect()
        gc.freeze()
        gc.set_threshold(20_000, 20, 50)  # as the main process (app.GC_THRESHOLDS)
        tune_malloc()  # as the main process (app._tune_gc)
        await channel.send({"op": "hello", "pid": os.getpid(), "index": worker.index})
        return await worker.run()

    return uvloop.run(run())
