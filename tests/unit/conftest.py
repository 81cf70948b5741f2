"""Fixtures of the unit tests: ``mesh``, a config directory of its own for each test,
loaded through the real config loader (see ``meshyaml``)."""

from __future__ import annotations

from pathlib import Path

import pytest
from meshyaml import MeshFiles


@pytest.fixture
def mesh(tmp_path: Path) -> MeshFiles:
    return MeshFiles(tmp_path)
