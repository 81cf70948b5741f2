"""The ``telemetry.istio.io/v1 Telemetry`` kind: its shape (the supported subset of
Istio's fields) and its conversion to ``model.telemetry``, each problem named by its
field path. ``metrics`` is read and left unapplied, with a warning
(``telemetry_warnings``): the mesh's metrics are Istio's standard ones."""

from __future__ import annotations

import re
from typing import Any

from nodeagent.control.fields import read_meta, workload_selector
from nodeagent.control.schema import (
    BOOL,
    STR,
    STR_MAP,
    AnyShape,
    Kind,
    ListOf,
    MapOf,
    Obj,
    Problems,
    Scalar,
    resource,
)
from nodeagent.core.telemetry import parse_filter
from nodeagent.model.telemetry import AccessLogging, CustomTag, LogFilter, Telemetry, Tracing

API_VERSIONS = ("telemetry.istio.io/v1", "telemetry.istio.io/v1alpha1")

NUMBER = Scalar((int, float), "number")
PROVIDERS = ListOf(Obj({"name": STR}, required=frozenset({"name"})))
MATCH = Obj({"mode": STR})
TARGET_REF = Obj(
    {"group": STR, "kind": STR, "name": STR, "namespace": STR},
    required=frozenset({"kind", "name"}),
)
TAG_SOURCE = Obj({"name": STR, "defaultValue": STR}, required=frozenset({"name"}))
CUSTOM_TAG = Obj(
    {
        "literal": Obj({"value": STR}, required=frozenset({"value"})),
        "header": TAG_SOURCE,
        "environment": TAG_SOURCE,
    }
)
TRACING = Obj(
    {
        "providers": PROVIDERS,
        "match": MATCH,
        "randomSamplingPercentage": NUMBER,
        "disableSpanReporting": BOOL,
        "customTags": MapOf(CUSTOM_TAG),
        "useRequestIdForTraceSampling": BOOL,
    }
)
ACCESS_LOGGING = Obj(
    {
        "providers": PROVIDERS,
        "match": MATCH,
        "disabled": BOOL,
        "filter": Obj({"expression": STR}),
    }
)
TELEMETRY = resource(
    Obj(
        {
            "selector": Obj({"matchLabels": STR_MAP}),
            "targetRef": TARGET_REF,
            "targetRefs": ListOf(TARGET_REF),
            "tracing": ListOf(TRACING),
            "accessLogging": ListOf(ACCESS_LOGGING),
            "metrics": ListOf(AnyShape()),
        }
    ),
)

_HEADER_NAME = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")


def _match(raw: dict[str, Any], path: str, problems: Problems) -> None:
    mode = (raw.get("match") or {}).get("mode", "CLIENT_AND_SERVER")
    if mode != "CLIENT_AND_SERVER":
        problems.add(
            f"{path}.match.mode",
            f"{mode!r} is not supported (only CLIENT_AND_SERVER: the mesh applies one "
            "setting to both sides of a workload's traffic)",
        )


def _tracing(raw: dict[str, Any], path: str, problems: Problems) -> Tracing:
    _match(raw, path, problems)
    pct = raw.get("randomSamplingPercentage")
    if pct is not None and not 0 <= pct <= 100:
        problems.add(f"{path}.randomSamplingPercentage", f"{pct} is not between 0 and 100")
    tags: list[CustomTag] = []
    for name, spec in (raw.get("customTags") or {}).items():
        at = f"{path}.customTags.{name}"
        spec = spec or {}
        given = [k for k in ("literal", "header", "environment") if k in spec]
        if len(given) != 1:
            problems.add(at, "needs exactly one of literal, header, environment")
            continue
        kind = given[0]
        if kind == "literal":
            tags.append(CustomTag(name, kind, spec[kind]["value"]))
            continue
        src = spec[kind]
        if kind == "header" and not _HEADER_NAME.match(src["name"]):
            problems.add(f"{at}.header.name", f"{src['name']!r} is not a header name")
        value = src["name"].lower() if kind == "header" else src["name"]
        tags.append(CustomTag(name, kind, value, src.get("defaultValue", "")))
    return Tracing(
        sampling=float(pct) if pct is not None else None,
        custom_tags=tuple(tags),
        disable_span_reporting=raw.get("disableSpanReporting"),
    )


def _access_logging(raw: dict[str, Any], path: str, problems: Problems) -> AccessLogging:
    _match(raw, path, problems)
    flt: LogFilter | None = None
    expr = (raw.get("filter") or {}).get("expression")
    if expr is not None:
        try:
            flt = parse_filter(expr)
        except ValueError as e:
            problems.add(f"{path}.filter.expression", f"{expr!r}: {e}")
    return AccessLogging(
        disabled=raw.get("disabled"),
        filter=flt,
        providers=tuple(p["name"] for p in raw.get("providers") or ()),
    )


def convert_telemetry(doc: dict[str, Any], source: str, problems: Problems) -> Telemetry:
    ns, name = read_meta(doc, problems)
    spec = doc.get("spec") or {}
    selector = workload_selector(spec, problems)
    refs = list(spec.get("targetRefs") or ())
    if "targetRef" in spec:
        refs.insert(0, spec["targetRef"])
    services: list[str] = []
    for i, ref in enumerate(refs):
        at = "spec.targetRef" if "targetRef" in spec and i == 0 else f"spec.targetRefs[{i}]"
        if ref.get("kind") != "Service" or ref.get("group", "") not in ("", "core"):
            problems.add(
                f"{at}.kind",
                f"{ref.get('kind')!r} is not supported (a Service in this namespace)",
            )
        elif ref.get("namespace", ns) != ns:
            problems.add(f"{at}.namespace", "must be the Telemetry's own namespace")
        else:
            services.append(ref["name"])
    if selector is not None and services:
        problems.add("spec.targetRefs", "selector and targetRefs cannot both be set")
    return Telemetry(
        namespace=ns,
        name=name,
        selector=selector,
        target_services=tuple(services),
        access_logging=tuple(
            _access_logging(a, f"spec.accessLogging[{i}]", problems)
            for i, a in enumerate(spec.get("accessLogging") or ())
        ),
        tracing=tuple(
            _tracing(t, f"spec.tracing[{i}]", problems)
            for i, t in enumerate(spec.get("tracing") or ())
        ),
        metrics_ignored=bool(spec.get("metrics")),
        source=source,
    )


def telemetry_warnings(items: list[Telemetry]) -> list[str]:
    """A warning for each Telemetry whose ``metrics`` the mesh does not apply."""
    return [
        f"{t.source}: Telemetry {t.key}: spec.metrics is not applied (the mesh reports "
        "Istio's standard metrics and labels)"
        for t in items
        if t.metrics_ignored
    ]


TELEMETRY_KIND = Kind(API_VERSIONS, "Telemetry", TELEMETRY, convert_telemetry)
