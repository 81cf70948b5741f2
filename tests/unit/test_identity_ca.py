"""The mesh CA's crypto: creating CA directories and signing workload CSRs.

Real keys and certificates (``cryptography``); chains are checked with cryptography's
X.509 path validation and with ``openssl verify``.
"""

from __future__ import annotations

import argparse
import datetime
import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from cryptography.x509.verification import PolicyBuilder, Store

from nodeagent.errors import LocalStateError
from nodeagent.identity import cli as ca_cli
from nodeagent.identity.ca import (
    CA_KEY,
    CERT_CHAIN,
    CLOCK_SKEW_SECONDS,
    ROOT_CERT,
    ROOT_KEY,
    TRUST_BUNDLE,
    TRUST_DOMAIN_FILE,
    CertificateAuthority,
    CsrRejected,
    csr_identity,
    init_ca,
    parse_spiffe_id,
)

ID = "spiffe://cluster.local/ns/default/sa/client"


def make_csr(
    uris: list[str],
    key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | None = None,
) -> tuple[bytes, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey]:
    key = key or ec.generate_private_key(ec.SECP256R1())
    builder = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([]))
    if uris:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(u) for u in uris]),
            critical=True,
        )
    csr = builder.sign(key, hashes.SHA256())
    return csr.public_bytes(serialization.Encoding.PEM), key


def certs(chain: list[str]) -> list[x509.Certificate]:
    return [x509.load_pem_x509_certificate(c.encode()) for c in chain]


def now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def verify_with_cryptography(chain: list[x509.Certificate], roots: list[x509.Certificate]) -> None:
    verifier = PolicyBuilder().store(Store(roots)).build_client_verifier()
    verified = verifier.verify(chain[0], chain[1:-1])
    assert verified.chain[-1] in roots


def verify_with_openssl(tmp: Path, chain: list[str], root_pem: bytes) -> None:
    if shutil.which("openssl") is None:
        pytest.skip("openssl not installed")
    (tmp / "leaf.pem").write_text(chain[0])
    (tmp / "untrusted.pem").write_text("".join(chain[1:-1]) or chain[-1])
    (tmp / "root.pem").write_bytes(root_pem)
    out = subprocess.run(
        [
            "openssl",
            "verify",
            "-purpose",
            "sslclient",
            "-CAfile",
            str(tmp / "root.pem"),
            "-untrusted",
            str(tmp / "untrusted.pem"),
            str(tmp / "leaf.pem"),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.strip().endswith("OK")


def make_intermediate(
    root_dir: Path,
) -> tuple[bytes, bytes]:
    """An intermediate CA signed by the root of ``root_dir``: (chain PEM, key PEM)."""
    root = x509.load_pem_x509_certificate((root_dir / ROOT_CERT).read_bytes())
    root_key = serialization.load_pem_private_key((root_dir / ROOT_KEY).read_bytes(), None)
    assert isinstance(root_key, ec.EllipticCurvePrivateKey)
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "intermediate")]))
        .issuer_name(root.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now() - datetime.timedelta(minutes=1))
        .not_valid_after(now() + datetime.timedelta(days=365))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
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
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(root_key.public_key()), False
        )
        .sign(root_key, hashes.SHA256())
    )
    chain = cert.public_bytes(serialization.Encoding.PEM) + (root_dir / ROOT_CERT).read_bytes()
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return chain, key_pem


@pytest.fixture
def ca_dir(tmp_path: Path) -> Path:
    return init_ca(tmp_path / "ca")


@pytest.fixture
def ca(ca_dir: Path) -> CertificateAuthority:
    return CertificateAuthority.load(ca_dir, max_ttl_seconds=3600, min_ttl_seconds=10)


# -- init ------------------------------------------------------------------------------


def test_init_makes_a_p256_root_valid_ten_years_with_a_private_key(ca_dir: Path) -> None:
    assert stat.S_IMODE(os.stat(ca_dir / ROOT_KEY).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(ca_dir).st_mode) == 0o700
    assert (ca_dir / TRUST_DOMAIN_FILE).read_text().strip() == "cluster.local"
    root = x509.load_pem_x509_certificate((ca_dir / ROOT_CERT).read_bytes())
    key = root.public_key()
    assert isinstance(key, ec.EllipticCurvePublicKey) and isinstance(key.curve, ec.SECP256R1)
    bc = root.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical and bc.value.ca
    assert root.issuer == root.subject
    root.verify_directly_issued_by(root)
    years = (root.not_valid_after_utc - now()).days / 365
    assert 9.9 < years < 10.1
    assert x509.load_pem_x509_certificates((ca_dir / TRUST_BUNDLE).read_bytes()) == [root]
    assert "cluster.local" in root.subject.rfc4514_string()


def test_init_refuses_to_overwrite_and_keeps_operator_roots(tmp_path: Path, ca_dir: Path) -> None:
    with pytest.raises(LocalStateError, match="already holds a CA"):
        init_ca(ca_dir)
    # An operator prepared a bundle with another root before creating this CA.
    other = init_ca(tmp_path / "other")
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    (fresh / TRUST_BUNDLE).write_bytes((other / ROOT_CERT).read_bytes())
    init_ca(fresh, "example.org")
    bundle = x509.load_pem_x509_certificates((fresh / TRUST_BUNDLE).read_bytes())
    roots = [x509.load_pem_x509_certificate((d / ROOT_CERT).read_bytes()) for d in (other, fresh)]
    assert bundle == roots
    assert CertificateAuthority.load(fresh).trust_domain == "example.org"


def test_init_with_an_existing_root(tmp_path: Path, ca_dir: Path) -> None:
    d = init_ca(
        tmp_path / "again",
        root_cert=(ca_dir / ROOT_CERT).read_bytes(),
        root_key=(ca_dir / ROOT_KEY).read_bytes(),
    )
    assert (d / ROOT_CERT).read_bytes() == (ca_dir / ROOT_CERT).read_bytes()
    other = init_ca(tmp_path / "other")
    with pytest.raises(LocalStateError, match="does not belong"):
        init_ca(
            tmp_path / "mismatch",
            root_cert=(ca_dir / ROOT_CERT).read_bytes(),
            root_key=(other / ROOT_KEY).read_bytes(),
        )
    with pytest.raises(LocalStateError, match="both"):
        init_ca(tmp_path / "half", root_cert=(ca_dir / ROOT_CERT).read_bytes())
    with pytest.raises(LocalStateError, match="trust domain"):
        init_ca(tmp_path / "td", "Not A Domain")


def test_init_refuses_a_chain_without_its_root(tmp_path: Path, ca_dir: Path) -> None:
    chain, key = make_intermediate(ca_dir)
    only_intermediate = chain[: chain.index(b"-----END CERTIFICATE-----") + 26]
    with pytest.raises(LocalStateError, match="must end with its self-signed root"):
        init_ca(tmp_path / "x", cert_chain=only_intermediate, key=key)
    with pytest.raises(LocalStateError, match="does not belong"):
        init_ca(tmp_path / "y", cert_chain=chain, key=(ca_dir / ROOT_KEY).read_bytes())


# -- signing ---------------------------------------------------------------------------


def test_sign_issues_a_spiffe_leaf(tmp_path: Path, ca: CertificateAuthority, ca_dir: Path) -> None:
    csr, key = make_csr([ID])
    before = now()
    chain = ca.sign(csr, ID, 600)
    leaf, root = certs(chain)
    assert root == ca.signing_certificate
    assert leaf.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    ) == key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert san.critical
    assert list(san.value) == [x509.UniformResourceIdentifier(ID)]
    eku = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(eku) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    ku = leaf.extensions.get_extension_for_class(x509.KeyUsage).value
    assert ku.digital_signature and not ku.key_cert_sign
    assert not leaf.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    skew = (before - leaf.not_valid_before_utc).total_seconds()
    assert CLOCK_SKEW_SECONDS - 2 <= skew <= CLOCK_SKEW_SECONDS + 1
    life = (leaf.not_valid_after_utc - before).total_seconds()
    assert 598 <= life <= 602
    assert leaf.issuer == root.subject
    verify_with_cryptography(certs(chain), [root])
    verify_with_openssl(tmp_path, chain, (ca_dir / ROOT_CERT).read_bytes())
    assert csr_identity(csr) == ID


@pytest.mark.parametrize(
    ("requested", "granted"), [(0, 3600), (10**9, 3600), (1, 10), (10, 10), (1800, 1800)]
)
def test_lifetime_is_capped(ca: CertificateAuthority, requested: int, granted: int) -> None:
    csr, _ = make_csr([ID])
    t0 = now()
    leaf = certs(ca.sign(csr, ID, requested))[0]
    assert abs((leaf.not_valid_after_utc - t0).total_seconds() - granted) <= 2


def test_refusals(ca: CertificateAuthority) -> None:
    other = "spiffe://cluster.local/ns/default/sa/server"
    csr, _ = make_csr([other])
    with pytest.raises(CsrRejected, match="URI SANs are"):
        ca.sign(csr, ID, 60)
    csr, _ = make_csr([ID, other])
    with pytest.raises(CsrRejected, match="URI SANs are"):
        ca.sign(csr, ID, 60)
    csr, _ = make_csr([])
    with pytest.raises(CsrRejected, match=r"URI SANs are \[\]"):
        ca.sign(csr, ID, 60)
    csr, _ = make_csr([ID], rsa.generate_private_key(public_exponent=65537, key_size=2048))
    with pytest.raises(CsrRejected, match="must be ECDSA P-256"):
        ca.sign(csr, ID, 60)
    csr, _ = make_csr([ID], ec.generate_private_key(ec.SECP384R1()))
    with pytest.raises(CsrRejected, match="secp384r1; workload keys must be ECDSA P-256"):
        ca.sign(csr, ID, 60)
    foreign = "spiffe://example.org/ns/default/sa/client"
    csr, _ = make_csr([foreign])
    with pytest.raises(CsrRejected, match="not in this CA's trust domain"):
        ca.sign(csr, foreign, 60)
    with pytest.raises(CsrRejected, match="not a PEM certificate signing request"):
        ca.sign(b"hello", ID, 60)


def test_a_tampered_csr_is_refused(ca: CertificateAuthority) -> None:
    csr_pem, _ = make_csr([ID])
    der = bytearray(x509.load_pem_x509_csr(csr_pem).public_bytes(serialization.Encoding.DER))
    der[-1] ^= 0x01  # the last byte of the signature
    tampered = x509.load_der_x509_csr(bytes(der)).public_bytes(serialization.Encoding.PEM)
    with pytest.raises(CsrRejected, match="signature does not verify"):
        ca.sign(tampered, ID, 60)


def test_an_intermediate_signs_and_the_chain_verifies_to_the_root(
    tmp_path: Path, ca_dir: Path
) -> None:
    chain_pem, key_pem = make_intermediate(ca_dir)
    d = init_ca(tmp_path / "inter", cert_chain=chain_pem, key=key_pem)
    assert stat.S_IMODE(os.stat(d / CA_KEY).st_mode) == 0o600
    assert not (d / ROOT_KEY).exists()
    assert (d / ROOT_CERT).read_bytes() == (ca_dir / ROOT_CERT).read_bytes()
    assert (d / CERT_CHAIN).read_bytes() == chain_pem
    inter_ca = CertificateAuthority.load(d)
    csr, _ = make_csr([ID])
    chain = inter_ca.sign(csr, ID, 300)
    leaf, inter, root = certs(chain)
    assert inter.subject.rfc4514_string() == "CN=intermediate"
    assert leaf.issuer == inter.subject
    assert root == x509.load_pem_x509_certificate((ca_dir / ROOT_CERT).read_bytes())
    verify_with_cryptography([leaf, inter, root], [root])
    verify_with_openssl(tmp_path, chain, (ca_dir / ROOT_CERT).read_bytes())


def test_load_errors(tmp_path: Path) -> None:
    with pytest.raises(LocalStateError, match="not a CA directory"):
        CertificateAuthority.load(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(LocalStateError, match="holds no CA key"):
        CertificateAuthority.load(tmp_path / "empty")


@pytest.mark.parametrize(
    ("text", "ok"),
    [
        ("spiffe://cluster.local/ns/a/sa/b", True),
        ("spiffe://cluster.local", False),
        ("spiffe://cluster.local/", False),
        ("spiffe://cluster.local/ns//sa/b", False),
        ("spiffe://cluster.local/ns/../sa/b", False),
        ("spiffe://cluster.local:8080/ns/a/sa/b", False),
        ("spiffe://cluster.local/ns/a/sa/b?x=1", False),
        ("https://cluster.local/ns/a/sa/b", False),
    ],
)
def test_parse_spiffe_id(text: str, ok: bool) -> None:
    if ok:
        assert parse_spiffe_id(text) == ("cluster.local", "/ns/a/sa/b")
    else:
        with pytest.raises(ValueError):
            parse_spiffe_id(text)


# -- the command line ------------------------------------------------------------------


def run_ca(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="nodeagent")
    sub = parser.add_subparsers(dest="command", required=True)
    ca_cli.add_parser(sub)
    args = parser.parse_args(["ca", *argv])
    rc: int = args.func(args)
    return rc


def test_ca_init_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    d = tmp_path / "ca"
    assert run_ca(["init", "--dir", str(d), "--trust-domain", "example.org"]) == 0
    out = capsys.readouterr().out
    assert f"CA created in {d} for trust domain example.org" in out
    assert "trust-bundle.pem" in out
    assert run_ca(["init", "--dir", str(d)]) == 1
    assert "already holds a CA" in capsys.readouterr().err
    d2 = tmp_path / "ca2"
    rc = run_ca(
        [
            "init",
            "--dir",
            str(d2),
            "--root-cert",
            str(d / ROOT_CERT),
            "--root-key",
            str(d / ROOT_KEY),
        ]
    )
    assert rc == 0
    assert (d2 / ROOT_CERT).read_bytes() == (d / ROOT_CERT).read_bytes()


@pytest.mark.parametrize(
    ("text", "seconds"), [("24h", 86400), ("1h30m", 5400), ("90s", 90), ("20", 20), ("500ms", 0.5)]
)
def test_parse_duration(text: str, seconds: float) -> None:
    assert ca_cli.parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "h", "1x", "1h 2m", "-1h", "-5", "nan"])
def test_parse_duration_rejects(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError):
        ca_cli.parse_duration(text)
