"""Processes of the sandbox: starting a command inside a cgroup (and a pod's netns),
the environment pods get, liveness, TCP readiness probes from inside a netns, log tails.

A process joins its cgroup *before* ``ip netns exec`` (which remounts /sys and hides the
cgroup v2 mount, PLATFORM gotcha 5)::

    sh -c 'echo $$ > "$1" && shift && exec "$@"' na-launch CG/cgroup.procs \
        ip netns exec NS CMD...
"""

from __future__ import annotations

import json
import os
import select
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO, Any

from nodeagent.sandbox.netlink import run_in_netns

_LAUNCH = 'echo $$ > "$1" && shift && exec "$@"'


def venv_bin() -> str:
    """The directory of the running interpreter (the project's ``.venv/bin``), unresolved."""
    return os.path.dirname(os.path.abspath(sys.executable))


def agent_command() -> list[str]:
    exe = os.path.join(venv_bin(), "nodeagent")
    if os.access(exe, os.X_OK):
        return [exe]
    return [sys.executable, "-m", "nodeagent"]


def search_path() -> str:
    rest = os.environ.get("PATH") or "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
    parts = [venv_bin(), *(p for p in rest.split(os.pathsep) if p and p != venv_bin())]
    return os.pathsep.join(parts)


def launcher(cgroup_dir: str | Path, argv: Sequence[str], netns: str | None = None) -> list[str]:
    """argv that joins ``cgroup_dir`` and then (optionally inside ``netns``) execs ``argv``."""
    procs = os.path.join(str(cgroup_dir), "cgroup.procs")
    inner = ["ip", "netns", "exec", netns, *argv] if netns else list(argv)
    return ["sh", "-c", _LAUNCH, "na-launch", procs, *inner]


def pod_env(
    *,
    pod_name: str,
    namespace: str,
    node: str,
    pod_ip: str,
    service_account: str,
    extra: Sequence[tuple[str, str]] | Mapping[str, str] = (),
) -> dict[str, str]:
    """A container's environment: a clean base, the downward-API values, then its ``env``."""
    env = {
        "PATH": search_path(),
        "HOME": "/root",
        "HOSTNAME": pod_name,
        "LANG": "C.UTF-8",
        "PYTHONUNBUFFERED": "1",
        "POD_NAME": pod_name,
        "POD_NAMESPACE": namespace,
        "NODE_NAME": node,
        "POD_IP": pod_ip,
        "SERVICE_ACCOUNT": service_account,
    }
    items = extra.items() if isinstance(extra, Mapping) else extra
    env.update(dict(items))
    return env


def spawn(
    argv: Sequence[str], *, log: str, env: Mapping[str, str], cwd: str | None = None
) -> subprocess.Popen[bytes]:
    """Start ``argv`` detached (own session), stdout+stderr appended to ``log``."""
    Path(log).parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab", buffering=0) as out:
        return subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=dict(env),
            start_new_session=True,
            close_fds=True,
            cwd=cwd,
        )


def alive(pid: int) -> bool:
    """True when ``pid`` exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return False
    # the state follows the parenthesised command name, which may contain spaces
    state = stat[stat.rfind(b")") + 2 : stat.rfind(b")") + 3]
    return state not in (b"Z", b"X")


def tail(path: str, lines: int = 20) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - 64 * 1024))
            data = f.read().decode("utf-8", "replace")
    except FileNotFoundError:
        return "(no log file)"
    text = "\n".join(data.splitlines()[-lines:])
    return text or "(log is empty)"


def indent(text: str, prefix: str = "    ") -> str:
    return "\n".join(prefix + line for line in text.splitlines())


def tcp_open(netns: str, host: str, port: int, timeout: float = 0.5) -> bool:
    """True when ``host:port`` accepts a TCP connection made from inside ``netns``."""
    sock: socket.socket = run_in_netns(
        netns, lambda: socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    )
    with sock:
        sock.settimeout(timeout)
        try:
            sock.connect((host, port))
        except OSError:
            return False
        return True


def wait_ports(
    netns: str,
    hosts: Sequence[str],
    ports: Sequence[int],
    *,
    timeout: float,
    pids: Sequence[int],
    popens: Sequence[subprocess.Popen[Any]] = (),
) -> tuple[bool, str]:
    """Wait until every port accepts on one of ``hosts``; stop early if the processes die.

    Returns ``(ok, why)``; ``why`` says which port is closed or which process exited.
    """
    deadline = time.monotonic() + timeout
    pending = list(ports)
    while True:
        pending = [p for p in pending if not any(tcp_open(netns, h, p) for h in hosts)]
        if not pending:
            return True, ""
        for p in popens:
            p.poll()
        dead = [pid for pid in pids if not alive(pid)]
        if pids and len(dead) == len(pids):
            return False, f"its process(es) {dead} exited before port(s) {pending} opened"
        if time.monotonic() > deadline:
            return False, f"port(s) {pending} did not accept connections within {timeout:.0f}s"
        time.sleep(0.1)


def follow(path: str, out: IO[str], poll: float = 0.2) -> None:
    """Print a log and keep printing what is appended (until interrupted)."""
    with open(path, errors="replace") as f:
        while True:
            chunk = f.read()
            if chunk:
                out.write(chunk)
                out.flush()
            else:
                time.sleep(poll)


def next_json_line(p: subprocess.Popen[str], timeout: float) -> dict[str, Any]:
    """The next line ``p`` (text pipes) prints, a JSON object, within ``timeout`` seconds;
    else ``p`` is killed and ``TimeoutError`` carries the tail of its stderr."""
    assert p.stdout is not None
    ready, _, _ = select.select([p.stdout], [], [], timeout)
    line = p.stdout.readline() if ready else ""
    if not line:
        p.kill()
        _, err = p.communicate(timeout=10)
        raise TimeoutError(f"the client gave no answer within {timeout:g}s: {(err or '')[-2000:]}")
    event: dict[str, Any] = json.loads(line)
    return event
