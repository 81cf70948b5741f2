"""The agent's Kubernetes client against the test API server (HTTPS, bearer tokens):
every way a kubeconfig or a pod's ServiceAccount can say who we are reaches the server
(a token inline, in a file read at each request, from an exec plugin), and every kubeconfig
that cannot work is an error naming the file and what is wrong — before any request."""

from __future__ import annotations

import asyncio
import base64
import json
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubeapi import KubeApiServer
from kubeobjects import namespace

from nodeagent.control.kubeclient import (
    ApiStatusError,
    KubeClient,
    Resource,
    credentials,
)

NAMESPACES = Resource("", "v1", "Namespace", namespaced=False)


@pytest.fixture
def api() -> Iterator[KubeApiServer]:
    with KubeApiServer() as server:
        server.create(namespace("default"))
        yield server


def kubeconfig(api: KubeApiServer, path: Path, user: dict[str, Any], **cluster: Any) -> Path:
    ca = base64.b64encode(api.ca_pem).decode()
    doc = {
        "apiVersion": "v1", "kind": "Config", "current-context": "c",
        "clusters": [{"name": "k", "cluster": {"server": api.url,
                                               "certificate-authority-data": ca, **cluster}}],
        "users": [{"name": "u", "user": user}],
        "contexts": [{"name": "c", "context": {"cluster": "k", "user": "u"}}],
    }  # fmt: skip
    path.write_text(yaml.safe_dump(doc))
    return path


def names(path: Path) -> list[str]:
    async def go() -> list[str]:
        client = KubeClient(credentials(path), timeout=5)
        objects, rv = await client.list(NAMESPACES)
        assert rv
        return [o["metadata"]["name"] for o in objects]

    return asyncio.run(go())


def test_an_inline_token(api: KubeApiServer, tmp_path: Path) -> None:
    assert names(kubeconfig(api, tmp_path / "kc", {"token": api.admin_token})) == ["default"]


def test_a_token_file_is_read_at_each_request(api: KubeApiServer, tmp_path: Path) -> None:
    (tmp_path / "tok").write_text(api.admin_token + "\n")
    path = kubeconfig(api, tmp_path / "kc", {"tokenFile": "tok"})  # beside the kubeconfig
    assert names(path) == ["default"]
    (tmp_path / "tok").write_text("rotated-but-unknown")
    with pytest.raises(ApiStatusError, match="401"):
        names(path)


def test_an_exec_plugin(api: KubeApiServer, tmp_path: Path) -> None:
    plugin = tmp_path / "plugin.sh"
    cred = {"apiVersion": "client.authentication.k8s.io/v1", "kind": "ExecCredential",
            "status": {"token": api.admin_token}}  # fmt: skip
    plugin.write_text(
        "#!/bin/sh\n"
        # what the client told the plugin, kept for the test to read
        f'echo "$KUBERNETES_EXEC_INFO $PLUGIN_ENV" > {tmp_path}/asked\n'
        f"echo '{json.dumps(cred)}'\n"
    )
    plugin.chmod(plugin.stat().st_mode | stat.S_IXUSR)
    user = {"exec": {"apiVersion": "client.authentication.k8s.io/v1", "command": str(plugin),
                     "env": [{"name": "PLUGIN_ENV", "value": "set"}]}}  # fmt: skip
    assert names(kubeconfig(api, tmp_path / "kc", user)) == ["default"]
    asked = (tmp_path / "asked").read_text()
    assert '"kind": "ExecCredential"' in asked and asked.rstrip().endswith("set")


def test_a_failing_exec_plugin_says_so(api: KubeApiServer, tmp_path: Path) -> None:
    user = {"exec": {"command": "sh", "args": ["-c", "echo no login >&2; exit 3"]}}
    with pytest.raises(ValueError, match="exec plugin sh exited 3: no login"):
        names(kubeconfig(api, tmp_path / "kc", user))


def test_a_wrong_ca_is_refused(api: KubeApiServer, tmp_path: Path) -> None:
    other = KubeApiServer()  # its own CA
    try:
        path = kubeconfig(api, tmp_path / "kc", {"token": api.admin_token},
                          **{"certificate-authority-data":
                             base64.b64encode(other.ca_pem).decode()})  # fmt: skip
        with pytest.raises(OSError, match="CERTIFICATE_VERIFY_FAILED"):
            names(path)
        insecure = kubeconfig(api, tmp_path / "kc2", {"token": api.admin_token},
                              **{"insecure-skip-tls-verify": True,
                                 "certificate-authority-data": ""})  # fmt: skip
        assert names(insecure) == ["default"]
    finally:
        other.close()


def test_in_cluster_credentials(
    api: KubeApiServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sa = tmp_path / "sa"
    sa.mkdir()
    (sa / "ca.crt").write_bytes(api.ca_pem)
    (sa / "token").write_text(api.admin_token)
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "127.0.0.1")
    monkeypatch.setenv("KUBERNETES_SERVICE_PORT", str(api.port))
    config = credentials(None, service_account=sa)
    assert config.server == api.url and config.token_file == str(sa / "token")

    async def go() -> list[dict[str, Any]]:
        return (await KubeClient(config).list(NAMESPACES))[0]

    assert [o["metadata"]["name"] for o in asyncio.run(go())] == ["default"]
    monkeypatch.delenv("KUBERNETES_SERVICE_PORT")
    with pytest.raises(ValueError, match="KUBERNETES_SERVICE_PORT is not set"):
        credentials(None, service_account=sa)


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("{", "not YAML"),
        ("[]", "expected a mapping"),
        ("apiVersion: v1\nkind: Config\n", "no current context"),
        ("current-context: c\ncontexts: []\n", "context 'c' is not in contexts"),
        ("current-context: c\ncontexts: [{name: c, context: {cluster: k}}]\n"
         "clusters: [{name: k, cluster: {server: 'https://h:1'}}]\n", "names no user"),
        ("current-context: c\ncontexts: [{name: c, context: {cluster: k, user: u}}]\n"
         "clusters: [{name: k, cluster: {server: 'h:1'}}]\nusers: [{name: u, user: {}}]\n",
         "server 'h:1' is not a URL"),
        ("current-context: c\ncontexts: [{name: c, context: {cluster: k, user: u}}]\n"
         "clusters: [{name: k, cluster: {server: 'https://h:1',"
         " certificate-authority-data: '!!'}}]\nusers: [{name: u, user: {}}]\n",
         "certificate-authority-data: not base64"),
        ("current-context: c\ncontexts: [{name: c, context: {cluster: k, user: u}}]\n"
         "clusters: [{name: k, cluster: {server: 'https://h:1',"
         " certificate-authority: nosuch.pem}}]\nusers: [{name: u, user: {}}]\n",
         "certificate-authority: .*nosuch.pem: No such file"),
        ("current-context: c\ncontexts: [{name: c, context: {cluster: k, user: u}}]\n"
         "clusters: [{name: k, cluster: {server: 'https://h:1',"
         " certificate-authority-data: 'bm90IGEgY2VydA=='}}]\nusers: [{name: u, user: {}}]\n",
         "kc: "),
        ("current-context: c\ncontexts: [{name: c, context: {cluster: k, user: u}}]\n"
         "clusters: [{name: k, cluster: {server: 'https://h:1'}}]\n"
         "users: [{name: u, user: {auth-provider: {name: gcp}}}]\n",
         "auth-provider is not supported"),
    ],
)  # fmt: skip
def test_a_kubeconfig_that_cannot_work_says_why(tmp_path: Path, text: str, words: str) -> None:
    path = tmp_path / "kc"
    path.write_text(text)
    with pytest.raises(ValueError, match=words) as e:
        credentials(path)
    assert str(e.value).startswith(str(path))


def test_a_missing_kubeconfig(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"kc: No such file"):
        credentials(tmp_path / "kc")
