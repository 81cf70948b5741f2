"""This checkout's code in a fresh interpreter: the environment for a test that runs
``python -m nodeagent`` or a scenario that must not share the test run's process (its
threads, descriptors and imports)."""

from __future__ import annotations

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def python_env() -> dict[str, str]:
    """The test run's environment with this checkout first on ``PYTHONPATH``."""
    path = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    return dict(os.environ, PYTHONPATH=path)
