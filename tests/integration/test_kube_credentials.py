"""The agent's Kubernetes client against the test API server (HTTPS, bearer tokens):
every way a kubeconfig or a pod's ServiceAccount can say who we are reaches the server
(a token inline, in a file read at each request, from an exec plugin), and every kubeconfig
that cannot work is an error naming the file and what is wrong — before any request."""

from __future__ import annotations

import asyncio
import base64
import datetime
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


def plugin_script(tmp_path: Path, body: str, name: str = "plugin.sh") -> Path:
    plugin = tmp_path / name
    plugin.write_text("#!/bin/sh\n" + body)
    plugin.chmod(plugin.stat().st_mode | stat.S_IXUSR)
    return plugin


def exec_credential(token: str) -> str:
    return json.dumps({"apiVersion": "client.authentication.k8s.io/v1",
                       "kind": "ExecCredential", "status": {"token": token}})  # fmt: skip


def test_an_exec_plugin_runs_once_for_requests_made_together(
    api: KubeApiServer, tmp_path: Path
) -> None:
    # (the first lists of every kind start at once: one plugin run, not sixteen)
    cred = exec_credential(api.admin_token)
    plugin = plugin_script(tmp_path, f"echo run >> {tmp_path}/runs\nsleep 0.2\necho '{cred}'\n")
    path = kubeconfig(api, tmp_path / "kc", {"exec": {"command": str(plugin)}})

    async def go() -> None:
        client = KubeClient(credentials(path), timeout=5)
        await asyncio.gather(*(client.list(NAMESPACES) for _ in range(16)))

    asyncio.run(go())
    assert (tmp_path / "runs").read_text().splitlines() == ["run"]


def test_a_relative_exec_command_and_the_cluster_it_is_told(
    api: KubeApiServer, tmp_path: Path
) -> None:
    (tmp_path / "bin").mkdir()
    cred = exec_credential(api.admin_token)
    body = f"echo \"$KUBERNETES_EXEC_INFO\" > {tmp_path}/info\necho '{cred}'\n"
    plugin_script(tmp_path / "bin", body, "tok")
    user = {"exec": {"command": "./bin/tok", "provideClusterInfo": True}}
    assert names(kubeconfig(api, tmp_path / "kc", user)) == ["default"]  # beside the file
    info = json.loads((tmp_path / "info").read_text())
    assert info["spec"]["cluster"]["server"] == api.url
    assert base64.b64decode(info["spec"]["cluster"]["certificate-authority-data"]) == api.ca_pem


def test_a_cancelled_exec_plugin_is_not_left_running(api: KubeApiServer, tmp_path: Path) -> None:
    plugin = plugin_script(tmp_path, f"echo $$ > {tmp_path}/pid\nexec sleep 30\n")
    path = kubeconfig(api, tmp_path / "kc", {"exec": {"command": str(plugin)}})

    async def go() -> None:
        client = KubeClient(credentials(path), timeout=5)
        task = asyncio.ensure_future(client.list(NAMESPACES))
        for _ in range(100):
            await asyncio.sleep(0.05)
            if (tmp_path / "pid").exists():
                break
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(go())
    pid = int((tmp_path / "pid").read_text())
    assert not Path(f"/proc/{pid}").exists()


def test_a_token_with_a_line_break_is_refused(api: KubeApiServer, tmp_path: Path) -> None:
    # it would end the Authorization header and start one of the token's choosing
    with pytest.raises(ValueError, match="token holds a control character"):
        credentials(kubeconfig(api, tmp_path / "kc", {"token": "abc\r\nX-Injected: yes"}))
    (tmp_path / "tok").write_text("abc\r\nX-Injected: yes")
    with pytest.raises(ValueError, match="control character"):
        names(kubeconfig(api, tmp_path / "kc2", {"tokenFile": "tok"}))


def test_tls_switches_of_a_cluster(api: KubeApiServer, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="certificate-authority and insecure-skip-tls-verify"):
        credentials(kubeconfig(api, tmp_path / "kc", {"token": "t"},
                               **{"insecure-skip-tls-verify": True}))  # fmt: skip
    quoted = kubeconfig(api, tmp_path / "kc2", {"token": api.admin_token},
                        **{"insecure-skip-tls-verify": "false"})  # fmt: skip
    assert not credentials(quoted).insecure and names(quoted) == ["default"]
    with pytest.raises(ValueError, match="bad port"):
        credentials(kubeconfig(api, tmp_path / "kc3", {"token": "t"}, server="https://h:abc"))


def test_a_client_certificate_is_loaded_and_a_wrong_key_refused(
    api: KubeApiServer, tmp_path: Path
) -> None:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    def pair() -> tuple[bytes, bytes]:
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "admin")])
        now = datetime.datetime.now(datetime.UTC)
        cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
                .public_key(key.public_key()).serial_number(1).not_valid_before(now)
                .not_valid_after(now + datetime.timedelta(days=1))
                .sign(key, hashes.SHA256()))  # fmt: skip
        pem = serialization.Encoding.PEM
        key_pem = key.private_bytes(pem, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())  # fmt: skip
        return cert.public_bytes(pem), key_pem

    (cert, key), (_, other) = pair(), pair()

    def user(k: bytes) -> dict[str, str]:
        return {"client-certificate-data": base64.b64encode(cert).decode(),
                "client-key-data": base64.b64encode(k).decode()}  # fmt: skip

    config = credentials(kubeconfig(api, tmp_path / "kc", user(key)))
    assert config.cert_pem == cert and "PRIVATE KEY" not in repr(config)
    with pytest.raises(ValueError, match="kc2: "):
        credentials(kubeconfig(api, tmp_path / "kc2", user(other)))
