"""Composition root: builds the agent of one node, starts its tasks, drains on SIGTERM.

Only wiring lives here: config source → snapshot → proxy, which gets its capture
(iptables or eBPF) and its socket factory (each pod's netns) from ``redirect/`` here;
admin socket and HTTP endpoints read the agent through ``AgentView``.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import signal
import socket
import ssl
import sys
import time
from collections.abc import Coroutine
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeAlias

import uvloop

from nodeagent import native
from nodeagent.config import AgentSettings
from nodeagent.control.cnipods import CniPods
from nodeagent.control.files import ConfigWatcher, LoadedConfig
from nodeagent.control.yamlload import bounds_limit
from nodeagent.core import authz, route
from nodeagent.errors import ConfigError, ConfigErrors, LocalStateError
from nodeagent.heap import tune_malloc
from nodeagent.identity.ca_client import CaClient
from nodeagent.identity.store import CertificateStore
from nodeagent.identity.tls import WorkloadCert
from nodeagent.model.objects import NODE_REDIRECT, Node
from nodeagent.model.snapshot import MeshSnapshot
from nodeagent.model.status import (
    ConfigStatus,
    ConnectionInfo,
    ExplainQuery,
    LimitStatus,
    WorkerStatus,
)
from nodeagent.proxy import handover
from nodeagent.proxy.dns import DNS_PORT
from nodeagent.proxy.explain import explain
from nodeagent.proxy.identity import MeshIdentity
from nodeagent.proxy.limits import proxy_limits, raise_open_files
from nodeagent.proxy.server import Proxy
from nodeagent.redirect import ebpf, netns
from nodeagent.redirect.capture import EbpfCapture, IptablesCapture
from nodeagent.redirect.ebpf import NodeCapture
from nodeagent.telemetry.metrics import Metrics, counts
from nodeagent.workers.inputs import dns_settings, proxy_inputs
from nodeagent.workers.metrics import MergedRegistry
from nodeagent.workers.pool import WorkerPool

log = logging.getLogger("nodeagent")

if TYPE_CHECKING:  # imported by _run_from_api only: a file-config agent saves ~14 MiB of RSS
    from nodeagent.control.kube import KubeSource

ConfigSource: TypeAlias = "ConfigWatcher | KubeSource"
"""Where the agent's config comes from: a directory of files, or the Kubernetes API."""


def capture_settings(settings: AgentSettings, node: Node | None) -> tuple[str, str, bool]:
    """(capture mode, where it was asked, local bypass on): the command line wins over
    the node's annotations, which win over the defaults (auto: eBPF where the kernel
    allows it, else iptables; bypass off)."""
    if settings.redirect:
        want, origin = settings.redirect, "--redirect"
    elif node is not None and node.redirect:
        want, origin = node.redirect, f"Node {node.name} annotation {NODE_REDIRECT}"
    else:
        want, origin = "auto", "default"
    bypass = settings.bpf_bypass
    if bypass is None:
        # off unless asked: with it, blocking sockets may see EAGAIN (README, eBPF capture)
        bypass = node.bpf_bypass if node is not None and node.bpf_bypass is not None else False
    return want, origin, bypass


def _capture_mode(
    settings: AgentSettings, node: Node | None = None, snap: MeshSnapshot | None = None
) -> tuple[str, str, NodeCapture | None]:
    """(mode, why, the eBPF capture) for the mode asked (``capture_settings``):
    ``iptables``; ``ebpf`` (a failure is fatal); ``auto`` (eBPF where the kernel allows
    it, else iptables, saying which probe failed)."""
    want, origin, bypass = capture_settings(settings, node)
    if want == "iptables":
        return "iptables", "", None
    why = ebpf.probe()
    if why is None:
        try:
            t0 = time.monotonic()
            mesh, pods = _bpf_prefill(snap, settings.node)
            cap = ebpf.NodeCapture(settings.node, settings.bpf_pin_dir, bypass, mesh, pods)
            loaded = cap.cap.load_s
            log.info(
                "capture: eBPF (%s; %s, ready in %.1fs, %d pinned link(s) "
                "re-adopted, pins under %s, local bypass %s)",
                origin,
                f"programs compiled by the loader in {loaded:.1f}s"
                if loaded
                else "programs pinned already",
                time.monotonic() - t0,
                cap.adopted,
                cap.pin_dir,
                "on" if bypass else "off",
            )
            return "ebpf", "", cap
        except (LocalStateError, OSError) as e:
            why = str(e)
    if want == "ebpf":
        raise LocalStateError(f"{origin} ebpf: {why}")
    log.warning("capture: iptables, because eBPF is not available: %s", why)
    return "iptables", f"auto: eBPF unavailable: {why}", None


def _bpf_prefill(snap: MeshSnapshot | None, node: str) -> tuple[set[str], set[str]]:
    """(mesh addresses, this node's pod IPs) of ``snap``: what new eBPF maps must hold
    before the pinned links switch to them after an upgrade."""
    if snap is None:
        return set(), set()
    return snap.mesh_addresses(), {p.pod_ip for p in snap.pods_on_node(node) if p.pod_ip}


class Agent:
    """One node's agent; implements ``nodeagent.model.status.AgentView``."""

    def __init__(self, settings: AgentSettings, watcher: ConfigSource, loaded: LoadedConfig):
        self.settings = settings
        self.node = settings.node
        self.started_at = time.time()
        self.watcher = watcher
        self._loaded = loaded
        self._snapshot = loaded.snapshot
        route.prepare(loaded.snapshot)
        authz.prepare(loaded.snapshot)
        self.metrics = Metrics()
        self.certs: CertificateStore | None = None
        self.ca_client: CaClient | None = None
        identity: MeshIdentity | None = None
        if settings.mtls:
            if not settings.trust_bundle and settings.ca_addr.startswith("unix:"):
                # (a HOST:PORT CA is refused by CaClient, whose TLS needs the bundle too)
                raise LocalStateError(
                    f"the CA at {settings.ca_addr} needs a trust anchor: give the trust "
                    "bundle (--trust-bundle, the mesh root); without it the agent would "
                    "trust whatever root the CA sends"
                )
            self.ca_client = CaClient(
                settings.ca_addr,
                settings.ca_token_file,
                trust_bundle=settings.trust_bundle,
                server_name=settings.ca_server_name,
            )
            self.certs = CertificateStore(
                self.ca_client,
                settings.trust_domain,
                settings.cert_lifetime,
                settings.trust_bundle,
            )
            identity = MeshIdentity(self.certs, settings.trust_domain)
        if settings.jwks_ca_bundle:  # a wrong file is a start error, not a 401 later
            try:
                ssl.create_default_context(cafile=settings.jwks_ca_bundle)
            except (OSError, ValueError) as e:
                raise LocalStateError(f"--jwks-ca-bundle {settings.jwks_ca_bundle}: {e}") from e
        node = loaded.snapshot.node(settings.node)
        self._node_capture = capture_settings(settings, node)
        # bpf: the eBPF capture (None: iptables), kept for ``nodeagent ctl bpf`` too
        self.capture_mode, self.capture_reason, self.bpf = _capture_mode(
            settings, node, loaded.snapshot
        )
        dns = dns_settings(settings)
        dns_port = DNS_PORT if dns is not None else None
        capture: IptablesCapture | EbpfCapture = (
            IptablesCapture(dns_port, settings.workload_cgroup_root)
            if self.bpf is None
            else EbpfCapture(self.bpf, dns_port, settings.workload_cgroup_root)
        )
        self.capture = capture
        inputs = proxy_inputs(
            settings,
            self.snapshot,
            self.metrics,
            capture,
            identity,
            dns=dns,
            reuseport=settings.workers > 1,
        )
        self.proxy = Proxy(inputs, state_dir=settings.state_dir)
        self.pool: WorkerPool | None = None
        """The worker processes beside this one (``--workers`` above 1)."""
        if settings.workers > 1:
            self.pool = WorkerPool(
                settings,
                settings.workers,
                self.capture_mode,
                self.proxy.local,
                self.snapshot,
                self._certs_now,
            )
            self.proxy.admission.share(self.pool.buckets)  # rate limits hold node-wide
            if self.certs is not None:
                self.certs.on_rotate.append(self.pool.on_cert)
        # the CNI plugin's pods: recorded in the runtime file, answered once captured
        self.cni = CniPods(
            settings.node,
            settings.runtime_file,
            watcher.reload_now,
            self.snapshot,
            self._reconcile,
            self.proxy.pod_states,
        )
        self._stop = asyncio.Event()
        self._term = asyncio.Event()
        """SIGTERM or SIGINT (``_stop`` is also set by a hand-over)."""
        self._handed_over = False
        self._reconcile_lock = asyncio.Lock()

    # -- AgentView -------------------------------------------------------------------
    def snapshot(self) -> MeshSnapshot:
        return self._snapshot

    def config_status(self) -> ConfigStatus:
        return self.watcher.status(self._snapshot.version)

    def connections(self) -> list[ConnectionInfo]:
        mine = self.proxy.table.snapshot()
        return mine if self.pool is None else [*mine, *self.pool.connections()]

    async def refresh(self) -> None:
        if self.pool is not None:
            await self.pool.gather()

    def workers(self) -> list[WorkerStatus]:
        if self.pool is None:
            return []
        return self.pool.status(len(self.proxy.table.live))

    def _certs_now(self) -> tuple[list[WorkloadCert], bytes]:
        """The certificates held and the trust bundle, for a worker (none yet: empty)."""
        if self.certs is None:
            return [], b""
        held = [self.certs.cached(i) for i in self.certs.identities()]
        certs = [c for c in held if c is not None]
        try:
            bundle = self.certs.trust_bundle()
        except LocalStateError:
            bundle = b""
        return certs, bundle

    def ready(self) -> bool:
        return self.proxy.all_ready() and not self._stop.is_set()

    def redirect_mode(self) -> str:
        mode = self.capture_mode
        if self.capture_reason:
            mode = f"{mode} ({self.capture_reason})"
        if self.capture.no_source:
            mode += f"; apps see their pod's address, not the client's: {self.capture.no_source}"
        return mode

    def config_dump(self) -> list[dict[str, Any]]:
        return [dict(o) for o in self._loaded.objects]

    def local_pods(self) -> list[dict[str, Any]]:
        return self.proxy.pod_states()

    def certificates(self) -> list[dict[str, Any]]:
        return self.certs.describe() if self.certs else []

    def recent_requests(self, limit: int) -> list[dict[str, Any]]:
        records = [dict(r) for r in self.proxy.access_log.recent]
        if self.pool is not None:  # every process's, by the time they came in
            records = [{**r, "worker": 0} for r in records] + self.pool.requests()
            records.sort(key=lambda r: str(r.get("start_time", "")))
        return records[-limit:] if limit else records

    def ejections(self) -> list[tuple[str, str, float]]:
        out: list[tuple[str, str, float]] = []
        for key, hosts in self.proxy.l7.clusters.balancers.ejected().items():
            out.extend((str(key), addr, secs) for addr, secs in hosts)
        return out

    def ca_status(self) -> dict[str, Any]:
        return self.certs.status() if self.certs else {"state": "disabled"}

    def jwks_status(self) -> list[dict[str, Any]]:
        return self.proxy.admission.jwks.status()

    def limits(self) -> list[LimitStatus]:
        rejected = int(counts(self.metrics.config_reloads).get(("rejected",), 0))
        return [*proxy_limits(self.proxy.inputs, self.proxy.caps), bounds_limit(rejected)]

    def bpf_state(self, bypass: bool | None = None) -> dict[str, Any]:
        bpf = self.bpf
        if bypass is not None:
            if bpf is None:
                raise LocalStateError(
                    f"the local socket bypass needs eBPF capture; this agent uses "
                    f"{self.redirect_mode()}"
                )
            bpf.set_bypass(bypass)
            log.info(
                "capture: local socket bypass %s (for new connections)", "on" if bypass else "off"
            )
        state: dict[str, Any] = {"mode": self.redirect_mode()}
        if bpf is not None:
            state.update(bpf.describe())
        return state

    def explain(self, query: ExplainQuery) -> dict[str, Any]:
        return explain(self.proxy, query)

    # -- lifecycle -------------------------------------------------------------------
    def _on_update(self, loaded: LoadedConfig) -> None:
        route.prepare(loaded.snapshot)  # route indexes built before the first request
        authz.prepare(loaded.snapshot)
        self._loaded = loaded
        self._snapshot = loaded.snapshot  # one assignment: readers see old or new
        self.proxy.admission.on_snapshot(loaded.snapshot)  # rate limits that changed restart
        if self.pool is not None:
            self.pool.on_snapshot(loaded.snapshot)
        self.proxy.recheck(loaded.snapshot)  # live connections a policy now denies end
        self._node_settings_changed(loaded.snapshot.node(self.node))
        self.metrics.config_reloads.labels(result="ok").inc()
        asyncio.get_running_loop().create_task(self._reconcile())

    def _node_settings_changed(self, node: Node | None) -> None:
        """A changed ``nodeagent.io/bpf-bypass`` annotation applies now (to new
        connections); a changed capture mode needs a restart, and the log says so."""
        want, origin, bypass = capture_settings(self.settings, node)
        was_want, _, was_bypass = self._node_capture
        self._node_capture = (want, origin, bypass)
        if want != was_want:
            log.warning(
                "capture: %s now asks for %s; this agent keeps %s until it restarts",
                origin,
                want,
                self.capture_mode,
            )
        if bypass != was_bypass and self.bpf is not None:
            self.bpf.set_bypass(bypass)
            log.info("capture: local socket bypass %s (node annotation)", "on" if bypass else "off")

    async def _reconcile(self) -> None:
        if self._handed_over:  # the pods' listeners and capture are the new agent's now
            return
        async with self._reconcile_lock:
            snap = self._snapshot
            if self.certs is not None:
                local = snap.pods_on_node(self.node) + snap.workload_entries_on_node(self.node)
                wanted = {p.identity(self.settings.trust_domain) for p in local if p.in_mesh}
                errors = await self.certs.ensure(wanted)
                for identity, err in errors.items():
                    log.warning("no certificate for %s yet: %s", identity, err)
            await self.proxy.reconcile(snap)
            if self.pool is not None:
                self.pool.sync()

    async def _retry_failed(self) -> None:
        while True:
            await asyncio.sleep(2.0)
            if not self.proxy.all_ready() or self.proxy.hosts_stale():
                await self._reconcile()

    async def serve(self) -> int:
        from nodeagent.admin.agentmetrics import register_agent_metrics
        from nodeagent.admin.http import start_http_servers
        from nodeagent.admin.server import start_admin_server

        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_signal)
        inherited = await self._receive_listeners()
        self.proxy.inherit(inherited)
        await self._reconcile()
        self.proxy.admission.on_snapshot(self._snapshot)  # in-mesh JWKS fetched now
        register_agent_metrics(self.metrics.registry, self)
        registry = self.metrics.registry
        if self.pool is not None:
            self.pool.start()
            registry = MergedRegistry(registry, self.pool.metric_families)
        admin = await start_admin_server(
            self,
            self.settings.socket_path,
            pods=self.cni,
            replace=inherited is not None,
            registry=registry,
        )
        http_servers = await start_http_servers(
            self,
            "0.0.0.0",
            self.settings.metrics_port,
            self.settings.ready_port,
            registry=registry,
            inherited=inherited.take if inherited is not None else None,
        )
        handover_server = await self._take_over(inherited, http_servers)
        tasks = [
            loop.create_task(self.watcher.run()),
            loop.create_task(self._retry_failed()),
        ]
        if self.certs is not None:
            tasks.append(loop.create_task(self.certs.run()))
        log.info(
            "agent for node %s serving: %d local pod(s), config version %d, socket %s; "
            "hot path %s; %d process(es) serving connections",
            self.node,
            len(self.proxy.pods),
            self._snapshot.version,
            self.settings.socket_path,
            native.mode(),
            self.settings.workers,
        )
        await self._stop.wait()
        log.info(
            "shutting down: no new connections; draining for up to %gs", self.settings.drain_seconds
        )
        self.proxy.stop_accepting()
        t0 = loop.time()
        if self.pool is not None:  # the workers stop accepting and drain meanwhile
            await asyncio.gather(
                self.pool.stop(self.settings.drain_seconds),
                self.proxy.drain(self.settings.drain_seconds),
            )
        else:
            await self.proxy.drain(self.settings.drain_seconds)
        log.info("drained in %.1fs", loop.time() - t0)
        for t in tasks:
            t.cancel()
        for s in http_servers:
            s.close()
        if handover_server is not None:
            handover_server.close()
        await admin.stop(0.5)
        await self.proxy.close()
        if self.ca_client is not None:
            await self.ca_client.close()
        if self._handed_over and self.settings.after_handover == "wait":
            log.info("handed over and drained: waiting for SIGTERM")
            await self._term.wait()
        return 0

    # -- hand-over (proxy/handover.py) -----------------------------------------------------
    def _on_signal(self) -> None:
        self._term.set()
        self._stop.set()

    async def _receive_listeners(self) -> handover.Inherited | None:
        """The listeners of this node's running agent, if there is one (else cold start)."""
        if not self.settings.handover:
            return None
        path, node = self.settings.handover_path, self.node
        return await asyncio.to_thread(handover.receive, path, node, HANDOVER_TIMEOUT)

    async def _take_over(
        self, inherited: handover.Inherited | None, http: list[asyncio.Server]
    ) -> handover.HandoverServer | None:
        """Once ready, tell the old agent to let go; then serve the hand-over socket."""
        if inherited is not None:
            loop = asyncio.get_running_loop()
            deadline = loop.time() + handover.READY_TIMEOUT
            while not self.proxy.all_ready() and loop.time() < deadline:
                await asyncio.sleep(0.1)
            if not self.proxy.all_ready():
                log.warning("hand-over: not every pod is ready; taking over all the same")
            for lst in inherited.untaken():
                log.info("hand-over: %s %s:%d is not served here", lst.kind, lst.pod, lst.port)
            inherited.close_untaken()
            released = await asyncio.to_thread(inherited.release, handover.RELEASE_TIMEOUT)
            log.info(
                "hand-over: serving %d listener(s) of pid %d (%s)",
                inherited.count,
                inherited.old_pid,
                "it let go" if released else "it did not confirm",
            )
        if not self.settings.handover:
            return None

        def listeners() -> list[tuple[handover.Listener, socket.socket]]:
            node = [
                (handover.Listener(kind, s.sockets[0].getsockname()[1]), s.sockets[0])
                for kind, s in zip(("metrics", "ready"), http, strict=False)
                if s.sockets
            ]
            return [*self.proxy.listeners(), *node]

        async def let_go(pid: int) -> None:
            self._handed_over = True
            self.proxy.stop_accepting()
            for s in http:
                s.close()
            log.info("hand-over: the agent of pid %d took over; draining", pid)
            self._stop.set()

        server = handover.HandoverServer(self.settings.handover_path, self.node, listeners, let_go)
        try:
            server.start()
        except LocalStateError as e:
            log.warning("no hand-over socket (%s): an upgrade will drop connections", e)
            return None
        return server


HANDOVER_TIMEOUT = 5.0
"""Seconds the old agent gets to hand its listeners over; beyond, a cold start."""


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    # httpx2 (the CA server's lightkube client) logs each request at INFO
    logging.getLogger("httpx2").setLevel(max(logging.WARNING, logging.root.level))


GC_THRESHOLDS = (20_000, 20, 50)
"""The data path allocates a few hundred short-lived objects per HTTP request; with
Python's default (700, 10, 10) the young generation is collected every couple of
requests and older ones are rescanned often. Collect rarely instead."""


def _tune_gc() -> None:
    """Move what start-up allocated (config, modules) out of the collector's sight and
    collect less often (see ``GC_THRESHOLDS``); keep bulk buffers in malloc's heap
    (``heap.tune_malloc``)."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)
    tune_malloc()


def run_agent(settings: AgentSettings) -> int:
    _setup_logging(settings.log_level)
    raise_open_files(settings.max_connections)
    if settings.netns:
        try:
            netns.enter(settings.netns)
        except LocalStateError as e:
            print(f"nodeagent run: {e}", file=sys.stderr)
            return 1
    if settings.source == "kubernetes":
        return _run_from_api(settings)
    assert settings.config_dir is not None
    watcher = ConfigWatcher(
        directory=settings.config_dir,
        pods_file=settings.runtime_file,
        on_update=lambda _loaded: None,
        interval=settings.reload_interval,
        root_namespace=settings.root_namespace,
    )
    try:
        loaded = watcher.load_once()
    except (ConfigErrors, ConfigError) as e:
        print(
            f"nodeagent run: the config in {settings.config_dir} is invalid:\n{e}", file=sys.stderr
        )
        return 2
    _tune_gc()

    async def main() -> int:
        try:
            agent = Agent(settings, watcher, loaded)
        except LocalStateError as e:  # e.g. --ca-addr without a trust bundle
            print(f"nodeagent run: {e}", file=sys.stderr)
            return 1
        watcher.on_update = agent._on_update
        rejected = agent.metrics.config_reloads.labels(result="rejected")
        watcher.on_reject = lambda _why: rejected.inc()
        return await agent.serve()

    return _run_loop(settings, main())


def _run_loop(settings: AgentSettings, main: Coroutine[Any, Any, int]) -> int:
    """Run ``main`` on uvloop, with the pid file written while it runs."""
    pid_file = Path(settings.pid_file) if settings.pid_file else None
    if pid_file is not None:  # the CNI launcher finds the agent's image through it
        pid_file.parent.mkdir(parents=True, exist_ok=True)
        pid_file.write_text(f"{os.getpid()}\n")
    try:
        return uvloop.run(main)
    finally:
        if pid_file is not None:
            with contextlib.suppress(OSError):  # not a successor's (an upgrade's) pid
                if pid_file.read_text().strip() == str(os.getpid()):
                    pid_file.unlink()


def _run_from_api(settings: AgentSettings) -> int:
    """The agent with the Kubernetes API as its config source. A first list that fails
    ends the agent (exit 2) with what failed: a DaemonSet pod is restarted by kubelet
    with its back-off, and a person running it sees a wrong kubeconfig or a missing
    permission at once instead of a silent wait. Once started, the API server being
    away only backs off the watches; the last snapshot keeps serving."""
    # (here, not at the top: an agent on a config directory does not need them)
    from nodeagent.control.kube import KubeSource, KubeStartError
    from nodeagent.control.kubeclient import KubeClient, credentials

    where = str(settings.kubeconfig) if settings.kubeconfig else "in-cluster credentials"
    try:
        config = credentials(settings.kubeconfig)
    except ValueError as e:
        print(f"nodeagent run: cannot use the Kubernetes API: {e}", file=sys.stderr)
        return 2

    async def main() -> int:
        client = KubeClient(config)
        source = KubeSource(
            client,
            node=settings.node,
            pods_file=settings.runtime_file,
            on_update=lambda _loaded: None,
            root_namespace=settings.root_namespace,
            interval=settings.reload_interval,
            timeout_seconds=settings.watch_timeout,
        )
        try:
            loaded = await source.start()
        except (KubeStartError, ConfigErrors, ConfigError) as e:
            await client.close()
            print(f"nodeagent run: the Kubernetes API ({where}): {e}", file=sys.stderr)
            return 2
        _tune_gc()
        try:
            agent = Agent(settings, source, loaded)
        except LocalStateError as e:  # e.g. --ca-addr without a trust bundle
            await client.close()
            print(f"nodeagent run: {e}", file=sys.stderr)
            return 1
        source.on_update = agent._on_update
        return await agent.serve()

    return _run_loop(settings, main())
