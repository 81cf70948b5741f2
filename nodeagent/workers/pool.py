"""The main process's side of ``--workers``: starts the worker processes, keeps each
fed (the snapshot, the certificates, each ready pod's listeners: a second socket per
port in the pod's ``SO_REUSEPORT`` group), restarts one that dies (its connections
are gone with it; the others' stay), and gathers what they hold for the node agent
socket and ``/metrics`` (their connections, recent requests, metrics, RSS and CPU).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import sys
from collections.abc import Callable
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

from prometheus_client.core import Metric

from nodeagent.config import AgentSettings
from nodeagent.identity.tls import WorkloadCert
from nodeagent.model.objects import PodRuntime
from nodeagent.model.snapshot import MeshSnapshot
from nodeagent.model.status import ConnectionInfo, WorkerStatus
from nodeagent.proxy.pods import LocalPods
from nodeagent.proxy.sharedbuckets import SharedBuckets
from nodeagent.workers.wire import Channel, ChannelClosed

if TYPE_CHECKING:  # imported by a pool when made: an agent without workers does without
    import psutil

log = logging.getLogger("nodeagent.workers")

ASK_TIMEOUT = 2.0
"""Seconds a worker gets to answer what it holds; beyond, it is shown without."""
METRICS_EVERY = 5.0
"""Seconds between two gatherings of the workers' metrics for ``/metrics``."""
RESTART_BACKOFF = (0.5, 30.0)
"""Seconds before a worker that died is started again: the first, and the most (it
doubles each time one dies within ``STABLE`` seconds of its start)."""
STABLE = 10.0
HELLO_TIMEOUT = 30.0
"""Seconds a new worker gets to set itself up and say hello; beyond, it is killed."""
Message = tuple[dict[str, Any], list[socket.socket]]


class _Slot:
    """One worker's place: the process serving it now and what it was sent."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.proc: asyncio.subprocess.Process | None = None
        """The process serving this place now (None: none started yet)."""
        self.ps: psutil.Process | None = None
        self.channel: Channel | None = None
        self.out: asyncio.Queue[Message] = asyncio.Queue()
        self.sent: dict[str, PodRuntime] = {}
        """Pods whose listeners this process was sent, with the runtime they were for."""
        self.state = "starting"
        self.restarts = 0
        self.started = 0.0
        self.answers: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self.last: dict[str, Any] = {}
        """Its last answer (metrics always; connections after a ``gather``)."""


class WorkerPool:
    """``count`` - 1 worker processes beside the main one (worker 0)."""

    def __init__(
        self,
        settings: AgentSettings,
        count: int,
        capture_mode: str,
        local: LocalPods,
        snapshot: Callable[[], MeshSnapshot],
        certs: Callable[[], tuple[list[WorkloadCert], bytes]],
    ) -> None:
        self.settings = settings
        self.count = count
        self.capture_mode = capture_mode
        self.local = local
        self.snapshot = snapshot
        self.certs = certs
        """The certificates held now and the trust bundle (empty without mTLS)."""
        self.slots = [_Slot(i) for i in range(1, count)]
        self.buckets = SharedBuckets.create()
        """The node's token buckets: every process takes from them (the main one too:
        ``InboundPolicy.share``)."""
        self.command = [sys.executable, "-m", "nodeagent.workers"]
        """A worker process, given its end of the channel and the buckets' descriptor
        as its last two arguments."""
        self.hello_timeout = HELLO_TIMEOUT
        self.refresh_every = METRICS_EVERY
        """Seconds between two gatherings in the background (for ``/metrics``)."""
        self._tasks: list[asyncio.Task[None]] = []
        self._stopping = False
        self._ids = 0
        self._refused: dict[str, PodRuntime] = {}
        """Pods whose listeners are in no reuseport group (logged once each)."""
        import psutil

        self._main = psutil.Process()
        self._main.cpu_percent(interval=None)

    # -- lifecycle ---------------------------------------------------------------------
    def start(self) -> None:
        loop = asyncio.get_running_loop()
        for slot in self.slots:
            self._tasks.append(loop.create_task(self._supervise(slot)))
        self._tasks.append(loop.create_task(self._refresh_metrics()))

    async def _supervise(self, slot: _Slot) -> None:
        loop = asyncio.get_running_loop()
        backoff = RESTART_BACKOFF[0]
        while not self._stopping:
            try:
                await self._spawn(slot)
            except (OSError, ChannelClosed, TimeoutError) as e:
                log.error("worker %d: cannot start: %s", slot.index, str(e) or "no hello in time")
                if slot.proc is not None and slot.proc.returncode is None:
                    with contextlib.suppress(ProcessLookupError):
                        slot.proc.kill()  # started, but not set up: not left behind
                    await slot.proc.wait()
            else:
                assert slot.proc is not None
                code = await slot.proc.wait()
                if self._stopping:
                    return
                slot.state = f"restarting: pid {slot.proc.pid} exited ({_exit(code)})"
                log.warning(
                    "worker %d (pid %d) ended (%s): its connections are gone; starting another",
                    slot.index,
                    slot.proc.pid,
                    _exit(code),
                )
            self._forget(slot)
            slot.restarts += 1
            lived = loop.time() - slot.started
            backoff = RESTART_BACKOFF[0] if lived > STABLE else min(backoff * 2, RESTART_BACKOFF[1])
            await asyncio.sleep(backoff)

    async def _spawn(self, slot: _Slot) -> None:
        loop = asyncio.get_running_loop()
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            slot.proc = await asyncio.create_subprocess_exec(
                *self.command,
                str(theirs.fileno()),
                str(self.buckets.fd),
                pass_fds=(theirs.fileno(), self.buckets.fd),
                stdin=asyncio.subprocess.DEVNULL,
            )
        except OSError:
            ours.close()
            raise
        finally:
            theirs.close()
        slot.started = loop.time()
        slot.ps = _process(slot.proc.pid)
        slot.channel = Channel(ours)
        slot.out = asyncio.Queue()
        certs, bundle = self.certs()
        setup = {
            "op": "setup",
            "settings": self.settings,
            "index": slot.index,
            "mode": self.capture_mode,
            "mtls": self.settings.mtls,
            "snapshot": self.snapshot(),
            "certs": certs,
            "bundle": bundle,
        }
        await slot.channel.send(setup)
        hello, _ = await asyncio.wait_for(slot.channel.recv(), self.hello_timeout)
        if hello.get("op") != "hello":
            raise ChannelClosed(f"worker {slot.index} answered {hello.get('op')!r}, not hello")
        slot.state = "serving"
        log.info("worker %d serving (pid %d)", slot.index, slot.proc.pid)
        self._tasks.append(loop.create_task(self._write(slot, slot.channel, slot.out)))
        self._tasks.append(loop.create_task(self._read(slot, slot.channel)))
        self.sync()

    def _forget(self, slot: _Slot) -> None:
        if slot.channel is not None:
            slot.channel.close()
            slot.channel = None
        while not slot.out.empty():
            for s in slot.out.get_nowait()[1]:
                s.close()
        slot.out.put_nowait(({"op": "end"}, []))  # its writer finds the channel closed
        slot.sent.clear()
        for fut in slot.answers.values():
            if not fut.done():
                fut.set_exception(ChannelClosed("the worker ended"))
        slot.answers.clear()
        slot.last = {}
        slot.ps = None

    async def _write(self, slot: _Slot, channel: Channel, out: asyncio.Queue[Message]) -> None:
        """Send ``slot``'s messages in order; the main process's copies of the sockets
        close once sent (the worker's death then closes them for good)."""
        while True:
            msg, socks = await out.get()
            try:
                await channel.send(msg, socks)
            except ChannelClosed:
                return
            finally:
                for s in socks:
                    s.close()

    async def _read(self, slot: _Slot, channel: Channel) -> None:
        try:
            while True:
                msg, socks = await channel.recv()
                for s in socks:
                    s.close()
                fut = slot.answers.pop(msg.get("id", -1), None)
                if fut is not None and not fut.done():
                    fut.set_result(msg)
        except ChannelClosed:
            if slot.proc is not None and slot.proc.returncode is None and not self._stopping:
                with contextlib.suppress(ProcessLookupError):
                    slot.proc.kill()  # a worker that broke the channel serves no more

    async def stop(self, drain: float) -> None:
        """Tell every worker to stop accepting and drain; wait for them (then kill)."""
        self._stopping = True
        for slot in self.slots:
            if slot.channel is not None:
                slot.out.put_nowait(({"op": "stop"}, []))
        procs = [s.proc for s in self.slots if s.proc is not None and s.proc.returncode is None]
        if procs:
            await asyncio.wait(
                [asyncio.ensure_future(p.wait()) for p in procs], timeout=drain + 5.0
            )
            for p in procs:
                if p.returncode is None:
                    with contextlib.suppress(ProcessLookupError):
                        p.kill()
                    await p.wait()
        for t in self._tasks:
            t.cancel()
        for slot in self.slots:
            self._forget(slot)
        # (the buckets stay mapped: the main process's proxy may still take from them)

    # -- feeding -----------------------------------------------------------------------
    def _send(self, msg: dict[str, Any], socks: list[socket.socket] | None = None) -> None:
        for slot in self.slots:
            if slot.channel is not None:
                slot.out.put_nowait((msg, socks or []))

    def on_snapshot(self, snap: MeshSnapshot) -> None:
        self._send({"op": "snapshot", "snapshot": snap})

    def on_cert(self, _cert: WorkloadCert) -> None:
        """A certificate was issued or renewed, or the trust bundle changed."""
        certs, bundle = self.certs()
        self._send({"op": "certs", "certs": certs, "bundle": bundle})

    def sync(self) -> None:
        """Send each worker the listeners of the pods captured since, and tell it of
        the pods gone (after each reconcile of the main process)."""
        ready = {k: pp.runtime for k, pp in self.local.pods.items() if pp.state == "ready"}
        for key in [k for k, rt in self._refused.items() if ready.get(k) != rt]:
            del self._refused[key]
        for slot in self.slots:
            if slot.channel is None:
                continue
            for key in [k for k, rt in slot.sent.items() if ready.get(k) != rt]:
                del slot.sent[key]
                slot.out.put_nowait(({"op": "unpod", "key": key}, []))
            for key, rt in ready.items():
                if slot.sent.get(key) == rt or key in self._refused:
                    continue
                try:
                    group = self.local.group_listeners(key)
                except OSError as e:
                    self._refused[key] = rt
                    log.warning(
                        "pod %s: served by the main process only: its listeners are in no "
                        "SO_REUSEPORT group (handed over by an agent without --workers?): %s",
                        key,
                        e,
                    )
                    continue
                if not group:
                    continue
                slot.sent[key] = rt
                raw = [asdict(lst) for lst, _ in group]
                msg = {"op": "pod", "key": key, "listeners": raw}
                slot.out.put_nowait((msg, [s for _, s in group]))

    # -- gathering ---------------------------------------------------------------------
    async def _ask(self, slot: _Slot, what: str) -> dict[str, Any]:
        if slot.channel is None:
            return {}
        self._ids += 1
        ident = self._ids  # (other asks may run meanwhile: self._ids moves on)
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        slot.answers[ident] = fut
        slot.out.put_nowait(({"op": "ask", "id": ident, "what": what}, []))
        try:
            answer = await asyncio.wait_for(fut, ASK_TIMEOUT)
        except (TimeoutError, ChannelClosed) as e:
            why = str(e) or f"no answer to {what!r} within {ASK_TIMEOUT:g}s"
            log.warning("worker %d did not answer: %s", slot.index, why)
            slot.answers.pop(ident, None)
            return {}
        slot.last = answer
        return answer

    async def gather(self, what: str = "all") -> None:
        """Ask every worker what it holds now (kept for the views below)."""
        await asyncio.gather(*(self._ask(s, what) for s in self.slots))

    async def _refresh_metrics(self) -> None:
        # connections too: the agent's own metrics count every process's live ones
        while True:
            await asyncio.sleep(self.refresh_every)
            await self.gather()

    def connections(self) -> list[ConnectionInfo]:
        """The workers' connections as of the last ``gather``."""
        out: list[ConnectionInfo] = []
        for slot in self.slots:
            out.extend(slot.last.get("connections", []))
        return out

    def requests(self) -> list[dict[str, Any]]:
        """The workers' recent requests (``ctl requests``) as of the last ``gather``,
        each with its ``worker``."""
        out: list[dict[str, Any]] = []
        for slot in self.slots:
            out.extend({**r, "worker": slot.index} for r in slot.last.get("requests", []))
        return out

    def metric_families(self) -> list[list[Metric]]:
        """Each worker's metric families as of its last answer."""
        return [slot.last.get("metrics", []) for slot in self.slots if slot.last]

    def status(self, main_connections: int) -> list[WorkerStatus]:
        """The main process (0) and each worker: pid, state, RSS, CPU since last asked."""
        out = [_usage(0, self._main, "serving", main_connections, 0)]
        for slot in self.slots:
            n = len(slot.last.get("connections", []))
            if slot.ps is None:
                out.append(WorkerStatus(slot.index, 0, slot.state, restarts=slot.restarts))
            else:
                out.append(_usage(slot.index, slot.ps, slot.state, n, slot.restarts))
        return out


def _process(pid: int) -> psutil.Process | None:
    import psutil

    try:
        p = psutil.Process(pid)
        p.cpu_percent(interval=None)  # the first call starts the measurement
        return p
    except psutil.Error:
        return None


def _usage(index: int, p: psutil.Process, state: str, conns: int, restarts: int) -> WorkerStatus:
    import psutil

    try:
        with p.oneshot():
            cpu = p.cpu_percent(interval=None)
            rss = p.memory_info().rss
    except psutil.Error:
        cpu, rss = 0.0, 0
    return WorkerStatus(index, p.pid, state, rss, cpu, conns, restarts)


def _exit(code: int) -> str:
    return f"signal {-code}" if code < 0 else f"exit {code}"


__all__ = ["WorkerPool"]
