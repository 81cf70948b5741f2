"""The checks across config objects, whatever their source: one object per name, one
Service per clusterIP, one namespace-wide PeerAuthentication per namespace, VirtualService
and DestinationRule references, WorkloadEntry and ServiceEntry addresses and hosts. Each
error names the object, its file and the field, and the other object when two clash.
Selectors that match no Pod are warnings."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Protocol

from nodeagent.errors import ConfigError
from nodeagent.model.entries import MeshConfig, ServiceEntry, WorkloadEntry, WorkloadGroup
from nodeagent.model.objects import Pod, Service
from nodeagent.model.security import PeerAuthentication
from nodeagent.model.traffic import Destination, DestinationRule, VirtualService


class _Named(Protocol):
    @property
    def key(self) -> str: ...

    @property
    def source(self) -> str: ...


def check_duplicate_names(by_kind: Mapping[str, Sequence[_Named]]) -> list[ConfigError]:
    """One object per (kind, namespace/name); a repeat names the file of the first."""
    errors: list[ConfigError] = []
    for kind, items in by_kind.items():
        seen: dict[str, str] = {}
        for o in items:
            if o.key in seen:
                errors.append(
                    ConfigError(
                        f"duplicate name: also defined in {seen[o.key]}",
                        source=o.source,
                        obj=f"{kind} {o.key}",
                        field="metadata.name",
                    )
                )
            else:
                seen[o.key] = o.source
    return errors


def cross_check(pods: list[Pod], services: list[Service]) -> list[ConfigError]:
    """Checks across Pods and Services: clusterIP clashes, pod IP clashes."""
    errors: list[ConfigError] = []
    ips: dict[str, Service] = {}
    for s in services:
        if s.cluster_ip is None:
            continue
        other = ips.get(s.cluster_ip)
        if other is not None and other.key != s.key:
            errors.append(
                ConfigError(
                    f"clusterIP {s.cluster_ip} is already used by Service {other.key} "
                    f"({other.source})",
                    source=s.source,
                    obj=f"Service {s.key}",
                    field="spec.clusterIP",
                )
            )
        ips[s.cluster_ip] = s
    pod_ips: dict[str, Pod] = {}
    for p in pods:
        if p.pod_ip is None:
            continue
        if p.pod_ip in pod_ips:
            errors.append(
                ConfigError(
                    f"podIP {p.pod_ip} is also Pod {pod_ips[p.pod_ip].key}",
                    source=p.source,
                    obj=f"Pod {p.key}",
                    field="status.podIP",
                )
            )
        pod_ips[p.pod_ip] = p
    return errors


def check_peer_authentications(items: list[PeerAuthentication]) -> list[ConfigError]:
    """Two namespace-wide policies in one namespace (Istio would silently pick the
    oldest; we say so instead)."""
    errors: list[ConfigError] = []
    seen: set[str] = set()
    wide: dict[str, PeerAuthentication] = {}
    for pa in items:
        if pa.key in seen:  # a duplicate: reported by check_duplicate_names
            continue
        seen.add(pa.key)
        obj = f"PeerAuthentication {pa.key}"
        if pa.selector is None:
            other = wide.get(pa.namespace)
            if other is not None:
                errors.append(
                    ConfigError(
                        f"namespace {pa.namespace} already has a namespace-wide "
                        f"PeerAuthentication {other.key} ({other.source}): merge them",
                        source=pa.source,
                        obj=obj,
                        field="spec.selector",
                    )
                )
            wide[pa.namespace] = pa
    return errors


def _host_name(svc: Service) -> str:
    if svc.is_entry:
        return f"ServiceEntry {svc.namespace}/{svc.entry} host {svc.name}"
    return f"Service {svc.key}"


def check_traffic(
    virtual_services: list[VirtualService],
    destination_rules: list[DestinationRule],
    services: list[Service],
) -> list[ConfigError]:
    """VirtualService/DestinationRule checks across objects: two rules for one host, a
    route naming a subset no DestinationRule defines or a port its Service lacks."""
    errors: list[ConfigError] = []
    vs_hosts: dict[str, VirtualService] = {}
    for vs in virtual_services:
        for i, host in enumerate(vs.hosts):
            other = vs_hosts.get(host)
            if other is not None and other.key != vs.key:
                errors.append(
                    ConfigError(
                        f"host {host} is also routed by VirtualService {other.key} "
                        f"({other.source}): merge them",
                        source=vs.source,
                        obj=f"VirtualService {vs.key}",
                        field=f"spec.hosts[{i}]",
                    )
                )
            vs_hosts.setdefault(host, vs)
    rules: dict[str, DestinationRule] = {}
    for dr in destination_rules:
        other_dr = rules.get(dr.host)
        if other_dr is not None and other_dr.key != dr.key:
            errors.append(
                ConfigError(
                    f"host {dr.host} already has DestinationRule {other_dr.key} "
                    f"({other_dr.source}): merge them",
                    source=dr.source,
                    obj=f"DestinationRule {dr.key}",
                    field="spec.host",
                )
            )
        rules.setdefault(dr.host, dr)

    by_fqdn = {s.hostnames()[-1]: s for s in services}

    def check_subset(vs: VirtualService, dest: Destination, path: str) -> None:
        svc = by_fqdn.get(dest.host)
        if svc is not None and dest.port is not None and svc.port(dest.port) is None:
            errors.append(
                ConfigError(
                    f"{_host_name(svc)} has no port {dest.port} "
                    f"(its ports: {', '.join(str(p.port) for p in svc.ports)})",
                    source=vs.source,
                    obj=f"VirtualService {vs.key}",
                    field=path.removesuffix(".subset") + ".port.number",
                )
            )
        if dest.subset is None:
            return
        dr = rules.get(dest.host)
        if dr is None:
            errors.append(
                ConfigError(
                    f"subset {dest.subset!r} of host {dest.host} is not defined: "
                    f"no DestinationRule for {dest.host}",
                    source=vs.source,
                    obj=f"VirtualService {vs.key}",
                    field=path,
                )
            )
        elif dr.subset(dest.subset) is None:
            known = ", ".join(s.name for s in dr.subsets) or "none"
            errors.append(
                ConfigError(
                    f"subset {dest.subset!r} is not defined by DestinationRule {dr.key} "
                    f"({dr.source}; its subsets: {known})",
                    source=vs.source,
                    obj=f"VirtualService {vs.key}",
                    field=path,
                )
            )

    for vs in virtual_services:
        for i, rule in enumerate(vs.http):
            for j, rd in enumerate(rule.routes):
                check_subset(vs, rd.destination, f"spec.http[{i}].route[{j}].destination.subset")
            if rule.mirror is not None:
                check_subset(vs, rule.mirror, f"spec.http[{i}].mirror.subset")
        for i, tcp in enumerate(vs.tcp):
            for j, rd in enumerate(tcp.routes):
                check_subset(vs, rd.destination, f"spec.tcp[{i}].route[{j}].destination.subset")

    return errors


def unmatched_selectors(
    pods: Sequence[Pod], services: Sequence[Service], destination_rules: Sequence[DestinationRule]
) -> list[str]:
    """Warnings, not errors: a Service selector or a DestinationRule subset that selects no
    Pod right now. Kubernetes and Istio accept both (pods come and go: a scaled-down
    Deployment, a rollout replacing a version), so the config still loads."""
    warnings: list[ConfigError] = []
    for s in services:
        if not s.selector:
            continue
        if not any(p.namespace == s.namespace and p.labels.matches(s.selector) for p in pods):
            warnings.append(
                ConfigError(
                    f"selector {s.selector} matches no Pod in namespace {s.namespace}",
                    source=s.source,
                    obj=f"Service {s.key}",
                    field="spec.selector",
                )
            )
    by_fqdn = {s.hostnames()[-1]: s for s in services}
    for dr in destination_rules:
        svc = by_fqdn.get(dr.host)
        if svc is None or not svc.selector:
            continue
        backends = [
            p for p in pods if p.namespace == svc.namespace and p.labels.matches(svc.selector)
        ]
        if not backends:
            continue  # said once, of the Service
        for i, subset in enumerate(dr.subsets):
            if subset.labels and not any(p.labels.matches(subset.labels) for p in backends):
                warnings.append(
                    ConfigError(
                        f"labels {subset.labels} select no Pod of Service {svc.key} "
                        f"(selector {svc.selector})",
                        source=dr.source,
                        obj=f"DestinationRule {dr.key}",
                        field=f"spec.subsets[{i}].labels",
                    )
                )
    return [str(w) for w in warnings]


def check_entries(
    pods: Sequence[Pod],
    services: Sequence[Service],
    workload_entries: Sequence[WorkloadEntry],
    service_entries: Sequence[ServiceEntry],
) -> list[ConfigError]:
    """WorkloadEntry addresses used twice (or by a Pod); a ServiceEntry address used by
    a Service or another entry; a host two ServiceEntries declare."""
    errors: list[ConfigError] = []
    ips: dict[str, str] = {p.pod_ip: f"Pod {p.key}" for p in pods if p.pod_ip}
    for we in workload_entries:
        if not we.address:
            continue
        other = ips.get(we.address)
        if other is not None:
            errors.append(
                ConfigError(
                    f"address {we.address} is also {other}",
                    source=we.source,
                    obj=f"WorkloadEntry {we.key}",
                    field="spec.address",
                )
            )
        ips.setdefault(we.address, f"WorkloadEntry {we.key} ({we.source})")
    used: dict[str, str] = {s.cluster_ip: f"Service {s.key}" for s in services if s.cluster_ip}
    hosts: dict[str, ServiceEntry] = {}
    for se in service_entries:
        obj = f"ServiceEntry {se.key}"
        for i, a in enumerate(se.addresses):
            other = used.get(a)
            if other is not None and other != obj:
                errors.append(
                    ConfigError(
                        f"address {a} is already used by {other}",
                        source=se.source,
                        obj=obj,
                        field=f"spec.addresses[{i}]",
                    )
                )
            used.setdefault(a, obj)
        for i, h in enumerate(se.hosts):
            first = hosts.get(h)
            if first is not None and first.key != se.key:
                errors.append(
                    ConfigError(
                        f"host {h} is also declared by ServiceEntry {first.key} "
                        f"({first.source}): merge them",
                        source=se.source,
                        obj=obj,
                        field=f"spec.hosts[{i}]",
                    )
                )
            hosts.setdefault(h, se)
    return errors


def entry_warnings(
    workloads: Sequence[Pod],
    groups: Sequence[WorkloadGroup],
    service_entries: Sequence[ServiceEntry],
    mesh_configs: Sequence[MeshConfig],
    root_namespace: str,
) -> list[str]:
    """What loads but is not (fully) served: a WorkloadGroup's probe, a ServiceEntry's
    subjectAltNames or narrowed exportTo, a selector matching no workload, an ``istio``
    ConfigMap outside the root namespace."""
    out: list[ConfigError] = []
    for g in groups:
        if g.has_probe:
            out.append(
                ConfigError(
                    "probe is not run: the agent does not health-check VM workloads",
                    source=g.source,
                    obj=f"WorkloadGroup {g.key}",
                    field="spec.probe",
                )
            )
    for se in service_entries:
        obj = f"ServiceEntry {se.key}"
        if se.subject_alt_names:
            out.append(
                ConfigError(
                    "not read: HBONE checks each endpoint's serviceAccount identity",
                    source=se.source,
                    obj=obj,
                    field="spec.subjectAltNames",
                )
            )
        if se.export_to and "*" not in se.export_to:
            out.append(
                ConfigError(
                    "not enforced: every namespace sees the entry's hosts",
                    source=se.source,
                    obj=obj,
                    field="spec.exportTo",
                )
            )
        sel = se.workload_selector
        ns = se.namespace
        if sel and not any(w.namespace == ns and w.labels.matches(sel) for w in workloads):
            out.append(
                ConfigError(
                    f"labels {sel} match no Pod or WorkloadEntry in namespace {se.namespace}",
                    source=se.source,
                    obj=obj,
                    field="spec.workloadSelector.labels",
                )
            )
    for mc in mesh_configs:
        if mc.namespace != root_namespace:
            out.append(
                ConfigError(
                    f"not read: the mesh config is the istio ConfigMap of the root namespace "
                    f"({root_namespace})",
                    source=mc.source,
                    obj=f"ConfigMap {mc.key}",
                    field="metadata.namespace",
                )
            )
    return [str(w) for w in out]
