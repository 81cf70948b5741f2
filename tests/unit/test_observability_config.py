"""``deploy/observability/``: the Grafana dashboard loads and asks only for metrics an agent
exports; the Prometheus configs scrape the agents' port and pass ``promtool``."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import CollectorRegistry

from nodeagent.admin.agentmetrics import register_agent_metrics
from nodeagent.model.status import ConnectionInfo
from nodeagent.telemetry.metrics import Metrics

DIR = Path(__file__).resolve().parents[2] / "deploy" / "observability"
GRAFANA = DIR / "grafana-nodeagent.json"

SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"),
            "summary": ("_sum", "_count", ""), "gauge": ("",), "unknown": ("",)}
PROMQL_WORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool",
                "and", "or", "unless", "offset", "inf", "nan"}


class NoAgentYet:
    """A view with nothing to report: the families exist, with no series."""

    def connections(self) -> list[ConnectionInfo]:
        return []

    def certificates(self) -> list[dict[str, Any]]:
        return []

    def ready(self) -> bool:
        return False


def exported() -> set[str]:
    """The series names an agent's registry can export, from its families and types."""
    registry: CollectorRegistry = Metrics().registry
    register_agent_metrics(registry, NoAgentYet())  # type: ignore[arg-type]
    names: set[str] = set()
    for family in registry.collect():
        names.update(family.name + s for s in SUFFIXES[family.type])
    return names


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression reads: identifiers outside label matchers,
    ranges, grouping clauses and strings that are not functions or keywords."""
    e = re.sub(r'"(\\.|[^"\\])*"', '""', expr)
    e = re.sub(r"\{[^}]*\}|\[[^\]]*\]", " ", e)
    e = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", e)
    names = set()
    for m in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", e):
        rest = e[m.end():].lstrip()
        if rest.startswith("(") or m.group() in PROMQL_WORDS or m.group().startswith("$"):
            continue
        if m.start() > 0 and e[m.start() - 1] == "$":
            continue  # a Grafana variable: $__range, $instance
        names.add(m.group())
    return names


def targets(doc: dict[str, Any]) -> Iterator[tuple[str, str]]:
    for p in doc["panels"]:
        for t in p.get("targets", []):
            yield p["title"], t["expr"]
        for inner in p.get("panels", []):
            for t in inner.get("targets", []):
                yield inner["title"], t["expr"]


def test_metric_names_of_promql() -> None:
    assert metric_names(
        'histogram_quantile(0.99, sum by (instance, le) (rate(a_bucket{x="y{"}[5m])))'
    ) == {"a_bucket"}
    assert metric_names("min by (i) (b{j=~\"$v\"}) - time()") == {"b"}
    assert metric_names("increase(c_total[$__range]) + d") == {"c_total", "d"}


def test_grafana_dashboard_loads_and_reads_only_exported_metrics() -> None:
    doc = json.loads(GRAFANA.read_text())
    assert doc["uid"] and doc["title"]
    known = exported()
    exprs = list(targets(doc))
    assert len(exprs) >= 10
    read: set[str] = set()
    for title, expr in exprs:
        names = metric_names(expr)
        assert names, f"panel {title!r}: {expr!r} reads no metric"
        assert names <= known, f"panel {title!r}: {sorted(names - known)} not exported"
        read |= names
    # what the issue asks the agents' dashboard to show
    for needed in ("process_cpu_seconds_total", "process_resident_memory_bytes",
                   "nodeagent_active_connections", "istio_tcp_connections_opened_total",
                   "nodeagent_certificate_expiry_timestamp_seconds",
                   "nodeagent_config_reloads_total"):
        assert needed in read, needed
    ids = [p["id"] for p in doc["panels"]]
    assert len(ids) == len(set(ids))
    variables = {v["name"] for v in doc["templating"]["list"]}
    for _, expr in exprs:
        for var in re.findall(r"\$(\w+)", expr):
            assert var.startswith("__") or var in variables, var


def prometheus_configs() -> list[Path]:
    return sorted(DIR.glob("prometheus*.yml"))


@pytest.mark.parametrize("path", prometheus_configs(), ids=lambda p: p.name)
def test_prometheus_configs_scrape_the_agents_port(path: Path) -> None:
    doc = yaml.safe_load(path.read_text())
    jobs = doc["scrape_configs"]
    assert jobs
    for job in jobs:
        text = json.dumps(job)
        assert ":15020" in text, f"{path.name} job {job['job_name']} scrapes another port"
    if "kubernetes" in path.name:
        sd = jobs[0]["kubernetes_sd_configs"][0]
        assert sd["role"] == "pod" and sd["namespaces"]["names"] == ["nodeagent-system"]
        assert {"action": "keep", "regex": "nodeagent",
                "source_labels": ["__meta_kubernetes_pod_label_app"]} in jobs[0]["relabel_configs"]
    elif shutil.which("promtool"):  # Debian's promtool lacks Kubernetes discovery
        p = subprocess.run(["promtool", "check", "config", str(path)], capture_output=True,
                           text=True, timeout=60)
        assert p.returncode == 0, p.stdout + p.stderr
