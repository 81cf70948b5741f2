"""Host mode: capture of the host's own workloads (a VM's systemd services, declared by
local WorkloadEntries) in the host's network namespace, where SSH, the agent and every
other process of the host live too.

Only what a workload declares is touched, with iptables (nat table, chains
``NODEAGENT_HOST_*``):

- **outbound**: a socket of the workload's cgroup (``-m cgroup --path``, cgroup v2) going
  anywhere but ``lo`` → its outbound listener ``<loopback>:15001`` (``DNAT``: each
  workload has its own loopback address, so the listener names the workload); its port 53
  → its DNS proxy ``<loopback>:15053``. Other cgroups (the agent, sshd, cron…) are not
  matched, so never captured;
- **inbound**: TCP to the workload's address on a port it serves (``inbound_ports``) →
  its inbound listener ``<address>:15006``; other ports (22…) are left alone. HBONE needs
  no rule: the agent listens on ``<address>:15008`` itself.

The rules of all the host's workloads are rendered together (``render``, pure) and
applied in one ``iptables-restore``. With them, ``iptables.apply_source_routing``: the
proxy's connection to a workload's app carries the client's address, and only the app's
answers on those (connmarked) connections are routed back to the proxy. A workload
whose cgroup does not exist (its service is stopped) is served inbound only until it
does; a cgroup that systemd removed and made again (the service restarted) is a new
cgroup the old rule no longer matches, so ``HostRules.stale`` compares each cgroup's inode
with the one the rules were made for and the agent re-applies them (within 2 s).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from nodeagent.errors import LocalStateError
from nodeagent.model.objects import NO_SOURCE, HostWorkload
from nodeagent.redirect.iptables import (
    INBOUND_PORT,
    MARK_MASK,
    OUTBOUND_PORT,
    PROXY_MARK,
    apply_source_routing,
    remove_source_routing,
)
from nodeagent.redirect.netns import run_in

log = logging.getLogger("nodeagent.redirect")

CHAIN_OUT = "NODEAGENT_HOST_OUT"
CHAIN_IN = "NODEAGENT_HOST_IN"
WORKLOAD_CHAIN = "NODEAGENT_HW"
"""Prefix of each workload's own chain (``NODEAGENT_HW1``, …, in key order)."""
JUMP_OUT = f"-A OUTPUT -j {CHAIN_OUT}"
JUMP_IN = f"-A PREROUTING -p tcp -j {CHAIN_IN}"
MULTIPORT_MAX = 15
"""Ports one ``-m multiport`` rule may list."""


def cgroup2_mount(mounts: str | None = None) -> Path:
    """Where the cgroup v2 hierarchy is mounted (``/sys/fs/cgroup``, or
    ``/sys/fs/cgroup/unified`` on a hybrid host), from ``/proc/self/mounts``."""
    if mounts is None:
        try:
            mounts = Path("/proc/self/mounts").read_text()
        except OSError as e:
            raise LocalStateError(f"cannot read /proc/self/mounts: {e}") from None
    fields = [ln.split() for ln in mounts.splitlines()]
    found = [f[1] for f in fields if len(f) > 2 and f[2] == "cgroup2"]
    if not found:
        raise LocalStateError("no cgroup v2 hierarchy is mounted: host mode needs one")
    return Path(min(found, key=len))


@dataclass(frozen=True)
class Placed:
    """A workload with its cgroup as iptables names it (from the v2 mount), or none."""

    workload: HostWorkload
    cgroup_path: str
    """``--path`` of its cgroup; empty: not captured outbound (no cgroup, or not there)."""


def render(placed: Iterable[Placed], dns_port: int | None, existing_nat: str = "") -> str:
    """``iptables-restore --noflush`` input for every host workload at once; chains of
    workloads no longer there (``existing_nat``) are removed; applying twice is applying
    once."""
    have = existing_nat.splitlines()
    items = sorted(placed, key=lambda p: p.workload.key)
    lines = ["*nat", f":{CHAIN_OUT} - [0:0]", f":{CHAIN_IN} - [0:0]"]
    chains = [f"{WORKLOAD_CHAIN}{i}" for i, _ in enumerate(items, start=1)]
    lines += [f":{c} - [0:0]" for c in chains]
    lines += [j for j in (JUMP_OUT, JUMP_IN) if j not in have]
    lines.append(f"-A {CHAIN_OUT} -m mark --mark {PROXY_MARK:#x}/{MARK_MASK:#x} -j RETURN")
    for chain, p in zip(chains, items, strict=True):
        w = p.workload
        if p.cgroup_path:
            lines.append(f'-A {CHAIN_OUT} -m cgroup --path "{p.cgroup_path}" -j {chain}')
        lines += _workload_lines(chain, w, dns_port)
        ports = sorted(set(w.inbound_ports) - w.exclude_inbound_ports)
        for i in range(0, len(ports), MULTIPORT_MAX):
            chunk = ",".join(str(n) for n in ports[i : i + MULTIPORT_MAX])
            lines.append(
                f"-A {CHAIN_IN} -d {w.ip}/32 -p tcp -m multiport --dports {chunk} "
                f"-j DNAT --to-destination {w.ip}:{INBOUND_PORT}"
            )
    for ln in have:  # workloads gone since: their chains go too
        name = ln[1:].split()[0] if ln.startswith(":") else ""
        if name.startswith(WORKLOAD_CHAIN) and name not in chains:
            lines += [f"-F {name}", f"-X {name}"]
    lines.append("COMMIT")
    return "\n".join(lines) + "\n"


def _workload_lines(chain: str, w: HostWorkload, dns_port: int | None) -> list[str]:
    """One workload's chain: loopback and excluded ports pass, DNS to its DNS proxy,
    other TCP to its outbound listener."""
    lines = [f"-A {chain} -o lo -j RETURN"]
    if dns_port is not None and 53 not in w.exclude_outbound_ports:
        for proto in ("udp", "tcp"):
            lines.append(
                f"-A {chain} -p {proto} --dport 53 -j DNAT --to-destination {w.loopback}:{dns_port}"
            )
    for port in sorted(w.exclude_outbound_ports):
        lines.append(f"-A {chain} -p tcp --dport {port} -j RETURN")
    lines.append(f"-A {chain} -p tcp -j DNAT --to-destination {w.loopback}:{OUTBOUND_PORT}")
    return lines


def render_removal(existing_nat: str) -> str:
    """The input that takes every host-mode jump and chain out; empty when none is there."""
    have = existing_nat.splitlines()
    lines = [f"-D{j[2:]}" for j in (JUMP_OUT, JUMP_IN) if j in have]
    ours = [
        ln[1:].split()[0]
        for ln in have
        if ln.startswith(":") and ln[1:].split()[0].startswith(("NODEAGENT_HOST_", WORKLOAD_CHAIN))
    ]
    lines += [f"-F {c}" for c in ours] + [f"-X {c}" for c in ours]
    return "\n".join(["*nat", *lines, "COMMIT"]) + "\n" if lines else ""


def _inode(path: Path) -> int | None:
    try:
        return path.stat().st_ino
    except OSError:
        return None


class HostRules:
    """The host's workloads and the rules applied for them in ``netns`` (the agent's own).

    ``root``: the directory the workloads' cgroup paths start from
    (``--workload-cgroup-root``, by default the cgroup v2 mount)."""

    def __init__(self, netns: str, root: Path, mount: Path, dns_port: int | None) -> None:
        self.netns = netns
        self.root = root
        self.mount = mount
        self.dns_port = dns_port
        self.workloads: dict[str, HostWorkload] = {}
        self._inodes: dict[str, int | None] = {}
        """key → the inode of its cgroup the rules were made for (None: not there)."""
        self._routed = False
        self.no_source = ""
        """Why the apps see the workload's own address, not the client's (empty: they
        see the client's: the proxy's transparent legs are routed back to it)."""

    def cgroup_dir(self, w: HostWorkload) -> Path:
        return self.root / w.cgroup.lstrip("/")

    def _place(self, w: HostWorkload, inode: int | None) -> Placed:
        """``w`` as its rules name it; ``inode``: its cgroup's (None: not there)."""
        if inode is None:
            return Placed(w, "")
        d = self.cgroup_dir(w)
        try:
            rel = d.relative_to(self.mount)
        except ValueError:
            raise LocalStateError(
                f"workload cgroup {d} is not under the cgroup v2 mount {self.mount}"
            ) from None
        return Placed(w, "/" + str(rel))

    def mode(self, key: str) -> str:
        """What ``ctl workloads`` shows of a host workload's capture."""
        w = self.workloads[key]
        if not w.cgroup:
            mode = "host (inbound only: no nodeagent.io/cgroup)"
        elif self._inodes.get(key) is None:
            mode = f"host (inbound only: cgroup {w.cgroup} does not exist yet)"
        else:
            mode = f"host (cgroup {w.cgroup})"
        return mode + (NO_SOURCE if self.no_source else "")

    async def set(self, w: HostWorkload) -> str:
        """Capture (or re-capture) ``w``; its mode."""
        self.workloads[w.key] = w
        await self.apply()
        return self.mode(w.key)

    async def remove(self, key: str) -> None:
        if self.workloads.pop(key, None) is None:
            return
        self._inodes.pop(key, None)
        await self.apply()

    def stale(self) -> bool:
        """Whether a workload's cgroup came, went or was made again since the rules."""
        return any(
            w.cgroup and _inode(self.cgroup_dir(w)) != self._inodes.get(k)
            for k, w in self.workloads.items()
        )

    async def apply(self) -> None:
        """Render and apply the rules of the current workloads (none: remove them all)."""
        existing = await run_in(self.netns, ["iptables-save", "-t", "nat"])
        if not self.workloads:
            rules = render_removal(existing)
            if rules:
                await run_in(self.netns, ["iptables-restore", "--noflush"], stdin=rules)
            if self._routed:
                await remove_source_routing(self.netns)
                self._routed = False
            return
        inodes = {
            k: _inode(self.cgroup_dir(w)) if w.cgroup else None
            for k, w in self.workloads.items()
        }
        placed = [self._place(w, inodes[k]) for k, w in self.workloads.items()]
        await run_in(
            self.netns,
            ["iptables-restore", "--noflush"],
            stdin=render(placed, self.dns_port, existing),
        )
        for key, ino in inodes.items():
            if ino != self._inodes.get(key, 0):
                log.info("host workload %s: %s", key, "captured" if ino else "inbound only")
        self._inodes = inodes
        if not self._routed:
            # the app sees the client's address, as in a pod: only the proxy's own
            # transparent legs (marked) are routed back to it, nothing else of the host
            try:
                await apply_source_routing(self.netns)
                self._routed, self.no_source = True, ""
            except LocalStateError as e:
                if not self.no_source:
                    log.warning("host workloads see their own address, not clients': %s", e)
                self.no_source = str(e)
