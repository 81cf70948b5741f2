"""End to end, agents in eBPF capture mode (``--redirect ebpf``): no iptables rule of
ours exists; mesh connects are captured (the programs' counter moves) and a connect to a
non-mesh address is not; with the agent killed (-9) a connect to a mesh pod is refused
instead of leaking around the mesh, and the restarted agent re-adopts the pinned links;
a pod removed from the config loses its programs. (Every other mesh test module runs in
both modes; the programs themselves are tested on their own in test_ebpf_capture.py.)
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from meshops import apply_file, http_status

from nodeagent.admin.client import AdminClient
from nodeagent.redirect import ebpf
from nodeagent.sandbox import Sandbox
from nodeagent.sandbox.manager import BPF_PIN_DIR

pytestmark = [
    pytest.mark.privileged,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root for BPF, netns and cgroups"),
]

REDIRECT_MODES = ("ebpf",)


def captured(node: str) -> int:
    return ebpf.read_stats(f"{BPF_PIN_DIR}/{node}")["captured"]


def test_status_says_ebpf_and_no_iptables_rule_of_ours(sb: Sandbox) -> None:
    for node in ("node1", "node2"):
        with AdminClient(sb.agent_socket(node)) as c:
            assert c.status()["redirect_mode"] == "ebpf"
    for pod in ("client", "echo-1", "victim"):
        p = sb.exec(pod, ["iptables-save"], capture_output=True, text=True, timeout=30)
        assert "NODEAGENT" not in p.stdout, (pod, p.stdout)


def test_mesh_connects_captured_and_others_untouched(sb: Sandbox) -> None:
    before = captured("node1")
    assert http_status(sb, "client", "http://echo/")[0] == 200
    assert captured("node1") == before + 1
    # the node's own address is not in the mesh: left alone (no proxy in the way)
    node_ip = sb.node_ip("node1")
    code, _ = http_status(sb, "client", f"http://{node_ip}:15021/healthz/ready")
    assert code == 200
    assert captured("node1") == before + 1


def test_agent_killed_fails_closed_then_readopts(sb: Sandbox) -> None:
    url = f"http://{sb.pod_ip('echo-1')}:8080/"  # routable: a leak would answer 200
    assert http_status(sb, "client", url)[0] == 200
    sb.stop_agent("node1")  # SIGKILL: the pinned links keep capturing
    try:
        code, body = http_status(sb, "client", url)
        assert code == 0, (code, body)  # refused by the missing proxy, not served
    finally:
        sb.restart_agent("node1")
    assert http_status(sb, "client", url)[0] == 200
    log = Path(sb.agent_log("node1")).read_text(errors="replace")
    assert "pinned link(s) re-adopted" in log and " 0 pinned link(s) re-adopted" in log
    last = [ln for ln in log.splitlines() if "pinned link(s) re-adopted" in ln][-1]
    assert " 0 pinned" not in last, last


def test_a_pod_removed_from_the_config_loses_its_programs(
    sb: Sandbox, config_dir: Path
) -> None:
    cg = sb.pod_cgroup("victim")

    def progs() -> str:
        return subprocess.run(["bpftool", "cgroup", "show", cg], capture_output=True,
                              text=True, timeout=30).stdout

    assert "connect4_captur" in progs()
    pods = config_dir / "pods.yaml"
    original = pods.read_text()
    docs = original.split("\n---\n")
    kept = [d for d in docs if "name: victim," not in d]
    assert len(kept) == len(docs) - 1
    services = config_dir / "services.yaml"
    svc_original = services.read_text()
    svc_kept = [d for d in svc_original.split("\n---\n") if "app: victim" not in d]
    try:  # the services selecting victim go first, or they would select nothing
        apply_file(sb, services, "\n---\n".join(svc_kept))
        apply_file(sb, pods, "\n---\n".join(kept))
        assert "connect4_captur" not in progs()
        assert not os.path.exists(f"{BPF_PIN_DIR}/node2/links/default_victim")
    finally:
        apply_file(sb, pods, original)
        apply_file(sb, services, svc_original)
    assert "connect4_captur" in progs()


def test_ctl_bpf_lists_programs_attachments_and_maps(sb: Sandbox) -> None:
    import json
    import sys

    def ctl(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "nodeagent", "ctl", "--socket", sb.agent_socket("node2"),
             "bpf", *args], capture_output=True, text=True, timeout=30)

    d = json.loads(ctl("-o", "json").stdout)
    assert d["mode"] == "ebpf" and d["pin_dir"] == f"{BPF_PIN_DIR}/node2"
    pods = {"default_echo-1", "default_echo-2", "default_victim"}
    assert set(d["attachments"]) == pods | {"_proxy"}, d["attachments"]
    assert d["attachments"]["default_echo-1"] == sorted(
        ["connect4", "connect6", "getpeername4", "getpeername6", "sockops", "sk_lookup"])
    assert d["attachments"]["_proxy"] == ["getsockopt", "sockops"]
    ips = sorted(sb.pod_ip(p) for p in ("echo-1", "echo-2", "victim"))
    assert d["maps"]["inbound_pods"]["addresses"] == ips
    assert set(ips) <= set(d["maps"]["mesh_ips"]["addresses"])
    assert "10.96.1.10" in d["maps"]["mesh_ips"]["addresses"]  # the echo service
    text = ctl().stdout
    assert "Capture mode:  ebpf" in text and "sk_lookup_inbound" in text, text
