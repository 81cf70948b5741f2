"""Fuzzing the config loader (``control/yamlload.py``, ``control/parse.py``,
``files.assemble`` through ``load_directory``) with the repository's own examples,
mutated: bytes replaced, inserted, deleted, duplicated or cut (invalid UTF-8, broken
YAML, anchors and aliases), and values replaced by hostile ones (deep nesting, huge
numbers, wrong types, long strings) at random places in the objects. Whatever comes of
it loads to a snapshot or is a ``ConfigErrors`` whose every error names a file of the
directory, in bounded time and size; never another exception."""

from __future__ import annotations

import copy
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from fuzzing import fuzz
from hypothesis import event, example, given
from hypothesis import strategies as st
from hypothesis.control import currently_in_test_context

from nodeagent.control.files import LoadedConfig, load_directory
from nodeagent.errors import ConfigError, ConfigErrors

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = sorted(p for p in (ROOT / "examples").rglob("*.yaml"))
BOOKINFO = [ROOT / "examples/bookinfo/pods.yaml", ROOT / "examples/bookinfo/services.yaml"]
SEEDS = [*EXAMPLES, *sorted((ROOT / "tests/unit/data/kubectl").glob("*.yaml"))]


def test_the_examples_load_as_their_directories_hold_them(tmp_path: Path) -> None:
    assert len(EXAMPLES) >= 10
    for i, seed in enumerate(EXAMPLES):
        (tmp_path / str(i)).mkdir()
        assert load(tmp_path / str(i), directory_with(seed, seed.read_bytes())) is not None, seed


def load(directory: Path, files: dict[str, bytes]) -> LoadedConfig | None:
    """Write ``files`` and load the directory: the snapshot, or None after checking the
    errors: each one names one of the files; the message stays short."""
    for name, data in files.items():
        (directory / name).write_bytes(data)
    started = time.perf_counter()
    try:
        loaded: LoadedConfig | None = load_directory(directory)
    except ConfigErrors as e:
        assert e.errors
        names = tuple(str(directory / name) for name in files)
        for error in e.errors:
            assert isinstance(error, ConfigError)
            assert error.source.startswith(names), error
        assert len(str(e)) < 2000 * len(e.errors)
        kind = "YAML" if "invalid YAML" in str(e) or "UTF-8" in str(e) else "objects"
        loaded = None
    else:
        kind = "loaded"
    if currently_in_test_context():
        event(f"errors: {kind}" if loaded is None else kind)
    assert time.perf_counter() - started < 5.0
    return loaded


def directory_with(seed: Path, data: bytes) -> dict[str, bytes]:
    """The seed (as ``data``) with the files it is loaded with, as the READMEs show: a
    bookinfo task with bookinfo and the subsets, a policy with bookinfo, a file of another
    example with that example's other files."""
    files = {"seed.yaml": data}
    example = seed.parent
    if example.parent != ROOT / "examples":
        return files
    if example.name.startswith("bookinfo-"):
        files |= {p.name: p.read_bytes() for p in BOOKINFO}
        subsets = example / "destination-rule-all.yaml"
        if example.name == "bookinfo-tasks" and seed != subsets:
            files[subsets.name] = subsets.read_bytes()
    else:
        files |= {p.name: p.read_bytes() for p in example.glob("*.yaml") if p != seed}
    return files


NOISE = [b"\xff", b"\xe9", b"\x00", b":", b"- ", b" ", b"\n", b"\t", b"&a ", b"*a", b"[", b"{",
         b"]", b"!!int ", b"!!python/object ", b"9" * 80, b"#", b'"', b"'", b"|", b"? ", b"---\n",
         b"<<: *a\n", b"0x", b"1e999"]  # fmt: skip


@st.composite
def byte_mutations(draw: st.DrawFn, data: bytes) -> bytes:
    out = bytearray(data)
    for _ in range(draw(st.integers(1, 4))):
        at = draw(st.integers(0, len(out)))
        how = draw(st.sampled_from(["insert", "replace", "delete", "duplicate", "cut"]))
        if how in ("insert", "replace"):
            noise = draw(st.sampled_from(NOISE))
            out[at : at + (len(noise) if how == "replace" else 0)] = noise
        elif how == "delete":
            del out[at : at + draw(st.integers(1, 20))]
        elif how == "duplicate":
            out[at:at] = out[at : at + draw(st.integers(1, 200))]
        else:
            del out[at:]
    return bytes(out)


@fuzz(1.5)
@given(st.sampled_from(SEEDS), st.data())
def test_mutated_examples_load_or_are_errors_naming_the_file(
    tmp_path_factory: pytest.TempPathFactory, seed: Path, data: st.DataObject
) -> None:
    mutated = data.draw(byte_mutations(seed.read_bytes()), label="mutated")
    load(tmp_path_factory.mktemp("cfg"), directory_with(seed, mutated))


HOSTILE: list[Any] = [
    None, True, 0, -1, 2**63, 10**70, 1.5, float("inf"), "", "x" * 10_000, "ünï\u202e",
    [], {}, {"a": None}, [[[[[]]]]], 65536, "10.0.0.300", "*", "/", "spiffe://", 0.0001,
]  # fmt: skip


def deep(depth: int) -> Any:
    value: Any = "bottom"
    for i in range(depth):
        value = [value] if i % 2 else {"k": value}
    return value


@st.composite
def value_mutations(draw: st.DrawFn, docs: list[Any]) -> list[Any]:
    """``docs`` with values at random paths replaced, keys dropped or added."""
    for _ in range(draw(st.integers(1, 3))):
        if not docs:
            break
        parent: Any = draw(st.sampled_from(docs))
        while isinstance(parent, dict | list) and parent and draw(st.integers(0, 3)):
            key = draw(st.sampled_from(list(parent) if isinstance(parent, dict)
                                       else range(len(parent))))  # fmt: skip
            if not isinstance(parent[key], dict | list) or not parent[key]:
                break
            parent = parent[key]
        if not isinstance(parent, dict | list) or not parent:
            continue
        key = draw(st.sampled_from(list(parent) if isinstance(parent, dict)
                                   else range(len(parent))))  # fmt: skip
        how = draw(st.sampled_from(["hostile", "hostile", "deep", "drop", "add"]))
        if how == "hostile":  # a copy: a later mutation must not change HOSTILE itself
            parent[key] = copy.deepcopy(draw(st.sampled_from(HOSTILE)))
        elif how == "deep":
            parent[key] = deep(draw(st.integers(10, 150)))
        elif how == "drop" and isinstance(parent, dict):
            del parent[key]
        elif isinstance(parent, dict):
            parent[draw(st.sampled_from(["extra", "spec", "kind", "name", 7]))] = parent[key]
    return docs


@fuzz(1.5)
@given(st.sampled_from(SEEDS), st.data())
@example(EXAMPLES[0], None)
def test_examples_with_hostile_values_load_or_are_errors_naming_the_file(
    tmp_path_factory: pytest.TempPathFactory, seed: Path, data: st.DataObject | None
) -> None:
    docs = list(yaml.safe_load_all(seed.read_text()))
    if data is not None:
        docs = data.draw(value_mutations(docs), label="documents")
    text = yaml.safe_dump_all(docs, allow_unicode=True, sort_keys=False).encode()
    loaded = load(tmp_path_factory.mktemp("cfg"), directory_with(seed, text))
    if data is None:
        assert loaded is not None
