"""The mesh CA over TLS on TCP: real gRPC, real TLS 1.2/1.3 handshakes on loopback, uvloop.

The CA serves a certificate it issues itself from the mesh root (SANs: the Service's DNS
names and 127.0.0.1); agents dial ``127.0.0.1:PORT`` and verify it against the trust
bundle and the expected name. Checks that an agent gets a certificate, that a CA whose
certificate comes from another root, or names another host, or does not speak TLS is
refused with a message naming the address and why, that the serving certificate is
replaced before it expires, and ``nodeagent ca serve --tls`` end to end.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc.aio
import pytest
import uvloop
from cryptography import x509

from nodeagent.admin.ctl import format_ca
from nodeagent.errors import LocalStateError
from nodeagent.identity.ca import TRUST_BUNDLE, CertificateAuthority, init_ca, workload_csr
from nodeagent.identity.ca_client import CaClient, CaUntrusted
from nodeagent.identity.ca_server import (
    NodeTokenAuthenticator,
    PlacementAuthorizer,
    start_ca_server,
)
from nodeagent.identity.ca_tls import FileServingCert, IssuedServingCert, ServingCert
from nodeagent.identity.store import CertificateStore

CLIENT_ID = "spiffe://cluster.local/ns/default/sa/client"
SERVICE_NAME = "nodeagent-ca.nodeagent-system.svc"
NAMES = (SERVICE_NAME, f"{SERVICE_NAME}.cluster.local", "127.0.0.1")

PODS = """apiVersion: v1
kind: Pod
metadata: {name: client, namespace: default}
spec:
  nodeName: node1
  serviceAccountName: client
  containers: [{name: app, image: sample}]
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@dataclass
class Mesh:
    root: Path
    ca_dir: Path
    other_ca_dir: Path
    config: Path
    tokens: Path
    port: int

    @property
    def bundle(self) -> str:
        return str(self.ca_dir / TRUST_BUNDLE)

    @property
    def addr(self) -> str:
        return f"127.0.0.1:{self.port}"

    def client(self, server_name: str = "") -> CaClient:
        return CaClient(
            self.addr,
            str(self.root / "node1.token"),
            3.0,
            trust_bundle=self.bundle,
            server_name=server_name,
        )

    def ca(self, ca_dir: Path | None = None) -> CertificateAuthority:
        return CertificateAuthority.load(ca_dir or self.ca_dir, min_ttl_seconds=1)

    async def start(self, tls: ServingCert | None) -> grpc.aio.Server:
        return await start_ca_server(
            self.ca(),
            self.addr,
            NodeTokenAuthenticator(self.tokens),
            PlacementAuthorizer(self.config),
            tls=tls,
        )


@pytest.fixture
def mesh() -> Iterator[Mesh]:
    root = Path(tempfile.mkdtemp(prefix="na-catls-", dir="/tmp"))
    try:
        config = root / "mesh"
        config.mkdir()
        (config / "pods.yaml").write_text(PODS)
        tokens = root / "tokens.json"
        tokens.write_text(json.dumps({"node1": "tok-1"}))
        tokens.chmod(0o600)
        (root / "node1.token").write_text("tok-1")
        yield Mesh(root, init_ca(root / "ca"), init_ca(root / "other"), config, tokens, free_port())
    finally:
        shutil.rmtree(root, ignore_errors=True)


def run(body: Callable[[], Awaitable[None]]) -> None:
    async def main() -> None:
        await body()

    uvloop.run(main())


def csr_for(identity: str) -> bytes:
    return workload_csr(identity)[0]


def serving_cert(mesh: Mesh, server_name: str = SERVICE_NAME) -> x509.Certificate:
    """The CA's certificate as a TLS client checking it against the bundle sees it."""
    ctx = ssl.create_default_context(cafile=mesh.bundle)
    with (
        socket.create_connection(("127.0.0.1", mesh.port), timeout=3) as raw,
        ctx.wrap_socket(raw, server_hostname=server_name) as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    assert der
    return x509.load_der_x509_certificate(der)


def test_agent_gets_a_certificate_over_tls(mesh: Mesh) -> None:
    async def body() -> None:
        server = await mesh.start(IssuedServingCert(mesh.ca(), NAMES))
        by_ip, by_name = mesh.client(), mesh.client(SERVICE_NAME)
        try:
            for client in (by_ip, by_name):
                chain = await client.sign(csr_for(CLIENT_ID), 600)
                leaf = x509.load_pem_x509_certificate(chain[0])
                san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName)
                assert san.value.get_values_for_type(x509.UniformResourceIdentifier) == [CLIENT_ID]
        finally:
            await by_ip.close()
            await by_name.close()
            await server.stop(None)

    run(body)


def test_serving_certificate_verifies_against_the_bundle_with_its_names(mesh: Mesh) -> None:
    async def body() -> None:
        server = await mesh.start(IssuedServingCert(mesh.ca(), NAMES))
        try:
            for name in NAMES:
                cert = await asyncio.to_thread(serving_cert, mesh, name)
                san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
                assert san.get_values_for_type(x509.DNSName) == list(NAMES[:2])
                assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
            with pytest.raises(ssl.SSLCertVerificationError, match="Hostname mismatch"):
                await asyncio.to_thread(serving_cert, mesh, "evil.example")
        finally:
            await server.stop(None)

    run(body)


def test_a_ca_with_a_certificate_from_another_root_is_refused(mesh: Mesh) -> None:
    async def body() -> None:
        rogue = IssuedServingCert(mesh.ca(mesh.other_ca_dir), NAMES)
        server = await mesh.start(rogue)
        client = mesh.client()
        store = CertificateStore(client, "cluster.local", 600, mesh.bundle)
        try:
            with pytest.raises(CaUntrusted) as e:
                await client.sign(csr_for(CLIENT_ID), 600)
            errors = await store.ensure([CLIENT_ID])
        finally:
            await client.close()
            await server.stop(None)
        message = str(e.value)
        assert message.startswith(f"CA at {mesh.addr} is not trusted: its certificate (CN=")
        assert f"is not signed by a root of the trust bundle {mesh.bundle}" in message
        assert "another mesh's CA" in message
        assert errors == {CLIENT_ID: message}
        line = format_ca(store.status(), time.time())
        assert line.startswith("unreachable since ")
        assert line.endswith(f": {message}")

    run(body)


def test_a_ca_certificate_for_another_name_is_refused(mesh: Mesh) -> None:
    async def body() -> None:
        server = await mesh.start(IssuedServingCert(mesh.ca(), NAMES[:2]))  # no IP SAN
        client, named = mesh.client(), mesh.client(SERVICE_NAME)
        try:
            with pytest.raises(CaUntrusted) as e:
                await client.sign(csr_for(CLIENT_ID), 600)
            assert len(await named.sign(csr_for(CLIENT_ID), 600)) == 2
        finally:
            await client.close()
            await named.close()
            await server.stop(None)
        assert str(e.value) == (
            f"CA at {mesh.addr} is not trusted: its certificate is for {', '.join(NAMES[:2])}, "
            "not 127.0.0.1 (dial it by one of those names, or set --ca-server-name)"
        )

    run(body)


def test_a_plaintext_ca_is_refused_by_a_tls_client(mesh: Mesh) -> None:
    async def body() -> None:
        server = await mesh.start(None)
        client = mesh.client()
        try:
            with pytest.raises(CaUntrusted) as e:
                await client.sign(csr_for(CLIENT_ID), 600)
        finally:
            await client.close()
            await server.stop(None)
        assert str(e.value).startswith(f"CA at {mesh.addr} is not trusted: the TLS handshake")
        assert str(e.value).endswith("does it serve TLS (`nodeagent ca serve --tls`)?")

    run(body)


def test_tcp_without_a_trust_bundle_is_refused_at_start(mesh: Mesh) -> None:
    with pytest.raises(LocalStateError) as e:
        CaClient(mesh.addr, str(mesh.root / "node1.token"))
    assert str(e.value) == (
        f"the CA at {mesh.addr} is dialled over TLS: give the trust bundle (--trust-bundle, "
        "the mesh root) to verify it with"
    )


def test_the_serving_certificate_is_replaced_at_half_life(mesh: Mesh) -> None:
    async def body() -> None:
        issued = IssuedServingCert(mesh.ca(), NAMES, lifetime_seconds=2.0)
        server = await mesh.start(issued)
        client = mesh.client()
        try:
            first = await asyncio.to_thread(serving_cert, mesh)
            await asyncio.sleep(1.1)  # past half-life: the next connection gets a new one
            second = await asyncio.to_thread(serving_cert, mesh)
            assert second.serial_number != first.serial_number
            assert second.not_valid_after_utc > first.not_valid_after_utc
            assert len(await client.sign(csr_for(CLIENT_ID), 600)) == 2
        finally:
            await client.close()
            await server.stop(None)

    run(body)


def test_a_serving_certificate_from_files_is_reread_when_they_change(mesh: Mesh) -> None:
    def write(issued: IssuedServingCert) -> None:
        key_pem, chain_pem = issued.current()
        for name, data in (("tls.key", key_pem), ("tls.crt", chain_pem)):
            tmp = mesh.root / f".{name}"
            tmp.write_bytes(data)
            tmp.replace(mesh.root / name)  # as kubelet swaps a Secret's files: atomically

    async def body() -> None:
        write(IssuedServingCert(mesh.ca(), NAMES))
        files = FileServingCert(mesh.root / "tls.crt", mesh.root / "tls.key")
        server = await mesh.start(files)
        try:
            first = await asyncio.to_thread(serving_cert, mesh)
            write(IssuedServingCert(mesh.ca(), NAMES))
            second = await asyncio.to_thread(serving_cert, mesh)
            assert second.serial_number != first.serial_number
            (mesh.root / "tls.key").write_text("junk")  # a broken edit keeps the last good one
            third = await asyncio.to_thread(serving_cert, mesh)
            assert third.serial_number == second.serial_number
        finally:
            await server.stop(None)

    run(body)


def test_ca_serve_with_tls(mesh: Mesh) -> None:
    code = (
        "import argparse, sys\n"
        "from nodeagent.identity import cli\n"
        "p = argparse.ArgumentParser(); s = p.add_subparsers(dest='c', required=True)\n"
        "cli.add_parser(s); a = p.parse_args(sys.argv[1:]); sys.exit(a.func(a))\n"
    )
    argv = [sys.executable, "-c", code, "ca", "serve", "--dir", str(mesh.ca_dir)]
    argv += ["--listen", mesh.addr, "--config", str(mesh.config), "--tokens", str(mesh.tokens)]
    argv += ["--tls-name", SERVICE_NAME, "--tls-name", "127.0.0.1"]
    log = mesh.root / "ca.log"
    with log.open("w") as err:
        proc = subprocess.Popen(argv, stderr=err, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        deadline = time.monotonic() + 10
        while "listening on" not in log.read_text():
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, "the CA did not start"
            time.sleep(0.05)

        async def body() -> None:
            client = mesh.client(SERVICE_NAME)
            try:
                assert len(await client.sign(csr_for(CLIENT_ID), 600)) == 2
            finally:
                await client.close()

        run(body)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = log.read_text()
    assert f"CA serving certificate issued for {SERVICE_NAME}, 127.0.0.1" in text
    assert f"listening on {mesh.addr} (TLS)" in text


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--tls-cert", "x.pem"], "give both --tls-cert and --tls-key, or neither"),
        (["--auth", "kubernetes"], "--config and --tokens are for --auth tokens"),
    ],
)
def test_ca_serve_rejects_bad_flag_combinations(mesh: Mesh, extra: list[str], message: str) -> None:
    argv = [sys.executable, "-m", "nodeagent", "ca", "serve", "--dir", str(mesh.ca_dir)]
    argv += ["--listen", mesh.addr, "--config", str(mesh.config), "--tokens", str(mesh.tokens)]
    p = subprocess.run([*argv, *extra], capture_output=True, text=True, timeout=30)
    assert p.returncode == 1
    assert message in p.stderr
    assert "Traceback" not in p.stderr


def test_an_agent_dialling_a_tcp_ca_without_a_bundle_does_not_start(mesh: Mesh) -> None:
    argv = [sys.executable, "-m", "nodeagent", "run", "--node", "node1"]
    argv += ["--config", str(mesh.config), "--socket", str(mesh.root / "agent.sock")]
    argv += ["--ca-addr", mesh.addr, "--ca-token-file", str(mesh.root / "node1.token")]
    p = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert p.returncode == 1
    assert p.stderr.strip().endswith(
        f"nodeagent run: the CA at {mesh.addr} is dialled over TLS: give the trust bundle "
        "(--trust-bundle, the mesh root) to verify it with"
    )


def test_an_agent_dialling_a_unix_ca_without_a_bundle_does_not_start(mesh: Mesh) -> None:
    """No trust anchor, no start: the roots a CA sends are never trusted on its word."""
    ca = f"unix:{mesh.root / 'ca.sock'}"
    argv = [sys.executable, "-m", "nodeagent", "run", "--node", "node1"]
    argv += ["--config", str(mesh.config), "--socket", str(mesh.root / "agent.sock")]
    argv += ["--ca-addr", ca, "--ca-token-file", str(mesh.root / "node1.token")]
    p = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert p.returncode == 1, p.stderr
    assert p.stderr.strip().endswith(
        f"nodeagent run: the CA at {ca} needs a trust anchor: give the trust bundle "
        "(--trust-bundle, the mesh root); without it the agent would trust whatever root "
        "the CA sends"
    )
    assert "Traceback" not in p.stderr
