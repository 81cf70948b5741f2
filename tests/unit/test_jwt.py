"""RequestAuthentication: JWKS parsing, token extraction, the authenticate decision (with
real RS256/ES256 keys) and the config conversion's errors, each named by field path."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from collections.abc import Callable
from typing import Any

import pytest
import yaml
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

from nodeagent.control.authn import (
    REQUEST_AUTHENTICATION,
    check_jwks_uri,
    convert_request_authentication,
)
from nodeagent.control.schema import Problems, check
from nodeagent.core.jwt import (
    AuthnResult,
    AuthnStatus,
    Failure,
    JwksError,
    KeySet,
    TokenLocation,
    applicable_policies,
    authenticate,
    extract_token,
    parse_jwks,
)
from nodeagent.model.authn import ClaimToHeader, JWTHeader, JWTRule, RequestAuthentication
from nodeagent.model.objects import Labels, Pod
from nodeagent.samples.jwtmint import generate_key, mint

NOW = 1_700_000_000.0
ISS = "https://issuer.example"
RSA_PEM, RSA_JWKS = generate_key("RS256", kid="rsa-1")
EC_PEM, EC_JWKS = generate_key("ES256", kid="ec-1")
OTHER_PEM, _ = generate_key("RS256", kid="rsa-1")  # same kid, different key
RSA_RULE = JWTRule(issuer=ISS, jwks=RSA_JWKS)
EC_RULE = JWTRule(issuer="ec-issuer", jwks=EC_JWKS, audiences=("api",))


def claims(**over: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"iss": ISS, "sub": "alice", "exp": NOW + 60, "nbf": NOW - 60}
    base.update(over)
    return {k: v for k, v in base.items() if v is not None}


def rsa_token(**over: Any) -> str:
    return mint(RSA_PEM, "RS256", "rsa-1", claims(**over))


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


RS256_HEADER = b64(json.dumps({"alg": "RS256"}).encode())


def unsigned(header: dict[str, Any], payload: dict[str, Any], sig: bytes = b"") -> str:
    return f"{b64(json.dumps(header).encode())}.{b64(json.dumps(payload).encode())}.{b64(sig)}"


def hs256_with_public_key() -> str:
    """The classic confusion attack: HMAC keyed with the RSA public key's PEM."""
    secret = (
        parse_jwks(RSA_JWKS)
        .keys[0]
        .jwk.key.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    head = b64(json.dumps({"alg": "HS256", "kid": "rsa-1", "typ": "JWT"}).encode())
    body = b64(json.dumps(claims()).encode())
    sig = hmac.new(secret, f"{head}.{body}".encode(), hashlib.sha256).digest()
    return f"{head}.{body}.{b64(sig)}"


def run(
    token: str | None,
    rules: tuple[JWTRule, ...] = (RSA_RULE,),
    headers: dict[str, str] | None = None,
    query: str = "",
    leeway: float = 0.0,
) -> AuthnResult:
    h = dict(headers or {})
    if token is not None:
        h["authorization"] = f"Bearer {token}"
    pairs = [(r, parse_jwks(r.jwks or "")) for r in rules]
    return authenticate(pairs, h, query, NOW, leeway)


# --- authenticate ----------------------------------------------------------------------


def test_valid_rs256_gives_principal_and_claims() -> None:
    tok = rsa_token(aud=["a", "b"], groups=["dev", "ops"], n=3, ok=True, user={"email": "a@x"})
    r = run(tok)
    assert r.status is AuthnStatus.VALID and r.allowed
    assert r.principal == f"{ISS}/alice"
    assert r.claims["sub"] == "alice"
    assert r.claims["groups"] == ("dev", "ops")
    assert r.claims["n"] == "3" and r.claims["ok"] == "true"
    assert r.claims["user.email"] == "a@x"
    assert r.audiences == ("a", "b")
    assert json.loads(r.payload)["sub"] == "alice"
    assert r.rule == RSA_RULE
    assert r.location == TokenLocation("header", "authorization")
    assert r.remove_headers == ("authorization",)


def test_valid_es256() -> None:
    tok = mint(EC_PEM, "ES256", "ec-1", claims(iss="ec-issuer", sub="bob", aud="api"))
    r = run(tok, rules=(RSA_RULE, EC_RULE))
    assert r.status is AuthnStatus.VALID
    assert r.principal == "ec-issuer/bob"
    assert r.rule == EC_RULE


def test_token_without_kid_tries_each_key() -> None:
    tok = mint(RSA_PEM, "RS256", None, claims())
    assert run(tok).status is AuthnStatus.VALID


INVALID: list[tuple[str, Callable[[], str], tuple[JWTRule, ...], Failure]] = [
    ("expired", lambda: rsa_token(exp=NOW - 1), (RSA_RULE,), Failure.EXPIRED),
    ("nbf in future", lambda: rsa_token(nbf=NOW + 30), (RSA_RULE,), Failure.NOT_YET_VALID),
    ("wrong issuer", lambda: rsa_token(iss="evil"), (RSA_RULE,), Failure.UNKNOWN_ISSUER),
    ("no issuer", lambda: rsa_token(iss=None), (RSA_RULE,), Failure.UNKNOWN_ISSUER),
    (
        "wrong audience",
        lambda: mint(EC_PEM, "ES256", "ec-1", claims(iss="ec-issuer", aud=["web", "x"])),
        (EC_RULE,),
        Failure.AUDIENCE_NOT_ALLOWED,
    ),
    (
        "audience missing",
        lambda: mint(EC_PEM, "ES256", "ec-1", claims(iss="ec-issuer")),
        (EC_RULE,),
        Failure.AUDIENCE_NOT_ALLOWED,
    ),
    (
        "other key, same kid",
        lambda: mint(OTHER_PEM, "RS256", "rsa-1", claims()),
        (RSA_RULE,),
        Failure.VERIFICATION_FAILS,
    ),
    (
        "unknown kid",
        lambda: mint(RSA_PEM, "RS256", "nope", claims()),
        (RSA_RULE,),
        Failure.KID_ALG_MISMATCH,
    ),
    (
        "ES256 token, only RSA keys",
        lambda: mint(EC_PEM, "ES256", None, claims()),
        (RSA_RULE,),
        Failure.KID_ALG_MISMATCH,
    ),
    (
        "alg none",
        lambda: unsigned({"alg": "none", "typ": "JWT"}, claims()),
        (RSA_RULE,),
        Failure.HEADER_ALG_NOT_SUPPORTED,
    ),
    (
        "HS256 keyed with the public key",
        hs256_with_public_key,
        (RSA_RULE,),
        Failure.HEADER_ALG_NOT_SUPPORTED,
    ),
    (
        "alg missing",
        lambda: unsigned({"typ": "JWT"}, claims()),
        (RSA_RULE,),
        Failure.HEADER_BAD_ALG,
    ),
    (
        "tampered payload",
        lambda: ".".join(
            (p if i != 1 else b64(json.dumps(claims(sub="admin")).encode()))
            for i, p in enumerate(rsa_token().split("."))
        ),
        (RSA_RULE,),
        Failure.VERIFICATION_FAILS,
    ),
    ("two sections", lambda: "abc.def", (RSA_RULE,), Failure.BAD_FORMAT),
    ("bad header base64", lambda: "a*b.c.d", (RSA_RULE,), Failure.HEADER_BAD_BASE64),
    ("header not JSON", lambda: f"{b64(b'{x')}.e30.", (RSA_RULE,), Failure.HEADER_BAD_JSON),
    (
        "payload not JSON",
        lambda: f"{RS256_HEADER}.{b64(b'[1]')}.",
        (RSA_RULE,),
        Failure.PAYLOAD_BAD_JSON,
    ),
    (
        "exp not a number",
        lambda: rsa_token(exp="tomorrow"),
        (RSA_RULE,),
        Failure.EXP_NOT_NUMBER,
    ),
    ("aud not strings", lambda: rsa_token(aud=[1]), (RSA_RULE,), Failure.AUD_NOT_STRINGS),
]


@pytest.mark.parametrize(
    ("make", "rules", "failure"),
    [case[1:] for case in INVALID],
    ids=[case[0] for case in INVALID],
)
def test_invalid_tokens(
    make: Callable[[], str], rules: tuple[JWTRule, ...], failure: Failure
) -> None:
    r = run(make(), rules=rules)
    assert r.status is AuthnStatus.INVALID and not r.allowed
    assert r.reason == failure.value
    assert r.principal is None


@pytest.mark.parametrize(
    ("aud", "allowed", "ok"),
    [
        (["x", "api"], ("api",), True),
        ("api", ("other", "api"), True),
        ("https://api.example/", ("api.example",), True),  # Envoy's normalization
        (["x"], ("api",), False),
        (None, (), True),  # no audiences configured: any (or none) accepted
    ],
)
def test_audiences(aud: Any, allowed: tuple[str, ...], ok: bool) -> None:
    rule = JWTRule(issuer=ISS, jwks=RSA_JWKS, audiences=allowed)
    r = run(rsa_token(aud=aud), rules=(rule,))
    assert (r.status is AuthnStatus.VALID) is ok


def test_leeway() -> None:
    assert run(rsa_token(exp=NOW - 30), leeway=60).status is AuthnStatus.VALID
    assert run(rsa_token(nbf=NOW + 30), leeway=60).status is AuthnStatus.VALID
    assert run(rsa_token(exp=NOW - 61), leeway=60).reason == Failure.EXPIRED


def test_absent_token_is_allowed_without_principal() -> None:
    r = run(None, headers={"x-other": "1"}, query="a=b")
    assert r.status is AuthnStatus.ABSENT and r.allowed
    assert r.principal is None and not r.claims


def test_other_authorization_scheme_is_absent() -> None:
    r = run(None, headers={"authorization": "Basic dXNlcjpwdw=="})
    assert r.status is AuthnStatus.ABSENT


def test_custom_header_with_prefix() -> None:
    rule = JWTRule(issuer=ISS, jwks=RSA_JWKS, from_headers=(JWTHeader("x-jwt", "Token "),))
    tok = rsa_token()
    r = run(None, rules=(rule,), headers={"x-jwt": f"Token {tok}"})
    assert r.status is AuthnStatus.VALID
    assert r.location == TokenLocation("header", "x-jwt")
    # the default location is not read once fromHeaders is given
    assert run(tok, rules=(rule,)).status is AuthnStatus.ABSENT


def test_query_param() -> None:
    assert run(None, query=f"x=1&access_token={rsa_token()}").status is AuthnStatus.VALID
    rule = JWTRule(issuer=ISS, jwks=RSA_JWKS, from_params=("jwt",))
    r = run(None, rules=(rule,), query=f"jwt={rsa_token()}")
    assert r.status is AuthnStatus.VALID
    assert r.location == TokenLocation("param", "jwt")
    assert r.remove_headers == ()  # Envoy strips headers only


def test_every_present_token_must_be_valid() -> None:
    r = run(rsa_token(), query=f"access_token={rsa_token(exp=NOW - 5)}")
    assert r.reason == Failure.EXPIRED


def test_token_only_counts_for_rules_reading_its_location() -> None:
    ec_in_header = JWTRule(issuer="ec-issuer", jwks=EC_JWKS, from_headers=(JWTHeader("x-ec"),))
    tok = mint(EC_PEM, "ES256", "ec-1", claims(iss="ec-issuer"))
    assert run(tok, rules=(RSA_RULE, ec_in_header)).reason == Failure.UNKNOWN_ISSUER
    r = run(None, rules=(RSA_RULE, ec_in_header), headers={"x-ec": tok})
    assert r.status is AuthnStatus.VALID


def test_rules_with_same_issuer_are_tried_in_turn() -> None:
    other = JWTRule(issuer=ISS, jwks=EC_JWKS)
    assert run(rsa_token(), rules=(other, RSA_RULE)).rule == RSA_RULE


def test_output_headers_and_forwarding() -> None:
    rule = JWTRule(
        issuer=ISS,
        jwks=RSA_JWKS,
        output_payload_to_header="x-jwt-payload",
        forward_original_token=True,
        output_claim_to_headers=(
            ClaimToHeader("x-sub", "sub"),
            ClaimToHeader("x-groups", "groups"),
            ClaimToHeader("x-none", "missing"),
        ),
    )
    tok = rsa_token(groups=["a", "b"])
    r = run(tok, rules=(rule,))
    assert r.status is AuthnStatus.VALID
    assert r.remove_headers == ("x-jwt-payload", "x-sub", "x-groups", "x-none")
    assert dict(r.set_headers) == {
        "x-jwt-payload": tok.split(".")[1],
        "x-sub": "alice",
        "x-groups": "a,b",
    }
    # without a token, output headers a client sent are still removed (no forgery)
    assert run(None, rules=(rule,)).remove_headers == r.remove_headers


def test_extract_token() -> None:
    rule = JWTRule(issuer=ISS, from_headers=(JWTHeader("x-a", "Bearer "), JWTHeader("x-b")))
    assert extract_token(rule, {"x-b": " t1 "}, "") == "t1"
    assert extract_token(rule, {"x-a": "bearer t2", "x-b": "t1"}, "") == "t2"
    assert extract_token(rule, {"x-a": "Bearer "}, "") is None
    assert extract_token(JWTRule(issuer=ISS), {}, "access_token=t3") == "t3"
    assert extract_token(JWTRule(issuer=ISS), {"authorization": "Bearer t4"}, "") == "t4"


# --- JWKS ------------------------------------------------------------------------------


def _jwks(*keys: object) -> str:
    return json.dumps({"keys": list(keys)})


def _public_jwk(key: Any, **extra: Any) -> dict[str, Any]:
    algo = RSAAlgorithm if isinstance(key, rsa.RSAPublicKey) else ECAlgorithm
    jwk: dict[str, Any] = algo.to_jwk(key, as_dict=True)
    return {**jwk, **extra}


P384 = _public_jwk(ec.generate_private_key(ec.SECP384R1()).public_key())
RSA_1024 = _public_jwk(rsa.generate_private_key(65537, 1024).public_key())
RSA_OK = json.loads(RSA_JWKS)["keys"][0]


def test_parse_jwks_keeps_usable_keys_and_says_why_others_are_skipped() -> None:
    ks = parse_jwks(_jwks({"kty": "oct", "k": "c2VjcmV0"}, RSA_OK, P384))
    assert [(k.kid, k.alg) for k in ks.keys] == [("rsa-1", "RS256")]
    assert ks.skipped == (
        "keys[0]: kty 'oct' is not supported (only RSA and EC)",
        "keys[2]: EC curve 'P-384' is not supported (only P-256)",
    )
    assert parse_jwks(EC_JWKS).keys[0].alg == "ES256"
    assert KeySet().matching(None, "RS256") == ()


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("{nope", "not JSON"),
        ("[]", 'expected a JSON object with a "keys" list'),
        ('{"keys": []}', '"keys" is empty'),
        (_jwks({"kty": "oct", "k": "c2VjcmV0"}), "kty 'oct' is not supported"),
        (_jwks(P384), "EC curve 'P-384' is not supported"),
        (_jwks({**RSA_OK, "alg": "RS512"}), "alg 'RS512' is not supported"),
        (_jwks({**RSA_OK, "use": "enc"}), "use 'enc' is not sig"),
        (_jwks(RSA_1024), "RSA key of 1024 bits is too short"),
        (_jwks({"kty": "RSA", "n": "!!", "e": "AQAB"}), "invalid RSA key"),
        (_jwks({**RSA_OK, "d": "AQAB"}), "is a private key"),
        (_jwks("x"), "keys[0]: not a JSON object"),
    ],
)
def test_parse_jwks_errors(text: str, message: str) -> None:
    with pytest.raises(JwksError) as e:
        parse_jwks(text)
    assert message in str(e.value)


# --- which policies apply --------------------------------------------------------------


def test_applicable_policies() -> None:
    pod = Pod("shop", "web", "n1", labels=Labels.of({"app": "web"}))

    def ra(ns: str, name: str, app: str | None = None) -> RequestAuthentication:
        sel = Labels.of({"app": app}) if app else None
        return RequestAuthentication(ns, name, selector=sel)

    pols = [
        ra("istio-system", "mesh"),
        ra("istio-system", "mesh-web", "web"),
        ra("shop", "ns"),
        ra("shop", "web", "web"),
        ra("shop", "db", "db"),
        ra("blog", "ns"),
    ]
    names = [p.key for p in applicable_policies(pols, pod, "istio-system")]
    assert names == ["istio-system/mesh", "istio-system/mesh-web", "shop/ns", "shop/web"]


# --- config ----------------------------------------------------------------------------


def convert(spec: str) -> tuple[RequestAuthentication | None, list[tuple[str, str]]]:
    """As ``schema.validate`` does: the shape first, then the conversion."""
    doc = yaml.safe_load(
        "apiVersion: security.istio.io/v1\nkind: RequestAuthentication\n"
        f"metadata: {{name: jwt, namespace: shop}}\nspec:\n{spec}"
    )
    problems = Problems()
    check(doc, REQUEST_AUTHENTICATION, "", problems)
    if problems.items:
        return None, problems.items
    obj = convert_request_authentication(doc, "f.yaml", problems)
    return obj, problems.items


def _indent(text: str, n: int) -> str:
    return text.replace("\n", "\n" + " " * n)


def test_config_converts() -> None:
    obj, problems = convert(
        "  selector: {matchLabels: {app: web}}\n"
        "  jwtRules:\n"
        f"  - issuer: {ISS}\n"
        "    audiences: [api]\n"
        f"    jwks: |\n      {_indent(RSA_JWKS, 6)}\n"
        "    fromHeaders: [{name: X-JWT, prefix: 'Token '}]\n"
        "    fromParams: [jwt]\n"
        "    outputPayloadToHeader: X-Payload\n"
        "    forwardOriginalToken: true\n"
        "    outputClaimToHeaders: [{header: X-Sub, claim: sub}]\n"
        "  - {issuer: b, jwksUri: '/etc/jwks.json'}\n"
        "  - {issuer: c, jwksUri: 'file:///etc/jwks.json'}\n"
    )
    assert problems == []
    assert obj is not None and obj.key == "shop/jwt" and obj.source == "f.yaml"
    assert obj.selector == Labels.of({"app": "web"})
    first = obj.jwt_rules[0]
    assert first == JWTRule(
        issuer=ISS,
        audiences=("api",),
        jwks=first.jwks,
        from_headers=(JWTHeader("x-jwt", "Token "),),
        from_params=("jwt",),
        output_payload_to_header="x-payload",
        forward_original_token=True,
        output_claim_to_headers=(ClaimToHeader("x-sub", "sub"),),
    )
    assert parse_jwks(first.jwks or "").keys[0].kid == "rsa-1"
    assert obj.jwt_rules[2].jwks_uri == "file:///etc/jwks.json"


@pytest.mark.parametrize(
    ("spec", "path", "message"),
    [
        (
            "  jwtRules: [{issuer: a, jwksUri: /k, bogus: 1}]",
            "spec.jwtRules[0].bogus",
            "unknown field",
        ),
        ("  jwtRules: [{jwksUri: /k}]", "spec.jwtRules[0].issuer", "required field is missing"),
        ("  jwtRules: [{issuer: '', jwksUri: /k}]", "spec.jwtRules[0].issuer", "must not be empty"),
        ("  jwtRules: [{issuer: a}]", "spec.jwtRules[0]", "needs jwks or jwksUri"),
        (
            "  jwtRules: [{issuer: a, jwks: '{\"keys\": []}'}]",
            "spec.jwtRules[0].jwks",
            'not a usable JWKS: "keys" is empty',
        ),
        (
            "  jwtRules: [{issuer: a, jwks: 'nope'}]",
            "spec.jwtRules[0].jwks",
            "not a usable JWKS: not JSON",
        ),
        (
            f"  jwtRules: [{{issuer: a, jwks: '{_jwks(P384)}'}}]",
            "spec.jwtRules[0].jwks",
            "EC curve 'P-384' is not supported",
        ),
        (
            f"  jwtRules: [{{issuer: a, jwksUri: /k, jwks: '{RSA_JWKS.replace(chr(10), '')}'}}]",
            "spec.jwtRules[0].jwksUri",
            "not both",
        ),
        (
            "  jwtRules: [{issuer: a, jwksUri: k.json}]",
            "spec.jwtRules[0].jwksUri",
            "expected https",
        ),
        (
            "  jwtRules: [{issuer: a, jwksUri: /k, audiences: ['']}]",
            "spec.jwtRules[0].audiences[0]",
            "must not be empty",
        ),
        (
            "  jwtRules: [{issuer: a, jwksUri: /k, fromHeaders: [{name: 'x y'}]}]",
            "spec.jwtRules[0].fromHeaders[0].name",
            "not a valid HTTP header name",
        ),
        (
            "  jwtRules: [{issuer: a, jwksUri: /k, fromHeaders: [{prefix: x}]}]",
            "spec.jwtRules[0].fromHeaders[0].name",
            "required field is missing",
        ),
        (
            "  jwtRules: [{issuer: a, jwksUri: /k, fromCookies: [session]}]",
            "spec.jwtRules[0].fromCookies",
            "not supported",
        ),
        (
            "  jwtRules: [{issuer: a, jwksUri: /k, forwardOriginalToken: 'yes'}]",
            "spec.jwtRules[0].forwardOriginalToken",
            "expected boolean",
        ),
        ("  targetRef: {kind: Gateway, name: gw}", "spec.targetRef", "not supported"),
        ("  selector: {matchLabels: {}}", "spec.selector.matchLabels", "selects nothing"),
    ],
)
def test_config_errors(spec: str, path: str, message: str) -> None:
    _, problems = convert(spec)
    assert any(p == path and message in m for p, m in problems), problems


@pytest.mark.parametrize(
    ("uri", "ok"),
    [
        ("/etc/jwks.json", True),
        ("file:///etc/jwks.json", True),
        ("http://keys.default.svc.cluster.local/jwks", True),
        ("http://10.0.0.1:8080/jwks", True),
        ("file://host/etc/jwks.json", False),
        ("file:jwks.json", False),
        ("https://example.com/jwks", True),
        ("https://[::1]:8443/jwks", True),
        ("https:///jwks", False),
        ("ftp://example.com/jwks", False),
        ("http:///jwks", False),
        ("http://h:99999/jwks", False),
        ("jwks.json", False),
    ],
)
def test_jwks_uri_forms(uri: str, ok: bool) -> None:
    assert (check_jwks_uri(uri) is None) is ok


# --- jwtmint ---------------------------------------------------------------------------


def test_mint_rejects_unsupported_algs() -> None:
    with pytest.raises(ValueError, match="unsupported alg"):
        generate_key("HS256")
    with pytest.raises(ValueError, match="unsupported alg"):
        mint(RSA_PEM, "none", None, {})


def test_hostile_tokens_are_invalid_not_exceptions() -> None:
    """Deeply nested JSON in a segment and oversize tokens are 401s, never a crash."""
    import base64

    deep = base64.urlsafe_b64encode(b"[" * 5000).decode().rstrip("=")
    for tok in (f"{deep}.e30.c2ln", f"eyJhbGciOiJFUzI1NiJ9.{deep}.c2ln", "a" * 20000 + ".b.c"):
        rule = JWTRule(issuer=ISS)
        r = authenticate([(rule, KeySet())], {"authorization": f"Bearer {tok}"}, "", 0.0)
        assert r.status is AuthnStatus.INVALID, r
    with pytest.raises(JwksError):
        parse_jwks("[" * 5000)
