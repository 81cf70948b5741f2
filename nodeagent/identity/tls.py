"""TLS contexts for HBONE from in-memory certificates, and peer identity extraction.

Keys never touch a disk: ``ssl.SSLContext.load_cert_chain`` wants paths, so the PEM is
handed over through an anonymous memory file (``memfd_create``) that is closed at once.
Contexts are TLS 1.3 only, ALPN ``h2``, and always verify the peer's chain against the
trust bundle (which may hold several roots, for root rotation). Hostname checks are off:
the peer is checked by its SPIFFE ID instead (``peer_identity`` + the caller's
expectation).
"""

from __future__ import annotations

import os
import ssl
from dataclasses import dataclass
from typing import Any

from cryptography import x509

from nodeagent.identity.tlsread import ReadTracker

ALPN = "h2"


@dataclass(frozen=True)
class WorkloadCert:
    """One workload identity's certificate chain and private key (in memory)."""

    identity: str
    """``spiffe://<trust-domain>/ns/<ns>/sa/<sa>``"""
    chain_pem: bytes
    """Leaf first, then intermediates (not the root)."""
    key_pem: bytes
    not_before: float
    not_after: float
    serial: str


def _load_chain(ctx: ssl.SSLContext, cert: WorkloadCert) -> None:
    fd = os.memfd_create("nodeagent-cert", os.MFD_CLOEXEC)
    try:
        os.write(fd, cert.chain_pem + b"\n" + cert.key_pem)
        path = f"/proc/self/fd/{fd}"
        ctx.load_cert_chain(path, path)
    finally:
        os.close(fd)


class _DirectSSLObject(ssl.SSLObject):
    """An ``SSLObject`` whose ``write`` is ``_ssl``'s own C method and whose ``read`` and
    ``pending`` are a compiled ``ReadTracker``'s: the event loop's TLS transport calls them
    a few times per record, the stdlib's wrappers only pass their arguments on, at the cost
    of a Python frame each, and ``pending`` after a short read needs no call into OpenSSL."""

    @classmethod
    def _create(cls, *args: Any, **kwargs: Any) -> _DirectSSLObject:
        self = super()._create(*args, **kwargs)  # type: ignore[misc]
        c = self._sslobj
        reads = ReadTracker(c.read, c.pending)
        # (instance attributes shadow the class's methods; uvloop binds them once per
        # connection, after ``wrap_bio``)
        self.read, self.write, self.pending = reads.read, c.write, reads.pending
        return self  # type: ignore[no-any-return]


def _base(purpose: ssl.Purpose, cert: WorkloadCert, bundle_pem: bytes) -> ssl.SSLContext:
    ctx = ssl.SSLContext(
        ssl.PROTOCOL_TLS_SERVER if purpose is ssl.Purpose.CLIENT_AUTH else ssl.PROTOCOL_TLS_CLIENT
    )
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.maximum_version = ssl.TLSVersion.TLSv1_3
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_verify_locations(cadata=bundle_pem.decode())
    ctx.set_alpn_protocols([ALPN])
    ctx.sslobject_class = _DirectSSLObject
    _load_chain(ctx, cert)
    return ctx


def server_context(cert: WorkloadCert, bundle_pem: bytes) -> ssl.SSLContext:
    """For the HBONE server (15008): present ``cert``, require a client cert from the bundle."""
    return _base(ssl.Purpose.CLIENT_AUTH, cert, bundle_pem)


def client_context(cert: WorkloadCert, bundle_pem: bytes) -> ssl.SSLContext:
    """For HBONE clients: present ``cert``, verify the server's chain against the bundle."""
    return _base(ssl.Purpose.SERVER_AUTH, cert, bundle_pem)


def identity_of_der(der: bytes) -> str | None:
    """The SPIFFE ID (the URI SAN) of a DER certificate, or None."""
    cert = x509.load_der_x509_certificate(der)
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        return None
    uris = san.value.get_values_for_type(x509.UniformResourceIdentifier)
    spiffe = [u for u in uris if u.startswith("spiffe://")]
    return spiffe[0] if len(spiffe) == 1 else None


def peer_identity(ssl_object: ssl.SSLObject | ssl.SSLSocket) -> str | None:
    """The verified peer's SPIFFE ID after a handshake."""
    der = ssl_object.getpeercert(binary_form=True)
    return identity_of_der(der) if der else None


def describe_verify_error(err: ssl.SSLError) -> str:
    """A message a person can act on for a failed handshake."""
    text = str(err)
    verify = getattr(err, "verify_message", "") or ""
    if "certificate has expired" in verify or "certificate has expired" in text:
        return f"peer certificate expired ({verify or text})"
    if "unable to get local issuer" in verify or "self-signed" in verify or "self signed" in verify:
        return (
            f"peer certificate is not signed by a root in our trust bundle ({verify}): "
            "is it from another trust domain or CA?"
        )
    if "certificate required" in text.lower():
        return "peer presented no client certificate (is it a mesh workload?)"
    return f"TLS handshake failed: {verify or text}"
