"""The Kubernetes API as the agent uses it: credentials, one list, one watch stream.

The one module that touches lightkube (1.0.1, chosen over kubernetes-asyncio for its
types and its async client): ``KubeConfig`` for credentials (a kubeconfig file or the
pod's ServiceAccount), and its ``GenericAsyncClient`` for requests: ``prepare_request``
builds a list or watch path, ``list`` pages through a list, ``send`` streams a watch.
lightkube's own ``AsyncClient.watch`` cannot ask for bookmarks and restarts watches on
its own, so the watch stream is read here, line by line; objects stay plain dicts (each
kind a ``GenericNamespacedResource``/``GenericGlobalResource`` made for it, never put in
lightkube's registry), because the control layer validates them itself.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx2
from lightkube.config.client_adapter import ConnectionParams
from lightkube.config.kubeconfig import KubeConfig, SingleConfig
from lightkube.core.exceptions import ConfigError as LightkubeConfigError
from lightkube.core.generic_client import ALL_NS, GenericAsyncClient
from lightkube.generic_resource import (
    GenericGlobalResource,
    GenericNamespacedResource,
    create_api_info,
)

__all__ = ["ApiGone", "ApiStatusError", "KubeClient", "Resource", "credentials"]


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


def credentials(kubeconfig: Path | None) -> SingleConfig:
    """The kubeconfig's current context, or the pod's ServiceAccount (token, CA and the
    ``KUBERNETES_SERVICE_HOST``/``_PORT`` environment) when ``kubeconfig`` is None;
    ``ValueError`` naming the file and what is wrong."""
    where = str(kubeconfig) if kubeconfig else "in-cluster ServiceAccount credentials"
    try:
        if kubeconfig is None:
            conf = KubeConfig.from_service_account()
        else:
            conf = KubeConfig.from_file(kubeconfig)
        single = conf.get()
    except KeyError as e:  # the ServiceAccount's environment
        raise ValueError(f"{where}: {e.args[0]} is not set (not in a pod?)") from e
    except (LightkubeConfigError, OSError, ValueError, TypeError) as e:
        raise ValueError(f"{where}: {e}") from e
    except Exception as e:  # a kubeconfig of the wrong shape fails anywhere
        raise ValueError(f"{where}: not a usable kubeconfig: {e!r}") from e
    if single is None:
        raise ValueError(f"{where}: no current context")
    if single.user is None:
        raise ValueError(f"{where}: context {single.context_name!r} names no user")
    return single


def _resource_class(res: Resource) -> type[Any]:
    base: type[Any] = GenericNamespacedResource if res.namespaced else GenericGlobalResource
    info = create_api_info(res.group, res.version, res.kind, res.plural)
    return type(res.kind, (base,), {"_api_info": info})


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


class KubeClient:
    """Lists and watches of whole kinds (all namespaces) on one API server."""

    def __init__(self, config: SingleConfig, *, timeout: float = 10.0) -> None:
        self.server = str(config.cluster.server)
        self._timeout = timeout
        params = ConnectionParams(timeout=httpx2.Timeout(timeout))
        self._client = GenericAsyncClient(params, config)
        self._classes: dict[Resource, type[Any]] = {}

    def _cls(self, res: Resource) -> type[Any]:
        cls = self._classes.get(res)
        if cls is None:
            cls = self._classes[res] = _resource_class(res)
        return cls

    def _request(self, res: Resource, params: dict[str, str], *, watch: bool) -> Any:
        namespace = (res.namespace or ALL_NS) if res.namespaced else None
        return self._client.prepare_request(
            "list", res=self._cls(res), namespace=namespace, watch=watch, params=params
        )

    async def list(
        self, res: Resource, *, field_selector: str = "", page: int = 500
    ) -> tuple[list[dict[str, Any]], str]:
        """Every object of ``res`` (pages of ``page``) and the list's resourceVersion;
        ``ApiStatusError`` when the server refuses (404: the kind is not served)."""
        params = {"limit": str(page)}
        if field_selector:
            params["fieldSelector"] = field_selector
        br = self._request(res, params, watch=False)
        out: list[dict[str, Any]] = []
        rv = ""
        try:
            async for chunk_rv, chunk in self._client.list_chunks(br):
                rv = chunk_rv or rv
                out.extend(dict(item) for item in chunk)
        except httpx2.HTTPStatusError as e:
            raise _status_error(e.response.status_code, e.response.content) from None
        return out, rv

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
            "resourceVersion": resource_version,
            "allowWatchBookmarks": "true",
            "timeoutSeconds": str(timeout_seconds),
        }
        if field_selector:
            params["fieldSelector"] = field_selector
        br = self._request(res, params, watch=True)
        # a silent server is noticed when the watch outlives timeoutSeconds by a margin
        br.timeout = httpx2.Timeout(self._timeout, read=timeout_seconds + self._timeout)
        req = self._client.build_adapter_request(br)
        resp: httpx2.Response = await self._client.send(req, stream=True)  # type: ignore[no-untyped-call]
        try:
            if resp.status_code >= 400:
                raise _status_error(resp.status_code, await resp.aread())
            async for line in resp.aiter_lines():
                if not line.strip():
                    continue
                try:  # nested too deep, an integer past 4,300 digits, not JSON
                    event = json.loads(line)
                except (ValueError, RecursionError) as e:
                    yield MALFORMED, {"error": f"not JSON: {str(e)[:200]}", "line": line[:200]}
                    continue
                kind = event.get("type") if isinstance(event, dict) else None
                obj = event.get("object") if isinstance(event, dict) else None
                if not isinstance(kind, str) or not isinstance(obj, dict):
                    yield MALFORMED, {"error": "not a watch event", "line": line[:200]}
                    continue
                if kind == "ERROR":
                    code = int(obj.get("code") or 500)
                    raise _status_error(code, json.dumps(obj).encode())
                yield kind, obj
        finally:
            await resp.aclose()

    async def close(self) -> None:
        await self._client.close()  # type: ignore[no-untyped-call]
