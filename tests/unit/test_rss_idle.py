"""bench/rss_idle.py's reading of /proc/PID/smaps: on this very process, its parts add up
to the RSS the kernel reports in smaps_rollup, a library loaded through ctypes shows
under its own name, and the report prints a run beside an earlier one."""

from __future__ import annotations

import ctypes
import importlib.util
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench" / "rss_idle.py"


def rss_idle() -> ModuleType:
    spec = importlib.util.spec_from_file_location("rss_idle", BENCH)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def rollup_rss() -> int:
    for line in Path("/proc/self/smaps_rollup").read_text().splitlines():
        if line.startswith("Rss:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no Rss line")


def test_the_parts_add_up_to_the_kernels_rss() -> None:
    parts = rss_idle().smaps(os.getpid())
    total = parts.pop("total")
    assert sum(parts.values()) == total
    assert abs(total - rollup_rss()) < 4 << 20  # the two reads are moments apart
    assert parts["python"] > 0 and parts["heap+anon"] > 0


def test_a_library_shows_under_its_name() -> None:
    try:
        ctypes.CDLL("libbpf.so.1")
    except OSError:
        pytest.skip("no libbpf.so.1 here")
    assert rss_idle().smaps(os.getpid()).get("libbpf", 0) > 0


def test_the_report_prints_the_earlier_figure_beside() -> None:
    mod = rss_idle()
    mib = 1 << 20
    now = [{"mode": "ebpf", "agents": {"node1": {"total": 77 * mib, "heap+anon": 40 * mib}}}]
    was = [{"mode": "ebpf", "agents": {"node1": {"total": 251 * mib}}}]
    text = mod.report(now, was)
    assert "ebpf      node1:   77.0  (was 251.0)" in text
    assert "heap+anon 40.0" in text


def test_an_agent_without_the_kubernetes_api_does_not_load_its_client() -> None:
    """lightkube and httpx2 cost an agent ~5 MiB of RSS idle: only ``--kube`` loads
    them (the agent's and a worker's imports, in a fresh interpreter)."""
    script = (
        "import sys, nodeagent.cli, nodeagent.app, nodeagent.workers.child\n"
        "print(sorted(m for m in ('lightkube', 'httpx2') if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == "[]"
