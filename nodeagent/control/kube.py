"""Kubernetes API config source: the mesh as the cluster's API server holds it.

``KubeSource`` lists and watches (``KindWatch``, one task per kind) Pods, Services,
EndpointSlices, Nodes, the Istio kinds the mesh serves (WorkloadEntries, WorkloadGroups
and ServiceEntries among them) and the ``istio`` ConfigMap of the root namespace (only
that one: Istio's MeshConfig, ``control.meshconfig``), and publishes a new snapshot
(``control.files.assemble``) after each burst of changes, coalesced for ``debounce``
seconds. Unlike file mode, one bad object never rejects the others: a malformed object
is left out with a warning (its previous good version, if any, keeps serving), and an
object a check across objects rejects (a clusterIP used twice) is left out the same way;
only a snapshot that cannot be built at all keeps the last good one, with the error in
``status()``. Pod runtimes (netns, cgroup) still come from the pod runtime file.

A pod is in the mesh as Istio ambient decides: its Namespace labelled
``istio.io/dataplane-mode: ambient`` (Namespaces are watched for that), or the pod itself
labelled ``ambient``; a pod labelled ``none`` is out (``Pod.in_mesh``).

Every Pod is watched, not only this node's: the snapshot needs every endpoint's and
peer's labels (Service selectors, DestinationRule subsets), service account (the
identity HBONE expects of it) and named ports, which EndpointSlices do not carry. Only
the pods whose ``spec.nodeName`` is this node are captured (``pods_on_node``).
EndpointSlices decide whether another node's pod serves (``conditions.ready``).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from nodeagent.control.files import LoadedConfig, assemble, parse_object
from nodeagent.control.kubeclient import KubeClient, Resource
from nodeagent.control.kubewatch import KindWatch, Pair, Parse, describe_error
from nodeagent.control.meshconfig import MESH_CONFIG_KIND, MESH_CONFIGMAP
from nodeagent.control.registry import KINDS
from nodeagent.control.runtime import load_runtimes
from nodeagent.control.schema import Kind
from nodeagent.errors import ConfigError, ConfigErrors
from nodeagent.model.objects import DATAPLANE_MODE_LABEL, Pod, PodRuntime
from nodeagent.model.security import DEFAULT_ROOT_NAMESPACE
from nodeagent.model.status import ConfigStatus

log = logging.getLogger(__name__)

SOURCE = "kubernetes"
"""The source named in each object's errors (``kubernetes: Pod ns/name: field: …``)."""
ENDPOINT_SLICE = Resource("discovery.k8s.io", "v1", "EndpointSlice")
NAMESPACE = Resource("", "v1", "Namespace", namespaced=False)
RAW = (ENDPOINT_SLICE, NAMESPACE)
"""Kinds kept as they arrive (read field by field), not parsed into model objects."""


class KubeStartError(Exception):
    """The first list of a kind failed: the agent cannot start from this API server."""


def _parse_pod(
    doc: dict[str, Any], source: str
) -> tuple[Pair | None, list[ConfigError], list[str]]:
    spec = doc.get("spec")
    if not isinstance(spec, dict) or not spec.get("nodeName"):
        return None, [], []  # not scheduled yet: on no node, no endpoint, nothing to check
    return parse_object(doc, source)


PARSERS: dict[str, Parse] = {"Pod": _parse_pod}
"""A kind's own parser, where it has one (else ``parse_object``)."""


def resources_of(kind: Kind) -> list[Resource]:
    """The API resources that may hold ``kind``, preferred version first."""
    out = []
    for api_version in kind.api_versions:
        group, _, version = api_version.rpartition("/")
        out.append(Resource(group, version, kind.kind, namespaced=kind.kind != "Node"))
    return out


def slice_readiness(slices: KindWatch) -> dict[str, bool]:
    """Pod key → whether an EndpointSlice names it ready (``conditions.ready``: absent
    means ready); a pod several slices name is ready when one says so."""
    ready: dict[str, bool] = {}
    for entry in slices.items.values():  # raw: read defensively, field by field
        meta = entry.raw.get("metadata") or {}
        endpoints = entry.raw.get("endpoints")
        for ep in endpoints if isinstance(endpoints, list) else ():
            ref = ep.get("targetRef") if isinstance(ep, dict) else None
            if not isinstance(ref, dict) or ref.get("kind") != "Pod":
                continue
            key = f"{ref.get('namespace') or meta.get('namespace', 'default')}/{ref.get('name')}"
            conditions = ep.get("conditions")
            ok = not isinstance(conditions, dict) or conditions.get("ready") is not False
            ready[key] = ready.get(key, False) or ok
    return ready


def enrolled_namespaces(namespaces: KindWatch) -> frozenset[str]:
    """The namespaces labelled ``istio.io/dataplane-mode: ambient``: Istio ambient's
    opt-in, read defensively from the raw Namespaces."""
    out: set[str] = set()
    for entry in namespaces.items.values():
        meta = entry.raw.get("metadata") or {}
        labels = meta.get("labels") if isinstance(meta, dict) else None
        if isinstance(labels, dict) and labels.get(DATAPLANE_MODE_LABEL) == "ambient":
            out.add(str(meta.get("name", "")))
    return frozenset(out)


def pod_serves(raw: Mapping[str, Any], node: str, ready: Mapping[str, bool]) -> bool:
    """Whether a Pod belongs in this node's snapshot. This node's pods do from creation
    to deletion (they are captured before they are ready); another node's pod does
    while it can take connections: Running, with an IP, not terminating, and ready
    where an EndpointSlice names it."""
    spec = raw.get("spec") or {}
    status = raw.get("status") or {}
    meta = raw.get("metadata") or {}
    phase = status.get("phase", "")
    if phase in ("Succeeded", "Failed"):
        return False
    if node and spec.get("nodeName") == node:
        return True
    if not status.get("podIP") or meta.get("deletionTimestamp") or phase != "Running":
        return False
    return ready.get(f"{meta.get('namespace', 'default')}/{meta.get('name')}", True)


def _pair_name(pair: Pair) -> str:
    raw, obj = pair
    return f"{raw.get('kind')} {getattr(obj, 'key', '?')}"


def assemble_leniently(
    pairs: Sequence[Pair],
    *,
    sources: tuple[str, ...],
    runtimes: dict[str, PodRuntime],
    version: int,
    root_namespace: str,
    warnings: Sequence[str],
) -> LoadedConfig:
    """``assemble``, leaving out each object a check across objects names (with a
    warning) and trying again; raises ``ConfigErrors`` when an error names no object."""
    pairs = list(pairs)
    dropped: list[str] = []
    while True:
        try:
            loaded = assemble(
                pairs,
                sources=sources,
                runtimes=runtimes,
                version=version,
                root_namespace=root_namespace,
                warnings=[*warnings, *dropped],
            )
            return loaded
        except ConfigErrors as e:
            names = {err.obj for err in e.errors if err.obj}
            keep = [p for p in pairs if _pair_name(p) not in names]
            if len(keep) == len(pairs):
                raise
            for err in e.errors:
                log.warning("left out of the snapshot: %s", err)
                dropped.append(f"{err} (left out)")
            pairs = keep


class KubeSource:
    """The Kubernetes API as the agent's config source (the file-mode ``ConfigWatcher``'s
    counterpart: ``status``, ``run``, ``reload_now``, ``on_update``)."""

    def __init__(
        self,
        client: KubeClient,
        *,
        node: str,
        pods_file: Path | None,
        on_update: Callable[[LoadedConfig], None],
        root_namespace: str = DEFAULT_ROOT_NAMESPACE,
        debounce: float = 0.05,
        interval: float = 0.5,
        timeout_seconds: int = 300,
    ) -> None:
        self.client = client
        self.node = node
        self.pods_file = pods_file
        self.on_update = on_update
        self.root_namespace = root_namespace
        self.debounce = debounce
        self.interval = interval
        self.timeout_seconds = timeout_seconds
        self.watches: list[KindWatch] = []
        self.slices: KindWatch | None = None
        self.namespaces: KindWatch | None = None
        self.version = 0
        self.current: LoadedConfig | None = None
        self.last_error = ""
        self.last_error_at = 0.0
        self.loaded_at = 0.0
        self._built_warnings: tuple[str, ...] = ()
        """The last snapshot's warnings beyond the watches' own: objects left out, and
        what the checks across objects found worth a look."""
        self._dirty = asyncio.Event()
        self._lock = asyncio.Lock()
        self._runtime_print: tuple[int, int] | None = None

    # -- status ------------------------------------------------------------------------
    def warnings(self) -> tuple[str, ...]:
        out: list[str] = []
        for w in self.watches:
            out.extend(w.warnings())
        return (*out, *self._built_warnings)

    def status(self, version: int) -> ConfigStatus:
        """Where this source stands, for ``nodeagent ctl status``."""
        return ConfigStatus(
            version=version,
            loaded_at=self.loaded_at,
            sources=(self.client.server,),
            last_error=self.last_error,
            last_error_at=self.last_error_at,
            warnings=self.warnings(),
            watches=tuple(w.status() for w in self.watches),
            source=SOURCE,
        )

    # -- start -------------------------------------------------------------------------
    def _watch(self, res: Resource) -> KindWatch:
        mesh_config = res.kind == MESH_CONFIG_KIND.kind
        return KindWatch(
            self.client,
            res,
            parse=PARSERS.get(res.kind, parse_object) if res not in RAW else None,
            changed=self._dirty.set,
            # the one ConfigMap the agent reads (its Role names it): Istio's MeshConfig
            field_selector=f"metadata.name={MESH_CONFIGMAP}" if mesh_config else "",
            timeout_seconds=self.timeout_seconds,
            source=SOURCE,
        )

    async def _first_list(self, candidates: list[Resource]) -> KindWatch:
        """The first version of a kind the server serves, listed (the first candidate,
        unserved, when none is)."""
        chosen: KindWatch | None = None
        for res in candidates:
            w = self._watch(res)
            try:
                await w.list_once()
            except Exception as e:
                raise KubeStartError(
                    f"cannot list {res} from {self.client.server}: {describe_error(e)}"
                ) from e
            if w.served:
                return w
            chosen = chosen or w
        assert chosen is not None
        return chosen

    async def list_all(self) -> None:
        """List every kind once (``KubeStartError`` when a list fails; a kind not
        served is only a warning)."""
        kinds = [k for k in KINDS if k is not MESH_CONFIG_KIND]
        core = [resources_of(k) for k in kinds if k.api_versions == ("v1",)]
        others = [resources_of(k) for k in kinds if k.api_versions != ("v1",)]
        mesh = Resource("", "v1", MESH_CONFIG_KIND.kind, namespace=self.root_namespace)
        candidates = [*core, [NAMESPACE], [ENDPOINT_SLICE], *others, [mesh]]  # as ctl status
        self.watches = list(await asyncio.gather(*(self._first_list(c) for c in candidates)))
        self.slices = next(w for w in self.watches if w.resource == ENDPOINT_SLICE)
        self.namespaces = next(w for w in self.watches if w.resource == NAMESPACE)

    async def start(self) -> LoadedConfig:
        """List every kind once and build the first snapshot. ``KubeStartError`` when a
        list fails (a kind not served is only a warning); ``ConfigErrors`` when no
        snapshot can be built."""
        await self.list_all()
        loaded = await self._publish(raise_errors=True)
        assert loaded is not None
        return loaded

    # -- snapshots ---------------------------------------------------------------------
    def collect(self) -> list[Pair]:
        """The validated objects of every kind that belong in this node's snapshot."""
        ready = slice_readiness(self.slices) if self.slices is not None else {}
        enrolled = enrolled_namespaces(self.namespaces) if self.namespaces else frozenset()
        pairs: list[Pair] = []
        for w in self.watches:
            for entry in w.items.values():
                if entry.pair is None:
                    continue
                if w.resource.kind == "Pod":
                    raw, pod = entry.pair
                    if not pod_serves(raw, self.node, ready):
                        continue
                    if isinstance(pod, Pod) and pod.namespace not in enrolled:
                        pairs.append((raw, dataclasses.replace(pod, namespace_enrolled=False)))
                        continue
                pairs.append(entry.pair)
        return pairs

    def _runtimes(self) -> dict[str, PodRuntime]:
        return load_runtimes(self.pods_file) if self.pods_file is not None else {}

    async def _publish(self, *, raise_errors: bool = False) -> LoadedConfig | None:
        async with self._lock:
            self._dirty.clear()
            collected_at = time.monotonic()
            pairs = self.collect()
            warnings = [x for w in self.watches for x in w.warnings()]
            loop = asyncio.get_running_loop()
            try:
                runtimes = self._runtimes()
                loaded = await loop.run_in_executor(
                    None,
                    lambda: assemble_leniently(
                        pairs,
                        sources=(self.client.server,),
                        runtimes=runtimes,
                        version=self.version + 1,
                        root_namespace=self.root_namespace,
                        warnings=warnings,
                    ),
                )
            except Exception as e:  # a snapshot that fails to build never stops the source
                if raise_errors:
                    raise
                if not isinstance(e, ConfigErrors | ConfigError):
                    log.exception("snapshot not built")
                self.last_error = str(e)
                self.last_error_at = time.time()
                log.error("snapshot not built, still serving version %d: %s", self.version, e)
                return None
            self.version += 1
            self.current = loaded
            given = set(warnings)
            self._built_warnings = tuple(w for w in loaded.warnings if w not in given)
            self.loaded_at = time.time()
            self.last_error = ""
            if not raise_errors:  # at start, the agent takes the first snapshot itself
                self.on_update(loaded)
            now = time.monotonic()
            for w in self.watches:
                w.served_at(now, collected_at)
            log.info(
                "config version %d from the API (%d objects)", self.version, len(loaded.objects)
            )
            return loaded

    async def reload_now(self) -> LoadedConfig | None:
        """Re-read the pod runtime file and publish a snapshot now (``on_update``), then
        return it; None when it could not be built (the last good one keeps serving)."""
        self._runtime_print = self._runtime_fingerprint()
        return await self._publish()

    def _runtime_fingerprint(self) -> tuple[int, int] | None:
        if self.pods_file is None:
            return None
        try:
            st = self.pods_file.stat()
        except OSError:
            return None
        return (st.st_mtime_ns, st.st_size)

    # -- tasks -------------------------------------------------------------------------
    async def _build_loop(self) -> None:
        while True:
            await self._dirty.wait()
            await asyncio.sleep(self.debounce)  # a burst of events makes one snapshot
            await self._publish()

    async def _runtime_loop(self) -> None:
        self._runtime_print = self._runtime_fingerprint()
        while True:
            await asyncio.sleep(self.interval)
            fp = self._runtime_fingerprint()
            if fp != self._runtime_print:
                self._runtime_print = fp
                self._dirty.set()

    async def run(self) -> None:
        """Watch every kind (``start`` listed them) and publish snapshots, until
        cancelled; then close the client."""
        tasks = [asyncio.create_task(w.run(listed=True)) for w in self.watches]
        tasks.append(asyncio.create_task(self._build_loop()))
        tasks.append(asyncio.create_task(self._runtime_loop()))
        try:
            await asyncio.gather(*tasks)
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await self.client.close()
