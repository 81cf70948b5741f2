"""File-mode config source: a directory of Kubernetes/Istio YAML files.

``load_directory`` parses and validates every object (each problem names the file, the
object and the field path; ``control.parse``) and builds one ``MeshSnapshot`` with
``assemble``, which the Kubernetes API source shares. ``ConfigWatcher`` polls the
directory (and the pod runtime file) and publishes a new snapshot after each good edit;
a bad edit keeps the last good snapshot and records the error. Hidden paths are skipped,
so a ConfigMap mounted by kubelet is read once, and its atomic swap is noticed.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from stat import S_ISLNK
from typing import Any

from nodeagent.control.clusterip import with_cluster_ips, with_entry_addresses
from nodeagent.control.crosscheck import (
    check_duplicate_names,
    check_entries,
    check_peer_authentications,
    check_traffic,
    cross_check,
    entry_warnings,
    unmatched_selectors,
)
from nodeagent.control.parse import Pair, parse_documents, parse_object
from nodeagent.control.runtime import load_runtimes
from nodeagent.control.telemetry import telemetry_warnings
from nodeagent.control.yamlload import read_config_file
from nodeagent.errors import ConfigError, ConfigErrors
from nodeagent.model.authn import RequestAuthentication
from nodeagent.model.entries import (
    MeshConfig,
    ServiceEntry,
    WorkloadEntry,
    WorkloadGroup,
    entry_services,
    entry_workload,
)
from nodeagent.model.objects import Node, Pod, PodRuntime, Service
from nodeagent.model.ratelimit import LocalRateLimit
from nodeagent.model.security import (
    DEFAULT_ROOT_NAMESPACE,
    AuthorizationPolicy,
    PeerAuthentication,
)
from nodeagent.model.snapshot import MeshSnapshot
from nodeagent.model.status import ConfigStatus
from nodeagent.model.telemetry import Telemetry
from nodeagent.model.traffic import DestinationRule, VirtualService

__all__ = [
    "Collected",
    "ConfigWatcher",
    "LoadedConfig",
    "assemble",
    "config_fingerprint",
    "load_directory",
    "parse_documents",
    "parse_object",
    "read_directory",
]

log = logging.getLogger(__name__)

YAML_SUFFIXES = (".yaml", ".yml")


@dataclass(frozen=True)
class LoadedConfig:
    """The result of one successful load."""

    snapshot: MeshSnapshot
    objects: tuple[dict[str, Any], ...]
    """Raw objects as read, each with ``_source`` (file) added, for the config dump."""
    warnings: tuple[str, ...] = ()
    """What loaded but is worth a look (a kind the mesh does not serve, skipped)."""


def _files(directory: Path) -> list[Path]:
    """Every YAML file under ``directory``, skipping each path with a component that starts
    with a dot: so kubelet's ConfigMap volume (``..2026_…/mesh.yaml``, ``..data``, and a
    link per key, ``mesh.yaml -> ..data/mesh.yaml``) is read once, through its links."""
    if not directory.is_dir():
        raise ConfigErrors([ConfigError("not a directory", source=str(directory))])
    out: list[Path] = []
    for root, dirs, names in os.walk(directory):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        for name in names:
            path = Path(root, name)
            if not name.startswith(".") and name.endswith(YAML_SUFFIXES) and path.is_file():
                out.append(path)
    return sorted(out)


@dataclass(frozen=True)
class Collected:
    """Every object a source read, before the checks across objects (``assemble``)."""

    pairs: tuple[Pair, ...]
    errors: tuple[ConfigError, ...]
    warnings: tuple[str, ...]
    sources: tuple[str, ...]
    """Where the objects came from (the files read)."""


def read_directory(directory: str | Path) -> Collected:
    """Parse and check each object of each YAML file under ``directory`` on its own;
    raises ``ConfigErrors`` when ``directory`` is not one."""
    files = _files(Path(directory))
    pairs: list[Pair] = []
    errors: list[ConfigError] = []
    warnings: list[str] = []
    for f in files:
        try:
            text = read_config_file(f)
        except ConfigError as e:  # unreadable, too large, not UTF-8
            errors.append(e)
            continue
        found, errs, warns = parse_documents(text, str(f))
        pairs.extend(found)
        errors.extend(errs)
        warnings.extend(warns)
    return Collected(tuple(pairs), tuple(errors), tuple(warnings), tuple(str(f) for f in files))


def load_directory(
    directory: str | Path,
    *,
    runtimes: dict[str, PodRuntime] | None = None,
    version: int = 1,
    root_namespace: str = DEFAULT_ROOT_NAMESPACE,
) -> LoadedConfig:
    """Load and validate every YAML file under ``directory``; raise ``ConfigErrors``."""
    found = read_directory(directory)
    return assemble(
        found.pairs,
        found.errors,
        sources=found.sources,
        runtimes=runtimes,
        version=version,
        root_namespace=root_namespace,
        warnings=found.warnings,
    )


def assemble(
    pairs: Sequence[tuple[dict[str, Any], object]],
    errors: Sequence[ConfigError] = (),
    *,
    sources: tuple[str, ...],
    runtimes: dict[str, PodRuntime] | None = None,
    version: int = 1,
    root_namespace: str = DEFAULT_ROOT_NAMESPACE,
    warnings: Sequence[str] = (),
) -> LoadedConfig:
    """One snapshot from validated ``(raw, model object)`` pairs, whatever their source
    (files or the Kubernetes API): a clusterIP for each Service written without one, the
    checks across objects, then ``MeshSnapshot.build``. Raises ``ConfigErrors`` with
    ``errors`` and whatever the checks find."""
    errors = list(errors)
    pairs = with_entry_addresses(with_cluster_ips(pairs))
    by_type: dict[type, list[Any]] = {}
    for _raw, obj in pairs:
        by_type.setdefault(type(obj), []).append(obj)
    pods: list[Pod] = by_type.get(Pod, [])
    services: list[Service] = by_type.get(Service, [])
    peer_auths: list[PeerAuthentication] = by_type.get(PeerAuthentication, [])
    virtual_services: list[VirtualService] = by_type.get(VirtualService, [])
    destination_rules: list[DestinationRule] = by_type.get(DestinationRule, [])
    authz_policies: list[AuthorizationPolicy] = by_type.get(AuthorizationPolicy, [])
    req_auths: list[RequestAuthentication] = by_type.get(RequestAuthentication, [])
    rate_limits: list[LocalRateLimit] = by_type.get(LocalRateLimit, [])
    nodes: list[Node] = by_type.get(Node, [])
    workload_entries: list[WorkloadEntry] = by_type.get(WorkloadEntry, [])
    workload_groups: list[WorkloadGroup] = by_type.get(WorkloadGroup, [])
    service_entries: list[ServiceEntry] = by_type.get(ServiceEntry, [])
    mesh_configs: list[MeshConfig] = by_type.get(MeshConfig, [])
    telemetries: list[Telemetry] = by_type.get(Telemetry, [])
    errors.extend(
        check_duplicate_names(
            {
                "Pod": pods,
                "Service": services,
                "PeerAuthentication": peer_auths,
                "VirtualService": virtual_services,
                "DestinationRule": destination_rules,
                "AuthorizationPolicy": authz_policies,
                "RequestAuthentication": req_auths,
                "LocalRateLimit": rate_limits,
                "Node": nodes,
                "WorkloadEntry": workload_entries,
                "WorkloadGroup": workload_groups,
                "ServiceEntry": service_entries,
                "ConfigMap": mesh_configs,
                "Telemetry": telemetries,
            }
        )
    )
    errors.extend(cross_check(pods, services))
    errors.extend(check_peer_authentications(peer_auths))
    hosts = [*services, *(h for se in service_entries for h in entry_services(se))]
    errors.extend(check_traffic(virtual_services, destination_rules, hosts))
    errors.extend(check_entries(pods, services, workload_entries, service_entries))
    workloads = [*pods, *(entry_workload(we) for we in workload_entries)]
    warnings = [
        *warnings,
        *unmatched_selectors(workloads, hosts, destination_rules),
        *entry_warnings(
            workloads, workload_groups, service_entries, mesh_configs, root_namespace
        ),
        *telemetry_warnings(telemetries),
    ]
    if errors:
        raise ConfigErrors(errors)
    snap = MeshSnapshot.build(
        version=version,
        pods=tuple(pods),
        services=tuple(services),
        runtimes=runtimes or {},
        sources=sources,
        peer_authentications=tuple(peer_auths),
        virtual_services=tuple(virtual_services),
        destination_rules=tuple(destination_rules),
        authorization_policies=tuple(authz_policies),
        request_authentications=tuple(req_auths),
        local_rate_limits=tuple(rate_limits),
        node_objects=tuple(nodes),
        root_namespace=root_namespace,
        workload_entries=tuple(workload_entries),
        workload_groups=tuple(workload_groups),
        service_entries=tuple(service_entries),
        mesh_config=next((m for m in mesh_configs if m.namespace == root_namespace), None),
        telemetries=tuple(telemetries),
    )
    return LoadedConfig(
        snapshot=snap, objects=tuple(raw for raw, _ in pairs), warnings=tuple(warnings)
    )


Fingerprint = tuple[tuple[str, str, int, int, int], ...]


def config_fingerprint(directory: Path, *extra: Path) -> Fingerprint:
    """(path, the file it links to, inode, mtime, size) of the directory, every config file
    ``load_directory`` would read, and ``extra`` files: when it changes, the config may
    have changed (kubelet's swap of ``..data`` changes where each key's link leads).
    A path is resolved only when it is a link: ``realpath`` costs an ``lstat`` per
    component, and each system call of the poll's thread passes the GIL to and from the
    busy event loop (131 calls for 12 files before, 27 now)."""
    try:
        paths = _files(directory)
    except ConfigErrors:
        paths = []
    out: list[tuple[str, str, int, int, int]] = []
    for p in [directory, *paths, *extra]:
        try:
            st = os.lstat(p)
            real = str(p)
            if S_ISLNK(st.st_mode):  # a ConfigMap's key: where it leads, and that file
                real = os.path.realpath(p)
                st = os.stat(p)
        except OSError:
            continue
        out.append((str(p), real, st.st_ino, st.st_mtime_ns, st.st_size))
    return tuple(out)


@dataclass
class ConfigWatcher:
    """Polls a config directory and a pod runtime file; publishes good snapshots.

    ``on_update`` is called on the event loop with each new ``LoadedConfig``.
    """

    directory: Path
    pods_file: Path | None
    on_update: Callable[[LoadedConfig], None]
    interval: float = 0.5
    root_namespace: str = DEFAULT_ROOT_NAMESPACE
    version: int = 0
    current: LoadedConfig | None = None
    last_error: str = ""
    last_error_at: float = 0.0
    loaded_at: float = 0.0
    on_reject: Callable[[str], None] | None = None
    """Called (from a worker thread) with the error of each rejected reload: a metric."""
    _print: Fingerprint = field(default=())
    _lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    _collected: Collected | None = None
    """What the last good load read, to assemble again with new pod runtimes."""

    def _fingerprint(self) -> Fingerprint:
        extra = (self.pods_file,) if self.pods_file is not None else ()
        return config_fingerprint(self.directory, *extra)

    def status(self, version: int) -> ConfigStatus:
        """Where this source stands, for ``nodeagent ctl status``."""
        return ConfigStatus(
            version=version,
            loaded_at=self.loaded_at,
            sources=self.current.snapshot.sources if self.current else (),
            last_error=self.last_error,
            last_error_at=self.last_error_at,
            warnings=self.current.warnings if self.current else (),
            source="files",
        )

    def load_once(self) -> LoadedConfig:
        """Load now (raises on a bad config); used at start, where a bad config is fatal."""
        self._print = self._fingerprint()
        runtimes = load_runtimes(self.pods_file) if self.pods_file else {}
        found = read_directory(self.directory)
        loaded = assemble(
            found.pairs,
            found.errors,
            sources=found.sources,
            runtimes=runtimes,
            version=self.version + 1,
            root_namespace=self.root_namespace,
            warnings=found.warnings,
        )
        self._collected = found
        self.version += 1
        before = set(self.current.warnings) if self.current else set()
        for warning in loaded.warnings:
            if warning not in before:
                log.warning("config: %s", warning)
        self.current = loaded
        self.loaded_at = time.time()
        self.last_error = ""
        return loaded

    def _try_reload(self) -> LoadedConfig | None:
        try:
            return self.load_once()
        except (ConfigErrors, ConfigError) as e:
            self.last_error = str(e)
        except Exception as e:  # a bug of ours: still never the end of the watcher
            log.exception("config not loaded")
            self.last_error = f"{self.directory}: cannot load: {type(e).__name__}: {e}"[:2000]
        self.last_error_at = time.time()
        log.error("config rejected, still serving version %d: %s", self.version, self.last_error)
        if self.on_reject is not None:
            self.on_reject(self.last_error)
        return self._runtimes_only()

    def _runtimes_only(self) -> LoadedConfig | None:
        """The last good objects with the pod runtime file as it is now, when that
        changed: a bad edit of the directory must not stop pods from being captured
        (the CNI plugin's ADD waits for it) or released."""
        current, found = self.current, self._collected
        if current is None or found is None or self.pods_file is None:
            return None
        try:
            runtimes = load_runtimes(self.pods_file)
        except ConfigError as e:
            log.error("pod runtime file rejected: %s", e)
            return None
        if runtimes == dict(current.snapshot.runtimes):
            return None
        try:
            loaded = assemble(
                found.pairs,
                sources=found.sources,
                runtimes=runtimes,
                version=self.version + 1,
                root_namespace=self.root_namespace,
                warnings=found.warnings,
            )
        except (ConfigErrors, ConfigError) as e:
            log.error("pod runtimes not applied to version %d: %s", self.version, e)
            return None
        self.version += 1
        self.current = loaded
        self.loaded_at = time.time()
        log.info("config version %d: version %d's objects, new pod runtimes", self.version,
                 self.version - 1)  # fmt: skip
        return loaded

    async def reload_now(self) -> LoadedConfig | None:
        """Read the sources now instead of at the next poll, and publish what loads
        (``on_update``) before returning it; None when it was rejected (the last good
        snapshot keeps serving). The agent calls it after recording a pod the CNI plugin
        handed over, so that the pod is captured before its ADD is answered."""
        async with self._lock:
            loop = asyncio.get_running_loop()
            fp = await loop.run_in_executor(None, self._fingerprint)
            return await self._reload(fp)

    async def _reload(self, fp: Fingerprint) -> LoadedConfig | None:
        loaded = await asyncio.get_running_loop().run_in_executor(None, self._try_reload)
        if loaded is None:
            self._print = fp
            return None
        log.info(
            "config version %d loaded (%d files)",
            loaded.snapshot.version,
            len(loaded.snapshot.sources),
        )
        self.on_update(loaded)
        return loaded

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(self.interval)
            try:
                async with self._lock:  # not beside a reload_now
                    fp = await loop.run_in_executor(None, self._fingerprint)
                    if fp != self._print:
                        await self._reload(fp)
            except Exception:  # e.g. on_update failing: the next edit is still read
                log.exception("config watcher: a reload failed; watching on")
