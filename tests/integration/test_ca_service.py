"""The mesh CA's gRPC service end to end: real keys, real gRPC on a UNIX socket, uvloop.

A CA directory, a mesh config with one pod on node1 and one on node2, per-node tokens.
Checks that an agent gets its pods' identities and those of the WorkloadEntries annotated
with its node, is refused (and logged) for others, that
a bad token is UNAUTHENTICATED, that placement follows config edits, and that
``nodeagent ca serve`` stops cleanly on SIGTERM.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import pytest
import uvloop
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from nodeagent.identity import ca_pb2 as pb
from nodeagent.identity import ca_pb2_grpc as pb_grpc
from nodeagent.identity.ca import ROOT_CERT, CertificateAuthority, init_ca, workload_csr
from nodeagent.identity.ca_client import CaClient, CaRefused, CaUnreachable
from nodeagent.identity.ca_server import (
    NodeTokenAuthenticator,
    PlacementAuthorizer,
    start_ca_server,
)

CLIENT_ID = "spiffe://cluster.local/ns/default/sa/client"
SERVER_ID = "spiffe://cluster.local/ns/default/sa/server"
EXTRA_ID = "spiffe://cluster.local/ns/shop/sa/cart"


def pod_yaml(name: str, namespace: str, node: str, sa: str) -> str:
    return f"""apiVersion: v1
kind: Pod
metadata:
  name: {name}
  namespace: {namespace}
spec:
  nodeName: {node}
  serviceAccountName: {sa}
  containers:
    - name: app
      image: sample
"""


@dataclass
class Mesh:
    root: Path
    ca_dir: Path
    config: Path
    tokens: Path
    socket: str

    def token_file(self, node: str) -> str:
        return str(self.root / f"{node}.token")

    def client(self, node: str) -> CaClient:
        return CaClient(f"unix:{self.socket}", self.token_file(node), timeout=3.0)

    def authorizer(self) -> PlacementAuthorizer:
        return PlacementAuthorizer(self.config, interval=0.1)

    async def start(self, authorizer: PlacementAuthorizer | None = None) -> grpc.aio.Server:
        ca = CertificateAuthority.load(self.ca_dir, max_ttl_seconds=3600, min_ttl_seconds=1)
        return await start_ca_server(
            ca,
            f"unix:{self.socket}",
            NodeTokenAuthenticator(self.tokens),
            authorizer or self.authorizer(),
        )


@pytest.fixture
def mesh() -> Iterator[Mesh]:
    root = Path(tempfile.mkdtemp(prefix="na-ca-", dir="/tmp"))  # short: sun_path limit
    try:
        ca_dir = init_ca(root / "ca")
        config = root / "mesh"
        config.mkdir()
        (config / "pods.yaml").write_text(
            pod_yaml("client", "default", "node1", "client")
            + "---\n"
            + pod_yaml("server", "default", "node2", "server")
        )
        tokens = root / "tokens.json"
        tokens.write_text(json.dumps({"node1": "t0k3n-node1", "node2": "t0k3n-node2"}))
        os.chmod(tokens, 0o600)
        (root / "node1.token").write_text("t0k3n-node1\n")
        (root / "node2.token").write_text("t0k3n-node2\n")
        (root / "intruder.token").write_text("guess\n")
        yield Mesh(root, ca_dir, config, tokens, str(root / "run" / "ca.sock"))
    finally:
        shutil.rmtree(root, ignore_errors=True)


def run(body: Callable[[], Awaitable[None]]) -> None:
    async def main() -> None:
        assert type(asyncio.get_running_loop()).__module__.startswith("uvloop")
        await body()

    uvloop.run(main())


def csr_for(identity: str) -> tuple[bytes, ec.EllipticCurvePrivateKey]:
    return workload_csr(identity)


async def raw_call(mesh: Mesh, token: str, csr: bytes) -> grpc.StatusCode:
    """``CreateCertificate`` through the generated stub: the status code the CA answers."""
    async with grpc.aio.insecure_channel(f"unix:{mesh.socket}") as channel:
        stub: Any = pb_grpc.IstioCertificateServiceStub(channel)  # type: ignore[no-untyped-call]
        try:
            await stub.CreateCertificate(
                pb.IstioCertificateRequest(csr=csr.decode(), validity_duration=60),
                metadata=(("authorization", f"Bearer {token}"),),
                timeout=3,
            )
        except grpc.aio.AioRpcError as e:
            return e.code()
    return grpc.StatusCode.OK


def test_node_gets_its_pods_identity(mesh: Mesh) -> None:
    async def body() -> None:
        server = await mesh.start()
        client = mesh.client("node1")
        try:
            assert stat.S_IMODE(os.stat(mesh.socket).st_mode) == 0o600
            csr, key = csr_for(CLIENT_ID)
            chain = await client.sign(csr, 600)
        finally:
            await client.close()
            await server.stop(None)
        leaf, root = (x509.load_pem_x509_certificate(c) for c in chain)
        assert root == x509.load_pem_x509_certificate((mesh.ca_dir / ROOT_CERT).read_bytes())
        leaf.verify_directly_issued_by(root)
        san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert san.get_values_for_type(x509.UniformResourceIdentifier) == [CLIENT_ID]
        assert leaf.public_key() == key.public_key()
        life = leaf.not_valid_after_utc.timestamp() - time.time()
        assert 590 < life <= 600

    run(body)


def test_foreign_identity_is_refused_and_logged(
    mesh: Mesh, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="nodeagent.identity.ca_server")

    async def body() -> None:
        server = await mesh.start()
        client = mesh.client("node1")
        try:
            csr, _ = csr_for(SERVER_ID)
            with pytest.raises(CaRefused) as e:
                await client.sign(csr, 600)
            assert await raw_call(mesh, "t0k3n-node1", csr) == grpc.StatusCode.PERMISSION_DENIED
            # node2 runs the server pod: the same request from node2 is signed
            assert await raw_call(mesh, "t0k3n-node2", csr) == grpc.StatusCode.OK
        finally:
            await client.close()
            await server.stop(None)
        expected = (
            f"node node1 asked for {SERVER_ID}, which no pod or WorkloadEntry on node1 runs as"
        )
        assert str(e.value) == f"CA refused: {expected}"
        warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
        assert any(expected in r.getMessage() for r in warnings)

    run(body)


def test_bad_or_missing_token_is_unauthenticated(
    mesh: Mesh, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="nodeagent.identity.ca_server")

    async def body() -> None:
        server = await mesh.start()
        client = mesh.client("intruder")
        try:
            csr, _ = csr_for(CLIENT_ID)
            with pytest.raises(CaRefused, match="CA refused: unauthenticated: the node token"):
                await client.sign(csr, 600)
            assert await raw_call(mesh, "guess", csr) == grpc.StatusCode.UNAUTHENTICATED
            async with grpc.aio.insecure_channel(f"unix:{mesh.socket}") as channel:
                stub: Any = pb_grpc.IstioCertificateServiceStub(channel)  # type: ignore[no-untyped-call]
                with pytest.raises(grpc.aio.AioRpcError) as e:
                    await stub.CreateCertificate(pb.IstioCertificateRequest(csr=csr.decode()))
                assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
                assert "authorization: Bearer <node token>" in (e.value.details() or "")
        finally:
            await client.close()
            await server.stop(None)
        assert any("unauthenticated" in r.getMessage() for r in caplog.records)

    run(body)


def test_bad_csr_is_invalid_argument(mesh: Mesh) -> None:
    async def body() -> None:
        server = await mesh.start()
        try:
            assert await raw_call(mesh, "t0k3n-node1", b"junk") == grpc.StatusCode.INVALID_ARGUMENT
            client = mesh.client("node1")
            with pytest.raises(CaRefused, match="not a PEM certificate signing request"):
                await client.sign(b"junk", 60)
            await client.close()
        finally:
            await server.stop(None)

    run(body)


def test_placement_follows_config_edits(mesh: Mesh) -> None:
    async def body() -> None:
        authorizer = mesh.authorizer()
        server = await mesh.start(authorizer)
        client = mesh.client("node1")
        try:
            csr, _ = csr_for(EXTRA_ID)
            with pytest.raises(CaRefused, match="no pod or WorkloadEntry on node1"):
                await client.sign(csr, 60)
            (mesh.config / "shop.yaml").write_text(pod_yaml("cart", "shop", "node1", "cart"))
            await asyncio.sleep(0.3)
            assert len(await client.sign(csr, 60)) == 2
            # A broken edit keeps the last good placement.
            (mesh.config / "broken.yaml").write_text("kind: [")
            await asyncio.sleep(0.3)
            assert len(await client.sign(csr, 60)) == 2
        finally:
            await client.close()
            await server.stop(None)

    run(body)


def entry_yaml(name: str, sa: str, node: str | None, address: str) -> str:
    annotations = f"\n  annotations:\n    nodeagent.io/node: {node}" if node else ""
    return f"""apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata:
  name: {name}
  namespace: default{annotations}
spec:
  address: {address}
  serviceAccount: {sa}
"""


RATINGS_ID = "spiffe://cluster.local/ns/default/sa/ratings"
LEGACY_ID = "spiffe://cluster.local/ns/default/sa/legacy"


def test_a_workload_entry_authorizes_its_identity_for_the_node_it_names(
    mesh: Mesh, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="nodeagent.identity.ca_server")
    (mesh.config / "vms.yaml").write_text(
        entry_yaml("ratings-vm-1", "ratings", "vm-1", "192.168.121.10")
        + "---\n"
        + entry_yaml("legacy", "legacy", None, "192.168.121.20")  # no node: nobody's
    )
    mesh.tokens.write_text(
        json.dumps({"node1": "t0k3n-node1", "node2": "t0k3n-node2", "vm-1": "t0k3n-vm-1"})
    )
    (mesh.root / "vm-1.token").write_text("t0k3n-vm-1\n")

    async def body() -> None:
        server = await mesh.start()
        vm = mesh.client("vm-1")
        node1 = mesh.client("node1")
        try:
            chain = await vm.sign(csr_for(RATINGS_ID)[0], 600)
            san = x509.load_pem_x509_certificate(chain[0]).extensions.get_extension_for_class(
                x509.SubjectAlternativeName
            )
            assert san.value.get_values_for_type(x509.UniformResourceIdentifier) == [RATINGS_ID]
            refusals = []
            for client, identity in ((node1, RATINGS_ID), (vm, CLIENT_ID), (vm, LEGACY_ID)):
                with pytest.raises(CaRefused) as e:
                    await client.sign(csr_for(identity)[0], 600)
                refusals.append(str(e.value))
            csr = csr_for(LEGACY_ID)[0]
            for token in ("t0k3n-node1", "t0k3n-node2", "t0k3n-vm-1"):
                assert await raw_call(mesh, token, csr) == grpc.StatusCode.PERMISSION_DENIED
        finally:
            await vm.close()
            await node1.close()
            await server.stop(None)
        assert refusals == [
            f"CA refused: node node1 asked for {RATINGS_ID}, which no pod or WorkloadEntry "
            "on node1 runs as",
            f"CA refused: node vm-1 asked for {CLIENT_ID}, which no pod or WorkloadEntry "
            "on vm-1 runs as",
            f"CA refused: node vm-1 asked for {LEGACY_ID}, which no pod or WorkloadEntry "
            "on vm-1 runs as",
        ]
        assert any(f"node node1 asked for {RATINGS_ID}" in r.getMessage() for r in caplog.records)

    run(body)


def test_an_entry_moved_to_another_node_moves_its_identity(mesh: Mesh) -> None:
    vms = mesh.config / "vms.yaml"
    vms.write_text(entry_yaml("ratings-vm-1", "ratings", "node1", "192.168.121.10"))

    async def body() -> None:
        server = await mesh.start()
        node1, node2 = mesh.client("node1"), mesh.client("node2")
        try:
            assert len(await node1.sign(csr_for(RATINGS_ID)[0], 60)) == 2
            with pytest.raises(CaRefused, match="no pod or WorkloadEntry on node2"):
                await node2.sign(csr_for(RATINGS_ID)[0], 60)
            vms.write_text(entry_yaml("ratings-vm-1", "ratings", "node2", "192.168.121.10"))
            await asyncio.sleep(0.3)
            assert len(await node2.sign(csr_for(RATINGS_ID)[0], 60)) == 2
            with pytest.raises(CaRefused, match="no pod or WorkloadEntry on node1"):
                await node1.sign(csr_for(RATINGS_ID)[0], 60)
        finally:
            await node1.close()
            await node2.close()
            await server.stop(None)

    run(body)


def test_ca_down_is_unreachable(mesh: Mesh) -> None:
    async def body() -> None:
        client = mesh.client("node1")
        csr, _ = csr_for(CLIENT_ID)
        with pytest.raises(CaUnreachable, match=f"CA at unix:{mesh.socket} unreachable: "):
            await client.sign(csr, 60)
        server = await mesh.start()
        try:
            assert len(await client.sign(csr, 60)) == 2  # the same client recovers at once
        finally:
            await client.close()
            await server.stop(None)

    run(body)


def test_ca_serve_command_serves_and_stops_on_sigterm(mesh: Mesh) -> None:
    code = (
        "import argparse, sys\n"
        "from nodeagent.identity import cli\n"
        "p = argparse.ArgumentParser(); s = p.add_subparsers(dest='c', required=True)\n"
        "cli.add_parser(s); a = p.parse_args(sys.argv[1:]); sys.exit(a.func(a))\n"
    )
    argv = [
        sys.executable,
        "-c",
        code,
        "ca",
        "serve",
        "--dir",
        str(mesh.ca_dir),
        "--listen",
        f"unix:{mesh.socket}",
        "--config",
        str(mesh.config),
        "--tokens",
        str(mesh.tokens),
        "--max-ttl",
        "1h",
    ]
    proc = subprocess.Popen(argv, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 10
        while not os.path.exists(mesh.socket):
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            assert time.monotonic() < deadline, "the CA did not start"
            time.sleep(0.05)

        async def body() -> None:
            client = mesh.client("node1")
            csr, _ = csr_for(CLIENT_ID)
            chain = await client.sign(csr, 10**6)
            await client.close()
            leaf = x509.load_pem_x509_certificate(chain[0])
            assert leaf.not_valid_after_utc.timestamp() - time.time() <= 3600

        run(body)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    err = proc.stderr.read() if proc.stderr else ""
    assert "listening on unix:" in err
    assert f"CA signed {CLIENT_ID} for node node1" in err
    assert "CA stopping" in err
