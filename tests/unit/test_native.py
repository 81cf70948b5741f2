"""The compiled hot path (``nodeagent/native.py``): a build is imported only while it
matches its sources, ``NODEAGENT_PURE=1`` forces the sources, and it is all or nothing."""

from __future__ import annotations

import ast
import json
import os
import shutil
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest

from nodeagent import native

PROBE = """
import importlib, nodeagent.native as n
for m in n.MODULES:
    print(m, importlib.import_module(m).__file__)
print("mode", n.mode())
"""


def _run(root: Path, code: str, pure: bool = False) -> str:
    """What ``code`` prints in a Python that imports the package from ``root``."""
    env = {k: v for k, v in os.environ.items() if k != native.PURE_ENV}
    if pure:
        env[native.PURE_ENV] = "1"
    env["PYTHONPATH"] = str(root)
    return subprocess.run(
        [sys.executable, "-c", code], env=env, cwd=root, capture_output=True, text=True, check=True
    ).stdout


def _extension_in(root: Path, module: str) -> Path:
    return root / native.extension_of(module).relative_to(native.PACKAGE_DIR.parent)


def _imports(root: Path, pure: bool) -> tuple[dict[str, str], str]:
    out = _run(root, PROBE, pure)
    files = dict(line.split(" ", 1) for line in out.splitlines() if not line.startswith("mode "))
    mode = next(line[5:] for line in out.splitlines() if line.startswith("mode "))
    return files, mode


@pytest.fixture
def copy(tmp_path: Path) -> Path:
    """The package as built here (sources and extensions), somewhere we may touch it."""
    if not all(native.extension_of(m).exists() for m in native.EXTENSIONS):
        pytest.skip("the hot path is not built here (scripts/setup.sh builds it)")
    if native._changed_sources() != []:
        pytest.skip("the build here is stale: nodeagent native build")
    shutil.copytree(
        native.PACKAGE_DIR, tmp_path / "nodeagent", ignore=shutil.ignore_patterns("__pycache__")
    )
    return tmp_path


def test_a_current_build_is_imported(copy: Path) -> None:
    files, mode = _imports(copy, pure=False)
    assert all(f.endswith(native.SUFFIX) for f in files.values()), files
    assert mode.startswith(f"compiled ({len(native.MODULES)} modules")


def test_pure_env_imports_every_compiled_module_from_source(copy: Path) -> None:
    files, mode = _imports(copy, pure=True)
    assert all(f.endswith(".py") for f in files.values()), files
    assert mode == f"pure Python ({native.PURE_ENV} is set)"


@pytest.mark.parametrize(
    "edited",
    [
        # all of them from source: the compiled ones would call the old compiled l7 directly
        "nodeagent/proxy/l7.py",
        # not compiled, but compiled code holds the types it defines (Endpoint, Pod, ...)
        "nodeagent/model/snapshot.py",
    ],
)
def test_one_edited_source_makes_all_modules_import_from_source(copy: Path, edited: str) -> None:
    with open(copy / edited, "a") as f:
        f.write("# edited\n")
    files, mode = _imports(copy, pure=False)
    assert all(f.endswith(".py") for f in files.values()), files
    assert f"the source of {edited} changed since the build" in mode


def test_an_edit_that_keeps_an_older_time_is_still_seen(copy: Path) -> None:
    # as `cp -p` or `rsync -t` of an edited tree leave it: the file's time before the build
    path = copy / "nodeagent/proxy/l7.py"
    st = path.stat()
    path.write_bytes(path.read_bytes().replace(b"def ", b"def  ", 1))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns - 10**12))
    files, mode = _imports(copy, pure=False)
    assert all(f.endswith(".py") for f in files.values()), files
    assert "the source of nodeagent/proxy/l7.py changed" in mode


def test_a_source_touched_with_its_bytes_unchanged_keeps_the_build(copy: Path) -> None:
    later = time.time() + 10  # as a branch switched away and back leaves it
    os.utime(copy / "nodeagent/proxy/l7.py", (later, later))
    files, mode = _imports(copy, pure=False)
    assert all(f.endswith(native.SUFFIX) for f in files.values()), files
    assert mode.startswith(f"compiled ({len(native.MODULES)} modules")


def test_a_new_or_removed_source_makes_all_modules_import_from_source(copy: Path) -> None:
    (copy / "nodeagent/proxy/extra.py").write_text("X = 1\n")
    assert "nodeagent/proxy/extra.py is new since the build" in _imports(copy, pure=False)[1]
    (copy / "nodeagent/proxy/extra.py").unlink()
    assert _imports(copy, pure=False)[1].startswith("compiled (")
    # as a build made while a module existed that a pull has since removed
    record_path = copy / "nodeagent" / native.SOURCES_RECORD.name
    record = json.loads(record_path.read_text())
    record["nodeagent/proxy/gone.py"] = [1, 1, "0" * 64]
    record_path.write_text(json.dumps(record))
    files, mode = _imports(copy, pure=False)
    assert all(f.endswith(".py") for f in files.values()), files
    assert "nodeagent/proxy/gone.py was removed since the build" in mode


def test_a_build_without_a_record_of_its_sources_is_not_imported(copy: Path) -> None:
    (copy / "nodeagent" / native.SOURCES_RECORD.name).unlink()
    files, mode = _imports(copy, pure=False)
    assert all(f.endswith(".py") for f in files.values()), files
    assert "no record of its sources" in mode


def test_an_extension_of_a_module_taken_off_the_list_is_not_imported(copy: Path) -> None:
    # as after a build with nodeagent.proxy.dns compiled, then dns taken off MODULES
    shutil.copy2(
        _extension_in(copy, "nodeagent.proxy.pipe"), _extension_in(copy, "nodeagent.proxy.dns")
    )
    probe = "import nodeagent.proxy.dns as r, nodeagent.native as n; print(r.__file__, n.mode())"
    out = _run(copy, probe)
    assert out.split(" ", 1)[0].endswith("nodeagent/proxy/dns.py"), out
    assert "no longer compiled: nodeagent.proxy.dns" in out


def test_a_missing_extension_makes_all_modules_import_from_source(copy: Path) -> None:
    _extension_in(copy, "nodeagent.proxy.pipe").unlink()
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
    exempt = {
        f"{f}:_feed: e ['httptools.HttpParserError', 'httptools.HttpParserUpgrade']"
        for f in ("_http1_down.py", "_http1_up.py")
    }
    found = [
        f
        for m in native.MODULES
        for f in _except_names_with_two_types(native.source_of(m))
        if f not in exempt
    ]
    assert found == []


def test_every_compiled_module_is_type_checked_as_mypyc_needs() -> None:
    # mypyc turns what mypy calls unreachable into a wrong-type error at run time: the
    # modules it compiles are the ones pyproject.toml checks with warn_unreachable
    conf = tomllib.loads((Path(__file__).resolve().parents[2] / "pyproject.toml").read_text())
    strict = [
        set(o["module"]) for o in conf["tool"]["mypy"]["overrides"] if o.get("warn_unreachable")
    ]
    assert strict == [set(native.MODULES)]
