"""The local multi-node playground and the end-to-end harness: ``nodeagent sandbox``.

Network namespaces on one Linux box play nodes and pods (joined by veth pairs and bridges),
each pod in its own cgroup, one node agent per node. ``topology`` plans names and addresses
(pure), ``netlink``/``cgroups``/``processes`` do the plumbing, ``manager.Sandbox`` runs it,
``cli`` is the command line.

The names below are imported on first use, so that ``nodeagent`` commands that only build
the argument parser do not pay for importing pyroute2.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from nodeagent.sandbox.manager import NotUp, Sandbox, SandboxAlreadyUp, leftovers, teardown

__all__ = ["NotUp", "Sandbox", "SandboxAlreadyUp", "leftovers", "teardown"]


def __getattr__(name: str) -> object:
    if name in __all__:
        from nodeagent.sandbox import manager

        return getattr(manager, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
