"""What the proxy's parts share: one bundle of inputs, and the two interfaces through which
the data path reaches the node, a ``Capture`` and a ``SocketFactory``.

The composition root (``nodeagent.app``) picks the implementations (``redirect/``: iptables
or eBPF capture, sockets inside each pod's netns); a test hands others (listeners on
loopback, destinations it recorded) and runs the real proxy without privileges, as
ztunnel's ``ProxyInputs`` and socket factory allow. Nothing here opens a socket: this
module only names what the proxy needs, so that ``proxy/`` never imports ``redirect/``.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Awaitable, Callable, Coroutine, Set
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from nodeagent.core.paths import BASE
from nodeagent.model.objects import HostWorkload, Pod, PodRuntime
from nodeagent.model.snapshot import MeshSnapshot
from nodeagent.proxy.connections import ConnectionTable
from nodeagent.proxy.dns import DnsSettings
from nodeagent.proxy.identity import MeshIdentity
from nodeagent.telemetry.accesslog import AccessLog
from nodeagent.telemetry.metrics import Metrics

if TYPE_CHECKING:  # the OpenTelemetry SDK only where spans are exported
    from nodeagent.proxy.spanexport import SpanExport

OUTBOUND_PORT = 15001
"""The outbound listener's port, on 127.0.0.1 in each pod's network."""
INBOUND_PORT = 15006
"""The plaintext inbound listener's port, in each pod's network."""

Addr = tuple[str, int]
Excluded = tuple[frozenset[int], frozenset[int]]
"""(outbound, inbound) ports a pod's annotations leave out of capture."""


class PodSockets(Protocol):
    """Sockets in one pod's network; ``close`` when the pod leaves."""

    def listen(self, host: str, port: int) -> socket.socket:
        """A non-blocking listening socket bound to ``host:port``."""
        ...

    def listen_udp(self, host: str, port: int) -> socket.socket:
        """A non-blocking UDP socket bound to ``host:port`` (the DNS proxy's)."""
        ...

    def connect(
        self, addr: Addr, timeout: float, source: str | None = None
    ) -> Coroutine[Any, Any, socket.socket]:
        """A connected non-blocking socket to ``addr`` (not captured again), from the
        client address ``source`` when given (the app sees the client); raises
        ``PeerError`` naming the address and what to check. The proxy runs it without a
        Task (``plumbing.drive``): it may await futures, not ``asyncio.timeout``."""
        ...

    def close(self) -> None: ...


class SocketFactory(Protocol):
    """Where the proxy's listeners and upstream sockets of each pod live."""

    def pod(self, runtime: PodRuntime) -> PodSockets:
        """The sockets of the pod ``runtime`` describes; raises ``LocalStateError``."""
        ...


class Capture(Protocol):
    """How a pod's traffic is steered to its listeners, and what that leaves to read."""

    def on_snapshot(self, snap: MeshSnapshot, local: Set[str]) -> None:
        """A new snapshot, before pods are attached or detached: its mesh addresses,
        and ``local``, the keys of the pods this node captures."""
        ...

    def attach(
        self, pod_key: str, runtime: PodRuntime, listener: socket.socket, excluded: Excluded
    ) -> Awaitable[str]:
        """Capture a pod; ``listener`` is its inbound listener. Returns what pod states
        show of it (the capture's name). Raises ``LocalStateError`` or ``OSError``."""
        ...

    def exclude(self, runtime: PodRuntime, listener: socket.socket, excluded: Excluded) -> None:
        """A captured pod's excluded ports changed."""
        ...

    def detach(self, pod_key: str, runtime: PodRuntime) -> Awaitable[None]:
        """The pod left this node's mesh: its capture goes."""
        ...

    def original_destination(self, transport: asyncio.BaseTransport, inbound: bool) -> Addr | None:
        """The address an accepted connection was going to before capture (None: it was
        not redirected); raises ``OSError`` when it cannot be read."""
        ...

    def attach_host(self, workload: HostWorkload) -> Awaitable[str]:
        """Capture a workload of the agent's own host (host mode), or re-capture it with
        a changed spec; returns its mode. Raises ``LocalStateError``."""
        ...

    def detach_host(self, key: str) -> Awaitable[None]:
        """A host workload left: its rules go."""
        ...

    def host_stale(self) -> bool:
        """Whether a host workload's cgroup appeared, went or was made again (a
        restarted service) since its rules were made."""
        ...

    def refresh_hosts(self) -> Awaitable[dict[str, str]]:
        """Remake the host rules for the cgroups as they are; each host workload's mode."""
        ...


@dataclass(frozen=True)
class Http1Limits:
    """What a client connection speaking HTTP/1.1 may take of the proxy (Envoy-like)."""

    request_headers_timeout: float = 10.0
    """Seconds from a request's first byte to the end of its head: beyond, 408 and close
    (Envoy has none by default but cuts a stream idle 5 min; a head comes in one write, so
    10 s is generous and bounds slow-loris clients)."""
    idle_timeout: float = 3600.0
    """Seconds a kept-alive connection may wait for its next request's first byte
    (Envoy's HTTP connection manager ``idle_timeout`` default, 1 h): then it is closed."""
    max_headers: int = 100
    """Header (or trailer) fields per request: beyond, 431 (Envoy's ``max_headers_count``)."""
    max_header_size: int = 60 * 1024
    """Bytes of a request head: beyond, 431 (Envoy's ``max_request_headers_kb``: 60)."""


@dataclass(frozen=True)
class ConnectionLimits:
    """What downstream connections may take of the proxy (Envoy-like; ``proxy/limits.py``
    and the HBONE server enforce them)."""

    max_connections: int = 100_000
    """Downstream connections the node's proxy holds at once, on every listener of every
    pod; past it a new one is closed at accept (Envoy's overload manager
    ``global_downstream_max_connections``; each costs two file descriptors)."""
    max_connections_per_listener: int = 20_000
    """The same for one listener (15001, 15006 or 15008) of one pod, so that one pod
    cannot take all of the node's."""
    processes: int = 1
    """Processes serving the node (``--workers``): each holds its share of the two caps."""
    hbone_idle_timeout: float = 3600.0
    """Seconds an HBONE connection (server side) may stay without a stream: then GOAWAY
    and close (Envoy's HTTP connection manager ``idle_timeout`` default, 1 h; clients
    close theirs sooner: ours after 60 s, ztunnel's after 5 min)."""
    hbone_preface_timeout: float = 10.0
    """Seconds from the end of an HBONE TLS handshake to the client's HTTP/2 preface and
    SETTINGS: then closed (as the HTTP/1.1 request head timeout)."""


@dataclass(frozen=True)
class ProxyInputs:
    """The inputs every part of the proxy reads (each part owns its own state)."""

    node: str
    snapshot: Callable[[], MeshSnapshot]
    """The current snapshot: read once per connection or request."""
    metrics: Metrics
    table: ConnectionTable
    access_log: AccessLog
    sockets: SocketFactory
    capture: Capture
    identity: MeshIdentity | None = None
    """The workloads' certificates; None: no mTLS, every mesh connection is plain TCP."""
    connect_timeout: float = 5.0
    path_normalization: str = BASE
    """Istio's ``pathNormalization`` option for request paths (``core/paths.py``)."""
    jwks_ca_bundle: str = ""
    """PEM roots for ``https://`` jwksUri servers; empty: the system trust store."""
    http1_limits: Http1Limits = Http1Limits()
    connection_limits: ConnectionLimits = ConnectionLimits()
    dns: DnsSettings | None = None
    """The DNS proxy's settings; None: no DNS proxy (the pods' DNS is not captured)."""
    spans: SpanExport | None = None
    """Where spans go (``--otlp-endpoint``); None: no spans."""

    def principal(self, pod: Pod) -> str:
        """``pod``'s SPIFFE identity (what mTLS proves for it)."""
        td = self.identity.trust_domain if self.identity is not None else "cluster.local"
        return pod.identity(td)
