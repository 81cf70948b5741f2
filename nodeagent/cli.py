"""The command line: the only place that prints for humans.

Owns the top of ``nodeagent``: the product's description in ``--help``, the ``run``
subcommand (the agent of one node), ``config check`` (the verdict on a config, from
``control.check``), registering the other subcommands from their own modules, and how a
run ends (Ctrl-C, a closed stdout pipe).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import cast

from nodeagent import __version__
from nodeagent.cliargs import Parser, add_log_level
from nodeagent.core.paths import BASE, PATH_NORMALIZATIONS

DESCRIPTION = """\
nodeagent is a sidecar-less service mesh for Linux nodes. One agent per node captures
every workload's TCP traffic (with eBPF, or iptables) into one shared proxy on that node,
which gives the workloads what Istio gives them without a sidecar per pod: workload
identities and mutual TLS between nodes (HBONE), HTTP/1.1, HTTP/2 and gRPC routing
(VirtualService, DestinationRule), authorization (AuthorizationPolicy,
PeerAuthentication, RequestAuthentication with JWT), rate limits and quotas, and Istio's
metrics and access logs. Its config is Kubernetes and Istio YAML.
"""

EPILOG = """\
Try it on one machine, as root (nodes and pods are network namespaces):

  nodeagent sandbox up examples/bookinfo
  nodeagent sandbox exec sleep -- curl -s http://productpage:9080/
  nodeagent ctl --node node1 status
  nodeagent sandbox down

`nodeagent COMMAND --help` shows a command's options; README.md and docs/ in the
repository are the guides.
"""

EXIT_BROKEN_PIPE = 141
"""128 + SIGPIPE: what a shell reports for git or kubectl cut off by `| head`."""


def _add_run(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    about = "run the agent of one node"
    p = sub.add_parser(
        "run",
        help=about,
        description="Run the agent of one node: capture its local pods' traffic into the "
        "shared proxy, serve the node agent socket, metrics (:15020) and readiness "
        "(:15021), and follow the config (a directory of YAML files, or the Kubernetes "
        "API). Stops on SIGTERM (draining live connections for up to 5 s), or once a new "
        "agent of the node took its listeners over (docs/upgrade.md).",
    )
    p.add_argument("--node", required=True, help="this node's name (Pod spec.nodeName)")
    p.add_argument(
        "--source",
        default="files",
        choices=["files", "kubernetes"],
        help="where the mesh config comes from: files (the --config directory, polled) or "
        "kubernetes (the API server, listed and watched; docs/kubernetes.md)",
    )
    p.add_argument(
        "--config",
        default="",
        metavar="DIR",
        help="directory of mesh YAML files (required with --source files; default: none)",
    )
    p.add_argument(
        "--kubeconfig",
        default="",
        metavar="FILE",
        help="with --source kubernetes: the kubeconfig to use (default: the pod's "
        "ServiceAccount, as a DaemonSet pod has it)",
    )
    p.add_argument(
        "--pods",
        default="",
        metavar="FILE",
        help="pod runtime file (JSON) naming each local pod's IP, netns and cgroup (the "
        "sandbox writes it; the agent adds the pods the CNI plugin nodeagent-cni hands it; "
        "format in nodeagent/control/runtime.py) (default: STATE_DIR/pods.json)",
    )
    p.add_argument(
        "--netns",
        default="",
        help="enter this network namespace (name or path) at start (default: stay in the "
        "current one)",
    )
    p.add_argument(
        "--socket",
        default="",
        metavar="PATH",
        help="node agent socket path (default: /run/nodeagent/NODE.sock)",
    )
    p.add_argument(
        "--state-dir",
        default="",
        metavar="DIR",
        help="where state that outlives the agent is kept, e.g. the quota journal "
        "(default: /var/lib/nodeagent)",
    )
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
        metavar="DIR",
        help="bpffs directory for eBPF capture's maps and links (NODE below it)",
    )
    p.add_argument(
        "--workload-cgroup-root",
        default="",
        metavar="DIR",
        help="host mode: where the cgroup paths of local WorkloadEntries "
        "(nodeagent.io/cgroup) start (default: the cgroup v2 mount)",
    )
    p.add_argument(
        "--bpf-bypass",
        default=None,
        choices=["on", "off"],
        help="eBPF mode: the local legs (app <-> proxy inside a pod) skip the TCP/IP stack "
        "through a sockmap (default: the node's nodeagent.io/bpf-bypass annotation, else "
        "off: apps using blocking sockets may see EAGAIN with it, see docs/capture.md; "
        "`nodeagent ctl bpf --bypass` switches it live)",
    )
    p.add_argument(
        "--ca-addr",
        default="",
        metavar="ADDR",
        help="mesh CA: unix:PATH (plaintext) or HOST:PORT (TLS, verified with "
        "--trust-bundle) (default: none, so node-to-node traffic is plain TCP)",
    )
    p.add_argument(
        "--ca-server-name",
        default="",
        metavar="NAME",
        help="the name the CA's TLS certificate must carry (default: the HOST of --ca-addr)",
    )
    p.add_argument(
        "--ca-token-file",
        default="",
        metavar="FILE",
        help="this node's credential for the CA, re-read at each request: a node token, or "
        "in a cluster the agent's projected ServiceAccount token (default: none)",
    )
    p.add_argument(
        "--trust-bundle",
        default="",
        metavar="FILE",
        help="PEM file of the trusted root(s), re-read when it changes (default: none; "
        "required with --ca-addr: an agent never trusts a root because the CA sent it)",
    )
    p.add_argument(
        "--jwks-ca-bundle",
        default="",
        metavar="FILE",
        help="PEM file of the roots that https:// jwksUri servers are verified with "
        "(default: the system trust store)",
    )
    p.add_argument(
        "--trust-domain",
        default="cluster.local",
        help="the SPIFFE trust domain of workload identities",
    )
    p.add_argument(
        "--cert-lifetime",
        default="24h",
        type=_duration,
        metavar="DURATION",
        help="lifetime asked for workload certificates, renewed at half-life (default: 24h)",
    )
    p.add_argument(
        "--root-namespace",
        default="istio-system",
        metavar="NAMESPACE",
        help="namespace whose policies apply mesh-wide",
    )
    p.add_argument(
        "--path-normalization",
        default=BASE,
        type=str.upper,
        choices=PATH_NORMALIZATIONS,
        help="how request paths are normalized before routing, policy and the app, as "
        "Istio's meshConfig.pathNormalization (default: BASE; docs/policy.md)",
    )
    p.add_argument(
        "--request-headers-timeout",
        default="10s",
        type=_duration,
        metavar="DURATION",
        help="HTTP/1.1 clients: time from a request's first byte to the end of its head, "
        "then 408 (default: 10s)",
    )
    p.add_argument(
        "--http-idle-timeout",
        default="1h",
        type=_duration,
        metavar="DURATION",
        help="HTTP/1.1 clients: time a kept-alive connection may wait for its next request "
        "before it is closed (default: 1h, as Envoy)",
    )
    p.add_argument(
        "--max-request-headers",
        default=100,
        type=_positive,
        metavar="N",
        help="HTTP/1.1 clients: header fields per request, beyond which 431 (default: 100)",
    )
    p.add_argument(
        "--max-request-headers-kb",
        default=60,
        type=_positive,
        metavar="KIB",
        help="HTTP/1.1 clients: KiB of a request head, beyond which 431 (default: 60)",
    )
    p.add_argument(
        "--max-connections",
        default=100_000,
        type=_positive,
        metavar="N",
        help="downstream connections the node's proxy holds at once (every listener of "
        "every pod); past it a new one is closed at accept (default: 100000, as Envoy's "
        "global_downstream_max_connections is often set)",
    )
    p.add_argument(
        "--max-connections-per-listener",
        default=20_000,
        type=_positive,
        metavar="N",
        help="the same for one listener (15001, 15006 or 15008) of one pod, so one pod "
        "cannot take all of the node's (default: 20000)",
    )
    p.add_argument(
        "--hbone-idle-timeout",
        default="1h",
        type=_duration,
        metavar="DURATION",
        help="HBONE server: time a connection may stay without a stream before GOAWAY and "
        "close (default: 1h, as Envoy's idle_timeout; clients close theirs sooner)",
    )
    p.add_argument(
        "--hbone-preface-timeout",
        default="10s",
        type=_duration,
        metavar="DURATION",
        help="HBONE server: time from the TLS handshake to the client's HTTP/2 preface, "
        "then closed (default: 10s)",
    )
    p.add_argument(
        "--access-log",
        default="-",
        metavar="DEST",
        help="per-request JSON access log: - (stdout, default), a file path, or off",
    )
    p.add_argument(
        "--otlp-endpoint",
        default="",
        type=_host_port,
        metavar="HOST:PORT",
        help="export spans over OTLP/gRPC (plaintext) to this collector, e.g. Jaeger's or "
        "Tempo's port 4317 (default: off; docs/observability.md)",
    )
    p.add_argument(
        "--dns-proxy",
        default="on",
        choices=["on", "off"],
        help="answer the local pods' DNS on port 15053 (their port 53 captured): the "
        "mesh's names locally, the rest forwarded (default: on; docs/dns.md)",
    )
    p.add_argument(
        "--dns-upstream",
        default=None,
        type=_upstreams,
        metavar="ADDRS",
        help="resolvers the DNS proxy forwards other names to: comma-separated IP, IP:PORT "
        "or [IPv6]:PORT (default: the nameservers of the node's /etc/resolv.conf)",
    )
    p.add_argument(
        "--dns-timeout",
        default="5s",
        type=_duration,
        metavar="DURATION",
        help="time the upstream resolvers get to answer a forwarded query before the pod "
        "gets SERVFAIL (default: 5s)",
    )
    p.add_argument(
        "--pid-file",
        default="",
        metavar="FILE",
        help="write the agent's pid here, for the CNI plugin's launcher (`nodeagent cni "
        "install --agent-pid-file`, docs/cni.md) (default: none)",
    )
    p.add_argument(
        "--workers",
        default="auto",
        type=_workers,
        metavar="N",
        help="processes serving connections: the main one and N-1 worker processes, "
        "each pod's listeners shared by all through SO_REUSEPORT groups; 'auto': one per "
        "CPU this process may use (its CPU affinity, bounded by its cgroup's CPU quota), "
        "one alone on 2 CPUs or fewer, as many as its cgroup's memory limit holds (256 MiB "
        "for the main one, 128 MiB each more) (default: auto)",
    )
    p.add_argument(
        "--drain-seconds",
        default="5s",
        type=_duration,
        metavar="DURATION",
        help="on SIGTERM or after a hand-over: how long live connections may go on before "
        "they are reset (default: 5s)",
    )
    p.add_argument(
        "--handover",
        default="on",
        choices=["on", "off"],
        help="on: take the listening sockets of this node's running agent over at start "
        "and hand ours to the next one, so an upgrade refuses no connection "
        "(docs/upgrade.md); off: always start cold",
    )
    p.add_argument(
        "--handover-socket",
        default="",
        metavar="PATH",
        help="the hand-over socket (default: STATE_DIR/handover.sock)",
    )
    p.add_argument(
        "--after-handover",
        default="exit",
        choices=["exit", "wait"],
        help="once its listeners are handed over and its connections drained: exit, or "
        "wait for SIGTERM (a DaemonSet pod, which the kubelet would restart)",
    )
    add_log_level(p)
    p.add_argument(
        "--dump-bpf",
        action="store_true",
        help="print the exact BPF C source and compiler flags eBPF capture loads, and exit",
    )
    p.set_defaults(func=_cmd_run)


def _workers(text: str) -> int:
    if text.strip().lower() == "auto":
        from nodeagent.workers.cpus import auto_allowed

        return auto_allowed()
    return _positive(text)


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a whole number of at least 1")
    return value


def _upstreams(text: str) -> tuple[tuple[str, int], ...]:
    from nodeagent.proxy.dns import parse_upstreams

    try:
        found = parse_upstreams(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    if not found:
        raise argparse.ArgumentTypeError(f"{text!r}: expected at least one resolver address")
    return found


def _host_port(text: str) -> str:
    """``HOST:PORT`` (an OTLP collector), or an argparse error saying what is wrong."""
    if not text:  # the default: off
        return text
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise argparse.ArgumentTypeError(f"{text!r} is not HOST:PORT (e.g. 127.0.0.1:4317)")
    return text


def _duration(text: str) -> float:
    from nodeagent.identity.cli import parse_duration

    return parse_duration(text)


def _cmd_run(args: argparse.Namespace) -> int:
    if args.dump_bpf:
        from nodeagent.redirect import ebpf

        src = ebpf.source()
        maps = os.path.join(args.bpf_pin_dir, args.node, f"maps-{ebpf.abi_of(src)}")
        print(f"// {src}, compiled by bcc with: {' '.join(ebpf.cflags(maps))}")
        print(src.read_text(), end="")
        return 0

    if args.source == "files" and not args.config:
        print("nodeagent run: --config DIR is required with --source files", file=sys.stderr)
        return 2
    if args.source != "files" and args.config:
        print("nodeagent run: --config is for --source files", file=sys.stderr)
        return 2
    if args.source != "kubernetes" and args.kubeconfig:
        print("nodeagent run: --kubeconfig is for --source kubernetes", file=sys.stderr)
        return 2
    from nodeagent.app import run_agent
    from nodeagent.config import AgentSettings

    settings = AgentSettings.from_args(args)
    return run_agent(settings)


EXIT_CONFIG_INVALID = 2
"""``config check``: the mesh would not load the config (as ``nodeagent run`` exits)."""


def _add_config(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    about = "check a mesh config before the agents load it"
    p = sub.add_parser("config", help=about, description=about[0].upper() + about[1:] + ".")
    cmds = p.add_subparsers(dest="config_command", required=True, metavar="COMMAND")
    c = cmds.add_parser(
        "check",
        help="print every error and warning of a config, and whether the mesh would load it",
        description="Read a config as the agents would (like istioctl analyze): a "
        "directory, or with --kubeconfig what a cluster's API server serves; print "
        "every error and every warning, one per line, naming the file, object and field, "
        "then a summary. Exit 0 when the mesh would load it (warnings allowed, e.g. kinds "
        "it does not serve, skipped), 2 when not.",
    )
    c.add_argument(
        "dir",
        nargs="?",
        default="",
        metavar="DIR",
        help="directory of mesh YAML files (as run --config)",
    )
    c.add_argument(
        "--kubeconfig",
        default="",
        metavar="FILE",
        help="check what the cluster's API server serves instead (every kind the agent "
        "watches, listed once), with this kubeconfig's current context (default: none: "
        "check DIR)",
    )
    c.set_defaults(func=_cmd_config_check)


def _cmd_config_check(args: argparse.Namespace) -> int:
    from nodeagent.control.check import check_directory

    if bool(args.dir) == bool(args.kubeconfig):
        print("nodeagent config check: give a DIR or --kubeconfig FILE", file=sys.stderr)
        return EXIT_CONFIG_INVALID
    if args.kubeconfig:
        return _config_check_cluster(Path(args.kubeconfig))
    report = check_directory(args.dir)
    for line in report.lines():
        print(line)
    return 0 if report.ok else EXIT_CONFIG_INVALID


def _config_check_cluster(kubeconfig: Path) -> int:
    from nodeagent.control.kube import KubeStartError
    from nodeagent.control.kubecheck import check_cluster

    try:
        report = check_cluster(kubeconfig)
    except ValueError as e:  # the credentials: names the kubeconfig already
        print(f"nodeagent config check: {e}", file=sys.stderr)
        return EXIT_CONFIG_INVALID
    except KubeStartError as e:
        print(f"nodeagent config check: {kubeconfig}: {e}", file=sys.stderr)
        return EXIT_CONFIG_INVALID
    for line in report.lines():
        print(line)
    return 0 if report.ok else EXIT_CONFIG_INVALID


def build_parser() -> argparse.ArgumentParser:
    import nodeagent.sandbox.cli as sandbox_cli
    from nodeagent import native
    from nodeagent.admin import ctl
    from nodeagent.cni import install as cni_install
    from nodeagent.dashboard import cli as dashboard_cli
    from nodeagent.identity import cli as ca_cli
    from nodeagent.identity import vmcli
    from nodeagent.samples import jwtmint, sampleapp

    parser = Parser(prog="nodeagent", description=DESCRIPTION, epilog=EPILOG)
    parser.add_argument("--version", action="version", version=f"nodeagent {__version__}")
    # the subcommands' modules take the base type; the parsers they get are Parser still
    sub = cast(
        "argparse._SubParsersAction[argparse.ArgumentParser]",
        parser.add_subparsers(dest="command", required=True, title="commands", metavar="COMMAND"),
    )
    _add_run(sub)
    _add_config(sub)
    sandbox_cli.add_parser(sub)
    ctl.add_parser(sub)
    dashboard_cli.add_parser(sub)
    ca_cli.add_parser(sub)
    vmcli.add_parser(sub)
    cni_install.add_parser(sub)
    sampleapp.add_parser(sub)
    jwtmint.add_parser(sub)
    native.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    # Before anything imports grpc, which reads it once: the agent forks only for
    # nsenter/iptables, and gRPC's fork handlers then log a line per fork, nothing more.
    os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")
    try:
        try:
            rc = _main(argv)
        finally:
            sys.stdout.flush()  # a reader gone (`| head`) shows here, not at interpreter exit
    except BrokenPipeError:
        _silence_stdout()
        return EXIT_BROKEN_PIPE
    return rc


def _main(argv: Sequence[str] | None) -> int:
    args = build_parser().parse_args(argv)
    try:
        rc: int = args.func(args)
    except KeyboardInterrupt:
        return 130
    return rc


def _silence_stdout() -> None:
    """Point stdout at /dev/null, so the interpreter's last flush has nowhere to fail."""
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):
        return  # not a real file (e.g. captured by a test): nothing will flush to a pipe
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, fd)
    os.close(devnull)


if __name__ == "__main__":
    sys.exit(main())
