"""Where the app cannot be shown the client's address, the capture falls back and says
why: the pod's mode, one log line per reason, ``no_source`` for ``ctl status``; the eBPF
routing (``redirect/srcroute.py``) names what failed. (That it works: the e2e test
``tests/e2e/test_mesh_source.py``.)"""

from __future__ import annotations

import asyncio
import logging

import pytest

from nodeagent.errors import LocalStateError
from nodeagent.redirect import srcroute
from nodeagent.redirect.capture import SourceRouting


def test_a_failure_is_logged_once_per_reason_and_shown_until_the_pod_is_routed(
    caplog: pytest.LogCaptureFixture,
) -> None:
    sr = SourceRouting()
    assert sr.no_source == ""
    why = LocalStateError("ip rule add ... failed (exit 2): Operation not supported")
    with caplog.at_level(logging.WARNING, logger="nodeagent.redirect"):
        assert sr.failed("default/a", "eBPF", why) == "eBPF (no source routing)"
        assert sr.failed("default/b", "eBPF", why) == "eBPF (no source routing)"
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1, lines
    assert "default/a" in lines[0] and "Operation not supported" in lines[0]
    assert sr.no_source == f"2 pod(s), e.g. default/a: {why}"
    sr.routed("default/a")
    assert sr.no_source.startswith("1 pod(s), e.g. default/b: ")
    sr.routed("default/b")
    assert sr.no_source == ""


def test_ip_rule_output_is_read_at_our_preference_only() -> None:
    ours = f"{srcroute.RULE_PREF}:\tfrom all fwmark 0x1539 lookup 100\n"
    assert srcroute.has_rule("0:\tfrom all lookup local\n" + ours)
    assert not srcroute.has_rule("32765:\tfrom all fwmark 0x1539 lookup 100\n")
    assert not srcroute.has_rule(f"{srcroute.RULE_PREF}:\tfrom all fwmark 0x111/0xfff lookup 100")


def test_a_missing_netns_is_an_error_naming_it() -> None:
    with pytest.raises(LocalStateError, match="/nonexistent/netns"):
        asyncio.run(srcroute.apply("/nonexistent/netns"))
