"""DNS capture rules: UDP and TCP port 53 to the DNS proxy, sparing loopback, the
proxy's own forwarded queries and a pod that excludes port 53; in both capture modes."""

from __future__ import annotations

from nodeagent.redirect.iptables import (
    JUMP_DNS_TCP,
    JUMP_DNS_UDP,
    JUMP_OUT,
    CaptureSpec,
    render_dns_rules,
    render_removal,
    render_rules,
)

DNS_CHAIN = [
    "-A NODEAGENT_DNS -m mark --mark 0x539/0xfff -j RETURN",
    "-A NODEAGENT_DNS -o lo -j RETURN",
    "-A NODEAGENT_DNS -p udp --dport 53 -j REDIRECT --to-ports 15053",
    "-A NODEAGENT_DNS -p tcp --dport 53 -j REDIRECT --to-ports 15053",
]


def chain(rules: str, name: str) -> list[str]:
    return [r for r in rules.splitlines() if r.startswith(f"-A {name} ")]


def test_dns_goes_to_the_dns_proxy_before_the_outbound_listener() -> None:
    rules = render_rules(CaptureSpec(dns_port=15053))
    assert chain(rules, "NODEAGENT_DNS") == DNS_CHAIN
    assert JUMP_DNS_UDP in rules.splitlines()
    out = chain(rules, "NODEAGENT_OUTPUT")
    # TCP 53 leaves for the DNS chain after the proxy's marked sockets, before 15001
    assert out.index("-A NODEAGENT_OUTPUT -p tcp --dport 53 -j NODEAGENT_DNS") == 1
    assert out[-1] == "-A NODEAGENT_OUTPUT -p tcp -j REDIRECT --to-ports 15001"


def test_without_the_dns_proxy_or_with_port_53_excluded_dns_is_left_alone() -> None:
    for spec in (
        CaptureSpec(),
        CaptureSpec(dns_port=15053, exclude_outbound_ports=frozenset({53})),
    ):
        rules = render_rules(spec)
        assert chain(rules, "NODEAGENT_DNS") == []
        assert ":NODEAGENT_DNS - [0:0]" in rules.splitlines()  # declared: flushed if it was on
        assert "--dport 53 -j NODEAGENT_DNS" not in rules


def test_ebpf_mode_gets_the_dns_rules_alone_with_both_jumps() -> None:
    rules = render_dns_rules(CaptureSpec(dns_port=15053)).splitlines()
    assert rules[0] == "*nat" and rules[-1] == "COMMIT"
    assert JUMP_DNS_UDP in rules and JUMP_DNS_TCP in rules and JUMP_OUT not in rules
    assert chain("\n".join(rules), "NODEAGENT_DNS") == DNS_CHAIN
    again = render_dns_rules(CaptureSpec(dns_port=15053), "\n".join(rules)).splitlines()
    assert JUMP_DNS_UDP not in again and JUMP_DNS_TCP not in again


def test_removal_takes_the_dns_chain_and_its_jumps_out() -> None:
    existing = "\n".join(
        ["*nat", ":NODEAGENT_DNS - [0:0]", JUMP_DNS_UDP, JUMP_DNS_TCP, *DNS_CHAIN, "COMMIT"]
    )
    assert render_removal(existing).splitlines() == [
        "*nat",
        "-D OUTPUT -p udp -j NODEAGENT_DNS",
        "-D OUTPUT -p tcp -j NODEAGENT_DNS",
        "-F NODEAGENT_DNS",
        "-X NODEAGENT_DNS",
        "COMMIT",
    ]
