"""``nodeagent config check``'s verdict on a config, like ``istioctl analyze``: every error
and every warning of one source, and whether the mesh would load it.

A source hands over what it read (``Collected``: objects, errors, warnings); ``check``
runs the same checks across objects the agent runs (``files.assemble``). The directory is
one source (``check_directory``); another (the Kubernetes API) plugs in by building a
``Collected`` of its own.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from nodeagent.control.crosscheck import unmatched_selectors
from nodeagent.control.files import Collected, assemble, read_directory
from nodeagent.errors import ConfigError, ConfigErrors
from nodeagent.model.objects import Pod, Service
from nodeagent.model.traffic import DestinationRule


@dataclass(frozen=True)
class CheckReport:
    """What a check found; ``ok`` when the mesh would load the config."""

    what: str
    """What was checked, for the summary (``3 files in /etc/mesh``)."""
    objects: int
    """Objects read that passed their own checks (skipped ones are warnings)."""
    errors: tuple[ConfigError, ...]
    warnings: tuple[str, ...]

    @property
    def ok(self) -> bool:
        return not self.errors

    def lines(self) -> list[str]:
        """One line per error and per warning, then the summary."""
        out = [f"error: {e}" for e in self.errors]
        out += [f"warning: {w}" for w in self.warnings]
        verdict = "the mesh would load it" if self.ok else "the mesh would not load it"
        out.append(
            f"{self.what}: {self.objects} {_plural(self.objects, 'object')}, "
            f"{len(self.errors)} {_plural(len(self.errors), 'error')}, "
            f"{len(self.warnings)} {_plural(len(self.warnings), 'warning')}: {verdict}"
        )
        return out


def _plural(n: int, word: str) -> str:
    return word if n == 1 else f"{word}s"


def check(found: Collected, what: str) -> CheckReport:
    """The verdict on what a source read: its own errors and warnings, and the errors of
    the checks across objects."""
    try:
        loaded = assemble(found.pairs, found.errors, sources=found.sources, warnings=found.warnings)
    except ConfigErrors as e:
        objs = [obj for _, obj in found.pairs]
        selectors = unmatched_selectors(
            [o for o in objs if isinstance(o, Pod)],
            [o for o in objs if isinstance(o, Service)],
            [o for o in objs if isinstance(o, DestinationRule)],
        )
        return CheckReport(what, len(found.pairs), tuple(e.errors), (*found.warnings, *selectors))
    return CheckReport(what, len(found.pairs), (), loaded.warnings)


def check_directory(directory: str | Path) -> CheckReport:
    """The verdict on a config directory, as ``nodeagent run --config DIR`` would read it."""
    try:
        found = read_directory(directory)
    except ConfigErrors as e:
        return CheckReport(what=str(directory), objects=0, errors=tuple(e.errors), warnings=())
    n = len(found.sources)
    return check(found, f"{n} {_plural(n, 'file')} in {directory}")
