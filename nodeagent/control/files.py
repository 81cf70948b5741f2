"""File-mode config source: a directory of Kubernetes/Istio YAML files.

``load_directory`` parses and validates every object (each problem names the file, the
object and the field path) and builds one ``MeshSnapshot``. ``ConfigWatcher`` polls the
directory (and the pod runtime file) and publishes a new snapshot after each good edit;
a bad edit keeps the last good snapshot and records the error.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import yaml

from nodeagent.control.registry import find_kind, supported_kinds
from nodeagent.control.runtime import load_runtimes
from nodeagent.control.schema import validate
from nodeagent.errors import ConfigError, ConfigErrors
from nodeagent.model.authn import RequestAuthentication
from nodeagent.model.objects import Node, Pod, PodRuntime, Service
from nodeagent.model.ratelimit import LocalRateLimit
from nodeagent.model.security import (
    DEFAULT_ROOT_NAMESPACE,
    AuthorizationPolicy,
    PeerAuthentication,
)
from nodeagent.model.snapshot import MeshSnapshot
from nodeagent.model.status import ConfigStatus
from nodeagent.model.traffic import Destination, DestinationRule, VirtualService

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
    if not directory.is_dir():
        raise ConfigErrors([ConfigError("not a directory", source=str(directory))])
    return sorted(
        p
        for p in directory.rglob("*")
        if p.suffix in YAML_SUFFIXES and p.is_file() and not p.name.startswith(".")
    )


def _obj_name(doc: dict[str, Any]) -> str:
    kind = doc.get("kind", "?")
    meta = doc.get("metadata") if isinstance(doc.get("metadata"), dict) else {}
    assert isinstance(meta, dict)
    ns = meta.get("namespace", "default")
    return f"{kind} {ns}/{meta.get('name', '?')}"


def parse_documents(
    text: str, source: str
) -> tuple[list[tuple[dict[str, Any], object]], list[ConfigError]]:
    """Parse one file's YAML documents into ``(raw, model object)`` pairs."""
    errors: list[ConfigError] = []
    out: list[tuple[dict[str, Any], object]] = []
    try:
        docs = list(yaml.safe_load_all(text))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = getattr(e, "problem", None) or str(e)
        return [], [ConfigError(f"{where}invalid YAML: {problem}", source=source)]
    for index, doc in enumerate(docs):
        if doc is None:
            continue
        here = f"{source} (document {index + 1})" if len(docs) > 1 else source
        if not isinstance(doc, dict):
            errors.append(ConfigError("expected a mapping with apiVersion and kind", source=here))
            continue
        api, kind_name = doc.get("apiVersion"), doc.get("kind")
        if not isinstance(api, str) or not isinstance(kind_name, str):
            errors.append(ConfigError("apiVersion and kind are required strings", source=here))
            continue
        kind = find_kind(api, kind_name)
        if kind is None:
            errors.append(
                ConfigError(
                    f"unknown kind {kind_name!r} (apiVersion {api!r}); "
                    f"supported: {supported_kinds()}",
                    source=here,
                    obj=_obj_name(doc),
                    field="kind",
                )
            )
            continue
        obj, problems = validate(doc, kind, source)
        for path, msg in problems.items:
            errors.append(ConfigError(msg, source=here, obj=_obj_name(doc), field=path))
        if obj is not None and not problems.items:
            out.append(({**doc, "_source": source}, obj))
    return out, errors


class _Named(Protocol):
    @property
    def key(self) -> str: ...

    @property
    def source(self) -> str: ...


def check_duplicate_names(by_kind: Mapping[str, Sequence[_Named]]) -> list[ConfigError]:
    """One object per (kind, namespace/name); a repeat names the file of the first."""
    errors: list[ConfigError] = []
    for kind, items in by_kind.items():
        seen: dict[str, str] = {}
        for o in items:
            if o.key in seen:
                errors.append(
                    ConfigError(
                        f"duplicate name: also defined in {seen[o.key]}",
                        source=o.source,
                        obj=f"{kind} {o.key}",
                        field="metadata.name",
                    )
                )
            else:
                seen[o.key] = o.source
    return errors


def cross_check(pods: list[Pod], services: list[Service]) -> list[ConfigError]:
    """Checks across Pods and Services: clusterIP clashes, selectors matching nothing,
    pod IP clashes."""
    errors: list[ConfigError] = []
    ips: dict[str, Service] = {}
    for s in services:
        if s.cluster_ip is None:
            continue
        other = ips.get(s.cluster_ip)
        if other is not None and other.key != s.key:
            errors.append(
                ConfigError(
                    f"clusterIP {s.cluster_ip} is already used by Service {other.key} "
                    f"({other.source})",
                    source=s.source,
                    obj=f"Service {s.key}",
                    field="spec.clusterIP",
                )
            )
        ips[s.cluster_ip] = s
    for s in services:
        if not s.selector:
            continue
        if not any(p.namespace == s.namespace and p.labels.matches(s.selector) for p in pods):
            errors.append(
                ConfigError(
                    f"selector {s.selector} matches no Pod in namespace {s.namespace}",
                    source=s.source,
                    obj=f"Service {s.key}",
                    field="spec.selector",
                )
            )
    pod_ips: dict[str, Pod] = {}
    for p in pods:
        if p.pod_ip is None:
            continue
        if p.pod_ip in pod_ips:
            errors.append(
                ConfigError(
                    f"podIP {p.pod_ip} is also Pod {pod_ips[p.pod_ip].key}",
                    source=p.source,
                    obj=f"Pod {p.key}",
                    field="status.podIP",
                )
            )
        pod_ips[p.pod_ip] = p
    return errors


def check_peer_authentications(items: list[PeerAuthentication]) -> list[ConfigError]:
    """Two namespace-wide policies in one namespace (Istio would silently pick the
    oldest; we say so instead)."""
    errors: list[ConfigError] = []
    seen: set[str] = set()
    wide: dict[str, PeerAuthentication] = {}
    for pa in items:
        if pa.key in seen:  # a duplicate: reported by check_duplicate_names
            continue
        seen.add(pa.key)
        obj = f"PeerAuthentication {pa.key}"
        if pa.selector is None:
            other = wide.get(pa.namespace)
            if other is not None:
                errors.append(
                    ConfigError(
                        f"namespace {pa.namespace} already has a namespace-wide "
                        f"PeerAuthentication {other.key} ({other.source}): merge them",
                        source=pa.source,
                        obj=obj,
                        field="spec.selector",
                    )
                )
            wide[pa.namespace] = pa
    return errors


def check_traffic(
    virtual_services: list[VirtualService],
    destination_rules: list[DestinationRule],
    pods: list[Pod],
    services: list[Service],
) -> list[ConfigError]:
    """VirtualService/DestinationRule checks across objects: two rules for one host, a
    route naming a subset no DestinationRule defines or a port its Service lacks, a
    subset selecting no Pod."""
    errors: list[ConfigError] = []
    vs_hosts: dict[str, VirtualService] = {}
    for vs in virtual_services:
        for i, host in enumerate(vs.hosts):
            other = vs_hosts.get(host)
            if other is not None and other.key != vs.key:
                errors.append(
                    ConfigError(
                        f"host {host} is also routed by VirtualService {other.key} "
                        f"({other.source}): merge them",
                        source=vs.source,
                        obj=f"VirtualService {vs.key}",
                        field=f"spec.hosts[{i}]",
                    )
                )
            vs_hosts.setdefault(host, vs)
    rules: dict[str, DestinationRule] = {}
    for dr in destination_rules:
        other_dr = rules.get(dr.host)
        if other_dr is not None and other_dr.key != dr.key:
            errors.append(
                ConfigError(
                    f"host {dr.host} already has DestinationRule {other_dr.key} "
                    f"({other_dr.source}): merge them",
                    source=dr.source,
                    obj=f"DestinationRule {dr.key}",
                    field="spec.host",
                )
            )
        rules.setdefault(dr.host, dr)

    by_fqdn = {s.hostnames()[-1]: s for s in services}

    def check_subset(vs: VirtualService, dest: Destination, path: str) -> None:
        svc = by_fqdn.get(dest.host)
        if svc is not None and dest.port is not None and svc.port(dest.port) is None:
            errors.append(
                ConfigError(
                    f"Service {svc.key} has no port {dest.port} "
                    f"(its ports: {', '.join(str(p.port) for p in svc.ports)})",
                    source=vs.source,
                    obj=f"VirtualService {vs.key}",
                    field=path.removesuffix(".subset") + ".port.number",
                )
            )
        if dest.subset is None:
            return
        dr = rules.get(dest.host)
        if dr is None:
            errors.append(
                ConfigError(
                    f"subset {dest.subset!r} of host {dest.host} is not defined: "
                    f"no DestinationRule for {dest.host}",
                    source=vs.source,
                    obj=f"VirtualService {vs.key}",
                    field=path,
                )
            )
        elif dr.subset(dest.subset) is None:
            known = ", ".join(s.name for s in dr.subsets) or "none"
            errors.append(
                ConfigError(
                    f"subset {dest.subset!r} is not defined by DestinationRule {dr.key} "
                    f"({dr.source}; its subsets: {known})",
                    source=vs.source,
                    obj=f"VirtualService {vs.key}",
                    field=path,
                )
            )

    for vs in virtual_services:
        for i, rule in enumerate(vs.http):
            for j, rd in enumerate(rule.routes):
                check_subset(vs, rd.destination, f"spec.http[{i}].route[{j}].destination.subset")
            if rule.mirror is not None:
                check_subset(vs, rule.mirror, f"spec.http[{i}].mirror.subset")
        for i, tcp in enumerate(vs.tcp):
            for j, rd in enumerate(tcp.routes):
                check_subset(vs, rd.destination, f"spec.tcp[{i}].route[{j}].destination.subset")

    for dr in destination_rules:
        svc = by_fqdn.get(dr.host)
        if svc is None or not svc.selector:
            continue
        backends = [
            p for p in pods if p.namespace == svc.namespace and p.labels.matches(svc.selector)
        ]
        for i, subset in enumerate(dr.subsets):
            if subset.labels and not any(p.labels.matches(subset.labels) for p in backends):
                errors.append(
                    ConfigError(
                        f"labels {subset.labels} select no Pod of Service {svc.key} "
                        f"(selector {svc.selector})",
                        source=dr.source,
                        obj=f"DestinationRule {dr.key}",
                        field=f"spec.subsets[{i}].labels",
                    )
                )
    return errors


def load_directory(
    directory: str | Path,
    *,
    runtimes: dict[str, PodRuntime] | None = None,
    version: int = 1,
    root_namespace: str = DEFAULT_ROOT_NAMESPACE,
) -> LoadedConfig:
    """Load and validate every YAML file under ``directory``; raise ``ConfigErrors``."""
    d = Path(directory)
    errors: list[ConfigError] = []
    pairs: list[tuple[dict[str, Any], object]] = []
    files = _files(d)
    for f in files:
        try:
            text = f.read_text()
        except (OSError, UnicodeDecodeError) as e:
            errors.append(ConfigError(f"cannot read: {e}", source=str(f)))
            continue
        found, errs = parse_documents(text, str(f))
        errors.extend(errs)
        pairs.extend(found)
    return assemble(
        pairs,
        errors,
        sources=tuple(str(f) for f in files),
        runtimes=runtimes,
        version=version,
        root_namespace=root_namespace,
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
    (files or the Kubernetes API): the checks across objects, then ``MeshSnapshot.build``.
    Raises ``ConfigErrors`` with ``errors`` and whatever the checks find."""
    errors = list(errors)
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
            }
        )
    )
    errors.extend(cross_check(pods, services))
    errors.extend(check_peer_authentications(peer_auths))
    errors.extend(check_traffic(virtual_services, destination_rules, pods, services))
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
    )
    return LoadedConfig(
        snapshot=snap, objects=tuple(raw for raw, _ in pairs), warnings=tuple(warnings)
    )


Fingerprint = tuple[tuple[str, int, int], ...]


def config_fingerprint(directory: Path, *extra: Path) -> Fingerprint:
    """(path, mtime, size) of the directory, every config file ``load_directory`` would
    read, and ``extra`` files: when it changes, the config may have changed."""
    try:
        paths = _files(directory)
    except ConfigErrors:
        paths = []
    out: list[tuple[str, int, int]] = []
    for p in [directory, *paths, *extra]:
        try:
            st = p.stat()
        except OSError:
            continue
        out.append((str(p), st.st_mtime_ns, st.st_size))
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
    _print: Fingerprint = field(default=())

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
        loaded = load_directory(
            self.directory,
            runtimes=runtimes,
            version=self.version + 1,
            root_namespace=self.root_namespace,
        )
        self.version += 1
        self.current = loaded
        self.loaded_at = time.time()
        self.last_error = ""
        return loaded

    def _try_reload(self) -> LoadedConfig | None:
        try:
            return self.load_once()
        except (ConfigErrors, ConfigError) as e:
            self.last_error = str(e)
            self.last_error_at = time.time()
            log.error("config rejected, still serving version %d: %s", self.version, e)
            return None

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(self.interval)
            fp = await loop.run_in_executor(None, self._fingerprint)
            if fp == self._print:
                continue
            loaded = await loop.run_in_executor(None, self._try_reload)
            if loaded is None:
                self._print = fp
                continue
            log.info(
                "config version %d loaded (%d files)",
                loaded.snapshot.version,
                len(loaded.snapshot.sources),
            )
            self.on_update(loaded)
