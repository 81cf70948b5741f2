"""The agent with ``--source kubernetes`` end to end: a real ``nodeagent run`` process in
a "node" netns watches the test API server (over HTTPS, across a veth), pods created
through the API are handed to it by ``nodeagent-cni`` after Debian's bridge plugin and
captured, and their traffic to a Service's cluster IP goes through the proxy. A Service
edit reaches the agent within 2 s, an API server restart loses no update, and deleting a
pod through the API removes its capture. Everything is removed at the end, even on
failure."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cnirig import Runtime, Sandbox, nat_rules, netns_add, netns_del
from kubeapi import KubeApiServer
from kubeobjects import namespace, node, pod

from nodeagent.admin.client import AdminClient
from nodeagent.cni import install

pytestmark = [
    pytest.mark.privileged,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root for netns and iptables"),
    pytest.mark.skipif(
        not os.path.exists("/usr/lib/cni/bridge"),
        reason="needs Debian's containernetworking-plugins in /usr/lib/cni",
    ),
]

ROOT = Path(__file__).resolve().parents[2]
TAG = f"{os.getpid() % 100000}"
NODE = "kubenode"
SUBNET = "10.251.78.0/24"
API_HOST, NODE_ADDR = "10.252.78.1", "10.252.78.2"
"""The API server's end of the veth (host side) and the node netns's end."""

ECHO = """
import socket, sys
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5)
s.sendall(b"hello through the mesh"); s.shutdown(socket.SHUT_WR)
data = b""
while chunk := s.recv(4096):
    data += chunk
print(data.decode())
"""


def echo_service(port: int) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "echo", "namespace": "default"},
        "spec": {
            "selector": {"app": "echo"},
            "ports": [{"name": "tcp", "port": port, "targetPort": "tcp-echo", "protocol": "TCP"}],
        },
    }


def api_pod(name: str, app: str) -> dict[str, Any]:
    """A pod just scheduled to the node: no IP yet (kubelet sets it after CNI ADD)."""
    p = pod(name, NODE, None, app=app, phase="Pending", ready=False, sa=app)
    p["spec"]["containers"][0]["ports"] = [{"name": "tcp-echo", "containerPort": 9000}]
    p["spec"]["containers"][0].pop("readinessProbe")
    return p


@dataclass
class Rig:
    api: KubeApiServer
    runtime: Runtime
    socket: str
    agent: subprocess.Popen[bytes]
    log: Path
    netns: list[str]

    def sandbox(self, name: str) -> Sandbox:
        ns = f"nakube-{name[:6]}-{TAG}"
        self.netns.append(ns)
        return Sandbox(name, "default", str(uuid.uuid4()), uuid.uuid4().hex, netns_add(ns))

    def in_pod(self, sb: Sandbox, *argv: str) -> list[str]:
        return ["nsenter", f"--net={sb.netns}", *argv]

    def services(self) -> dict[str, Any]:
        with AdminClient(self.socket, timeout=5) as c:
            return {f"{s['namespace']}/{s['name']}": s for s in c.services()}

    def status(self) -> dict[str, Any]:
        with AdminClient(self.socket, timeout=5) as c:
            return c.status()

    def until(self, check: Callable[[], bool], timeout: float, what: str) -> float:
        """Seconds until ``check`` holds (polled every 20 ms), failing after ``timeout``."""
        t0 = time.monotonic()
        while not check():
            if time.monotonic() - t0 > timeout:
                raise AssertionError(
                    f"not within {timeout}s: {what}\n{self.log.read_text()[-3000:]}"
                )
            if self.agent.poll() is not None:
                raise AssertionError(f"the agent exited: {self.log.read_text()[-3000:]}")
            time.sleep(0.02)
        return time.monotonic() - t0


def sh(*argv: str) -> None:
    subprocess.run(argv, check=True)


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rig]:
    tmp = tmp_path_factory.mktemp("kubeagent")
    node_ns, host_if, node_if = f"nakube-n-{TAG}", f"nakh{TAG}", f"nakn{TAG}"
    bin_dir, conf_dir = tmp / "bin", tmp / "net.d"
    for d in (bin_dir, conf_dir):
        d.mkdir()
    for plugin in ("bridge", "host-local", "loopback"):
        os.symlink(f"/usr/lib/cni/{plugin}", bin_dir / plugin)
    conflist = {
        "cniVersion": "1.0.0",
        "name": f"nakube-{TAG}",
        "plugins": [
            {
                "type": "bridge",
                "bridge": f"nakubebr{TAG}"[:15],
                "isGateway": True,
                "ipMasq": False,
                "ipam": {
                    "type": "host-local",
                    "ranges": [[{"subnet": SUBNET}]],
                    "routes": [{"dst": "0.0.0.0/0"}],
                    "dataDir": str(tmp / "ipam"),
                },
            }
        ],
    }
    (conf_dir / "10-test.conflist").write_text(json.dumps(conflist))
    sock = f"/run/nodeagent/kube-e2e-{TAG}.sock"
    install.install(bin_dir, conf_dir, sock, python=sys.executable, timeout=10, log_level="info")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
    netns_add(node_ns)
    # the node reaches the API server over a veth, as a node reaches its control plane
    sh("ip", "link", "add", host_if, "type", "veth", "peer", "name", node_if)
    sh("ip", "link", "set", node_if, "netns", node_ns)
    sh("ip", "addr", "add", f"{API_HOST}/30", "dev", host_if)
    sh("ip", "link", "set", host_if, "up")
    sh("ip", "-n", node_ns, "addr", "add", f"{NODE_ADDR}/30", "dev", node_if)
    sh("ip", "-n", node_ns, "link", "set", node_if, "up")
    api = KubeApiServer(host=API_HOST, endpointslices=True)
    api.start()
    api.create(namespace("default"))
    api.create(node(NODE))
    api.create(echo_service(9000))
    api.create(api_pod("server", "echo"))
    api.create(api_pod("client", "client"))
    kubeconfig = api.kubeconfig(tmp / "kubeconfig")
    log = tmp / "agent.log"
    agent = subprocess.Popen(
        [sys.executable, "-m", "nodeagent", "run", "--node", NODE, "--source", "kubernetes",
         "--kubeconfig", str(kubeconfig), "--netns", node_ns, "--socket", sock,
         "--state-dir", str(tmp / "state"), "--redirect", "iptables", "--access-log", "off"],
        stdout=log.open("wb"), stderr=subprocess.STDOUT, env=env, start_new_session=True,
    )  # fmt: skip
    chained = json.loads((conf_dir / "10-test.conflist").read_text())  # with nodeagent-cni
    r = Rig(api, Runtime(chained, bin_dir, node_ns, env), sock, agent, log, [])
    try:
        r.until(lambda: os.path.exists(sock) and _answers(sock), 60, "the agent answers")
        yield r
    finally:
        if agent.poll() is None:
            agent.send_signal(signal.SIGTERM)
            try:
                agent.wait(15)
            except subprocess.TimeoutExpired:
                agent.kill()
                agent.wait()
        sys.stderr.write(log.read_text()[-8000:])
        api.close()
        for ns in [*r.netns, node_ns]:
            netns_del(ns)
        subprocess.run(["ip", "link", "del", host_if], check=False, capture_output=True)
        Path(sock).unlink(missing_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)


def _answers(sock: str) -> bool:
    try:
        with AdminClient(sock, timeout=1) as c:
            c.status()
        return True
    except Exception:
        return False


def echo_through(rig: Rig, client: Sandbox, ip: str, port: int, timeout: float = 20) -> str:
    deadline, out = time.monotonic() + timeout, None
    while time.monotonic() < deadline:
        out = subprocess.run(
            rig.in_pod(client, sys.executable, "-c", ECHO, ip, str(port)),
            capture_output=True, text=True, timeout=30, env=rig.runtime.env,
        )  # fmt: skip
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.strip()
        time.sleep(0.3)
    raise AssertionError(f"no echo from {ip}:{port}: {out}")


def test_pods_from_the_api_are_captured_and_served(rig: Rig) -> None:
    status = rig.status()["config"]
    assert status["source"] == "kubernetes"
    kinds = {w["kind"]: w for w in status["watches"]}
    assert kinds["v1 Pod"]["objects"] == 2 and kinds["v1 Service"]["objects"] >= 1

    server, client = rig.sandbox("server"), rig.sandbox("client")
    for sb in (server, client):
        run = rig.runtime.add(sb)
        assert run.ok, sb.log
        assert "NODEAGENT_OUTPUT" in nat_rules(sb.netns), sb.name  # captured when ADD returns
    cluster_ip = rig.api.get(echo_service(9000))["spec"]["clusterIP"]
    app = subprocess.Popen(
        rig.in_pod(server, sys.executable, "-m", "nodeagent", "sample-app", "--port", "8080",
                   "--tcp-echo", "9000", "--service", "echo"),
        env=rig.runtime.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        # the cluster IP exists nowhere: only the proxy, through capture, can answer it
        assert echo_through(rig, client, cluster_ip, 9000) == "hello through the mesh"

        # a Service edit reaches the agent within 2 s
        svc = rig.api.get(echo_service(9000))
        svc["spec"]["ports"][0]["port"] = 9100
        rig.api.replace(svc)
        took = rig.until(
            lambda: rig.services()["default/echo"]["ports"][0]["port"] == 9100, 2.0, "the edit"
        )
        assert took < 2.0
        assert echo_through(rig, client, cluster_ip, 9100) == "hello through the mesh"

        # the API server restarting mid-watch loses no update
        rig.api.stop()
        svc = rig.api.get(echo_service(9000))
        svc["spec"]["ports"][0]["port"] = 9200
        rig.api.replace(svc)  # while it is away
        time.sleep(0.5)
        assert rig.services()["default/echo"]["ports"][0]["port"] == 9100  # still serving
        rig.api.start()
        rig.until(
            lambda: rig.services()["default/echo"]["ports"][0]["port"] == 9200, 15.0, "resume"
        )
        assert echo_through(rig, client, cluster_ip, 9200) == "hello through the mesh"

        # deleting a pod through the API removes its capture
        rig.api.delete(api_pod("client", "client"))
        rig.until(lambda: "NODEAGENT_OUTPUT" not in nat_rules(client.netns), 5.0, "release")
    finally:
        app.terminate()
        app.wait(10)
