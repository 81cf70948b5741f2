"""What every config kind reads the same way: an object's namespace and name, a policy's
workload selector, ports and durations, each problem added with its field path.

Shared by the kind modules (``objects``, ``security``, ``traffic``, ``authn``,
``ratelimit``), so that they never import each other; it imports none of them.
"""

from __future__ import annotations

import re
from typing import Any

from nodeagent.control.schema import Problems
from nodeagent.model.objects import Labels

DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
"""A namespace, a Service or a subset name."""
DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")
"""Any other object's name."""


def read_meta(doc: dict[str, Any], problems: Problems) -> tuple[str, str]:
    """``(namespace, name)`` of a checked document (namespace ``default`` when absent)."""
    meta = doc.get("metadata") or {}
    name = meta.get("name", "")
    ns = meta.get("namespace", "default")
    if isinstance(name, str) and name and not DNS_SUBDOMAIN.match(name):
        problems.add("metadata.name", f"{name!r} is not a valid name (lowercase a-z, 0-9, -, .)")
    if isinstance(ns, str) and not DNS_LABEL.match(ns):
        problems.add("metadata.namespace", f"{ns!r} is not a valid namespace name")
    return str(ns), str(name)


def workload_selector(spec: dict[str, Any], problems: Problems) -> Labels | None:
    """``spec.selector.matchLabels`` of a policy: None (no selector: the whole namespace,
    or the mesh in the root namespace); an empty one is an error (it selects nothing)."""
    if "selector" not in spec:
        return None
    selector = Labels.of((spec.get("selector") or {}).get("matchLabels"))
    if not selector:
        problems.add("spec.selector.matchLabels", "an empty selector selects nothing")
    return selector


def check_port(value: Any, path: str, problems: Problems) -> None:
    """A problem at ``path`` when ``value`` is an integer outside 1-65535."""
    if isinstance(value, int) and not 1 <= value <= 65535:
        problems.add(path, f"port {value} is out of range 1-65535")


def read_ports(raw: dict[str, Any], key: str, path: str, problems: Problems) -> tuple[int, ...]:
    """The port numbers of the list ``raw[key]`` (digit strings accepted), bad ones left out."""
    out: list[int] = []
    for i, v in enumerate(raw.get(key) or ()):
        if isinstance(v, str) and v.isdigit():
            v = int(v)
        if not isinstance(v, int) or not 1 <= v <= 65535:
            problems.add(f"{path}.{key}[{i}]", f"{v!r} is not a port number (1-65535)")
            continue
        out.append(v)
    return tuple(out)


_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(h|ms|us|µs|ns|m|s)")
_UNIT_SECONDS = {
    "h": 3600.0,
    "m": 60.0,
    "s": 1.0,
    "ms": 1e-3,
    "us": 1e-6,
    "µs": 1e-6,
    "ns": 1e-9,
}


def parse_duration(text: str) -> float:
    """A Go/protobuf duration (``7s``, ``500ms``, ``1m30s``, ``1.5s``) in seconds;
    raises ValueError."""
    pos, total = 0, 0.0
    while pos < len(text):
        m = _DURATION_PART.match(text, pos)
        if m is None:
            break
        total += float(m.group(1)) * _UNIT_SECONDS[m.group(2)]
        pos = m.end()
    if not text or pos != len(text):
        raise ValueError(f"{text!r} is not a duration (like 7s, 500ms, 1m30s)")
    return total


def read_duration(value: object, path: str, problems: Problems) -> float | None:
    """``value`` as seconds (None when absent or wrong, a problem added when wrong)."""
    if value is None:
        return None
    try:
        return parse_duration(str(value))
    except ValueError as e:
        problems.add(path, str(e))
        return None
