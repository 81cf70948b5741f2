"""The compiled hot path: which modules are compiled with mypyc, building them, and never
running a stale build.

The modules every proxied request goes through (the HTTP/1.1 machines, HBONE framing and
streams, the L7 path with its plan, pipes and connection pool, the access log and the request
metrics) are ordinary typed Python. ``scripts/setup.sh`` also compiles them to C extension
modules with mypyc, the compiler mypy and black are built with (``nodeagent native
build``): the extensions are written beside the sources (``nodeagent/proxy/l7.cpython-311-
x86_64-linux-gnu.so``, git-ignored, plus the group's shared library ``nodeagent/_native__
mypyc...so``), and Python imports an extension in preference to its ``.py``. The same code
then spends about a third fewer instructions per proxied request (``bench/l7_cost.py``).

A build is used only while it matches the sources. The build records every ``.py`` of the
package (size, modification time and a SHA-256 of its bytes, in ``_native.sources.json``
beside the extensions); when one differs in content (an edit or a ``git pull`` since, even
one that leaves an older modification time, as ``cp -p`` or ``rsync -t`` do; compiled code
holds the types of the modules it imports, so not only the compiled ones count), is added
or removed, or the environment sets ``NODEAGENT_PURE=1``, or the extensions are missing,
built for another Python or include a module no longer on the list, every compiled module
is imported from its source instead. A file touched with its bytes unchanged (a branch
switched and back) keeps the build. Only a file whose size or time differs from the record
is read.
It is all or nothing: compiled modules call each other directly, so a source module among
them would run beside the old compiled code of the others. ``mode()`` says which one runs
and why; the agent logs it at start.

    nodeagent native build     # compile in place (needs mypy's mypyc and a C compiler)
    nodeagent native status    # which mode an import uses; exit status 1 unless compiled
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.abc
import importlib.machinery
import importlib.util
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

MODULES = (
    "nodeagent.protocol.http1",
    "nodeagent.protocol._http1_common",
    "nodeagent.protocol._http1_read",
    "nodeagent.protocol._http1_write",
    "nodeagent.protocol._http1_down",
    "nodeagent.protocol._http1_up",
    "nodeagent.protocol.h2base",
    "nodeagent.protocol.hbone",
    "nodeagent.proxy.pipe",
    "nodeagent.proxy.relay",
    "nodeagent.proxy.plumbing",
    "nodeagent.proxy.connections",
    "nodeagent.proxy.outbound",
    "nodeagent.proxy.inbound",
    "nodeagent.proxy.h1pool",
    "nodeagent.proxy.hbone",
    "nodeagent.proxy.hbone_client",
    "nodeagent.proxy.hbone_server",
    "nodeagent.proxy.l7",
    "nodeagent.proxy.l7body",
    "nodeagent.proxy.l7conn",
    "nodeagent.proxy.l7engine",
    "nodeagent.proxy.l7http1",
    "nodeagent.proxy.l7retry",
    "nodeagent.proxy.tracing",
    "nodeagent.core.plan",
    "nodeagent.core.paths",
    "nodeagent.core.balancer",
    "nodeagent.core.outlier",
    "nodeagent.core.clusters",
    "nodeagent.telemetry.accesslog",
    "nodeagent.telemetry.metrics",
    "nodeagent.identity.tlsread",
)
"""Compiled together as one group (``GROUP``). A module in this list must stay mypyc-clean:
no attribute narrowed in a subclass, no narrowed attribute re-tested after a call that may
change it (``warn_unreachable`` in pyproject.toml finds those), no subclass of a builtin
exception other than through ``mypyc_attr(native_class=False)``, and no name bound by two
``except`` clauses of different types in one function (compiled, the name has the first
clause's type: the second clause would fail with a TypeError; ``tests/unit/test_native.py``
checks this one). A class that a module off the list subclasses needs
``mypyc_attr(allow_interpreted_subclasses=True)`` (``protocol/h2base.py``'s, which
``protocol/http2.py`` extends), and such a subclass may not override the class's
attributes with class attributes: compiled code reads the instance's slot."""
GROUP = "nodeagent._native"
EXTENSIONS = (*MODULES, f"{GROUP}__mypyc")
"""What a complete build holds: one extension per module and the group's shared library."""
PURE_ENV = "NODEAGENT_PURE"

PACKAGE_DIR = Path(__file__).resolve().parent
SUFFIX = importlib.machinery.EXTENSION_SUFFIXES[0]


SOURCES_RECORD = PACKAGE_DIR / "_native.sources.json"
"""The sources a build was made from: ``{path: [size, mtime_ns, sha256]}``, paths relative
to the package's parent (git-ignored, written by ``build``)."""
BUILD_HINT = "nodeagent native build"


def source_of(module: str) -> Path:
    return PACKAGE_DIR.parent.joinpath(*module.split(".")).with_suffix(".py")


def extension_of(module: str) -> Path:
    p = PACKAGE_DIR.parent.joinpath(*module.split("."))
    return p.with_name(p.name + SUFFIX)


def _module_of(path: Path) -> str:
    rel = path.relative_to(PACKAGE_DIR.parent)
    return ".".join((*rel.parts[:-1], rel.name.split(".", 1)[0]))


def _strays() -> list[str]:
    """Modules with an extension of ours that are no longer compiled (taken off the
    list since the build): their extension would import a group that lacks them."""
    ours = {extension_of(m) for m in EXTENSIONS}
    return [_module_of(p) for p in PACKAGE_DIR.rglob(f"*{SUFFIX}") if p not in ours]


def _sources() -> dict[str, Path]:
    return {str(p.relative_to(PACKAGE_DIR.parent)): p for p in PACKAGE_DIR.rglob("*.py")}


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _record_sources() -> dict[str, list[int | str]]:
    """Each source's size, time and digest, as ``SOURCES_RECORD`` holds them."""
    record: dict[str, list[int | str]] = {}
    for rel, p in sorted(_sources().items()):
        st = p.stat()
        record[rel] = [st.st_size, st.st_mtime_ns, _digest(p)]
    return record


def _changed_sources() -> list[str] | None:
    """How the package's sources differ from the build's, one phrase per file (``[]``:
    none), or None when the build has no readable record."""
    try:
        record = json.loads(SOURCES_RECORD.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict):
        return None
    now = _sources()
    changed = []
    for rel, p in sorted(now.items()):
        was = record.get(rel)
        if not isinstance(was, list) or len(was) != 3:
            changed.append(f"{rel} is new")
            continue
        st = p.stat()
        # a differing size or time only sends us to the bytes: a touch alone is no change
        if [st.st_size, st.st_mtime_ns] != was[:2] and _digest(p) != was[2]:
            changed.append(f"the source of {rel} changed")
    changed += [f"{rel} was removed" for rel in sorted(record) if rel not in now]
    return changed


def _check(honour_env: bool = True) -> tuple[bool, str]:
    """(compiled modules usable, why not / what)."""
    if honour_env and os.environ.get(PURE_ENV, "") not in ("", "0"):
        return False, f"{PURE_ENV} is set"
    missing = [m for m in EXTENSIONS if not extension_of(m).exists()]
    if len(missing) > len(MODULES):
        return False, "not built (nodeagent native build)"
    if missing:
        return False, f"incomplete build: no extension for {', '.join(missing)}"
    strays = _strays()
    if strays:
        return False, f"built with modules no longer compiled: {', '.join(strays)} (rebuild)"
    # Compiled code holds the types of every module it imports, so any source of the
    # package that differs from the build's makes it stale (setup.sh then rebuilds).
    changed = _changed_sources()
    if changed is None:
        return False, f"the build has no record of its sources; rebuild: {BUILD_HINT}"
    if changed:
        more = f" and {len(changed) - 1} more" if len(changed) > 1 else ""
        return False, f"{changed[0]}{more} since the build; rebuild: {BUILD_HINT}"
    return True, f"{len(MODULES)} modules compiled with mypyc"


class _FromSource(importlib.abc.MetaPathFinder):
    """Imports every module of the package that has an extension from its ``.py`` file:
    the compiled ones, and strays of modules taken off the list since the build."""

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if not fullname.startswith("nodeagent.") or not extension_of(fullname).exists():
            return None
        return importlib.util.spec_from_file_location(fullname, source_of(fullname))


_compiled, _reason = _check()


def install() -> None:
    """Called once by ``nodeagent/__init__.py``: when the build must not be used, import
    the compiled modules from source (before any of them is imported)."""
    if not _compiled and not any(isinstance(f, _FromSource) for f in sys.meta_path):
        sys.meta_path.insert(0, _FromSource())


def mode() -> str:
    """``compiled (...)`` or ``pure Python (why)``: what the imports use."""
    return f"compiled ({_reason})" if _compiled else f"pure Python ({_reason})"


def compiled() -> bool:
    return _compiled


def build() -> None:
    """Compile ``MODULES`` in place (run from a source checkout; needs mypy and a C
    compiler with Python's headers)."""
    from mypyc.build import mypycify  # build-time only: mypy is a dev dependency
    from setuptools import setup

    sources = _record_sources()  # before compiling: an edit during the build counts
    root = PACKAGE_DIR.parent
    os.chdir(root)  # mypy reads pyproject.toml's [tool.mypy] from here
    paths = [str(source_of(m).relative_to(root)) for m in MODULES]
    work = Path("build/native")
    exts = mypycify(paths, opt_level="3", group_name=GROUP, target_dir=str(work))
    setup(
        name="nodeagent-native",
        ext_modules=exts,
        script_args=[
            "--quiet",
            "build_ext",
            "--inplace",
            "--build-temp",
            str(work / "tmp"),
            "--build-lib",
            str(work / "lib"),
        ],
    )
    lines = (f"{json.dumps(rel)}: {json.dumps(entry)}" for rel, entry in sources.items())
    SOURCES_RECORD.write_text("{\n" + ",\n".join(lines) + "\n}\n")  # a file per line
    for stray in _strays():  # taken off the list: its extension would import a lost group
        extension_of(stray).unlink()


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    about = "build the compiled hot path, or say whether it is used"
    p = sub.add_parser(
        "native",
        help=about,
        description="The modules every proxied request runs through, compiled with mypyc. "
        "A build is not used once any source of the package differs from the one it was "
        "built from (pure Python then).",
    )
    p.add_argument(
        "action",
        choices=("build", "status"),
        help="build: compile them in place (needs mypyc and a C compiler); status: say "
        "whether imports use the compiled modules, exit status 1 unless they do",
    )
    p.set_defaults(func=_cmd)


def _cmd(args: argparse.Namespace) -> int:
    if args.action == "build":
        build()
        ok, why = _check(honour_env=False)
        print(f"nodeagent native: {'compiled' if ok else 'NOT compiled'}: {why}")
        return 0 if ok else 1
    print(f"nodeagent native: {mode()}")
    return 0 if _compiled else 1
