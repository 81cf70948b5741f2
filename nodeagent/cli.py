"""The command line: the only place that prints for humans.

Subcommands: ``run`` (the agent of one node), ``sandbox`` (the local multi-node
playground), ``ctl`` (query a running agent over its node agent socket) and
``sample-app`` (the HTTP service of the examples).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from nodeagent import __version__


def _add_run(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("run", help="run the agent of one node")
    p.add_argument("--node", required=True, help="this node's name (Pod spec.nodeName)")
    p.add_argument("--config", required=True, help="directory of mesh YAML files")
    p.add_argument("--pods", default="", help="pod runtime file (JSON) naming pod IPs/netns")
    p.add_argument("--netns", default="", help="enter this network namespace (name or path)")
    p.add_argument("--socket", default="", help="node agent socket path")
    p.add_argument("--state-dir", default="", help="state directory")
    p.add_argument(
        "--redirect",
        default=None,
        choices=["iptables", "ebpf", "auto"],
        help="capture mode: iptables rules in each pod's netns; ebpf programs on each "
        "pod's cgroup and netns (bpf/capture.c); auto: ebpf where the kernel allows it "
        "(default: the node's nodeagent.io/redirect annotation, else auto)",
    )
    p.add_argument(
        "--bpf-pin-dir",
        default="/sys/fs/bpf/nodeagent",
        help="bpffs directory for eBPF capture's maps and links (NODE below it)",
    )
    p.add_argument(
        "--bpf-bypass",
        default=None,
        choices=["on", "off"],
        help="eBPF mode: the local legs (app <-> proxy inside a pod) skip the TCP/IP stack "
        "through a sockmap (default: the node's nodeagent.io/bpf-bypass annotation, else "
        "off: apps using blocking sockets may see EAGAIN with it, see the README; "
        "`nodeagent ctl bpf --bypass` switches it live)",
    )
    p.add_argument(
        "--ca-addr",
        default="",
        help="mesh CA (unix:PATH or HOST:PORT); without it, node-to-node traffic is plain TCP",
    )
    p.add_argument("--ca-token-file", default="", help="this node's credential for the CA")
    p.add_argument("--trust-bundle", default="", help="PEM file of the trusted root(s)")
    p.add_argument("--trust-domain", default="cluster.local")
    p.add_argument(
        "--cert-lifetime",
        default="24h",
        type=_duration,
        help="lifetime asked for workload certificates (renewed at half-life)",
    )
    p.add_argument(
        "--root-namespace",
        default="istio-system",
        help="namespace whose policies apply mesh-wide",
    )
    p.add_argument(
        "--access-log",
        default="-",
        help="per-request JSON access log: - (stdout, default), a file path, or off",
    )
    p.add_argument("--log-level", default="info")
    p.add_argument(
        "--dump-bpf",
        action="store_true",
        help="print the exact BPF C source and compiler flags eBPF capture loads, and exit",
    )
    p.set_defaults(func=_cmd_run)


def _duration(text: str) -> float:
    from nodeagent.identity.cli import parse_duration

    return parse_duration(text)


def _cmd_run(args: argparse.Namespace) -> int:
    if args.dump_bpf:
        import os.path

        from nodeagent.redirect import ebpf

        src = ebpf.source()
        maps = os.path.join(args.bpf_pin_dir, args.node, f"maps-{ebpf.abi_of(src)}")
        print(f"// {src}, compiled by bcc with: {' '.join(ebpf.cflags(maps))}")
        print(src.read_text(), end="")
        return 0
    import os

    # The agent forks only for nsenter/iptables; gRPC's fork handlers just log noise then.
    os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")
    from nodeagent.app import run_agent
    from nodeagent.config import AgentSettings

    settings = AgentSettings.from_args(args)
    return run_agent(settings)


def build_parser() -> argparse.ArgumentParser:
    import nodeagent.sandbox.cli as sandbox_cli
    from nodeagent import native
    from nodeagent.admin import ctl
    from nodeagent.identity import cli as ca_cli
    from nodeagent.samples import jwtmint, sampleapp

    parser = argparse.ArgumentParser(prog="nodeagent", description=__doc__)
    parser.add_argument("--version", action="version", version=f"nodeagent {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_run(sub)
    sandbox_cli.add_parser(sub)
    ctl.add_parser(sub)
    ca_cli.add_parser(sub)
    sampleapp.add_parser(sub)
    jwtmint.add_parser(sub)
    native.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        rc: int = args.func(args)
    except KeyboardInterrupt:
        return 130
    return rc


if __name__ == "__main__":
    sys.exit(main())
