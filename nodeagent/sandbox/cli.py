"""``nodeagent sandbox``: up, down, status, exec, logs. Parses arguments, calls
``nodeagent.sandbox.manager`` and prints for humans; nothing else lives here."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from nodeagent.errors import ConfigErrors, NodeAgentError

PROJECT_ROOT = Path(__file__).resolve().parent.parent.parent
DEFAULT_CONFIG = PROJECT_ROOT / "examples" / "bookinfo"


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``nodeagent sandbox`` and its subcommands."""
    p = sub.add_parser(
        "sandbox",
        help="the local multi-node playground (network namespaces as nodes and pods)",
        description="Network namespaces on this machine play nodes and pods, one agent per "
        "node. Needs root.",
    )
    ssub = p.add_subparsers(dest="sandbox_command", required=True, metavar="COMMAND")

    up = ssub.add_parser(
        "up",
        help="create the nodes and pods of a config dir and start them",
        description="Create one network namespace per node and per pod of the config "
        "directory, a cgroup per pod, the links and routes between them, a mesh CA and one "
        "agent per node, then start the pods' commands. Returns when pods run, agents serve "
        "and capture is in place. Cleans up what a crashed sandbox left first.",
    )
    up.add_argument(
        "dir",
        nargs="?",
        default=str(DEFAULT_CONFIG),
        help=f"directory of mesh YAML (default: {DEFAULT_CONFIG})",
    )
    up.add_argument(
        "--no-agents", action="store_true", help="only the plumbing and the pods, no agents"
    )
    up.add_argument(
        "--agent-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="pass ARG to every `nodeagent run` (repeat; write --agent-arg=--redirect=iptables)",
    )
    up.add_argument(
        "--no-mtls",
        action="store_true",
        help="no mesh CA: agents relay plain TCP between nodes (the L4 skeleton only)",
    )
    up.add_argument("-q", "--quiet", action="store_true", help="print only errors")
    up.set_defaults(func=_cmd_up)

    down = ssub.add_parser(
        "down",
        help="remove everything the sandbox made (idempotent)",
        description="Stop the agents and pods and remove every netns, link, cgroup and "
        "file the sandbox made; after a crash too (it scans for what it made).",
    )
    down.add_argument("-q", "--quiet", action="store_true", help="print only errors")
    down.set_defaults(func=_cmd_down)

    st = ssub.add_parser("status", help="nodes, agents and pods of the running sandbox")
    st.add_argument(
        "-o", "--output", choices=["text", "json"], default="text", help="output format"
    )
    st.set_defaults(func=_cmd_status)

    ex = ssub.add_parser(
        "exec",
        help="run a command inside a pod (its netns and cgroup)",
        usage="nodeagent sandbox exec POD -- CMD [ARG...]",
    )
    ex.add_argument("pod", metavar="POD", help="pod name, or NAMESPACE/NAME")
    ex.add_argument(
        "command",
        nargs=argparse.REMAINDER,
        metavar="CMD",
        help="the command and its arguments, after --",
    )
    ex.set_defaults(func=_cmd_exec)

    rs = ssub.add_parser(
        "restart",
        help="upgrade a node's agent as a DaemonSet rolling update does, dropping nothing",
        description="Start a new agent for NODE (same command line, the node's cgroup) "
        "alongside the running one, which hands it its listening sockets; once the new one "
        "serves, the old one drains its live connections and exits (docs/upgrade.md).",
    )
    rs.add_argument("node", metavar="NODE", help="the node whose agent to restart")
    rs.add_argument("-q", "--quiet", action="store_true", help="print only errors")
    rs.set_defaults(func=_cmd_restart)

    lg = ssub.add_parser("logs", help="print the log of a node's agent or of a pod")
    lg.add_argument(
        "target", metavar="NODE_OR_POD", help="a node (its agent) or a pod (NAMESPACE/NAME)"
    )
    lg.add_argument("-f", "--follow", action="store_true", help="keep printing new lines")
    lg.set_defaults(func=_cmd_logs)


def _err(message: str) -> int:
    print(f"nodeagent sandbox: {message}", file=sys.stderr)
    return 1


def _say(quiet: bool) -> Callable[[str], None]:
    def say(message: str) -> None:
        if not quiet:
            with contextlib.suppress(OSError):  # e.g. stdout piped into `head`
                print(f"sandbox: {message}", flush=True)

    return say


def _cmd_up(args: argparse.Namespace) -> int:
    from nodeagent.sandbox.manager import Sandbox

    if not os.path.isdir(args.dir):
        return _err(f"{args.dir} is not a directory of mesh YAML files")
    try:
        sb = Sandbox.up(
            args.dir,
            agents=not args.no_agents,
            agent_args=args.agent_arg,
            progress=_say(args.quiet),
            mtls=not args.no_mtls,
        )
    except ConfigErrors as e:
        return _err(str(e))
    except NodeAgentError as e:
        return _err(str(e))
    if not args.quiet:
        print()
        _print_status(sb.status())
        first = sb.topology.pods[0].name if sb.topology.pods else "POD"
        print(
            f"\nnext: `nodeagent sandbox exec {first} -- sh`, `nodeagent sandbox logs NODE`, "
            "`nodeagent sandbox down`"
        )
    return 0


def _cmd_down(args: argparse.Namespace) -> int:
    from nodeagent.sandbox.cleanup import leftovers, teardown
    from nodeagent.sandbox.state import require_root

    try:
        require_root()
        before = leftovers()
        teardown(_say(args.quiet))
    except NodeAgentError as e:
        return _err(str(e))
    if not args.quiet:
        print("sandbox: down" if before else "sandbox: nothing to remove")
    return 0


def _cmd_status(args: argparse.Namespace) -> int:
    from nodeagent.sandbox.cleanup import leftovers
    from nodeagent.sandbox.manager import NotUp, Sandbox
    from nodeagent.sandbox.state import require_root

    try:
        require_root()
        status = Sandbox.attach().status()
    except NotUp as e:
        if args.output == "json":
            print(json.dumps({"up": False, "leftovers": leftovers()}, indent=2))
            return 1
        return _err(str(e))
    except NodeAgentError as e:
        return _err(str(e))
    if args.output == "json":
        print(json.dumps(status, indent=2))
    else:
        _print_status(status)
    return 0


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows
    )


def _print_status(status: dict[str, Any]) -> None:
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(status["created"]))
    agents = "with agents" if status["agents"] else "without agents"
    print(f"sandbox up from {status['config_dir']} (started {started}, {agents})")
    rows = [["NODE", "NETNS", "IP", "POD CIDR", "AGENT"]]
    for n in status["nodes"]:
        a = n["agent"]
        if a is None:
            agent = "-"
        elif not a["running"]:
            agent = f"not running (log {a['log']})"
        else:
            agent = ("ready" if a["ready"] else "not ready") + f" pid {a['pids'][0]}"
        rows.append([n["name"], n["netns"], n["ip"], n["pod_cidr"], agent])
    print(_table(rows))
    print()
    rows = [["POD", "NODE", "IP", "STATE", "PIDS"]]
    for p in status["pods"]:
        if p["containers"] == 0:
            state = "no process"
        elif p["pids"]:
            state = "running"
        else:
            state = "exited"
        pids = ",".join(str(x) for x in p["pids"]) or "-"
        rows.append([p["key"], p["node"], p["ip"], state, pids])
    print(_table(rows))


def _cmd_exec(args: argparse.Namespace) -> int:
    import subprocess

    from nodeagent.sandbox.manager import Sandbox
    from nodeagent.sandbox.state import require_root

    command = list(args.command)
    if command and command[0] == "--":
        command = command[1:]
    if not command:
        return _err("exec needs a command: nodeagent sandbox exec POD -- CMD [ARG...]")
    try:
        require_root()
        sb = Sandbox.attach()
        argv = sb.pod_argv(args.pod, command)
        env = sb.pod_env(args.pod)
    except NodeAgentError as e:
        return _err(str(e))
    try:
        return subprocess.run(argv, env=env).returncode
    except KeyboardInterrupt:
        return 130


def _cmd_restart(args: argparse.Namespace) -> int:
    from nodeagent.sandbox.manager import Sandbox
    from nodeagent.sandbox.state import require_root

    say = _say(args.quiet)
    try:
        require_root()
        sb = Sandbox.attach()
        say(f"starting a new agent for {args.node} alongside pid {sb.agent_pids.get(args.node)}")
        old = sb.roll_agent(args.node)
    except NodeAgentError as e:
        return _err(str(e))
    say(f"agent {args.node}: pid {sb.agent_pids[args.node]} serves; pid {old} drained and exited")
    return 0


def _cmd_logs(args: argparse.Namespace) -> int:
    from nodeagent.sandbox import processes
    from nodeagent.sandbox.manager import Sandbox
    from nodeagent.sandbox.state import require_root

    try:
        require_root()
        sb = Sandbox.attach()
        path = sb.log_of(args.target)
    except NodeAgentError as e:
        return _err(str(e))
    if not os.path.exists(path):
        return _err(f"no log yet at {path}")
    if not args.follow:
        with open(path, errors="replace") as f:
            sys.stdout.write(f.read())
        return 0
    try:
        processes.follow(path, sys.stdout)
    except KeyboardInterrupt:
        return 0
    return 0
