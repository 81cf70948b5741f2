"""eBPF capture: open ``bpf/capture.c``'s pinned programs and maps, attach the programs
with pinned BPF links, re-adopt the pinned state after a restart, and tear it down. The
programs are compiled and pinned by a one-shot child process (``redirect/bpfload.py``,
bcc): this process never imports bcc, so LLVM never maps into the agent; it works only
with pinned objects through libbpf (``redirect/libbpf.py``).

What is attached where (see the C file for the data path):

- each pod's cgroup: ``connect4`` (mesh connects go to the proxy's 127.0.0.1:15001, the
  original destination kept on the app's socket; with ``set_capture_all``, for MeshConfig
  ``REGISTRY_ONLY``, every TCP connect but loopback, so that the proxy refuses what is not
  in the registry, and ``connect6`` refuses real IPv6), ``sockops`` (hands it to the proxy's
  accepted socket), ``getpeername4`` (the app sees the address it dialled);
- each pod's netns: ``sk_lookup`` (inbound TCP to any port of the pod IP is steered to
  the proxy's 15006 listener; the proxy reads the destination with ``getsockname()``;
  the proxy's own connection to the app, from the client's address since it is
  ``IP_TRANSPARENT``, is let through: ``sockops`` on the agent's cgroup puts its tuple in
  ``own_legs`` before its SYN leaves, and takes it out when the handshake ends;
  ``srcroute`` routes the app's answers back to the proxy);
- the agent's own cgroup: ``getsockopt`` (answers ``SO_ORIGINAL_DST`` on accepted
  sockets, which belong to the listener's cgroup), ``sockops`` and ``connect4_proxy``
  (refuses a transparent connection's port when a plaintext client's own connection
  holds the same tuple in the pod: the proxy binds another; pinned under
  ``links-proxy/_proxy*/``, named as the cgroup's ``links/_proxy*``, which agents
  before it leave alone);
- the ``local_socks`` sockhash: ``msg_bypass`` (sk_msg). ``sockops`` puts both ends of
  each local leg (app ↔ proxy on loopback, proxy ↔ app on the pod IP) into that map,
  and their payload then skips the TCP/IP stack (off unless ``--bpf-bypass on``, the
  Node annotation or ``nodeagent ctl bpf --bypass on``; it applies to connections made
  afterwards). Off by default: on a socket in a sockmap the kernel's tcp_bpf
  ``recvmsg``/``sendmsg`` may return EAGAIN on a *blocking* socket after a wake-up without
  data (seen on 6.18 with one thread reading while another writes, and with a blocking
  ``sendall`` to a slow peer); and redirected bytes bypass the peer's receive window, so a
  writer faster than its reader fills the peer's queue until ``send`` fails with ENOMEM.

Pins (``pin_dir``, e.g. ``/sys/fs/bpf/nodeagent/<node>``): ``links/<pod>/<prog>`` and
``links/_proxy/<prog>`` (``_proxy-<cgroup id>`` for a later agent's cgroup); the maps
under ``maps-<abi>/``, where ``abi`` is a digest of the C source and its constants, the
programs under ``maps-<abi>/progs/`` (pinned by the loader), and ``maps``, a symlink to
the maps of the programs the links run (what the helpers below open). A pinned link
keeps its attachment after the agent exits (capture goes on while it restarts; mesh
connects then fail closed instead of leaking) and removing the pin detaches it. On a
restart of the same version the agent opens the pinned programs and maps (no compile)
and ``readopt`` points every pinned link at them (``BPF_LINK_UPDATE``; links made by an
agent before the loader ran programs of its own process, and switch to the pinned
ones). After an upgrade that changed the programs (another ``abi``), the
earlier maps may have another shape (bcc would reuse a pinned map whatever its size, and
the verifier then rejects the program): the new programs get maps of their own, which the
agent fills with what capture needs before any link switches to them (the mesh
addresses, the captured pod IPs); then every link switches, ``maps`` follows, and the
earlier maps are unpinned. Links are made with libbpf's ``bpf_link_create`` through
ctypes (``redirect/libbpf.py``): bcc 0.26 cannot attach ``sk_lookup`` (a netns link) at all.

The agent's own upstream sockets are never captured: they belong to the agent's cgroup,
and connect4 also skips sockets carrying ``PROXY_MARK`` (``SO_MARK``).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import importlib.util
import logging
import os
import shutil
import socket
import struct
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nodeagent.errors import LocalStateError
from nodeagent.redirect.libbpf import (
    ip_key,
    libbpf,
    link_cgroup_id,
    link_create,
    link_update,
    map_count,
    map_delete,
    map_keys,
    map_lookup,
    map_shape,
    map_update,
    obj_get,
    obj_id,
    obj_pin,
    pinned,
    prog_attach,
)
from nodeagent.redirect.srcroute import TRANSPARENT_MARK

log = logging.getLogger("nodeagent.ebpf")

SOURCE = Path(__file__).resolve().parents[1] / "bpf" / "capture.c"
"""``bpf/capture.c``, reached through the package's ``bpf`` link so that a wheel carries it."""
SOURCE_ENV = "NODEAGENT_BPF_SOURCE"
"""Development: load this C file instead of ``SOURCE`` (e.g. to try an upgrade)."""
MAPS_LINK = "maps"
"""``<pin_dir>/maps``: symlink to ``maps-<abi>``, the maps of the programs in use."""
PROGS_DIR = "progs"
"""``maps-<abi>/progs/<key>``: the programs the loader pinned, beside the maps they use
(removed with them, also by an agent before the loader)."""
LOADER_TIMEOUT = 180.0
"""Seconds the one-shot loader gets to compile and load (4-12 s on an idle node)."""

PROXY_MARK = 0x539
OUTBOUND_PORT = 15001
INBOUND_PORT = 15006
HBONE_PORT = 15008


@dataclass(frozen=True)
class Prog:
    func: str
    prog_type: int
    """``BPF_PROG_TYPE_*``: CGROUP_SOCK_ADDR 18, SOCK_OPS 13, CGROUP_SOCKOPT 25,
    SK_LOOKUP 30 (not in bcc 0.26's enum; ``load_func`` passes the number through)."""
    attach_type: int
    """``BPF_*`` attach type, needed at load time too (else EINVAL): CGROUP_INET4_CONNECT
    10, CGROUP_INET6_CONNECT 11, CGROUP_SOCK_OPS 3, CGROUP_INET4_GETPEERNAME 29,
    CGROUP_INET6_GETPEERNAME 30, CGROUP_GETSOCKOPT 21, SK_LOOKUP 36, SK_MSG_VERDICT 7
    (SK_MSG, 16: attached to the ``local_socks`` map, not to a cgroup)."""


PROGS: dict[str, Prog] = {
    "connect4": Prog("connect4_capture", 18, 10),
    "connect6": Prog("connect6_capture", 18, 11),
    "getpeername6": Prog("getpeername6_fix", 18, 30),
    "sockops": Prog("sockops_rekey", 13, 3),
    "getpeername4": Prog("getpeername4_fix", 18, 29),
    "sk_lookup": Prog("sk_lookup_inbound", 30, 36),
    "getsockopt": Prog("getsockopt_odst", 25, 21),
    "msg_bypass": Prog("msg_bypass", 16, 7),
    "connect4_proxy": Prog("connect4_proxy", 18, 10),
}
PROG_NAMES = frozenset(n for p in PROGS.values() for n in (p.func, p.func[:15]))
"""Our programs' names as ``bpftool prog show`` may print them: the whole function name
(from BTF) or the kernel's 15 characters."""
POD_PROGS = ("connect4", "connect6", "sockops", "getpeername4", "getpeername6")
PROXY_PROGS = ("getsockopt", "sockops")
PROXY_LINKS = "links-proxy"
"""``<pin_dir>/links-proxy/_proxy*/<prog>``: the agent cgroups' links of programs that agents
before them do not know (``PROXY_PROGS_LATER``): pinned apart from ``links/``, which
every agent re-adopts by name, so that a downgraded agent leaves them alone."""
PROXY_PROGS_LATER = ("connect4_proxy",)
MAPS = (
    "sk_dst",
    "tuple_dst",
    "inbound_listener",
    "inbound_pods",
    "mesh_ips",
    "stats",
    "settings",
    "local_socks",
    "exclude_out",
    "exclude_in",
    "own_legs",
)
STATS = (
    "captured",
    "mark_skipped",
    "odst_answered",
    "inbound_steered",
    "bypass_msgs",
    "bypass_bytes",
    "bypass_stack_msgs",
    "own_legs_passed",
    "v6_refused",
)
SETTING_BYPASS = 0
SETTING_CAPTURE_ALL = 1
"""``settings[1]``: connect4/6 capture every outbound TCP destination (REGISTRY_ONLY)."""
SOCK_KEY = struct.Struct("=Q4sIII")
"""``struct sock_key`` (netns, sip, dip, sport, dport), the key of ``local_socks``."""
EXCLUDE_OUT_KEY = struct.Struct("=QII")
"""``struct exclude_out_key`` (netns cookie, port, pad), the key of ``exclude_out``."""
EXCLUDE_IN_KEY = struct.Struct("=4sI")
"""``struct exclude_in_key`` (pod IP, port), the key of ``exclude_in``."""


# -- the capture ---------------------------------------------------------------------------


def cflags(pin_dir: str) -> list[str]:
    """The C file's constants (``-D``): the pin directory, ports, mark."""
    return [
        f"-DPROXY_MARK={PROXY_MARK:#x}",
        f"-DTRANSPARENT_MARK={TRANSPARENT_MARK:#x}",
        f"-DOUTBOUND_PORT={OUTBOUND_PORT}",
        f"-DINBOUND_PORT={INBOUND_PORT}",
        f"-DHBONE_PORT={HBONE_PORT}",
        f'-DPIN_DIR="{pin_dir}"',
    ]


def source() -> Path:
    """The C file the agent loads: ``SOURCE``, or ``$NODEAGENT_BPF_SOURCE`` when set."""
    return Path(os.environ.get(SOURCE_ENV) or SOURCE)


def abi_of(src: Path) -> str:
    """A digest of the programs' source and constants: two loads with the same one can
    share pinned maps; another one gets maps of its own."""
    h = hashlib.sha256(src.read_bytes())
    h.update(" ".join(cflags("")).encode())
    return h.hexdigest()[:12]


def maps_path(pin_dir: str) -> str:
    """Where the maps of the programs in use are pinned (``<pin_dir>/maps``)."""
    return os.path.join(pin_dir, MAPS_LINK)


def progs_pinned(maps: str) -> bool:
    """Whether every program of ``PROGS`` is pinned under ``maps/progs`` (the loader's)."""
    d = os.path.join(maps, PROGS_DIR)
    return all(os.path.exists(os.path.join(d, key)) for key in PROGS)


def load_programs(pin_dir: str, src: Path) -> float:
    """Make sure ``src``'s programs are pinned under ``maps-<abi>/progs``: when they are
    not, run the one-shot loader (``redirect/bpfload.py``) in a child process, so that
    bcc's LLVM never maps into this one. Seconds the loader took (0: pinned already)."""
    maps = os.path.join(pin_dir, f"maps-{abi_of(src)}")
    if progs_pinned(maps):
        return 0.0
    t0 = time.monotonic()
    env = dict(os.environ)
    # the child imports this very package, wherever it came from
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(Path(__file__).resolve().parents[2]), env.get("PYTHONPATH")) if p
    )
    argv = [sys.executable, "-m", "nodeagent.redirect.bpfload", pin_dir, str(src)]
    try:
        child = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                 text=True)  # fmt: skip
    except OSError as e:
        raise LocalStateError(f"cannot load {src}: cannot start the eBPF loader: {e}") from None
    try:
        _, err = child.communicate(timeout=LOADER_TIMEOUT)
    except subprocess.TimeoutExpired:
        child.kill()
        child.wait()
        # killed before its rename: what it pinned so far would stay pinned
        shutil.rmtree(os.path.join(maps, f"{PROGS_DIR}_{child.pid}"), ignore_errors=True)
        raise LocalStateError(
            f"cannot load {src}: the eBPF loader took more than {LOADER_TIMEOUT:g}s"
        ) from None
    if child.returncode != 0 or not progs_pinned(maps):
        lines = [ln for ln in err.splitlines() if ln.strip()]
        said = [ln for ln in lines if ln.startswith("cannot load")]
        why = said[-1] if said else f"cannot load {src}: the loader exited with {child.returncode}"
        detail = [ln for ln in lines if not ln.startswith("cannot load")][-10:]  # clang's
        raise LocalStateError("\n".join([why, *detail]))
    return time.monotonic() - t0


class Capture:
    """``capture.c``'s programs and maps for a node, as pinned objects: the programs are
    compiled and pinned by the one-shot loader (``load_programs``; 4-12 s with bcc, once
    per version and boot) and only opened here, with the maps, under
    ``<pin_dir>/maps-<abi>`` (created on the first load of this version, reopened on
    later ones). ``previous`` is where the maps of other programs the links may still
    run are pinned (another version's directory, or ``pin_dir`` itself for the layout
    before versioned maps); ``switch`` moves everything to this load."""

    def __init__(self, pin_dir: str, src: Path | None = None) -> None:
        src = src if src is not None else source()
        self.pin_dir = pin_dir
        self.abi = abi_of(src)
        self.maps = os.path.join(pin_dir, f"maps-{self.abi}")
        os.makedirs(os.path.join(pin_dir, "links"), exist_ok=True)
        os.makedirs(self.maps, exist_ok=True)
        self.previous = _previous_maps(pin_dir, self.maps)
        self.load_s = load_programs(pin_dir, src)
        self.progs: dict[str, int] = {}
        self._maps: dict[str, int] = {}
        try:
            for key in PROGS:
                self.progs[key] = obj_get(os.path.join(self.maps, PROGS_DIR, key))
            for name in MAPS:
                self._maps[name] = obj_get(os.path.join(self.maps, name))
        except OSError as e:
            self.close()
            raise LocalStateError(f"cannot open the pinned eBPF objects: {e}") from None
        if self.previous is None:  # first load, or a restart of the same version
            _point_maps_link(pin_dir, self.maps)

    def close(self) -> None:
        """Close this process's fds of the programs and maps (their pins keep them)."""
        for fd in [*self.progs.values(), *self._maps.values()]:
            os.close(fd)
        self.progs.clear()
        self._maps.clear()

    def map_fd(self, name: str) -> int:
        return self._maps[name]

    def _link(self, key: str, target_path: str, pin: str) -> None:
        if os.path.exists(pin):  # attached by an earlier run: run our program now
            with pinned(pin) as fd:
                link_update(fd, self.progs[key])
            return
        tfd = os.open(target_path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            lfd = link_create(self.progs[key], tfd, PROGS[key].attach_type)
        finally:
            os.close(tfd)
        try:
            obj_pin(lfd, pin)
        finally:
            os.close(lfd)  # the pin holds the link now

    def attach_pod(
        self,
        pod: str,
        cgroup: str,
        netns: str,
        pod_ip: str,
        exclude: Exclusions | None = None,
    ) -> None:
        """Capture ``pod``: its cgroup's outbound connects and its netns's inbound, but
        not the ports ``exclude`` names. ``pod`` names the pin directory (no ``/``)."""
        # exclusions first: no connect to an excluded port is captured, even briefly
        self.set_exclusions(pod_ip, exclude or Exclusions())
        d = os.path.join(self.pin_dir, "links", pod)
        os.makedirs(d, exist_ok=True)
        for key in POD_PROGS:
            self._link(key, cgroup, os.path.join(d, key))
        self._link("sk_lookup", netns, os.path.join(d, "sk_lookup"))
        self._steer_inbound(pod_ip)

    def _steer_inbound(self, pod_ip: str) -> None:
        """sk_lookup steers inbound TCP to ``pod_ip`` to the proxy's listener; with no
        listener registered (agent down), it refuses instead (fails closed)."""
        map_update(self.map_fd("inbound_pods"), ip_key(pod_ip), struct.pack("=I", 1))

    def set_exclusions(self, pod_ip: str, exclude: Exclusions) -> None:
        """Make ``exclude_out``/``exclude_in`` hold exactly ``exclude`` for this pod."""
        ip = ip_key(pod_ip)
        out_fd, in_fd = self.map_fd("exclude_out"), self.map_fd("exclude_in")
        drop_pod_entries(out_fd, in_fd, pod_ip)
        for port in exclude.outbound_ports:
            map_update(out_fd, EXCLUDE_OUT_KEY.pack(exclude.netns_cookie, port, 0), ip)
        for port in exclude.inbound_ports:
            map_update(in_fd, EXCLUDE_IN_KEY.pack(ip, port), ip)

    def set_mesh_ips(self, ips: set[str]) -> None:
        """Make ``mesh_ips`` hold exactly the IPv4 ones of ``ips`` (pod and service
        addresses): connects to them are captured, any other is left alone (unless all
        TCP is captured). An IPv6 address (a ServiceEntry's) has no place there: the
        programs capture IPv4 only."""
        fd = self.map_fd("mesh_ips")
        want = {ip_key(ip) for ip in ips if ":" not in ip}
        have_keys = set(map_keys(fd, 4))
        for k in have_keys - want:
            map_delete(fd, k)
        one = struct.pack("=I", 1)
        for k in want - have_keys:
            map_update(fd, k, one)

    def set_capture_all(self, on: bool) -> None:
        """Capture every outbound TCP connection of the pods (on: MeshConfig
        ``REGISTRY_ONLY``, so that the proxy refuses what the registry does not know, and
        real IPv6 is refused) or only those to ``mesh_ips`` (off: ``ALLOW_ANY``); for
        connects from now on. Pinned: it holds while the agent restarts."""
        _put_setting(self.map_fd("settings"), SETTING_CAPTURE_ALL, on)

    def attach_bypass(self, on: bool) -> None:
        """(Re)attach ``msg_bypass`` to ``local_socks`` and switch the bypass on or off:
        sockets already in the map keep the program they were added with."""
        prog_attach(
            self.progs["msg_bypass"], self.map_fd("local_socks"), PROGS["msg_bypass"].attach_type
        )
        _put_bypass(self.map_fd("settings"), on)

    def prefill(self, mesh_ips: set[str], pod_ips: set[str]) -> None:
        """Before links switch to this load's programs from another version's: what they
        must know at once, or mesh connects would leak around the proxy and inbound ones
        reach the app unchecked (``mesh_ips``; ``inbound_pods``, so that sk_lookup fails
        closed until the pod's listener is registered). The other version's ``settings``
        come along, so that capturing all TCP (REGISTRY_ONLY) holds on through the switch
        (the bypass is set again by ``attach_bypass``)."""
        self.set_mesh_ips(mesh_ips)
        for ip in pod_ips:
            self._steer_inbound(ip)
        if self.previous is not None:
            for name in ("exclude_out", "exclude_in", "settings"):
                self._carry(name)

    def _carry(self, name: str) -> None:
        """Copy the entries of another version's map ``name`` into this load's, when both
        have the same key and value sizes (pods' excluded ports: without them a connect
        to an excluded port would be captured, or an inbound one refused, until the pod
        is attached again; the settings). A map of another shape is left behind with a
        warning."""
        path = os.path.join(self.previous or "", name)
        if not os.path.exists(path):
            return
        new_fd = self.map_fd(name)
        with pinned(path) as old_fd:
            old_shape, new_shape = map_shape(old_fd), map_shape(new_fd)
            if old_shape != new_shape:
                log.warning(
                    "eBPF upgrade: %s changed shape (key, value bytes %s -> %s): its "
                    "entries apply again when each pod is attached",
                    name,
                    old_shape,
                    new_shape,
                )
                return
            for k in map_keys(old_fd, old_shape[0]):
                v = map_lookup(old_fd, k, old_shape[1])
                if v is not None:
                    map_update(new_fd, k, v)

    def switch(self) -> list[str]:
        """Every pinned link runs this load's programs, ``maps`` points to this load's
        maps, and the maps of earlier programs are unpinned (freed with their programs)."""
        done = self.readopt()
        _point_maps_link(self.pin_dir, self.maps)
        for name in os.listdir(self.pin_dir):
            path = os.path.join(self.pin_dir, name)
            if name.startswith("maps-") and path != self.maps:
                shutil.rmtree(path, ignore_errors=True)
            elif name not in ("links", PROXY_LINKS, MAPS_LINK) and not os.path.isdir(path):
                os.unlink(path)  # a map pinned by the layout before versioned maps
        self.previous = None
        return done

    def attach_proxy(self, cgroup: str) -> None:
        """Hook the agent's own cgroup (accepted sockets belong to the listener's).

        Pinned under ``links/_proxy`` for the first agent's cgroup and ``_proxy-<cgroup
        id>`` for another's (a DaemonSet's new pod): the earlier agents' hooks stay, for
        the listeners they opened live on in their cgroup after a hand-over; each goes
        by itself once its cgroup is freed (``readopt`` then unpins it)."""
        links = os.path.join(self.pin_dir, "links")
        d = os.path.join(links, _proxy_dir(links, os.stat(cgroup).st_ino))
        os.makedirs(d, exist_ok=True)
        for key in PROXY_PROGS:
            self._link(key, cgroup, os.path.join(d, key))
        # the same per-cgroup name under links-proxy/, so a new pod's cgroup gets its own
        d = os.path.join(self.pin_dir, PROXY_LINKS, os.path.basename(d))
        os.makedirs(d, exist_ok=True)
        for key in PROXY_PROGS_LATER:
            self._link(key, cgroup, os.path.join(d, key))

    def readopt(self) -> list[str]:
        """After a restart: every pinned link now runs this process's programs; a link
        whose cgroup is gone (it hooks nothing any more) is unpinned."""
        pins: list[tuple[str, str]] = []  # (directory, program)
        links = os.path.join(self.pin_dir, "links")
        for pod in sorted(os.listdir(links)):
            pins += [(os.path.join(links, pod), k) for k in sorted(os.listdir(f"{links}/{pod}"))]
        later = os.path.join(self.pin_dir, PROXY_LINKS)
        for hooks in sorted(os.listdir(later)) if os.path.isdir(later) else []:
            d = os.path.join(later, hooks)
            if not os.path.isdir(d):  # the flat layout of a day (attach_proxy pins it again)
                os.unlink(d)
                continue
            # a program this agent does not know is a later agent's: left to it
            pins += [(d, k) for k in sorted(os.listdir(d)) if k in self.progs]
        done = []
        for d, key in pins:
            name = f"{os.path.basename(d)}/{key}"
            try:
                with pinned(d, key) as fd:
                    link_update(fd, self.progs[key])
            except OSError as e:
                if e.errno != errno.ENOLINK:
                    raise
                log.info("eBPF: %s hooks a cgroup that is gone: unpinned", name)
                os.unlink(os.path.join(d, key))
                continue
            done.append(name)
        return done


PROXY_HOOKS = "_proxy"
"""``links/_proxy*``: the hooks of the agents' own cgroups (``PROXY_PROGS``)."""


def _proxy_dir(links: str, cgroup_id: int) -> str:
    """The directory under ``links`` of the proxy hooks on the cgroup ``cgroup_id``:
    the one already attached there, else ``_proxy`` if free, else ``_proxy-<id>``."""
    for name in sorted(os.listdir(links)):
        if not name.startswith(PROXY_HOOKS):
            continue
        try:
            with pinned(links, name, "getsockopt") as fd:
                if link_cgroup_id(fd) == cgroup_id:
                    return name
        except OSError:
            continue
    if not os.path.exists(os.path.join(links, PROXY_HOOKS)):
        return PROXY_HOOKS
    return f"{PROXY_HOOKS}-{cgroup_id}"


@dataclass(frozen=True)
class Exclusions:
    """A pod's ports left out of capture (Istio's ``exclude{Outbound,Inbound}Ports``)
    and its netns cookie (``SO_NETNS_COOKIE``), which keys the outbound ones."""

    netns_cookie: int = 0
    outbound_ports: frozenset[int] = frozenset()
    inbound_ports: frozenset[int] = frozenset()


SO_NETNS_COOKIE = 71


def netns_cookie(sock: socket.socket) -> int:
    """The cookie of the netns ``sock`` lives in (what ``bpf_get_netns_cookie`` says)."""
    return int(struct.unpack("=Q", sock.getsockopt(socket.SOL_SOCKET, SO_NETNS_COOKIE, 8))[0])


def drop_pod_entries(out_fd: int, in_fd: int, pod_ip: str) -> None:
    """Remove a pod's exclusions (both maps hold the pod IP as value)."""
    ip = ip_key(pod_ip)
    for fd, size in ((out_fd, EXCLUDE_OUT_KEY.size), (in_fd, EXCLUDE_IN_KEY.size)):
        for k in map_keys(fd, size):
            if map_lookup(fd, k, 4) == ip:
                map_delete(fd, k)


def detach_pod(pin_dir: str, pod: str, pod_ip: str | None = None) -> None:
    """Stop capturing ``pod``: unpinning its links detaches them."""
    shutil.rmtree(os.path.join(pin_dir, "links", pod), ignore_errors=True)
    if pod_ip:
        try:
            with (
                pinned(maps_path(pin_dir), "inbound_pods") as pods,
                pinned(maps_path(pin_dir), "exclude_out") as out_fd,
                pinned(maps_path(pin_dir), "exclude_in") as in_fd,
            ):
                map_delete(pods, ip_key(pod_ip))
                drop_pod_entries(out_fd, in_fd, pod_ip)
        except OSError:
            return


def _previous_maps(pin_dir: str, mine: str) -> str | None:
    """Where the maps of the programs the links ran before this load are pinned, when
    that is not ``mine``: the target of ``<pin_dir>/maps``, or ``pin_dir`` itself when
    maps are pinned there directly (the layout before versioned maps)."""
    link = maps_path(pin_dir)
    if os.path.islink(link):
        target = os.path.join(pin_dir, os.readlink(link))
        return None if os.path.realpath(target) == os.path.realpath(mine) else target
    for name in os.listdir(pin_dir):
        if not os.path.isdir(os.path.join(pin_dir, name)):
            return pin_dir
    return None


def _point_maps_link(pin_dir: str, maps: str) -> None:
    """Make ``<pin_dir>/maps`` point to ``maps`` (replaced in one rename; bpffs names may
    not contain a dot)."""
    tmp = os.path.join(pin_dir, "maps_next")
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp)
    os.symlink(os.path.basename(maps), tmp)
    os.replace(tmp, maps_path(pin_dir))


def teardown(pin_dir: str) -> None:
    """Remove every pin: links detach, maps and programs are freed."""
    shutil.rmtree(pin_dir, ignore_errors=True)


def register_inbound_listener(pin_dir: str, pod_ip: str, sock: socket.socket) -> None:
    """Put the proxy's inbound listener of ``pod_ip`` into the pinned sockhash (no bcc
    needed); the entry goes away by itself when the socket closes."""
    with pinned(maps_path(pin_dir), "inbound_listener") as fd:
        map_update(fd, ip_key(pod_ip), struct.pack("=I", sock.fileno()))


def set_bypass(pin_dir: str, on: bool) -> None:
    """Switch the local socket bypass for connections established from now on."""
    with pinned(maps_path(pin_dir), "settings") as fd:
        _put_bypass(fd, on)


def _put_bypass(settings_fd: int, on: bool) -> None:
    _put_setting(settings_fd, SETTING_BYPASS, on)


def _put_setting(settings_fd: int, index: int, on: bool) -> None:
    map_update(settings_fd, struct.pack("=i", index), struct.pack("=I", int(on)))


def capture_all(pin_dir: str) -> bool:
    """Whether connect4/6 capture every outbound TCP destination (``set_capture_all``)."""
    with pinned(maps_path(pin_dir), "settings") as fd:
        raw = map_lookup(fd, struct.pack("=i", SETTING_CAPTURE_ALL), 4) or bytes(4)
    return bool(struct.unpack("=I", raw)[0])


def bypass_state(pin_dir: str) -> tuple[bool, int]:
    """(bypass on, sockets in ``local_socks`` now: two per bypassed local leg)."""
    with pinned(maps_path(pin_dir), "settings") as fd:
        raw = map_lookup(fd, struct.pack("=i", SETTING_BYPASS), 4) or bytes(4)
    with pinned(maps_path(pin_dir), "local_socks") as fd:
        socks = map_count(fd, SOCK_KEY.size)
    return bool(struct.unpack("=I", raw)[0]), socks


def read_stats(pin_dir: str) -> dict[str, int]:
    """The programs' counters (``STATS``)."""
    with pinned(maps_path(pin_dir), "stats") as fd:
        out = {}
        for i, name in enumerate(STATS):
            raw = map_lookup(fd, struct.pack("=i", i), 8) or bytes(8)
            out[name] = struct.unpack("=Q", raw)[0]
        return out


def probe() -> str | None:
    """Why eBPF capture cannot work here (None: it can): cgroup v2, bpffs, BTF, bcc,
    kernel headers, libbpf — the first missing piece, with what to do about it."""
    if not os.path.exists("/sys/kernel/btf/vmlinux"):
        return "the kernel has no BTF (/sys/kernel/btf/vmlinux): use --redirect iptables"
    if not any(
        os.path.exists(f"{d}/cgroup.controllers")
        for d in ("/sys/fs/cgroup", "/sys/fs/cgroup/unified")
    ):
        return "no cgroup v2 mount: mount -t cgroup2 none /sys/fs/cgroup/unified"
    if not os.path.ismount("/sys/fs/bpf"):
        return "bpffs is not mounted: mount -t bpf bpf /sys/fs/bpf"
    # found, not imported: importing bcc maps LLVM; only the loader child may
    if importlib.util.find_spec("bcc") is None:
        return "bcc is not importable: install python3-bpfcc and link it into the venv"
    if not os.path.exists(f"/lib/modules/{os.uname().release}/build"):
        return f"no kernel headers at /lib/modules/{os.uname().release}/build (bcc needs them)"
    try:
        libbpf()
    except LocalStateError as e:
        return str(e)
    return None


def own_cgroup(
    proc_cgroup: str = "/proc/self/cgroup",
    mountinfo: str = "/proc/self/mountinfo",
    pid: int | None = None,
) -> str:
    """This process's cgroup v2 directory, where the agent hooks its own sockets.

    ``0::/path`` of /proc/self/cgroup under the cgroup2 mount, checked by finding our pid
    in its ``cgroup.procs``: in a container with a private cgroup namespace that line reads
    ``0::/`` while the mounted hierarchy is the host's, so the directory is found by
    searching the mount for our pid instead. Never the root: programs attached there
    would hook every process on the node."""
    rel = ""
    with open(proc_cgroup) as f:
        for line in f:
            if line.startswith("0::"):
                rel = line[3:].strip()
    mount = ""
    with open(mountinfo) as f:
        for line in f:
            left, _, right = line.partition(" - ")
            if right.split(" ", 1)[0] == "cgroup2":
                mount = left.split()[4]
                break
    if not rel or not mount:
        raise LocalStateError("cannot find this process's cgroup v2 directory")
    me = str(os.getpid() if pid is None else pid)
    path = os.path.join(mount, rel.lstrip("/"))
    if not _lists(path, me):
        found = _find_cgroup(mount, me)
        if found is None:
            raise LocalStateError(
                f"cannot find this process's cgroup v2 directory: /proc/self/cgroup says "
                f"{rel!r}, and no cgroup.procs under {mount} lists pid {me}"
            )
        path = found
    if os.path.realpath(path) == os.path.realpath(mount):
        raise LocalStateError(
            f"the agent runs in the root cgroup of {mount}: eBPF capture hooks the agent's own "
            f"cgroup and would hook every process on the node; run it in a cgroup of its own "
            f"(a container, a systemd service) or use --redirect iptables"
        )
    return path


def _lists(cgroup_dir: str, pid: str) -> bool:
    """Whether ``cgroup_dir/cgroup.procs`` lists ``pid`` (pids read in our namespace)."""
    try:
        with open(os.path.join(cgroup_dir, "cgroup.procs")) as f:
            return pid in f.read().split()
    except OSError:
        return False


def _find_cgroup(mount: str, pid: str) -> str | None:
    """The directory under ``mount`` whose cgroup.procs lists ``pid`` (only one can)."""
    for here, _dirs, _files in os.walk(mount):
        if _lists(here, pid):
            return here
    return None


class NodeCapture:
    """The eBPF capture of one node agent: ``Capture`` loaded (or re-adopted) at start,
    the agent's own cgroup hooked, pods attached and detached as the snapshot says."""

    def __init__(
        self,
        node: str,
        root: str = "/sys/fs/bpf/nodeagent",
        bypass: bool = False,
        mesh_ips: set[str] | None = None,
        pod_ips: set[str] | None = None,
    ) -> None:
        """``mesh_ips`` and ``pod_ips`` (the snapshot's mesh addresses and this node's pod
        IPs) fill the new maps before the links switch, when the pinned links ran another
        version's programs (``upgraded_from``)."""
        self.pin_dir = os.path.join(root, node)
        self.cap = Capture(self.pin_dir)
        self.upgraded_from = self.cap.previous
        if self.upgraded_from is not None:
            self.cap.prefill(mesh_ips or set(), pod_ips or set())
            log.info(
                "eBPF programs changed (maps %s -> %s): switching every pinned link",
                os.path.basename(self.upgraded_from),
                os.path.basename(self.cap.maps),
            )
            adopted = self.cap.switch()
        else:
            adopted = self.cap.readopt()
        self.adopted = len(adopted)
        self.cap.attach_proxy(own_cgroup())
        self.cap.attach_bypass(bypass)

    def set_bypass(self, on: bool) -> None:
        set_bypass(self.pin_dir, on)

    @staticmethod
    def pin_name(pod_key: str) -> str:
        return pod_key.replace("/", "_")

    def attach(
        self,
        pod_key: str,
        cgroup: str,
        netns: str,
        pod_ip: str,
        listener: socket.socket,
        exclude_outbound_ports: frozenset[int] = frozenset(),
        exclude_inbound_ports: frozenset[int] = frozenset(),
    ) -> None:
        """Capture a pod; ``listener`` (its inbound listener, in the pod's netns) is
        registered for sk_lookup and tells the pod's netns cookie."""
        if not cgroup:
            raise LocalStateError(f"pod {pod_key} has no cgroup: eBPF capture needs one")
        exclude = Exclusions(netns_cookie(listener), exclude_outbound_ports, exclude_inbound_ports)
        self.cap.attach_pod(self.pin_name(pod_key), cgroup, netns, pod_ip, exclude)
        register_inbound_listener(self.pin_dir, pod_ip, listener)

    def exclude(
        self,
        pod_ip: str,
        listener: socket.socket,
        outbound_ports: frozenset[int],
        inbound_ports: frozenset[int],
    ) -> None:
        """A captured pod's excluded ports changed: the maps follow at once."""
        self.cap.set_exclusions(
            pod_ip, Exclusions(netns_cookie(listener), outbound_ports, inbound_ports)
        )

    def detach(self, pod_key: str, pod_ip: str | None) -> None:
        detach_pod(self.pin_dir, self.pin_name(pod_key), pod_ip)

    def describe(self) -> dict[str, Any]:
        """For ``nodeagent ctl bpf``: the programs, what each pod has attached, the maps'
        sizes (the mesh addresses themselves), the counters."""
        links = os.path.join(self.pin_dir, "links")
        attachments: dict[str, list[str]] = {}
        for name in sorted(os.listdir(links)):
            attachments[name] = sorted(os.listdir(os.path.join(links, name)))
        later = os.path.join(self.pin_dir, PROXY_LINKS)
        for hooks in sorted(os.listdir(later)) if os.path.isdir(later) else []:
            mine = os.listdir(os.path.join(later, hooks))
            attachments[hooks] = sorted([*attachments.get(hooks, []), *mine])
        mesh = sorted(socket.inet_ntoa(k) for k in map_keys(self.cap.map_fd("mesh_ips"), 4))
        pods = sorted(socket.inet_ntoa(k) for k in map_keys(self.cap.map_fd("inbound_pods"), 4))
        bypass_on, local_socks = bypass_state(self.pin_dir)
        return {
            "pin_dir": self.pin_dir,
            "maps_dir": os.path.basename(self.cap.maps),
            "programs": {
                key: {"name": p.func, "id": obj_id(self.cap.progs[key])}
                for key, p in PROGS.items()
            },
            "attachments": attachments,
            "maps": {
                "mesh_ips": {"entries": len(mesh), "addresses": mesh},
                "inbound_pods": {"entries": len(pods), "addresses": pods},
                "local_socks": {"entries": local_socks},
            },
            "bypass": "on" if bypass_on else "off",
            "outbound": "all TCP (REGISTRY_ONLY)" if capture_all(self.pin_dir) else "mesh",
            "stats": read_stats(self.pin_dir),
        }

    def retain(self, pod_keys: set[str]) -> None:
        """Remove the pins of pods no longer on this node (e.g. gone while we were down)."""
        links = os.path.join(self.pin_dir, "links")
        keep = {self.pin_name(k) for k in pod_keys}
        for name in os.listdir(links):
            if name not in keep and not name.startswith(PROXY_HOOKS):
                detach_pod(self.pin_dir, name)
