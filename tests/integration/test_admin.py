"""The node agent socket, its client, ``nodeagent ctl`` and the metrics/readiness HTTP.

Runs the real gRPC server (grpc.aio) and the HTTP servers inside a uvloop event loop on a
background thread, over a small in-test ``AgentView`` with a real ``MeshSnapshot``. No root
needed: a UNIX socket in a temp directory and 127.0.0.1 with ephemeral ports.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import http.client
import os
import re
import shutil
import socket
import stat
import tempfile
import threading
import time
from collections.abc import Coroutine, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import grpc.aio
import prometheus_client
import pytest
import uvloop

from nodeagent import __version__
from nodeagent.admin import ctl
from nodeagent.admin.client import AdminClient
from nodeagent.admin.http import BadRequest, parse_request, start_http_servers
from nodeagent.admin.server import start_admin_server
from nodeagent.control.files import load_directory
from nodeagent.errors import LocalStateError
from nodeagent.model import Container, Labels, MeshSnapshot, Pod, PodRuntime, Service, ServicePort
from nodeagent.model.status import (
    AgentView,
    ConfigStatus,
    ConnectionInfo,
    ExplainQuery,
    LimitStatus,
    WorkerStatus,
)

T = TypeVar("T")

NODE = "node1"
STARTED = time.time() - 125.0


def make_snapshot() -> MeshSnapshot:
    pods = (
        Pod(
            namespace="default",
            name="productpage-v1",
            node_name="node1",
            service_account="bookinfo-productpage",
            labels=Labels.of({"app": "productpage", "version": "v1"}),
            containers=(Container(name="app", ports=(("http", 9080),)),),
            pod_ip="10.244.1.2",
        ),
        Pod(
            namespace="default",
            name="reviews-v1",
            node_name="node1",
            service_account="bookinfo-reviews",
            labels=Labels.of({"app": "reviews", "version": "v1"}),
            containers=(Container(name="app", ports=(("http", 9080),)),),
        ),
        Pod(
            namespace="default",
            name="reviews-v2",
            node_name="node2",
            service_account="bookinfo-reviews",
            labels=Labels.of({"app": "reviews", "version": "v2"}),
            containers=(Container(name="app", ports=(("http", 9081),)),),
            pod_ip="10.244.2.3",
        ),
        Pod(
            namespace="default",
            name="ratings-v1",
            node_name="node2",
            labels=Labels.of({"app": "ratings"}),
        ),
    )
    services = (
        Service(
            namespace="default",
            name="productpage",
            ports=(ServicePort(port=9080, target_port=9080, name="http", app_protocol="http"),),
            selector=Labels.of({"app": "productpage"}),
            cluster_ip="10.96.0.10",
        ),
        Service(
            namespace="default",
            name="reviews",
            ports=(
                ServicePort(port=9080, target_port="http", name="http"),
                ServicePort(port=9443, target_port=8443, name="tls"),
            ),
            selector=Labels.of({"app": "reviews"}),
            cluster_ip="10.96.0.11",
        ),
        Service(
            namespace="default",
            name="ratings",
            ports=(ServicePort(port=9080, target_port=9080),),
            selector=Labels.of({"app": "ratings"}),
        ),
    )
    runtimes = {
        "default/reviews-v1": PodRuntime(
            key="default/reviews-v1", ip="10.244.1.3", node="node1", netns="/var/run/netns/r1"
        )
    }
    return MeshSnapshot.build(
        version=7, pods=pods, services=services, runtimes=runtimes, sources=("/etc/mesh",)
    )


BYPASS_REFUSED = "the local socket bypass needs eBPF capture; this agent uses iptables"


@dataclass
class FakeView:
    """An ``AgentView`` over a fixed snapshot, with switches for readiness and failures."""

    node: str = NODE
    started_at: float = field(default_factory=lambda: time.time() - 125.0)
    """Started 125 s before the view was made (not before the test run began: the run
    may take longer than the bounds the status test checks)."""
    snap: MeshSnapshot = field(default_factory=make_snapshot)
    is_ready: bool = True
    fail: str = ""
    """Name of a method that raises, to check the server survives a failing handler."""
    snapshot_calls: int = 0
    conns: list[ConnectionInfo] = field(default_factory=list)
    certs: list[dict[str, Any]] = field(default_factory=list)
    ca: dict[str, Any] = field(default_factory=lambda: {"state": "disabled"})
    jwks: list[dict[str, Any]] = field(default_factory=list)
    limit_list: list[LimitStatus] = field(default_factory=list)
    more_local: list[dict[str, Any]] = field(default_factory=list)
    """More local workload states than the two pods' (a local WorkloadEntry's)."""

    def _maybe_fail(self, name: str) -> None:
        if self.fail == name:
            raise RuntimeError("boom")

    def snapshot(self) -> MeshSnapshot:
        self._maybe_fail("snapshot")
        self.snapshot_calls += 1
        return self.snap

    def config_status(self) -> ConfigStatus:
        return ConfigStatus(
            version=7,
            loaded_at=STARTED + 1,
            sources=("/etc/mesh",),
            last_error="/etc/mesh/bad.yaml: VirtualService default/x: spec.foo: unknown field",
            last_error_at=STARTED + 60,
        )

    def connections(self) -> list[ConnectionInfo]:
        self._maybe_fail("connections")
        return list(self.conns)

    async def refresh(self) -> None:
        pass

    def workers(self) -> list[WorkerStatus]:
        return []

    def ready(self) -> bool:
        return self.is_ready

    def redirect_mode(self) -> str:
        return "iptables"

    def bpf_state(self, bypass: bool | None = None) -> dict[str, Any]:
        self._maybe_fail("bpf_state")
        if bypass is not None:  # as the agent says in iptables mode
            raise LocalStateError(BYPASS_REFUSED)
        return {"mode": "iptables"}

    def config_dump(self) -> list[dict[str, Any]]:
        return [
            {
                "apiVersion": "v1",
                "kind": "Service",
                "metadata": {"name": "productpage", "namespace": "default"},
                "spec": {"ports": [{"port": 9080}]},
            },
            {
                "apiVersion": "networking.istio.io/v1",
                "kind": "VirtualService",
                "metadata": {"name": "reviews", "namespace": "default"},
                "spec": {"hosts": ["reviews"]},
            },
        ]

    def certificates(self) -> list[dict[str, Any]]:
        self._maybe_fail("certificates")
        return list(self.certs)

    def ca_status(self) -> dict[str, Any]:
        return dict(self.ca)

    def jwks_status(self) -> list[dict[str, Any]]:
        return list(self.jwks)

    def limits(self) -> list[LimitStatus]:
        return list(self.limit_list)

    def recent_requests(self, limit: int) -> list[dict[str, Any]]:
        records = [
            {"path": f"/r{i}", "response_code": 200, "response_flags": "-", "attempts": 1}
            for i in range(5)
        ]
        return records[-limit:] if limit else records

    def ejections(self) -> list[tuple[str, str, float]]:
        return [("outbound|80|v2|web.default.svc.cluster.local", "10.244.2.3:8080", 12.5)]

    def explain(self, query: ExplainQuery) -> dict[str, Any]:
        raise ValueError(f"no explain in this view ({query.from_pod} → {query.to})")

    def local_pods(self) -> list[dict[str, Any]]:
        return [
            {
                "key": "default/productpage-v1",
                "ip": "10.244.1.2",
                "netns": "/var/run/netns/p1",
                "capture": "ready",
            },
            {
                "key": "default/reviews-v1",
                "ip": "10.244.1.3",
                "netns": "/var/run/netns/r1",
                "capture": "error: iptables-restore: exit status 4",
            },
            *self.more_local,
        ]


def _typed(view: FakeView) -> AgentView:
    return view  # mypy checks that FakeView satisfies the protocol


class UvloopThread:
    """A uvloop event loop running in a background thread."""

    def __init__(self) -> None:
        self.loop = uvloop.new_event_loop()
        self._thread = threading.Thread(target=self._main, name="uvloop", daemon=True)
        self._thread.start()

    def _main(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 10.0) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.loop.close()


@dataclass
class Agent:
    view: FakeView
    socket_path: str
    metrics_port: int
    ready_port: int
    registry: prometheus_client.CollectorRegistry
    loop_type: str

    def client(self) -> AdminClient:
        return AdminClient(self.socket_path, timeout=5.0)


@pytest.fixture
def short_dir() -> Iterator[str]:
    """A short directory for UNIX sockets (sun_path is 108 bytes)."""
    d = tempfile.mkdtemp(prefix="na-", dir="/tmp")
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def loop_thread() -> Iterator[UvloopThread]:
    lt = UvloopThread()
    try:
        yield lt
    finally:
        lt.close()


@pytest.fixture
def agent(short_dir: str, loop_thread: UvloopThread) -> Iterator[Agent]:
    view = FakeView()
    registry = prometheus_client.CollectorRegistry()
    counter = prometheus_client.Counter(
        "istio_requests", "Requests.", ["response_code"], registry=registry
    )
    counter.labels(response_code="200").inc(3)
    path = os.path.join(short_dir, "run", f"{NODE}.sock")  # parent does not exist yet

    async def start() -> tuple[grpc.aio.Server, list[asyncio.Server], str]:
        loop_type = type(asyncio.get_running_loop()).__module__
        server = await start_admin_server(_typed(view), path, registry=registry)
        https = await start_http_servers(
            _typed(view), "127.0.0.1", metrics_port=0, ready_port=0, registry=registry
        )
        return server, https, loop_type

    async def stop(server: grpc.aio.Server, https: list[asyncio.Server]) -> None:
        await server.stop(None)
        for h in https:
            h.close()
            await h.wait_closed()

    server, https, loop_type = loop_thread.run(start())
    try:
        yield Agent(
            view=view,
            socket_path=path,
            metrics_port=https[0].sockets[0].getsockname()[1],
            ready_port=https[1].sockets[0].getsockname()[1],
            registry=registry,
            loop_type=loop_type,
        )
    finally:
        loop_thread.run(stop(server, https))


# -- the gRPC service through AdminClient --------------------------------------------------


def test_server_runs_on_uvloop_with_a_0600_socket(agent: Agent) -> None:
    assert agent.loop_type.startswith("uvloop")
    st = os.stat(agent.socket_path)
    assert stat.S_ISSOCK(st.st_mode)
    assert stat.S_IMODE(st.st_mode) == 0o600


def test_status(agent: Agent) -> None:
    with agent.client() as c:
        s = c.status()
    assert s["version"] == __version__
    assert s["node"] == NODE
    assert s["ready"] is True
    assert s["redirect_mode"] == "iptables"
    assert 120.0 < s["uptime_seconds"] < 600.0
    assert isinstance(s["memory_rss_bytes"], int) and s["memory_rss_bytes"] > 1_000_000
    assert isinstance(s["cpu_percent"], float)
    assert s["config"] == {
        "version": 7,
        "loaded_at": STARTED + 1,
        "sources": ["/etc/mesh"],
        "last_error": "/etc/mesh/bad.yaml: VirtualService default/x: spec.foo: unknown field",
        "last_error_at": STARTED + 60,
        "warnings": [],
        "watches": [],
        "source": "files",
    }
    assert s["ca"] == {
        "state": "disabled",
        "address": "",
        "last_error": "",
        "last_error_at": 0.0,
        "unreachable_since": 0.0,
        "last_success_at": 0.0,
        "next_renewal_at": 0.0,
    }
    agent.view.is_ready = False
    with agent.client() as c:
        assert c.status()["ready"] is False


def test_workloads(agent: Agent) -> None:
    with agent.client() as c:
        ws = c.workloads()
    assert agent.view.snapshot_calls == 1
    by_key = {f"{w['namespace']}/{w['name']}": w for w in ws}
    assert list(by_key) == [
        "default/productpage-v1",
        "default/ratings-v1",
        "default/reviews-v1",
        "default/reviews-v2",
    ]
    assert by_key["default/productpage-v1"] == {
        "namespace": "default",
        "name": "productpage-v1",
        "kind": "Pod",
        "node": "node1",
        "service_account": "bookinfo-productpage",
        "identity": "spiffe://cluster.local/ns/default/sa/bookinfo-productpage",
        "ip": "10.244.1.2",
        "labels": {"app": "productpage", "version": "v1"},
        "local": True,
        "capture": "ready",
        "netns": "/var/run/netns/p1",
    }
    r1 = by_key["default/reviews-v1"]
    assert r1["ip"] == "10.244.1.3"  # from the pod runtime
    assert r1["capture"] == "error: iptables-restore: exit status 4"
    r2 = by_key["default/reviews-v2"]
    assert (r2["local"], r2["capture"], r2["netns"], r2["node"]) == (False, "", "", "node2")
    ratings = by_key["default/ratings-v1"]
    assert ratings["ip"] == ""
    assert ratings["identity"] == "spiffe://cluster.local/ns/default/sa/default"


def test_services(agent: Agent) -> None:
    with agent.client() as c:
        svcs = c.services()
    assert agent.view.snapshot_calls == 1
    by_name = {s["name"]: s for s in svcs}
    assert [s["name"] for s in svcs] == ["productpage", "ratings", "reviews"]
    assert by_name["productpage"] == {
        "namespace": "default",
        "name": "productpage",
        "cluster_ip": "10.96.0.10",
        "ports": [
            {
                "name": "http",
                "port": 9080,
                "target_port": "9080",
                "protocol": "TCP",
                "app_protocol": "http",
                "endpoints": [
                    {
                        "pod": "default/productpage-v1",
                        "ip": "10.244.1.2",
                        "port": 9080,
                        "node": "node1",
                    }
                ],
            }
        ],
    }
    http_port, tls_port = by_name["reviews"]["ports"]
    assert http_port["target_port"] == "http"
    assert http_port["endpoints"] == [
        {"pod": "default/reviews-v1", "ip": "10.244.1.3", "port": 9080, "node": "node1"},
        {"pod": "default/reviews-v2", "ip": "10.244.2.3", "port": 9081, "node": "node2"},
    ]
    assert tls_port["target_port"] == "8443"
    assert [e["port"] for e in tls_port["endpoints"]] == [8443, 8443]
    ratings = by_name["ratings"]
    assert ratings["cluster_ip"] == ""
    assert ratings["ports"][0]["endpoints"] == []  # the only pod has no IP yet


def test_requests_and_ejections(agent: Agent) -> None:
    with agent.client() as c:
        data = c.requests(limit=2)
        everything = c.requests()
    assert [r["path"] for r in data["records"]] == ["/r3", "/r4"]
    assert len(everything["records"]) == 5
    assert data["ejected"] == [
        {
            "cluster": "outbound|80|v2|web.default.svc.cluster.local",
            "endpoint": "10.244.2.3:8080",
            "returns_in_seconds": 12.5,
        }
    ]


def test_connections(agent: Agent) -> None:
    big = 5 * 2**32 + 17  # needs 64 bits; must come back as an int, not a string
    agent.view.conns = [
        ConnectionInfo(
            id=2,
            direction="inbound",
            pod="default/reviews-v1",
            source="10.244.2.3:40000",
            destination="10.244.1.3:9080",
            upstream="10.244.1.3:9080",
            service="",
            peer_workload="default/reviews-v2",
            bytes_sent=10,
            bytes_received=20,
            opened_at=STARTED + 100,
        ),
        ConnectionInfo(
            id=1,
            direction="outbound",
            pod="default/productpage-v1",
            source="10.244.1.2:51234",
            destination="10.96.0.11:9080",
            upstream="10.244.2.3:15008",
            service="default/reviews",
            peer_workload="default/reviews-v2",
            bytes_sent=big,
            bytes_received=1234,
            opened_at=STARTED + 50.5,
        ),
    ]
    with agent.client() as c:
        conns = c.connections()
    assert [x["id"] for x in conns] == [1, 2]
    assert conns[0] == {
        "id": 1,
        "direction": "outbound",
        "pod": "default/productpage-v1",
        "source": "10.244.1.2:51234",
        "destination": "10.96.0.11:9080",
        "upstream": "10.244.2.3:15008",
        "service": "default/reviews",
        "peer_workload": "default/reviews-v2",
        "bytes_sent": big,
        "bytes_received": 1234,
        "opened_at": STARTED + 50.5,
        "worker": 0,
    }
    assert conns[1]["service"] == ""


def test_config_dump(agent: Agent) -> None:
    with agent.client() as c:
        dump = c.config_dump()
    assert dump["version"] == 7
    assert dump["objects"] == agent.view.config_dump()


ROOT_SUBJECT = "CN=nodeagent root CA 0a1b2c3d,O=cluster.local"
PRODUCTPAGE_ID = "spiffe://cluster.local/ns/default/sa/bookinfo-productpage"
REVIEWS_ID = "spiffe://cluster.local/ns/default/sa/bookinfo-reviews"


def certificates() -> list[dict[str, Any]]:
    """What ``CertificateStore.describe()`` returns for two identities."""
    return [
        {
            "identity": PRODUCTPAGE_ID,
            "serial": "5f3a9c0de1",
            "not_before": STARTED,
            "not_after": STARTED + 86460,
            "renews_in_seconds": 43000.5,
            "state": "valid",
            "last_error": "",
            "chain": [
                {
                    "subject": "",
                    "issuer": ROOT_SUBJECT,
                    "serial": "5f3a9c0de1",
                    "not_before": STARTED,
                    "not_after": STARTED + 86460,
                    "uris": [PRODUCTPAGE_ID],
                },
                {
                    "subject": ROOT_SUBJECT,
                    "issuer": ROOT_SUBJECT,
                    "serial": "77",
                    "not_before": STARTED - 1000,
                    "not_after": STARTED + 10 * 365 * 86400,
                    "uris": [],
                },
            ],
        },
        {
            "identity": REVIEWS_ID,
            "serial": "",
            "not_before": 0.0,
            "not_after": 0.0,
            "renews_in_seconds": 7.0,
            "state": "pending",
            "last_error": "CA at unix:/run/nodeagent/ca.sock unreachable: connection refused",
            "chain": [],
        },
    ]


UNREACHABLE = {
    "state": "unreachable",
    "reachable": False,
    "address": "unix:/run/nodeagent/ca.sock",
    "last_error": "CA at unix:/run/nodeagent/ca.sock unreachable: connection refused",
    "last_error_at": STARTED + 100,
    "unreachable_since": STARTED + 90,
    "last_success_at": STARTED + 10,
    "next_renewal_at": STARTED + 107,
}


def test_certs(agent: Agent) -> None:
    agent.view.certs = certificates()
    agent.view.ca = dict(UNREACHABLE)
    with agent.client() as c:
        data = c.certs()
        status = c.status()
    expected_ca = {k: v for k, v in UNREACHABLE.items() if k != "reachable"}
    assert data["ca"] == expected_ca
    assert status["ca"] == expected_ca
    assert data["certificates"] == certificates()
    agent.view.certs = []
    agent.view.ca = {"state": "reachable", "address": "unix:/run/nodeagent/ca.sock"}
    with agent.client() as c:
        data = c.certs()
    assert data["certificates"] == []
    assert data["ca"]["state"] == "reachable"


def test_ctl_certs_and_ca_status(agent: Agent, capsys: pytest.CaptureFixture[str]) -> None:
    import json

    agent.view.certs = certificates()
    agent.view.ca = dict(UNREACHABLE)
    rc, out, err = run_ctl(["--socket", agent.socket_path, "certs"], capsys)
    assert (rc, err) == (0, "")
    lines = out.splitlines()
    assert lines[0].split() == [
        "IDENTITY",
        "SERIAL",
        "NOT",
        "BEFORE",
        "NOT",
        "AFTER",
        "RENEWS",
        "IN",
    ]
    assert lines[1].split()[:2] == [PRODUCTPAGE_ID, "5f3a9c0de1"]
    assert lines[1].rstrip().endswith("11h56m")
    assert lines[2].split()[:2] == [REVIEWS_ID, "<none>"]
    assert "pending, retry in 7s" in lines[2]
    assert any(
        line.startswith("CA: unreachable since ") and "connection refused" in line for line in lines
    )
    rc, out, _ = run_ctl(["--socket", agent.socket_path, "certs", "-o", "json"], capsys)
    assert rc == 0
    data = json.loads(out)
    assert data["certificates"][0]["chain"][1]["subject"] == ROOT_SUBJECT
    assert data["ca"]["state"] == "unreachable"
    rc, out, _ = run_ctl(["--socket", agent.socket_path, "status"], capsys)
    assert rc == 0
    ca_line = next(line for line in out.splitlines() if line.startswith("CA:"))
    assert "unreachable since" in ca_line and "connection refused" in ca_line
    agent.view.certs = []
    agent.view.ca = {"state": "disabled"}
    rc, out, _ = run_ctl(["--socket", agent.socket_path, "certs"], capsys)
    assert rc == 0
    assert out.splitlines()[0] == "No certificates found."
    assert "CA: disabled (no CA configured)" in out


def test_ctl_status_shows_each_jwks_url(agent: Agent, capsys: pytest.CaptureFixture[str]) -> None:
    refused = (
        "the certificate of idp.example is not trusted (unable to get local issuer "
        "certificate) by the system trust store: is the right CA bundle given (--jwks-ca-bundle)?"
    )
    agent.view.jwks = [
        {"uri": "http://keys.default/jwks.json", "keys": 2, "last_error": ""},
        {"uri": "https://idp.example/jwks.json", "keys": 0, "last_error": refused},
    ]
    rc, out, _ = run_ctl(["--socket", agent.socket_path, "status"], capsys)
    assert rc == 0
    lines = out.splitlines()
    at = lines.index("JWKS:")
    assert lines[at + 1 : at + 3] == [
        "  http://keys.default/jwks.json: 2 key(s)",
        f"  https://idp.example/jwks.json: 0 key(s); last fetch failed: {refused}",
    ]


def test_ctl_status_shows_each_limit(agent: Agent, capsys: pytest.CaptureFixture[str]) -> None:
    agent.view.limit_list = [
        LimitStatus("HTTP/1.1 header fields (431)", "100", "--max-request-headers", "m", 3),
        LimitStatus("HBONE connections per client identity", "64", "", "m", 0),
    ]
    rc, out, _ = run_ctl(["--socket", agent.socket_path, "status"], capsys)
    assert rc == 0
    lines = out.splitlines()
    at = lines.index("Limits:")
    assert lines[at + 1 : at + 4] == [
        "  LIMIT                                  VALUE  FLAG                   HITS",
        "  HTTP/1.1 header fields (431)           100    --max-request-headers  3",
        "  HBONE connections per client identity  64     -                      0",
    ]
    with agent.client() as c:
        assert c.status()["limits"][0] == {
            "name": "HTTP/1.1 header fields (431)",
            "value": "100",
            "flag": "--max-request-headers",
            "metric": "m",
            "hits": 3,
        }


def test_a_failing_handler_answers_an_error_and_the_server_lives_on(agent: Agent) -> None:
    agent.view.fail = "connections"
    with agent.client() as c:
        with pytest.raises(LocalStateError) as e:
            c.connections()
        assert "Connections" in str(e.value)
        assert "RuntimeError: boom" in str(e.value)
        agent.view.fail = ""
        assert c.connections() == []
        assert c.status()["node"] == NODE


def test_bpf_refusal_and_failure_are_told_apart(agent: Agent) -> None:
    with agent.client() as c:
        assert c.bpf() == {"mode": "iptables"}
        with pytest.raises(LocalStateError) as e:  # FAILED_PRECONDITION: the agent's words
            c.bpf("on")
        assert str(e.value) == BYPASS_REFUSED
        with pytest.raises(LocalStateError, match="expected 'on' or 'off'"):
            c.bpf("maybe")
        agent.view.fail = "bpf_state"  # anything else: INTERNAL, naming the RPC
        with pytest.raises(LocalStateError) as e:
            c.bpf()
        assert "Bpf failed in the agent: RuntimeError: boom" in str(e.value)
        agent.view.fail = ""


def test_no_agent_listening_is_a_clean_error(short_dir: str) -> None:
    missing = os.path.join(short_dir, "node9.sock")
    with pytest.raises(LocalStateError, match=r"no agent is listening on .*node9\.sock"):
        AdminClient(missing, timeout=2.0).status()
    # A stale socket file: bound once, nobody listening now.
    stale = os.path.join(short_dir, "stale.sock")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(stale)
    s.close()
    with pytest.raises(LocalStateError) as e:
        AdminClient(stale, timeout=2.0).status()
    assert "no agent is listening on" in str(e.value)
    assert "is `nodeagent run` (or the sandbox) up?" in str(e.value)


def test_server_replaces_a_stale_socket_and_refuses_a_live_one(
    short_dir: str, loop_thread: UvloopThread
) -> None:
    path = os.path.join(short_dir, "node1.sock")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(path)
    s.close()
    view = _typed(FakeView())
    server = loop_thread.run(start_admin_server(view, path))
    try:
        assert AdminClient(path).status()["node"] == NODE
        with pytest.raises(LocalStateError, match="another agent is already listening"):
            loop_thread.run(start_admin_server(view, path))
    finally:
        loop_thread.run(server.stop(None))
    regular = os.path.join(short_dir, "file.sock")
    with open(regular, "w") as f:
        f.write("not a socket")
    with pytest.raises(LocalStateError, match="is not a socket"):
        loop_thread.run(start_admin_server(view, regular))


# -- nodeagent ctl -----------------------------------------------------------------------


def run_ctl(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """``nodeagent ctl ARGV`` through ``nodeagent.cli.main``, or through ``ctl.add_parser``
    alone while the other subcommands' modules (written in parallel) are not there yet."""
    from nodeagent import cli

    try:
        rc = cli.main(["ctl", *argv])
    except ImportError as e:
        if "sandbox" not in str(e) and "sampleapp" not in str(e):
            raise
        parser = argparse.ArgumentParser(prog="nodeagent")
        sub = parser.add_subparsers(dest="command", required=True)
        ctl.add_parser(sub)
        args = parser.parse_args(["ctl", *argv])
        rc = args.func(args)
    out, err = capsys.readouterr()
    return rc, out, err


def test_ctl_tables(agent: Agent, capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, err = run_ctl(["--socket", agent.socket_path, "status"], capsys)
    assert (rc, err) == (0, "")
    assert "Node:" in out and NODE in out
    assert re.search(r"^Ready:\s+true$", out, re.MULTILINE)
    assert "spec.foo: unknown field" in out

    rc, out, _ = run_ctl(["--socket", agent.socket_path, "workloads"], capsys)
    assert rc == 0
    lines = out.splitlines()
    assert lines[0].split() == [
        "NAMESPACE", "NAME", "KIND", "NODE", "IP", "LOCAL", "CAPTURE", "IDENTITY"
    ]  # fmt: skip
    assert len(lines) == 5
    assert lines[1].split()[:7] == [
        "default",
        "productpage-v1",
        "Pod",
        "node1",
        "10.244.1.2",
        "yes",
        "ready",
    ]
    # aligned: every row has its NODE column at the same offset as the header's
    col = lines[0].index("NODE")
    assert all(line[col : col + 4] == "node" for line in lines[1:])

    rc, out, _ = run_ctl(["--socket", agent.socket_path, "services"], capsys)
    assert rc == 0
    assert "10.244.1.3:9080,10.244.2.3:9081" in out
    assert out.splitlines()[0].split()[:3] == ["NAMESPACE", "NAME", "CLUSTER-IP"]

    rc, out, _ = run_ctl(["--socket", agent.socket_path, "connections"], capsys)
    assert (rc, out.strip()) == (0, "No connections found.")


def columns(line: str, header: str) -> dict[str, str]:
    """Split a table row at the column offsets of its ``header``."""
    names = header.split()
    starts = [header.index(f" {n} ") + 1 if i else 0 for i, n in enumerate(names[:-1])]
    starts.append(header.rindex(names[-1]))
    ends = [*starts[1:], None]
    return {n: line[s:e].strip() for n, s, e in zip(names, starts, ends, strict=True)}


VMS = """
apiVersion: v1
kind: Pod
metadata: {name: productpage-v1, namespace: default}
spec: {nodeName: node1, serviceAccountName: bookinfo-productpage, containers: [{name: a, image: x}]}
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {name: ratings-vm-1, namespace: default, annotations: {nodeagent.io/node: node1}}
spec: {address: 192.168.121.10, labels: {app: ratings}, serviceAccount: ratings}
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {name: ratings-vm-2, namespace: default, annotations: {nodeagent.io/node: node1}}
spec: {address: 192.168.121.11, labels: {app: ratings}, serviceAccount: ratings}
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {name: ratings-vm-3, namespace: default, annotations: {nodeagent.io/node: vm-3}}
spec: {address: 192.168.121.12, labels: {app: ratings}, serviceAccount: ratings}
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {name: legacy-db, namespace: data}
spec: {address: db.example.com, labels: {app: db}}
"""


def test_ctl_workloads_lists_workload_entries_beside_pods(
    agent: Agent, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    (tmp_path / "mesh.yaml").write_text(VMS)
    runtimes = {"default/productpage-v1": PodRuntime("default/productpage-v1", "10.244.1.2",
                                                     "node1", "/var/run/netns/p1")}  # fmt: skip
    agent.view.snap = load_directory(tmp_path, runtimes=runtimes).snapshot
    # ratings-vm-1 is captured by this agent (host mode); ratings-vm-2 holds no state yet
    agent.view.more_local = [
        {"key": "default/ratings-vm-1", "ip": "192.168.121.10", "netns": "host", "capture": "ready"}
    ]
    rc, out, err = run_ctl(["--socket", agent.socket_path, "workloads"], capsys)
    assert (rc, err) == (0, "")
    header, *lines = out.splitlines()
    rows = {c["NAME"]: c for c in (columns(line, header) for line in lines)}
    assert list(rows) == ["legacy-db", "productpage-v1", "ratings-vm-1", "ratings-vm-2",
                          "ratings-vm-3"]  # fmt: skip
    cells = ("KIND", "NODE", "IP", "LOCAL", "CAPTURE", "IDENTITY")
    assert {n: tuple(c[k] for k in cells) for n, c in rows.items()} == {
        "legacy-db": ("WorkloadEntry", "-", "db.example.com", "no", "-",
                      "spiffe://cluster.local/ns/data/sa/default"),
        "productpage-v1": ("Pod", "node1", "10.244.1.2", "yes", "ready",
                           "spiffe://cluster.local/ns/default/sa/bookinfo-productpage"),
        "ratings-vm-1": ("WorkloadEntry", "node1", "192.168.121.10", "yes", "ready",
                         "spiffe://cluster.local/ns/default/sa/ratings"),
        "ratings-vm-2": ("WorkloadEntry", "node1", "192.168.121.11", "yes", "-",
                         "spiffe://cluster.local/ns/default/sa/ratings"),
        "ratings-vm-3": ("WorkloadEntry", "vm-3", "192.168.121.12", "no", "-",
                         "spiffe://cluster.local/ns/default/sa/ratings"),
    }  # fmt: skip
    with agent.client() as c:
        by_name = {w["name"]: w for w in c.workloads()}
    vm1 = by_name["ratings-vm-1"]
    assert (vm1["kind"], vm1["netns"]) == ("WorkloadEntry", "host")
    assert vm1["labels"] == {"app": "ratings"}
    assert (by_name["legacy-db"]["node"], by_name["legacy-db"]["local"]) == ("", False)
    assert by_name["productpage-v1"]["kind"] == "Pod"


def test_ctl_json_and_config(agent: Agent, capsys: pytest.CaptureFixture[str]) -> None:
    import json

    rc, out, _ = run_ctl(["--socket", agent.socket_path, "workloads", "-o", "json"], capsys)
    assert rc == 0
    assert len(json.loads(out)) == 4
    rc, out, _ = run_ctl(["--socket", agent.socket_path, "-o", "json", "status"], capsys)
    assert rc == 0 and json.loads(out)["node"] == NODE
    rc, out, _ = run_ctl(["--socket", agent.socket_path, "config"], capsys)
    assert rc == 0
    assert json.loads(out)["objects"][1]["kind"] == "VirtualService"
    rc, out, _ = run_ctl(["--socket", agent.socket_path, "config", "-o", "table"], capsys)
    assert rc == 0
    assert "VirtualService" in out and "networking.istio.io/v1" in out


def test_ctl_without_agent_prints_an_error_and_exits_1(
    short_dir: str, capsys: pytest.CaptureFixture[str]
) -> None:
    path = os.path.join(short_dir, "node1.sock")
    rc, out, err = run_ctl(["--socket", path, "status"], capsys)
    assert (rc, out) == (1, "")
    assert err.startswith("nodeagent ctl: error: no agent is listening on ")
    assert path in err


# -- metrics and readiness HTTP ------------------------------------------------------------


def _get(port: int, path: str, method: str = "GET") -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request(method, path)
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


def _raw(port: int, data: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(data)
        chunks = []
        while chunk := s.recv(65536):
            chunks.append(chunk)
        return b"".join(chunks)


def test_metrics(agent: Agent) -> None:
    status, headers, body = _get(agent.metrics_port, "/metrics")
    assert status == 200
    assert headers["content-type"].startswith("text/plain; version=0.0.4")
    assert b'istio_requests_total{response_code="200"} 3.0' in body
    status, headers, body = _get(agent.metrics_port, "/metrics?x=1")
    assert status == 200
    # the readiness path lives on the other port
    assert _get(agent.metrics_port, "/healthz/ready")[0] == 404


def connection(i: int, direction: str) -> ConnectionInfo:
    return ConnectionInfo(
        id=i, direction=direction, pod="default/reviews-v1", source="10.244.2.3:40000",
        destination="10.244.1.3:9080", upstream="10.244.1.3:9080", service="",
        peer_workload="", bytes_sent=0, bytes_received=0, opened_at=STARTED,
    )


def test_metrics_over_the_socket(agent: Agent) -> None:
    """The socket serves what port 15020 does (the dashboard reads it from outside the
    node's netns); the agent's own health is there too once registered."""
    from nodeagent.admin.agentmetrics import register_agent_metrics

    with agent.client() as c:
        assert c.metrics() == _get(agent.metrics_port, "/metrics")[2].decode()
        register_agent_metrics(agent.registry, _typed(agent.view))
        agent.view.certs = [{"identity": "spiffe://cluster.local/ns/default/sa/web",
                             "not_after": 1900000000.0}, {"identity": "pending", "not_after": 0}]
        agent.view.conns = [connection(i, d) for i, d in enumerate(("inbound", "inbound",
                                                                        "outbound"))]
        text = c.metrics()
    assert 'nodeagent_active_connections{direction="inbound"} 2.0' in text
    assert 'nodeagent_active_connections{direction="outbound"} 1.0' in text
    assert 'nodeagent_active_connections{direction="passthrough"} 0.0' in text
    assert ('nodeagent_certificate_expiry_timestamp_seconds{identity='
            '"spiffe://cluster.local/ns/default/sa/web"} 1.9e+09') in text
    assert 'identity="pending"' not in text
    assert "nodeagent_ready 1.0" in text
    assert re.search(r"^process_resident_memory_bytes [0-9.e+]+$", text, re.M)
    assert re.search(r"^process_cpu_seconds_total [0-9.e+]+$", text, re.M)


def test_metrics_over_a_socket_started_without_them_is_refused(short_dir: str) -> None:
    lt = UvloopThread()
    path = os.path.join(short_dir, "bare.sock")
    try:
        server = lt.run(start_admin_server(_typed(FakeView()), path))
        with AdminClient(path) as c, pytest.raises(LocalStateError, match="without its metrics"):
            c.metrics()
        lt.run(server.stop(None))
    finally:
        lt.close()


def test_readiness(agent: Agent) -> None:
    assert _get(agent.ready_port, "/healthz/ready")[::2] == (200, b"ready\n")
    agent.view.is_ready = False
    status, _, body = _get(agent.ready_port, "/healthz/ready")
    assert status == 503
    assert body.startswith(b"not ready: ")
    assert b"default/reviews-v1" in body and b"iptables-restore" in body


def test_http_methods_and_malformed_requests(agent: Agent) -> None:
    status, headers, _ = _get(agent.ready_port, "/healthz/ready", method="POST")
    assert (status, headers["allow"]) == (405, "GET")
    reply = _raw(agent.metrics_port, b"BLAH\r\n\r\n")
    assert reply.startswith(b"HTTP/1.1 400 Bad Request\r\n")
    assert b"Connection: close" in reply  # and _raw returned: the server closed it
    reply = _raw(agent.metrics_port, b"GET /metrics HTTP/1.1\r\nno colon here\r\n\r\n")
    assert reply.startswith(b"HTTP/1.1 400 ")
    reply = _raw(agent.metrics_port, b"GET /metrics HTTP/1.1\r\nHost: x\r\n" + b"X: y" * 5000)
    assert reply.startswith(b"HTTP/1.1 400 ")
    # the servers still answer
    assert _get(agent.metrics_port, "/metrics")[0] == 200
    assert _get(agent.ready_port, "/healthz/ready")[0] == 200


def test_http_keep_alive(agent: Agent) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", agent.ready_port, timeout=5)
    try:
        for _ in range(3):
            conn.request("GET", "/healthz/ready")
            resp = conn.getresponse()
            assert (resp.status, resp.read()) == (200, b"ready\n")
            assert resp.getheader("Connection") == "keep-alive"
    finally:
        conn.close()
    reply = _raw(agent.ready_port, b"GET /healthz/ready HTTP/1.0\n\n")  # bare LF, HTTP/1.0
    assert reply.startswith(b"HTTP/1.1 200 OK\r\n") and reply.endswith(b"\r\n\r\nready\n")


@pytest.mark.parametrize(
    "head",
    [
        b"GET /metrics\r\n\r\n",
        b"GET  /metrics HTTP/1.1\r\n\r\n",
        b"GET metrics HTTP/1.1\r\n\r\n",
        b"GET /metrics HTTP/2.0\r\n\r\n",
        b"G(T /metrics HTTP/1.1\r\n\r\n",
        b"GET /metrics HTTP/1.1\r\n folded: header\r\n\r\n",
        b"GET /metrics HTTP/1.1\r\nBad Name: x\r\n\r\n",
        b"GET /metrics HTTP/1.1\r\nX: a\x01b\r\n\r\n",
        b"GET /m\xe9trics HTTP/1.1\r\n\r\n",
        b"GET /metrics HTTP/1.1\r\n",
    ],
)
def test_parse_request_rejects(head: bytes) -> None:
    with pytest.raises(BadRequest):
        parse_request(head)


def test_parse_request() -> None:
    req = parse_request(b"GET /metrics?a=b HTTP/1.1\r\nHost: x\r\nAccept: a\r\naccept: b\r\n\r\n")
    assert (req.method, req.path, req.version) == ("GET", "/metrics", "HTTP/1.1")
    assert req.headers == {"host": "x", "accept": "a, b"}
    assert req.keep_alive
    assert not parse_request(b"GET / HTTP/1.1\r\nConnection: close\r\n\r\n").keep_alive
    assert not parse_request(b"GET / HTTP/1.0\r\n\r\n").keep_alive


def test_http_port_in_use_is_a_clean_error(loop_thread: UvloopThread) -> None:
    with contextlib.closing(socket.socket()) as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(LocalStateError, match=f"cannot listen on 127.0.0.1:{port} for metrics"):
            loop_thread.run(
                start_http_servers(_typed(FakeView()), "127.0.0.1", metrics_port=port, ready_port=0)
            )


class _FirstConnectionBreaks:
    """A UNIX socket in front of the agent's: its first ``broken`` connections answer a
    call's request with a SETTINGS ack nobody asked for (what grpc's HTTP/2 parser refused
    once in CI, failing the call ``UNAVAILABLE`` after it was sent), every later one is
    relayed to the agent."""

    def __init__(self, path: str, target: str, broken: int = 1) -> None:
        self.path, self.target, self.broken = path, target, broken
        self.accepted = 0
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(path)
        self._listener.listen(8)
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            self.accepted += 1
            if self.accepted <= self.broken:
                threading.Thread(target=self._break, args=(conn,), daemon=True).start()
                continue
            up = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            up.connect(self.target)
            for a, b in ((conn, up), (up, conn)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _break(conn: socket.socket) -> None:
        settings, ack = (
            b"\x00\x00\x00\x04\x00\x00\x00\x00\x00",
            b"\x00\x00\x00\x04\x01\x00\x00\x00\x00",
        )
        with conn, contextlib.suppress(OSError):
            conn.sendall(settings)
            buf = b""
            while True:  # the client's frames, after its 24-byte preface
                data = conn.recv(65536)
                if not data:
                    return
                buf += data
                at, seen_ack = 24, False
                while at + 9 <= len(buf):
                    length, kind = int.from_bytes(buf[at : at + 3], "big"), buf[at + 3]
                    if kind == 0x4 and not seen_ack:
                        conn.sendall(ack)  # the client's SETTINGS, acknowledged
                        seen_ack = True
                    if kind == 0x1:  # the call's HEADERS: it is out, now break it
                        conn.sendall(ack)
                        time.sleep(0.5)
                        return
                    at += 9 + length

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := src.recv(65536):
                dst.sendall(data)
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        self._listener.close()


def test_a_read_is_asked_again_when_its_connection_breaks(agent: Agent, short_dir: str) -> None:
    flaky = _FirstConnectionBreaks(os.path.join(short_dir, "flaky.sock"), agent.socket_path)
    try:
        with AdminClient(flaky.path, timeout=5.0) as c:
            assert c.status()["node"] == NODE
        assert flaky.accepted >= 2  # the broken connection, then the one that answered
    finally:
        flaky.close()


def test_a_connection_that_always_breaks_is_a_clean_error(agent: Agent, short_dir: str) -> None:
    # A change is not asked again by the client (the agent may have made it already), a
    # read only once: both end in an error naming the call and what broke.
    flaky = _FirstConnectionBreaks(
        os.path.join(short_dir, "flaky.sock"), agent.socket_path, broken=1_000
    )
    try:
        with AdminClient(flaky.path, timeout=5.0) as c:
            # (how grpc words a broken connection varies with timing: the socket is named)
            with pytest.raises(LocalStateError, match=r"flaky\.sock"):
                c.bpf("on")
            with pytest.raises(LocalStateError, match=r"flaky\.sock"):
                c.status()
    finally:
        flaky.close()
