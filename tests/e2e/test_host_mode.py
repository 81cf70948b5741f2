"""End to end: host mode. Node ``vm-1`` is a host ("VM") whose workloads are processes in
the node's own netns, each in its own cgroup, declared by WorkloadEntry (annotated
``nodeagent.io/node: vm-1`` and ``nodeagent.io/cgroup``); its agent captures exactly
those cgroups' outbound and the entries' declared inbound ports, in the host's netns.

Checked as a user would: a pod reaches the VM's service by name (the DNS proxy answers
it) over HBONE, with its identity proven to the VM; the VM's workload reaches a pod's
service by name the same way, from its own address; AuthorizationPolicy on a VM's
identity allows one VM workload and denies the other; ``dig`` on the VM answers
service names; a restarted service (its cgroup made again) is captured again; and what
is not a workload is never touched: a listener on the host outside any workload cgroup
sees the client's own connection, and a process of the host outside every workload
cgroup connects out with its own address and port.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from meshops import apply_file

from nodeagent.admin.client import AdminClient
from nodeagent.redirect.netns import netns_path
from nodeagent.sandbox import Sandbox, cgroups
from nodeagent.sandbox.topology import host_cgroup_root_rel

pytestmark = [
    pytest.mark.privileged,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root for netns and iptables"),
]

PY = sys.executable
RATINGS_IP = "192.168.50.10"
REPORTER_IP = "192.168.50.11"

MESH = """
apiVersion: v1
kind: Pod
metadata: {name: client, namespace: default, labels: {app: client}}
spec:
  nodeName: node1
  serviceAccountName: client
  containers: [{name: main, command: [sleep, infinity]}]
---
apiVersion: v1
kind: Pod
metadata: {name: stranger, namespace: default, labels: {app: stranger}}
spec:
  nodeName: node1
  serviceAccountName: stranger
  containers: [{name: main, command: [sleep, infinity]}]
---
apiVersion: v1
kind: Pod
metadata: {name: web, namespace: default, labels: {app: web}}
spec:
  nodeName: node1
  serviceAccountName: web
  containers:
  - name: main
    command: [nodeagent, sample-app, --port, "8080", --service, web]
    ports: [{name: http, containerPort: 8080}]
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: default}
spec:
  selector: {app: web}
  ports: [{name: http, port: 80, targetPort: http}]
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata:
  name: ratings-vm
  namespace: default
  annotations:
    nodeagent.io/node: vm-1
    nodeagent.io/cgroup: ratings.service
    sandbox.nodeagent.io/command: nodeagent sample-app --port 9080 --service ratings --version vm
spec:
  address: 192.168.50.10
  labels: {app: ratings, version: vm}
  serviceAccount: ratings
  ports: {http: 9080}
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata:
  name: reporter-vm
  namespace: default
  annotations:
    nodeagent.io/node: vm-1
    nodeagent.io/cgroup: reporter.service
    sandbox.nodeagent.io/command: sleep infinity
spec:
  address: 192.168.50.11
  labels: {app: reporter}
  serviceAccount: reporter
---
apiVersion: v1
kind: Service
metadata: {name: ratings, namespace: default}
spec:
  selector: {app: ratings}
  ports: [{name: http, port: 9080}]
---
# the VM's service takes calls from the client pod only
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: ratings-from-client, namespace: default}
spec:
  selector: {matchLabels: {app: ratings}}
  action: ALLOW
  rules:
  - from: [{source: {principals: [cluster.local/ns/default/sa/client]}}]
"""


@pytest.fixture(scope="module")
def config_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("hostmode")
    (d / "mesh.yaml").write_text(MESH)
    return d


def get(sb: Sandbox, where: str, url: str) -> tuple[int, dict[str, Any] | str]:
    """(status, JSON body or text) of a GET with curl from a pod or host workload."""
    p = sb.exec(
        where,
        ["curl", "-s", "-m", "10", "-o", "-", "-w", "\n%{http_code}", url],
        capture_output=True,
        text=True,
        timeout=30,
    )
    body, _, code = p.stdout.rpartition("\n")
    try:
        return int(code or 0), json.loads(body)
    except ValueError:
        return int(code or 0), body


def run_in_netns(netns: str, argv: list[str]) -> str:
    """``argv``'s output, run inside ``netns`` (a node's: its own /sys, not a pod's)."""
    p = subprocess.run(["nsenter", f"--net={netns_path(netns)}", *argv],
                       capture_output=True, text=True, timeout=30, check=True)  # fmt: skip
    return p.stdout


def metrics(sb: Sandbox, node: str) -> str:
    return run_in_netns(sb.node_netns(node), ["curl", "-s", "http://127.0.0.1:15020/metrics"])


def mtls_from(sb: Sandbox, node: str, source: str, destination: str) -> float:
    """Connections ``node``'s agent took over mutual TLS from identity ``source`` to
    ``destination`` (its ``istio_tcp_connections_opened_total``, reporter destination)."""
    total = 0.0
    for ln in metrics(sb, node).splitlines():
        if (
            ln.startswith("istio_tcp_connections_opened_total{")
            and 'connection_security_policy="mutual_tls"' in ln
            and f'source_principal="spiffe://cluster.local/ns/default/sa/{source}"' in ln
            and f'destination_principal="spiffe://cluster.local/ns/default/sa/{destination}"' in ln
            and 'reporter="destination"' in ln
        ):
            total += float(ln.rsplit(" ", 1)[1])
    return total


def local_workloads(sb: Sandbox, node: str) -> dict[str, dict[str, Any]]:
    """``nodeagent ctl workloads`` of ``node``: its local ones by namespace/name."""
    with AdminClient(sb.agent_socket(node)) as c:
        return {f"{w['namespace']}/{w['name']}": w for w in c.workloads() if w.get("local")}


def test_the_vms_workloads_are_captured_by_cgroup(sb: Sandbox) -> None:
    ours = local_workloads(sb, "vm-1")
    assert set(ours) == {"default/ratings-vm", "default/reporter-vm"}, ours
    assert all(w["capture"] == "ready" for w in ours.values()), ours
    rules = run_in_netns(sb.node_netns("vm-1"), ["iptables-save", "-t", "nat"])
    assert '-m cgroup --path "/nodeagent/hosts/vm-1/system.slice/ratings.service"' in rules
    # inbound: only the entry's declared port; SSH and the rest are not steered
    assert f"-d {RATINGS_IP}/32 -p tcp -m multiport --dports 9080 " in rules


def test_a_pod_reaches_the_vms_service_by_name_over_hbone(sb: Sandbox) -> None:
    status, body = get(sb, "client", "http://ratings.default.svc.cluster.local:9080/")
    assert status == 200, body
    assert isinstance(body, dict) and body["service"] == "ratings" and body["version"] == "vm"
    # the VM's app sees who called: the client pod's own address
    assert body["client"].startswith(sb.pod_ip("client") + ":"), body["client"]
    # the VM's agent took it over HBONE, from the client's proven identity
    assert mtls_from(sb, "vm-1", "client", "ratings")


def test_policy_on_the_vm_identity_denies_another_pod(sb: Sandbox) -> None:
    status, body = get(sb, "stranger", "http://ratings:9080/")
    assert status == 403, body


def test_the_vm_workload_reaches_a_pods_service_by_name_from_its_own_address(
    sb: Sandbox,
) -> None:
    status, body = get(sb, "reporter-vm", "http://web.default.svc.cluster.local/")
    assert status == 200, body
    assert isinstance(body, dict) and body["service"] == "web"
    assert mtls_from(sb, "node1", "reporter", "web")


def test_policy_on_vm_identities_allows_one_and_denies_the_other(
    sb: Sandbox, config_dir: Path
) -> None:
    path = config_dir / "web-policy.yaml"
    policy = """
        apiVersion: security.istio.io/v1
        kind: AuthorizationPolicy
        metadata: {name: web-from-ratings, namespace: default}
        spec:
          selector: {matchLabels: {app: web}}
          action: ALLOW
          rules:
          - from: [{source: {principals: [cluster.local/ns/default/sa/ratings]}}]
    """
    apply_file(sb, path, policy, nodes=("node1", "vm-1"))
    try:
        assert get(sb, "ratings-vm", "http://web/")[0] == 200
        status, body = get(sb, "reporter-vm", "http://web/")
        assert status == 403, body
    finally:
        apply_file(sb, path, None, nodes=("node1", "vm-1"))


def test_dig_on_the_vm_answers_service_names(sb: Sandbox) -> None:
    p = sb.exec(
        "reporter-vm",
        ["dig", "+short", "+search", "web"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert p.returncode == 0, p.stderr
    with AdminClient(sb.agent_socket("vm-1")) as c:
        services = {f"{s['namespace']}/{s['name']}": s for s in c.services()}
    assert p.stdout.split() == [services["default/web"]["cluster_ip"]], p.stdout


@pytest.fixture
def host_process_cgroup(sb: Sandbox) -> Iterator[Path]:
    """A cgroup of vm-1's host that is no workload's (sshd's, say)."""
    d = sb.cgroup_root / host_cgroup_root_rel("vm-1") / "system.slice" / "ssh.service"
    cgroups.create(d)
    try:
        yield d
    finally:
        cgroups.kill(d)
        d.rmdir()


def test_the_hosts_other_processes_are_not_captured(sb: Sandbox, host_process_cgroup: Path) -> None:
    from nodeagent.sandbox import processes

    # a listener on the host outside any workload cgroup, on a port no entry declares
    listener = subprocess.Popen(
        processes.launcher(
            host_process_cgroup, [PY, "-c", LISTEN, RATINGS_IP, "2222"], netns=sb.node_netns("vm-1")
        ),
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert listener.stdout is not None
        assert listener.stdout.readline().strip() == "listening"
        # a client on node1's host (not a pod) connects: the listener sees that very socket
        out = run_in_netns(sb.node_netns("node1"), [PY, "-c", CONNECT, RATINGS_IP, "2222"])
        mine = json.loads(out)
        seen = json.loads(listener.stdout.readline())
        assert seen == mine["local"], (seen, mine)
    finally:
        listener.kill()
        listener.wait()
    # and a process of the host outside the workloads' cgroups dials out as itself
    node1 = sb.node_ip("node1")
    server = subprocess.Popen(
        ["ip", "netns", "exec", sb.node_netns("node1"), PY, "-c", LISTEN, node1, "2223"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert server.stdout is not None
        assert server.stdout.readline().strip() == "listening"
        p = subprocess.run(
            processes.launcher(
                host_process_cgroup, [PY, "-c", CONNECT, node1, "2223"], netns=sb.node_netns("vm-1")
            ),
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert p.returncode == 0, p.stderr
        mine = json.loads(p.stdout)
        seen = json.loads(server.stdout.readline())
        assert seen == mine["local"] and seen[0] == sb.node_ip("vm-1"), (seen, mine)
    finally:
        server.kill()
        server.wait()


LISTEN = """
import json, socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], int(sys.argv[2]))); s.listen(); print("listening", flush=True)
c, peer = s.accept(); print(json.dumps(list(peer)), flush=True); c.close()
"""
CONNECT = """
import json, socket, sys
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=10)
print(json.dumps({"local": list(s.getsockname())})); s.close()
"""


def test_a_restarted_service_is_captured_again(sb: Sandbox) -> None:
    cg = Path(sb.pod_cgroup("ratings-vm"))
    sb.kill_pod("ratings-vm")
    cg.rmdir()  # as systemd does when a unit stops; a new cgroup when it starts again
    cgroups.create(cg)
    sb.start_pod("ratings-vm")
    deadline = time.monotonic() + 10
    while True:
        status, body = get(sb, "ratings-vm", "http://web/")
        # captured: through the mesh (HBONE), so web sees the VM workload's address
        if (
            status == 200
            and isinstance(body, dict)
            and body.get("client", "").startswith(RATINGS_IP)
        ):
            break
        assert time.monotonic() < deadline, (status, body)
        time.sleep(0.5)
