"""End to end, agents in eBPF capture mode (``--redirect ebpf``): no iptables rule of
ours exists; mesh connects are captured (the programs' counter moves) and a connect to a
non-mesh address is not; with the agent killed (-9) a connect to a mesh pod is refused
instead of leaking around the mesh, and the restarted agent re-adopts the pinned links;
a pod removed from the config loses its programs; the local legs (app <-> proxy inside
the client pod and the server pod) carry no payload over loopback while the sockmap
bypass is on, and do again once ``ctl bpf --bypass off`` switches it off; the agent
never maps LLVM (the one-shot loader compiles) and stays small at idle. (Every other
mesh test module runs in both modes; the programs themselves are tested on their own in
test_ebpf_capture.py.)
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
from meshops import apply_file, bpf_programs, http_status
from pcap import Tcpdump

from nodeagent.admin.client import AdminClient
from nodeagent.redirect import ebpf, libbpf
from nodeagent.sandbox import Sandbox
from nodeagent.sandbox.agents import BPF_PIN_DIR
from nodeagent.sandbox.netlink import netns_path

pytestmark = [
    pytest.mark.privileged,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root for BPF, netns and cgroups"),
]

REDIRECT_MODES = ("ebpf",)


def captured(node: str) -> int:
    return ebpf.read_stats(f"{BPF_PIN_DIR}/{node}")["captured"]


def own_legs_passed(node: str) -> int:
    return ebpf.read_stats(f"{BPF_PIN_DIR}/{node}")["own_legs_passed"]


def bypassed(node: str) -> int:
    return ebpf.read_stats(f"{BPF_PIN_DIR}/{node}")["bypass_bytes"]


def ctl(sb: Sandbox, node: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "nodeagent", "ctl", "--socket", sb.agent_socket(node), "bpf",
         *args], capture_output=True, text=True, timeout=30)


ECHO_CLIENT = (
    # one thread, non-blocking, as event-loop programs (Go, Node, Envoy, asyncio) do: see
    # docs/capture.md on blocking sockets read and written by two threads under the bypass
    "import hashlib,selectors,socket,sys\n"
    "data=memoryview(open(sys.argv[1],'rb').read())\n"
    "s=socket.create_connection(('victim',9000)); s.setblocking(False)\n"
    "sel=selectors.DefaultSelector(); sel.register(s, selectors.EVENT_READ|selectors.EVENT_WRITE)\n"
    "h=hashlib.sha256(); sent=0; done=False\n"
    "while not done:\n"
    "    for key, ev in sel.select(10):\n"
    "        if ev & selectors.EVENT_WRITE and sent < len(data):\n"
    "            try: sent += s.send(data[sent:sent+262144])\n"
    "            except BlockingIOError: pass\n"
    "            if sent == len(data):\n"
    "                s.shutdown(socket.SHUT_WR); sel.modify(s, selectors.EVENT_READ)\n"
    "        if ev & selectors.EVENT_READ:\n"
    "            try: d = s.recv(262144)\n"
    "            except BlockingIOError: continue\n"
    "            if not d: done=True\n"
    "            h.update(d)\n"
    "print(h.hexdigest())\n"
)


def echo_through_mesh(sb: Sandbox, src: Path, tmp_path: Path) -> tuple[str, int, int]:
    """(digest echoed back, payload bytes on the client pod's lo, on the server pod's lo)
    for ``src`` sent client -> victim:9000 (TCP echo) -> back."""
    lo_client = Tcpdump(netns_path(sb.pod_netns("client")), "lo", tmp_path / "client-lo.pcap", 96)
    lo_server = Tcpdump(netns_path(sb.pod_netns("victim")), "lo", tmp_path / "victim-lo.pcap", 96)
    try:
        p = sb.exec("client", [sys.executable, "-c", ECHO_CLIENT, str(src)],
                    capture_output=True, text=True, timeout=60)
    finally:
        on_client = lo_client.payload_bytes()
        on_server = lo_server.payload_bytes()
    assert p.returncode == 0, p.stderr
    return p.stdout.strip(), on_client, on_server


def test_local_legs_bypass_loopback_until_switched_off(sb: Sandbox, tmp_path: Path) -> None:
    payload = os.urandom(4 << 20)
    src = tmp_path / "payload"
    src.write_bytes(payload)
    want = hashlib.sha256(payload).hexdigest()
    for node in ("node1", "node2"):  # off by default; switched on live
        assert json.loads(ctl(sb, node, "-o", "json").stdout)["bypass"] == "off"
        p = ctl(sb, node, "--bypass", "on")
        assert p.returncode == 0 and "Local bypass:  on" in p.stdout, p.stdout + p.stderr

    b1, b2 = bypassed("node1"), bypassed("node2")
    digest, on_client, on_server = echo_through_mesh(sb, src, tmp_path)
    assert digest == want
    # each node bypassed both directions of its local leg: >= 2 x 4 MiB
    assert bypassed("node1") - b1 >= 2 * len(payload)
    assert bypassed("node2") - b2 >= 2 * len(payload)
    # loopback saw handshakes (no payload) -- not the 2 x 4 MiB of each leg
    assert on_client < 64 << 10 and on_server < 64 << 10, (on_client, on_server)

    for node in ("node1", "node2"):
        p = ctl(sb, node, "--bypass", "off")
        assert p.returncode == 0 and "Local bypass:  off" in p.stdout, p.stdout + p.stderr
    try:
        b1, b2 = bypassed("node1"), bypassed("node2")
        digest, on_client, on_server = echo_through_mesh(sb, src, tmp_path)
        assert digest == want
        assert bypassed("node1") == b1 and bypassed("node2") == b2
        # the same legs through TCP/IP: both directions cross each pod's loopback (2 x 4
        # MiB each; tcpdump may miss a few packets at this rate)
        assert on_client >= len(payload) and on_server >= len(payload), (on_client, on_server)
    finally:
        for node in ("node1", "node2"):
            ctl(sb, node, "--bypass", "off")


def test_status_says_ebpf_and_no_iptables_rule_of_ours(sb: Sandbox) -> None:
    for node in ("node1", "node2"):
        with AdminClient(sb.agent_socket(node)) as c:
            assert c.status()["redirect_mode"] == "ebpf"
    for pod in ("client", "echo-1", "victim"):
        p = sb.exec(pod, ["iptables-save"], capture_output=True, text=True, timeout=30)
        # only the DNS proxy's port 53 rules (docs/dns.md#capture): no TCP capture
        ours = [ln for ln in p.stdout.splitlines() if "NODEAGENT" in ln]
        assert ours and all("NODEAGENT_DNS" in ln for ln in ours), (pod, p.stdout)


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
    assert "programs pinned already" in last, last  # a restart compiles nothing


IDLE_RSS_BOUND = 120 << 20
"""An idle eBPF-mode agent of this small sandbox stays under this: the same agent in
iptables mode holds ~77 MiB with bookinfo's pods (bench/rss_idle.py), the bcc compile in
the agent's process added LLVM/clang (86 MiB mapped) and ~86 MiB of heap (251 MiB at
0824f51); 120 leaves room for another Python or grpc build, never for LLVM."""


def test_the_agent_never_maps_llvm_and_stays_small(sb: Sandbox) -> None:
    # the programs were compiled by the one-shot loader, a child that exited
    for node in ("node1", "node2"):
        pid = sb.agent_pids[node]
        maps = Path(f"/proc/{pid}/maps").read_text()
        heavy = {ln.split()[-1] for ln in maps.splitlines()
                 if any(n in ln for n in ("libLLVM", "libclang", "libbcc"))}  # fmt: skip
        assert not heavy, (node, heavy)
        assert "libbpf.so" in maps  # the pinned objects are worked through libbpf
        with AdminClient(sb.agent_socket(node)) as c:
            rss = int(c.status()["memory_rss_bytes"])
        assert 0 < rss < IDLE_RSS_BOUND, (node, rss >> 20)
    log = Path(sb.agent_log("node1")).read_text(errors="replace")
    assert "programs compiled by the loader in" in log or "programs pinned already" in log


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
    d = json.loads(ctl(sb, "node2", "-o", "json").stdout)
    assert d["mode"] == "ebpf" and d["pin_dir"] == f"{BPF_PIN_DIR}/node2"
    pods = {"default_echo-1", "default_echo-2", "default_victim"}
    assert set(d["attachments"]) == pods | {"_proxy"}, d["attachments"]
    assert d["attachments"]["default_echo-1"] == sorted(
        ["connect4", "connect6", "getpeername4", "getpeername6", "sockops", "sk_lookup"])
    assert d["attachments"]["_proxy"] == ["connect4_proxy", "getsockopt", "sockops"]
    ips = sorted(sb.pod_ip(p) for p in ("echo-1", "echo-2", "victim"))
    assert d["maps"]["inbound_pods"]["addresses"] == ips
    assert set(ips) <= set(d["maps"]["mesh_ips"]["addresses"])
    assert "10.96.1.10" in d["maps"]["mesh_ips"]["addresses"]  # the echo service
    assert "msg_bypass" in d["programs"] and d["bypass"] == "off"
    text = ctl(sb, "node2").stdout
    assert "Capture mode:  ebpf" in text and "sk_lookup_inbound" in text, text


def test_exclude_port_annotations_apply_to_live_pods(sb: Sandbox, config_dir: Path) -> None:
    url = f"http://{sb.pod_ip('echo-1')}:8080/"
    before, legs = captured("node1"), own_legs_passed("node2")
    code, body = http_status(sb, "client", url)
    assert code == 200 and captured("node1") == before + 1
    # through both proxies: the app is called by the proxy inside its own pod, from the
    # client's address (a transparent connection sk_lookup let through)
    assert json.loads(body)["client"].split(":")[0] == sb.pod_ip("client")
    assert own_legs_passed("node2") == legs + 1

    pods = config_dir / "pods.yaml"
    original = pods.read_text()
    annotated = original.replace(
        "metadata: {name: client, namespace: default, labels: {app: client}}",
        "metadata: {name: client, namespace: default, labels: {app: client}, annotations: "
        "{traffic.sidecar.istio.io/excludeOutboundPorts: '8080'}}",
    ).replace(
        "metadata: {name: echo-1, namespace: default, labels: {app: echo, version: v1}}",
        "metadata: {name: echo-1, namespace: default, labels: {app: echo, version: v1}, "
        "annotations: {traffic.sidecar.istio.io/excludeInboundPorts: '8080'}}",
    )
    assert annotated.count("traffic.sidecar.istio.io/exclude") == 2
    try:
        apply_file(sb, pods, annotated)
        before, legs = captured("node1"), own_legs_passed("node2")
        code, body = http_status(sb, "client", url)
        assert code == 200 and captured("node1") == before  # not captured on the way out
        # ... nor steered on the way in: the client pod itself called the app
        assert json.loads(body)["client"].split(":")[0] == sb.pod_ip("client")
        assert own_legs_passed("node2") == legs
        # other ports stay captured
        assert http_status(sb, "client", "http://echo/")[0] == 200
        assert captured("node1") == before + 1
    finally:
        apply_file(sb, pods, original)
    before = captured("node1")
    assert http_status(sb, "client", url)[0] == 200 and captured("node1") == before + 1


def _next_version(tmp_path: Path) -> Path:
    """``capture.c`` as a next version might change it: ``orig_dst`` (the value of the
    pinned ``tuple_dst`` and ``sk_dst``) grows a field and ``stats`` gets room for more
    counters. Loaded over the pinned maps of this version, the verifier would reject it."""
    src = ebpf.SOURCE.read_text()
    changed = src.replace("    __u16 pad;\n};", "    __u16 pad;\n    __u64 spare;\n};", 1)
    changed = changed.replace("stats, 16, PIN_DIR", "stats, 32, PIN_DIR")
    assert changed.count("__u64 spare;") == 1 and "stats, 32, PIN_DIR" in changed
    out = tmp_path / "capture.c"
    out.write_text(changed)
    return out


def _our_programs(name: str) -> int:
    return sum(1 for n in bpf_programs() if n in (name, name[:15]))


def test_an_upgrade_that_changes_the_maps_switches_to_maps_of_its_own(
    sb: Sandbox, tmp_path: Path
) -> None:
    url = f"http://{sb.pod_ip('echo-1')}:8080/"
    pin = f"{BPF_PIN_DIR}/node1"
    old_maps = os.readlink(f"{pin}/maps")
    assert http_status(sb, "client", url)[0] == 200
    os.environ[ebpf.SOURCE_ENV] = str(_next_version(tmp_path))
    try:
        sb.restart_agent("node1")
        new_maps = os.readlink(f"{pin}/maps")
        assert new_maps != old_maps and new_maps.startswith("maps-")
        # the earlier maps are unpinned, the new ones have the new shape
        assert [n for n in os.listdir(pin) if n.startswith("maps")] == sorted(
            ["maps", new_maps]), os.listdir(pin)
        info = json.loads(subprocess.run(
            ["bpftool", "-j", "map", "show", "pinned", f"{pin}/maps/stats"],
            capture_output=True, text=True, timeout=30, check=True).stdout)
        assert info["max_entries"] == 32, info
        before = captured("node1")
        assert http_status(sb, "client", url)[0] == 200  # through the proxy, as before
        assert captured("node1") == before + 1  # counted by the new programs' map
        d = json.loads(ctl(sb, "node1", "-o", "json").stdout)
        assert d["maps_dir"] == new_maps
        assert f"Maps:          {new_maps}" in ctl(sb, "node1").stdout
        assert sb.pod_ip("echo-1") in d["maps"]["mesh_ips"]["addresses"]
        log = Path(sb.agent_log("node1")).read_text(errors="replace")
        assert f"eBPF programs changed (maps {old_maps} -> {new_maps}" in log
        for _ in range(50):  # the old programs are freed once no link runs them
            if _our_programs("connect4_capture") == 2:  # node1's and node2's
                break
            time.sleep(0.1)
        assert _our_programs("connect4_capture") == 2
    finally:
        del os.environ[ebpf.SOURCE_ENV]
        sb.restart_agent("node1")  # back to this version: a downgrade is the same switch
    assert os.readlink(f"{pin}/maps") == old_maps
    assert http_status(sb, "client", url)[0] == 200


def test_an_upgrade_carries_the_excluded_ports_into_the_new_maps(tmp_path: Path) -> None:
    # Between the switch and the agent's attach of each pod, the pods' excluded ports must
    # already hold in the new maps: copied from the old ones by ``prefill``; so must
    # capturing all TCP (REGISTRY_ONLY) until the agent's first snapshot.
    pin = f"/sys/fs/bpf/nodeagent-test-{os.getpid()}"
    ip = libbpf.ip_key("10.9.0.5")
    caps: list[ebpf.Capture] = []
    try:
        old = ebpf.Capture(pin)
        caps.append(old)
        old.set_exclusions("10.9.0.5", ebpf.Exclusions(4242, frozenset({5432}), frozenset({8081})))
        old.set_capture_all(True)
        new = ebpf.Capture(pin, src=_next_version(tmp_path))
        caps.append(new)
        assert new.previous == old.maps and new.maps != old.maps
        out_key = ebpf.EXCLUDE_OUT_KEY.pack(4242, 5432, 0)
        in_key = ebpf.EXCLUDE_IN_KEY.pack(ip, 8081)
        assert libbpf.map_lookup(new.map_fd("exclude_out"), out_key, 4) is None
        all_tcp = struct.pack("=i", ebpf.SETTING_CAPTURE_ALL)
        assert libbpf.map_lookup(new.map_fd("settings"), all_tcp, 4) == bytes(4)
        new.prefill(set(), {"10.9.0.5"})
        assert libbpf.map_lookup(new.map_fd("settings"), all_tcp, 4) == struct.pack("=I", 1)
        assert libbpf.map_lookup(new.map_fd("exclude_out"), out_key, 4) == ip
        assert libbpf.map_lookup(new.map_fd("exclude_in"), in_key, 4) == ip
        other_port = ebpf.EXCLUDE_IN_KEY.pack(ip, 8080)
        assert libbpf.map_lookup(new.map_fd("exclude_in"), other_port, 4) is None
        new.switch()
        assert os.readlink(f"{pin}/maps") == os.path.basename(new.maps)
        assert not os.path.exists(old.maps)
        assert ebpf.capture_all(pin)
    finally:
        for c in caps:
            c.close()
        ebpf.teardown(pin)
    assert not os.path.exists(pin)
