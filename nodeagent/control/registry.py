"""Every config kind the agent accepts, by apiVersion and kind, in one table: the
Kubernetes kinds (``control.objects``), Istio's security kinds (``control.security``,
``control.authn``), traffic kinds (``control.traffic``), the kinds of VMs and
services outside the cluster (``control.entries``), Istio's ``istio`` ConfigMap
(``control.meshconfig``), Istio's Telemetry (``control.telemetry``), and nodeagent's own
LocalRateLimit (``control.ratelimit``). Each kind module holds its shape, its conversion
and its ``Kind`` entry; they share ``control.fields`` and never import this table."""

from __future__ import annotations

import difflib

from nodeagent.control.authn import REQUEST_AUTHENTICATION_KIND
from nodeagent.control.entries import (
    SERVICE_ENTRY_KIND,
    WORKLOAD_ENTRY_KIND,
    WORKLOAD_GROUP_KIND,
)
from nodeagent.control.meshconfig import MESH_CONFIG_KIND
from nodeagent.control.objects import NODE_KIND, POD_KIND, SERVICE_KIND
from nodeagent.control.ratelimit import LOCAL_RATE_LIMIT_KIND
from nodeagent.control.schema import Kind
from nodeagent.control.security import AUTHORIZATION_POLICY_KIND, PEER_AUTHENTICATION_KIND
from nodeagent.control.telemetry import TELEMETRY_KIND
from nodeagent.control.traffic import DESTINATION_RULE_KIND, VIRTUAL_SERVICE_KIND

KINDS: tuple[Kind, ...] = (
    POD_KIND,
    SERVICE_KIND,
    NODE_KIND,
    PEER_AUTHENTICATION_KIND,
    AUTHORIZATION_POLICY_KIND,
    VIRTUAL_SERVICE_KIND,
    DESTINATION_RULE_KIND,
    SERVICE_ENTRY_KIND,
    WORKLOAD_ENTRY_KIND,
    WORKLOAD_GROUP_KIND,
    REQUEST_AUTHENTICATION_KIND,
    LOCAL_RATE_LIMIT_KIND,
    TELEMETRY_KIND,
    MESH_CONFIG_KIND,
)
"""In this order in the "supported:" list of an unknown kind's error."""


def find_kind(api_version: str, kind: str) -> Kind | None:
    for k in KINDS:
        if k.kind == kind and api_version in k.api_versions:
            return k
    return None


def supported_kinds() -> str:
    return ", ".join(f"{'/'.join(k.api_versions)} {k.kind}" for k in KINDS)


def _group(api_version: str) -> str:
    """The API group of an apiVersion (``""`` for the core group's ``v1``)."""
    return api_version.rpartition("/")[0]


def misnamed_kind(api_version: str, kind: str) -> tuple[str, str] | None:
    """``(message, field)`` when an unserved ``apiVersion``/``kind`` looks like a served
    kind written wrong: its name under another version of its group, or a near miss of
    a served kind's name in that group (``VirtualSevice``); None for another kind, which
    the mesh skips (a Deployment, an Istio Gateway, a Knative Service)."""
    group = _group(api_version)
    served = [k for k in KINDS if any(_group(v) == group for v in k.api_versions)]
    for k in served:
        if k.kind == kind:
            versions = ", ".join(k.api_versions)
            message = f"apiVersion {api_version!r} is not read for {kind} (use {versions})"
            return message, "apiVersion"
    by_lower = {k.kind.lower(): k.kind for k in served}
    near = difflib.get_close_matches(kind.lower(), list(by_lower), n=1, cutoff=0.8)
    if near:
        known = ", ".join(k.kind for k in served)
        return (
            f"unknown kind {kind!r}: did you mean {by_lower[near[0]]}? "
            f"(served in {group or 'the core group v1'}: {known})",
            "kind",
        )
    return None
