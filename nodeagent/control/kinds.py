"""The supported config kinds: their shapes (the documented subset) and their conversion
to model objects. One function per kind; each reports problems with field paths."""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from nodeagent.control.schema import (
    INT,
    INT_OR_STR,
    STR,
    STR_MAP,
    ListOf,
    MapOf,
    Obj,
    Problems,
    Shape,
    check,
)
from nodeagent.model.objects import Container, Labels, Pod, Service, ServicePort
from nodeagent.model.security import MtlsMode, PeerAuthentication

METADATA = Obj(
    {
        "name": STR,
        "namespace": STR,
        "labels": STR_MAP,
        "annotations": STR_MAP,
    },
    required=frozenset({"name"}),
)

POD = Obj(
    {
        "apiVersion": STR,
        "kind": STR,
        "metadata": METADATA,
        "spec": Obj(
            {
                "nodeName": STR,
                "serviceAccountName": STR,
                "containers": ListOf(
                    Obj(
                        {
                            "name": STR,
                            "image": STR,
                            "command": ListOf(STR),
                            "args": ListOf(STR),
                            "env": ListOf(Obj({"name": STR, "value": STR}, frozenset({"name"}))),
                            "ports": ListOf(
                                Obj(
                                    {"name": STR, "containerPort": INT, "protocol": STR},
                                    frozenset({"containerPort"}),
                                )
                            ),
                        },
                        required=frozenset({"name"}),
                    )
                ),
            },
            required=frozenset({"nodeName", "containers"}),
        ),
        "status": Obj({"podIP": STR}),
    },
    required=frozenset({"metadata", "spec"}),
)

SERVICE = Obj(
    {
        "apiVersion": STR,
        "kind": STR,
        "metadata": METADATA,
        "spec": Obj(
            {
                "selector": STR_MAP,
                "clusterIP": STR,
                "type": STR,
                "ports": ListOf(
                    Obj(
                        {
                            "name": STR,
                            "port": INT,
                            "targetPort": INT_OR_STR,
                            "protocol": STR,
                            "appProtocol": STR,
                        },
                        required=frozenset({"port"}),
                    )
                ),
            },
            required=frozenset({"ports"}),
        ),
    },
    required=frozenset({"metadata", "spec"}),
)

MTLS = Obj({"mode": STR})
PEER_AUTHENTICATION = Obj(
    {
        "apiVersion": STR,
        "kind": STR,
        "metadata": METADATA,
        "spec": Obj(
            {
                "selector": Obj({"matchLabels": STR_MAP}),
                "mtls": MTLS,
                "portLevelMtls": MapOf(MTLS, int_keys=True),
            }
        ),
    },
    required=frozenset({"metadata"}),
)

_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")


@dataclass(frozen=True)
class Kind:
    api_versions: tuple[str, ...]
    kind: str
    shape: Shape
    convert: Callable[[dict[str, Any], str, Problems], object | None]


def _check_port(value: Any, path: str, problems: Problems) -> None:
    if isinstance(value, int) and not 1 <= value <= 65535:
        problems.add(path, f"port {value} is out of range 1-65535")


def _meta(doc: dict[str, Any], problems: Problems) -> tuple[str, str]:
    meta = doc.get("metadata") or {}
    name = meta.get("name", "")
    ns = meta.get("namespace", "default")
    if isinstance(name, str) and name and not _DNS_SUBDOMAIN.match(name):
        problems.add("metadata.name", f"{name!r} is not a valid name (lowercase a-z, 0-9, -, .)")
    if isinstance(ns, str) and not _DNS_LABEL.match(ns):
        problems.add("metadata.namespace", f"{ns!r} is not a valid namespace name")
    return str(ns), str(name)


def convert_pod(doc: dict[str, Any], source: str, problems: Problems) -> Pod | None:
    ns, name = _meta(doc, problems)
    meta = doc.get("metadata") or {}
    spec = doc.get("spec") or {}
    containers: list[Container] = []
    names: set[str] = set()
    for i, c in enumerate(spec.get("containers") or []):
        cname = c.get("name", "")
        if cname in names:
            problems.add(f"spec.containers[{i}].name", f"duplicate container name {cname!r}")
        names.add(cname)
        ports: list[tuple[str, int]] = []
        for j, p in enumerate(c.get("ports") or []):
            _check_port(p.get("containerPort"), f"spec.containers[{i}].ports[{j}]", problems)
            proto = p.get("protocol", "TCP")
            if proto != "TCP":
                problems.add(
                    f"spec.containers[{i}].ports[{j}].protocol",
                    f"only TCP is supported, got {proto!r}",
                )
            ports.append((str(p.get("name", "")), int(p.get("containerPort", 0))))
        containers.append(
            Container(
                name=cname,
                command=tuple(c.get("command") or ()),
                args=tuple(c.get("args") or ()),
                env=tuple((e["name"], str(e.get("value", ""))) for e in c.get("env") or ()),
                image=str(c.get("image", "")),
                ports=tuple(ports),
            )
        )
    if not containers:
        problems.add("spec.containers", "a Pod needs at least one container")
    pod_ip = (doc.get("status") or {}).get("podIP")
    if pod_ip is not None:
        try:
            pod_ip = str(ipaddress.ip_address(pod_ip))
        except ValueError:
            problems.add("status.podIP", f"{pod_ip!r} is not an IP address")
            pod_ip = None
    for key in meta.get("annotations") or {}:
        if key.startswith("traffic.sidecar.istio.io/exclude") and key.endswith("Ports"):
            raw = meta["annotations"][key]
            for part in str(raw).split(","):
                if part.strip() and not (part.strip().isdigit() and 0 < int(part) < 65536):
                    problems.add(
                        f"metadata.annotations.{key}",
                        f"{raw!r}: expected comma-separated port numbers",
                    )
                    break
    return Pod(
        namespace=ns,
        name=name,
        node_name=str(spec.get("nodeName", "")),
        service_account=str(spec.get("serviceAccountName", "default")),
        labels=Labels.of(meta.get("labels")),
        annotations=Labels.of(meta.get("annotations")),
        containers=tuple(containers),
        pod_ip=pod_ip,
        source=source,
    )


def convert_service(doc: dict[str, Any], source: str, problems: Problems) -> Service | None:
    ns, name = _meta(doc, problems)
    if name and not _DNS_LABEL.match(name):
        problems.add("metadata.name", f"{name!r}: a Service name must be a DNS label")
    spec = doc.get("spec") or {}
    svc_type = spec.get("type", "ClusterIP")
    if svc_type != "ClusterIP":
        problems.add("spec.type", f"only ClusterIP is supported, got {svc_type!r}")
    cluster_ip = spec.get("clusterIP")
    if cluster_ip in ("None", ""):
        cluster_ip = None
    if cluster_ip is not None:
        try:
            cluster_ip = str(ipaddress.ip_address(cluster_ip))
        except ValueError:
            problems.add("spec.clusterIP", f"{cluster_ip!r} is not an IP address")
            cluster_ip = None
    ports: list[ServicePort] = []
    seen: dict[int, int] = {}
    for i, p in enumerate(spec.get("ports") or []):
        path = f"spec.ports[{i}]"
        _check_port(p.get("port"), f"{path}.port", problems)
        number = p.get("port", 0)
        if number in seen:
            problems.add(f"{path}.port", f"port {number} is also spec.ports[{seen[number]}]")
        seen[number] = i
        target = p.get("targetPort", number)
        if isinstance(target, int):
            _check_port(target, f"{path}.targetPort", problems)
        elif isinstance(target, str) and target.isdigit():
            target = int(target)
        proto = p.get("protocol", "TCP")
        if proto != "TCP":
            problems.add(f"{path}.protocol", f"only TCP is supported, got {proto!r}")
        ports.append(
            ServicePort(
                port=int(number) if isinstance(number, int) else 0,
                target_port=target,
                name=str(p.get("name", "")),
                protocol=str(proto),
                app_protocol=p.get("appProtocol"),
            )
        )
    if not ports and "ports" in spec:
        problems.add("spec.ports", "a Service needs at least one port")
    if len(ports) > 1:
        for i, sp in enumerate(ports):
            if not sp.name:
                problems.add(f"spec.ports[{i}].name", "required when a Service has several ports")
    return Service(
        namespace=ns,
        name=name,
        ports=tuple(ports),
        selector=Labels.of(spec.get("selector")),
        cluster_ip=cluster_ip,
        source=source,
    )


def _mode(value: object, path: str, problems: Problems) -> MtlsMode:
    try:
        return MtlsMode(str(value).upper() if value is not None else "UNSET")
    except ValueError:
        allowed = ", ".join(m.value for m in MtlsMode)
        problems.add(path, f"unknown mode {value!r} (one of {allowed})")
        return MtlsMode.UNSET


def convert_peer_authentication(
    doc: dict[str, Any], source: str, problems: Problems
) -> PeerAuthentication | None:
    ns, name = _meta(doc, problems)
    spec = doc.get("spec") or {}
    selector = None
    if "selector" in spec:
        selector = Labels.of((spec.get("selector") or {}).get("matchLabels"))
        if not selector:
            problems.add("spec.selector.matchLabels", "an empty selector selects nothing")
    mode = _mode((spec.get("mtls") or {}).get("mode"), "spec.mtls.mode", problems)
    ports: list[tuple[int, MtlsMode]] = []
    for key, value in (spec.get("portLevelMtls") or {}).items():
        path = f"spec.portLevelMtls.{key}"
        if not str(key).isdigit() or not 0 < int(key) < 65536:
            problems.add(path, f"{key!r} is not a port number")
            continue
        ports.append((int(key), _mode((value or {}).get("mode"), f"{path}.mode", problems)))
    if ports and selector is None:
        problems.add(
            "spec.portLevelMtls",
            "portLevelMtls needs a workload selector (as in Istio)",
        )
    return PeerAuthentication(
        namespace=ns,
        name=name,
        mode=mode,
        selector=selector,
        port_modes=tuple(sorted(ports)),
        source=source,
    )


KINDS: tuple[Kind, ...] = (
    Kind(("v1",), "Pod", POD, convert_pod),
    Kind(("v1",), "Service", SERVICE, convert_service),
    Kind(
        ("security.istio.io/v1", "security.istio.io/v1beta1"),
        "PeerAuthentication",
        PEER_AUTHENTICATION,
        convert_peer_authentication,
    ),
)


def find_kind(api_version: str, kind: str) -> Kind | None:
    for k in KINDS:
        if k.kind == kind and api_version in k.api_versions:
            return k
    return None


def supported_kinds() -> str:
    return ", ".join(f"{'/'.join(k.api_versions)} {k.kind}" for k in KINDS)


def validate(doc: dict[str, Any], kind: Kind, source: str) -> tuple[object | None, Problems]:
    problems = Problems()
    check(doc, kind.shape, "", problems)
    if problems.items:
        return None, problems
    obj = kind.convert(doc, source, problems)
    return obj, problems
