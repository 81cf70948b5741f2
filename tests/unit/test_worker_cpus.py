"""``--workers auto``: one process per CPU the agent may use, its cgroup's CPU quota
(a DaemonSet's CPU limit) included."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from nodeagent.cli import build_parser
from nodeagent.config import AgentSettings
from nodeagent.workers.cpus import (
    auto_allowed,
    auto_workers,
    cgroup_quota,
    cpus_allowed,
    own_cgroup,
    quota_cpus,
)


@pytest.mark.parametrize(
    ("text", "cpus"),
    [
        ("max 100000\n", None),
        ("100000 100000\n", 1),
        ("150000 100000\n", 2),  # 1.5 CPUs: two processes, each may use what is left
        ("50000 100000\n", 1),
        ("400000 100000\n", 4),
        ("garbage\n", None),
        ("0 100000\n", None),
    ],
)
def test_quota_cpus(text: str, cpus: int | None) -> None:
    assert quota_cpus(text) == cpus


def test_the_smallest_quota_of_the_cgroup_and_its_parents_counts(tmp_path: Path) -> None:
    pod = tmp_path / "kubepods" / "pod1" / "agent"
    pod.mkdir(parents=True)
    (tmp_path / "kubepods" / "cpu.max").write_text("800000 100000\n")
    (tmp_path / "kubepods" / "pod1" / "cpu.max").write_text("200000 100000\n")
    (pod / "cpu.max").write_text("max 100000\n")
    assert cgroup_quota(tmp_path, "/kubepods/pod1/agent") == 2
    assert cgroup_quota(tmp_path, "/kubepods") == 8
    assert cgroup_quota(tmp_path, "/elsewhere") is None


def test_own_cgroup_reads_the_v2_line() -> None:
    assert own_cgroup("0::/system.slice/nodeagent.service\n") == "/system.slice/nodeagent.service"
    assert own_cgroup("1:name=systemd:/x\n") == "/"


def test_cpus_allowed_is_at_most_the_affinity(tmp_path: Path) -> None:
    n = len(os.sched_getaffinity(0))
    assert 1 <= cpus_allowed() <= n
    assert cpus_allowed(tmp_path) == n  # no cpu.max anywhere: the affinity alone


RUN = ["run", "--node", "n", "--config", "."]


def settings(*extra: str) -> AgentSettings:
    return AgentSettings.from_args(build_parser().parse_args([*RUN, *extra]))


def test_workers_flag() -> None:
    assert settings().workers == auto_allowed()  # auto is the default
    assert settings("--workers", "3").workers == 3
    assert settings("--workers", "1").workers == 1
    assert settings("--workers", "auto").workers == auto_allowed()
    assert 1 <= auto_allowed() <= cpus_allowed()


MIB = 1 << 20


@pytest.mark.parametrize(
    ("cpus", "memory", "workers"),
    [
        (1, None, 1),
        (2, None, 1),  # a second process costs more than it gives on 2 CPUs
        (3, None, 3),
        (64, None, 64),
        (64, 1024 * MIB, 7),  # the DaemonSet's 1 GiB: 256 MiB + 6 x 128 MiB
        (4, 1024 * MIB, 4),
        (8, 300 * MIB, 1),
    ],
)
def test_auto_is_one_per_cpu_within_the_memory_limit(
    cpus: int, memory: int | None, workers: int
) -> None:
    assert auto_workers(cpus, memory) == workers


def test_the_smallest_memory_limit_of_the_cgroup_and_its_parents_counts(tmp_path: Path) -> None:
    pod = tmp_path / "kubepods" / "pod1"
    pod.mkdir(parents=True)
    (tmp_path / "kubepods" / "memory.max").write_text("max\n")
    (pod / "memory.max").write_text(f"{1024 * MIB}\n")
    assert cgroup_quota(tmp_path, "/kubepods/pod1", "memory.max") == 1024 * MIB
    assert cgroup_quota(tmp_path, "/kubepods", "memory.max") is None


@pytest.mark.parametrize("bad", ["0", "-2", "two"])
def test_workers_flag_refuses_what_is_no_count(
    bad: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as e:
        settings("--workers", bad)
    assert e.value.code == 2
    assert "--workers" in capsys.readouterr().err
