"""Hostile config files (issue 17, items 8 and 9): deep nesting, huge integers, alias
bombs, invalid UTF-8, huge files. Each is a config error naming the file, found in
bounded time, at start (``nodeagent run`` exits 2, ``config check`` says so), in the CA's
placement and in the watcher, which keeps the last good snapshot, says why in ``ctl
status`` and loads the next good edit."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from pathlib import Path

import pytest
from checkout import python_env
from fuzzing import fuzz
from hypothesis import given
from hypothesis import strategies as st

from nodeagent.cli import main
from nodeagent.control.files import ConfigWatcher, LoadedConfig, load_directory
from nodeagent.control.parse import parse_documents
from nodeagent.control.yamlload import MAX_FILE_BYTES
from nodeagent.errors import ConfigError, ConfigErrors
from nodeagent.identity.ca_server import PlacementAuthorizer

ROOT = Path(__file__).resolve().parents[2]

GOOD = """\
apiVersion: v1
kind: Pod
metadata: {name: web, namespace: shop}
spec: {nodeName: n1, serviceAccountName: web-sa, containers: [{name: main, image: web}]}
"""


def _laughs(levels: int = 9) -> bytes:
    """The "billion laughs": each level names the one before nine times (9**9 items)."""
    lines = ['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for i in range(1, levels):
        name, prev = chr(ord("a") + i), chr(ord("a") + i - 1)
        lines.append(f"{name}: &{name} [{', '.join([f'*{prev}'] * 9)}]")
    return ("\n".join(lines) + "\n").encode()


def _service_with(value: str) -> bytes:
    return (
        "apiVersion: v1\nkind: Service\nmetadata: {name: db, namespace: shop}\n"
        f"spec: {{ports: [{{port: 80}}], selector: {{app: {value}}}}}\n"
    ).encode()


HOSTILE: dict[str, tuple[bytes, str]] = {
    "deep flow nesting": (b"a: " + b"[" * 50_000 + b"]" * 50_000, "nest"),
    "deep block nesting": ("".join("  " * i + "k:\n" for i in range(600)).encode(), "nest"),
    "deep nesting in an object": (_service_with("[" * 200 + "]" * 200), "nest"),
    "huge integer": (_service_with("9" * 5000), "an integer of 5000 characters"),
    "huge hex integer": (_service_with("0x" + "f" * 100_000), "an integer of 100002"),
    "alias bomb": (_laughs(), "aliases expand to more than 10000 nodes"),
    "alias bomb in an object": (
        b"apiVersion: v1\nkind: Service\nmetadata: {name: db, namespace: shop}\nspec:\n"
        b"  ports: [{port: 80}]\n  selector:\n"
        + b"".join(b"    " + line + b"\n" for line in _laughs().splitlines()),
        "aliases expand",
    ),
    "recursive alias": (b"a: &a [1, *a]\n", "alias *a names a node that holds it"),
    "invalid UTF-8": (GOOD.encode() + b"# caf\xe9\n", "line 5: not UTF-8 text: byte 0xe9"),
    "a NUL byte": (GOOD.encode() + b"x: \x00\n", "invalid YAML"),
    "a date out of range": (b"a: 2001-13-01\n", "invalid YAML: month must be in 1..12"),
    "a timestamp tag on a number": (b"a: !!timestamp 5\n", "invalid YAML"),
    "an unknown tag": (b"a: !!python/object:os.system x\n", "invalid YAML"),
    # found by fuzzing (test_fuzz_config): PyYAML's constructors raised IndexError, KeyError
    "an empty integer": (b"a: !!int\n", "line 1, column 4: invalid YAML: '' is not a valid int"),
    "a sign alone as an integer": (b"a: [!!int +]\n", "'+' is not a valid int"),
    "an empty float": (b"a: !!float ''\n", "'' is not a valid float"),
    "an unknown boolean": (b"a: !!bool maybe\n", "'maybe' is not a valid bool"),
    "too large": (b"# " + b"x" * MAX_FILE_BYTES + b"\n", "larger than 4 MiB"),
}


@pytest.mark.parametrize("name", list(HOSTILE))
def test_a_hostile_file_is_one_error_naming_it(tmp_path: Path, name: str) -> None:
    data, reason = HOSTILE[name]
    (tmp_path / "good.yaml").write_text(GOOD)
    bad = tmp_path / "bad.yaml"
    bad.write_bytes(data)
    started = time.perf_counter()
    with pytest.raises(ConfigErrors) as info:
        load_directory(tmp_path)
    assert time.perf_counter() - started < 5.0
    errors = info.value.errors
    assert [e.source for e in errors] == [str(bad)], errors
    assert reason in str(errors[0])
    assert len(str(info.value)) < 2000  # never the value itself, expanded


def test_a_huge_name_is_cut_in_the_error(tmp_path: Path) -> None:
    """Found by fuzzing: a 10,000-character object name went whole into each error."""
    name = "x" * 10_000
    (tmp_path / "p.yaml").write_text(
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\n"
        f"metadata: {{name: {name}, namespace: default}}\nspec: {{}}\nextra: 1\n"
    )
    with pytest.raises(ConfigErrors) as e:
        load_directory(tmp_path)
    [error] = e.value.errors
    assert "extra: unknown field" in str(error) and str(tmp_path / "p.yaml") in str(error)
    assert len(str(error)) < 1000, len(str(error))
    assert "characters cut" in str(error) and error.obj.endswith(name)


def test_aliases_within_the_bound_load(tmp_path: Path) -> None:
    """Anchors and aliases are YAML: labels shared by two objects of a list are fine."""
    (tmp_path / "mesh.yaml").write_text(
        """\
apiVersion: v1
kind: List
items:
- apiVersion: v1
  kind: Pod
  metadata: {name: web, namespace: shop, labels: &labels {app: web, tier: front}}
  spec: {nodeName: n1, containers: [{name: main, image: web}]}
- apiVersion: v1
  kind: Service
  metadata: {name: web, namespace: shop, labels: *labels}
  spec: {ports: [{port: 80}], selector: *labels}
"""
    )
    snap = load_directory(tmp_path).snapshot
    assert snap.service_by_key["shop/web"].selector == snap.pod_by_key["shop/web"].labels


def test_the_watcher_keeps_serving_and_loads_each_good_edit_after_a_bad_one(
    tmp_path: Path,
) -> None:
    directory = tmp_path / "cfg"
    directory.mkdir()
    mesh = directory / "mesh.yaml"
    mesh.write_text(GOOD)
    published: list[LoadedConfig] = []
    watcher = ConfigWatcher(directory, None, published.append, interval=0.02)
    rejected: list[str] = []
    watcher.on_reject = rejected.append  # the agent counts them in a metric
    watcher.load_once()

    async def until(check: object, what: str) -> None:
        deadline = time.monotonic() + 10.0
        while not callable(check) or not check():
            assert time.monotonic() < deadline, f"timed out waiting for {what}"
            await asyncio.sleep(0.02)

    async def scenario() -> None:
        task = asyncio.create_task(watcher.run())
        try:
            for i, name in enumerate(["deep flow nesting", "huge integer", "alias bomb",
                                      "invalid UTF-8", "recursive alias",
                                      "an empty integer"]):  # fmt: skip
                data, reason = HOSTILE[name]
                version = watcher.version
                mesh.write_bytes(data)
                await until(lambda r=reason: r in watcher.last_error, f"the error of {name}")
                status = watcher.status(version)
                assert str(mesh) in status.last_error and reason in status.last_error
                assert watcher.version == version and not task.done()
                # the next good edit is loaded
                mesh.write_text(GOOD.replace("image: web", f"image: web{i}"))
                await until(lambda v=version: watcher.version == v + 1, f"the edit after {name}")
                assert watcher.last_error == ""
                assert published[-1].snapshot.pod_by_key["shop/web"] is not None
        finally:
            task.cancel()

    asyncio.run(scenario())
    assert len(published) == 6
    assert len(rejected) == 6 and all(str(mesh) in why for why in rejected)


def _run_agent(directory: Path) -> subprocess.CompletedProcess[bytes]:
    env = python_env()
    return subprocess.run(
        [sys.executable, "-m", "nodeagent", "run", "--node", "n1", "--config", str(directory)],
        capture_output=True,
        env=env,
        cwd=ROOT,
        timeout=60,
        check=False,
    )


@pytest.mark.parametrize("name", ["deep flow nesting", "huge integer", "alias bomb"])
def test_at_start_a_hostile_file_is_exit_2_without_a_traceback(tmp_path: Path, name: str) -> None:
    (tmp_path / "bad.yaml").write_bytes(HOSTILE[name][0])
    done = _run_agent(tmp_path)
    stderr = done.stderr.decode(errors="replace")
    assert b"Traceback" not in done.stderr, stderr
    assert done.returncode == 2
    assert f"nodeagent run: the config in {tmp_path} is invalid" in stderr
    assert f"{tmp_path / 'bad.yaml'}: " in stderr and HOSTILE[name][1] in stderr


def test_config_check_names_each_hostile_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    names = ["deep block nesting", "huge integer", "alias bomb", "invalid UTF-8", "too large"]
    for i, name in enumerate(names):
        (tmp_path / f"f{i}.yaml").write_bytes(HOSTILE[name][0])
    (tmp_path / "good.yaml").write_text(GOOD)
    assert main(["config", "check", str(tmp_path)]) == 2
    out = capsys.readouterr().out
    for i, name in enumerate(names):
        assert f"error: {tmp_path / f'f{i}.yaml'}: " in out and HOSTILE[name][1] in out
    assert "5 errors" in out and "the mesh would not load it" in out


def test_the_ca_placement_refuses_at_start_and_keeps_the_last_good_one(tmp_path: Path) -> None:
    (tmp_path / "mesh.yaml").write_bytes(HOSTILE["alias bomb"][0])
    with pytest.raises(ConfigErrors, match="aliases expand"):
        PlacementAuthorizer(tmp_path)
    (tmp_path / "mesh.yaml").write_text(GOOD)
    placement = PlacementAuthorizer(tmp_path, interval=0.0)
    web = "spiffe://cluster.local/ns/shop/sa/web-sa"
    assert placement.identities("n1") == {web}

    async def scenario() -> None:
        for name in ("huge integer", "deep flow nesting", "invalid UTF-8"):
            (tmp_path / "mesh.yaml").write_bytes(HOSTILE[name][0])
            await placement.authorize("n1", web)  # the last good placement still holds
        (tmp_path / "mesh.yaml").write_text(GOOD.replace("n1", "n2"))
        await placement.authorize("n2", web)

    asyncio.run(scenario())


# -- fuzzing: whatever the bytes, documents or ConfigErrors, quickly ------------------------

_scalars = st.one_of(
    st.integers(min_value=-(10**80), max_value=10**80).map(str),
    st.sampled_from(["9" * 5000, "0x" + "f" * 300, "1e999", ".nan", "2001-13-01", "~", "''"]),
    st.text(alphabet="ab:-[]{}&*!#|>'\"\\ ", max_size=6),
)


@st.composite
def _yaml_texts(draw: st.DrawFn) -> bytes:
    """Nesting of random depth, numbers, anchors and aliases, and random bytes."""
    depth = draw(st.integers(0, 300))
    opener, closer = draw(st.sampled_from([("[", "]"), ("{k: ", "}"), ("- ", "")]))
    body = draw(_scalars)
    text = opener * depth + body + closer * depth
    anchors = draw(st.lists(st.sampled_from("abc"), max_size=6))
    lines = [f"{n}{i}: &{n}{i} [{text}, {', '.join(f'*{m}' for m in anchors[:i])}]"
             for i, n in enumerate(anchors)]  # fmt: skip
    lines.append(f"x: {text}")
    data = "\n".join(lines).encode()
    noise = draw(st.binary(max_size=8))
    at = draw(st.integers(0, len(data)))
    return data[:at] + noise + data[at:]


@fuzz(1.5)
@given(data=_yaml_texts())
def test_fuzz_the_loader_gives_documents_or_config_errors(tmp_path_factory: pytest.TempPathFactory,
                                                          data: bytes) -> None:  # fmt: skip
    path = tmp_path_factory.mktemp("fuzz") / "fuzz.yaml"
    path.write_bytes(data)
    started = time.perf_counter()
    try:
        load_directory(path.parent)
    except ConfigErrors as e:
        assert all(isinstance(x, ConfigError) and x.source for x in e.errors)
        assert len(str(e)) < 10_000
    assert time.perf_counter() - started < 5.0


@fuzz(1.5)
@given(text=st.text(max_size=300), cut=st.integers(0, 300))
def test_fuzz_any_text_parses_to_objects_or_errors(text: str, cut: int) -> None:
    bomb = _laughs().decode()
    _pairs, errors, warnings = parse_documents(bomb[:cut] + text, "fuzz.yaml")
    assert all("fuzz.yaml" in str(x) for x in [*errors, *warnings])
