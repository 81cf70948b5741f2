"""``nodeagent ctl status`` of an agent whose config comes from the Kubernetes API: the
real ``Agent`` over a ``KubeSource`` on the test API server, asked through its node
agent socket; and ``nodeagent run --source kubernetes`` refusing to start, with why."""

from __future__ import annotations

import asyncio
import re
import shutil
import tempfile
import threading
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
from kubeapi import KubeApiServer
from kubeobjects import namespace, node, pod, service, virtual_service

from nodeagent import cli
from nodeagent.admin.server import start_admin_server
from nodeagent.app import Agent
from nodeagent.config import AgentSettings
from nodeagent.control.kube import KubeSource
from nodeagent.control.kubeclient import KubeClient, credentials

T = TypeVar("T")
NODE = "node1"


class LoopThread:
    """An event loop in a background thread: the agent runs there, ctl in the test."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 10.0) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.loop.close()


@pytest.fixture
def api() -> Iterator[KubeApiServer]:
    with KubeApiServer(endpointslices=True) as server:
        server.create(namespace("default"))
        server.create(node(NODE))
        server.create(pod("web-1", NODE, "10.244.1.5"))
        server.create(service("web"))
        yield server


@pytest.fixture
def short_dir() -> Iterator[Path]:
    d = tempfile.mkdtemp(prefix="na-", dir="/tmp")  # sun_path is 108 bytes
    try:
        yield Path(d)
    finally:
        shutil.rmtree(d, ignore_errors=True)


def ctl(socket: Path, capsys: pytest.CaptureFixture[str]) -> str:
    assert cli.main(["ctl", "--socket", str(socket), "status"]) == 0
    return capsys.readouterr().out


def test_ctl_status_shows_each_watch(
    api: KubeApiServer, short_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    kubeconfig = api.kubeconfig(short_dir / "kubeconfig")
    socket = short_dir / "agent.sock"
    settings = AgentSettings(
        node=NODE,
        config_dir=None,
        source="kubernetes",
        kubeconfig=kubeconfig,
        redirect="iptables",
        state_dir=short_dir / "state",
        socket_path=str(socket),
        access_log="off",
    )
    lt = LoopThread()
    tasks: list[asyncio.Task[None]] = []

    async def start() -> Any:
        source = KubeSource(
            KubeClient(credentials(kubeconfig)),
            node=NODE,
            pods_file=None,
            on_update=lambda _l: None,
        )
        loaded = await source.start()
        agent = Agent(settings, source, loaded)
        source.on_update = agent._on_update
        tasks.append(asyncio.create_task(source.run()))
        return await start_admin_server(agent, str(socket))

    async def stop(server: Any) -> None:
        await server.stop(None)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    server = lt.run(start())
    try:
        api.wait_watches("services")
        out = ctl(socket, capsys)
        assert re.search(r"^Config source:\s+kubernetes$", out, re.MULTILINE)
        assert re.search(rf"^Config sources:\s+{re.escape(api.url)}$", out, re.MULTILINE)
        assert re.search(r"^  v1 Pod: (listing|watching), 1 object\(s\), rv \d+", out, re.M)
        assert re.search(r"^  v1 Service: watching, 1 object\(s\), rv \d+, lag \d+ms", out, re.M)
        assert "  discovery.k8s.io/v1 EndpointSlice: watching, 1 object(s)" in out
        assert "  nodeagent.io/v1alpha1 LocalRateLimit: unserved, 0 object(s)" in out
        assert re.search(r"^Warnings:.*LocalRateLimit", out, re.MULTILINE)

        api.stop()  # the API server away: each watch backs off, the snapshot serves
        for _ in range(200):
            out = ctl(socket, capsys)
            if "v1 Service: backoff" in out:
                break
            threading.Event().wait(0.05)
        assert "v1 Service: backoff" in out
        assert "last error: cannot reach the API server" in out
        assert re.search(r"^Config version:\s+1$", out, re.MULTILINE)
    finally:
        api.start()
        lt.run(stop(server))
        lt.close()


def test_run_exits_2_naming_the_kubeconfig_when_the_api_is_away(
    api: KubeApiServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    kubeconfig = api.kubeconfig(tmp_path / "kubeconfig")
    api.stop()
    argv = ["run", "--node", NODE, "--source", "kubernetes", "--kubeconfig", str(kubeconfig)]
    rc = cli.main([*argv, "--socket", str(tmp_path / "s.sock"), "--redirect", "iptables"])
    err = capsys.readouterr().err
    assert rc == 2
    assert str(kubeconfig) in err
    assert "cannot list v1 Pod" in err or "cannot list" in err
    assert "cannot reach the API server" in err


def test_run_exits_2_on_a_refused_token(
    api: KubeApiServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    kubeconfig = api.kubeconfig(tmp_path / "kubeconfig", token="not-a-known-token")
    argv = ["run", "--node", NODE, "--source", "kubernetes", "--kubeconfig", str(kubeconfig)]
    rc = cli.main([*argv, "--socket", str(tmp_path / "s.sock"), "--redirect", "iptables"])
    err = capsys.readouterr().err
    assert rc == 2
    assert "answered 401" in err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--kubeconfig", "/nonexistent/kubeconfig"], "/nonexistent/kubeconfig"),
        ([], "in-cluster ServiceAccount credentials"),  # no kubeconfig, not in a pod
    ],
)
def test_run_exits_2_without_usable_credentials(
    argv: list[str],
    message: str,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    base = ["run", "--node", NODE, "--source", "kubernetes", "--socket", str(tmp_path / "s")]
    rc = cli.main([*base, *argv])
    err = capsys.readouterr().err
    assert rc == 2
    assert message in err


def test_run_asks_for_config_with_files_only(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["run", "--node", NODE]) == 2
    assert "--config DIR is required with --source files" in capsys.readouterr().err
    assert cli.main(["run", "--node", NODE, "--source", "kubernetes", "--config", "/x"]) == 2
    assert "--config is for --source files" in capsys.readouterr().err


def test_config_check_kubeconfig_lists_every_error_and_warning(
    api: KubeApiServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    kubeconfig = api.kubeconfig(tmp_path / "kubeconfig")
    assert cli.main(["config", "check", "--kubeconfig", str(kubeconfig)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert any(
        line.startswith(
            "warning: nodeagent.io/v1alpha1 LocalRateLimit: the API server does not serve this kind"
        )
        for line in out
    )
    assert out[-1].endswith("0 errors, 1 warning: the mesh would load it")
    assert api.url in out[-1]

    api.create(virtual_service("bad", "web.default.svc.cluster.local", timeout=5))
    assert cli.main(["config", "check", "--kubeconfig", str(kubeconfig)]) == 2
    out = capsys.readouterr().out.splitlines()
    assert (
        "error: kubernetes: VirtualService default/bad: spec.http[0].timeout: "
        "expected string, got integer 5"
    ) in out
    assert out[-1].endswith("1 error, 1 warning: the mesh would not load it")


def test_config_check_kubeconfig_with_the_api_away(
    api: KubeApiServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    kubeconfig = api.kubeconfig(tmp_path / "kubeconfig")
    api.stop()
    assert cli.main(["config", "check", "--kubeconfig", str(kubeconfig)]) == 2
    err = capsys.readouterr().err
    assert str(kubeconfig) in err and "cannot reach the API server" in err
    assert cli.main(["config", "check"]) == 2
    assert "give a DIR or --kubeconfig FILE" in capsys.readouterr().err
