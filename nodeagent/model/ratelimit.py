"""Local rate limits and quotas: the ``nodeagent.io/v1alpha1 LocalRateLimit`` object, our
own kind, modelled on Envoy's local rate limit filter.

```yaml
apiVersion: nodeagent.io/v1alpha1
kind: LocalRateLimit
metadata: {name: ratings-limit, namespace: default}
spec:
  selector: {matchLabels: {app: ratings}}  # destination workloads; absent: the namespace
  ports: [9080]                           # optional: only these container ports
  http:                                   # each HTTP request takes a token
    tokenBucket: {maxTokens: 100, tokensPerFill: 10, fillInterval: 100ms}
    key: {header: x-user}                 # optional, one of {sourcePrincipal: {}},
                                          # {header: NAME}, {route: {}}
  tcp:                                    # each new connection takes a token
    tokenBucket: {maxTokens: 50, tokensPerFill: 50, fillInterval: 1s}
  quotas:                                 # per source principal, fixed UTC windows,
  - {window: minute, limit: 1000}         # persisted across agent restarts
```

Buckets are local: one per destination workload (pod) on this node, as Envoy's filter is
one per sidecar, so N replicas admit up to N times a bucket. Quotas are counted per node
agent. Only this module describes the semantics; ``control.ratelimit`` checks the YAML and
``core.ratelimit`` enforces it.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from nodeagent.model.objects import Labels


@dataclass(frozen=True)
class TokenBucket:
    """Envoy's ``token_bucket``: starts full with ``max_tokens``; every ``fill_interval``
    (counted from the bucket's creation) adds ``tokens_per_fill``, never above
    ``max_tokens``. A request or connection takes one token; none left: denied."""

    max_tokens: int
    """``maxTokens`` (≥ 1): the burst size, and the ``x-ratelimit-limit`` value."""
    tokens_per_fill: int = 1
    """``tokensPerFill`` (≥ 1, default 1)."""
    fill_interval: float = 1.0
    """``fillInterval`` in seconds (a duration like ``100ms``, ≥ 1ms)."""


class KeyKind(enum.Enum):
    """What splits one policy's HTTP limit into separate buckets."""

    NONE = "none"
    """One bucket per destination workload."""
    SOURCE_PRINCIPAL = "sourcePrincipal"
    """One per caller SPIFFE ID; plaintext callers share the bucket of the empty value."""
    HEADER = "header"
    """One per value of a request header; requests without it share one bucket (leaving
    the header out does not escape the limit)."""
    ROUTE = "route"
    """One per route the request took (the name the proxy gives it; unnamed routes share
    one bucket)."""


@dataclass(frozen=True)
class RateLimitKey:
    """``http.key``: ``{sourcePrincipal: {}}``, ``{header: NAME}`` or ``{route: {}}``
    (exactly one); absent means ``NONE``."""

    kind: KeyKind = KeyKind.NONE
    header: str = ""
    """The header name, lowercase (``HEADER`` only)."""

    def __str__(self) -> str:
        return f"header:{self.header}" if self.kind is KeyKind.HEADER else self.kind.value


NO_KEY = RateLimitKey()


@dataclass(frozen=True)
class HttpRateLimit:
    """``spec.http``: one token per HTTP request (HTTP/1.1 request or HTTP/2 stream)."""

    bucket: TokenBucket
    key: RateLimitKey = NO_KEY


@dataclass(frozen=True)
class TcpRateLimit:
    """``spec.tcp``: one token per new connection to the workload (HTTP or not)."""

    bucket: TokenBucket


class QuotaWindow(enum.Enum):
    """A fixed window aligned to UTC: minutes start at :00, hours at HH:00, days at 00:00Z."""

    MINUTE = "minute"
    HOUR = "hour"
    DAY = "day"

    @property
    def seconds(self) -> int:
        return _WINDOW_SECONDS[self]


_WINDOW_SECONDS = {QuotaWindow.MINUTE: 60, QuotaWindow.HOUR: 3600, QuotaWindow.DAY: 86400}


@dataclass(frozen=True)
class Quota:
    """``spec.quotas[]``: at most ``limit`` units per source principal per ``window``. A
    unit is one HTTP request, or one connection of traffic the proxy does not parse as
    HTTP. Plaintext callers (no principal) share one count. Counts survive restarts."""

    window: QuotaWindow
    limit: int
    """≥ 1."""


@dataclass(frozen=True)
class LocalRateLimit:
    """One ``LocalRateLimit`` object. At least one of ``http``, ``tcp``, ``quotas``."""

    namespace: str
    name: str
    selector: Labels | None = None
    """``spec.selector.matchLabels``; None: every workload of the namespace."""
    ports: tuple[int, ...] = ()
    """``spec.ports``: destination container ports; empty: every port."""
    http: HttpRateLimit | None = None
    tcp: TcpRateLimit | None = None
    quotas: tuple[Quota, ...] = ()
    """At most one per window."""
    source: str = ""

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"
