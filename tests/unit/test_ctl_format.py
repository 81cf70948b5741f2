"""The pure formatting of ``nodeagent ctl`` and how it chooses the agent socket."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from nodeagent.admin import capture_state, default_socket_path
from nodeagent.admin.ctl import (
    format_age,
    format_bytes,
    format_config,
    format_connections,
    format_duration,
    format_requests,
    format_services,
    format_status,
    format_table,
    format_workloads,
    render,
    resolve_socket,
)
from nodeagent.errors import NodeAgentError

NOW = 1_700_000_000.0


def columns(line: str, header: str) -> dict[str, str]:
    """Split ``line`` at the column offsets of ``header`` (names in caps, 3+ spaces apart)."""
    names = header.split()
    starts: list[int] = []
    for n in names:
        starts.append(header.index(n, starts[-1] + 1 if starts else 0))
    ends = [*starts[1:], None]
    return {n: line[s:e].strip() for n, s, e in zip(names, starts, ends, strict=True)}


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (-5, "0s"),
        (0, "0s"),
        (59.9, "59s"),
        (60, "1m"),
        (192, "3m12s"),
        (3600, "1h"),
        (7500, "2h5m"),
        (86400, "1d"),
        (3 * 86400 + 4 * 3600 + 59, "3d4h"),
    ],
)
def test_format_duration(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text


@pytest.mark.parametrize(
    ("n", "text"),
    [
        (0, "0B"),
        (1023, "1023B"),
        (1024, "1.0KiB"),
        (1536, "1.5KiB"),
        (20 * 1024**2, "20.0MiB"),
        (5 * 1024**3, "5.0GiB"),
        (3 * 1024**5, "3072.0TiB"),
    ],
)
def test_format_bytes(n: int, text: str) -> None:
    assert format_bytes(n) == text


def test_format_age() -> None:
    assert format_age(NOW - 90, NOW) == "1m30s"
    assert format_age(0, NOW) == "<unknown>"


def test_format_table_aligns_columns_without_trailing_spaces() -> None:
    out = format_table(["A", "LONGER", "C"], [["xxxx", "y", ""], ["1", "2", "3"]])
    assert out.splitlines() == [
        "A      LONGER   C",
        "xxxx   y",
        "1      2        3",
    ]
    assert format_table(["ONLY"], []) == "ONLY"


def status(**over: Any) -> dict[str, Any]:
    s: dict[str, Any] = {
        "version": "0.1.0",
        "node": "node1",
        "uptime_seconds": 3725.0,
        "cpu_percent": 1.25,
        "memory_rss_bytes": 48 * 1024**2,
        "redirect_mode": "iptables",
        "ready": True,
        "config": {
            "version": 3,
            "loaded_at": NOW - 12,
            "sources": ["/etc/mesh", "/etc/mesh-extra"],
            "last_error": "",
            "last_error_at": 0.0,
        },
    }
    s.update(over)
    return s


def test_format_status() -> None:
    lines = format_status(status(), NOW).splitlines()
    assert lines == [
        "Node:           node1",
        "Version:        0.1.0",
        "Ready:          true",
        "Uptime:         1h2m",
        "CPU:            1.2%",
        "Memory (RSS):   48.0MiB",
        "Redirect mode:  iptables",
        "Config source:  files",
        "Config version: 3",
        "Config loaded:  2023-11-14T22:13:08Z (12s ago)",
        "Config sources: /etc/mesh",
        "                /etc/mesh-extra",
        "Last error:     <none>",
        "Warnings:       <none>",
    ]


def test_format_status_lists_each_workers_rss_and_cpu() -> None:
    workers = [
        {"index": 0, "pid": 100, "state": "serving", "memory_rss_bytes": 50 << 20,
         "cpu_percent": 12.5, "connections": 3},
        {"index": 1, "pid": 101, "state": "serving", "memory_rss_bytes": 40 << 20,
         "cpu_percent": 30.0, "connections": 5, "restarts": 1},
    ]  # fmt: skip
    lines = format_status(status(workers=workers), NOW).splitlines()
    at = lines.index("Workers:")
    header, main, worker = lines[at + 1 : at + 4]
    assert columns(main, header) == {
        "WORKER": "0", "PID": "100", "STATE": "serving", "RSS": "50.0MiB", "CPU": "12.5%",
        "CONNECTIONS": "3", "RESTARTS": "0",
    }  # fmt: skip
    assert columns(worker, header)["RSS"] == "40.0MiB"
    assert columns(worker, header)["CPU"] == "30.0%"
    assert columns(worker, header)["RESTARTS"] == "1"


def test_format_status_lists_warnings_and_watches() -> None:
    cfg = {
        "version": 7,
        "loaded_at": NOW - 1,
        "sources": ["https://10.96.0.1:443"],
        "source": "kubernetes",
        "warnings": ["apps/v1 Deployment default/web: not served by the mesh, skipped"],
        "watches": [
            {
                "kind": "v1 Pod",
                "state": "watching",
                "resource_version": "4711",
                "objects": 12,
                "last_event_at": NOW - 3,
                "lag_seconds": 0.004,
            },
            {
                "kind": "v1 Service",
                "state": "backoff",
                "resource_version": "4700",
                "objects": 3,
                "relists": 2,
                "last_error": "connection refused",
            },
        ],
    }
    lines = format_status(status(config=cfg), NOW).splitlines()
    assert "Config source:  kubernetes" in lines
    assert lines[-4:] == [
        "Warnings:       apps/v1 Deployment default/web: not served by the mesh, skipped",
        "Watches:",
        "  v1 Pod: watching, 12 object(s), rv 4711, lag 4ms, last event 3s ago",
        "  v1 Service: backoff, 3 object(s), rv 4700, lag 0ms, no event yet, 2 relists, "
        "last error: connection refused",
    ]


def test_format_status_not_ready_with_an_error() -> None:
    cfg = {
        "version": 0,
        "loaded_at": 0.0,
        "sources": [],
        "last_error": "2 configuration error(s):\n  - a.yaml: bad\n  - b.yaml: worse",
        "last_error_at": NOW - 5,
    }
    out = format_status(status(ready=False, config=cfg), NOW)
    assert "Ready:          false" in out
    assert "Config loaded:  <none>" in out
    assert "Config sources: <none>" in out
    assert out.splitlines()[-4:-1] == [
        "Last error:     2 configuration error(s):",
        "                  - a.yaml: bad",
        "                  - b.yaml: worse (5s ago)",
    ]


WORKLOADS = [
    {
        "namespace": "default",
        "name": "productpage-v1",
        "node": "node1",
        "service_account": "bookinfo-productpage",
        "identity": "spiffe://cluster.local/ns/default/sa/bookinfo-productpage",
        "ip": "10.244.1.2",
        "labels": {"app": "productpage"},
        "local": True,
        "capture": "ready",
        "netns": "/var/run/netns/p1",
    },
    {
        "namespace": "default",
        "name": "ratings-v1",
        "node": "node2",
        "service_account": "default",
        "identity": "spiffe://cluster.local/ns/default/sa/default",
        "ip": "",
        "labels": {},
        "local": False,
        "capture": "",
        "netns": "",
    },
]


def test_format_workloads() -> None:
    header, *rows = format_workloads(WORKLOADS).splitlines()
    assert header.split() == [
        "NAMESPACE", "NAME", "KIND", "NODE", "IP", "LOCAL", "CAPTURE", "IDENTITY"
    ]  # fmt: skip
    assert columns(rows[0], header) == {
        "NAMESPACE": "default",
        "NAME": "productpage-v1",
        "KIND": "Pod",
        "NODE": "node1",
        "IP": "10.244.1.2",
        "LOCAL": "yes",
        "CAPTURE": "ready",
        "IDENTITY": "spiffe://cluster.local/ns/default/sa/bookinfo-productpage",
    }
    c = columns(rows[1], header)
    assert (c["IP"], c["LOCAL"], c["CAPTURE"]) == ("<none>", "no", "-")


def test_a_multi_line_cell_stays_on_its_row() -> None:
    w = {**WORKLOADS[0], "capture": "error: iptables-restore failed:\nline 3: bad rule"}
    header, row = format_workloads([w]).splitlines()
    assert columns(row, header)["CAPTURE"] == "error: iptables-restore failed: line 3: bad rule"


def endpoint(i: int) -> dict[str, Any]:
    return {"pod": f"default/r-{i}", "ip": f"10.0.0.{i}", "port": 9080, "node": "node1"}


SERVICES: list[dict[str, Any]] = [
    {
        "namespace": "default",
        "name": "reviews",
        "cluster_ip": "10.96.0.11",
        "ports": [
            {
                "name": "http",
                "port": 9080,
                "target_port": "http",
                "protocol": "TCP",
                "app_protocol": "http",
                "endpoints": [endpoint(i) for i in range(1, 6)],
            },
            {
                "name": "",
                "port": 9443,
                "target_port": "8443",
                "protocol": "TCP",
                "app_protocol": "",
                "endpoints": [],
            },
        ],
    },
    {"namespace": "other", "name": "headless", "cluster_ip": "", "ports": []},
]


def test_format_services_one_row_per_port() -> None:
    header, *rows = format_services(SERVICES).splitlines()
    assert header.split() == [
        "NAMESPACE",
        "NAME",
        "CLUSTER-IP",
        "PORT",
        "TARGET",
        "APP-PROTOCOL",
        "ENDPOINTS",
    ]
    assert len(rows) == 3
    first = columns(rows[0], header)
    assert first["PORT"] == "http:9080/TCP"
    assert first["TARGET"] == "http"
    assert first["ENDPOINTS"] == "10.0.0.1:9080,10.0.0.2:9080,10.0.0.3:9080 + 2 more..."
    second = columns(rows[1], header)
    assert (second["PORT"], second["APP-PROTOCOL"], second["ENDPOINTS"]) == (
        "9443/TCP",
        "<none>",
        "<none>",
    )
    third = columns(rows[2], header)
    assert (third["NAME"], third["CLUSTER-IP"], third["PORT"]) == ("headless", "<none>", "<none>")


def test_format_connections() -> None:
    conn = {
        "id": 12,
        "direction": "outbound",
        "pod": "default/productpage-v1",
        "source": "10.244.1.2:51234",
        "destination": "10.96.0.11:9080",
        "upstream": "10.244.2.3:15008",
        "service": "default/reviews",
        "peer_workload": "",
        "bytes_sent": 2048,
        "bytes_received": 5 * 1024**3,
        "opened_at": NOW - 200,
        "worker": 1,
    }
    header, row = format_connections([conn], NOW).splitlines()
    assert columns(row, header) == {
        "ID": "12",
        "WORKER": "1",
        "DIRECTION": "outbound",
        "POD": "default/productpage-v1",
        "SOURCE": "10.244.1.2:51234",
        "DESTINATION": "10.96.0.11:9080",
        "UPSTREAM": "10.244.2.3:15008",
        "SERVICE": "default/reviews",
        "PEER": "<none>",
        "SENT": "2.0KiB",
        "RECEIVED": "5.0GiB",
        "AGE": "3m20s",
    }


def test_format_config() -> None:
    dump = {
        "version": 4,
        "objects": [
            {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "a", "namespace": "ns"}},
            {"kind": "Broken"},
            "not an object",
        ],
    }
    lines = format_config(dump).splitlines()
    assert lines[0] == "Config version: 4"
    header, *rows = lines[2:]
    assert columns(rows[0], header) == {
        "KIND": "Service",
        "NAMESPACE": "ns",
        "NAME": "a",
        "API-VERSION": "v1",
    }
    assert columns(rows[1], header)["KIND"] == "Broken"
    assert columns(rows[2], header)["KIND"] == "<none>"


def test_render() -> None:
    assert json.loads(render("workloads", WORKLOADS, "json", NOW)) == WORKLOADS
    assert render("workloads", [], "table", NOW) == "No workloads found."
    assert render("connections", [], "json", NOW) == "[]"
    assert render("services", SERVICES, "table", NOW) == format_services(SERVICES)
    assert render("status", status(), "table", NOW) == format_status(status(), NOW)


def test_capture_state() -> None:
    assert capture_state({"key": "a/b", "capture": "ready"}) == "ready"
    assert capture_state({"key": "a/b", "state": "error: x"}) == "error: x"
    assert capture_state({"key": "a/b"}) == "unknown"
    assert capture_state(None).startswith("pending")


def test_resolve_socket(tmp_path: Path) -> None:
    d = str(tmp_path)
    assert resolve_socket(None, "/x/y.sock", d) == "/x/y.sock"
    assert resolve_socket("node2", None, d) == f"{d}/node2.sock"
    assert default_socket_path("node2") == "/run/nodeagent/node2.sock"
    with pytest.raises(NodeAgentError, match="no agent socket in"):
        resolve_socket(None, None, d)
    (tmp_path / "node1.sock").touch()
    (tmp_path / "notes.txt").touch()
    assert resolve_socket(None, None, d) == f"{d}/node1.sock"
    (tmp_path / "node2.sock").touch()
    with pytest.raises(NodeAgentError, match=r"several agents .*\(node1, node2\).*--node NAME"):
        resolve_socket(None, None, d)


def test_format_explain_names_each_decision() -> None:
    from nodeagent.admin.explain_text import format_explain

    answer = {
        "source": {"pod": "default/client", "node": "node1", "principal": "spiffe://x"},
        "request": {"to": "echo:80", "method": "PUT", "path": "/", "headers": {}},
        "route": {"virtual_service": "default/echo", "rule": 1, "rule_name": "canary",
                  "match": 0, "destinations": [{"host": "echo", "subset": "v2", "weight": 10}]},
        "endpoints": {"cluster": "outbound|80|v2|echo", "algorithm": "ROUND_ROBIN",
                      "tiers": [[{"endpoint": "10.0.0.2:8080", "pod": "default/echo-2",
                                  "active_requests": 0, "ejected": False, "locality": ""}]],
                      "excluded_as_ejected": ["10.0.0.3:8080"],
                      "pick": {"endpoint": "10.0.0.2:8080", "pod": "default/echo-2"},
                      "why": "ROUND_ROBIN: next in turn among 1 host(s)"},
        "authorization": {"enforced": "per request (HTTP attributes)", "policies": [
            {"policy": "default/no-put", "action": "DENY", "matched": True,
             "rules": [{"index": 0, "matched": True, "why": "matched"}]}],
            "decision": {"allowed": False, "policy": "default/no-put", "rule": 0,
                         "reason": "DENY policy default/no-put rule 0 matched"}},
        "verdict": {"allowed": False, "status": 403, "why": "RBAC: access denied"},
    }
    text = format_explain(answer)
    assert "VirtualService default/echo: http[1] (canary), match[0]" in text
    assert "-> echo subset v2 weight 10" in text
    assert "excluded (ejected by outlier detection): 10.0.0.3:8080" in text
    assert "would pick 10.0.0.2:8080 (default/echo-2)" in text
    assert "DENY default/no-put: MATCHED" in text and "rule 0: matched" in text
    assert "headers: none" in text
    assert text.endswith("Verdict: DENIED (403): RBAC: access denied")


def test_format_bpf_in_iptables_mode_is_one_line() -> None:
    from nodeagent.admin.ctl import format_bpf

    assert format_bpf({"mode": "iptables"}) == "Capture mode:  iptables"


def test_requests_show_the_duration_in_ms_from_a_new_or_an_older_agent() -> None:
    base = {"start_time": "2026-12-06T15:31:30.856Z", "path": "/a", "response_code": 200}
    out = format_requests(
        {"records": [{**base, "duration": 12}, {**base, "duration_ms": 7.5}], "ejected": []}
    )
    rows = out.splitlines()
    assert rows[0].split()[-1] == "MS"
    assert [r.split()[-1] for r in rows[1:3]] == ["12", "7.5"]


def test_requests_name_the_worker_that_served_each_under_workers() -> None:
    base = {"start_time": "2026-12-06T15:31:30.856Z", "path": "/a", "response_code": 429}
    out = format_requests({"records": [{**base, "worker": 0}, {**base, "worker": 1}]})
    rows = [r.split() for r in out.splitlines()]
    assert rows[0][:2] == ["TIME", "WORKER"]
    assert [r[1] for r in rows[1:]] == ["0", "1"]
    # one process (no --workers): no such column
    assert "WORKER" not in format_requests({"records": [base]})
