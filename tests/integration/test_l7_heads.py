"""The request head an application gets through the L7 path of both nodes' proxies
(``test_proxy_loopback.Rig``): the fields it reads (names in any case, values trimmed)
are the client's, without hop-by-hop ones or those ``Connection`` names, with ``Expect``
answered by the proxy, the authority of an absolute-form target as ``Host``, a route's
header operations applied, then the mesh's own (trace context, request id,
``x-forwarded-proto``); the response head the client gets has the app's fields, then
the route's. A head no operation edits goes on as it came."""

from __future__ import annotations

import asyncio
import re

import pytest
from test_proxy_loopback import HTTP_PORT, SERVER_IP, SERVICE_IP, Rig, run

ROUTE = """
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: echo, namespace: default}
spec:
  hosts: [echo.default.svc.cluster.local]
  http:
  - name: heads
    match: [{uri: {prefix: /}}]
%s    route: [{destination: {host: echo.default.svc.cluster.local, port: {number: 80}}}]
"""
OPS = """    headers:
      request: {set: {x-set: one}, add: {x-add: two}, remove: [x-gone]}
      response: {set: {x-resp: r}}
"""
RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX-App:  1\r\n\r\nok"

REQUESTS = [
    b"GET /a HTTP/1.1\r\nHost: echo\r\nUser-Agent: t\r\nX-Gone: 1\r\nX-Set: 0\r\n\r\n",
    b"GET /b HTTP/1.1\r\nHOST:echo\r\nX-Sp:  a b \r\nAccept: */*\r\n\r\n",
    b"GET /c HTTP/1.1\r\nHost: echo\r\nConnection: keep-alive, x-hop\r\nX-Hop: 1\r\n"
    b"Keep-Alive: 5\r\nTE: trailers\r\nX-Keep: 1\r\n\r\n",
    b"PUT /d HTTP/1.1\r\nHost: echo\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\nhi",
    b"POST /e HTTP/1.1\r\nHost: echo\r\nContent-Length: 2\r\nX-A: 1\r\n\r\nhi",
    b"GET http://echo/f?q=1 HTTP/1.1\r\nHost: other\r\nX-A: 1\r\n\r\n",
]
IDS = ("traceparent", "x-request-id")


async def heads_seen(rig: Rig, route: str) -> tuple[list[bytes], list[bytes]]:
    """The heads the app gets for ``REQUESTS``, sent on one keep-alive connection, and
    the heads of the responses the client gets (the app answers ``RESPONSE``)."""
    seen: list[bytes] = []
    answers: list[bytes] = []

    async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        try:
            while head := await r.readuntil(b"\r\n\r\n"):
                seen.append(head)
                if m := re.search(rb"(?i)\r\ncontent-length: *(\d+)", head):
                    await r.readexactly(int(m.group(1)))
                w.write(RESPONSE)
                await w.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        w.close()

    app = await asyncio.start_server(handle, "127.0.0.1", 0)
    rig.net.apps[(SERVER_IP, HTTP_PORT)] = app.sockets[0].getsockname()[:2]
    rig.apply(route)
    r, w = await rig.connect((SERVICE_IP, 80))
    for request in REQUESTS:
        w.write(request)
        while (head := await r.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 100"):
            pass
        assert head.startswith(b"HTTP/1.1 200"), head
        answers.append(head)
        assert await r.readexactly(2) == b"ok"
    w.close()
    app.close()
    return seen, answers


def fields(head: bytes) -> list[tuple[str, str]]:
    """The head's request line and fields as an application reads them (ids masked)."""
    line, *lines = head.decode("latin-1").split("\r\n")
    out = [("", line)]
    for name, _, value in (x.partition(":") for x in lines if x):
        low = name.lower()
        out.append((low, "*" if low in IDS else value.strip(" \t")))
    return out


MESH = [("traceparent", "*"), ("x-request-id", "*"), ("x-forwarded-proto", "http")]
OPS_FIELDS = [("x-set", "one"), ("x-add", "two")]
CLIENT = [
    [("", "GET /a HTTP/1.1"), ("host", "echo"), ("user-agent", "t")],
    [("", "GET /b HTTP/1.1"), ("host", "echo"), ("x-sp", "a b"), ("accept", "*/*")],
    [("", "GET /c HTTP/1.1"), ("host", "echo"), ("x-keep", "1")],
    [("", "PUT /d HTTP/1.1"), ("host", "echo"), ("content-length", "2")],
    [("", "POST /e HTTP/1.1"), ("host", "echo"), ("content-length", "2"), ("x-a", "1")],
    [("", "GET /f?q=1 HTTP/1.1"), ("host", "echo"), ("x-a", "1")],
]
"""What the app reads of each of ``REQUESTS`` (before the mesh's fields), as it did when
every head was rebuilt from its fields; the route without operations adds ``X-Gone``
and ``X-Set`` of the first one back."""


@pytest.mark.parametrize("mtls", [False, True], ids=["plain", "hbone"])
@pytest.mark.parametrize("ops", [False, True], ids=["no header ops", "header ops"])
def test_the_app_reads_the_clients_fields_and_the_meshs(ops: bool, mtls: bool) -> None:
    async def body(rig: Rig) -> None:
        seen, answers = await heads_seen(rig, ROUTE % (OPS if ops else ""))
        expected = [[*c, *MESH, *(OPS_FIELDS if ops else ())] for c in CLIENT]
        if not ops:
            expected[0][3:3] = [("x-gone", "1"), ("x-set", "0")]
        assert [fields(h) for h in seen] == expected
        # unedited heads keep the client's lines; the others are rebuilt, lower-case
        if ops:
            assert seen[0].startswith(b"GET /a HTTP/1.1\r\nhost: echo\r\nuser-agent: t\r\n")
        else:
            assert seen[0].startswith(REQUESTS[0][:-2])
            assert seen[1].startswith(REQUESTS[1][:-2])
        assert seen[2].startswith(b"GET /c HTTP/1.1\r\nhost: echo\r\nx-keep: 1\r\n")
        assert seen[5].startswith(b"GET /f?q=1 HTTP/1.1\r\nhost: echo\r\nx-a: 1\r\n")
        # the client reads the app's fields, then the route's; they came as the app sent
        # them when the route has no operation on responses
        app = [("content-length", "2"), ("x-app", "1")]
        assert [fields(h)[1:] for h in answers] == [
            [*app, *([("x-resp", "r")] if ops else [])]
        ] * len(REQUESTS)
        if not ops:
            assert answers == [RESPONSE[:-2]] * len(REQUESTS)

    run(mtls, body)
