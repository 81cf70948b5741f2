"""JWT request authentication with Istio's semantics (Envoy ``jwt_authn`` as Istio
configures it): which RequestAuthentications apply to a workload, JWKS text parsed into
key sets, tokens found in headers and query parameters, and the decision for one request.

Pure: no I/O, the time is passed in. Only RS256 and ES256 are accepted (``none``, HS* and
the rest are invalid tokens); signatures are checked with PyJWT over ``cryptography``.

The decision (``authenticate``), as in Istio: no token in any configured location is
``ABSENT`` (allowed, no principal; an AuthorizationPolicy may still require one). Every
token present must be valid for a rule that reads that location and names the token's
(unverified) ``iss``: signature by a key of the rule's set (by ``kid`` when both have one),
``exp``/``nbf`` against ``now`` with ``leeway``, and ``aud`` containing one of the rule's
audiences when it lists some. Any failure is ``INVALID`` with Envoy's reason (answer 401).
"""

from __future__ import annotations

import base64
import binascii
import enum
import json
import re
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Literal, TypeAlias
from urllib.parse import parse_qsl

if TYPE_CHECKING:
    import jwt

from nodeagent.model.authn import JWTHeader, JWTRule, RequestAuthentication
from nodeagent.model.objects import Pod

ALGORITHMS = ("RS256", "ES256")
MIN_RSA_BITS = 2048
SIGNATURE_CACHE = 1024
"""Tokens remembered (parsed, and signature checks per token and key object): an
ES256/RS256 check costs hundreds of µs and clients resend the same token with every
request (Envoy caches verified tokens too). ``exp``, ``nbf`` and ``aud`` are still
checked every time."""
MAX_TOKEN_BYTES = 16 * 1024
"""A longer token is invalid without being decoded."""
DEFAULT_HEADER = JWTHeader("authorization", "Bearer ")
DEFAULT_PARAM = "access_token"

Claim: TypeAlias = str | tuple[str, ...]


@lru_cache(maxsize=1)
def _verifier() -> jwt.PyJWS:
    """PyJWT's verifier, made when a token is first checked: PyJWT (with ``http.client``,
    ``urllib.request`` and ``email``, which it imports) is loaded only by a mesh that has
    a RequestAuthentication (0.8 MiB of each agent's RSS otherwise)."""
    import jwt

    return jwt.PyJWS(algorithms=list(ALGORITHMS))


_B64URL = re.compile(r"^[A-Za-z0-9_-]*$")


class Failure(enum.StrEnum):
    """Why a token is invalid, in Envoy's words (the 401 body)."""

    BAD_FORMAT = "Jwt is not in the form of Header.Payload.Signature with two dots and 3 sections"
    TOO_LARGE = "Jwt is too large"
    HEADER_BAD_BASE64 = "Jwt header is an invalid Base64url encoded"
    HEADER_BAD_JSON = "Jwt header is an invalid JSON"
    HEADER_BAD_ALG = "Jwt header [alg] field is required and must be a string"
    HEADER_ALG_NOT_SUPPORTED = "Jwt header [alg] is not supported"
    HEADER_BAD_KID = "Jwt header [kid] field is not a string"
    PAYLOAD_BAD_BASE64 = "Jwt payload is an invalid Base64url encoded"
    PAYLOAD_BAD_JSON = "Jwt payload is an invalid JSON"
    SIGNATURE_BAD_BASE64 = "Jwt signature is an invalid Base64url encoded"
    ISS_NOT_STRING = "Jwt payload [iss] field is not a string"
    SUB_NOT_STRING = "Jwt payload [sub] field is not a string"
    AZP_NOT_STRING = "Jwt payload [azp] field is not a string"
    AUD_NOT_STRINGS = "Jwt payload [aud] field is not a string or string list"
    EXP_NOT_NUMBER = "Jwt payload [exp] field is not a number"
    NBF_NOT_NUMBER = "Jwt payload [nbf] field is not a number"
    UNKNOWN_ISSUER = "Jwt issuer is not configured"
    NO_VALID_KEYS = "Jwks doesn't have any valid public key"
    KID_ALG_MISMATCH = "Jwks doesn't have key to match kid or alg from Jwt"
    VERIFICATION_FAILS = "Jwt verification fails"
    EXPIRED = "Jwt is expired"
    NOT_YET_VALID = "Jwt not yet valid"
    AUDIENCE_NOT_ALLOWED = "Audiences in Jwt are not allowed"


class _Rejected(Exception):
    def __init__(self, failure: Failure) -> None:
        super().__init__(failure.value)
        self.failure = failure


# --- key sets -------------------------------------------------------------------------


class JwksError(ValueError):
    """JWKS text that cannot be used: the message says why."""


@dataclass(frozen=True)
class Key:
    kid: str | None
    alg: str
    """RS256 (an RSA key) or ES256 (an EC P-256 key)."""
    jwk: jwt.PyJWK = field(compare=False, repr=False)


@dataclass(frozen=True)
class KeySet:
    """The usable public keys of one JWKS (an empty set verifies nothing)."""

    keys: tuple[Key, ...] = ()
    skipped: tuple[str, ...] = ()
    """Why each unusable key of the JWKS was left out (``keys[2] (kid 'x'): ...``)."""

    def matching(self, kid: str | None, alg: str) -> tuple[Key, ...]:
        """Keys for ``alg`` whose kid is ``kid`` (a missing kid on either side matches)."""
        return tuple(k for k in self.keys if k.alg == alg and (kid is None or k.kid in (None, kid)))


class _Unusable(Exception):
    """A JWKS entry we skip (another entry may still be usable)."""


def _jwk_alg(jwk: Mapping[str, Any]) -> str:
    kty = jwk.get("kty")
    if kty == "RSA":
        alg = "RS256"
    elif kty == "EC":
        if jwk.get("crv") != "P-256":
            raise _Unusable(f"EC curve {jwk.get('crv')!r} is not supported (only P-256)")
        alg = "ES256"
    else:
        raise _Unusable(f"kty {kty!r} is not supported (only RSA and EC)")
    if jwk.get("alg", alg) != alg:
        raise _Unusable(f"alg {jwk['alg']!r} is not supported (a {kty} key must be {alg})")
    if jwk.get("use", "sig") != "sig":
        raise _Unusable(f"use {jwk['use']!r} is not sig")
    return alg


def _key(jwk: Mapping[str, Any], kid: str | None) -> Key:
    import jwt

    alg = _jwk_alg(jwk)
    try:
        pyjwk = jwt.PyJWK(dict(jwk), algorithm=alg)
    except (jwt.PyJWTError, ValueError, TypeError) as e:
        raise _Unusable(f"invalid {jwk['kty']} key: {e}") from e
    bits = getattr(pyjwk.key, "key_size", MIN_RSA_BITS)
    if alg == "RS256" and bits < MIN_RSA_BITS:
        raise _Unusable(f"RSA key of {bits} bits is too short (at least {MIN_RSA_BITS})")
    return Key(kid=kid, alg=alg, jwk=pyjwk)


def parse_jwks(text: str) -> KeySet:
    """Parse JWKS JSON text (``{"keys": [...]}``); raise ``JwksError`` when no key is
    usable for RS256/ES256 or when an entry is a private key."""
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as e:
        raise JwksError(f"not JSON: {e.msg} (line {e.lineno}, column {e.colno})") from e
    except RecursionError:
        raise JwksError("not JSON we accept: nested too deeply") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("keys"), list):
        raise JwksError('expected a JSON object with a "keys" list')
    if not doc["keys"]:
        raise JwksError('"keys" is empty')
    keys: list[Key] = []
    skipped: list[str] = []
    for i, jwk in enumerate(doc["keys"]):
        where = f"keys[{i}]"
        if not isinstance(jwk, dict):
            skipped.append(f"{where}: not a JSON object")
            continue
        kid = jwk.get("kid")
        if kid is not None:
            where = f"{where} (kid {kid!r})"
        if kid is not None and not isinstance(kid, str):
            skipped.append(f"{where}: kid is not a string")
            continue
        if "d" in jwk:
            raise JwksError(f"{where} is a private key: a JWKS must hold public keys only")
        try:
            keys.append(_key(jwk, kid))
        except _Unusable as e:
            skipped.append(f"{where}: {e}")
    if not keys:
        raise JwksError(f"no key usable for {' or '.join(ALGORITHMS)}: {'; '.join(skipped)}")
    return KeySet(keys=tuple(keys), skipped=tuple(skipped))


# --- where tokens are ------------------------------------------------------------------


@dataclass(frozen=True)
class TokenLocation:
    kind: Literal["header", "param"]
    name: str
    """Lowercase header name, or query parameter name."""


def _params(query: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for name, value in parse_qsl(query):
        out.setdefault(name, value)
    return out


def _locate(
    rule: JWTRule, headers: Mapping[str, str], params: Mapping[str, str]
) -> list[tuple[TokenLocation, str]]:
    default = not rule.from_headers and not rule.from_params
    found: list[tuple[TokenLocation, str]] = []
    for h in (DEFAULT_HEADER,) if default else rule.from_headers:
        name = h.name.lower()
        value = headers.get(name)
        if value is None or not value.lower().startswith(h.prefix.lower()):
            continue
        token = value[len(h.prefix) :].strip()
        if token:
            found.append((TokenLocation("header", name), token))
    for p in (DEFAULT_PARAM,) if default else rule.from_params:
        token = params.get(p, "").strip()
        if token:
            found.append((TokenLocation("param", p), token))
    return found


def locate_tokens(
    rule: JWTRule, headers: Mapping[str, str], query: str
) -> tuple[tuple[TokenLocation, str], ...]:
    """Every token ``rule`` reads from this request, with where it was (headers keyed by
    lowercase name; ``query`` without the ``?``). Prefixes match case-insensitively."""
    return tuple(_locate(rule, headers, _params(query)))


def extract_token(rule: JWTRule, headers: Mapping[str, str], query: str) -> str | None:
    """The first token ``rule`` reads from this request, or None."""
    found = locate_tokens(rule, headers, query)
    return found[0][1] if found else None


# --- one token -------------------------------------------------------------------------


def _b64decode(segment: str, failure: Failure) -> bytes:
    if not _B64URL.match(segment):
        raise _Rejected(failure)
    try:
        return base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))
    except (binascii.Error, ValueError) as e:
        raise _Rejected(failure) from e


def _json_object(raw: bytes, failure: Failure) -> dict[str, Any]:
    try:
        value = json.loads(raw.decode())
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError is a ValueError;
        raise _Rejected(failure) from e  # deep nesting is just malformed here
    if not isinstance(value, dict):
        raise _Rejected(failure)
    return value


def _optional_str(payload: Mapping[str, Any], name: str, failure: Failure) -> str:
    value = payload.get(name, "")
    if not isinstance(value, str):
        raise _Rejected(failure)
    return value


def _optional_time(payload: Mapping[str, Any], name: str, failure: Failure) -> float | None:
    value = payload.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _Rejected(failure)
    return float(value)


@dataclass(frozen=True)
class _Token:
    """A token that is well formed (not yet trusted)."""

    raw: str
    alg: str
    kid: str | None
    payload: dict[str, Any]
    payload_json: str
    payload_b64: str
    iss: str
    sub: str
    azp: str
    audiences: tuple[str, ...]
    exp: float | None
    nbf: float | None


@lru_cache(maxsize=SIGNATURE_CACHE)
def _parse(token: str) -> _Token:
    """A well-formed token, decoded (remembered: clients resend the same token; a
    malformed one raises and is not remembered)."""
    if len(token) > MAX_TOKEN_BYTES:
        raise _Rejected(Failure.TOO_LARGE)
    parts = token.split(".")
    if len(parts) != 3:
        raise _Rejected(Failure.BAD_FORMAT)
    header = _json_object(_b64decode(parts[0], Failure.HEADER_BAD_BASE64), Failure.HEADER_BAD_JSON)
    alg = header.get("alg")
    if not isinstance(alg, str):
        raise _Rejected(Failure.HEADER_BAD_ALG)
    if alg not in ALGORITHMS:
        raise _Rejected(Failure.HEADER_ALG_NOT_SUPPORTED)
    kid = header.get("kid")
    if kid is not None and not isinstance(kid, str):
        raise _Rejected(Failure.HEADER_BAD_KID)
    raw_payload = _b64decode(parts[1], Failure.PAYLOAD_BAD_BASE64)
    payload = _json_object(raw_payload, Failure.PAYLOAD_BAD_JSON)
    _b64decode(parts[2], Failure.SIGNATURE_BAD_BASE64)
    aud = payload.get("aud", ())
    audiences = (aud,) if isinstance(aud, str) else aud
    if not isinstance(audiences, list | tuple) or not all(isinstance(a, str) for a in audiences):
        raise _Rejected(Failure.AUD_NOT_STRINGS)
    return _Token(
        raw=token,
        alg=alg,
        kid=kid,
        payload=payload,
        payload_json=raw_payload.decode(),
        payload_b64=parts[1],
        iss=_optional_str(payload, "iss", Failure.ISS_NOT_STRING),
        sub=_optional_str(payload, "sub", Failure.SUB_NOT_STRING),
        azp=_optional_str(payload, "azp", Failure.AZP_NOT_STRING),
        audiences=tuple(audiences),
        exp=_optional_time(payload, "exp", Failure.EXP_NOT_NUMBER),
        nbf=_optional_time(payload, "nbf", Failure.NBF_NOT_NUMBER),
    )


_SIGNATURES: OrderedDict[tuple[str, int], tuple[jwt.PyJWK, bool]] = OrderedDict()
"""(token, id of the key object) → (the key object, whether it signed the token)."""


def _signed_by(token: str, key: Key) -> bool:
    ck = (token, id(key.jwk))
    hit = _SIGNATURES.get(ck)
    if hit is not None and hit[0] is key.jwk:  # the same key object, not a reused id
        _SIGNATURES.move_to_end(ck)
        return hit[1]
    import jwt

    try:
        _verifier().decode_complete(token, key=key.jwk, algorithms=[key.alg])
        ok = True
    except jwt.PyJWTError:
        ok = False
    _SIGNATURES[ck] = (key.jwk, ok)
    if len(_SIGNATURES) > SIGNATURE_CACHE:
        _SIGNATURES.popitem(last=False)
    return ok


def _normalize_audience(aud: str) -> str:
    """Envoy compares audiences without ``http(s)://`` and a trailing ``/``."""
    for scheme in ("http://", "https://"):
        if aud.startswith(scheme):
            aud = aud[len(scheme) :]
    return aud.rstrip("/")


def _check(tok: _Token, rule: JWTRule, keys: KeySet, now: float, leeway: float) -> None:
    """Raise ``_Rejected`` unless ``tok`` is valid for ``rule`` (issuer already matched)."""
    if not keys.keys:
        raise _Rejected(Failure.NO_VALID_KEYS)
    candidates = keys.matching(tok.kid, tok.alg)
    if not candidates:
        raise _Rejected(Failure.KID_ALG_MISMATCH)
    if not any(_signed_by(tok.raw, k) for k in candidates):
        raise _Rejected(Failure.VERIFICATION_FAILS)
    if tok.exp is not None and now > tok.exp + leeway:
        raise _Rejected(Failure.EXPIRED)
    if tok.nbf is not None and now + leeway < tok.nbf:
        raise _Rejected(Failure.NOT_YET_VALID)
    if rule.audiences:
        allowed = {_normalize_audience(a) for a in rule.audiences}
        if not any(_normalize_audience(a) in allowed for a in tok.audiences):
            raise _Rejected(Failure.AUDIENCE_NOT_ALLOWED)


# --- the decision ----------------------------------------------------------------------


class AuthnStatus(enum.Enum):
    ABSENT = "absent"
    """No token anywhere a rule looks: allowed, without a request principal."""
    VALID = "valid"
    INVALID = "invalid"
    """A token is present and fails: answer 401 with ``reason``."""


def _no_claims() -> Mapping[str, Claim]:
    return MappingProxyType({})


@dataclass(frozen=True)
class AuthnResult:
    status: AuthnStatus
    reason: str = ""
    """For INVALID: a ``Failure`` value."""
    principal: str | None = None
    """``iss/sub`` of the (first) valid token (``request.auth.principal``)."""
    claims: Mapping[str, Claim] = field(default_factory=_no_claims)
    """Its claims: strings as is, string lists as tuples, numbers/booleans as JSON text,
    nested objects flattened to dotted keys (``user.email``)."""
    audiences: tuple[str, ...] = ()
    payload: str = ""
    """The payload JSON text."""
    rule: JWTRule | None = None
    location: TokenLocation | None = None
    remove_headers: tuple[str, ...] = ()
    """Apply first: headers that carried a token whose rule does not forward it, and every
    output header of the rules (so a client cannot forge them)."""
    set_headers: tuple[tuple[str, str], ...] = ()
    """Apply second, replacing: ``outputPayloadToHeader`` (the base64url payload) and
    ``outputClaimToHeaders`` of each valid token."""

    @property
    def allowed(self) -> bool:
        return self.status is not AuthnStatus.INVALID


@lru_cache(maxsize=SIGNATURE_CACHE)
def _claims(token: str) -> Mapping[str, Claim]:
    """The flattened claims of a well-formed token (remembered, like ``_parse``)."""
    out: dict[str, Claim] = {}
    _flatten(_parse(token).payload, "", out)
    return MappingProxyType(out)


def _flatten(obj: Mapping[str, Any], prefix: str, out: dict[str, Claim]) -> None:
    for name, value in obj.items():
        key = f"{prefix}{name}"
        if isinstance(value, dict):
            _flatten(value, f"{key}.", out)
        elif isinstance(value, list):
            out[key] = tuple(_scalar(v) for v in value if not isinstance(v, dict | list))
        else:
            out[key] = _scalar(value)


def _scalar(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def _header_safe(value: str) -> bool:
    return not any(c in value for c in "\r\n\0")


def _outputs(rule: JWTRule, tok: _Token, claims: Mapping[str, Claim]) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    if rule.output_payload_to_header:
        out.append((rule.output_payload_to_header, tok.payload_b64))
    for ch in rule.output_claim_to_headers:
        value = claims.get(ch.claim)
        text = ",".join(value) if isinstance(value, tuple) else value
        if text and _header_safe(text):
            out.append((ch.header, text))
    return out


def _output_names(rules: Iterable[JWTRule]) -> list[str]:
    names: list[str] = []
    for rule in rules:
        if rule.output_payload_to_header:
            names.append(rule.output_payload_to_header)
        names.extend(ch.header for ch in rule.output_claim_to_headers)
    return names


@dataclass(frozen=True)
class _Found:
    location: TokenLocation
    token: str
    rules: tuple[int, ...]
    """Indexes of the rules that read this token at this location."""


def _found(
    rules: Sequence[tuple[JWTRule, KeySet]], headers: Mapping[str, str], query: str
) -> list[_Found]:
    params = _params(query)
    by_place: dict[tuple[TokenLocation, str], list[int]] = {}
    for i, (rule, _) in enumerate(rules):
        for location, token in _locate(rule, headers, params):
            by_place.setdefault((location, token), []).append(i)
    return [_Found(loc, tok, tuple(idx)) for (loc, tok), idx in by_place.items()]


def _verify(
    f: _Found, rules: Sequence[tuple[JWTRule, KeySet]], now: float, leeway: float
) -> tuple[_Token, JWTRule]:
    tok = _parse(f.token)
    same_issuer = [rules[i] for i in f.rules if rules[i][0].issuer == tok.iss]
    if not same_issuer:
        raise _Rejected(Failure.UNKNOWN_ISSUER)
    first: _Rejected | None = None
    for rule, keys in same_issuer:
        try:
            _check(tok, rule, keys, now, leeway)
        except _Rejected as e:
            first = first or e
            continue
        return tok, rule
    assert first is not None
    raise first


def authenticate(
    rules: Sequence[tuple[JWTRule, KeySet]],
    headers: Mapping[str, str],
    query: str,
    now: float,
    leeway: float = 0.0,
) -> AuthnResult:
    """Decide for one request. ``rules``: the JWT rules of every RequestAuthentication
    that applies to the workload, each with its key set; ``headers`` keyed by lowercase
    name; ``query`` without the ``?``; ``now`` in seconds since the epoch; ``leeway``
    (0-60 s) for ``exp`` and ``nbf``."""
    remove = _output_names(r for r, _ in rules)
    set_headers: list[tuple[str, str]] = []
    verified: list[tuple[_Found, _Token, JWTRule, Mapping[str, Claim]]] = []
    for f in _found(rules, headers, query):
        try:
            tok, rule = _verify(f, rules, now, leeway)
        except _Rejected as e:
            return AuthnResult(AuthnStatus.INVALID, reason=e.failure.value)
        claims = _claims(tok.raw)
        if f.location.kind == "header" and not rule.forward_original_token:
            remove.append(f.location.name)
        set_headers.extend(_outputs(rule, tok, claims))
        verified.append((f, tok, rule, claims))
    if not verified:
        return AuthnResult(AuthnStatus.ABSENT, remove_headers=tuple(dict.fromkeys(remove)))
    f, tok, rule, claims = verified[0]
    return AuthnResult(
        AuthnStatus.VALID,
        principal=f"{tok.iss}/{tok.sub}",
        claims=claims,
        audiences=tok.audiences,
        payload=tok.payload_json,
        rule=rule,
        location=f.location,
        remove_headers=tuple(dict.fromkeys(remove)),
        set_headers=tuple(set_headers),
    )


# --- which policies apply ----------------------------------------------------------------


def applicable_policies(
    policies: Iterable[RequestAuthentication], pod: Pod, root_namespace: str
) -> tuple[RequestAuthentication, ...]:
    """The RequestAuthentications for ``pod``, sorted by namespace/name; their rules all
    apply together (Istio merges them). Root namespace: no selector is every workload, a
    selector the matching pods of any namespace; the pod's namespace: no selector is all
    its workloads, a selector the matching ones."""
    return tuple(
        sorted(
            (
                p
                for p in policies
                if p.namespace in (pod.namespace, root_namespace)
                and (p.selector is None or pod.labels.matches(p.selector))
            ),
            key=lambda p: p.key,
        )
    )
