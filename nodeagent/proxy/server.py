"""The shared per-node proxy: listeners inside each local pod's netns, and the outbound
(15001) and inbound (15006) connection handlers that feed ``Relay``s.

One asyncio loop serves every pod. The source workload of an outbound connection is known
from the listener that accepted it; the destination comes from ``SO_ORIGINAL_DST``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from nodeagent.core.outbound import Action, RoundRobin, resolve
from nodeagent.errors import LocalStateError, NodeAgentError, PeerError
from nodeagent.model.objects import Pod, PodRuntime
from nodeagent.model.snapshot import MeshSnapshot
from nodeagent.proxy.connections import ConnectionTable
from nodeagent.proxy.identity import MeshIdentity
from nodeagent.proxy.relay import ClientSide, Relay, UpstreamSide
from nodeagent.proxy.sockets import connect_in, listen_in, original_dst
from nodeagent.redirect import iptables
from nodeagent.redirect.netns import NetnsHandle
from nodeagent.telemetry.metrics import Metrics

log = logging.getLogger("nodeagent.proxy")


@dataclass
class PodProxy:
    """The listeners and capture state of one local pod."""

    pod: Pod
    runtime: PodRuntime
    ns: NetnsHandle | None = None
    servers: list[asyncio.base_events.Server] = field(default_factory=list)
    state: str = "pending"
    rules: str = ""

    def close(self) -> None:
        for s in self.servers:
            s.close()
        self.servers.clear()
        if self.ns is not None:
            self.ns.close()
            self.ns = None


def _labels(
    reporter: str, src: Pod | None, dst: Pod | None, service: str, flags: str = "-"
) -> dict[str, str]:
    return {
        "reporter": reporter,
        "source_workload": src.name if src else "unknown",
        "source_workload_namespace": src.namespace if src else "unknown",
        "source_principal": "unknown",
        "destination_workload": dst.name if dst else "unknown",
        "destination_workload_namespace": dst.namespace if dst else "unknown",
        "destination_service": service or "unknown",
        "destination_principal": "unknown",
        "response_flags": flags,
        "connection_security_policy": "none",
    }


class Proxy:
    def __init__(
        self,
        node: str,
        snapshot: Callable[[], MeshSnapshot],
        metrics: Metrics,
        connect_timeout: float = 5.0,
        identity: MeshIdentity | None = None,
    ) -> None:
        self.node = node
        self.identity = identity
        self.snapshot = snapshot
        self.metrics = metrics
        self.table = ConnectionTable(metrics)
        self.connect_timeout = connect_timeout
        self.rr = RoundRobin()
        self.pods: dict[str, PodProxy] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self.accepting = True

    # -- pods ------------------------------------------------------------------------
    async def reconcile(self, snap: MeshSnapshot) -> None:
        """Capture every local pod that has a runtime entry; release pods that left."""
        wanted: dict[str, tuple[Pod, PodRuntime]] = {}
        for pod in snap.pods_on_node(self.node):
            rt = snap.runtimes.get(pod.key)
            if rt is not None:
                wanted[pod.key] = (pod, rt)
        for key in list(self.pods):
            pp = self.pods[key]
            if key not in wanted or wanted[key][1] != pp.runtime:
                log.info("pod %s left this node's mesh: closing its listeners", key)
                pp.close()
                del self.pods[key]
        for key, (pod, rt) in wanted.items():
            existing = self.pods.get(key)
            if existing is None:
                pp = self.pods[key] = PodProxy(pod=pod, runtime=rt)
            else:
                pp = existing
                pp.pod = pod
            if pp.state != "ready":
                await self._capture(pp)

    async def _capture(self, pp: PodProxy) -> None:
        key = pp.pod.key
        try:
            if pp.ns is None:
                pp.ns = NetnsHandle(pp.runtime.netns)
            if not pp.servers:
                loop = asyncio.get_running_loop()
                out_sock = listen_in(pp.ns, "127.0.0.1", iptables.OUTBOUND_PORT)
                in_sock = listen_in(pp.ns, "0.0.0.0", iptables.INBOUND_PORT)
                pp.servers.append(
                    await loop.create_server(
                        self._factory(pp, "outbound"), sock=out_sock, backlog=4096
                    )
                )
                pp.servers.append(
                    await loop.create_server(
                        self._factory(pp, "inbound"), sock=in_sock, backlog=4096
                    )
                )
            spec = iptables.CaptureSpec(
                exclude_outbound_ports=pp.pod.excluded_ports("Outbound"),
                exclude_inbound_ports=pp.pod.excluded_ports("Inbound"),
            )
            pp.rules = await iptables.apply_rules(pp.runtime.netns, spec)
            pp.state = "ready"
            log.info("pod %s captured (iptables) in %s", key, pp.runtime.netns)
        except (OSError, NodeAgentError) as e:
            pp.state = f"error: {e}"
            log.error("cannot capture pod %s: %s", key, e)
            pp.close()

    def all_ready(self) -> bool:
        return all(self._pod_ready(pp) for pp in self.pods.values())

    def _pod_ready(self, pp: PodProxy) -> bool:
        if pp.state != "ready":
            return False
        return self.identity is None or self.identity.has(self._identity_of(pp.pod))

    def _identity_of(self, pod: Pod) -> str:
        td = self.identity.trust_domain if self.identity is not None else "cluster.local"
        return pod.identity(td)

    def pod_states(self) -> list[dict[str, Any]]:
        return [
            {
                "key": k,
                "ip": pp.runtime.ip,
                "netns": pp.runtime.netns,
                "cgroup": pp.runtime.cgroup,
                "capture": pp.state,
            }
            for k, pp in sorted(self.pods.items())
        ]

    # -- connections -----------------------------------------------------------------
    def _factory(self, pp: PodProxy, direction: str) -> Callable[[], ClientSide]:
        on_made = self._on_outbound if direction == "outbound" else self._on_inbound

        def make() -> ClientSide:
            relay = self.table.open({"direction": direction, "pod": pp.pod.key})
            return ClientSide(relay, lambda side: self._spawn(on_made(pp, side)))

        return make

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("connection handler failed: %r", task.exception(), exc_info=task.exception())

    def _refuse(self, relay: Relay, direction: str, flag: str, reason: str) -> None:
        self.metrics.failures.labels(direction=direction, response_flags=flag).inc()
        log.warning(
            "%s %s from %s to %s refused [%s]: %s",
            direction,
            relay.meta.get("pod"),
            relay.meta.get("source"),
            relay.meta.get("destination"),
            flag,
            reason,
        )
        relay.close(f"{flag}: {reason}")

    async def _dial(
        self, pp: PodProxy, relay: Relay, addr: tuple[str, int], direction: str
    ) -> None:
        ns = pp.ns
        if ns is None:
            self._refuse(relay, direction, "UF", f"pod {pp.pod.key} is no longer captured")
            return
        relay.meta["upstream"] = f"{addr[0]}:{addr[1]}"
        try:
            sock = await connect_in(ns, addr, self.connect_timeout)
        except PeerError as e:
            if relay.closed:
                return
            self._refuse(relay, direction, "UF", str(e))
            return
        if relay.closed:  # the client left while we were connecting
            sock.close()
            self.metrics.failures.labels(direction=direction, response_flags="DC").inc()
            return
        loop = asyncio.get_running_loop()
        try:
            await loop.create_connection(lambda: UpstreamSide(relay), sock=sock)
        except OSError as e:
            sock.close()
            self._refuse(relay, direction, "UF", f"upstream {addr}: {e}")
            return
        relay.meta["counted"] = True
        self.table.counted(relay)

    async def _on_outbound(self, pp: PodProxy, side: ClientSide) -> None:
        relay = side.relay
        t = side.transport
        assert t is not None
        peer = t.get_extra_info("peername")
        relay.meta["source"] = f"{peer[0]}:{peer[1]}" if peer else "?"
        try:
            dst = original_dst(t.get_extra_info("socket"))
        except OSError as e:
            self._refuse(relay, "outbound", "NR", f"cannot read the original destination: {e}")
            return
        if dst is None:
            self._refuse(relay, "outbound", "NR", "connection was not redirected by capture")
            return
        relay.meta["destination"] = f"{dst[0]}:{dst[1]}"
        snap = self.snapshot()
        decision = resolve(snap, pp.pod, dst[0], dst[1], self.rr)
        if decision.action is Action.REFUSE:
            self._refuse(relay, "outbound", decision.flag, decision.reason)
            return
        if decision.action is Action.PASSTHROUGH:
            relay.meta["direction"] = "passthrough"
            relay.meta["labels"] = _labels("source", pp.pod, None, "PassthroughCluster")
            await self._dial(pp, relay, dst, "passthrough")
            return
        ep = decision.endpoint
        assert ep is not None
        service = decision.service.key if decision.service else ""
        relay.meta["service"] = service
        relay.meta["peer"] = ep.pod.key
        relay.meta["labels"] = _labels(
            "source",
            pp.pod,
            ep.pod,
            f"{decision.service.name}.{decision.service.namespace}.svc.cluster.local"
            if decision.service
            else "",
        )
        await self._dial(pp, relay, (ep.ip, ep.port), "outbound")

    async def _on_inbound(self, pp: PodProxy, side: ClientSide) -> None:
        relay = side.relay
        t = side.transport
        assert t is not None
        peer = t.get_extra_info("peername")
        relay.meta["source"] = f"{peer[0]}:{peer[1]}" if peer else "?"
        try:
            dst = original_dst(t.get_extra_info("socket"))
        except OSError as e:
            self._refuse(relay, "inbound", "NR", f"cannot read the original destination: {e}")
            return
        if dst is None or dst[1] in (iptables.INBOUND_PORT, iptables.OUTBOUND_PORT):
            self._refuse(relay, "inbound", "NR", "connection was not redirected by capture")
            return
        relay.meta["destination"] = f"{dst[0]}:{dst[1]}"
        snap = self.snapshot()
        src_pod = snap.pod_by_ip.get(peer[0]) if peer else None
        relay.meta["peer"] = src_pod.key if src_pod else ""
        relay.meta["labels"] = _labels("destination", src_pod, pp.pod, "")
        await self._dial(pp, relay, dst, "inbound")

    # -- shutdown --------------------------------------------------------------------
    def stop_accepting(self) -> None:
        self.accepting = False
        for pp in self.pods.values():
            for s in pp.servers:
                s.close()

    async def drain(self, seconds: float) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + seconds
        while self.table.live and loop.time() < deadline:
            await asyncio.sleep(0.1)
        for relay in list(self.table.live.values()):
            relay.abort("agent shutting down")

    async def close(self) -> None:
        for pp in self.pods.values():
            pp.close()
        self.pods.clear()


__all__ = ["LocalStateError", "PodProxy", "Proxy"]
