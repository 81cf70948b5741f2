"""Source routing without iptables (eBPF capture): the app behind the proxy sees the
client's address, and its answers go back to the proxy.

The proxy's connection to the app, from inside the pod's netns, binds the client's
address (``IP_TRANSPARENT``) and carries ``TRANSPARENT_MARK`` (``SO_MARK``). The app's
answers are addressed to the client, which is not in the pod: the pod's netns must
deliver them locally, to the proxy's socket. iptables mode does it with connmark
(``iptables.apply_source_routing``); here the kernel itself carries the mark over:

- ``net.ipv4.tcp_fwmark_accept=1`` in the pod's netns: a socket the app accepts takes
  the mark of the SYN that opened it (the proxy's ``TRANSPARENT_MARK``), and every packet
  it sends carries it, the SYN-ACK included (``inet_request_mark``); with
  ``net.ipv4.fwmark_reflect=1`` so does the RST of a port nobody listens on;
- ``ip rule fwmark TRANSPARENT_MARK lookup 100`` and ``local 0.0.0.0/0 dev lo table
  100``: those packets are delivered locally, where the proxy's socket takes them.

Nothing else is marked so: the proxy's other sockets carry ``PROXY_MARK`` (0x539) and the
app's own connections none, and route as before. The ``sk_lookup`` program lets the
proxy's SYN reach the app (it arrives on ``lo``, not from outside the pod). In iptables
mode ``TRANSPARENT_MARK`` still reads as ``PROXY_MARK`` under its 0xfff mask.
"""

from __future__ import annotations

import re

from nodeagent.redirect.iptables import ROUTE_TABLE, RULE_PREF
from nodeagent.redirect.netns import run_in

# ROUTE_TABLE and RULE_PREF: the slots iptables mode's source routing uses too (a pod is
# captured in one mode at a time)
TRANSPARENT_MARK = 0x1539
"""``SO_MARK`` of the proxy's connections from a client's address: ``PROXY_MARK`` under
iptables' 0xfff mask, its own value for ``ip rule``."""
SYSCTLS = ("net.ipv4.tcp_fwmark_accept", "net.ipv4.fwmark_reflect")
"""Set to 1 in the pod's netns: a socket accepted takes its SYN's mark, and a reply the
kernel makes without a socket (a RST from a closed port) takes the mark of the packet it
answers (else the proxy's connect to a closed port waits for its timeout)."""

RULE = f"fwmark {TRANSPARENT_MARK:#x} lookup {ROUTE_TABLE}"
"""Our rule as ``ip rule show`` prints it (after ``<pref>:\\tfrom all``)."""
_TABLE = re.compile(rf"\btable {ROUTE_TABLE}\b")
"""A route of our table in ``ip route show table all`` (which fails for no table)."""


def has_rule(rules: str) -> bool:
    """Whether ``ip rule show`` output holds our rule at its preference."""
    return any(
        ln.startswith(f"{RULE_PREF}:") and ln.rstrip().endswith(RULE) for ln in rules.splitlines()
    )


async def apply(netns: str) -> None:
    """Route the app's answers on the proxy's transparent connections back to the proxy
    inside ``netns`` (a path; idempotent)."""
    await run_in(netns, ["sysctl", "-q", "-w", *(f"{k}=1" for k in SYSCTLS)])
    await run_in(netns, ["ip", "route", "replace", "local", "0.0.0.0/0", "dev", "lo",
                       "table", str(ROUTE_TABLE)])  # fmt: skip
    if not has_rule(await run_in(netns, ["ip", "rule", "show", "pref", str(RULE_PREF)])):
        await run_in(netns, ["ip", "rule", "add", "pref", str(RULE_PREF), "fwmark",
                           f"{TRANSPARENT_MARK:#x}", "lookup", str(ROUTE_TABLE)])  # fmt: skip


async def remove(netns: str) -> None:
    """Undo ``apply`` in ``netns`` (a pod released while its netns lives on)."""
    if has_rule(await run_in(netns, ["ip", "rule", "show", "pref", str(RULE_PREF)])):
        await run_in(netns, ["ip", "rule", "del", "pref", str(RULE_PREF), "fwmark",
                           f"{TRANSPARENT_MARK:#x}", "lookup", str(ROUTE_TABLE)])  # fmt: skip
    if _TABLE.search(await run_in(netns, ["ip", "route", "show", "table", "all"])):
        await run_in(netns, ["ip", "route", "flush", "table", str(ROUTE_TABLE)])
    await run_in(netns, ["sysctl", "-q", "-w", *(f"{k}=0" for k in SYSCTLS)])
