"""RSS of each idle node agent with bookinfo's pods, in eBPF and in iptables capture.

Brings ``examples/bookinfo`` up in the sandbox once per capture mode (agents with
``--redirect ebpf``, then ``--redirect iptables``), lets the agents settle, and reads each
agent's ``/proc/PID/smaps``: the RSS (what ``nodeagent ctl status`` shows) and what holds it
(the Python heap and anonymous memory, the interpreter, each native library: grpc,
cryptography, OpenSSL, uvloop, libbpf, LLVM/clang when bcc is mapped). ``--out FILE`` keeps
the figures as JSON; ``--before FILE`` prints an earlier run's beside them (e.g. one of
another checkout: ``PYTHONPATH=<checkout> ... --out before.json``).

Needs root; takes ``/run/nodeagent/e2e.lock`` like ``run.py`` (the sandbox is one per
machine). RSS is not timing-sensitive: a loaded machine changes it little.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

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


def measure(mode: str, settle: float) -> dict[str, Any]:
    """Bring bookinfo up with ``--redirect mode``, wait ``settle`` s, read every agent."""
    with Sandbox.up(BOOKINFO, agent_args=[f"--redirect={mode}"]) as sb:
        time.sleep(settle)
        agents: dict[str, dict[str, int]] = {}
        for node, pid in sorted(sb.agent_pids.items()):
            agents[node] = smaps(pid)
        return {"mode": mode, "agents": agents}


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
    p.add_argument("--out", help="write the figures as JSON to this file")
    p.add_argument("--before", help="a JSON file of an earlier run to print beside")
    args = p.parse_args(argv)
    if os.geteuid() != 0:
        print("rss_idle.py: needs root (the sandbox)", file=sys.stderr)
        return 1
    runs = []
    with e2e_lock():
        for mode in args.modes.split(","):
            runs.append(measure(mode, args.settle))
    before = json.loads(Path(args.before).read_text()) if args.before else None
    print(report(runs, before))
    if args.out:
        Path(args.out).write_text(json.dumps(runs, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
