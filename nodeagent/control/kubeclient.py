"""The Kubernetes API as the agent uses it: credentials, one list, one watch stream.

Owns talking to the API server: the credentials (a kubeconfig's current context — a
bearer token or token file, a client certificate, basic auth, an exec plugin — or the
pod's ServiceAccount) and two requests over HTTPS: a paged list, and a watch whose
stream is read line by line. Objects stay plain dicts: the control layer validates them
itself. Each request has its own connection (``Connection: close``): an agent makes one
per kind at start and one per kind and watch timeout after, so keeping them buys little.

Written on asyncio's streams, ssl and httptools (the HTTP/1.1 parser the proxy already
loads) rather than with lightkube and httpx2: an agent importing them, with their
connection pool, held 85 MiB idle where one on a config directory holds 74 (issue 20's
target is 80). The CA server's TokenReview client (``identity/kube_auth.py``, another
process) still uses lightkube.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import logging
import os
import re
import socket
import ssl
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode, urlsplit

import httptools
import yaml

from nodeagent import __version__

log = logging.getLogger(__name__)

__all__ = [
    "MALFORMED",
    "ApiConfig",
    "ApiGone",
    "ApiProtocolError",
    "ApiStatusError",
    "ExecPlugin",
    "KubeClient",
    "Resource",
    "credentials",
]

SERVICE_ACCOUNT_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")
"""Where kubelet puts a pod's ServiceAccount token and the cluster's CA."""
READ_CHUNK = 65536


@dataclass(frozen=True)
class Resource:
    """One kind the agent lists and watches, as the API names it."""

    group: str
    """``""`` for the core group."""
    version: str
    kind: str
    namespaced: bool = True
    namespace: str = ""
    """List and watch one namespace only (else all of them)."""

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    @property
    def plural(self) -> str:
        low = self.kind.lower()
        return low[:-1] + "ies" if low.endswith("y") else low + "s"

    @property
    def path(self) -> str:
        """The collection's path: ``/api/v1/pods``, ``/apis/G/V/namespaces/NS/PLURAL``."""
        root = f"/apis/{self.group}/{self.version}" if self.group else f"/api/{self.version}"
        if self.namespaced and self.namespace:
            root += f"/namespaces/{quote(self.namespace, safe='')}"
        return f"{root}/{self.plural}"

    def __str__(self) -> str:
        where = f" in namespace {self.namespace}" if self.namespace else ""
        return f"{self.api_version} {self.kind}{where}"


class ApiStatusError(Exception):
    """The API server answered with an error status (``code``), its message kept."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(f"{code}: {message}" if message else f"HTTP {code}")
        self.code = code


class ApiGone(ApiStatusError):
    """410 Gone: the resourceVersion asked for is too old; relist."""


class ApiProtocolError(OSError):
    """The server's bytes are not an HTTP answer, or it closed mid-answer."""


@dataclass(frozen=True)
class ExecPlugin:
    """A kubeconfig user's ``exec``: a command that prints an ``ExecCredential``."""

    command: str
    """Resolved against the kubeconfig's directory when it names a relative path."""
    args: tuple[str, ...] = ()
    env: tuple[tuple[str, str], ...] = ()
    api_version: str = "client.authentication.k8s.io/v1"
    provide_cluster_info: bool = False
    """``provideClusterInfo``: the plugin is told the cluster (``spec.cluster``)."""


@dataclass(frozen=True)
class ApiConfig:
    """Where the API server is and how to prove who we are (a kubeconfig context)."""

    server: str
    context_name: str = ""
    ca_pem: bytes | None = None
    """None: the system's trusted CAs."""
    insecure: bool = False
    tls_server_name: str = ""
    cert_pem: bytes | None = None
    key_pem: bytes | None = field(default=None, repr=False)
    token: str = field(default="", repr=False)
    token_file: str = ""
    """Read at each request: kubelet rotates a ServiceAccount's token in place."""
    username: str = ""
    password: str = field(default="", repr=False)
    exec_plugin: ExecPlugin | None = None


# -- credentials -------------------------------------------------------------------------


def credentials(kubeconfig: Path | None, service_account: Path = SERVICE_ACCOUNT_DIR) -> ApiConfig:
    """The kubeconfig's current context, or the pod's ServiceAccount (token, CA and the
    ``KUBERNETES_SERVICE_HOST``/``_PORT`` environment) when ``kubeconfig`` is None;
    ``ValueError`` naming the file and what is wrong."""
    if kubeconfig is None:
        return _in_cluster(service_account)
    where = str(kubeconfig)
    try:
        text = kubeconfig.read_text()
    except OSError as e:
        raise ValueError(f"{where}: {e.strerror or e}") from e
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ValueError(f"{where}: not YAML: {e}") from e
    try:
        config = _from_kubeconfig(doc, kubeconfig.parent)
        _ssl_context(config)  # a CA or key pair that does not load is told here
    except (ValueError, TypeError, KeyError, ssl.SSLError) as e:
        raise ValueError(f"{where}: {e}") from e
    return config


def _in_cluster(sa: Path) -> ApiConfig:
    where = "in-cluster ServiceAccount credentials"
    host = os.environ.get("KUBERNETES_SERVICE_HOST", "")
    port = os.environ.get("KUBERNETES_SERVICE_PORT", "")
    for name, value in (("KUBERNETES_SERVICE_HOST", host), ("KUBERNETES_SERVICE_PORT", port)):
        if not value:
            raise ValueError(f"{where}: {name} is not set (not in a pod?)")
    token = sa / "token"
    try:
        ca = (sa / "ca.crt").read_bytes()
        token.read_text()
    except OSError as e:
        raise ValueError(f"{where}: {e.filename}: {e.strerror}") from e
    hostport = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    return ApiConfig(server=f"https://{hostport}", context_name="in-cluster", ca_pem=ca,
                     token_file=str(token))  # fmt: skip


def _named(doc: Mapping[str, Any], section: str, name: str) -> dict[str, Any]:
    entries = doc.get(section) or []
    if not isinstance(entries, list):
        raise ValueError(f"{section}: expected a list")
    for entry in entries:
        if isinstance(entry, dict) and entry.get("name") == name:
            body = entry.get(section[:-1]) or {}
            if not isinstance(body, dict):
                raise ValueError(f"{section}[{name}]: expected a mapping")
            return body
    raise ValueError(f"{section[:-1]} {name!r} is not in {section}")


def _data(entry: Mapping[str, Any], key: str, base: Path) -> bytes | None:
    """``key-data`` (base64) or ``key`` (a file, relative to the kubeconfig's directory)."""
    inline = entry.get(f"{key}-data")
    if inline:
        try:
            return base64.b64decode(str(inline), validate=True)
        except binascii.Error as e:
            raise ValueError(f"{key}-data: not base64: {e}") from e
    path = entry.get(key)
    if not path:
        return None
    try:
        return (base / str(path)).read_bytes()
    except OSError as e:
        raise ValueError(f"{key}: {e.filename}: {e.strerror}") from e


def _from_kubeconfig(doc: Any, base: Path) -> ApiConfig:
    if not isinstance(doc, dict):
        raise ValueError("not a kubeconfig (expected a mapping)")
    name = doc.get("current-context")
    if not name:
        raise ValueError("no current context")
    context = _named(doc, "contexts", str(name))
    cluster = _named(doc, "clusters", str(context.get("cluster", "")))
    if not context.get("user"):
        raise ValueError(f"context {name!r} names no user")
    user = _named(doc, "users", str(context["user"]))
    server = str(cluster.get("server") or "")
    url = urlsplit(server)
    try:
        url.port  # noqa: B018 - a port that is not a number raises here
    except ValueError:
        raise ValueError(
            f"cluster {context.get('cluster')!r}: server {server!r}: bad port"
        ) from None
    if url.scheme not in ("https", "http") or not url.hostname:
        raise ValueError(f"cluster {context.get('cluster')!r}: server {server!r} is not a URL")
    insecure = _flag(cluster, "insecure-skip-tls-verify")
    ca_pem = _data(cluster, "certificate-authority", base)
    if insecure and ca_pem is not None:
        raise ValueError(  # as kubectl: which one was meant is not ours to guess
            f"cluster {context.get('cluster')!r}: certificate-authority and "
            "insecure-skip-tls-verify together"
        )
    if cluster.get("proxy-url"):
        raise ValueError(f"cluster {context.get('cluster')!r}: proxy-url is not supported")
    if user.get("auth-provider"):
        raise ValueError(
            f"user {context['user']!r}: auth-provider is not supported (use an exec plugin)"
        )
    plugin = None
    if user.get("exec"):
        e = user["exec"]
        if not isinstance(e, dict) or not e.get("command"):
            raise ValueError(f"user {context['user']!r}: exec needs a command")
        env = tuple((str(v["name"]), str(v.get("value", ""))) for v in e.get("env") or [])
        command = str(e["command"])
        if "/" in command and not command.startswith("/"):  # as kubectl: beside the file
            command = str(base / command)
        plugin = ExecPlugin(
            command=command,
            args=tuple(str(a) for a in e.get("args") or []),
            env=env,
            api_version=str(e.get("apiVersion") or "client.authentication.k8s.io/v1"),
            provide_cluster_info=_flag(e, "provideClusterInfo"),
        )
    token_file = str(user.get("tokenFile") or "")
    for key in ("token", "username", "password"):
        _header_safe(str(user.get(key) or ""), f"user {context['user']!r}: {key}")
    return ApiConfig(
        server=server.rstrip("/"),
        context_name=str(name),
        ca_pem=ca_pem,
        insecure=insecure,
        tls_server_name=str(cluster.get("tls-server-name") or ""),
        cert_pem=_data(user, "client-certificate", base),
        key_pem=_data(user, "client-key", base),
        token=str(user.get("token") or ""),
        token_file=str(base / token_file) if token_file else "",
        username=str(user.get("username") or ""),
        password=str(user.get("password") or ""),
        exec_plugin=plugin,
    )


def _flag(entry: Mapping[str, Any], key: str) -> bool:
    value = entry.get(key, False)
    if isinstance(value, bool):
        return value
    if str(value).lower() in ("true", "false"):  # a quoted YAML boolean
        return str(value).lower() == "true"
    raise ValueError(f"{key}: {value!r} is not true or false")


_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def _header_safe(value: str, what: str) -> str:
    """``value`` for an HTTP header; ValueError when a control byte (a line break: another
    header) is in it."""
    if _CONTROL.search(value):
        raise ValueError(f"{what} holds a control character")
    return value


def _ssl_context(config: ApiConfig) -> ssl.SSLContext:
    if config.ca_pem is not None:
        ctx = ssl.create_default_context(cadata=config.ca_pem.decode(errors="replace"))
    else:
        ctx = ssl.create_default_context()
    if config.insecure:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    if config.cert_pem is not None:
        if config.key_pem is None:
            raise ValueError("a client certificate without its key")
        # ssl loads a key pair from a file only: an anonymous one in memory, never on disk
        fd = os.memfd_create("nodeagent-kube-client-key", os.MFD_CLOEXEC)
        try:
            os.write(fd, config.cert_pem + b"\n" + config.key_pem)
            ctx.load_cert_chain(f"/proc/self/fd/{fd}")
        finally:
            os.close(fd)
    return ctx


class _Auth:
    """The ``Authorization`` header of the next request."""

    def __init__(self, config: ApiConfig) -> None:
        self.config = config
        self._exec_token = ""
        self._exec_expires = 0.0
        self._exec_lock = asyncio.Lock()  # the first lists ask at once: one plugin run

    async def header(self) -> str:
        c = self.config
        if c.exec_plugin is not None:
            return f"Bearer {await self._from_exec(c.exec_plugin)}"
        if c.token_file:
            try:
                token = Path(c.token_file).read_text().strip()
            except OSError as e:
                raise ValueError(f"token file {c.token_file}: {e.strerror}") from e
            return f"Bearer {_header_safe(token, f'token file {c.token_file}')}"
        if c.token:
            return f"Bearer {c.token}"
        if c.username:
            raw = f"{c.username}:{c.password}".encode()
            return f"Basic {base64.b64encode(raw).decode()}"
        return ""

    def refused(self) -> None:
        """The server answered 401: an exec plugin's token is asked for again."""
        self._exec_expires = 0.0

    async def _from_exec(self, plugin: ExecPlugin) -> str:
        async with self._exec_lock:
            if self._exec_token and time.time() < self._exec_expires:
                return self._exec_token
            return await self._run_exec(plugin)

    async def _run_exec(self, plugin: ExecPlugin) -> str:
        spec: dict[str, Any] = {"interactive": False}
        if plugin.provide_cluster_info:
            c = self.config
            cluster: dict[str, Any] = {"server": c.server}
            if c.ca_pem is not None:
                cluster["certificate-authority-data"] = base64.b64encode(c.ca_pem).decode()
            if c.tls_server_name:
                cluster["tls-server-name"] = c.tls_server_name
            if c.insecure:
                cluster["insecure-skip-tls-verify"] = True
            spec["cluster"] = cluster
        info = {"apiVersion": plugin.api_version, "kind": "ExecCredential", "spec": spec}
        env = {**os.environ, **dict(plugin.env), "KUBERNETES_EXEC_INFO": json.dumps(info)}
        try:
            proc = await asyncio.create_subprocess_exec(
                plugin.command, *plugin.args, env=env, stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            )  # fmt: skip
        except OSError as e:
            raise ValueError(f"exec plugin {plugin.command}: {e}") from e
        try:
            out, err = await asyncio.wait_for(proc.communicate(), 60)
        except BaseException as e:  # timed out or cancelled: the plugin goes too
            if proc.returncode is None:
                proc.kill()
                await asyncio.shield(proc.wait())
            if isinstance(e, TimeoutError):
                raise ValueError(f"exec plugin {plugin.command}: no answer in 60s") from e
            raise
        if proc.returncode != 0:
            raise ValueError(
                f"exec plugin {plugin.command} exited {proc.returncode}: "
                f"{err.decode(errors='replace').strip()[:300]}"
            )
        try:
            status = json.loads(out)["status"]
            token = _header_safe(str(status["token"]), f"exec plugin {plugin.command}'s token")
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(
                f"exec plugin {plugin.command}: no ExecCredential with a status.token: {e!r}"
            ) from e
        expires = status.get("expirationTimestamp")
        self._exec_token = token
        self._exec_expires = _timestamp(expires) - 10 if expires else float("inf")
        return token


def _timestamp(text: str) -> float:
    try:
        return datetime.fromisoformat(str(text).replace("Z", "+00:00")).timestamp()
    except ValueError:
        return 0.0  # unreadable: ask again next time


# -- requests ----------------------------------------------------------------------------


def _status_error(code: int, body: bytes) -> ApiStatusError:
    message = ""
    try:
        status = json.loads(body)
        if isinstance(status, dict):
            message = str(status.get("message", ""))
            code = int(status.get("code") or code)
    except ValueError:
        message = body[:200].decode(errors="replace")
    return ApiGone(code, message) if code == 410 else ApiStatusError(code, message)


MALFORMED = "MALFORMED"
"""The type ``watch`` gives a line that is not a watch event (our own, not Kubernetes')."""


class _Response:
    """One HTTP/1.1 answer being read: the status once the head is in, then its body."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.status = 0
        self._head = False
        self._done = False
        self._delimited = False
        self._body: list[bytes] = []
        self._parser = httptools.HttpResponseParser(self)

    # httptools' callbacks
    def on_header(self, name: bytes, value: bytes) -> None:
        if name.lower() in (b"content-length", b"transfer-encoding"):
            self._delimited = True

    def on_headers_complete(self) -> None:
        self._head = True
        self.status = self._parser.get_status_code()

    def on_body(self, body: bytes) -> None:
        self._body.append(body)

    def on_message_complete(self) -> None:
        self._done = True

    async def _feed(self, timeout: float) -> bool:
        """Read once and parse it; False, having parsed nothing, once the answer is whole."""
        if self._done:
            return False
        try:
            data = await asyncio.wait_for(self.reader.read(READ_CHUNK), timeout)
        except TimeoutError as e:
            if e.errno is not None:  # ETIMEDOUT from the kernel, not our wait
                raise TimeoutError(
                    e.errno, "the API server's end stopped answering (TCP keepalive)"
                ) from None
            raise TimeoutError(f"no bytes from the API server in {timeout:g}s") from None
        if not data:
            if self._head and not self._delimited:
                self._done = True  # a body that ends with the connection
                return False
            raise ApiProtocolError("the API server closed the connection mid-answer")
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as e:
            raise ApiProtocolError(f"not an HTTP answer from the API server: {e}") from None
        return True

    async def head(self, timeout: float) -> None:
        while not self._head:
            await self._feed(timeout)

    async def chunks(self, timeout: float) -> AsyncIterator[bytes]:
        # what is parsed goes out before the next read (a watch event must not wait for
        # the next one); a read that ends the answer parses nothing (see _feed)
        while True:
            body, self._body = self._body, []
            for b in body:
                yield b
            if not await self._feed(timeout):
                return

    async def read(self, timeout: float) -> bytes:
        return b"".join([b async for b in self.chunks(timeout)])

    def close(self) -> None:
        self.writer.close()


KEEPALIVE = (20, 10, 3)
"""TCP keepalive on every connection to the API server: first probe after 20 s idle, then
every 10 s, given up after 3 unanswered (and unacknowledged data is given up after as long,
``TCP_USER_TIMEOUT``). A server gone without a FIN or RST (a node or a partition, a load
balancer that forgot the flow) fails the watch in ~50 s rather than at its timeoutSeconds,
and the probes keep an idle watch's flow alive through balancers that drop idle flows."""


def _keep_alive(sock: socket.socket, idle: int, interval: int, count: int) -> None:
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, idle)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, interval)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, count)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, (idle + interval * count) * 1000)


class KubeClient:
    """Lists and watches of whole kinds (all namespaces) on one API server."""

    def __init__(
        self,
        config: ApiConfig,
        *,
        timeout: float = 10.0,
        keepalive: tuple[int, int, int] = KEEPALIVE,
    ) -> None:
        self.server = config.server
        url = urlsplit(config.server)
        self._https = url.scheme == "https"
        self._host = url.hostname or ""
        self._port = url.port or (443 if self._https else 80)
        self._authority = url.netloc
        self._prefix = url.path.rstrip("/")
        self._server_name = config.tls_server_name or self._host
        self._ssl = _ssl_context(config) if self._https else None
        self._auth = _Auth(config)
        self._timeout = timeout
        self._keepalive = keepalive
        proxy = os.environ.get("HTTPS_PROXY") or os.environ.get("https_proxy")
        if proxy:
            log.warning("HTTPS_PROXY is set (%s): the agent reaches the API server "
                        "%s directly, not through it", proxy, self.server)  # fmt: skip

    async def _get(self, path: str, params: Mapping[str, str], read_timeout: float) -> _Response:
        """The answer's head to ``GET path?params``; ``ApiStatusError`` for an error
        status (a 401 asks an exec plugin for a new token and tries once more)."""
        retried = False
        while True:
            resp = await self._open(path, params, read_timeout)
            if resp.status < 400:
                return resp
            try:
                body = await resp.read(read_timeout)
            finally:
                resp.close()
            if resp.status != 401 or retried or not self._auth.config.exec_plugin:
                raise _status_error(resp.status, body)
            self._auth.refused()
            retried = True

    async def _open(self, path: str, params: Mapping[str, str], read_timeout: float) -> _Response:
        auth = await self._auth.header()
        target = f"{self._prefix}{path}?{urlencode(params)}"
        lines = [f"GET {target} HTTP/1.1", f"Host: {self._authority}",
                 f"User-Agent: nodeagent/{__version__}", "Accept: application/json",
                 "Connection: close"]  # fmt: skip
        if auth:
            lines.append(f"Authorization: {auth}")
        try:
            async with asyncio.timeout(self._timeout):
                reader, writer = await asyncio.open_connection(
                    self._host, self._port, ssl=self._ssl,
                    server_hostname=self._server_name if self._ssl else None,
                    limit=READ_CHUNK,
                )  # fmt: skip
        except TimeoutError:
            raise TimeoutError(f"no connection in {self._timeout:g}s") from None
        sock = writer.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            _keep_alive(sock, *self._keepalive)
        resp = _Response(reader, writer)
        try:
            writer.write(("\r\n".join(lines) + "\r\n\r\n").encode())
            await resp.head(read_timeout)
        except BaseException:
            resp.close()
            raise
        return resp

    async def list(
        self, res: Resource, *, field_selector: str = "", page: int = 500
    ) -> tuple[list[dict[str, Any]], str]:
        """Every object of ``res`` (pages of ``page``) and the list's resourceVersion;
        ``ApiStatusError`` when the server refuses (404: the kind is not served)."""
        params = {"limit": str(page)}
        if field_selector:
            params["fieldSelector"] = field_selector
        out: list[dict[str, Any]] = []
        rv = ""
        while True:
            resp = await self._get(res.path, params, self._timeout)
            try:
                body = await resp.read(self._timeout)
            finally:
                resp.close()
            try:
                doc = json.loads(body)
                meta = doc.get("metadata") or {}
                items = doc.get("items") or []
                if not isinstance(meta, dict) or not isinstance(items, list):
                    raise ValueError("metadata or items of the wrong type")
            except (ValueError, AttributeError, RecursionError) as e:
                raise ApiProtocolError(f"a list of {res} that is not one: {e}") from None
            out.extend(item for item in items if isinstance(item, dict))
            rv = str(meta.get("resourceVersion") or rv)
            cont = meta.get("continue")
            if not cont:
                return out, rv
            params["continue"] = str(cont)

    async def watch(
        self,
        res: Resource,
        resource_version: str,
        *,
        timeout_seconds: int,
        field_selector: str = "",
    ) -> AsyncIterator[tuple[str, dict[str, Any]]]:
        """The events of one watch request from ``resource_version``, with bookmarks, as
        ``(type, object)``; ends when the server ends it (``timeoutSeconds``). An ERROR
        event raises ``ApiStatusError`` (``ApiGone`` for 410). A line that is no event
        is ``(MALFORMED, {"error": why, "line": its start})``: the watch goes on (resumed,
        the server would send it again)."""
        params = {
            "watch": "true",
            "resourceVersion": resource_version,
            "allowWatchBookmarks": "true",
            "timeoutSeconds": str(timeout_seconds),
        }
        if field_selector:
            params["fieldSelector"] = field_selector
        # a silent server is noticed when the watch outlives timeoutSeconds by a margin
        silence = timeout_seconds + self._timeout
        resp = await self._get(res.path, params, silence)
        try:
            pending = b""
            async for chunk in resp.chunks(silence):
                pending += chunk
                *lines, pending = pending.split(b"\n")
                for line in lines:
                    event = _event(line)
                    if event is not None:
                        yield event
            if pending.strip():
                event = _event(pending)
                if event is not None:
                    yield event
        finally:
            resp.close()

    async def close(self) -> None:
        """Nothing is kept open between requests; here for the callers' symmetry."""


def _event(raw: bytes) -> tuple[str, dict[str, Any]] | None:
    """One watch line as ``(type, object)``; None for a blank line."""
    line = raw.decode(errors="replace")
    if not line.strip():
        return None
    try:  # nested too deep, an integer past 4,300 digits, not JSON
        event = json.loads(line)
    except (ValueError, RecursionError) as e:
        return MALFORMED, {"error": f"not JSON: {str(e)[:200]}", "line": line[:200]}
    kind = event.get("type") if isinstance(event, dict) else None
    obj = event.get("object") if isinstance(event, dict) else None
    if not isinstance(kind, str) or not isinstance(obj, dict):
        return MALFORMED, {"error": "not a watch event", "line": line[:200]}
    if kind == "ERROR":
        code = int(obj.get("code") or 500)
        raise _status_error(code, json.dumps(obj).encode())
    return kind, obj
