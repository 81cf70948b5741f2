"""bench/rss_idle.py's reading of /proc/PID/smaps: on this very process, its parts add up
to the RSS the kernel reports in smaps_rollup, a library loaded through ctypes shows
under its own name, the report prints a run beside an earlier one; and an agent does not
import the libraries it once held idle memory for."""

from __future__ import annotations

import ctypes
import importlib.util
import json
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


def loaded(imports: str, modules: tuple[str, ...]) -> list[str]:
    """Which of ``modules`` a fresh interpreter holds after ``import {imports}``."""
    script = (
        f"import json, sys, {imports}\n"
        f"print(json.dumps(sorted(m for m in {modules!r} if m in sys.modules)))"
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True
    ).stdout
    names: list[str] = json.loads(out)
    return names


HEAVY = (
    *("lightkube", "httpx2", "msgspec", "dns", "importlib.metadata", "idna", "opentelemetry"),
    *("re2", "jwt", "psutil"),
)
"""Libraries an idle agent was measured to hold MiB for, and no longer imports: the
Kubernetes client lightkube (with httpx2, msgspec: 6 MiB), dnspython (with
importlib.metadata and idna: 3.2 MiB), the OpenTelemetry SDK when no span is exported
(2.3 MiB); RE2 (1.0 MiB) until a pattern is compiled, PyJWT (0.8) until a JWKS key is
parsed, psutil (0.8) until a Status or a worker pool asks."""
AGENT = "nodeagent.cli, nodeagent.app, nodeagent.workers.child, nodeagent.admin.server"
"""What an agent imports; ``nodeagent run`` builds the command line's whole parser too."""


def test_an_agent_on_a_config_directory_loads_none_of_them() -> None:
    assert loaded(f"{AGENT}; nodeagent.cli.build_parser()", HEAVY) == []


def test_a_mesh_without_regex_or_jwt_rules_loads_neither() -> None:
    """Loading a config (bookinfo's) compiles no pattern and parses no JWKS."""
    bookinfo = Path(__file__).resolve().parents[2] / "examples" / "bookinfo"
    load = f"nodeagent.control.files; nodeagent.control.files.load_directory({str(bookinfo)!r})"
    assert loaded(f"{AGENT}, {load}", ("re2", "jwt")) == []


def test_an_agent_on_the_kubernetes_api_loads_none_of_them() -> None:
    imports = "nodeagent.app, nodeagent.control.kube, nodeagent.control.kubeclient"
    assert loaded(imports, HEAVY) == []
