"""The capture rules are a pure function of the pod's capture spec."""

from __future__ import annotations

from nodeagent.redirect.iptables import (
    JUMP_IN,
    JUMP_OUT,
    CaptureSpec,
    render_removal,
    render_rules,
    render_source_removal,
    render_source_rules,
)


def test_default_rules_capture_tcp_both_ways_and_spare_our_own_traffic() -> None:
    rules = render_rules(CaptureSpec()).splitlines()
    assert rules[0] == "*nat" and rules[-1] == "COMMIT"
    assert JUMP_IN in rules and JUMP_OUT in rules
    out = [r for r in rules if r.startswith("-A NODEAGENT_OUTPUT")]
    # order matters: the proxy's marked sockets and loopback return before the REDIRECT
    assert out == [
        "-A NODEAGENT_OUTPUT -m mark --mark 0x539/0xfff -j RETURN",
        "-A NODEAGENT_OUTPUT -o lo -j RETURN",
        "-A NODEAGENT_OUTPUT -p tcp -j REDIRECT --to-ports 15001",
    ]
    inbound = [r for r in rules if r.startswith("-A NODEAGENT_INBOUND")]
    assert inbound[0] == "-A NODEAGENT_INBOUND -p tcp --dport 15008 -j RETURN"
    assert inbound[-1] == "-A NODEAGENT_INBOUND -p tcp -j REDIRECT --to-ports 15006"


def test_excluded_ports_return_before_redirect() -> None:
    rules = render_rules(
        CaptureSpec(
            exclude_inbound_ports=frozenset({9000, 22}), exclude_outbound_ports=frozenset({5432})
        )
    ).splitlines()
    i22 = rules.index("-A NODEAGENT_INBOUND -p tcp --dport 22 -j RETURN")
    i9000 = rules.index("-A NODEAGENT_INBOUND -p tcp --dport 9000 -j RETURN")
    iredir = rules.index("-A NODEAGENT_INBOUND -p tcp -j REDIRECT --to-ports 15006")
    assert i22 < i9000 < iredir
    assert rules.index("-A NODEAGENT_OUTPUT -p tcp --dport 5432 -j RETURN") < rules.index(
        "-A NODEAGENT_OUTPUT -p tcp -j REDIRECT --to-ports 15001"
    )


def test_applying_twice_does_not_duplicate_jumps() -> None:
    first = render_rules(CaptureSpec())
    existing = "\n".join(["*nat", ":PREROUTING ACCEPT [0:0]", JUMP_IN, JUMP_OUT, "COMMIT"])
    second = render_rules(CaptureSpec(), existing)
    assert JUMP_IN in first.splitlines() and JUMP_IN not in second.splitlines()
    assert JUMP_OUT not in second.splitlines()


def test_removal_takes_out_only_what_is_there() -> None:
    existing = "\n".join(
        ["*nat", ":OUTPUT ACCEPT [0:0]", ":NODEAGENT_OUTPUT - [0:0]", JUMP_OUT,
         "-A NODEAGENT_OUTPUT -p tcp -j REDIRECT --to-ports 15001", "COMMIT"]
    )  # fmt: skip
    assert render_removal(existing).splitlines() == [
        "*nat",
        "-D OUTPUT -p tcp -j NODEAGENT_OUTPUT",
        "-F NODEAGENT_OUTPUT",
        "-X NODEAGENT_OUTPUT",
        "COMMIT",
    ]
    assert render_removal("*nat\n:OUTPUT ACCEPT [0:0]\nCOMMIT\n") == ""


def test_source_routing_rules_connmark_the_proxys_connections_and_restore_it() -> None:
    rules = render_source_rules().splitlines()
    assert rules[0] == "*mangle" and rules[-1] == "COMMIT"
    assert "-A PREROUTING -j NODEAGENT_PRERT" in rules
    assert "-A OUTPUT -j NODEAGENT_MANGLE_OUT" in rules
    assert (
        "-A NODEAGENT_PRERT -m mark --mark 0x539/0xfff -j CONNMARK --set-xmark 0x111/0xfff" in rules
    )
    assert (
        "-A NODEAGENT_MANGLE_OUT -m connmark --mark 0x111/0xfff -j CONNMARK --restore-mark "
        "--nfmask 0xffffffff --ctmask 0xffffffff"
    ) in rules


def test_source_routing_applied_twice_adds_the_jumps_once_and_comes_out_again() -> None:
    first = render_source_rules()
    existing = "\n".join(ln for ln in first.splitlines() if ln.startswith(("-A", ":")))
    again = render_source_rules(existing).splitlines()
    assert not any(ln.startswith(("-A PREROUTING", "-A OUTPUT")) for ln in again)
    removal = render_source_removal(existing).splitlines()
    assert "-D PREROUTING -j NODEAGENT_PRERT" in removal
    assert "-X NODEAGENT_MANGLE_OUT" in removal
    assert render_source_removal("") == ""
