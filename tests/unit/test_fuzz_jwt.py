"""Fuzzing JWT authentication (``core/jwt.py`` ``authenticate``) with real RS256 and ES256
keys: random tokens, tokens built from random JSON, and real tokens with bytes changed,
in the header or a query parameter. ``authenticate`` never raises; nothing but the token
as signed is valid; a changed token is invalid."""

from __future__ import annotations

import base64
import json
from typing import Any

from fuzzing import fuzz
from hypothesis import example, given
from hypothesis import strategies as st

from nodeagent.core.jwt import AuthnStatus, KeySet, authenticate, parse_jwks
from nodeagent.model.authn import JWTRule
from nodeagent.samples.jwtmint import generate_key, mint

NOW = 1_700_000_000.0
ISS = "https://issuer.example"
RSA_PEM, RSA_JWKS = generate_key("RS256", kid="rsa-1")
EC_PEM, EC_JWKS = generate_key("ES256", kid="ec-1")
RULES: list[tuple[JWTRule, KeySet]] = [
    (JWTRule(issuer=ISS, jwks=RSA_JWKS), parse_jwks(RSA_JWKS)),
    (JWTRule(issuer="ec", jwks=EC_JWKS, audiences=("api",)), parse_jwks(EC_JWKS)),
]
CLAIMS: dict[str, Any] = {"iss": ISS, "sub": "alice", "exp": NOW + 60, "nbf": NOW - 60}
TOKENS = [
    mint(RSA_PEM, "RS256", "rsa-1", CLAIMS),
    mint(EC_PEM, "ES256", "ec-1", {**CLAIMS, "iss": "ec", "aud": ["api"]}),
    mint(RSA_PEM, "RS256", None, {**CLAIMS, "user": {"email": "a@b", "roles": ["x", 1]}}),
]
B64URL = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"


def verdict(token: str, where: str = "header") -> AuthnStatus:
    headers = {"authorization": f"Bearer {token}"} if where == "header" else {}
    query = f"access_token={token}" if where == "query" else ""
    return authenticate(RULES, headers, query, NOW).status


def test_the_tokens_are_valid() -> None:
    assert [verdict(t) for t in TOKENS] == [AuthnStatus.VALID] * 3


def b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner,
                                                                 max_size=3),
    max_leaves=10,
)  # fmt: skip


@st.composite
def random_tokens(draw: st.DrawFn) -> str:
    """Random text; three random base64url segments; or a header and payload of random
    JSON (with the fields authentication reads, of random types) and a random signature."""
    shape = draw(st.integers(0, 2))
    if shape == 0:
        return draw(st.text(max_size=200))
    if shape == 1:
        segs = st.text(B64URL + "=+/.", max_size=80)
        return ".".join(draw(st.lists(segs, min_size=1, max_size=4)))
    fields = st.sampled_from(["alg", "kid", "typ", "iss", "sub", "aud", "exp", "nbf", "azp"])
    header = draw(st.dictionaries(fields, json_values, max_size=4))
    if draw(st.booleans()):
        header["alg"] = draw(st.sampled_from(["RS256", "ES256", "none", "HS256"]))
    payload = draw(st.dictionaries(fields, json_values, max_size=6))
    if draw(st.booleans()):
        payload["iss"] = draw(st.sampled_from([ISS, "ec"]))
    sig = draw(st.binary(max_size=300))
    return ".".join(b64(json.dumps(x).encode()) for x in (header, payload)) + "." + b64(sig)


@fuzz(2)
@given(random_tokens(), st.sampled_from(["header", "query"]))
def test_random_tokens_are_never_valid_and_never_raise(token: str, where: str) -> None:
    status = verdict(token, where)
    assert status is not AuthnStatus.VALID
    if status is AuthnStatus.ABSENT:  # only when nothing is left after the prefix
        assert not token.strip() or where == "query"


@fuzz(3)
@given(
    st.sampled_from(TOKENS),
    st.lists(st.tuples(st.integers(0, 2000), st.sampled_from(B64URL + ".=+/ \x00é")),
             min_size=1, max_size=3),
)  # fmt: skip
@example(TOKENS[0], [(len(TOKENS[0]) - 1, B64URL[B64URL.index(TOKENS[0][-1]) ^ 1])])
# the lowest bit of the last character is a spare one (342 characters hold 2048 bits + 4):
# the signature decodes to the same bytes, and the token must still be refused
def test_a_valid_token_with_bytes_changed_is_invalid(
    token: str, changes: list[tuple[int, str]]
) -> None:
    chars = list(token)
    for at, char in changes:
        chars[at % len(chars)] = char
    changed = "".join(chars)
    if changed == token:
        return
    assert verdict(changed) is AuthnStatus.INVALID, changed
