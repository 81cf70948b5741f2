"""``nodeagent cni install``: put the plugin on a node, as the DaemonSet's init container
does (and ``--uninstall`` takes it off).

Two things are written, each atomically (a temporary file renamed over the target) and
only when they differ, so a second run changes nothing:

- ``BIN_DIR/nodeagent-cni``: a launcher the runtime execs. The agent is Python: a node
  has no interpreter of ours, so the launcher runs one by absolute path. With
  ``--python`` (default: this interpreter) it runs ``PYTHON -m nodeagent.cni`` on the
  host (sandbox, VMs, a host install); with ``--agent-pid-file`` it enters the running
  agent's mount namespace first (``nsenter``), so the image's own interpreter and venv
  serve the plugin and nothing is copied onto the node (istio-cni copies a static
  binary instead);
- the entry ``{"type": "nodeagent-cni", ...}`` as the last plugin of the first (in name
  order) ``*.conflist`` of ``CONF_DIR``; a lone ``*.conf`` becomes a ``.conflist`` first.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import tempfile
from pathlib import Path
from typing import Any

from nodeagent.cni.spec import DEFAULT_SOCKET, DEFAULT_TIMEOUT, PLUGIN_TYPE

LAUNCHER_MARK = "# nodeagent-cni launcher, written by `nodeagent cni install`"


class InstallError(Exception):
    """The node's CNI directories are not in a state the installer can work with."""


def launcher(python: str, agent_pid_file: str = "") -> str:
    """The plugin executable: a shell script that runs the plugin with ``python``."""
    run = f"{shlex.quote(python)} -m nodeagent.cni"
    if not agent_pid_file:
        return f"#!/bin/sh\n{LAUNCHER_MARK}\nexec {run}\n"
    pid_file = shlex.quote(agent_pid_file)
    # the agent's pid tells where its image is: its mount namespace holds the venv
    return (
        f"#!/bin/sh\n{LAUNCHER_MARK}\n"
        f"pid=$(cat {pid_file} 2>/dev/null)\n"
        'if [ -z "$pid" ] || [ ! -d "/proc/$pid" ]; then\n'
        f'  printf \'%s\\n\' \'{{"cniVersion":"1.0.0","code":11,"msg":"nodeagent-cni: '
        f"the node agent is not running (no live pid in {agent_pid_file}); the pod is not "
        "started uncaptured\"}'\n"
        "  exit 1\n"
        "fi\n"
        f'exec nsenter --target "$pid" --mount -- {run}\n'
    )


def entry(socket: str, timeout: float, log_level: str) -> dict[str, Any]:
    """This plugin's entry in a conflist."""
    return {"type": PLUGIN_TYPE, "socket": socket, "timeout": timeout, "log_level": log_level}


def _write(path: Path, text: str, mode: int) -> bool:
    """Replace ``path`` with ``text`` atomically; False when it already holds it."""
    try:
        if path.read_text() == text and (path.stat().st_mode & 0o777) == mode:
            return False
    except (FileNotFoundError, UnicodeDecodeError):
        pass
    # a dot name the runtime's config loader skips (it reads *.conf, *.conflist, *.json)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return True


def _load(path: Path) -> dict[str, Any]:
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise InstallError(f"{path}: cannot read the CNI network config: {e}") from e
    if not isinstance(doc, dict):
        raise InstallError(f"{path}: a CNI network config is a JSON object")
    return doc


def find_config(conf_dir: Path) -> Path:
    """The network config the runtime uses: the first ``*.conflist`` by name, else the
    first ``*.conf``/``*.json`` (converted by ``install``)."""
    if not conf_dir.is_dir():
        raise InstallError(f"{conf_dir}: not a directory (--conf-dir)")
    names = sorted(p for p in conf_dir.iterdir() if not p.name.startswith("."))
    for suffixes in ((".conflist",), (".conf", ".json")):
        found = [p for p in names if p.suffix in suffixes and p.is_file()]
        if found:
            return found[0]
    raise InstallError(
        f"{conf_dir}: no CNI network config (*.conflist, *.conf): nodeagent-cni chains "
        "after the cluster's own network plugin; install that first"
    )


def _as_conflist(doc: dict[str, Any]) -> dict[str, Any]:
    """A single-plugin ``.conf`` as a one-plugin ``.conflist``."""
    plugin = {k: v for k, v in doc.items() if k not in ("cniVersion", "name")}
    return {
        "cniVersion": doc.get("cniVersion", "0.3.1"),
        "name": doc.get("name", "k8s-pod-network"),
        "plugins": [plugin],
    }


def _dump(doc: dict[str, Any]) -> str:
    return json.dumps(doc, indent=2) + "\n"


def install(
    bin_dir: Path,
    conf_dir: Path,
    socket: str = DEFAULT_SOCKET,
    *,
    python: str = "",
    agent_pid_file: str = "",
    timeout: float = DEFAULT_TIMEOUT,
    log_level: str = "warning",
) -> list[str]:
    """Write the launcher and the conflist entry; returns what changed (empty: nothing)."""
    changed: list[str] = []
    bin_dir.mkdir(parents=True, exist_ok=True)
    exe = bin_dir / PLUGIN_TYPE
    if _write(exe, launcher(python or sys.executable, agent_pid_file), 0o755):
        changed.append(f"wrote {exe}")
    path = find_config(conf_dir)
    doc = _load(path)
    target = path
    if path.suffix != ".conflist":
        doc = _as_conflist(doc)
        target = path.with_suffix(".conflist")
    plugins = doc.get("plugins")
    if not isinstance(plugins, list):
        raise InstallError(f"{path}: 'plugins' is not a list")
    ours = entry(socket, timeout, log_level)
    others = [p for p in plugins if not (isinstance(p, dict) and p.get("type") == PLUGIN_TYPE)]
    doc["plugins"] = [*others, ours]
    if target != path or doc["plugins"] != plugins:
        _write(target, _dump(doc), 0o644)
        changed.append(f"added {PLUGIN_TYPE} to {target}")
    if target != path:
        path.unlink()
        changed.append(f"replaced {path} by {target.name}")
    return changed


def uninstall(bin_dir: Path, conf_dir: Path) -> list[str]:
    """Take the entry out of every conflist and remove the launcher; returns what changed."""
    changed: list[str] = []
    if conf_dir.is_dir():
        for path in sorted(conf_dir.glob("*.conflist")):
            doc = _load(path)
            plugins = doc.get("plugins")
            if not isinstance(plugins, list):
                continue
            kept = [
                p for p in plugins if not (isinstance(p, dict) and p.get("type") == PLUGIN_TYPE)
            ]
            if kept != plugins:
                doc["plugins"] = kept
                _write(path, _dump(doc), 0o644)
                changed.append(f"removed {PLUGIN_TYPE} from {path}")
    exe = bin_dir / PLUGIN_TYPE
    if exe.exists():
        try:
            mine = LAUNCHER_MARK in exe.read_text()
        except UnicodeDecodeError:
            mine = False
        if mine:
            exe.unlink()
            changed.append(f"removed {exe}")
    return changed


# -- the command line ----------------------------------------------------------------------


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    cni = sub.add_parser(
        "cni",
        help="the CNI plugin nodeagent-cni: install it on a node",
        description="The CNI plugin nodeagent-cni hands each new pod to the node agent, "
        "chained after the cluster's own network plugins (see docs/cni.md).",
    )
    cmds = cni.add_subparsers(dest="cni_command", required=True, metavar="COMMAND")
    p = cmds.add_parser(
        "install",
        help="write the plugin into the CNI bin dir and chain it in the network config",
        description="Write the plugin's launcher into --bin-dir and add nodeagent-cni as "
        "the last plugin of the first *.conflist of --conf-dir (a lone *.conf becomes a "
        ".conflist). Atomic and idempotent: a second run changes nothing. The DaemonSet's "
        "init container runs it.",
    )
    p.add_argument(
        "--bin-dir", required=True, metavar="DIR", help="CNI_PATH directory, e.g. /opt/cni/bin"
    )
    p.add_argument(
        "--conf-dir",
        required=True,
        metavar="DIR",
        help="CNI network config directory, e.g. /etc/cni/net.d",
    )
    p.add_argument(
        "--socket",
        default=DEFAULT_SOCKET,
        metavar="PATH",
        help="the node agent socket the plugin calls",
    )
    p.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_TIMEOUT,
        metavar="SECONDS",
        help="how long ADD waits for the agent to capture the pod",
    )
    p.add_argument(
        "--python",
        default="",
        metavar="PATH",
        help="the interpreter the launcher runs (default: this one)",
    )
    p.add_argument(
        "--agent-pid-file",
        default="",
        metavar="FILE",
        help="run the plugin inside the running agent's mount namespace (its "
        "image's interpreter), found through this pid file (default: on the host)",
    )
    p.add_argument(
        "--plugin-log-level",
        default="warning",
        metavar="LEVEL",
        choices=("debug", "info", "warning", "error"),
        help="the plugin's log_level (it logs to the runtime's stderr)",
    )
    p.add_argument(
        "--uninstall",
        action="store_true",
        help="remove the plugin and its conflist entries instead",
    )
    p.set_defaults(func=_cmd_install)


def _cmd_install(args: argparse.Namespace) -> int:
    bin_dir, conf_dir = Path(args.bin_dir), Path(args.conf_dir)
    try:
        if args.uninstall:
            changed = uninstall(bin_dir, conf_dir)
        else:
            changed = install(
                bin_dir,
                conf_dir,
                args.socket,
                python=args.python,
                agent_pid_file=args.agent_pid_file,
                timeout=args.timeout,
                log_level=args.plugin_log_level,
            )
    except (InstallError, OSError) as e:
        print(f"nodeagent cni install: {e}", file=sys.stderr)
        return 1
    for line in changed or ["nothing to change"]:
        print(f"nodeagent cni install: {line}")
    return 0
