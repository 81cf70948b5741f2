"""``nodeagent config check DIR``: every error and warning on its own line naming file,
object and field, a one-line summary, exit 0 when the mesh would load the config
(warnings allowed) and 2 when not."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from nodeagent.cli import main

EXPORTS = Path(__file__).parent / "data" / "kubectl"
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def exports(tmp_path: Path) -> Path:
    for f in EXPORTS.glob("*.yaml"):
        shutil.copy(f, tmp_path / f.name)
    return tmp_path


def check(directory: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, list[str]]:
    code = main(["config", "check", str(directory)])
    return code, capsys.readouterr().out.splitlines()


def test_a_config_that_loads_exits_0_with_its_warnings(
    exports: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, lines = check(exports, capsys)
    assert code == 0
    assert lines == [
        f"warning: {exports / 'configmap-web.yaml'}: v1 ConfigMap shop/web-config: "
        "not served by the mesh, skipped",
        f"warning: {exports / 'deployment-web.yaml'}: apps/v1 Deployment shop/web: "
        "not served by the mesh, skipped",
        f"warning: {exports / 'kube-system-list.yaml'} (items[1]): Pod "
        "kube-system/kube-proxy-8wz5d: hostNetwork Pod: it shares its node's network and is "
        "not captured, skipped",
        f"5 files in {exports}: 4 objects, 0 errors, 3 warnings: the mesh would load it",
    ]


def test_every_error_is_printed_and_the_exit_is_2(
    exports: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    svc = exports / "svc-web.yaml"
    svc.write_text(
        svc.read_text()
        .replace("    port: 80\n", "    port: eighty\n")
        .replace("  selector:\n", "  portz: []\n  selector:\n")
    )
    (exports / "vs.yaml").write_text(
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\n"
        "metadata: {name: web, namespace: shop}\n"
        "spec: {hosts: [web], http: [{route: [{destination: {host: web, subset: v9}}]}]}\n"
    )
    code, lines = check(exports, capsys)
    assert code == 2
    errors = [line for line in lines if line.startswith("error: ")]
    assert errors == [
        f"error: {svc}: Service shop/web: spec.ports[0].port: expected integer, got string "
        "'eighty'",
        f"error: {svc}: Service shop/web: spec.portz: unknown field (supported here: "
        "clusterIP, ports, selector, type)",
        f"error: {exports / 'vs.yaml'}: VirtualService shop/web: "
        "spec.http[0].route[0].destination.subset: subset 'v9' of host "
        "web.shop.svc.cluster.local is not defined: no DestinationRule for "
        "web.shop.svc.cluster.local",
    ]
    assert sum(line.startswith("warning: ") for line in lines) == 3
    assert lines[-1] == (
        f"6 files in {exports}: 4 objects, 3 errors, 3 warnings: the mesh would not load it"
    )


def test_not_a_directory(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, lines = check(tmp_path / "nope", capsys)
    assert code == 2
    assert lines[0] == f"error: {tmp_path / 'nope'}: not a directory"


def test_the_command_exits_with_its_verdict(exports: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    argv = [sys.executable, "-m", "nodeagent", "config", "check", str(exports)]
    ok = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60)
    assert (ok.returncode, ok.stderr) == (0, "")
    (exports / "bad.yaml").write_text("apiVersion: v1\nkind: Pod\nmetadata: {name: x}\n")
    bad = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2
    assert f"error: {exports / 'bad.yaml'}: Pod default/x: spec: required field is missing" in (
        bad.stdout.splitlines()
    )


def test_a_selector_matching_nothing_is_a_warning_even_beside_errors(
    exports: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (exports / "pod-web.yaml").unlink()  # the Deployment scaled to zero
    code, lines = check(exports, capsys)
    selector = (
        f"warning: {exports / 'svc-web.yaml'}: Service shop/web: spec.selector: selector "
        "app=web matches no Pod in namespace shop"
    )
    assert code == 0 and selector in lines
    (exports / "bad.yaml").write_text("apiVersion: v1\nkind: Pod\nmetadata: {name: x}\n")
    code, lines = check(exports, capsys)
    assert code == 2 and selector in lines
