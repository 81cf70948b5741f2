"""``--redirect``: iptables as asked; ``auto`` falls back to iptables naming the probe
that failed; ``ebpf`` refuses to start without eBPF (no silent downgrade)."""

from __future__ import annotations

from pathlib import Path

import pytest

from nodeagent import app
from nodeagent.config import AgentSettings
from nodeagent.errors import LocalStateError
from nodeagent.model.objects import Node


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
    assert '-DPIN_DIR="/sys/fs/bpf/nodeagent/n1/maps-' in first and "-DPROXY_MARK=0x539" in first
    assert rest == SOURCE.read_text()
    assert "int connect4_capture(struct bpf_sock_addr *ctx)" in rest


NODE_YAML = """\
apiVersion: v1
kind: Node
metadata:
  name: n1
  annotations: {{nodeagent.io/redirect: {redirect}, nodeagent.io/bpf-bypass: "{bypass}"}}
"""


def node_of(tmp_path: Path, redirect: str = "ebpf", bypass: str = "off") -> Node | None:
    from nodeagent.control.files import load_directory

    (tmp_path / "node.yaml").write_text(NODE_YAML.format(redirect=redirect, bypass=bypass))
    return load_directory(tmp_path).snapshot.node("n1")


def test_node_annotations_choose_the_mode_unless_the_command_line_does(tmp_path: Path) -> None:
    node = node_of(tmp_path)
    assert app.capture_settings(settings(""), node) == (
        "ebpf", "Node n1 annotation nodeagent.io/redirect", False)
    both = AgentSettings(node="n1", config_dir=Path("."), redirect="iptables", bpf_bypass=True)
    assert app.capture_settings(both, node) == ("iptables", "--redirect", True)
    assert app.capture_settings(settings(""), None) == ("auto", "default", False)


def test_an_annotated_ebpf_node_without_ebpf_names_the_annotation(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(app.ebpf, "probe", lambda: "bpffs is not mounted")
    with pytest.raises(LocalStateError, match=r"annotation nodeagent\.io/redirect ebpf: bpffs"):
        app._capture_mode(settings(""), node_of(tmp_path))


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (NODE_YAML.format(redirect="tc", bypass="on"),
         "metadata.annotations.nodeagent.io/redirect: 'tc': expected one of iptables, ebpf, auto"),
        (NODE_YAML.format(redirect="ebpf", bypass="yes"),
         "metadata.annotations.nodeagent.io/bpf-bypass: 'yes': expected one of on, off"),
        ("apiVersion: v1\nkind: Node\nmetadata: {name: n1, annotations: {nodeagent.io/x: y}}\n",
         "metadata.annotations.nodeagent.io/x: unknown annotation"),
        ("apiVersion: v1\nkind: Node\nmetadata: {name: n1, namespace: default}\n",
         "metadata.namespace: a Node is cluster-scoped"),
    ],
)
def test_bad_node_annotations_are_named(tmp_path: Path, text: str, expected: str) -> None:
    from nodeagent.control.files import load_directory
    from nodeagent.errors import ConfigErrors

    (tmp_path / "node.yaml").write_text(text)
    with pytest.raises(ConfigErrors) as e:
        load_directory(tmp_path)
    assert expected in str(e.value), str(e.value)
