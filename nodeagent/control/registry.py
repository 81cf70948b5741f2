"""Every config kind the agent accepts, by apiVersion and kind: the Kubernetes and Istio
kinds of ``control.kinds``, RequestAuthentication (``control.authn``) and nodeagent's
own LocalRateLimit (``control.ratelimit``). Kept apart from ``kinds`` so the kind modules
may share its helpers without importing each other."""

from __future__ import annotations

from nodeagent.control.authn import REQUEST_AUTHENTICATION, convert_request_authentication
from nodeagent.control.kinds import KINDS as _BUILTIN
from nodeagent.control.kinds import Kind
from nodeagent.control.ratelimit import LOCAL_RATE_LIMIT_KIND

KINDS: tuple[Kind, ...] = (
    *_BUILTIN,
    Kind(
        ("security.istio.io/v1", "security.istio.io/v1beta1"),
        "RequestAuthentication",
        REQUEST_AUTHENTICATION,
        convert_request_authentication,
    ),
    LOCAL_RATE_LIMIT_KIND,
)


def find_kind(api_version: str, kind: str) -> Kind | None:
    for k in KINDS:
        if k.kind == kind and api_version in k.api_versions:
            return k
    return None


def supported_kinds() -> str:
    return ", ".join(f"{'/'.join(k.api_versions)} {k.kind}" for k in KINDS)
