"""What a real cluster's controllers and kubelet add to the test API server
(``kubeapi.KubeApiServer``): the EndpointSlice controller (opt-in, ``endpointslices=True``)
and ``running_pod``, a Pod as the API returns it once kubelet has started it.
"""

from __future__ import annotations

import secrets
from typing import Any

from kubestore import Event, Obj, Store

MANAGED_BY = "endpointslice-controller.k8s.io"


def running_pod(name: str, *, ip: str, node: str, namespace: str = "default",
                labels: dict[str, str] | None = None, service_account: str = "default",
                ports: list[dict[str, Any]] | None = None, ready: bool = True) -> Obj:
    """A Pod shaped as ``kubectl get pod -o json`` shows a running one (before the server
    adds uid, resourceVersion and the like)."""
    cond = "True" if ready else "False"
    container: dict[str, Any] = {"name": "app", "image": "registry.local/app:1",
                                 "imagePullPolicy": "IfNotPresent",
                                 "resources": {}, "terminationMessagePolicy": "File"}
    if ports:
        container["ports"] = ports
    return {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": namespace, "labels": dict(labels or {})},
        "spec": {"nodeName": node, "serviceAccountName": service_account,
                 "restartPolicy": "Always", "schedulerName": "default-scheduler",
                 "containers": [container], "dnsPolicy": "ClusterFirst",
                 "terminationGracePeriodSeconds": 30},
        "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}],
                   "hostIP": "192.168.0.1", "qosClass": "BestEffort",
                   "conditions": [{"type": t, "status": cond if t in ("Ready", "ContainersReady")
                                   else "True", "lastTransitionTime": None}
                                  for t in ("PodScheduled", "Initialized", "ContainersReady",
                                            "Ready")]},
    }


def _ready(pod: Obj) -> bool:
    conds = (pod.get("status") or {}).get("conditions") or []
    return any(c.get("type") == "Ready" and c.get("status") == "True" for c in conds)


def _target_port(svc_port: Obj, pod: Obj) -> int | None:
    target = svc_port.get("targetPort", svc_port.get("port"))
    if isinstance(target, int):
        return target
    for c in pod.get("spec", {}).get("containers") or []:
        for p in c.get("ports") or []:
            if p.get("name") == target:
                return int(p["containerPort"])
    return None


class EndpointSliceController:
    """Keeps one EndpointSlice per selector Service, as kube-controller-manager does (in one
    slice, whatever the size; named ports resolved from the first ready-or-not pod)."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self._names: dict[tuple[str, str], str] = {}
        store.hooks.append(self.on_event)

    def on_event(self, ev: Event) -> None:
        if ev.rt.plural == "pods" or ev.rt.plural == "services":
            self.reconcile(ev.obj["metadata"].get("namespace", "default"))
        elif ev.rt.plural == "nodes":
            for ns in {k[2] for k in self.store.objects if k[1] == "services"}:
                self.reconcile(ns)

    def _zone(self, node: str) -> str | None:
        obj = self.store.objects.get(("", "nodes", "", node))
        labels = (obj or {}).get("metadata", {}).get("labels") or {}
        zone = labels.get("topology.kubernetes.io/zone")
        return str(zone) if zone else None

    def desired(self, svc: Obj, pods: list[Obj]) -> tuple[list[Obj], list[Obj]]:
        selector: dict[str, str] = svc["spec"]["selector"]
        chosen = [p for p in pods
                  if all((p["metadata"].get("labels") or {}).get(k) == v
                         for k, v in selector.items())
                  and (p.get("status") or {}).get("podIP")]
        endpoints = []
        for p in chosen:
            ep: Obj = {"addresses": [p["status"]["podIP"]],
                       "conditions": {"ready": _ready(p), "serving": _ready(p),
                                      "terminating": False},
                       "targetRef": {"kind": "Pod", "namespace": p["metadata"]["namespace"],
                                     "name": p["metadata"]["name"],
                                     "uid": p["metadata"]["uid"]}}
            node = p.get("spec", {}).get("nodeName")
            if node:
                ep["nodeName"] = node
                zone = self._zone(node)
                if zone:
                    ep["zone"] = zone
            endpoints.append(ep)
        ports = []
        for sp in svc["spec"].get("ports") or []:
            port = next((t for t in (_target_port(sp, p) for p in chosen) if t), None)
            if port is None and not chosen:
                port = sp["targetPort"] if isinstance(sp.get("targetPort"), int) else None
            ports.append({"name": sp.get("name", ""), "port": port,
                          "protocol": sp.get("protocol", "TCP")})
        return endpoints, ports

    def reconcile(self, ns: str) -> None:
        objs = self.store.objects
        services = {k[3]: v for k, v in objs.items() if k[1:3] == ("services", ns)
                    and (v.get("spec") or {}).get("selector")}
        pods = [v for k, v in objs.items() if k[1:3] == ("pods", ns)]
        slices = {k[3]: v for k, v in objs.items() if k[1:3] == ("endpointslices", ns)
                  and (v["metadata"].get("labels") or {}).get(
                      "endpointslice.kubernetes.io/managed-by") == MANAGED_BY}
        for name, svc in sorted(services.items()):
            endpoints, ports = self.desired(svc, pods)
            slice_name = self._names.setdefault((ns, name), f"{name}-{secrets.token_hex(3)[:5]}")
            cur = slices.pop(slice_name, None)
            if cur is not None and (cur.get("endpoints"), cur.get("ports")) == (endpoints, ports):
                continue
            body: Obj = {
                "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
                "metadata": {"name": slice_name, "namespace": ns, "labels": {
                    "kubernetes.io/service-name": name,
                    "endpointslice.kubernetes.io/managed-by": MANAGED_BY},
                    "ownerReferences": [{"apiVersion": "v1", "kind": "Service", "name": name,
                                         "uid": svc["metadata"]["uid"], "controller": True,
                                         "blockOwnerDeletion": True}]},
                "addressType": "IPv4", "endpoints": endpoints, "ports": ports}
            if cur is None:
                self.store.create(body, manager="endpointslice-controller")
            else:
                self.store.replace(body)
        for name in slices:  # their Service is gone or lost its selector
            self.store.delete({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
                               "metadata": {"name": name, "namespace": ns}})
