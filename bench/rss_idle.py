"""RSS of each idle node agent with bookinfo's pods, in eBPF and in iptables capture.

Brings ``examples/bookinfo`` up in the sandbox once per capture mode (agents with
``--redirect ebpf``, then ``--redirect iptables``), lets the agents settle, and reads each
agent's ``/proc/PID/smaps``: the RSS (what ``nodeagent ctl status`` shows) and what holds it
(the Python heap and anonymous memory, the interpreter, each native library: grpc,
cryptography, OpenSSL, uvloop, libbpf, LLVM/clang when bcc is mapped). ``--out FILE`` keeps
the figures as JSON; ``--before FILE`` prints an earlier run's beside them (e.g. one of
another checkout: ``PYTHONPATH=<checkout> ... --out before.json``).

``--source kubernetes`` measures agents as a DaemonSet runs them: they follow a Kubernetes
API server (``run --source kubernetes``; the test API server of ``tests/kubeapi.py`` on the
sandbox's fabric, holding bookinfo's Services and its pods as running on their nodes), so
they hold the Kubernetes client and the watches' state as well.

Needs root; takes ``/run/nodeagent/e2e.lock`` like ``run.py`` (the sandbox is one per
machine). RSS is not timing-sensitive: a loaded machine changes it little.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))

from run import e2e_lock

from nodeagent.sandbox import Sandbox

ROOT = Path(__file__).resolve().parents[1]
BOOKINFO = ROOT / "examples" / "bookinfo"
MODES = ("ebpf", "iptables")
MIB = 1024 * 1024

GROUPS: tuple[tuple[str, str], ...] = (
    ("LLVM/clang (bcc)", r"libLLVM|libclang|libbcc"),
    ("grpc", r"cygrpc|grpc"),
    ("cryptography", r"cryptography|_rust\.abi3"),
    ("OpenSSL", r"libssl|libcrypto|_ssl\.|_hashlib"),
    ("uvloop", r"uvloop"),
    ("libbpf", r"libbpf"),
    ("python", r"/python3|libpython"),
)
"""What a mapping's path names, first match wins; the rest is ``other .so`` or anonymous."""


def smaps(pid: int) -> dict[str, int]:
    """RSS in bytes by what holds it (``GROUPS``, ``heap+anon``, ``other .so``, ``total``)."""
    out: dict[str, int] = defaultdict(int)
    name = ""
    with open(f"/proc/{pid}/smaps") as f:
        for line in f:
            first = line.split(None, 1)[0]
            if not first.endswith(":"):  # a mapping's header line
                parts = line.split()
                name = parts[5] if len(parts) > 5 else ""
                continue
            if first == "Rss:":
                kb = int(line.split()[1]) * 1024
                out["total"] += kb
                out[_group(name)] += kb
    return dict(out)


def _group(path: str) -> str:
    if not path or (path.startswith("[") and path != "[vdso]"):
        return "heap+anon"
    for label, pattern in GROUPS:
        if re.search(pattern, path):
            return label
    return "other .so" if ".so" in path else "other files"


def measure(mode: str, settle: float, source: str = "files") -> dict[str, Any]:
    """Bring bookinfo up with ``--redirect mode`` (agents on the config directory, or on
    an API server holding the same objects), wait ``settle`` s, read every agent."""
    with _api_server(source) as (kubeconfig, before_agents):
        sb = Sandbox.up(
            BOOKINFO,
            agent_args=[f"--redirect={mode}"],
            kubeconfig=kubeconfig,
            before_agents=before_agents,
        )
        with sb:
            time.sleep(settle)
            agents: dict[str, dict[str, int]] = {}
            for node, pid in sorted(sb.agent_pids.items()):
                agents[node] = smaps(pid)
    label = mode if source == "files" else f"{mode}+api"
    return {"mode": label, "agents": agents}


@contextmanager
def _api_server(
    source: str,
) -> Iterator[tuple[Path | None, Callable[[Sandbox], None] | None]]:
    """``(kubeconfig, before_agents)`` for ``Sandbox.up``: none for ``files``; for
    ``kubernetes`` the test API server on the fabric, filled with bookinfo's objects."""
    if source == "files":
        yield None, None
        return
    tests = ROOT / "tests"
    sys.path[:0] = [str(tests), str(tests / "e2e")]
    from kubeapi import running_pod  # the test API server lives with the tests
    from kubeobjects import namespace
    from kuberig import fabric_api_server, start_on_fabric

    docs = [
        d for f in sorted(BOOKINFO.glob("*.yaml")) for d in yaml.safe_load_all(f.read_text()) if d
    ]
    pods = [d for d in docs if d["kind"] == "Pod"]
    api = fabric_api_server(endpointslices=True)
    with tempfile.TemporaryDirectory(prefix="rss-idle-") as tmp:
        kubeconfig = Path(tmp) / "kubeconfig"

        def before_agents(sb: Sandbox) -> None:
            api.create(namespace("default"))
            for name in sorted({p["spec"]["nodeName"] for p in pods}):
                api.create({"apiVersion": "v1", "kind": "Node", "metadata": {"name": name}})
            for d in docs:
                if d["kind"] != "Pod":
                    api.create(d)
            for p in pods:  # as running: the IP the sandbox gave the pod
                meta, spec = p["metadata"], p["spec"]
                ports = [q for c in spec["containers"] for q in c.get("ports", [])]
                api.create(
                    running_pod(
                        meta["name"],
                        ip=sb.pod_ip(meta["name"]),
                        node=spec["nodeName"],
                        namespace=meta.get("namespace", "default"),
                        labels=meta.get("labels", {}),
                        service_account=spec.get("serviceAccountName", "default"),
                        ports=ports,
                    )
                )
            start_on_fabric(sb, api, kubeconfig)

        try:
            yield kubeconfig, before_agents
        finally:
            api.close()


def report(runs: list[dict[str, Any]], before: list[dict[str, Any]] | None) -> str:
    was = {r["mode"]: r for r in before or []}
    lines = ["RSS idle per agent (bookinfo, MiB)"]
    for run in runs:
        for node, a in sorted(run["agents"].items()):
            prev = was.get(run["mode"], {}).get("agents", {}).get(node)
            then = f"  (was {prev['total'] / MIB:.1f})" if prev else ""
            lines.append(f"  {run['mode']:<9} {node}: {a['total'] / MIB:6.1f}{then}")
            parts = sorted(((k, v) for k, v in a.items() if k != "total"), key=lambda kv: -kv[1])
            lines.append("      " + ", ".join(f"{k} {v / MIB:.1f}" for k, v in parts if v))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--modes", default=",".join(MODES), help="capture modes, comma-separated")
    p.add_argument("--settle", type=float, default=10.0, help="seconds idle before reading")
    p.add_argument(
        "--source",
        choices=("files", "kubernetes"),
        default="files",
        help="what the agents follow: the config directory, or a Kubernetes API server",
    )
    p.add_argument("--out", help="write the figures as JSON to this file")
    p.add_argument("--before", help="a JSON file of an earlier run to print beside")
    args = p.parse_args(argv)
    if os.geteuid() != 0:
        print("rss_idle.py: needs root (the sandbox)", file=sys.stderr)
        return 1
    runs = []
    with e2e_lock():
        for mode in args.modes.split(","):
            runs.append(measure(mode, args.settle, args.source))
    before = json.loads(Path(args.before).read_text()) if args.before else None
    print(report(runs, before))
    if args.out:
        Path(args.out).write_text(json.dumps(runs, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
