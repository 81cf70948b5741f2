"""The object store behind the test API server (``kubeapi.KubeApiServer``): resource
types, objects with one cluster-wide resourceVersion (as etcd's), a bounded event
history for watch resume, compaction, selectors, and watchers fed from mutations.

Thread-safe: tests mutate it from their own thread while the server's event loop
serves lists and watches; every watcher gets its events in resourceVersion order.
"""

from __future__ import annotations

import asyncio
import copy
import ipaddress
import json
import threading
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

Obj = dict[str, Any]


@dataclass(frozen=True)
class ResourceType:
    """One API resource: served at one or more versions of its group, stored once."""

    group: str
    versions: tuple[str, ...]
    plural: str
    kind: str
    namespaced: bool
    field_labels: tuple[str, ...] = ()  # fields a fieldSelector may name beyond metadata.*

    def api_version(self, version: str) -> str:
        return f"{self.group}/{version}" if self.group else version


_POD_FIELDS = (
    "spec.nodeName", "spec.restartPolicy", "spec.schedulerName", "spec.serviceAccountName",
    "spec.hostNetwork", "status.phase", "status.podIP", "status.nominatedNodeName",
)
_ISTIO_NET = ("v1", "v1beta1", "v1alpha3")
_ISTIO_SEC = ("v1", "v1beta1")

DEFAULT_RESOURCES: tuple[ResourceType, ...] = (
    ResourceType("", ("v1",), "pods", "Pod", True, _POD_FIELDS),
    ResourceType("", ("v1",), "services", "Service", True),
    ResourceType("", ("v1",), "endpoints", "Endpoints", True),
    ResourceType("", ("v1",), "nodes", "Node", False, ("spec.unschedulable",)),
    ResourceType("", ("v1",), "namespaces", "Namespace", False, ("status.phase",)),
    ResourceType("", ("v1",), "configmaps", "ConfigMap", True),
    ResourceType("", ("v1",), "serviceaccounts", "ServiceAccount", True),
    ResourceType("discovery.k8s.io", ("v1",), "endpointslices", "EndpointSlice", True),
    ResourceType("networking.istio.io", _ISTIO_NET, "virtualservices", "VirtualService", True),
    ResourceType("networking.istio.io", _ISTIO_NET, "destinationrules", "DestinationRule", True),
    ResourceType("networking.istio.io", _ISTIO_NET, "serviceentries", "ServiceEntry", True),
    ResourceType("networking.istio.io", _ISTIO_NET, "workloadentries", "WorkloadEntry", True),
    ResourceType("networking.istio.io", _ISTIO_NET, "workloadgroups", "WorkloadGroup", True),
    ResourceType("networking.istio.io", _ISTIO_NET, "gateways", "Gateway", True),
    ResourceType("security.istio.io", _ISTIO_SEC, "authorizationpolicies",
                 "AuthorizationPolicy", True),
    ResourceType("security.istio.io", _ISTIO_SEC, "peerauthentications",
                 "PeerAuthentication", True),
    ResourceType("security.istio.io", _ISTIO_SEC, "requestauthentications",
                 "RequestAuthentication", True),
    ResourceType("telemetry.istio.io", ("v1", "v1alpha1"), "telemetries", "Telemetry", True),
)

# kinds whose metadata.generation the real server does not set
_NO_GENERATION = {"Service", "Endpoints", "EndpointSlice", "Node", "Namespace", "ConfigMap",
                  "ServiceAccount"}


class ApiStatus(Exception):
    """An API error, rendered as a ``Status`` object with its HTTP code."""

    def __init__(self, code: int, reason: str, message: str,
                 details: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.code, self.reason, self.message, self.details = code, reason, message, details

    def status(self) -> Obj:
        body: Obj = {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                     "message": self.message, "reason": self.reason, "code": self.code}
        if self.details is not None:
            body["details"] = self.details
        return body


def not_found(rt: ResourceType, name: str) -> ApiStatus:
    what = f"{rt.plural}.{rt.group}" if rt.group else rt.plural
    return ApiStatus(404, "NotFound", f'{what} "{name}" not found',
                     {"name": name, "group": rt.group, "kind": rt.plural})


def expired(rv: int, oldest: int) -> ApiStatus:
    return ApiStatus(410, "Expired", f"too old resource version: {rv} ({oldest})")


def now_rfc3339() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


# --- selectors -------------------------------------------------------------------------

Requirement = Callable[[Obj], bool]


def _split_top(text: str) -> list[str]:
    """Split on commas outside parentheses (``a in (x,y),b=c``)."""
    parts, depth, cur = [], 0, ""
    for ch in text:
        depth += ch == "("
        depth -= ch == ")"
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    parts.append(cur)
    return [p.strip() for p in parts if p.strip()]


def _field_value(obj: Obj, path: str) -> str:
    cur: Any = obj
    for part in path.split("."):
        cur = cur.get(part) if isinstance(cur, dict) else None
    if isinstance(cur, bool):
        return "true" if cur else "false"
    return "" if cur is None else str(cur)


def _field_req(key: str, want: str, equal: bool) -> Requirement:
    return lambda o: (_field_value(o, key) == want) == equal


def _labels(o: Obj) -> dict[str, str]:
    return dict((o.get("metadata") or {}).get("labels") or {})


def _label_in(key: str, values: frozenset[str], inside: bool) -> Requirement:
    return lambda o: (_labels(o).get(key) in values) == inside


def _label_exists(key: str, exists: bool) -> Requirement:
    return lambda o: (key in _labels(o)) == exists


def parse_field_selector(text: str, rt: ResourceType) -> list[Requirement]:
    reqs: list[Requirement] = []
    allowed = {"metadata.name", "metadata.namespace", *rt.field_labels}
    for term in _split_top(text):
        op = "!=" if "!=" in term else "==" if "==" in term else "="
        key, _, value = term.partition(op)
        key = key.strip()
        if key not in allowed:
            raise ApiStatus(400, "BadRequest", f'field label not supported: {key}')
        reqs.append(_field_req(key, value.strip(), op != "!="))
    return reqs


def parse_label_selector(text: str) -> list[Requirement]:
    reqs: list[Requirement] = []
    for term in _split_top(text):
        words = term.split(None, 1)
        if len(words) == 2 and words[1].startswith(("in ", "in(", "notin ", "notin(")):
            inner = words[1][words[1].index("(") + 1: words[1].rindex(")")]
            vals = frozenset(v.strip() for v in inner.split(","))
            reqs.append(_label_in(words[0], vals, not words[1].startswith("notin")))
        elif "!=" in term:
            key, _, val = term.partition("!=")
            reqs.append(_label_in(key.strip(), frozenset([val.strip()]), False))
        elif "=" in term:
            key, _, val = term.replace("==", "=").partition("=")
            reqs.append(_label_in(key.strip(), frozenset([val.strip()]), True))
        elif term.startswith("!"):
            reqs.append(_label_exists(term[1:].strip(), False))
        else:
            reqs.append(_label_exists(term, True))
    return reqs


@dataclass
class Selector:
    namespace: str | None = None
    fields: list[Requirement] = field(default_factory=list)
    labels: list[Requirement] = field(default_factory=list)

    def matches(self, obj: Obj | None) -> bool:
        if obj is None:
            return False
        if self.namespace is not None and obj["metadata"].get("namespace") != self.namespace:
            return False
        return all(r(obj) for r in self.fields) and all(r(obj) for r in self.labels)


# --- events and watchers ------------------------------------------------------------------


@dataclass(frozen=True)
class Event:
    rv: int
    type: str  # ADDED | MODIFIED | DELETED
    rt: ResourceType
    obj: Obj  # the object after the change (for DELETED: its last state, at this rv)
    prev: Obj | None  # the object before the change


def as_version(obj: Obj, rt: ResourceType, version: str) -> Obj:
    out = copy.deepcopy(obj)
    out["apiVersion"] = rt.api_version(version)
    return out


def line(kind: str, obj: Obj) -> bytes:
    return json.dumps({"type": kind, "object": obj}, separators=(",", ":")).encode() + b"\n"


class Watcher:
    """One open watch stream: the events it should see, queued on the server's loop."""

    def __init__(self, rt: ResourceType, version: str, sel: Selector, bookmarks: bool,
                 loop: asyncio.AbstractEventLoop) -> None:
        self.rt, self.version, self.sel, self.bookmarks = rt, version, sel, bookmarks
        self.loop = loop
        # bytes: a line to send; None: end the stream cleanly; "abort": cut the connection
        self.queue: asyncio.Queue[bytes | str | None] = asyncio.Queue()

    def render(self, ev: Event) -> bytes | None:
        """The line this watcher gets for ``ev`` (an object leaving its selector is a DELETED
        of the previous state at the event's resourceVersion, as the real watch cache does)."""
        now = ev.type != "DELETED" and self.sel.matches(ev.obj)
        before = self.sel.matches(ev.prev)
        if ev.type == "DELETED":
            return line("DELETED", as_version(ev.obj, self.rt, self.version)) if before else None
        if now:
            kind = "MODIFIED" if before else "ADDED"
            return line(kind, as_version(ev.obj, self.rt, self.version))
        if before and ev.prev is not None:
            gone = as_version(ev.prev, self.rt, self.version)
            gone["metadata"]["resourceVersion"] = str(ev.rv)
            return line("DELETED", gone)
        return None

    def bookmark(self, rv: int, annotations: dict[str, str] | None = None) -> bytes:
        meta: Obj = {"resourceVersion": str(rv)}
        if annotations:
            meta["annotations"] = annotations
        return line("BOOKMARK", {"kind": self.rt.kind,
                                 "apiVersion": self.rt.api_version(self.version),
                                 "metadata": meta})

    def push(self, item: bytes | str | None) -> None:
        """Queue ``item`` from any thread, in call order."""
        self.loop.call_soon_threadsafe(self.queue.put_nowait, item)


# --- the store ---------------------------------------------------------------------------

Key = tuple[str, str, str, str]  # group, plural, namespace ("" if cluster-scoped), name


class Store:
    def __init__(self, resources: Iterable[ResourceType] = DEFAULT_RESOURCES,
                 max_history: int = 10000) -> None:
        self.lock = threading.RLock()
        self.rv = 1  # etcd starts above zero; "0" means "any" to the API
        self.compacted = 1  # events after this rv are all kept
        self.max_history = max_history
        self.objects: dict[Key, Obj] = {}
        self.history: list[Event] = []
        self.watchers: set[Watcher] = set()
        self.by_path: dict[tuple[str, str, str], ResourceType] = {}
        self.by_kind: dict[tuple[str, str], ResourceType] = {}
        self._ips: set[ipaddress.IPv4Address] = set()
        # called after each change, under the lock (controllers, e.g. EndpointSlices)
        self.hooks: list[Callable[[Event], None]] = []
        for rt in resources:
            self.add_resource(rt)

    def add_resource(self, rt: ResourceType) -> None:
        for v in rt.versions:
            self.by_path[(rt.group, v, rt.plural)] = rt
            self.by_kind[(rt.api_version(v), rt.kind)] = rt

    def resource_of(self, obj: Obj) -> ResourceType:
        rt = self.by_kind.get((obj.get("apiVersion", ""), obj.get("kind", "")))
        if rt is None:
            raise ApiStatus(404, "NotFound", f"the server could not find the requested resource "
                            f"({obj.get('apiVersion')!r}, kind {obj.get('kind')!r})")
        return rt

    @staticmethod
    def key(rt: ResourceType, namespace: str | None, name: str) -> Key:
        return (rt.group, rt.plural, (namespace or "") if rt.namespaced else "", name)

    # mutations -------------------------------------------------------------------------

    def _commit(self, ev_type: str, rt: ResourceType, key: Key, obj: Obj | None,
                prev: Obj | None) -> Obj:
        self.rv += 1
        if obj is None:  # deletion: the last state, at the deletion's rv
            assert prev is not None
            final = copy.deepcopy(prev)
            final["metadata"]["resourceVersion"] = str(self.rv)
            del self.objects[key]
        else:
            obj["metadata"]["resourceVersion"] = str(self.rv)
            self.objects[key] = obj
            final = obj
        ev = Event(self.rv, ev_type, rt, final, prev)
        self.history.append(ev)
        if len(self.history) > self.max_history:
            dropped = self.history.pop(0)
            self.compacted = dropped.rv
        for w in list(self.watchers):
            if w.rt is rt:
                rendered = w.render(ev)
                if rendered is not None:
                    w.push(rendered)
        for hook in self.hooks:
            hook(ev)
        return copy.deepcopy(final)

    def create(self, obj: Obj, namespace: str | None = None,
               manager: str = "kubeapi-test") -> Obj:
        with self.lock:
            rt = self.resource_of(obj)
            obj = copy.deepcopy(obj)
            meta = obj.setdefault("metadata", {})
            name = meta.get("name")
            if not name:
                if meta.get("generateName"):
                    name = meta["name"] = meta["generateName"] + uuid.uuid4().hex[:5]
                else:
                    raise ApiStatus(422, "Invalid", f"{rt.kind}.{rt.group or 'core'} is invalid: "
                                    "metadata.name: Required value: name or generateName "
                                    "is required")
            ns = namespace or meta.get("namespace") or ("default" if rt.namespaced else None)
            if rt.namespaced:
                if meta.get("namespace") not in (None, ns):
                    raise ApiStatus(400, "BadRequest", "the namespace of the provided object "
                                    "does not match the namespace sent on the request")
                meta["namespace"] = ns
            else:
                meta.pop("namespace", None)
            key = self.key(rt, ns, name)
            if key in self.objects:
                what = f"{rt.plural}.{rt.group}" if rt.group else rt.plural
                raise ApiStatus(409, "AlreadyExists", f'{what} "{name}" already exists',
                                {"name": name, "group": rt.group, "kind": rt.plural})
            meta["uid"] = str(uuid.uuid4())
            meta["creationTimestamp"] = now_rfc3339()
            meta.pop("resourceVersion", None)
            if rt.kind not in _NO_GENERATION:
                meta["generation"] = 1
            meta["managedFields"] = [{"manager": manager, "operation": "Update",
                                      "apiVersion": obj["apiVersion"], "time": now_rfc3339(),
                                      "fieldsType": "FieldsV1", "fieldsV1": {}}]
            if rt.kind == "Service":
                self._default_service(obj)
            if rt.kind == "Namespace":
                obj.setdefault("status", {"phase": "Active"})
            return self._commit("ADDED", rt, key, obj, None)

    def _default_service(self, svc: Obj) -> None:
        spec = svc.setdefault("spec", {})
        spec.setdefault("type", "ClusterIP")
        spec.setdefault("sessionAffinity", "None")
        for port in spec.get("ports") or []:
            port.setdefault("protocol", "TCP")
            port.setdefault("targetPort", port.get("port"))
        ip = spec.get("clusterIP")
        if ip == "None" or spec["type"] == "ExternalName":
            return
        net = ipaddress.IPv4Network("10.96.0.0/12")
        if ip:
            addr = ipaddress.IPv4Address(ip)
            if addr not in net or addr in self._ips:
                why = "provided IP is already allocated" if addr in self._ips else \
                    "provided IP is not in the valid range. The range of valid IPs is 10.96.0.0/12"
                raise ApiStatus(422, "Invalid", f"Service \"{svc['metadata']['name']}\" is "
                                f"invalid: spec.clusterIPs: Invalid value: [\"{ip}\"]: {why}")
        else:
            addr = next(a for a in net.hosts() if int(a) >= int(net[10]) and a not in self._ips)
        self._ips.add(addr)
        spec["clusterIP"] = str(addr)
        spec["clusterIPs"] = [str(addr)]
        spec.setdefault("ipFamilies", ["IPv4"])
        spec.setdefault("ipFamilyPolicy", "SingleStack")

    def replace(self, obj: Obj, namespace: str | None = None) -> Obj:
        with self.lock:
            rt = self.resource_of(obj)
            obj = copy.deepcopy(obj)
            meta = obj.setdefault("metadata", {})
            ns = namespace or meta.get("namespace") or ("default" if rt.namespaced else None)
            key = self.key(rt, ns, meta.get("name", ""))
            old = self.objects.get(key)
            if old is None:
                raise not_found(rt, meta.get("name", ""))
            want = meta.get("resourceVersion")
            if want and want != old["metadata"]["resourceVersion"]:
                what = f"{rt.plural}.{rt.group}" if rt.group else rt.plural
                raise ApiStatus(409, "Conflict", f'Operation cannot be fulfilled on {what} '
                                f'"{meta["name"]}": the object has been modified; please apply '
                                "your changes to the latest version and try again",
                                {"name": meta["name"], "group": rt.group, "kind": rt.plural})
            # the server owns these fields: a client cannot change them with a PUT
            for f in ("uid", "creationTimestamp", "generation", "managedFields"):
                if f in old["metadata"]:
                    meta[f] = old["metadata"][f]
                else:
                    meta.pop(f, None)
            if rt.namespaced:
                meta["namespace"] = ns
            if rt.kind == "Service":
                spec = obj.setdefault("spec", {})
                old_spec = old.get("spec", {})
                for f in ("clusterIP", "clusterIPs", "ipFamilies", "ipFamilyPolicy"):
                    if f in old_spec:
                        spec.setdefault(f, old_spec[f])
            changed = {k: v for k, v in obj.items() if k not in ("metadata", "status")} != \
                {k: v for k, v in old.items() if k not in ("metadata", "status")}
            if "generation" in meta and changed:
                meta["generation"] += 1
            return self._commit("MODIFIED", rt, key, obj, old)

    def patch(self, ref: Obj, patch: Obj) -> Obj:
        """A JSON merge patch (RFC 7386) of the object ``ref`` names."""
        with self.lock:
            cur = self.get(ref)
            merged = _merge(cur, patch)
            merged["metadata"]["resourceVersion"] = cur["metadata"]["resourceVersion"]
            return self.replace(merged)

    def delete(self, ref: Obj) -> Obj:
        with self.lock:
            rt = self.resource_of(ref)
            meta = ref.get("metadata", {})
            key = self.key(rt, meta.get("namespace") or "default", meta.get("name", ""))
            old = self.objects.get(key)
            if old is None:
                raise not_found(rt, meta.get("name", ""))
            if rt.kind == "Service":
                for ip in old.get("spec", {}).get("clusterIPs") or []:
                    self._ips.discard(ipaddress.IPv4Address(ip))
            return self._commit("DELETED", rt, key, None, old)

    # reads --------------------------------------------------------------------------

    def get(self, ref: Obj) -> Obj:
        with self.lock:
            rt = self.resource_of(ref)
            meta = ref.get("metadata", {})
            obj = self.objects.get(self.key(rt, meta.get("namespace") or "default",
                                            meta.get("name", "")))
            if obj is None:
                raise not_found(rt, meta.get("name", ""))
            return copy.deepcopy(obj)

    def state_at(self, rt: ResourceType, rv: int) -> dict[Key, Obj]:
        """The objects of ``rt`` as they were at ``rv`` (410 if history no longer reaches it)."""
        with self.lock:
            if rv < self.compacted:
                raise ApiStatus(410, "Expired", f"The resourceVersion for the provided list is "
                                f"too old. ({rv} < {self.compacted})")
            state = {k: v for k, v in self.objects.items() if k[:2] == (rt.group, rt.plural)}
            for ev in reversed(self.history):
                if ev.rv <= rv:
                    break
                if ev.rt is not rt:
                    continue
                meta = ev.obj["metadata"]
                key = self.key(rt, meta.get("namespace"), meta["name"])
                if ev.prev is None:
                    state.pop(key, None)
                else:
                    state[key] = ev.prev
            return state

    def compact(self, rv: int | None = None) -> None:
        """Forget the history up to ``rv`` (default: all of it), as etcd's compaction."""
        with self.lock:
            self.compacted = max(self.compacted, self.rv if rv is None else rv)
            self.history = [ev for ev in self.history if ev.rv > self.compacted]

    def open_watch(self, w: Watcher, since: int | None, initial_end: bool) -> None:
        """Register ``w`` and queue what it has missed: events after ``since``, or (None) the
        current objects as synthetic ADDED events; an ERROR 410 if history is gone."""
        with self.lock:
            if since is None:
                objs = sorted(self.objects.items())
                for key, obj in objs:
                    if key[:2] == (w.rt.group, w.rt.plural) and w.sel.matches(obj):
                        w.queue.put_nowait(line("ADDED", as_version(obj, w.rt, w.version)))
                if initial_end and w.bookmarks:
                    w.queue.put_nowait(w.bookmark(self.rv, {"k8s.io/initial-events-end": "true"}))
            elif since < self.compacted:
                w.queue.put_nowait(line("ERROR", expired(since, self.compacted).status()))
                w.queue.put_nowait(None)
                return
            else:
                for ev in self.history:
                    if ev.rv > since and ev.rt is w.rt:
                        rendered = w.render(ev)
                        if rendered is not None:
                            w.queue.put_nowait(rendered)
            self.watchers.add(w)


def _merge(target: Any, patch: Any) -> Any:
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    out = copy.deepcopy(target) if isinstance(target, dict) else {}
    for k, v in patch.items():
        if v is None:
            out.pop(k, None)
        else:
            out[k] = _merge(out.get(k), v)
    return out
