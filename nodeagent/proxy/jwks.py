"""JWKS key sets behind ``jwksUri``: files (re-read when they change), in-mesh
``http://`` URLs and ``https://`` URLs, fetched by the agent in the background, cached,
refreshed every ``REFRESH`` seconds and retried every ``RETRY`` seconds after a failure
(the last good set stays in use meanwhile).

An ``http://`` host is resolved from the mesh snapshot (a service name, short or fully
qualified, with the URL's port as the service port; or an IP address) and fetched with a
plain HTTP/1.1 GET from the agent's own network namespace, as istiod fetches JWKS for
Envoy: the workload serving the keys must accept plaintext (not a STRICT
PeerAuthentication). An ``https://`` host is resolved the same way when it names a mesh
service, else through DNS, and its certificate is verified against the system trust store
(or the ``--jwks-ca-bundle`` file) and the URL's host name, as istiod does for an
identity provider. Until the first fetch succeeds the set is empty and tokens for that
issuer fail (401), as in Envoy.
"""

from __future__ import annotations

import asyncio
import logging
import os
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
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
_REMOTE = ("http://", "https://")


class FetchError(Exception):
    """Why a JWKS could not be fetched (logged, retried)."""


@dataclass
class _Remote:
    keys: KeySet = field(default_factory=KeySet)
    next_try: float = 0.0
    task: asyncio.Task[None] | None = None
    error: str = ""


def _target(snap: MeshSnapshot, uri: str) -> tuple[str, int, str, str]:
    """(address, port, Host header, request target) for an ``http://`` or ``https://``
    jwksUri; an https host that is no mesh service is left to DNS."""
    parts = urlsplit(uri)
    host = parts.hostname or ""
    tls = parts.scheme == "https"
    port = parts.port or (443 if tls else 80)
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    if snap.pod_by_ip.get(host) is not None or host.replace(".", "").isdigit():
        return host, port, parts.netloc, target
    svc = snap.service_for_host(host)
    if svc is None and tls:
        return host, port, parts.netloc, target
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

    def __init__(self, snapshot: Callable[[], MeshSnapshot], ca_bundle: str = "") -> None:
        """``ca_bundle``: PEM roots to verify ``https://`` servers with; empty: the
        system trust store."""
        self.snapshot = snapshot
        self.ca_bundle = ca_bundle
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
        if uri.startswith(_REMOTE):
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

    # -- URLs ----------------------------------------------------------------------
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
            if uri.startswith(_REMOTE):
                self._remote_keys(uri)

    def status(self) -> list[dict[str, Any]]:
        """Per URL fetched: ``uri``, ``keys`` (how many) and ``last_error`` (``ctl status``)."""
        return [
            {"uri": u, "keys": len(r.keys.keys), "last_error": r.error}
            for u, r in sorted(self._remote.items())
        ]

    def state(self) -> dict[str, str]:
        """Per URL: how many keys, or the last error (``ctl explain``)."""
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
            error = str(e) or type(e).__name__
            if error != st.error:  # once per new reason, not every retry
                log.warning("jwksUri %s: fetch failed: %s (retrying every %gs)", uri, error, RETRY)
            st.error = error
            st.next_try = time.monotonic() + RETRY
        finally:
            st.task = None

    async def _fetch(self, uri: str) -> KeySet:
        ip, port, host, target = _target(self.snapshot(), uri)
        request = (
            f"GET {target} HTTP/1.1\r\nhost: {host}\r\naccept: application/json\r\n"
            "connection: close\r\nuser-agent: nodeagent-jwks\r\n\r\n"
        ).encode()
        tls = self._tls() if uri.startswith("https://") else None
        server_name = urlsplit(uri).hostname if tls is not None else None
        async with asyncio.timeout(TIMEOUT):
            try:
                reader, writer = await asyncio.open_connection(
                    ip, port, ssl=tls, server_hostname=server_name
                )
            except ssl.SSLCertVerificationError as e:
                raise FetchError(
                    f"the certificate of {host} is not trusted ({e.verify_message}) by "
                    f"{self._trust_store()}: is the right CA bundle given (--jwks-ca-bundle)?"
                ) from None
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
            where = host if host == f"{ip}:{port}" else f"{host} ({ip}:{port})"
            raise FetchError(f"{where} answered {status}")
        try:
            return jwt.parse_jwks(body.decode("utf-8"))
        except UnicodeDecodeError:
            raise FetchError("the JWKS is not UTF-8") from None

    def _trust_store(self) -> str:
        return f"the CA bundle {self.ca_bundle}" if self.ca_bundle else "the system trust store"

    def _tls(self) -> ssl.SSLContext:
        """A client context verifying the server's chain and host name; made per fetch
        (once every few minutes), so a renewed bundle file is used at the next one."""
        try:
            return ssl.create_default_context(cafile=self.ca_bundle or None)
        except (OSError, ValueError) as e:
            raise FetchError(f"cannot use {self._trust_store()}: {e}") from None
