"""``nodeagent config check --kubeconfig FILE``: what the agent would load from a
cluster's API server, every problem listed.

Each kind is listed once, as ``KubeSource`` lists it at start, into a ``Collected`` that
``control.check`` judges as it judges a directory: an object the agent would leave out
(malformed, or rejected by a check across objects) is an error; a kind the server does
not serve, or an object the mesh skips, is a warning.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from nodeagent.control.check import CheckReport, check
from nodeagent.control.files import Collected
from nodeagent.control.kube import KubeSource
from nodeagent.control.kubeclient import KubeClient, credentials
from nodeagent.errors import ConfigError


async def collect_cluster(client: KubeClient) -> Collected:
    """Every kind listed once through ``client`` (``KubeStartError`` when a list fails)."""
    source = KubeSource(client, node="", pods_file=None, on_update=lambda _l: None)
    await source.list_all()
    errors: list[ConfigError] = []
    warnings: list[str] = []
    for w in source.watches:
        for entry in w.items.values():
            if entry.errors:
                errors.extend(entry.errors)
            elif entry.warning:
                warnings.append(entry.warning)
        if not w.served:
            warnings.extend(w.warnings())
    return Collected(
        pairs=tuple(source.collect()),
        errors=tuple(errors),
        warnings=tuple(warnings),
        sources=(client.server,),
    )


def check_cluster(kubeconfig: Path | None) -> CheckReport:
    """The verdict on what the API server ``kubeconfig`` names serves (None: in-cluster
    credentials); ``ValueError`` for credentials that cannot be used, ``KubeStartError``
    when a list fails."""
    config = credentials(kubeconfig)

    async def run() -> Collected:
        client = KubeClient(config)
        try:
            return await collect_cluster(client)
        finally:
            await client.close()

    found = asyncio.run(run())
    return check(found, f"the API server {found.sources[0]}")
