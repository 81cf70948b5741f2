"""One config object, as a file or the Kubernetes API gives it, to a validated
``(raw, model object)`` pair, its errors and its warnings (``parse_object``); a file's
YAML documents to objects, with kubectl's ``kind: List`` unpacked (``parse_documents``).

Lenient where Kubernetes is: a kind the mesh does not serve (a Deployment, a ConfigMap)
is skipped with one warning, and so is an object of a served kind the mesh leaves out
(``Kind.skip``: a host-network Pod). Strict where it matters: a served kind's misspelled
or mistyped field, a served kind's name under an apiVersion we do not read, or a near
miss of a served kind's name (``VirtualSevice``) is an error naming the object and field.
"""

from __future__ import annotations

from typing import Any

from nodeagent.control.registry import find_kind, misnamed_kind
from nodeagent.control.schema import bounds_problem, shorten, validate
from nodeagent.control.yamlload import load_yaml
from nodeagent.errors import ConfigError

Pair = tuple[dict[str, Any], object]
"""An object as read (with ``_source`` added) and its model object."""
Parsed = tuple[Pair | None, list[ConfigError], list[str]]
"""What ``parse_object`` makes of one object: its pair (None when it has errors or is
skipped), its errors, its warnings."""


def _meta(doc: dict[str, Any]) -> dict[str, Any]:
    meta = doc.get("metadata")
    return meta if isinstance(meta, dict) else {}


def _text(value: object) -> str:
    """A name as written, or cut short when it is not a string (a list, nested)."""
    return value if isinstance(value, str) else shorten(value)


def object_name(doc: dict[str, Any]) -> str:
    """``Kind namespace/name`` as errors name an object (namespace ``default`` when absent)."""
    meta = _meta(doc)
    kind, ns, name = doc.get("kind", "?"), meta.get("namespace", "default"), meta.get("name", "?")
    return f"{_text(kind)} {_text(ns)}/{_text(name)}"


def _unserved_name(api: str, kind: str, doc: dict[str, Any]) -> str:
    """``apps/v1 Deployment shop/web``, or ``v1 Namespace shop`` for a cluster-scoped one."""
    meta = _meta(doc)
    name = _text(meta.get("name", "?"))
    if "namespace" in meta:
        name = f"{_text(meta['namespace'])}/{name}"
    return f"{api} {kind} {name}"


def parse_object(doc: dict[str, Any], source: str) -> Parsed:
    """One object as a file or the API gives it (``source`` names where it came from):
    the pair, or None with errors, or None with one warning when the mesh skips it (a
    kind it does not serve, or an object of a served kind it leaves out: whoever held an
    earlier version of that object should drop it)."""
    return _parse(doc, source, source)


def _parse(doc: object, source: str, here: str) -> Parsed:
    """``parse_object``, with ``here`` naming the document in errors (``file (document 2)``)."""
    if not isinstance(doc, dict):
        return None, [ConfigError("expected a mapping with apiVersion and kind", source=here)], []
    bad = bounds_problem(doc)  # what JSON from the API may hold (YAML is bounded as read)
    if bad is not None:
        error = ConfigError(bad[1], source=here, obj=object_name(doc), field=bad[0])
        return None, [error], []
    api, kind_name = doc.get("apiVersion"), doc.get("kind")
    if not isinstance(api, str) or not isinstance(kind_name, str):
        return None, [ConfigError("apiVersion and kind are required strings", source=here)], []
    kind = find_kind(api, kind_name)
    if kind is not None and kind.only is not None and not kind.only(doc):
        name = _unserved_name(api, kind_name, doc)
        return None, [], [f"{here}: {name}: not served by the mesh, skipped"]
    if kind is None:
        wrong = misnamed_kind(api, kind_name)
        if wrong is not None:
            message, path = wrong
            error = ConfigError(message, source=here, obj=object_name(doc), field=path)
            return None, [error], []
        name = _unserved_name(api, kind_name, doc)
        return None, [], [f"{here}: {name}: not served by the mesh, skipped"]
    reason = kind.skip(doc) if kind.skip is not None else None
    if reason is not None:
        return None, [], [f"{here}: {object_name(doc)}: {reason}"]
    obj, problems = validate(doc, kind, source)
    errors = [
        ConfigError(msg, source=here, obj=object_name(doc), field=path)
        for path, msg in problems.items
    ]
    if obj is None or errors:
        return None, errors, []
    return ({**doc, "_source": source}, obj), [], []


def _list_items(doc: object) -> list[Any] | None:
    """The items of a list as kubectl prints it (``v1 List``) or the API returns it
    (``PodList``, whose items lack apiVersion and kind), each a complete object; None
    for any other document."""
    if not isinstance(doc, dict):
        return None
    kind, items = doc.get("kind"), doc.get("items")
    if not isinstance(kind, str) or not kind.endswith("List") or "spec" in doc:
        return None
    if not isinstance(items, list):
        return None
    if kind == "List":
        return items
    # a typed list: its items are of the kind it names, in its apiVersion
    defaults = {"apiVersion": doc.get("apiVersion"), "kind": kind.removesuffix("List")}
    return [{**defaults, **item} if isinstance(item, dict) else item for item in items]


def parse_documents(text: str, source: str) -> tuple[list[Pair], list[ConfigError], list[str]]:
    """One file's YAML documents to ``(raw, model object)`` pairs, errors and warnings
    (``control.yamlload``: bounded, any text is documents or one error)."""
    try:
        docs = load_yaml(text, source)
    except ConfigError as e:
        return [], [e], []
    pairs: list[Pair] = []
    errors: list[ConfigError] = []
    warnings: list[str] = []
    for index, doc in enumerate(docs):
        if doc is None:
            continue
        where = [f"document {index + 1}"] if len(docs) > 1 else []
        items = _list_items(doc)
        objects = (
            [(doc, where)]
            if items is None
            else [(item, [*where, f"items[{i}]"]) for i, item in enumerate(items)]
        )
        for obj, at in objects:
            here = f"{source} ({', '.join(at)})" if at else source
            pair, errs, warns = _parse(obj, source, here)
            if pair is not None:
                pairs.append(pair)
            errors.extend(errs)
            warnings.extend(warns)
    return pairs, errors, warnings
