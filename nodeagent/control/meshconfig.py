"""Istio's MeshConfig as Istio users give it: the ``mesh`` key of the ``istio`` ConfigMap
(in the root namespace, ``istio-system``), a YAML document of ``meshConfig`` fields.

The agent reads ``outboundTrafficPolicy.mode`` (``ALLOW_ANY`` or ``REGISTRY_ONLY``) from
it, strictly (a misspelled field or value there is an error naming it); MeshConfig's
other fields (most of them Envoy's or istiod's) are accepted and not read. Any other
ConfigMap is not served and is skipped, as before.
"""

from __future__ import annotations

from typing import Any

from nodeagent.control.fields import read_meta
from nodeagent.control.schema import METADATA, STR, STR_MAP, Kind, Obj, Problems
from nodeagent.control.yamlload import load_yaml
from nodeagent.errors import ConfigError
from nodeagent.model.entries import ALLOW_ANY, REGISTRY_ONLY, MeshConfig

MESH_CONFIGMAP = "istio"
"""The ConfigMap Istio keeps its MeshConfig in (``istio-<revision>`` for a revision)."""
MODES = (ALLOW_ANY, REGISTRY_ONLY)

CONFIG_MAP = Obj(
    {"apiVersion": STR, "kind": STR, "metadata": METADATA, "data": STR_MAP},
    required=frozenset({"metadata"}),
    ignored=frozenset({"binaryData", "immutable"}),
)

OUTBOUND_POLICY = Obj({"mode": STR})
"""``outboundTrafficPolicy``: Istio's field (``egressProxy`` is not supported)."""


def is_mesh_config(doc: dict[str, Any]) -> bool:
    """Whether a ConfigMap is Istio's mesh config (the others are not served)."""
    meta = doc.get("metadata")
    return isinstance(meta, dict) and meta.get("name") == MESH_CONFIGMAP


def convert_mesh_config(doc: dict[str, Any], source: str, problems: Problems) -> MeshConfig:
    ns, name = read_meta(doc, problems)
    text = (doc.get("data") or {}).get("mesh", "")
    mode = ALLOW_ANY
    try:
        docs = load_yaml(text, source) if text else []
    except ConfigError as e:
        problems.add("data.mesh", f"not YAML: {e.reason}")
        docs = []
    mesh = docs[0] if len(docs) == 1 else None
    if len(docs) > 1:
        problems.add("data.mesh", "expected one YAML document")
    elif docs and not isinstance(mesh, dict):
        problems.add("data.mesh", "expected a mapping of MeshConfig fields")
    elif isinstance(mesh, dict) and "outboundTrafficPolicy" in mesh:
        policy = mesh["outboundTrafficPolicy"]
        path = "data.mesh: outboundTrafficPolicy"
        if not isinstance(policy, dict):
            problems.add(path, "expected a mapping like {mode: REGISTRY_ONLY}")
        else:
            for key in policy:
                if key != "mode":
                    problems.add(f"{path}.{key}", "unknown field (supported here: mode)")
            value = policy.get("mode", ALLOW_ANY)
            if value not in MODES:
                problems.add(f"{path}.mode", f"expected one of {', '.join(MODES)}, got {value!r}")
            else:
                mode = str(value)
    return MeshConfig(outbound_traffic_policy=mode, source=source, name=name, namespace=ns)


MESH_CONFIG_KIND = Kind(
    ("v1",), "ConfigMap", CONFIG_MAP, convert_mesh_config, only=is_mesh_config
)
