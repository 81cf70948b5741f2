"""``nodeagent run --workers 2`` in the sandbox: connections are served by two processes
on each node, one dies and only its connections go.

Ports 9000 and 8080 of the echo pods take plaintext (PeerAuthentication DISABLE), so node2's
inbound connections arrive through capture (iptables REDIRECT to 15006, or eBPF
``sk_lookup`` assigning the main process's listener, whose ``SO_REUSEPORT`` group the
kernel then spreads over both processes) as well as node1's outbound ones (15001).
What is checked is what a person sees: ``ctl connections`` (its WORKER column), the
worker processes under the agent, and the clients' streams (every byte echoed, or not).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil
import pytest
from meshops import apply_file

from nodeagent.admin.client import AdminClient
from nodeagent.redirect.netns import netns_path
from nodeagent.sandbox import Sandbox

pytestmark = [
    pytest.mark.privileged,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root for netns and iptables"),
]

AGENT_ARGS = ("--workers", "2")
TCPCLIENT = str(Path(__file__).parent / "tcpclient.py")
PY = sys.executable
STREAMS = 12
PLAINTEXT = """
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: echo-plain, namespace: default}
spec:
  selector: {matchLabels: {app: echo}}
  mtls: {mode: PERMISSIVE}
  portLevelMtls: {9000: {mode: DISABLE}, 8080: {mode: DISABLE}}
"""
LIMIT = 10
RATE_LIMIT = f"""
apiVersion: nodeagent.io/v1alpha1
kind: LocalRateLimit
metadata: {{name: echo-v1-workers, namespace: default}}
spec:
  selector: {{matchLabels: {{app: echo, version: v1}}}}
  http:
    tokenBucket: {{maxTokens: {LIMIT}, tokensPerFill: 1, fillInterval: 1h}}
"""


@pytest.fixture(scope="module")
def config_dir(config_dir: Path) -> Path:
    (config_dir / "plaintext.yaml").write_text(PLAINTEXT)
    return config_dir


def conns(sb: Sandbox, node: str) -> list[dict[str, Any]]:
    return AdminClient(sb.agent_socket(node)).connections()


def workers_of(sb: Sandbox, node: str) -> list[psutil.Process]:
    """The agent's worker processes (``python -m nodeagent.workers``)."""
    agent = psutil.Process(sb.agent_pids[node])
    return [p for p in agent.children() if "nodeagent.workers" in " ".join(p.cmdline())]


def until(check: Callable[[], bool], what: str, seconds: float = 20) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def streams(sb: Sandbox, n: int, seconds: float) -> list[subprocess.Popen[str]]:
    """``n`` long echo streams from the client pod to the echo service's port 9000."""
    procs = [
        sb.popen(
            "client",
            [PY, TCPCLIENT, "stream", "echo", "9000", "--seconds", str(seconds)],
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(n)
    ]
    for p in procs:
        assert p.stdout is not None
        assert json.loads(p.stdout.readline())["event"] == "connected"
    return procs


def results(procs: list[subprocess.Popen[str]]) -> list[dict[str, Any]]:
    out = []
    for p in procs:
        text = p.communicate(timeout=60)[0]
        out.append(json.loads(text.strip().splitlines()[-1]))
    return out


def by_worker(rows: list[dict[str, Any]]) -> dict[int, int]:
    out: dict[int, int] = {}
    for c in rows:
        w = int(c.get("worker") or 0)
        out[w] = out.get(w, 0) + 1
    return out


def test_connections_land_on_both_processes_of_each_node(sb: Sandbox) -> None:
    assert all(len(workers_of(sb, n)) == 1 for n in ("node1", "node2"))
    procs = streams(sb, STREAMS, 4)
    try:
        out1 = [c for c in conns(sb, "node1") if c["pod"] == "default/client"]
        in2 = [c for c in conns(sb, "node2") if c["direction"] == "inbound"]
        assert len(out1) == STREAMS and len(in2) == STREAMS, (out1, in2)
        assert set(by_worker(out1)) == {0, 1}, by_worker(out1)  # 15001's group
        assert set(by_worker(in2)) == {0, 1}, by_worker(in2)  # 15006's (sk_lookup in eBPF)
    finally:
        done = results(procs)
    assert all(r["ok"] and r["received"] == r["sent"] > 0 for r in done), done


def test_a_killed_worker_takes_only_its_connections_and_is_replaced(sb: Sandbox) -> None:
    (old,) = workers_of(sb, "node1")
    procs = streams(sb, STREAMS, 6)
    try:
        rows = [c for c in conns(sb, "node1") if c["pod"] == "default/client"]
        on_victim = by_worker(rows).get(1, 0)
        assert 0 < on_victim < STREAMS, by_worker(rows)
        os.kill(old.pid, signal.SIGKILL)
    finally:
        done = results(procs)
    failed = [r for r in done if not r["ok"]]
    assert len(failed) == on_victim, done  # exactly the dead worker's connections
    assert all(r["received"] == r["sent"] > 0 for r in done if r["ok"]), done

    def replaced() -> bool:
        now = workers_of(sb, "node1")
        return len(now) == 1 and now[0].pid != old.pid

    until(replaced, "a replacement worker on node1")

    def served_by_replacement() -> bool:
        procs = streams(sb, 4, 1)
        try:
            rows = [c for c in conns(sb, "node1") if c["pod"] == "default/client"]
        finally:
            done = results(procs)
        assert all(r["ok"] for r in done), done
        return by_worker(rows).get(1, 0) > 0

    until(served_by_replacement, "a new connection on the replacement worker", 40)


def accept_queues(sb: Sandbox, pod: str, port: int) -> list[int]:
    """The accept queue of each socket of the listener group on ``port`` in ``pod``'s
    netns (``ss``'s Recv-Q of a listener), by socket."""
    out = subprocess.run(
        ["nsenter", f"--net={netns_path(sb.pod_netns(pod))}", "ss", "-Hltn", f"sport = :{port}"],
        capture_output=True, text=True, timeout=30, check=True,
    ).stdout  # fmt: skip
    return [int(line.split()[1]) for line in out.splitlines()]


def test_connections_queued_on_a_dying_worker_are_served_by_the_others(sb: Sandbox) -> None:
    (old,) = workers_of(sb, "node1")
    procs: list[subprocess.Popen[str]] = []
    queued = 0
    os.kill(old.pid, signal.SIGSTOP)  # it accepts nothing: its share waits in its queue
    try:
        procs = streams(sb, STREAMS, 2)
        until(lambda: max(accept_queues(sb, "client", 15001)) > 0, "a queued connection")
        queued = max(accept_queues(sb, "client", 15001))
    finally:
        os.kill(old.pid, signal.SIGKILL)
        done = results(procs)
    # tcp_migrate_req in the pod's netns: the kernel hands them to the main process's socket
    assert all(r["ok"] and r["received"] == r["sent"] > 0 for r in done), (queued, done)
    until(lambda: len(workers_of(sb, "node1")) == 1, "a replacement worker on node1")


def test_ctl_status_shows_each_workers_rss_and_cpu(sb: Sandbox) -> None:
    status = AdminClient(sb.agent_socket("node1")).status()
    workers = status["workers"]
    assert [w["index"] for w in workers] == [0, 1], workers
    (child,) = workers_of(sb, "node1")
    assert [w["pid"] for w in workers] == [sb.agent_pids["node1"], child.pid]
    assert all(w["state"] == "serving" and w["memory_rss_bytes"] > 10 << 20 for w in workers)
    assert all(w["cpu_percent"] >= 0 for w in workers)
    text = subprocess.run(
        [PY, "-m", "nodeagent", "ctl", "--socket", sb.agent_socket("node1"), "status"],
        capture_output=True, text=True, timeout=30, check=True,
    ).stdout  # fmt: skip
    assert "Workers:" in text and f"   {child.pid}   " in text, text


def test_a_rate_limit_holds_node_wide_and_ctl_requests_shows_every_worker(
    sb: Sandbox, config_dir: Path
) -> None:
    """LIMIT requests an hour to echo-1: 3 x LIMIT requests, each on a connection of its
    own (spread over node2's two processes), get LIMIT answers 200 and the rest 429, as
    with one process; ``ctl requests`` on node2 lists both processes' requests."""
    path = config_dir / "ratelimit-workers.yaml"
    apply_file(sb, path, RATE_LIMIT)
    try:
        url = f"http://{sb.pod_ip('echo-1')}:8080/limited"
        args = ["curl", "-s", "-m", "10", "-H", "connection: close", "-w", "%{http_code}\\n"]
        for _ in range(3 * LIMIT):  # (each URL its own -o)
            args += ["-o", "/dev/null", url]
        p = sb.exec("client", args, capture_output=True, text=True, timeout=120)
        codes = p.stdout.split()
        assert sorted(codes) == ["200"] * LIMIT + ["429"] * (2 * LIMIT), codes
        records = [
            r
            for r in AdminClient(sb.agent_socket("node2")).requests()["records"]
            if r.get("path") == "/limited" and r.get("reporter") == "destination"
        ]
        assert len(records) == 3 * LIMIT, records
        assert {int(r["worker"]) for r in records} == {0, 1}, records
        limited = [r for r in records if r["response_code"] == 429]
        assert len(limited) == 2 * LIMIT and {r["response_flags"] for r in limited} == {"RL"}
    finally:
        apply_file(sb, path, None)


def test_a_quota_holds_node_wide(sb: Sandbox, config_dir: Path) -> None:
    """A quota of LIMIT requests an hour (per source principal) to echo-2: 3 x LIMIT
    requests over node2's two processes get LIMIT answers 200, as with one process."""
    left = 3600 - time.time() % 3600
    if left < 60:  # stay inside one hour window
        time.sleep(left + 1)
    name = f"echo-v2-quota-{os.getpid()}-{int(time.time())}"  # new counts on each run
    path = config_dir / "quota-workers.yaml"
    apply_file(sb, path, f"""
        apiVersion: nodeagent.io/v1alpha1
        kind: LocalRateLimit
        metadata: {{name: {name}, namespace: default}}
        spec:
          selector: {{matchLabels: {{app: echo, version: v2}}}}
          quotas: [{{window: hour, limit: {LIMIT}}}]
    """)  # fmt: skip
    try:
        url = f"http://{sb.pod_ip('echo-2')}:8080/quota"
        args = ["curl", "-s", "-m", "10", "-H", "connection: close", "-w", "%{http_code}\\n"]
        for _ in range(3 * LIMIT):
            args += ["-o", "/dev/null", url]
        codes = sb.exec("client", args, capture_output=True, text=True, timeout=120).stdout.split()
        assert sorted(codes) == ["200"] * LIMIT + ["429"] * (2 * LIMIT), codes
        records = [
            r
            for r in AdminClient(sb.agent_socket("node2")).requests()["records"]
            if r.get("path") == "/quota" and r.get("reporter") == "destination"
        ]
        assert {int(r["worker"]) for r in records} == {0, 1}, records
    finally:
        apply_file(sb, path, None)
