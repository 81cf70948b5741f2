"""Objects as a real cluster's API server returns them (``kubectl get -o yaml``): the
fields the server and the controllers fill in included, for the API source's tests.
The test API server (``tests/kubeapi.py``) adds uid, resourceVersion, creationTimestamp
and managedFields, allocates a Service's clusterIP and, with ``endpointslices=True``,
keeps each Service's EndpointSlice."""

from __future__ import annotations

from typing import Any

Obj = dict[str, Any]


def namespace(name: str = "default", *, ambient: bool = True) -> Obj:
    """A Namespace, enrolled in the mesh (``istio.io/dataplane-mode: ambient``) or not."""
    labels = {"kubernetes.io/metadata.name": name}
    if ambient:
        labels["istio.io/dataplane-mode"] = "ambient"
    return {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "labels": labels},
            "spec": {"finalizers": ["kubernetes"]}, "status": {"phase": "Active"}}  # fmt: skip


def node(name: str, zone: str = "zone-a", region: str = "region-1") -> Obj:
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": name,
            "labels": {
                "kubernetes.io/hostname": name,
                "kubernetes.io/os": "linux",
                "topology.kubernetes.io/region": region,
                "topology.kubernetes.io/zone": zone,
            },
            "annotations": {"node.alpha.kubernetes.io/ttl": "0"},
        },
        "spec": {"podCIDR": "10.244.1.0/24", "podCIDRs": ["10.244.1.0/24"]},
        "status": {
            "addresses": [{"type": "InternalIP", "address": "172.18.0.2"}],
            "capacity": {"cpu": "2", "memory": "4Gi", "pods": "110"},
            "conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady"}],
            "nodeInfo": {"kubeletVersion": "v1.33.1", "osImage": "Debian GNU/Linux 12"},
        },
    }


def pod(
    name: str,
    node_name: str,
    ip: str | None,
    *,
    app: str = "web",
    ns: str = "default",
    phase: str = "Running",
    ready: bool = True,
    sa: str = "web",
    **labels: str,
) -> Obj:
    status: Obj = {
        "phase": phase,
        "conditions": [
            {"type": "Initialized", "status": "True"},
            {"type": "Ready", "status": "True" if ready else "False"},
            {"type": "ContainersReady", "status": "True" if ready else "False"},
            {"type": "PodScheduled", "status": "True"},
        ],
        "hostIP": "172.18.0.2",
        "qosClass": "Burstable",
        "startTime": "2026-12-06T07:00:00Z",
        "containerStatuses": [
            {
                "name": "app",
                "ready": ready,
                "restartCount": 0,
                "image": "registry.example/web:1.0",
                "imageID": "registry.example/web@sha256:0123",
                "containerID": "containerd://abc",
                "started": True,
                "state": {"running": {"startedAt": "2026-12-06T07:00:01Z"}},
            }
        ],
    }
    if ip is not None:
        status["podIP"] = ip
        status["podIPs"] = [{"ip": ip}]
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": name,
            "namespace": ns,
            "generateName": f"{app}-7c9d8f-",
            "labels": {"app": app, "pod-template-hash": "7c9d8f", **labels},
            "ownerReferences": [
                {
                    "apiVersion": "apps/v1",
                    "kind": "ReplicaSet",
                    "name": f"{app}-7c9d8f",
                    "uid": "6f1c2d4e-0000-4000-8000-000000000001",
                    "controller": True,
                    "blockOwnerDeletion": True,
                }
            ],
        },
        "spec": {
            "nodeName": node_name,
            "serviceAccountName": sa,
            "serviceAccount": sa,
            "restartPolicy": "Always",
            "dnsPolicy": "ClusterFirst",
            "schedulerName": "default-scheduler",
            "terminationGracePeriodSeconds": 30,
            "enableServiceLinks": True,
            "preemptionPolicy": "PreemptLowerPriority",
            "priority": 0,
            "securityContext": {},
            "tolerations": [
                {
                    "key": "node.kubernetes.io/not-ready",
                    "operator": "Exists",
                    "effect": "NoExecute",
                    "tolerationSeconds": 300,
                }
            ],
            "volumes": [
                {
                    "name": "kube-api-access-x1",
                    "projected": {
                        "defaultMode": 420,
                        "sources": [{"serviceAccountToken": {"path": "token"}}],
                    },
                }
            ],
            "containers": [
                {
                    "name": "app",
                    "image": "registry.example/web:1.0",
                    "imagePullPolicy": "IfNotPresent",
                    "ports": [{"name": "http", "containerPort": 8080, "protocol": "TCP"}],
                    "resources": {"requests": {"cpu": "100m", "memory": "64Mi"}},
                    "readinessProbe": {
                        "httpGet": {"path": "/ready", "port": 8080, "scheme": "HTTP"},
                        "periodSeconds": 10,
                        "timeoutSeconds": 1,
                        "successThreshold": 1,
                        "failureThreshold": 3,
                    },
                    "terminationMessagePath": "/dev/termination-log",
                    "terminationMessagePolicy": "File",
                    "volumeMounts": [
                        {
                            "name": "kube-api-access-x1",
                            "mountPath": "/var/run/secrets/kubernetes.io/serviceaccount",
                            "readOnly": True,
                        }
                    ],
                }
            ],
        },
        "status": status,
    }


def service(name: str, *, app: str = "web", port: int = 80, ns: str = "default") -> Obj:
    """A Service as written (the server allocates its clusterIP)."""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": ns, "labels": {"app": app}},
        "spec": {
            "type": "ClusterIP",
            "selector": {"app": app},
            "ports": [{"name": "http", "port": port, "targetPort": "http", "protocol": "TCP"}],
            "sessionAffinity": "None",
            "internalTrafficPolicy": "Cluster",
            "ipFamilies": ["IPv4"],
            "ipFamilyPolicy": "SingleStack",
        },
        "status": {"loadBalancer": {}},
    }


def virtual_service(name: str, host: str, *, timeout: Any = "5s", ns: str = "default") -> Obj:
    return {
        "apiVersion": "networking.istio.io/v1",
        "kind": "VirtualService",
        "metadata": {
            "name": name,
            "namespace": ns,
            "annotations": {"kubectl.kubernetes.io/last-applied-configuration": "{}"},
            "generation": 1,
        },
        "spec": {
            "hosts": [host],
            "http": [{"route": [{"destination": {"host": host}}], "timeout": timeout}],
        },
    }
