"""The compiled hot path (``nodeagent/native.py``): a build is imported only while it
matches its sources, ``NODEAGENT_PURE=1`` forces the sources, and it is all or nothing."""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from nodeagent import native

PROBE = """
import importlib, nodeagent.native as n
for m in n.MODULES:
    print(m, importlib.import_module(m).__file__)
print("mode", n.mode())
"""


def _imports(root: Path, pure: bool) -> tuple[dict[str, str], str]:
    env = {k: v for k, v in os.environ.items() if k != native.PURE_ENV}
    if pure:
        env[native.PURE_ENV] = "1"
    env["PYTHONPATH"] = str(root)
    out = subprocess.run(
        [sys.executable, "-c", PROBE], env=env, cwd=root, capture_output=True, text=True, check=True
    ).stdout
    files = dict(line.split(" ", 1) for line in out.splitlines() if not line.startswith("mode "))
    mode = next(line[5:] for line in out.splitlines() if line.startswith("mode "))
    return files, mode


@pytest.fixture
def copy(tmp_path: Path) -> Path:
    """The package as built here (sources and extensions), somewhere we may touch it."""
    built = [native.extension_of(m) for m in native.MODULES]
    if not all(p.exists() for p in built):
        pytest.skip("the hot path is not built here (scripts/setup.sh builds it)")
    shutil.copytree(
        native.PACKAGE_DIR, tmp_path / "nodeagent", ignore=shutil.ignore_patterns("__pycache__")
    )
    for p in built:  # copytree keeps mtimes; keep the order sources < extensions as built
        q = tmp_path / p.relative_to(native.PACKAGE_DIR.parent)
        os.utime(q, (time.time(), time.time()))
    return tmp_path


def test_a_current_build_is_imported(copy: Path) -> None:
    files, mode = _imports(copy, pure=False)
    assert all(f.endswith(native.SUFFIX) for f in files.values()), files
    assert mode.startswith(f"compiled ({len(native.MODULES)} modules")


def test_pure_env_imports_every_compiled_module_from_source(copy: Path) -> None:
    files, mode = _imports(copy, pure=True)
    assert all(f.endswith(".py") for f in files.values()), files
    assert mode == f"pure Python ({native.PURE_ENV} is set)"


def test_one_edited_source_makes_all_modules_import_from_source(copy: Path) -> None:
    edited = copy / "nodeagent/proxy/l7.py"
    later = time.time() + 10
    os.utime(edited, (later, later))
    files, mode = _imports(copy, pure=False)
    # all of them: the compiled ones would call the old compiled l7 directly
    assert all(f.endswith(".py") for f in files.values()), files
    assert "older than the source of nodeagent/proxy/l7.py" in mode


def test_an_edited_module_the_compiled_ones_import_makes_the_build_stale(copy: Path) -> None:
    # compiled code holds the types of what it imports (here Endpoint, Pod, ...)
    edited = copy / "nodeagent/model/snapshot.py"
    later = time.time() + 10
    os.utime(edited, (later, later))
    files, mode = _imports(copy, pure=False)
    assert all(f.endswith(".py") for f in files.values()), files
    assert "older than the source of nodeagent/model/snapshot.py" in mode


def test_an_extension_of_a_module_taken_off_the_list_is_not_imported(copy: Path) -> None:
    # as after a build with nodeagent.proxy.relay compiled, then relay taken off MODULES
    pipe = native.extension_of("nodeagent.proxy.pipe").relative_to(native.PACKAGE_DIR.parent)
    relay = native.extension_of("nodeagent.proxy.relay").relative_to(native.PACKAGE_DIR.parent)
    shutil.copy2(copy / pipe, copy / relay)
    env = {k: v for k, v in os.environ.items() if k != native.PURE_ENV}
    env["PYTHONPATH"] = str(copy)
    probe = "import nodeagent.proxy.relay as r, nodeagent.native as n; print(r.__file__, n.mode())"
    out = subprocess.run(
        [sys.executable, "-c", probe], env=env, cwd=copy, capture_output=True, text=True, check=True
    ).stdout
    assert out.split(" ", 1)[0].endswith("nodeagent/proxy/relay.py"), out
    assert "no longer compiled: nodeagent.proxy.relay" in out


def test_a_missing_extension_makes_all_modules_import_from_source(copy: Path) -> None:
    pipe = native.extension_of("nodeagent.proxy.pipe").relative_to(native.PACKAGE_DIR.parent)
    (copy / pipe).unlink()
    files, mode = _imports(copy, pure=False)
    assert all(f.endswith(".py") for f in files.values()), files
    assert "no extension for nodeagent.proxy.pipe" in mode


def _except_names_with_two_types(path: Path) -> list[str]:
    found = []
    for fn in ast.walk(ast.parse(path.read_text())):
        if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        types: dict[str, set[str]] = {}
        for n in ast.walk(fn):
            if isinstance(n, ast.ExceptHandler) and n.name and n.type is not None:
                types.setdefault(n.name, set()).add(ast.unparse(n.type))
        found += [f"{path.name}:{fn.name}: {k} {sorted(v)}" for k, v in types.items() if len(v) > 1]
    return found


def test_no_compiled_function_binds_one_except_name_to_two_types() -> None:
    # ``except A as e: ... except B as e:`` compiled gives ``e`` the type A: the second
    # clause raises TypeError instead of handling B (a denied request got no 403 this way).
    # httptools' exceptions are exempt: compiled, both clauses hold a plain object.
    exempt = {"http1.py:_feed: e ['httptools.HttpParserError', 'httptools.HttpParserUpgrade']"}
    found = [
        f
        for m in native.MODULES
        for f in _except_names_with_two_types(native.source_of(m))
        if f not in exempt
    ]
    assert found == []
