"""The shared per-node proxy, as the agent sees it: ``Proxy`` composes the parts and
offers what the composition root, the admin socket and ``explain`` use.

One asyncio loop serves every pod. The parts, each in its own module, share one
``ProxyInputs`` (``proxy.inputs``):

- ``proxy.pods``: the local pods' sockets, listeners, capture and readiness;
- ``proxy.outbound``: each pod's 15001 listener (decide once, then dispatch);
- ``proxy.inbound``: each pod's 15006 and 15008 listeners, policy re-checks;
- ``proxy.plumbing``: what both directions share (relays, dialling, the L7 hand-off);
- ``proxy.dns``: each pod's DNS proxy (15053), when the inputs ask for one.

The engines they share (the L7 router, the HTTP/2 upstream pool, the inbound policy) are
built and closed here. This module holds no connection logic of its own.
"""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path
from typing import Any

from nodeagent.model.objects import Pod
from nodeagent.model.snapshot import MeshSnapshot
from nodeagent.proxy.admission import InboundPolicy
from nodeagent.proxy.dns import DnsProxy, Forwarder
from nodeagent.proxy.handover import Listener
from nodeagent.proxy.inbound import Inbound
from nodeagent.proxy.inputs import ProxyInputs
from nodeagent.proxy.l7 import L7Proxy
from nodeagent.proxy.l7h2 import H2Pool
from nodeagent.proxy.limits import ConnectionCaps
from nodeagent.proxy.outbound import Outbound
from nodeagent.proxy.plumbing import Plumbing
from nodeagent.proxy.pods import ListenerSource, LocalPods, PodProxy
from nodeagent.proxy.tracing import Observer


class Proxy:
    """The proxy of one node: its local pods and both directions' handlers."""

    def __init__(self, inputs: ProxyInputs, state_dir: Path | None = None) -> None:
        """``state_dir`` keeps the inbound quota counters across restarts (None: memory)."""
        self.inputs = inputs
        self.snapshot = inputs.snapshot
        self.identity = inputs.identity
        self.table = inputs.table
        self.access_log = inputs.access_log
        self.observer = Observer(inputs.snapshot, inputs.spans)
        self.table.observer = self.observer
        if inputs.table.access_log is None:  # its "connection complete" lines go here too
            inputs.table.access_log = inputs.access_log
        self.l7 = L7Proxy(
            inputs.snapshot,
            inputs.metrics,
            inputs.access_log,
            path_normalization=inputs.path_normalization,
            http1_limits=inputs.http1_limits,
            observer=self.observer,
        )
        self.h2pool = H2Pool()
        self.admission = InboundPolicy(inputs.snapshot, state_dir, inputs.jwks_ca_bundle)
        if inputs.spans is not None:
            self.admission.spans_for = self.observer.serves_spans
        self.pods: dict[str, PodProxy] = {}
        """The local pods by key (served by ``local``; the inbound side serves only these)."""
        self.caps = ConnectionCaps(inputs.connection_limits, inputs.metrics)
        plumbing = Plumbing(inputs, self.l7, self.h2pool, self.caps)
        self.outbound = Outbound(inputs, plumbing, self.l7.clusters, self.l7.rnd.random)
        self.inbound = Inbound(inputs, plumbing, self.admission, self.pods)
        self.dns: DnsProxy | None = None
        if inputs.dns is not None:
            d = inputs.dns
            forwarder = Forwarder(d.upstreams, d.timeout, d.mark)
            self.dns = DnsProxy(inputs.snapshot, forwarder, inputs.metrics, d.domain)
        self.local = LocalPods(
            inputs,
            self.pods,
            self.outbound.accept,
            self.inbound.accept,
            self.inbound.on_hbone,
            self.caps,
            self.dns,
        )

    async def reconcile(self, snap: MeshSnapshot) -> None:
        """Capture every local pod that has a runtime entry; release pods that left."""
        await self.local.reconcile(snap)

    def all_ready(self) -> bool:
        return self.local.all_ready()

    def hosts_stale(self) -> bool:
        """Whether a host workload's cgroup changed under its capture rules."""
        return self.local.hosts_stale()

    def inherit(self, inherited: ListenerSource | None) -> None:
        """Use these listeners (a previous agent's, or in a worker the main process's)
        when capturing pods."""
        self.local.inherited = inherited

    def listeners(self) -> list[tuple[Listener, socket.socket]]:
        """The pods' listening sockets, for a hand-over to a new agent."""
        return self.local.listeners()

    def pod_states(self) -> list[dict[str, Any]]:
        return self.local.pod_states()

    def identity_principal(self, pod: Pod) -> str:
        """``pod``'s SPIFFE identity (what mTLS proves for it)."""
        return self.inputs.principal(pod)

    def recheck(self, snap: MeshSnapshot) -> int:
        """Close the live inbound connections ``snap``'s policies now deny; how many."""
        return self.inbound.recheck(snap)

    def stop_accepting(self) -> None:
        self.local.stop_accepting()

    async def drain(self, seconds: float) -> None:
        """Wait up to ``seconds`` for live connections to end, and for HBONE tunnels
        (those still in their handshake too), then reset the rest."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + seconds
        while (self.table.live or self.local.hbone_busy()) and loop.time() < deadline:
            await asyncio.sleep(0.1)
        for relay in list(self.table.live.values()):
            relay.abort("agent shutting down")

    async def close(self) -> None:
        self.admission.close()
        self.l7.close()
        self.h2pool.close()
        self.local.close()
        self.access_log.flush()
        self.observer.close()


__all__ = ["PodProxy", "Proxy", "ProxyInputs"]
