"""The ``networking.istio.io`` kinds of workloads and services outside Kubernetes:
``WorkloadEntry``, ``WorkloadGroup`` and ``ServiceEntry``; their shapes (Istio's v1
fields), their checks (Istio's validation, each problem named by its field path) and
their conversion to ``model.entries``."""

from __future__ import annotations

import dataclasses
import ipaddress
import re
from typing import Any

from nodeagent.control.fields import DNS_SUBDOMAIN, check_port, read_meta
from nodeagent.control.schema import (
    INT,
    STR,
    STR_LIST,
    STR_MAP,
    AnyShape,
    Kind,
    ListOf,
    MapOf,
    Obj,
    Problems,
    resource,
)
from nodeagent.model.entries import (
    HEALTH_CHECKS_ANNOTATION,
    LOCATIONS,
    RESOLUTIONS,
    SE_PROTOCOLS,
    WORKLOAD_CGROUP_ANNOTATION,
    WORKLOAD_NODE_ANNOTATION,
    EntryPort,
    ServiceEntry,
    WorkloadEntry,
    WorkloadGroup,
    is_wildcard,
    workload_cgroup,
)
from nodeagent.model.objects import Labels

ENTRY_ANNOTATIONS = (WORKLOAD_NODE_ANNOTATION, WORKLOAD_CGROUP_ANNOTATION)
"""The ``nodeagent.io/`` annotations a WorkloadEntry may carry."""

API_VERSIONS = (
    "networking.istio.io/v1",
    "networking.istio.io/v1beta1",
    "networking.istio.io/v1alpha3",
)
"""As Istio serves these kinds (v1 since Istio 1.22; the older versions still served)."""

_WE_FIELDS: dict[str, Any] = {
    "address": STR,
    "ports": MapOf(INT),
    "labels": STR_MAP,
    "network": STR,
    "locality": STR,
    "weight": INT,
    "serviceAccount": STR,
}
WORKLOAD_ENTRY_SPEC = Obj(_WE_FIELDS)
WORKLOAD_ENTRY = resource(WORKLOAD_ENTRY_SPEC, spec_required=True)
WORKLOAD_GROUP = resource(
    Obj(
        {
            "metadata": Obj({"labels": STR_MAP, "annotations": STR_MAP}),
            "template": WORKLOAD_ENTRY_SPEC,
            "probe": AnyShape(),
        },
        required=frozenset({"template"}),
    ),
    spec_required=True,
)
SERVICE_ENTRY = resource(
    Obj(
        {
            "hosts": STR_LIST,
            "addresses": STR_LIST,
            "ports": ListOf(
                Obj(
                    {"number": INT, "protocol": STR, "name": STR, "targetPort": INT},
                    required=frozenset({"number", "name"}),
                )
            ),
            "location": STR,
            "resolution": STR,
            "endpoints": ListOf(WORKLOAD_ENTRY_SPEC),
            "workloadSelector": Obj({"labels": STR_MAP}, required=frozenset({"labels"})),
            "exportTo": STR_LIST,
            "subjectAltNames": STR_LIST,
        },
        required=frozenset({"hosts"}),
    ),
    spec_required=True,
)

_HOST = re.compile(r"^(\*|\*\.)?[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
MAX_WEIGHT = 2**32 - 1


def _is_ip(value: str) -> bool:
    try:
        ipaddress.ip_address(value)
    except ValueError:
        return False
    return True


def read_workload(
    raw: dict[str, Any],
    path: str,
    problems: Problems,
    *,
    namespace: str,
    name: str,
    source: str,
    annotations: Labels | None = None,
    address_required: bool = False,
    dns_names: bool = True,
) -> WorkloadEntry:
    """One WorkloadEntry spec (a WorkloadEntry's, a group's template, or a ServiceEntry
    endpoint at ``path``)."""
    address = str(raw.get("address", ""))
    if address.startswith("unix://"):
        problems.add(f"{path}.address", "unix domain socket addresses are not supported")
        address = ""
    elif address and not _is_ip(address):
        if not dns_names:
            problems.add(f"{path}.address", f"{address!r} is not an IP address")
            address = ""
        elif not DNS_SUBDOMAIN.match(address.lower()):
            problems.add(f"{path}.address", f"{address!r} is neither an IP address nor a DNS name")
            address = ""
    elif address:
        address = str(ipaddress.ip_address(address))
    if address_required and not address and "address" not in raw:
        problems.add(f"{path}.address", "required field is missing")
    ports: list[tuple[str, int]] = []
    for pname, number in (raw.get("ports") or {}).items():
        check_port(number, f"{path}.ports.{pname}", problems)
        ports.append((str(pname), int(number)))
    weight = raw.get("weight", 0)
    if not 0 <= weight <= MAX_WEIGHT:
        problems.add(f"{path}.weight", f"{weight} is out of range 0-{MAX_WEIGHT}")
    sa = str(raw.get("serviceAccount", ""))
    if sa and not DNS_SUBDOMAIN.match(sa):
        problems.add(f"{path}.serviceAccount", f"{sa!r} is not a valid service account name")
    return WorkloadEntry(
        namespace=namespace,
        name=name,
        address=address,
        ports=tuple(sorted(ports)),
        labels=Labels.of(raw.get("labels")),
        annotations=annotations or Labels(),
        network=str(raw.get("network", "")),
        locality=str(raw.get("locality", "")),
        weight=int(weight),
        service_account=sa,
        source=source,
    )


def convert_workload_entry(
    doc: dict[str, Any], source: str, problems: Problems
) -> WorkloadEntry | None:
    ns, name = read_meta(doc, problems)
    meta = doc.get("metadata") or {}
    for key, value in (meta.get("annotations") or {}).items():
        path = f"metadata.annotations.{key}"
        if key == WORKLOAD_NODE_ANNOTATION and not DNS_SUBDOMAIN.match(value):
            problems.add(path, f"{value!r} is not a node name")
        elif key == WORKLOAD_CGROUP_ANNOTATION:
            try:
                workload_cgroup(str(value))
            except ValueError as e:
                problems.add(path, str(e))
        elif key.startswith("nodeagent.io/") and key not in ENTRY_ANNOTATIONS:
            problems.add(path, f"unknown annotation (known: {', '.join(ENTRY_ANNOTATIONS)})")
    we = read_workload(
        doc.get("spec") or {},
        "spec",
        problems,
        namespace=ns,
        name=name,
        source=source,
        annotations=Labels.of(meta.get("annotations")),
    )
    # selected by spec.labels only, as Istio's registry does (metadata.labels are not read)
    return dataclasses.replace(we, healthy=_healthy(doc))


def _healthy(doc: dict[str, Any]) -> bool:
    """Istio's rule: with health checks on (the annotation ``"true"``), an entry is
    healthy only while its status has the condition ``Healthy`` ``"True"`` (read
    leniently: the status is Istio's, not the user's)."""
    annotations = (doc.get("metadata") or {}).get("annotations") or {}
    if str(annotations.get(HEALTH_CHECKS_ANNOTATION, "")).lower() not in ("true", "1", "t"):
        return True
    status = doc.get("status")
    conditions = status.get("conditions") if isinstance(status, dict) else None
    for c in conditions if isinstance(conditions, list) else ():
        if isinstance(c, dict) and c.get("type") == "Healthy":
            return str(c.get("status")) == "True"
    return False


def convert_workload_group(
    doc: dict[str, Any], source: str, problems: Problems
) -> WorkloadGroup | None:
    ns, name = read_meta(doc, problems)
    spec = doc.get("spec") or {}
    template = spec.get("template") or {}
    if "address" in template:
        problems.add("spec.template.address", "each VM brings its own address: leave it out")
    md = spec.get("metadata") or {}
    we = read_workload(template, "spec.template", problems, namespace=ns, name=name, source=source)
    return WorkloadGroup(
        namespace=ns,
        name=name,
        labels=Labels.of(md.get("labels")),
        annotations=Labels.of(md.get("annotations")),
        template=we,
        has_probe="probe" in spec,
        source=source,
    )


def _addresses(spec: dict[str, Any], problems: Problems) -> tuple[str, ...]:
    out: list[str] = []
    for i, a in enumerate(spec.get("addresses") or ()):
        try:
            net = ipaddress.ip_network(a, strict=False)
        except ValueError:
            problems.add(f"spec.addresses[{i}]", f"{a!r} is not an IP address or CIDR")
            continue
        full = net.prefixlen == net.max_prefixlen
        out.append(str(net.network_address) if full else str(net))
    return tuple(out)


def _ports(spec: dict[str, Any], problems: Problems) -> tuple[EntryPort, ...]:
    out: list[EntryPort] = []
    numbers: dict[int, int] = {}
    names: dict[str, int] = {}
    for i, p in enumerate(spec.get("ports") or ()):
        path = f"spec.ports[{i}]"
        number, name = p.get("number", 0), str(p.get("name", ""))
        check_port(number, f"{path}.number", problems)
        if number in numbers:
            problems.add(f"{path}.number", f"port {number} is also spec.ports[{numbers[number]}]")
        numbers[number] = i
        if name in names:
            problems.add(f"{path}.name", f"port name {name!r} is also spec.ports[{names[name]}]")
        names[name] = i
        proto = str(p.get("protocol", "TCP"))
        if proto.upper() not in SE_PROTOCOLS:
            known = ", ".join(SE_PROTOCOLS)
            problems.add(f"{path}.protocol", f"expected one of {known}, got {proto!r}")
        target = p.get("targetPort")
        if target is not None:
            check_port(target, f"{path}.targetPort", problems)
        out.append(EntryPort(number=number, protocol=proto.upper(), name=name, target_port=target))
    return tuple(out)


def _status_addresses(doc: dict[str, Any], hosts: list[str]) -> tuple[tuple[str, str], ...]:
    """The addresses Istio allocated (``status.addresses``: ``{value, host}``), read
    leniently (the status is Istio's, not the user's): the agent uses the same ones."""
    status = doc.get("status")
    items = status.get("addresses") if isinstance(status, dict) else None
    out: dict[str, str] = {}
    for item in items if isinstance(items, list) else ():
        if not isinstance(item, dict):
            continue
        host, value = item.get("host"), item.get("value")
        if host in hosts and isinstance(value, str) and _is_ip(value) and ":" not in value:
            out.setdefault(str(host), value)
    return tuple(out.items())


def convert_service_entry(
    doc: dict[str, Any], source: str, problems: Problems
) -> ServiceEntry | None:
    ns, name = read_meta(doc, problems)
    meta = doc.get("metadata") or {}
    spec = doc.get("spec") or {}
    hosts: list[str] = []
    for i, h in enumerate(spec.get("hosts") or ()):
        if not _HOST.match(h):
            problems.add(f"spec.hosts[{i}]", f"{h!r} is not a DNS name (a `*.` prefix allowed)")
        elif h in hosts:
            problems.add(f"spec.hosts[{i}]", f"host {h} is also spec.hosts[{hosts.index(h)}]")
        hosts.append(h)
    if not hosts:
        problems.add("spec.hosts", "a ServiceEntry needs at least one host")
    location = str(spec.get("location", "MESH_EXTERNAL"))
    if location not in LOCATIONS:
        problems.add("spec.location", f"expected one of {', '.join(LOCATIONS)}, got {location!r}")
    resolution = str(spec.get("resolution", "NONE"))
    if resolution not in RESOLUTIONS:
        known = ", ".join(RESOLUTIONS)
        problems.add("spec.resolution", f"expected one of {known}, got {resolution!r}")
    resolution = "DNS" if resolution == "DNS_ROUND_ROBIN" else resolution
    ports = _ports(spec, problems)
    if not ports:
        problems.add("spec.ports", "a ServiceEntry needs at least one port")
    port_names = {p.name for p in ports}
    endpoints: list[WorkloadEntry] = []
    for i, raw in enumerate(spec.get("endpoints") or ()):
        path = f"spec.endpoints[{i}]"
        ep = read_workload(
            raw,
            path,
            problems,
            namespace=ns,
            name=f"{name}-{i}",
            source=source,
            address_required=True,
            dns_names=resolution == "DNS",
        )
        known = ", ".join(sorted(port_names))
        for pname, _ in ep.ports:
            if pname not in port_names:
                problems.add(
                    f"{path}.ports.{pname}", f"no port of the ServiceEntry (its ports: {known})"
                )
        endpoints.append(ep)
    selector = None
    if "workloadSelector" in spec:
        selector = Labels.of(spec["workloadSelector"].get("labels"))
        if not selector:
            problems.add("spec.workloadSelector.labels", "an empty selector selects nothing")
        if endpoints:
            problems.add("spec.workloadSelector", "give endpoints or workloadSelector, not both")
    if resolution == "NONE" and endpoints:
        problems.add("spec.endpoints", "resolution NONE takes no endpoints (use STATIC or DNS)")
    if resolution == "DNS" and not endpoints and selector is None:
        for i, h in enumerate(hosts):
            if is_wildcard(h):
                problems.add(
                    f"spec.hosts[{i}]",
                    "resolution DNS without endpoints resolves each host: a wildcard cannot be",
                )
    return ServiceEntry(
        auto_addresses=_status_addresses(doc, hosts),
        namespace=ns,
        name=name,
        hosts=tuple(hosts),
        ports=ports,
        addresses=_addresses(spec, problems),
        location=location,
        resolution=resolution,
        endpoints=tuple(endpoints),
        workload_selector=selector,
        export_to=tuple(spec.get("exportTo") or ()),
        subject_alt_names=tuple(spec.get("subjectAltNames") or ()),
        labels=Labels.of(meta.get("labels")),
        source=source,
    )


WORKLOAD_ENTRY_KIND = Kind(API_VERSIONS, "WorkloadEntry", WORKLOAD_ENTRY, convert_workload_entry)
WORKLOAD_GROUP_KIND = Kind(API_VERSIONS, "WorkloadGroup", WORKLOAD_GROUP, convert_workload_group)
SERVICE_ENTRY_KIND = Kind(API_VERSIONS, "ServiceEntry", SERVICE_ENTRY, convert_service_entry)
