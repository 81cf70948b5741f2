"""The sandbox's mesh CA: one process for the whole mesh (its key never reaches an agent),
in its own cgroup under our subtree, serving on a UNIX socket.

Owns the CA's directory, socket, log and cgroup, the random credential per node that the
CA maps back to the node's name, starting and stopping the CA, and the flags an agent needs
to reach it. Which nodes exist is ``topology``'s; when the CA runs is ``manager``'s.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

from nodeagent.errors import LocalStateError
from nodeagent.sandbox import cgroups, processes
from nodeagent.sandbox.state import Progress, write_json
from nodeagent.sandbox.topology import STATE_DIR, NodePlan, log_dir

CA_DIR = f"{STATE_DIR}/ca"
CA_SOCKET = f"{STATE_DIR}/ca.sock"
CA_TOKENS = f"{STATE_DIR}/ca-tokens.json"
CA_LOG_NAME = "ca.log"
CA_CGROUP = "ca"
"""The mesh CA's cgroup, under our subtree (so teardown kills it like everything else)."""
START_TIMEOUT = 15.0
"""Seconds the CA gets to open its socket."""


def token_file(node: str) -> str:
    """Where node ``node``'s credential for the CA is written (read by its agent)."""
    return f"{STATE_DIR}/ca-token-{node}"


def log_path() -> str:
    return f"{log_dir()}/{CA_LOG_NAME}"


def start(
    nodes: Sequence[NodePlan], cgroup_root: Path, config_dir: str, progress: Progress
) -> subprocess.Popen[bytes]:
    """Write a fresh credential per node, make the CA's key on first use and start the
    CA (``wait_started`` waits for it)."""
    progress(f"mesh CA: {CA_DIR}, serving on unix:{CA_SOCKET}")
    tokens = {n.name: secrets.token_urlsafe(32) for n in nodes}
    write_json(CA_TOKENS, tokens)
    os.chmod(CA_TOKENS, 0o600)
    for name, token in tokens.items():
        fd = os.open(token_file(name), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(token)
    if not os.path.exists(f"{CA_DIR}/root-cert.pem"):
        subprocess.run(
            [*processes.agent_command(), "ca", "init", "--dir", CA_DIR],
            check=True,
            capture_output=True,
        )
    cg = cgroups.subtree(cgroup_root) / CA_CGROUP
    cgroups.create(cg)
    argv = [
        *processes.agent_command(),
        "ca",
        "serve",
        "--dir",
        CA_DIR,
        "--listen",
        f"unix:{CA_SOCKET}",
        "--config",
        config_dir,
        "--tokens",
        CA_TOKENS,
    ]
    env = dict(os.environ)
    env["PATH"] = processes.search_path()
    env["PYTHONUNBUFFERED"] = "1"
    return processes.spawn(processes.launcher(cg, argv), log=log_path(), env=env)


def wait_started(p: subprocess.Popen[bytes]) -> None:
    """Until the CA started as ``p`` serves on its socket; its log's end if it does not."""
    log = log_path()
    deadline = time.monotonic() + START_TIMEOUT
    while not os.path.exists(CA_SOCKET):
        if p.poll() is not None or time.monotonic() > deadline:
            raise LocalStateError(
                f"the mesh CA did not start; the end of {log}:\n"
                f"{processes.indent(processes.tail(log))}"
            )
        time.sleep(0.05)


def stop(cgroup_root: Path) -> None:
    cgroups.kill(cgroups.subtree(cgroup_root) / CA_CGROUP)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(CA_SOCKET)


def agent_args(node: NodePlan) -> list[str]:
    """The flags that point ``node``'s agent at the CA, with its credential."""
    return [
        "--ca-addr",
        f"unix:{CA_SOCKET}",
        "--ca-token-file",
        token_file(node.name),
        "--trust-bundle",
        f"{CA_DIR}/trust-bundle.pem",
    ]
