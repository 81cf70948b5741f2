"""nodeagent: a sidecar-less service mesh for Linux nodes (one shared proxy per node)."""

__version__ = "0.1.0"
