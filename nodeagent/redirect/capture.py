"""The two captures the proxy can be handed (its ``Capture`` interface, which they meet
structurally without importing ``proxy/``): ``IptablesCapture`` (REDIRECT rules in each
pod's netns) and ``EbpfCapture`` (the programs of a loaded ``NodeCapture``). Each also
sets up the source routing that lets the app see the client's address (iptables:
``iptables.apply_source_routing``; eBPF: ``srcroute.apply``); where that fails the pod's
mode says so (``"… (no source routing)"``), the app sees its pod's address, and
``no_source`` says why (logged once per reason, shown by ``ctl status``).

Each attaches a pod given its runtime entry, its inbound listener and its excluded
ports, follows the snapshot's mesh addresses, and says where an accepted connection was
going before capture. Both capture the host's own workloads (host mode, a VM's services)
alike, with iptables' cgroup match (``HostCapture``, ``hostmode``).
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import Set
from pathlib import Path

from nodeagent.errors import LocalStateError
from nodeagent.model.objects import HOST_NETNS, NO_SOURCE, HostWorkload, PodRuntime
from nodeagent.model.snapshot import MeshSnapshot
from nodeagent.redirect import iptables, srcroute
from nodeagent.redirect.ebpf import NodeCapture
from nodeagent.redirect.hostmode import HostRules, cgroup2_mount
from nodeagent.redirect.netns import netns_path, run_in
from nodeagent.redirect.sockets import original_dst

log = logging.getLogger("nodeagent.redirect")

Addr = tuple[str, int]
Excluded = tuple[frozenset[int], frozenset[int]]
"""(outbound, inbound) ports left out of capture."""
MIGRATE_REQ = "net.ipv4.tcp_migrate_req"
"""The per-netns switch that hands a closing ``SO_REUSEPORT`` listener's queue on."""




class SourceRouting:
    """Which captured pods' apps see their pod's address instead of the client's, and why
    (each reason logged once)."""

    def __init__(self) -> None:
        self.failing: dict[str, str] = {}
        """pod key → why its source routing failed."""
        self._logged: set[str] = set()

    @property
    def no_source(self) -> str:
        """Why apps see their pod's address, for ``ctl status`` (empty: none does)."""
        if not self.failing:
            return ""
        first = min(self.failing)
        return f"{len(self.failing)} pod(s), e.g. {first}: {self.failing[first]}"

    def routed(self, pod_key: str) -> None:
        """``pod_key``'s app sees the clients' addresses, or the pod left."""
        self.failing.pop(pod_key, None)

    async def migrate_queued(self, pod_key: str, netns: str, on: bool) -> None:
        """Set ``MIGRATE_REQ`` in the pod's ``netns`` (a path) to 1 (``on``) or back to 0:
        when one socket of a listener group closes (a worker that dies, the old agent's
        workers after a hand-over), the kernel moves the connections queued on it to the
        group's other sockets instead of resetting them. Best effort: a kernel before 5.14
        has no such switch, and then those connections are reset (logged once)."""
        try:
            await run_in(netns, ["sysctl", "-q", "-w", f"{MIGRATE_REQ}={int(on)}"])
        except LocalStateError as e:
            if str(e) not in self._logged:
                self._logged.add(str(e))
                log.warning(
                    "pod %s: connections queued on a closing listener are reset: %s", pod_key, e
                )

    def failed(self, pod_key: str, mode: str, e: LocalStateError) -> str:
        """Source routing failed for ``pod_key``: remember why; the pod's mode."""
        why = str(e)
        self.failing[pod_key] = why
        if why not in self._logged:
            self._logged.add(why)
            log.warning(
                "pod %s: its app sees its own pod's address, not the clients' (%s capture "
                "cannot route its answers back to the proxy): %s",
                pod_key,
                mode,
                why,
            )
        return mode + NO_SOURCE


class HostCapture:
    """Host mode, the same under both captures: the host's own workloads (local
    WorkloadEntries) by iptables' cgroup match in the agent's netns (``hostmode``)."""

    def __init__(self, dns_port: int | None, cgroup_root: str) -> None:
        self._host: HostRules | None = None
        self._host_dns = dns_port
        self._cgroup_root = cgroup_root

    def _rules(self) -> HostRules:
        if self._host is None:
            mount = cgroup2_mount()
            root = Path(self._cgroup_root) if self._cgroup_root else mount
            self._host = HostRules(HOST_NETNS, root, mount, self._host_dns)
        return self._host

    async def attach_host(self, workload: HostWorkload) -> str:
        """Capture a workload of this host (again, when it changed); its mode."""
        return await self._rules().set(workload)

    async def detach_host(self, key: str) -> None:
        if self._host is not None:
            await self._host.remove(key)

    def host_stale(self) -> bool:
        """Whether a host workload's cgroup appeared, went or was made again."""
        return self._host is not None and self._host.stale()

    async def refresh_hosts(self) -> dict[str, str]:
        """Re-apply the host rules for the cgroups as they are now; each workload's mode."""
        if self._host is None:
            return {}
        await self._host.apply()
        return {k: self._host.mode(k) for k in self._host.workloads}


class IptablesCapture(SourceRouting, HostCapture):
    """nat REDIRECT rules inside each pod's netns; the kernel keeps the original
    destination of a redirected connection for ``SO_ORIGINAL_DST``. With ``dns_port``,
    the pod's DNS (port 53) goes to the DNS proxy there too."""

    def __init__(self, dns_port: int | None = None, cgroup_root: str = "") -> None:
        SourceRouting.__init__(self)
        HostCapture.__init__(self, dns_port, cgroup_root)
        self.dns_port = dns_port

    def on_snapshot(self, snap: MeshSnapshot, local: Set[str]) -> None:
        """Nothing to do: the rules redirect every TCP destination, mesh or not."""

    async def attach(
        self, pod_key: str, runtime: PodRuntime, listener: socket.socket, excluded: Excluded
    ) -> str:
        out_ports, in_ports = excluded
        spec = iptables.CaptureSpec(
            exclude_outbound_ports=out_ports,
            exclude_inbound_ports=in_ports,
            dns_port=self.dns_port,
        )
        await iptables.apply_rules(runtime.netns, spec)
        await self.migrate_queued(pod_key, netns_path(runtime.netns), True)
        try:
            await iptables.apply_source_routing(netns_path(runtime.netns))
        except LocalStateError as e:  # capture still works; the app sees the proxy
            return self.failed(pod_key, "iptables", e)
        self.routed(pod_key)
        return "iptables"

    def exclude(self, runtime: PodRuntime, listener: socket.socket, excluded: Excluded) -> None:
        """Not applied to a live pod: its rules change when it is captured again."""

    async def detach(self, pod_key: str, runtime: PodRuntime) -> None:
        """Take the rules out of the pod's netns when it lives on (a CNI DEL comes before
        the runtime removes it); a netns already gone took them with it."""
        self.routed(pod_key)
        path = netns_path(runtime.netns)
        if not os.path.exists(path):
            return
        try:
            await iptables.remove_rules(path)
            await iptables.remove_source_routing(path)
            await self.migrate_queued(pod_key, path, False)
        except LocalStateError as e:
            log.warning("pod %s: cannot remove its capture rules: %s", pod_key, e)

    def original_destination(self, transport: asyncio.BaseTransport, inbound: bool) -> Addr | None:
        return original_dst(transport.get_extra_info("socket"))


class EbpfCapture(SourceRouting, HostCapture):
    """The eBPF programs of ``node`` (loaded or re-adopted by the composition root);
    with ``dns_port``, the pod's DNS goes to the DNS proxy by the two iptables rules of
    ``iptables.render_dns_rules`` (the programs steer TCP only: to mesh addresses, or
    under REGISTRY_ONLY to any address)."""

    def __init__(
        self, node: NodeCapture, dns_port: int | None = None, cgroup_root: str = ""
    ) -> None:
        SourceRouting.__init__(self)
        HostCapture.__init__(self, dns_port, cgroup_root)
        self.node = node
        self.dns_port = dns_port
        self._retained = False

    def on_snapshot(self, snap: MeshSnapshot, local: Set[str]) -> None:
        self.node.cap.set_mesh_ips(snap.mesh_addresses())
        self.node.cap.set_capture_all(snap.registry_only)  # the proxy refuses the rest (NR)
        if not self._retained:  # pins of pods that left while we were down
            self.node.retain(set(local))
            self._retained = True

    async def attach(
        self, pod_key: str, runtime: PodRuntime, listener: socket.socket, excluded: Excluded
    ) -> str:
        out_ports, in_ports = excluded
        self.node.attach(
            pod_key,
            runtime.cgroup,
            netns_path(runtime.netns),
            runtime.ip,
            listener,
            exclude_outbound_ports=self._bpf_outbound(out_ports),
            exclude_inbound_ports=in_ports,
        )
        mode = "eBPF"
        await self.migrate_queued(pod_key, netns_path(runtime.netns), True)
        if self.dns_port is not None:
            spec = iptables.CaptureSpec(exclude_outbound_ports=out_ports, dns_port=self.dns_port)
            try:
                await iptables.apply_dns_rules(netns_path(runtime.netns), spec)
            except LocalStateError as e:  # the pod is captured; its names go to its own resolver
                log.warning("pod %s: its DNS is not captured: %s", pod_key, e)
                mode += " (DNS not captured)"
        try:
            await srcroute.apply(netns_path(runtime.netns))
        except LocalStateError as e:  # capture still works; the app sees the proxy
            return self.failed(pod_key, mode, e)
        self.routed(pod_key)
        return mode

    def exclude(self, runtime: PodRuntime, listener: socket.socket, excluded: Excluded) -> None:
        """Changed exclude*Ports annotations of a live pod apply at once (the maps)."""
        out_ports, in_ports = excluded
        self.node.exclude(runtime.ip, listener, self._bpf_outbound(out_ports), in_ports)

    def _bpf_outbound(self, out_ports: frozenset[int]) -> frozenset[int]:
        """The outbound ports the programs leave alone: with the DNS proxy, TCP 53 too
        (a nameserver at a mesh address, kube-dns's, goes to the DNS chain, not 15001)."""
        return out_ports | {53} if self.dns_port is not None else out_ports

    async def detach(self, pod_key: str, runtime: PodRuntime) -> None:
        self.node.detach(pod_key, runtime.ip)
        self.routed(pod_key)
        path = netns_path(runtime.netns)
        if not os.path.exists(path):  # gone with the pod, routing and all
            return
        try:
            await srcroute.remove(path)
            await self.migrate_queued(pod_key, path, False)
            if self.dns_port is not None:
                await iptables.remove_rules(path)
        except LocalStateError as e:
            log.warning("pod %s: cannot remove its source routing or DNS rules: %s", pod_key, e)

    def original_destination(self, transport: asyncio.BaseTransport, inbound: bool) -> Addr | None:
        return ebpf_original_destination(transport, inbound)


def ebpf_original_destination(transport: asyncio.BaseTransport, inbound: bool) -> Addr | None:
    """Where a connection accepted under eBPF capture was going (a worker process,
    which holds no ``EbpfCapture``, asks this too)."""
    if inbound:
        # sk_lookup steers without rewriting: the socket's own address is it; a host
        # workload's inbound was rewritten to 15006 by its iptables rule (DNAT)
        name = transport.get_extra_info("sockname")
        if name and name[1] != iptables.INBOUND_PORT:
            return (name[0], name[1])
    return original_dst(transport.get_extra_info("socket"))
