"""The capabilities deploy/systemd/nodeagent.service keeps are enough for eBPF capture:
a process holding only the unit's CapabilityBoundingSet (set with ``setpriv``, as systemd
sets it for a root service) runs the one-shot loader (its child, ``redirect/bpfload.py``:
compiles ``bpf/capture.c``, loads and pins every program) and attaches a pod's and the
proxy's programs to a test cgroup and netns; without CAP_NET_ADMIN the same load is
refused, so the check sees a missing capability."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from nodeagent.redirect import ebpf

ROOT = Path(__file__).resolve().parents[2]
UNIT = ROOT / "deploy" / "systemd" / "nodeagent.service"

pytestmark = [
    pytest.mark.privileged,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root for BPF, netns and cgroups"),
    pytest.mark.skipif(shutil.which("setpriv") is None, reason="needs setpriv (util-linux)"),
]

CHILD = """
import os, sys
from nodeagent.redirect import ebpf
pin, pod_cg, proxy_cg, netns = sys.argv[1:5]
cap = ebpf.Capture(pin)
cap.attach_pod("t", pod_cg, netns, "10.99.0.2")
cap.attach_proxy(proxy_cg)
eff = [l.split()[1] for l in open("/proc/self/status") if l.startswith("CapEff")][0]
print(eff, sorted(os.listdir(os.path.join(pin, "links", "t"))))
"""

# capability numbers (linux/capability.h) of the names the unit may list
CAP_BITS = {"CAP_NET_ADMIN": 12, "CAP_NET_RAW": 13, "CAP_SYS_ADMIN": 21, "CAP_PERFMON": 38,
            "CAP_BPF": 39}  # fmt: skip


def unit_caps() -> list[str]:
    (line,) = [s for s in UNIT.read_text().splitlines()
               if s.startswith("CapabilityBoundingSet=")]  # fmt: skip
    return line.partition("=")[2].split()


@pytest.fixture
def rig() -> Iterator[tuple[str, str, str, str]]:
    """A pin directory, a pod cgroup, a proxy cgroup and a netns; all removed after."""
    tag = uuid.uuid4().hex[:6]
    base = next(d for d in ("/sys/fs/cgroup/unified", "/sys/fs/cgroup")
                if os.path.exists(f"{d}/cgroup.controllers"))  # fmt: skip
    pin = f"/sys/fs/bpf/na-caps-{tag}"
    pod_cg, proxy_cg = f"{base}/na-caps-{tag}-pod", f"{base}/na-caps-{tag}-proxy"
    netns = f"na-caps-{tag}"
    os.makedirs(pod_cg)
    os.makedirs(proxy_cg)
    subprocess.run(["ip", "netns", "add", netns], check=True)
    try:
        yield pin, pod_cg, proxy_cg, f"/var/run/netns/{netns}"
    finally:
        if os.path.exists(pin):
            ebpf.teardown(pin)
            shutil.rmtree(pin, ignore_errors=True)
        for d in (pod_cg, proxy_cg):
            os.rmdir(d)
        subprocess.run(["ip", "netns", "del", netns], check=False)


def load_with(caps: list[str], rig: tuple[str, str, str, str]) -> subprocess.CompletedProcess[str]:
    keep = ",".join("+" + c.removeprefix("CAP_").lower() for c in caps)
    return subprocess.run(
        ["setpriv", "--bounding-set", f"-all,{keep}", "--inh-caps", "-all",
         sys.executable, "-c", CHILD, *rig],
        capture_output=True, text=True, timeout=120,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip


def test_ebpf_capture_loads_and_attaches_with_only_the_units_capabilities(
    rig: tuple[str, str, str, str],
) -> None:
    why = ebpf.probe()
    assert why is None, f"eBPF capture cannot work here: {why} (scripts/setup.sh sets it up)"
    caps = unit_caps()
    done = load_with(caps, rig)
    assert done.returncode == 0, done.stderr[-2000:]
    eff, links = done.stdout.split(" ", 1)
    assert int(eff, 16) == sum(1 << CAP_BITS[c] for c in caps)  # no more than the unit's
    assert "connect4" in links and "sk_lookup" in links and "sockops" in links


def test_without_cap_net_admin_the_load_is_refused(rig: tuple[str, str, str, str]) -> None:
    done = load_with([c for c in unit_caps() if c != "CAP_NET_ADMIN"], rig)
    assert done.returncode != 0 and "cannot load" in done.stderr, done.stdout + done.stderr


HOST_CHILD = """
import asyncio, sys
from pathlib import Path
from nodeagent.model.objects import HOST_NETNS, HostWorkload
from nodeagent.redirect.hostmode import HostRules, cgroup2_mount
from nodeagent.redirect.netns import NetnsHandle, run_in
cgroup = Path(sys.argv[1])
mount = cgroup2_mount()
rules = HostRules(HOST_NETNS, cgroup.parent, mount, 15053)
w = HostWorkload("default/w", "127.0.0.1", "/" + cgroup.name, "127.77.0.9", (9080,))
print(asyncio.run(rules.set(w)))
s = NetnsHandle(HOST_NETNS).socket()
s.bind(("127.77.0.9", 15001)); s.listen()
print(asyncio.run(run_in(HOST_NETNS, ["iptables-save", "-t", "nat"])))
"""


def test_host_mode_captures_with_only_the_units_capabilities(
    rig: tuple[str, str, str, str],
) -> None:
    # the unit's agent lives in the host's netns: host mode must enter no netns (setns
    # takes CAP_SYS_ADMIN, which the unit does not grant) and add its rules from there
    _, pod_cg, _, netns = rig
    keep = ",".join("+" + c.removeprefix("CAP_").lower() for c in unit_caps())
    done = subprocess.run(
        ["nsenter", f"--net={netns}", "setpriv", "--bounding-set",
         f"-all,{keep}", "--inh-caps", "-all", sys.executable, "-c", HOST_CHILD, pod_cg],
        capture_output=True, text=True, timeout=60,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    mode, _, rules = done.stdout.partition("\n")
    assert mode == f"host (cgroup /{Path(pod_cg).name})"
    assert f'-m cgroup --path "/{Path(pod_cg).name}" -j NODEAGENT_HW1' in rules, rules
