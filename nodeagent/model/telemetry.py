"""Istio's ``telemetry.istio.io/v1 Telemetry`` as plain data: access logging on or off
and its filter, tracing's sampling percentage, custom tags and span reporting, each for
the mesh (root namespace), a namespace or the workloads a selector or a Service
target picks; and ``TelemetryConfig``, what one workload ends up with
(``core.telemetry.resolve``).

A filter is Istio's CEL ``filter.expression`` in the small subset the mesh evaluates,
kept as a tree of tuples (``FilterNode``): ``("or", a, b)``, ``("and", a, b)``,
``("not", a)``, ``("cmp", op, attribute, value)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Union

from nodeagent.model.objects import Labels

FilterNode = Union[  # noqa: UP007  (a recursive alias needs the Union spelling)
    tuple[str, "FilterNode", "FilterNode"],
    tuple[str, "FilterNode"],
    tuple[str, str, str, int | str | bool],
]

DEFAULT_SAMPLING = 1.0
"""Istio's default ``randomSamplingPercentage`` (MeshConfig's ``tracing.sampling``): 1%."""


@dataclass(frozen=True)
class LogFilter:
    expression: str
    """As written (for errors and ``ctl``)."""
    tree: FilterNode


@dataclass(frozen=True)
class AccessLogging:
    """One ``accessLogging`` entry."""

    disabled: bool | None = None
    """None: not said here (the next level decides)."""
    filter: LogFilter | None = None
    providers: tuple[str, ...] = ()


@dataclass(frozen=True)
class CustomTag:
    """A span attribute: a ``literal`` value, a request ``header`` or an ``environment``
    variable of the agent (``default`` when the header or variable is absent)."""

    tag: str
    kind: str
    value: str
    default: str = ""


@dataclass(frozen=True)
class Tracing:
    """One ``tracing`` entry (fields None: not said here)."""

    sampling: float | None = None
    custom_tags: tuple[CustomTag, ...] = ()
    disable_span_reporting: bool | None = None


@dataclass(frozen=True)
class Telemetry:
    namespace: str
    name: str
    selector: Labels | None = None
    target_services: tuple[str, ...] = ()
    """``targetRefs`` of kind Service, by name in this namespace: their workloads."""
    access_logging: tuple[AccessLogging, ...] = ()
    tracing: tuple[Tracing, ...] = ()
    metrics_ignored: bool = False
    """``spec.metrics`` was given (the mesh warns that it is not applied)."""
    source: str = ""

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"


@dataclass(frozen=True)
class TelemetryConfig:
    """What applies to one workload's traffic, the levels merged."""

    access_log: bool = True
    log_filter: LogFilter | None = None
    sampling: float = DEFAULT_SAMPLING
    custom_tags: tuple[CustomTag, ...] = ()
    report_spans: bool = True
    policies: tuple[str, ...] = ()
    """``namespace/name`` of the Telemetry objects that applied, root first."""


DEFAULT_TELEMETRY = TelemetryConfig()

__all__ = [
    "DEFAULT_SAMPLING",
    "DEFAULT_TELEMETRY",
    "AccessLogging",
    "CustomTag",
    "FilterNode",
    "LogFilter",
    "Telemetry",
    "TelemetryConfig",
    "Tracing",
]
