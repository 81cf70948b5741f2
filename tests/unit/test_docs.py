"""The documentation's links resolve: every relative link in the repository's Markdown
files names a file that exists and, with ``#anchor``, a heading of that file (anchors as
GitHub renders them). And the README stays a front door, short enough to read."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

LINK = re.compile(r"(?<!!)\[(?:[^\]\\]|\\.)*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^(```|~~~)")
COMMENT = re.compile(r"<!--.*?-->", re.DOTALL)


def markdown_files() -> list[Path]:
    try:
        out = subprocess.run(
            ["git", "ls-files", "*.md"], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout
        files = [ROOT / line for line in out.splitlines()]
    except (OSError, subprocess.CalledProcessError):  # not a git checkout
        files = list(ROOT.rglob("*.md"))
    # new, not yet committed docs count too
    files += [p for p in (ROOT / "docs").glob("*.md") if p not in files]
    files += [p for p in (ROOT / "ARCHITECTURE.md",) if p.exists() and p not in files]
    return sorted(p for p in files if p.exists() and ".venv" not in p.parts)


def prose(text: str) -> list[str]:
    """The lines of ``text`` outside fenced code blocks and HTML comments."""
    lines, fenced = [], False
    for line in COMMENT.sub("", text).splitlines():
        if FENCE.match(line.strip()):
            fenced = not fenced
        elif not fenced:
            lines.append(line)
    return lines


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to dashes."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for line in prose(path.read_text(encoding="utf-8")):
        m = re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not m:
            continue
        base = slug(m.group(1))
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return out


def links(path: Path) -> list[str]:
    # joined: a link's text may wrap onto the next line
    return LINK.findall("\n".join(prose(path.read_text(encoding="utf-8"))))


@pytest.mark.parametrize("doc", markdown_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_links_resolve(doc: Path) -> None:
    broken = []
    for target in links(doc):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto:
            continue
        file, _, anchor = target.partition("#")
        dest = (doc.parent / file).resolve() if file else doc
        if not dest.exists():
            broken.append(f"{target}: no such file")
        elif anchor and dest.is_file() and dest.suffix == ".md" and anchor not in anchors(dest):
            broken.append(f"{target}: no heading #{anchor} in {dest.relative_to(ROOT)}")
    assert broken == []


def test_slug_is_githubs() -> None:
    assert slug("`nodeagent ctl explain`: why allowed, denied or routed there") == (
        "nodeagent-ctl-explain-why-allowed-denied-or-routed-there"
    )
    assert slug("Local rate limits and quotas: `nodeagent.io/v1alpha1 LocalRateLimit`") == (
        "local-rate-limits-and-quotas-nodeagentiov1alpha1-localratelimit"
    )


def test_the_readme_is_a_front_door() -> None:
    lines = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) <= 200, "guides belong in docs/, figures in bench/README.md"
    text = "\n".join(lines)
    assert "./scripts/demo.sh" in text and "./scripts/test.sh" in text
