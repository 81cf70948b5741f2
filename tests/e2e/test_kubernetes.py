"""End to end, the way the agent runs on a cluster: both sandbox agents follow a Kubernetes
API server (``run --source kubernetes``, the test API server on the sandbox's fabric),
and a pod created through that API is started as kubelet starts one, through the CNI
chain with ``nodeagent-cni`` last (tests/e2e/kuberig.py).

What a user would check: the new pod, captured when ADD returns, reaches a service by
name over HBONE (the server side's access log names its mTLS identity); a Service edit is
served by both agents within 2 s; an edit made while the API server is down is served
once it is back; deleting the pod removes its capture; ``ctl status`` shows the watches.
The sandbox itself (its nodes, the server pod) is planned from a config directory holding
the same objects as the API.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from kubeapi import KubeApiServer, running_pod
from kubeobjects import namespace
from kuberig import Kubelet, fabric_api_server, start_on_fabric
from meshops import bpf_programs

from nodeagent.admin.client import AdminClient
from nodeagent.control.runtime import load_runtimes
from nodeagent.redirect.netns import netns_path
from nodeagent.sandbox import Sandbox
from nodeagent.sandbox.state import PODS_FILE

pytestmark = [
    pytest.mark.privileged,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root for netns and iptables"),
    pytest.mark.skipif(
        not os.path.exists("/usr/lib/cni/bridge"),
        reason="needs Debian's containernetworking-plugins in /usr/lib/cni",
    ),
]

NODES = ("node1", "node2")
CLIENT_IP, ECHO_IP = "10.244.1.2", "10.244.2.2"
WEB_ID = "spiffe://cluster.local/ns/default/sa/web"
ECHO_ID = "spiffe://cluster.local/ns/default/sa/echo"

# What runs in the sandbox (nodes, pods, processes): as a user writes it. The API holds the
# same objects as a cluster returns them (below); the agents read only the API.
CONFIG = """\
apiVersion: v1
kind: Pod
metadata: {{name: client, namespace: default, labels: {{app: client}}}}
spec:
  nodeName: node1
  serviceAccountName: client
  containers: [{{name: main, command: [sleep, infinity]}}]
status: {{podIP: {client_ip}}}
---
apiVersion: v1
kind: Pod
metadata: {{name: echo-1, namespace: default, labels: {{app: echo}}}}
spec:
  nodeName: node2
  serviceAccountName: echo
  containers:
  - name: main
    command: [nodeagent, sample-app, --port, "8080", --service, echo]
    ports: [{{name: http, containerPort: 8080}}]
status: {{podIP: {echo_ip}}}
---
apiVersion: v1
kind: Service
metadata: {{name: echo, namespace: default}}
spec:
  selector: {{app: echo}}
  clusterIP: {cluster_ip}
  ports: [{{name: http, port: 80, targetPort: http, appProtocol: http}}]
"""

ECHO_SERVICE: dict[str, Any] = {
    "apiVersion": "v1", "kind": "Service",
    "metadata": {"name": "echo", "namespace": "default", "labels": {"app": "echo"}},
    "spec": {"selector": {"app": "echo"}, "type": "ClusterIP", "sessionAffinity": "None",
             "ports": [{"name": "http", "port": 80, "targetPort": "http", "protocol": "TCP",
                        "appProtocol": "http"}]},
}  # fmt: skip


def api_objects(api: KubeApiServer) -> str:
    """Fill the API as a cluster would hold it; the clusterIP it allocated to echo."""
    api.create(namespace("default"))
    for i, node in enumerate(NODES, start=1):
        api.create({"apiVersion": "v1", "kind": "Node", "metadata": {
            "name": node, "labels": {"kubernetes.io/hostname": node,
                                     "topology.kubernetes.io/zone": f"zone-{i}"}},
            "spec": {"podCIDR": f"10.244.{i}.0/24"}})
    api.create(running_pod("client", ip=CLIENT_IP, node="node1", labels={"app": "client"},
                           service_account="client"))
    api.create(running_pod("echo-1", ip=ECHO_IP, node="node2", labels={"app": "echo"},
                           service_account="echo",
                           ports=[{"name": "http", "containerPort": 8080, "protocol": "TCP"}]))
    svc = api.create(ECHO_SERVICE)
    return str(svc["spec"]["clusterIP"])


def metric_lines(sb: Sandbox, node: str, name: str) -> list[str]:
    """The series of ``name`` in a node agent's metrics (:15020 in its netns)."""
    p = subprocess.run(
        ["nsenter", f"--net={netns_path(sb.node_netns(node))}", "curl", "-sS",
         "http://127.0.0.1:15020/metrics"], capture_output=True, text=True, timeout=10, check=True,
    )  # fmt: skip
    return [line for line in p.stdout.splitlines() if line.startswith(name + "{")]


def metric(lines: list[str], **labels: str) -> float:
    """The sum of the series in ``lines`` that carry ``labels``."""
    return sum(float(line.rsplit(" ", 1)[1]) for line in lines
               if all(f'{k}="{v}"' in line for k, v in labels.items()))


class Mesh:
    """The sandbox, its API server and its kubelet, for one module and capture mode."""

    def __init__(self, sb: Sandbox, api: KubeApiServer, kubelet: Kubelet, redirect: str
                 ) -> None:
        self.sb, self.api, self.kubelet, self.redirect = sb, api, kubelet, redirect

    def captured(self, name: str) -> bool:
        """Whether the capture of a kubelet pod is in place: the agent's iptables rules in
        its netns, or (eBPF) the agent's programs attached to its cgroup."""
        if self.redirect == "iptables":
            return "NODEAGENT" in self.kubelet.nat_rules(name)
        pod = self.kubelet.pods[name]
        with self.admin(pod.node) as c:
            return f"{pod.namespace}_{pod.name}" in (c.bpf().get("attachments") or {})

    def watches(self, node: str) -> dict[str, dict[str, Any]]:
        """Each watched kind's status on a node's agent (``ctl status``'s Watches)."""
        with self.admin(node) as c:
            return {w["kind"]: w for w in c.status()["config"]["watches"]}

    def all_watching(self, node: str) -> bool:
        return all(w["state"] in ("watching", "unserved") for w in self.watches(node).values())

    def admin(self, node: str) -> AdminClient:
        return AdminClient(self.sb.agent_socket(node), timeout=5)

    def service_ports(self, node: str, name: str) -> set[int]:
        with self.admin(node) as c:
            return {int(p["port"]) for s in c.services() if s["name"] == name
                    for p in s.get("ports") or []}

    def wait_all(self, what: str, pred: Callable[[str], bool], timeout: float,
                 poll: float = 0.02) -> float:
        """Seconds until ``pred(node)`` holds on every node (AssertionError after
        ``timeout``)."""
        t0 = time.monotonic()
        pending = set(NODES)
        while pending:
            pending = {n for n in pending if not pred(n)}
            if pending and time.monotonic() - t0 > timeout:
                raise AssertionError(f"{what}: not on {sorted(pending)} within {timeout} s")
            if pending:
                time.sleep(poll)
        return time.monotonic() - t0


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory, redirect: str) -> Iterator[Mesh]:
    tmp = tmp_path_factory.mktemp("kube")
    api = fabric_api_server(endpointslices=True, bookmark_interval=1.0)
    cluster_ip = api_objects(api)
    config = tmp / "config"
    config.mkdir()
    (config / "mesh.yaml").write_text(
        CONFIG.format(client_ip=CLIENT_IP, echo_ip=ECHO_IP, cluster_ip=cluster_ip))
    kubeconfig = tmp / "kubeconfig"
    try:
        sb = Sandbox.up(
            config,
            kubeconfig=kubeconfig,
            before_agents=lambda sb: start_on_fabric(sb, api, kubeconfig),
            agent_args=("--redirect", redirect),
        )
        kubelet: Kubelet | None = None
        try:
            kubelet = Kubelet(sb, api, tmp / "cni")
            yield Mesh(sb, api, kubelet, redirect)
        finally:
            try:
                if kubelet is not None:
                    kubelet.close()
                sb.dump_logs(sys.stderr)
            finally:
                sb.down()
    finally:
        api.close()
    if redirect == "ebpf":
        for _ in range(50):  # programs are freed asynchronously after the unpin
            left = bpf_programs()
            if not left:
                break
            time.sleep(0.1)
        assert not left, f"BPF programs left after sandbox down: {left}"


def test_a_pod_made_through_the_api_reaches_a_service_by_name_over_hbone(mesh: Mesh) -> None:
    pod = mesh.kubelet.run_pod("web", "node1", labels={"app": "web"}, service_account="web")
    # captured the moment ADD returned: the rules are in its netns, the agent says so
    assert mesh.captured("web")
    assert load_runtimes(PODS_FILE)["default/web"].ip == pod.ip
    with mesh.admin("node1") as c:
        mine = [w for w in c.workloads() if w["name"] == "web"]
    assert [(w["ip"], w["capture"]) for w in mine] == [(pod.ip, "ready")], mine

    def known(n: str) -> bool:  # its Running status, with the IP, reached every agent
        with mesh.admin(n) as c:
            return any(w["name"] == "web" and w["ip"] == pod.ip for w in c.workloads())

    mesh.wait_all("web with its IP", known, 5.0)
    got = mesh.kubelet.exec("web", ["curl", "-sS", "-m", "10", "http://echo/hello"])
    assert got.returncode == 0, got.stderr
    answer = json.loads(got.stdout)
    assert (answer["pod"], answer["path"]) == ("echo-1", "/hello"), answer
    # node2 took it over HBONE, mutual TLS, from the new pod's identity; node1's access
    # log names the pod and the peer identity it verified
    lines = metric_lines(mesh.sb, "node2", "istio_tcp_connections_opened_total")
    opened = metric(lines, reporter="destination", source_workload="web",
                    source_principal=WEB_ID, destination_workload="echo-1",
                    connection_security_policy="mutual_tls")
    assert opened == 1, lines
    with mesh.admin("node1") as c:
        recs = [r for r in c.requests()["records"] if r.get("path") == "/hello"]
    assert [(r["reporter"], r["source_workload"], r["source_principal"],
             r["destination_principal"], r["upstream_host"]) for r in recs] == [
        ("source", "web", WEB_ID, ECHO_ID, f"{ECHO_IP}:8080")], recs


def test_a_service_edit_reaches_both_agents_within_2s(mesh: Mesh) -> None:
    assert all(mesh.service_ports(n, "echo") == {80} for n in NODES)
    ref = {"apiVersion": "v1", "kind": "Service",
           "metadata": {"name": "echo", "namespace": "default"}}
    ports = [*mesh.api.get(ref)["spec"]["ports"],
             {"name": "http-alt", "port": 8080, "targetPort": "http", "protocol": "TCP",
              "appProtocol": "http"}]
    t0 = time.monotonic()
    mesh.api.patch(ref, {"spec": {"ports": ports}})
    mesh.wait_all("echo:8080", lambda n: 8080 in mesh.service_ports(n, "echo"), 5.0)
    took = time.monotonic() - t0
    print(f"service edit served by both agents after {took * 1000:.0f} ms")
    assert took < 2.0, f"the edit took {took:.2f} s to reach both agents"
    got = mesh.kubelet.exec("web", ["curl", "-sS", "-m", "10", "http://echo:8080/alt"])
    assert got.returncode == 0 and '"pod": "echo-1"' in got.stdout, (got.stdout, got.stderr)


def test_an_edit_while_the_api_server_is_down_is_not_lost(mesh: Mesh) -> None:
    mesh.wait_all("every watch open", mesh.all_watching, 10.0, poll=0.2)
    def served(n: str) -> bool:
        with mesh.admin(n) as c:
            return "echo-canary" in {s["name"] for s in c.services()}

    mesh.api.stop()
    try:
        # made while every watch is cut and the agents back off
        mesh.api.create({"apiVersion": "v1", "kind": "Service",
                         "metadata": {"name": "echo-canary", "namespace": "default"},
                         "spec": {"selector": {"app": "echo"},
                                  "ports": [{"name": "http", "port": 80, "targetPort": "http",
                                             "appProtocol": "http"}]}})
        time.sleep(1.0)
        assert not any(served(n) for n in NODES)
    finally:
        mesh.api.start()
    mesh.wait_all("echo-canary after the restart", served, 15.0, poll=0.1)
    # every watch is back, resumed from where it was: no relist was needed
    mesh.wait_all("every watch back", mesh.all_watching, 15.0, poll=0.2)
    for n in NODES:
        assert all(not w.get("relists") for w in mesh.watches(n).values()), mesh.watches(n)


def test_ctl_status_shows_the_watches(mesh: Mesh) -> None:
    for n in NODES:
        p = subprocess.run(
            [sys.executable, "-m", "nodeagent", "ctl", "--socket", mesh.sb.agent_socket(n),
             "status"], capture_output=True, text=True, timeout=30, env=mesh.kubelet.env,
        )  # fmt: skip
        assert p.returncode == 0, p.stderr
        out = p.stdout
        assert "Config source:" in out and "kubernetes" in out, out
        watches = out.split("Watches:", 1)[1].splitlines()
        kinds = {line.strip().split(":", 1)[0]: line for line in watches if line.strip()}
        for kind in ("v1 Pod", "v1 Service", "discovery.k8s.io/v1 EndpointSlice", "v1 Node"):
            assert kind in kinds, (kind, out)
            assert f"{kind}: watching" in kinds[kind], kinds[kind]


def test_deleting_the_pod_removes_its_capture(mesh: Mesh) -> None:
    assert mesh.captured("web")
    failed = mesh.kubelet.delete_pod("web")
    assert not failed, failed
    assert not mesh.captured("web")  # gone when DEL returns
    assert "default/web" not in load_runtimes(PODS_FILE)

    def gone(n: str) -> bool:
        with mesh.admin(n) as c:
            return all(w["name"] != "web" for w in c.workloads())

    mesh.wait_all("web gone from the workloads", gone, 5.0, poll=0.1)
    mesh.kubelet.remove("web")
