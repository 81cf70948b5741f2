"""The L7 path of the shared proxy: HTTP requests of local pods, each planned on the
client's node (``core/plan.py``) or admitted on the called workload's node
(``proxy/admission.py``), then executed: ``proxy/l7engine.py`` (plans, pools, retries,
mirroring, records), ``proxy/l7http1.py`` (HTTP/1.1 connections), ``proxy/l7h2.py``
(HTTP/2 and gRPC), ``proxy/l7body.py`` (request bodies), ``proxy/l7conn.py`` (the client
connection and its records), ``proxy/l7retry.py`` (local replies, retry conditions).

Owns ``L7Proxy``: the engine with its HTTP/1.1 entry, what the rest of the proxy holds;
``Downstream`` and ``Inbound`` (from ``proxy/l7conn.py``) are what it hands over.
"""

from __future__ import annotations

from collections.abc import Coroutine
from typing import Any

from nodeagent.proxy.l7conn import Downstream, Inbound
from nodeagent.proxy.l7engine import L7Engine
from nodeagent.proxy.l7http1 import Http1Session
from nodeagent.proxy.pipe import Pipe


class L7Proxy(L7Engine):
    """Routes HTTP requests of local pods; one instance per agent."""

    def serve_http1(self, ds: Downstream, pipe: Pipe) -> Coroutine[Any, Any, None]:
        """Serve one client connection speaking HTTP/1.1 until it closes or a response
        says close (the session's own coroutine: no frame of ours to pass through each
        time it resumes)."""
        return Http1Session(self, ds, pipe).serve()


__all__ = ["Downstream", "Inbound", "L7Proxy"]
