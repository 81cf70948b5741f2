"""The mesh CA's gRPC service: Istio's ``IstioCertificateService.CreateCertificate``.

Owns who may get which certificate, and serving it (a UNIX socket or TCP, plaintext or
TLS with ``ca_tls``'s serving certificate). Each request goes through two pluggable steps
before ``CertificateAuthority.sign``:

1. **Authentication** (``Authenticator``): who is calling, as a node name, from the request
   metadata (``authorization: Bearer <token>``). ``NodeTokenAuthenticator`` checks the
   token against a JSON file of per-node tokens (the sandbox and VMs);
   ``kube_auth.ServiceAccountTokenAuthenticator`` sends the agent's projected
   ServiceAccount token to the API server's TokenReview and takes the node from it (in a
   cluster). ``authenticate`` is async for that network call.
2. **Authorization** (``Authorizer``): may that node hold that identity?
   ``PlacementAuthorizer`` allows identity X for node N only when a Pod with
   ``spec.nodeName == N``, or a WorkloadEntry annotated ``nodeagent.io/node: N`` (a VM's
   workload), runs as X, reading the mesh config directory (reloaded when it changes);
   ``kube_auth.NodePodAuthorizer`` answers the same question from the API's Pods and
   WorkloadEntries. An entry without the annotation authorizes no node.

Refusals are logged at WARNING and answered with ``UNAUTHENTICATED`` (bad credential),
``PERMISSION_DENIED`` (identity not placed on the node) or ``INVALID_ARGUMENT`` (a bad
CSR), each with a message naming the node and the identity; ``UNAVAILABLE`` when a step
cannot decide now (``BackendUnavailable``: the API server is away), so the agent retries.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import stat
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

import grpc
import grpc.aio
from google.protobuf.json_format import MessageToDict

from nodeagent.control.files import config_fingerprint, load_directory
from nodeagent.errors import ConfigError, ConfigErrors, LocalStateError, PeerError
from nodeagent.identity import ca_pb2 as pb
from nodeagent.identity import ca_pb2_grpc as pb_grpc
from nodeagent.identity.ca import (
    IMPERSONATED_IDENTITY,
    CertificateAuthority,
    CsrRejected,
    csr_identity,
)
from nodeagent.identity.ca_tls import ServingCert, server_credentials
from nodeagent.model.objects import DEFAULT_TRUST_DOMAIN
from nodeagent.unixsocket import prepare_unix_socket_path, serve_owner_only

__all__ = [
    "AuthenticationFailed",
    "Authenticator",
    "Authorizer",
    "BackendUnavailable",
    "CertificateService",
    "NodeTokenAuthenticator",
    "NotAuthorized",
    "PlacementAuthorizer",
    "read_node_tokens",
    "start_ca_server",
]

log = logging.getLogger(__name__)


class AuthenticationFailed(PeerError):
    """The caller's credential is missing or wrong (answered ``UNAUTHENTICATED``)."""


class NotAuthorized(PeerError):
    """The caller may not hold the identity it asked for (answered ``PERMISSION_DENIED``)."""


class BackendUnavailable(PeerError):
    """A step cannot decide now: what it asks (the API server) is away (``UNAVAILABLE``)."""


class Authenticator(Protocol):
    """Who is calling: the node name behind the request's credential."""

    async def authenticate(self, metadata: Mapping[str, str]) -> str:
        """The caller's node name; ``AuthenticationFailed`` when the credential is not good.

        ``metadata``: the request's gRPC metadata, keys lowercased (``authorization``…).
        """
        ...


class Authorizer(Protocol):
    """May a node hold an identity?"""

    async def authorize(self, node: str, identity: str) -> None:
        """Return when ``node`` may get a certificate for ``identity``; else ``NotAuthorized``."""
        ...


# -- node tokens ---------------------------------------------------------------------------


def bearer_token(metadata: Mapping[str, str]) -> str:
    """The token of ``authorization: Bearer <token>``; ``AuthenticationFailed`` if absent."""
    value = metadata.get("authorization", "")
    if not value:
        raise AuthenticationFailed(
            "no credential: send the metadata `authorization: Bearer <node token>`"
        )
    scheme, _, token = value.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise AuthenticationFailed("the authorization metadata must be `Bearer <node token>`")
    return token.strip()


def read_node_tokens(path: Path) -> dict[str, str]:
    """The node tokens file ``{"<node>": "<token>", ...}``; ``LocalStateError`` naming the
    file and what is wrong when it is unreadable or not of that shape."""
    try:
        text = path.read_text()
    except OSError as e:
        raise LocalStateError(f"cannot read the node tokens file {path}: {e}") from e
    try:
        data = json.loads(text)
    except ValueError as e:
        raise LocalStateError(f"node tokens file {path}: not readable JSON: {e}") from e
    if not isinstance(data, dict) or not all(
        isinstance(k, str) and k and isinstance(v, str) and v for k, v in data.items()
    ):
        raise LocalStateError(
            f'node tokens file {path}: expected {{"<node>": "<token>", ...}} with '
            "non-empty strings"
        )
    return data


class NodeTokenAuthenticator:
    """Per-node bearer tokens from a JSON file ``{"node1": "<token>", ...}``.

    The file is re-read when it changes (mtime and size), so tokens can be added or
    rotated without restarting the CA. Tokens are compared in constant time.
    """

    def __init__(self, tokens_file: str | Path) -> None:
        self.path = Path(tokens_file)
        self._tokens: dict[str, bytes] = {}
        self._stamp: tuple[int, int] | None = None
        self._reload()  # a missing or broken file is fatal at start

    def _reload(self) -> None:
        try:
            st = self.path.stat()
        except OSError as e:
            raise LocalStateError(f"cannot read the node tokens file {self.path}: {e}") from e
        stamp = (st.st_mtime_ns, st.st_size)
        if stamp == self._stamp:
            return
        tokens = read_node_tokens(self.path)
        if st.st_mode & 0o077:
            log.warning(
                "node tokens file %s is readable by others (mode %o): chmod 600 it",
                self.path,
                stat.S_IMODE(st.st_mode),
            )
        self._tokens = {node: token.encode() for node, token in tokens.items()}
        self._stamp = stamp
        log.info("node tokens loaded from %s: %d node(s)", self.path, len(self._tokens))

    def _refresh(self) -> None:
        try:
            self._reload()
        except LocalStateError as e:
            log.error("%s; keeping the %d token(s) loaded before", e, len(self._tokens))

    async def authenticate(self, metadata: Mapping[str, str]) -> str:
        token = bearer_token(metadata).encode()
        self._refresh()
        found = ""
        for node, expected in self._tokens.items():
            # No early exit: every comparison runs, whatever matches.
            if hmac.compare_digest(token, expected) and not found:
                found = node
        if not found:
            raise AuthenticationFailed(f"the node token matches no node in {self.path}")
        return found


# -- placement ------------------------------------------------------------------------------


class PlacementAuthorizer:
    """Allows identity X for node N only if a Pod with ``spec.nodeName == N`` runs as X, or
    a WorkloadEntry annotated ``nodeagent.io/node: N`` does (its ``serviceAccount``).

    Reads the mesh config directory with ``nodeagent.control.files.load_directory``, and
    checks it for changes (file mtimes and sizes) at most every ``interval`` seconds,
    when a request comes; a bad edit keeps the last good placement and is logged.
    """

    def __init__(
        self,
        config_dir: str | Path,
        trust_domain: str = DEFAULT_TRUST_DOMAIN,
        interval: float = 1.0,
    ) -> None:
        self.config_dir = Path(config_dir)
        self.trust_domain = trust_domain
        self.interval = interval
        self._print = config_fingerprint(self.config_dir)
        self._checked_at = time.monotonic()
        self._allowed = self._load()  # a bad config is fatal at start
        self._lock = asyncio.Lock()

    def _load(self) -> dict[str, frozenset[str]]:
        snap = load_directory(self.config_dir).snapshot
        allowed: dict[str, set[str]] = {}
        entries = [w for w in snap.workload_entries if w.node_name]
        for workload in (*snap.pods, *entries):
            if workload.node_name:
                allowed.setdefault(workload.node_name, set()).add(
                    workload.identity(self.trust_domain)
                )
        log.info(
            "placement loaded from %s: %d pod(s) and %d WorkloadEntry(ies) on %d node(s)",
            self.config_dir,
            len(snap.pods),
            len(entries),
            len(allowed),
        )
        return {node: frozenset(ids) for node, ids in allowed.items()}

    def identities(self, node: str) -> frozenset[str]:
        """The identities ``node`` may hold, as of the last load."""
        return self._allowed.get(node, frozenset())

    async def _refresh(self) -> None:
        if time.monotonic() - self._checked_at < self.interval:
            return
        async with self._lock:
            if time.monotonic() - self._checked_at < self.interval:
                return
            fp = await asyncio.to_thread(config_fingerprint, self.config_dir)
            self._checked_at = time.monotonic()
            if fp == self._print:
                return
            self._print = fp
            try:
                self._allowed = await asyncio.to_thread(self._load)
            except (ConfigErrors, ConfigError) as e:
                log.error("mesh config rejected, keeping the last good placement: %s", e)

    async def authorize(self, node: str, identity: str) -> None:
        await self._refresh()
        if identity not in self.identities(node):
            raise NotAuthorized(
                f"node {node} asked for {identity}, which no pod or WorkloadEntry on {node} "
                "runs as"
            )


# -- the service -----------------------------------------------------------------------------


def _metadata(context: grpc.aio.ServicerContext[Any, Any]) -> dict[str, str]:
    out: dict[str, str] = {}
    for key, value in context.invocation_metadata() or ():
        if isinstance(value, str):
            out[key.lower()] = value
    return out


def _peer(context: grpc.aio.ServicerContext[Any, Any]) -> str:
    peer = context.peer() or ""
    return peer if peer and peer != "unix:" else "a local client"


class CertificateService(pb_grpc.IstioCertificateServiceServicer):
    """``CreateCertificate``: authenticate, authorize, sign."""

    def __init__(
        self, ca: CertificateAuthority, authenticator: Authenticator, authorizer: Authorizer
    ) -> None:
        self._ca = ca
        self._authn = authenticator
        self._authz = authorizer

    async def CreateCertificate(
        self,
        request: pb.IstioCertificateRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> pb.IstioCertificateResponse:
        peer = _peer(context)
        try:
            node = await self._authn.authenticate(_metadata(context))
        except AuthenticationFailed as e:
            log.warning("CA refused %s: unauthenticated: %s", peer, e)
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, f"unauthenticated: {e}")
        except BackendUnavailable as e:
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"the CA cannot check tokens now: {e}")
        try:
            identity = csr_identity(request.csr)
            asked = _impersonated(request)
            if asked and asked != identity:
                raise CsrRejected(
                    f"{IMPERSONATED_IDENTITY} {asked} differs from the CSR's SAN {identity}"
                )
            self._ca.check_identity(identity)
        except CsrRejected as e:
            log.warning("CA refused node %s: bad request: %s", node, e)
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"node {node}: {e}")
        try:
            await self._authz.authorize(node, identity)
        except NotAuthorized as e:
            log.warning("CA refused: %s", e)
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, str(e))
        except BackendUnavailable as e:
            await context.abort(
                grpc.StatusCode.UNAVAILABLE, f"the CA cannot check pod placement now: {e}"
            )
        try:
            chain = self._ca.sign(request.csr, identity, request.validity_duration)
        except CsrRejected as e:
            log.warning("CA refused node %s for %s: %s", node, identity, e)
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"{identity}: {e}")
        except Exception as e:
            log.exception("CA failed to sign %s for node %s", identity, node)
            await context.abort(
                grpc.StatusCode.INTERNAL, f"the CA failed to sign: {type(e).__name__}: {e}"
            )
        log.info(
            "CA signed %s for node %s (requested %ss)", identity, node, request.validity_duration
        )
        return pb.IstioCertificateResponse(cert_chain=chain)


def _impersonated(request: pb.IstioCertificateRequest) -> str:
    if not request.HasField("metadata"):
        return ""
    value = MessageToDict(request.metadata).get(IMPERSONATED_IDENTITY, "")
    return value if isinstance(value, str) else ""


async def start_ca_server(
    ca: CertificateAuthority,
    listen: str,
    authenticator: Authenticator,
    authorizer: Authorizer,
    *,
    tls: ServingCert | None = None,
) -> grpc.aio.Server:
    """Serve ``CreateCertificate`` on ``listen`` and return the started server.

    ``listen``: ``unix:/run/nodeagent/ca.sock`` (plaintext; the socket is 0600 from its
    first moment, like the node agent socket: ``unixsocket.serve_owner_only``) or
    ``HOST:PORT``: over TLS with ``tls`` (``ca_tls``), else plaintext (keep that on
    loopback: tokens travel in the clear). Call from the running event loop (asyncio or
    uvloop); stop it with ``await server.stop(grace)``.
    """
    server = grpc.aio.server()
    service = CertificateService(ca, authenticator, authorizer)
    pb_grpc.add_IstioCertificateServiceServicer_to_server(service, server)  # type: ignore[no-untyped-call]
    unix_path: Path | None = None
    if listen.startswith("unix:"):
        if tls is not None:
            raise LocalStateError(
                f"TLS is for a HOST:PORT listener; {listen} is a local socket, served in plaintext"
            )
        unix_path = prepare_unix_socket_path(
            listen.removeprefix("unix:").removeprefix("//"), "CA socket", "CA", "--listen"
        )
        address = f"unix:{unix_path}"
    else:
        address = listen
        host = listen.rsplit(":", 1)[0].strip("[]")
        if tls is None and host not in ("127.0.0.1", "::1", "localhost"):
            log.warning(
                "CA listening on %s without TLS: credentials cross the network in the clear",
                listen,
            )
    port = 0
    if unix_path is not None:
        server = serve_owner_only(server, unix_path, "CA socket", "--listen")
    else:
        try:
            if tls is None:
                port = server.add_insecure_port(address)
            else:
                port = server.add_secure_port(address, server_credentials(tls))
        except RuntimeError as e:
            raise LocalStateError(f"cannot listen on {listen} for the CA: {e}") from e
        if not port:
            raise LocalStateError(f"cannot listen on {listen} for the CA (address in use?)")
    await server.start()
    where = address if unix_path is not None else f"{listen.rsplit(':', 1)[0]}:{port}"
    log.info(
        "mesh CA (trust domain %s) listening on %s (%s)",
        ca.trust_domain,
        where,
        "plaintext" if tls is None else "TLS",
    )
    return server
