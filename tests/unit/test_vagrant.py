"""The VM install: deploy/systemd/nodeagent.service is a unit systemd accepts, its command
line parses with nodeagent's own parser, it keeps only the capabilities it documents, stops
after the agent's drain; vagrant/Vagrantfile passes `vagrant validate`; the mesh config the
VMs are provisioned with loads and puts each VM's WorkloadEntry on that VM's agent.

The VMs themselves boot in the VM tier, scripts/vm-test.sh (minutes, not in this suite)."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from nodeagent.cli import build_parser
from nodeagent.config import AgentSettings
from nodeagent.control.files import load_directory

ROOT = Path(__file__).resolve().parents[2]
UNIT = ROOT / "deploy" / "systemd" / "nodeagent.service"
ENV_FILE = ROOT / "deploy" / "systemd" / "nodeagent.env"
VAGRANT = ROOT / "vagrant"
WORKLOAD_UNIT = VAGRANT / "ratings.service"
AGENT = "/opt/nodeagent/venv/bin/nodeagent"
# What the unit's comments justify, one by one; anything more must be argued there first.
CAPABILITIES = {"CAP_NET_ADMIN", "CAP_NET_RAW", "CAP_BPF"}


def parse_unit(path: Path) -> dict[str, dict[str, list[str]]]:
    """Sections of a systemd unit: key → values in order (keys may repeat)."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] | None = None
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        assert current is not None, f"{path}: {line!r} before any section"
        key, sep, value = line.partition("=")
        assert sep, f"{path}: not key=value: {line!r}"
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def one(unit: dict[str, dict[str, list[str]]], section: str, key: str) -> str:
    values = unit[section].get(key, [])
    assert len(values) == 1, f"[{section}] {key}: {values}"
    return values[0]


def env_opts() -> list[str]:
    (line,) = [s for s in ENV_FILE.read_text().splitlines() if s.startswith("NODEAGENT_OPTS=")]
    value = line.partition("=")[2]
    return shlex.split(shlex.split(value)[0])


def seconds(value: str) -> float:
    units = {"ms": 0.001, "s": 1.0, "min": 60.0}
    for suffix, factor in units.items():
        if value.endswith(suffix) and value[: -len(suffix)].isdigit():
            return int(value[: -len(suffix)]) * factor
    assert value.isdigit(), value
    return float(value)


def agent_argv() -> list[str]:
    """The unit's ExecStart as the agent receives it: %H the hostname, $NODEAGENT_OPTS
    split from the env file."""
    unit = parse_unit(UNIT)
    argv = shlex.split(one(unit, "Service", "ExecStart").replace("%H", "vm-1"))
    assert argv[0] == AGENT
    opts = env_opts()
    return [a for x in argv[1:] for a in (opts if x == "$NODEAGENT_OPTS" else [x])]


def test_the_units_command_line_parses_with_nodeagents_parser() -> None:
    args = build_parser().parse_args(agent_argv())
    assert args.command == "run"
    assert args.node == "vm-1" and args.source == "files"
    assert args.config == "/etc/nodeagent/config"
    # the directories systemd makes are the ones the agent uses
    unit = parse_unit(UNIT)
    assert args.state_dir == "/var/lib/" + one(unit, "Service", "StateDirectory")
    assert not args.socket  # default /run/nodeagent/NODE.sock: its RuntimeDirectory
    assert one(unit, "Service", "RuntimeDirectory") == "nodeagent"
    assert "/etc/nodeagent/nodeagent.env" in one(unit, "Service", "EnvironmentFile")


def test_the_unit_keeps_only_the_capabilities_it_argues_for() -> None:
    unit = parse_unit(UNIT)
    caps = set(one(unit, "Service", "CapabilityBoundingSet").split())
    assert caps == CAPABILITIES
    text = UNIT.read_text()
    for cap in caps:
        assert f"#   {cap}" in text, f"{cap} has no line saying why"
    assert one(unit, "Service", "NoNewPrivileges") == "yes"
    assert "AmbientCapabilities" not in unit["Service"]  # root: the bounding set is enough


def test_the_unit_restarts_on_failure_and_stops_after_the_drain() -> None:
    unit = parse_unit(UNIT)
    assert one(unit, "Service", "Restart") == "on-failure"
    assert seconds(one(unit, "Service", "RestartSec")) >= 1
    assert int(one(unit, "Unit", "StartLimitBurst")) > 1
    assert one(unit, "Service", "KillMode") == "mixed"
    stop = seconds(one(unit, "Service", "TimeoutStopSec"))
    assert stop >= AgentSettings.drain_seconds + 5, "SIGKILL would cut the drain short"


def test_the_sandboxing_leaves_what_bpf_and_capture_need() -> None:
    svc = parse_unit(UNIT)["Service"]
    assert one({"S": svc}, "S", "ProtectSystem") == "strict"
    assert "/run" in one({"S": svc}, "S", "ReadWritePaths").split()  # xtables.lock
    for key in ("ProtectHome", "PrivateTmp"):
        assert svc[key] == ["yes"]
    # these would hide the kernel headers, make bpffs or /proc/sys read-only, or take the
    # agent out of the host's network
    for key in ("ProtectKernelModules", "ProtectKernelTunables", "ProtectControlGroups",
                "PrivateNetwork", "MemoryDenyWriteExecute", "PrivateUsers"):
        assert key not in svc, key
    assert "AF_NETLINK" in one({"S": svc}, "S", "RestrictAddressFamilies").split()


def verify(unit_text: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    """`systemd-analyze verify` of the unit, its agent path pointed at a stub executable
    (verify insists the ExecStart binary exists)."""
    stub = tmp_path / "nodeagent"
    stub.write_text("#!/bin/sh\n")
    stub.chmod(0o755)
    unit = tmp_path / "nodeagent.service"
    unit.write_text(unit_text.replace(AGENT, str(stub)))
    return subprocess.run(
        ["systemd-analyze", "verify", "--man=no", str(unit)],
        capture_output=True, text=True, timeout=60,
        env={**os.environ, "SYSTEMD_LOG_COLOR": "0"},
    )  # fmt: skip


@pytest.mark.skipif(not shutil.which("systemd-analyze"), reason="no systemd-analyze")
def test_systemd_accepts_the_unit_without_a_warning(tmp_path: Path) -> None:
    done = verify(UNIT.read_text(), tmp_path)
    assert done.returncode == 0 and str(tmp_path) not in done.stdout + done.stderr, (
        done.stdout + done.stderr
    )
    # the check sees a misspelled value (systemd only warns and ignores it)
    bad = verify(UNIT.read_text().replace("KillMode=mixed", "KillMode=mixd"), tmp_path)
    assert "kill mode" in (bad.stdout + bad.stderr).lower()


def test_the_sample_workload_unit_runs_the_sample_app() -> None:
    unit = parse_unit(WORKLOAD_UNIT)
    argv = shlex.split(one(unit, "Service", "ExecStart"))
    assert argv[0] == AGENT
    args = build_parser().parse_args(argv[1:])
    assert args.command == "sample-app" and args.port == 9080 and args.service == "ratings"


def mesh_config(tmp_path: Path, vms: int) -> Path:
    """The config a VM gets without a CA (its entries written by mesh-config.sh)."""
    out = subprocess.run(
        ["bash", str(VAGRANT / "mesh-config.sh"), str(vms), "192.168.121", "--entries"],
        capture_output=True, text=True, check=True, timeout=30,
    )  # fmt: skip
    (tmp_path / "vm.yaml").write_text(out.stdout)
    return tmp_path


@pytest.mark.parametrize("vms", [1, 2])
def test_each_vms_workload_entry_is_served_by_that_vms_agent(tmp_path: Path, vms: int) -> None:
    snap = load_directory(mesh_config(tmp_path, vms)).snapshot
    for n in range(1, vms + 1):
        (entry,) = snap.workload_entries_on_node(f"vm-{n}")
        assert entry.name == f"ratings-vm-{n}" and entry.pod_ip == f"192.168.121.{9 + n}"
        assert entry.identity() == "spiffe://cluster.local/ns/default/sa/ratings"
    ratings = snap.service_for_address("10.96.8.10")
    assert ratings is not None
    (port,) = ratings.ports
    got = sorted((e.ip, e.port) for e in snap.endpoints(ratings, port))
    assert got == [(f"192.168.121.{9 + n}", 9080) for n in range(1, vms + 1)]


def test_joined_vms_get_their_entries_tokens_and_ca_options_from_vm_join(tmp_path: Path) -> None:
    # what vm-test does on the host: a CA, and each VM joined from the WorkloadGroup
    join = tmp_path / "join"
    subprocess.run(
        ["bash", str(VAGRANT / "join.sh"), str(join), "2", "192.168.121", "24309"],
        capture_output=True, text=True, check=True, timeout=120,
        env={**os.environ, "NODEAGENT": str(Path(sys.executable).parent / "nodeagent")},
    )  # fmt: skip
    snap = load_directory(join / "config").snapshot
    for n in (1, 2):
        (entry,) = snap.workload_entries_on_node(f"vm-{n}")
        assert entry.pod_ip == f"192.168.121.{9 + n}"
        assert entry.annotations.get("nodeagent.io/cgroup") == "ratings.service"
        vm = join / f"vm-{n}"
        assert (vm / "token").stat().st_mode & 0o777 == 0o600
        env = (vm / "nodeagent.env").read_text()
        assert f"--node vm-{n}" in env and "--ca-addr 10.0.2.2:24309" in env
    tokens = json.loads((join / "tokens.json").read_text())
    assert tokens == {f"vm-{n}": (join / f"vm-{n}" / "token").read_text().strip() for n in (1, 2)}


def vagrant_validate(tmp_path: Path, vagrantfile: Path, **env: str) -> str:
    done = subprocess.run(
        ["vagrant", "validate"],
        cwd=vagrantfile.parent, capture_output=True, text=True, timeout=120,
        env={**os.environ, "VAGRANT_DOTFILE_PATH": str(tmp_path / "dot"),
             "VAGRANT_CHECKPOINT_DISABLE": "1", **env},
    )  # fmt: skip
    out = done.stdout + done.stderr
    return ("ok: " if done.returncode == 0 else "failed: ") + out


@pytest.mark.skipif(not shutil.which("vagrant"), reason="vagrant is not installed")
def test_vagrant_validates_the_vagrantfile(tmp_path: Path) -> None:
    vf = VAGRANT / "Vagrantfile"
    for vms in ("1", "2"):
        out = vagrant_validate(tmp_path, vf, NODEAGENT_VMS=vms)
        assert out.startswith("ok: "), out
    assert "NODEAGENT_VMS must be 1 or 2" in vagrant_validate(tmp_path, vf, NODEAGENT_VMS="3")
    # validate checks the provider's settings too: a bad libvirt value fails it
    broken = tmp_path / "broken" / "Vagrantfile"
    broken.parent.mkdir()
    text = vf.read_text().replace("HERE = __dir__", f"HERE = {str(VAGRANT)!r}")
    broken.write_text(text.replace("libvirt.qemu_use_agent = true", 'libvirt.qemu_use_agent = "x"'))
    out = vagrant_validate(tmp_path, broken)
    assert out.startswith("failed: ") and "qemu_use_agent must be a boolean" in out, out
