"""Any value in any field of a WorkloadEntry, WorkloadGroup, ServiceEntry or ``istio``
ConfigMap, as a hostile or careless user writes it, is a config error naming the object
(or loads), never an exception out of the converters."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml
from fuzzing import fuzz
from hypothesis import given
from hypothesis import strategies as st

from nodeagent.control.files import assemble
from nodeagent.control.parse import parse_documents, parse_object
from nodeagent.errors import ConfigErrors

DATA = Path(__file__).parent / "data" / "istio-vm"
SERVED = ("WorkloadEntry", "WorkloadGroup", "ServiceEntry", "ConfigMap")


def _objects() -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for f in sorted(DATA.glob("*.yaml")):
        pairs, errors, _ = parse_documents(f.read_text(), str(f))
        assert not errors
        for raw, _ in pairs:
            if raw["kind"] in SERVED:
                raw = dict(raw)
                raw.pop("_source")
                out.append(raw)
    return out


OBJECTS = _objects()

ints = st.integers(min_value=-(2**63), max_value=2**64 - 1) | st.integers(-2, 70000)
words = st.text(max_size=12) | st.sampled_from(
    ["0.0.0.0/0", "::1", "1.2.3.4/32", "unix:///x", "*.x", "*", "DNS", "NONE", "STATIC",
     "MESH_INTERNAL", "", "1.2.3.4", "a.b", "http", "HTTP", "TLS", "vm-1"]
)  # fmt: skip
values = st.recursive(
    st.none() | st.booleans() | ints | words,
    lambda inner: st.lists(inner, max_size=3)
    | st.dictionaries(words, inner, max_size=3),
    max_leaves=8,
)
TYPED: dict[str, st.SearchStrategy[Any]] = {
    "address": words,
    "ports": st.dictionaries(words, ints, max_size=3)
    | st.lists(st.fixed_dictionaries({"number": ints, "name": words}, optional={
        "protocol": words, "targetPort": ints}), max_size=3),
    "labels": st.dictionaries(words, words, max_size=3),
    "annotations": st.dictionaries(
        st.sampled_from(["nodeagent.io/node", "nodeagent.io/x", "a"]), words, max_size=2
    ),
    "weight": ints,
    "number": ints,
    "targetPort": ints,
    "hosts": st.lists(words, max_size=3),
    "addresses": st.lists(words, max_size=3),
    "endpoints": st.lists(st.fixed_dictionaries({"address": words}, optional={
        "ports": st.dictionaries(words, ints, max_size=2), "serviceAccount": words}),
        max_size=3),
    "workloadSelector": st.fixed_dictionaries({"labels": st.dictionaries(words, words)}),
    "status": st.fixed_dictionaries({"addresses": st.lists(st.fixed_dictionaries(
        {"value": words, "host": words}), max_size=2)}) | values,
    "mesh": values.map(lambda v: yaml.safe_dump({"outboundTrafficPolicy": v})),
}  # fmt: skip
FIELDS = (
    *TYPED, "network", "locality", "serviceAccount", "location", "resolution", "exportTo",
    "subjectAltNames", "name", "protocol", "template", "probe",
)  # fmt: skip


def _containers(value: Any, path: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """The paths of every mapping in ``value``."""
    out: list[tuple[Any, ...]] = []
    if isinstance(value, dict):
        out.append(path)
        for k, v in value.items():
            out.extend(_containers(v, (*path, k)))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            out.extend(_containers(v, (*path, i)))
    return out


@fuzz(2.5)
@given(st.data())
def test_any_value_anywhere_is_an_error_or_loads(data: st.DataObject) -> None:
    doc = copy.deepcopy(data.draw(st.sampled_from(OBJECTS)))
    path = data.draw(st.sampled_from(_containers(doc)))
    target: Any = doc
    for key in path:
        target = target[key]
    key = data.draw(st.sampled_from([*target, *FIELDS]))
    typed = TYPED.get(key)
    target[key] = data.draw(typed | values if typed is not None else values)
    pair, errors, _ = parse_object(doc, "fuzz.yaml")
    for e in errors:  # named: the object (unless its apiVersion or kind is gone)
        assert e.source == "fuzz.yaml" and (e.obj or key in ("kind", "apiVersion")), e
    if pair is None and not errors:  # skipped: only a ConfigMap renamed, or a kind changed
        assert doc["kind"] == "ConfigMap" or key in ("kind", "apiVersion")
    if pair is not None:  # and what loads builds a snapshot whose plans can be asked for
        try:
            snap = assemble([pair], sources=("fuzz.yaml",)).snapshot
        except ConfigErrors:
            return
        for svc in snap.services:
            for port in svc.ports:
                snap.endpoints(svc, port)
        for address in snap.mesh_addresses():
            assert snap.service_for_address(address) or snap.pod_by_ip.get(address)


@fuzz()
@given(
    st.text(max_size=80)
    | values.map(lambda v: yaml.safe_dump({"outboundTrafficPolicy": v}))
    | values.map(lambda v: yaml.safe_dump({"outboundTrafficPolicy": {"mode": v}}))
)
def test_any_mesh_text_is_an_error_or_loads(text: str) -> None:
    doc = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": "istio", "namespace": "istio-system"},
        "data": {"mesh": text},
    }
    _, errors, _ = parse_object(doc, "fuzz.yaml")
    for e in errors:
        assert e.field.startswith("data.mesh"), e
