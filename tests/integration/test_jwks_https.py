"""``https://`` jwksUri: keys fetched from a real HTTPS server on loopback whose certificate
a test CA signed, verified against a given bundle or the system trust store (here
``SSL_CERT_FILE``, which OpenSSL reads as the system store), and the host name. Through the
real proxy, a token signed by the served key is accepted; when the server's certificate
is not trusted its tokens get 401 and the reason is the URL's state."""

from __future__ import annotations

import asyncio
import ssl
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from kubeauth import make_tls
from test_proxy_loopback import SERVICE_IP, Rig, run

from nodeagent.control.authn import check_jwks_uri
from nodeagent.model.snapshot import MeshSnapshot
from nodeagent.proxy.jwks import JwksCache
from nodeagent.samples.jwtmint import generate_key, mint

EMPTY = MeshSnapshot.build(version=1, pods=(), services=())
ISSUER = "https://issuer.example"


class KeyServer:
    """An HTTPS server on 127.0.0.1 serving one JWKS at /jwks.json."""

    def __init__(self, tls: ssl.SSLContext, jwks: str) -> None:
        self.tls, self.jwks, self.seen = tls, jwks.encode(), 0
        self.server: asyncio.Server | None = None

    async def start(self) -> int:
        async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            try:
                head = await r.readuntil(b"\r\n\r\n")
            except (asyncio.IncompleteReadError, ConnectionError, ssl.SSLError):
                w.close()
                return
            self.seen += 1
            assert head.startswith(b"GET /jwks.json HTTP/1.1\r\n"), head
            w.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n" % len(self.jwks) + self.jwks)
            await w.drain()
            w.close()

        self.server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=self.tls)
        return int(self.server.sockets[0].getsockname()[1])

    def close(self) -> None:
        if self.server is not None:
            self.server.close()


@pytest.fixture
def tmp() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="na-jwks-") as d:
        yield Path(d)


def _tls(where: Path, host: str = "127.0.0.1") -> tuple[Path, ssl.SSLContext]:
    """A fresh CA (its bundle file) and a server context for ``host`` and localhost."""
    where.mkdir()
    ca_pem, ctx = make_tls(where, host)
    bundle = where / "ca.pem"
    bundle.write_bytes(ca_pem)
    return bundle, ctx


async def _settle(cache: JwksCache, uri: str) -> str:
    for _ in range(500):
        if cache._remote[uri].task is None:
            return cache.state()[uri]
        await asyncio.sleep(0.01)
    raise AssertionError(f"{uri}: still fetching")


def test_https_jwks_uri_is_valid_config() -> None:
    assert check_jwks_uri("https://issuer.example/.well-known/jwks.json") is None
    assert check_jwks_uri("https:///jwks.json") == "'https:///jwks.json': an https URI needs a host"


def test_keys_come_over_verified_tls_only(tmp: Path) -> None:
    _, jwks = generate_key("ES256", "k1")
    bundle, tls = _tls(tmp / "good")
    _, other_tls = _tls(tmp / "other", host="127.0.0.2")  # names 127.0.0.2 and localhost

    async def main() -> None:
        good, other = KeyServer(tls, jwks), KeyServer(other_tls, jwks)
        port, other_port = await good.start(), await other.start()
        try:
            trusted = JwksCache(lambda: EMPTY, str(bundle))
            uri = f"https://localhost:{port}/jwks.json"
            trusted.uri(uri, ISSUER)
            assert await _settle(trusted, uri) == "1 key(s)"
            assert [k.kid for k in trusted.uri(uri, ISSUER).keys] == ["k1"]

            system = JwksCache(lambda: EMPTY)  # the system store does not hold the test CA
            system.uri(uri, ISSUER)
            state = await _settle(system, uri)
            assert state.startswith(
                f"no keys; last fetch failed: the certificate of localhost:{port} is not "
                "trusted (self-signed certificate in certificate chain) by the system trust store"
            ), state

            # the right CA, the wrong name: the certificate names 127.0.0.2, not 127.0.0.1
            wrong_name = f"https://127.0.0.1:{other_port}/jwks.json"
            other_ca = JwksCache(lambda: EMPTY, str(tmp / "other" / "ca.pem"))
            other_ca.uri(wrong_name, ISSUER)
            state = await _settle(other_ca, wrong_name)
            assert "is not trusted (IP address mismatch" in state, state
            assert other.seen == 0 and good.seen == 1  # no request went to a refused server
        finally:
            good.close()
            other.close()

    asyncio.run(main())


def _policy(port: int) -> str:
    return f"""
    apiVersion: security.istio.io/v1
    kind: RequestAuthentication
    metadata: {{name: echo-jwt, namespace: default}}
    spec:
      selector: {{matchLabels: {{app: echo}}}}
      jwtRules:
      - issuer: {ISSUER}
        jwksUri: https://localhost:{port}/jwks.json
    """


async def _get(rig: Rig, token: str) -> bytes:
    r, w = await rig.connect((SERVICE_IP, 80))
    w.write(
        b"GET /hi HTTP/1.1\r\nhost: echo.default\r\nconnection: close\r\n"
        b"authorization: Bearer %s\r\n\r\n" % token.encode()
    )
    response = await r.read()
    w.close()
    return response


@pytest.mark.parametrize("trusted", [True, False])
def test_tokens_of_an_https_jwks_through_the_proxy(
    tmp: Path, monkeypatch: pytest.MonkeyPatch, trusted: bool
) -> None:
    key, jwks = generate_key("ES256", "k1")
    bundle, tls = _tls(tmp / "idp")
    rogue_bundle, _ = _tls(tmp / "rogue")
    # what the agent's system trust store holds: the IdP's CA, or another one
    monkeypatch.setenv("SSL_CERT_FILE", str(bundle if trusted else rogue_bundle))
    token = mint(key, "ES256", "k1", {"iss": ISSUER, "sub": "alice", "exp": time.time() + 600})

    async def body(rig: Rig) -> None:
        idp = KeyServer(tls, jwks)
        port = await idp.start()
        try:
            rig.apply(_policy(port))
            uri = f"https://localhost:{port}/jwks.json"
            state = await _settle(rig.proxies["node2"].admission.jwks, uri)
            response = await _get(rig, token)
            if trusted:
                assert state == "1 key(s)"
                assert response.startswith(b"HTTP/1.1 200"), response
                assert response.endswith(b"hello from server: /hi")
            else:
                assert "is not trusted (certificate signature failure)" in state  # same CA name
                assert response.startswith(b"HTTP/1.1 401"), response
                assert idp.seen == 0
        finally:
            idp.close()

    run(False, body)


def test_an_unreadable_jwks_ca_bundle_stops_the_agent_at_start(tmp: Path) -> None:
    (tmp / "mesh").mkdir()
    bundle = tmp / "not-pem.txt"
    bundle.write_text("not a certificate\n")
    argv = [sys.executable, "-m", "nodeagent", "run", "--node", "node1"]
    argv += ["--config", str(tmp / "mesh"), "--socket", str(tmp / "agent.sock")]
    p = subprocess.run([*argv, "--jwks-ca-bundle", str(bundle)], capture_output=True, text=True)
    assert p.returncode == 1, p.stderr
    assert f"nodeagent run: --jwks-ca-bundle {bundle}: " in p.stderr
    assert "Traceback" not in p.stderr
