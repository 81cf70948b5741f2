"""JWKS key sets behind ``jwksUri``: files (re-read when they change) and in-mesh
``http://`` URLs, fetched by the agent in the background, cached, refreshed every
``REFRESH`` seconds and retried every ``RETRY`` seconds after a failure (the last good
set stays in use meanwhile).

An ``http://`` host is resolved from the mesh snapshot (a service name, short or fully
qualified, with the URL's port as the service port; or an IP address) and fetched with a
plain HTTP/1.1 GET from the agent's own network namespace, as istiod fetches JWKS for
Envoy: the workload serving the keys must accept plaintext (not a STRICT
PeerAuthentication). Until the first fetch succeeds the set is empty and tokens for that
issuer fail (401), as in Envoy.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import httptools  # type: ignore[import-untyped, unused-ignore]

from nodeagent.core import jwt
from nodeagent.core.jwt import KeySet
from nodeagent.model.snapshot import MeshSnapshot

log = logging.getLogger("nodeagent.policy")

FILE_RECHECK = 5.0
"""Seconds between looks at a jwksUri file's mtime and size."""
REFRESH = 300.0
RETRY = 5.0
TIMEOUT = 5.0
MAX_BODY = 1 << 20


class FetchError(Exception):
    """Why a JWKS could not be fetched (logged, retried)."""


@dataclass
class _Remote:
    keys: KeySet = field(default_factory=KeySet)
    next_try: float = 0.0
    task: asyncio.Task[None] | None = None
    error: str = ""


def _target(snap: MeshSnapshot, uri: str) -> tuple[str, int, str, str]:
    """(ip, port, Host header, request target) for an ``http://`` jwksUri."""
    parts = urlsplit(uri)
    host = parts.hostname or ""
    port = parts.port or 80
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    if snap.pod_by_ip.get(host) is not None or host.replace(".", "").isdigit():
        return host, port, parts.netloc, target
    svc = snap.service_for_host(host)
    if svc is None:
        raise FetchError(f"{host} is not a service of the mesh")
    sp = svc.port(port)
    if sp is None:
        raise FetchError(f"service {svc.key} has no port {port}")
    eps = snap.endpoints(svc, sp)
    if not eps:
        raise FetchError(f"service {svc.key} port {port} has no ready endpoint")
    ep = eps[int(time.monotonic()) % len(eps)]
    return ep.ip, ep.port, parts.netloc, target


def parse_response(data: bytes) -> tuple[int, bytes]:
    """(status, body) of one HTTP/1.x response read until the peer closed (a body
    without length or chunking ends with the connection)."""
    body = bytearray()
    state = {"headers": False, "done": False, "framed": False}

    class _Cb:
        def on_header(self, name: bytes, value: bytes) -> None:
            if name.lower() in (b"content-length", b"transfer-encoding"):
                state["framed"] = True

        def on_headers_complete(self) -> None:
            state["headers"] = True

        def on_body(self, chunk: bytes) -> None:
            body.extend(chunk)

        def on_message_complete(self) -> None:
            state["done"] = True

    p = httptools.HttpResponseParser(_Cb())
    try:
        p.feed_data(data)
    except httptools.HttpParserError as e:
        raise FetchError(f"malformed HTTP response: {e}") from None
    if not state["done"] and not (state["headers"] and not state["framed"]):
        raise FetchError("the response ended early")
    return int(p.get_status_code()), bytes(body)


class JwksCache:
    """Key sets by ``jwksUri`` and inline JWKS text; one per agent, on its event loop."""

    def __init__(self, snapshot: Callable[[], MeshSnapshot]) -> None:
        self.snapshot = snapshot
        self._inline: dict[str, KeySet] = {}
        self._files: dict[str, tuple[float, tuple[int, int], KeySet]] = {}
        self._remote: dict[str, _Remote] = {}

    def inline(self, text: str, issuer: str) -> KeySet:
        ks = self._inline.get(text)
        if ks is None:
            try:
                ks = jwt.parse_jwks(text)
            except jwt.JwksError as e:  # validated at load: should not happen
                log.error("jwks of issuer %s: %s", issuer, e)
                ks = KeySet()
            self._inline[text] = ks
        return ks

    def uri(self, uri: str, issuer: str) -> KeySet:
        if uri.startswith("http://"):
            return self._remote_keys(uri)
        return self._file(uri.removeprefix("file://"), uri, issuer)

    def _file(self, path: str, uri: str, issuer: str) -> KeySet:
        now = time.monotonic()
        hit = self._files.get(path)
        if hit is not None and now - hit[0] < FILE_RECHECK:
            return hit[2]
        try:
            st = os.stat(path)
            sig = (st.st_mtime_ns, st.st_size)
            if hit is not None and hit[1] == sig:
                ks = hit[2]
            else:
                with open(path, encoding="utf-8") as f:
                    ks = jwt.parse_jwks(f.read())
                log.info("jwksUri %s: loaded %d key(s)", uri, len(ks.keys))
        except (OSError, UnicodeDecodeError, jwt.JwksError) as e:
            log.warning("jwksUri %s of issuer %s: %s (its tokens fail)", uri, issuer, e)
            sig, ks = (0, 0), KeySet()
        self._files[path] = (now, sig, ks)
        return ks

    # -- in-mesh URLs ----------------------------------------------------------------
    def _remote_keys(self, uri: str) -> KeySet:
        st = self._remote.get(uri)
        if st is None:
            st = self._remote[uri] = _Remote()
        if st.task is None and time.monotonic() >= st.next_try:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                return st.keys
            st.task = loop.create_task(self._refresh(uri, st))
        return st.keys

    def prefetch(self, uris: list[str]) -> None:
        """Start fetching these URLs now (a new snapshot names them)."""
        for uri in uris:
            if uri.startswith("http://"):
                self._remote_keys(uri)

    def state(self) -> dict[str, str]:
        """Per in-mesh URL: how many keys, or the last error (for ``ctl explain``)."""
        return {
            u: (f"{len(r.keys.keys)} key(s)" if r.keys.keys else "no keys")
            + (f"; last fetch failed: {r.error}" if r.error else "")
            for u, r in self._remote.items()
        }

    async def _refresh(self, uri: str, st: _Remote) -> None:
        try:
            st.keys = await self._fetch(uri)
            st.error = ""
            st.next_try = time.monotonic() + REFRESH
            log.info("jwksUri %s: fetched %d key(s)", uri, len(st.keys.keys))
        except (FetchError, OSError, TimeoutError, jwt.JwksError) as e:
            st.error = str(e) or type(e).__name__
            st.next_try = time.monotonic() + RETRY
            log.warning("jwksUri %s: fetch failed: %s (retry in %gs)", uri, st.error, RETRY)
        finally:
            st.task = None

    async def _fetch(self, uri: str) -> KeySet:
        ip, port, host, target = _target(self.snapshot(), uri)
        request = (
            f"GET {target} HTTP/1.1\r\nhost: {host}\r\naccept: application/json\r\n"
            "connection: close\r\nuser-agent: nodeagent-jwks\r\n\r\n"
        ).encode()
        async with asyncio.timeout(TIMEOUT):
            reader, writer = await asyncio.open_connection(ip, port)
            try:
                writer.write(request)
                data = bytearray()
                while len(data) <= MAX_BODY:
                    chunk = await reader.read(65536)
                    if not chunk:
                        break
                    data += chunk
            finally:
                writer.close()
        if len(data) > MAX_BODY:
            raise FetchError(f"the response is larger than {MAX_BODY} bytes")
        status, body = parse_response(bytes(data))
        if status != 200:
            raise FetchError(f"{ip}:{port} answered {status}")
        try:
            return jwt.parse_jwks(body.decode("utf-8"))
        except UnicodeDecodeError:
            raise FetchError("the JWKS is not UTF-8") from None
