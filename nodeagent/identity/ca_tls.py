"""TLS for the mesh CA's gRPC service: its serving certificate, and how agents verify it.

Owns both ends of the CA's TLS (the CA's own keys stay in ``ca``):

- ``IssuedServingCert``: a serving certificate the CA issues itself from its signing key
  for the names of its Service (``nodeagent-ca.nodeagent-system.svc`` …, IPs too),
  re-issued at half-life; its key lives in memory only.
- ``FileServingCert``: a certificate and key from files (cert-manager, an operator's
  PKI), re-read when they change.
- ``server_credentials``: gRPC server credentials that ask the source for its current
  certificate on each new connection, so rotation needs no restart.
- ``CaTls``: the agent's side: the trust bundle (re-read when its file changes), the
  name the CA's certificate must carry, the channel credentials, and ``explain``, which
  redoes a failed handshake with Python's ``ssl`` to say *why* the CA is not trusted.
"""

from __future__ import annotations

import asyncio
import logging
import os
import ssl
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Protocol

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from nodeagent.errors import LocalStateError
from nodeagent.identity import DEFAULT_SERVING_NAMES
from nodeagent.identity.ca import CertificateAuthority, is_self_signed

__all__ = [
    "DEFAULT_SERVING_NAMES",
    "SERVING_LIFETIME_SECONDS",
    "CaTls",
    "FileServingCert",
    "IssuedServingCert",
    "ServingCert",
    "server_credentials",
]

log = logging.getLogger(__name__)

SERVING_LIFETIME_SECONDS = 24 * 3600.0
"""How long an issued serving certificate lives; it is replaced at half-life."""

_Pair = tuple[bytes, bytes]
"""(private key PEM, certificate chain PEM): what gRPC's server credentials take."""


def _at(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


def _names_of(cert: x509.Certificate) -> list[str]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return [
        *san.get_values_for_type(x509.DNSName),
        *map(str, san.get_values_for_type(x509.IPAddress)),
    ]


class ServingCert(Protocol):
    """Where the CA's serving certificate comes from."""

    def current(self) -> _Pair:
        """The certificate in use now (key PEM, chain PEM)."""
        ...

    def refresh(self) -> _Pair | None:
        """A replacement when one is due or the files changed, else None. Thread-safe."""
        ...


class IssuedServingCert:
    """A serving certificate the CA signs for itself, replaced at half-life.

    ``names``: the DNS names and IP addresses agents dial the CA by.
    """

    def __init__(
        self,
        ca: CertificateAuthority,
        names: Sequence[str] = DEFAULT_SERVING_NAMES,
        lifetime_seconds: float = SERVING_LIFETIME_SECONDS,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._ca = ca
        self.names = tuple(names)
        self.lifetime_seconds = lifetime_seconds
        self._clock = clock
        self._lock = threading.Lock()
        self._pair, self.not_after, self._renew_at = self._issue()

    def _issue(self) -> tuple[_Pair, float, float]:
        key = ec.generate_private_key(ec.SECP256R1())
        chain = self._ca.sign_server(key.public_key(), self.names, self.lifetime_seconds)
        leaf = x509.load_pem_x509_certificate(chain[0].encode())
        body = [c for c in chain if not is_self_signed(x509.load_pem_x509_certificate(c.encode()))]
        key_pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        now = self._clock()
        not_after = leaf.not_valid_after_utc.timestamp()
        log.info(
            "CA serving certificate issued for %s: serial %x, valid until %s",
            ", ".join(self.names),
            leaf.serial_number,
            _at(not_after),
        )
        return (key_pem, "".join(body).encode()), not_after, now + (not_after - now) / 2

    def current(self) -> _Pair:
        return self._pair

    def refresh(self) -> _Pair | None:
        if self._clock() < self._renew_at:
            return None
        with self._lock:
            if self._clock() < self._renew_at:
                return None
            self._pair, self.not_after, self._renew_at = self._issue()
            return self._pair


class FileServingCert:
    """A serving certificate and key from PEM files, re-read when either changes.

    A broken or mismatched pair at start is fatal; later, the last good pair stays in use
    and the problem is logged.
    """

    def __init__(self, cert_file: str | Path, key_file: str | Path) -> None:
        self.cert_file = Path(cert_file)
        self.key_file = Path(key_file)
        self._stamp = self._stat()
        self._pair = self._load()

    def _stat(self) -> tuple[int, ...]:
        out: list[int] = []
        for path in (self.cert_file, self.key_file):
            try:
                st = path.stat()
            except OSError as e:
                raise LocalStateError(f"cannot read the CA's TLS file {path}: {e}") from e
            out += [st.st_mtime_ns, st.st_size, st.st_ino]
        return tuple(out)

    def _load(self) -> _Pair:
        try:
            chain_pem = self.cert_file.read_bytes()
            key_pem = self.key_file.read_bytes()
        except OSError as e:
            raise LocalStateError(f"cannot read the CA's TLS certificate or key: {e}") from e
        try:
            certs = x509.load_pem_x509_certificates(chain_pem)
        except ValueError as e:
            raise LocalStateError(f"{self.cert_file}: not PEM certificates: {e}") from e
        try:
            key = serialization.load_pem_private_key(key_pem, password=None)
        except (ValueError, TypeError) as e:
            raise LocalStateError(f"{self.key_file}: not an unencrypted PEM key: {e}") from e
        fmt = serialization.PublicFormat.SubjectPublicKeyInfo
        enc = serialization.Encoding.DER
        if certs[0].public_key().public_bytes(enc, fmt) != key.public_key().public_bytes(enc, fmt):
            raise LocalStateError(
                f"{self.key_file} is not the key of the first certificate in {self.cert_file}"
            )
        log.info(
            "CA serving certificate loaded from %s for %s, valid until %s",
            self.cert_file,
            ", ".join(_names_of(certs[0])) or certs[0].subject.rfc4514_string(),
            _at(certs[0].not_valid_after_utc.timestamp()),
        )
        return key_pem, chain_pem

    def current(self) -> _Pair:
        return self._pair

    def refresh(self) -> _Pair | None:
        try:
            stamp = self._stat()
            if stamp == self._stamp:
                return None
            self._stamp = stamp
            self._pair = self._load()
        except LocalStateError as e:
            log.error("%s; keeping the CA's serving certificate loaded before", e)
            return None
        return self._pair


def server_credentials(source: ServingCert) -> grpc.ServerCredentials:
    """Server credentials presenting ``source``'s certificate, refreshed per connection."""

    def fetch() -> grpc.ServerCertificateConfiguration | None:
        # gRPC calls this on each new connection, from its own threads.
        try:
            pair = source.refresh()
        except Exception:
            log.exception("renewing the CA's serving certificate failed; keeping the current one")
            return None
        return None if pair is None else grpc.ssl_server_certificate_configuration([pair])

    initial = grpc.ssl_server_certificate_configuration([source.current()])
    # grpc's stubs say the fetcher cannot return None; its documentation says "None: no change".
    return grpc.dynamic_ssl_server_credentials(
        initial,
        fetch,  # type: ignore[arg-type]
        require_client_authentication=False,
    )


# -- the agent's side ------------------------------------------------------------------------


def split_target(target: str) -> tuple[str, int]:
    """``(host, port)`` of ``HOST:PORT`` or ``[V6]:PORT``; ``LocalStateError`` if malformed."""
    host, sep, port = target.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise LocalStateError(f"CA address {target!r}: expected unix:PATH or HOST:PORT")
    return host, int(port)


class CaTls:
    """How an agent checks the CA's TLS certificate: the trust bundle and a server name.

    ``server_name``: the name the certificate must carry; empty means the host of
    ``target``. The bundle file is re-read when it changes (root rotation).
    """

    def __init__(self, target: str, bundle_file: str, server_name: str = "") -> None:
        if not bundle_file:
            raise LocalStateError(
                f"the CA at {target} is dialled over TLS: give the trust bundle (--trust-bundle, "
                "the mesh root) to verify it with"
            )
        self.target = target
        self.host, self.port = split_target(target)
        self.bundle_file = bundle_file
        self.server_name = server_name or self.host
        self._stamp: tuple[int, int, int] | None = None
        self._bundle = b""
        self.reload()  # an unreadable bundle is fatal at start

    def reload(self) -> bool:
        """Re-read the bundle if its file changed; True when its content changed."""
        try:
            st = os.stat(self.bundle_file)
            stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
            if stamp == self._stamp:
                return False
            data = Path(self.bundle_file).read_bytes()
            certs = x509.load_pem_x509_certificates(data)
        except (OSError, ValueError) as e:
            if self._bundle:
                log.error("trust bundle %s: %s; keeping the last good one", self.bundle_file, e)
                return False
            raise LocalStateError(f"cannot read the trust bundle {self.bundle_file}: {e}") from e
        self._stamp = stamp
        new = b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)
        changed, self._bundle = new != self._bundle, new
        return changed

    def channel_options(self) -> list[tuple[str, str]]:
        """Check the certificate for ``server_name`` even when dialling an IP address."""
        if self.server_name == self.host:
            return []
        return [("grpc.ssl_target_name_override", self.server_name)]

    def credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(root_certificates=self._bundle)

    async def explain(self, timeout: float) -> str:
        """Why a TLS handshake with the CA fails, redone with Python's ``ssl``; "" if it
        does not fail (or the CA cannot be reached at all)."""
        ctx = ssl.create_default_context(cadata=self._bundle.decode())
        try:
            await self._handshake(ctx, timeout)
        except ssl.SSLCertVerificationError as e:
            return await self._verify_failure(e, timeout)
        except ssl.SSLError as e:
            return (
                f"the TLS handshake failed ({e.reason or e}): does it serve TLS "
                "(`nodeagent ca serve --tls`)?"
            )
        except (OSError, TimeoutError):
            return ""
        return ""

    async def _handshake(self, ctx: ssl.SSLContext, timeout: float) -> bytes:
        ctx.set_alpn_protocols(["h2"])
        _, writer = await asyncio.wait_for(
            asyncio.open_connection(
                self.host, self.port, ssl=ctx, server_hostname=self.server_name
            ),
            timeout,
        )
        try:
            obj = writer.get_extra_info("ssl_object")
            der = obj.getpeercert(binary_form=True) if obj is not None else None
            return der or b""
        finally:
            writer.close()

    async def _verify_failure(self, e: ssl.SSLCertVerificationError, timeout: float) -> str:
        why = e.verify_message or str(e)
        insecure = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        insecure.check_hostname = False
        insecure.verify_mode = ssl.CERT_NONE
        try:
            der = await self._handshake(insecure, timeout)
            cert = x509.load_der_x509_certificate(der)
        except (OSError, TimeoutError, ValueError):
            return f"its certificate does not verify: {why}"
        subject = cert.subject.rfc4514_string() or "<empty subject>"
        if e.verify_code in (62, 64):  # X509_V_ERR_HOSTNAME_MISMATCH, _IP_ADDRESS_MISMATCH
            return (
                f"its certificate is for {', '.join(_names_of(cert)) or subject}, not "
                f"{self.server_name} (dial it by one of those names, or set --ca-server-name)"
            )
        if e.verify_code == 10:  # X509_V_ERR_CERT_HAS_EXPIRED
            expired = _at(cert.not_valid_after_utc.timestamp())
            return f"its certificate ({subject}) expired at {expired}"
        if e.verify_code in (2, 7, 18, 19, 20, 21):  # no path to a root of ours
            return (
                f"its certificate ({subject}, issued by {cert.issuer.rfc4514_string()}) is "
                f"not signed by a root of the trust bundle {self.bundle_file} ({why}): is it "
                "another mesh's CA, or an old bundle?"
            )
        return f"its certificate ({subject}) does not verify: {why}"
