"""The admin layer: the node agent socket, its client and CLI, and the metrics/readiness HTTP.

It reads the agent only through ``nodeagent.model.status.AgentView``, and changes it only
through ``PodHandoff`` (the pods the CNI plugin hands over). Modules:

- ``server``: the gRPC service ``nodeagent.v1.NodeAgent`` on a UNIX socket (grpc.aio);
- ``client``: a small synchronous client that returns plain JSON-able dicts;
- ``ctl``: the ``nodeagent ctl`` command and its pure table formatting;
- ``http``: Prometheus metrics (15020) and readiness (15021) over minimal HTTP/1.1.

Import the submodules directly: this package itself holds only the socket path convention
and ``capture_state``, and imports nothing heavy, so the CLI does not load gRPC for other
commands.
"""

from typing import Any

DEFAULT_SOCKET_DIR = "/run/nodeagent"
"""Where each agent's socket lives, as ``<dir>/<node>.sock``."""


def default_socket_path(node: str, socket_dir: str = DEFAULT_SOCKET_DIR) -> str:
    """The node agent socket path of the agent of ``node``."""
    return f"{socket_dir.rstrip('/')}/{node}.sock"


def capture_state(local_pod: dict[str, Any] | None) -> str:
    """The capture state of a local pod from ``AgentView.local_pods()``: ``ready`` or why not.

    Reads the ``capture`` key (``capture_state`` and ``state`` are accepted too).
    """
    if local_pod is None:
        return "pending: no runtime (IP/netns) known for this pod yet"
    for key in ("capture", "capture_state", "state"):
        value = local_pod.get(key)
        if value is not None and value != "":
            return str(value)
    return "unknown"


__all__ = ["DEFAULT_SOCKET_DIR", "capture_state", "default_socket_path"]
