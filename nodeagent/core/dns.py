"""The names the DNS proxy answers itself, and with which addresses (pure).

``DnsTable.build`` indexes one snapshot's names once; ``DnsTable.lookup`` answers one
question from the point of view of the asking workload's namespace, as ztunnel's DNS
proxy does: the name as asked, its Kubernetes expansions (``reviews`` →
``reviews.<ns>.svc.cluster.local``, ``reviews.default`` → ``….svc.cluster.local``), and
the same after stripping the search domains a pod's resolver appends
(``<ns>.svc.<domain>``, ``svc.<domain>``, ``<domain>``). A name found only after
stripping is answered with a CNAME from the asked name to the stripped one.

The names:

- a Service with a cluster IP: ``<svc>.<ns>.svc.<domain>`` → the cluster IP;
- a headless Service (``clusterIP: None``): the same name → its endpoints' addresses
  (pods and WorkloadEntries it selects);
- a ServiceEntry host with an address (written, or auto-allocated from
  ``240.240.0.0/16``) → its addresses; a ``*.`` wildcard host with ``addresses`` answers
  every name under it; a host without an address is left to the upstream resolver;
- a pod: ``<a-b-c-d>.<ns>.pod.<domain>`` (CoreDNS's ``pods verified``: only a pod of that
  namespace with that address), and ``<hostname>.<subdomain>.<ns>.svc.<domain>`` when its
  ``spec.subdomain`` names a headless Service of its namespace that selects it (as a
  StatefulSet's pods are named);
- a WorkloadEntry selected by a headless Service: ``<entry>.<svc>.<ns>.svc.<domain>``
  (its name standing for a pod's hostname).

Every other name is not ours: ``lookup`` returns None and the proxy forwards it.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Final

from nodeagent.model.objects import Pod
from nodeagent.model.snapshot import MeshSnapshot
from nodeagent.model.traffic import CLUSTER_DOMAIN

TTL: Final = 30
"""Seconds a local answer may be cached (ztunnel's ``DEFAULT_TTL_SECONDS``)."""


@dataclass(frozen=True)
class DnsAnswer:
    """A name the mesh knows: the addresses of the asked family (empty: the name exists
    but has none of that family, an empty NOERROR answer)."""

    addresses: tuple[str, ...]
    stripped: str | None = None
    """The name the address records carry when a search domain was stripped from the
    asked name (the answer holds a CNAME from the asked name to it); None: the asked
    name itself."""
    what: str = ""
    """What answered, for logs: ``service default/reviews``, ``pod default/web-0``."""


@dataclass(frozen=True)
class _Entry:
    addresses: tuple[str, ...]
    what: str


@dataclass(frozen=True)
class DnsTable:
    """One snapshot's names (lowercase, without the final dot) and their addresses."""

    domain: str = CLUSTER_DOMAIN
    hosts: MappingProxyType[str, _Entry] = field(default_factory=lambda: MappingProxyType({}))
    wildcards: MappingProxyType[str, _Entry] = field(default_factory=lambda: MappingProxyType({}))
    """``example.com`` → the entry of the host ``*.example.com``."""

    @classmethod
    def build(cls, snap: MeshSnapshot, domain: str = CLUSTER_DOMAIN) -> DnsTable:
        hosts: dict[str, _Entry] = {}
        wildcards: dict[str, _Entry] = {}
        headless: dict[str, frozenset[str]] = {}
        """A headless Service's key → the keys of the workloads it selects."""
        for s in snap.services:
            if s.is_entry:
                continue
            fqdn = f"{s.name}.{s.namespace}.svc.{domain}".lower()
            if s.cluster_ip:
                hosts[fqdn] = _Entry((s.cluster_ip,), f"service {s.key}")
                continue
            members = snap.endpoints_by_service.get(s.key, ())
            headless[s.key] = frozenset(w.key for w in members)
            hosts[fqdn] = _Entry(_ips(members), f"headless service {s.key}")
            for w in members:  # a WorkloadEntry: its name stands for a hostname
                if w.kind == "WorkloadEntry" and w.pod_ip and _is_ip(w.pod_ip):
                    name = f"{w.name}.{s.name}.{s.namespace}.svc.{domain}".lower()
                    hosts.setdefault(name, _Entry((w.pod_ip,), f"workload entry {w.key}"))
        for s in snap.services:
            if not s.is_entry:
                continue
            addrs = tuple(a for a in (s.addresses or (s.cluster_ip or "",)) if _is_ip(a))
            if not addrs:
                continue  # no address of ours: the upstream resolver answers it
            entry = _Entry(addrs, f"service entry {s.namespace}/{s.entry} host {s.name}")
            host = s.name.lower()
            if host.startswith("*."):
                wildcards.setdefault(host[2:], entry)
            else:
                hosts.setdefault(host, entry)  # a Service's own name wins
        for p in snap.pods:
            if not p.pod_ip or not _is_ip(p.pod_ip):
                continue
            dashed = p.pod_ip.replace(".", "-").replace(":", "-")
            name = f"{dashed}.{p.namespace}.pod.{domain}".lower()
            hosts.setdefault(name, _Entry((p.pod_ip,), f"pod {p.key}"))
            members_of_sub = headless.get(f"{p.namespace}/{p.subdomain}", frozenset())
            if p.subdomain and p.key in members_of_sub:
                host = p.hostname or p.name
                name = f"{host}.{p.subdomain}.{p.namespace}.svc.{domain}".lower()
                hosts.setdefault(name, _Entry((p.pod_ip,), f"pod {p.key}"))
        return cls(
            domain=domain.lower(),
            hosts=MappingProxyType(hosts),
            wildcards=MappingProxyType(wildcards),
        )

    def lookup(self, name: str, namespace: str, family: int) -> DnsAnswer | None:
        """The answer to an ``A`` (``family`` 4) or ``AAAA`` (6) question for ``name``
        asked by a workload of ``namespace``; None when the name is not the mesh's."""
        name = name.lower().rstrip(".")
        for alias, stripped in self._aliases(name, namespace):
            entry = self.hosts.get(alias)
            wildcard = False
            if entry is None:
                entry = self._wildcard(alias)
                wildcard = entry is not None
            if entry is None:
                continue
            version = 4 if family == 4 else 6
            addrs = tuple(a for a in entry.addresses if ipaddress.ip_address(a).version == version)
            return DnsAnswer(addrs, None if wildcard else stripped, entry.what)
        return None

    def _wildcard(self, name: str) -> _Entry | None:
        if not self.wildcards:
            return None
        rest = name
        while "." in rest:
            rest = rest.split(".", 1)[1]
            entry = self.wildcards.get(rest)
            if entry is not None:
                return entry
        return None

    def _aliases(self, name: str, namespace: str) -> list[tuple[str, str | None]]:
        """(candidate, the stripped name it came from) in ztunnel's order: the name, its
        Kubernetes expansions, then each search domain stripped and expanded."""
        ns_domain = f"{namespace}.svc.{self.domain}".lower()
        out: list[tuple[str, str | None]] = [(name, None)]
        out += [(x, None) for x in self._expand(name, ns_domain)]
        for search in (ns_domain, f"svc.{self.domain}", self.domain):
            if name.endswith("." + search):
                short = name[: -len(search) - 1]
                out.append((short, short))
                out += [(x, short) for x in self._expand(short, ns_domain)]
        seen: set[str] = set()
        unique = []
        for alias, stripped in out:
            if alias not in seen:
                seen.add(alias)
                unique.append((alias, stripped))
        return unique

    def _expand(self, name: str, ns_domain: str) -> list[str]:
        """The Kubernetes names ``name`` may be short for (ztunnel's ``to_kube_fqdns``)."""
        labels = name.split(".")
        svc_domain = f"svc.{self.domain}"
        if len(labels) == 1:  # <service>: in the asker's namespace
            return [f"{name}.{ns_domain}"]
        if len(labels) == 2:  # <service>.<ns>, or <hostname>.<subdomain>
            return [f"{name}.{svc_domain}", f"{name}.{ns_domain}"]
        if len(labels) == 3:  # <service>.<ns>.svc, or <hostname>.<subdomain>.<ns>
            out = [f"{name}.{self.domain}"] if labels[-1] == "svc" else []
            return [*out, f"{name}.{svc_domain}"]
        if len(labels) == 4 and labels[-1] == "svc":  # <hostname>.<subdomain>.<ns>.svc
            return [f"{name}.{self.domain}"]
        return []


def _ips(members: tuple[Pod, ...]) -> tuple[str, ...]:
    return tuple(sorted({w.pod_ip for w in members if w.pod_ip and _is_ip(w.pod_ip)}))


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True
