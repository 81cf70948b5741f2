"""An agent upgrade drops nothing: ``sandbox restart`` (a DaemonSet rolling update: the
new agent starts alongside the old one and takes its listening sockets over) runs on the
client's node and then on the server's while a client in the mesh makes a new
connection every 10 ms (HBONE from node1 to node2, each answer checked) and one long
stream crosses both nodes (its SHA-256 checked). No connection fails, the stream
completes, the old agents drain and exit, and capture never lapsed. A cold restart (the
old agent stopped, then a new one started) under the same traffic does fail
connections: that is what the hand-over is for.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from nodeagent.sandbox import Sandbox
from nodeagent.sandbox.agents import pod_cgroups, wait_exit
from nodeagent.sandbox.processes import alive

pytestmark = [
    pytest.mark.privileged,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root for netns and iptables"),
]

AGENT_ARGS = ("--drain-seconds", "60")
"""Long enough for the stream to finish on the old agents."""
CLIENT = str(Path(__file__).parent / "upgradeclient.py")
RATE = 3_000_000
"""Bytes per second of the long stream (tens of MB over the test)."""


def _traffic(sb: Sandbox) -> subprocess.Popen[str]:
    p = sb.popen(
        "client",
        [sys.executable, CLIENT, "echo", "9000", "--rate", str(RATE)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert p.stdout is not None
    assert p.stdout.readline().strip() == "started", p.stderr.read() if p.stderr else ""
    return p


def _results(p: subprocess.Popen[str]) -> dict[str, Any]:
    out, err = p.communicate("", timeout=120)
    assert p.returncode == 0, err
    result: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    return result


def test_an_upgrade_of_both_nodes_drops_no_connection(sb: Sandbox) -> None:
    old = {n: sb.agent_pids[n] for n in ("node1", "node2")}
    t0 = time.monotonic()
    p = _traffic(sb)
    windows = []
    try:
        time.sleep(2)  # traffic flows through both old agents
        for node in ("node1", "node2"):  # the client's node, then the server's
            start = time.monotonic()
            sb.roll_agent(node, exit_timeout=None)
            windows.append((start, time.monotonic()))
            assert sb.agent_pids[node] != old[node] and alive(sb.agent_pids[node])
            time.sleep(2)
    finally:
        result = _results(p)
    took = time.monotonic() - t0
    conns, stream = result["connections"], result["stream"]
    # (the client's clock is the system's monotonic one, as ours)
    during = [sum(a <= t <= b for t in conns["starts"]) for a, b in windows]
    print(
        f"upgrade of both nodes in {took:.1f}s: {conns['made']} connections, "
        f"{conns['failed']} failed; started during each restart: {during} (restarts of "
        f"{[round(b - a, 1) for a, b in windows]}s); stream {stream.get('sent', 0)} bytes "
        f"in {stream.get('seconds')}s",
        file=sys.stderr,
    )
    assert conns["failed"] == 0, (conns["errors"], "restart windows", windows)
    assert all(n > 50 for n in during), during  # the traffic spanned each hand-over
    assert stream["ok"], stream
    assert stream["received"] == stream["sent"] > 20_000_000
    # the stream is over: the old agents drain, exit, and leave capture in place
    for node, pid in old.items():
        assert wait_exit(pid, 30), f"old agent of {node} (pid {pid}) still runs"
        assert alive(sb.agent_pids[node])
    after = _quiet_traffic(sb)["connections"]
    assert after["failed"] == 0 and after["made"] > 20, after


def _quiet_traffic(sb: Sandbox, seconds: float = 1.0) -> dict[str, Any]:
    p = _traffic(sb)
    time.sleep(seconds)
    return _results(p)


@pytest.mark.redirect_modes("ebpf")  # the agent's cgroup matters to eBPF capture only
def test_an_agent_in_a_new_cgroup_keeps_every_listener_hooked(sb: Sandbox) -> None:
    """A DaemonSet's new pod has a cgroup of its own. With eBPF the hooks that answer
    SO_ORIGINAL_DST are attached to the agent's cgroup and fire for the listener's: an
    agent must hook its own cgroup even when an earlier agent's hooks are pinned, and
    listeners handed over from an agent whose cgroup is gone must stay served."""
    sb.stop_agent("node1")
    sb.restart_agent("node1", cgroup="gen-b")  # listeners opened in gen-b
    first = _quiet_traffic(sb)["connections"]
    assert first["failed"] == 0 and first["made"] > 20, first
    p = _traffic(sb)
    try:
        old = sb.roll_agent("node1", cgroup="gen-c", exit_timeout=None)  # gen-b's handed over
        time.sleep(1)
    finally:
        result = _results(p)
    assert result["connections"]["failed"] == 0, result["connections"]
    assert result["stream"]["ok"], result["stream"]
    assert wait_exit(old, 30)
    hooks = _proxy_hooks(sb)
    assert len(hooks) == 3, hooks  # the first agent's cgroup's, gen-b's, gen-c's: all of them
    assert all(progs == ["connect4_proxy", "getsockopt", "sockops"] for progs in hooks.values())
    gen_b = pod_cgroups(sb.cgroup_root, sb.topology.node("node1")) / "gen-b"
    gen_b.rmdir()  # as the kubelet removes the old pod's cgroup
    after = _quiet_traffic(sb)["connections"]
    assert after["failed"] == 0 and after["made"] > 20, after


def _proxy_hooks(sb: Sandbox) -> dict[str, list[str]]:
    """node1's pinned hooks of agent cgroups, from ``nodeagent ctl bpf``."""
    p = subprocess.run(
        [sys.executable, "-m", "nodeagent", "ctl", "--socket", sb.agent_socket("node1"),
         "bpf", "-o", "json"], capture_output=True, text=True, timeout=30)  # fmt: skip
    assert p.returncode == 0, p.stderr
    attached: dict[str, list[str]] = json.loads(p.stdout)["attachments"]
    return {k: v for k, v in attached.items() if k.startswith("_proxy")}


@pytest.mark.redirect_modes("iptables")  # the contrast is shown once
def test_a_cold_restart_under_the_same_traffic_fails_connections(sb: Sandbox) -> None:
    p = _traffic(sb)
    try:
        time.sleep(1)
        sb.stop_agent("node1")  # SIGKILL, then a new agent: what a plain restart does
        sb.restart_agent("node1")
        time.sleep(1)
    finally:
        result = _results(p)
    c = result["connections"]
    print(
        f"cold restart: {c['made']} connections, {c['failed']} failed: {c['errors'][:3]}",
        file=sys.stderr,
    )
    assert c["failed"] > 0, result
