"""Agent settings: one frozen dataclass, loaded and validated once at start."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class AgentSettings:
    node: str
    config_dir: Path | None
    """``--config``: the directory of YAML files (``source`` files); None otherwise."""
    pods_file: Path | None = None
    source: str = "files"
    """Where the mesh config comes from: ``files`` (``config_dir``) or ``kubernetes``."""
    kubeconfig: Path | None = None
    """``--kubeconfig``; None with ``source`` kubernetes: the pod's ServiceAccount."""
    watch_timeout: int = 300
    """Seconds a Kubernetes watch request lasts before it is resumed (``timeoutSeconds``)."""
    netns: str = ""
    """Network namespace the agent enters at start (the node's); empty: stay."""
    socket_path: str = ""
    state_dir: Path = Path("/var/lib/nodeagent")
    redirect: str = ""
    """``--redirect``; empty: the node's ``nodeagent.io/redirect`` annotation, else
    auto (``app.capture_settings``)."""
    bpf_pin_dir: str = "/sys/fs/bpf/nodeagent"
    """Where eBPF capture pins its maps and links (``<dir>/<node>``)."""
    workload_cgroup_root: str = ""
    """Host mode: the directory a WorkloadEntry's ``nodeagent.io/cgroup`` path starts
    from; empty: the cgroup v2 mount (a host's systemd units are there)."""
    bpf_bypass: bool | None = None
    """eBPF mode: the local legs (app ↔ proxy inside a pod) skip TCP/IP (sockmap).
    None: the node's ``nodeagent.io/bpf-bypass`` annotation, else off."""
    log_level: str = "info"
    connect_timeout: float = 5.0
    reload_interval: float = 0.5
    metrics_port: int = 15020
    ready_port: int = 15021
    drain_seconds: float = 5.0
    workers: int = 1
    """``--workers``: processes serving connections, the main one included (1: the
    main process alone; ``workers/``)."""
    ca_addr: str = ""
    """The mesh CA; empty means no identities: plain TCP between nodes."""
    ca_server_name: str = ""
    """The name the CA's TLS certificate must carry; empty: the host of ``ca_addr``."""
    ca_token_file: str = ""
    trust_bundle: str = ""
    jwks_ca_bundle: str = ""
    """PEM roots for ``https://`` jwksUri servers; empty: the system trust store."""
    trust_domain: str = "cluster.local"
    cert_lifetime: float = 86400.0
    root_namespace: str = "istio-system"
    path_normalization: str = "BASE"
    """Istio's ``meshConfig.pathNormalization``: ``NONE``, ``BASE``, ``MERGE_SLASHES`` or
    ``DECODE_AND_MERGE_SLASHES`` (``core/paths.py``)."""
    request_headers_timeout: float = 10.0
    http_idle_timeout: float = 3600.0
    max_request_headers: int = 100
    max_request_headers_kb: int = 60
    max_connections: int = 100_000
    max_connections_per_listener: int = 20_000
    hbone_idle_timeout: float = 3600.0
    hbone_preface_timeout: float = 10.0
    access_log: str = "-"
    """Where the per-request JSON access log goes: ``-`` stdout, a file path, or ``off``."""
    otlp_endpoint: str = ""
    """``--otlp-endpoint``: the OTLP/gRPC collector spans go to; empty: no spans."""
    handover: bool = True
    """Take the listeners of a running agent of this node over at start, and hand ours
    to the next one (``proxy/handover.py``); False: always a cold start."""
    handover_socket: Path | None = None
    """The hand-over socket; None: ``handover.sock`` in the state dir."""
    after_handover: str = "exit"
    """Once the listeners are handed over and drained: ``exit``, or ``wait`` for SIGTERM
    (a DaemonSet pod, which the kubelet would restart if it exited)."""
    dns_proxy: bool = True
    """``--dns-proxy``: the DNS proxy on each local pod's port 15053, its port 53 captured."""
    dns_upstreams: tuple[tuple[str, int], ...] | None = None
    """``--dns-upstream``; None: the nameservers of the node's ``/etc/resolv.conf``."""
    dns_timeout: float = 5.0
    pid_file: str = ""
    """Where to write the agent's pid (the CNI launcher of ``cni install
    --agent-pid-file`` enters its mount namespace); empty: nowhere."""

    @property
    def runtime_file(self) -> Path:
        """The pod runtime file: ``--pods``, else ``pods.json`` in the state dir (where the
        CNI plugin's pods are recorded, so they stay captured across a restart)."""
        return self.pods_file if self.pods_file is not None else self.state_dir / "pods.json"

    @property
    def handover_path(self) -> Path:
        return self.handover_socket or self.state_dir / "handover.sock"

    @property
    def mtls(self) -> bool:
        return bool(self.ca_addr)

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> AgentSettings:
        node = args.node
        return cls(
            node=node,
            config_dir=Path(args.config).resolve() if args.config else None,
            pods_file=Path(args.pods).resolve() if args.pods else None,
            source=args.source,
            kubeconfig=Path(args.kubeconfig).resolve() if args.kubeconfig else None,
            netns=args.netns,
            socket_path=args.socket or f"/run/nodeagent/{node}.sock",
            state_dir=Path(args.state_dir) if args.state_dir else Path("/var/lib/nodeagent"),
            redirect=args.redirect or "",
            bpf_pin_dir=args.bpf_pin_dir,
            workload_cgroup_root=args.workload_cgroup_root,
            bpf_bypass=None if args.bpf_bypass is None else args.bpf_bypass == "on",
            log_level=args.log_level,
            ca_addr=args.ca_addr,
            ca_server_name=args.ca_server_name,
            ca_token_file=args.ca_token_file,
            trust_bundle=args.trust_bundle,
            jwks_ca_bundle=args.jwks_ca_bundle,
            trust_domain=args.trust_domain,
            cert_lifetime=float(args.cert_lifetime),
            root_namespace=args.root_namespace,
            path_normalization=getattr(args, "path_normalization", cls.path_normalization),
            request_headers_timeout=float(args.request_headers_timeout),
            http_idle_timeout=float(args.http_idle_timeout),
            max_request_headers=args.max_request_headers,
            max_request_headers_kb=args.max_request_headers_kb,
            max_connections=getattr(args, "max_connections", cls.max_connections),
            max_connections_per_listener=getattr(
                args, "max_connections_per_listener", cls.max_connections_per_listener
            ),
            hbone_idle_timeout=float(getattr(args, "hbone_idle_timeout", cls.hbone_idle_timeout)),
            hbone_preface_timeout=float(
                getattr(args, "hbone_preface_timeout", cls.hbone_preface_timeout)
            ),
            access_log=args.access_log,
            otlp_endpoint=getattr(args, "otlp_endpoint", ""),
            pid_file=getattr(args, "pid_file", ""),
            drain_seconds=float(getattr(args, "drain_seconds", cls.drain_seconds)),
            workers=int(getattr(args, "workers", cls.workers)),
            handover=getattr(args, "handover", "on") == "on",
            handover_socket=Path(args.handover_socket)
            if getattr(args, "handover_socket", "")
            else None,
            after_handover=getattr(args, "after_handover", "exit"),
            dns_proxy=getattr(args, "dns_proxy", "on") == "on",
            dns_upstreams=getattr(args, "dns_upstream", None),
            dns_timeout=float(getattr(args, "dns_timeout", cls.dns_timeout)),
        )
