"""The sandbox's plumbing without agents: netns, veths, routes, names, cgroups, processes,
and a teardown that leaves the machine as it found it (also after a crash)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from nodeagent.errors import LocalStateError
from nodeagent.sandbox import Sandbox, SandboxAlreadyUp, leftovers, teardown
from nodeagent.sandbox import cgroups as sandbox_cgroups
from nodeagent.sandbox.state import STATE_FILE

pytestmark = pytest.mark.privileged

WriteConfig = Callable[[str], Path]
NODEAGENT = os.path.join(os.path.dirname(sys.executable), "nodeagent")

CONFIG = """
apiVersion: v1
kind: Pod
metadata: {name: web, namespace: default, labels: {app: web}}
spec:
  nodeName: node1
  serviceAccountName: web-sa
  containers:
  - name: web
    command: [python3, -m, http.server, "8080", --bind, 0.0.0.0]
    env: [{name: GREETING, value: hello}]
    ports: [{containerPort: 8080}]
---
apiVersion: v1
kind: Pod
metadata: {name: api, namespace: shop, labels: {app: api}}
spec:
  nodeName: node2
  containers:
  - name: api
    command: [python3, -m, http.server, "9090"]
    ports: [{containerPort: 9090}]
---
apiVersion: v1
kind: Pod
metadata: {name: api, namespace: default, labels: {app: idle}}
spec:
  nodeName: node1
  containers:
  - name: nothing
    image: busybox
---
apiVersion: v1
kind: Service
metadata: {name: api, namespace: shop}
spec:
  selector: {app: api}
  clusterIP: 10.96.0.20
  ports: [{port: 80, targetPort: 9090}]
"""


def run(*argv: str) -> str:
    return subprocess.run(argv, check=True, capture_output=True, text=True).stdout


def machine_state() -> dict[str, object]:
    """What the sandbox must leave as it found it."""
    root = sandbox_cgroups.find_root()
    ours = sandbox_cgroups.subtree(root)
    netns = {line.split()[0] for line in run("ip", "netns", "list").splitlines() if line}
    iptables = run("iptables-save")
    iptables = "\n".join(
        re.sub(r"\[\d+:\d+\]", "", line)
        for line in iptables.splitlines()
        if not line.startswith("#")
    )
    return {
        # other suites may make their own namespaces meanwhile; ours all start with na-
        "netns": sorted(n for n in netns if n.startswith("na-")),
        "cgroups": [str(p) for p in sandbox_cgroups.tree(ours)],
        "etc_netns": sorted(os.listdir("/etc/netns")) if os.path.isdir("/etc/netns") else None,
        "iptables": iptables,
        "root_links": sorted(
            line.split(":")[1].strip().split("@")[0]
            for line in run("ip", "-o", "link", "show").splitlines()
        ),
        "sockets": sorted(str(p) for p in Path("/run/nodeagent").glob("node*.sock")),
        "state_dir": os.path.exists("/run/nodeagent/sandbox"),
    }


@pytest.fixture
def config(write_config: WriteConfig) -> Path:
    return write_config(CONFIG)


@pytest.fixture
def clean_machine() -> Iterator[dict[str, object]]:
    """Start without sandbox leftovers, and remove whatever a test made, even on failure."""
    teardown()
    before = machine_state()
    assert before["netns"] == [] and before["cgroups"] == []
    try:
        yield before
    finally:
        teardown()


@pytest.fixture
def sb(config: Path, clean_machine: dict[str, object]) -> Iterator[Sandbox]:
    with Sandbox.up(config, agents=False) as sandbox:
        yield sandbox


def http_code(sb: Sandbox, pod: str, url: str) -> str:
    r = sb.exec(
        pod,
        ["curl", "-s", "-m", "5", "-o", "/dev/null", "-w", "%{http_code}", url],
        capture_output=True,
        text=True,
    )
    return f"{r.returncode}:{r.stdout}{r.stderr}"


def test_pods_reach_each_other_across_nodes(sb: Sandbox) -> None:
    web, api = sb.pod_ip("web"), sb.pod_ip("shop/api")
    assert (web, api) == ("10.244.1.3", "10.244.2.2")  # default/api is .2 on node1
    assert http_code(sb, "web", f"http://{api}:9090/") == "0:200"
    assert http_code(sb, "shop/api", f"http://{web}:8080/") == "0:200"
    # a pod reaches the other node's fabric address too (through its node's routes)
    r = sb.exec("web", ["ip", "route", "get", api], capture_output=True, text=True)
    assert "via 10.244.1.1" in r.stdout


def test_service_names_resolve_in_pods(sb: Sandbox) -> None:
    for name in ("api.shop.svc.cluster.local", "api.shop.svc", "api.shop"):
        r = sb.exec("web", ["getent", "hosts", name], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        assert r.stdout.split()[0] == "10.96.0.20"
    r = sb.exec("web", ["getent", "hosts", "web"], capture_output=True, text=True)
    assert r.stdout.split()[0] == "10.244.1.3"
    r = sb.exec("web", ["getent", "hosts", "api"], capture_output=True, text=True)
    assert r.stdout.split()[0] == "10.96.0.20"
    # as in Kubernetes, a pod's own name wins over a service's short name
    r = sb.exec("shop/api", ["getent", "hosts", "api"], capture_output=True, text=True)
    assert r.stdout.split()[0] == "10.244.2.2"


def test_pods_run_in_their_cgroup_and_netns(sb: Sandbox) -> None:
    for pod in ("default/web", "shop/api"):
        pids = sb.pod_pids_live(pod)
        assert len(pids) == 1, f"{pod}: {pids}"
        pid = pids[0]
        cg = Path(sb.pod_cgroup(pod))
        assert pid in [int(x) for x in (cg / "cgroup.procs").read_text().split()]
        assert (
            os.stat(f"/proc/{pid}/ns/net").st_ino
            == os.stat(f"/var/run/netns/{sb.pod_netns(pod)}").st_ino
        )
    environ = Path(f"/proc/{sb.pod_pids_live('web')[0]}/environ").read_bytes().split(b"\0")
    env = dict(e.decode().split("=", 1) for e in environ if b"=" in e)
    assert env["POD_NAME"] == "web"
    assert env["POD_NAMESPACE"] == "default"
    assert env["NODE_NAME"] == "node1"
    assert env["POD_IP"] == "10.244.1.3"
    assert env["SERVICE_ACCOUNT"] == "web-sa"
    assert env["GREETING"] == "hello"
    assert env["PATH"].split(":")[0].endswith("/bin")
    # exec'd commands join the pod's cgroup too (so BPF cgroup hooks see them)
    r = sb.exec("web", ["cat", "/proc/self/cgroup"], capture_output=True, text=True)
    assert "0::/nodeagent/pods/node1/default_web" in r.stdout


def test_nodes_forward_and_route_only_inside_the_sandbox(
    sb: Sandbox, clean_machine: dict[str, object]
) -> None:
    for node, other in (("node1", "2"), ("node2", "1")):
        ns = sb.node_netns(node)
        fwd = run("ip", "netns", "exec", ns, "cat", "/proc/sys/net/ipv4/ip_forward")
        assert fwd.strip() == "1"
        routes = run("ip", "-n", ns, "route")
        assert f"10.244.{other}.0/24 via 10.250.0.{other} dev eth0" in routes
        assert "default" not in routes
        unreachable = subprocess.run(
            ["ip", "-n", ns, "route", "get", "1.1.1.1"], capture_output=True, text=True
        )
        assert unreachable.returncode != 0
        assert run("ip", "-n", ns, "-o", "-4", "addr", "show", "eth0").split()[3] == (
            f"{sb.node_ip(node)}/24"
        )
    # the root netns got no link, address, route or rule
    now = machine_state()
    assert now["root_links"] == clean_machine["root_links"]
    assert now["iptables"] == clean_machine["iptables"]


def test_status_and_names(sb: Sandbox) -> None:
    st = sb.status()
    assert st["up"] is True and st["agents"] is False
    assert [n["name"] for n in st["nodes"]] == ["node1", "node2"]
    pods = {p["key"]: p for p in st["pods"]}
    assert set(pods) == {"default/web", "default/api", "shop/api"}
    assert pods["default/web"]["running"] and pods["default/web"]["pids"]
    assert pods["default/api"]["containers"] == 0 and pods["default/api"]["pids"] == []
    assert pods["default/api"]["ip"] == "10.244.1.2"
    with pytest.raises(LocalStateError, match="ambiguous: default/api, shop/api"):
        sb.pod_ip("api")
    with pytest.raises(LocalStateError, match="no pod named nope"):
        sb.pod_ip("nope")
    assert Sandbox.attach().status()["pods"] == st["pods"]
    out = run(NODEAGENT, "sandbox", "status", "-o", "json")
    assert '"default/web"' in out


def test_kill_pod_and_start_it_again(sb: Sandbox) -> None:
    sb.kill_pod("shop/api")
    assert sb.pod_pids_live("shop/api") == []
    assert http_code(sb, "web", "http://10.244.2.2:9090/").startswith("7:")
    sb.start_pod("shop/api")
    assert http_code(sb, "web", "http://10.244.2.2:9090/") == "0:200"


def test_cli_exec_passes_exit_code_and_stdin(sb: Sandbox) -> None:
    r = subprocess.run(
        [NODEAGENT, "sandbox", "exec", "web", "--", "sh", "-c", "cat; exit 7"],
        input="through\n",
        capture_output=True,
        text=True,
    )
    assert (r.returncode, r.stdout) == (7, "through\n")


def test_up_refuses_while_up(sb: Sandbox, config: Path) -> None:
    with pytest.raises(SandboxAlreadyUp, match="run `nodeagent sandbox down` first"):
        Sandbox.up(config, agents=False)
    assert sb.pod_pids_live("web")  # untouched


def test_down_leaves_nothing(config: Path, clean_machine: dict[str, object]) -> None:
    sb = Sandbox.up(config, agents=False)
    during = machine_state()
    assert len(during["netns"]) == 6  # type: ignore[arg-type]
    assert during["root_links"] == clean_machine["root_links"]
    sb.down()
    assert machine_state() == clean_machine
    assert leftovers() == []
    sb.down()  # idempotent
    assert machine_state() == clean_machine


def test_down_and_up_after_a_crash(config: Path, clean_machine: dict[str, object]) -> None:
    sb = Sandbox.up(config, agents=False)
    ours = sandbox_cgroups.subtree(sandbox_cgroups.find_root())
    for pid in sandbox_cgroups.all_procs(ours):
        os.kill(pid, signal.SIGKILL)
    os.unlink(STATE_FILE)
    assert leftovers()
    teardown()  # as a fresh `nodeagent sandbox down` would, without the state file
    assert machine_state() == clean_machine
    again = Sandbox.up(config, agents=False)
    assert http_code(again, "web", "http://10.244.2.2:9090/") == "0:200"
    again.down()
    sb.down()  # reaps the first run's children; nothing left to remove
    assert machine_state() == clean_machine


def test_up_after_a_crash_with_the_state_file(config: Path, clean_machine: object) -> None:
    Sandbox.up(config, agents=False)
    ours = sandbox_cgroups.subtree(sandbox_cgroups.find_root())
    sandbox_cgroups.kill(ours)  # every process gone, state.json still there
    with Sandbox.up(config, agents=False) as sb:
        assert http_code(sb, "shop/api", "http://10.244.1.3:8080/") == "0:200"


def test_a_pod_that_exits_fails_up_and_leaves_nothing(
    write_config: WriteConfig, clean_machine: dict[str, object]
) -> None:
    bad = write_config(
        """
        apiVersion: v1
        kind: Pod
        metadata: {name: crasher}
        spec:
          nodeName: node1
          containers:
          - name: c
            command: [sh, -c, "echo about to fail >&2; exit 3"]
            ports: [{containerPort: 8080}]
        """
    )
    with pytest.raises(LocalStateError) as e:
        Sandbox.up(bad, agents=False)
    msg = str(e.value)
    assert "pod default/crasher did not become ready" in msg
    assert "/run/nodeagent/sandbox/logs/default_crasher.log" in msg
    assert "about to fail" in msg
    assert machine_state() == clean_machine


def test_agents_come_up_restart_and_leave_nothing(
    config: Path, clean_machine: dict[str, object]
) -> None:
    """The agent side of ``up``: started in their cgroups, waited for, restarted, removed."""
    with Sandbox.up(config) as sb:
        nodes = {n["name"]: n for n in sb.status()["nodes"]}
        for name in ("node1", "node2"):
            agent = nodes[name]["agent"]
            assert agent["ready"] is True, Path(sb.agent_log(name)).read_text()
            assert agent["socket"] == sb.agent_socket(name) == f"/run/nodeagent/{name}.sock"
            assert agent["pids"] == sandbox_cgroups.procs(Path(sb.agent_cgroup(name)))
        before = sb.status()["nodes"][0]["agent"]["pids"]
        sb.restart_agent("node1")
        after = sb.status()["nodes"][0]["agent"]
        assert after["ready"] is True and after["pids"] != before
        assert http_code(sb, "web", f"http://{sb.pod_ip('shop/api')}:9090/") == "0:200"
    assert machine_state() == clean_machine
