"""A small declarative checker for Kubernetes-shaped YAML: types, required fields and
unknown fields, each reported with its field path (``spec.ports[0].port``); and ``Kind``,
one config kind's entry (its shape and its conversion), checked by ``validate``.

Shapes are plain data so the supported subset can be read (and documented) in one place.
Strict where it matters, lenient where Kubernetes is: an ``Obj`` names the fields it
reads (checked) and the fields it accepts without reading (``ignored``: what the API
server fills in, and fields that do not affect the mesh); anything else is an error.
``resource`` builds a kind's top level the same way for every kind.
"""

from __future__ import annotations

import reprlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Union


@dataclass(frozen=True)
class Obj:
    """A mapping with known fields; anything else is an error."""

    fields: dict[str, Shape]
    required: frozenset[str] = frozenset()
    ignored: frozenset[str] = frozenset()
    """Field names accepted as they are and never read (what Kubernetes sets or allows
    that does not affect the mesh)."""


@dataclass(frozen=True)
class ListOf:
    item: Shape


@dataclass(frozen=True)
class MapOf:
    """A mapping of string keys to values of one shape (labels, selectors)."""

    value: Shape
    int_keys: bool = False
    """Also accept integer keys (``portLevelMtls: {8080: ...}``)."""


@dataclass(frozen=True)
class Scalar:
    """One of the Python types ``str``, ``int``, ``bool``, ``float`` (int accepted for float)."""

    types: tuple[type, ...]
    name: str


@dataclass(frozen=True)
class AnyShape:
    """Accepted as is (checked by the converter)."""


Shape = Union[Obj, ListOf, MapOf, Scalar, AnyShape]  # noqa: UP007

STR = Scalar((str,), "string")
INT = Scalar((int,), "integer")
BOOL = Scalar((bool,), "boolean")
INT_OR_STR = Scalar((int, str), "integer or string")
STR_MAP = MapOf(STR)
STR_LIST = ListOf(STR)

SERVER_METADATA = frozenset(
    {
        "uid",
        "resourceVersion",
        "generation",
        "creationTimestamp",
        "deletionTimestamp",
        "deletionGracePeriodSeconds",
        "managedFields",
        "ownerReferences",
        "finalizers",
        "selfLink",
        "generateName",
    }
)
"""The rest of ``v1 ObjectMeta``: what the API server (or a controller) fills in."""

METADATA = Obj(
    {
        "name": STR,
        "namespace": STR,
        "labels": STR_MAP,
        "annotations": STR_MAP,
    },
    required=frozenset({"name"}),
    ignored=SERVER_METADATA,
)
"""The ``metadata`` of every kind: the fields the agent reads."""


def resource(spec: Shape, *, spec_required: bool = False, status: Shape | None = None) -> Obj:
    """The top level of a kind: ``apiVersion``, ``kind``, ``metadata`` and ``spec``; a
    ``status`` (written by the API server or a controller) is read only when ``status``
    gives its shape, else accepted and ignored."""
    fields: dict[str, Shape] = {"apiVersion": STR, "kind": STR, "metadata": METADATA, "spec": spec}
    if status is not None:
        fields["status"] = status
    required = {"metadata", "spec"} if spec_required else {"metadata"}
    return Obj(
        fields,
        required=frozenset(required),
        ignored=frozenset() if status is not None else frozenset({"status"}),
    )


@dataclass
class Problems:
    """Collects ``(field path, message)`` pairs while checking one object."""

    items: list[tuple[str, str]] = field(default_factory=list)

    def add(self, path: str, message: str) -> None:
        self.items.append((path, message))


_SHORT = reprlib.Repr()
_SHORT.maxlevel, _SHORT.maxlist, _SHORT.maxdict = 2, 4, 4
_SHORT.maxstring, _SHORT.maxother, _SHORT.maxlong = 80, 40, 40


def shorten(value: object) -> str:
    """``repr(value)`` cut short (a few items, two levels, 80 characters of a string): an
    error message never renders a huge or deeply nested value."""
    try:
        return _SHORT.repr(value)
    except (ValueError, RecursionError):  # an int too long to print, a cycle too deep
        return f"<{_type_name(value)}>"


MAX_DEPTH = 100
"""How deep an object's values may nest (Kubernetes objects stay under 20 levels)."""
_INT64 = range(-(2**63), 2**64)  # int64 and uint64: what a Kubernetes number can be


def bounds_problem(value: object) -> tuple[str, str] | None:
    """Where ``value`` (an object as read) passes the bounds every object keeps, as
    ``(field path, what)``: nested deeper than ``MAX_DEPTH``, an integer beyond 64 bits;
    None when it keeps them. Walks without recursion, whatever the depth."""
    stack: list[tuple[object, str, int]] = [(value, "", 0)]
    while stack:
        v, path, depth = stack.pop()
        if isinstance(v, dict | list):
            if depth >= MAX_DEPTH:
                return path, f"values nest deeper than {MAX_DEPTH} levels"
            items = v.items() if isinstance(v, dict) else enumerate(v)
            for k, x in items:
                if isinstance(x, dict | list | int):
                    key = k if isinstance(k, str) else shorten(k)
                    sub = f"{path}[{k}]" if isinstance(v, list) else _join(path, key)
                    stack.append((x, sub, depth + 1))
        elif isinstance(v, int) and not isinstance(v, bool) and v not in _INT64:
            return path, "an integer beyond 64 bits"
    return None


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _type_name(value: Any) -> str:
    if value is None:
        return "null"
    return {dict: "mapping", list: "list", str: "string", bool: "boolean", int: "integer"}.get(
        type(value), type(value).__name__
    )


def check(value: Any, shape: Shape, path: str, problems: Problems) -> None:
    """Check ``value`` against ``shape``, adding one problem per wrong field."""
    if isinstance(shape, AnyShape):
        return
    if isinstance(shape, Scalar):
        ok = isinstance(value, shape.types) and not (
            isinstance(value, bool) and bool not in shape.types
        )
        if not ok:
            problems.add(path, f"expected {shape.name}, got {_type_name(value)} {shorten(value)}")
        return
    if isinstance(shape, ListOf):
        if not isinstance(value, list):
            problems.add(path, f"expected a list, got {_type_name(value)}")
            return
        for i, item in enumerate(value):
            check(item, shape.item, f"{path}[{i}]", problems)
        return
    if isinstance(shape, MapOf):
        if not isinstance(value, dict):
            problems.add(path, f"expected a mapping, got {_type_name(value)}")
            return
        for k, v in value.items():
            if not isinstance(k, str) and not (shape.int_keys and isinstance(k, int)):
                problems.add(path, f"key {k!r} is not a string")
                continue
            check(v, shape.value, _join(path, str(k)), problems)
        return
    if not isinstance(value, dict):
        problems.add(path, f"expected a mapping, got {_type_name(value)}")
        return
    for k, v in value.items():
        sub = shape.fields.get(k) if isinstance(k, str) else None
        if sub is None and k in shape.ignored:
            continue
        if sub is None:
            known = ", ".join(sorted(shape.fields))
            problems.add(_join(path, str(k)), f"unknown field (supported here: {known})")
            continue
        check(v, sub, _join(path, k), problems)
    for k in sorted(shape.required):
        if k not in value:
            problems.add(_join(path, k), "required field is missing")


@dataclass(frozen=True)
class Kind:
    """One config kind the agent accepts: its apiVersions, its shape and its conversion."""

    api_versions: tuple[str, ...]
    kind: str
    shape: Shape
    convert: Callable[[dict[str, Any], str, Problems], object | None]
    """``(document, source file, problems) -> model object``, for a document that passed
    ``shape``; it adds a problem for each field wrong in a way the shape cannot tell."""
    skip: Callable[[dict[str, Any]], str | None] | None = None
    """Why the mesh leaves this object out although its kind is served (a host-network
    Pod, a finished one, an ExternalName Service), or None; checked before ``shape`` on a
    document of any shape."""
    only: Callable[[dict[str, Any]], bool] | None = None
    """Which objects of this apiVersion and kind the mesh serves (Istio's ``istio``
    ConfigMap, not every ConfigMap); the others are skipped as unserved kinds are."""


def validate(doc: dict[str, Any], kind: Kind, source: str) -> tuple[object | None, Problems]:
    """Check ``doc`` against ``kind.shape``, then convert it when the shape holds."""
    problems = Problems()
    check(doc, kind.shape, "", problems)
    if problems.items:
        return None, problems
    obj = kind.convert(doc, source, problems)
    return obj, problems
