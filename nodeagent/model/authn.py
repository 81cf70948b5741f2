"""Request authentication objects with Istio's shapes: RequestAuthentication and its JWT
rules (which issuers are trusted, where their keys come from, where the token is read,
what is forwarded upstream)."""

from __future__ import annotations

from dataclasses import dataclass

from nodeagent.model.objects import Labels


@dataclass(frozen=True)
class JWTHeader:
    """``jwtRules[].fromHeaders[]``: a header carrying the token after ``prefix``."""

    name: str
    """Lowercase header name."""
    prefix: str = ""
    """Stripped from the header value (``"Bearer "``); empty means the whole value."""


@dataclass(frozen=True)
class ClaimToHeader:
    """``jwtRules[].outputClaimToHeaders[]``: copy a claim of a valid token to a header."""

    header: str
    """Lowercase header name."""
    claim: str
    """Claim name; nested claims as dotted keys (``user.email``)."""


@dataclass(frozen=True)
class JWTRule:
    """``jwtRules[]``: tokens of one issuer, and how to find and check them."""

    issuer: str
    audiences: tuple[str, ...] = ()
    """Empty: any ``aud`` (or none) is accepted."""
    jwks: str | None = None
    """Inline JWKS JSON text (already checked to hold at least one usable key)."""
    jwks_uri: str | None = None
    """``file:///abs/path``, ``/abs/path`` or ``http://host[:port]/path``, as written."""
    from_headers: tuple[JWTHeader, ...] = ()
    from_params: tuple[str, ...] = ()
    """Both empty: ``authorization: Bearer <token>`` and the ``access_token`` parameter."""
    output_payload_to_header: str | None = None
    """Lowercase header name set to the token's base64url payload when it is valid."""
    forward_original_token: bool = False
    """False: the header that carried the token is removed before forwarding."""
    output_claim_to_headers: tuple[ClaimToHeader, ...] = ()


@dataclass(frozen=True)
class RequestAuthentication:
    namespace: str
    name: str
    selector: Labels | None = None
    """``spec.selector.matchLabels``; None means every workload of the namespace (or of
    the mesh, in the root namespace)."""
    jwt_rules: tuple[JWTRule, ...] = ()
    source: str = ""

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"
