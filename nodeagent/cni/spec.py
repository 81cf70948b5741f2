"""The CNI protocol, as a plugin speaks it (containernetworking/cni SPEC.md, 1.0.0; configs
of 0.3.0, 0.3.1 and 0.4.0 accepted): the environment a runtime sets, the network
config on stdin, the results and error objects on stdout. Pure: no I/O here.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

PLUGIN_TYPE = "nodeagent-cni"
SUPPORTED_VERSIONS = ("0.3.0", "0.3.1", "0.4.0", "1.0.0")
"""The spec versions whose configs and results this plugin speaks (no 0.1/0.2 results)."""
LATEST = SUPPORTED_VERSIONS[-1]
COMMANDS = ("ADD", "DEL", "CHECK", "VERSION", "STATUS", "GC")

DEFAULT_SOCKET = "/run/nodeagent/agent.sock"
DEFAULT_TIMEOUT = 10.0
LOG_LEVELS = ("debug", "info", "warning", "error")

# the spec's well-known error codes (1-99), and ours (100+)
INCOMPATIBLE_VERSION = 1
UNSUPPORTED_FIELD = 2
UNKNOWN_CONTAINER = 3
INVALID_ENV = 4
IO_FAILURE = 5
DECODE_FAILURE = 6
INVALID_CONFIG = 7
TRY_AGAIN_LATER = 11
NOT_AVAILABLE = 50
"""STATUS: the plugin cannot serve ADD now."""
NOT_CAPTURED = 100
"""The agent answered, but the pod is not (or could not be) captured."""


class CniError(Exception):
    """A failure the plugin reports as the spec's error object, exiting non-zero."""

    def __init__(self, code: int, msg: str, details: str = "") -> None:
        super().__init__(msg)
        self.code = code
        self.msg = msg
        self.details = details

    def to_json(self, version: str) -> dict[str, Any]:
        out: dict[str, Any] = {"cniVersion": version, "code": self.code, "msg": self.msg}
        if self.details:
            out["details"] = self.details
        return out


@dataclass(frozen=True)
class Env:
    """The ``CNI_*`` variables of one call."""

    command: str
    container_id: str = ""
    netns: str = ""
    ifname: str = ""
    args: Mapping[str, str] = field(default_factory=dict)
    """``CNI_ARGS`` as KEY=VALUE pairs (Kubernetes passes K8S_POD_NAMESPACE, …)."""
    path: tuple[str, ...] = ()

    @property
    def pod(self) -> tuple[str, str, str] | None:
        """(namespace, name, uid) of the Kubernetes pod, None when the runtime passed none."""
        ns, name = self.args.get("K8S_POD_NAMESPACE", ""), self.args.get("K8S_POD_NAME", "")
        if not ns or not name:
            return None
        return ns, name, self.args.get("K8S_POD_UID", "")


def parse_args(text: str) -> dict[str, str]:
    """``CNI_ARGS`` (``K=V;K=V``); raises ``CniError`` on a pair without ``=``."""
    out: dict[str, str] = {}
    for pair in text.split(";"):
        if not pair.strip():
            continue
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise CniError(INVALID_ENV, f"CNI_ARGS: {pair!r} is not KEY=VALUE")
        out[key.strip()] = value.strip()
    return out


def parse_env(environ: Mapping[str, str]) -> Env:
    """The call's environment; ``CNI_COMMAND`` always, ``CNI_CONTAINERID``, ``CNI_IFNAME``
    for ADD/DEL/CHECK and ``CNI_NETNS`` for ADD/CHECK, as the spec requires."""
    command = environ.get("CNI_COMMAND", "")
    if not command:
        raise CniError(
            INVALID_ENV,
            "CNI_COMMAND is not set: nodeagent-cni is run by a container runtime (see docs/cni.md)",
        )
    if command not in COMMANDS:
        raise CniError(INVALID_ENV, f"CNI_COMMAND {command!r} is not one of {', '.join(COMMANDS)}")
    need: tuple[str, ...] = ()
    if command in ("ADD", "CHECK"):
        need = ("CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME")
    elif command == "DEL":
        need = ("CNI_CONTAINERID", "CNI_IFNAME")
    missing = [k for k in need if not environ.get(k)]
    if missing:
        raise CniError(INVALID_ENV, f"{command} needs {', '.join(missing)} in the environment")
    return Env(
        command=command,
        container_id=environ.get("CNI_CONTAINERID", ""),
        netns=environ.get("CNI_NETNS", ""),
        ifname=environ.get("CNI_IFNAME", ""),
        args=parse_args(environ.get("CNI_ARGS", "")),
        path=tuple(p for p in environ.get("CNI_PATH", "").split(":") if p),
    )


@dataclass(frozen=True)
class NetConf:
    """The network config a runtime passes on stdin, with this plugin's own keys."""

    cni_version: str
    name: str
    socket: str = DEFAULT_SOCKET
    """The node agent socket."""
    timeout: float = DEFAULT_TIMEOUT
    """How long ADD waits for the agent to capture the pod."""
    log_level: str = "warning"
    cgroup_root: str = ""
    """Where to look for the pod's cgroup; empty: the cgroup v2 mount."""
    prev_result: Mapping[str, Any] | None = None


def version_of(data: bytes) -> str:
    """The ``cniVersion`` stdin names, for an error object (``LATEST`` when unreadable)."""
    try:
        doc = json.loads(data or b"{}")
    except ValueError:
        return LATEST
    version = doc.get("cniVersion") if isinstance(doc, dict) else None
    return version if isinstance(version, str) and version in SUPPORTED_VERSIONS else LATEST


def parse_netconf(data: bytes) -> NetConf:
    """Stdin's network config; raises ``CniError`` naming the bad key."""
    try:
        doc = json.loads(data)
    except ValueError as e:
        raise CniError(DECODE_FAILURE, f"the network config on stdin is not JSON: {e}") from e
    if not isinstance(doc, dict):
        raise CniError(DECODE_FAILURE, "the network config on stdin is not a JSON object")
    version = doc.get("cniVersion")
    if not isinstance(version, str) or not version:
        raise CniError(INVALID_CONFIG, "the network config has no cniVersion")
    if version not in SUPPORTED_VERSIONS:
        raise CniError(
            INCOMPATIBLE_VERSION,
            f"cniVersion {version} is not supported by nodeagent-cni",
            f"supported: {', '.join(SUPPORTED_VERSIONS)}",
        )

    def get(key: str, kind: type | tuple[type, ...], default: Any) -> Any:
        value = doc.get(key, default)
        if not isinstance(value, kind) or isinstance(value, bool):
            raise CniError(
                INVALID_CONFIG, f"the network config's {key!r} has the wrong type: {value!r}"
            )
        return value

    timeout = float(get("timeout", (int, float), DEFAULT_TIMEOUT))
    if timeout <= 0:
        raise CniError(INVALID_CONFIG, f"the network config's 'timeout' must be > 0: {timeout:g}")
    level = str(get("log_level", str, "warning")).lower()
    if level not in LOG_LEVELS:
        raise CniError(
            INVALID_CONFIG,
            f"the network config's 'log_level' {level!r} is not one of {', '.join(LOG_LEVELS)}",
        )
    prev = doc.get("prevResult")
    if prev is not None and not isinstance(prev, dict):
        raise CniError(INVALID_CONFIG, "the network config's 'prevResult' is not an object")
    return NetConf(
        cni_version=version,
        name=str(get("name", str, "")),
        socket=str(get("socket", str, DEFAULT_SOCKET)) or DEFAULT_SOCKET,
        timeout=timeout,
        log_level=level,
        cgroup_root=str(get("cgroup_root", str, "")),
        prev_result=prev,
    )


def version_result(conf_version: str = "") -> dict[str, Any]:
    """VERSION's answer: the versions this plugin supports."""
    version = conf_version if conf_version in SUPPORTED_VERSIONS else LATEST
    return {"cniVersion": version, "supportedVersions": list(SUPPORTED_VERSIONS)}


def passed_on(conf: NetConf) -> dict[str, Any]:
    """ADD's result: the chain's ``prevResult`` unchanged, in the config's version (the
    runtime hands it over already in that version)."""
    result = dict(conf.prev_result or {})
    result["cniVersion"] = conf.cni_version
    return result


def pod_ips(prev_result: Mapping[str, Any] | None, ifname: str = "") -> tuple[str, ...]:
    """The addresses of ``prevResult`` (``ips[].address``, without the prefix length):
    those on the container's interface ``ifname`` first, IPv4 before IPv6."""
    if not prev_result:
        return ()
    interfaces = prev_result.get("interfaces")
    names: list[tuple[str, str]] = []
    if isinstance(interfaces, list):
        for itf in interfaces:
            if isinstance(itf, dict):
                names.append((str(itf.get("name", "")), str(itf.get("sandbox", ""))))
    found: list[tuple[int, int, str]] = []
    ips = prev_result.get("ips")
    for entry in ips if isinstance(ips, list) else ():
        if not isinstance(entry, dict) or not isinstance(entry.get("address"), str):
            continue
        addr = entry["address"].split("/")[0]
        index = entry.get("interface")
        on_pod = 1
        if isinstance(index, int) and 0 <= index < len(names):
            name, sandbox = names[index]
            on_pod = 0 if (name == ifname or not ifname) and sandbox else 1
        found.append((on_pod, 1 if ":" in addr else 0, addr))
    return tuple(addr for *_, addr in sorted(found, key=lambda f: (f[0], f[1])))
