"""iptables capture inside a pod's network namespace.

``render_rules`` is a pure function from a ``CaptureSpec`` to ``iptables-restore`` input;
``apply_rules`` runs it inside the pod's netns with ``nsenter``; ``remove_rules`` takes them
out again (``render_removal``, pure too). The rules:

- outbound TCP (nat OUTPUT) → the proxy's outbound listener (15001), except loopback
  traffic, excluded ports, and the proxy's own upstream sockets (``SO_MARK`` 0x539);
- inbound TCP (nat PREROUTING) → the inbound listener (15006), except HBONE (15008)
  and excluded ports;
- with ``dns_port`` (the DNS proxy is on): UDP and TCP to port 53 (not over loopback,
  not the proxy's own marked forwards) → the DNS proxy (15053), unless port 53 is an
  excluded outbound port. ``render_dns_rules`` is that part alone, for eBPF mode.

``apply_source_routing`` (with these rules) lets the proxy's upstream socket to the
app carry the client's address (``IP_TRANSPARENT``), as ztunnel in-pod does: a
connection the proxy opened (mark 0x539) is connmarked 0x111, the app's packets of it
get that mark back, and a policy route delivers them locally, to the proxy.
"""

from __future__ import annotations

from dataclasses import dataclass

from nodeagent.redirect.netns import run_in

PROXY_MARK = 0x539
MARK_MASK = 0xFFF
OUTBOUND_PORT = 15001
INBOUND_PORT = 15006
HBONE_PORT = 15008

SOURCE_MARK = 0x111
ROUTE_TABLE = 100
RULE_PREF = 32764

CHAIN_OUT = "NODEAGENT_OUTPUT"
CHAIN_IN = "NODEAGENT_INBOUND"
JUMP_OUT = f"-A OUTPUT -p tcp -j {CHAIN_OUT}"
JUMP_IN = f"-A PREROUTING -p tcp -j {CHAIN_IN}"
CHAIN_DNS = "NODEAGENT_DNS"
JUMP_DNS_UDP = f"-A OUTPUT -p udp -j {CHAIN_DNS}"
JUMP_DNS_TCP = f"-A OUTPUT -p tcp -j {CHAIN_DNS}"
"""eBPF mode's jump for TCP; iptables mode's goes through ``CHAIN_OUT``."""
DNS_PORT = 15053


@dataclass(frozen=True)
class CaptureSpec:
    exclude_outbound_ports: frozenset[int] = frozenset()
    exclude_inbound_ports: frozenset[int] = frozenset()
    outbound_port: int = OUTBOUND_PORT
    inbound_port: int = INBOUND_PORT
    hbone_port: int = HBONE_PORT
    mark: int = PROXY_MARK
    dns_port: int | None = None
    """The DNS proxy's port; None: DNS is not captured."""

    @property
    def captures_dns(self) -> bool:
        return self.dns_port is not None and 53 not in self.exclude_outbound_ports


def render_rules(spec: CaptureSpec, existing_nat: str = "") -> str:
    """The ``iptables-restore --noflush`` input for one pod.

    Declaring our chains flushes them; the jumps into them are added only when
    ``existing_nat`` (``iptables-save -t nat`` output) lacks them, so applying twice is
    the same as applying once.
    """
    # the DNS chain is declared, so flushed, even when empty: DNS capture turned off
    # leaves nothing behind
    lines = ["*nat", f":{CHAIN_IN} - [0:0]", f":{CHAIN_OUT} - [0:0]", f":{CHAIN_DNS} - [0:0]"]
    if JUMP_IN not in existing_nat.splitlines():
        lines.append(JUMP_IN)
    if JUMP_OUT not in existing_nat.splitlines():
        lines.append(JUMP_OUT)
    lines.append(f"-A {CHAIN_IN} -p tcp --dport {spec.hbone_port} -j RETURN")
    lines.append(f"-A {CHAIN_IN} -p tcp --dport {spec.inbound_port} -j RETURN")
    for port in sorted(spec.exclude_inbound_ports):
        lines.append(f"-A {CHAIN_IN} -p tcp --dport {port} -j RETURN")
    lines.append(f"-A {CHAIN_IN} -p tcp -j REDIRECT --to-ports {spec.inbound_port}")
    lines.append(f"-A {CHAIN_OUT} -m mark --mark {spec.mark:#x}/{MARK_MASK:#x} -j RETURN")
    if spec.captures_dns:
        lines.append(f"-A {CHAIN_OUT} -p tcp --dport 53 -j {CHAIN_DNS}")
    lines.append(f"-A {CHAIN_OUT} -o lo -j RETURN")
    for port in sorted(spec.exclude_outbound_ports):
        lines.append(f"-A {CHAIN_OUT} -p tcp --dport {port} -j RETURN")
    lines.append(f"-A {CHAIN_OUT} -p tcp -j REDIRECT --to-ports {spec.outbound_port}")
    lines += _dns_lines(spec, existing_nat, (JUMP_DNS_UDP,))
    lines.append("COMMIT")
    return "\n".join(lines) + "\n"


def render_dns_rules(spec: CaptureSpec, existing_nat: str = "") -> str:
    """The DNS capture alone (eBPF mode steers TCP itself; its DNS goes through these)."""
    jumps = (JUMP_DNS_UDP, JUMP_DNS_TCP)
    lines = ["*nat", f":{CHAIN_DNS} - [0:0]", *_dns_lines(spec, existing_nat, jumps), "COMMIT"]
    return "\n".join(lines) + "\n"


def _dns_lines(spec: CaptureSpec, existing_nat: str, jumps: tuple[str, ...]) -> list[str]:
    """The jumps to the DNS chain (declared by the caller) and its rules."""
    lines = [j for j in jumps if j not in existing_nat.splitlines()]
    if spec.captures_dns:
        lines.append(f"-A {CHAIN_DNS} -m mark --mark {spec.mark:#x}/{MARK_MASK:#x} -j RETURN")
        lines.append(f"-A {CHAIN_DNS} -o lo -j RETURN")
        for proto in ("udp", "tcp"):
            lines.append(
                f"-A {CHAIN_DNS} -p {proto} --dport 53 -j REDIRECT --to-ports {spec.dns_port}"
            )
    return lines


async def apply_rules(netns: str, spec: CaptureSpec) -> str:
    """Install (or refresh) the capture rules in ``netns``; returns what was applied."""
    existing = await run_in(netns, ["iptables-save", "-t", "nat"])
    rules = render_rules(spec, existing)
    await run_in(netns, ["iptables-restore", "--noflush"], stdin=rules)
    return rules


def render_removal(existing_nat: str) -> str:
    """The ``iptables-restore --noflush`` input that takes our jumps and chains out of
    a netns whose nat table is ``existing_nat``; empty when nothing of ours is there."""
    have = existing_nat.splitlines()
    jumps = (JUMP_OUT, JUMP_IN, JUMP_DNS_UDP, JUMP_DNS_TCP)
    lines = [f"-D{jump[2:]}" for jump in jumps if jump in have]
    for chain in (CHAIN_OUT, CHAIN_IN, CHAIN_DNS):
        if any(ln.startswith(f":{chain} ") for ln in have):
            lines += [f"-F {chain}", f"-X {chain}"]
    return "\n".join(["*nat", *lines, "COMMIT"]) + "\n" if lines else ""


async def apply_dns_rules(netns: str, spec: CaptureSpec) -> str:
    """Install (or refresh) the DNS capture alone in ``netns`` (eBPF mode)."""
    existing = await run_in(netns, ["iptables-save", "-t", "nat"])
    rules = render_dns_rules(spec, existing)
    await run_in(netns, ["iptables-restore", "--noflush"], stdin=rules)
    return rules


async def remove_rules(netns: str) -> bool:
    """Take the capture rules out of ``netns`` (a pod released while its netns lives on);
    False when there were none."""
    rules = render_removal(await run_in(netns, ["iptables-save", "-t", "nat"]))
    if rules:
        await run_in(netns, ["iptables-restore", "--noflush"], stdin=rules)
    return bool(rules)


CHAIN_MANGLE_IN = "NODEAGENT_PRERT"
CHAIN_MANGLE_OUT = "NODEAGENT_MANGLE_OUT"
JUMP_MANGLE_IN = f"-A PREROUTING -j {CHAIN_MANGLE_IN}"
JUMP_MANGLE_OUT = f"-A OUTPUT -j {CHAIN_MANGLE_OUT}"
_FWMARK = f"{SOURCE_MARK:#x}/{MARK_MASK:#x}"


def render_source_rules(existing_mangle: str = "", mark: int = PROXY_MARK) -> str:
    """The mangle rules of ``apply_source_routing`` (idempotent like ``render_rules``)."""
    have = existing_mangle.splitlines()
    lines = ["*mangle", f":{CHAIN_MANGLE_IN} - [0:0]", f":{CHAIN_MANGLE_OUT} - [0:0]"]
    lines += [j for j in (JUMP_MANGLE_IN, JUMP_MANGLE_OUT) if j not in have]
    lines.append(
        f"-A {CHAIN_MANGLE_IN} -m mark --mark {mark:#x}/{MARK_MASK:#x} "
        f"-j CONNMARK --set-xmark {_FWMARK}"
    )
    lines.append(
        f"-A {CHAIN_MANGLE_OUT} -m connmark --mark {_FWMARK} "
        "-j CONNMARK --restore-mark --nfmask 0xffffffff --ctmask 0xffffffff"
    )
    lines.append("COMMIT")
    return "\n".join(lines) + "\n"


async def apply_source_routing(netns: str) -> None:
    """Route the app's packets of connections the proxy opened from a client's address
    back to the proxy inside ``netns`` (idempotent)."""
    existing = await run_in(netns, ["iptables-save", "-t", "mangle"])
    await run_in(netns, ["iptables-restore", "--noflush"], stdin=render_source_rules(existing))
    await run_in(netns, ["ip", "route", "replace", "local", "0.0.0.0/0", "dev", "lo",
                       "table", str(ROUTE_TABLE)])  # fmt: skip
    if f"lookup {ROUTE_TABLE}" not in await run_in(netns, ["ip", "rule", "show"]):
        await run_in(netns, ["ip", "rule", "add", "fwmark", _FWMARK, "pref", str(RULE_PREF),
                           "lookup", str(ROUTE_TABLE)])  # fmt: skip


def render_source_removal(existing_mangle: str) -> str:
    """The input that takes ``render_source_rules`` out again; empty when none is there."""
    have = existing_mangle.splitlines()
    lines = [f"-D{j[2:]}" for j in (JUMP_MANGLE_IN, JUMP_MANGLE_OUT) if j in have]
    for chain in (CHAIN_MANGLE_IN, CHAIN_MANGLE_OUT):
        if any(ln.startswith(f":{chain} ") for ln in have):
            lines += [f"-F {chain}", f"-X {chain}"]
    return "\n".join(["*mangle", *lines, "COMMIT"]) + "\n" if lines else ""


async def remove_source_routing(netns: str) -> None:
    """Undo ``apply_source_routing`` in ``netns`` (a pod released while it lives on)."""
    rules = render_source_removal(await run_in(netns, ["iptables-save", "-t", "mangle"]))
    if rules:
        await run_in(netns, ["iptables-restore", "--noflush"], stdin=rules)
    if f"lookup {ROUTE_TABLE}" in await run_in(netns, ["ip", "rule", "show"]):
        await run_in(netns, ["ip", "rule", "del", "pref", str(RULE_PREF)])
    await run_in(netns, ["ip", "route", "flush", "table", str(ROUTE_TABLE)])
