"""``source.ip`` of a tunnelled connection, as an attacker holding a valid certificate
would try to forge it: HBONE CONNECTs with a chosen ``forwarded: for=`` header sent to
the real receiving proxy (the loopback rig of ``test_proxy_loopback``: real TLS, the real
HBONE server, ``InboundPolicy``, the L7 path and the access log).

The forwarded address is believed only as far as the peer's identity allows: it must be
an IP address (else the CONNECT is refused, 400), a pod there must run as the peer's
identity (else refused, 400), and an address of no known pod is replaced by the tunnel's
own peer address.
"""

from __future__ import annotations

import asyncio
from typing import cast

import pytest
from certs import spiffe_id
from test_proxy_loopback import (
    CLIENT_IP,
    HBONE_PORT,
    HTTP_PORT,
    SERVER_IP,
    TCP_PORT,
    Rig,
    eventually,
    run,
)

from nodeagent.errors import ConnectRefusedError
from nodeagent.model.objects import PodRuntime
from nodeagent.model.snapshot import MeshSnapshot

REPLICA_IP, OTHER_IP, OUTSIDE_IP = "10.244.3.11", "10.244.3.12", "192.0.2.7"
FLAG = "FORWARDED_FOR"

# Two more pods on a third node: a replica running as the client's identity, and a
# pod of another identity.
PODS = """
apiVersion: v1
kind: Pod
metadata: {name: client-2, namespace: default, labels: {app: client}}
spec: {nodeName: node3, serviceAccountName: client, containers: [{name: c, image: x}]}
---
apiVersion: v1
kind: Pod
metadata: {name: other, namespace: default, labels: {app: other}}
spec: {nodeName: node3, serviceAccountName: other, containers: [{name: c, image: x}]}
"""


def deny_ips(*blocks: str) -> str:
    return f"""
    apiVersion: security.istio.io/v1
    kind: AuthorizationPolicy
    metadata: {{name: deny-ips, namespace: default}}
    spec:
      selector: {{matchLabels: {{app: echo}}}}
      action: DENY
      rules:
      - from: [{{source: {{ipBlocks: [{", ".join(blocks)}]}}}}]
    """


# The client's real addresses: its pod IP, and loopback, where the rig's tunnels come from.
DENY_CLIENT_IPS = deny_ips(f"{CLIENT_IP}/32", "127.0.0.0/8")


DENY_ADMIN = """
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: no-admin, namespace: default}
spec:
  selector: {matchLabels: {app: echo}}
  action: DENY
  rules:
  - to: [{operation: {paths: ["/admin*"]}}]
"""


class MoreRig(Rig):
    def _load(self) -> MeshSnapshot:
        (self.dir / "pods.yaml").write_text(PODS)
        return super()._load()

    def runtimes(self) -> dict[str, PodRuntime]:
        return {
            "default/client-2": PodRuntime("default/client-2", REPLICA_IP, "node3", "ns-c2"),
            "default/other": PodRuntime("default/other", OTHER_IP, "node3", "ns-other"),
        }


class Collect(asyncio.Protocol):
    """The attacker's end of a stream: what came back, and its end."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.data = b""
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.data += data

    def eof_received(self) -> bool:
        if not self.done.done():
            self.done.set_result(None)
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            self.done.set_result(None)


async def forge(rig: Rig, forwarded: str, port: int = TCP_PORT) -> Collect:
    """A CONNECT to the server pod from the client pod's tunnel pool (its valid
    certificate), with ``forwarded`` as the header's value."""
    pool = rig.proxies["node1"].pods["default/client"].pool
    assert pool is not None
    proto = Collect()
    await pool.open_stream(
        source_identity=spiffe_id("default", "client"),
        expected_identity=spiffe_id("default", "server"),
        peer=(SERVER_IP, HBONE_PORT),
        authority=f"{SERVER_IP}:{port}",
        headers={"forwarded": forwarded},
        protocol=proto,
    )
    return proto


async def refused(rig: Rig, forwarded: str) -> int:
    """The status the server answered a forged CONNECT with (200: opened)."""
    try:
        proto = await forge(rig, forwarded)
    except ConnectRefusedError as e:
        return e.status
    assert proto.transport is not None
    proto.transport.close()
    return 200


async def echoed(rig: Rig, forwarded: str) -> bytes:
    proto = await forge(rig, forwarded)
    assert proto.transport is not None
    proto.transport.write(b"ping")
    proto.transport.write_eof()
    await proto.done
    return proto.data


@pytest.mark.parametrize(
    "value",
    ["for=not-an-ip", "for=unknown", 'for="_hidden"', "for=", f"for={CLIENT_IP}, for=1.2.3.4"],
)
def test_a_forwarded_address_that_is_not_one_ip_is_refused_and_counted(value: str) -> None:
    async def body(rig: Rig) -> None:
        rig.apply(DENY_CLIENT_IPS)
        accepted = rig.echo.accepted
        assert await refused(rig, value) == 400
        assert rig.echo.accepted == accepted  # the app never saw it
        assert rig.failures("node2", "inbound", FLAG) == 1
        rec = rig.proxies["node2"].inputs.access_log.recent[-1]
        assert rec["response_flags"] == FLAG
        assert "forwarded" in str(rec["detail"])

    run(True, body, MoreRig)


def test_the_address_of_another_identitys_pod_is_refused() -> None:
    async def body(rig: Rig) -> None:
        rig.apply(DENY_CLIENT_IPS)  # what the forged address tries to slip past
        accepted = rig.echo.accepted
        assert await refused(rig, f"for={OTHER_IP}") == 400
        assert rig.echo.accepted == accepted
        assert rig.failures("node2", "inbound", FLAG) == 1
        detail = str(rig.proxies["node2"].inputs.access_log.recent[-1]["detail"])
        assert spiffe_id("default", "other") in detail  # both identities named
        assert spiffe_id("default", "client") in detail

    run(True, body, MoreRig)


def test_an_address_of_no_known_pod_is_replaced_by_the_tunnels_peer() -> None:
    async def body(rig: Rig) -> None:
        assert await echoed(rig, f"for={OUTSIDE_IP}") == b"ping"  # believed: allowed
        rig.apply(DENY_CLIENT_IPS)
        assert await refused(rig, f"for={OUTSIDE_IP}") == 403  # the peer's address denied
        assert rig.failures("node2", "inbound", "RBAC") == 1
        assert rig.failures("node2", "inbound", FLAG) == 0

    run(True, body, MoreRig)


def test_a_forward_from_the_right_identity_is_believed() -> None:
    async def body(rig: Rig) -> None:
        # the replica's address: same identity, so believed by policy ...
        rig.apply(deny_ips(f"{REPLICA_IP}/32"))
        assert await refused(rig, f"for={REPLICA_IP}") == 403
        assert rig.proxies["node2"].inputs.access_log.recent[-1]["source_workload"] == "client-2"
        assert await refused(rig, f'for="{REPLICA_IP}:4711"') == 403
        assert await echoed(rig, f"for={CLIENT_IP}") == b"ping"
        assert rig.failures("node2", "inbound", FLAG) == 0
        # ... and by the access log, which names the replica
        rig.apply(DENY_ADMIN)  # an HTTP rule: the port is served request by request
        proto = await forge(rig, f"For={REPLICA_IP};proto=http", HTTP_PORT)
        assert proto.transport is not None
        proto.transport.write(b"GET /who HTTP/1.1\r\nhost: echo\r\n\r\n")
        await eventually(lambda: proto.data.endswith(b"/who"), "the app's answer")
        assert proto.data.startswith(b"HTTP/1.1 200"), proto.data
        proto.transport.close()
        log = rig.proxies["node2"].inputs.access_log.recent
        await eventually(lambda: any(r["path"] == "/who" for r in log), "the access log")
        (rec,) = [r for r in log if r["path"] == "/who"]
        assert (rec["source_workload"], rec["response_code"]) == ("client-2", 200)

    run(True, body, MoreRig)


def test_a_forwarded_ipv6_address_is_parsed() -> None:
    async def body(rig: Rig) -> None:
        rig.apply(deny_ips("2001:db8::/32"))
        # no pod there: the peer's address is used, so the DENY does not apply
        assert await echoed(rig, 'for="[2001:db8::1]"') == b"ping"
        assert await echoed(rig, 'for="[2001:db8::1]:4711"') == b"ping"
        assert await refused(rig, 'for="[2001:db8::1"') == 400

    run(True, body, MoreRig)
