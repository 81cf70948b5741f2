"""The agents' own metrics and recent requests, over their node agent sockets.

Owns scraping each agent (``AdminClient.metrics``: the text its port 15020 serves, which
sits in the node's netns where the dashboard may not be), keeping the scrapes of the last
``window`` seconds, and turning the oldest and newest of them into per-second rates: what
Prometheus' ``rate()`` would say, with no Prometheus. A counter that went down (the agent
restarted) counts from zero. An agent that does not answer is reported, not fatal.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from nodeagent.admin.client import AdminClient
from nodeagent.dashboard.graph import METRICS, Sample
from nodeagent.errors import LocalStateError

__all__ = ["AgentSource", "parse_metrics"]

SeriesKey = tuple[str, tuple[tuple[str, str], ...]]
Scrape = dict[SeriesKey, float]


def parse_metrics(text: str, names: frozenset[str] = frozenset(METRICS)) -> Scrape:
    """The samples of ``names`` in a text exposition, by (name, sorted labels)."""
    out: Scrape = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name in names:
                key = (s.name, tuple(sorted(s.labels.items())))
                out[key] = out.get(key, 0.0) + float(s.value)
    return out


def rates(old: tuple[float, Scrape] | None, new: tuple[float, Scrape]) -> list[Sample]:
    """Each series of ``new`` with its count and its rate since ``old`` (0 without one)."""
    t1, v1 = new
    out: list[Sample] = []
    for (name, labels), total in v1.items():
        rate = 0.0
        if old is not None and t1 > old[0]:
            before = old[1].get((name, labels), 0.0)
            rate = (total - before if total >= before else total) / (t1 - old[0])
        out.append(Sample(name, dict(labels), total, rate))
    return out


class AgentSource:
    """Scrapes the agents at ``sockets`` (node name → socket path) and keeps ``window``
    seconds of scrapes. ``scrape`` is called by the dashboard's poller thread; ``samples``
    and ``requests`` by its request handlers."""

    def __init__(
        self,
        sockets: Mapping[str, str],
        window: float = 60.0,
        timeout: float = 3.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not sockets:
            raise LocalStateError("no node agent socket to read: give --socket or --sandbox")
        self.sockets = dict(sockets)
        self.window = window
        self.timeout = timeout
        self._clock = clock
        self._lock = threading.Lock()
        self._history: dict[str, deque[tuple[float, Scrape]]] = {n: deque() for n in sockets}
        self.errors: dict[str, str] = {}
        """Per node, why its last scrape failed (empty when it answered)."""

    def describe(self) -> str:
        return "agents: " + ", ".join(f"{n} ({p})" for n, p in sorted(self.sockets.items()))

    def scrape(self) -> None:
        """Read every agent's metrics once."""
        for node, path in self.sockets.items():
            try:
                with AdminClient(path, timeout=self.timeout) as client:
                    text = client.metrics()
                scrape = parse_metrics(text)
            except (LocalStateError, ValueError) as e:
                with self._lock:
                    self.errors[node] = str(e)
                continue
            now = self._clock()
            with self._lock:
                self.errors.pop(node, None)
                hist = self._history[node]
                hist.append((now, scrape))
                # keep one scrape at or before the window's start, so rates span it all
                while len(hist) > 2 and hist[1][0] <= now - self.window:
                    hist.popleft()

    def samples(self) -> list[Sample]:
        """Every agent's series with counts and rates over (up to) the window."""
        out: list[Sample] = []
        with self._lock:
            for hist in self._history.values():
                if hist:
                    out.extend(rates(hist[0] if len(hist) > 1 else None, hist[-1]))
        return out

    def requests(self, match: Mapping[str, str], limit: int = 50) -> list[dict[str, Any]]:
        """The agents' recent access-log records whose fields equal ``match``, newest
        last, each with the ``node`` that recorded it."""
        found: list[dict[str, Any]] = []
        for node, path in self.sockets.items():
            try:
                with AdminClient(path, timeout=self.timeout) as client:
                    records = client.requests()["records"]
            except LocalStateError as e:
                with self._lock:
                    self.errors[node] = str(e)
                continue
            for r in records:
                if all(str(r.get(k, "")) == v for k, v in match.items()):
                    found.append({**r, "node": node})
        found.sort(key=lambda r: str(r.get("start_time", "")))
        return found[-limit:]
