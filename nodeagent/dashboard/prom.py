"""The graph's samples from a Prometheus server: PromQL over its HTTP API.

Owns asking ``GET /api/v1/query`` for each series the graph reads, once as counted so far
(``istio_requests_total``) and once as a rate over the window
(``rate(istio_requests_total[60s])``), and joining the two by labels into ``Sample``s: the
same input the agents' own scrapes give (``dashboard/agents.py``). Standard library HTTP:
one GET per query, no client library to pull in.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

from nodeagent.dashboard.graph import METRICS, Sample
from nodeagent.errors import LocalStateError

__all__ = ["PrometheusSource", "query"]

Labels = tuple[tuple[str, str], ...]


def query(base_url: str, promql: str, timeout: float = 5.0) -> list[tuple[dict[str, str], float]]:
    """An instant query's vector: (labels, value) per series. ``LocalStateError`` names
    the server and the query when it cannot be answered."""
    url = f"{base_url.rstrip('/')}/api/v1/query?" + urllib.parse.urlencode({"query": promql})
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            doc: Any = json.loads(resp.read())
    except urllib.error.HTTPError as e:
        detail = e.read().decode(errors="replace")[:300]
        raise LocalStateError(
            f"Prometheus at {base_url} refused {promql!r}: {e.code} {detail}"
        ) from None
    except (urllib.error.URLError, OSError, ValueError) as e:
        raise LocalStateError(
            f"cannot query Prometheus at {base_url}: {e} (is --prometheus its base URL, "
            "e.g. http://127.0.0.1:9090?)"
        ) from None
    if not isinstance(doc, dict) or doc.get("status") != "success":
        raise LocalStateError(f"Prometheus at {base_url} answered {promql!r} with {doc!r:.300}")
    data = doc.get("data") or {}
    if data.get("resultType") != "vector":
        raise LocalStateError(f"Prometheus at {base_url}: {promql!r} is not an instant vector")
    out: list[tuple[dict[str, str], float]] = []
    for r in data.get("result") or []:
        labels = {k: str(v) for k, v in (r.get("metric") or {}).items() if k != "__name__"}
        out.append((labels, float(r["value"][1])))
    return out


class PrometheusSource:
    """The graph's series from the Prometheus server at ``url``."""

    def __init__(self, url: str, window: float = 60.0, timeout: float = 5.0) -> None:
        if not url.startswith(("http://", "https://")):
            raise LocalStateError(f"--prometheus {url!r}: expected an http:// or https:// URL")
        self.url = url
        self.window = window
        self.timeout = timeout
        self.errors: dict[str, str] = {}

    def describe(self) -> str:
        return f"Prometheus at {self.url}"

    def scrape(self) -> None:
        """Nothing to do: Prometheus scrapes the agents itself."""

    def samples(self) -> list[Sample]:
        out: list[Sample] = []
        try:
            for name in METRICS:
                totals = {_key(m): v for m, v in query(self.url, name, self.timeout)}
                rates = {
                    _key(m): v
                    for m, v in query(self.url, f"rate({name}[{int(self.window)}s])", self.timeout)
                }
                for key in totals.keys() | rates.keys():
                    out.append(Sample(name, dict(key), totals.get(key, 0.0), rates.get(key, 0.0)))
        except LocalStateError as e:
            self.errors["prometheus"] = str(e)
            return []
        self.errors.pop("prometheus", None)
        return out


def _key(labels: dict[str, str]) -> Labels:
    return tuple(sorted(labels.items()))
