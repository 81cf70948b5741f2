"""``nodeagent dashboard``: its options, and which agents and Prometheus it reads.

Owns turning the command line into a ``Dashboard`` (the agents' sockets: ``--socket``,
the running sandbox's, or those in ``/run/nodeagent``; ``--prometheus``) and serving it
until interrupted.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from nodeagent.admin import DEFAULT_SOCKET_DIR
from nodeagent.dashboard.agents import AgentSource
from nodeagent.dashboard.prom import PrometheusSource
from nodeagent.dashboard.server import Dashboard, GraphSource, serve
from nodeagent.errors import LocalStateError

__all__ = ["add_parser", "find_sockets"]

DEFAULT_LISTEN = "127.0.0.1:15500"


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``nodeagent dashboard``."""
    p = sub.add_parser(
        "dashboard",
        help="serve a live service-graph page of the mesh (docs/observability.md)",
        description="Serve a live service graph: workloads and services as nodes, edges "
        "with request rate, error rate, p99 latency and a padlock where traffic is mutual "
        "TLS; click an edge for its recent requests. Rates come from the agents' own "
        "metrics over their node agent sockets, or from --prometheus. The page loads "
        "nothing from the internet.\n\n"
        "  sudo nodeagent dashboard --sandbox        # then open http://127.0.0.1:15500/\n"
        "  nodeagent dashboard --prometheus http://127.0.0.1:9090 --socket /run/nodeagent/n1.sock",
    )
    p.add_argument(
        "--socket",
        action="append",
        default=[],
        metavar="[NODE=]PATH",
        help="a node agent socket to read (repeat for each node); default: the running "
        f"sandbox's agents, else every *.sock in {DEFAULT_SOCKET_DIR}",
    )
    p.add_argument(
        "--sandbox", action="store_true", help="read the agents of the running sandbox"
    )
    p.add_argument(
        "--prometheus",
        default="",
        metavar="URL",
        help="take rates from this Prometheus server (PromQL over its HTTP API); the "
        "sockets still give each edge's recent requests (default: none, rates from the "
        "agents' own metrics)",
    )
    p.add_argument("--listen", default=DEFAULT_LISTEN, metavar="HOST:PORT",
                   help="where to serve the page")
    p.add_argument("--window", type=float, default=60.0, metavar="SECONDS",
                   help="rates are averaged over this long")
    p.add_argument("--interval", type=float, default=2.0, metavar="SECONDS",
                   help="how often the agents are scraped")
    p.set_defaults(func=run)


def find_sockets(given: list[str], sandbox: bool, socket_dir: str = DEFAULT_SOCKET_DIR,
                 required: bool = True) -> dict[str, str]:
    """Node name → socket path: ``given`` (``NODE=PATH`` or ``PATH``), the sandbox's,
    or the agents' sockets in ``socket_dir``."""
    if given:
        out: dict[str, str] = {}
        for g in given:
            node, sep, path = g.partition("=")
            if not sep:
                node, path = Path(g).stem, g
            out[node] = path
        return out
    from nodeagent.sandbox import Sandbox

    try:
        sb = Sandbox.attach()
        return {n.name: n.socket for n in sb.topology.nodes}
    except LocalStateError:
        if sandbox:
            raise
    found = {p.stem: str(p) for p in sorted(Path(socket_dir).glob("*.sock")) if p.stem != "ca"}
    if not found and required:
        raise LocalStateError(
            f"no node agent socket in {socket_dir} and no sandbox up: name the agents with "
            "--socket PATH (or give --prometheus URL)"
        )
    return found


def _listen(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or int(port) > 65535:
        raise LocalStateError(f"--listen {value!r}: expected HOST:PORT, e.g. {DEFAULT_LISTEN}")
    return host.strip("[]") or "127.0.0.1", int(port)


def run(args: argparse.Namespace) -> int:
    try:
        host, port = _listen(args.listen)
        sockets = find_sockets(args.socket, args.sandbox, required=not args.prometheus)
        agents = AgentSource(sockets, window=args.window) if sockets else None
        source: GraphSource
        if args.prometheus:
            source = PrometheusSource(args.prometheus, window=args.window)
        elif agents is not None:
            source = agents
        else:  # find_sockets raised already; for the type checker
            raise LocalStateError("nothing to read: give --socket, --sandbox or --prometheus")
        dashboard = Dashboard(source, agents, interval=args.interval)
        httpd = serve(dashboard, host, port)
    except LocalStateError as e:
        print(f"nodeagent dashboard: {e}", file=sys.stderr)
        return 1
    bound = httpd.server_address
    print(f"nodeagent dashboard: http://{host}:{bound[1]}/ ({source.describe()})", flush=True)
    try:
        httpd.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        dashboard.stop()
        httpd.server_close()
    return 0
