"""A container runtime's CNI side, as libcni does it, for the ``nodeagent-cni`` tests.

``Runtime.add`` runs a conflist's plugins in order, each with the network config on
stdin and ``prevResult`` threaded through; ``delete`` runs them in reverse with the
cached result, ``check`` in order with it. Plugins run inside the test's "node" netns
(where the bridge goes), exactly as exec'd binaries found on ``CNI_PATH``.
"""

from __future__ import annotations

import json
import os
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

LOOPBACK = {"cniVersion": "1.0.0", "name": "lo", "type": "loopback"}


@dataclass
class Exec:
    """One plugin's run: its exit code, its stdout as JSON (or None), its stderr."""

    plugin: str
    rc: int
    out: dict[str, Any] | None
    err: str

    @property
    def ok(self) -> bool:
        return self.rc == 0


@dataclass
class Sandbox:
    """One pod sandbox: its netns and what the runtime cached of its ADD."""

    name: str
    namespace: str
    uid: str
    container_id: str
    netns: str
    """The netns path (``/var/run/netns/NAME``)."""
    result: dict[str, Any] | None = None
    log: list[Exec] = field(default_factory=list)


class Runtime:
    """Runs ``conflist`` (a dict) for pod sandboxes, from ``node_netns``."""

    def __init__(
        self, conflist: dict[str, Any], bin_dir: Path, node_netns: str, env: dict[str, str]
    ) -> None:
        self.conflist = conflist
        self.bin_dir = bin_dir
        self.node_netns = node_netns
        self.env = env

    def _exec(
        self, conf: dict[str, Any], command: str, sb: Sandbox, ifname: str, timeout: float = 60
    ) -> Exec:
        env = {
            **self.env,
            "CNI_COMMAND": command,
            "CNI_CONTAINERID": sb.container_id,
            "CNI_NETNS": sb.netns,
            "CNI_IFNAME": ifname,
            "CNI_PATH": str(self.bin_dir),
            "CNI_ARGS": (
                f"IgnoreUnknown=1;K8S_POD_NAMESPACE={sb.namespace};K8S_POD_NAME={sb.name};"
                f"K8S_POD_INFRA_CONTAINER_ID={sb.container_id};K8S_POD_UID={sb.uid}"
            ),
        }
        exe = self.bin_dir / str(conf["type"])
        p = subprocess.run(
            ["nsenter", f"--net=/var/run/netns/{self.node_netns}", str(exe)],
            input=json.dumps(conf).encode(),
            capture_output=True,
            env=env,
            timeout=timeout,
        )
        text = p.stdout.decode().strip()
        out = json.loads(text) if text else None
        done = Exec(str(conf["type"]), p.returncode, out, p.stderr.decode())
        sb.log.append(done)
        return done

    def _confs(self) -> list[dict[str, Any]]:
        top = {"cniVersion": self.conflist["cniVersion"], "name": self.conflist["name"]}
        return [{**plugin, **top} for plugin in self.conflist["plugins"]]

    def add(self, sb: Sandbox) -> Exec:
        """loopback, then the conflist: the last plugin's run (the first to fail)."""
        lo = self._exec(dict(LOOPBACK), "ADD", sb, "lo")
        if not lo.ok:
            return lo
        prev: dict[str, Any] | None = None
        last = lo
        for conf in self._confs():
            if prev is not None:
                conf["prevResult"] = prev
            last = self._exec(conf, "ADD", sb, "eth0")
            if not last.ok:
                return last
            prev = last.out
        sb.result = prev
        return last

    def delete(self, sb: Sandbox) -> list[Exec]:
        """Every plugin's DEL, last first, with the cached result (spec: keep going)."""
        runs = []
        for conf in reversed(self._confs()):
            if sb.result is not None:
                conf["prevResult"] = sb.result
            runs.append(self._exec(conf, "DEL", sb, "eth0"))
        runs.append(self._exec(dict(LOOPBACK), "DEL", sb, "lo"))
        return runs

    def check(self, sb: Sandbox) -> list[Exec]:
        runs = []
        for conf in self._confs():
            conf["prevResult"] = sb.result
            runs.append(self._exec(conf, "CHECK", sb, "eth0"))
        return runs

    def version(self, plugin: str, cni_version: str) -> Exec:
        p = subprocess.run(
            [str(self.bin_dir / plugin)],
            input=json.dumps({"cniVersion": cni_version}).encode(),
            capture_output=True,
            env={**self.env, "CNI_COMMAND": "VERSION"},
            timeout=30,
        )
        text = p.stdout.decode().strip()
        return Exec(plugin, p.returncode, json.loads(text) if text else None, p.stderr.decode())


def netns_add(name: str) -> str:
    subprocess.run(["ip", "netns", "add", name], check=True)
    subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
    return f"/var/run/netns/{name}"


def netns_del(name: str) -> None:
    if os.path.exists(f"/var/run/netns/{name}"):
        subprocess.run(["ip", "netns", "del", name], check=False)


def nat_rules(netns_path: str) -> str:
    p = subprocess.run(
        ["nsenter", f"--net={netns_path}", "iptables-save", "-t", "nat"],
        capture_output=True,
        text=True,
        check=True,
    )
    return p.stdout
