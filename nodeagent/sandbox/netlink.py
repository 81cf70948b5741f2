"""Network plumbing of the sandbox, with pyroute2: network namespaces, veth pairs, bridges,
addresses, routes, per-netns sysctls, ``/etc/netns/<name>/`` files, and running a function
inside a netns (for readiness probes).

Every link is created inside one of our namespaces (a veth is made in the fabric or node
netns with its peer placed directly in the other one), so the root netns never gets a
link, address, route or rule.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from pyroute2 import IPRoute, netns

from nodeagent.errors import LocalStateError
from nodeagent.sandbox.topology import (
    ETC_NETNS_DIR,
    FABRIC_NET,
    NETNS_DIR,
    NODE_BRIDGE,
    NODE_UPLINK,
    POD_IFNAME,
    NodePlan,
    PodPlan,
    Topology,
    is_sandbox_netns,
)

T = TypeVar("T")
CLONE_NEWNET = 0x40000000


def netns_path(name: str) -> str:
    return os.path.join(NETNS_DIR, name)


def list_netns() -> list[str]:
    try:
        return sorted(os.listdir(NETNS_DIR))
    except FileNotFoundError:
        return []


def sandbox_netns() -> list[str]:
    """Our namespaces that exist now (by name: ``na-fabric``, ``na-n-*``, ``na-p-*``)."""
    return [n for n in list_netns() if is_sandbox_netns(n)]


def create_netns(name: str) -> None:
    if os.path.exists(netns_path(name)):
        raise LocalStateError(
            f"netns {name} exists from an earlier run: run `nodeagent sandbox down`"
        )
    try:
        netns.create(name)
    except OSError as e:
        raise LocalStateError(f"cannot create netns {name}: {e}") from e


def remove_netns(name: str) -> None:
    """Unmount and unlink a named netns (idempotent)."""
    if not os.path.exists(netns_path(name)):
        return
    try:
        netns.remove(name)
    except FileNotFoundError:
        pass
    except OSError as e:
        raise LocalStateError(f"cannot remove netns {name}: {e}") from e


def _inode(path: str) -> int | None:
    try:
        return os.stat(path).st_ino
    except OSError:
        return None


def netns_pids(names: list[str]) -> dict[int, str]:
    """Processes whose network namespace is one of ``names`` (like ``ip netns pids``)."""
    inodes: dict[int, str] = {}
    for n in names:
        ino = _inode(netns_path(n))
        if ino is not None:
            inodes[ino] = n
    out: dict[int, str] = {}
    if not inodes:
        return out
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        ino = _inode(f"/proc/{entry}/ns/net")
        if ino is not None and ino in inodes:
            out[int(entry)] = inodes[ino]
    return out


def run_in_netns(name: str, fn: Callable[[], T]) -> T:
    """Run ``fn`` in a worker thread that has entered netns ``name`` (never creates it).

    Sockets made by ``fn`` stay in that netns; the calling thread is not moved.
    """
    path = netns_path(name)
    box: dict[str, Any] = {}

    def worker() -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        try:
            own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
            try:
                target = os.open(path, os.O_RDONLY)
            except FileNotFoundError:
                raise LocalStateError(
                    f"netns {name} does not exist: is the sandbox up (`nodeagent sandbox status`)?"
                ) from None
            try:
                if libc.setns(target, CLONE_NEWNET) != 0:
                    err = ctypes.get_errno()
                    raise OSError(err, f"setns({path}): {os.strerror(err)}")
                try:
                    box["value"] = fn()
                finally:
                    libc.setns(own, CLONE_NEWNET)
            finally:
                os.close(target)
                os.close(own)
        except BaseException as e:
            box["error"] = e

    t = threading.Thread(target=worker, name=f"netns-{name}", daemon=True)
    t.start()
    t.join()
    if "error" in box:
        raise box["error"]
    value: T = box["value"]
    return value


def set_sysctl(ns: str, key: str, value: str) -> None:
    path = "/proc/sys/" + key.replace(".", "/")

    def write() -> None:
        with open(path, "w") as f:
            f.write(value)

    run_in_netns(ns, write)


def _ipr(ns: str) -> Any:
    # flags=0: never create a missing netns (PLATFORM gotcha 6)
    try:
        return IPRoute(netns=ns, flags=0)
    except FileNotFoundError:
        raise LocalStateError(f"netns {ns} disappeared while building the sandbox") from None


def _index(ipr: Any, ifname: str) -> int:
    found = ipr.link_lookup(ifname=ifname)
    if not found:
        raise LocalStateError(f"link {ifname} not found in netns {ipr.status.get('netns')}")
    return int(found[0])


def _lo_up(ipr: Any) -> None:
    ipr.link("set", index=_index(ipr, "lo"), state="up")


def build_fabric(topo: Topology) -> None:
    create_netns(topo.fabric_netns)
    with _ipr(topo.fabric_netns) as ipr:
        _lo_up(ipr)
        ipr.link("add", ifname=topo.fabric_bridge, kind="bridge")
        ipr.link("set", index=_index(ipr, topo.fabric_bridge), state="up")


def build_node(topo: Topology, node: NodePlan) -> None:
    """The node netns: uplink ``eth0`` on the fabric bridge, bridge ``cbr0``, routes."""
    create_netns(node.netns)
    with _ipr(topo.fabric_netns) as fab:
        fab.link(
            "add",
            ifname=node.fabric_ifname,
            kind="veth",
            peer={"ifname": NODE_UPLINK, "net_ns_fd": node.netns},
        )
        br = _index(fab, topo.fabric_bridge)
        fab.link("set", index=_index(fab, node.fabric_ifname), master=br, state="up")
    with _ipr(node.netns) as ipr:
        _lo_up(ipr)
        up = _index(ipr, NODE_UPLINK)
        ipr.addr("add", index=up, address=node.ip, prefixlen=FABRIC_NET.prefixlen)
        ipr.link("set", index=up, state="up")
        ipr.link("add", ifname=NODE_BRIDGE, kind="bridge")
        cbr = _index(ipr, NODE_BRIDGE)
        ipr.addr("add", index=cbr, address=node.bridge_ip, prefixlen=24)
        ipr.link("set", index=cbr, state="up")
        for r in node.routes:
            if r.via:
                ipr.route("add", dst=r.dst, gateway=r.via)
            else:  # on the link: nothing answers outside the sandbox, as designed
                ipr.route("add", dst="0.0.0.0/0" if r.dst == "default" else r.dst, oif=up)
        lo = _index(ipr, "lo")
        for addr in node.host_addresses:  # its host workloads' own addresses
            ipr.addr("add", index=lo, address=addr, prefixlen=32)
    set_sysctl(node.netns, "net.ipv4.ip_forward", "1")


def build_pod(node: NodePlan, pod: PodPlan) -> None:
    """The pod netns: ``eth0`` (peer ``vp<i>-<k>`` on the node's ``cbr0``), default route."""
    create_netns(pod.netns)
    with _ipr(node.netns) as ipr:
        ipr.link(
            "add",
            ifname=pod.host_ifname,
            kind="veth",
            peer={"ifname": POD_IFNAME, "net_ns_fd": pod.netns},
        )
        cbr = _index(ipr, NODE_BRIDGE)
        ipr.link("set", index=_index(ipr, pod.host_ifname), master=cbr, state="up")
    with _ipr(pod.netns) as ipr:
        _lo_up(ipr)
        eth = _index(ipr, POD_IFNAME)
        ipr.addr("add", index=eth, address=pod.ip, prefixlen=24)
        ipr.link("set", index=eth, state="up")
        ipr.route("add", dst="default", gateway=pod.gateway)
    write_etc_netns(pod)


def write_etc_netns(pod: PodPlan) -> None:
    """``/etc/netns/<pod netns>/{hosts,resolv.conf}``, bind-mounted by ``ip netns exec``
    (a host workload's: its node's, resolv.conf only: the DNS proxy answers its names)."""
    d = Path(ETC_NETNS_DIR) / pod.netns
    d.mkdir(parents=True, exist_ok=True)
    if pod.hosts:
        (d / "hosts").write_text(pod.hosts)
    if os.path.exists("/etc/resolv.conf"):
        (d / "resolv.conf").write_text(pod.resolv_conf)


def sandbox_etc_netns() -> list[str]:
    try:
        return sorted(n for n in os.listdir(ETC_NETNS_DIR) if is_sandbox_netns(n))
    except FileNotFoundError:
        return []


def remove_etc_netns(name: str) -> None:
    shutil.rmtree(Path(ETC_NETNS_DIR) / name, ignore_errors=True)
    with contextlib.suppress(OSError):
        os.rmdir(ETC_NETNS_DIR)  # only when empty, i.e. when we made it
