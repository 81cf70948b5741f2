"""Mesh config for the unit tests: YAML objects written short, loaded by the real loader.

``object_yaml`` writes one object as a YAML document (``---`` first, its spec indented);
``pod_yaml`` and ``service_yaml`` write the two Kubernetes kinds most tests need, and
``REVIEWS`` is the base mesh many tests route over: Service ``reviews`` (port ``http``
9080) selecting Pods ``reviews-v1`` and ``reviews-v2``. ``MeshFiles`` writes YAML text
into a directory and loads it with ``control.files.load_directory``, as the agent does,
into a ``MeshSnapshot`` or the ``ConfigError`` list it raised. ``conftest.py``'s ``mesh``
fixture gives each test one in its own ``tmp_path``.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from nodeagent.control.files import load_directory
from nodeagent.errors import ConfigError, ConfigErrors
from nodeagent.model.snapshot import MeshSnapshot

MESH_FILE = "mesh.yaml"


def object_yaml(
    api_version: str,
    kind: str,
    name: str,
    namespace: str = "default",
    spec: str = "",
    labels: dict[str, str] | None = None,
) -> str:
    """One object as a YAML document: ``spec`` is written unindented, as under ``spec:``."""
    meta = f"name: {name}, namespace: {namespace}"
    if labels:
        meta += ", labels: {" + ", ".join(f"{k}: {v}" for k, v in labels.items()) + "}"
    body = "".join(f"  {line}\n" for line in spec.strip("\n").splitlines())
    return f"---\napiVersion: {api_version}\nkind: {kind}\nmetadata: {{{meta}}}\nspec:\n{body}"


def pod_yaml(name: str, namespace: str = "default", **labels: str) -> str:
    """A Pod on node ``n1`` with one container, labelled ``labels``."""
    spec = "{nodeName: n1, containers: [{name: c, command: [x]}]}"
    return object_yaml("v1", "Pod", name, namespace, spec, labels)


def service_yaml(name: str, ports: str, namespace: str = "default", **selector: str) -> str:
    """A Service selecting ``selector``; ``ports`` is its YAML list of ports."""
    labels = ", ".join(f"{k}: {v}" for k, v in selector.items())
    return object_yaml("v1", "Service", name, namespace, f"selector: {{{labels}}}\nports: {ports}")


REVIEWS = (
    service_yaml("reviews", "[{name: http, port: 9080}]", app="reviews")
    + pod_yaml("reviews-v1", app="reviews", version="v1")
    + pod_yaml("reviews-v2", app="reviews", version="v2")
)
"""Service reviews (http 9080) and its Pods reviews-v1 and reviews-v2 (label ``version``)."""


class MeshFiles:
    """A config directory: YAML text in, what the agent's loader makes of it out."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.path = directory / MESH_FILE
        """The file ``load`` and ``errors`` write."""

    def load(self, *texts: str) -> MeshSnapshot:
        """The snapshot of the directory holding ``texts`` (joined) in ``mesh.yaml``."""
        self.path.write_text("".join(texts))
        return load_directory(self.directory).snapshot

    def errors(self, *texts: str) -> list[ConfigError]:
        """The errors of loading ``texts`` (joined) in ``mesh.yaml``; fails if it loads."""
        self.path.write_text("".join(texts))
        with pytest.raises(ConfigErrors) as info:
            load_directory(self.directory)
        return info.value.errors

    def assert_named(self, text: str, obj: str, field: str, reason: str) -> None:
        """Loading ``text`` fails with an error in ``mesh.yaml`` naming ``obj``, ``field``
        and ``reason``."""
        errors = self.errors(text)
        hits = [e for e in errors if e.obj == obj and e.field == field and reason in e.reason]
        assert hits, "\n".join(str(e) for e in errors)
        assert hits[0].source.startswith(str(self.path))
        assert field in str(hits[0]) and obj in str(hits[0])
