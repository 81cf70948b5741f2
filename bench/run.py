"""The mesh benchmark: direct pod→pod vs a two-hop HAProxy relay vs the nodeagent mesh, in one
run, on one sandbox topology (client pod on node1, server pod on node2).

    .venv/bin/python bench/run.py [--seconds 10] [--rounds 2] [--out bench/results/latest.json]
    .venv/bin/python bench/run.py --quick          # smoke test: 3 s, 1 round
    .venv/bin/python bench/run.py --mtls           # node-to-node hop with mutual TLS
    .venv/bin/python bench/run.py --l7             # HTTP routing (implies --mtls)
    .venv/bin/python bench/run.py --cases direct,haproxy,haproxy-pod,mesh --profile
    .venv/bin/python bench/run.py --otlp stalled   # spans at 100% to a stalled collector

Needs root. It takes ``/run/nodeagent/e2e.lock`` itself (or uses the lock of an enclosing
``flock /run/nodeagent/e2e.lock ...``), brings a sandbox up from a generated config, and
always brings it down again (also on an error, Ctrl-C or SIGTERM).

Cases (same netns, same links; the upstream is one nginx worker in the server pod):

- ``direct``: client pod → server pod port 8081, which both pods exclude from capture
  (Istio's ``traffic.sidecar.istio.io/exclude{In,Out}boundPorts`` annotations);
- ``haproxy``: client pod → HAProxy in node1's netns → HAProxy in node2's netns → server pod
  port 8081 (Debian's HAProxy, TCP mode, ``nbthread 1``; ports excluded from capture);
- ``haproxy-pod``: the same two HAProxies in the namespaces where the agents' sockets are
  (client pod, loopback → server pod → loopback): the issues' "same relay in the same
  namespaces", the base of the targets;
- ``mesh``: client pod → the Service's clusterIP:8080 → node1's agent (outbound listener in
  the client pod's netns) → node2's agent (inbound, in the server pod's netns) → nginx:8080,
  captured as the agents do by default (``--redirect auto``: eBPF where the kernel allows
  it; the header says which), or with iptables in ``--capture`` runs;
- ``ebpf``, ``ebpf-bypass`` (``--capture``): the ``mesh`` case again on a second pair of
  nodes (node3 → node4, pods client-e → server-e) whose agents capture with eBPF (the
  Nodes' ``nodeagent.io/redirect: ebpf`` annotation) instead of iptables; ``ebpf`` as
  configured by default (sockmap bypass off), ``ebpf-bypass`` with the bypass of the local
  legs switched on (``nodeagent ctl bpf --bypass on|off`` before each run);
- ``local``, ``local-bypass`` (``--capture``): the local legs alone, bypass off and on: the
  load runs in server-e itself and calls server-e's own Service, so app → proxy (outbound
  listener, loopback) → nginx (pod IP) never leaves the pod: the two local legs and
  node4's agent, nothing else.

The node-to-node hop is plain TCP for both (the sandbox without mTLS); ``--mtls`` runs the
mesh with HBONE (mutual TLS) and gives HAProxy's middle hop mutual TLS 1.3. A check before
measuring makes sure each case takes its path and the mesh the transport asked for.

``--capture`` (issue 6) runs ``mesh,ebpf,ebpf-bypass,local,local-bypass``: iptables vs
eBPF capture, and the bypass on vs off over the whole path and on the local legs alone,
same run, same rounds; the summary checks the targets: ebpf/mesh >= 1.0 on every
throughput figure (keep-alive req/s, new connections/s, bulk MB/s), and ebpf-bypass/ebpf
and local-bypass/local >= 1.3 in bulk MB/s.

``--l7`` (implies ``--mtls``) measures HTTP routing, issue 4's target: the Service port is
HTTP (``appProtocol: http``, port name ``http-...``) and a ``networking.istio.io/v1``
VirtualService routes its host with one ``http`` rule matching ``uri: {prefix: /}``; both
HAProxies run in ``mode http`` (keep-alive, ``http-reuse always``, the same mTLS hop) and the
first one makes one route match (``acl`` on ``path_beg /`` + ``use_backend``). The summary
then prints the two target ratios: mesh/haproxy-pod keep-alive req/s >= 0.6 and
mesh/haproxy-pod p99 at 50 connections <= 2.0 (and the same against ``haproxy`` for
reference). The path check says whether the agents counted the HTTP
request (``istio_requests_total``), i.e. whether the mesh really took an L7 path.

Tests, each round interleaved per test (direct, haproxy, haproxy-pod, mesh, then the next
test):

- ``keepalive``: wrk, 1 thread, 50 keep-alive connections, ``--seconds``: req/s, p50/p99,
  proxy CPU per request (utime+stime of the proxy processes) and CPU1 busy per request
  (``/proc/stat``);
- ``latency1``: wrk ``-c1 -t1`` with *everything* (wrk, nginx, proxies) on CPU0, because a
  cross-CPU wake-up costs ~50 µs on this VM (see ``/work/shared/BENCHMARKING.md``);
- ``bulk``: one connection downloading a sparse file on tmpfs again and again
  (``bench/bulk_client.py``): MB/s (10^6 bytes) and proxy CPU per MB;
- ``newconn``: wrk, 50 connections, ``Connection: close``: new connections/s and proxy CPU per
  connection.

Layout: load generator and nginx on CPU0, every proxy (both agents, both HAProxies) on CPU1.
The secondary tests last ``max(2, seconds / 2)`` s each. Output: a table on stdout (absolute
numbers with their spread across rounds, per-round ratios to direct and of the mesh to
both HAProxy placements) and
a JSON file with every raw run. A run during which other users of the machine took more
than 15 % of a CPU is repeated once, then flagged and left out of the summary where a clean
one exists. ``--profile`` adds py-spy profiles of the agents. ``--otlp up|down|stalled`` (issue
19) runs the agents with spans on (``--otlp-endpoint``, a mesh-wide Telemetry sampling 100%)
towards a collector that is up (takes every export), down (nothing listens:
``127.0.0.1:4317`` in each node's netns) or stalled (a listener there that accepts and
never reads or answers), so the mesh's figures with a dead collector can be set beside a
healthy one's; each mesh run records the spans the
agents started and dropped (``nodeagent_spans_*_total``), printed at the end and in the
JSON (``otlp``). At L4 a span is per connection; with ``--l7`` per request. Exit status
1 only when something failed to run.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import inspect
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any, TypeVar

import yaml

import nodeagent
from nodeagent import native
from nodeagent.errors import NodeAgentError
from nodeagent.sandbox import Sandbox, cgroups
from nodeagent.sandbox.lock import LOCK_FILE, sandbox_lock
from nodeagent.sandbox.netlink import netns_path
from nodeagent.sandbox.processes import tcp_open

T = TypeVar("T")
ROOT = Path(__file__).resolve().parent.parent

CASES = ("direct", "haproxy", "haproxy-pod", "mesh")
LOCAL_CASES = ("local", "local-bypass")
"""The local legs alone: server-e calls its own Service, so app -> proxy (outbound
listener, loopback) -> nginx (the pod IP; the proxy's own connection is not captured
again) stay inside the server-e pod on node4."""
EBPF_CASES = ("ebpf", "ebpf-bypass", *LOCAL_CASES)
BYPASS_CASES = ("ebpf-bypass", "local-bypass")
CAPTURE_CASES = ("mesh", *EBPF_CASES)
"""``--capture``: iptables capture (``mesh``) vs eBPF with and without the bypass."""
ALL_CASES = (*CASES, *EBPF_CASES)
TARGET_BASES = ("haproxy-pod", "haproxy")
"""The HAProxy cases the mesh is compared with, the targets' base first. ``haproxy-pod``
runs the two HAProxies where the agents' sockets are (the client's and the server's netns,
reached over loopback, without the capture): issue 2's "the same two-hop TCP relay in the
same namespaces" and issue 4's "same topology". ``haproxy`` (the node netns, where a
node-level proxy outside the pods would run) is shown beside it: ``haproxy`` ->
``haproxy-pod`` is what the in-pod placement costs any proxy (two more IP forwards per
packet, through each node's netns), ``haproxy-pod`` -> ``mesh`` what the agent costs."""
TESTS = ("keepalive", "latency1", "bulk", "newconn")
NODES = ("node1", "node2")
EBPF_NODES = ("node3", "node4")
"""The eBPF cases' nodes (client-e on node3, server-e on node4)."""
CLIENT, SERVER = "client", "server"
CLIENT_E, SERVER_E = "client-e", "server-e"
EBPF_CLUSTER_IP = "10.96.80.81"
MESH_PORT = 8080
DIRECT_PORT = 8081
HAPROXY_FRONT_PORT = 9101
HAPROXY_NEXT_PORT = 9102
HAPROXY_POD_FRONT_PORT = 9201
HAPROXY_POD_NEXT_PORT = 9202
CLUSTER_IP = "10.96.80.80"
TCP_OPENED = "istio_tcp_connections_opened_total"
REQUESTS = "istio_requests_total"
"""``--l7``: the agents' HTTP request counter (Istio's name), to tell an L7 path from L4."""
BULK_PATH = "/big.bin"
LOAD_CPU = 0
PROXY_CPU = 1
KEEPALIVE_CONNS = 50
L7_PREFIX = "/"
"""``--l7``: the URI prefix of the one route match (mesh VirtualService, HAProxy ``acl``)."""
L7_RULE = "bench"
"""``--l7``: the name of the VirtualService's http rule (the agents' ``route_name`` label)."""
CLK_TCK = os.sysconf("SC_CLK_TCK")
OTHER_LOAD_WARN = 0.15
"""A run during which more than this share of a CPU went to work that is not the
benchmark's (other users of the machine) is repeated, then flagged."""
OTHER_LOAD_RETRIES = 1
QUIET_WAIT = 20.0
"""Seconds to wait at most for the machine to be quiet before repeating a run."""
ERROR_FRACTION = 0.01
"""A wrk run with more failed requests than this fraction counts as failed to run."""
REQUIRED_TOOLS = ("wrk", "haproxy", "nginx", "curl", "taskset", "nsenter", "sysctl")
OTLP_ENDPOINT = "127.0.0.1:4317"
"""``--otlp``: where the agents send spans, in each node's netns (OTLP/gRPC's port)."""
SPAN_METRICS = ("nodeagent_spans_started_total", "nodeagent_spans_dropped_total")
SAMPLE_ALL = """\
apiVersion: telemetry.istio.io/v1
kind: Telemetry
metadata: {name: bench-sample-all, namespace: istio-system}
spec:
  tracing:
  - randomSamplingPercentage: 100
"""
"""``--otlp``: every request and connection is sampled (Istio's default is 1%)."""
STALLED_COLLECTOR = """\
import socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
host, port = sys.argv[1].rsplit(":", 1)
s.bind((host, int(port)))
s.listen(1024)
print("listening", flush=True)
held = []
while True:  # accept, hold, never read nor answer
    held.append(s.accept()[0])
"""
"""``--otlp stalled``: the collector that accepts and never answers (one per node netns)."""
UP_COLLECTOR = """\
import sys
from concurrent import futures
import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2 as pb
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2_grpc as pbg
class S(pbg.TraceServiceServicer):
    def Export(self, request, context):  # take the spans, answer at once
        return pb.ExportTraceServiceResponse()
server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
pbg.add_TraceServiceServicer_to_server(S(), server)
server.add_insecure_port(sys.argv[1])
server.start()
print("listening", flush=True)
server.wait_for_termination()
"""
"""``--otlp up``: a collector (OTLP/gRPC) that takes every export and answers at once, the
base that ``down`` and ``stalled`` are compared with."""

WRK_LUA = r"""
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRKJSON {"requests": %d, "duration_us": %d, "bytes": %d, "connect": %d, "read": %d, ' ..
    '"write": %d, "status": %d, "timeout": %d, "mean_us": %.1f, "max_us": %d, ' ..
    '"p50_us": %d, "p90_us": %d, "p99_us": %d, "p999_us": %d}\n',
    summary.requests, summary.duration, summary.bytes, e.connect, e.read, e.write,
    e.status, e.timeout, latency.mean, latency.max, latency:percentile(50),
    latency:percentile(90), latency:percentile(99), latency:percentile(99.9)))
end
"""

NGINX_CONF = """\
user root;
worker_processes 1;
daemon off;
pid {run}/nginx.pid;
error_log {run}/nginx-error.log warn;
events {{
    worker_connections 8192;
}}
http {{
    access_log off;
    default_type application/octet-stream;
    keepalive_requests 1000000;
    keepalive_timeout 300s;
    sendfile on;
    tcp_nopush on;
    tcp_nodelay on;
    server {{
        listen {mesh_port} backlog=4096;
        listen {direct_port} backlog=4096;
        location = / {{
            return 200 "ok\\n";
        }}
        location = {bulk_path} {{
            root {dir};
        }}
    }}
}}
"""

HAPROXY_CFG = """\
global
    nbthread 1
    maxconn 8192
defaults
    mode tcp
    timeout connect 5s
    timeout client 60s
    timeout server 60s
frontend bench_in
    bind {bind_ip}:{bind_port}{bind_tls}
    default_backend bench_next
backend bench_next
    server next {up_ip}:{up_port}{server_tls}
"""
HAPROXY_HTTP_CFG = """\
global
    nbthread 1
    maxconn 8192
defaults
    mode http
    option http-keep-alive
    http-reuse always
    timeout connect 5s
    timeout client 60s
    timeout server 60s
    timeout http-keep-alive 60s
frontend bench_in
    bind {bind_ip}:{bind_port}{bind_tls}
{route}
backend bench_next
    server next {up_ip}:{up_port}{server_tls}
"""
"""``--l7``: HAProxy in HTTP mode. ``http-reuse always`` keeps pooled server connections in
use when clients send ``Connection: close`` (``safe``, the default, would not: see
BENCHMARKING.md), as the mesh keeps its HBONE tunnels."""
HAPROXY_ROUTE = f"""\
    acl bench_route path_beg {L7_PREFIX}
    use_backend bench_next if bench_route"""
"""The first HAProxy's route match (the mesh's VirtualService rule: ``uri: {prefix: /}``);
a request that does not match gets HAProxy's 503, as the mesh answers 404 (no route)."""
HAPROXY_DEFAULT = "    default_backend bench_next"
TLS_SUITE = "TLS_AES_256_GCM_SHA384"
"""The TLS 1.3 suite HAProxy's mTLS hop is pinned to (what the peers negotiated here)."""
HAPROXY_BIND_TLS = (
    " ssl crt {dir}/hop2.pem ca-file {dir}/ca.pem verify required"
    f" ssl-min-ver TLSv1.3 ciphersuites {TLS_SUITE}"
)
HAPROXY_SERVER_TLS = (
    " ssl crt {dir}/hop1.pem ca-file {dir}/ca.pem verify required verifyhost hop2"
    f" sni str(hop2) ssl-min-ver TLSv1.3 ciphersuites {TLS_SUITE}"
)


def log(msg: str) -> None:
    print(f"bench: {msg}", file=sys.stderr, flush=True)


class BenchError(Exception):
    """Something the benchmark needs could not be run or set up."""


# -- figures -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Figure:
    key: str
    label: str
    higher_is_better: bool
    vs_direct: bool = True
    """False for proxy CPU figures: direct has no proxy to compare with."""


FIGURES = (
    Figure("ka_rps", "keep-alive req/s (c50)", True),
    Figure("ka_p50_ms", "  p50 latency ms", False),
    Figure("ka_p99_ms", "  p99 latency ms", False),
    Figure("ka_proxy_us", "  proxy CPU µs/req", False, vs_direct=False),
    Figure("ka_proxy_user_us", "    of which user", False, vs_direct=False),
    Figure("ka_cpu1_us", "  CPU1 busy µs/req", False, vs_direct=False),
    Figure("ka_switches", "  proxy ctx switches/req", False, vs_direct=False),
    Figure("lat1_p50_us", "1-conn p50 µs (1 CPU)", False),
    Figure("lat1_p99_us", "1-conn p99 µs (1 CPU)", False),
    Figure("bulk_mbps", "bulk MB/s (1 conn)", True),
    Figure("bulk_proxy_us_per_mb", "  proxy CPU µs/MB", False, vs_direct=False),
    Figure("conn_rps", "new conn/s (c50, close)", True),
    Figure("conn_proxy_us", "  proxy CPU µs/conn", False, vs_direct=False),
    Figure("conn_proxy_user_us", "    of which user", False, vs_direct=False),
)
TARGET_FIGURES = ("ka_rps", "bulk_mbps")
TARGET = 0.8
"""Issue 2's goal: mesh >= 0.8 x HAProxy for keep-alive req/s and bulk MB/s."""
WATCHED_FIGURES = ("conn_rps",)
"""Shown with the same 0.8 beside the target, not part of issue 2's."""
CAPTURE_TARGETS = (
    ("ebpf/mesh", "ka_rps", 1.0),
    ("ebpf/mesh", "conn_rps", 1.0),
    ("ebpf/mesh", "bulk_mbps", 1.0),
    ("ebpf-bypass/ebpf", "bulk_mbps", 1.3),
    ("local-bypass/local", "bulk_mbps", 1.3),
)
"""``--capture`` (issue 6): (ratio, figure, at least): eBPF capture at least as fast as
iptables on every throughput figure; the bypass >= 1.3x in bulk, over the whole path
(``ebpf-bypass/ebpf``) and on the local legs alone (``local-bypass/local``)."""
L7_TARGETS = (
    ("ka_rps", "L7 keep-alive req/s (c50)", True, 0.6),
    ("ka_p99_ms", "L7 keep-alive p99 (c50)", False, 2.0),
)
"""``--l7`` (issue 4): (figure, label, at least?, bound) on mesh/<HAProxy base>: keep-alive
req/s at least 0.6 x HAProxy's, p99 latency at 50 connections no worse than 2 x HAProxy's."""


def target_bases(cases: Sequence[str]) -> list[str]:
    """The HAProxy cases of this run, the targets' base first (``TARGET_BASES``)."""
    return [b for b in TARGET_BASES if b in cases]


def figure_label(fig: Figure, l7: bool) -> str:
    """The row label; with ``--l7`` the top-level rows say L7 (sub-rows are indented)."""
    return f"L7 {fig.label}" if l7 and not fig.label.startswith(" ") else fig.label


# -- the e2e lock --------------------------------------------------------------------------


@contextlib.contextmanager
def e2e_lock() -> Iterator[None]:
    """Serialise with other sandbox users (end-to-end tests) on ``LOCK_FILE``."""
    with sandbox_lock(LOCK_FILE, log):
        yield


# -- signals -------------------------------------------------------------------------------


_MAIN_PID = os.getpid()


def _interrupt(signum: int, _frame: FrameType | None) -> None:
    """Ctrl-C / SIGTERM / SIGHUP: unwind (so every ``finally`` runs) in this process only.

    pyroute2 forks helper children to work inside a netns and stops them with SIGTERM; a
    forked child shares this handler and our stack, and must not unwind through
    ``Sandbox.up``'s clean-up or ours: it exits at once.
    """
    if os.getpid() != _MAIN_PID:
        os._exit(128 + signum)
    raise KeyboardInterrupt(f"signal {signal.Signals(signum).name}")


@contextlib.contextmanager
def shielded() -> Iterator[None]:
    """Ignore SIGINT/SIGTERM/SIGHUP while cleaning up, so a second Ctrl-C cannot leave a
    half-torn-down sandbox behind."""
    sigs = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    old = {s: signal.signal(s, signal.SIG_IGN) for s in sigs}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


# -- CPU accounting ------------------------------------------------------------------------


@dataclass(frozen=True)
class ProcSample:
    """Counters of one process (all its threads)."""

    utime: int
    """User time (Python, uvloop, HAProxy's own code), in clock ticks."""
    stime: int
    """System time (syscalls, and the softirq work they trigger), in clock ticks."""
    syscalls: int
    """read/write syscalls (``syscr + syscw`` of ``/proc/PID/io``): counts ``read``/``write``
    (libuv's) but not ``recv``/``send`` (HAProxy's), so it only compares a proxy with itself."""
    switches: int
    """voluntary + involuntary context switches (``/proc/PID/status``, main thread)."""


def _proc_sample(pid: int) -> ProcSample | None:
    """None when the process is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        io = Path(f"/proc/{pid}/io").read_text()
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    fields = stat[stat.rfind(")") + 2 :].split()
    counters = dict(line.split(":", 1) for line in (io + status).splitlines() if ":" in line)

    def num(key: str) -> int:
        return int(counters.get(key, "0").split()[0] or 0)

    return ProcSample(
        utime=int(fields[11]),
        stime=int(fields[12]),
        syscalls=num("syscr") + num("syscw"),
        switches=num("voluntary_ctxt_switches") + num("nonvoluntary_ctxt_switches"),
    )


def _cpu_times() -> dict[int, list[int]]:
    out: dict[int, list[int]] = {}
    for line in Path("/proc/stat").read_text().splitlines():
        name, *vals = line.split()
        if name.startswith("cpu") and name != "cpu":
            out[int(name[3:])] = [int(v) for v in vals]
    return out


def _all_ticks() -> dict[int, tuple[str, int]]:
    """(comm, CPU ticks of it and its reaped children) of every process on the machine but
    this one, to name other load: short-lived processes show up in their parent."""
    out: dict[int, tuple[str, int]] = {}
    me = str(os.getpid())
    for name in os.listdir("/proc"):
        if not name.isdigit() or name == me:
            continue
        try:
            stat = Path(f"/proc/{name}/stat").read_text()
        except OSError:
            continue
        comm = stat[stat.find("(") + 1 : stat.rfind(")")]
        fields = stat[stat.rfind(")") + 2 :].split()
        out[int(name)] = (comm, sum(int(f) for f in fields[11:15]))
    return out


def _cgroup_usage_us(path: str) -> int:
    """CPU time of everything in a cgroup v2 directory (``cpu.stat`` ``usage_usec``)."""
    try:
        for line in Path(path, "cpu.stat").read_text().splitlines():
            key, _, value = line.partition(" ")
            if key == "usage_usec":
                return int(value)
    except OSError:
        pass
    return 0


@dataclass
class CpuSnap:
    wall: float
    procs: dict[int, ProcSample | None]
    cgroups: dict[str, int]
    cpus: dict[int, list[int]]
    everything: dict[int, tuple[str, int]]

    @classmethod
    def take(cls, pids: Sequence[int], cgroup_dirs: Sequence[str]) -> CpuSnap:
        return cls(
            time.monotonic(),
            {p: _proc_sample(p) for p in pids},
            {c: _cgroup_usage_us(c) for c in cgroup_dirs},
            _cpu_times(),
            _all_ticks(),
        )


@dataclass(frozen=True)
class ProcDelta:
    cpu_s: float
    user_s: float
    syscalls: int
    switches: int


@dataclass
class CpuDelta:
    wall_s: float
    procs: dict[int, ProcDelta]
    cgroups_s: dict[str, float]
    """CPU time of the watched cgroups (pods: load generator and nginx; agents)."""
    busy_s: dict[int, float]
    """Per CPU: user+nice+system+irq+softirq (not idle, iowait or steal)."""
    steal: dict[int, float]
    """Per CPU: fraction of the interval stolen by the hypervisor."""
    fields_s: dict[int, dict[str, float]]
    """Per CPU: the busy fields of ``/proc/stat`` (user, system, softirq, ...)."""
    top: list[tuple[int, str, float]]
    """The processes that used most CPU during the interval: (pid, comm, seconds)."""

    @classmethod
    def between(cls, a: CpuSnap, b: CpuSnap) -> CpuDelta:
        procs: dict[int, ProcDelta] = {}
        for pid, s0 in a.procs.items():
            s1 = b.procs.get(pid)
            if s0 is None or s1 is None:
                raise BenchError(f"proxy process {pid} exited during the run")
            procs[pid] = ProcDelta(
                cpu_s=(s1.utime + s1.stime - s0.utime - s0.stime) / CLK_TCK,
                user_s=(s1.utime - s0.utime) / CLK_TCK,
                syscalls=s1.syscalls - s0.syscalls,
                switches=s1.switches - s0.switches,
            )
        cgroups_s = {c: (b.cgroups[c] - a.cgroups[c]) / 1e6 for c in a.cgroups}
        busy_s: dict[int, float] = {}
        steal: dict[int, float] = {}
        fields_s: dict[int, dict[str, float]] = {}
        for cpu, v0 in a.cpus.items():
            d = [y - x for x, y in zip(v0, b.cpus[cpu], strict=False)]
            user, nice, system, idle, iowait, irq, softirq, st = (d + [0] * 8)[:8]
            busy_s[cpu] = (user + nice + system + irq + softirq) / CLK_TCK
            total = user + nice + system + idle + iowait + irq + softirq + st
            steal[cpu] = st / total if total else 0.0
            fields_s[cpu] = {
                "user": (user + nice) / CLK_TCK,
                "system": system / CLK_TCK,
                "irq": irq / CLK_TCK,
                "softirq": softirq / CLK_TCK,
            }
        used = [
            (pid, comm, (t1 - a.everything[pid][1]) / CLK_TCK)
            for pid, (comm, t1) in b.everything.items()
            if pid in a.everything
        ]
        top = sorted((u for u in used if u[2] > 0), key=lambda u: -u[2])[:6]
        return cls(b.wall - a.wall, procs, cgroups_s, busy_s, steal, fields_s, top)

    def of(self, pids: Sequence[int]) -> ProcDelta:
        ds = [self.procs[p] for p in pids]
        return ProcDelta(
            cpu_s=sum(d.cpu_s for d in ds),
            user_s=sum(d.user_s for d in ds),
            syscalls=sum(d.syscalls for d in ds),
            switches=sum(d.switches for d in ds),
        )

    def other_s(self, uncontained: Sequence[int]) -> float:
        """CPU time of the machine not spent by the watched cgroups and the ``uncontained``
        processes (HAProxy): other users' work, plus kernel threads (a little of which is
        our own traffic, e.g. ksoftirqd)."""
        tracked = sum(self.cgroups_s.values()) + self.of(uncontained).cpu_s
        return max(0.0, sum(self.busy_s.values()) - tracked)

    def as_json(self, case_pids: Sequence[int], uncontained: Sequence[int]) -> dict[str, Any]:
        mine = self.of(case_pids)
        return {
            "wall_s": round(self.wall_s, 3),
            "proxy_cpu_s": round(mine.cpu_s, 3),
            "proxy_user_s": round(mine.user_s, 3),
            "proxy_rw_syscalls": mine.syscalls,
            "proxy_context_switches": mine.switches,
            "proc_cpu_s": {str(k): round(v.cpu_s, 3) for k, v in self.procs.items()},
            "cpu_busy_s": {str(k): round(v, 3) for k, v in self.busy_s.items()},
            "other_cpu_s": round(self.other_s(uncontained), 3),
            "cgroup_cpu_s": {Path(k).name: round(v, 3) for k, v in self.cgroups_s.items()},
            "cpu_fields_s": {
                str(c): {k: round(v, 3) for k, v in f.items()} for c, f in self.fields_s.items()
            },
            "top_processes": [[pid, comm, round(t, 3)] for pid, comm, t in self.top],
            "steal": {str(k): round(v, 4) for k, v in self.steal.items()},
        }


# -- the run ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Options:
    seconds: int
    rounds: int
    short: int
    warmup: int
    bulk_mib: int
    out: Path
    profile: bool = False
    cases: tuple[str, ...] = CASES
    mtls: bool = False
    """Mesh with mutual TLS (HBONE) between nodes, and HAProxy's middle hop with mTLS."""
    l7: bool = False
    """HTTP routing: an HTTP Service port with a VirtualService route match for the mesh,
    HAProxy in HTTP mode with an ``acl`` route match (implies ``mtls``)."""
    retry_budget: float = 90.0
    """Seconds the whole run may spend repeating runs disturbed by other users."""
    otlp: str = ""
    """``up``, ``down`` or ``stalled``: spans on at 100%, towards a collector in that state."""
    tests: tuple[str, ...] = TESTS
    """The tests each round runs (in ``TESTS`` order)."""
    workers: int = 1
    """``nodeagent run --workers``: processes per agent (all pinned to the proxies' CPU)."""


def _per(total: float, count: float) -> float | None:
    return total / count if count > 0 else None


def _ms(us: float) -> float:
    return us / 1000.0


@dataclass
class Bench:
    sb: Sandbox
    work: Path
    opts: Options
    haproxies: dict[str, list[subprocess.Popen[bytes]]] = field(default_factory=dict)
    runs: list[dict[str, Any]] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    profile: dict[str, Any] = field(default_factory=dict)
    mesh_transport: str = "?"
    mesh_capture: str = "?"
    """How node1/node2 capture (``check_capture_modes``): the ``mesh`` case's capture."""
    mesh_l7_seen: bool | None = None
    """``--l7``: whether node1's agent (the one that routes) counted the test request in
    ``istio_requests_total`` (the mesh took an L7 path); None without ``--l7`` or before the
    check."""
    retry_spent: float = 0.0
    """Seconds spent so far waiting for quiet and repeating runs (see ``--retry-budget``)."""
    spans: dict[str, dict[str, float]] = field(default_factory=dict)
    """``--otlp``: each mesh node's span counters at the end (``SPAN_METRICS``)."""

    # -- addresses and processes -----------------------------------------------------------

    @property
    def nodes(self) -> tuple[str, ...]:
        """Every node of the run (node3/node4 only with an eBPF case)."""
        return NODES + (EBPF_NODES if set(EBPF_CASES) & set(self.opts.cases) else ())

    @property
    def pods(self) -> tuple[str, ...]:
        """Every client and server pod of the run."""
        both = set(EBPF_CASES) & set(self.opts.cases)
        return (CLIENT, SERVER) + ((CLIENT_E, SERVER_E) if both else ())

    @staticmethod
    def client_of(case: str) -> str:
        if case in LOCAL_CASES:
            return SERVER_E
        return CLIENT_E if case in EBPF_CASES else CLIENT

    @staticmethod
    def nodes_of(case: str) -> tuple[str, ...]:
        """The nodes whose agents relay ``case`` (none for direct and HAProxy)."""
        if case in LOCAL_CASES:
            return EBPF_NODES[1:]
        return EBPF_NODES if case in EBPF_CASES else NODES if case == "mesh" else ()

    def set_bypass(self, case: str) -> None:
        """Before an eBPF case's run: the bypass off (``ebpf``, ``local``) or on
        (``ebpf-bypass``, ``local-bypass``)."""
        if case not in EBPF_CASES:
            return
        from nodeagent.admin.client import AdminClient

        want = "on" if case in BYPASS_CASES else "off"
        for node in EBPF_NODES:
            with AdminClient(self.sb.agent_socket(node)) as c:
                state = c.bpf(want)
            if state.get("bypass") != want:
                raise BenchError(f"{node}: the bypass did not switch {want}: {state}")

    def endpoint(self, case: str) -> tuple[str, int]:
        if case in EBPF_CASES:
            return EBPF_CLUSTER_IP, MESH_PORT
        if case == "direct":
            return self.sb.pod_ip(SERVER), DIRECT_PORT
        if case == "haproxy":
            return self.sb.node_ip("node1"), HAPROXY_FRONT_PORT
        if case == "haproxy-pod":
            return "127.0.0.1", HAPROXY_POD_FRONT_PORT
        return CLUSTER_IP, MESH_PORT

    def url(self, case: str, path: str = "/") -> str:
        host, port = self.endpoint(case)
        return f"http://{host}:{port}{path}"

    def agent_pids(self, nodes: Sequence[str] | None = None) -> list[int]:
        pids: list[int] = []
        for node in self.nodes if nodes is None else nodes:
            pids += cgroups.procs(Path(self.sb.agent_cgroup(node)))
        return pids

    def haproxy_pids(self, case: str | None = None) -> list[int]:
        return [p.pid for c, ps in self.haproxies.items() if case in (None, c) for p in ps]

    def proxy_pids(self, case: str) -> list[int]:
        if case.startswith("haproxy"):
            return self.haproxy_pids(case)
        if case == "mesh" or case in EBPF_CASES:
            return self.agent_pids(self.nodes_of(case))
        return []

    def check_proxies_alive(self) -> None:
        for p in (p for ps in self.haproxies.values() for p in ps):
            if p.poll() is not None:
                logs = "".join(
                    f.read_text(errors="replace")[-2000:] for f in self.work.glob("haproxy-*.log")
                )
                raise BenchError(f"HAProxy (pid {p.pid}) exited with {p.returncode}:\n{logs}")
        gone = [ns for ns in self.sb.topology.netns_names() if not os.path.exists(netns_path(ns))]
        if gone:
            raise BenchError(
                f"the sandbox was torn down under the benchmark (netns {', '.join(gone)} "
                f"gone): something ran `nodeagent sandbox down` without holding {LOCK_FILE} "
                "(scripts/test.sh does, as its first step)"
            )
        for node in self.nodes:
            if not cgroups.procs(Path(self.sb.agent_cgroup(node))):
                raise BenchError(
                    f"the agent of {node} is gone; the end of {self.sb.agent_log(node)} tells why"
                )

    # -- set-up -----------------------------------------------------------------------------

    def tune_netns(self) -> None:
        """Wider ephemeral ports and TIME_WAIT reuse for the connection-rate test, in the
        namespaces that dial (the same for every case)."""
        names = [self.sb.pod_netns(p) for p in self.pods]
        names += [self.sb.node_netns(n) for n in self.nodes]
        for ns in names:
            _run(
                [
                    "nsenter",
                    f"--net={netns_path(ns)}",
                    "sysctl",
                    "-q",
                    "-w",
                    "net.ipv4.ip_local_port_range=1024 65535",
                    "net.ipv4.tcp_tw_reuse=1",
                ]
            )

    def pin(self, pids: Sequence[int], cpu: int) -> None:
        for pid in pids:
            p = subprocess.run(
                ["taskset", "-apc", str(cpu), str(pid)],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                text=True,
            )
            if p.returncode != 0:
                raise BenchError(f"taskset -apc {cpu} {pid} failed: {p.stderr.strip()}")

    def pin_all(self, proxies_on: int = PROXY_CPU) -> None:
        self.pin([pid for p in self.pods for pid in self.sb.pod_pids_live(p)], LOAD_CPU)
        self.pin(self.agent_pids() + self.haproxy_pids(), proxies_on)

    def start_haproxy(self, case: str) -> None:
        """Two HAProxies relaying like the mesh's two hops; where depends on ``case``."""
        server = self.sb.pod_ip(SERVER)
        if case == "haproxy":  # in the node netns, like a node-level proxy outside the pods
            n1, n2 = self.sb.node_ip("node1"), self.sb.node_ip("node2")
            hops = [
                (self.sb.node_netns("node1"), n1, HAPROXY_FRONT_PORT, n2, HAPROXY_NEXT_PORT),
                (self.sb.node_netns("node2"), n2, HAPROXY_NEXT_PORT, server, DIRECT_PORT),
            ]
        else:  # in the pods' netns, where the agents' listeners and upstream sockets are
            hops = [
                (
                    self.sb.pod_netns(CLIENT),
                    "127.0.0.1",
                    HAPROXY_POD_FRONT_PORT,
                    server,
                    HAPROXY_POD_NEXT_PORT,
                ),
                (
                    self.sb.pod_netns(SERVER),
                    server,
                    HAPROXY_POD_NEXT_PORT,
                    "127.0.0.1",
                    DIRECT_PORT,
                ),
            ]
        procs = self.haproxies.setdefault(case, [])
        for ns, bind_ip, bind_port, up_ip, up_port in hops:
            name = f"{case}-{ns}"
            cfg = self.work / f"{name}.cfg"
            first = bind_port in (HAPROXY_FRONT_PORT, HAPROXY_POD_FRONT_PORT)
            tls = self.opts.mtls
            fields = {
                "bind_ip": bind_ip,
                "bind_port": bind_port,
                "up_ip": up_ip,
                "up_port": up_port,
                "bind_tls": HAPROXY_BIND_TLS.format(dir=self.work) if tls and not first else "",
                "server_tls": HAPROXY_SERVER_TLS.format(dir=self.work) if tls and first else "",
            }
            if self.opts.l7:  # HTTP mode; the first hop routes, like the mesh's outbound
                route = HAPROXY_ROUTE if first else HAPROXY_DEFAULT
                cfg.write_text(HAPROXY_HTTP_CFG.format(route=route, **fields))
            else:
                cfg.write_text(HAPROXY_CFG.format(**fields))
            _run(["haproxy", "-c", "-q", "-f", str(cfg)])
            logfile = self.work / f"haproxy-{name}.log"
            with open(logfile, "ab") as out:
                argv = ["taskset", "-c", str(PROXY_CPU), "nsenter", f"--net={netns_path(ns)}"]
                argv += ["haproxy", "-db", "-f", str(cfg)]
                p = subprocess.Popen(
                    argv,
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            procs.append(p)
            deadline = time.monotonic() + 10
            while not tcp_open(ns, bind_ip, bind_port):
                if p.poll() is not None or time.monotonic() > deadline:
                    tail = logfile.read_text(errors="replace")
                    raise BenchError(
                        f"HAProxy in {ns} did not listen on {bind_ip}:{bind_port}:\n{tail}"
                    )
                time.sleep(0.05)

    def stop_haproxy(self) -> None:
        procs = [p for ps in self.haproxies.values() for p in ps]
        for p in procs:
            if p.poll() is None:
                p.terminate()
        for p in procs:
            try:
                p.wait(timeout=3)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(timeout=3)
        self.haproxies.clear()

    def metrics_text(self, node: str) -> str:
        """The node's agent's Prometheus exposition (``:15020/metrics`` in its netns; with
        ``--workers``, ``ctl metrics``, which asks the workers now, not 5 s ago)."""
        if self.opts.workers > 1:
            from nodeagent.admin.client import AdminClient

            with AdminClient(self.sb.agent_socket(node)) as c:
                return c.metrics()
        return _run(
            [
                "nsenter",
                f"--net={netns_path(self.sb.node_netns(node))}",
                "curl",
                "-sS",
                "-m",
                "5",
                "http://127.0.0.1:15020/metrics",
            ]
        )

    def opened(self, node: str, metrics: Sequence[str] = (TCP_OPENED,)) -> dict[str, float]:
        """The agent's counters ``metrics`` (``istio_tcp_connections_opened_total`` by
        default) of a node, per series (``name{labels}``)."""
        text = self.metrics_text(node)
        series: dict[str, float] = {}
        for line in text.splitlines():
            if line.startswith(tuple(f"{m}{{" for m in metrics)):
                labels, _, value = line.rpartition(" ")
                series[labels] = float(value)
        return series

    def span_counts(self, nodes: Sequence[str]) -> dict[str, dict[str, float]]:
        """``--otlp``: the spans each node's agent started and dropped so far."""
        out: dict[str, dict[str, float]] = {}
        for node in nodes:
            text = self.metrics_text(node)
            got = {m: 0.0 for m in SPAN_METRICS}
            for line in text.splitlines():
                name, _, value = line.partition(" ")
                if name in got:
                    got[name] = float(value)
            out[node] = {k.split("_")[2]: v for k, v in got.items()}  # started, dropped
        return out

    def check_paths(self) -> None:
        """Each case answers ``ok``; only the mesh case goes through the agents, with the
        transport asked for (``connection_security_policy``: mutual_tls or none).

        With ``--l7`` the HTTP requests the agents count (``istio_requests_total``) count as
        well: each agent must have seen the test request as one connection or one request or
        both; whether node1's agent (the one that routes) counted it as an HTTP request tells
        if the mesh took its L7 path (``mesh_l7_seen``; an L4-only mesh is reported, not
        failed).
        """
        metrics = (TCP_OPENED, REQUESTS) if self.opts.l7 else (TCP_OPENED,)
        self.check_capture_modes()
        for case in self.opts.cases:
            nodes = self.nodes_of(case) or NODES
            meshed = bool(self.nodes_of(case))
            others = [n for n in self.nodes if n not in nodes]
            before = [self.opened(n, metrics) for n in nodes]
            before_others = [self.opened(n, metrics) for n in others]
            self.set_bypass(case)
            p = self.sb.exec(
                self.client_of(case),
                ["curl", "-sS", "-m", "5", self.url(case)],
                capture_output=True,
                text=True,
                timeout=20,
            )
            if p.returncode != 0 or p.stdout != "ok\n":
                raise BenchError(
                    f"{case}: curl {self.url(case)} from the client pod failed "
                    f"(exit {p.returncode}): {p.stderr.strip() or p.stdout[:200]!r}"
                )
            after = [self.opened(n, metrics) for n in nodes]
            if [self.opened(n, metrics) for n in others] != before_others:
                raise BenchError(f"{case}: agents of {', '.join(others)} saw the test request")
            grown = [
                [k for k, v in a.items() if v > b.get(k, 0.0)]
                for a, b in zip(after, before, strict=True)
            ]
            conns, reqs = (_growth(m, before, after) for m in (TCP_OPENED, REQUESTS))
            if not self.opts.l7:
                want = [1.0 if meshed else 0.0 for _ in nodes]
                wrong = conns != want
                seen, counted, expected = f"{conns}", f"{conns} new connections", f"{want}"
            else:
                seen = counted = f"{conns} connections and {reqs} HTTP requests"
                if meshed:  # each agent: the connection, the request, or both
                    wrong = any(
                        not (c in (0.0, 1.0) and r in (0.0, 1.0) and c + r >= 1)
                        for c, r in zip(conns, reqs, strict=True)
                    )
                    expected = "at most one connection and one request, at least one of them"
                else:
                    wrong = any(conns) or any(reqs)
                    expected = "nothing"
            if wrong:
                raise BenchError(
                    f"{case}: the agents counted {counted} ({', '.join(nodes)}) for one request, "
                    f"expected {expected}: the {case} path is not what it should be"
                )
            if meshed:
                policies = {
                    m.split('connection_security_policy="', 1)[1].split('"', 1)[0]
                    for keys in grown
                    for m in keys
                    if 'connection_security_policy="' in m
                }
                if self.opts.l7:  # a source reporter may say "unknown" (Istio's, per request)
                    policies.discard("unknown")
                expected = "mutual_tls" if self.opts.mtls else "none"
                if policies != {expected}:
                    raise BenchError(
                        f"mesh: the agents report connection_security_policy {sorted(policies)} "
                        f"for the test connection, expected {expected!r} "
                        f"({'--mtls' if self.opts.mtls else 'no --mtls'})"
                    )
                self.mesh_transport = "HBONE, mutual TLS" if self.opts.mtls else "plain TCP"
                if self.opts.l7 and case == "mesh":
                    # node1's agent is the one that routes (the client's outbound side)
                    self.mesh_l7_seen = reqs[0] >= 1
                    if self.mesh_l7_seen:
                        # the rule that matched, where the agent reports it (route_name)
                        routes = {
                            m.split('route_name="', 1)[1].split('"', 1)[0]
                            for m in grown[0]
                            if m.startswith(REQUESTS + "{") and 'route_name="' in m
                        }
                        if routes and routes != {L7_RULE}:
                            raise BenchError(
                                f"mesh: node1's agent routed the test request by rule(s) "
                                f"{sorted(routes)}, expected the VirtualService rule {L7_RULE!r}"
                            )
                        how = f"rule {L7_RULE!r}" if routes else "no route_name reported"
                        self.mesh_transport += (
                            f", L7 ({REQUESTS} grew by {reqs} on node1, node2; {how})"
                        )
                    else:
                        self.mesh_transport += (
                            f", NOT L7: {REQUESTS} grew by {reqs} (node1, node2) for the test "
                            "request: node1's agent relayed it at L4"
                        )
                        self.warnings.append(
                            f"--l7: node1's agent counted no HTTP request for the test request "
                            f"({REQUESTS} grew by {reqs} on node1, node2): the mesh took its L4 "
                            "path, its figures are not L7 routing"
                        )
            log(f"path {case}: {self.url(case)} answers ok (agents saw {seen})")

    def check_capture_modes(self) -> None:
        """With an eBPF case (``--capture``): node1/node2 capture with iptables, node3/node4
        with eBPF. Otherwise node1/node2 run the agents' default (``--redirect auto``), which
        must be the same on both; ``mesh_capture`` records it for the header and the JSON."""
        from nodeagent.admin.client import AdminClient

        modes: dict[str, str] = {}  # "ebpf", or e.g. "iptables (auto: eBPF unavailable: ...)"
        for node in self.nodes:
            with AdminClient(self.sb.agent_socket(node)) as c:
                modes[node] = str(c.status().get("redirect_mode", "?"))
        if set(EBPF_CASES) & set(self.opts.cases):
            for node, mode in modes.items():
                want = "ebpf" if node in EBPF_NODES else "iptables"
                if mode != want:
                    raise BenchError(f"{node}'s agent captures with {mode!r}, expected {want!r}")
            self.mesh_capture = "iptables (Node annotation nodeagent.io/redirect: iptables)"
            return
        if modes[NODES[0]] != modes[NODES[1]]:
            raise BenchError(f"node1 and node2 capture differently: {modes}")
        self.mesh_capture = f"{modes[NODES[0]]}, the agents' default (--redirect auto)"

    # -- one test ---------------------------------------------------------------------------

    def wrk(self, case: str, *, conns: int, seconds: int, close: bool = False) -> dict[str, Any]:
        argv = ["taskset", "-c", str(LOAD_CPU), "wrk", "-t1", f"-c{conns}", f"-d{seconds}s"]
        argv += ["--latency", "--timeout", "5s", "-s", str(self.work / "report.lua")]
        if close:
            argv += ["-H", "Connection: close"]
        argv.append(self.url(case))
        p = self.sb.exec(
            self.client_of(case), argv, capture_output=True, text=True, timeout=seconds + 60
        )
        for line in p.stdout.splitlines():
            if line.startswith("WRKJSON "):
                data: dict[str, Any] = json.loads(line[len("WRKJSON ") :])
                break
        else:
            raise BenchError(
                f"wrk exited {p.returncode} without a report: {p.stderr.strip() or p.stdout}"
            )
        if p.returncode != 0:
            raise BenchError(f"wrk exited {p.returncode}: {p.stderr.strip()}")
        errors = sum(data[k] for k in ("connect", "read", "write", "status", "timeout"))
        data["errors"] = errors
        if data["requests"] == 0:
            raise BenchError(f"wrk completed no request: {p.stdout.strip()}")
        if errors:
            msg = f"{case}: wrk -c{conns}{' close' if close else ''}: {errors} errors " + str(
                {k: data[k] for k in ("connect", "read", "write", "status", "timeout") if data[k]}
            )
            if errors > ERROR_FRACTION * data["requests"]:
                raise BenchError(msg)
            self.warnings.append(msg)
        return data

    def bulk(self, case: str, seconds: int) -> dict[str, Any]:
        host, port = self.endpoint(case)
        argv = ["taskset", "-c", str(LOAD_CPU), sys.executable, str(ROOT / "bench/bulk_client.py")]
        argv += [host, str(port), BULK_PATH, str(seconds)]
        p = self.sb.exec(
            self.client_of(case), argv, capture_output=True, text=True, timeout=seconds + 120
        )
        if p.returncode != 0:
            raise BenchError(f"bulk client exited {p.returncode}: {p.stderr.strip()}")
        data: dict[str, Any] = json.loads(p.stdout.strip().splitlines()[-1])
        return data

    def wait_quiet(self, limit: float = QUIET_WAIT) -> None:
        """Wait until other work takes less than ``OTHER_LOAD_WARN`` of a CPU for a second
        (at most ``limit`` seconds)."""
        deadline = time.monotonic() + limit
        while time.monotonic() < deadline:
            a = CpuSnap.take(self.haproxy_pids(), self.watched_cgroups())
            time.sleep(1.0)
            d = CpuDelta.between(a, CpuSnap.take(self.haproxy_pids(), self.watched_cgroups()))
            if d.other_s(self.haproxy_pids()) <= OTHER_LOAD_WARN * d.wall_s:
                return

    def watched_cgroups(self) -> list[str]:
        return [self.sb.pod_cgroup(p) for p in self.pods] + [
            self.sb.agent_cgroup(n) for n in self.nodes
        ]

    def run_test(self, rnd: int, test: str, case: str) -> None:
        pids = self.proxy_pids(case)
        everyone = self.agent_pids() + self.haproxy_pids()
        span_nodes = self.nodes_of(case) if self.opts.otlp else ()
        spans_before = self.span_counts(span_nodes)
        raw: dict[str, Any] = {}
        figures: dict[str, float | None] = {}
        retried: list[float] = []
        try:
            self.set_bypass(case)
            while True:
                before = CpuSnap.take(everyone, self.watched_cgroups())
                if test == "keepalive":
                    raw = self.wrk(case, conns=KEEPALIVE_CONNS, seconds=self.opts.seconds)
                elif test == "latency1":
                    raw = self.wrk(case, conns=1, seconds=self.opts.short)
                elif test == "bulk":
                    raw = self.bulk(case, self.opts.short)
                else:
                    raw = self.wrk(case, conns=KEEPALIVE_CONNS, seconds=self.opts.short, close=True)
                cpu = CpuDelta.between(before, CpuSnap.take(everyone, self.watched_cgroups()))
                other = cpu.other_s(self.haproxy_pids()) / cpu.wall_s if cpu.wall_s else 0.0
                if (
                    other <= OTHER_LOAD_WARN
                    or len(retried) >= OTHER_LOAD_RETRIES
                    or self.retry_spent >= self.opts.retry_budget
                ):
                    break
                started = time.monotonic()
                retried.append(round(other, 3))
                top = ", ".join(f"{comm} {t:.1f}s" for _, comm, t in cpu.top[:3])
                log(
                    f"round {rnd} {test} {case}: {other:.0%} of a CPU went to other work "
                    f"({top}): once more, when the machine is quiet"
                )
                self.wait_quiet(min(QUIET_WAIT, self.opts.retry_budget - self.retry_spent))
                self.retry_spent += time.monotonic() - started + cpu.wall_s
        except (BenchError, subprocess.TimeoutExpired, ValueError, KeyError) as e:
            self.failures.append(f"round {rnd} {test} {case}: {e}")
            log(f"FAILED round {rnd} {test} {case}: {e}")
            self.runs.append({"round": rnd, "test": test, "case": case, "error": str(e)})
            self.check_proxies_alive()
            return
        mine = cpu.of(pids) if pids else None

        def per(count: float, value: Callable[[ProcDelta], float]) -> float | None:
            return _per(value(mine) * 1e6, count) if mine is not None else None

        if test in ("keepalive", "latency1", "newconn"):
            reqs = float(raw["requests"])
            rate = reqs / (raw["duration_us"] / 1e6)
            if test == "keepalive":
                figures["ka_rps"] = rate
                figures["ka_p50_ms"] = _ms(raw["p50_us"])
                figures["ka_p99_ms"] = _ms(raw["p99_us"])
                figures["ka_proxy_us"] = per(reqs, lambda d: d.cpu_s)
                figures["ka_proxy_user_us"] = per(reqs, lambda d: d.user_s)
                figures["ka_cpu1_us"] = (
                    _per(cpu.busy_s[PROXY_CPU] * 1e6, reqs) if mine is not None else None
                )
                figures["ka_switches"] = _per(mine.switches, reqs) if mine else None
            elif test == "latency1":
                figures["lat1_p50_us"] = float(raw["p50_us"])
                figures["lat1_p99_us"] = float(raw["p99_us"])
            else:
                figures["conn_rps"] = rate
                figures["conn_proxy_us"] = per(reqs, lambda d: d.cpu_s)
                figures["conn_proxy_user_us"] = per(reqs, lambda d: d.user_s)
        else:
            mb = raw["bytes"] / 1e6
            figures["bulk_mbps"] = mb / raw["seconds"]
            figures["bulk_proxy_us_per_mb"] = per(mb, lambda d: d.cpu_s)
        run = {"round": rnd, "test": test, "case": case, "figures": figures, "raw": raw}
        run["cpu"] = cpu.as_json(pids, self.haproxy_pids())
        run["suspect"] = other > OTHER_LOAD_WARN
        if retried:
            run["retried_after_other_load"] = retried
        if not pids:
            run["idle_agents_cpu_s"] = round(cpu.of(self.agent_pids()).cpu_s, 3)
        spans: dict[str, dict[str, float]] = {}
        if span_nodes:  # (retries included): what this run cost the span queue
            after = self.span_counts(span_nodes)
            spans = {n: {k: v - spans_before[n][k] for k, v in c.items()} for n, c in after.items()}
            run["spans"] = spans
        self.runs.append(run)
        if other > OTHER_LOAD_WARN:
            top = ", ".join(f"{comm} {t:.1f}s" for _, comm, t in cpu.top[:3])
            self.warnings.append(
                f"round {rnd} {test} {case}: {other:.0%} of a CPU went to other work "
                f"(busiest processes: {top}), "
                f"{'also after a retry' if retried else 'not repeated (retry budget spent)'}: "
                "suspect"
            )
        shown = ", ".join(f"{k}={_fmt(v)}" for k, v in figures.items())
        if spans:
            shown += f", spans started/dropped {sum(c['started'] for c in spans.values()):.0f}"
            shown += f"/{sum(c['dropped'] for c in spans.values()):.0f}"
        steal = max(cpu.steal.values(), default=0.0)
        log(f"round {rnd} {test:9} {case:7} {shown} (other load {other:.0%}, steal {steal:.0%})")
        self.check_proxies_alive()

    # -- the whole run ----------------------------------------------------------------------

    def prepare(self) -> None:
        self.tune_netns()
        for case in self.opts.cases:
            if case.startswith("haproxy"):
                self.start_haproxy(case)
        self.pin_all()
        self.check_paths()
        for case in self.opts.cases:
            log(f"warm-up {case} ({self.opts.warmup}s)")
            self.set_bypass(case)
            self.wrk(case, conns=KEEPALIVE_CONNS, seconds=self.opts.warmup)
        self.check_proxies_alive()

    def run(self) -> None:
        for rnd in range(1, self.opts.rounds + 1):
            for test in self.opts.tests:
                # the one-connection latency test runs with everything on one CPU
                self.pin_all(LOAD_CPU if test == "latency1" else PROXY_CPU)
                try:
                    for case in self.opts.cases:
                        self.run_test(rnd, test, case)
                finally:
                    self.pin_all(PROXY_CPU)

    def run_profile(self, outdir: Path) -> None:
        """Extra mesh runs (not in the table) with py-spy sampling both agents: where the
        agents' CPU goes, per test. Raw collapsed stacks go to ``outdir``."""
        pyspy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
        if not os.access(pyspy, os.X_OK):
            raise BenchError(
                "--profile needs py-spy: .venv/bin/pip install py-spy (not a project dependency)"
            )
        outdir.mkdir(parents=True, exist_ok=True)
        for test in ("keepalive", "newconn", "bulk"):
            spies: list[tuple[str, Path, subprocess.Popen[str]]] = []
            for node in NODES:
                pids = cgroups.procs(Path(self.sb.agent_cgroup(node)))
                if not pids:
                    raise BenchError(f"no agent process for {node}")
                raw = outdir / f"{test}-{node}.txt"
                # --native (C frames of uvloop/libuv) needs py-spy to stop the agent per
                # sample: these runs are slower than the measured ones and not in the table
                argv = ["taskset", "-c", str(LOAD_CPU), pyspy, "record", "--native"]
                argv += ["-p", str(pids[0]), "-d", str(self.opts.short + 2), "-r", "250"]
                argv += ["--format", "raw", "-o", str(raw)]
                spy = subprocess.Popen(
                    argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
                )
                spies.append((node, raw, spy))
            try:
                time.sleep(0.5)  # let py-spy attach
                if test == "bulk":
                    self.bulk("mesh", self.opts.short)
                else:
                    close = test == "newconn"
                    self.wrk("mesh", conns=KEEPALIVE_CONNS, seconds=self.opts.short, close=close)
            finally:
                for node, raw, spy in spies:
                    try:
                        _, err = spy.communicate(timeout=self.opts.short + 30)
                    except subprocess.TimeoutExpired:
                        spy.kill()
                        _, err = spy.communicate()
                    if spy.returncode != 0 or not raw.exists():
                        raise BenchError(f"py-spy on {node} failed: {err.strip()}")
                    self.profile.setdefault(test, {})[node] = hot_spots(raw)
            log(f"profiled mesh {test}: {outdir}/{test}-node*.txt")


SYSCALLS = frozenset(
    (
        *("accept", "accept4", "brk", "close", "connect", "epoll_ctl", "getpeername"),
        *("getsockname", "getsockopt", "ioctl", "read", "readv", "recv", "recvfrom"),
        *("sendmsg", "sendto", "setns", "setsockopt", "shutdown", "socket", "syscall"),
        *("write", "writev"),
    )
)
"""libc leaf frames that are (almost) only the kernel's time: a syscall wrapper."""
IDLE_LEAVES = ("epoll_wait", "epoll_pwait")


def hot_spots(raw: Path, top: int = 14) -> dict[str, Any]:
    """Where the event-loop thread spends its busy time, from py-spy's collapsed stacks.

    Keeps the stacks of the thread running the asyncio loop (other threads are gRPC and
    executor threads, idle here), drops those waiting in ``epoll_wait`` (idle), then gives
    the share of busy samples per leaf frame (``self``), per Python function including its
    callees (``inclusive``), and in syscalls.
    """
    own: dict[str, int] = {}
    incl: dict[str, int] = {}
    busy = idle = kernel = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = [f for f in stack.split(";") if f]
        if not any(f.startswith("Runner.run ") for f in frames):
            continue
        n = int(count)
        leaf = _frame_name(frames[-1])
        if leaf.startswith(IDLE_LEAVES):
            idle += n
            continue
        busy += n
        own[leaf] = own.get(leaf, 0) + n
        if leaf.split(" ", 1)[0] in SYSCALLS:
            kernel += n
        for name in {_frame_name(f) for f in frames if ".py:" in f}:
            incl[name] = incl.get(name, 0) + n

    def share(d: dict[str, int]) -> list[list[Any]]:
        items = [(k, c) for k, c in d.items() if c < 0.99 * busy]  # drop main() & co
        items.sort(key=lambda kv: -kv[1])
        return [[name, round(c / busy, 3)] for name, c in items[:top]] if busy else []

    return {
        "busy_samples": busy,
        "idle_samples": idle,
        "syscalls": round(kernel / busy, 3) if busy else None,
        "self": share(own),
        "inclusive": share(incl),
    }


def _frame_name(frame: str) -> str:
    """``func (file:line)`` → ``func (short/file.py)``; C frames keep their library."""
    if " (" not in frame:
        return frame
    func, where = frame.split(" (", 1)
    where = where.rstrip(")").rsplit(":", 1)[0]
    for marker in ("site-packages/", "/nodeagent/", "/lib/python3.11/"):
        if marker in where:
            where = where.split(marker, 1)[1]
            if marker == "/nodeagent/":
                where = "nodeagent/" + where
            break
    if func.startswith("0x"):
        func = "?"
    return f"{func} ({where})"


def _growth(
    metric: str, before: Sequence[dict[str, float]], after: Sequence[dict[str, float]]
) -> list[float]:
    """Per node: how much the series of ``metric`` grew in total."""

    def total(series: dict[str, float]) -> float:
        return sum(v for k, v in series.items() if k.startswith(metric + "{"))

    return [total(a) - total(b) for a, b in zip(after, before, strict=True)]


def _run(argv: Sequence[str], timeout: float = 30) -> str:
    p = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout)
    if p.returncode != 0:
        raise BenchError(f"{' '.join(argv)} failed (exit {p.returncode}): {p.stderr.strip()}")
    return p.stdout


# -- config -------------------------------------------------------------------------------


def write_config(work: Path, bulk_mib: int, cases: Sequence[str], l7: bool = False) -> Path:
    """The sandbox config (YAML dir), nginx's config, the bulk file and wrk's report script.

    ``l7``: the Service port is HTTP (``appProtocol: http``, name ``http-mesh``) and a
    VirtualService routes the Service's host with one ``http`` rule: one match (URI prefix
    ``L7_PREFIX``), one route to the Service itself.
    """
    work.chmod(0o755)
    bulk = work / BULK_PATH.lstrip("/")
    with open(bulk, "wb") as f:
        f.truncate(bulk_mib * 1024 * 1024)  # sparse, on tmpfs: no page cache churn

    def nginx_conf(run: Path) -> Path:
        """An nginx config serving ``work`` with its pid file and error log in ``run``."""
        conf = run / "nginx.conf"
        conf.write_text(
            NGINX_CONF.format(
                dir=work, run=run, mesh_port=MESH_PORT, direct_port=DIRECT_PORT, bulk_path=BULK_PATH
            )
        )
        return conf

    conf = nginx_conf(work)
    _run(
        ["nginx", "-t", "-q", "-e", str(work / "nginx-error.log"), "-p", str(work), "-c", str(conf)]
    )
    (work / "report.lua").write_text(WRK_LUA)
    pod_hops = "haproxy-pod" in cases
    excluded = f"{DIRECT_PORT},{HAPROXY_POD_NEXT_PORT}" if pod_hops else str(DIRECT_PORT)
    client_out = f"{DIRECT_PORT},{HAPROXY_FRONT_PORT}"
    if pod_hops:
        client_out += f",{HAPROXY_POD_NEXT_PORT}"
    docs: list[dict[str, Any]] = [
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "name": CLIENT,
                "namespace": "default",
                "labels": {"app": "bench-client"},
                "annotations": {
                    "traffic.sidecar.istio.io/excludeInboundPorts": excluded,
                    "traffic.sidecar.istio.io/excludeOutboundPorts": client_out,
                },
            },
            "spec": {
                "nodeName": "node1",
                "serviceAccountName": "bench-client",
                "containers": [{"name": "main", "command": ["sleep", "infinity"]}],
            },
        },
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "name": SERVER,
                "namespace": "default",
                "labels": {"app": "bench-server"},
                "annotations": {
                    "traffic.sidecar.istio.io/excludeInboundPorts": excluded,
                    "traffic.sidecar.istio.io/excludeOutboundPorts": excluded,
                },
            },
            "spec": {
                "nodeName": "node2",
                "serviceAccountName": "bench-server",
                "containers": [
                    {
                        "name": "nginx",
                        "command": ["taskset", "-c", str(LOAD_CPU), "nginx"],
                        "args": [
                            "-e",
                            str(work / "nginx-error.log"),
                            "-p",
                            str(work),
                            "-c",
                            str(conf),
                        ],
                        "ports": [
                            {"name": "tcp-mesh", "containerPort": MESH_PORT},
                            {"name": "tcp-direct", "containerPort": DIRECT_PORT},
                        ],
                    }
                ],
            },
        },
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": "bench-server", "namespace": "default"},
            "spec": {
                "selector": {"app": "bench-server"},
                "clusterIP": CLUSTER_IP,
                "ports": [{"name": "tcp", "port": MESH_PORT, "targetPort": MESH_PORT}],
            },
        },
    ]
    if l7:
        docs[-1]["spec"]["ports"] = [
            {
                "name": "http-mesh",
                "port": MESH_PORT,
                "targetPort": MESH_PORT,
                "appProtocol": "http",
            }
        ]
        docs.append(
            {
                "apiVersion": "networking.istio.io/v1",
                "kind": "VirtualService",
                "metadata": {"name": "bench-server", "namespace": "default"},
                "spec": {
                    "hosts": ["bench-server"],
                    "http": [
                        {
                            "name": L7_RULE,
                            "match": [{"uri": {"prefix": L7_PREFIX}}],
                            "route": [
                                {
                                    "destination": {
                                        "host": "bench-server",
                                        "port": {"number": MESH_PORT},
                                    }
                                }
                            ],
                        }
                    ],
                },
            }
        )
    if set(EBPF_CASES) & set(cases):
        ebpf_run = work / "ebpf"  # server-e's nginx: same content, its own pid file and log
        ebpf_run.mkdir()
        docs += ebpf_pair(docs, ebpf_run, nginx_conf(ebpf_run))
        # iptables vs eBPF: the mesh case's nodes capture with iptables, whatever the default
        docs += capture_nodes(NODES, "iptables")
    mesh = work / "mesh"
    mesh.mkdir()
    (mesh / "bench.yaml").write_text(yaml.safe_dump_all(docs, sort_keys=False))
    return mesh


def capture_nodes(names: Sequence[str], redirect: str) -> list[dict[str, Any]]:
    """``v1 Node`` objects that set their agents' capture mode (``nodeagent.io/redirect``)."""
    return [
        {
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {"name": n, "annotations": {"nodeagent.io/redirect": redirect}},
        }
        for n in names
    ]


def ebpf_pair(docs: list[dict[str, Any]], run: Path, conf: Path) -> list[dict[str, Any]]:
    """The eBPF cases' objects, copied from the client/server/Service(/VirtualService) of
    ``docs``: Nodes node3 and node4 annotated ``nodeagent.io/redirect: ebpf``, pods
    client-e (node3) and server-e (node4) with their own nginx files, Service
    bench-server-e on ``EBPF_CLUSTER_IP``."""
    import copy

    out = capture_nodes(EBPF_NODES, "ebpf")
    renames = {CLIENT: (CLIENT_E, "node3"), SERVER: (SERVER_E, "node4")}
    for doc in docs:
        d = copy.deepcopy(doc)
        meta = d["metadata"]
        if d["kind"] == "Pod":
            meta["name"], d["spec"]["nodeName"] = renames[meta["name"]]
            meta["labels"] = {"app": meta["labels"]["app"] + "-e"}
            for c in d["spec"]["containers"]:
                if "args" in c:  # nginx: its own pid file and error log
                    c["args"] = [
                        "-e",
                        str(run / "nginx-error.log"),
                        "-p",
                        str(run.parent),
                        "-c",
                        str(conf),
                    ]
        elif d["kind"] == "Service":
            meta["name"] = "bench-server-e"
            d["spec"]["selector"] = {"app": "bench-server-e"}
            d["spec"]["clusterIP"] = EBPF_CLUSTER_IP
        elif d["kind"] == "VirtualService":
            meta["name"] = "bench-server-e"
            d["spec"]["hosts"] = ["bench-server-e"]
            for rule in d["spec"]["http"]:
                for r in rule["route"]:
                    r["destination"]["host"] = "bench-server-e"
        out.append(d)
    return out


def write_certs(work: Path) -> None:
    """A throw-away CA and two ECDSA P-256 certificates (like the mesh's identities) for
    HAProxy's mTLS hop: ``ca.pem``, ``hop1.pem`` (client), ``hop2.pem`` (server)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.UTC)

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    def builder(
        subject: str, issuer: str, key: ec.EllipticCurvePrivateKey
    ) -> x509.CertificateBuilder:
        return (
            x509.CertificateBuilder()
            .subject_name(name(subject))
            .issuer_name(name(issuer))
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
        )

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (
        builder("bench-ca", "bench-ca", ca_key)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    (work / "ca.pem").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    for hop in ("hop1", "hop2"):
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (
            builder(hop, "bench-ca", key)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(hop)]), critical=False)
            .add_extension(
                x509.ExtendedKeyUsage(
                    [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
                ),
                critical=False,
            )
            .sign(ca_key, hashes.SHA256())
        )
        pem = cert.public_bytes(serialization.Encoding.PEM) + key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        (work / f"{hop}.pem").write_bytes(pem)


Stalled = subprocess.Popen[str]


def sandbox_up(
    config: Path, mtls: bool, otlp: str = "", workers: int = 1
) -> tuple[Sandbox, list[Stalled]]:
    """``Sandbox.up`` with mTLS on or off (older sandboxes have no mTLS at all); with
    ``otlp``, the agents export spans to ``OTLP_ENDPOINT``, and when it is ``stalled`` a
    collector that never answers listens there in each node's netns (returned, to stop)."""
    kwargs: dict[str, Any] = {}
    if "mtls" in inspect.signature(Sandbox.up).parameters:
        kwargs["mtls"] = mtls
    elif mtls:
        raise BenchError("--mtls: this nodeagent's sandbox has no mTLS (Sandbox.up(mtls=...))")
    stalled: list[Stalled] = []
    agent_args: tuple[str, ...] = ("--workers", str(workers))
    if otlp:
        agent_args += ("--otlp-endpoint", OTLP_ENDPOINT)
    kwargs["agent_args"] = agent_args
    if otlp in ("up", "stalled"):

        def collectors(sb: Sandbox) -> None:
            for node in sb.topology.nodes:
                stalled.append(start_stalled(node.netns, otlp))

        kwargs["before_agents"] = collectors
    try:
        sb = Sandbox.up(config, progress=lambda m: log(f"sandbox: {m}"), **kwargs)
    except BaseException:
        stop_stalled(stalled)
        raise
    return sb, stalled


def start_stalled(netns: str, state: str = "stalled") -> Stalled:
    """A ``stalled`` (``STALLED_COLLECTOR``) or ``up`` (``UP_COLLECTOR``) OTLP collector on
    ``OTLP_ENDPOINT`` in ``netns``."""
    script = UP_COLLECTOR if state == "up" else STALLED_COLLECTOR
    argv = ["nsenter", f"--net={netns_path(netns)}", sys.executable, "-c", script]
    p = subprocess.Popen(
        [*argv, OTLP_ENDPOINT], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    assert p.stdout is not None
    if p.stdout.readline().strip() != "listening":
        p.kill()
        _, err = p.communicate(timeout=5)
        raise BenchError(f"the {state} collector in {netns} did not start: {err.strip()}")
    log(f"{state} OTLP collector in {netns} on {OTLP_ENDPOINT} (pid {p.pid})")
    return p


def stop_stalled(procs: Sequence[Stalled]) -> None:
    for p in procs:
        if p.poll() is None:
            p.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            p.communicate(timeout=5)


def environment(opts: Options) -> dict[str, Any]:
    def first_line(argv: list[str]) -> str:
        try:
            p = subprocess.run(argv, capture_output=True, text=True, timeout=10)
        except OSError as e:
            return f"? ({e})"
        return (p.stdout + p.stderr).strip().splitlines()[0] if (p.stdout + p.stderr) else "?"

    import uvloop

    commit = first_line(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"])
    dirty = subprocess.run(
        ["git", "-C", str(ROOT), "status", "--porcelain"], capture_output=True, text=True
    ).stdout.count("\n")
    return {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "kernel": platform.release(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "uvloop": getattr(uvloop, "__version__", "?"),
        "haproxy": first_line(["haproxy", "-v"]),
        "nginx": first_line(["nginx", "-v"]),
        "wrk": first_line(["wrk", "-v"]),
        "git": f"{commit}{f' (+{dirty} changed files)' if dirty else ''}",
        "nodeagent_code": str(Path(nodeagent.__file__).parent),
        "hot_path": native.mode(),
        "seconds": opts.seconds,
        "short_seconds": opts.short,
        "rounds": opts.rounds,
        "retry_budget_s": opts.retry_budget,
        "otlp": (
            f"spans on, 100% sampled, to a {opts.otlp} collector at {OTLP_ENDPOINT}"
            if opts.otlp
            else "off"
        ),
        "bulk_file_mib": opts.bulk_mib,
        "transport": (
            f"node-to-node hop with mutual TLS (mesh: HBONE; HAProxy: TLS 1.3 {TLS_SUITE})"
            if opts.mtls
            else "node-to-node hop in plain TCP (mesh and HAProxy)"
        ),
        "mode": (
            f"L7: HTTP routing, one route match on URI prefix {L7_PREFIX!r} (mesh: HTTP "
            "Service port + VirtualService; HAProxy: mode http, acl path_beg + use_backend, "
            "http-reuse always)"
            if opts.l7
            else "L4: TCP relay (mesh: TCP Service port; HAProxy: mode tcp)"
        ),
        "workers": opts.workers,
        "layout": f"wrk/bulk client + nginx on CPU{LOAD_CPU}, proxies on CPU{PROXY_CPU}; "
        f"latency1: everything on CPU{LOAD_CPU}",
        "loadavg_start": Path("/proc/loadavg").read_text().split()[:3],
    }


# -- summary and table ----------------------------------------------------------------------


def ratio_pairs(cases: Sequence[str], vs_direct: bool = True) -> list[tuple[str, str]]:
    """(base, case) pairs whose case/base ratio is shown."""
    pairs = [("direct", c) for c in cases if c != "direct"] if vs_direct else []
    if "direct" not in cases:
        pairs = []
    pairs += [(b, "mesh") for b in ("haproxy", "haproxy-pod") if b in cases and "mesh" in cases]
    for base, case in (("mesh", "ebpf"), ("ebpf", "ebpf-bypass"), ("local", "local-bypass")):
        if base in cases and case in cases:
            pairs.append((base, case))
    return pairs


def _stats(xs: list[float], suspect: bool) -> dict[str, Any]:
    return {
        "median": statistics.median(xs) if xs else None,
        "min": min(xs) if xs else None,
        "max": max(xs) if xs else None,
        "from_suspect_runs": suspect,
    }


def summarize(
    runs: list[dict[str, Any]], rounds: int, cases: Sequence[str], l7: bool = False
) -> dict[str, Any]:
    """Per figure: values per case and round, median/min/max, per-round ratios.

    Runs flagged suspect (other work on the machine) are left out when a clean run of the
    same case exists (for ratios: a clean pair in the same round); otherwise they are used
    and the result says ``from_suspect_runs``.
    """
    per: dict[str, dict[str, list[tuple[float, bool] | None]]] = {
        f.key: {c: [None] * rounds for c in cases} for f in FIGURES
    }
    for run in runs:
        for key, v in run.get("figures", {}).items():
            if v is not None:
                per[key][run["case"]][run["round"] - 1] = (v, bool(run.get("suspect")))
    out: dict[str, Any] = {}
    for fig in FIGURES:
        vals = per[fig.key]
        entry: dict[str, Any] = {
            "label": figure_label(fig, l7).strip(),
            "higher_is_better": fig.higher_is_better,
        }
        for case in cases:
            got = [x for x in vals[case] if x is not None]
            clean = [v for v, sus in got if not sus]
            entry[case] = {
                "values": [x[0] if x else None for x in vals[case]],
                "suspect": [x[1] if x else None for x in vals[case]],
                **_stats(clean or [v for v, _ in got], not clean and bool(got)),
            }
        ratios: dict[str, Any] = {}
        for base, case in ratio_pairs(cases, fig.vs_direct):
            pairs = [
                (b[0] / a[0], a[1] or b[1])
                for a, b in zip(vals[base], vals[case], strict=True)
                if a is not None and b is not None and a[0] > 0
            ]
            clean = [r for r, sus in pairs if not sus]
            ratios[f"{case}/{base}"] = {
                "per_round": [r for r, _ in pairs],
                **_stats(clean or [r for r, _ in pairs], not clean and bool(pairs)),
                "rounds_used": len(clean or pairs),
            }
        entry["ratios"] = ratios
        out[fig.key] = entry
    return out


def _fmt(v: float | None) -> str:
    if v is None:
        return "—"
    a = abs(v)
    if a >= 100_000:
        return f"{v / 1000:.0f}k"
    if a >= 10_000:
        return f"{v / 1000:.1f}k"
    if a >= 100:
        return f"{v:.0f}"
    if a >= 10:
        return f"{v:.1f}"
    return f"{v:.2f}"


def _abs_cell(e: dict[str, Any]) -> str:
    med, lo, hi = e["median"], e["min"], e["max"]
    mark = "*" if e["from_suspect_runs"] else ""
    if med is None:
        return "—"
    if lo is None or hi is None or lo == hi or med == 0:
        return _fmt(med) + mark
    return f"{_fmt(med)} ±{(hi - lo) / 2 / abs(med):.0%}{mark}"


def _ratio_cell(r: dict[str, Any] | None) -> str:
    if r is None or r["median"] is None:
        return "—"
    mark = "*" if r["from_suspect_runs"] else ""
    if r["min"] != r["max"]:
        return f"{r['min']:.2f}-{r['max']:.2f}{mark}"
    return f"{r['median']:.2f}{mark}"


def table(
    summary: dict[str, Any],
    env: dict[str, Any],
    runs: list[dict[str, Any]],
    cases: Sequence[str],
    l7: bool = False,
    mesh_path: str | None = None,
    mesh_capture: str | None = None,
) -> str:
    """``l7``: figures labelled L7, the mode and the mesh path checked in the header, and
    issue 4's two targets instead of the L4 one. ``mesh_capture``: how the ``mesh`` case's
    agents capture, in the header."""
    width = 31 if l7 else 28
    cols = [("figure", width), *((c, 15) for c in cases)]
    ratio_cols = [(f"{c}/{b}", max(13, len(f"{c}/{b}") + 2)) for b, c in ratio_pairs(cases)]
    lines = [
        f"nodeagent bench — {env['date']}, git {env['git']}, kernel {env['kernel']}",
        f"{env['rounds']} round(s), keep-alive {env['seconds']}s, other tests "
        f"{env['short_seconds']}s; {env['layout']}",
        f"{env.get('transport', '')}",
        *([env.get("mode", "")] if l7 else []),
        *([f"mesh path checked: {mesh_path}"] if l7 and mesh_path else []),
        *([f"mesh capture: {mesh_capture}"] if mesh_capture else []),
        *([f"mesh hot path: {env['hot_path']}"] if "hot_path" in env else []),
        "absolute: median ±half-range across rounds; ratios: per round (min-max), "
        "case / base; ↑ higher is better, ↓ lower is better",
        "",
        "".join(f"{name:<{w}}" for name, w in cols)
        + "".join(f"{name:>{w}}" for name, w in ratio_cols),
    ]
    lines.append("-" * (sum(w for _, w in cols) + sum(w for _, w in ratio_cols)))
    for fig in FIGURES:
        e = summary[fig.key]
        arrow = "↑" if fig.higher_is_better else "↓"
        row = f"{figure_label(fig, l7) + ' ' + arrow:<{width}}"
        row += "".join(f"{_abs_cell(e[c]):<15}" for c in cases)
        for name, w in ratio_cols:
            row += f"{_ratio_cell(e['ratios'].get(name)):>{w}}"
        lines.append(row)
    loads = [
        r["cpu"]["other_cpu_s"] / r["cpu"]["wall_s"] for r in runs if r.get("cpu", {}).get("wall_s")
    ]
    steals = [max(r["cpu"]["steal"].values()) for r in runs if r.get("cpu", {}).get("steal")]
    if loads:
        lines.append(
            f"other work on the machine during the runs: median {statistics.median(loads):.0%}, "
            f"max {max(loads):.0%} of a CPU; steal max {max(steals, default=0.0):.0%}"
        )
    suspect = sum(1 for r in runs if r.get("suspect"))
    if suspect:
        lines.append(
            f"{suspect} run(s) had other work above {OTHER_LOAD_WARN:.0%} of a CPU (after a retry "
            "while the budget lasted): left out where a clean run exists; * = only from such runs"
        )
    if "ebpf" in cases:
        lines += capture_targets(summary)
    bases = target_bases(cases)
    if not bases or "mesh" not in cases:
        return "\n".join(lines)
    if l7:
        return "\n".join(lines + l7_targets(summary, mesh_path, bases))
    shown = f"; {', '.join(bases[1:])} shown" if bases[1:] else ""
    lines += [
        "",
        f"target (issue 2): mesh >= {TARGET:.1f} x HAProxy on keep-alive req/s and bulk MB/s "
        f"(median of rounds; base {bases[0]}{shown})",
    ]
    for key in (*TARGET_FIGURES, *WATCHED_FIGURES):
        cells = []
        for i, base in enumerate(bases):
            r = summary[key]["ratios"][f"mesh/{base}"]["median"]
            if r is None:
                cells.append(f"mesh/{base} —")
                continue
            verdict = "met" if r >= TARGET else f"needs x{TARGET / r:.2f}" if r > 0 else "none"
            first = i == 0 and key in TARGET_FIGURES
            cells.append(f"mesh/{base} {r:5.2f} {verdict}" + (" (target)" if first else ""))
        label = summary[key]["label"] + ("" if key in TARGET_FIGURES else " [not a target]")
        lines.append(f"  {label:<41} " + "   ".join(cells))
    return "\n".join(lines)


def capture_targets(summary: dict[str, Any]) -> list[str]:
    """Issue 6's targets (``CAPTURE_TARGETS``), PASS or FAIL on the median of rounds."""
    lines = ["", "capture targets (issue 6; case/base, median of rounds):"]
    for ratio, key, bound in CAPTURE_TARGETS:
        r = summary[key]["ratios"].get(ratio)
        label = f"{ratio} {summary[key]['label']}"
        if not r or r.get("median") is None:
            lines.append(f"  {label:<44} {'—':>5}  want >= {bound:.1f}  no result")
            continue
        value = r["median"]
        mark = " (* only from suspect runs)" if r.get("from_suspect_runs") else ""
        verdict = "PASS" if value >= bound else "FAIL"
        lines.append(f"  {label:<44} {value:5.2f}  want >= {bound:.1f}  {verdict}{mark}")
    return lines


def l7_targets(summary: dict[str, Any], mesh_path: str | None, bases: Sequence[str]) -> list[str]:
    """Issue 4's targets on mesh/<base> (median of the per-round ratios), PASS or FAIL for
    the first base, the others shown beside it."""
    lines = [
        "",
        f"L7 targets (issue 4; mesh/{bases[0]}, median of rounds; HTTP routing, mTLS between "
        "nodes):",
    ]
    for key, label, at_least, bound in L7_TARGETS:
        want = f"{'>=' if at_least else '<='} {bound:.1f}"
        cells = []
        for i, base in enumerate(bases):
            r = summary[key]["ratios"].get(f"mesh/{base}") or {}
            value = r.get("median")
            if value is None:
                cells.append("—  no result" if i == 0 else f"(mesh/{base} —)")
                continue
            ok = value >= bound if at_least else value <= bound
            mark = " (* only from suspect runs)" if r.get("from_suspect_runs") else ""
            if i == 0:
                cells.append(f"{value:5.2f}  want {want}  {'PASS' if ok else 'FAIL'}{mark}")
            else:
                cells.append(f"(mesh/{base} {value:.2f})")
        lines.append(f"  {label:<29} " + "  ".join(cells))
    if mesh_path is not None and "NOT L7" in mesh_path:
        lines += [
            "  the mesh did not take an L7 path (see 'mesh path checked'): these ratios",
            "  compare its L4 relay with HAProxy's HTTP mode, not L7 routing with L7 routing",
        ]
    return lines


def profile_table(profile: dict[str, Any]) -> str:
    lines = [
        "",
        "where the agents' event loops spend their busy time (py-spy --native, mesh runs):",
    ]
    for test, nodes in profile.items():
        for node, spots in nodes.items():
            total = spots["busy_samples"] + spots["idle_samples"]
            lines.append(
                f"  {test} / {node}: busy {spots['busy_samples']}/{total} samples, "
                f"{spots['syscalls']:.0%} of busy in syscalls"
            )
            lines.append(
                "    self:      " + ", ".join(f"{n} {sh:.0%}" for n, sh in spots["self"][:6])
            )
            lines.append(
                "    inclusive: " + ", ".join(f"{n} {sh:.0%}" for n, sh in spots["inclusive"][:6])
            )
    return "\n".join(lines)


# -- main -----------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> Options:
    ap = argparse.ArgumentParser(
        prog="bench/run.py",
        description="direct vs HAProxy vs nodeagent mesh on one sandbox (needs root)",
    )
    ap.add_argument("--seconds", type=int, default=10, help="keep-alive test length (default 10)")
    ap.add_argument("--rounds", type=int, default=2, help="interleaved rounds (default 2)")
    ap.add_argument(
        "--out", type=Path, default=ROOT / "bench/results/latest.json", help="JSON results file"
    )
    ap.add_argument("--quick", action="store_true", help="smoke test: 3 s, 1 round")
    ap.add_argument("--bulk-mib", type=int, default=128, help="size of the bulk file (MiB)")
    ap.add_argument(
        "--retry-budget",
        type=float,
        default=90.0,
        help="seconds the whole run may spend waiting for a quiet machine and repeating runs "
        "disturbed by other users (default 90; 0: never repeat, only flag)",
    )
    ap.add_argument(
        "--mtls",
        action="store_true",
        help="mesh with mutual TLS between nodes (HBONE), and HAProxy's middle hop with "
        f"mutual TLS 1.3 ({TLS_SUITE}, ECDSA P-256); default: both plain TCP",
    )
    ap.add_argument(
        "--l7",
        action="store_true",
        help="HTTP routing (implies --mtls): the mesh's Service port is HTTP with a "
        "VirtualService route match, both HAProxies run in mode http with an acl/use_backend "
        "route match; the summary checks issue 4's targets (mesh/haproxy-pod keep-alive "
        "req/s >= 0.6, p99 at c50 <= 2.0)",
    )
    ap.add_argument(
        "--cases",
        default=",".join(CASES),
        help=f"comma-separated, in run order, from {', '.join(ALL_CASES)} "
        f"(default {','.join(CASES)})",
    )
    ap.add_argument(
        "--tests",
        default=",".join(TESTS),
        help=f"comma-separated subset of {', '.join(TESTS)} (default: all), e.g. newconn "
        "alone to compare the CPU per new connection of two versions quickly",
    )
    ap.add_argument(
        "--capture",
        action="store_true",
        help="issue 6: iptables vs eBPF capture and the sockmap bypass (cases "
        f"{','.join(CAPTURE_CASES)}; with --cases, add the ones you want); the summary "
        "checks ebpf/mesh >= 1.0 on every throughput figure and ebpf-bypass/ebpf >= 1.3 "
        "in bulk",
    )
    ap.add_argument(
        "--otlp",
        choices=("up", "down", "stalled"),
        default="",
        help="issue 19: the agents export spans (100%% sampled) to a collector that is up "
        "(answers every export), down (nothing listens) or stalled (accepts, never reads); "
        "each mesh run records the "
        "spans started and dropped",
    )
    ap.add_argument(
        "--workers",
        type=int,
        default=1,
        help="each agent serves with this many processes (nodeagent run --workers N; "
        "all on the proxies' CPU: the CPU per request is comparable, not the aggregate)",
    )
    ap.add_argument(
        "--profile",
        action="store_true",
        help="after the rounds, profile both agents with py-spy during extra mesh runs "
        "(needs `.venv/bin/pip install py-spy`); stacks go next to --out",
    )
    a = ap.parse_args(argv)
    seconds, rounds = (3, 1) if a.quick else (a.seconds, a.rounds)
    if seconds < 1 or rounds < 1 or a.bulk_mib < 1:
        ap.error("--seconds, --rounds and --bulk-mib must be at least 1")
    cases = tuple(c.strip() for c in a.cases.split(",") if c.strip())
    if a.capture and a.cases == ",".join(CASES):
        cases = CAPTURE_CASES
    unknown = [c for c in cases if c not in ALL_CASES]
    if unknown or not cases or len(set(cases)) != len(cases):
        ap.error(f"--cases: pick each of {', '.join(ALL_CASES)} at most once (got {a.cases!r})")
    tests = tuple(t for t in TESTS if t in {x.strip() for x in a.tests.split(",")})
    wrong = [t for t in a.tests.split(",") if t.strip() and t.strip() not in TESTS]
    if wrong or not tests:
        ap.error(f"--tests: pick from {', '.join(TESTS)} (got {a.tests!r})")
    return Options(
        tests=tests,
        seconds=seconds,
        rounds=rounds,
        short=max(2, round(seconds / 2)),
        warmup=1 if a.quick else 2,
        bulk_mib=a.bulk_mib,
        out=a.out,
        profile=a.profile,
        cases=cases,
        mtls=a.mtls or a.l7,
        l7=a.l7,
        retry_budget=max(0.0, a.retry_budget),
        otlp=a.otlp,
        workers=a.workers,
    )


def preflight() -> None:
    if os.geteuid() != 0:
        raise BenchError("needs root (the sandbox makes netns, cgroups, iptables rules)")
    missing = [t for t in REQUIRED_TOOLS if shutil.which(t) is None]
    if missing:
        raise BenchError(f"missing tools: {', '.join(missing)} (scripts/setup.sh installs them)")
    if (os.cpu_count() or 1) < 2:
        raise BenchError("needs 2 CPUs (load on CPU0, proxies on CPU1)")


def _guarded(fn: Callable[[], T]) -> T:
    """Run a cleanup step that must not be interrupted, and must not hide the first error."""
    with shielded():
        return fn()


def main(argv: Sequence[str] | None = None) -> int:
    opts = parse_args(argv)
    global _MAIN_PID
    _MAIN_PID = os.getpid()
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _interrupt)
    env: dict[str, Any] = {}
    bench: Bench | None = None
    error: str | None = None
    started = time.monotonic()
    try:
        preflight()
        env = environment(opts)
        with e2e_lock():
            work = Path(tempfile.mkdtemp(prefix="nodeagent-bench-", dir="/dev/shm"))
            try:
                config = write_config(work, opts.bulk_mib, opts.cases, opts.l7)
                if opts.otlp:
                    (config / "telemetry.yaml").write_text(SAMPLE_ALL)
                log(f"bringing the sandbox up from {config}")
                if opts.mtls:
                    write_certs(work)
                sb, stalled = sandbox_up(config, opts.mtls, opts.otlp, opts.workers)
                try:
                    bench = Bench(sb, work, opts)
                    try:
                        bench.prepare()
                        bench.run()
                        if opts.otlp:
                            bench.spans = bench.span_counts(bench.nodes)
                        if opts.profile:
                            bench.run_profile(
                                opts.out.with_suffix("").with_name(opts.out.stem + "-profile")
                            )
                    finally:
                        _guarded(bench.stop_haproxy)
                except BaseException:
                    with contextlib.suppress(Exception):
                        sb.dump_logs(sys.stderr, lines=15)
                    raise
                finally:
                    log("bringing the sandbox down")
                    _guarded(sb.down)
                    _guarded(lambda: stop_stalled(stalled))
            finally:
                _guarded(lambda: shutil.rmtree(work, ignore_errors=True))
    except KeyboardInterrupt as e:
        error = f"interrupted ({str(e) or 'Ctrl-C'})"
    except (BenchError, NodeAgentError, OSError, subprocess.SubprocessError) as e:
        error = str(e)
    runs = bench.runs if bench else []
    failures = (bench.failures if bench else []) + ([error] if error else [])
    rounds_done = max((r["round"] for r in runs), default=0)
    summary = summarize(runs, max(rounds_done, 1), opts.cases, opts.l7) if runs else {}
    warnings = bench.warnings if bench else []
    result: dict[str, Any] = {
        "environment": env,
        "elapsed_s": round(time.monotonic() - started, 1),
        "cases": list(opts.cases),
        "mesh_transport_checked": bench.mesh_transport if bench else None,
        "mesh_capture": bench.mesh_capture if bench else None,
        "l7": opts.l7,
        "mesh_l7_seen": bench.mesh_l7_seen if bench else None,
        "summary": summary,
        "runs": runs,
        "warnings": warnings,
        "profile": bench.profile if bench else {},
        "otlp": {
            "collector": opts.otlp or None,
            "endpoint": OTLP_ENDPOINT if opts.otlp else None,
            "spans_at_end": bench.spans if bench else {},
        },
        "failures": failures,
    }
    opts.out.parent.mkdir(parents=True, exist_ok=True)
    opts.out.write_text(json.dumps(result, indent=2) + "\n")
    if summary:
        mesh_path = bench.mesh_transport if bench and "mesh" in opts.cases else None
        capture = bench.mesh_capture if bench and "mesh" in opts.cases else None
        print(
            table(
                summary,
                {**env, "rounds": rounds_done},
                runs,
                opts.cases,
                opts.l7,
                mesh_path,
                capture,
            )
        )
    if bench and bench.profile:
        print(profile_table(bench.profile))
    if opts.otlp and bench and bench.spans:
        per = ", ".join(
            f"{n} {c['started']:.0f}/{c['dropped']:.0f}" for n, c in bench.spans.items()
        )
        print(f"\nspans to a {opts.otlp} collector, started/dropped per agent: {per}")
    for w in warnings:
        print(f"warning: {w}")
    print(f"\nresults: {opts.out} ({result['elapsed_s']:.0f}s)")
    if failures:
        for f in failures:
            print(f"FAILED: {f}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
