"""Shared end-to-end fixtures: the ``privileged`` skip and config directories from YAML."""

from __future__ import annotations

import os
import shutil
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from meshops import bpf_programs

from nodeagent.sandbox import Sandbox
from nodeagent.sandbox.lock import sandbox_lock


def privileged_skip_reason() -> str | None:
    """Why the privileged tier cannot run here, or None when it can."""
    if os.geteuid() != 0:
        return "needs root (network namespaces, cgroups, iptables): run the e2e tier as root"
    for tool in ("ip", "iptables", "iptables-save"):
        if shutil.which(tool) is None:
            return f"needs `{tool}` on PATH (scripts/setup.sh installs it)"
    if not any(
        os.path.exists(f"{d}/cgroup.controllers")
        for d in ("/sys/fs/cgroup", "/sys/fs/cgroup/unified")
    ):
        return "needs a cgroup v2 mount (scripts/setup.sh mounts /sys/fs/cgroup/unified)"
    return None


@pytest.fixture(autouse=True)
def _skip_unprivileged(request: pytest.FixtureRequest) -> None:
    if request.node.get_closest_marker("privileged") is not None:
        reason = privileged_skip_reason()
        if reason is not None:
            pytest.skip(reason)


WriteConfig = Callable[[str], Path]


@pytest.fixture
def write_config(tmp_path: Path) -> WriteConfig:
    """``write_config(yaml_text) -> dir``: a config directory holding one mesh.yaml."""

    def write(text: str) -> Path:
        d = tmp_path / "config"
        d.mkdir(exist_ok=True)
        (d / "mesh.yaml").write_text(textwrap.dedent(text))
        return d

    return write


@pytest.fixture(scope="session", autouse=True)
def _one_sandbox_user_at_a_time() -> Iterator[None]:
    """The sandbox is one per machine: hold ``/run/nodeagent/e2e.lock`` for the session
    (the benchmark takes the same lock), so two runs never tear down each other's mesh."""
    if os.geteuid() != 0:
        yield
        return
    with sandbox_lock():  # (or an enclosing `flock /run/nodeagent/e2e.lock pytest ...`'s)
        yield


MESH_DIR = Path(__file__).parent / "mesh"
"""The end-to-end mesh (client on node1, echo servers on node2) shared by the mesh tests."""


@pytest.fixture(scope="module")
def config_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A private copy of ``mesh/`` per test module, so a module may edit its config."""
    d = tmp_path_factory.mktemp("mesh")
    for f in MESH_DIR.glob("*.yaml"):
        shutil.copy(f, d / f.name)
    return d


REDIRECT_MODES = tuple(
    m for m in os.environ.get("NODEAGENT_E2E_REDIRECT", "iptables,ebpf").split(",") if m
)
"""The capture modes every mesh test module runs in (a module may narrow them with its
own ``REDIRECT_MODES``). CI runs both."""


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """A test runs in its module's modes; ``@pytest.mark.redirect_modes(...)`` narrows
    them for one test (generated only where it runs: a skip would fail the privileged
    tier)."""
    if "redirect" in metafunc.fixturenames:
        modes = getattr(metafunc.module, "REDIRECT_MODES", REDIRECT_MODES)
        only = metafunc.definition.get_closest_marker("redirect_modes")
        if only is not None:
            modes = tuple(m for m in modes if m in only.args)
        metafunc.parametrize("redirect", modes, scope="module")


@pytest.fixture(scope="module")
def sb(request: pytest.FixtureRequest, config_dir: Path, redirect: str) -> Iterator[Sandbox]:
    """The sandbox of ``config_dir`` for one module and capture mode (``--redirect``);
    extra agent flags come from the module's ``AGENT_ARGS``. Logs go to stderr and the
    sandbox comes down, always; in eBPF mode no program of ours may be left after."""
    args = (*getattr(request.module, "AGENT_ARGS", ()), "--redirect", redirect)
    box = Sandbox.up(config_dir, agent_args=args)
    try:
        yield box
    finally:
        try:
            box.dump_logs(sys.stderr)
        finally:
            box.down()
    if redirect == "ebpf":
        for _ in range(50):  # programs are freed asynchronously after the unpin
            left = bpf_programs()
            if not left:
                break
            time.sleep(0.1)
        assert not left, f"BPF programs left after sandbox down: {left}"
