"""``nodeagent dashboard``'s HTTP server: the page, the graph as JSON, an edge's requests.

Owns the routes (``/`` the page, ``/api/graph``, ``/api/requests``, ``/healthz``) and the
poller thread that scrapes the agents every ``interval`` seconds. Standard library
``ThreadingHTTPServer``: a local page for one person needs no framework, and the node
agent client it calls is synchronous. The page (``page.html``) is one file with its
script, style and drawings inline: it fetches nothing from the internet.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from typing import Any, Protocol
from urllib.parse import parse_qs, urlsplit

from nodeagent.dashboard.agents import AgentSource
from nodeagent.dashboard.graph import Sample, build_graph
from nodeagent.errors import LocalStateError

__all__ = ["Dashboard", "GraphSource", "serve"]

log = logging.getLogger(__name__)

MATCH_FIELDS = ("source_workload", "destination_service", "destination_workload")
"""The access-log fields an edge's requests are picked by."""


class GraphSource(Protocol):
    """Where the graph's samples come from: the agents or Prometheus."""

    errors: dict[str, str]
    window: float

    def describe(self) -> str: ...

    def scrape(self) -> None: ...

    def samples(self) -> list[Sample]: ...


class Dashboard:
    """The graph from ``source``; an edge's requests from ``agents`` (None: not shown)."""

    def __init__(self, source: GraphSource, agents: AgentSource | None, interval: float) -> None:
        self.source = source
        self.agents = agents
        self.interval = interval
        self._stop = threading.Event()

    def graph(self) -> dict[str, Any]:
        graph = build_graph(self.source.samples())
        errors = dict(self.source.errors)
        if self.agents is not None and self.agents is not self.source:
            errors |= self.agents.errors
        return {
            **graph.to_json(),
            "source": self.source.describe(),
            "window_seconds": self.source.window,
            "requests_available": self.agents is not None,
            "errors": errors,
            "generated_at": time.time(),
        }

    def requests(self, match: dict[str, str]) -> dict[str, Any]:
        if self.agents is None:
            return {"records": [], "error": "recent requests come from the node agent "
                    "sockets: give --socket or --sandbox"}
        return {"records": self.agents.requests(match), "error": ""}

    def poll(self) -> None:
        """Scrape the source until ``stop``; the first scrape is at once. (The agents, when
        Prometheus is the source, are asked only for an edge's requests.)"""
        while not self._stop.is_set():
            try:
                self.source.scrape()
            except Exception:  # one bad scrape never ends the page
                log.exception("dashboard: scrape failed")
            self._stop.wait(self.interval)

    def stop(self) -> None:
        self._stop.set()


def page() -> bytes:
    return resources.files("nodeagent.dashboard").joinpath("page.html").read_bytes()


class _Handler(BaseHTTPRequestHandler):
    dashboard: Dashboard
    server_version = "nodeagent-dashboard"

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("dashboard: " + format, *args)

    def do_GET(self) -> None:
        url = urlsplit(self.path)
        try:
            if url.path == "/":
                self._send(200, page(), "text/html; charset=utf-8")
            elif url.path == "/api/graph":
                self._json(self.dashboard.graph())
            elif url.path == "/api/requests":
                q = parse_qs(url.query)
                match = {k: q[k][0] for k in MATCH_FIELDS if q.get(k)}
                if not match:
                    self._send(400, b"give one of " + ", ".join(MATCH_FIELDS).encode() + b"\n")
                    return
                self._json(self.dashboard.requests(match))
            elif url.path == "/healthz":
                self._send(200, b"ok\n")
            else:
                self._send(404, f"not found: {url.path} (try /)\n".encode())
        except Exception as e:
            log.exception("dashboard: %s failed", url.path)
            self._send(500, f"{url.path} failed: {type(e).__name__}: {e}\n".encode())

    def _json(self, doc: Any) -> None:
        self._send(200, json.dumps(doc).encode(), "application/json")

    def _send(self, status: int, body: bytes, ctype: str = "text/plain; charset=utf-8") -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)


def serve(dashboard: Dashboard, host: str, port: int) -> ThreadingHTTPServer:
    """Bind the page on ``host:port`` and start the poller; call ``serve_forever`` on
    the answer (``shutdown`` and ``dashboard.stop`` end it)."""
    handler = type("Handler", (_Handler,), {"dashboard": dashboard})
    try:
        httpd = ThreadingHTTPServer((host, port), handler)
    except OSError as e:
        raise LocalStateError(f"cannot listen on {host}:{port} for the dashboard: {e}") from e
    httpd.daemon_threads = True
    threading.Thread(target=dashboard.poll, name="dashboard-poll", daemon=True).start()
    return httpd
