"""Views of a running agent, as the node agent socket reports them.

``AgentView`` is what the admin layer may ask of the agent; ``app.py`` implements it.
``PodHandoff`` is the one part the socket may change: the pods a CNI plugin hands over.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from nodeagent.model.snapshot import MeshSnapshot


@dataclass(frozen=True)
class ConfigStatus:
    """Where the config stands: the version serving now and the last error, if any."""

    version: int
    loaded_at: float
    """Unix time the serving snapshot was published."""
    sources: tuple[str, ...]
    last_error: str = ""
    """Empty when the last load succeeded; otherwise why the last edit was rejected."""
    last_error_at: float = 0.0
    warnings: tuple[str, ...] = ()
    """What loaded but is worth a look (a kind the mesh does not serve, skipped)."""
    watches: tuple[WatchStatus, ...] = ()
    """The Kubernetes API source's list-and-watch of each kind (none in file mode)."""
    source: str = "files"
    """``files`` or ``kubernetes``."""


@dataclass(frozen=True)
class WatchStatus:
    """One kind's list-and-watch of the Kubernetes API."""

    kind: str
    """``v1 Pod``, ``networking.istio.io/v1 VirtualService``, …"""
    state: str
    """``listing``, ``watching``, ``backoff`` (API server away; the last snapshot serves),
    ``unserved`` (the API server does not serve the kind: its CRD is not installed) or
    ``stopped``."""
    resource_version: str = ""
    objects: int = 0
    last_event_at: float = 0.0
    """Unix time of the last event or bookmark received (0 when none yet)."""
    lag_seconds: float = 0.0
    """From the arrival of the oldest event the last snapshot waited for to that
    snapshot being served."""
    last_error: str = ""
    relists: int = 0
    """Lists after the first (a 410 Gone: the watch could not resume)."""


@dataclass(frozen=True)
class ConnectionInfo:
    """One live proxied connection."""

    id: int
    direction: str
    """``outbound``, ``inbound`` or ``passthrough``."""
    pod: str
    """The local pod (namespace/name) whose listener accepted the connection."""
    source: str
    """ip:port of the client."""
    destination: str
    """ip:port the client dialled (the original destination)."""
    upstream: str
    """ip:port the proxy connected to."""
    service: str
    """namespace/name of the service, or empty."""
    peer_workload: str
    """namespace/name of the workload at the other end, or empty."""
    bytes_sent: int
    """Bytes from client to upstream so far."""
    bytes_received: int
    """Bytes from upstream to client so far."""
    opened_at: float
    worker: int = 0
    """The process that serves it: 0 the main one, 1… the worker processes
    (``--workers``)."""


@dataclass(frozen=True)
class WorkerStatus:
    """One process serving connections (``--workers``): 0 is the main one."""

    index: int
    pid: int
    state: str
    """``serving``, ``starting``, ``restarting: …`` (it died, and why)."""
    rss_bytes: int = 0
    cpu_percent: float = 0.0
    """CPU use since the previous ``ctl status`` (100: one core)."""
    connections: int = 0
    restarts: int = 0


@dataclass(frozen=True)
class LimitStatus:
    """One limit the agent holds clients and config to, and how often it was hit."""

    name: str
    """What is limited, e.g. ``HTTP/1.1 request head timeout``."""
    value: str
    """Its value as set (``10s``, ``100``, ``64 per identity``)."""
    flag: str
    """The ``nodeagent run`` flag that sets it; empty when fixed."""
    metric: str
    """The metric (with its labels) that counts the hits."""
    hits: int
    """Times it was hit since the agent started (the metric's count)."""


@dataclass(frozen=True)
class ExplainQuery:
    """``nodeagent ctl explain``'s question: a request from a pod to a host."""

    from_pod: str
    """``namespace/name`` or a unique ``name``."""
    to: str
    """``host[:port]``: a service name (short or FQDN), a cluster IP or a pod IP."""
    method: str = "GET"
    path: str = "/"
    headers: tuple[tuple[str, str], ...] = ()
    """Request headers (a JWT goes in as ``authorization: Bearer …``)."""


class AgentView(Protocol):
    """What the admin layer (node agent socket, metrics) may read from the agent."""

    node: str
    started_at: float

    def snapshot(self) -> MeshSnapshot: ...

    def config_status(self) -> ConfigStatus: ...

    def connections(self) -> list[ConnectionInfo]:
        """Every process's live connections (the workers' as of the last ``refresh``)."""
        ...

    async def refresh(self) -> None:
        """Ask the worker processes (``--workers``) what they hold now: connections,
        metrics, RSS and CPU; nothing to ask without them."""
        ...

    def workers(self) -> list[WorkerStatus]:
        """The processes serving connections: the main one (0), then each worker."""
        ...

    def ready(self) -> bool: ...

    def redirect_mode(self) -> str: ...

    def config_dump(self) -> list[dict[str, Any]]:
        """The raw config objects of the serving snapshot, as loaded from YAML."""
        ...

    def local_pods(self) -> list[dict[str, Any]]:
        """Per local pod: key, ip, netns, capture state (``ready`` or an error)."""
        ...

    def certificates(self) -> list[dict[str, Any]]:
        """Per workload identity held: ``CertificateStore.describe()`` (empty without a CA)."""
        ...

    def recent_requests(self, limit: int) -> list[dict[str, Any]]:
        """The last ``limit`` access-log records (all kept when 0), newest last."""
        ...

    def ejections(self) -> list[tuple[str, str, float]]:
        """(cluster, endpoint, seconds until return) of every ejected endpoint."""
        ...

    def ca_status(self) -> dict[str, Any]:
        """How the mesh CA is doing: ``CertificateStore.status()``, or
        ``{"state": "disabled"}`` when the agent has no CA."""
        ...

    def jwks_status(self) -> list[dict[str, Any]]:
        """Per jwksUri fetched over http(s): ``uri``, ``keys``, ``last_error``."""
        ...

    def limits(self) -> list[LimitStatus]:
        """Every limit on clients and config: its value and how often it was hit."""
        ...

    def bpf_state(self, bypass: bool | None = None) -> dict[str, Any]:
        """The eBPF capture's programs, attachments, maps and counters (``mode``
        iptables and nothing else when it is not in use); with ``bypass``, first switch
        the local socket bypass (``LocalStateError`` when not in eBPF mode)."""
        ...

    def explain(self, query: ExplainQuery) -> dict[str, Any]:
        """Why ``query`` would be routed, allowed or denied (JSON-ready); raises
        ``ValueError`` with a message for the user when it names nothing known."""
        ...


@dataclass(frozen=True)
class CniPod:
    """A pod as the CNI plugin hands it over (ADD, DEL, CHECK)."""

    namespace: str
    name: str
    uid: str = ""
    container_id: str = ""
    netns: str = ""
    """The path of the pod's network namespace (``CNI_NETNS``)."""
    ips: tuple[str, ...] = ()
    """The pod's addresses from the chain's ``prevResult``, first IPv4 first."""
    cgroup: str = ""
    """The pod's cgroup v2 directory; empty when the plugin found none."""

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"


@dataclass(frozen=True)
class CniAnswer:
    """What the agent says of a handed-over pod."""

    captured: bool
    state: str
    """``ready``, ``not captured (opted out): ...``, ``released``, ``pending: ...``, …"""
    mode: str = ""
    """The capture in place (``iptables``, ``eBPF``), empty when not captured."""


class PodHandoff(Protocol):
    """The pods a CNI plugin hands the agent; each call raises ``LocalStateError`` with a
    message for the plugin's error when the agent cannot do what was asked."""

    async def add(self, pod: CniPod, timeout: float) -> CniAnswer:
        """Record the pod's runtime and answer once it is captured (or opted out);
        ``timeout`` bounds the wait for the pod to show up and be captured."""
        ...

    async def remove(self, pod: CniPod) -> bool:
        """Release the pod; False when the agent did not hold it (idempotent)."""
        ...

    async def check(self, pod: CniPod) -> CniAnswer:
        """Whether the pod is captured as ADD left it."""
        ...
