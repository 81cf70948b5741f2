"""Frozen model objects with Kubernetes shapes: Pod, Service, Node and their parts, and
where a workload runs (its locality: Istio's rule over Node and Pod labels)."""

from __future__ import annotations

import functools
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Final, TypeAlias, TypeVar, overload

T = TypeVar("T")

Locality: TypeAlias = tuple[str, str, str]
"""``(region, zone, subzone)``; a missing part is ``""``."""
NO_LOCALITY: Locality = ("", "", "")

DEFAULT_TRUST_DOMAIN = "cluster.local"


@dataclass(frozen=True)
class Labels(Mapping[str, str]):
    """An immutable, hashable label set (also used for selectors)."""

    items_: tuple[tuple[str, str], ...] = ()

    @classmethod
    def of(cls, d: Mapping[str, str] | None) -> Labels:
        return cls(tuple(sorted((d or {}).items())))

    def __getitem__(self, key: str) -> str:
        value = self.get(key)
        if value is None:
            raise KeyError(key)
        return value

    @overload
    def get(self, key: str) -> str | None: ...
    @overload
    def get(self, key: str, default: str) -> str: ...
    @overload
    def get(self, key: str, default: T) -> str | T: ...
    def get(self, key: str, default: object = None) -> object:
        """(``Mapping.get`` would call ``__getitem__`` and catch its KeyError.)"""
        for k, v in self.items_:
            if k == key:
                return v
        return default

    def __iter__(self) -> Iterator[str]:
        return (k for k, _ in self.items_)

    def __len__(self) -> int:
        return len(self.items_)

    def matches(self, selector: Labels) -> bool:
        """True when every key/value of ``selector`` is in these labels (empty matches none)."""
        if not selector.items_:
            return False
        mine = dict(self.items_)
        return all(mine.get(k) == v for k, v in selector.items_)

    def __str__(self) -> str:
        return ",".join(f"{k}={v}" for k, v in self.items_)


@dataclass(frozen=True)
class Container:
    name: str
    command: tuple[str, ...] = ()
    args: tuple[str, ...] = ()
    env: tuple[tuple[str, str], ...] = ()
    image: str = ""
    ports: tuple[tuple[str, int], ...] = ()
    """(name, containerPort) pairs; the name may be empty."""


DATAPLANE_MODE_LABEL: Final = "istio.io/dataplane-mode"
"""Istio ambient's label; the value ``none`` keeps a pod out of the mesh."""


@dataclass(frozen=True)
class Pod:
    """A workload: one Pod with its identity inputs and placement."""

    namespace: str
    name: str
    node_name: str
    service_account: str = "default"
    labels: Labels = field(default_factory=Labels)
    annotations: Labels = field(default_factory=Labels)
    containers: tuple[Container, ...] = ()
    pod_ip: str | None = None
    source: str = ""
    locality: Locality = NO_LOCALITY
    """Where the pod runs: not read from its YAML, ``MeshSnapshot.build`` fills it in
    (``pod_locality``: its Node's topology labels, or its own locality label)."""
    namespace_enrolled: bool = True
    """Whether its namespace is in the mesh: the API source sets it from the Namespace's
    ``istio.io/dataplane-mode: ambient`` label, as Istio ambient does; in file mode
    every namespace is."""
    kind: str = "Pod"
    """``Pod``; ``WorkloadEntry`` for a VM's workload, ``ServiceEntry`` for an inline
    endpoint of a ServiceEntry (``model/entries.py``): their ports are keyed by service
    port name, and they have no netns the agent opens listeners in."""
    hostname: str = ""
    subdomain: str = ""
    """``spec.hostname`` and ``spec.subdomain``: with a headless Service named like the
    subdomain, the pod answers ``<hostname>.<subdomain>.<ns>.svc.<domain>`` in DNS
    (``core/dns.py``; the hostname defaults to the pod's name)."""

    @functools.cached_property
    def key(self) -> str:
        """``namespace/name`` (made once: a connection names its pods a few times)."""
        return f"{self.namespace}/{self.name}"

    def identity(self, trust_domain: str = DEFAULT_TRUST_DOMAIN) -> str:
        return f"spiffe://{trust_domain}/ns/{self.namespace}/sa/{self.service_account}"

    @property
    def in_mesh(self) -> bool:
        """Istio ambient's rule: a pod labelled ``istio.io/dataplane-mode: none`` is out,
        one labelled ``ambient`` is in, any other is in when its namespace is. Out of the
        mesh: never captured, no certificate, reached in plain TCP."""
        if self.kind == "ServiceEntry":  # an inline endpoint: MESH_INTERNAL with an identity
            return self.namespace_enrolled
        mode = self.labels.get(DATAPLANE_MODE_LABEL)
        if mode == "none":
            return False
        return self.namespace_enrolled or mode == "ambient"

    def named_port(self, name: str) -> int | None:
        for c in self.containers:
            for pname, number in c.ports:
                if pname == name:
                    return number
        return None

    def excluded_ports(self, direction: str) -> frozenset[int]:
        """Ports named by Istio's ``traffic.sidecar.istio.io/exclude{In,Out}boundPorts``."""
        key = f"traffic.sidecar.istio.io/exclude{direction}Ports"
        raw = dict(self.annotations.items_).get(key, "")
        return frozenset(int(p) for p in raw.split(",") if p.strip())


@dataclass(frozen=True)
class ServicePort:
    port: int
    target_port: int | str
    name: str = ""
    protocol: str = "TCP"
    app_protocol: str | None = None


@dataclass(frozen=True)
class Service:
    namespace: str
    name: str
    ports: tuple[ServicePort, ...]
    selector: Labels = field(default_factory=Labels)
    cluster_ip: str | None = None
    source: str = ""
    kind: str = "Service"
    """``Service``, or ``ServiceEntry`` for one host of a ServiceEntry (``name`` is the
    host, ``entry`` the ServiceEntry's name; ``model/entries.py``)."""
    addresses: tuple[str, ...] = ()
    """A ServiceEntry's addresses (IPs or CIDRs); ``cluster_ip`` is the first IP."""
    location: str = ""
    """A ServiceEntry's ``MESH_EXTERNAL`` or ``MESH_INTERNAL``."""
    resolution: str = ""
    """A ServiceEntry's ``NONE``, ``STATIC`` or ``DNS``."""
    entry: str = ""

    @functools.cached_property
    def key(self) -> str:
        """``namespace/name`` (made once, as ``fqdn``)."""
        return f"{self.namespace}/{self.name}"

    @property
    def is_entry(self) -> bool:
        return self.kind == "ServiceEntry"

    @functools.cached_property
    def fqdn(self) -> str:
        """The host routing, metrics and clusters name it by (made once: a connection
        names it a few times)."""
        return self.hostnames()[-1]

    def hostnames(self, cluster_domain: str = "cluster.local") -> tuple[str, ...]:
        """The names a pod may use for this service, shortest first (a ServiceEntry's
        host: only itself)."""
        if self.kind == "ServiceEntry":
            return (self.name,)
        return (
            self.name,
            f"{self.name}.{self.namespace}",
            f"{self.name}.{self.namespace}.svc",
            f"{self.name}.{self.namespace}.svc.{cluster_domain}",
        )

    def port(self, number: int) -> ServicePort | None:
        for p in self.ports:
            if p.port == number:
                return p
        return None


@dataclass(frozen=True)
class PodRuntime:
    """Where a pod lives on its node: what a CNI plugin would tell the agent."""

    key: str
    ip: str
    node: str
    netns: str
    cgroup: str = ""


NO_SOURCE = " (no source routing)"
"""Ends a capture's mode where the app sees its own address, not the client's (the
capture writes it; the proxy then connects to the app from its own address)."""

HOST_NETNS = "/proc/self/ns/net"
"""The netns of a host-mode workload (a VM's service): the agent's own, the host's."""


@dataclass(frozen=True)
class HostWorkload:
    """A workload of the agent's own host (host mode: a local WorkloadEntry), as its
    capture needs it: outbound of its cgroup to ``loopback``, inbound to ``ip`` on its
    ``inbound_ports`` to ``ip``'s inbound listener; nothing else of the host."""

    key: str
    ip: str
    cgroup: str
    """From the cgroup v2 root of the host's workloads (``--workload-cgroup-root``);
    empty: its outbound is not captured (inbound only)."""
    loopback: str
    """Its outbound (15001) and DNS (15053) listeners' address on ``lo``."""
    inbound_ports: tuple[int, ...]
    exclude_outbound_ports: frozenset[int] = frozenset()
    exclude_inbound_ports: frozenset[int] = frozenset()


NODE_REDIRECT = "nodeagent.io/redirect"
"""Node annotation: this node's capture mode (``iptables``, ``ebpf``, ``auto``)."""
NODE_BPF_BYPASS = "nodeagent.io/bpf-bypass"
"""Node annotation: eBPF mode's local socket bypass (``on``, ``off``)."""
NODE_ANNOTATIONS = {NODE_REDIRECT: ("iptables", "ebpf", "auto"), NODE_BPF_BYPASS: ("on", "off")}
"""The ``nodeagent.io/`` annotations a Node may carry, with their allowed values."""


@dataclass(frozen=True)
class Node:
    """A ``v1 Node``: what the agents read from it: its capture settings (read by the
    agent of that node; its command-line flags win over them) and its topology labels
    (the locality of the pods on it, for every agent: ``pod_locality``)."""

    name: str
    labels: Labels = field(default_factory=Labels)
    annotations: Labels = field(default_factory=Labels)
    source: str = ""

    @property
    def key(self) -> str:
        return self.name

    @property
    def redirect(self) -> str | None:
        return self.annotations.get(NODE_REDIRECT)

    @property
    def bpf_bypass(self) -> bool | None:
        v = self.annotations.get(NODE_BPF_BYPASS)
        return None if v is None else v == "on"


# --------------------------------------------------------------------------- locality

REGION_LABEL = "topology.kubernetes.io/region"
ZONE_LABEL = "topology.kubernetes.io/zone"
SUBZONE_LABEL = "topology.istio.io/subzone"
"""Istio's Node label for a sub-zone (Kubernetes has none)."""
BETA_REGION_LABEL = "failure-domain.beta.kubernetes.io/region"
BETA_ZONE_LABEL = "failure-domain.beta.kubernetes.io/zone"
"""The deprecated Node labels, read when the GA ones are absent (as Istio does)."""
LOCALITY_LABEL = "topology.istio.io/locality"
LEGACY_LOCALITY_LABEL = "istio-locality"
"""Pod labels that override the node's locality: ``region.zone.subzone`` (Kubernetes
label values cannot hold ``/``); ``topology.istio.io/locality`` wins over the older one."""


def parse_locality(value: str) -> Locality:
    """``region.zone.subzone`` (or ``region/zone/subzone``) → a locality; parts may be
    left out from the right, parts after the third are ignored (Istio's split)."""
    parts = value.split("/") if "/" in value else value.split(".")
    parts += ["", ""]
    return parts[0], parts[1], parts[2]


def format_locality(loc: Locality) -> str:
    """Istio's ``region/zone/subzone`` form, without trailing empty parts."""
    return "/".join(loc).rstrip("/")


def pod_locality(pod: Pod, node: Node | None) -> Locality:
    """Where ``pod`` runs, by Istio's rule: its ``topology.istio.io/locality`` (or
    ``istio-locality``) label when set, else its node's ``topology.kubernetes.io/region``
    and ``zone`` and ``topology.istio.io/subzone`` labels; no node object, no locality.
    A Pod's own ``topology.kubernetes.io/*`` labels are not read: Kubernetes puts them on
    Nodes, and Istio reads them only there."""
    for key in (LOCALITY_LABEL, LEGACY_LOCALITY_LABEL):
        value = pod.labels.get(key)
        if value:
            return parse_locality(value)
    if node is None:
        return NO_LOCALITY
    labels = node.labels
    return (
        labels.get(REGION_LABEL) or labels.get(BETA_REGION_LABEL, ""),
        labels.get(ZONE_LABEL) or labels.get(BETA_ZONE_LABEL, ""),
        labels.get(SUBZONE_LABEL, ""),
    )
