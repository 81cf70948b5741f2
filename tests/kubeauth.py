"""Authentication parts of the test API server (``kubeapi.KubeApiServer``): its TLS
certificates (a self-signed CA), and ServiceAccount tokens it issues and reviews
(TokenReview answers shaped, errors worded, as a real kube-apiserver's).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import secrets
import ssl
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from kubestore import Obj, Store

API_AUDIENCE = "https://kubernetes.default.svc.cluster.local"


@dataclass(frozen=True)
class IssuedToken:
    token: str
    namespace: str
    service_account: str
    audiences: tuple[str, ...]
    node_name: str | None
    pod_name: str | None
    pod_uid: str | None
    expires_at: float
    jti: str
    node_uid: str


def make_tls(workdir: Path, host: str = "127.0.0.1") -> tuple[bytes, ssl.SSLContext]:
    """A self-signed CA and a server certificate for ``host`` and the in-cluster names."""
    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kubeapi-test-ca")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - dt.timedelta(minutes=5))
          .not_valid_after(now + dt.timedelta(days=2))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False),
                         critical=True)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    names: list[x509.GeneralName] = [
        x509.IPAddress(ipaddress.ip_address(host)), x509.DNSName("localhost"),
        x509.DNSName("kubernetes"), x509.DNSName("kubernetes.default.svc"),
        x509.DNSName("kubernetes.default.svc.cluster.local")]
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kube-apiserver")]))
            .issuer_name(ca_name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName(names), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .sign(ca_key, hashes.SHA256()))
    ca_pem = ca.public_bytes(serialization.Encoding.PEM)
    cert_file, key_file = workdir / "apiserver.crt", workdir / "apiserver.key"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM) + ca_pem)
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cert_file, key_file)
    return ca_pem, ctx


class TokenAuthority:
    """Issues projected-ServiceAccount-like tokens and reviews them."""

    def __init__(self) -> None:
        self._issued: dict[str, IssuedToken] = {}
        self._signing_key = secrets.token_bytes(32)

    def issue(self, namespace: str, service_account: str,
                    audiences: tuple[str, ...] | list[str] = (API_AUDIENCE,), *,
                    node_name: str | None = None, pod_name: str | None = None,
                    pod_uid: str | None = None, expires_at: float | None = None) -> str:
        """A ServiceAccount token as kubelet projects it (JWT-shaped; valid for TokenReview)."""
        exp = expires_at if expires_at is not None else time.time() + 3600
        jti, node_uid = str(uuid.uuid4()), str(uuid.uuid4())
        claims: dict[str, Any] = {
            "aud": list(audiences), "exp": int(exp), "iat": int(time.time()),
            "nbf": int(time.time()), "iss": API_AUDIENCE, "jti": jti,
            "sub": f"system:serviceaccount:{namespace}:{service_account}",
            "kubernetes.io": {"namespace": namespace, "serviceaccount": {
                "name": service_account, "uid": str(uuid.uuid4())}}}
        if pod_name:
            claims["kubernetes.io"]["pod"] = {"name": pod_name, "uid": pod_uid or ""}
        if node_name:
            claims["kubernetes.io"]["node"] = {"name": node_name, "uid": node_uid}
        token = jwt.encode(claims, self._signing_key, algorithm="HS256")
        self._issued[token] = IssuedToken(token, namespace, service_account, tuple(audiences),
                                          node_name, pod_name, pod_uid, exp, jti, node_uid)
        return token

    def review(self, token: str, audiences: list[str], pods: Store | None = None) -> Obj:
        """The ``status`` of a TokenReview of ``token`` for ``audiences``, as a real server."""
        tok = self._issued.get(token)
        wanted = audiences or [API_AUDIENCE]
        if tok is None:
            return {"user": {}, "error": "[invalid bearer token, square/go-jose: error in "
                    "cryptographic primitive, token lookup failed]"}
        if tok.expires_at <= time.time():
            return {"user": {}, "error": "[invalid bearer token, service account token has "
                    "expired]"}
        granted = [a for a in wanted if a in tok.audiences]
        if not granted:
            def q(xs: Any) -> str:
                return "[" + " ".join(json.dumps(x) for x in xs) + "]"
            return {"user": {}, "error": f"[invalid bearer token, token audiences "
                    f"{q(tok.audiences)} is invalid for the target audiences {q(wanted)}]"}
        if pods is not None and tok.pod_name:
            pod = pods.objects.get(("", "pods", tok.namespace, tok.pod_name))
            if pod is None or pod["metadata"]["uid"] != tok.pod_uid:
                return {"user": {}, "error": "[invalid bearer token, token has been invalidated]"}
        extra: dict[str, list[str]] = {"authentication.kubernetes.io/credential-id":
                                       [f"JTI={tok.jti}"]}
        if tok.node_name:
            extra["authentication.kubernetes.io/node-name"] = [tok.node_name]
            extra["authentication.kubernetes.io/node-uid"] = [tok.node_uid]
        if tok.pod_name:
            extra["authentication.kubernetes.io/pod-name"] = [tok.pod_name]
            extra["authentication.kubernetes.io/pod-uid"] = [tok.pod_uid or ""]
        return {"authenticated": True, "audiences": granted,
                "user": {"username": f"system:serviceaccount:{tok.namespace}:"
                         f"{tok.service_account}",
                         "uid": str(uuid.uuid5(uuid.NAMESPACE_URL, tok.service_account)),
                         "groups": ["system:serviceaccounts",
                                    f"system:serviceaccounts:{tok.namespace}",
                                    "system:authenticated"],
                         "extra": extra}}
