"""The ``nodeagent.io/v1alpha1 LocalRateLimit`` kind: its shape (the documented subset)
and its conversion to ``model.ratelimit.LocalRateLimit``, each problem named by its field
path. Semantics are described in ``nodeagent.model.ratelimit``."""

from __future__ import annotations

import re
from typing import Any

from nodeagent.control.fields import read_duration, read_meta, read_ports, workload_selector
from nodeagent.control.schema import INT, STR, STR_MAP, Kind, ListOf, Obj, Problems, resource
from nodeagent.model.ratelimit import (
    NO_KEY,
    HttpRateLimit,
    KeyKind,
    LocalRateLimit,
    Quota,
    QuotaWindow,
    RateLimitKey,
    TcpRateLimit,
    TokenBucket,
)

API_VERSION = "nodeagent.io/v1alpha1"
MIN_FILL_INTERVAL = 0.001
"""Seconds. Buckets fill by arithmetic on the request's clock, not by a timer, so short
intervals cost nothing (Envoy, with a timer, asks for ≥ 50ms)."""

TOKEN_BUCKET = Obj(
    {"maxTokens": INT, "tokensPerFill": INT, "fillInterval": STR},
    required=frozenset({"maxTokens", "fillInterval"}),
)
EMPTY = Obj({})
RATE_LIMIT_KEY = Obj({"sourcePrincipal": EMPTY, "header": STR, "route": EMPTY})
LOCAL_RATE_LIMIT = resource(
    Obj(
        {
            "selector": Obj({"matchLabels": STR_MAP}),
            "ports": ListOf(INT),
            "http": Obj(
                {"tokenBucket": TOKEN_BUCKET, "key": RATE_LIMIT_KEY},
                required=frozenset({"tokenBucket"}),
            ),
            "tcp": Obj({"tokenBucket": TOKEN_BUCKET}, required=frozenset({"tokenBucket"})),
            "quotas": ListOf(
                Obj({"window": STR, "limit": INT}, required=frozenset({"window", "limit"}))
            ),
        }
    ),
    spec_required=True,
)

_HEADER_NAME = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")
"""An RFC 9110 field name (a token)."""


def _at_least_one(raw: dict[str, Any], key: str, path: str, problems: Problems) -> int:
    value = raw.get(key, 1)
    if value < 1:
        problems.add(f"{path}.{key}", f"{value} must be at least 1")
    return int(value)


def _token_bucket(raw: dict[str, Any], path: str, problems: Problems) -> TokenBucket:
    interval = read_duration(raw.get("fillInterval"), f"{path}.fillInterval", problems)
    if interval is not None and interval < MIN_FILL_INTERVAL:
        problems.add(f"{path}.fillInterval", f"{raw['fillInterval']!r} is shorter than 1ms")
    return TokenBucket(
        max_tokens=_at_least_one(raw, "maxTokens", path, problems),
        tokens_per_fill=_at_least_one(raw, "tokensPerFill", path, problems),
        fill_interval=interval or MIN_FILL_INTERVAL,
    )


def _key(raw: dict[str, Any] | None, path: str, problems: Problems) -> RateLimitKey:
    if raw is None:
        return NO_KEY
    if len(raw) != 1:
        problems.add(
            path,
            "needs exactly one of sourcePrincipal, header, route"
            + (f" (got {', '.join(raw)})" if raw else ""),
        )
        return NO_KEY
    if "header" in raw:
        name = raw["header"]
        if not _HEADER_NAME.match(name):
            problems.add(f"{path}.header", f"{name!r} is not a header name")
        return RateLimitKey(KeyKind.HEADER, name.lower())
    return RateLimitKey(KeyKind(next(iter(raw))))


def _quotas(raw: list[dict[str, Any]], problems: Problems) -> tuple[Quota, ...]:
    out: list[Quota] = []
    seen: dict[QuotaWindow, int] = {}
    for i, q in enumerate(raw):
        path = f"spec.quotas[{i}]"
        limit = _at_least_one(q, "limit", path, problems)
        try:
            window = QuotaWindow(q["window"])
        except ValueError:
            allowed = ", ".join(w.value for w in QuotaWindow)
            problems.add(f"{path}.window", f"unknown window {q['window']!r} (one of {allowed})")
            continue
        if window in seen:
            problems.add(f"{path}.window", f"{window.value} is also spec.quotas[{seen[window]}]")
        seen[window] = i
        out.append(Quota(window, limit))
    return tuple(out)


def convert_local_rate_limit(
    doc: dict[str, Any], source: str, problems: Problems
) -> LocalRateLimit | None:
    ns, name = read_meta(doc, problems)
    spec = doc.get("spec") or {}
    selector = workload_selector(spec, problems)
    http = tcp = None
    if "http" in spec:
        h = spec["http"]
        http = HttpRateLimit(
            bucket=_token_bucket(h["tokenBucket"], "spec.http.tokenBucket", problems),
            key=_key(h.get("key"), "spec.http.key", problems),
        )
    if "tcp" in spec:
        tcp = TcpRateLimit(
            _token_bucket(spec["tcp"]["tokenBucket"], "spec.tcp.tokenBucket", problems)
        )
    quotas = _quotas(spec.get("quotas") or [], problems)
    if http is None and tcp is None and not quotas:
        problems.add("spec", "a LocalRateLimit needs http, tcp or quotas")
    return LocalRateLimit(
        namespace=ns,
        name=name,
        selector=selector,
        ports=tuple(sorted(set(read_ports(spec, "ports", "spec", problems)))),
        http=http,
        tcp=tcp,
        quotas=quotas,
        source=source,
    )


LOCAL_RATE_LIMIT_KIND = Kind(
    (API_VERSION,), "LocalRateLimit", LOCAL_RATE_LIMIT, convert_local_rate_limit
)
