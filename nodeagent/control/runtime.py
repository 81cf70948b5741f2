"""The pod runtime file: where each pod lives (IP, netns, cgroup), as a CNI plugin tells
the agent. The sandbox writes it; so does the agent itself when the CNI plugin hands it a
pod (``set_runtime``); the agent reads and watches it.

Format (JSON)::

    {"pods": {"default/productpage-v1": {"ip": "10.244.1.2", "node": "node1",
              "netns": "/var/run/netns/na-p-default-productpage-v1",
              "cgroup": "/sys/fs/cgroup/unified/nodeagent/pods/node1/default_productpage-v1"}}}
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from nodeagent.errors import ConfigError
from nodeagent.model.objects import PodRuntime


def load_runtimes(path: str | Path) -> dict[str, PodRuntime]:
    """Read the pod runtime file; a missing file means no pods are placed yet."""
    p = Path(path)
    try:
        raw = json.loads(p.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot read pod runtime file: {e}", source=str(p)) from e
    pods = raw.get("pods", {}) if isinstance(raw, dict) else None
    if not isinstance(pods, dict):
        raise ConfigError("expected an object with key 'pods'", source=str(p))
    out: dict[str, PodRuntime] = {}
    for key, v in pods.items():
        try:
            out[key] = PodRuntime(
                key=key,
                ip=str(v["ip"]),
                node=str(v["node"]),
                netns=str(v["netns"]),
                cgroup=str(v.get("cgroup", "")),
            )
        except (KeyError, TypeError) as e:
            raise ConfigError(f"bad entry: missing {e}", source=str(p), obj=key) from e
    return out


def write_runtimes(path: str | Path, runtimes: dict[str, PodRuntime]) -> None:
    """Write the file atomically (temp file + rename), so readers never see half of it."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    data = {
        "pods": {
            k: {"ip": r.ip, "node": r.node, "netns": r.netns, "cgroup": r.cgroup}
            for k, r in sorted(runtimes.items())
        }
    }
    fd, tmp = tempfile.mkstemp(dir=p.parent, prefix=".pods-")
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, p)


def set_runtime(path: str | Path, key: str, runtime: PodRuntime | None) -> PodRuntime | None:
    """Record (or, with None, drop) one pod's entry; returns the entry it replaced.

    One writer at a time is the caller's business (the agent serializes its CNI calls).
    """
    runtimes = load_runtimes(path)
    previous = runtimes.pop(key, None)
    if runtime is not None:
        runtimes[key] = runtime
    if runtime != previous:
        write_runtimes(path, runtimes)
    return previous
