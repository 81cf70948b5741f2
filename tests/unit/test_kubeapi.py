"""The test API server (tests/kubeapi.py) against the real lightkube client, sync and async:
CRUD, chunked lists, watches with selectors, resume, 410, bookmarks, restarts, TokenReview."""

from __future__ import annotations

import asyncio
import json
import socket
import ssl
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx2 as httpx
import pytest
from kubeapi import KubeApiServer, running_pod
from lightkube import ApiError, AsyncClient, Client
from lightkube.config.kubeconfig import KubeConfig
from lightkube.generic_resource import create_namespaced_resource
from lightkube.models.core_v1 import Container, PodSpec, ServicePort, ServiceSpec
from lightkube.models.meta_v1 import ObjectMeta
from lightkube.resources.core_v1 import Pod, Service
from lightkube.resources.discovery_v1 import EndpointSlice
from lightkube.types import OnErrorAction, OnErrorResult

VirtualService = create_namespaced_resource(
    "networking.istio.io", "v1", "VirtualService", "virtualservices")
VirtualServiceB1 = create_namespaced_resource(
    "networking.istio.io", "v1beta1", "VirtualService", "virtualservices")


@pytest.fixture(scope="module")
def server() -> Iterator[KubeApiServer]:
    with KubeApiServer(bookmark_interval=0.3) as api:
        yield api


@pytest.fixture
def api(server: KubeApiServer, tmp_path: Path) -> Iterator[KubeApiServer]:
    """The shared server, emptied, with a kubeconfig at tmp_path/kubeconfig."""
    server.start()
    with server.store.lock:
        for obj in list(server.store.objects.values()):
            server.store.delete(obj)
    server.kubeconfig(tmp_path / "kubeconfig")
    yield server
    server.start()


def client(api: KubeApiServer, tmp_path: Path) -> Client:
    return Client(KubeConfig.from_file(tmp_path / "kubeconfig"))


def aclient(tmp_path: Path) -> AsyncClient:
    return AsyncClient(KubeConfig.from_file(tmp_path / "kubeconfig"))


def pod(name: str, node: str = "n1", ns: str = "default", **labels: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": ns, "labels": labels},
            "spec": {"nodeName": node, "containers": [{"name": "app", "image": "app"}]}}


def meta(p: Pod) -> ObjectMeta:
    assert p.metadata is not None and p.metadata.name and p.metadata.resourceVersion
    return p.metadata


def raw(api: KubeApiServer, token: str | None = None) -> httpx.Client:
    ctx = ssl.create_default_context(cadata=api.ca_pem.decode())
    return httpx.Client(base_url=api.url, verify=ctx, timeout=5,
                        headers={"Authorization": f"Bearer {token or api.admin_token}"})


def test_crud_with_lightkube_sync(api: KubeApiServer, tmp_path: Path) -> None:
    c = client(api, tmp_path)
    spec = PodSpec(nodeName="n1", containers=[Container(name="app", image="app")])
    made = c.create(Pod(metadata=ObjectMeta(name="web", namespace="default"), spec=spec))
    assert made.metadata is not None and made.metadata.uid and made.metadata.creationTimestamp
    got = c.get(Pod, "web", namespace="default")
    assert got.metadata is not None
    assert got.metadata.resourceVersion == made.metadata.resourceVersion
    with pytest.raises(ApiError) as err:
        c.create(Pod(metadata=ObjectMeta(name="web", namespace="default"), spec=spec))
    assert (err.value.status.code, err.value.status.reason) == (409, "AlreadyExists")
    svc = c.create(Service(metadata=ObjectMeta(name="svc", namespace="default"),
                           spec=ServiceSpec(ports=[ServicePort(port=80)])))
    assert svc.spec is not None and svc.spec.clusterIP is not None
    assert svc.spec.clusterIP.startswith("10.9")  # allocated from 10.96.0.0/12
    c.delete(Pod, "web", namespace="default")
    with pytest.raises(ApiError) as err:
        c.get(Pod, "web", namespace="default")
    assert err.value.status.code == 404
    assert err.value.status.message == 'pods "web" not found'


def test_istio_resource_served_at_every_version(api: KubeApiServer, tmp_path: Path) -> None:
    c = client(api, tmp_path)
    c.create(VirtualService(metadata=ObjectMeta(name="vs", namespace="ns1"),
                            spec={"hosts": ["a"], "http": [{"route": []}]}))
    old = c.get(VirtualServiceB1, "vs", namespace="ns1")
    assert old.apiVersion == "networking.istio.io/v1beta1"
    assert old["spec"]["hosts"] == ["a"]
    old["spec"]["hosts"] = ["b"]
    c.replace(old)
    assert [v["spec"]["hosts"] for v in c.list(VirtualService, namespace="*")] == [["b"]]
    assert api.get(dict(old))["metadata"]["generation"] == 2


def test_list_in_chunks_from_one_snapshot(api: KubeApiServer, tmp_path: Path) -> None:
    for i in range(5):
        api.create(pod(f"p{i}"))
    c = client(api, tmp_path)
    pages = c.list(Pod, namespace="*", chunk_size=2)
    names = []
    for p in pages:
        assert p.metadata is not None
        names.append(p.metadata.name)
        if len(names) == 1:
            api.create(pod("late"))  # after the first page: not in this list
    assert names == [f"p{i}" for i in range(5)]
    assert api.requests["list", "pods"] >= 3
    last = api.request_log[-1]
    deadline = time.monotonic() + 2.0  # the server records the status after it has replied
    while last.status != 200 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert last.query["limit"] == "2" and last.status == 200
    with raw(api) as http:
        first = http.get("/api/v1/pods", params={"limit": "2"}).json()
        api.expire_history()
        gone = http.get("/api/v1/pods", params={"limit": "2",
                                                "continue": first["metadata"]["continue"]})
    assert gone.status_code == 410 and gone.json()["reason"] == "Expired"


def test_watch_with_field_selector_and_resume(api: KubeApiServer, tmp_path: Path) -> None:
    api.create(pod("here", "n1"))
    api.create(pod("there", "n2"))

    async def main() -> None:
        ac = aclient(tmp_path)
        seen: list[tuple[str, str | None]] = []
        rv: str | None = ""
        async for kind, p in ac.watch(Pod, namespace="*", fields={"spec.nodeName": "n1"}):
            seen.append((kind, meta(p).name))
            rv = meta(p).resourceVersion
            if len(seen) == 1:
                moved = api.get(pod("there"))
                moved["spec"]["nodeName"] = "n1"
                await asyncio.to_thread(api.replace, moved)  # enters the selector: ADDED
                await asyncio.to_thread(api.patch, pod("here"), {"spec": {"nodeName": "n3"}})
            if len(seen) == 3:
                break
        assert seen == [("ADDED", "here"), ("ADDED", "there"), ("DELETED", "here")]
        api.delete(pod("there"))
        api.create(pod("new", "n1"))
        resumed: list[tuple[str, str | None]] = []
        async for kind, p in ac.watch(Pod, namespace="*", resource_version=rv,
                                      fields={"spec.nodeName": "n1"}):
            resumed.append((kind, meta(p).name))
            if len(resumed) == 2:
                break
        assert resumed == [("DELETED", "there"), ("ADDED", "new")]
        await ac.close()

    asyncio.run(asyncio.wait_for(main(), 10))


def test_resume_after_compaction_is_410_expired(api: KubeApiServer, tmp_path: Path) -> None:
    api.create(pod("a"))
    rv = str(api.resource_version)
    api.create(pod("b"))
    api.compact()
    c = client(api, tmp_path)
    with pytest.raises(ApiError) as err:
        next(iter(c.watch(Pod, namespace="*", resource_version=rv)))
    assert (err.value.status.code, err.value.status.reason) == (410, "Expired")
    assert err.value.status.message is not None
    assert err.value.status.message.startswith(f"too old resource version: {rv}")


def _lines(lines: Iterator[str], n: int) -> list[dict[str, Any]]:
    out = []
    for text in lines:
        if text:
            out.append(json.loads(text))
        if len(out) == n:
            break
    return out


def _next_change(lines: Iterator[str]) -> dict[str, Any]:
    """The next event that is not a periodic bookmark."""
    while True:
        event = _lines(lines, 1)[0]
        if event["type"] != "BOOKMARK":
            return event


def test_bookmarks_and_timeout(api: KubeApiServer) -> None:
    api.create(pod("a"))
    rv = api.resource_version
    opened = time.monotonic()
    with raw(api) as http, http.stream("GET", "/api/v1/pods", params={
            "watch": "1", "resourceVersion": str(rv), "allowWatchBookmarks": "true",
            "timeoutSeconds": "1"}) as resp:
        assert resp.headers["transfer-encoding"] == "chunked"
        api.create(pod("b"))
        lines = resp.iter_lines()
        events = _lines(lines, 1)
        while events[-1]["type"] == "BOOKMARK":  # a tick may come first, at the old version
            assert events[-1]["object"]["metadata"]["resourceVersion"] == str(rv)
            events = _lines(lines, 1)
        assert events[0]["type"] == "ADDED" and events[0]["object"]["metadata"]["name"] == "b"
        assert _lines(lines, 1) == [{"type": "BOOKMARK", "object": {
            "kind": "Pod", "apiVersion": "v1",
            "metadata": {"resourceVersion": str(rv + 1)}}}]
        rest = [json.loads(t) for t in lines if t]  # ends at timeoutSeconds
        assert 0.9 < time.monotonic() - opened < 3
        assert {e["type"] for e in rest} <= {"BOOKMARK"}


def test_watch_without_version_starts_with_current_objects(api: KubeApiServer) -> None:
    api.create(pod("a"))
    with raw(api) as http, http.stream("GET", "/api/v1/namespaces/default/pods", params={
            "watch": "true", "sendInitialEvents": "true", "allowWatchBookmarks": "true",
            "resourceVersionMatch": "NotOlderThan", "labelSelector": "app in (x,y)"}) as resp:
        api.create(pod("b", app="x"))
        lines = resp.iter_lines()
        events = _lines(lines, 1)
        events.append(_next_change(lines))
    assert events[0]["type"] == "BOOKMARK"  # no "a": it does not match the selector
    assert events[0]["object"]["metadata"]["annotations"] == {
        "k8s.io/initial-events-end": "true"}
    assert (events[1]["type"], events[1]["object"]["metadata"]["name"]) == ("ADDED", "b")


def test_restart_mid_watch_loses_nothing(api: KubeApiServer, tmp_path: Path) -> None:
    def retry(e: Exception, count: int) -> OnErrorResult:
        return OnErrorResult(OnErrorAction.RETRY, 0.2)

    async def main() -> None:
        ac = aclient(tmp_path)
        seen: list[tuple[str, str | None]] = []
        async for kind, p in ac.watch(Pod, namespace="*", on_error=retry):
            seen.append((kind, meta(p).name))
            if len(seen) == 1:
                api.restart()  # drops the stream; objects and versions stay
                api.create(pod("during"))
            if len(seen) == 2:
                break
        assert seen == [("ADDED", "before"), ("ADDED", "during")]
        assert api.requests["watch", "pods"] >= 2
        await ac.close()

    api.create(pod("before"))
    asyncio.run(asyncio.wait_for(main(), 10))


def test_stopped_server_refuses_and_drop_and_inject(api: KubeApiServer, tmp_path: Path) -> None:
    api.stop()
    with raw(api) as http, pytest.raises(httpx.ConnectError):
        http.get("/api/v1/pods")
    api.start()
    with raw(api) as http:
        with http.stream("GET", "/api/v1/pods", params={"watch": "1"}) as resp:
            deadline = time.monotonic() + 5
            while api.open_watches("pods") != 1 and time.monotonic() < deadline:
                time.sleep(0.01)
            api.inject_watch_line("pods", {"type": "ADDED", "object": {"kind": "Pod",
                                                                      "metadata": 7}})
            lines = resp.iter_lines()
            assert _lines(lines, 1)[0]["object"]["metadata"] == 7
            api.drop_watches()
            with pytest.raises(httpx.RemoteProtocolError):
                list(lines)
        assert http.get("/api/v1/pods").status_code == 200  # the server itself is up
    assert api.open_watches("pods") == 0


def test_callers_need_a_known_token(api: KubeApiServer, tmp_path: Path) -> None:
    api.kubeconfig(tmp_path / "bad", token="nope")
    with pytest.raises(ApiError) as err:
        Client(KubeConfig.from_file(tmp_path / "bad")).list(Pod).__iter__().__next__()
    assert err.value.status.code == 401
    with raw(api, token="nope") as http:
        assert http.get("/version").status_code == 200


def test_tokenreview(api: KubeApiServer) -> None:
    good = api.issue_token("default", "agent", ["nodeagent-ca"], node_name="n1",
                           pod_name="agent-x", pod_uid="u1")
    old = api.issue_token("default", "agent", ["nodeagent-ca"], expires_at=time.time() - 1)

    def review(token: str, caller: str | None = None) -> httpx.Response:
        body = {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview",
                "spec": {"token": token, "audiences": ["nodeagent-ca"]}}
        with raw(api, caller) as http:
            return http.post("/apis/authentication.k8s.io/v1/tokenreviews", json=body)

    ok = review(good).json()["status"]
    assert ok["authenticated"] is True and ok["audiences"] == ["nodeagent-ca"]
    assert ok["user"]["username"] == "system:serviceaccount:default:agent"
    assert ok["user"]["extra"]["authentication.kubernetes.io/node-name"] == ["n1"]
    assert ok["user"]["extra"]["authentication.kubernetes.io/pod-uid"] == ["u1"]
    assert "expired" in review(old).json()["status"]["error"]
    wrong = api.issue_token("default", "agent", ["other"])
    assert review(wrong).json()["status"]["error"] == (
        '[invalid bearer token, token audiences ["other"] is invalid for the target '
        'audiences ["nodeagent-ca"]]')
    assert "authenticated" not in review("garbage").json()["status"]
    assert review(good, caller="nope").status_code == 401
    api.allow_token("reader")
    assert review(good, caller="reader").status_code == 403
    api.check_bound_pods = True  # the pod "agent-x" the token is bound to does not exist
    try:
        assert "invalidated" in review(good).json()["status"]["error"]
        api.create(running_pod("agent-x", ip="10.1.0.9", node="n1"))
        bound = api.issue_token("default", "agent", ["nodeagent-ca"], pod_name="agent-x",
                                pod_uid=api.get(pod("agent-x"))["metadata"]["uid"])
        assert review(bound).json()["status"]["authenticated"] is True
    finally:
        api.check_bound_pods = False


def test_endpointslices_follow_pods_and_plain_http(tmp_path: Path) -> None:
    with KubeApiServer(tls=False, endpointslices=True) as api:
        api.create({"apiVersion": "v1", "kind": "Node", "metadata": {
            "name": "n1", "labels": {"topology.kubernetes.io/zone": "z1"}}})
        api.create({"apiVersion": "v1", "kind": "Service",
                    "metadata": {"name": "web", "namespace": "default"},
                    "spec": {"selector": {"app": "web"},
                             "ports": [{"name": "http", "port": 80, "targetPort": "http"}]}})
        api.create(running_pod("web-1", ip="10.1.0.5", node="n1", labels={"app": "web"},
                               ports=[{"name": "http", "containerPort": 8080}]))
        api.create(running_pod("web-2", ip="10.1.0.6", node="n1", labels={"app": "web"},
                               ready=False))
        api.create(running_pod("other", ip="10.1.0.7", node="n1"))
        c = Client(KubeConfig.from_file(api.kubeconfig(tmp_path / "kc")))
        [eps] = c.list(EndpointSlice, namespace="default",
                       labels={"kubernetes.io/service-name": "web"})
        assert api.url.startswith("http://")
        assert eps.ports is not None and [(p.name, p.port) for p in eps.ports] == [("http", 8080)]
        got = {e.addresses[0]: (e.conditions.ready if e.conditions else None, e.zone)
               for e in eps.endpoints or []}
        assert got == {"10.1.0.5": (True, "z1"), "10.1.0.6": (False, "z1")}
        api.delete(running_pod("web-1", ip="", node=""))
        [eps] = c.list(EndpointSlice, namespace="default")
        assert [e.addresses for e in eps.endpoints or []] == [["10.1.0.6"]]
        api.delete({"apiVersion": "v1", "kind": "Service",
                    "metadata": {"name": "web", "namespace": "default"}})
        assert list(c.list(EndpointSlice, namespace="*")) == []


def test_listen_makes_the_socket_on_every_start(tmp_path: Path) -> None:
    made: list[tuple[str, int]] = []

    def listen(host: str, port: int) -> socket.socket:
        made.append((host, port))
        return socket.create_server((host, port))

    with KubeApiServer(listen=listen) as api:
        c = Client(KubeConfig.from_file(api.kubeconfig(tmp_path / "kc")))
        c.create(Pod.from_dict(pod("p1")))
        api.restart()
        assert made == [("127.0.0.1", 0), ("127.0.0.1", api.port)]
        assert [p.metadata.name for p in c.list(Pod) if p.metadata] == ["p1"]
