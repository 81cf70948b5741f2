"""End to end: config written the way real clusters produce it runs in the sandbox.

The config directory is laid out as kubelet mounts a ConfigMap (a timestamped directory,
``..data``, one link per key); the Pods carry what ``kubectl get -o yaml`` prints
(metadata the API server fills in, probes, resources, volumes, status); the Service has
no ``clusterIP``, as users write it; a Deployment sits beside them. A pod reaches the
Service by name through both agents, and ``nodeagent ctl status`` lists the skipped kind.
"""

from __future__ import annotations

import ipaddress
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from nodeagent.admin.client import AdminClient
from nodeagent.control.clusterip import SERVICE_CIDR
from nodeagent.sandbox import Sandbox

pytestmark = [
    pytest.mark.privileged,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root for netns and iptables"),
]

REDIRECT_MODES = ("iptables",)
"""Names and config shapes do not depend on the capture mode: one is enough."""

PODS = """
apiVersion: v1
kind: Pod
metadata:
  creationTimestamp: "2026-12-06T07:31:02Z"
  generateName: client-5f7d9c-
  labels: {app: client, pod-template-hash: 5f7d9c}
  name: client-5f7d9c-abcde
  namespace: default
  ownerReferences:
  - {apiVersion: apps/v1, blockOwnerDeletion: true, controller: true, kind: ReplicaSet,
     name: client-5f7d9c, uid: 11111111-2222-4333-8444-555555555555}
  resourceVersion: "4711"
  uid: 66666666-7777-4888-9999-000000000000
spec:
  containers:
  - command: [sleep, infinity]
    image: curlimages/curl:8.11.0
    imagePullPolicy: IfNotPresent
    name: main
    resources: {requests: {cpu: 10m, memory: 16Mi}}
    terminationMessagePath: /dev/termination-log
    terminationMessagePolicy: File
    volumeMounts:
    - mountPath: /var/run/secrets/kubernetes.io/serviceaccount
      name: kube-api-access-x1
      readOnly: true
  dnsPolicy: ClusterFirst
  enableServiceLinks: true
  nodeName: node1
  restartPolicy: Always
  schedulerName: default-scheduler
  securityContext: {}
  serviceAccount: client
  serviceAccountName: client
  terminationGracePeriodSeconds: 30
  volumes:
  - name: kube-api-access-x1
    projected:
      defaultMode: 420
      sources:
      - serviceAccountToken: {expirationSeconds: 3607, path: token}
status:
  conditions:
  - {lastProbeTime: null, lastTransitionTime: "2026-12-06T07:31:05Z", status: "True", type: Ready}
  phase: Running
  qosClass: Burstable
---
apiVersion: v1
kind: Pod
metadata:
  generateName: web-7c9d8b-
  labels: {app: web, pod-template-hash: 7c9d8b}
  name: web-7c9d8b-x2x9k
  namespace: default
  resourceVersion: "4712"
  uid: 12345678-1234-4234-8234-123456789012
spec:
  containers:
  - command: [nodeagent, sample-app, --port, "8080", --service, web, --version, v1]
    env:
    - name: POD_IP
      valueFrom: {fieldRef: {apiVersion: v1, fieldPath: status.podIP}}
    image: registry.example.com/web:1.0
    name: web
    ports: [{containerPort: 8080, name: http, protocol: TCP}]
    readinessProbe:
      httpGet: {path: /, port: http, scheme: HTTP}
      periodSeconds: 5
    livenessProbe:
      tcpSocket: {port: 8080}
    resources: {limits: {memory: 128Mi}, requests: {cpu: 50m, memory: 64Mi}}
  nodeName: node2
  serviceAccountName: web
  tolerations:
  - {effect: NoExecute, key: node.kubernetes.io/not-ready, operator: Exists, tolerationSeconds: 300}
status:
  phase: Running
  podIPs: []
"""

SERVICE_AND_DEPLOYMENT = """
apiVersion: v1
kind: Service
metadata: {name: web, namespace: default}
spec:
  selector: {app: web}
  ports:
  - {name: http, port: 80, targetPort: http}
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: web, namespace: default}
spec:
  replicas: 1
  selector: {matchLabels: {app: web}}
  template:
    metadata: {labels: {app: web}}
    spec: {containers: [{name: web, image: registry.example.com/web:1.0}]}
"""


@pytest.fixture(scope="module")
def config_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The config as kubelet mounts a ConfigMap with the keys pods.yaml and web.yaml."""
    d = tmp_path_factory.mktemp("configmap")
    stamp = d / "..2026_12_06_08_00_00.123456789"
    stamp.mkdir()
    (stamp / "pods.yaml").write_text(textwrap.dedent(PODS))
    (stamp / "web.yaml").write_text(textwrap.dedent(SERVICE_AND_DEPLOYMENT))
    (d / "..data").symlink_to(stamp.name)
    for key in ("pods.yaml", "web.yaml"):
        (d / key).symlink_to(f"..data/{key}")
    return d


def test_a_pod_reaches_a_service_written_without_cluster_ip_by_name(sb: Sandbox) -> None:
    with AdminClient(sb.agent_socket("node1")) as c:
        (svc,) = [s for s in c.services() if s["name"] == "web"]
    addr = svc["cluster_ip"]
    assert addr and ipaddress.ip_address(addr) in SERVICE_CIDR
    # the client's names resolve to the address the agents allocated (in every process)
    hosts = sb.exec(
        "client-5f7d9c-abcde",
        ["getent", "hosts", "web"],
        capture_output=True,
        text=True,
        timeout=10,
    )
    assert hosts.stdout.split()[0] == addr, hosts.stdout
    for url in ("http://web/", "http://web.default.svc.cluster.local/"):
        p = sb.exec(
            "client-5f7d9c-abcde",
            ["curl", "-sS", "-m", "10", "-o", "/dev/null", "-w", "%{http_code}", url],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert (p.returncode, p.stdout) == (0, "200"), p.stderr


def test_ctl_status_lists_what_the_mesh_skipped(sb: Sandbox) -> None:
    with AdminClient(sb.agent_socket("node2")) as c:
        cfg = c.status()["config"]
    assert not cfg["last_error"], cfg
    # read once, through the top-level links
    assert sorted(cfg["sources"]) == [
        os.path.join(sb.config_dir, "pods.yaml"),
        os.path.join(sb.config_dir, "web.yaml"),
    ]
    ctl = os.path.join(os.path.dirname(sys.executable), "nodeagent")
    out = subprocess.run(
        [ctl, "ctl", "--node", "node1", "status"],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    ).stdout
    assert "apps/v1 Deployment default/web: not served by the mesh, skipped" in out
