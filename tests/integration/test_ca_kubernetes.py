"""The mesh CA in a cluster: ServiceAccount tokens checked by TokenReview, pods from the API.

The test API server (``tests/kubeapi.py``, HTTPS, the real lightkube client) holds the
agent's pod on node1 and workload pods on node1 and node2, and issues projected
ServiceAccount tokens bound to a pod and its node. The CA serves gRPC over TLS on
loopback with ``--auth kubernetes``; agents ask through ``CaClient`` with real CSRs.
Checks what a node may get (its pods' identities, a pod just scheduled) and every
refusal's reason (another node's pod, expired token, wrong audience, another
ServiceAccount, no node in the token, the API away or forbidding TokenReview), the
review cache, ``nodeagent ctl status``'s CA line, and ``nodeagent ca serve`` end to end.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc.aio
import pytest
import uvloop
from cryptography import x509
from kubeapi import KubeApiServer, running_pod
from kubestore import DEFAULT_RESOURCES

from nodeagent.admin.ctl import format_ca
from nodeagent.identity.ca import TRUST_BUNDLE, CertificateAuthority, init_ca, workload_csr
from nodeagent.identity.ca_client import CaClient, CaRefused, CaUnreachable
from nodeagent.identity.ca_server import NotAuthorized, start_ca_server
from nodeagent.identity.ca_tls import IssuedServingCert
from nodeagent.identity.kube_auth import (
    NodePodAuthorizer,
    ServiceAccountTokenAuthenticator,
    kube_client,
)
from nodeagent.identity.store import CertificateStore

AUDIENCE = "nodeagent-ca"
CLIENT_ID = "spiffe://cluster.local/ns/default/sa/client"
SERVER_ID = "spiffe://cluster.local/ns/default/sa/server"
CART_ID = "spiffe://cluster.local/ns/shop/sa/cart"
API_AUDIENCE = "https://kubernetes.default.svc.cluster.local"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@dataclass
class Cluster:
    api: KubeApiServer
    root: Path
    ca_dir: Path
    kubeconfig: Path
    port: int
    uids: dict[str, str]
    """pod name -> uid."""

    @property
    def addr(self) -> str:
        return f"127.0.0.1:{self.port}"

    def token(
        self,
        node: str = "node1",
        *,
        namespace: str = "nodeagent-system",
        service_account: str = "nodeagent",
        audiences: tuple[str, ...] = (AUDIENCE,),
        pod: str = "",
        bound: bool = True,
        expires_at: float | None = None,
    ) -> str:
        """Write a projected token as kubelet would for ``pod`` (default: the agent's pod on
        ``node``); its path. ``bound=False``: a token bound to no pod (a Secret's)."""
        pod = pod or f"nodeagent-{node}"
        token = self.api.issue_token(
            namespace,
            service_account,
            audiences,
            node_name=node if bound else None,
            pod_name=pod if bound else None,
            pod_uid=self.uids[pod] if bound else None,
            expires_at=expires_at,
        )
        path = self.root / f"token-{len(list(self.root.glob('token-*')))}"
        path.write_text(token)
        return str(path)

    def client(self, token_file: str) -> CaClient:
        return CaClient(self.addr, token_file, 3.0, trust_bundle=str(self.ca_dir / TRUST_BUNDLE))

    async def start(self, kubeconfig: Path | None = None) -> tuple[grpc.aio.Server, Any]:
        """The CA with ``--auth kubernetes``; the server and the lightkube client."""
        ca = CertificateAuthority.load(self.ca_dir)
        kube = kube_client(str(kubeconfig or self.kubeconfig))
        server = await start_ca_server(
            ca,
            self.addr,
            ServiceAccountTokenAuthenticator(kube, AUDIENCE, ["nodeagent-system/nodeagent"]),
            NodePodAuthorizer(kube, ca.trust_domain),
            tls=IssuedServingCert(ca, ["127.0.0.1"]),
        )
        return server, kube

    def reviews(self) -> int:
        return self.api.requests["create", "tokenreviews"]


@pytest.fixture
def cluster() -> Iterator[Cluster]:
    root = Path(tempfile.mkdtemp(prefix="na-cak8s-", dir="/tmp"))
    api = KubeApiServer(check_bound_pods=True)  # a token whose pod is gone is invalid
    try:
        api.start()
        pods = [
            running_pod(
                f"nodeagent-{node}",
                ip=f"192.168.0.{i}",
                node=node,
                namespace="nodeagent-system",
                service_account="nodeagent",
            )
            for i, node in enumerate(("node1", "node2"), 1)
        ]
        pods.append(running_pod("client", ip="10.0.1.5", node="node1", service_account="client"))
        pods.append(running_pod("server", ip="10.0.2.5", node="node2", service_account="server"))
        uids = {p["metadata"]["name"]: api.create(p)["metadata"]["uid"] for p in pods}
        ca_token = "ca-" + os.urandom(8).hex()
        api.allow_token(ca_token, tokenreview=True)
        kubeconfig = api.kubeconfig(root / "kubeconfig", token=ca_token)
        yield Cluster(api, root, init_ca(root / "ca"), kubeconfig, free_port(), uids)
    finally:
        api.close()
        shutil.rmtree(root, ignore_errors=True)


def run(body: Callable[[], Awaitable[None]]) -> None:
    async def main() -> None:
        await body()

    uvloop.run(main())


def csr_for(identity: str) -> bytes:
    return workload_csr(identity)[0]


def uri_of(pem: bytes) -> list[str]:
    leaf = x509.load_pem_x509_certificate(pem)
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return list(san.get_values_for_type(x509.UniformResourceIdentifier))


async def refusal(client: CaClient, identity: str) -> str:
    with pytest.raises(CaRefused) as e:
        await client.sign(csr_for(identity), 600)
    return str(e.value)


def test_an_agent_gets_its_nodes_pods_identities_with_one_review(cluster: Cluster) -> None:
    async def body() -> None:
        server, kube = await cluster.start()
        client = cluster.client(cluster.token("node1"))
        try:
            for _ in range(3):
                chain = await client.sign(csr_for(CLIENT_ID), 600)
                assert uri_of(chain[0]) == [CLIENT_ID]
            assert cluster.reviews() == 1  # the review is cached, not redone per CSR
            node2 = cluster.client(cluster.token("node2"))
            assert uri_of((await node2.sign(csr_for(SERVER_ID), 600))[0]) == [SERVER_ID]
            await node2.close()
        finally:
            await client.close()
            await server.stop(None)
            await kube.close()

    run(body)


def test_a_pod_on_another_node_is_refused_and_ctl_status_says_why(cluster: Cluster) -> None:
    async def body() -> None:
        server, kube = await cluster.start()
        client = cluster.client(cluster.token("node1"))
        store = CertificateStore(client, "cluster.local", 600, str(cluster.ca_dir / TRUST_BUNDLE))
        try:
            why = await refusal(client, SERVER_ID)
            errors = await store.ensure([CLIENT_ID, SERVER_ID])
        finally:
            await client.close()
            await server.stop(None)
            await kube.close()
        assert why == (
            f"CA refused: node node1 asked for {SERVER_ID}, but no pod or WorkloadEntry on "
            "node1 runs as ServiceAccount server in namespace default"
        )
        assert errors == {SERVER_ID: why}
        assert store.cached(CLIENT_ID) is not None
        line = format_ca(store.status(), time.time())
        assert line.startswith(f"reachable ({cluster.addr}); last error ")
        assert line.endswith(f" ago: {why}")

    run(body)


def test_a_pod_just_scheduled_is_signable_at_once(cluster: Cluster) -> None:
    async def body() -> None:
        server, kube = await cluster.start()
        client = cluster.client(cluster.token("node1"))
        try:
            why = await refusal(client, CART_ID)
            assert "on node1 runs as ServiceAccount cart in namespace shop" in why
            cluster.api.create(
                running_pod(
                    "cart", ip="10.0.1.9", node="node1", namespace="shop", service_account="cart"
                )
            )
            assert uri_of((await client.sign(csr_for(CART_ID), 600))[0]) == [CART_ID]
            # ...and a pod gone from the node no longer is, once the short cache lapses
            cluster.api.delete(
                {
                    "apiVersion": "v1",
                    "kind": "Pod",
                    "metadata": {"name": "cart", "namespace": "shop"},
                }
            )
            await asyncio.sleep(5.1)
            assert "no pod or WorkloadEntry on node1" in await refusal(client, CART_ID)
        finally:
            await client.close()
            await server.stop(None)
            await kube.close()

    run(body)


RATINGS_ID = "spiffe://cluster.local/ns/default/sa/ratings"
REVIEWS_ID = "spiffe://cluster.local/ns/default/sa/reviews"
LEGACY_ID = "spiffe://cluster.local/ns/default/sa/legacy"


def workload_entry(name: str, sa: str, node: str | None, address: str) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name, "namespace": "default"}
    if node:
        meta["annotations"] = {"nodeagent.io/node": node}
    return {
        "apiVersion": "networking.istio.io/v1",
        "kind": "WorkloadEntry",
        "metadata": meta,
        "spec": {"address": address, "serviceAccount": sa},
    }


def test_a_workload_entry_authorizes_its_identity_for_the_node_it_names_only(
    cluster: Cluster,
) -> None:
    cluster.api.create(workload_entry("ratings-1", "ratings", "node1", "192.168.121.10"))
    cluster.api.create(workload_entry("reviews-2", "reviews", "node2", "192.168.121.11"))
    cluster.api.create(workload_entry("legacy", "legacy", None, "192.168.121.12"))

    async def body() -> None:
        server, kube = await cluster.start()
        node1 = cluster.client(cluster.token("node1"))
        node2 = cluster.client(cluster.token("node2"))
        try:
            assert uri_of((await node1.sign(csr_for(RATINGS_ID), 600))[0]) == [RATINGS_ID]
            assert uri_of((await node2.sign(csr_for(REVIEWS_ID), 600))[0]) == [REVIEWS_ID]
            assert await refusal(node1, REVIEWS_ID) == (
                f"CA refused: node node1 asked for {REVIEWS_ID}, but no pod or WorkloadEntry "
                "on node1 runs as ServiceAccount reviews in namespace default"
            )
            assert "no pod or WorkloadEntry on node2" in await refusal(node2, RATINGS_ID)
            for client in (node1, node2):  # an entry naming no node authorizes none
                assert "ServiceAccount legacy in namespace default" in await refusal(
                    client, LEGACY_ID
                )
            # an entry just applied is signable at once, and gone once deleted
            cluster.api.create(workload_entry("legacy-1", "legacy", "node1", "192.168.121.13"))
            assert uri_of((await node1.sign(csr_for(LEGACY_ID), 600))[0]) == [LEGACY_ID]
            cluster.api.delete(workload_entry("legacy-1", "legacy", "node1", ""))
            await asyncio.sleep(5.1)
            assert "no pod or WorkloadEntry on node1" in await refusal(node1, LEGACY_ID)
        finally:
            await node1.close()
            await node2.close()
            await server.stop(None)
            await kube.close()
        listed = [r for r in cluster.api.request_log if "workloadentries" in r.target]
        assert listed and all(
            r.target.startswith("/apis/networking.istio.io/v1/workloadentries") for r in listed
        )

    run(body)


def test_without_workload_entries_served_pods_still_place_identities(tmp_path: Path) -> None:
    """An API server without Istio's CRDs (404 at every version): pods alone decide."""
    resources = tuple(r for r in DEFAULT_RESOURCES if r.plural != "workloadentries")
    with KubeApiServer(resources=resources) as api:
        api.create(running_pod("client", ip="10.0.1.5", node="node1", service_account="client"))
        kubeconfig = api.kubeconfig(tmp_path / "kubeconfig")

        async def body() -> None:
            kube = kube_client(str(kubeconfig))
            authz = NodePodAuthorizer(kube, "cluster.local")
            try:
                await authz.authorize("node1", CLIENT_ID)
                with pytest.raises(NotAuthorized, match="no pod or WorkloadEntry on node1"):
                    await authz.authorize("node1", RATINGS_ID)
            finally:
                await kube.close()
            assert authz.entry_lists == 1

        run(body)
        asked = [(r.target.split("?")[0], r.status) for r in api.request_log]
        assert [a for a in asked if "workloadentries" in a[0]] == [
            ("/apis/networking.istio.io/v1/workloadentries", 404),
            ("/apis/networking.istio.io/v1beta1/workloadentries", 404),
        ]


def test_refusals_name_what_is_wrong_with_the_token(cluster: Cluster) -> None:
    cases = {
        "expired": (
            cluster.token("node1", expires_at=time.time() - 10),
            "CA refused: unauthenticated: the Kubernetes API rejected the token: "
            "[invalid bearer token, service account token has expired]",
        ),
        "wrong audience": (
            cluster.token("node1", audiences=(API_AUDIENCE,)),
            "CA refused: unauthenticated: the Kubernetes API rejected the token: [invalid "
            f'bearer token, token audiences ["{API_AUDIENCE}"] is invalid for the target '
            f'audiences ["{AUDIENCE}"]]',
        ),
        "another ServiceAccount": (
            cluster.token("node1", namespace="default", service_account="client", pod="client"),
            "CA refused: unauthenticated: the token is of system:serviceaccount:default:client, "
            "not of the agents' ServiceAccount nodeagent-system/nodeagent",
        ),
        "no node": (
            cluster.token("node1", bound=False),
            "CA refused: unauthenticated: the token of system:serviceaccount:nodeagent-system:"
            "nodeagent names no node (authentication.kubernetes.io/node-name): use the agent "
            "pod's projected ServiceAccount token (Kubernetes 1.30+ binds it to the node)",
        ),
    }

    async def body() -> None:
        server, kube = await cluster.start()
        try:
            for case, (token_file, expected) in cases.items():
                client = cluster.client(token_file)
                try:
                    assert await refusal(client, CLIENT_ID) == expected, case
                finally:
                    await client.close()
        finally:
            await server.stop(None)
            await kube.close()

    run(body)


def test_a_cached_review_ends_with_the_token(cluster: Cluster) -> None:
    async def body() -> None:
        server, kube = await cluster.start()
        client = cluster.client(cluster.token("node1", expires_at=time.time() + 2))
        try:
            assert len(await client.sign(csr_for(CLIENT_ID), 600)) == 2
            await asyncio.sleep(2.1)
            assert "service account token has expired" in await refusal(client, CLIENT_ID)
            assert cluster.reviews() == 2
        finally:
            await client.close()
            await server.stop(None)
            await kube.close()

    run(body)


def test_the_api_away_or_forbidding_tokenreview_is_unavailable_not_a_refusal(
    cluster: Cluster,
) -> None:
    weak = "weak-" + os.urandom(8).hex()
    cluster.api.allow_token(weak, tokenreview=False)
    forbidden = cluster.api.kubeconfig(cluster.root / "weak-kubeconfig", token=weak)

    async def body() -> None:
        server, kube = await cluster.start(forbidden)
        client = cluster.client(cluster.token("node1"))
        try:
            with pytest.raises(CaUnreachable) as e:
                await client.sign(csr_for(CLIENT_ID), 600)
            assert "CA at 127.0.0.1:" in str(e.value)
            assert (
                "the CA cannot check tokens now: the Kubernetes API refused to review the "
                "token: 403 Forbidden: " in str(e.value)
            )
            assert str(e.value).endswith("(does the CA's ServiceAccount have its ClusterRole?)")
        finally:
            await client.close()
            await server.stop(None)
            await kube.close()

        server, kube = await cluster.start()
        client = cluster.client(cluster.token("node1"))
        try:
            cluster.api.stop()
            with pytest.raises(CaUnreachable, match="cannot reach the Kubernetes API to review"):
                await client.sign(csr_for(CLIENT_ID), 600)
            cluster.api.start()
            assert len(await client.sign(csr_for(CLIENT_ID), 600)) == 2  # and it recovers
        finally:
            await client.close()
            await server.stop(None)
            await kube.close()

    run(body)


def test_the_review_cache_is_bounded(cluster: Cluster) -> None:
    async def body() -> None:
        kube = kube_client(str(cluster.kubeconfig))
        authn = ServiceAccountTokenAuthenticator(kube, AUDIENCE, cache_size=2)
        tokens = [Path(cluster.token("node1")).read_text() for _ in range(3)]
        try:
            for token in [*tokens, tokens[2], tokens[0]]:
                assert await authn.authenticate({"authorization": f"Bearer {token}"}) == "node1"
        finally:
            await kube.close()
        assert cluster.reviews() == 4  # tokens[0] was pushed out by the third

    run(body)


def test_ca_serve_with_kubernetes_auth(cluster: Cluster) -> None:
    argv = [sys.executable, "-m", "nodeagent", "ca", "serve", "--dir", str(cluster.ca_dir)]
    argv += ["--listen", cluster.addr, "--tls-name", "127.0.0.1", "--auth", "kubernetes"]
    argv += ["--kubeconfig", str(cluster.kubeconfig), "--audience", AUDIENCE]
    log = cluster.root / "ca.log"
    with log.open("w") as err:
        proc = subprocess.Popen(argv, stderr=err, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        deadline = time.monotonic() + 15
        while "listening on" not in log.read_text():
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, "the CA did not start"
            time.sleep(0.05)

        async def body() -> None:
            client = cluster.client(cluster.token("node1"))
            try:
                assert len(await client.sign(csr_for(CLIENT_ID), 600)) == 2
                assert "no pod or WorkloadEntry on node1" in await refusal(client, SERVER_ID)
            finally:
                await client.close()

        run(body)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = log.read_text()
    assert "CA authenticates agents by TokenReview (audience nodeagent-ca, ServiceAccount " in text
    assert f"CA signed {CLIENT_ID} for node node1" in text
    assert f"node node1 asked for {SERVER_ID}, but no pod or WorkloadEntry on node1" in text


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (
            ["--listen", "0.0.0.0:15012"],
            "--auth kubernetes on 0.0.0.0:15012 needs TLS (--tls or --tls-cert/--tls-key): "
            "ServiceAccount tokens must not cross the network in the clear",
        ),
        (
            ["--listen", "127.0.0.1:0", "--tls", "--kubeconfig", "/nonexistent/kubeconfig"],
            "cannot load the kubeconfig /nonexistent/kubeconfig: ",
        ),
        (
            ["--listen", "127.0.0.1:0", "--tls", "--agent-service-account", "nodeagent"],
            "agent ServiceAccount 'nodeagent': expected NAMESPACE/NAME, e.g. "
            "nodeagent-system/nodeagent",
        ),
    ],
)
def test_ca_serve_kubernetes_auth_refuses_a_bad_setup_at_start(
    cluster: Cluster, extra: list[str], message: str
) -> None:
    argv = [sys.executable, "-m", "nodeagent", "ca", "serve", "--dir", str(cluster.ca_dir)]
    argv += ["--auth", "kubernetes", "--kubeconfig", str(cluster.kubeconfig), *extra]
    p = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    assert p.returncode == 1
    assert message in p.stderr
    assert "Traceback" not in p.stderr
