"""``MeshSnapshot``: one immutable, indexed view of the mesh.

Built once per config change by the control layer and published with one assignment;
readers take the current snapshot once per connection.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Generic, TypeVar

from nodeagent.model.authn import RequestAuthentication
from nodeagent.model.entries import (
    MESH_INTERNAL,
    REGISTRY_ONLY,
    MeshConfig,
    ServiceEntry,
    WorkloadEntry,
    WorkloadGroup,
    entry_services,
    entry_workload,
)
from nodeagent.model.objects import Node, Pod, PodRuntime, Service, ServicePort, pod_locality
from nodeagent.model.ratelimit import LocalRateLimit
from nodeagent.model.security import (
    DEFAULT_ROOT_NAMESPACE,
    AuthorizationPolicy,
    PeerAuthentication,
)
from nodeagent.model.telemetry import Telemetry
from nodeagent.model.traffic import DestinationRule, VirtualService


@dataclass(frozen=True)
class Endpoint:
    """One backend of a service port: a pod and the port it listens on."""

    pod: Pod
    ip: str
    port: int

    def __str__(self) -> str:
        return f"{self.ip}:{self.port} ({self.pod.key})"


@dataclass(frozen=True)
class MeshSnapshot:
    """Everything the agent knows about the mesh at one version."""

    version: int = 0
    pods: tuple[Pod, ...] = ()
    services: tuple[Service, ...] = ()
    runtimes: Mapping[str, PodRuntime] = field(default_factory=lambda: MappingProxyType({}))
    sources: tuple[str, ...] = ()
    peer_authentications: tuple[PeerAuthentication, ...] = ()
    virtual_services: tuple[VirtualService, ...] = ()
    destination_rules: tuple[DestinationRule, ...] = ()
    authorization_policies: tuple[AuthorizationPolicy, ...] = ()
    request_authentications: tuple[RequestAuthentication, ...] = ()
    local_rate_limits: tuple[LocalRateLimit, ...] = ()
    node_objects: tuple[Node, ...] = ()
    """``v1 Node`` objects (optional): capture settings per node, and the topology labels
    that give the pods on each node their locality (``Pod.locality``, set by ``build``)."""
    root_namespace: str = DEFAULT_ROOT_NAMESPACE
    workload_entries: tuple[Pod, ...] = ()
    """WorkloadEntries as workloads (``Pod.kind`` ``WorkloadEntry``): endpoints and peers
    like pods, not in ``pods`` (the agent opens no pod netns for them); the ones of one
    node: ``workload_entries_on_node``."""
    workload_entry_objects: tuple[WorkloadEntry, ...] = ()
    workload_groups: tuple[WorkloadGroup, ...] = ()
    service_entries: tuple[ServiceEntry, ...] = ()
    """As written; their hosts are in ``services`` (``Service.kind`` ``ServiceEntry``)."""
    mesh_config: MeshConfig = field(default_factory=MeshConfig)
    telemetries: tuple[Telemetry, ...] = ()
    """``telemetry.istio.io`` Telemetry objects (resolved by ``core.telemetry``)."""
    # indexes, filled by build()
    pod_by_key: Mapping[str, Pod] = field(default_factory=lambda: MappingProxyType({}))
    pod_by_ip: Mapping[str, Pod] = field(default_factory=lambda: MappingProxyType({}))
    """Address → the workload there: pods, then WorkloadEntries with an IP address (an
    entry at a pod's address does not shadow the pod; of two entries, the first wins)."""
    service_by_key: Mapping[str, Service] = field(default_factory=lambda: MappingProxyType({}))
    service_by_ip: Mapping[str, Service] = field(default_factory=lambda: MappingProxyType({}))
    service_by_host: Mapping[str, Service] = field(default_factory=lambda: MappingProxyType({}))
    endpoints_by_service: Mapping[str, tuple[Pod, ...]] = field(
        default_factory=lambda: MappingProxyType({})
    )
    virtual_service_by_host: Mapping[str, VirtualService] = field(
        default_factory=lambda: MappingProxyType({})
    )
    """Host (FQDN or ``*``-wildcard, as written) → the VirtualService for it (first wins)."""
    virtual_service_wildcards: bool = False
    """Whether any VirtualService host is a ``*`` wildcard (when none is, a host missing
    from ``virtual_service_by_host`` has no VirtualService, without a walk over its
    suffixes)."""
    destination_rule_by_host: Mapping[str, DestinationRule] = field(
        default_factory=lambda: MappingProxyType({})
    )
    authorization_policies_by_namespace: Mapping[str, tuple[AuthorizationPolicy, ...]] = field(
        default_factory=lambda: MappingProxyType({})
    )
    """Namespace → its AuthorizationPolicies, sorted by name."""
    entry_networks: tuple[tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, Service], ...] = ()
    """ServiceEntry addresses written as CIDRs (``192.192.192.0/24``), matched in order
    after ``service_by_ip``."""
    _endpoint_memo: dict[tuple[str, int, int | str], tuple[Endpoint, ...]] = field(
        default_factory=dict, compare=False, repr=False
    )
    """``endpoints()`` per (service, port, target port), computed once per snapshot: it
    runs for every new outbound connection, and a large service has many pods."""

    def node(self, name: str) -> Node | None:
        """The ``v1 Node`` called ``name``, if the config has one."""
        for n in self.node_objects:
            if n.name == name:
                return n
        return None

    @classmethod
    def build(
        cls,
        *,
        version: int,
        pods: tuple[Pod, ...],
        services: tuple[Service, ...],
        runtimes: Mapping[str, PodRuntime] | None = None,
        sources: tuple[str, ...] = (),
        peer_authentications: tuple[PeerAuthentication, ...] = (),
        virtual_services: tuple[VirtualService, ...] = (),
        destination_rules: tuple[DestinationRule, ...] = (),
        authorization_policies: tuple[AuthorizationPolicy, ...] = (),
        request_authentications: tuple[RequestAuthentication, ...] = (),
        local_rate_limits: tuple[LocalRateLimit, ...] = (),
        node_objects: tuple[Node, ...] = (),
        root_namespace: str = DEFAULT_ROOT_NAMESPACE,
        workload_entries: tuple[WorkloadEntry, ...] = (),
        workload_groups: tuple[WorkloadGroup, ...] = (),
        service_entries: tuple[ServiceEntry, ...] = (),
        mesh_config: MeshConfig | None = None,
        telemetries: tuple[Telemetry, ...] = (),
    ) -> MeshSnapshot:
        runtimes = dict(runtimes or {})
        node_by_name = {n.name: n for n in node_objects}
        resolved: list[Pod] = []
        for pod in pods:
            rt = runtimes.get(pod.key)
            ip = rt.ip if rt is not None and pod.pod_ip is None else pod.pod_ip
            # once per snapshot, not per request: the balancer reads pod.locality
            loc = pod_locality(pod, node_by_name.get(pod.node_name))
            if ip != pod.pod_ip or loc != pod.locality:
                pod = dataclasses.replace(pod, pod_ip=ip, locality=loc)
            resolved.append(pod)
        entries: list[Pod] = []
        by_name: set[str] = set()  # entries at a DNS name: only DNS ServiceEntries select them
        for we in workload_entries:
            if we.by_name:
                by_name.add(we.key)
            w = entry_workload(we)
            if not we.locality:  # else spec.locality, as Istio reads it
                w = dataclasses.replace(w, locality=pod_locality(w, node_by_name.get(w.node_name)))
            entries.append(w)
        workloads = (*resolved, *entries)
        unhealthy = {we.key for we in workload_entries if not we.healthy}
        selectable = tuple(
            w for w in workloads if w.kind == "Pod" or w.key not in unhealthy
        )
        pod_by_key = {p.key: p for p in resolved}
        pod_by_ip = {p.pod_ip: p for p in resolved if p.pod_ip}
        for w in entries:  # a pod's address stays the pod's; an entry at a DNS name has none
            if w.pod_ip and w.key not in by_name:
                pod_by_ip.setdefault(w.pod_ip, w)
        k8s_services = services
        services = (*k8s_services, *(s for se in service_entries for s in entry_services(se)))
        service_by_key = {s.key: s for s in services}
        service_by_ip: dict[str, Service] = {}
        networks: list[tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, Service]] = []
        for s in services:
            for a in s.addresses or ((s.cluster_ip,) if s.cluster_ip else ()):
                if "/" in a:
                    networks.append((ipaddress.ip_network(a), s))
                else:
                    service_by_ip.setdefault(a, s)  # a Service first, then entries in order
        service_by_host: dict[str, Service] = {}
        for s in k8s_services:
            for h in s.hostnames():
                service_by_host[h] = s
        for s in services[len(k8s_services) :]:  # a Service's name wins over an entry's host
            service_by_host.setdefault(s.name, s)
        endpoints = {
            s.key: tuple(
                p
                for p in selectable
                if p.namespace == s.namespace
                and p.labels.matches(s.selector)
                and (p.kind == "Pod" or p.key not in by_name or s.resolution == "DNS")
            )
            for s in services
        }
        for se in service_entries:
            inline = _inline_endpoints(se)
            for s in entry_services(se):
                if se.workload_selector is not None:
                    continue  # selected above, like a Service's pods
                if inline:
                    endpoints[s.key] = inline
                elif se.resolution == "DNS":  # the host itself, resolved when dialled
                    endpoints[s.key] = (_host_endpoint(se, s.name),)
        vs_by_host: dict[str, VirtualService] = {}
        for vs in virtual_services:
            for h in vs.hosts:
                vs_by_host.setdefault(h, vs)
        dr_by_host: dict[str, DestinationRule] = {}
        for dr in destination_rules:
            dr_by_host.setdefault(dr.host, dr)
        authz_by_ns: dict[str, list[AuthorizationPolicy]] = {}
        for ap in sorted(authorization_policies, key=lambda ap: ap.name):
            authz_by_ns.setdefault(ap.namespace, []).append(ap)
        return cls(
            version=version,
            pods=tuple(resolved),
            services=services,
            workload_entries=tuple(entries),
            workload_entry_objects=workload_entries,
            workload_groups=workload_groups,
            service_entries=service_entries,
            mesh_config=mesh_config or MeshConfig(),
            telemetries=telemetries,
            entry_networks=tuple(networks),
            runtimes=MappingProxyType(runtimes),
            sources=sources,
            peer_authentications=peer_authentications,
            virtual_services=virtual_services,
            destination_rules=destination_rules,
            authorization_policies=authorization_policies,
            request_authentications=request_authentications,
            local_rate_limits=local_rate_limits,
            node_objects=node_objects,
            root_namespace=root_namespace,
            pod_by_key=MappingProxyType(pod_by_key),
            pod_by_ip=MappingProxyType(pod_by_ip),
            service_by_key=MappingProxyType(service_by_key),
            service_by_ip=MappingProxyType(service_by_ip),
            service_by_host=MappingProxyType(service_by_host),
            endpoints_by_service=MappingProxyType(endpoints),
            virtual_service_by_host=MappingProxyType(vs_by_host),
            virtual_service_wildcards=any(h.startswith("*") for h in vs_by_host),
            destination_rule_by_host=MappingProxyType(dr_by_host),
            authorization_policies_by_namespace=MappingProxyType(
                {ns: tuple(aps) for ns, aps in authz_by_ns.items()}
            ),
        )

    def pods_on_node(self, node: str) -> tuple[Pod, ...]:
        return tuple(p for p in self.pods if p.node_name == node)

    def workload_entries_on_node(self, node: str) -> tuple[Pod, ...]:
        """The WorkloadEntries whose ``nodeagent.io/node`` annotation names ``node``:
        the local workloads of an agent in host mode (a VM)."""
        return tuple(w for w in self.workload_entries if w.node_name == node)

    @property
    def registry_only(self) -> bool:
        """MeshConfig ``outboundTrafficPolicy.mode: REGISTRY_ONLY``."""
        return self.mesh_config.outbound_traffic_policy == REGISTRY_ONLY

    def service_for_address(self, ip: str) -> Service | None:
        """The Service or ServiceEntry host whose address is ``ip`` (a cluster IP, an
        entry's address, or in one of an entry's CIDRs)."""
        svc = self.service_by_ip.get(ip)
        if svc is not None or not self.entry_networks:
            return svc
        try:
            addr = ipaddress.ip_address(ip)
        except ValueError:
            return None
        for net, s in self.entry_networks:
            if addr in net:
                return s
        return None

    def nodes(self) -> tuple[str, ...]:
        return tuple(sorted({p.node_name for p in self.pods}))

    def endpoints(self, service: Service, port: ServicePort) -> tuple[Endpoint, ...]:
        """Ready endpoints of one service port (pods with an IP whose target port resolves)."""
        key = (service.key, port.port, port.target_port)
        memo = self._endpoint_memo.get(key)
        if memo is None:
            memo = self._endpoint_memo[key] = self._endpoints(service, port)
        return memo

    def _endpoints(self, service: Service, port: ServicePort) -> tuple[Endpoint, ...]:
        out: list[Endpoint] = []
        for pod in self.endpoints_by_service.get(service.key, ()):
            if not pod.pod_ip:
                continue
            number = _endpoint_port(pod, port)
            if number is None:
                continue
            out.append(Endpoint(pod=pod, ip=pod.pod_ip, port=number))
        return tuple(out)

    def workload_ports(self, pod: Pod) -> tuple[int, ...]:
        """The ports of ``pod`` anything reaches: its declared ports and those its
        services' ports resolve to (a host-mode workload's captured inbound ports)."""
        out = {number for c in pod.containers for _, number in c.ports}
        for svc in self.services:
            if pod not in self.endpoints_by_service.get(svc.key, ()):
                continue
            for sp in svc.ports:
                number = _endpoint_port(pod, sp)
                if number is not None:
                    out.add(number)
        return tuple(sorted(out))

    def service_for_host(self, host: str) -> Service | None:
        """The Service a host name (short, partly or fully qualified) names, if any."""
        return self.service_by_host.get(host)

    def mesh_addresses(self) -> set[str]:
        """Every pod IP, WorkloadEntry IP, service cluster IP and ServiceEntry address
        (not its CIDRs): the destinations capture sends to the proxy."""
        out = {p.pod_ip for p in self.pods if p.pod_ip}
        out |= {w.pod_ip for w in self.workload_entries if w.pod_ip and _is_ip(w.pod_ip)}
        out |= {s.cluster_ip for s in self.services if s.cluster_ip}
        out |= {a for s in self.services for a in s.addresses if "/" not in a}
        return out


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def _endpoint_port(pod: Pod, port: ServicePort) -> int | None:
    """The port of ``pod`` that ``port`` reaches: a Pod's by targetPort (a number, or a
    container port's name); a WorkloadEntry's or an inline endpoint's by Istio's rule:
    its ``ports`` entry named like the service port, else the targetPort, else the
    service port itself."""
    if pod.kind == "Pod":
        if isinstance(port.target_port, int):
            return port.target_port
        return pod.named_port(port.target_port)
    if port.name:
        number = pod.named_port(port.name)
        if number is not None:
            return number
    if isinstance(port.target_port, int):
        return port.target_port
    return pod.named_port(port.target_port) or port.port


def _inline_endpoints(se: ServiceEntry) -> tuple[Pod, ...]:
    """A ServiceEntry's ``endpoints`` as workloads: in the mesh (HBONE, the identity of
    their service account) when the entry is MESH_INTERNAL and they name one."""
    internal = se.location == MESH_INTERNAL
    return tuple(
        dataclasses.replace(
            entry_workload(ep, kind="ServiceEntry"),
            namespace_enrolled=internal and bool(ep.service_account),
        )
        for ep in se.endpoints
    )


def _host_endpoint(se: ServiceEntry, host: str) -> Pod:
    """The endpoint of a DNS ServiceEntry without endpoints: its host, which the proxy
    resolves when it connects (never in the mesh: nothing says who answers there)."""
    return Pod(
        namespace=se.namespace,
        name=host,
        node_name="",
        pod_ip=host,
        source=se.source,
        kind="ServiceEntry",
        namespace_enrolled=False,
    )


T = TypeVar("T")


class PerSnapshot(Generic[T]):
    """A value derived from the serving snapshot: built on first use, rebuilt when the
    snapshot changes, held without keeping an old snapshot alive."""

    __slots__ = ("_build", "_of", "_value")

    def __init__(self, build: Callable[[MeshSnapshot], T]) -> None:
        self._build = build
        self._of: weakref.ref[MeshSnapshot] | None = None
        self._value: T | None = None

    def get(self, snap: MeshSnapshot) -> T:
        if self._of is None or self._of() is not snap:
            self._value = self._build(snap)
            self._of = weakref.ref(snap)
        return self._value  # type: ignore[return-value]  # (cast() is a call per use)
