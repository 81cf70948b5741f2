"""Who may get which certificate, in a Kubernetes cluster: the CA's side, as istiod does it.

Owns the two steps of ``ca_server`` when the CA runs in a cluster (``--auth kubernetes``),
both on one lightkube ``AsyncClient`` (the Kubernetes API, from a kubeconfig or the
in-cluster ServiceAccount):

- ``ServiceAccountTokenAuthenticator``: the bearer token is the agent's projected
  ServiceAccount token. A ``TokenReview`` (``spec.audiences`` = the CA's audience) must
  say ``authenticated``, list that audience, name one of the agents' ServiceAccounts
  (``system:serviceaccount:nodeagent-system:nodeagent``), and carry the node the token's
  pod is bound to (``status.user.extra["authentication.kubernetes.io/node-name"]``).
  Good reviews are cached briefly (bounded; never past the token's own ``exp``) so each
  CSR does not cost a round trip; concurrent CSRs with one token share one review.
- ``NodePodAuthorizer``: node N may hold ``spiffe://<td>/ns/<ns>/sa/<sa>`` only if a Pod
  with ``spec.nodeName == N`` (listed with that field selector, not finished) runs as
  ServiceAccount ``<sa>`` in ``<ns>``, or a ``networking.istio.io`` WorkloadEntry of
  ``<ns>`` annotated ``nodeagent.io/node: N`` has ``serviceAccount: <sa>`` (a VM joined
  with ``nodeagent vm join``; an entry without the annotation authorizes no node). Both
  lists are cached briefly and re-listed on a miss, so a pod just scheduled or an entry
  just applied is signable at once.

Every refusal says why: what the API server said of the token (expired, wrong audience),
not the agents' ServiceAccount, no node in the token, no such pod or WorkloadEntry on that
node. When the
API server cannot be asked, the request is answered ``UNAVAILABLE`` and the agent retries.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass

import httpx2
from lightkube import AsyncClient, KubeConfig
from lightkube.core.exceptions import ApiError
from lightkube.core.exceptions import ConfigError as KubeConfigError
from lightkube.generic_resource import GenericNamespacedResource, create_api_info
from lightkube.models.authentication_v1 import TokenReviewSpec
from lightkube.resources.authentication_v1 import TokenReview
from lightkube.resources.core_v1 import Pod

from nodeagent.errors import LocalStateError
from nodeagent.identity import DEFAULT_AGENT_SERVICE_ACCOUNT, DEFAULT_AUDIENCE
from nodeagent.identity.ca import parse_spiffe_id
from nodeagent.identity.ca_server import (
    AuthenticationFailed,
    Authenticator,
    Authorizer,
    BackendUnavailable,
    NotAuthorized,
    bearer_token,
)
from nodeagent.model.entries import WORKLOAD_NODE_ANNOTATION

__all__ = [
    "NODE_NAME_EXTRA",
    "NodePodAuthorizer",
    "ServiceAccountTokenAuthenticator",
    "kube_client",
    "kubernetes_auth",
    "service_account_username",
]

log = logging.getLogger(__name__)

NODE_NAME_EXTRA = "authentication.kubernetes.io/node-name"
"""The TokenReview's ``status.user.extra`` key naming the node a bound pod token's pod is
on (Kubernetes 1.30+)."""
REVIEW_CACHE_SECONDS = 60.0
REVIEW_CACHE_SIZE = 4096
PODS_CACHE_SECONDS = 5.0
ENTRY_VERSIONS = ("v1", "v1beta1")
"""The ``networking.istio.io`` versions WorkloadEntries are listed at, preferred first
(Istio serves v1 since 1.22; the next one is tried when the server has no such version)."""
API_TIMEOUT_SECONDS = 5.0


def service_account_username(account: str) -> str:
    """``system:serviceaccount:NS:NAME`` of ``NS/NAME``; ``LocalStateError`` if malformed."""
    namespace, sep, name = account.partition("/")
    if not sep or not namespace or not name or "/" in name or ":" in account:
        raise LocalStateError(
            f"agent ServiceAccount {account!r}: expected NAMESPACE/NAME, e.g. "
            f"{DEFAULT_AGENT_SERVICE_ACCOUNT}"
        )
    return f"system:serviceaccount:{namespace}:{name}"


def kube_client(kubeconfig: str | None) -> AsyncClient:
    """A lightkube client from ``kubeconfig``, or the in-cluster ServiceAccount if None."""
    if kubeconfig:
        try:
            config = KubeConfig.from_file(kubeconfig)
            config.get()  # a kubeconfig without a usable context fails here, not later
        except (KeyError, AttributeError, TypeError) as e:  # lightkube lets these through
            raise LocalStateError(
                f"the kubeconfig {kubeconfig} is not one (a YAML mapping with clusters, users "
                f"and contexts): {type(e).__name__}: {e}"
            ) from e
        except Exception as e:  # missing file (lightkube's ConfigError), bad YAML
            raise LocalStateError(f"cannot load the kubeconfig {kubeconfig}: {e}") from e
    else:
        try:
            config = KubeConfig.from_service_account()
        except (KubeConfigError, OSError, KeyError) as e:
            raise LocalStateError(
                "not running in a cluster (no ServiceAccount token and KUBERNETES_SERVICE_HOST): "
                f"give --kubeconfig FILE ({e})"
            ) from e
    return AsyncClient(config, timeout=httpx2.Timeout(API_TIMEOUT_SECONDS))


def _api_problem(what: str, e: Exception) -> BackendUnavailable:
    if isinstance(e, ApiError):
        code = e.status.code
        detail = f"{code} {e.status.reason or ''}: {e.status.message or e}".strip()
        if code == 403:
            detail += " (does the CA's ServiceAccount have its ClusterRole?)"
        return BackendUnavailable(f"the Kubernetes API refused to {what}: {detail}")
    return BackendUnavailable(
        f"cannot reach the Kubernetes API to {what}: {type(e).__name__}: {e or 'no detail'}"
    )


def _jwt_expiry(token: str) -> float | None:
    """The ``exp`` claim of a JWT, read without checking it (only to bound the cache)."""
    try:
        payload = token.split(".")[1]
        claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
        exp = claims.get("exp") if isinstance(claims, dict) else None
        return float(exp) if isinstance(exp, int | float) else None
    except (IndexError, ValueError):
        return None


@dataclass(frozen=True)
class _Review:
    node: str
    username: str
    until: float
    """Wall-clock time until which this review may be reused."""


class ServiceAccountTokenAuthenticator:
    """Agents' projected ServiceAccount tokens, checked with TokenReview.

    ``agent_service_accounts``: ``NAMESPACE/NAME`` of the ServiceAccount(s) agents run as.
    """

    def __init__(
        self,
        client: AsyncClient,
        audience: str = DEFAULT_AUDIENCE,
        agent_service_accounts: Sequence[str] = (DEFAULT_AGENT_SERVICE_ACCOUNT,),
        *,
        cache_seconds: float = REVIEW_CACHE_SECONDS,
        cache_size: int = REVIEW_CACHE_SIZE,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if not audience:
            raise LocalStateError("the CA's token audience cannot be empty")
        self._client = client
        self.audience = audience
        self.accounts = tuple(agent_service_accounts)
        self._usernames = frozenset(service_account_username(a) for a in self.accounts)
        self.cache_seconds = cache_seconds
        self.cache_size = cache_size
        self._clock = clock
        self._cache: OrderedDict[bytes, _Review] = OrderedDict()
        self._inflight: dict[bytes, asyncio.Future[_Review]] = {}
        self.reviews = 0
        """TokenReviews sent so far (the cache's misses)."""

    async def authenticate(self, metadata: Mapping[str, str]) -> str:
        token = bearer_token(metadata)
        key = hashlib.sha256(token.encode()).digest()
        cached = self._cache.get(key)
        if cached is not None and self._clock() < cached.until:
            self._cache.move_to_end(key)
            return cached.node
        future = self._inflight.get(key)
        if future is None:
            future = asyncio.get_running_loop().create_task(self._review(token))
            self._inflight[key] = future
            future.add_done_callback(lambda t: self._done(key, t))
        review = await asyncio.shield(future)
        self._remember(key, review)
        return review.node

    def _done(self, key: bytes, task: asyncio.Future[_Review]) -> None:
        self._inflight.pop(key, None)
        if not task.cancelled():
            task.exception()  # retrieved: every caller got it through shield

    def _remember(self, key: bytes, review: _Review) -> None:
        self._cache[key] = review
        self._cache.move_to_end(key)
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)

    async def _review(self, token: str) -> _Review:
        self.reviews += 1
        request = TokenReview(spec=TokenReviewSpec(token=token, audiences=[self.audience]))
        try:
            answer = await self._client.create(request)
        except (ApiError, httpx2.HTTPError, OSError) as e:
            problem = _api_problem("review the token", e)
            log.error("%s", problem)
            raise problem from e
        status = answer.status
        if status is None or not status.authenticated:
            why = (status.error if status is not None else "") or "not authenticated"
            raise AuthenticationFailed(f"the Kubernetes API rejected the token: {why}")
        if self.audience not in (status.audiences or []):
            raise AuthenticationFailed(
                f"the token is not for audience {self.audience} (the API server reviewed it "
                f"for {status.audiences or 'its own audience'}): mount a projected token "
                f"with audience: {self.audience}"
            )
        user = status.user
        username = (user.username if user is not None else None) or ""
        if username not in self._usernames:
            raise AuthenticationFailed(
                f"the token is of {username or 'an unnamed user'}, not of the agents' "
                f"ServiceAccount {' or '.join(self.accounts)}"
            )
        extra = (user.extra if user is not None else None) or {}
        nodes = extra.get(NODE_NAME_EXTRA) or []
        node = nodes[0] if isinstance(nodes, list) and len(nodes) == 1 else ""
        if not isinstance(node, str) or not node:
            raise AuthenticationFailed(
                f"the token of {username} names no node ({NODE_NAME_EXTRA}): use the agent "
                "pod's projected ServiceAccount token (Kubernetes 1.30+ binds it to the node)"
            )
        until = self._clock() + self.cache_seconds
        exp = _jwt_expiry(token)
        if exp is not None:
            until = min(until, exp)
        log.debug("token of %s on node %s reviewed", username, node)
        return _Review(node, username, until)


@dataclass(frozen=True)
class _Placement:
    identities: frozenset[str]
    at: float
    """``time.monotonic()`` when it was listed."""


@dataclass(frozen=True)
class _Entries:
    by_node: Mapping[str, frozenset[str]]
    """Node name → the identities of the WorkloadEntries annotated with it."""
    at: float


def _entry_class(version: str) -> type[GenericNamespacedResource]:
    # made here, not with create_namespaced_resource: lightkube's registry stays untouched
    info = create_api_info("networking.istio.io", version, "WorkloadEntry", "workloadentries")
    return type("WorkloadEntry", (GenericNamespacedResource,), {"_api_info": info})


def _entry_identity(item: Mapping[str, object], trust_domain: str) -> tuple[str, str] | None:
    """(node, identity) of one listed WorkloadEntry, or None when it names no node."""
    meta, spec = item.get("metadata"), item.get("spec")
    if hasattr(meta, "to_dict"):
        meta = meta.to_dict()
    if not isinstance(meta, dict):
        return None
    annotations = meta.get("annotations")
    node = annotations.get(WORKLOAD_NODE_ANNOTATION) if isinstance(annotations, dict) else None
    namespace = meta.get("namespace")
    if not isinstance(node, str) or not node or not isinstance(namespace, str):
        return None
    sa = spec.get("serviceAccount") if isinstance(spec, dict) else None
    account = sa if isinstance(sa, str) and sa else "default"
    return node, f"spiffe://{trust_domain}/ns/{namespace}/sa/{account}"


class NodePodAuthorizer:
    """Identity X for node N only if a Pod bound to N (``spec.nodeName``) runs as X, or a
    WorkloadEntry annotated ``nodeagent.io/node: N`` does."""

    def __init__(
        self,
        client: AsyncClient,
        trust_domain: str,
        cache_seconds: float = PODS_CACHE_SECONDS,
    ) -> None:
        self._client = client
        self.trust_domain = trust_domain
        self.cache_seconds = cache_seconds
        self._placements: dict[str, _Placement] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._entries: _Entries | None = None
        self._entries_lock = asyncio.Lock()
        self._entry_version = ENTRY_VERSIONS[0]
        self.lists = 0
        """Pod lists sent so far."""
        self.entry_lists = 0
        """WorkloadEntry lists sent so far."""

    async def _list(self, node: str) -> _Placement:
        self.lists += 1
        identities: set[str] = set()
        try:
            async for pod in self._client.list(Pod, namespace="*", fields={"spec.nodeName": node}):
                meta, spec, status = pod.metadata, pod.spec, pod.status
                if meta is None or spec is None or spec.nodeName != node:
                    continue
                if status is not None and status.phase in ("Succeeded", "Failed"):
                    continue  # finished: its containers are gone
                sa = spec.serviceAccountName or "default"
                identities.add(f"spiffe://{self.trust_domain}/ns/{meta.namespace}/sa/{sa}")
        except (ApiError, httpx2.HTTPError, OSError) as e:
            problem = _api_problem(f"list the pods on node {node}", e)
            log.error("%s", problem)
            raise problem from e
        placement = _Placement(frozenset(identities), time.monotonic())
        self._placements[node] = placement
        return placement

    async def _list_entries(self) -> _Entries:
        self.entry_lists += 1
        by_node: dict[str, set[str]] = {}
        for version in sorted(ENTRY_VERSIONS, key=lambda v: v != self._entry_version):
            by_node.clear()
            try:
                async for item in self._client.list(_entry_class(version), namespace="*"):
                    found = _entry_identity(item, self.trust_domain)
                    if found is not None:
                        by_node.setdefault(found[0], set()).add(found[1])
            except ApiError as e:
                if e.status.code == 404:
                    continue  # this version is not served (an older Istio, or none)
                problem = _api_problem("list the WorkloadEntries", e)
                log.error("%s", problem)
                raise problem from e
            except (httpx2.HTTPError, OSError) as e:
                problem = _api_problem("list the WorkloadEntries", e)
                log.error("%s", problem)
                raise problem from e
            self._entry_version = version
            break
        else:
            log.info("the API serves no WorkloadEntry: only pods place identities")
        placed = {node: frozenset(ids) for node, ids in by_node.items()}
        entries = _Entries(placed, time.monotonic())
        self._entries = entries
        return entries

    def _cached(self, node: str, identity: str, asked_at: float) -> bool:
        placement, entries = self._placements.get(node), self._entries
        fresh = placement is not None and asked_at - placement.at < self.cache_seconds
        if fresh and placement is not None and identity in placement.identities:
            return True
        if entries is not None and asked_at - entries.at < self.cache_seconds:
            return identity in entries.by_node.get(node, frozenset())
        return False

    async def authorize(self, node: str, identity: str) -> None:
        _, path = parse_spiffe_id(identity)  # the service checked it is of our domain
        parts = path.split("/")
        if len(parts) != 5 or parts[1] != "ns" or parts[3] != "sa":
            raise NotAuthorized(
                f"node {node} asked for {identity}, which is not a Kubernetes workload "
                "identity (spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>)"
            )
        asked_at = time.monotonic()
        if self._cached(node, identity, asked_at):
            return
        # a miss re-lists both, so a pod just scheduled or an entry just applied counts
        lock = self._locks.setdefault(node, asyncio.Lock())
        async with lock:
            placement = self._placements.get(node)
            if placement is None or placement.at < asked_at:  # nobody listed meanwhile
                placement = await self._list(node)
        if identity in placement.identities:
            return
        async with self._entries_lock:
            entries = self._entries
            if entries is None or entries.at < asked_at:
                entries = await self._list_entries()
        if identity in entries.by_node.get(node, frozenset()):
            return
        raise NotAuthorized(
            f"node {node} asked for {identity}, but no pod or WorkloadEntry on {node} runs "
            f"as ServiceAccount {parts[4]} in namespace {parts[2]}"
        )


def kubernetes_auth(
    kubeconfig: str | None,
    *,
    audience: str = DEFAULT_AUDIENCE,
    agent_service_accounts: Sequence[str] = (DEFAULT_AGENT_SERVICE_ACCOUNT,),
    trust_domain: str,
) -> tuple[Authenticator, Authorizer, Callable[[], Awaitable[None]]]:
    """The authenticator and authorizer of ``--auth kubernetes`` on one API client, and
    the coroutine function that closes it."""
    for account in agent_service_accounts:
        service_account_username(account)  # a typo fails before a client is made
    client = kube_client(kubeconfig)
    authn = ServiceAccountTokenAuthenticator(client, audience, agent_service_accounts)
    authz = NodePodAuthorizer(client, trust_domain)
    log.info(
        "CA authenticates agents by TokenReview (audience %s, ServiceAccount %s) against %s",
        audience,
        " or ".join(agent_service_accounts),
        client.config.cluster.server,
    )
    return authn, authz, client.close
