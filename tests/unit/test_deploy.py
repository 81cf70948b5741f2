"""The DaemonSet manifest: its arguments parse with ``nodeagent run``'s own parser, and
every host path the agent uses (pins, cgroups, kernel headers, netns, socket, state,
config) is mounted from the host."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from nodeagent.cli import build_parser

MANIFEST = Path(__file__).resolve().parents[2] / "deploy" / "daemonset" / "nodeagent.yaml"


def container() -> dict[str, Any]:
    doc = yaml.safe_load(MANIFEST.read_text())
    assert doc["kind"] == "DaemonSet"
    spec = doc["spec"]["template"]["spec"]
    assert spec["hostNetwork"] is True
    (c,) = spec["containers"]
    assert isinstance(c, dict)
    c["_volumes"] = {v["name"]: v for v in spec["volumes"]}
    return c


def test_arguments_are_ones_the_agent_accepts() -> None:
    c = container()
    assert c["command"] == ["nodeagent", "run"]
    args = build_parser().parse_args(["run", *c["args"]])
    assert args.redirect == "auto" and args.node == "$(NODE_NAME)"


def test_every_path_the_agent_uses_is_mounted() -> None:
    c = container()
    args = build_parser().parse_args(["run", *c["args"]])
    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
    used = [args.bpf_pin_dir, args.state_dir, args.socket, args.pods, args.config,
            "/sys/fs/cgroup", "/lib/modules", "/usr/src", "/var/run/netns"]
    for path in used:
        assert any(path == m or path.startswith(m + "/") for m in mounts), path
    assert mounts["/sys/fs/bpf"]["mountPropagation"] == "Bidirectional"  # pins outlive us
    for m in mounts.values():
        vol = c["_volumes"][m["name"]]
        assert "hostPath" in vol or "configMap" in vol
    assert c["securityContext"]["privileged"] is True
