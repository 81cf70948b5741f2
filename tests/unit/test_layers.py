"""The layers of ``nodeagent/``, kept: imports point down the floors and never in a circle.

Every module of the package is read with ``ast``, and every import statement counts: at
the top, inside a function, under ``TYPE_CHECKING`` (each is a dependency the code has,
even when it is loaded late). The rules are the data below, stated once; a failure names
the file, the line, the import and the rule it breaks.

A room is a subpackage (``nodeagent/proxy``) or a module at the top of the package
(``nodeagent/app.py``; the package's own ``__init__`` is ``nodeagent/__init__.py``).
"""

from __future__ import annotations

import ast
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = "nodeagent"

# --- the rules --------------------------------------------------------------------------

FLOORS: tuple[tuple[str, ...], ...] = (
    ("nodeagent/cli.py", "nodeagent/__main__.py"),
    ("nodeagent/app.py",),
    (
        "nodeagent/admin",
        "nodeagent/sandbox",
        "nodeagent/cni",
        "nodeagent/dashboard",
        "nodeagent/workers",
    ),
    ("nodeagent/proxy",),
    ("nodeagent/identity", "nodeagent/control", "nodeagent/redirect", "nodeagent/samples"),
    ("nodeagent/core",),
    (
        "nodeagent/model",
        "nodeagent/protocol",
        "nodeagent/telemetry",
        "nodeagent/errors.py",
        "nodeagent/config.py",
        "nodeagent/native.py",
        "nodeagent/heap.py",
        "nodeagent/unixsocket.py",
        "nodeagent/cliargs.py",
        "nodeagent/__init__.py",
    ),
)
"""From the top floor down. A room imports rooms of its own floor or of floors below it,
never of a floor above; every room is on exactly one floor."""

NEVER: Mapping[str, frozenset[str]] = {
    "nodeagent/proxy": frozenset(
        {
            "nodeagent/redirect",
            "nodeagent/control",
            "nodeagent/admin",
            "nodeagent/sandbox",
            "nodeagent/app.py",
            "nodeagent/cli.py",
        }
    ),
    "nodeagent/redirect": frozenset({"nodeagent/proxy"}),
}
"""Rooms that never import these rooms, wherever the floors put them: the data path only
reads the mesh it is handed, and capture and proxy know nothing of each other."""

ONLY: Mapping[str, frozenset[str]] = {
    "nodeagent/core": frozenset({"nodeagent/model", "nodeagent/errors.py"}),
}
"""Rooms that import these rooms and no other: decisions over the model, nothing else."""

IMPORTED_ONLY_BY: Mapping[str, frozenset[str]] = {
    "nodeagent/app.py": frozenset({"nodeagent/cli.py", "nodeagent/__main__.py"}),
    "nodeagent/cli.py": frozenset({"nodeagent/__main__.py"}),
}
"""Rooms no other room imports: the composition root and the command line."""

PURE: frozenset[str] = frozenset({"nodeagent/model", "nodeagent/core", "nodeagent/protocol"})
NO_IO: frozenset[str] = frozenset({"asyncio", "socket", "bcc", "pyroute2"})
"""The rooms in ``PURE`` import none of the ``NO_IO`` modules: no I/O there."""

PENDING: frozenset[tuple[str, str]] = frozenset()
"""Known violations, (importing room, imported room), being removed on another branch."""


# --- reading the imports ----------------------------------------------------------------


@dataclass(frozen=True)
class Import:
    """One module named by an import statement."""

    file: str
    """The importing file, relative to the repository (``nodeagent/proxy/server.py``)."""
    line: int
    importer: str
    """The importing module (``nodeagent.proxy.server``)."""
    target: str
    """The module imported: the most precise of ours (``nodeagent.redirect.iptables``
    for ``from nodeagent.redirect import iptables``), or another's as written."""

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: imports {self.target}"


@cache
def modules() -> Mapping[str, Path]:
    """Every module of the package by dotted name (a package by its own name)."""
    out: dict[str, Path] = {}
    for path in sorted((ROOT / PACKAGE).rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def ours(name: str, known: Mapping[str, Path]) -> str | None:
    """The module of ours that ``name`` is or is in (None when it is not ours)."""
    while name and name not in known:
        name = name.rpartition(".")[0]
    return name or None


def imports_of(module: str, path: Path, known: Mapping[str, Path]) -> list[Import]:
    """Every import statement of one module, wherever it stands in the file."""
    file = path.relative_to(ROOT).as_posix()
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out: list[Import] = []
    for node in ast.walk(ast.parse(path.read_text(), file)):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the importer's package up
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*up, base] if base else up)
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                names.append(sub if sub in known else base)
        for name in names:
            target = ours(name, known) if name.split(".")[0] == PACKAGE else name
            out.append(Import(file, node.lineno, module, target or name))
    return out


@cache
def all_imports() -> tuple[Import, ...]:
    known = modules()
    return tuple(i for m, p in known.items() for i in imports_of(m, p, known))


def room(module: str) -> str:
    """The room of a module of ours: its subpackage, or itself at the top."""
    parts = module.split(".")
    if len(parts) == 1:
        return f"{PACKAGE}/__init__.py"
    top = f"{PACKAGE}/{parts[1]}"
    return top if (ROOT / top).is_dir() else f"{top}.py"


FLOOR_OF: Mapping[str, int] = {r: i for i, floor in enumerate(FLOORS) for r in floor}


# --- checking ---------------------------------------------------------------------------


def broken_rules(imp: Import) -> list[str]:
    """The rules ``imp`` breaks (empty when it keeps them all, or is known in PENDING)."""
    if imp.target.split(".")[0] != PACKAGE:
        if room(imp.importer) in PURE and imp.target.split(".")[0] in NO_IO:
            return [f"{', '.join(sorted(PURE))} never import {', '.join(sorted(NO_IO))} (NO_IO)"]
        return []
    src, dst = room(imp.importer), room(imp.target)
    if src == dst or (src, dst) in PENDING:
        return []
    broken: list[str] = []
    for r in (src, dst):
        if r not in FLOOR_OF:
            broken.append(f"{r} is on no floor of FLOORS")
    if not broken and FLOOR_OF[dst] < FLOOR_OF[src]:
        broken.append(f"{dst} is on a floor above {src} (imports point down)")
    if dst in NEVER.get(src, ()):
        broken.append(f"{src} never imports {dst} (NEVER)")
    if src in ONLY and dst not in ONLY[src]:
        broken.append(f"{src} imports only {', '.join(sorted(ONLY[src]))} (ONLY)")
    if dst in IMPORTED_ONLY_BY and src not in IMPORTED_ONLY_BY[dst]:
        allowed = ", ".join(sorted(IMPORTED_ONLY_BY[dst]))
        broken.append(f"only {allowed} import {dst} (IMPORTED_ONLY_BY)")
    return broken


def violations(imports: Iterable[Import]) -> list[str]:
    return [f"{imp}: {rule}" for imp in imports for rule in broken_rules(imp)]


def cycles(imports: Iterable[Import]) -> list[list[Import]]:
    """One import cycle per group of modules that import each other in a circle."""
    edges: dict[str, dict[str, Import]] = {}
    for imp in imports:
        if imp.target.split(".")[0] == PACKAGE and imp.target != imp.importer:
            edges.setdefault(imp.importer, {}).setdefault(imp.target, imp)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    groups: list[list[str]] = []

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in edges.get(v, {}):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while (w := stack.pop()) != v:
                group.append(w)
            if group:
                groups.append([v, *group])

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return [_cycle_in(sorted(group), edges) for group in groups]


def _cycle_in(group: list[str], edges: Mapping[str, Mapping[str, Import]]) -> list[Import]:
    """A path from the group's first module back to it, inside the group."""
    start, members = group[0], set(group)
    paths: dict[str, list[Import]] = {start: []}
    todo = [start]
    while todo:  # breadth first: the shortest cycle through start
        v = todo.pop(0)
        for w, imp in sorted(edges.get(v, {}).items()):
            if w == start:
                return [*paths[v], imp]
            if w in members and w not in paths:
                paths[w] = [*paths[v], imp]
                todo.append(w)
    raise AssertionError(f"no cycle through {start} in {group}")


# --- the tests --------------------------------------------------------------------------


def test_every_room_is_on_one_floor() -> None:
    rooms = {room(m) for m in modules()}
    placed = [r for floor in FLOORS for r in floor]
    assert len(placed) == len(set(placed)), f"a room on two floors: {sorted(placed)}"
    assert not rooms - set(placed), f"put these rooms on a floor of FLOORS: {rooms - set(placed)}"
    assert not set(placed) - rooms, f"FLOORS names rooms that are gone: {set(placed) - rooms}"


def test_imports_point_down_the_floors() -> None:
    broken = violations(all_imports())
    if broken:
        pytest.fail("imports that break the layers:\n" + "\n".join(broken), pytrace=False)


def test_no_modules_import_each_other_in_a_circle() -> None:
    found = cycles(all_imports())
    if found:
        shown = "\n".join(" -> ".join(str(i) for i in cycle) for cycle in found)
        pytest.fail(f"import cycles (each step FILE:LINE: imports MODULE):\n{shown}", pytrace=False)


def test_pending_exceptions_are_still_needed() -> None:
    seen = {
        (room(i.importer), room(i.target))
        for i in all_imports()
        if i.target.split(".")[0] == PACKAGE
    }
    stale = PENDING - seen
    if stale:
        pytest.fail(f"no import of these is left: remove them from PENDING: {stale}", pytrace=False)


def test_the_package_is_read() -> None:
    names = {i.target for i in all_imports() if i.importer == "nodeagent.proxy.l7engine"}
    assert "nodeagent.core.plan" in names and "asyncio" in names, names
    # in a function and under TYPE_CHECKING count too
    lazy = {i.target for i in all_imports() if i.importer == "nodeagent.samples.sampleapp"}
    assert {"nodeagent.samples.samplegrpc", "nodeagent.samples.common"} <= lazy, lazy


def an_import(importer: str, target: str) -> Import:
    return Import(importer.replace(".", "/") + ".py", 7, importer, target)


@pytest.mark.parametrize(
    ("bad", "rule"),
    [
        (an_import("nodeagent.core.route", "nodeagent.proxy.l7"), "on a floor above"),
        (an_import("nodeagent.core.route", "nodeagent.errors"), ""),
        (an_import("nodeagent.core.route", "nodeagent.telemetry.metrics"), "imports only"),
        (an_import("nodeagent.model.snapshot", "nodeagent.core.route"), "on a floor above"),
        (an_import("nodeagent.protocol.http1", "nodeagent.identity.tls"), "on a floor above"),
        (an_import("nodeagent.proxy.server", "nodeagent.control.files"), "never imports"),
        (an_import("nodeagent.proxy.server", "nodeagent.app"), "(IMPORTED_ONLY_BY)"),
        (an_import("nodeagent.proxy.server", "nodeagent.core.route"), ""),
        (an_import("nodeagent.proxy.server", "nodeagent.redirect.ebpf"), "never imports"),
        (an_import("nodeagent.redirect.ebpf", "nodeagent.proxy.server"), "never imports"),
        (an_import("nodeagent.sandbox.cli", "nodeagent.cli"), "(IMPORTED_ONLY_BY)"),
        (an_import("nodeagent.cli", "nodeagent.app"), ""),
        (an_import("nodeagent.core.route", "asyncio"), "never import asyncio"),
        (an_import("nodeagent.protocol.http2", "pyroute2.netlink"), "never import"),
        (an_import("nodeagent.proxy.l7", "asyncio"), ""),
        (an_import("nodeagent.newroom", "nodeagent.model"), "on no floor"),
    ],
)
def test_the_rules_catch_a_bad_import(bad: Import, rule: str) -> None:
    found = violations([bad])
    if rule:
        assert any(rule in f for f in found), found
        assert all(f.startswith(f"{bad.file}:7: imports {bad.target}: ") for f in found), found
    else:
        assert found == []


def test_a_circle_is_reported_with_each_step() -> None:
    found = cycles(
        [
            an_import("nodeagent.samples.a", "nodeagent.samples.b"),
            an_import("nodeagent.samples.b", "nodeagent.samples.c"),
            an_import("nodeagent.samples.c", "nodeagent.samples.a"),
            an_import("nodeagent.samples.c", "nodeagent.model"),
        ]
    )
    assert [[(i.importer, i.target) for i in cycle] for cycle in found] == [
        [
            ("nodeagent.samples.a", "nodeagent.samples.b"),
            ("nodeagent.samples.b", "nodeagent.samples.c"),
            ("nodeagent.samples.c", "nodeagent.samples.a"),
        ]
    ]
