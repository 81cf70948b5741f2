"""Istio's kinds for workloads and services outside Kubernetes: ``WorkloadEntry`` (a VM's
workload), ``WorkloadGroup`` (the template a VM joins with), ``ServiceEntry`` (hosts
outside the mesh, or VM-backed services), and the one mesh-wide setting read from
Istio's ``istio`` ConfigMap (``MeshConfig``: ``outboundTrafficPolicy``).

The snapshot serves them through the shapes the data path already knows: a WorkloadEntry
becomes a workload (``entry_workload``: a ``Pod`` of kind ``WorkloadEntry``, with its
identity, labels, locality and node) and each host of a ServiceEntry a ``Service`` of
kind ``ServiceEntry`` (``entry_services``), as Istio turns each host into a service.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from typing import Final

from nodeagent.model.objects import (
    NO_LOCALITY,
    Container,
    Labels,
    Pod,
    Service,
    ServicePort,
    parse_locality,
)

WORKLOAD_NODE_ANNOTATION: Final = "nodeagent.io/node"
"""A WorkloadEntry's annotation naming the node (the agent's ``--node``) it runs on: that
node's agent captures it and serves its inbound traffic. Without it the entry is a
remote endpoint: reached over HBONE at its address, captured by no agent of ours."""

WORKLOAD_CGROUP_ANNOTATION: Final = "nodeagent.io/cgroup"
"""A local WorkloadEntry's annotation naming the cgroup its processes run in (a path from
the cgroup v2 root, or a systemd unit: ``ratings.service``, ``user.slice``): the agent of
its node captures that cgroup's outbound traffic (host mode). Without it, only the
entry's inbound is served; the host's other processes are never captured."""

HEALTH_CHECKS_ANNOTATION: Final = "proxy.istio.io/health-checks-enabled"
"""Istio's WorkloadEntry annotation: ``"true"`` makes it an endpoint only while its
``status.conditions`` say ``Healthy: "True"`` (Istio's VM health checks write it)."""

AUTO_ALLOCATE_LABEL: Final = "networking.istio.io/enable-autoallocate-ip"
"""Istio's ServiceEntry label: ``"false"`` opts out of address auto-allocation."""

MESH_EXTERNAL: Final = "MESH_EXTERNAL"
MESH_INTERNAL: Final = "MESH_INTERNAL"
LOCATIONS = (MESH_EXTERNAL, MESH_INTERNAL)
RESOLUTIONS = ("NONE", "STATIC", "DNS", "DNS_ROUND_ROBIN")
"""Istio's resolutions; ``DNS_ROUND_ROBIN`` is served as ``DNS`` (the proxy resolves the
name at connect time either way)."""

SE_PROTOCOLS: Final = {
    "HTTP": "http",
    "HTTP2": "http2",
    "GRPC": "grpc",
    "GRPC-WEB": "grpc-web",
    "TCP": None,
    "TLS": None,
    "HTTPS": None,
    "MONGO": None,
    "MYSQL": None,
    "REDIS": None,
}
"""ServiceEntry port protocols → the ``appProtocol`` the L7 path reads (None: opaque TCP;
TLS and HTTPS pass through as bytes: the mesh does not terminate the app's TLS)."""

ALLOW_ANY: Final = "ALLOW_ANY"
REGISTRY_ONLY: Final = "REGISTRY_ONLY"


@dataclass(frozen=True)
class WorkloadEntry:
    """A ``networking.istio.io/v1 WorkloadEntry`` (or one of a ServiceEntry's inline
    ``endpoints``, with ``name`` ``""``): a workload that is not a Pod."""

    namespace: str
    name: str
    address: str = ""
    """An IP address, or a host name (a ServiceEntry endpoint with DNS resolution)."""
    ports: tuple[tuple[str, int], ...] = ()
    """Service port name → this workload's port (Istio's ``ports`` map)."""
    labels: Labels = field(default_factory=Labels)
    annotations: Labels = field(default_factory=Labels)
    network: str = ""
    locality: str = ""
    weight: int = 0
    service_account: str = ""
    source: str = ""
    healthy: bool = True
    """False when Istio's health checks are on for it (annotation
    ``proxy.istio.io/health-checks-enabled: "true"``) and its ``Healthy`` condition is not
    ``True``: then it is no endpoint, as in Istio."""

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    @property
    def by_name(self) -> bool:
        """Its address is a DNS name: only a ServiceEntry with DNS resolution selects it
        (Istio's rule: a Kubernetes Service or a STATIC entry needs an IP)."""
        return bool(self.address) and not _is_ip(self.address)

    @property
    def node_name(self) -> str:
        return self.annotations.get(WORKLOAD_NODE_ANNOTATION, "")


@dataclass(frozen=True)
class WorkloadGroup:
    """A ``WorkloadGroup``: the template of the WorkloadEntries of one kind of VM
    (``nodeagent vm join`` reads it); ``probe`` is accepted and not run."""

    namespace: str
    name: str
    labels: Labels = field(default_factory=Labels)
    """``spec.metadata.labels``: the labels each entry of the group carries."""
    annotations: Labels = field(default_factory=Labels)
    template: WorkloadEntry | None = None
    """``spec.template`` (no address: each VM brings its own)."""
    has_probe: bool = False
    source: str = ""

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"


@dataclass(frozen=True)
class EntryPort:
    number: int
    protocol: str = "TCP"
    name: str = ""
    target_port: int | None = None


@dataclass(frozen=True)
class ServiceEntry:
    """A ``ServiceEntry``: hosts and the addresses and ports that reach them."""

    namespace: str
    name: str
    hosts: tuple[str, ...]
    ports: tuple[EntryPort, ...]
    addresses: tuple[str, ...] = ()
    """As written: IP addresses, or CIDRs (``192.192.192.0/24``)."""
    location: str = MESH_EXTERNAL
    resolution: str = "NONE"
    """``NONE``, ``STATIC`` or ``DNS`` (``DNS_ROUND_ROBIN`` is read as ``DNS``)."""
    endpoints: tuple[WorkloadEntry, ...] = ()
    workload_selector: Labels | None = None
    export_to: tuple[str, ...] = ()
    subject_alt_names: tuple[str, ...] = ()
    labels: Labels = field(default_factory=Labels)
    auto_addresses: tuple[tuple[str, str], ...] = ()
    """(host, address) given by auto-allocation (``control/clusterip.py``), as Istio
    writes them to ``status.addresses``."""
    source: str = ""

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    def wants_addresses(self) -> bool:
        """Istio's rule: auto-allocate for an entry written without addresses whose
        resolution is not NONE, for each host that is not a wildcard, unless its label
        opts out."""
        return (
            not self.addresses
            and self.resolution != "NONE"
            and self.labels.get(AUTO_ALLOCATE_LABEL) != "false"
        )


@dataclass(frozen=True)
class MeshConfig:
    """What the agent reads of Istio's MeshConfig (the ``mesh`` key of the ``istio``
    ConfigMap in the root namespace)."""

    outbound_traffic_policy: str = ALLOW_ANY
    """``ALLOW_ANY``: a destination outside the registry is passed through as dialled;
    ``REGISTRY_ONLY``: it is refused (``BlackHoleCluster``)."""
    source: str = ""
    name: str = "istio"
    namespace: str = ""

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"


# --------------------------------------------------------------------------- conversion


def entry_workload(we: WorkloadEntry, *, kind: str = "WorkloadEntry") -> Pod:
    """``we`` as a workload: its ports as one container's named ports (keyed by service
    port name, ``snapshot._endpoint_port``), its locality from ``spec.locality`` (else
    its node's, ``MeshSnapshot.build``), its identity from its service account."""
    return Pod(
        namespace=we.namespace,
        name=we.name,
        node_name=we.node_name,
        service_account=we.service_account or "default",
        labels=we.labels,
        annotations=we.annotations,
        containers=(Container(name="", ports=we.ports),) if we.ports else (),
        pod_ip=we.address or None,
        source=we.source,
        locality=parse_locality(we.locality) if we.locality else NO_LOCALITY,
        kind=kind,
    )


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def is_wildcard(host: str) -> bool:
    return host.startswith("*")


def entry_services(se: ServiceEntry) -> tuple[Service, ...]:
    """One Service per host of ``se`` (keyed ``namespace/host``), each with every
    address of the entry (or its host's auto-allocated one) and every port."""
    ports = tuple(
        ServicePort(
            port=p.number,
            target_port=p.target_port if p.target_port is not None else p.number,
            name=p.name,
            app_protocol=SE_PROTOCOLS.get(p.protocol.upper()),
        )
        for p in se.ports
    )
    auto = dict(se.auto_addresses)
    out: list[Service] = []
    for host in se.hosts:
        addresses = se.addresses or ((auto[host],) if host in auto else ())
        out.append(
            Service(
                namespace=se.namespace,
                name=host,
                ports=ports,
                selector=se.workload_selector or Labels(),
                cluster_ip=next((a for a in addresses if "/" not in a), None),
                source=se.source,
                kind="ServiceEntry",
                addresses=addresses,
                location=se.location,
                resolution=se.resolution,
                entry=se.name,
            )
        )
    return tuple(out)


def workload_cgroup(value: str) -> str:
    """The cgroup path (from the cgroup v2 root, ``/``-led, no trailing ``/``) a
    ``nodeagent.io/cgroup`` annotation names; ``ValueError`` saying what is wrong.

    A systemd unit name stands for the cgroup systemd gives it: ``ratings.service`` is
    ``/system.slice/ratings.service``, a slice nests by its dashes
    (``app-web.slice`` is ``/app.slice/app-web.slice``)."""
    value = value.strip()
    if value.startswith("/"):
        parts = value.strip("/").split("/")
        if value != "/" and any(p in ("", ".", "..") for p in parts):
            raise ValueError(f"{value!r}: a cgroup path has no empty, '.' or '..' parts")
        if value == "/":
            raise ValueError(
                "'/' would capture every process of the host, the agent's own and SSH "
                "included: name the workload's cgroup (a service, or user.slice)"
            )
        return "/" + "/".join(parts)
    if "/" in value or not value:
        raise ValueError(f"{value!r}: write a cgroup path from the root ('/…') or a unit name")
    if value.endswith(".service") or value.endswith(".scope"):
        return f"/system.slice/{value}"
    if value.endswith(".slice"):
        stem = value[: -len(".slice")]
        if not stem or stem.startswith("-") or stem.endswith("-") or "--" in stem:
            raise ValueError(f"{value!r} is not a slice name")
        pieces = stem.split("-")
        return "".join(
            "/" + "-".join(pieces[: i + 1]) + ".slice" for i in range(len(pieces))
        )
    raise ValueError(
        f"{value!r}: a unit name ends in .service, .scope or .slice (or write a cgroup path)"
    )
