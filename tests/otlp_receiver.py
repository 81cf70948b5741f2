"""An OTLP trace receiver of the tests' own: a real gRPC server implementing
``opentelemetry.proto.collector.trace.v1.TraceService/Export`` (the ``opentelemetry-proto``
messages) on a thread pool (made in a netns, it listens there), that keeps the spans it
is sent, flattened (``Received``); or, ``stalled``, takes each export and never answers
until it is closed."""

from __future__ import annotations

import threading
import time
from concurrent import futures
from dataclasses import dataclass
from typing import Any

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

KINDS = {1: "INTERNAL", 2: "SERVER", 3: "CLIENT", 4: "PRODUCER", 5: "CONSUMER"}


@dataclass(frozen=True)
class Received:
    """One span as the collector got it."""

    service: str
    """Its resource's ``service.name``."""
    name: str
    kind: str
    trace_id: str
    span_id: str
    parent_id: str
    """"" for a root."""
    attributes: dict[str, str]
    start_ns: int
    end_ns: int


def _value(v: Any) -> str:
    which = v.WhichOneof("value")
    return str(getattr(v, which)) if which else ""


class _Service(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self, receiver: OtlpReceiver) -> None:
        self.r = receiver

    def Export(
        self, request: trace_service_pb2.ExportTraceServiceRequest, context: Any
    ) -> trace_service_pb2.ExportTraceServiceResponse:
        self.r.exports += 1
        if self.r.stalled:
            self.r.release.wait(60)
            return trace_service_pb2.ExportTraceServiceResponse()
        for rs in request.resource_spans:
            res = {a.key: _value(a.value) for a in rs.resource.attributes}
            for ss in rs.scope_spans:
                for s in ss.spans:
                    self.r.add(
                        Received(
                            service=res.get("service.name", ""),
                            name=s.name,
                            kind=KINDS.get(s.kind, str(s.kind)),
                            trace_id=s.trace_id.hex(),
                            span_id=s.span_id.hex(),
                            parent_id=s.parent_span_id.hex(),
                            attributes={a.key: _value(a.value) for a in s.attributes},
                            start_ns=s.start_time_unix_nano,
                            end_ns=s.end_time_unix_nano,
                        )
                    )
        return trace_service_pb2.ExportTraceServiceResponse()


class OtlpReceiver:
    """``with OtlpReceiver() as r:`` serves on ``r.endpoint`` (``127.0.0.1:port``, or
    ``host`` given)."""

    def __init__(self, *, stalled: bool = False, host: str = "127.0.0.1", port: int = 0) -> None:
        self.stalled = stalled
        self.release = threading.Event()
        self.exports = 0
        self._spans: list[Received] = []
        self._lock = threading.Lock()
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        add = trace_service_pb2_grpc.add_TraceServiceServicer_to_server
        add(_Service(self), self.server)  # type: ignore[no-untyped-call]
        bound = self.server.add_insecure_port(f"{host}:{port}")
        self.endpoint = f"{host}:{bound}"

    def add(self, span: Received) -> None:
        with self._lock:
            self._spans.append(span)

    def spans(self) -> list[Received]:
        with self._lock:
            return list(self._spans)

    def wait_for(self, count: int, timeout: float = 10.0) -> list[Received]:
        """At least ``count`` spans (then a moment more for stragglers), or what came."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and len(self.spans()) < count:
            time.sleep(0.05)
        return self.spans()

    def __enter__(self) -> OtlpReceiver:
        self.server.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release.set()
        self.server.stop(0)
