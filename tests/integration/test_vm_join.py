"""``nodeagent vm join`` end to end: the real command, the real CA, a real CA client.

A mesh config with a WorkloadGroup and a pod on node1, a CA directory and its node
tokens file. ``nodeagent vm join`` (a subprocess, as a person runs it) writes a VM's
files; then ``nodeagent ca serve`` (TLS on loopback) runs with that tokens file and
config, and ``CaClient`` presents the written token, trusting the written root: the
WorkloadEntry's identity is signed, another identity is refused, another node's token
gets nothing of the VM's. The written entry loads with the config and sits on the VM's
node. Every error of the command names what is wrong and writes nothing.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import uvloop
import yaml
from cryptography import x509

from nodeagent.cli import main
from nodeagent.control.files import load_directory
from nodeagent.identity.ca import TRUST_BUNDLE, init_ca, workload_csr
from nodeagent.identity.ca_client import CaClient, CaRefused
from nodeagent.identity.vmjoin import set_node_token

RATINGS_ID = "spiffe://cluster.local/ns/default/sa/ratings"
CLIENT_ID = "spiffe://cluster.local/ns/default/sa/client"

GROUP = """apiVersion: networking.istio.io/v1
kind: WorkloadGroup
metadata: {name: ratings, namespace: default}
spec:
  metadata:
    labels: {app: ratings, version: vm}
  template:
    serviceAccount: ratings
    ports: {http: 9080}
---
apiVersion: networking.istio.io/v1
kind: WorkloadGroup
metadata: {name: reviews, namespace: shop}
spec:
  template: {serviceAccount: reviews}
---
apiVersion: v1
kind: Service
metadata: {name: ratings, namespace: default}
spec:
  clusterIP: 10.96.8.10
  selector: {app: ratings}
  ports: [{name: http, port: 9080}]
---
apiVersion: v1
kind: Pod
metadata: {name: client, namespace: default}
spec:
  nodeName: node1
  serviceAccountName: client
  containers: [{name: app, image: sample}]
"""


@dataclass
class Mesh:
    root: Path
    config: Path
    ca_dir: Path
    tokens: Path

    @property
    def out(self) -> Path:
        return self.root / "vm-1"

    def argv(self, **overrides: str) -> list[str]:
        flags = {
            "--config": str(self.config),
            "--group": "ratings",
            "--name": "vm-1",
            "--address": "192.168.121.10",
            "--ca-tokens": str(self.tokens),
            "--trust-bundle": str(self.ca_dir / TRUST_BUNDLE),
            "--ca-address": "127.0.0.1:15012",
            "-o": str(self.out),
        }
        flags.update(overrides)
        out = ["vm", "join"]
        for k, v in flags.items():
            out += [k, v]
        return out


@pytest.fixture
def mesh() -> Iterator[Mesh]:
    root = Path(tempfile.mkdtemp(prefix="na-vmjoin-", dir="/tmp"))
    try:
        config = root / "mesh"
        config.mkdir()
        (config / "mesh.yaml").write_text(GROUP)
        tokens = root / "tokens.json"
        tokens.write_text(json.dumps({"node1": "t0k3n-node1"}))
        os.chmod(tokens, 0o600)
        yield Mesh(root, config, init_ca(root / "ca"), tokens)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def nodeagent(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "nodeagent", *argv], capture_output=True, text=True, timeout=60
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class CaProcess:
    """``nodeagent ca serve`` with node tokens, TLS on a loopback port."""

    def __init__(self, mesh: Mesh) -> None:
        self.addr = f"127.0.0.1:{free_port()}"
        self.log = mesh.root / "ca.log"
        argv = [sys.executable, "-m", "nodeagent", "ca", "serve", "--dir", str(mesh.ca_dir)]
        argv += ["--listen", self.addr, "--tls-name", "127.0.0.1"]
        argv += ["--config", str(mesh.config), "--tokens", str(mesh.tokens)]
        with self.log.open("w") as err:
            self.proc = subprocess.Popen(argv, stderr=err)
        deadline = time.monotonic() + 15
        while "listening on" not in self.log.read_text():
            assert self.proc.poll() is None, self.log.read_text()
            assert time.monotonic() < deadline, "the CA did not start"
            time.sleep(0.05)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def sign(addr: str, token_file: Path, trust_bundle: Path, identity: str) -> str:
    """The URI SAN the CA signs for ``identity``, or ``CA refused: …``."""

    async def body() -> str:
        client = CaClient(addr, str(token_file), 5.0, trust_bundle=str(trust_bundle))
        try:
            chain = await client.sign(workload_csr(identity)[0], 600)
        except CaRefused as e:
            return str(e)
        finally:
            await client.close()
        san = x509.load_pem_x509_certificate(chain[0]).extensions.get_extension_for_class(
            x509.SubjectAlternativeName
        )
        return str(san.value.get_values_for_type(x509.UniformResourceIdentifier)[0])

    return uvloop.run(body())


def test_a_joined_vm_gets_its_entry_identity_and_nothing_else(mesh: Mesh) -> None:
    done = nodeagent(*mesh.argv(), "--apply")
    assert done.returncode == 0, done.stderr
    assert f"WorkloadEntry default/ratings-vm-1 on node vm-1: identity {RATINGS_ID}" in done.stdout
    out = mesh.out
    assert sorted(p.name for p in out.iterdir()) == [
        "nodeagent.env",
        "root-cert.pem",
        "token",
        "workloadentry.yaml",
    ]
    token = (out / "token").read_text().strip()
    assert stat.S_IMODE((out / "token").stat().st_mode) == 0o600
    assert stat.S_IMODE(mesh.tokens.stat().st_mode) == 0o600
    assert json.loads(mesh.tokens.read_text()) == {"node1": "t0k3n-node1", "vm-1": token}
    assert (out / "root-cert.pem").read_bytes() == (mesh.ca_dir / TRUST_BUNDLE).read_bytes()
    env = (out / "nodeagent.env").read_text()
    assert (
        'NODEAGENT_OPTS="--node vm-1 --redirect auto --ca-addr 127.0.0.1:15012 '
        '--ca-token-file /etc/nodeagent/token --trust-bundle /etc/nodeagent/root-cert.pem"\n'
    ) in env
    entry = yaml.safe_load((out / "workloadentry.yaml").read_text())
    assert entry == {
        "apiVersion": "networking.istio.io/v1",
        "kind": "WorkloadEntry",
        "metadata": {
            "name": "ratings-vm-1",
            "namespace": "default",
            "labels": {"app": "ratings", "version": "vm"},
            "annotations": {"nodeagent.io/node": "vm-1"},
        },
        "spec": {
            "address": "192.168.121.10",
            "labels": {"app": "ratings", "version": "vm"},
            "serviceAccount": "ratings",
            "ports": {"http": 9080},
        },
    }
    # --apply put it into the config: it loads there, on vm-1, an endpoint of ratings
    snap = load_directory(mesh.config).snapshot
    (placed,) = snap.workload_entries_on_node("vm-1")
    assert (placed.key, placed.pod_ip, placed.identity()) == (
        "default/ratings-vm-1",
        "192.168.121.10",
        RATINGS_ID,
    )
    assert snap.workload_entries_on_node("node1") == ()

    ca = CaProcess(mesh)
    try:
        bundle = out / "root-cert.pem"
        assert sign(ca.addr, out / "token", bundle, RATINGS_ID) == RATINGS_ID
        assert sign(ca.addr, out / "token", bundle, CLIENT_ID) == (
            f"CA refused: node vm-1 asked for {CLIENT_ID}, which no pod or WorkloadEntry on "
            "vm-1 runs as"
        )
        node1 = mesh.root / "node1.token"
        node1.write_text("t0k3n-node1\n")
        assert sign(ca.addr, node1, bundle, CLIENT_ID) == CLIENT_ID
        assert sign(ca.addr, node1, bundle, RATINGS_ID) == (
            f"CA refused: node node1 asked for {RATINGS_ID}, which no pod or WorkloadEntry on "
            "node1 runs as"
        )
        # joining again gives a new token; the CA takes it, and the old one is refused
        old = mesh.root / "old.token"
        shutil.copy(out / "token", old)
        again = nodeagent(*mesh.argv(), "--apply", "--force")
        assert again.returncode == 0, again.stderr
        assert "its old token no longer works" in again.stdout
        assert (out / "token").read_text() != old.read_text()
        assert sign(ca.addr, out / "token", bundle, RATINGS_ID) == RATINGS_ID
        assert sign(ca.addr, old, bundle, RATINGS_ID).startswith(
            "CA refused: unauthenticated: the node token matches no node"
        )
    finally:
        ca.stop()
    assert f"CA signed {RATINGS_ID} for node vm-1" in ca.log.read_text()


def test_without_apply_the_entry_is_written_but_not_placed(mesh: Mesh) -> None:
    done = nodeagent(*mesh.argv())
    assert done.returncode == 0, done.stderr
    assert "not applied" in done.stdout
    assert sorted(p.name for p in mesh.config.iterdir()) == ["mesh.yaml"]
    assert load_directory(mesh.config).snapshot.workload_entries == ()
    # what was written is what the mesh loads, once put into the config
    shutil.copy(mesh.out / "workloadentry.yaml", mesh.config / "vm-1.yaml")
    (placed,) = load_directory(mesh.config).snapshot.workload_entries_on_node("vm-1")
    assert placed.identity() == RATINGS_ID


def join_error(mesh: Mesh, capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    """Run the command in this process; its one error line (and check nothing changed)."""
    tokens_before = mesh.tokens.read_bytes() if mesh.tokens.exists() else b""
    config_before = sorted(p.name for p in mesh.config.iterdir())
    assert main(list(argv)) == 1
    captured = capsys.readouterr()
    assert captured.out == "" and "Traceback" not in captured.err
    assert (mesh.tokens.read_bytes() if mesh.tokens.exists() else b"") == tokens_before
    assert sorted(p.name for p in mesh.config.iterdir()) == config_before
    lines = captured.err.strip().splitlines()
    assert lines[0].startswith("nodeagent vm join: error: ")
    return captured.err.strip().removeprefix("nodeagent vm join: error: ")


def test_an_unknown_group_names_the_groups_there(
    mesh: Mesh, capsys: pytest.CaptureFixture[str]
) -> None:
    assert join_error(mesh, capsys, *mesh.argv(**{"--group": "details"})) == (
        f"no WorkloadGroup default/details in {mesh.config} "
        "(WorkloadGroups there: default/ratings, shop/reviews)"
    )
    assert not mesh.out.exists()


def test_a_group_template_with_an_address_is_refused(
    mesh: Mesh, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = mesh.config / "bad.yaml"
    bad.write_text(
        "apiVersion: networking.istio.io/v1\nkind: WorkloadGroup\n"
        "metadata: {name: fixed, namespace: default}\n"
        "spec: {template: {address: 10.1.2.3, serviceAccount: fixed}}\n"
    )
    why = join_error(mesh, capsys, *mesh.argv(**{"--group": "fixed"}))
    assert why.startswith(f"the mesh config in {mesh.config} does not load: ")
    assert (
        f"{bad}: WorkloadGroup default/fixed: spec.template.address: each VM brings its own "
        "address: leave it out"
    ) in why


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (
            {"--address": "192.168.121"},
            "--address '192.168.121' is not an IP address (the VM's address the mesh dials, "
            "e.g. 192.168.121.10)",
        ),
        (
            {"--name": "VM_1"},
            "--name 'VM_1': a node name is a DNS name (lowercase letters, digits, '-' and "
            "'.'), the name the VM's agent runs with (`nodeagent run --node`)",
        ),
        (
            {"--ca-address": "ca.example"},
            "--ca-address 'ca.example': expected HOST:PORT (TLS, verified with the trust "
            "bundle), e.g. 10.0.0.1:15012, or unix:PATH",
        ),
        (
            {"--trust-bundle": "/nonexistent/root.pem"},
            "--trust-bundle: cannot read /nonexistent/root.pem: [Errno 2] No such file or "
            "directory: '/nonexistent/root.pem'",
        ),
    ],
)
def test_bad_flags_are_named(
    mesh: Mesh, capsys: pytest.CaptureFixture[str], flags: dict[str, str], message: str
) -> None:
    assert join_error(mesh, capsys, *mesh.argv(**flags)) == message
    assert not mesh.out.exists()


def test_an_unreadable_or_malformed_tokens_file_is_named(
    mesh: Mesh, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = mesh.root / "nope.json"
    assert join_error(mesh, capsys, *mesh.argv(**{"--ca-tokens": str(missing)})) == (
        f"--ca-tokens: cannot read the node tokens file {missing}: [Errno 2] No such file or "
        f"directory: '{missing}'"
    )
    mesh.tokens.write_text('["node1"]')
    assert join_error(mesh, capsys, *mesh.argv()) == (
        f'--ca-tokens: node tokens file {mesh.tokens}: expected {{"<node>": "<token>", ...}} '
        "with non-empty strings"
    )
    assert not mesh.out.exists()


def test_a_full_output_directory_needs_force(
    mesh: Mesh, capsys: pytest.CaptureFixture[str]
) -> None:
    mesh.out.mkdir()
    (mesh.out / "notes.txt").write_text("mine")
    assert join_error(mesh, capsys, *mesh.argv()) == (
        f"-o {mesh.out}: the directory is not empty (--force writes into it)"
    )
    assert main([*mesh.argv(), "--force"]) == 0
    assert (mesh.out / "notes.txt").read_text() == "mine"
    assert (mesh.out / "token").exists()


def test_apply_refuses_an_entry_of_that_name_written_elsewhere(
    mesh: Mesh, capsys: pytest.CaptureFixture[str]
) -> None:
    other = mesh.config / "vms.yaml"
    other.write_text(
        "apiVersion: networking.istio.io/v1\nkind: WorkloadEntry\n"
        "metadata: {name: ratings-vm-1, namespace: default}\n"
        "spec: {address: 192.168.121.99, serviceAccount: ratings}\n"
    )
    assert join_error(mesh, capsys, *mesh.argv(), "--apply") == (
        f"WorkloadEntry default/ratings-vm-1 is already in {other}: remove it there, or "
        "leave --apply out and apply the written entry yourself"
    )


def test_concurrent_token_writes_keep_every_token(mesh: Mesh) -> None:
    """Joins at once each add their node: the tokens file is locked while rewritten."""
    barrier = threading.Barrier(8)

    def writer(i: int) -> None:
        barrier.wait()
        for j in range(25):
            set_node_token(mesh.tokens, f"vm-{i}-{j}", f"token-{i}-{j}")

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    tokens = json.loads(mesh.tokens.read_text())
    assert len(tokens) == 1 + 8 * 25
    assert tokens["vm-7-24"] == "token-7-24" and tokens["node1"] == "t0k3n-node1"
    assert stat.S_IMODE(mesh.tokens.stat().st_mode) == 0o600
    assert [p.name for p in mesh.root.iterdir() if p.name.startswith(".tokens")] == []


def test_apply_never_overwrites_other_objects(
    mesh: Mesh, capsys: pytest.CaptureFixture[str]
) -> None:
    target = mesh.config / "workloadentry-default-ratings-vm-1.yaml"
    target.write_text(
        "apiVersion: v1\nkind: Service\nmetadata: {name: other, namespace: default}\n"
        "spec: {clusterIP: 10.96.8.11, ports: [{name: http, port: 80}]}\n"
    )
    assert join_error(mesh, capsys, *mesh.argv(), "--apply") == (
        f"{target} holds other objects than the WorkloadEntry default/ratings-vm-1: --apply "
        "would overwrite them; move them to another file"
    )
    assert "kind: Service" in target.read_text()
