"""The DNS proxy's flags as a user gives them: defaults, turning it off, upstreams
checked with an error naming the bad part, and the sandbox reading ``--dns-proxy``."""

from __future__ import annotations

import pytest

from nodeagent.cli import build_parser
from nodeagent.config import AgentSettings
from nodeagent.sandbox.agents import dns_proxy_on

RUN = ["run", "--node", "n", "--config", "."]


def settings(*extra: str) -> AgentSettings:
    return AgentSettings.from_args(build_parser().parse_args([*RUN, *extra]))


def test_on_by_default_with_the_nodes_resolvers() -> None:
    s = settings()
    assert (s.dns_proxy, s.dns_upstreams, s.dns_timeout) == (True, None, 5.0)


def test_off_and_upstreams_and_timeout() -> None:
    assert settings("--dns-proxy", "off").dns_proxy is False
    s = settings("--dns-upstream", "10.0.0.10,[fd00::a]:5353", "--dns-timeout", "1500ms")
    assert s.dns_upstreams == (("10.0.0.10", 53), ("fd00::a", 5353))
    assert s.dns_timeout == 1.5


@pytest.mark.parametrize(
    ("value", "message"),
    [("resolver.local", "'resolver.local' is not an IP address"), (",", "at least one")],
)
def test_a_bad_upstream_is_refused_naming_it(
    value: str, message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_:
        build_parser().parse_args([*RUN, "--dns-upstream", value])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "--dns-upstream" in err and message in err


@pytest.mark.parametrize(
    ("args", "on"),
    [
        ((), True),
        (("--redirect", "ebpf"), True),
        (("--dns-proxy", "off"), False),
        (("--dns-proxy=off",), False),
        (("--dns-proxy=off", "--dns-proxy", "on"), True),
    ],
)
def test_the_sandbox_knows_whether_its_agents_answer_dns(args: tuple[str, ...], on: bool) -> None:
    assert dns_proxy_on(args) is on
