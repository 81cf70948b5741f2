"""The Kubernetes kinds ``v1 Pod``, ``Service`` and ``Node``: their shapes (the documented
subset, and the rest of each real v1 type accepted and ignored), which of them the mesh
leaves out (host-network or finished Pods, ExternalName Services), and their conversion
to ``model.objects``, each problem named by its field path."""

from __future__ import annotations

import ipaddress
from typing import Any

from nodeagent.control.fields import DNS_LABEL, check_port, read_meta
from nodeagent.control.kubefields import (
    CONTAINER_IGNORED,
    NODE_SPEC_IGNORED,
    POD_SPEC_IGNORED,
    POD_STATUS_IGNORED,
    SERVICE_SPEC_IGNORED,
)
from nodeagent.control.schema import (
    BOOL,
    INT,
    INT_OR_STR,
    STR,
    STR_MAP,
    Kind,
    ListOf,
    Obj,
    Problems,
    resource,
)
from nodeagent.model.objects import (
    NODE_ANNOTATIONS,
    Container,
    Labels,
    Node,
    Pod,
    Service,
    ServicePort,
)

PROTOCOLS = ("TCP", "UDP", "SCTP")
"""Kubernetes' port protocols; the mesh carries TCP and leaves the others alone."""

POD = resource(
    Obj(
        {
            "nodeName": STR,
            "serviceAccountName": STR,
            "serviceAccount": STR,
            "hostNetwork": BOOL,
            "hostname": STR,
            "subdomain": STR,
            "containers": ListOf(
                Obj(
                    {
                        "name": STR,
                        "image": STR,
                        "command": ListOf(STR),
                        "args": ListOf(STR),
                        "env": ListOf(
                            Obj(
                                {"name": STR, "value": STR},
                                required=frozenset({"name"}),
                                ignored=frozenset({"valueFrom"}),
                            )
                        ),
                        "ports": ListOf(
                            Obj(
                                {"name": STR, "containerPort": INT, "protocol": STR},
                                required=frozenset({"containerPort"}),
                                ignored=frozenset({"hostIP", "hostPort"}),
                            )
                        ),
                    },
                    required=frozenset({"name"}),
                    ignored=CONTAINER_IGNORED,
                )
            ),
        },
        required=frozenset({"nodeName", "containers"}),
        ignored=POD_SPEC_IGNORED,
    ),
    spec_required=True,
    status=Obj({"podIP": STR, "phase": STR}, ignored=POD_STATUS_IGNORED),
)

NODE = resource(Obj({}, ignored=NODE_SPEC_IGNORED))
"""A ``v1 Node``: the agent reads its own node's ``nodeagent.io/`` annotations."""

SERVICE = resource(
    Obj(
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
                    ignored=frozenset({"nodePort"}),
                )
            ),
        },
        required=frozenset({"ports"}),
        ignored=SERVICE_SPEC_IGNORED,
    ),
    spec_required=True,
)
SERVICE_TYPES = ("ClusterIP", "NodePort", "LoadBalancer")
"""Service types with a cluster IP: in the mesh each is served as a ClusterIP Service."""


def _mapping(value: object) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def skip_pod(doc: dict[str, Any]) -> str | None:
    """A Pod the mesh leaves out: on its node's network, finished, or not yet scheduled."""
    spec, status = _mapping(doc.get("spec")), _mapping(doc.get("status"))
    if spec.get("hostNetwork") is True:
        return "hostNetwork Pod: it shares its node's network and is not captured, skipped"
    phase = status.get("phase")
    if phase in ("Succeeded", "Failed"):
        return f"phase {phase}: the Pod has finished, skipped"
    if isinstance(phase, str) and not spec.get("nodeName"):
        return f"phase {phase} and no spec.nodeName: not scheduled to a node yet, skipped"
    return None


def skip_service(doc: dict[str, Any]) -> str | None:
    """A Service the mesh leaves out: an ExternalName alias, or one with no TCP port."""
    spec = _mapping(doc.get("spec"))
    if spec.get("type") == "ExternalName":
        return "type ExternalName: a DNS alias the mesh does not serve, skipped"
    ports = spec.get("ports")
    if (
        isinstance(ports, list)
        and ports
        and all(isinstance(p, dict) and p.get("protocol") in ("UDP", "SCTP") for p in ports)
    ):
        return "no TCP port: the mesh carries TCP only, skipped"
    return None


def _protocol(value: object, path: str, problems: Problems) -> str:
    """A port's protocol (``TCP`` when absent); a problem when it is none of Kubernetes'."""
    proto = "TCP" if value is None else value
    if proto not in PROTOCOLS:
        problems.add(path, f"expected one of {', '.join(PROTOCOLS)}, got {proto!r}")
        return "TCP"
    return str(proto)


def convert_node(doc: dict[str, Any], source: str, problems: Problems) -> Node | None:
    meta = doc.get("metadata") or {}
    _, name = read_meta(doc, problems)
    if "namespace" in meta:
        problems.add("metadata.namespace", "a Node is cluster-scoped: it has no namespace")
    annotations = meta.get("annotations") or {}
    for key, value in annotations.items():
        if not key.startswith("nodeagent.io/"):
            continue
        allowed = NODE_ANNOTATIONS.get(key)
        if allowed is None:
            known = ", ".join(sorted(NODE_ANNOTATIONS))
            problems.add(f"metadata.annotations.{key}", f"unknown annotation (known: {known})")
        elif value not in allowed:
            problems.add(
                f"metadata.annotations.{key}", f"{value!r}: expected one of {', '.join(allowed)}"
            )
    return Node(
        name=name,
        labels=Labels.of(meta.get("labels")),
        annotations=Labels.of(annotations),
        source=source,
    )


def convert_pod(doc: dict[str, Any], source: str, problems: Problems) -> Pod | None:
    ns, name = read_meta(doc, problems)
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
            path = f"spec.containers[{i}].ports[{j}]"
            check_port(p.get("containerPort"), f"{path}.containerPort", problems)
            if _protocol(p.get("protocol"), f"{path}.protocol", problems) != "TCP":
                continue  # UDP and SCTP pass the mesh by: not a port it serves
            ports.append((str(p.get("name", "")), int(p.get("containerPort", 0))))
        containers.append(
            Container(
                name=cname,
                command=tuple(c.get("command") or ()),
                args=tuple(c.get("args") or ()),
                # valueFrom (a field, a Secret, a ConfigMap) has no value outside a cluster
                env=tuple(
                    (e["name"], str(e.get("value", "")))
                    for e in c.get("env") or ()
                    if "value" in e or "valueFrom" not in e
                ),
                image=str(c.get("image", "")),
                ports=tuple(ports),
            )
        )
    if not containers:
        problems.add("spec.containers", "a Pod needs at least one container")
    for key in ("hostname", "subdomain"):  # its DNS name's labels (core/dns.py)
        value = spec.get(key)
        if isinstance(value, str) and value and not DNS_LABEL.match(value):
            problems.add(f"spec.{key}", f"{value!r} is not a DNS label (RFC 1123)")
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
        # serviceAccount: the deprecated alias older manifests still write
        service_account=str(
            spec.get("serviceAccountName") or spec.get("serviceAccount") or "default"
        ),
        labels=Labels.of(meta.get("labels")),
        annotations=Labels.of(meta.get("annotations")),
        containers=tuple(containers),
        pod_ip=pod_ip,
        source=source,
        hostname=str(spec.get("hostname") or ""),
        subdomain=str(spec.get("subdomain") or ""),
    )


def convert_service(doc: dict[str, Any], source: str, problems: Problems) -> Service | None:
    ns, name = read_meta(doc, problems)
    if name and not DNS_LABEL.match(name):
        problems.add("metadata.name", f"{name!r}: a Service name must be a DNS label")
    spec = doc.get("spec") or {}
    svc_type = spec.get("type", "ClusterIP")
    if svc_type not in SERVICE_TYPES:
        problems.add(
            "spec.type",
            f"expected one of {', '.join(SERVICE_TYPES)} or ExternalName, got {svc_type!r}",
        )
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
        check_port(p.get("port"), f"{path}.port", problems)
        proto = _protocol(p.get("protocol"), f"{path}.protocol", problems)
        if proto != "TCP":
            continue  # UDP and SCTP pass the mesh by (port 53 may be both UDP and TCP)
        number = p.get("port", 0)
        if number in seen:
            problems.add(f"{path}.port", f"port {number} is also spec.ports[{seen[number]}]")
        seen[number] = i
        target = p.get("targetPort", number)
        if isinstance(target, int):
            check_port(target, f"{path}.targetPort", problems)
        elif isinstance(target, str) and target.isdigit():
            target = int(target)
        ports.append(
            ServicePort(
                port=int(number) if isinstance(number, int) else 0,
                target_port=target,
                name=str(p.get("name", "")),
                protocol=str(proto),
                app_protocol=p.get("appProtocol"),
            )
        )
    if not spec.get("ports") and "ports" in spec:
        problems.add("spec.ports", "a Service needs at least one port")
    if len(spec.get("ports") or ()) > 1:
        for i, p in enumerate(spec["ports"]):
            if not p.get("name"):
                problems.add(f"spec.ports[{i}].name", "required when a Service has several ports")
    return Service(
        namespace=ns,
        name=name,
        ports=tuple(ports),
        selector=Labels.of(spec.get("selector")),
        cluster_ip=cluster_ip,
        source=source,
    )


POD_KIND = Kind(("v1",), "Pod", POD, convert_pod, skip_pod)
SERVICE_KIND = Kind(("v1",), "Service", SERVICE, convert_service, skip_service)
NODE_KIND = Kind(("v1",), "Node", NODE, convert_node)
