"""The Kubernetes kinds ``v1 Pod``, ``Service`` and ``Node``: their shapes (the documented
subset) and their conversion to ``model.objects``, each problem named by its field path."""

from __future__ import annotations

import ipaddress
from typing import Any

from nodeagent.control.fields import DNS_LABEL, check_port, read_meta
from nodeagent.control.schema import (
    INT,
    INT_OR_STR,
    METADATA,
    STR,
    STR_MAP,
    Kind,
    ListOf,
    Obj,
    Problems,
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

NODE = Obj(
    {
        "apiVersion": STR,
        "kind": STR,
        "metadata": METADATA,
        "spec": Obj({"podCIDR": STR, "podCIDRs": ListOf(STR)}),
    },
    required=frozenset({"metadata"}),
)
"""A ``v1 Node``: the agent reads its own node's ``nodeagent.io/`` annotations."""

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
            check_port(p.get("containerPort"), f"spec.containers[{i}].ports[{j}]", problems)
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
    ns, name = read_meta(doc, problems)
    if name and not DNS_LABEL.match(name):
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
        check_port(p.get("port"), f"{path}.port", problems)
        number = p.get("port", 0)
        if number in seen:
            problems.add(f"{path}.port", f"port {number} is also spec.ports[{seen[number]}]")
        seen[number] = i
        target = p.get("targetPort", number)
        if isinstance(target, int):
            check_port(target, f"{path}.targetPort", problems)
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


POD_KIND = Kind(("v1",), "Pod", POD, convert_pod)
SERVICE_KIND = Kind(("v1",), "Service", SERVICE, convert_service)
NODE_KIND = Kind(("v1",), "Node", NODE, convert_node)
