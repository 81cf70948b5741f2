"""``nodeagent-cni`` chained after Debian's CNI plugins, called as a container runtime calls
them, with a real agent behind its socket.

The test is the runtime: it makes each pod's netns and execs ``loopback``, then the
conflist (``bridge`` with ``host-local`` IPAM, then ``nodeagent-cni``, put there by
``nodeagent cni install``) with ``prevResult`` threaded through. Plugins and agent live in
a "node" netns of the test's own; everything is removed at the end, even on failure. It
runs in both capture modes: eBPF needs the pod's cgroup, which the plugin finds by the
pod's uid as kubelet names it.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cnirig import Runtime, Sandbox, nat_rules, netns_add, netns_del

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
NODE = "cninode"
SERVICE_IP = "10.96.77.10"
SUBNET = "10.251.77.0/24"
CGROUP_V2 = Path("/sys/fs/cgroup/unified")

CONFIG = """\
apiVersion: v1
kind: Pod
metadata: {name: client, namespace: default, labels: {app: client}}
spec: {nodeName: cninode, containers: [{name: main, image: client}]}
---
apiVersion: v1
kind: Pod
metadata: {name: server, namespace: default, labels: {app: echo}}
spec:
  nodeName: cninode
  containers: [{name: main, image: echo, ports: [{name: tcp-echo, containerPort: 9000}]}]
---
apiVersion: v1
kind: Pod
metadata:
  name: optout
  namespace: default
  labels: {app: optout, istio.io/dataplane-mode: none}
spec: {nodeName: cninode, containers: [{name: main, image: optout}]}
---
apiVersion: v1
kind: Service
metadata: {name: echo, namespace: default}
spec:
  selector: {app: echo}
  clusterIP: 10.96.77.10
  ports: [{name: tcp, port: 9000, targetPort: 9000}]
"""

LATE = """\
apiVersion: v1
kind: Pod
metadata: {name: late, namespace: default, labels: {app: late}}
spec: {nodeName: cninode, containers: [{name: main, image: late}]}
"""

ECHO = textwrap.dedent(
    """
    import socket, sys
    s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5)
    s.sendall(b"hello through the mesh"); s.shutdown(socket.SHUT_WR)
    data = b""
    while chunk := s.recv(4096):
        data += chunk
    print(data.decode())
    """
)


@dataclass
class Rig:
    redirect: str
    runtime: Runtime
    config: Path
    conflist: Path
    socket: str
    pods_file: Path
    agent: subprocess.Popen[bytes]
    cgroup: Path
    netns: list[str]
    pods: dict[str, Sandbox]

    def sandbox(self, name: str) -> Sandbox:
        """A pod sandbox: its netns and, as kubelet makes it, its cgroup ``pod<uid>``."""
        ns = f"nacni-{name[:6]}-{TAG}"
        self.netns.append(ns)
        uid = str(uuid.uuid4())
        self.pod_cgroup(uid).mkdir(parents=True)
        sb = self.pods[name] = Sandbox(
            name=name,
            namespace="default",
            uid=uid,
            container_id=uuid.uuid4().hex,
            netns=netns_add(ns),
        )
        return sb

    def pod_cgroup(self, uid: str) -> Path:
        return self.cgroup / f"kubepods-besteffort-pod{uid.replace('-', '_')}.slice"

    def in_pod(self, sb: Sandbox, *argv: str) -> list[str]:
        """``argv`` run as the pod's app: in its cgroup (eBPF captures there), then netns."""
        join = 'echo $$ > "$1/cgroup.procs"; shift; exec "$@"'
        cg = str(self.pod_cgroup(sb.uid))
        return ["sh", "-c", join, "in-pod", cg, "nsenter", f"--net={sb.netns}", *argv]

    def captured(self, sb: Sandbox) -> bool:
        """Whether the pod's capture is in place: its rules, or its eBPF attachments."""
        if self.redirect == "iptables":
            return "NODEAGENT_OUTPUT" in nat_rules(sb.netns)
        with AdminClient(self.socket, timeout=5) as c:
            return f"default_{sb.name}" in c.bpf().get("attachments", {})

    def runtimes(self) -> dict[str, dict[str, str]]:
        if not self.pods_file.exists():
            return {}
        pods: dict[str, dict[str, str]] = json.loads(self.pods_file.read_text())["pods"]
        return pods

    def capture(self, key: str) -> str:
        with AdminClient(self.socket, timeout=5) as c:
            for w in c.workloads():
                if f"{w['namespace']}/{w['name']}" == key:
                    return str(w["capture"])
        return "absent"


def _wait_agent(sock: str, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"the agent exited: {log.read_text()[-3000:]}")
        if os.path.exists(sock):
            try:
                with AdminClient(sock, timeout=1) as c:
                    c.status()
                return
            except Exception:
                pass
        time.sleep(0.2)
    raise AssertionError(f"the agent did not answer on {sock}: {log.read_text()[-3000:]}")


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory, redirect: str) -> Iterator[Rig]:
    tmp = tmp_path_factory.mktemp("cni")
    pin_dir = Path(f"/sys/fs/bpf/nacni-{TAG}")
    node_ns = f"nacni-n-{TAG}"
    bin_dir, conf_dir, config = tmp / "bin", tmp / "net.d", tmp / "config"
    for d in (bin_dir, conf_dir, config):
        d.mkdir()
    for plugin in ("bridge", "host-local", "loopback"):
        os.symlink(f"/usr/lib/cni/{plugin}", bin_dir / plugin)
    (conf_dir / "10-test.conflist").write_text(
        json.dumps(
            {
                "cniVersion": "1.0.0",
                "name": f"nacni-{TAG}",
                "plugins": [
                    {
                        "type": "bridge",
                        "bridge": f"nacnibr{TAG}",
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
        )
    )
    sock = f"/run/nodeagent/cni-e2e-{TAG}.sock"
    install.install(bin_dir, conf_dir, sock, python=sys.executable, timeout=10, log_level="info")
    (config / "mesh.yaml").write_text(CONFIG)
    cgroup = CGROUP_V2 / f"nacni-{TAG}.slice"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
    netns_add(node_ns)
    log = tmp / "agent.log"
    agent_cgroup = cgroup / "agent"  # its own, as a container has: eBPF hooks the agent's cgroup
    agent_cgroup.mkdir(parents=True)
    join = 'echo $$ > "$1/cgroup.procs"; shift; exec "$@"'
    agent = subprocess.Popen(
        ["sh", "-c", join, "agent", str(agent_cgroup),
         sys.executable, "-m", "nodeagent", "run", "--node", NODE, "--config", str(config),
         "--netns", node_ns, "--socket", sock, "--state-dir", str(tmp / "state"),
         "--redirect", redirect, "--bpf-pin-dir", str(pin_dir), "--access-log", "off",
         "--pid-file", str(tmp / "agent.pid")],
        stdout=log.open("wb"), stderr=subprocess.STDOUT, env=env, start_new_session=True,
    )  # fmt: skip
    r = Rig(
        redirect=redirect,
        runtime=Runtime(json.loads((conf_dir / "10-test.conflist").read_text()), bin_dir,
                        node_ns, env),
        config=config, conflist=conf_dir / "10-test.conflist", socket=sock,
        pods_file=tmp / "state" / "pods.json", agent=agent, cgroup=cgroup, netns=[], pods={},
    )  # fmt: skip
    try:
        _wait_agent(sock, agent, log)
        yield r
    finally:
        if agent.poll() is None:
            agent.send_signal(signal.SIGTERM)
            try:
                agent.wait(10)
            except subprocess.TimeoutExpired:
                agent.kill()
                agent.wait()
        sys.stderr.write(log.read_text()[-6000:])
        shutil.rmtree(pin_dir, ignore_errors=True)  # unpinning detaches, frees the programs
        for ns in [*r.netns, node_ns]:
            netns_del(ns)
        for d in cgroup.glob("*"):
            if d.is_dir():
                d.rmdir()
        if cgroup.exists():
            cgroup.rmdir()
        Path(sock).unlink(missing_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)


def test_version_names_the_supported_versions(rig: Rig) -> None:
    run = rig.runtime.version("nodeagent-cni", "0.4.0")
    assert run.ok, run
    assert run.out == {
        "cniVersion": "0.4.0",
        "supportedVersions": ["0.3.0", "0.3.1", "0.4.0", "1.0.0"],
    }


def test_the_agent_launcher_runs_the_plugin_in_the_agents_mount_namespace(
    rig: Rig, tmp_path: Path
) -> None:
    pid_file = rig.pods_file.parent.parent / "agent.pid"
    assert pid_file.read_text().strip() == str(rig.agent.pid)
    exe = tmp_path / "nodeagent-cni"
    exe.write_text(install.launcher(sys.executable, str(pid_file)))
    exe.chmod(0o755)
    p = subprocess.run(
        [str(exe)],
        input=b'{"cniVersion": "1.0.0"}',
        capture_output=True,
        env={**rig.runtime.env, "CNI_COMMAND": "VERSION"},
        timeout=30,
    )
    assert p.returncode == 0, p
    assert json.loads(p.stdout)["supportedVersions"][-1] == "1.0.0"


def test_install_chained_the_plugin_after_the_bridge(rig: Rig) -> None:
    plugins = json.loads(rig.conflist.read_text())["plugins"]
    assert [p["type"] for p in plugins] == ["bridge", "nodeagent-cni"]
    assert plugins[-1]["socket"] == rig.socket


def test_add_returns_with_the_pod_captured(rig: Rig) -> None:
    server, client = rig.sandbox("server"), rig.sandbox("client")
    for sb in (server, client):
        run = rig.runtime.add(sb)
        assert run.ok, sb.log
        # the moment ADD returns, the capture is in place
        assert rig.captured(sb), sb.name
    bridge, ours = client.log[-2], client.log[-1]
    assert ours.plugin == "nodeagent-cni" and ours.out == bridge.out  # prevResult passed on
    ip = bridge.out["ips"][0]["address"].split("/")[0] if bridge.out else ""
    entry = rig.runtimes()["default/client"]
    cgroup = str(rig.pod_cgroup(client.uid))
    assert entry == {"ip": ip, "node": NODE, "netns": client.netns, "cgroup": cgroup}
    assert rig.capture("default/client") == "ready"

    app = subprocess.Popen(
        rig.in_pod(server, sys.executable, "-m", "nodeagent", "sample-app", "--port", "8080",
                   "--tcp-echo", "9000", "--service", "echo"),
        env=rig.runtime.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        # the cluster IP exists nowhere: only the proxy, through capture, can answer it
        deadline, out = time.monotonic() + 20, None
        while time.monotonic() < deadline:
            out = subprocess.run(
                rig.in_pod(client, sys.executable, "-c", ECHO, SERVICE_IP, "9000"),
                capture_output=True, text=True, timeout=30,
            )  # fmt: skip
            if out.returncode == 0 and out.stdout.strip():
                break
            time.sleep(0.3)
        assert out is not None and out.returncode == 0, out
        assert out.stdout.strip() == "hello through the mesh"
    finally:
        app.terminate()
        app.wait(10)


def test_add_waits_for_a_pod_the_config_does_not_hold_yet(rig: Rig) -> None:
    late = rig.sandbox("late")
    done: list[float] = []

    def add() -> None:
        t0 = time.monotonic()
        rig.runtime.add(late)
        done.append(time.monotonic() - t0)

    t = threading.Thread(target=add)
    t.start()
    time.sleep(2.0)  # the config source lags behind the runtime
    (rig.config / "late.yaml").write_text(LATE)
    t.join(30)
    assert late.log[-1].plugin == "nodeagent-cni" and late.log[-1].ok, late.log
    assert done and done[0] >= 2.0, done
    assert rig.captured(late)


def test_an_opted_out_pod_is_left_alone_at_once(rig: Rig) -> None:
    optout = rig.sandbox("optout")
    t0 = time.monotonic()
    run = rig.runtime.add(optout)
    assert run.ok and run.plugin == "nodeagent-cni", optout.log
    assert time.monotonic() - t0 < 5
    assert "nodeagent-cni" in run.err and "opted out" in run.err
    assert not rig.captured(optout) and "NODEAGENT" not in nat_rules(optout.netns)
    assert "default/optout" not in rig.runtimes()


def test_check_then_del_releases_the_pod(rig: Rig) -> None:
    client = rig.pods["client"]
    assert all(r.ok for r in rig.runtime.check(client)), client.log
    runs = rig.runtime.delete(client)
    assert all(r.ok for r in runs), runs
    assert not rig.captured(client) and "NODEAGENT" not in nat_rules(client.netns)
    assert "default/client" not in rig.runtimes()
    assert rig.capture("default/client").startswith("pending")
    again = rig.runtime.delete(client)
    assert all(r.ok for r in again), again
    ours = [r for r in rig.runtime.check(client) if r.plugin == "nodeagent-cni"]
    assert ours and not ours[0].ok and ours[0].out and ours[0].out["code"] == 100, ours


def test_add_fails_for_a_pod_the_config_never_holds(rig: Rig) -> None:
    conflist = json.loads(rig.conflist.read_text())
    conflist["plugins"][-1]["timeout"] = 1
    runtime = Runtime(conflist, rig.runtime.bin_dir, rig.runtime.node_netns, rig.runtime.env)
    stray = rig.sandbox("stray")
    run = runtime.add(stray)
    assert run.plugin == "nodeagent-cni" and run.rc == 1, stray.log
    assert run.out is not None and run.out["code"] == 100, run.out
    assert "pod default/stray is not in the agent's config after 1s" in run.out["msg"]
    assert all(r.ok for r in runtime.delete(stray)), stray.log
    assert "default/stray" not in rig.runtimes()


def test_add_fails_clearly_when_the_agent_is_down(rig: Rig) -> None:
    rig.agent.send_signal(signal.SIGTERM)
    rig.agent.wait(20)
    assert not (rig.pods_file.parent.parent / "agent.pid").exists()
    sb = rig.sandbox("down")
    run = rig.runtime.add(sb)
    assert run.plugin == "nodeagent-cni" and run.rc == 1, sb.log
    assert run.out is not None and run.out["code"] == 11, run.out
    assert rig.socket in run.out["msg"] and "not reachable" in run.out["msg"], run.out
    assert run.out["cniVersion"] == "1.0.0"
    # the runtime then tears the sandbox down: DEL succeeds without the agent
    assert all(r.ok for r in rig.runtime.delete(sb)), sb.log
