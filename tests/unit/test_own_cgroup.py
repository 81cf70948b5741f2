"""Where the agent hooks its own sockets: its cgroup v2 directory, found even inside a
container with a private cgroup namespace, and never the node's root cgroup."""

from __future__ import annotations

from pathlib import Path

import pytest

from nodeagent.errors import LocalStateError
from nodeagent.redirect.ebpf import own_cgroup

PID = 4242


def tree(tmp_path: Path, rel: str, where: str) -> tuple[str, str, Path]:
    """A fake /proc/self/cgroup saying ``0::rel``, a mountinfo with the cgroup2 mount at
    ``tmp/cg`` and pid ``PID`` listed in ``tmp/cg/where/cgroup.procs``."""
    mount = tmp_path / "cg"
    for d in ("", "kubepods.slice", "kubepods.slice/pod1", "kubepods.slice/pod1/agent"):
        (mount / d).mkdir(exist_ok=True)
        (mount / d / "cgroup.procs").write_text("1\n7\n")
    (mount / where / "cgroup.procs").write_text(f"7\n{PID}\n")
    proc = tmp_path / "cgroup"
    proc.write_text(f"0::{rel}\n")
    info = tmp_path / "mountinfo"
    info.write_text(
        "22 1 0:21 / /proc rw - proc proc rw\n"
        f"30 22 0:26 / {mount} rw,nosuid - cgroup2 cgroup2 rw,nsdelegate\n"
    )
    return str(proc), str(info), mount


def test_the_cgroup_named_by_proc_self_cgroup(tmp_path: Path) -> None:
    proc, info, mount = tree(tmp_path, "/kubepods.slice/pod1/agent", "kubepods.slice/pod1/agent")
    assert own_cgroup(proc, info, PID) == str(mount / "kubepods.slice/pod1/agent")


def test_a_private_cgroup_namespace_is_found_by_pid(tmp_path: Path) -> None:
    # containerd on cgroup v2: /proc/self/cgroup reads 0::/ but the hostPath is the host's
    proc, info, mount = tree(tmp_path, "/", "kubepods.slice/pod1/agent")
    assert own_cgroup(proc, info, PID) == str(mount / "kubepods.slice/pod1/agent")


def test_the_root_cgroup_is_refused(tmp_path: Path) -> None:
    proc, info, _ = tree(tmp_path, "/", "")
    with pytest.raises(LocalStateError, match=r"root cgroup .* every process on the node"):
        own_cgroup(proc, info, PID)


def test_a_pid_listed_nowhere_is_an_error_naming_the_mount(tmp_path: Path) -> None:
    proc, info, mount = tree(tmp_path, "/", "kubepods.slice")
    with pytest.raises(LocalStateError, match=f"no cgroup.procs under {mount} lists pid 99"):
        own_cgroup(proc, info, 99)
