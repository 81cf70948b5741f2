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

A build is used only while it matches the sources: when any ``.py`` of the package is
newer than the build (an edit or a ``git pull`` since; compiled code holds the types of the
modules it imports, so not only the compiled ones count), or the environment sets
``NODEAGENT_PURE=1``, or the extensions are missing, built for another Python or include a
module no longer on the list, every compiled module is imported from its source instead.
It is all or nothing: compiled modules call each other directly, so a source module among
them would run beside the old compiled code of the others. ``mode()`` says which one runs
and why; the agent logs it at start.

    nodeagent native build     # compile in place (needs mypy's mypyc and a C compiler)
    nodeagent native status    # which mode an import uses; exit status 1 unless compiled
"""

from __future__ import annotations

import argparse
import importlib.abc
import importlib.machinery
import importlib.util
import os
import sys
import time
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
    # package newer than the build makes it stale (setup.sh then rebuilds).
    built = min(extension_of(m).stat().st_mtime for m in MODULES)
    newer = sorted(
        str(p.relative_to(PACKAGE_DIR.parent))
        for p in PACKAGE_DIR.rglob("*.py")
        if p.stat().st_mtime > built
    )
    if newer:
        more = f" and {len(newer) - 1} more" if len(newer) > 1 else ""
        return False, (
            f"build older than the source of {newer[0]}{more} (rebuild: nodeagent native build)"
        )
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

    started = time.time()  # a source edited during the build must still count as newer
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
    for m in MODULES:  # an unchanged module is not rewritten: mark it as built then
        os.utime(extension_of(m), (started, started))
    for stray in _strays():  # taken off the list: its extension would import a lost group
        extension_of(stray).unlink()


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    about = "build the compiled hot path, or say whether it is used"
    p = sub.add_parser(
        "native",
        help=about,
        description="The modules every proxied request runs through, compiled with mypyc. "
        "A build older than any source of the package is not used (pure Python then).",
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
