"""Request targets an attacker chooses, against the real two-node ``Proxy`` on loopback
(``test_proxy_loopback.Rig``): a DENY on ``/admin*`` must hold whatever form the target
takes (absolute-form in any scheme case, dot segments, backslashes, escapes), and what
the app receives is the normalized origin-form path. Bytes on a socket, as an attacker
sends them; the app records every request line it gets."""

from __future__ import annotations

import asyncio
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import h2.config
import h2.connection
import h2.events
import pytest
import uvloop
from test_proxy_loopback import HTTP_PORT, INBOUND_PORT, SERVER_IP, SERVICE_IP, Rig

from nodeagent.samples.jwtmint import generate_key, mint

DENY_ADMIN = """
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: no-admin, namespace: default}
spec:
  selector: {matchLabels: {app: echo}}
  action: DENY
  rules:
  - to: [{operation: {paths: ["/admin*"]}}]
"""

EXAMPLE = Path(__file__).parents[2] / "examples/bookinfo-policy/details-admin-jwt.yaml"


def bookinfo_admin_policy(jwks_file: Path) -> str:
    """The example's rules, on the echo app, with its keys in ``jwks_file``."""
    text = EXAMPLE.read_text().replace("{app: details}", "{app: echo}")
    return text.replace("/tmp/bookinfo-jwks.json", str(jwks_file))


H2_SERVICE_IP, H2_APP_PORT = "10.96.0.21", 8081
H2_SERVICE = f"""
apiVersion: v1
kind: Service
metadata: {{name: echo-h2, namespace: default}}
spec:
  selector: {{app: echo}}
  clusterIP: {H2_SERVICE_IP}
  ports:
  - {{name: http2, port: 81, targetPort: {H2_APP_PORT}, appProtocol: http2}}
"""


class TargetRig(Rig):
    """The loopback rig with an app that records each request line it is sent."""

    async def start(self) -> None:
        (self.dir / "h2.yaml").write_text(H2_SERVICE)
        self.snap = self._load()
        await super().start()
        self.http.close()
        self.seen: list[bytes] = []

        async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            try:
                while head := await r.readuntil(b"\r\n\r\n"):
                    line = head.split(b"\r\n", 1)[0]
                    self.seen.append(line)
                    path = [*line.split(b" ", 2), b"?"][1]  # (an h2 preface too)
                    body = b"served " + path
                    w.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body))
                    await w.drain()
            except (asyncio.IncompleteReadError, ConnectionError):
                pass
            w.close()

        self.http = await asyncio.start_server(handle, "127.0.0.1", 0)
        self.net.apps[(SERVER_IP, HTTP_PORT)] = self.http.sockets[0].getsockname()[:2]
        self.net.apps[(SERVER_IP, H2_APP_PORT)] = self.net.apps[(SERVER_IP, HTTP_PORT)]

    async def direct(
        self, port: int = HTTP_PORT
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """A client outside the mesh dials the server pod: node2's inbound listener."""
        listener = self.net.listeners[(SERVER_IP, INBOUND_PORT)]
        return await asyncio.open_connection(sock=await self.net.dial(listener, (SERVER_IP, port)))


def run_rig(mtls: bool, body: Callable[[TargetRig], Awaitable[None]]) -> None:
    """``test_proxy_loopback.run`` with the recording app."""

    async def main() -> None:
        with tempfile.TemporaryDirectory(prefix="na-target-") as tmp:
            rig = TargetRig(Path(tmp), mtls)
            await rig.start()
            try:
                await asyncio.wait_for(body(rig), 15)
            finally:
                await rig.close()

    uvloop.run(main())


async def exchange(
    conn: tuple[asyncio.StreamReader, asyncio.StreamWriter], request: bytes
) -> tuple[int, bytes]:
    r, w = conn
    w.write(request)
    response = await r.read()
    w.close()
    head, _, content = response.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), content


ABSOLUTE = [
    b"GET http://echo/admin HTTP/1.1\r\nhost: echo\r\nconnection: close\r\n\r\n",
    b"GET HTTP://echo/admin HTTP/1.1\r\nhost: echo\r\nconnection: close\r\n\r\n",
    b"GET hTtP://echo:80/admin/x?y=1 HTTP/1.1\r\nhost: echo\r\nconnection: close\r\n\r\n",
    b"GET https://echo/admin HTTP/1.1\r\nhost: echo\r\nconnection: close\r\n\r\n",
    b"GET http://other/./admin HTTP/1.1\r\nhost: echo\r\nconnection: close\r\n\r\n",
    b"GET /x/..\\admin HTTP/1.1\r\nhost: echo\r\nconnection: close\r\n\r\n",
    b"GET /%61dmin HTTP/1.1\r\nhost: echo\r\nconnection: close\r\n\r\n",
]


@pytest.mark.parametrize("request_bytes", ABSOLUTE, ids=lambda b: b.split(b" ")[1].decode())
@pytest.mark.parametrize("where", ["through the mesh", "from outside the mesh"])
def test_a_deny_on_admin_holds_for_any_form_of_target(request_bytes: bytes, where: str) -> None:
    async def body(rig: TargetRig) -> None:
        rig.apply(DENY_ADMIN)
        if where == "through the mesh":
            conn = await rig.connect((SERVICE_IP, 80))
        else:
            conn = await rig.direct()
        status, _ = await exchange(conn, request_bytes)
        assert status == 403
        assert rig.seen == []  # the app never saw it

    run_rig(True, body)


@pytest.mark.parametrize("where", ["through the mesh", "from outside the mesh"])
def test_the_app_gets_the_normalized_origin_form(where: str) -> None:
    async def body(rig: TargetRig) -> None:
        rig.apply(DENY_ADMIN)
        if where == "through the mesh":
            conn = await rig.connect((SERVICE_IP, 80))
        else:
            conn = await rig.direct()
        target = b"hTTp://echo/a/./b\\c/../%7e?q=/../x"
        req = b"GET %s HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n" % target
        status, content = await exchange(conn, req)
        assert (status, content) == (200, b"served /a/b/~?q=/../x")
        assert rig.seen == [b"GET /a/b/~?q=/../x HTTP/1.1"]

    run_rig(True, body)


def test_the_bookinfo_admin_policy_is_not_bypassed_by_absolute_form() -> None:
    async def body(rig: TargetRig) -> None:
        pem, jwks = generate_key("ES256")
        (rig.tmp / "jwks.json").write_text(jwks)
        rig.apply(bookinfo_admin_policy(rig.tmp / "jwks.json"))
        close = b"\r\nhost: echo\r\nconnection: close\r\n\r\n"
        for target in (b"http://echo/admin", b"HTTP://echo/admin/users", b"/admin", b"/x/../admin"):
            status, _ = await exchange(await rig.direct(), b"GET %s HTTP/1.1%s" % (target, close))
            assert status == 403, target
        status, _ = await exchange(await rig.direct(), b"GET http://echo/public HTTP/1.1" + close)
        assert status == 200
        claims = {
            "iss": "https://issuer.bookinfo.example",
            "sub": "ops",
            "aud": "details",
            "groups": ["admin"],
            "exp": int(time.time()) + 600,
        }
        token = mint(pem, "ES256", "key-1", claims).encode()
        req = b"GET hTtP://echo/admin HTTP/1.1\r\nauthorization: Bearer %s%s" % (token, close)
        status, _ = await exchange(await rig.direct(), req)
        assert status == 200
        assert rig.seen == [b"GET /public HTTP/1.1", b"GET /admin HTTP/1.1"]

    run_rig(True, body)


@pytest.mark.parametrize(
    ("mode", "target", "status", "app_sees"),
    [
        ("BASE", "//admin", 200, "//admin"),  # Istio's default leaves runs of slashes
        ("MERGE_SLASHES", "//admin", 403, None),
        ("MERGE_SLASHES", "http://echo/x/..//admin", 403, None),
        ("MERGE_SLASHES", "/%2fadmin", 200, "/%2Fadmin"),
        ("DECODE_AND_MERGE_SLASHES", "/%2fadmin", 403, None),
        ("DECODE_AND_MERGE_SLASHES", "/x%2F..%5Cadmin", 403, None),
        ("DECODE_AND_MERGE_SLASHES", "/a%2f%2Fb", 200, "/a/b"),
        ("NONE", "/x/../admin", 200, "/x/../admin"),
        ("NONE", "http://echo/admin", 403, None),  # still origin-form
    ],
)
def test_the_mesh_option_decides_what_policy_and_app_see(
    mode: str, target: str, status: int, app_sees: str | None
) -> None:
    async def body(rig: TargetRig) -> None:
        rig.apply(DENY_ADMIN)
        for node in ("node1", "node2"):  # what ``run --path-normalization`` sets
            rig.proxies[node].l7.path_normalization = mode
        for conn in (await rig.connect((SERVICE_IP, 80)), await rig.direct()):
            req = b"GET %s HTTP/1.1\r\nhost: echo\r\nconnection: close\r\n\r\n"
            assert (await exchange(conn, req % target.encode()))[0] == status
        want = [] if app_sees is None else [f"GET {app_sees} HTTP/1.1".encode()] * 2
        assert rig.seen == want

    run_rig(True, body)


BAD_TARGETS = [
    b"GET admin HTTP/1.1",
    b"GET * HTTP/1.1",
    b"GET ftp://echo/admin HTTP/1.1",
    b"GET http:///admin HTTP/1.1",
    b"GET http://user@echo/admin HTTP/1.1",
    b"GET /adm%00in HTTP/1.1",
    b"GET /adm%zzin HTTP/1.1",
    b"CONNECT echo:80 HTTP/1.1",
]


@pytest.mark.parametrize("line", BAD_TARGETS, ids=lambda b: b.decode())
def test_other_request_targets_are_400_before_any_policy_or_app(line: bytes) -> None:
    async def body(rig: TargetRig) -> None:
        rig.apply(DENY_ADMIN)
        for conn in (await rig.connect((SERVICE_IP, 80)), await rig.direct()):
            status, _ = await exchange(conn, line + b"\r\nhost: echo\r\nconnection: close\r\n\r\n")
            assert status == 400
        assert rig.seen == []

    run_rig(True, body)


def test_options_asterisk_is_allowed_through() -> None:
    async def body(rig: TargetRig) -> None:
        rig.apply(DENY_ADMIN)
        req = b"OPTIONS * HTTP/1.1\r\nhost: echo\r\nconnection: close\r\n\r\n"
        status, _ = await exchange(await rig.direct(), req)
        assert status == 200
        assert rig.seen == [b"OPTIONS * HTTP/1.1"]

    run_rig(True, body)


async def h2_request(
    conn: tuple[asyncio.StreamReader, asyncio.StreamWriter], headers: list[tuple[str, str]]
) -> int:
    """One HTTP/2 request (prior knowledge) with exactly these header fields: its status,
    or 0 when the stream was reset or the connection closed."""
    r, w = conn
    cfg = h2.config.H2Configuration(
        client_side=True, validate_outbound_headers=False, normalize_outbound_headers=False
    )
    c = h2.connection.H2Connection(cfg)
    c.initiate_connection()
    c.send_headers(1, headers, end_stream=True)
    try:
        w.write(c.data_to_send())
        while data := await r.read(65536):
            for ev in c.receive_data(data):
                if isinstance(ev, h2.events.ResponseReceived):
                    return int(dict(ev.headers)[b":status"])
                if isinstance(ev, h2.events.StreamReset):
                    return 0
            w.write(c.data_to_send())
        return 0
    finally:
        w.close()


H2_TARGETS = [
    ("GET", "http://echo/admin"),
    ("GET", "HTTP://echo/admin"),
    ("GET", "admin"),
    ("GET", "*"),
    ("GET", "/adm%00in"),
]


@pytest.mark.parametrize(("method", "path"), H2_TARGETS)
@pytest.mark.parametrize("where", ["through the mesh", "from outside the mesh"])
def test_http2_paths_not_in_origin_form_are_refused(method: str, path: str, where: str) -> None:
    async def body(rig: TargetRig) -> None:
        rig.apply(DENY_ADMIN)
        if where == "through the mesh":
            conn = await rig.connect((H2_SERVICE_IP, 81))
        else:
            conn = await rig.direct(H2_APP_PORT)
        hdrs = [(":method", method), (":scheme", "http"), (":authority", "echo"), (":path", path)]
        assert await h2_request(conn, hdrs) == 400
        assert rig.seen == []

    run_rig(True, body)


@pytest.mark.parametrize("where", ["through the mesh", "from outside the mesh"])
def test_http2_connect_on_an_http_port_is_refused(where: str) -> None:
    async def body(rig: TargetRig) -> None:
        rig.apply(DENY_ADMIN)
        if where == "through the mesh":
            conn = await rig.connect((H2_SERVICE_IP, 81))
        else:
            conn = await rig.direct(H2_APP_PORT)
        assert await h2_request(conn, [(":method", "CONNECT"), (":authority", "echo:80")]) == 400
        assert rig.seen == []

    run_rig(True, body)


@pytest.mark.parametrize("path", ["/admin", "/x/..\\admin", "/./%61dmin", "/public/../admin"])
def test_http2_admin_is_denied_in_any_spelling(path: str) -> None:
    async def body(rig: TargetRig) -> None:
        rig.apply(DENY_ADMIN)
        for conn in (await rig.connect((H2_SERVICE_IP, 81)), await rig.direct(H2_APP_PORT)):
            hdrs = [(":method", "GET"), (":scheme", "http"), (":authority", "e"), (":path", path)]
            assert await h2_request(conn, hdrs) == 403
        assert rig.seen == []

    run_rig(True, body)
