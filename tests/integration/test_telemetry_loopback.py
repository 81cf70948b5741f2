"""Istio's metrics and the access log, on both nodes of the loopback mesh (the real
``Proxy`` twice, real HBONE with mutual TLS; ``test_proxy_loopback.py``'s rig): after N
connections or requests, each metric and label counts exactly what happened on each
side (``reporter`` source on the client's node, destination on the server's), and each
connection and request has its log line with the right fields."""

from __future__ import annotations

import asyncio
import io
import json
import os
import re
from pathlib import Path
from typing import Any

from certs import spiffe_id
from test_proxy_loopback import (
    MESH,
    SERVER_IP,
    SERVICE_IP,
    TCP_PORT,
    Rig,
    eventually,
    round_trip,
    run,
)

CLIENT_ID, SERVER_ID = spiffe_id("default", "client"), spiffe_id("default", "server")
HBONE_PORT = 15008

LABELLED = MESH.replace(
    "labels: {app: client}", "labels: {app: client, service.istio.io/workload-name: sleep}"
).replace(
    "labels: {app: echo}",
    "labels: {app: echo, version: v7, service.istio.io/canonical-name: echo-canonical}",
)
"""The rig's mesh with the labels Istio's telemetry reads: the client's workload named by
label, the server's version and canonical service."""

PEERS = {
    "source_workload": "sleep",
    "source_workload_namespace": "default",
    "source_principal": CLIENT_ID,
    "source_app": "client",
    "source_version": "unknown",
    "source_canonical_service": "client",
    "source_canonical_revision": "latest",
    "source_cluster": "Kubernetes",
    "destination_workload": "server",
    "destination_workload_namespace": "default",
    "destination_principal": SERVER_ID,
    "destination_app": "echo",
    "destination_version": "v7",
    "destination_service": "echo.default.svc.cluster.local",
    "destination_service_name": "echo",
    "destination_service_namespace": "default",
    "destination_canonical_service": "echo-canonical",
    "destination_canonical_revision": "v7",
    "destination_cluster": "Kubernetes",
    "connection_security_policy": "mutual_tls",
}
"""Every label of who talked to whom, as both nodes report it."""

HTTP_POLICY = """
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: echo-paths, namespace: default}
spec:
  selector: {matchLabels: {app: echo}}
  action: ALLOW
  rules:
  - to: [{operation: {paths: ["/ok/*"]}}]
"""
"""A rule on paths: the server's node serves its HTTP port request by request."""


class LabelledRig(Rig):
    def __init__(self, tmp: Path, mtls: bool) -> None:
        super().__init__(tmp, mtls)
        (self.dir / "mesh.yaml").write_text(LABELLED)
        self.snap = self._load()

    def istio(self, node: str, name: str, **want: str) -> float:
        """The sum of ``name``'s samples on ``node`` whose labels include ``want``;
        every sample of an ``istio_`` metric must carry all of ``PEERS``'s labels."""
        total = 0.0
        for family in self.metrics[node].registry.collect():
            for smp in family.samples:
                if smp.name == name and want.items() <= smp.labels.items():
                    assert set(PEERS) <= set(smp.labels), smp.labels
                    total += smp.value
        return total

    def _log_file(self) -> io.BufferedWriter:
        return io.BufferedWriter(io.BytesIO())  # read back by ``written``

    def written(self, node: str) -> list[dict[str, Any]]:
        """The lines ``node``'s access log wrote out (flushed now)."""
        log = self.proxies[node].access_log
        log.flush()
        out = log.out.raw.getvalue()  # (the rig's BytesIO, under a buffer)
        return [json.loads(line) for line in out.splitlines()]


def test_tcp_connections_are_counted_and_logged_on_both_nodes() -> None:
    sizes = (1000, 70_000, 5)

    async def body(rig: Rig) -> None:
        assert isinstance(rig, LabelledRig)
        for size in sizes:
            payload = os.urandom(size)
            _, got = await round_trip(*await rig.connect((SERVICE_IP, TCP_PORT)), payload)
            assert got == size
        closed = "istio_tcp_connections_closed_total"
        for node in ("node1", "node2"):
            await eventually(lambda n=node: rig.istio(n, closed) == 3, f"{node}'s closes")
        for node, reporter in (("node1", "source"), ("node2", "destination")):
            labels = {**PEERS, "reporter": reporter, "request_protocol": "tcp"}
            assert rig.istio(node, "istio_tcp_connections_opened_total", **labels) == 3
            assert rig.istio(node, closed, **labels, response_flags="-") == 3
            assert rig.istio(node, "istio_tcp_sent_bytes_total", **labels) == sum(sizes)
            assert rig.istio(node, "istio_tcp_received_bytes_total", **labels) == sum(sizes)
            assert rig.istio(node, "istio_requests_total") == 0  # relayed: no HTTP
        # one "connection complete" line per connection on each side, ztunnel's fields
        out = [r for r in rig.written("node1") if r.get("message") == "connection complete"]
        inn = [r for r in rig.written("node2") if r.get("message") == "connection complete"]
        assert [(r["bytes_sent"], r["bytes_recv"]) for r in out] == [(s, s) for s in sizes]
        assert sorted(r["bytes_sent"] for r in inn) == sorted(sizes)
        for r in out:
            assert r["direction"] == "outbound" and r["reporter"] == "source"
            assert r["dst.addr"] == f"{SERVER_IP}:{HBONE_PORT}"
            assert r["dst.hbone_addr"] == f"{SERVER_IP}:{TCP_PORT}"
        for r in inn:
            assert r["direction"] == "inbound" and r["reporter"] == "destination"
            assert r["dst.addr"] == f"{SERVER_IP}:{TCP_PORT}" and "dst.hbone_addr" not in r
        for r in out + inn:
            assert r["src.workload"] == "client" and r["src.namespace"] == "default"
            assert r["src.identity"] == CLIENT_ID and r["dst.identity"] == SERVER_ID
            assert r["dst.workload"] == "server" and r["dst.namespace"] == "default"
            assert r["dst.service"] == "echo.default.svc.cluster.local"
            assert re.fullmatch(r"\d+ms", r["duration"]), r
            assert r["connection_security_policy"] == "mutual_tls" and "error" not in r
            assert r["connection_termination_details"] in ("done", "client closed")
        assert rig.proxies["node1"].access_log.recent_connections[-1] == out[-1]
        assert not rig.proxies["node1"].access_log.recent  # no request records

    run(True, body, LabelledRig)


def test_http_requests_are_counted_by_both_nodes_with_their_labels_and_logged() -> None:
    paths = ["/ok/1", "/ok/22", "/no", "/ok/333", "/ok/4444"]

    async def body(rig: Rig) -> None:
        assert isinstance(rig, LabelledRig)
        rig.apply(HTTP_POLICY)
        r, w = await rig.connect((SERVICE_IP, 80))
        sizes: list[int] = []
        for path in paths:
            w.write(f"GET {path} HTTP/1.1\r\nhost: echo.default\r\n\r\n".encode())
            head = await r.readuntil(b"\r\n\r\n")
            length = int(re.search(rb"content-length: *(\d+)", head, re.I).group(1))
            await r.readexactly(length)
            sizes.append(length)
            assert head.startswith(b"HTTP/1.1 403" if path == "/no" else b"HTTP/1.1 200"), head
        w.close()
        total = "istio_requests_total"
        for node in ("node1", "node2"):
            await eventually(lambda n=node: rig.istio(n, total) == 5, f"{node}'s requests")
        for node, reporter in (("node1", "source"), ("node2", "destination")):
            labels = {**PEERS, "reporter": reporter, "request_protocol": "http"}
            ok = {**labels, "response_code": "200", "grpc_response_status": ""}
            assert rig.istio(node, total, **ok, response_flags="-") == 4
            assert rig.istio(node, total, **labels, response_code="403") == 1
            assert rig.istio(node, "istio_request_duration_milliseconds_count", **labels) == 5
            assert rig.istio(node, "istio_request_bytes_sum", **labels) == 0
            assert rig.istio(node, "istio_response_bytes_sum", **labels) == sum(sizes)
            assert rig.istio(node, "istio_response_bytes_count", **ok) == 4
        # the 403 is the server's node's own answer: flagged there, passed on by node1
        assert rig.istio("node2", total, response_code="403", response_flags="RBAC") == 1
        for node, reporter in (("node1", "source"), ("node2", "destination")):
            recs = [x for x in rig.written(node) if "response_code" in x]
            assert [x["path"] for x in recs] == paths
            assert [x["response_code"] for x in recs] == [200, 200, 403, 200, 200]
            assert [x["bytes_sent"] for x in recs] == sizes
            for x in recs:
                assert x["reporter"] == reporter and x["method"] == "GET"
                assert x["protocol"] == "HTTP/1.1" and x["authority"] == "echo.default"
                assert isinstance(x["duration"], int) and x["bytes_received"] == 0
                assert x["source_principal"] == CLIENT_ID
                assert x["destination_principal"] == SERVER_ID
                assert x["destination_service"] == "echo.default.svc.cluster.local"
                assert x["x_forwarded_for"] is None and x["downstream_remote_address"]
        src = [x for x in rig.written("node1") if "response_code" in x]
        assert all(x["upstream_cluster"].startswith("outbound|80||echo.") for x in src)
        assert all(x["downstream_local_address"] == f"{SERVICE_IP}:80" for x in src)
        assert [x["upstream_service_time"] is not None for x in src] == [True] * 5
        # the client connection was served request by request: no TCP metrics for it
        assert rig.istio("node1", "istio_tcp_connections_opened_total") == 0

    run(True, body, LabelledRig)


def test_connection_lines_say_how_a_connection_ended() -> None:
    async def body(rig: Rig) -> None:
        assert isinstance(rig, LabelledRig)
        r, w = await rig.connect((SERVICE_IP, TCP_PORT))
        w.write(b"ping")
        assert await r.readexactly(4) == b"ping"
        rig.apply(
            "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\n"
            "metadata: {name: deny, namespace: default}\n"
            "spec: {selector: {matchLabels: {app: echo}}, action: DENY, rules: [{}]}\n"
        )
        assert await r.read() == b""  # the re-check closed it
        w.close()

        def lines() -> list[dict[str, Any]]:
            log = rig.proxies["node2"].access_log
            return [x for x in log.recent_connections if x["direction"] == "inbound"]

        await eventually(lambda: len(lines()) == 1, "node2's connection line")
        (line,) = lines()
        assert line["error"].startswith("RBAC"), line
        assert line["connection_termination_details"] == line["error"]
        assert (line["bytes_sent"], line["bytes_recv"]) == (4, 4)
        await asyncio.sleep(0)

    run(True, body, LabelledRig)
