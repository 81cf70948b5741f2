"""iptables capture inside a pod's network namespace.

``render_rules`` is a pure function from a ``CaptureSpec`` to ``iptables-restore`` input;
``apply_rules`` runs it inside the pod's netns with ``nsenter``; ``remove_rules`` takes them
out again (``render_removal``, pure too). The rules:

- outbound TCP (nat OUTPUT) → the proxy's outbound listener (15001), except loopback
  traffic, excluded ports, and the proxy's own upstream sockets (``SO_MARK`` 0x539);
- inbound TCP (nat PREROUTING) → the inbound listener (15006), except HBONE (15008)
  and excluded ports.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from nodeagent.errors import LocalStateError

PROXY_MARK = 0x539
MARK_MASK = 0xFFF
OUTBOUND_PORT = 15001
INBOUND_PORT = 15006
HBONE_PORT = 15008

CHAIN_OUT = "NODEAGENT_OUTPUT"
CHAIN_IN = "NODEAGENT_INBOUND"
JUMP_OUT = f"-A OUTPUT -p tcp -j {CHAIN_OUT}"
JUMP_IN = f"-A PREROUTING -p tcp -j {CHAIN_IN}"


@dataclass(frozen=True)
class CaptureSpec:
    exclude_outbound_ports: frozenset[int] = frozenset()
    exclude_inbound_ports: frozenset[int] = frozenset()
    outbound_port: int = OUTBOUND_PORT
    inbound_port: int = INBOUND_PORT
    hbone_port: int = HBONE_PORT
    mark: int = PROXY_MARK


def render_rules(spec: CaptureSpec, existing_nat: str = "") -> str:
    """The ``iptables-restore --noflush`` input for one pod.

    Declaring our chains flushes them; the jumps into them are added only when
    ``existing_nat`` (``iptables-save -t nat`` output) lacks them, so applying twice is
    the same as applying once.
    """
    lines = ["*nat", f":{CHAIN_IN} - [0:0]", f":{CHAIN_OUT} - [0:0]"]
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
    lines.append(f"-A {CHAIN_OUT} -o lo -j RETURN")
    for port in sorted(spec.exclude_outbound_ports):
        lines.append(f"-A {CHAIN_OUT} -p tcp --dport {port} -j RETURN")
    lines.append(f"-A {CHAIN_OUT} -p tcp -j REDIRECT --to-ports {spec.outbound_port}")
    lines.append("COMMIT")
    return "\n".join(lines) + "\n"


async def _run(netns: str, argv: list[str], stdin: str | None = None) -> str:
    proc = await asyncio.create_subprocess_exec(
        "nsenter",
        f"--net={netns}",
        *argv,
        stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await proc.communicate(stdin.encode() if stdin is not None else None)
    if proc.returncode != 0:
        raise LocalStateError(
            f"{' '.join(argv)} in netns {netns} failed (exit {proc.returncode}): "
            f"{err.decode(errors='replace').strip()}"
        )
    return out.decode()


async def apply_rules(netns: str, spec: CaptureSpec) -> str:
    """Install (or refresh) the capture rules in ``netns``; returns what was applied."""
    existing = await _run(netns, ["iptables-save", "-t", "nat"])
    rules = render_rules(spec, existing)
    await _run(netns, ["iptables-restore", "--noflush"], stdin=rules)
    return rules


def render_removal(existing_nat: str) -> str:
    """The ``iptables-restore --noflush`` input that takes our jumps and chains out of
    a netns whose nat table is ``existing_nat``; empty when nothing of ours is there."""
    have = existing_nat.splitlines()
    lines = [f"-D{jump[2:]}" for jump in (JUMP_OUT, JUMP_IN) if jump in have]
    for chain in (CHAIN_OUT, CHAIN_IN):
        if any(ln.startswith(f":{chain} ") for ln in have):
            lines += [f"-F {chain}", f"-X {chain}"]
    return "\n".join(["*nat", *lines, "COMMIT"]) + "\n" if lines else ""


async def remove_rules(netns: str) -> bool:
    """Take the capture rules out of ``netns`` (a pod released while its netns lives on);
    False when there were none."""
    rules = render_removal(await _run(netns, ["iptables-save", "-t", "nat"]))
    if rules:
        await _run(netns, ["iptables-restore", "--noflush"], stdin=rules)
    return bool(rules)
