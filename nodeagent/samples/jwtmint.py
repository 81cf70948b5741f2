"""Signing keys and tokens for trying RequestAuthentication (tests, demos and the
``nodeagent jwt keygen`` / ``nodeagent jwt mint`` commands): a key pair as a private PEM
plus the public JWKS to put in ``jwks``, and tokens signed with it. Not for production
issuers."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from nodeagent.core.jwt import ALGORITHMS, MIN_RSA_BITS


def generate_key(alg: str, kid: str = "key-1") -> tuple[bytes, str]:
    """A new key for ``alg`` (RS256 or ES256): ``(private key PEM, JWKS JSON text)``."""
    # PyJWT here, not at import: every `nodeagent` command, the agent's too, builds this
    # subcommand's parser, and the agent loads PyJWT only for a RequestAuthentication.
    from jwt.algorithms import ECAlgorithm, RSAAlgorithm

    key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey
    if alg == "RS256":
        key = rsa.generate_private_key(public_exponent=65537, key_size=MIN_RSA_BITS)
        public = RSAAlgorithm.to_jwk(key.public_key(), as_dict=True)
    elif alg == "ES256":
        key = ec.generate_private_key(ec.SECP256R1())
        public = ECAlgorithm.to_jwk(key.public_key(), as_dict=True)
    else:
        raise ValueError(f"unsupported alg {alg!r} (one of {', '.join(ALGORITHMS)})")
    jwk = {**public, "kid": kid, "alg": alg, "use": "sig"}
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return pem, json.dumps({"keys": [jwk]}, indent=2)


def mint(private_pem: bytes, alg: str, kid: str | None, claims: dict[str, Any]) -> str:
    """A token with ``claims`` signed by ``private_pem`` (``kid`` in the header if given)."""
    import jwt  # (see generate_key)

    if alg not in ALGORITHMS:
        raise ValueError(f"unsupported alg {alg!r} (one of {', '.join(ALGORITHMS)})")
    key = serialization.load_pem_private_key(private_pem, password=None)
    if not isinstance(key, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey):
        raise ValueError("expected an RSA or EC private key in PEM")
    headers = {"kid": kid} if kid else None
    return jwt.encode(claims, key, algorithm=alg, headers=headers)


# -- the command --------------------------------------------------------------------------


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``nodeagent jwt keygen`` and ``nodeagent jwt mint``."""
    p = sub.add_parser("jwt", help="make a signing key and tokens to try RequestAuthentication")
    jsub = p.add_subparsers(dest="jwt_command", required=True, metavar="COMMAND")
    kg = jsub.add_parser("keygen", help="a new key: private PEM + public JWKS")
    kg.add_argument("--alg", choices=ALGORITHMS, default="ES256", help="signing algorithm")
    kg.add_argument("--kid", default="key-1", help="key id (the JWKS kid)")
    kg.add_argument("--key-out", required=True, metavar="FILE", help="private key (PEM, 0600)")
    kg.add_argument("--jwks-out", required=True, metavar="FILE", help="public JWKS (JSON)")
    kg.set_defaults(func=_cmd_keygen)
    mt = jsub.add_parser("mint", help="a signed token, printed on stdout")
    mt.add_argument("--key", required=True, metavar="FILE", help="private key PEM (keygen)")
    mt.add_argument("--alg", choices=ALGORITHMS, default="ES256", help="signing algorithm")
    mt.add_argument("--kid", default="key-1", help="key id (the JWKS kid)")
    mt.add_argument("--iss", required=True, help="issuer (the iss claim)")
    mt.add_argument("--sub", required=True, help="subject (the sub claim)")
    mt.add_argument("--aud", action="append", default=[], help="an audience (repeatable)")
    mt.add_argument(
        "--expires-in",
        type=int,
        default=3600,
        metavar="SECONDS",
        help="exp = now + SECONDS (negative: already expired)",
    )
    mt.add_argument(
        "--claim",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help='another claim (VALUE parsed as JSON when it is JSON, e.g. \'["a","b"]\')',
    )
    mt.set_defaults(func=_cmd_mint)


def _cmd_keygen(args: argparse.Namespace) -> int:
    pem, jwks = generate_key(args.alg, args.kid)
    fd = os.open(args.key_out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    with open(args.jwks_out, "w", encoding="utf-8") as f:
        f.write(jwks + "\n")
    print(f"wrote {args.key_out} (private) and {args.jwks_out} (public JWKS)")
    return 0


def _cmd_mint(args: argparse.Namespace) -> int:
    try:
        with open(args.key, "rb") as f:
            pem = f.read()
    except OSError as e:
        print(f"nodeagent jwt mint: error: --key {args.key}: {e.strerror}", file=sys.stderr)
        return 1
    now = int(time.time())
    claims: dict[str, Any] = {"iss": args.iss, "sub": args.sub, "iat": now}
    claims["exp"] = now + args.expires_in
    if args.aud:
        claims["aud"] = args.aud[0] if len(args.aud) == 1 else args.aud
    for c in args.claim:
        name, sep, value = c.partition("=")
        if not sep or not name:
            print(f"nodeagent jwt mint: error: --claim {c!r}: expected NAME=VALUE", file=sys.stderr)
            return 1
        try:
            claims[name] = json.loads(value)
        except ValueError:
            claims[name] = value
    try:
        print(mint(pem, args.alg, args.kid, claims))
    except ValueError as e:
        print(f"nodeagent jwt mint: error: {e}", file=sys.stderr)
        return 1
    return 0
