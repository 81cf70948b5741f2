"""The ``security.istio.io`` RequestAuthentication kind: its shape (the supported subset of
Istio's fields) and its conversion to ``model.authn.RequestAuthentication``, each problem
named by field path. Inline JWKS are parsed here, once, so a bad key set is a config error.
"""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import urlsplit

from nodeagent.control.fields import read_meta, workload_selector
from nodeagent.control.schema import (
    BOOL,
    STR,
    STR_LIST,
    STR_MAP,
    AnyShape,
    Kind,
    ListOf,
    Obj,
    Problems,
    resource,
)
from nodeagent.control.security import API_VERSIONS
from nodeagent.core.jwt import JwksError, parse_jwks
from nodeagent.model.authn import ClaimToHeader, JWTHeader, JWTRule, RequestAuthentication

JWT_RULE = Obj(
    {
        "issuer": STR,
        "audiences": STR_LIST,
        "jwks": STR,
        "jwksUri": STR,
        "fromHeaders": ListOf(Obj({"name": STR, "prefix": STR}, required=frozenset({"name"}))),
        "fromParams": STR_LIST,
        "outputPayloadToHeader": STR,
        "forwardOriginalToken": BOOL,
        "outputClaimToHeaders": ListOf(
            Obj({"header": STR, "claim": STR}, required=frozenset({"header", "claim"}))
        ),
        "fromCookies": AnyShape(),
        "timeout": AnyShape(),
    },
    required=frozenset({"issuer"}),
)
REQUEST_AUTHENTICATION = resource(
    Obj(
        {
            "selector": Obj({"matchLabels": STR_MAP}),
            "jwtRules": ListOf(JWT_RULE),
            "targetRef": AnyShape(),
            "targetRefs": AnyShape(),
        }
    ),
)

_UNSUPPORTED_SPEC = {
    "targetRef": "targetRef (Gateway API attachment) is not supported; use selector",
    "targetRefs": "targetRefs (Gateway API attachment) is not supported; use selector",
}
_UNSUPPORTED_RULE = {
    "fromCookies": "fromCookies is not supported; use fromHeaders or fromParams",
    "timeout": "timeout (for OIDC discovery and JWKS fetches) is not supported",
}
_HEADER_NAME = re.compile(r"^[A-Za-z0-9!#$%&'*+.^_`|~-]+$")


def _header_name(value: str, path: str, problems: Problems) -> str:
    if not _HEADER_NAME.match(value):
        problems.add(path, f"{value!r} is not a valid HTTP header name")
    return value.lower()


def _non_empty(values: list[str], path: str, problems: Problems) -> tuple[str, ...]:
    for i, v in enumerate(values):
        if not v:
            problems.add(f"{path}[{i}]", "must not be empty")
    return tuple(v for v in values if v)


def check_jwks_uri(uri: str) -> str | None:
    """What is wrong with a ``jwksUri`` (None when it is ``file:///abs/path``,
    ``/abs/path``, an in-mesh ``http://host[:port]/path`` or ``https://host[:port]/path``)."""
    if uri.startswith("/"):
        return None
    try:
        parts = urlsplit(uri)
    except ValueError as e:
        return f"{uri!r} is not a valid URI: {e}"
    if parts.scheme == "file":
        if parts.netloc or not parts.path.startswith("/"):
            return f"{uri!r}: a file URI must be file:///absolute/path"
        return None
    if parts.scheme in ("http", "https"):
        try:
            port = parts.port
        except ValueError as e:
            return f"{uri!r} is not a valid URI: {e}"
        if not parts.hostname:
            return f"{uri!r}: an {parts.scheme} URI needs a host"
        if port == 0:
            return f"{uri!r}: port 0 is not a valid port"
        return None
    return (
        f"{uri!r}: expected https://host/path, http://host/path (an in-mesh service), "
        "file:///absolute/path or /absolute/path"
    )


def _jwt_rule(raw: dict[str, Any], path: str, problems: Problems) -> JWTRule:
    for key, message in _UNSUPPORTED_RULE.items():
        if key in raw:
            problems.add(f"{path}.{key}", message)
    issuer = raw["issuer"]
    if not issuer:
        problems.add(f"{path}.issuer", "must not be empty")
    jwks, jwks_uri = raw.get("jwks"), raw.get("jwksUri")
    if jwks is None and jwks_uri is None:
        problems.add(path, "needs jwks or jwksUri (OIDC discovery is not supported)")
    if jwks is not None and jwks_uri is not None:
        problems.add(f"{path}.jwksUri", "set jwks or jwksUri, not both")
    if jwks is not None:
        try:
            parse_jwks(jwks)
        except JwksError as e:
            problems.add(f"{path}.jwks", f"not a usable JWKS: {e}")
    if jwks_uri is not None:
        wrong = check_jwks_uri(jwks_uri)
        if wrong:
            problems.add(f"{path}.jwksUri", wrong)
    headers = tuple(
        JWTHeader(
            _header_name(h["name"], f"{path}.fromHeaders[{i}].name", problems),
            h.get("prefix", ""),
        )
        for i, h in enumerate(raw.get("fromHeaders") or ())
    )
    payload_header = raw.get("outputPayloadToHeader")
    if payload_header is not None:
        payload_header = _header_name(payload_header, f"{path}.outputPayloadToHeader", problems)
    claim_headers: list[ClaimToHeader] = []
    for i, c in enumerate(raw.get("outputClaimToHeaders") or ()):
        cpath = f"{path}.outputClaimToHeaders[{i}]"
        if not c["claim"]:
            problems.add(f"{cpath}.claim", "must not be empty")
        claim_headers.append(
            ClaimToHeader(_header_name(c["header"], f"{cpath}.header", problems), c["claim"])
        )
    return JWTRule(
        issuer=issuer,
        audiences=_non_empty(raw.get("audiences") or [], f"{path}.audiences", problems),
        jwks=jwks,
        jwks_uri=jwks_uri,
        from_headers=headers,
        from_params=_non_empty(raw.get("fromParams") or [], f"{path}.fromParams", problems),
        output_payload_to_header=payload_header,
        forward_original_token=bool(raw.get("forwardOriginalToken", False)),
        output_claim_to_headers=tuple(claim_headers),
    )


def convert_request_authentication(
    doc: dict[str, Any], source: str, problems: Problems
) -> RequestAuthentication | None:
    """Convert a document already checked against ``REQUEST_AUTHENTICATION``."""
    ns, name = read_meta(doc, problems)
    spec = doc.get("spec") or {}
    for key, message in _UNSUPPORTED_SPEC.items():
        if key in spec:
            problems.add(f"spec.{key}", message)
    selector = workload_selector(spec, problems)
    rules = tuple(
        _jwt_rule(r, f"spec.jwtRules[{i}]", problems)
        for i, r in enumerate(spec.get("jwtRules") or ())
    )
    return RequestAuthentication(
        namespace=ns, name=name, selector=selector, jwt_rules=rules, source=source
    )


REQUEST_AUTHENTICATION_KIND = Kind(
    API_VERSIONS, "RequestAuthentication", REQUEST_AUTHENTICATION, convert_request_authentication
)
