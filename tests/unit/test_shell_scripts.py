"""The project's shell scripts: what `bash -n` and our own past CI failures check.

Under ``set -o pipefail`` a pipeline whose reader stops early (``grep -q`` at its first
match, ``head``) fails with 141 when its writer is still writing: the VM tier failed so
once on a check that had passed (``echo "$rules" | grep -q ...``). Such checks read a
here-string instead."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent.parent
SCRIPTS = sorted(
    p
    for d in ("scripts", "vagrant", "deploy", ".ci", "bench")
    for p in (ROOT / d).rglob("*")
    if p.is_file() and (p.suffix == ".sh" or p.read_bytes()[:20].startswith(b"#!/usr/bin/env bash"))
)
EARLY_READER = re.compile(r"\|\s*(grep\s+(-\w*q\b|--quiet)|head\b)")


def test_scripts_are_found() -> None:
    names = {p.relative_to(ROOT).as_posix() for p in SCRIPTS}
    assert {"scripts/test.sh", "scripts/vm-test.sh", ".ci/run"} <= names


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_script_parses(script: Path) -> None:
    p = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_no_pipe_into_an_early_reader_under_pipefail(script: Path) -> None:
    text = script.read_text()
    if "pipefail" not in text:
        return
    bad = [
        f"{script.relative_to(ROOT)}:{n}: {line.strip()}"
        for n, line in enumerate(text.splitlines(), 1)
        if not line.lstrip().startswith("#") and EARLY_READER.search(line)
    ]
    assert bad == [], 'read a here-string (grep -q PAT <<<"$x") instead:\n' + "\n".join(bad)


def test_the_check_finds_what_failed_ci() -> None:
    assert EARLY_READER.search("""    echo "$rules" | grep -q -- '--path "/x"' &&""")
    assert EARLY_READER.search("""  echo "$body" | head -c 300; echo""")
    assert EARLY_READER.search("""  x | grep -Eq 'y'""")
    assert not EARLY_READER.search("""  grep -q -- '--path' <<<"$rules" &&""")
    assert not EARLY_READER.search("""  echo "$rules" | grep NODEAGENT_HOST""")
