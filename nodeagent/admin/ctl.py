"""``nodeagent ctl``: query a running agent over its node agent socket and print the answer.

Owns the ``ctl`` arguments, choosing the socket (``--socket``, ``--node`` or the only one
in /run/nodeagent), and the human formatting. The formatting functions are pure (dicts as
``AdminClient`` returns them in, text out; the current time is a parameter) so they are
tested without an agent. Errors go to stderr with exit code 1.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from nodeagent.admin import DEFAULT_SOCKET_DIR, default_socket_path
from nodeagent.errors import LocalStateError, NodeAgentError

__all__ = [
    "add_parser",
    "format_age",
    "format_bytes",
    "format_ca",
    "format_certs",
    "format_config",
    "format_connections",
    "format_duration",
    "format_requests",
    "format_services",
    "format_status",
    "format_table",
    "format_workloads",
    "render",
    "resolve_socket",
]

NONE = "<none>"
"""What a table shows for an empty value, as kubectl does."""

MAX_ENDPOINTS_SHOWN = 3
"""The ENDPOINTS column lists this many endpoints, then ``+ N more...`` (like kubectl)."""

COMMANDS = (
    "status",
    "workloads",
    "services",
    "connections",
    "requests",
    "config",
    "certs",
    "bpf",
)


# -- choosing the socket ------------------------------------------------------------------


def resolve_socket(
    node: str | None, socket_path: str | None, socket_dir: str = DEFAULT_SOCKET_DIR
) -> str:
    """The socket to talk to: ``--socket``, else ``--node``'s, else the only one in the dir."""
    if socket_path:
        return socket_path
    if node:
        return default_socket_path(node, socket_dir)
    found = sorted(Path(socket_dir).glob("*.sock"))
    if len(found) == 1:
        return str(found[0])
    if not found:
        raise NodeAgentError(
            f"no agent socket in {socket_dir}: is `nodeagent run` (or the sandbox) up? "
            "(or name one with --socket PATH)"
        )
    nodes = ", ".join(p.stem for p in found)
    raise NodeAgentError(
        f"several agents have sockets in {socket_dir} ({nodes}): "
        "choose one with --node NAME (or --socket PATH)"
    )


# -- pure formatting ----------------------------------------------------------------------


def format_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Left-aligned columns, three spaces apart, no trailing spaces, like ``kubectl get``."""
    widths = [len(h) for h in headers]
    for row in rows:
        for i, cell in enumerate(row):
            widths[i] = max(widths[i], len(cell))
    lines = []
    for row in [list(headers), *[list(r) for r in rows]]:
        cells = [cell.ljust(widths[i]) for i, cell in enumerate(row)]
        lines.append("   ".join(cells).rstrip())
    return "\n".join(lines)


def format_duration(seconds: float) -> str:
    """A short duration: ``45s``, ``3m12s``, ``2h5m``, ``3d4h``."""
    s = max(0, int(seconds))
    if s < 60:
        return f"{s}s"
    m, s = divmod(s, 60)
    if m < 60:
        return f"{m}m{s}s" if s else f"{m}m"
    h, m = divmod(m, 60)
    if h < 24:
        return f"{h}h{m}m" if m else f"{h}h"
    d, h = divmod(h, 24)
    return f"{d}d{h}h" if h else f"{d}d"


def format_age(at: float, now: float) -> str:
    """How long ago the Unix time ``at`` was (``<unknown>`` when it is not set)."""
    if at <= 0:
        return "<unknown>"
    return format_duration(now - at)


def format_bytes(n: int | float) -> str:
    """Bytes in binary units: ``512B``, ``1.5KiB``, ``20.0MiB``."""
    value = float(n)
    if value < 1024:
        return f"{int(value)}B"
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        value /= 1024
        if value < 1024 or unit == "TiB":
            break
    return f"{value:.1f}{unit}"


def _time(at: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(at))


def _s(value: Any) -> str:
    """A table cell: one line, ``<none>`` when empty."""
    text = "" if value is None else " ".join(str(value).splitlines())
    return text if text else NONE


def format_status(status: Mapping[str, Any], now: float) -> str:
    """``kubectl describe``-style lines for ``AdminClient.status()``."""
    cfg: Mapping[str, Any] = status.get("config") or {}
    loaded_at = float(cfg.get("loaded_at") or 0)
    loaded = f"{_time(loaded_at)} ({format_age(loaded_at, now)} ago)" if loaded_at > 0 else NONE
    error = str(cfg.get("last_error") or "")
    error_at = float(cfg.get("last_error_at") or 0)
    if error and error_at > 0:
        error = f"{error} ({format_age(error_at, now)} ago)"
    sources = [str(s) for s in cfg.get("sources") or []]
    fields: list[tuple[str, str]] = [
        ("Node", _s(status.get("node"))),
        ("Version", _s(status.get("version"))),
        ("Ready", "true" if status.get("ready") else "false"),
        ("Uptime", format_duration(float(status.get("uptime_seconds") or 0))),
        ("CPU", f"{float(status.get('cpu_percent') or 0):.1f}%"),
        ("Memory (RSS)", format_bytes(int(status.get("memory_rss_bytes") or 0))),
        ("Redirect mode", _s(status.get("redirect_mode"))),
        *([("CA", format_ca(status["ca"], now))] if status.get("ca") else []),
        ("Config source", _s(cfg.get("source") or "files")),
        ("Config version", _s(cfg.get("version", 0))),
        ("Config loaded", loaded),
        ("Config sources", sources[0] if sources else NONE),
    ]
    width = max(len(k) for k, _ in fields) + 2
    lines = [f"{k + ':':<{width}}{v}" for k, v in fields]
    lines.extend(f"{'':<{width}}{s}" for s in sources[1:])
    error_lines = error.splitlines() or [NONE]
    lines.append(f"{'Last error:':<{width}}{error_lines[0]}")
    lines.extend(f"{'':<{width}}{line}" for line in error_lines[1:])
    warnings = [str(w) for w in cfg.get("warnings") or []]
    lines.append(f"{'Warnings:':<{width}}{warnings[0] if warnings else NONE}")
    lines.extend(f"{'':<{width}}{w}" for w in warnings[1:])
    jwks = list(status.get("jwks") or [])
    if jwks:
        lines.append("JWKS:")
        lines.extend(f"  {format_jwks(j)}" for j in jwks)
    watches = list(cfg.get("watches") or [])
    if watches:
        lines.append("Watches:")
        lines.extend(f"  {format_watch(w, now)}" for w in watches)
    workers = list(status.get("workers") or [])
    if workers:
        lines.append("Workers:")
        lines.extend(f"  {line}" for line in format_workers(workers))
    limits = list(status.get("limits") or [])
    if limits:
        lines.append("Limits:")
        lines.extend(f"  {line}" for line in format_limits(limits))
    return "\n".join(lines)


def format_workers(workers: list[Mapping[str, Any]]) -> list[str]:
    """A table of the processes serving connections (``--workers``): 0 is the main one."""
    rows = [("WORKER", "PID", "STATE", "RSS", "CPU", "CONNECTIONS", "RESTARTS")] + [
        (
            str(int(w.get("index") or 0)),
            str(int(w.get("pid") or 0)) if w.get("pid") else "-",
            _s(w.get("state")),
            format_bytes(int(w.get("memory_rss_bytes") or 0)),
            f"{float(w.get('cpu_percent') or 0):.1f}%",
            str(int(w.get("connections") or 0)),
            str(int(w.get("restarts") or 0)),
        )
        for w in workers
    ]
    return format_table(list(rows[0]), [list(r) for r in rows[1:]]).splitlines()


def format_limits(limits: list[Mapping[str, Any]]) -> list[str]:
    """A table of limits: what, value, the flag that sets it, hits since start."""
    rows = [("LIMIT", "VALUE", "FLAG", "HITS")] + [
        (
            _s(x.get("name")),
            _s(x.get("value")),
            str(x.get("flag") or "-"),
            str(int(x.get("hits") or 0)),
        )
        for x in limits
    ]
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    return [
        f"{r[0]:<{widths[0]}}  {r[1]:<{widths[1]}}  {r[2]:<{widths[2]}}  {r[3]}".rstrip()
        for r in rows
    ]


def format_watch(watch: Mapping[str, Any], now: float) -> str:
    """One line per watched kind: state, objects, resourceVersion, lag, last event, error."""
    last = float(watch.get("last_event_at") or 0)
    parts = [
        f"{_s(watch.get('kind'))}: {_s(watch.get('state'))}",
        f"{int(watch.get('objects') or 0)} object(s)",
        f"rv {_s(watch.get('resource_version'))}",
        f"lag {float(watch.get('lag_seconds') or 0) * 1000:.0f}ms",
        f"last event {format_age(last, now)} ago" if last > 0 else "no event yet",
    ]
    relists = int(watch.get("relists") or 0)
    if relists:
        parts.append(f"{relists} relist{'s' if relists > 1 else ''}")
    error = " ".join(str(watch.get("last_error") or "").splitlines())
    if error:
        parts.append(f"last error: {error}")
    return ", ".join(parts)


def format_jwks(jwks: Mapping[str, Any]) -> str:
    """One line per jwksUri: its keys, and why the last fetch failed."""
    text = f"{_s(jwks.get('uri'))}: {int(jwks.get('keys') or 0)} key(s)"
    error = " ".join(str(jwks.get("last_error") or "").splitlines())
    return f"{text}; last fetch failed: {error}" if error else text


def format_ca(ca: Mapping[str, Any], now: float) -> str:
    """One line on the mesh CA: reachable, or unreachable since when and why."""
    state = str(ca.get("state") or "unknown")
    address = str(ca.get("address") or "")
    at = f" ({address})" if address else ""
    error = " ".join(str(ca.get("last_error") or "").splitlines())
    error_at = float(ca.get("last_error_at") or 0)
    if state == "disabled":
        return "disabled (no CA configured)"
    if state == "unreachable":
        since = float(ca.get("unreachable_since") or error_at)
        when = f" since {_time(since)} ({format_age(since, now)} ago)" if since > 0 else ""
        return f"unreachable{when}: {error or 'no answer'}"
    if state == "reachable":
        text = f"reachable{at}"
        if error and error_at > 0:
            text += f"; last error {format_age(error_at, now)} ago: {error}"
        return text
    return f"not contacted yet{at}"


def _renews_in(cert: Mapping[str, Any]) -> str:
    state = str(cert.get("state") or "")
    due = float(cert.get("renews_in_seconds") or 0)
    if state == "pending":
        return f"pending, retry in {format_duration(due)}" if cert.get("last_error") else "pending"
    if state == "expired":
        return f"EXPIRED, retry in {format_duration(due)}"
    if state == "renewing":
        return f"overdue, retry in {format_duration(due)}"
    return format_duration(due)


def format_certs(data: Mapping[str, Any], now: float) -> str:
    """One row per identity held, then the CA's state (``AdminClient.certs()``)."""
    certs: Sequence[Mapping[str, Any]] = data.get("certificates") or []
    headers = ["IDENTITY", "SERIAL", "NOT BEFORE", "NOT AFTER", "RENEWS IN"]
    rows = [
        [
            _s(c.get("identity")),
            _s(c.get("serial")),
            _time(float(c["not_before"])) if c.get("not_before") else NONE,
            _time(float(c["not_after"])) if c.get("not_after") else NONE,
            _renews_in(c),
        ]
        for c in certs
    ]
    table = format_table(headers, rows) if rows else "No certificates found."
    errors = [f"{c.get('identity')}: {c.get('last_error')}" for c in certs if c.get("last_error")]
    lines = [table, "", f"CA: {format_ca(data.get('ca') or {}, now)}"]
    if errors:
        lines += ["", "Errors:", *(f"  {' '.join(e.splitlines())}" for e in errors)]
    return "\n".join(lines)


def format_workloads(workloads: Sequence[Mapping[str, Any]]) -> str:
    """One row per workload (pod or WorkloadEntry): where it runs (``-``: a remote entry,
    served by no agent of the mesh), its address, identity and capture state."""
    headers = ["NAMESPACE", "NAME", "KIND", "NODE", "IP", "LOCAL", "CAPTURE", "IDENTITY"]
    rows = []
    for w in workloads:
        kind = w.get("kind") or "Pod"
        remote = kind != "Pod" and not w.get("node")
        rows.append(
            [
                _s(w.get("namespace")),
                _s(w.get("name")),
                kind,
                "-" if remote else _s(w.get("node")),
                _s(w.get("ip")),
                "yes" if w.get("local") else "no",
                _s(w.get("capture")) if w.get("local") and w.get("capture") else "-",
                _s(w.get("identity")),
            ]
        )
    return format_table(headers, rows)


def _endpoints(endpoints: Sequence[Mapping[str, Any]]) -> str:
    if not endpoints:
        return NONE
    addrs = [f"{e.get('ip')}:{e.get('port')}" for e in endpoints]
    shown = ",".join(addrs[:MAX_ENDPOINTS_SHOWN])
    more = len(addrs) - MAX_ENDPOINTS_SHOWN
    return f"{shown} + {more} more..." if more > 0 else shown


def format_services(services: Sequence[Mapping[str, Any]]) -> str:
    """One row per service port, with the endpoints of that port."""
    headers = ["NAMESPACE", "NAME", "CLUSTER-IP", "PORT", "TARGET", "APP-PROTOCOL", "ENDPOINTS"]
    rows: list[list[str]] = []
    for svc in services:
        ports: Sequence[Mapping[str, Any]] = svc.get("ports") or []
        base = [_s(svc.get("namespace")), _s(svc.get("name")), _s(svc.get("cluster_ip"))]
        if not ports:
            rows.append([*base, NONE, NONE, NONE, NONE])
            continue
        for p in ports:
            port = f"{p.get('port')}/{p.get('protocol') or 'TCP'}"
            if p.get("name"):
                port = f"{p.get('name')}:{port}"
            rows.append(
                [
                    *base,
                    port,
                    _s(p.get("target_port")),
                    _s(p.get("app_protocol")),
                    _endpoints(p.get("endpoints") or []),
                ]
            )
    return format_table(headers, rows)


def format_connections(connections: Sequence[Mapping[str, Any]], now: float) -> str:
    """One row per live connection, with byte counts and age."""
    headers = [
        "ID",
        "WORKER",
        "DIRECTION",
        "POD",
        "SOURCE",
        "DESTINATION",
        "UPSTREAM",
        "SERVICE",
        "PEER",
        "SENT",
        "RECEIVED",
        "AGE",
    ]
    rows = [
        [
            _s(c.get("id")),
            str(int(c.get("worker") or 0)),
            _s(c.get("direction")),
            _s(c.get("pod")),
            _s(c.get("source")),
            _s(c.get("destination")),
            _s(c.get("upstream")),
            _s(c.get("service")),
            _s(c.get("peer_workload")),
            format_bytes(int(c.get("bytes_sent") or 0)),
            format_bytes(int(c.get("bytes_received") or 0)),
            format_age(float(c.get("opened_at") or 0), now),
        ]
        for c in connections
    ]
    return format_table(headers, rows)


def format_requests(data: Mapping[str, Any]) -> str:
    """The last HTTP requests (one row each, newest last) and the ejected endpoints."""
    headers = [
        "TIME",
        "SOURCE",
        "METHOD",
        "AUTHORITY",
        "PATH",
        "CODE",
        "FLAGS",
        "TRIES",
        "UPSTREAM",
        "ROUTE",
        "MS",
    ]
    records = list(data.get("records") or [])
    workers = any("worker" in r for r in records)  # (--workers: which process served it)
    rows = [
        [
            _s(r.get("start_time"))[11:23],
            *([_s(r.get("worker"))] if workers else []),
            _s(r.get("source_workload")),
            _s(r.get("method")),
            _s(r.get("authority")),
            _s(r.get("path"))[:40],
            _s(r.get("response_code")),
            _s(r.get("response_flags")),
            _s(r.get("attempts")),
            _s(r.get("upstream_host")),
            _s(r.get("route_name")),
            _s(r.get("duration", r.get("duration_ms"))),  # (duration_ms: an older agent's)
        ]
        for r in records
    ]
    if workers:
        headers.insert(1, "WORKER")
    out = format_table(headers, rows) if rows else "No requests yet."
    ejected = [
        [
            _s(e.get("cluster")),
            _s(e.get("endpoint")),
            f"{float(e.get('returns_in_seconds') or 0):.1f}s",
        ]
        for e in data.get("ejected") or []
    ]
    if ejected:
        out += "\n\nEjected by outlier detection:\n"
        out += format_table(["CLUSTER", "ENDPOINT", "RETURNS IN"], ejected)
    return out


def format_bpf(data: Mapping[str, Any]) -> str:
    """The eBPF capture: programs, attachments per pod, map sizes, counters."""
    out = [f"Capture mode:  {data.get('mode')}"]
    if "programs" not in data:
        return out[0]
    out.append(f"Pins:          {data.get('pin_dir')}")
    if data.get("maps_dir"):
        out.append(f"Maps:          {data.get('maps_dir')} (of the programs loaded now)")
    out.append(f"Local bypass:  {data.get('bypass')} (sockmap; new connections follow it)")
    if data.get("outbound"):
        out.append(f"Outbound:      {data.get('outbound')}")
    progs = data.get("programs") or {}
    out.append("")
    out.append(
        format_table(
            ["PROGRAM", "FUNCTION", "ID"],
            [[k, _s(v.get("name")), _s(v.get("id"))] for k, v in progs.items()],
        )
    )
    out.append("")
    rows = [[pod, ", ".join(keys)] for pod, keys in (data.get("attachments") or {}).items()]
    out.append(format_table(["ATTACHED TO", "PROGRAMS"], rows))
    out.append("")
    maps = data.get("maps") or {}
    out.append(
        format_table(
            ["MAP", "ENTRIES", "CONTENT"],
            [
                [k, _s(v.get("entries")), ", ".join((v.get("addresses") or [])[:8])]
                for k, v in maps.items()
            ],
        )
    )
    stats = data.get("stats") or {}
    out.append("")
    out.append("Counters:      " + ", ".join(f"{k} {v}" for k, v in stats.items()))
    return "\n".join(out)


def format_config(dump: Mapping[str, Any]) -> str:
    """A summary of ``AdminClient.config_dump()``: one row per object."""
    rows = []
    for obj in dump.get("objects") or []:
        meta = obj.get("metadata") if isinstance(obj, Mapping) else None
        meta = meta if isinstance(meta, Mapping) else {}
        kind = obj.get("kind") if isinstance(obj, Mapping) else None
        api = obj.get("apiVersion") if isinstance(obj, Mapping) else None
        rows.append([_s(kind), _s(meta.get("namespace")), _s(meta.get("name")), _s(api)])
    table = format_table(["KIND", "NAMESPACE", "NAME", "API-VERSION"], rows)
    return f"Config version: {dump.get('version', 0)}\n\n{table}"


def render(command: str, data: Any, output: str, now: float) -> str:
    """The text ``nodeagent ctl COMMAND -o OUTPUT`` prints for ``data``."""
    if output == "json":
        return json.dumps(data, indent=2, sort_keys=False)
    if isinstance(data, list) and not data:
        return f"No {command} found."
    formatters: dict[str, Callable[[Any], str]] = {
        "status": lambda d: format_status(d, now),
        "workloads": format_workloads,
        "services": format_services,
        "connections": lambda d: format_connections(d, now),
        "requests": format_requests,
        "config": format_config,
        "certs": lambda d: format_certs(d, now),
        "bpf": format_bpf,
    }
    return formatters[command](data)


# -- the command --------------------------------------------------------------------------


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``nodeagent ctl`` and its subcommands."""
    p = sub.add_parser(
        "ctl",
        help="query a running agent over its node agent socket",
        description="Query a running agent over its node agent socket.",
    )
    where = p.add_mutually_exclusive_group()
    where.add_argument(
        "--node",
        default=None,
        metavar="NAME",
        help=f"the agent of this node ({DEFAULT_SOCKET_DIR}/NAME.sock) (default: see --socket)",
    )
    where.add_argument(
        "--socket",
        default=None,
        metavar="PATH",
        help=f"node agent socket path (default: the only *.sock in {DEFAULT_SOCKET_DIR})",
    )
    p.add_argument(
        "--timeout",
        type=float,
        default=5.0,
        metavar="SECONDS",
        help="how long to wait for an answer",
    )
    _add_output(p, default=None)
    csub = p.add_subparsers(dest="ctl_command", required=True, metavar="COMMAND")
    helps = {
        "status": "the agent: version, readiness, resource use, config state",
        "workloads": "every pod and WorkloadEntry: identity, (on this node) capture state",
        "services": "every service port with its endpoints",
        "connections": "live proxied connections on this node",
        "requests": "the last HTTP requests routed here (access log) and ejected endpoints",
        "config": "the raw config objects the agent serves (JSON by default)",
        "certs": "the workload certificates this agent holds, and its CA's state "
        "(-o json adds each chain)",
        "bpf": "the eBPF capture: programs, attachments per pod, maps, counters",
    }
    for name in COMMANDS:
        cp = csub.add_parser(name, help=helps[name], description=helps[name])
        _add_output(cp, default=argparse.SUPPRESS)
        cp.set_defaults(func=_cmd_ctl)
        if name == "bpf":
            cp.add_argument(
                "--bypass",
                choices=["on", "off"],
                default="",
                help="switch the local socket bypass (sockmap) for new connections first "
                "(default: leave it as it is)",
            )
    _add_explain(csub)


def _add_explain(csub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    about = (
        "why a request from a pod to a host would be routed where it goes and allowed or "
        "denied: route, endpoints and the load balancer's pick, PeerAuthentication, JWT, "
        "each AuthorizationPolicy, rate limits, verdict (nothing is sent)"
    )
    ep = csub.add_parser(
        "explain",
        help=about,
        description=f"{about}. Exit status: 0 allowed, 3 denied, 1 a bad question.",
    )
    ep.add_argument(
        "--from",
        dest="from_pod",
        required=True,
        metavar="POD",
        help="the calling pod or WorkloadEntry: namespace/name, or a unique name",
    )
    ep.add_argument(
        "--to",
        required=True,
        metavar="HOST[:PORT]",
        help="a service (short or FQDN), a cluster IP or a pod IP",
    )
    ep.add_argument("--method", default="GET", help="the request's HTTP method")
    ep.add_argument("--path", default="/", help="the request's path, with its query if any")
    ep.add_argument(
        "--header",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a request header (repeat for more)",
    )
    ep.add_argument(
        "--jwt",
        default=None,
        metavar="FILE",
        help="a file holding a JWT, presented as 'authorization: Bearer' (default: no token)",
    )
    _add_output(ep, default=argparse.SUPPRESS)
    ep.set_defaults(func=_cmd_explain)


def _cmd_explain(args: argparse.Namespace) -> int:
    from nodeagent.admin.client import AdminClient
    from nodeagent.admin.explain_text import format_explain

    try:
        token = ""
        if args.jwt:
            try:
                with open(args.jwt, encoding="utf-8") as f:
                    token = f.read().strip()
            except OSError as e:
                raise LocalStateError(f"--jwt {args.jwt}: {e.strerror}") from None
        path = resolve_socket(args.node, args.socket)
        with AdminClient(path, timeout=args.timeout) as client:
            data = client.explain(
                args.from_pod,
                args.to,
                method=args.method,
                path=args.path,
                headers=tuple(args.header),
                jwt=token,
            )
    except NodeAgentError as e:
        print(f"nodeagent ctl explain: error: {e}", file=sys.stderr)
        return 1
    if (args.output or "table") == "json":
        print(json.dumps(data, indent=2))
    else:
        print(format_explain(data))
    allowed = bool((data.get("verdict") or {}).get("allowed"))
    return 0 if allowed else 3


def _add_output(p: argparse.ArgumentParser, default: Any) -> None:
    p.add_argument(
        "-o",
        "--output",
        choices=["table", "json"],
        default=default,
        help="output format (default: table; json for config)",
    )


def _cmd_ctl(args: argparse.Namespace) -> int:
    from nodeagent.admin.client import AdminClient

    command: str = args.ctl_command
    output: str = args.output or ("json" if command == "config" else "table")
    try:
        path = resolve_socket(args.node, args.socket)
        with AdminClient(path, timeout=args.timeout) as client:
            fetch: dict[str, Callable[[], Any]] = {
                "status": client.status,
                "workloads": client.workloads,
                "services": client.services,
                "connections": client.connections,
                "requests": client.requests,
                "config": client.config_dump,
                "certs": client.certs,
                "bpf": lambda: client.bpf(getattr(args, "bypass", "")),
            }
            data = fetch[command]()
    except NodeAgentError as e:
        print(f"nodeagent ctl: error: {e}", file=sys.stderr)
        return 1
    print(render(command, data, output, now=time.time()))
    return 0
