"""A Kubernetes "cluster" around the sandbox, for the end-to-end test of ``--source
kubernetes``: the test API server (tests/kubeapi.py) on the sandbox's fabric, where the
agents in the node netns reach it, and ``Kubelet``, which starts pods created through that
API the way kubelet and a container runtime do (a netns, the CNI chain, the pod's status
written back).

- ``fabric_api_server()``: a ``KubeApiServer`` listening on ``API_IP`` inside the fabric
  netns (``before_agents``: ``start_on_fabric`` adds the address to the fabric bridge,
  starts it and writes the kubeconfig, once the sandbox has made its namespaces).
- ``Kubelet(sb, api, tmp)``: per node, a CNI bin dir (Debian's ``bridge``, ``host-local``,
  ``loopback`` from /usr/lib/cni, and ``nodeagent-cni`` as ``nodeagent cni install``
  writes it, running this checkout) and a conflist: ``bridge`` on the node's own ``cbr0``
  with ``host-local`` IPAM on ``.200-.250`` of the node's pod CIDR (the sandbox's own pods
  are numbered from ``.2``), then ``nodeagent-cni`` on the node's agent socket.
  ``run_pod`` creates the Pod (Pending, scheduled to the node), its netns and cgroup,
  runs the chain in the node's netns (``cnirig.Runtime``, as libcni), then writes the
  Running status with the IP the chain gave, and the pod's hosts file (service names, as
  the sandbox writes them for its own pods). ``delete_pod`` deletes the Pod and runs DEL;
  ``close`` removes whatever is left, even after a failure.

The sandbox's CA signs an identity for a node only when a pod of its config directory
runs as it there (a cluster's CA asks the API with a TokenReview instead), so
``run_pod`` also puts the pod's placement in that directory; nothing else reads it.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cnirig import Runtime, nat_rules, netns_add, netns_del
from cnirig import Sandbox as CniSandbox
from kubeapi import KubeApiServer, running_pod

from nodeagent.cni import install
from nodeagent.sandbox import Sandbox, processes
from nodeagent.sandbox.netlink import remove_etc_netns, run_in_netns
from nodeagent.sandbox.topology import (
    CGROUP_SUBTREE,
    ETC_NETNS_DIR,
    FABRIC_BRIDGE,
    FABRIC_NETNS,
    pod_netns,
)

ROOT = Path(__file__).resolve().parents[2]
API_IP = "10.250.0.254"
"""The fabric's own address (top of 10.250.0.0/24; nodes are numbered from .1): every node
netns reaches it over its uplink."""
FIRST_IP, LAST_IP = 200, 250
"""The part of each node's pod CIDR host-local hands out (the sandbox uses .2, .3, ...)."""
CA_RELOAD = 1.2
"""Seconds after a change of its directory by which the sandbox CA has read it."""


def _listen_in_fabric(host: str, port: int) -> socket.socket:
    return run_in_netns(FABRIC_NETNS, lambda: socket.create_server((host, port)))


def fabric_api_server(**kw: Any) -> KubeApiServer:
    """A test API server whose socket is made in the fabric netns, on ``API_IP`` (its
    certificate names that address); not listening until ``start_on_fabric``."""
    return KubeApiServer(host=API_IP, listen=_listen_in_fabric, **kw)


def start_on_fabric(sb: Sandbox, api: KubeApiServer, kubeconfig: Path) -> None:
    """``Sandbox.up(before_agents=...)``: the address on the fabric bridge, the server
    listening there, and the kubeconfig the agents read."""
    subprocess.run(
        ["ip", "-n", FABRIC_NETNS, "addr", "add", f"{API_IP}/24", "dev", FABRIC_BRIDGE],
        check=True,
    )
    api.start()
    api.kubeconfig(kubeconfig)


def pending_pod(name: str, node: str, labels: dict[str, str], service_account: str,
                namespace: str = "default") -> dict[str, Any]:
    """A Pod as the API holds it once scheduled, before kubelet has started it."""
    pod: dict[str, Any] = running_pod(name, ip="", node=node, labels=labels,
                                      service_account=service_account, namespace=namespace)
    pod["status"] = {"phase": "Pending", "qosClass": "BestEffort", "conditions": [
        {"type": "PodScheduled", "status": "True", "lastTransitionTime": None}]}
    return pod


@dataclass
class KubePod:
    """A pod ``Kubelet`` started: its API identity, netns, cgroup and CNI sandbox."""

    name: str
    namespace: str
    node: str
    uid: str
    netns: str
    """The netns name (``na-p-<namespace>-<name>``, so ``sandbox down`` knows it too)."""
    cgroup: Path
    cni: CniSandbox
    ip: str = ""

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    @property
    def netns_path(self) -> str:
        return self.cni.netns


class Kubelet:
    """kubelet and the container runtime of every sandbox node, for pods made through
    the API (see the module docstring)."""

    def __init__(self, sb: Sandbox, api: KubeApiServer, tmp: Path) -> None:
        self.sb = sb
        self.api = api
        self.tmp = tmp
        self.pods: dict[str, KubePod] = {}
        self.env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
        self.runtimes: dict[str, Runtime] = {}
        for node in sb.topology.nodes:
            self.runtimes[node.name] = self._runtime(node.name, node.pod_cidr, node.bridge_ip)

    def _runtime(self, node: str, cidr: str, gateway: str) -> Runtime:
        base = self.tmp / node
        bin_dir, conf_dir = base / "bin", base / "net.d"
        bin_dir.mkdir(parents=True)
        conf_dir.mkdir()
        for plugin in ("bridge", "host-local", "loopback"):
            os.symlink(f"/usr/lib/cni/{plugin}", bin_dir / plugin)
        prefix = cidr.rsplit(".", 1)[0]
        conflist = conf_dir / "10-sandbox.conflist"
        conflist.write_text(json.dumps({
            "cniVersion": "1.0.0",
            "name": "sandbox",
            "plugins": [{
                "type": "bridge",
                "bridge": "cbr0",  # the node's own bridge, made by the sandbox
                "isGateway": True,
                "ipMasq": False,
                "ipam": {
                    "type": "host-local",
                    "ranges": [[{"subnet": cidr, "rangeStart": f"{prefix}.{FIRST_IP}",
                                 "rangeEnd": f"{prefix}.{LAST_IP}", "gateway": gateway}]],
                    "routes": [{"dst": "0.0.0.0/0"}],
                    "dataDir": str(base / "ipam"),
                },
            }],
        }))
        install.install(bin_dir, conf_dir, self.sb.agent_socket(node), python=sys.executable,
                        timeout=20, log_level="info")
        return Runtime(json.loads(conflist.read_text()), bin_dir, self.sb.node_netns(node),
                       self.env)

    def run_pod(self, name: str, node: str, *, labels: dict[str, str],
                service_account: str, namespace: str = "default") -> KubePod:
        """Create the Pod through the API and start it (network only: no container runs
        until ``exec``); returns once ADD returned and the status says Running."""
        self._placement(name, namespace).write_text(json.dumps({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": namespace},
            "spec": {"nodeName": node, "serviceAccountName": service_account,
                     "containers": [{"name": "app", "image": "registry.local/app:1"}]}}))
        time.sleep(CA_RELOAD)
        created = self.api.create(pending_pod(name, node, labels, service_account, namespace))
        uid = str(created["metadata"]["uid"])
        ns = pod_netns(namespace, name)
        # named as kubelet's systemd driver names it: nodeagent-cni finds it by the uid
        cgroup = (self.sb.cgroup_root / CGROUP_SUBTREE / "pods" / node
                  / f"kubepods-besteffort-pod{uid.replace('-', '_')}.slice")
        cgroup.mkdir(parents=True)
        path = netns_add(ns)
        pod = self.pods[name] = KubePod(
            name, namespace, node, uid, ns, cgroup,
            CniSandbox(name=name, namespace=namespace, uid=uid,
                       container_id=uuid.uuid4().hex, netns=path))
        run = self.runtimes[node].add(pod.cni)
        if not run.ok:
            raise AssertionError(f"CNI ADD of {pod.key} failed: "
                                 + "\n".join(f"{e.plugin}: rc {e.rc} {e.out} {e.err}"
                                             for e in pod.cni.log))
        assert pod.cni.result is not None
        pod.ip = str(pod.cni.result["ips"][0]["address"]).split("/")[0]
        status = running_pod(name, ip=pod.ip, node=node)["status"]
        status["hostIP"] = self.sb.node_ip(node)
        self.api.patch(created, {"status": status})
        self._write_etc(pod)
        return pod

    def _placement(self, name: str, namespace: str) -> Path:
        return Path(self.sb.config_dir) / f"kubelet-{namespace}-{name}.yaml"

    def _write_etc(self, pod: KubePod) -> None:
        """The pod's hosts and resolv.conf, as the sandbox writes them (``ip netns exec``
        mounts them): its own name and every Service's names at its clusterIP."""
        lines = ["127.0.0.1\tlocalhost", f"{pod.ip}\t{pod.name}"]
        for key, svc in sorted(self.api.store.objects.items()):
            ip = (svc.get("spec") or {}).get("clusterIP")
            if key[1] != "services" or not ip or ip == "None":
                continue
            n, ns = svc["metadata"]["name"], svc["metadata"]["namespace"]
            names = [f"{n}.{ns}", f"{n}.{ns}.svc", f"{n}.{ns}.svc.cluster.local"]
            lines.append(f"{ip}\t{' '.join(([n] if ns == pod.namespace else []) + names)}")
        d = Path(ETC_NETNS_DIR) / pod.netns
        d.mkdir(parents=True, exist_ok=True)
        (d / "hosts").write_text("\n".join(lines) + "\n")
        (d / "resolv.conf").write_text(f"search {pod.namespace}.svc.cluster.local "
                                       "svc.cluster.local cluster.local\nnameserver 127.0.0.1\n")

    def exec(self, name: str, argv: list[str], timeout: float = 30
             ) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` as a container of the pod: in its cgroup and netns."""
        pod = self.pods[name]
        return subprocess.run(processes.launcher(pod.cgroup, argv, netns=pod.netns),
                              capture_output=True, text=True, timeout=timeout, env=self.env)

    def nat_rules(self, name: str) -> str:
        return nat_rules(self.pods[name].netns_path)

    def delete_pod(self, name: str) -> list[str]:
        """Delete the Pod through the API, then tear its sandbox down as the runtime does
        (CNI DEL, last plugin first); the failures of DEL (none: empty)."""
        pod = self.pods[name]
        self.api.delete({"apiVersion": "v1", "kind": "Pod",
                         "metadata": {"name": pod.name, "namespace": pod.namespace}})
        runs = self.runtimes[pod.node].delete(pod.cni)
        return [f"{r.plugin}: rc {r.rc} {r.out} {r.err}" for r in runs if not r.ok]

    def remove(self, name: str) -> None:
        """The pod's netns, files and cgroup (after ``delete_pod``, or instead of it)."""
        pod = self.pods.pop(name)
        self._placement(pod.name, pod.namespace).unlink(missing_ok=True)
        netns_del(pod.netns)
        remove_etc_netns(pod.netns)
        with contextlib.suppress(OSError):
            pod.cgroup.rmdir()

    def close(self) -> None:
        """Whatever is left: DEL for pods still there (best effort), their netns, files."""
        for name, pod in list(self.pods.items()):
            with contextlib.suppress(Exception):
                self.runtimes[pod.node].delete(pod.cni)
            self.remove(name)
        shutil.rmtree(self.tmp, ignore_errors=True)
