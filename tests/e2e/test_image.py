"""The image of deploy/daemonset/Containerfile runs the agent as the DaemonSet does: built
by build-image.sh, started privileged in the host's network and PID namespaces with the
DaemonSet's host mounts and arguments, ready on :15021, answering ``nodeagent ctl status``
through the mounted socket from outside and from inside the container, compiled hot path
and eBPF capture loaded, and stopping cleanly on SIGTERM.

Opt-in (``NODEAGENT_IMAGE_TEST=1``): a build from scratch takes 3.5 to 8 minutes on two
CPUs, a cached one 5 s; the tests then take about 10 s. The container is podman's where
podman can start one; where it cannot (crun refuses a hybrid cgroup v1/v2 host), the same
rootfs is entered as a privileged container is: a mount namespace with the host's /proc,
/sys and /dev, the DaemonSet's hostPath mounts, a cgroup of its own, chroot. Config comes
from a file directory here (no API server): the DaemonSet's ``--source kubernetes`` and
CA flags are replaced."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import tomllib
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy" / "daemonset"
IMAGE = os.environ.get("NODEAGENT_IMAGE", "localhost/nodeagent:dev")
BUILD_TIMEOUT = 1200

pytestmark = [pytest.mark.privileged, pytest.mark.image]
"""Deselected unless NODEAGENT_IMAGE_TEST=1 (tests/conftest.py): the first build takes
~8 min, so the image is its own opt-in tier, not a privileged test skipped in CI."""

MESH = """\
apiVersion: v1
kind: Service
metadata: {name: web, namespace: default}
spec:
  selector: {app: web}
  ports: [{name: http, port: 80, targetPort: 8080}]
---
apiVersion: v1
kind: Pod
metadata: {name: web-1, namespace: default, labels: {app: web}}
spec:
  nodeName: another-node
  containers: [{name: web, image: web}]
"""


def agent_container() -> tuple[dict[str, Any], dict[str, Any]]:
    doc = yaml.safe_load((DEPLOY / "daemonset.yaml").read_text())
    spec = doc["spec"]["template"]["spec"]
    (c,) = [c for c in spec["containers"] if c["name"] == "nodeagent"]
    return spec, c


def host_mounts(tmp: Path) -> list[tuple[str, str, str]]:
    """(host path, container path, propagation) of the agent container's hostPath volumes;
    the agent's own directories are moved to ``tmp`` so the host's agent is not disturbed."""
    spec, c = agent_container()
    volumes = {v["name"]: v for v in spec["volumes"]}
    own = {"/run/nodeagent": tmp / "run", "/var/lib/nodeagent": tmp / "state"}
    out = []
    for m in c["volumeMounts"]:
        vol = volumes[m["name"]]
        if "hostPath" not in vol:
            continue  # the trust bundle and the CA token: no CA here
        host = str(own.get(vol["hostPath"]["path"], vol["hostPath"]["path"]))
        Path(host).mkdir(parents=True, exist_ok=True)
        out.append((host, m["mountPath"], m.get("mountPropagation", "None")))
    return out


REPLACED = ("--source", "--ca-addr", "--trust-bundle", "--ca-token-file")
"""No API server and no CA here: a file config instead."""
PENDING = {"--source", "--pid-file"}
"""Flags of the DaemonSet that an image built from a tree without them may lack."""


def agent_args(node: str, known: str) -> list[str]:
    """The DaemonSet's ``nodeagent run`` arguments, with a file config for the API source
    and without the CA; ``known`` is the image's ``nodeagent run --help``."""
    _, c = agent_container()
    assert c["command"] == ["nodeagent", "run"]
    out, unknown = ["run"], set()
    for a in c["args"]:
        name = a.partition("=")[0]
        if name not in known:
            unknown.add(name)
        elif name not in REPLACED:
            out.append(f"--node={node}" if name == "--node" else a)
    assert unknown <= PENDING, f"the image's nodeagent run lacks {sorted(unknown)}"
    return [*out, "--config=/etc/nodeagent/mesh"]


def cgroup2_root() -> str:
    for d in ("/sys/fs/cgroup", "/sys/fs/cgroup/unified"):
        if os.path.exists(f"{d}/cgroup.controllers"):
            return d
    raise AssertionError("no cgroup v2 mount")


class Container:
    """The agent's container: podman's, or the image's rootfs entered as a privileged
    container would be (when podman cannot start a container on this host)."""

    def __init__(self, tmp: Path, mounts: list[tuple[str, str, str]]) -> None:
        self.tmp = tmp
        self.mounts = mounts
        self.name = f"nodeagent-imgtest-{os.getpid()}"
        self.cgroup = f"{cgroup2_root()}/{self.name}"
        self.podman = self._podman_runs()
        self.work = ""
        self.rootfs = ""
        if not self.podman:
            buildah = ["buildah", "from", "-q", IMAGE]
            self.work = subprocess.check_output(buildah, text=True).strip()
            mount = ["buildah", "mount", self.work]
            self.rootfs = subprocess.check_output(mount, text=True).strip()
        self.proc: subprocess.Popen[str] | None = None

    @staticmethod
    def _podman_runs() -> bool:
        r = subprocess.run(["podman", "run", "--rm", "--network", "host", IMAGE, "--version"],
                           capture_output=True, text=True, timeout=120)
        return r.returncode == 0

    def _enter(self, argv: list[str], own_cgroup: bool) -> list[str]:
        """The command that runs ``nodeagent ARGV`` inside the container."""
        if self.podman:
            return ["podman", "exec", self.name, "nodeagent", *argv]
        prop = {"Bidirectional": "--make-rshared", "HostToContainer": "--make-rslave"}
        lines = ["set -e", f"m={self.rootfs}"]
        if own_cgroup:  # as a container has: the agent hooks its own cgroup, never the host's
            lines += [f"mkdir -p {self.cgroup}", f"echo $$ > {self.cgroup}/cgroup.procs"]
        lines += [f"mount --rbind /{d} $m/{d}" for d in ("proc", "sys", "dev")]
        for host, path, propagation in self.mounts:
            lines += [f"mkdir -p $m{path}", f"mount --rbind {host} $m{path}"]
            if propagation in prop:
                lines.append(f"mount {prop[propagation]} $m{path}")
        lines.append('exec chroot "$m" /usr/bin/env -i PATH=/opt/nodeagent/.venv/bin:'
                     '/usr/sbin:/usr/bin:/sbin:/bin HOME=/root nodeagent "$@"')
        return ["unshare", "--mount", "--propagation", "slave",
                "sh", "-c", "\n".join(lines), "sh", *argv]

    def start(self, argv: list[str], log: Path) -> None:
        out = log.open("w")
        if self.podman:
            cmd = ["podman", "run", "--rm", "--name", self.name, "--privileged",
                   "--network", "host", "--pid", "host"]
            opt = {"Bidirectional": ":rshared", "HostToContainer": ":rslave"}
            for host, path, propagation in self.mounts:
                cmd += ["-v", f"{host}:{path}{opt.get(propagation, '')}"]
            self.proc = subprocess.Popen([*cmd, IMAGE, *argv], stdout=out, stderr=out, text=True)
        else:
            self.proc = subprocess.Popen(self._enter(argv, own_cgroup=True),
                                         stdout=out, stderr=out, text=True)

    def exec(self, argv: list[str]) -> subprocess.CompletedProcess[str]:
        """``nodeagent ARGV`` in the running container (before start: in a new one)."""
        cmd = self._enter(argv, own_cgroup=False)
        if self.podman and self.proc is None:
            cmd = ["podman", "run", "--rm", IMAGE, *argv]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=60)

    def stop(self, timeout: float) -> int | None:
        """SIGTERM, as the kubelet sends it; the exit status within ``timeout``."""
        if self.proc is None or self.proc.poll() is not None:
            return None if self.proc is None else self.proc.returncode
        if self.podman:
            subprocess.run(["podman", "kill", "--signal", "TERM", self.name],
                           capture_output=True, timeout=30)
        else:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            return None

    def remove(self) -> None:
        self.stop(10)
        if self.work:
            subprocess.run(["buildah", "rm", self.work], capture_output=True, timeout=60)
        with contextlib.suppress(OSError):
            os.rmdir(self.cgroup)


def ready(c: Container, timeout: float) -> bool:
    """The DaemonSet's readiness probe passes (False at once when the agent exited)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and c.proc is not None and c.proc.poll() is None:
        with (
            contextlib.suppress(OSError),
            urllib.request.urlopen("http://127.0.0.1:15021/healthz/ready", timeout=2) as r,
        ):
            if r.status == 200:
                return True
        time.sleep(0.5)
    return False


@pytest.fixture(scope="module")
def image() -> str:
    started = time.monotonic()
    r = subprocess.run([str(DEPLOY / "build-image.sh"), IMAGE], capture_output=True,
                       text=True, timeout=BUILD_TIMEOUT)
    assert r.returncode == 0, r.stderr[-4000:]
    print(f"image {IMAGE} built in {time.monotonic() - started:.0f}s", file=sys.stderr)
    return IMAGE


@pytest.fixture
def container(image: str, tmp_path: Path) -> Iterator[Container]:
    (tmp_path / "mesh").mkdir()
    (tmp_path / "mesh" / "mesh.yaml").write_text(MESH)
    mounts = [*host_mounts(tmp_path), (str(tmp_path / "mesh"), "/etc/nodeagent/mesh", "None")]
    c = Container(tmp_path, mounts)
    try:
        yield c
    finally:
        c.remove()


def test_the_image_has_the_compiled_hot_path_and_bcc(image: str) -> None:
    work = subprocess.check_output(["buildah", "from", "-q", image], text=True).strip()
    try:
        def run(*argv: str) -> str:
            r = subprocess.run(["buildah", "run", "--isolation", "chroot", work, "--", *argv],
                               capture_output=True, text=True, timeout=120)
            assert r.returncode == 0, r.stderr
            return r.stdout

        assert "run the agent of one node" in run("nodeagent", "--help")
        assert "compiled (" in run("nodeagent", "native", "status")
        run("python3", "-c", "import bcc")
        # the documented way to make the mesh root with the image (docs/kubernetes.md)
        run("nodeagent", "ca", "init", "--dir", "/tmp/ca")
        made = set(run("ls", "/tmp/ca").split())
        assert {"root-cert.pem", "root-key.pem", "trust-bundle.pem"} <= made
        scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
        for tool in ("bpftool", "ip", "iptables", *scripts):
            assert run("sh", "-c", f"command -v {tool} || echo missing: {tool}").startswith("/")
    finally:
        subprocess.run(["buildah", "rm", work], capture_output=True, timeout=60)


def test_the_agent_runs_from_the_image_as_the_daemonset_starts_it(
    container: Container, tmp_path: Path
) -> None:
    node = f"imgtest{os.getpid()}"
    pins = Path("/sys/fs/bpf/nodeagent") / node
    log = tmp_path / "agent.log"
    try:
        known = container.exec(["run", "--help"]).stdout
        container.start(agent_args(node, known), log)
        assert ready(container, 60), log.read_text()
        # through the mounted socket, from the host...
        socket = tmp_path / "run" / "agent.sock"
        r = subprocess.run([sys.executable, "-m", "nodeagent", "ctl", "--socket", str(socket),
                            "-o", "json", "status"], capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        status = json.loads(r.stdout)
        assert status["node"] == node and status["ready"] is True
        # ...and from inside, as `kubectl exec ds/nodeagent -- nodeagent ctl` does
        r = container.exec(["ctl", "--socket", "/run/nodeagent/agent.sock", "status"])
        assert r.returncode == 0 and "Ready:          true" in r.stdout, r.stderr
        text = log.read_text()
        assert "hot path compiled" in text, text
        if "capture: eBPF" in text:  # pins made in the container are the host's
            assert pins.is_dir()
        assert container.stop(10) == 0, log.read_text()
        assert "shutting down" in log.read_text()
    finally:
        container.stop(10)
        shutil.rmtree(pins, ignore_errors=True)  # pinned links would keep programs attached
        with contextlib.suppress(OSError):  # the pin root, when no other agent uses it
            pins.parent.rmdir()
