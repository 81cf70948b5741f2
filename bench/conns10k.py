"""RSS of each node agent holding 10,000 concurrent proxied connections across nodes, beside
two HAProxies holding the same connections on the same two hops (issue 20).

A client pod on node1 opens ``--conns`` connections at once (``tests/e2e/manyconns.py``:
one asyncio process) to a TCP echo Service on node2 (two pods of one service account), each
echoing its own payload, and holds them open. With every connection open and idle the
bench reads each agent's RSS (``VmRSS`` of the processes in the agent's cgroup, what
``nodeagent ctl status`` shows) and compares it with the RSS at idle before; then every
connection echoes a second payload and closes cleanly (a connection that fails either
check fails the run), and the RSS is read once more (``closed``: what was not given
back). Then the same with ``haproxy-pod``'s placement (``run.py``): HAProxy in the client
pod's netns (loopback, TCP mode, ``nbthread 1``; two processes sharing the port, as one
would need more than the 20,000 descriptors allowed here) → one HAProxy in each echo
pod's netns → the echo on loopback; each node's figure is the sum of its two. Plain TCP
between HAProxies by default (HAProxy's mTLS hop holds a TLS session per connection, the
mesh one per 100 streams); ``--mtls`` gives HAProxy's middle hop mutual TLS as ``run.py
--mtls`` does.

    sudo .venv/bin/python bench/conns10k.py                          # eBPF, 10,000: ~1 min
    sudo .venv/bin/python bench/conns10k.py --modes ebpf,iptables --mtls --out c10k.json

Needs root; takes ``/run/nodeagent/e2e.lock`` like ``run.py`` and ``rss_idle.py``. Measures
memory, not time: a busy machine changes it little.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from run import (
    HAPROXY_BIND_TLS,
    HAPROXY_SERVER_TLS,
    e2e_lock,
    log,
    write_certs,
)

from nodeagent.sandbox import Sandbox, cgroups
from nodeagent.sandbox.netlink import netns_path
from nodeagent.sandbox.processes import next_json_line, tcp_open

ROOT = Path(__file__).resolve().parents[1]
MANYCONNS = ROOT / "tests" / "e2e" / "manyconns.py"
MODES = ("ebpf",)
ECHO_IP = "10.96.2.10"
ECHO_PORT = 9000
FRONT_PORT = 9201
NEXT_PORT = 9202
ECHOES = ("echo-a", "echo-b")
MIB = 1024 * 1024
CLOSED_SETTLE = 3.0
"""Seconds after the last connection closed before the RSS is read again."""

HAPROXY = """\
global
    nbthread 1
    maxconn {maxconn}
defaults
    mode tcp
    timeout connect 5s
    timeout client 600s
    timeout server 600s
frontend c10k_in
    bind {bind_ip}:{bind_port}{bind_tls}
    default_backend c10k_next
backend c10k_next
    balance roundrobin
{servers}
"""
"""``run.py``'s ``HAPROXY_CFG`` with room for the connections, idle timeouts longer than
the run, and one server per echo pod on the first hop."""


def config(directory: Path) -> None:
    """The sandbox: client on node1, the echo Service's two pods on node2; HAProxy's
    port excluded from capture (Istio's annotations), as ``run.py`` does."""
    docs = [
        f"""\
apiVersion: v1
kind: Pod
metadata:
  name: client
  namespace: default
  labels: {{app: client}}
  annotations: {{traffic.sidecar.istio.io/excludeOutboundPorts: "{NEXT_PORT}"}}
spec:
  nodeName: node1
  serviceAccountName: client
  containers:
  - {{name: main, command: [sleep, infinity]}}
"""
    ]
    for name in ECHOES:
        docs.append(
            f"""\
apiVersion: v1
kind: Pod
metadata:
  name: {name}
  namespace: default
  labels: {{app: echo}}
  annotations: {{traffic.sidecar.istio.io/excludeInboundPorts: "{NEXT_PORT}"}}
spec:
  nodeName: node2
  serviceAccountName: echo
  containers:
  - name: main
    command: [nodeagent, sample-app, --port, "8080", --tcp-echo, "{ECHO_PORT}"]
    ports: [{{name: tcp-echo, containerPort: {ECHO_PORT}}}]
"""
        )
    docs.append(
        f"""\
apiVersion: v1
kind: Service
metadata: {{name: echo, namespace: default}}
spec:
  selector: {{app: echo}}
  clusterIP: {ECHO_IP}
  ports:
  - {{name: tcp, port: {ECHO_PORT}, targetPort: tcp-echo}}
"""
    )
    (directory / "mesh.yaml").write_text("---\n".join(docs))


def rss(pids: list[int]) -> float:
    """The summed ``VmRSS`` of ``pids``, in MiB."""
    total = 0
    for pid in pids:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
    return total / MIB


class BenchError(Exception):
    pass


def hold(
    sb: Sandbox, host: str, port: int, conns: int, pids: dict[str, list[int]]
) -> dict[str, Any]:
    """Open ``conns`` connections from the client pod to ``host:port``, read the RSS of
    ``pids`` (by node) idle before and with all open, then check and close them all and
    read it again ``CLOSED_SETTLE`` seconds later (what is not given back)."""
    idle = {node: rss(p) for node, p in pids.items()}
    argv = [sys.executable, str(MANYCONNS), host, str(port), "--conns", str(conns)]
    client = sb.popen(
        "client",
        argv,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        started = time.monotonic()
        opened = next_json_line(client, 300)
        open_s = time.monotonic() - started
        held = {node: rss(p) for node, p in pids.items()}
        assert client.stdin is not None
        client.stdin.write("check\n")
        client.stdin.flush()
        checked = next_json_line(client, 300)
    finally:
        if client.poll() is None:
            client.kill()
        client.communicate(timeout=10)
    for ev in (opened, checked):
        if ev["ok"] != conns:
            raise BenchError(f"{ev['failed']} of {conns} connections failed: {ev['errors']}")
    time.sleep(CLOSED_SETTLE)
    return {
        "idle_mib": idle,
        "held_mib": held,
        "closed_mib": {node: rss(p) for node, p in pids.items()},
        "kib_per_conn": {n: (held[n] - idle[n]) * 1024 / conns for n in held},
        "open_s": round(open_s, 1),
    }


def start_haproxies(
    sb: Sandbox, work: Path, conns: int, mtls: bool, procs: dict[str, list[subprocess.Popen[bytes]]]
) -> None:
    """``haproxy-pod``'s placement: the client pod's loopback → each echo pod's IP →
    that pod's echo on loopback. Adds the processes to ``procs`` by node."""
    echo_ips = [sb.pod_ip(name) for name in ECHOES]
    servers = "\n".join(
        f"    server {name} {ip}:{NEXT_PORT}"
        + (HAPROXY_SERVER_TLS.format(dir=work) if mtls else "")
        for name, ip in zip(ECHOES, echo_ips, strict=True)
    )
    # two on node1, sharing its port (SO_REUSEPORT): one HAProxy holding both sides of
    # every connection would need more descriptors than the hard limit here (20,000)
    front = ("node1", sb.pod_netns("client"), "127.0.0.1", FRONT_PORT, "", servers)
    hops = [front, front]
    for name, ip in zip(ECHOES, echo_ips, strict=True):
        tls = HAPROXY_BIND_TLS.format(dir=work) if mtls else ""
        hops.append(
            (
                "node2",
                sb.pod_netns(name),
                ip,
                NEXT_PORT,
                tls,
                f"    server app 127.0.0.1:{ECHO_PORT}",
            )
        )
    for i, (node, ns, ip, port, bind_tls, upstream) in enumerate(hops):
        cfg = work / f"haproxy-{i}.cfg"
        cfg.write_text(
            HAPROXY.format(
                maxconn=conns // 2 + 1000,
                bind_ip=ip,
                bind_port=port,
                bind_tls=bind_tls,
                servers=upstream,
            )
        )
        with open(work / f"haproxy-{i}.log", "ab") as out:
            p = subprocess.Popen(
                ["nsenter", f"--net={netns_path(ns)}", "haproxy", "-db", "-f", str(cfg)],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        procs.setdefault(node, []).append(p)
        deadline = time.monotonic() + 10
        while not tcp_open(ns, ip, port):
            if p.poll() is not None or time.monotonic() > deadline:
                log_text = (work / f"haproxy-{i}.log").read_text(errors="replace")
                raise BenchError(f"HAProxy in {ns} did not listen on {ip}:{port}:\n{log_text}")
            time.sleep(0.05)
    time.sleep(0.5)  # the second on node1 listened through the first's socket: alive?
    if any(p.poll() is not None for ps in procs.values() for p in ps):
        logs = "".join(f.read_text(errors="replace") for f in work.glob("haproxy-*.log"))
        raise BenchError(f"an HAProxy exited:\n{logs[-3000:]}")


def stop(procs: dict[str, list[subprocess.Popen[bytes]]]) -> None:
    for p in (p for ps in procs.values() for p in ps):
        if p.poll() is None:
            p.terminate()
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(timeout=5)


def measure(mode: str, conns: int, settle: float, mtls: bool, haproxy: bool) -> dict[str, Any]:
    """One sandbox with ``--redirect mode``: the mesh's figures, then HAProxy's."""
    with tempfile.TemporaryDirectory(prefix="na-c10k-") as tmp:
        work = Path(tmp)
        config(work)
        out: dict[str, Any] = {"mode": mode, "conns": conns}
        with Sandbox.up(work, agent_args=["--redirect", mode]) as sb:
            time.sleep(settle)
            agents = {n: cgroups.procs(Path(sb.agent_cgroup(n))) for n in ("node1", "node2")}
            log(f"{mode}: {conns} connections through the agents")
            out["mesh"] = hold(sb, ECHO_IP, ECHO_PORT, conns, agents)
            if haproxy:
                if mtls:
                    write_certs(work)
                procs: dict[str, list[subprocess.Popen[bytes]]] = {}
                try:
                    start_haproxies(sb, work, conns, mtls, procs)
                    time.sleep(1)
                    pids = {n: [p.pid for p in ps] for n, ps in procs.items()}
                    log(f"{mode}: {conns} connections through HAProxy")
                    out["haproxy-pod"] = hold(sb, "127.0.0.1", FRONT_PORT, conns, pids)
                finally:
                    stop(procs)
        return out


def report(runs: list[dict[str, Any]], mtls: bool) -> str:
    n = runs[0]["conns"] if runs else 0
    lines = [
        f"{n:,} concurrent connections, client pod on node1 -> echo pods on node2 "
        f"(RSS, MiB; HAProxy's middle hop {'mTLS' if mtls else 'plain TCP'})",
        f"  {'case':<22} {'node':<6} {'idle':>7} {'held':>7} {'KiB/conn':>9} {'closed':>7}"
        f" {'open s':>7}",
    ]
    for run in runs:
        for case in ("mesh", "haproxy-pod"):
            fig = run.get(case)
            if fig is None:
                continue
            name = f"{case} ({run['mode']})" if case == "mesh" else case
            for node in sorted(fig["held_mib"]):
                idle, held = fig["idle_mib"][node], fig["held_mib"][node]
                per, took = fig["kib_per_conn"][node], fig["open_s"]
                closed = fig["closed_mib"][node]
                lines.append(
                    f"  {name:<22} {node:<6} {idle:7.1f} {held:7.1f} {per:9.1f} {closed:7.1f}"
                    f" {took:7.1f}"
                )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--modes", default=",".join(MODES), help="capture modes, comma-separated")
    p.add_argument("--conns", type=int, default=10_000, help="connections held at once")
    p.add_argument("--settle", type=float, default=5.0, help="seconds idle before reading")
    p.add_argument("--mtls", action="store_true", help="HAProxy's middle hop in mutual TLS")
    p.add_argument("--no-haproxy", action="store_true", help="the agents only")
    p.add_argument("--out", help="write the figures as JSON to this file")
    args = p.parse_args(argv)
    if os.geteuid() != 0:
        print("conns10k.py: needs root (the sandbox)", file=sys.stderr)
        return 1
    runs = []
    try:
        with e2e_lock():
            for mode in args.modes.split(","):
                runs.append(measure(mode, args.conns, args.settle, args.mtls, not args.no_haproxy))
    except (BenchError, TimeoutError) as e:
        print(f"conns10k.py: {e}", file=sys.stderr)
        return 1
    print(report(runs, args.mtls))
    if args.out:
        Path(args.out).write_text(json.dumps(runs, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
