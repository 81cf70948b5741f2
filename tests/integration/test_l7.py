"""The L7 path on loopback: the real ``L7Proxy`` between real clients and real sample-app
processes (see ``l7harness.py``); what the sandbox tests cover end to end is checked here
in the corners that are slow or awkward to reach through the mesh: pipelining, retry
buffer limits, connection-pool limits, mirroring, access-log fields.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import re
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import orjson
import pytest
from l7harness import L7Rig

from nodeagent.samples.samplegrpc import (
    BidiSession,
    call_client_stream,
    call_server_stream,
    call_unary,
)
from nodeagent.telemetry.accesslog import AccessRecord


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[L7Rig]:
    with L7Rig(tmp_path, {"v1": 1, "v2": 1}) as r:
        yield r


def get(rig: L7Rig, path: str, headers: dict[str, str] | None = None) -> tuple[int, Any, Any]:
    c = http.client.HTTPConnection(*rig.address, timeout=10)
    try:
        c.request("GET", path, headers=headers or {})
        r = c.getresponse()
        data = r.read()
        try:
            doc = json.loads(data)
        except ValueError:
            doc = data
        return r.status, doc, r
    finally:
        c.close()


def raw(rig: L7Rig, data: bytes) -> bytes:
    s = socket.create_connection(rig.address, timeout=10)
    try:
        s.sendall(data)
        s.shutdown(socket.SHUT_WR)
        out = b""
        while True:
            d = s.recv(65536)
            if not d:
                return out
            out += d
    finally:
        s.close()


def test_pipelined_requests_are_answered_in_order(rig: L7Rig) -> None:
    reqs = (
        b"".join(f"GET /p{i} HTTP/1.1\r\nHost: web\r\n\r\n".encode() for i in range(5))
        + b"GET /last HTTP/1.1\r\nHost: web\r\nConnection: close\r\n\r\n"
    )
    out = raw(rig, reqs)
    assert out.count(b"HTTP/1.1 200") == 6
    paths = [
        json.loads(part.split(b"\r\n\r\n", 1)[1].split(b"HTTP/1.1")[0])["path"]
        for part in out.split(b"HTTP/1.1 200 OK")[1:]
    ]
    assert paths == ["/p0", "/p1", "/p2", "/p3", "/p4", "/last"]


def test_large_bodies_arrive_intact_on_one_connection(rig: L7Rig) -> None:
    body = bytes(i % 251 for i in range(5 << 20))
    want = hashlib.sha256(body).hexdigest()
    c = http.client.HTTPConnection(*rig.address, timeout=20)
    for _ in range(3):
        c.request("POST", "/", body=body)
        r = c.getresponse()
        assert r.status == 200 and json.loads(r.read())["body_sha256"] == want
    c.request("GET", f"/bytes/{5 << 20}")
    r = c.getresponse()
    assert hashlib.sha256(r.read()).hexdigest() == want
    c.close()


def test_malformed_request_gets_400_with_flag_and_log(rig: L7Rig) -> None:
    out = raw(rig, b"GET / HTTP/1.1\r\nHost: web\r\nContent-Length: x\r\n\r\n")
    assert out.startswith(b"HTTP/1.1 400")
    assert b"x-nodeagent-response-flag: DPE" in out.lower().replace(b"dpe", b"DPE")
    rec = rig.records()[-1]
    assert rec["response_code"] == 400 and rec["response_flags"] == "DPE"


def test_oversize_head_gets_431(rig: L7Rig) -> None:
    out = raw(rig, b"GET / HTTP/1.1\r\nHost: web\r\nX-Big: " + b"a" * 70000 + b"\r\n\r\n")
    assert out.startswith(b"HTTP/1.1 431")


def test_body_larger_than_retry_buffer_streams_but_is_not_retried(tmp_path: Path) -> None:
    with L7Rig(tmp_path, {"v1": 1}) as rig:  # one endpoint: /fail counts per process
        _retry_buffer(rig)


def _retry_buffer(rig: L7Rig) -> None:
    body = bytes(i % 251 for i in range(300_000))
    key = f"k{time.time_ns()}"
    c = http.client.HTTPConnection(*rig.address, timeout=10)
    c.request("POST", f"/fail/1/{key}", body=body)
    r = c.getresponse()
    r.read()
    assert r.status == 503  # a 300 kB body cannot be replayed from a 64 KiB buffer
    small = b"x" * 1000
    c.request("POST", f"/fail/1/{key}-small", body=small)
    r = c.getresponse()
    doc = json.loads(r.read())
    assert r.status == 200 and doc["body_sha256"] == hashlib.sha256(small).hexdigest()
    rec = rig.records()
    assert rec[-1]["attempts"] == 2 and rec[-2]["attempts"] == 1


def test_connection_pool_overflow_is_503_uo(rig: L7Rig) -> None:
    rig.apply("""
        apiVersion: networking.istio.io/v1
        kind: DestinationRule
        metadata: {name: web, namespace: default}
        spec:
          host: web
          trafficPolicy:
            connectionPool:
              tcp: {maxConnections: 1}
              http: {http1MaxPendingRequests: 1}
    """)
    results: list[int] = []

    def slow() -> None:
        results.append(get(rig, "/delay/1")[0])

    threads = [threading.Thread(target=slow) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    # one in flight, one waiting, the others overflow
    assert sorted(results) == [200, 200, 503, 503], results
    flags = [r["response_flags"] for r in rig.records() if r["response_code"] == 503]
    assert flags == ["UO", "UO"]


def test_max_requests_per_connection_opens_new_upstream_connections(rig: L7Rig) -> None:
    rig.apply("""
        apiVersion: networking.istio.io/v1
        kind: DestinationRule
        metadata: {name: web, namespace: default}
        spec:
          host: web
          trafficPolicy:
            loadBalancer: {simple: ROUND_ROBIN}
            connectionPool: {http: {maxRequestsPerConnection: 1}}
    """)
    clients = set()
    for _ in range(4):
        status, doc, _ = get(rig, "/")
        assert status == 200
        clients.add(doc["client"])
    assert len(clients) == 4  # every request on its own upstream connection


def test_keep_alive_upstream_connections_are_reused(rig: L7Rig) -> None:
    rig.apply("""
        apiVersion: networking.istio.io/v1
        kind: VirtualService
        metadata: {name: web, namespace: default}
        spec:
          hosts: [web]
          http: [{route: [{destination: {host: web, subset: v1}}]}]
        ---
        apiVersion: networking.istio.io/v1
        kind: DestinationRule
        metadata: {name: web, namespace: default}
        spec:
          host: web
          subsets: [{name: v1, labels: {version: v1}}]
    """)
    clients = {get(rig, "/")[1]["client"] for _ in range(5)}
    assert len(clients) == 1


def test_mirror_sends_a_copy_with_shadow_host(rig: L7Rig) -> None:
    rig.apply("""
        apiVersion: networking.istio.io/v1
        kind: VirtualService
        metadata: {name: web, namespace: default}
        spec:
          hosts: [web]
          http:
          - route: [{destination: {host: web, subset: v1}}]
            mirror: {host: web, subset: v2}
            mirrorPercentage: {value: 100}
        ---
        apiVersion: networking.istio.io/v1
        kind: DestinationRule
        metadata: {name: web, namespace: default}
        spec:
          host: web
          subsets: [{name: v1, labels: {version: v1}}, {name: v2, labels: {version: v2}}]
    """)
    for _ in range(3):
        status, doc, _ = get(rig, "/mirrored")
        assert status == 200 and doc["version"] == "v1"
    # Each /count poll is itself counted: what v2 served beyond the polls is mirrored.
    deadline = time.monotonic() + 5
    polls = 0
    while True:
        polls += 1
        mirrored = get_direct(rig, "web-v2-0", "/count")["served"] - polls
        if mirrored >= 3 or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    time.sleep(0.3)  # a fourth, unwanted copy would have arrived by now
    polls += 1
    assert get_direct(rig, "web-v2-0", "/count")["served"] - polls == 3


def get_direct(rig: L7Rig, pod: str, path: str) -> Any:
    c = http.client.HTTPConnection("127.0.0.1", rig.app_port[pod], timeout=5)
    try:
        c.request("GET", path)
        return json.loads(c.getresponse().read())
    finally:
        c.close()


def test_upstream_gone_is_503_uf_after_retries(rig: L7Rig) -> None:
    rig.apply("""
        apiVersion: networking.istio.io/v1
        kind: VirtualService
        metadata: {name: web, namespace: default}
        spec:
          hosts: [web]
          http: [{route: [{destination: {host: web, subset: v2}}]}]
        ---
        apiVersion: networking.istio.io/v1
        kind: DestinationRule
        metadata: {name: web, namespace: default}
        spec:
          host: web
          subsets: [{name: v2, labels: {version: v2}}]
    """)
    rig.apps["web-v2-0"].kill()
    rig.apps["web-v2-0"].wait()
    status, body, r = get(rig, "/")
    assert status == 503 and r.getheader("x-nodeagent-response-flag") == "URX"
    rec = rig.records()[-1]
    assert rec["attempts"] == 3  # Istio's default: 2 retries on connect-failure
    assert b"connect" in body


def test_consistent_hash_cookie_is_generated_and_sticks(rig: L7Rig) -> None:
    rig.apply("""
        apiVersion: networking.istio.io/v1
        kind: DestinationRule
        metadata: {name: web, namespace: default}
        spec:
          host: web
          trafficPolicy:
            loadBalancer: {consistentHash: {httpCookie: {name: user, ttl: 60s}}}
    """)
    status, _, r = get(rig, "/")
    cookie = r.getheader("set-cookie")
    assert status == 200 and cookie and cookie.startswith("user=")
    value = cookie.split(";", 1)[0]
    pods = {get(rig, "/", {"cookie": value})[1]["pod"] for _ in range(10)}
    assert len(pods) == 1


# -- HTTP/2 and gRPC ---------------------------------------------------------------------


def grpc_target(rig: L7Rig) -> str:
    return f"{rig.grpc_address[0]}:{rig.grpc_address[1]}"


def test_grpc_unary_and_streams_through_the_h2_path(rig: L7Rig) -> None:
    t = grpc_target(rig)
    reply = call_unary(t, "hello", {"x-user": "alice"})
    assert reply.text == "hello" and reply.metadata["x-user"] == "alice"
    replies = call_server_stream(t, "s", count=5)
    assert len(replies) == 5 and {r.text for r in replies} == {"s"}
    agg = call_client_stream(t, ["a", "bb", "ccc"])
    assert agg.count == 3
    with BidiSession(t) as bidi:
        for word in ("one", "two", "three"):
            bidi.send(word)
            assert bidi.recv().text == word  # echoed before the next is sent
    payload = bytes(i % 251 for i in range(3 << 20))
    big = call_unary(t, "big", payload=payload)
    assert big.payload == payload
    recs = rig.records(5)
    rec = recs[-1]
    assert rec["protocol"] == "HTTP/2" and rec["response_code"] == 200  # Envoy's %PROTOCOL%
    assert rec["grpc_status"] == "0" and rec["path"] == "/nodeagent.sample.Echo/Unary"
    # five calls, each message counted: 1+1+3+3+1 from the client, 1+5+1+3+1 back; the
    # bidi session is cancelled by its client before the trailers (DC, no grpc-status)
    grpc_ok = {"request_protocol": "grpc", "grpc_response_status": "0", "response_code": "200"}
    assert istio(rig, "istio_requests_total", **grpc_ok) == 4
    bidi = {"request_protocol": "grpc", "grpc_response_status": "", "response_flags": "DC"}
    assert istio(rig, "istio_requests_total", **bidi) == 1
    assert istio(rig, "istio_request_messages_total", request_protocol="grpc") == 9
    assert istio(rig, "istio_response_messages_total", request_protocol="grpc") == 11
    assert istio(rig, "istio_request_messages_total", **bidi) == 3
    assert istio(rig, "istio_request_messages_total", request_protocol="http") == 0


def test_grpc_routes_by_method(rig: L7Rig) -> None:
    rig.apply("""
        apiVersion: networking.istio.io/v1
        kind: VirtualService
        metadata: {name: web, namespace: default}
        spec:
          hosts: [web]
          http:
          - match: [{uri: {exact: /nodeagent.sample.Echo/Unary}}]
            route: [{destination: {host: web, subset: v2}}]
          - route: [{destination: {host: web, subset: v1}}]
        ---
        apiVersion: networking.istio.io/v1
        kind: DestinationRule
        metadata: {name: web, namespace: default}
        spec:
          host: web
          subsets: [{name: v1, labels: {version: v1}}, {name: v2, labels: {version: v2}}]
    """)
    t = grpc_target(rig)
    assert {call_unary(t, "u").version for _ in range(10)} == {"v2"}
    assert {r.version for _ in range(5) for r in call_server_stream(t, "s", count=2)} == {"v1"}


def test_grpc_unavailable_is_retried(tmp_path: Path) -> None:
    with L7Rig(tmp_path, {"v1": 1}) as rig:
        rig.apply("""
            apiVersion: networking.istio.io/v1
            kind: VirtualService
            metadata: {name: web, namespace: default}
            spec:
              hosts: [web]
              http:
              - retries: {attempts: 2, retryOn: unavailable}
                route: [{destination: {host: web}}]
        """)
        t = grpc_target(rig)
        with pytest.raises(grpc.RpcError) as e:
            call_unary(t, "x", fail_code=14)
        assert e.value.code() is grpc.StatusCode.UNAVAILABLE
        assert rig.records()[-1]["attempts"] == 3  # tried three times, still failing
        assert rig.records()[-1]["grpc_status"] == "14"
        assert istio(rig, "istio_requests_total", grpc_response_status="14") == 1
        assert call_unary(t, "ok").text == "ok"


def test_a_burst_of_grpc_calls_shares_one_upstream_connection(tmp_path: Path) -> None:
    # 20 calls at once on one client connection, while the first dial to the endpoint is
    # still in progress: they wait for it and multiplex on it, as Envoy's pending requests
    # do, rather than dial 20 connections
    with L7Rig(tmp_path, {"v1": 1}) as rig:
        rig.dial_delay = 0.3
        t = grpc_target(rig)
        replies: list[str] = []
        with grpc.insecure_channel(t) as channel:
            grpc.channel_ready_future(channel).result(timeout=10)
            threads = [
                threading.Thread(
                    target=lambda i=i: replies.append(
                        call_unary(t, f"c{i}", delay_ms=100, channel=channel).text
                    )
                )
                for i in range(20)
            ]
            for th in threads:
                th.start()
            for th in threads:
                th.join(30)
        assert sorted(replies) == sorted(f"c{i}" for i in range(20))
        assert rig.dials == 1
        assert len(rig.records(20)) == 20  # recorded after the replies went out
        assert istio(rig, "istio_requests_total", grpc_response_status="0") == 20


def test_a_failed_dial_fails_the_calls_that_waited_for_it(tmp_path: Path) -> None:
    with L7Rig(tmp_path, {"v1": 1}) as rig:
        rig.dial_delay = 0.3
        rig.apps["web-v1-0"].kill()  # nothing listens: the one dial is refused
        rig.apps["web-v1-0"].wait()
        t = grpc_target(rig)
        codes: list[grpc.StatusCode] = []

        def call(i: int) -> None:
            try:
                call_unary(t, f"c{i}", channel=channel)
            except grpc.RpcError as e:
                codes.append(e.code())

        with grpc.insecure_channel(t) as channel:
            grpc.channel_ready_future(channel).result(timeout=10)
            threads = [threading.Thread(target=call, args=(i,)) for i in range(5)]
            for th in threads:
                th.start()
            for th in threads:
                th.join(30)
        assert codes == [grpc.StatusCode.UNAVAILABLE] * 5
        # the first try and Istio's two default retries: each dial shared by all five
        assert rig.dials == 3
        records = rig.records(5)
        assert [(r["response_flags"], r["attempts"]) for r in records] == [("URX", 3)] * 5


def test_calls_waiting_on_a_dial_its_caller_abandoned_dial_again(tmp_path: Path) -> None:
    # the call that started the dial gives up (its deadline) while others wait on it:
    # they are not failed with its cancellation, one of them dials anew
    with L7Rig(tmp_path, {"v1": 1}) as rig:
        rig.apply("""
            apiVersion: networking.istio.io/v1
            kind: VirtualService
            metadata: {name: web, namespace: default}
            spec:
              hosts: [web]
              http:
              - retries: {attempts: 0}  # a waiter failed would not be saved by a retry
                route: [{destination: {host: web}}]
        """)
        rig.dial_delay = 0.5
        t = grpc_target(rig)
        first: list[grpc.StatusCode] = []
        replies: list[str] = []

        def impatient() -> None:
            try:
                call_unary(t, "first", channel=channel, timeout=0.2)
            except grpc.RpcError as e:
                first.append(e.code())

        with grpc.insecure_channel(t) as channel:
            grpc.channel_ready_future(channel).result(timeout=10)
            a = threading.Thread(target=impatient)
            a.start()
            time.sleep(0.1)  # its dial is under way
            others = [
                threading.Thread(
                    target=lambda i=i: replies.append(call_unary(t, f"c{i}", channel=channel).text)
                )
                for i in range(4)
            ]
            for th in others:
                th.start()
            for th in (a, *others):
                th.join(30)
        assert first == [grpc.StatusCode.DEADLINE_EXCEEDED]
        assert sorted(replies) == ["c0", "c1", "c2", "c3"]
        assert rig.dials == 2


def istio(rig: L7Rig, name: str, **want: str) -> float:
    """The sum of the samples of ``name`` whose labels include ``want``."""
    total = 0.0
    for family in rig.metrics.registry.collect():
        for smp in family.samples:
            if smp.name == name and want.items() <= smp.labels.items():
                total += smp.value
    return total


ACCESS_LOG_FIELDS = [
    *("source_workload", "source_namespace", "source_principal", "destination_service"),
    *("destination_workload", "destination_namespace", "destination_principal", "protocol"),
    *("upstream_cluster", "route_name", "reporter", "downstream_remote_address"),
    *("downstream_local_address", "upstream_local_address", "requested_server_name"),
    *("connection_termination_details", "start_time", "method", "authority", "path"),
    *("response_code", "response_flags", "bytes_received", "bytes_sent", "duration"),
    *("upstream_service_time", "upstream_host", "upstream_transport_failure_reason"),
    *("x_forwarded_for", "attempts", "trace_id", "request_id", "user_agent", "grpc_status"),
]
"""An HTTP request's access-log fields (no policy, JWT or local answer), in line order."""


def test_access_log_lines_are_what_orjson_writes_for_awkward_fields(rig: L7Rig) -> None:
    """Quotes, backslashes, a tab and bytes above ASCII in what the client
    sends (path, User-Agent, X-Request-Id, X-Forwarded-For, Host) are escaped in the
    line exactly as ``orjson`` writes the record, and read back as sent."""
    agent = 'curl "7.88" \\ t\tab caf\xe9'
    sent = [
        ("/plain", "t/1", "id-1", "192.0.2.7"),
        ('/q"uote?a=%E9&b=\\', agent, 'x"id\\', 'a"b, 10.0.0.1'),
    ]
    s = socket.create_connection(rig.address, timeout=10)
    try:
        for path, ua, rid, xff in sent:
            head = (
                f"GET {path} HTTP/1.1\r\nHost: svc\r\nUser-Agent: {ua}\r\n"
                f"X-Request-Id: {rid}\r\nX-Forwarded-For: {xff}\r\n\r\n"
            )
            s.sendall(head.encode("latin-1"))
            got = b""
            while b"\r\n\r\n" not in got:
                got += s.recv(65536)
            m = re.search(rb"(?i)content-length: *(\d+)", got)
            assert m is not None, got
            body = got.split(b"\r\n\r\n", 1)[1]
            while len(body) < int(m.group(1)):
                body += s.recv(65536)
    finally:
        s.close()
    recs = rig.records(2)
    lines = [x for x in rig.log_buffer.getvalue().splitlines() if x][-2:]
    for line in lines:
        assert line == orjson.dumps(orjson.loads(line))
    for rec, (path, ua, rid, xff) in zip(recs[-2:], sent, strict=True):
        assert rec["path"] == path
        assert rec["user_agent"] == ua
        assert rec["request_id"] == rid
        assert rec["x_forwarded_for"] == xff
        assert list(rec) == ACCESS_LOG_FIELDS


def test_request_metrics_carry_istios_labels_and_count_bytes(rig: L7Rig) -> None:
    c = http.client.HTTPConnection(*rig.address, timeout=10)
    sizes: list[int] = []
    by_pod: dict[str, int] = {}
    try:
        for i in range(4):
            body = b"b" * 3000 if i == 3 else None
            headers = {"x-forwarded-for": "192.0.2.7", "user-agent": "t/1"}
            c.request("POST" if body else "GET", f"/m/{i}", body=body, headers=headers)
            r = c.getresponse()
            data = r.read()
            assert r.status == 200
            sizes.append(len(data))
            pod = json.loads(data)["pod"]
            by_pod[pod] = by_pod.get(pod, 0) + 1
    finally:
        c.close()
    recs = rig.records(4)
    # every field, in the order the line has always had (whoever parses it by position)
    assert [list(r) for r in recs] == [ACCESS_LOG_FIELDS] * 4
    assert [r["bytes_sent"] for r in recs] == sizes
    assert [r["bytes_received"] for r in recs] == [0, 0, 0, 3000]
    for r in recs:
        assert isinstance(r["duration"], int) and "duration_ms" not in r
        assert 0 <= int(r["upstream_service_time"]) <= r["duration"] + 1
        assert r["x_forwarded_for"] == "192.0.2.7" and r["user_agent"] == "t/1"
        assert r["protocol"] == "HTTP/1.1" and r["grpc_status"] is None
        assert r["upstream_transport_failure_reason"] is None
    common = {
        "reporter": "source",
        "source_workload": "client",
        "source_workload_namespace": "default",
        "source_principal": "unknown",
        "source_app": "client",
        "source_version": "unknown",
        "source_canonical_service": "client",
        "source_canonical_revision": "latest",
        "source_cluster": "Kubernetes",
        "destination_workload_namespace": "default",
        "destination_principal": "unknown",
        "destination_app": "web",
        "destination_service": "web.default.svc.cluster.local",
        "destination_service_name": "web",
        "destination_service_namespace": "default",
        "destination_canonical_service": "web",
        "destination_cluster": "Kubernetes",
        "request_protocol": "http",
        "response_code": "200",
        "grpc_response_status": "",
        "response_flags": "-",
        "connection_security_policy": "none",
        "route_name": "default",
    }
    assert istio(rig, "istio_requests_total", **common) == 4
    for pod, n in by_pod.items():
        version = pod.split("-")[1]
        per_pod = {
            **common,
            "destination_workload": pod,
            "destination_version": version,
            "destination_canonical_revision": version,
        }
        assert istio(rig, "istio_requests_total", **per_pod) == n
        assert istio(rig, "istio_request_duration_milliseconds_count", **per_pod) == n
    assert istio(rig, "istio_request_bytes_count", **common) == 4
    assert istio(rig, "istio_request_bytes_sum", **common) == 3000
    assert istio(rig, "istio_request_bytes_bucket", le="1.0", **common) == 3  # the GETs: 0
    assert istio(rig, "istio_response_bytes_sum", **common) == sum(sizes)
    assert istio(rig, "istio_response_bytes_bucket", le="+Inf", **common) == 4
    assert istio(rig, "nodeagent_metric_series_overflow_total") == 0


def _requests_total(rig: L7Rig) -> dict[tuple[str, str, str], float]:
    """istio_requests_total by (destination_workload, response_code, response_flags)."""
    from prometheus_client import generate_latest

    out: dict[tuple[str, str, str], float] = {}
    for line in generate_latest(rig.metrics.registry).decode().splitlines():
        if line.startswith("istio_requests_total{"):
            labels = dict(re.findall(r'(\w+)="([^"]*)"', line))
            key = (
                labels["destination_workload"],
                labels["response_code"],
                labels["response_flags"],
            )
            out[key] = float(line.rsplit(" ", 1)[1])
    return out


def test_one_connection_counts_each_destination_and_outcome_apart(rig: L7Rig) -> None:
    # Labels and log fields are made once per connection and destination: requests of one
    # keep-alive connection to two endpoints, then answered by a fault, keep them apart.
    rig.apply("""
        apiVersion: networking.istio.io/v1
        kind: VirtualService
        metadata: {name: web, namespace: default}
        spec:
          hosts: [web.default.svc.cluster.local]
          http:
          - name: aborted
            match: [{headers: {x-abort: {exact: "1"}}}]
            fault: {abort: {httpStatus: 503, percentage: {value: 100}}}
            route: [{destination: {host: web.default.svc.cluster.local}}]
          - name: plain
            route: [{destination: {host: web.default.svc.cluster.local}}]
        ---
        # Round robin: six requests reach both endpoints every time (least-request picks at
        # random among idle endpoints, and all six on one is a 1-in-32 draw).
        apiVersion: networking.istio.io/v1
        kind: DestinationRule
        metadata: {name: web, namespace: default}
        spec:
          host: web.default.svc.cluster.local
          trafficPolicy: {loadBalancer: {simple: ROUND_ROBIN}}
    """)
    c = http.client.HTTPConnection(*rig.address, timeout=10)
    served: list[str] = []
    try:
        for i in range(8):
            c.request("GET", f"/n/{i}", headers={"x-abort": "1"} if i >= 6 else {})
            r = c.getresponse()
            body = r.read()
            if i < 6:
                assert r.status == 200
                served.append(json.loads(body)["pod"])
            else:
                assert r.status == 503
    finally:
        c.close()
    recs = rig.records(8)  # (waits for the last record: it is written after the response)
    assert sorted(set(served)) == ["web-v1-0", "web-v2-0"]
    totals = _requests_total(rig)
    for pod in ("web-v1-0", "web-v2-0"):
        assert totals[(pod, "200", "-")] == served.count(pod)
    assert totals[("unknown", "503", "FI")] == 2, totals
    assert [r["path"] for r in recs] == [f"/n/{i}" for i in range(8)]
    assert [r["destination_workload"] for r in recs[:6]] == served
    assert [r["route_name"] for r in recs] == ["plain"] * 6 + ["aborted"] * 2
    assert [r["response_code"] for r in recs] == [200] * 6 + [503] * 2
    optional = {"authz_policy", "authz_rule", "request_principal", "detail"}
    every = set(AccessRecord.__annotations__) - optional
    assert all(every <= set(r) <= every | optional for r in recs), every ^ set(recs[0])
