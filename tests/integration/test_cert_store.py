"""The agent's certificate store against a real CA server (gRPC on a UNIX socket, uvloop).

Renewal at half-life with a short lifetime, the CA going away and coming back (the old
certificate stays in use; ``status()`` says the CA is unreachable), shared concurrent
requests, forgetting identities, and a trust bundle with two roots used for a real
TLS 1.3 handshake between certificates of two different CAs.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import ssl
import tempfile
import time
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc.aio
import pytest
import uvloop
from cryptography import x509
from cryptography.x509.verification import PolicyBuilder, Store

from nodeagent.errors import PeerError
from nodeagent.identity import tls
from nodeagent.identity.ca import ROOT_CERT, TRUST_BUNDLE, CertificateAuthority, init_ca
from nodeagent.identity.ca_client import CaClient
from nodeagent.identity.ca_server import (
    NodeTokenAuthenticator,
    PlacementAuthorizer,
    start_ca_server,
)
from nodeagent.identity.store import CertificateStore
from nodeagent.identity.tls import WorkloadCert

CLIENT_ID = "spiffe://cluster.local/ns/default/sa/client"
SERVER_ID = "spiffe://cluster.local/ns/default/sa/server"

PODS = """apiVersion: v1
kind: Pod
metadata: {name: client, namespace: default}
spec:
  nodeName: node1
  serviceAccountName: client
  containers: [{name: app, image: sample}]
---
apiVersion: v1
kind: Pod
metadata: {name: server, namespace: default}
spec:
  nodeName: node2
  serviceAccountName: server
  containers: [{name: app, image: sample}]
"""


@dataclass
class Mesh:
    root: Path
    ca_dir: Path
    config: Path
    tokens: Path

    @property
    def bundle(self) -> str:
        return str(self.ca_dir / TRUST_BUNDLE)

    def socket(self, name: str = "ca") -> str:
        return str(self.root / f"{name}.sock")

    def client(self, node: str, name: str = "ca") -> CaClient:
        return CaClient(f"unix:{self.socket(name)}", str(self.root / f"{node}.token"), 2.0)

    async def start(self, ca_dir: Path | None = None, name: str = "ca") -> grpc.aio.Server:
        ca = CertificateAuthority.load(ca_dir or self.ca_dir, min_ttl_seconds=1)
        return await start_ca_server(
            ca,
            f"unix:{self.socket(name)}",
            NodeTokenAuthenticator(self.tokens),
            PlacementAuthorizer(self.config),
        )


@pytest.fixture
def mesh() -> Iterator[Mesh]:
    root = Path(tempfile.mkdtemp(prefix="na-cs-", dir="/tmp"))
    try:
        config = root / "mesh"
        config.mkdir()
        (config / "pods.yaml").write_text(PODS)
        tokens = root / "tokens.json"
        tokens.write_text(json.dumps({"node1": "tok-1", "node2": "tok-2"}))
        tokens.chmod(0o600)
        (root / "node1.token").write_text("tok-1")
        (root / "node2.token").write_text("tok-2")
        yield Mesh(root, init_ca(root / "ca"), config, tokens)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def run(body: Callable[[], Coroutine[Any, Any, None]]) -> None:
    uvloop.run(body())


async def until(predicate: Callable[[], bool], timeout: float, what: str) -> float:
    """Wait for ``predicate``; the seconds it took."""
    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.02)
    return time.monotonic() - start


def serial(store: CertificateStore, identity: str) -> str:
    cert = store.cached(identity)
    return cert.serial if cert else ""


def test_renews_at_half_life(mesh: Mesh) -> None:
    async def body() -> None:
        server = await mesh.start()
        client = mesh.client("node1")
        store = CertificateStore(client, "cluster.local", 4.0, mesh.bundle)
        rotated: list[WorkloadCert] = []
        store.on_rotate.append(rotated.append)
        runner = asyncio.get_running_loop().create_task(store.run())
        try:
            t0 = time.monotonic()
            first = await store.get(CLIENT_ID)
            assert store.cached(CLIENT_ID) is first
            # X.509 times have whole seconds: the CA's now + 4 s loses up to 1 s.
            assert 2.8 < first.not_after - time.time() <= 4.0
            assert b"BEGIN PRIVATE KEY" in first.key_pem
            assert first.chain_pem.count(b"BEGIN CERTIFICATE") == 1  # the root is not in it
            desc = store.describe()[0]
            assert desc["identity"] == CLIENT_ID and desc["serial"] == first.serial
            assert desc["state"] == "valid"
            assert 1.2 < desc["renews_in_seconds"] < 2.3  # (3..4 s) x 0.5 x (1 +- 10 %)
            leaf, root = desc["chain"]
            assert leaf["uris"] == [CLIENT_ID] and leaf["subject"] == ""
            assert leaf["issuer"] == root["subject"] == root["issuer"]
            assert root["serial"] == format(
                x509.load_pem_x509_certificate(
                    (mesh.ca_dir / ROOT_CERT).read_bytes()
                ).serial_number,
                "x",
            )
            await until(lambda: serial(store, CLIENT_ID) != first.serial, 4.0, "a renewal")
            elapsed = time.monotonic() - t0
            assert 1.3 < elapsed < 2.7, elapsed
            second = store.cached(CLIENT_ID)
            assert second is not None and second.not_after > first.not_after
            assert [c.serial for c in rotated] == [first.serial, second.serial]
            status = store.status()
            assert status["state"] == "reachable" and status["reachable"] is True
            assert status["address"] == f"unix:{mesh.socket()}"
            assert status["last_error"] == ""
            assert time.time() < status["next_renewal_at"] < second.not_after
        finally:
            runner.cancel()
            await client.close()
            await server.stop(None)

    run(body)


def test_ca_down_keeps_the_old_certificate_and_recovers(mesh: Mesh) -> None:
    async def body() -> None:
        server = await mesh.start()
        client = mesh.client("node1")
        store = CertificateStore(client, "cluster.local", 6.0, mesh.bundle)
        runner = asyncio.get_running_loop().create_task(store.run())
        try:
            first = await store.get(CLIENT_ID)
            await server.stop(None)
            await until(lambda: store.status()["state"] == "unreachable", 5.0, "a failed renewal")
            status = store.status()
            assert status["reachable"] is False
            assert status["last_error"].startswith(f"CA at unix:{mesh.socket()} unreachable")
            assert 0 < status["unreachable_since"] <= time.time()
            assert store.cached(CLIENT_ID) is first  # still valid: still served
            assert await store.get(CLIENT_ID) is first
            desc = store.describe()[0]
            assert desc["state"] == "renewing" and "unreachable" in desc["last_error"]
            assert 0 < desc["renews_in_seconds"] <= 1.0  # the first retry comes after 1 s
            server = await mesh.start()
            await until(lambda: serial(store, CLIENT_ID) != first.serial, 3.0, "recovery")
            assert time.time() < first.not_after  # renewed before the old one expired
            status = store.status()
            assert status["state"] == "reachable" and status["unreachable_since"] == 0
            assert store.describe()[0]["state"] == "valid"
        finally:
            runner.cancel()
            await client.close()
            await server.stop(None)

    run(body)


class CountingSigner:
    """The real CA client, counting its requests."""

    def __init__(self, client: CaClient) -> None:
        self.client = client
        self.calls = 0

    async def sign(self, csr_pem: bytes, ttl_seconds: int) -> list[bytes]:
        self.calls += 1
        return await self.client.sign(csr_pem, ttl_seconds)


def test_shared_requests_refusals_and_forgetting(mesh: Mesh) -> None:
    async def body() -> None:
        server = await mesh.start()
        client = mesh.client("node1")
        signer = CountingSigner(client)
        store = CertificateStore(signer, "cluster.local", 600.0, mesh.bundle)
        try:
            certs = await asyncio.gather(*(store.get(CLIENT_ID) for _ in range(5)))
            assert signer.calls == 1 and all(c is certs[0] for c in certs)
            errors = await store.ensure({CLIENT_ID, SERVER_ID})
            assert signer.calls == 2  # only the missing one was asked for
            assert list(errors) == [SERVER_ID]
            assert "which no pod or WorkloadEntry on node1 runs as" in errors[SERVER_ID]
            by_id = {d["identity"]: d for d in store.describe()}
            assert by_id[SERVER_ID]["state"] == "pending"
            assert by_id[SERVER_ID]["last_error"].startswith("CA refused: node node1 asked")
            status = store.status()
            assert status["state"] == "reachable" and "CA refused" in status["last_error"]
            with pytest.raises(PeerError, match="retrying in"):
                await store.get(SERVER_ID)  # backoff: not asked again at once
            assert signer.calls == 2
            assert await store.ensure({CLIENT_ID}) == {}
            assert store.identities() == [CLIENT_ID]
            assert store.cached(SERVER_ID) is None
        finally:
            await client.close()
            await server.stop(None)

    run(body)


async def handshake(
    server_cert: WorkloadCert,
    server_bundle: bytes,
    client_cert: WorkloadCert,
    client_bundle: bytes,
) -> tuple[str | None, str | None]:
    """A TLS 1.3 connection on loopback: (identity the client saw, identity the server saw)."""
    seen: asyncio.Future[str | None] = asyncio.get_running_loop().create_future()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        seen.set_result(tls.peer_identity(writer.get_extra_info("ssl_object")))
        writer.write(b"ok")
        await writer.drain()
        writer.close()

    srv = await asyncio.start_server(
        handle, "127.0.0.1", 0, ssl=tls.server_context(server_cert, server_bundle)
    )
    port = srv.sockets[0].getsockname()[1]
    try:
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", port, ssl=tls.client_context(client_cert, client_bundle)
        )
        ssl_object = writer.get_extra_info("ssl_object")
        assert ssl_object.version() == "TLSv1.3"
        client_saw = tls.peer_identity(ssl_object)
        assert await reader.read() == b"ok"
        writer.close()
        return client_saw, await asyncio.wait_for(seen, 5)
    finally:
        srv.close()


def test_a_bundle_with_two_roots(mesh: Mesh) -> None:
    other_dir = init_ca(mesh.root / "ca-b")
    root_a = (mesh.ca_dir / ROOT_CERT).read_bytes()
    root_b = (other_dir / ROOT_CERT).read_bytes()
    only_a = mesh.root / "only-a.pem"
    only_a.write_bytes(root_a)
    both = mesh.root / "both.pem"
    both.write_bytes(root_a)

    async def body() -> None:
        server_a = await mesh.start()
        server_b = await mesh.start(other_dir, "ca-b")
        client_a, client_b = mesh.client("node1"), mesh.client("node2", "ca-b")
        try:
            store_a = CertificateStore(client_a, "cluster.local", 600.0, str(both))
            assert store_a.trust_bundle() == root_a
            with both.open("ab") as f:  # the operator adds the new root: rotation begins
                f.write(root_b)
            assert x509.load_pem_x509_certificates(store_a.trust_bundle()) == [
                x509.load_pem_x509_certificate(root_a),
                x509.load_pem_x509_certificate(root_b),
            ]
            store_b = CertificateStore(client_b, "cluster.local", 600.0, str(both))
            cert_a = await store_a.get(CLIENT_ID)
            cert_b = await store_b.get(SERVER_ID)
            bundle = store_a.trust_bundle()
            roots = x509.load_pem_x509_certificates(bundle)
            for cert in (cert_a, cert_b):
                chain = x509.load_pem_x509_certificates(cert.chain_pem)
                verifier = PolicyBuilder().store(Store(roots)).build_client_verifier()
                verifier.verify(chain[0], chain[1:])
            # A certificate from either CA is accepted by the other side.
            assert await handshake(cert_b, bundle, cert_a, bundle) == (SERVER_ID, CLIENT_ID)
            assert await handshake(cert_a, bundle, cert_b, bundle) == (CLIENT_ID, SERVER_ID)
            # Without root B in its bundle, a client refuses B's certificate...
            with pytest.raises(ssl.SSLError, match="certificate verify failed"):
                await handshake(cert_b, bundle, cert_a, root_a)
            # ...and a store refuses a chain that does not lead to its bundle.
            store_c = CertificateStore(
                mesh.client("node2", "ca-b"), "cluster.local", 60.0, str(only_a)
            )
            with pytest.raises(PeerError, match="not signed by a root of the trust bundle"):
                await store_c.get(SERVER_ID)
        finally:
            await client_a.close()
            await client_b.close()
            await server_a.stop(None)
            await server_b.stop(None)

    run(body)
