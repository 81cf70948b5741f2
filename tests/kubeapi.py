"""A small Kubernetes API server for tests (no real one can run on this machine).

What it implements, closely enough for the real lightkube client (sync and async):
- HTTPS on 127.0.0.1 (or ``host=``, e.g. an address a netns reaches; ``listen=`` makes the
  listening socket, e.g. inside that netns), ephemeral port, a self-signed CA (``ca_pem``);
  or plain HTTP (``tls=False``). ``kubeconfig(path, token=None)`` writes a kubeconfig
  lightkube reads (JSON, which is YAML).
- Bearer-token auth (``admin_token``; more with ``allow_token``); 401 Status otherwise.
  ``/version``, ``/healthz``, ``/readyz``, ``/livez`` need no token.
- Resources (``kubestore.DEFAULT_RESOURCES``): core v1 pods, services, endpoints, nodes,
  namespaces, configmaps, serviceaccounts; discovery.k8s.io/v1 endpointslices;
  networking.istio.io v1/v1beta1/v1alpha3 virtualservices, destinationrules,
  serviceentries, gateways; security.istio.io v1/v1beta1 authorizationpolicies,
  peerauthentications, requestauthentications; telemetry.istio.io v1/v1alpha1
  telemetries. ``add_resource(ResourceType(...))`` adds
  more. One object is served at every version of its group (apiVersion rewritten).
- GET one, LIST (``limit``/``continue`` from a consistent snapshot, ``labelSelector``,
  ``fieldSelector`` on metadata.name/namespace and per-kind fields such as
  spec.nodeName; unsupported field -> 400), POST, PUT (resourceVersion conflict -> 409),
  PATCH (merge and strategic both applied as a JSON merge patch), DELETE; errors are
  ``Status`` bodies (404 NotFound, 409 AlreadyExists/Conflict, 410 Expired, 422 Invalid).
  The server sets uid, creationTimestamp, resourceVersion (one cluster-wide counter),
  generation, managedFields; a Service gets a clusterIP from 10.96.0.0/12.
- WATCH (``watch=true|1``): chunked JSON lines. No resourceVersion (or "0"): synthetic
  ADDED for what exists, then changes; ``resourceVersion=N``: every change after N, or an
  ERROR event with a 410 Expired Status when history no longer reaches N (a LIST with an
  expired ``continue`` or ``resourceVersionMatch=Exact`` gets HTTP 410). Selectors apply to
  events (an object leaving the selector is a DELETED). ``allowWatchBookmarks=true``:
  BOOKMARK every ``bookmark_interval`` s and on ``bookmark_now()``;
  ``sendInitialEvents=true`` ends the initial ADDEDs with the initial-events-end bookmark.
  ``timeoutSeconds`` ends the stream cleanly.
- TokenReview (``POST /apis/authentication.k8s.io/v1/tokenreviews``), only for tokens given
  ``allow_token(t, tokenreview=True)`` (admin_token is; another known caller gets 403):
  tokens from ``issue_token(...)`` (JWT-shaped) review as a real cluster's ServiceAccount
  tokens, with the node/pod ``extra`` keys; unknown, expired, wrong-audience tokens and
  (with ``check_bound_pods``) tokens whose pod is gone get ``status.error`` as real servers.
- Test controls: ``create/replace/patch/delete/get`` (dicts as the cluster returns them),
  ``stop()/start()/restart()`` (same port, same objects: clients get connection refused
  meanwhile), ``drop_watches()``, ``compact(rv)``/``expire_history()``, ``bookmark_now()``,
  ``inject_watch_line(plural, raw)`` (e.g. a malformed object), ``requests`` (Counter of
  (verb, plural)), ``request_log`` (RequestRecord: method, target, query, status),
  ``open_watches(plural)``, ``wait_watches(plural, n)``.
- What a cluster adds on its own (tests/kubecontrollers.py): ``endpointslices=True`` runs
  the EndpointSlice controller (one slice per selector Service, from pods with a podIP,
  ready from the Ready condition, zone from the Node's topology label);
  ``running_pod(name, ip=, node=, ...)`` is a Pod as the API shows it once running.

Left out: server-side apply, JSON patch, status subresources, deletecollection, finalizers
and graceful deletion, admission/validation beyond the above, namespace existence checks,
RBAC (every known token may do everything but TokenReview), HTTP/2, protobuf, discovery
beyond ``/api``, ``/apis`` and ``/version``.

It runs on its own event loop in a thread: use it from sync and async tests alike (the
agent under test may run in another process, from the kubeconfig file). Parts: the store
and watch fan-out in tests/kubestore.py, TLS and tokens in tests/kubeauth.py, controllers
in tests/kubecontrollers.py.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import json
import secrets
import socket
import ssl
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import h11
from kubeauth import API_AUDIENCE, IssuedToken, TokenAuthority, make_tls
from kubecontrollers import EndpointSliceController, running_pod
from kubestore import (
    DEFAULT_RESOURCES,
    ApiStatus,
    Obj,
    ResourceType,
    Selector,
    Store,
    Watcher,
    parse_field_selector,
    parse_label_selector,
)

__all__ = ["ApiStatus", "IssuedToken", "KubeApiServer", "RequestRecord", "ResourceType",
           "running_pod"]

_ANON_PATHS = {"/version", "/healthz", "/readyz", "/livez"}


def _continue_token(rv: int, after: tuple[str, str, str, str]) -> str:
    raw = json.dumps({"v": "meta.k8s.io/v1", "rv": rv, "start": "/".join(after) + "\x00"})
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


def _parse_continue(token: str) -> tuple[int, tuple[str, ...]]:
    try:
        raw = json.loads(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
        return int(raw["rv"]), tuple(str(raw["start"]).rstrip("\x00").split("/"))
    except (ValueError, KeyError, TypeError) as e:
        raise ApiStatus(400, "BadRequest", f"continue key is not valid: {e}") from None


@dataclass
class RequestRecord:
    method: str
    target: str  # path?query
    status: int = 0  # 0 while it runs (a watch), then its HTTP status

    @property
    def query(self) -> dict[str, str]:
        return {k: v[-1] for k, v in parse_qs(urlsplit(self.target).query).items()}


def _int_param(q: dict[str, str], name: str) -> int:
    try:
        return int(q.get(name) or 0)
    except ValueError:
        raise ApiStatus(400, "BadRequest", f"{name}: Invalid value: {q[name]!r}: must be an "
                        "integer") from None


class KubeApiServer:
    """See the module docstring. ``with KubeApiServer() as api: ...`` starts and closes it."""

    def __init__(self, *, tls: bool = True, bookmark_interval: float = 60.0,
                 resources: tuple[ResourceType, ...] = DEFAULT_RESOURCES,
                 max_history: int = 10000, check_bound_pods: bool = False,
                 endpointslices: bool = False, host: str = "127.0.0.1",
                 listen: Callable[[str, int], socket.socket] | None = None) -> None:
        self.host = host
        self._listen = listen  # (host, port) -> a bound, listening socket; port 0: any
        self.store = Store(resources, max_history)
        if endpointslices:
            EndpointSliceController(self.store)
        self.tls = tls
        self.bookmark_interval = bookmark_interval
        self.check_bound_pods = check_bound_pods
        self.admin_token = "admin-" + secrets.token_urlsafe(16)
        self._callers: dict[str, bool] = {self.admin_token: True}  # token -> may TokenReview
        self.tokens = TokenAuthority()
        self._tmp = tempfile.TemporaryDirectory(prefix="kubeapi-")
        self.ca_pem = b""
        self._ssl: ssl.SSLContext | None = None
        if tls:
            self.ca_pem, self._ssl = make_tls(Path(self._tmp.name), host)
        self.port = 0
        self.requests: collections.Counter[tuple[str, str]] = collections.Counter()
        self.request_log: list[RequestRecord] = []  # logged when they arrive
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="kubeapi",
                                        daemon=True)
        self._thread.start()
        self._server: asyncio.Server | None = None
        self._conns: set[asyncio.StreamWriter] = set()
        self._ticker: asyncio.Task[None] | None = None

    # lifecycle ----------------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://{self.host}:{self.port}"

    def _call(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout=10)

    def start(self) -> None:
        """Listen (again, on the same port after the first start)."""
        self._call(self._start())

    async def _start(self) -> None:
        if self._server is not None:
            return
        if self._listen is not None:
            self._server = await asyncio.start_server(
                self._serve, sock=self._listen(self.host, self.port), ssl=self._ssl)
        else:
            self._server = await asyncio.start_server(self._serve, self.host, self.port,
                                                      ssl=self._ssl, reuse_address=True)
        self.port = self._server.sockets[0].getsockname()[1]
        self._ticker = asyncio.create_task(self._bookmark_ticker())

    def stop(self) -> None:
        """Stop listening and cut every connection (watches included): the server is away."""
        self._call(self._stop())

    async def _stop(self) -> None:
        if self._server is None:
            return
        self._server.close()
        if self._ticker is not None:
            self._ticker.cancel()
        for w in list(self._conns):
            w.transport.abort()
        with self.store.lock:
            for watcher in list(self.store.watchers):
                watcher.queue.put_nowait("abort")
        await self._server.wait_closed()
        self._server = None

    async def _cancel_tasks(self) -> None:
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def restart(self) -> None:
        self.stop()
        self.start()

    def close(self) -> None:
        self.stop()
        self._call(self._cancel_tasks())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)
        self._loop.close()
        self._tmp.cleanup()

    def __enter__(self) -> KubeApiServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def kubeconfig(self, path: str | Path, token: str | None = None,
                   namespace: str = "default") -> Path:
        """Write a kubeconfig for this server (bearer ``token``, default the admin's)."""
        cluster: dict[str, Any] = {"server": self.url}
        if self.tls:
            cluster["certificate-authority-data"] = base64.b64encode(self.ca_pem).decode()
        conf = {"apiVersion": "v1", "kind": "Config", "current-context": "test",
                "clusters": [{"name": "test", "cluster": cluster}],
                "users": [{"name": "test", "user": {"token": token or self.admin_token}}],
                "contexts": [{"name": "test", "context": {"cluster": "test", "user": "test",
                                                         "namespace": namespace}}]}
        path = Path(path)
        path.write_text(json.dumps(conf, indent=2))
        return path

    # test controls ----------------------------------------------------------------------

    def add_resource(self, rt: ResourceType) -> None:
        with self.store.lock:
            self.store.add_resource(rt)

    def create(self, obj: Obj) -> Obj:
        return self.store.create(obj)

    def replace(self, obj: Obj) -> Obj:
        return self.store.replace(obj)

    def patch(self, ref: Obj, patch: Obj) -> Obj:
        return self.store.patch(ref, patch)

    def delete(self, ref: Obj) -> Obj:
        return self.store.delete(ref)

    def get(self, ref: Obj) -> Obj:
        return self.store.get(ref)

    @property
    def resource_version(self) -> int:
        return self.store.rv

    def compact(self, rv: int | None = None) -> None:
        self.store.compact(rv)

    def expire_history(self) -> None:
        """Every resume from a resourceVersion seen so far now gets 410 Expired (the revision
        moves on, as an unrelated write such as a lease renewal would, then is compacted)."""
        with self.store.lock:
            self.store.rv += 1
            self.store.compact(None)

    def drop_watches(self) -> None:
        """Cut every open watch connection mid-stream, as an API server restart does."""
        with self.store.lock:
            for w in list(self.store.watchers):
                w.push("abort")

    def bookmark_now(self) -> None:
        with self.store.lock:
            for w in list(self.store.watchers):
                if w.bookmarks:
                    w.push(w.bookmark(self.store.rv))

    def inject_watch_line(self, plural: str, raw: bytes | Obj) -> None:
        """Send ``raw`` (a whole event; bytes as they are) to every open watch of ``plural``."""
        data = raw if isinstance(raw, bytes) else json.dumps(raw).encode()
        with self.store.lock:
            for w in list(self.store.watchers):
                if w.rt.plural == plural:
                    w.push(data.rstrip(b"\n") + b"\n")

    def open_watches(self, plural: str | None = None) -> int:
        with self.store.lock:
            return sum(1 for w in self.store.watchers if plural in (None, w.rt.plural))

    def wait_watches(self, plural: str, count: int = 1, timeout: float = 5.0) -> None:
        """Wait until ``count`` watches of ``plural`` are open (a client under test is ready)."""
        deadline = time.monotonic() + timeout
        while self.open_watches(plural) < count:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.open_watches(plural)} watches of {plural} open, "
                                   f"wanted {count}")
            time.sleep(0.01)

    def allow_token(self, token: str, *, tokenreview: bool = False) -> None:
        self._callers[token] = tokenreview

    def issue_token(self, namespace: str, service_account: str,
                    audiences: tuple[str, ...] | list[str] = (API_AUDIENCE,), *,
                    node_name: str | None = None, pod_name: str | None = None,
                    pod_uid: str | None = None, expires_at: float | None = None) -> str:
        """A ServiceAccount token as kubelet projects it (JWT-shaped; valid for TokenReview)."""
        return self.tokens.issue(namespace, service_account, audiences, node_name=node_name,
                                 pod_name=pod_name, pod_uid=pod_uid, expires_at=expires_at)

    def review(self, token: str, audiences: list[str]) -> Obj:
        """The ``status`` of a TokenReview of ``token`` for ``audiences``, as a real server."""
        pods = self.store if self.check_bound_pods else None
        return self.tokens.review(token, audiences, pods)

    # HTTP ----------------------------------------------------------------------------------

    async def _bookmark_ticker(self) -> None:
        while True:
            await asyncio.sleep(self.bookmark_interval)
            self.bookmark_now()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._conns.add(writer)
        conn = h11.Connection(h11.SERVER)
        try:
            while True:
                req, body = await self._read_request(conn, reader)
                if req is None:
                    break
                await self._respond(conn, reader, writer, req, body)
                if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                    break
                conn.start_next_cycle()
        except (ConnectionError, h11.ProtocolError, ssl.SSLError, asyncio.CancelledError):
            pass
        finally:
            self._conns.discard(writer)
            writer.transport.abort()

    @staticmethod
    async def _read_request(conn: h11.Connection, reader: asyncio.StreamReader
                            ) -> tuple[h11.Request | None, bytes]:
        req: h11.Request | None = None
        body = b""
        while True:
            ev = conn.next_event()
            if ev is h11.NEED_DATA:
                conn.receive_data(await reader.read(65536))
            elif isinstance(ev, h11.Request):
                req = ev
            elif isinstance(ev, h11.Data):
                body += bytes(ev.data)
            elif isinstance(ev, h11.EndOfMessage):
                return req, body
            else:  # ConnectionClosed, PAUSED
                return None, b""

    @staticmethod
    async def _send(conn: h11.Connection, writer: asyncio.StreamWriter, *events: Any) -> None:
        for ev in events:
            writer.write(conn.send(ev))
        await writer.drain()

    async def _send_json(self, conn: h11.Connection, writer: asyncio.StreamWriter,
                         code: int, body: Obj) -> None:
        data = json.dumps(body).encode()
        headers = [("content-type", "application/json"), ("content-length", str(len(data)))]
        await self._send(conn, writer, h11.Response(status_code=code, headers=headers),
                         h11.Data(data=data), h11.EndOfMessage())

    async def _respond(self, conn: h11.Connection, reader: asyncio.StreamReader,
                       writer: asyncio.StreamWriter, req: h11.Request, body: bytes) -> None:
        target = req.target.decode()
        method = req.method.decode()
        record = RequestRecord(method, target)
        self.request_log.append(record)
        code = 500
        try:
            code, out = await self._route(conn, reader, writer, req, method, target, body)
            if out is not None:
                await self._send_json(conn, writer, code, out)
        except ApiStatus as e:
            code = e.code
            await self._send_json(conn, writer, e.code, e.status())
        except (ConnectionError, asyncio.CancelledError):
            raise
        except Exception as e:  # a bug here: answer as the real server's panic handler
            if conn.our_state is not h11.SEND_RESPONSE:
                raise
            await self._send_json(conn, writer, 500, ApiStatus(
                500, "InternalError", f"Internal error occurred: {e!r}").status())
        finally:
            record.status = code

    async def _route(self, conn: h11.Connection, reader: asyncio.StreamReader,
                     writer: asyncio.StreamWriter, req: h11.Request, method: str, target: str,
                     body: bytes) -> tuple[int, Obj | None]:
        url = urlsplit(target)
        q = {k: v[-1] for k, v in parse_qs(url.query).items()}
        path = url.path.rstrip("/")
        if path == "/version":
            return 200, {"major": "1", "minor": "33", "gitVersion": "v1.33.0-kubeapi-test"}
        if path in _ANON_PATHS:
            return 200, {"kind": "Status", "status": "Success", "message": "ok"}
        auth = dict(req.headers).get(b"authorization", b"").decode()
        token = auth[7:] if auth.startswith("Bearer ") else ""
        if token not in self._callers:
            raise ApiStatus(401, "Unauthorized", "Unauthorized")
        parts = path.strip("/").split("/")
        if parts[0] == "api" and len(parts) >= 2:
            group, version, rest = "", parts[1], parts[2:]
        elif parts[0] == "apis" and len(parts) >= 3:
            group, version, rest = parts[1], parts[2], parts[3:]
        else:
            return 200, self._discovery(parts)
        if (group, rest) == ("authentication.k8s.io", ["tokenreviews"]) and method == "POST":
            if not self._callers[token]:
                raise ApiStatus(403, "Forbidden", 'tokenreviews.authentication.k8s.io is '
                                'forbidden: User cannot create resource "tokenreviews" in API '
                                'group "authentication.k8s.io" at the cluster scope')
            self.requests["create", "tokenreviews"] += 1
            review = json.loads(body or b"{}")
            spec = review.get("spec") or {}
            review["status"] = self.review(str(spec.get("token", "")),
                                           list(spec.get("audiences") or []))
            review.setdefault("metadata", {})["creationTimestamp"] = None
            return 201, review
        if not rest:
            return 200, self._resource_list(group, version)
        ns: str | None = None
        plural = rest[0]
        tail = rest[1:]
        if (rest[0] == "namespaces" and len(rest) >= 3
                and (group, version, rest[2]) in self.store.by_path):
            ns, plural, tail = rest[1], rest[2], rest[3:]
        rt = self.store.by_path.get((group, version, plural))
        if (rt is None or (ns is not None and not rt.namespaced) or len(tail) > 1
                or (rt.namespaced and ns is None and tail)):
            raise ApiStatus(404, "NotFound", "the server could not find the requested resource")
        name = tail[0] if tail else None
        return await self._resource(conn, reader, writer, rt, version, ns, name, method, q, body)

    def _discovery(self, parts: list[str]) -> Obj:
        if parts == ["api"]:
            return {"kind": "APIVersions", "versions": ["v1"]}
        if parts == ["apis"]:
            groups: dict[str, list[str]] = {}
            for g, v, _ in self.store.by_path:
                if g and v not in groups.setdefault(g, []):
                    groups[g].append(v)
            return {"kind": "APIGroupList", "apiVersion": "v1", "groups": [
                {"name": g, "versions": [{"groupVersion": f"{g}/{v}", "version": v} for v in vs],
                 "preferredVersion": {"groupVersion": f"{g}/{vs[0]}", "version": vs[0]}}
                for g, vs in groups.items()]}
        raise ApiStatus(404, "NotFound", "the server could not find the requested resource")

    def _resource_list(self, group: str, version: str) -> Obj:
        rts = [rt for (g, v, _), rt in self.store.by_path.items() if (g, v) == (group, version)]
        if not rts:
            raise ApiStatus(404, "NotFound", "the server could not find the requested resource")
        verbs = ["create", "delete", "get", "list", "patch", "update", "watch"]
        return {"kind": "APIResourceList", "apiVersion": "v1",
                "groupVersion": f"{group}/{version}" if group else version,
                "resources": [{"name": rt.plural, "singularName": rt.kind.lower(),
                               "namespaced": rt.namespaced, "kind": rt.kind, "verbs": verbs}
                              for rt in rts]}

    async def _resource(self, conn: h11.Connection, reader: asyncio.StreamReader,
                        writer: asyncio.StreamWriter, rt: ResourceType, version: str,
                        ns: str | None, name: str | None, method: str, q: dict[str, str],
                        body: bytes) -> tuple[int, Obj | None]:
        api_version = rt.api_version(version)
        ref = {"apiVersion": api_version, "kind": rt.kind,
               "metadata": {"name": name, "namespace": ns}}
        if method == "GET" and name is None:
            sel = Selector(ns, parse_field_selector(q.get("fieldSelector", ""), rt),
                           parse_label_selector(q.get("labelSelector", "")))
            if q.get("watch") in ("true", "1"):
                self.requests["watch", rt.plural] += 1
                await self._watch(conn, reader, writer, rt, version, sel, q)
                return 200, None
            self.requests["list", rt.plural] += 1
            return 200, self._list(rt, version, sel, q)
        if name is None and method != "POST":
            raise ApiStatus(405, "MethodNotAllowed", f"{method} is not supported here")
        obj: Obj = {}
        if method in ("POST", "PUT", "PATCH"):
            try:
                obj = json.loads(body)
                assert isinstance(obj, dict)
            except (ValueError, AssertionError):
                raise ApiStatus(400, "BadRequest", "the request body is not a JSON object") \
                    from None
        if method == "GET":
            self.requests["get", rt.plural] += 1
            return 200, self._at(self.store.get(ref), api_version)
        if method == "POST":
            self.requests["create", rt.plural] += 1
            obj["apiVersion"], obj["kind"] = api_version, rt.kind
            out = self.store.create(obj, ns, q.get("fieldManager", "kubeapi-test"))
            return 201, self._at(out, api_version)
        if method == "PUT":
            self.requests["update", rt.plural] += 1
            if obj.get("metadata", {}).get("name") != name:
                raise ApiStatus(400, "BadRequest", "the name of the object does not match "
                                "the name on the URL")
            obj["apiVersion"], obj["kind"] = api_version, rt.kind
            return 200, self._at(self.store.replace(obj, ns), api_version)
        if method == "PATCH":
            self.requests["patch", rt.plural] += 1
            return 200, self._at(self.store.patch(ref, obj), api_version)
        if method == "DELETE":
            self.requests["delete", rt.plural] += 1
            return 200, self._at(self.store.delete(ref), api_version)
        raise ApiStatus(405, "MethodNotAllowed", f"{method} is not supported")

    @staticmethod
    def _at(obj: Obj, api_version: str) -> Obj:
        obj["apiVersion"] = api_version
        return obj

    def _list(self, rt: ResourceType, version: str, sel: Selector, q: dict[str, str]) -> Obj:
        limit = _int_param(q, "limit")
        start: tuple[str, ...] = ()
        with self.store.lock:
            if q.get("continue"):
                rv, start = _parse_continue(q["continue"])
                if rv < self.store.compacted:
                    raise ApiStatus(410, "Expired", "The provided continue parameter is too "
                                    "old to display a consistent list result. You can start a "
                                    "new list without the continue parameter, or use the "
                                    "continue token in this response to retrieve the remainder "
                                    "of the results.")
            elif q.get("resourceVersionMatch") == "Exact" and q.get("resourceVersion"):
                rv = _int_param(q, "resourceVersion")
            else:
                rv = self.store.rv
            state = self.store.state_at(rt, rv)
        items: list[Obj] = []
        more = None
        prev_key: tuple[str, str, str, str] = ("", "", "", "")
        for key in sorted(state):
            if start and key <= start:
                continue
            obj = state[key]
            if not sel.matches(obj):
                continue
            if limit and len(items) == limit:
                more = _continue_token(rv, prev_key)
                break
            items.append(self._at(json.loads(json.dumps(obj)), rt.api_version(version)))
            prev_key = key
        meta: Obj = {"resourceVersion": str(rv)}
        if more:
            meta["continue"] = more
            meta["remainingItemCount"] = sum(1 for k in state if k > prev_key
                                             and sel.matches(state[k]))
        return {"kind": f"{rt.kind}List", "apiVersion": rt.api_version(version),
                "metadata": meta, "items": items}

    async def _watch(self, conn: h11.Connection, reader: asyncio.StreamReader,
                     writer: asyncio.StreamWriter, rt: ResourceType, version: str,
                     sel: Selector, q: dict[str, str]) -> None:
        w = Watcher(rt, version, sel, q.get("allowWatchBookmarks") == "true", self._loop)
        since = _int_param(q, "resourceVersion")
        initial = q.get("sendInitialEvents") == "true"
        self.store.open_watch(w, None if not since or initial else since, initial)
        headers = [("content-type", "application/json"), ("cache-control", "no-cache, private")]
        await self._send(conn, writer, h11.Response(status_code=200, headers=headers))
        deadline = time.monotonic() + float(q["timeoutSeconds"]) if q.get("timeoutSeconds") \
            else None
        eof = asyncio.ensure_future(reader.read(1))
        try:
            while True:
                get = asyncio.ensure_future(w.queue.get())
                left = None if deadline is None else max(0.0, deadline - time.monotonic())
                done, _ = await asyncio.wait({get, eof}, timeout=left,
                                             return_when=asyncio.FIRST_COMPLETED)
                if get not in done:
                    get.cancel()
                    if eof in done:  # the client went away
                        writer.transport.abort()
                        return
                    break  # timeoutSeconds reached: end the stream cleanly
                item = get.result()
                if item is None:
                    break
                if item == "abort":
                    writer.transport.abort()
                    return
                assert isinstance(item, bytes)
                await self._send(conn, writer, h11.Data(data=item))
            await self._send(conn, writer, h11.EndOfMessage())
        finally:
            eof.cancel()  # and wait for it: the connection's next read must not race it
            await asyncio.gather(eof, return_exceptions=True)
            with self.store.lock:
                self.store.watchers.discard(w)

