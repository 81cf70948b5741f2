"""Pure planning of a sandbox: names, addresses, routes and per-pod files.

Owns every name the sandbox gives to kernel objects (network namespaces, links, cgroup
directories, sockets) and the addressing plan, computed from a ``MeshSnapshot`` without
any I/O, so it can be unit-tested and so ``down`` can recognise what ``up`` made:

- fabric netns ``na-fabric`` with bridge ``br0``; per node ``na-n-<node>``; per pod
  ``na-p-<namespace>-<pod>``;
- nodes sorted by name get index i = 1..N: ``10.250.0.i/24`` on ``eth0`` of the node netns
  (fabric side ``vn<i>``), pod CIDR ``10.244.i.0/24``, bridge ``cbr0`` = ``10.244.i.1``;
- pods of node i, in (namespace, name) order, get ``10.244.i.2``, ``.3``, ... (a
  ``status.podIP`` from the config is kept when it is free and inside the node's CIDR),
  ``eth0`` in the pod netns, node side ``vp<i>-<k>``;
- every node routes ``10.244.j.0/24 via 10.250.0.j`` for each other node j; nothing routes
  outside the sandbox;
- a WorkloadEntry annotated ``nodeagent.io/node: <node>`` is a workload of that node's
  host ("vm" node): processes in the node's own netns, in its own cgroup
  ``nodeagent/hosts/<node>/<its nodeagent.io/cgroup>``, at the entry's address (on the
  node's ``lo``; every other node routes ``<address>/32`` via the node), planned as a
  ``PodPlan`` with ``host`` set; such a node has a default route on its uplink (its
  workloads dial service addresses, as a VM's do).
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

from nodeagent.errors import ConfigError, ConfigErrors
from nodeagent.model.entries import WORKLOAD_CGROUP_ANNOTATION, workload_cgroup
from nodeagent.model.objects import Pod, Service
from nodeagent.model.snapshot import MeshSnapshot

PREFIX = "na-"
FABRIC_NETNS = "na-fabric"
NODE_NETNS_PREFIX = "na-n-"
POD_NETNS_PREFIX = "na-p-"
FABRIC_BRIDGE = "br0"
NODE_BRIDGE = "cbr0"
NODE_UPLINK = "eth0"
POD_IFNAME = "eth0"
FABRIC_NET = ipaddress.IPv4Network("10.250.0.0/24")
POD_SUPERNET = ipaddress.IPv4Network("10.244.0.0/16")
MAX_NODES = 254
MAX_PODS_PER_NODE = 253
IFNAMSIZ = 15
"""Longest interface name Linux accepts (IFNAMSIZ - 1)."""

NETNS_DIR = "/var/run/netns"
ETC_NETNS_DIR = "/etc/netns"
RUN_DIR = "/run/nodeagent"
STATE_DIR = "/run/nodeagent/sandbox"
CGROUP_SUBTREE = "nodeagent"
"""Our directory under the cgroup v2 root: ``pods/<node>/<ns>_<pod>`` and ``agents/<node>``."""

_NODE_NAME = re.compile(r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")


def node_netns(node: str) -> str:
    return f"{NODE_NETNS_PREFIX}{node}"


def pod_netns(namespace: str, name: str) -> str:
    return f"{POD_NETNS_PREFIX}{namespace}-{name}"


def is_sandbox_netns(name: str) -> bool:
    """True for the names this module gives (``na-fabric``, ``na-n-*``, ``na-p-*``)."""
    return (
        name == FABRIC_NETNS
        or (name.startswith(NODE_NETNS_PREFIX) and len(name) > len(NODE_NETNS_PREFIX))
        or (name.startswith(POD_NETNS_PREFIX) and len(name) > len(POD_NETNS_PREFIX))
    )


def node_of_netns(name: str) -> str | None:
    """The node name of a ``na-n-<node>`` netns name, else None."""
    if name.startswith(NODE_NETNS_PREFIX) and len(name) > len(NODE_NETNS_PREFIX):
        return name[len(NODE_NETNS_PREFIX) :]
    return None


def fabric_ifname(node_index: int) -> str:
    return f"vn{node_index}"


def pod_host_ifname(node_index: int, pod_index: int) -> str:
    return f"vp{node_index}-{pod_index}"


def pod_cgroup_rel(node: str, namespace: str, name: str) -> str:
    """A pod's cgroup directory, relative to the cgroup v2 root."""
    return f"{CGROUP_SUBTREE}/pods/{node}/{namespace}_{name}"


def host_cgroup_root_rel(node: str) -> str:
    """Where a "vm" node's host cgroups start (its agent's ``--workload-cgroup-root``)."""
    return f"{CGROUP_SUBTREE}/hosts/{node}"


def host_cgroup_rel(node: str, entry: Pod) -> str:
    """A host workload's cgroup, relative to the cgroup v2 root: the one its
    ``nodeagent.io/cgroup`` names under its node's host root, else one of its own (its
    processes then run outside any cgroup the agent captures)."""
    raw = entry.annotations.get(WORKLOAD_CGROUP_ANNOTATION)
    path = workload_cgroup(raw) if raw else f"/sandbox/{entry.namespace}_{entry.name}"
    return host_cgroup_root_rel(node) + path


def agent_cgroup_rel(node: str) -> str:
    return f"{CGROUP_SUBTREE}/agents/{node}"


def agent_socket(node: str) -> str:
    return f"{RUN_DIR}/{node}.sock"


def agent_state_dir(node: str) -> str:
    return f"{STATE_DIR}/state/{node}"


def log_dir() -> str:
    return f"{STATE_DIR}/logs"


def pod_log(namespace: str, name: str) -> str:
    return f"{log_dir()}/{namespace}_{name}.log"


def agent_log(node: str) -> str:
    return f"{log_dir()}/agent-{node}.log"


@dataclass(frozen=True)
class Route:
    dst: str
    """A CIDR, e.g. ``10.244.2.0/24``, or ``default``."""
    via: str


@dataclass(frozen=True)
class NodePlan:
    name: str
    index: int
    netns: str
    ip: str
    """The node's address on the fabric (``eth0`` in its netns)."""
    pod_cidr: str
    bridge_ip: str
    fabric_ifname: str
    routes: tuple[Route, ...]
    cgroup: str
    """The node agent's cgroup, relative to the cgroup v2 root."""
    socket: str
    state_dir: str
    log: str
    host_addresses: tuple[str, ...] = ()
    """Its host workloads' addresses (on its ``lo``); any: a "vm" node."""


@dataclass(frozen=True)
class PodPlan:
    namespace: str
    name: str
    node: str
    node_index: int
    index: int
    """1-based position among its node's pods (used in link names)."""
    netns: str
    ip: str
    gateway: str
    host_ifname: str
    cgroup: str
    """Relative to the cgroup v2 root."""
    log: str
    service_account: str
    hosts: str
    """Content of ``/etc/netns/<netns>/hosts``."""
    resolv_conf: str
    ports: tuple[int, ...]
    """The declared containerPorts, which must accept connections before the pod is ready."""
    host: bool = False
    """A host workload (a local WorkloadEntry): in its node's netns, no link of its own."""

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"


@dataclass(frozen=True)
class Topology:
    nodes: tuple[NodePlan, ...]
    pods: tuple[PodPlan, ...]
    fabric_netns: str = FABRIC_NETNS
    fabric_bridge: str = FABRIC_BRIDGE

    def node(self, name: str) -> NodePlan:
        for n in self.nodes:
            if n.name == name:
                return n
        raise KeyError(name)

    def pod(self, key: str) -> PodPlan:
        for p in self.pods:
            if p.key == key:
                return p
        raise KeyError(key)

    def netns_names(self) -> tuple[str, ...]:
        return (
            self.fabric_netns,
            *(n.netns for n in self.nodes),
            *(p.netns for p in self.pods if not p.host),
        )

    def interface_names(self) -> tuple[str, ...]:
        return (
            self.fabric_bridge,
            NODE_BRIDGE,
            NODE_UPLINK,
            POD_IFNAME,
            *(n.fabric_ifname for n in self.nodes),
            *(p.host_ifname for p in self.pods if not p.host),
        )


CLUSTER_DNS = "10.96.0.10"
"""The nameserver in the pods' resolv.conf, kubeadm's DNS Service address: nobody is
there, the agent's capture sends a captured pod's port 53 to its DNS proxy."""


def hosts_file(
    pod_name: str, pod_ip: str, services: tuple[Service, ...], namespace: str = "default"
) -> str:
    """``/etc/hosts`` of a pod: localhost, the pod's own name, and ``services``' clusterIPs
    (for a pod whose DNS the agent does not answer: none for the others, as in Kubernetes).

    The pod's own name comes first and services of the pod's namespace before the others,
    so a short name resolves as in Kubernetes when several namespaces share it.
    """
    lines = [
        "# written by nodeagent sandbox",
        "127.0.0.1\tlocalhost",
        "::1\tlocalhost ip6-localhost ip6-loopback",
        f"{pod_ip}\t{pod_name}",
    ]
    for svc in sorted(services, key=lambda s: (s.namespace != namespace, s.namespace, s.name)):
        if svc.cluster_ip:
            lines.append(f"{svc.cluster_ip}\t{' '.join(svc.hostnames())}")
    return "\n".join(lines) + "\n"


def resolv_conf(namespace: str, dns: bool = True) -> str:
    """A pod's ``resolv.conf``: Kubernetes' search path and ``ndots``.

    With ``dns`` (the agent's DNS proxy answers the pod), the nameserver is
    ``CLUSTER_DNS``; without, names are answered from the pod's hosts file and anything
    else fails fast against 127.0.0.1 instead of reaching the machine's resolver.
    """
    return (
        "# written by nodeagent sandbox\n"
        f"search {namespace}.svc.cluster.local svc.cluster.local cluster.local\n"
        f"nameserver {CLUSTER_DNS if dns else '127.0.0.1'}\n"
        "options ndots:5 timeout:2 attempts:2\n"
    )


def _pod_ports(pod: Pod) -> tuple[int, ...]:
    ports: list[int] = []
    for c in pod.containers:
        if not c.command:
            continue
        for _, number in c.ports:
            if number not in ports:
                ports.append(number)
    return tuple(ports)


def _pod_error(pod: Pod, field: str, message: str) -> ConfigError:
    return ConfigError(message, source=pod.source, obj=f"Pod {pod.key}", field=field)


def plan(snapshot: MeshSnapshot, dns_proxy: bool = True) -> Topology:
    """Plan the sandbox of a snapshot; raise ``ConfigErrors`` naming each problem.
    ``dns_proxy``: the agents answer their pods' DNS (pods in the mesh resolve names
    through it; the others, and all without it, through hosts files)."""
    errors: list[ConfigError] = []
    hosted = _host_workloads(snapshot, errors)
    node_names = sorted({p.node_name for p in snapshot.pods} | {w.node_name for w in hosted})
    for pod in snapshot.pods:
        if not _NODE_NAME.match(pod.node_name):
            errors.append(
                _pod_error(
                    pod,
                    "spec.nodeName",
                    f"{pod.node_name!r} cannot name a sandbox node "
                    "(lowercase a-z, 0-9, '-', '.'; start and end alphanumeric)",
                )
            )
    if len(node_names) > MAX_NODES:
        errors.append(
            ConfigError(f"the sandbox supports at most {MAX_NODES} nodes, got {len(node_names)}")
        )
    if errors:
        raise ConfigErrors(errors)

    nodes: list[NodePlan] = []
    index_of: dict[str, int] = {}
    for i, name in enumerate(node_names, start=1):
        index_of[name] = i
    for name, i in index_of.items():
        routes = tuple(
            Route(dst=f"10.244.{j}.0/24", via=str(FABRIC_NET.network_address + j))
            for other, j in index_of.items()
            if other != name
        ) + tuple(
            Route(dst=f"{w.pod_ip}/32", via=str(FABRIC_NET.network_address + index_of[w.node_name]))
            for w in hosted
            if w.node_name != name
        )
        own = tuple(str(w.pod_ip) for w in hosted if w.node_name == name)
        if own:  # a "vm" node: its workloads dial service and ServiceEntry addresses
            routes += (Route(dst="default", via=""),)
        nodes.append(
            NodePlan(
                name=name,
                index=i,
                netns=node_netns(name),
                ip=str(FABRIC_NET.network_address + i),
                pod_cidr=f"10.244.{i}.0/24",
                bridge_ip=f"10.244.{i}.1",
                fabric_ifname=fabric_ifname(i),
                routes=routes,
                cgroup=agent_cgroup_rel(name),
                socket=agent_socket(name),
                state_dir=agent_state_dir(name),
                log=agent_log(name),
                host_addresses=own,
            )
        )

    pods: list[PodPlan] = []
    netns_owner: dict[str, Pod] = {}
    for node in nodes:
        on_node = sorted(
            (p for p in snapshot.pods if p.node_name == node.name),
            key=lambda p: (p.namespace, p.name),
        )
        if len(on_node) > MAX_PODS_PER_NODE:
            errors.append(
                ConfigError(
                    f"node {node.name} has {len(on_node)} pods; the sandbox supports at most "
                    f"{MAX_PODS_PER_NODE} per node"
                )
            )
            continue
        cidr = ipaddress.IPv4Network(node.pod_cidr)
        gateway = ipaddress.IPv4Address(node.bridge_ip)
        taken: dict[ipaddress.IPv4Address, Pod] = {}
        for pod in on_node:
            if pod.pod_ip is None:
                continue
            want = ipaddress.ip_address(pod.pod_ip)
            if (
                not isinstance(want, ipaddress.IPv4Address)
                or want not in cidr
                or want in (gateway, cidr.network_address, cidr.broadcast_address)
            ):
                errors.append(
                    _pod_error(
                        pod,
                        "status.podIP",
                        f"{pod.pod_ip} is not a free address of node {node.name}'s pod CIDR "
                        f"{node.pod_cidr} in the sandbox: remove status.podIP or pick "
                        f"one in {cidr.network_address + 2}-{cidr.broadcast_address - 1}",
                    )
                )
            elif want in taken:
                errors.append(
                    _pod_error(pod, "status.podIP", f"{want} is also Pod {taken[want].key}")
                )
            else:
                taken[want] = pod
        free = (a for a in cidr.hosts() if a != gateway and a not in taken)
        for k, pod in enumerate(on_node, start=1):
            ns_name = pod_netns(pod.namespace, pod.name)
            if ns_name in netns_owner:
                other = netns_owner[ns_name]
                errors.append(
                    _pod_error(
                        pod,
                        "metadata.name",
                        f"its sandbox netns name {ns_name} is also that of Pod {other.key}: "
                        "rename one of them",
                    )
                )
                continue
            netns_owner[ns_name] = pod
            if pod.pod_ip is not None:
                ip = str(ipaddress.ip_address(pod.pod_ip))
            else:
                ip = str(next(free))
            pods.append(
                PodPlan(
                    namespace=pod.namespace,
                    name=pod.name,
                    node=node.name,
                    node_index=node.index,
                    index=k,
                    netns=ns_name,
                    ip=ip,
                    gateway=node.bridge_ip,
                    host_ifname=pod_host_ifname(node.index, k),
                    cgroup=pod_cgroup_rel(node.name, pod.namespace, pod.name),
                    log=pod_log(pod.namespace, pod.name),
                    service_account=pod.service_account,
                    hosts=hosts_file(
                        pod.name,
                        ip,
                        () if dns_proxy and pod.in_mesh else snapshot.services,
                        pod.namespace,
                    ),
                    resolv_conf=resolv_conf(pod.namespace, dns_proxy and pod.in_mesh),
                    ports=_pod_ports(pod),
                )
            )
    for node in nodes:
        for k, w in enumerate((w for w in hosted if w.node_name == node.name), start=1):
            pods.append(
                PodPlan(
                    namespace=w.namespace,
                    name=w.name,
                    node=node.name,
                    node_index=node.index,
                    index=k,
                    netns=node.netns,
                    ip=str(w.pod_ip),
                    gateway="",
                    host_ifname="",
                    cgroup=host_cgroup_rel(node.name, w),
                    log=pod_log(w.namespace, w.name),
                    service_account=w.service_account,
                    hosts="",
                    resolv_conf=resolv_conf(w.namespace, dns_proxy),
                    ports=tuple(sorted({n for c in w.containers for _, n in c.ports})),
                    host=True,
                )
            )
    for svc in snapshot.services:
        if svc.cluster_ip is None:
            continue
        addr = ipaddress.ip_address(svc.cluster_ip)
        if addr in POD_SUPERNET or addr in FABRIC_NET:
            errors.append(
                ConfigError(
                    f"clusterIP {svc.cluster_ip} is inside the sandbox's pod or node network "
                    f"({POD_SUPERNET}, {FABRIC_NET}): pick one elsewhere, e.g. 10.96.0.0/16",
                    source=svc.source,
                    obj=f"Service {svc.key}",
                    field="spec.clusterIP",
                )
            )
    if errors:
        raise ConfigErrors(errors)
    return Topology(nodes=tuple(nodes), pods=tuple(pods))


RESERVED = (
    ipaddress.IPv4Network("127.0.0.0/8"),
    ipaddress.IPv4Network("0.0.0.0/8"),
    ipaddress.IPv4Network("224.0.0.0/3"),
    ipaddress.IPv4Network("169.254.0.0/16"),
)


def _host_workloads(snapshot: MeshSnapshot, errors: list[ConfigError]) -> list[Pod]:
    """The WorkloadEntries a sandbox node hosts (annotated with a node, with an IPv4
    address outside the sandbox's own networks); problems go to ``errors``."""
    out: list[Pod] = []
    taken: dict[str, Pod] = {p.pod_ip: p for p in snapshot.pods if p.pod_ip}
    for w in snapshot.workload_entries:
        if not w.node_name or w.kind != "WorkloadEntry":
            continue
        where = {"source": w.source, "obj": f"WorkloadEntry {w.key}", "field": "spec.address"}
        try:
            addr = ipaddress.IPv4Address(w.pod_ip or "")
        except ValueError:
            errors.append(
                ConfigError(
                    f"{w.pod_ip or 'no address'}: a WorkloadEntry on sandbox node "
                    f"{w.node_name} needs an IPv4 address",
                    **where,
                )
            )
            continue
        if addr in POD_SUPERNET or addr in FABRIC_NET or any(addr in n for n in RESERVED):
            errors.append(
                ConfigError(
                    f"{addr} is inside the sandbox's pod or node network ({POD_SUPERNET}, "
                    f"{FABRIC_NET}) or reserved: pick one elsewhere, e.g. 192.168.50.10",
                    **where,
                )
            )
            continue
        other = taken.get(str(addr))
        if other is not None:
            errors.append(ConfigError(f"{addr} is also {other.kind} {other.key}", **where))
            continue
        taken[str(addr)] = w
        out.append(w)
    return out
