"""``proxy.jwks``: key sets fetched from an HTTP server on loopback (the in-mesh jwksUri
path, with an IP host) and read from files, as the destination's admission stage uses
them."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from nodeagent.model.snapshot import MeshSnapshot
from nodeagent.proxy import jwks as jwks_mod
from nodeagent.proxy.jwks import JwksCache, parse_response
from nodeagent.samples.jwtmint import generate_key

EMPTY = MeshSnapshot.build(version=1, pods=(), services=())


async def _serve(responses: list[bytes]) -> tuple[asyncio.Server, int, list[bytes]]:
    seen: list[bytes] = []

    async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        seen.append(await r.readuntil(b"\r\n\r\n"))
        w.write(responses.pop(0) if responses else b"HTTP/1.1 500 x\r\ncontent-length: 0\r\n\r\n")
        await w.drain()
        w.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1], seen


def _ok(body: str) -> bytes:
    data = body.encode()
    return b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s" % (
        len(data),
        data,
    )


async def _settle(cache: JwksCache, uri: str) -> None:
    for _ in range(100):
        task = cache._remote[uri].task
        if task is None:
            return
        await asyncio.sleep(0.01)


def test_fetch_then_serve_from_cache_and_retry_after_failure(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _, jwks = generate_key("ES256", "k1")

    async def main() -> None:
        server, port, seen = await _serve(
            [b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n", _ok(jwks)]
        )
        monkeypatch.setattr(jwks_mod, "RETRY", 0.0)
        cache = JwksCache(lambda: EMPTY)
        uri = f"http://127.0.0.1:{port}/keys/jwks.json?x=1"
        async with server:
            assert cache.uri(uri, "iss").keys == ()  # not fetched yet: empty
            await _settle(cache, uri)
            assert "answered 404" in cache.state()[uri]
            cache.uri(uri, "iss")  # retry (RETRY is 0 here)
            await _settle(cache, uri)
            ks = cache.uri(uri, "iss")
            assert [k.kid for k in ks.keys] == ["k1"] and "1 key(s)" in cache.state()[uri]
            assert seen[-1].startswith(b"GET /keys/jwks.json?x=1 HTTP/1.1\r\n")
            assert f"host: 127.0.0.1:{port}".encode() in seen[-1]
            cache.uri(uri, "iss")  # fresh: no new request
            await asyncio.sleep(0.05)
            assert len(seen) == 2

    asyncio.run(main())


def test_unknown_mesh_host_is_an_error_not_a_crash() -> None:
    async def main() -> None:
        cache = JwksCache(lambda: EMPTY)
        uri = "http://keys.nowhere.svc.cluster.local/jwks.json"
        cache.uri(uri, "iss")
        await _settle(cache, uri)
        assert "not a service of the mesh" in cache.state()[uri]

    asyncio.run(main())


def test_file_is_reread_when_it_changes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(jwks_mod, "FILE_RECHECK", 0.0)
    _, a = generate_key("ES256", "a")
    _, b = generate_key("RS256", "b")
    path = tmp_path / "jwks.json"
    path.write_text(a)
    cache = JwksCache(lambda: EMPTY)
    assert [k.kid for k in cache.uri(f"file://{path}", "iss").keys] == ["a"]
    path.write_text(b)
    os.utime(path, ns=(1, 2_000_000_000_000_000_000))
    assert [k.kid for k in cache.uri(str(path), "iss").keys] == ["b"]
    path.write_text("not json")
    os.utime(path, ns=(1, 3_000_000_000_000_000_000))
    assert cache.uri(str(path), "iss").keys == ()  # invalid: no keys, tokens fail


@pytest.mark.parametrize(
    ("data", "ok"),
    [
        (b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n", True),
        (b"HTTP/1.0 200 OK\r\n\r\nabc", True),  # the body ends with the connection
        (b"HTTP/1.1 200 OK\r\ncontent-length: 9\r\n\r\nabc", False),  # cut short
        (b"garbage", False),
    ],
)
def test_parse_response(data: bytes, ok: bool) -> None:
    if ok:
        assert parse_response(data) == (200, b"abc")
    else:
        with pytest.raises(jwks_mod.FetchError):
            parse_response(data)
