"""``nodeagent config check --kubeconfig FILE``: what the agent would load from a
cluster's API server, every problem listed.

Each kind is listed once, as ``KubeSource`` lists it at start; an object the agent
would leave out (malformed, or rejected by a check across objects) is an error, a kind
the server does not serve or the mesh skips is a warning.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from pathlib import Path

from nodeagent.control.files import assemble
from nodeagent.control.kube import KubeSource, KubeStartError
from nodeagent.control.kubeclient import KubeClient, credentials
from nodeagent.errors import ConfigErrors
from nodeagent.model.security import DEFAULT_ROOT_NAMESPACE


@dataclass(frozen=True)
class ClusterCheck:
    """What ``check_cluster`` found."""

    server: str
    objects: int
    errors: tuple[str, ...]
    warnings: tuple[str, ...]

    @property
    def loads(self) -> bool:
        """Every object would serve as written."""
        return not self.errors


async def check_client(
    client: KubeClient, root_namespace: str = DEFAULT_ROOT_NAMESPACE
) -> ClusterCheck:
    """List every kind once through ``client`` and check it all (``KubeStartError``
    when a list fails)."""
    source = KubeSource(client, node="", pods_file=None, on_update=lambda _l: None)
    await source.list_all()
    errors: list[str] = []
    warnings: list[str] = []
    for w in source.watches:
        for entry in w.items.values():
            if entry.errors:
                errors.extend(str(e) for e in entry.errors)
            elif entry.warning:
                warnings.append(entry.warning)
        if not w.served:
            warnings.extend(w.warnings())
    pairs = source.collect()
    try:
        assemble(pairs, sources=(client.server,), root_namespace=root_namespace)
    except ConfigErrors as e:
        errors.extend(str(err) for err in e.errors)
    return ClusterCheck(client.server, len(pairs), tuple(errors), tuple(warnings))


def check_cluster(
    kubeconfig: Path | None, root_namespace: str = DEFAULT_ROOT_NAMESPACE
) -> ClusterCheck:
    """``check_client`` on the cluster ``kubeconfig`` names (None: in-cluster
    credentials); ``ValueError`` for credentials that cannot be used, ``KubeStartError``
    when a list fails."""
    config = credentials(kubeconfig)

    async def run() -> ClusterCheck:
        client = KubeClient(config)
        try:
            return await check_client(client, root_namespace)
        finally:
            await client.close()

    return asyncio.run(run())


__all__ = ["ClusterCheck", "KubeStartError", "check_client", "check_cluster"]
