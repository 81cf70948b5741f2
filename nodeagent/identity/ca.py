"""The mesh certificate authority: its files, its keys, and signing workload certificates.

Pure crypto (``cryptography``), no I/O beyond the CA directory and no networking; the gRPC
service around it lives in ``ca_server``. Owns:

- ``init_ca``: create a CA directory for a trust domain, with a new self-signed root
  (ECDSA P-256, 10 years), an existing root, or an intermediate (chain up to its root);
- ``CertificateAuthority``: load a CA directory and ``sign`` a CSR for one SPIFFE identity,
  returning the PEM chain leaf first and root last, as Istio's ``CreateCertificate`` does;
  ``sign_server`` signs the CA's own TLS serving certificate (``ca_tls`` asks for it).

The CA directory holds (Istio's "plugged-in CA" names where they exist)::

    trust-domain        the trust domain, one line
    root-cert.pem       the root certificate
    root-key.pem        the root key (0600), when the root itself signs
    ca-cert.pem         the intermediate that signs (intermediate mode only)
    ca-key.pem          its key (0600)
    cert-chain.pem      the intermediate's chain, intermediate first, root last
    trust-bundle.pem    the roots agents trust: ours, plus any root an operator appends
                        (several roots at once is how a root is rotated)

The private keys never leave the CA process: nothing here returns or logs them.
"""

from __future__ import annotations

import datetime
import ipaddress
import itertools
import os
import re
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from nodeagent.errors import LocalStateError, PeerError
from nodeagent.model.objects import DEFAULT_TRUST_DOMAIN

__all__ = [
    "CA_CERT",
    "CA_KEY",
    "CERT_CHAIN",
    "CLOCK_SKEW_SECONDS",
    "DEFAULT_MAX_TTL_SECONDS",
    "IMPERSONATED_IDENTITY",
    "MIN_TTL_SECONDS",
    "ROOT_CERT",
    "ROOT_KEY",
    "ROOT_VALIDITY_DAYS",
    "TRUST_BUNDLE",
    "TRUST_DOMAIN_FILE",
    "CertificateAuthority",
    "CsrRejected",
    "csr_identity",
    "init_ca",
    "load_pem_certificates",
    "parse_spiffe_id",
]

ROOT_CERT = "root-cert.pem"
ROOT_KEY = "root-key.pem"
CA_CERT = "ca-cert.pem"
CA_KEY = "ca-key.pem"
CERT_CHAIN = "cert-chain.pem"
TRUST_BUNDLE = "trust-bundle.pem"
TRUST_DOMAIN_FILE = "trust-domain"

ROOT_VALIDITY_DAYS = 3650
DEFAULT_MAX_TTL_SECONDS = 24 * 3600
MIN_TTL_SECONDS = 10
CLOCK_SKEW_SECONDS = 60
"""Leaf certificates start this long before they are signed, for peers whose clock is behind."""

IMPERSONATED_IDENTITY = "ImpersonatedIdentity"
"""The request metadata key ztunnel uses to name the workload identity it asks for."""

_TRUST_DOMAIN_RE = re.compile(r"^[a-z0-9._-]+$")
_SigningKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey


class CsrRejected(PeerError):
    """A certificate signing request the CA will not sign (the requester's fault)."""


# -- small helpers ---------------------------------------------------------------------


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def load_pem_certificates(pem: bytes | str, what: str = "PEM data") -> list[x509.Certificate]:
    """Every certificate in a PEM blob, in order; ``LocalStateError`` if there is none."""
    data = pem.encode() if isinstance(pem, str) else pem
    try:
        certs = x509.load_pem_x509_certificates(data)
    except ValueError as e:
        raise LocalStateError(f"{what}: not PEM certificates: {e}") from e
    if not certs:
        raise LocalStateError(f"{what}: no certificate found")
    return certs


def _pem(cert: x509.Certificate) -> str:
    return cert.public_bytes(serialization.Encoding.PEM).decode()


def _key_pem(key: _SigningKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _load_key(pem: bytes, what: str) -> _SigningKey:
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError) as e:
        raise LocalStateError(f"{what}: not an unencrypted PEM private key: {e}") from e
    if not isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
        raise LocalStateError(
            f"{what}: a {type(key).__name__} cannot sign here: use an ECDSA or RSA key"
        )
    return key


def _same_public_key(cert: x509.Certificate, key: _SigningKey) -> bool:
    fmt = serialization.PublicFormat.SubjectPublicKeyInfo
    enc = serialization.Encoding.DER
    return cert.public_key().public_bytes(enc, fmt) == key.public_key().public_bytes(enc, fmt)


def _is_ca(cert: x509.Certificate) -> bool:
    try:
        bc = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        return False
    return bc.ca


def is_self_signed(cert: x509.Certificate) -> bool:
    if cert.issuer != cert.subject:
        return False
    try:
        cert.verify_directly_issued_by(cert)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def _describe(cert: x509.Certificate) -> str:
    return f"{cert.subject.rfc4514_string() or '<empty subject>'} (serial {cert.serial_number:x})"


def _write_new(path: Path, data: bytes, mode: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)
    os.chmod(path, mode)


def parse_spiffe_id(identity: str) -> tuple[str, str]:
    """``(trust_domain, path)`` of a SPIFFE ID; ``ValueError`` saying what is wrong."""
    parts = urlsplit(identity)
    if parts.scheme != "spiffe":
        raise ValueError(f"{identity!r} is not a SPIFFE ID (spiffe://<trust-domain>/<path>)")
    if not parts.hostname or parts.netloc != parts.hostname:
        raise ValueError(f"{identity!r}: the trust domain must be a bare name (no port, no user)")
    if parts.query or parts.fragment or "?" in identity or "#" in identity:
        raise ValueError(f"{identity!r}: a SPIFFE ID has no query or fragment")
    segments = parts.path.split("/")[1:]
    if not parts.path or any(s in ("", ".", "..") for s in segments):
        raise ValueError(f"{identity!r}: the path must be non-empty, without empty or dot segments")
    return parts.netloc, parts.path


def workload_csr(identity: str) -> tuple[bytes, ec.EllipticCurvePrivateKey]:
    """A new P-256 key and a PEM CSR asking for ``identity`` as its one URI SAN, as a
    workload's certificate request carries it (``csr_identity`` reads it back)."""
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([]))
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(identity)]),
            critical=True,
        )
        .sign(key, hashes.SHA256())
    )
    return csr.public_bytes(serialization.Encoding.PEM), key


def csr_identity(csr_pem: bytes | str) -> str:
    """The one URI SAN of a CSR (what it asks to be), without checking anything else."""
    csr = _load_csr(csr_pem)
    uris = _csr_uris(csr)
    if len(uris) != 1:
        raise CsrRejected(f"the CSR must carry exactly one URI SAN (a SPIFFE ID), it has {uris}")
    return uris[0]


def _load_csr(csr_pem: bytes | str) -> x509.CertificateSigningRequest:
    data = csr_pem.encode() if isinstance(csr_pem, str) else csr_pem
    try:
        return x509.load_pem_x509_csr(data)
    except ValueError as e:
        raise CsrRejected(f"not a PEM certificate signing request: {e}") from e


def _csr_uris(csr: x509.CertificateSigningRequest) -> list[str]:
    try:
        san = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return list(san.get_values_for_type(x509.UniformResourceIdentifier))


# -- creating a CA directory --------------------------------------------------------------


def _new_root(trust_domain: str) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    # A distinct name per root keeps several roots in one bundle unambiguous.
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, trust_domain),
            x509.NameAttribute(NameOID.COMMON_NAME, f"nodeagent root CA {secrets.token_hex(4)}"),
        ]
    )
    now = _now()
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(seconds=CLOCK_SKEW_SECONDS))
        .not_valid_after(now + datetime.timedelta(days=ROOT_VALIDITY_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ski, critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False
        )
        .sign(key, hashes.SHA256())
    )
    return cert, key


def _check_root(cert: x509.Certificate, key: _SigningKey | None, what: str) -> None:
    if not _is_ca(cert):
        raise LocalStateError(f"{what}: {_describe(cert)} is not a CA (BasicConstraints ca=false)")
    if not is_self_signed(cert):
        raise LocalStateError(f"{what}: {_describe(cert)} is not a self-signed root")
    if key is not None and not _same_public_key(cert, key):
        raise LocalStateError(f"{what}: the key does not belong to {_describe(cert)}")


def _check_chain(chain: Sequence[x509.Certificate], what: str) -> None:
    """Each certificate issued by the next, all CAs, the last a self-signed root."""
    for cert in chain:
        if not _is_ca(cert):
            raise LocalStateError(f"{what}: {_describe(cert)} is not a CA")
    for child, parent in itertools.pairwise(chain):
        try:
            child.verify_directly_issued_by(parent)
        except (ValueError, TypeError, InvalidSignature) as e:
            raise LocalStateError(
                f"{what}: {_describe(child)} is not signed by the next certificate, "
                f"{_describe(parent)} ({e or 'bad signature'}): order it leaf-most first, "
                "root last"
            ) from e
    if not is_self_signed(chain[-1]):
        raise LocalStateError(
            f"{what}: the chain must end with its self-signed root; it ends with "
            f"{_describe(chain[-1])}"
        )


def _merge_bundle(path: Path, root_pem: str) -> None:
    """Create or extend the trust bundle: keep what the operator put there, add our root."""
    existing = path.read_bytes() if path.exists() else b""
    roots = load_pem_certificates(existing, str(path)) if existing.strip() else []
    root = x509.load_pem_x509_certificate(root_pem.encode())
    if any(r == root for r in roots):
        return
    text = existing.decode()
    if text and not text.endswith("\n"):
        text += "\n"
    path.write_text(text + root_pem)
    os.chmod(path, 0o644)


def init_ca(
    directory: str | Path,
    trust_domain: str = DEFAULT_TRUST_DOMAIN,
    root_cert: bytes | None = None,
    root_key: bytes | None = None,
    *,
    cert_chain: bytes | None = None,
    key: bytes | None = None,
) -> Path:
    """Create the CA directory ``directory`` for ``trust_domain``; return its path.

    - no certificate given: a new ECDSA P-256 self-signed root, valid 10 years;
    - ``root_cert`` + ``root_key`` (PEM): that existing root signs;
    - ``cert_chain`` (PEM: the intermediate first, the root last) + ``key`` (the
      intermediate's PEM key): the intermediate signs.

    Refuses to overwrite a directory that already holds a CA. ``trust-bundle.pem`` is kept
    if present (the root is appended when missing), so extra roots survive a re-init.
    """
    if not _TRUST_DOMAIN_RE.match(trust_domain):
        raise LocalStateError(
            f"trust domain {trust_domain!r} must be lowercase letters, digits, '.', '-', '_'"
        )
    if (root_cert is None) != (root_key is None):
        raise LocalStateError("give both the root certificate and its key, or neither")
    if (cert_chain is None) != (key is None):
        raise LocalStateError("give both the certificate chain and the intermediate's key")
    if root_cert is not None and cert_chain is not None:
        raise LocalStateError("give either a root (cert + key) or an intermediate chain, not both")

    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True, mode=0o700)
    for name in (ROOT_KEY, CA_KEY, CA_CERT, ROOT_CERT, CERT_CHAIN):
        if (d / name).exists():
            raise LocalStateError(
                f"{d} already holds a CA ({name} exists): remove the directory first, or "
                "choose another --dir"
            )

    if cert_chain is not None and key is not None:
        chain = load_pem_certificates(cert_chain, "certificate chain")
        signing_key = _load_key(key, "intermediate key")
        _check_chain(chain, "certificate chain")
        if len(chain) < 2:
            raise LocalStateError(
                "certificate chain: only a root was given; pass it as --root-cert/--root-key"
            )
        if not _same_public_key(chain[0], signing_key):
            raise LocalStateError(
                f"intermediate key: it does not belong to {_describe(chain[0])}, the first "
                "certificate of the chain"
            )
        _write_new(d / CA_KEY, _key_pem(signing_key), 0o600)
        _write_new(d / CA_CERT, _pem(chain[0]).encode(), 0o644)
        _write_new(d / CERT_CHAIN, "".join(_pem(c) for c in chain).encode(), 0o644)
        root_pem = _pem(chain[-1])
    else:
        if root_cert is not None and root_key is not None:
            root = load_pem_certificates(root_cert, "root certificate")[0]
            rkey: _SigningKey = _load_key(root_key, "root key")
            _check_root(root, rkey, "root certificate")
        else:
            root, rkey = _new_root(trust_domain)
        _write_new(d / ROOT_KEY, _key_pem(rkey), 0o600)
        root_pem = _pem(root)
    _write_new(d / ROOT_CERT, root_pem.encode(), 0o644)
    (d / TRUST_DOMAIN_FILE).write_text(trust_domain + "\n")
    _merge_bundle(d / TRUST_BUNDLE, root_pem)
    return d


# -- signing ---------------------------------------------------------------------------


@dataclass(frozen=True)
class _Signer:
    cert: x509.Certificate
    key: _SigningKey
    chain: tuple[x509.Certificate, ...]
    """From the signing certificate (excluded) up to the root (included)."""


class CertificateAuthority:
    """Signs workload certificates for one trust domain. Load it with ``load``."""

    def __init__(
        self,
        signing_cert: x509.Certificate,
        signing_key: _SigningKey,
        chain: Sequence[x509.Certificate],
        trust_domain: str = DEFAULT_TRUST_DOMAIN,
        *,
        max_ttl_seconds: float = DEFAULT_MAX_TTL_SECONDS,
        min_ttl_seconds: float = MIN_TTL_SECONDS,
        bundle_pem: bytes = b"",
    ) -> None:
        """``chain``: the issuers above ``signing_cert``, root last (empty for a root)."""
        if not _same_public_key(signing_cert, signing_key):
            raise LocalStateError("the CA key does not belong to the CA certificate")
        if min_ttl_seconds <= 0 or max_ttl_seconds < min_ttl_seconds:
            raise LocalStateError(
                f"certificate TTL bounds are inconsistent: min {min_ttl_seconds}s, "
                f"max {max_ttl_seconds}s"
            )
        self._signer = _Signer(signing_cert, signing_key, tuple(chain))
        self.trust_domain = trust_domain
        self.max_ttl_seconds = float(max_ttl_seconds)
        self.min_ttl_seconds = float(min_ttl_seconds)
        root = self._signer.chain[-1] if self._signer.chain else signing_cert
        self._chain_pem = [_pem(c) for c in self._signer.chain] or [_pem(signing_cert)]
        self.root_pem = _pem(root).encode()
        self.bundle_pem = bundle_pem or self.root_pem

    @classmethod
    def load(
        cls,
        directory: str | Path,
        *,
        max_ttl_seconds: float = DEFAULT_MAX_TTL_SECONDS,
        min_ttl_seconds: float = MIN_TTL_SECONDS,
    ) -> CertificateAuthority:
        """Load a CA directory made by ``init_ca`` (``LocalStateError`` saying what is off)."""
        d = Path(directory)
        if not d.is_dir():
            raise LocalStateError(f"{d} is not a CA directory: create it with `nodeagent ca init`")
        td_file = d / TRUST_DOMAIN_FILE
        trust_domain = (
            td_file.read_text().strip() if td_file.exists() else DEFAULT_TRUST_DOMAIN
        ) or DEFAULT_TRUST_DOMAIN
        bundle = d / TRUST_BUNDLE
        bundle_pem = bundle.read_bytes() if bundle.exists() else b""
        try:
            if (d / CA_KEY).exists():
                key = _load_key((d / CA_KEY).read_bytes(), str(d / CA_KEY))
                chain = load_pem_certificates((d / CERT_CHAIN).read_bytes(), str(d / CERT_CHAIN))
                _check_chain(chain, str(d / CERT_CHAIN))
                cert, above = chain[0], chain[1:]
            elif (d / ROOT_KEY).exists():
                key = _load_key((d / ROOT_KEY).read_bytes(), str(d / ROOT_KEY))
                cert = load_pem_certificates((d / ROOT_CERT).read_bytes(), str(d / ROOT_CERT))[0]
                _check_root(cert, key, str(d / ROOT_CERT))
                above = []
            else:
                raise LocalStateError(
                    f"{d} holds no CA key ({ROOT_KEY} or {CA_KEY}): create it with "
                    "`nodeagent ca init`"
                )
        except FileNotFoundError as e:
            raise LocalStateError(f"incomplete CA directory {d}: {e.filename} is missing") from e
        if bundle_pem:
            load_pem_certificates(bundle_pem, str(bundle))  # a broken bundle is fatal here
        return cls(
            cert,
            key,
            above,
            trust_domain,
            max_ttl_seconds=max_ttl_seconds,
            min_ttl_seconds=min_ttl_seconds,
            bundle_pem=bundle_pem,
        )

    @property
    def signing_certificate(self) -> x509.Certificate:
        return self._signer.cert

    def check_identity(self, identity: str) -> None:
        """``CsrRejected`` unless ``identity`` is a SPIFFE ID of this trust domain."""
        try:
            td, _ = parse_spiffe_id(identity)
        except ValueError as e:
            raise CsrRejected(str(e)) from e
        if td != self.trust_domain:
            raise CsrRejected(f"{identity} is not in this CA's trust domain {self.trust_domain!r}")

    def ttl_for(self, requested_seconds: float) -> float:
        """The lifetime granted for a request: the maximum when 0, else clamped to the bounds."""
        if requested_seconds <= 0:
            return self.max_ttl_seconds
        return min(self.max_ttl_seconds, max(self.min_ttl_seconds, float(requested_seconds)))

    def sign(self, csr_pem: bytes | str, identity: str, ttl_seconds: float) -> list[str]:
        """Sign ``csr_pem`` for ``identity``; the PEM chain: leaf, intermediates, root last.

        Refuses (``CsrRejected``) a CSR whose signature does not verify, whose key is not
        ECDSA P-256, or whose URI SANs are not exactly ``[identity]``, and an identity
        outside this trust domain. The leaf carries that one URI SAN, EKU serverAuth and
        clientAuth, is not a CA, starts ``CLOCK_SKEW_SECONDS`` ago and lives
        ``ttl_for(ttl_seconds)`` (never past the signing certificate).
        """
        self.check_identity(identity)
        csr = _load_csr(csr_pem)
        if not csr.is_signature_valid:
            raise CsrRejected("the CSR's signature does not verify (it was not signed by its key)")
        public_key = csr.public_key()
        if not isinstance(public_key, ec.EllipticCurvePublicKey) or not isinstance(
            public_key.curve, ec.SECP256R1
        ):
            kind = (
                f"ECDSA {public_key.curve.name}"
                if isinstance(public_key, ec.EllipticCurvePublicKey)
                else type(public_key).__name__.removeprefix("_")
            )
            raise CsrRejected(f"the CSR's key is {kind}; workload keys must be ECDSA P-256")
        uris = _csr_uris(csr)
        if uris != [identity]:
            raise CsrRejected(f"the CSR's URI SANs are {uris}; they must be exactly [{identity!r}]")

        signer = self._signer
        now = _now()
        not_after = now + datetime.timedelta(seconds=self.ttl_for(ttl_seconds))
        not_after = min(not_after, signer.cert.not_valid_after_utc)
        issuer_ski = x509.SubjectKeyIdentifier.from_public_key(signer.key.public_key())
        leaf = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([]))
            .issuer_name(signer.cert.subject)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(seconds=CLOCK_SKEW_SECONDS))
            .not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=True,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=False,
                    crl_sign=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(
                x509.ExtendedKeyUsage(
                    [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
                ),
                critical=False,
            )
            # An empty subject makes the SAN the name, so it must be critical (RFC 5280).
            .add_extension(
                x509.SubjectAlternativeName([x509.UniformResourceIdentifier(identity)]),
                critical=True,
            )
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(issuer_ski),
                critical=False,
            )
            .sign(signer.key, hashes.SHA256())
        )
        return self._with_chain(leaf)

    def _with_chain(self, leaf: x509.Certificate) -> list[str]:
        if self._signer.chain:
            return [_pem(leaf), _pem(self._signer.cert), *self._chain_pem]
        return [_pem(leaf), *self._chain_pem]

    def sign_server(
        self, public_key: ec.EllipticCurvePublicKey, names: Sequence[str], ttl_seconds: float
    ) -> list[str]:
        """A TLS server certificate for the CA's own service: the PEM chain, root last.

        ``names``: DNS names or IP addresses (the Service's names), each a SAN; the first
        is also the subject's CN. EKU serverAuth only; lives ``ttl_seconds`` (never past
        the signing certificate).
        """
        if not names:
            raise LocalStateError("the CA's serving certificate needs at least one name")
        sans: list[x509.GeneralName] = []
        for name in names:
            try:
                sans.append(x509.IPAddress(ipaddress.ip_address(name)))
            except ValueError:
                sans.append(x509.DNSName(name))
        signer = self._signer
        now = _now()
        not_after = min(
            now + datetime.timedelta(seconds=ttl_seconds), signer.cert.not_valid_after_utc
        )
        issuer_ski = x509.SubjectKeyIdentifier.from_public_key(signer.key.public_key())
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
            .issuer_name(signer.cert.subject)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(seconds=CLOCK_SKEW_SECONDS))
            .not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=False,
                    crl_sign=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(issuer_ski),
                critical=False,
            )
            .sign(signer.key, hashes.SHA256())
        )
        return self._with_chain(cert)
