"""The access-log line ``Recorder.record`` writes for an L7 request: byte for byte what
``orjson`` writes for the same record, whatever the client's strings hold (quotes,
backslashes, control characters, non-ASCII text), and the request counted in the metrics."""

from __future__ import annotations

import io
from typing import Any

import orjson
import pytest

from nodeagent.model.objects import Pod, Service, ServicePort
from nodeagent.proxy.l7conn import Downstream, Exchange, Recorder
from nodeagent.telemetry.accesslog import AccessLog
from nodeagent.telemetry.metrics import Metrics


async def _no_connect(*_: Any) -> tuple[str, str]:
    raise AssertionError("not dialled")


def _downstream() -> Downstream:
    port = ServicePort(80, 8080, "http")
    return Downstream(
        Pod("default", "client", "n1"),
        "unknown",
        "10.1.0.9",
        Service("default", "web", (port,)),
        port,
        _no_connect,
        {"source": "10.1.0.9:40000", "destination": "10.96.0.5:80"},
    )


def _recorded(x: Exchange) -> tuple[bytes, Any]:
    log = AccessLog(io.BytesIO())
    metrics = Metrics()
    Recorder(metrics, log).record(_downstream(), x)
    (line,) = log._recent
    return line, orjson.loads(line)


ODD = [
    "plain",
    'a"quote',
    "back\\slash",
    "tab\there",
    "nul\x00bell\x07",
    "esc\x1b[31m",
    "del\x7f",
    "café",
    "line\u2028sep",
    "日本語",
    "\x85next-line",
    'mixed "é" \\ \n',
]


@pytest.mark.parametrize("odd", ODD)
def test_the_line_is_what_orjson_writes_for_any_client_string(odd: str) -> None:
    x = Exchange(1.0, 1_764_000_000.25, f"GET{odd}", f"web{odd}", f"/p?q={odd}", "HTTP/1.1")
    x.user_agent, x.forwarded_for = f"curl/{odd}", f"10.0.0.1, {odd}"
    x.trace_id, x.request_id = f"t{odd}", f"r{odd}"
    x.status, x.bytes_in, x.bytes_out, x.attempts = 200, 5, 1234, 1
    x.upstream, x.grpc_status = "10.1.0.1:8080", odd
    line, record = _recorded(x)
    assert line == orjson.dumps(record, option=orjson.OPT_APPEND_NEWLINE)
    assert record["method"] == f"GET{odd}"
    assert record["authority"] == f"web{odd}"
    assert record["path"] == f"/p?q={odd}"
    assert record["user_agent"] == f"curl/{odd}"
    assert record["x_forwarded_for"] == f"10.0.0.1, {odd}"
    assert (record["trace_id"], record["request_id"]) == (f"t{odd}", f"r{odd}")
    assert record["grpc_status"] == odd
    assert record["start_time"] == "2025-11-24T16:00:00.250Z"
    assert (record["response_code"], record["bytes_received"], record["bytes_sent"]) == (
        200,
        5,
        1234,
    )
    assert record["attempts"] == 1


@pytest.mark.parametrize("odd", ODD)
def test_a_denials_fields_are_written_as_orjson_writes_them(odd: str) -> None:
    x = Exchange(1.0, 1_764_000_000.0, "GET", "web", "/", "HTTP/1.1")
    x.status, x.policy, x.policy_rule = 403, f"default/{odd}", 2
    x.request_principal, x.detail = f"iss/{odd}", f"RBAC: {odd}"
    x.flags.append("UF")
    line, record = _recorded(x)
    assert line == orjson.dumps(record, option=orjson.OPT_APPEND_NEWLINE)
    assert (record["authz_policy"], record["authz_rule"]) == (f"default/{odd}", 2)
    assert (record["request_principal"], record["detail"]) == (f"iss/{odd}", f"RBAC: {odd}")
    assert record["upstream_transport_failure_reason"] == f"RBAC: {odd}"


@pytest.mark.parametrize("n", [0, 7, 999, 1023, 1024, 5_000_000])
def test_numbers_are_written_in_decimal_at_any_size(n: int) -> None:
    x = Exchange(1.0, 1_764_000_000.0, "GET", "web", "/", "HTTP/1.1")
    x.status, x.bytes_in, x.bytes_out, x.attempts = 200, n, n + 1, 1
    line, record = _recorded(x)
    assert line == orjson.dumps(record, option=orjson.OPT_APPEND_NEWLINE)
    assert (record["bytes_received"], record["bytes_sent"]) == (n, n + 1)


@pytest.mark.parametrize("odd", ODD)
@pytest.mark.parametrize(
    ("field", "attr"),
    [
        ("method", "method"),
        ("authority", "authority"),
        ("path", "path"),
        ("user_agent", "user_agent"),
        ("trace_id", "trace_id"),
        ("request_id", "request_id"),
        ("upstream_host", "upstream"),
        ("x_forwarded_for", "forwarded_for"),
        ("grpc_status", "grpc_status"),
        ("detail", "detail"),
        ("authz_policy", "policy"),
        ("request_principal", "request_principal"),
    ],
)
def test_each_string_alone_is_written_as_orjson_writes_it(field: str, attr: str, odd: str) -> None:
    # the others plain: each string is checked, not only the line as a whole
    x = Exchange(1.0, 1_764_000_000.0, "GET", "web", "/", "HTTP/1.1")
    x.status, x.attempts, x.upstream = 200, 1, "10.1.0.1:8080"
    setattr(x, attr, f"a{odd}")
    line, record = _recorded(x)
    assert line == orjson.dumps(record, option=orjson.OPT_APPEND_NEWLINE)
    assert record[field] == f"a{odd}"
    assert record["response_flags"] == "-"
