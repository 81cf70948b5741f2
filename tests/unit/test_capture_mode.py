"""``--redirect``: iptables as asked; ``auto`` falls back to iptables naming the probe
that failed; ``ebpf`` refuses to start without eBPF (no silent downgrade)."""

from __future__ import annotations

from pathlib import Path

import pytest

from nodeagent import app
from nodeagent.config import AgentSettings
from nodeagent.errors import LocalStateError


def settings(redirect: str) -> AgentSettings:
    return AgentSettings(node="n1", config_dir=Path("."), redirect=redirect)


def test_iptables_is_iptables() -> None:
    assert app._capture_mode(settings("iptables")) == ("iptables", "", None)


def test_auto_falls_back_and_says_why(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(app.ebpf, "probe", lambda: "bpffs is not mounted: mount -t bpf")
    mode, why, cap = app._capture_mode(settings("auto"))
    assert (mode, cap) == ("iptables", None)
    assert why == "auto: eBPF unavailable: bpffs is not mounted: mount -t bpf"


def test_ebpf_without_ebpf_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(app.ebpf, "probe", lambda: "no kernel headers at /lib/modules/x")
    with pytest.raises(LocalStateError, match="--redirect ebpf: no kernel headers"):
        app._capture_mode(settings("ebpf"))


def test_dump_bpf_prints_the_source_and_flags(capsys: pytest.CaptureFixture[str]) -> None:
    from nodeagent.cli import main
    from nodeagent.redirect.ebpf import SOURCE

    assert main(["run", "--node", "n1", "--config", ".", "--dump-bpf"]) == 0
    out = capsys.readouterr().out
    first, _, rest = out.partition("\n")
    assert '-DPIN_DIR="/sys/fs/bpf/nodeagent/n1"' in first and "-DPROXY_MARK=0x539" in first
    assert rest == SOURCE.read_text()
    assert "int connect4_capture(struct bpf_sock_addr *ctx)" in rest
