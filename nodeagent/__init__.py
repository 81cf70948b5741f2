"""nodeagent: a sidecar-less service mesh for Linux nodes (one shared proxy per node)."""

from nodeagent import native

__version__ = "0.1.0"

native.install()
