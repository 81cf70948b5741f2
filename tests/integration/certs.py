"""Test helper: a throwaway mesh CA that issues SPIFFE ``WorkloadCert``s in memory.

Everything a mutual-TLS test needs to build good and bad peers: a root per trust domain,
leaves for any SPIFFE ID (valid, expired, not yet valid), a leaf without a SPIFFE ID, and
the root's PEM to use as a trust bundle. ECDSA P-256 throughout, as the mesh CA issues.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from nodeagent.identity.tls import WorkloadCert

_DAY = datetime.timedelta(days=1)


def spiffe_id(namespace: str, service_account: str, trust_domain: str = "cluster.local") -> str:
    return f"spiffe://{trust_domain}/ns/{namespace}/sa/{service_account}"


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


@dataclass(frozen=True)
class TestCA:
    """A root CA for one trust domain (its key stays in the test process)."""

    __test__ = False  # not a pytest test class

    trust_domain: str
    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey

    @property
    def bundle_pem(self) -> bytes:
        """The root as a trust bundle."""
        return self.cert.public_bytes(serialization.Encoding.PEM)

    def issue(
        self,
        identity: str | None,
        *,
        not_before: datetime.datetime | None = None,
        not_after: datetime.datetime | None = None,
        dns_names: tuple[str, ...] = (),
    ) -> WorkloadCert:
        """A leaf for ``identity`` (the only URI SAN; None = no SPIFFE ID at all)."""
        now = datetime.datetime.now(datetime.UTC)
        nb = not_before if not_before is not None else now - datetime.timedelta(minutes=5)
        na = not_after if not_after is not None else now + _DAY
        key = ec.generate_private_key(ec.SECP256R1())
        sans: list[x509.GeneralName] = [x509.DNSName(d) for d in dns_names]
        if identity is not None:
            sans.append(x509.UniformResourceIdentifier(identity))
        if not sans:
            sans.append(x509.DNSName("workload.invalid"))
        serial = x509.random_serial_number()
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([]))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(serial)
            .not_valid_before(nb)
            .not_valid_after(na)
            .add_extension(x509.SubjectAlternativeName(sans), critical=True)
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
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()),
                critical=False,
            )
            .sign(self.key, hashes.SHA256())
        )
        return WorkloadCert(
            identity=identity or "",
            chain_pem=cert.public_bytes(serialization.Encoding.PEM),
            key_pem=_key_pem(key),
            not_before=nb.timestamp(),
            not_after=na.timestamp(),
            serial=format(serial, "x"),
        )

    def expired(self, identity: str) -> WorkloadCert:
        """A leaf whose validity ended an hour ago."""
        now = datetime.datetime.now(datetime.UTC)
        return self.issue(
            identity, not_before=now - 2 * _DAY, not_after=now - datetime.timedelta(hours=1)
        )


def make_ca(trust_domain: str = "cluster.local") -> TestCA:
    """A fresh self-signed root for ``trust_domain``."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, trust_domain),
            x509.NameAttribute(NameOID.COMMON_NAME, f"test root for {trust_domain}"),
        ]
    )
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _DAY)
        .not_valid_after(now + 30 * _DAY)
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
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return TestCA(trust_domain=trust_domain, cert=cert, key=key)
