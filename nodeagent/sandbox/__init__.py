"""The local multi-node playground and the end-to-end harness: ``nodeagent sandbox``.

Network namespaces on one Linux box play nodes and pods (joined by veth pairs and bridges),
each pod in its own cgroup, one node agent per node. ``topology`` plans names and addresses
(pure), ``netlink``/``cgroups``/``processes`` do the plumbing, ``ca``/``agents``/``pods``
start what runs in it, ``state`` keeps its record and lock, ``manager.Sandbox`` runs it in
order, ``cleanup`` removes it, ``cli`` is the command line.

The names below are imported on first use, so that ``nodeagent`` commands that only build
the argument parser do not pay for importing pyroute2.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from nodeagent.sandbox.cleanup import leftovers, teardown
    from nodeagent.sandbox.manager import NotUp, Sandbox, SandboxAlreadyUp

__all__ = ["NotUp", "Sandbox", "SandboxAlreadyUp", "leftovers", "teardown"]
_HOME = {
    "NotUp": "manager",
    "Sandbox": "manager",
    "SandboxAlreadyUp": "manager",
    "leftovers": "cleanup",
    "teardown": "cleanup",
}
"""The module that defines each name of ``__all__``."""


def __getattr__(name: str) -> object:
    home = _HOME.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{home}"), name)
