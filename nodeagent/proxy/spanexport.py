"""Where spans are made and sent: the OpenTelemetry SDK behind one bounded queue.

``SpanExport`` is the only module of the agent that imports the OpenTelemetry SDK (some
2.3 MiB of every agent's memory when imported at start): ``proxy/tracing.py`` decides
which requests and connections get a span and with what attributes, and hands the
making, ending and export of each to the ``SpanExport`` it was given — there is none, and
this module is never imported, when no OTLP endpoint is configured.

Export is the SDK's OTLP/gRPC exporter behind a batch processor on its own thread: the
data path only appends to a bounded queue, and a span that finds the queue full
(collector slow, stalled or down) is dropped and counted in
``nodeagent_spans_dropped_total``.
"""

from __future__ import annotations

import threading
from typing import Any

from opentelemetry.context import Context
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, SynchronousMultiSpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter
from opentelemetry.sdk.trace.id_generator import RandomIdGenerator
from opentelemetry.trace import (
    NonRecordingSpan,
    Span,
    SpanContext,
    SpanKind,
    Status,
    StatusCode,
    TraceFlags,
    Tracer,
    set_span_in_context,
)
from prometheus_client import CollectorRegistry, Counter

__all__ = ["MAX_QUEUE", "SpanExport"]

MAX_QUEUE = 2048
"""Spans held for export (the SDK's default); past it, new spans are dropped."""
EXPORT_TIMEOUT = 5.0
"""Seconds one export may take before the exporter gives it up."""
SHUTDOWN_WAIT = 2.0
"""Seconds the agent's shutdown waits for the last export."""
_SAMPLED = TraceFlags(TraceFlags.SAMPLED)


class _CountingProcessor(BatchSpanProcessor):
    """The SDK's batch processor, with a full queue counted: it would drop (and log a
    warning per span) on its own; here the span is dropped before it and counted."""

    def __init__(
        self, exporter: SpanExporter, dropped: Counter, max_queue_size: int, delay_ms: float
    ) -> None:
        super().__init__(
            exporter,
            max_queue_size=max_queue_size,
            schedule_delay_millis=delay_ms,
            max_export_batch_size=min(512, max_queue_size),
            export_timeout_millis=EXPORT_TIMEOUT * 1000,
        )
        self._dropped = dropped
        self._max = max_queue_size
        self._queue = getattr(getattr(self, "_batch_processor", None), "_queue", None)

    def on_end(self, span: ReadableSpan) -> None:
        if self._queue is not None and len(self._queue) >= self._max:
            self._dropped.inc()
            return
        super().on_end(span)


class SpanExport:
    """Where spans go: one bounded batch queue, its export thread, the drops counted."""

    def __init__(
        self,
        exporter: SpanExporter,
        registry: CollectorRegistry,
        *,
        max_queue_size: int = MAX_QUEUE,
        delay_ms: float = 1000.0,
        mesh_id: str = "cluster.local",
    ) -> None:
        self.dropped = Counter(
            "nodeagent_spans_dropped",
            "Spans dropped because the export queue was full (collector slow or down)",
            registry=registry,
        )
        self.exported = Counter(
            "nodeagent_spans_started",
            "Spans started (sampled requests and connections)",
            registry=registry,
        )
        self.processor = SynchronousMultiSpanProcessor()  # type: ignore[no-untyped-call]
        self.processor.add_span_processor(
            _CountingProcessor(exporter, self.dropped, max_queue_size, delay_ms)
        )
        self.mesh_id = mesh_id
        self.ids = RandomIdGenerator()
        self._tracers: dict[str, Tracer] = {}

    @classmethod
    def otlp(cls, endpoint: str, registry: CollectorRegistry, **kw: Any) -> SpanExport:
        """Export over OTLP/gRPC (plaintext) to ``endpoint`` (``host:port``)."""
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        exporter = OTLPSpanExporter(endpoint=endpoint, insecure=True, timeout=EXPORT_TIMEOUT)
        return cls(exporter, registry, **kw)

    def tracer(self, service: str) -> Tracer:
        """The tracer of one workload (its resource's ``service.name``: Istio's
        ``canonical-service.namespace``), all sharing the one queue."""
        t = self._tracers.get(service)
        if t is None:
            if len(self._tracers) > 1000:  # bounded by the local workloads; a churn guard
                self._tracers.clear()
            provider = TracerProvider(
                resource=Resource.create({"service.name": service}),
                active_span_processor=self.processor,
                id_generator=self.ids,
            )
            t = self._tracers[service] = provider.get_tracer("nodeagent")
        return t

    def new_ids(self) -> tuple[int, int]:
        """A fresh (trace id, span id), for a sampled request whose span is not reported."""
        return self.ids.generate_trace_id(), self.ids.generate_span_id()

    def start(
        self,
        service: str,
        name: str,
        *,
        parent: tuple[int, int] | None,
        client: bool,
        attributes: dict[str, str],
        start_time: int | None = None,
    ) -> tuple[Span, int, int]:
        """A span of workload ``service`` started, a child of the remote ``parent``
        (trace id, span id) or a new trace's root; the span, its trace id and span id."""
        ctx = Context()
        if parent is not None:
            remote = SpanContext(parent[0], parent[1], is_remote=True, trace_flags=_SAMPLED)
            ctx = set_span_in_context(NonRecordingSpan(remote), ctx)
        span = self.tracer(service).start_span(
            name,
            context=ctx,
            kind=SpanKind.CLIENT if client else SpanKind.SERVER,
            attributes=attributes,
            start_time=start_time,
        )
        self.exported.inc()
        sc = span.get_span_context()
        return span, sc.trace_id, sc.span_id

    @staticmethod
    def finish(span: Span, attributes: dict[str, str], error: str | None) -> None:
        """``span`` ended with its outcome; ``error`` (None: none) marks it failed, with
        that description when not empty."""
        span.set_attributes(attributes)
        if error is not None:
            span.set_attribute("error", "true")
            span.set_status(Status(StatusCode.ERROR, error or None))
        span.end()

    def close(self) -> None:
        """Flush what is queued, waiting at most ``SHUTDOWN_WAIT`` (a stalled collector
        must not hold the agent's exit)."""
        done = threading.Thread(target=self.processor.shutdown, daemon=True)
        done.start()
        done.join(SHUTDOWN_WAIT)
