"""The test tree itself: pytest imports test modules by basename (no packages under
tests/), so two test files with one name stop the whole suite's collection."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

TESTS = Path(__file__).resolve().parent.parent


def test_no_two_test_modules_share_a_basename() -> None:
    seen: dict[str, list[str]] = defaultdict(list)
    for f in TESTS.rglob("*.py"):
        if f.name != "conftest.py" and "__pycache__" not in f.parts:
            seen[f.name].append(str(f.relative_to(TESTS)))
    clashes = {name: paths for name, paths in seen.items() if len(paths) > 1}
    assert clashes == {}
