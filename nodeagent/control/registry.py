"""Every config kind the agent accepts, by apiVersion and kind, in one table: the
Kubernetes kinds (``control.objects``), Istio's security kinds (``control.security``,
``control.authn``) and traffic kinds (``control.traffic``), and nodeagent's own
LocalRateLimit (``control.ratelimit``). Each kind module holds its shape, its conversion
and its ``Kind`` entry; they share ``control.fields`` and never import this table."""

from __future__ import annotations

from nodeagent.control.authn import REQUEST_AUTHENTICATION_KIND
from nodeagent.control.objects import NODE_KIND, POD_KIND, SERVICE_KIND
from nodeagent.control.ratelimit import LOCAL_RATE_LIMIT_KIND
from nodeagent.control.schema import Kind
from nodeagent.control.security import AUTHORIZATION_POLICY_KIND, PEER_AUTHENTICATION_KIND
from nodeagent.control.traffic import DESTINATION_RULE_KIND, VIRTUAL_SERVICE_KIND

KINDS: tuple[Kind, ...] = (
    POD_KIND,
    SERVICE_KIND,
    NODE_KIND,
    PEER_AUTHENTICATION_KIND,
    AUTHORIZATION_POLICY_KIND,
    VIRTUAL_SERVICE_KIND,
    DESTINATION_RULE_KIND,
    REQUEST_AUTHENTICATION_KIND,
    LOCAL_RATE_LIMIT_KIND,
)
"""In this order in the "supported:" list of an unknown kind's error."""


def find_kind(api_version: str, kind: str) -> Kind | None:
    for k in KINDS:
        if k.kind == kind and api_version in k.api_versions:
            return k
    return None


def supported_kinds() -> str:
    return ", ".join(f"{'/'.join(k.api_versions)} {k.kind}" for k in KINDS)
