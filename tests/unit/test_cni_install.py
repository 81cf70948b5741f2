"""``nodeagent cni install`` on a throwaway CNI bin dir and conf dir, as the DaemonSet's
init container runs it on a node."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest

from nodeagent.cli import main
from nodeagent.cni import install

BRIDGE: dict[str, Any] = {
    "type": "bridge",
    "bridge": "cni0",
    "ipam": {"type": "host-local", "subnet": "10.85.0.0/16"},
}


def write(path: Path, doc: dict[str, Any]) -> None:
    path.write_text(json.dumps(doc))


def read(path: Path) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(path.read_text())
    return doc


@pytest.fixture
def dirs(tmp_path: Path) -> tuple[Path, Path]:
    bin_dir, conf_dir = tmp_path / "bin", tmp_path / "net.d"
    conf_dir.mkdir()
    return bin_dir, conf_dir


def test_install_chains_the_plugin_last_in_the_first_conflist(dirs: tuple[Path, Path]) -> None:
    bin_dir, conf_dir = dirs
    first = conf_dir / "10-net.conflist"
    write(first, {"cniVersion": "1.0.0", "name": "net", "plugins": [BRIDGE, {"type": "portmap"}]})
    write(conf_dir / "20-other.conflist", {"cniVersion": "1.0.0", "name": "o", "plugins": []})
    changed = install.install(bin_dir, conf_dir, "/run/na.sock", python="/opt/py", timeout=7)
    assert changed == [f"wrote {bin_dir}/nodeagent-cni", f"added nodeagent-cni to {first}"]
    assert read(first)["plugins"] == [
        BRIDGE,
        {"type": "portmap"},
        {"type": "nodeagent-cni", "socket": "/run/na.sock", "timeout": 7, "log_level": "warning"},
    ]
    assert read(conf_dir / "20-other.conflist")["plugins"] == []
    exe = bin_dir / "nodeagent-cni"
    assert os.access(exe, os.X_OK)
    assert "exec /opt/py -m nodeagent.cni" in exe.read_text()
    # a second run changes nothing, not even the files' times
    before = [(p, p.stat().st_mtime_ns) for p in (exe, first)]
    assert install.install(bin_dir, conf_dir, "/run/na.sock", python="/opt/py", timeout=7) == []
    assert [(p, p.stat().st_mtime_ns) for p in (exe, first)] == before
    assert sorted(p.name for p in conf_dir.iterdir()) == ["10-net.conflist", "20-other.conflist"]


def test_a_changed_socket_replaces_our_entry(dirs: tuple[Path, Path]) -> None:
    bin_dir, conf_dir = dirs
    path = conf_dir / "10-net.conflist"
    write(path, {"cniVersion": "1.0.0", "name": "net", "plugins": [BRIDGE]})
    install.install(bin_dir, conf_dir, "/run/a.sock")
    install.install(bin_dir, conf_dir, "/run/b.sock")
    plugins = read(path)["plugins"]
    assert [p["type"] for p in plugins] == ["bridge", "nodeagent-cni"]
    assert plugins[-1]["socket"] == "/run/b.sock"


def test_a_lone_conf_becomes_a_conflist(dirs: tuple[Path, Path]) -> None:
    bin_dir, conf_dir = dirs
    write(conf_dir / "10-bridge.conf", {"cniVersion": "0.4.0", "name": "podnet", **BRIDGE})
    install.install(bin_dir, conf_dir, "/run/na.sock")
    assert [p.name for p in conf_dir.iterdir()] == ["10-bridge.conflist"]
    doc = read(conf_dir / "10-bridge.conflist")
    assert (doc["cniVersion"], doc["name"]) == ("0.4.0", "podnet")
    assert doc["plugins"][0] == BRIDGE and doc["plugins"][1]["type"] == "nodeagent-cni"


def test_uninstall_takes_both_away(dirs: tuple[Path, Path]) -> None:
    bin_dir, conf_dir = dirs
    path = conf_dir / "10-net.conflist"
    write(path, {"cniVersion": "1.0.0", "name": "net", "plugins": [BRIDGE]})
    install.install(bin_dir, conf_dir, "/run/na.sock")
    assert install.uninstall(bin_dir, conf_dir) == [
        f"removed nodeagent-cni from {path}",
        f"removed {bin_dir}/nodeagent-cni",
    ]
    assert read(path)["plugins"] == [BRIDGE]
    assert not (bin_dir / "nodeagent-cni").exists()
    assert install.uninstall(bin_dir, conf_dir) == []


def test_no_network_config_is_a_clear_error(
    dirs: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    bin_dir, conf_dir = dirs
    rc = main(["cni", "install", "--bin-dir", str(bin_dir), "--conf-dir", str(conf_dir)])
    err = capsys.readouterr().err
    assert rc == 1
    assert f"{conf_dir}: no CNI network config" in err and "install that first" in err


def test_the_command_line_installs_and_reports(
    dirs: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    bin_dir, conf_dir = dirs
    write(conf_dir / "10-net.conflist", {"cniVersion": "1.0.0", "name": "n", "plugins": [BRIDGE]})
    argv = ["cni", "install", "--bin-dir", str(bin_dir), "--conf-dir", str(conf_dir),
            "--socket", "/run/x.sock"]  # fmt: skip
    assert main(argv) == 0
    assert "added nodeagent-cni" in capsys.readouterr().out
    assert main(argv) == 0
    assert "nothing to change" in capsys.readouterr().out
    assert main([*argv, "--uninstall"]) == 0
    assert "removed" in capsys.readouterr().out


def test_the_launcher_runs_the_plugin(dirs: tuple[Path, Path]) -> None:
    bin_dir, conf_dir = dirs
    write(conf_dir / "10-net.conflist", {"cniVersion": "1.0.0", "name": "n", "plugins": [BRIDGE]})
    install.install(bin_dir, conf_dir, "/run/x.sock")
    p = subprocess.run(
        [str(bin_dir / "nodeagent-cni")],
        input=b'{"cniVersion": "0.3.1"}',
        capture_output=True,
        env={**os.environ, "CNI_COMMAND": "VERSION"},
        timeout=30,
    )
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["cniVersion"] == "0.3.1"


def test_the_agent_launcher_refuses_without_a_live_agent(tmp_path: Path) -> None:
    exe = tmp_path / "nodeagent-cni"
    exe.write_text(install.launcher("/opt/venv/bin/python", str(tmp_path / "agent.pid")))
    exe.chmod(0o755)
    p = subprocess.run([str(exe)], input=b"{}", capture_output=True, timeout=30)
    out = json.loads(p.stdout)
    assert p.returncode == 1 and out["code"] == 11
    assert str(tmp_path / "agent.pid") in out["msg"]
