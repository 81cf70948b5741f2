"""Helpers of the policy end-to-end tests: apply a config file and wait until both agents
serve it, and make requests from a pod with curl."""

from __future__ import annotations

import json
import subprocess
import textwrap
import time
from pathlib import Path

from nodeagent.admin.client import AdminClient
from nodeagent.redirect.ebpf import PROG_NAMES
from nodeagent.sandbox import Sandbox

NODES = ("node1", "node2")


def config_versions(sb: Sandbox, nodes: tuple[str, ...] = NODES) -> dict[str, int]:
    """The config version each agent serves (and that none kept a load error)."""
    out = {}
    for n in nodes:
        with AdminClient(sb.agent_socket(n)) as c:
            st = c.status()["config"]
        assert not st["last_error"], st["last_error"]
        out[n] = int(st["version"])
    return out


def apply_file(
    sb: Sandbox, path: Path, text: str | None, nodes: tuple[str, ...] = NODES
) -> None:
    """Write (``text``) or remove (None) a config file; return once the agents of
    ``nodes`` serve it."""
    before = config_versions(sb, nodes)
    if text is None:
        path.unlink()
    else:
        path.write_text(textwrap.dedent(text))
    wait_loaded(sb, before)


def wait_loaded(sb: Sandbox, before: dict[str, int]) -> None:
    """Wait until the agents of ``before`` serve a config newer than it (5 s at most)."""
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        if all(v > before[n] for n, v in config_versions(sb, tuple(before)).items()):
            return
        time.sleep(0.1)
    raise AssertionError("config change not loaded by both agents within 5 s")


def http_status(sb: Sandbox, pod: str, url: str) -> tuple[int, str]:
    """(status, body) of a GET from ``pod``."""
    p = sb.exec(pod, ["curl", "-s", "-m", "10", "-o", "-", "-w", "\n%{http_code}", url],
                capture_output=True, text=True, timeout=30)
    body, _, code = p.stdout.rpartition("\n")
    return int(code or 0), body


def http_request(
    sb: Sandbox, pod: str, url: str, *, method: str = "GET", headers: dict[str, str] | None = None
) -> tuple[int, str, dict[str, str]]:
    """(status, body, response headers) of one curl request from ``pod``."""
    args = ["curl", "-s", "-m", "10", "-X", method, "-D", "/dev/stderr", "-o", "-", url]
    for k, v in (headers or {}).items():
        args += ["-H", f"{k}: {v}"]
    p = sb.exec(pod, args, capture_output=True, text=True, timeout=30)
    lines = [ln.strip() for ln in p.stderr.splitlines() if ln.strip()]
    status = int(lines[0].split()[1]) if lines and lines[0].startswith("HTTP/") else 0
    hdrs = {}
    for ln in lines[1:]:
        k, _, v = ln.partition(":")
        hdrs[k.strip().lower()] = v.strip()
    return status, p.stdout, hdrs


def served(sb: Sandbox, pod: str) -> int:
    """The app's own count of HTTP requests it answered (asked from inside its pod)."""
    p = sb.exec(pod, ["curl", "-s", "-m", "5", "http://127.0.0.1:8080/count"],
                capture_output=True, text=True, timeout=20)
    return int(json.loads(p.stdout)["served"])


def bpf_programs() -> list[str]:
    """Names of our BPF programs loaded in the kernel, as ``bpftool`` prints them."""
    p = subprocess.run(["bpftool", "-j", "prog", "show"], capture_output=True, text=True,
                       check=True, timeout=30)
    return [x.get("name", "") for x in json.loads(p.stdout or "[]")
            if x.get("name") in PROG_NAMES]
