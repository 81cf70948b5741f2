"""The proxy's view of workload identities: TLS contexts per identity, built from the
certificate store and cached until the certificate or the trust bundle changes."""

from __future__ import annotations

import hashlib
import ssl
from typing import Protocol

from nodeagent.errors import PeerError
from nodeagent.identity.tls import WorkloadCert, client_context, server_context


class CertSource(Protocol):
    """Where the certificates come from: the ``CertificateStore`` (the main process), or
    the copies a worker process was sent."""

    def cached(self, identity: str) -> WorkloadCert | None: ...

    def trust_bundle(self) -> bytes: ...


class MeshIdentity:
    def __init__(self, store: CertSource, trust_domain: str) -> None:
        self.store = store
        self.trust_domain = trust_domain
        self._cache: dict[tuple[str, str], tuple[str, bytes, ssl.SSLContext]] = {}

    def _cert(self, identity: str) -> WorkloadCert:
        cert = self.store.cached(identity)
        if cert is None:
            raise PeerError(
                f"no valid certificate for {identity} yet: is the mesh CA reachable? "
                "(`nodeagent ctl status` shows the CA state)"
            )
        return cert

    def _context(self, kind: str, identity: str) -> ssl.SSLContext:
        cert = self._cert(identity)
        bundle = self.store.trust_bundle()
        digest = hashlib.sha256(bundle).digest()
        hit = self._cache.get((kind, identity))
        if hit is not None and hit[0] == cert.serial and hit[1] == digest:
            return hit[2]
        make = client_context if kind == "client" else server_context
        ctx = make(cert, bundle)
        self._cache[(kind, identity)] = (cert.serial, digest, ctx)
        return ctx

    def client_context(self, identity: str) -> ssl.SSLContext:
        """Context for dialling HBONE as ``identity`` (the source workload)."""
        return self._context("client", identity)

    def server_context(self, identity: str) -> ssl.SSLContext:
        """Context for accepting HBONE as ``identity`` (the destination workload)."""
        return self._context("server", identity)

    def has(self, identity: str) -> bool:
        return self.store.cached(identity) is not None

    def forget(self, keep: set[str]) -> None:
        for key in [k for k in self._cache if k[1] not in keep]:
            del self._cache[key]
