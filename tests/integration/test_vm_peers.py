"""A VM's workload (a ``WorkloadEntry``) as a peer of the mesh, through the real proxies
on loopback (the rig of ``test_proxy_loopback``: real TLS, the real HBONE client and
server, ``InboundPolicy``, the metrics and the access log).

As a client, the VM's agent is played by a real ``HboneClientPool`` holding the VM's own
certificate and dialling from the entry's address (127.0.0.50): the receiving node takes
the VM's workload from its address and identity, AuthorizationPolicy on its principal,
namespace and address decides, and the metrics and access log name it. As a server, a
real ``HboneServer`` with the VM's certificate stands at the entry's port 15008: a pod's
connection to the VM's Service names the entry as its destination workload.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Awaitable, Callable
from typing import cast

from certs import spiffe_id
from test_proxy_loopback import (
    HBONE_PORT,
    SERVER_IP,
    TCP_PORT,
    Addr,
    Rig,
    closed_without_data,
    eventually,
    run,
)
from test_source_ip import Collect

from nodeagent.errors import ConnectRefusedError
from nodeagent.model.snapshot import MeshSnapshot
from nodeagent.proxy.hbone_client import HboneClientPool
from nodeagent.proxy.hbone_server import ConnectRequest, HboneServer, start_hbone_server

VM_IP, VM_OTHER_IP = "127.0.0.50", "127.0.0.51"
VM_SERVICE_IP, VM_PORT = "10.96.0.30", 9080
VM_ID = spiffe_id("default", "ratings")
CLIENT_ID, SERVER_ID = spiffe_id("default", "client"), spiffe_id("default", "server")

VM = f"""
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata:
  name: ratings-vm-1
  namespace: default
  annotations: {{nodeagent.io/node: vm-1}}
spec:
  address: {VM_IP}
  labels: {{app: ratings}}
  serviceAccount: ratings
---
apiVersion: v1
kind: Service
metadata: {{name: ratings, namespace: default}}
spec:
  selector: {{app: ratings}}
  clusterIP: {VM_SERVICE_IP}
  ports: [{{name: tcp, port: {VM_PORT}}}]
"""


def policy(action: str, source: str) -> str:
    return f"""
    apiVersion: security.istio.io/v1
    kind: AuthorizationPolicy
    metadata: {{name: vm-{action.lower()}, namespace: default}}
    spec:
      selector: {{matchLabels: {{app: echo}}}}
      action: {action}
      rules:
      - from: [{{source: {source}}}]
    """


class VmRig(Rig):
    def _load(self) -> MeshSnapshot:
        (self.dir / "vm.yaml").write_text(VM)
        return super()._load()

    def identities(self) -> set[str]:
        return {VM_ID}

    def vm_pool(self, source_ip: str = VM_IP) -> HboneClientPool:
        """The VM agent's tunnels: its certificate, dialled from ``source_ip``."""
        assert self.identity is not None
        net = self.net

        async def dial(addr: Addr) -> socket.socket:
            s = socket.socket()
            s.bind((source_ip, 0))
            s.setblocking(False)
            try:
                await asyncio.get_running_loop().sock_connect(s, net.listeners[addr])
            except OSError:
                s.close()
                raise
            return s

        return HboneClientPool(dial, self.identity.client_context, 2.0)

    async def vm_echo(self, *, source_ip: str = VM_IP, forwarded: str = VM_IP) -> bytes | int:
        """The VM's workload sends ``ping`` to the server pod through its agent's tunnel:
        what came back, or the status the CONNECT was refused with."""
        pool = self.vm_pool(source_ip)
        try:
            proto = Collect()
            await pool.open_stream(
                source_identity=VM_ID,
                expected_identity=SERVER_ID,
                peer=(SERVER_IP, HBONE_PORT),
                authority=f"{SERVER_IP}:{TCP_PORT}",
                headers={"forwarded": f"for={forwarded}"},
                protocol=proto,
            )
            assert proto.transport is not None
            proto.transport.write(b"ping")
            proto.transport.write_eof()
            await proto.done
            return proto.data
        except ConnectRefusedError as e:
            return e.status
        finally:
            pool.close()

    async def pod_claims_vm(self) -> int:
        """The client pod's tunnel (its own valid certificate) claims the VM's address."""
        pool = self.proxies["node1"].pods["default/client"].pool
        assert pool is not None
        proto = Collect()
        try:
            await pool.open_stream(
                source_identity=CLIENT_ID,
                expected_identity=SERVER_ID,
                peer=(SERVER_IP, HBONE_PORT),
                authority=f"{SERVER_IP}:{TCP_PORT}",
                headers={"forwarded": f"for={VM_IP}"},
                protocol=proto,
            )
        except ConnectRefusedError as e:
            return e.status
        assert proto.transport is not None
        proto.transport.close()
        return 200

    def opened(self, node: str) -> list[dict[str, str]]:
        """The label sets of ``node``'s ``istio_tcp_connections_opened_total``."""
        return [
            dict(sample.labels)
            for family in self.metrics[node].registry.collect()
            if family.name == "istio_tcp_connections_opened"
            for sample in family.samples
        ]


def run_vm(body: Callable[[VmRig], Awaitable[None]]) -> None:
    run(True, lambda rig: body(cast(VmRig, rig)), VmRig)


def test_the_receiving_node_names_the_vm_from_its_address_and_identity() -> None:
    async def body(rig: VmRig) -> None:
        assert await rig.vm_echo() == b"ping"
        await eventually(lambda: bool(rig.opened("node2")), "node2's inbound metrics")
        (series,) = rig.opened("node2")
        assert series["reporter"] == "destination"
        assert series["source_workload"] == "ratings-vm-1"  # not "unknown"
        assert series["source_workload_namespace"] == "default"
        assert series["source_principal"] == VM_ID
        assert series["connection_security_policy"] == "mutual_tls"

    run_vm(body)


def test_policy_on_the_vms_principal_allows_and_denies_it() -> None:
    async def body(rig: VmRig) -> None:
        rig.apply(policy("ALLOW", "{principals: [cluster.local/ns/default/sa/ratings]}"))
        assert await rig.vm_echo() == b"ping"
        accepted = rig.echo.accepted
        assert await closed_without_data(*await rig.connect((SERVER_IP, TCP_PORT)))
        assert rig.echo.accepted == accepted  # the client pod: no ALLOW rule for it

        rig.apply(policy("DENY", "{principals: [cluster.local/ns/default/sa/ratings]}"))
        assert await rig.vm_echo() == 403
        assert rig.echo.accepted == accepted
        rec = rig.proxies["node2"].inputs.access_log.recent[-1]
        assert rec["response_flags"] == "RBAC"
        assert (rec["source_workload"], rec["source_principal"]) == ("ratings-vm-1", VM_ID)

    run_vm(body)


def test_policy_on_the_vms_address_and_namespace() -> None:
    async def body(rig: VmRig) -> None:
        rig.apply(policy("DENY", f"{{ipBlocks: [{VM_IP}/32]}}"))
        assert await rig.vm_echo() == 403
        # the VM's agent dials from another of its addresses: its claim is believed
        assert await rig.vm_echo(source_ip=VM_OTHER_IP) == 403
        rig.apply(policy("DENY", "{namespaces: [default], notPrincipals: ['*/sa/client']}"))
        assert await rig.vm_echo() == 403
        rig.apply(policy("DENY", "{namespaces: [elsewhere]}"))
        assert await rig.vm_echo() == b"ping"

    run_vm(body)


def test_a_pod_claiming_the_vms_address_is_refused() -> None:
    async def body(rig: VmRig) -> None:
        assert await rig.pod_claims_vm() == 400
        rec = rig.proxies["node2"].inputs.access_log.recent[-1]
        assert rec["response_flags"] == "FORWARDED_FOR"
        assert "WorkloadEntry default/ratings-vm-1" in str(rec["detail"])

    run_vm(body)


class VmServer(asyncio.Protocol):
    """The VM's app behind its agent's HBONE port: echoes, and one close ends it."""

    def __init__(self) -> None:
        self.transport: asyncio.WriteTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.WriteTransport, transport)

    def data_received(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.write(data)

    def eof_received(self) -> bool:
        assert self.transport is not None
        self.transport.write_eof()
        return True


def test_a_pods_connection_to_the_vm_names_it_as_destination() -> None:
    seen: list[ConnectRequest] = []

    async def on_connect(req: ConnectRequest) -> asyncio.BaseProtocol:
        seen.append(req)
        return VmServer()

    async def body(rig: VmRig) -> None:
        assert rig.identity is not None
        identity = rig.identity
        sock = socket.socket()
        sock.bind((VM_IP, 0))
        sock.listen(16)
        sock.setblocking(False)
        rig.net.listeners[(VM_IP, HBONE_PORT)] = sock.getsockname()
        server: HboneServer = await start_hbone_server(
            sock, lambda: identity.server_context(VM_ID), on_connect
        )
        try:
            r, w = await rig.connect((VM_SERVICE_IP, VM_PORT))
            w.write(b"ping")
            assert await r.readexactly(4) == b"ping"
            w.close()
            assert [(q.peer_identity, q.authority) for q in seen] == [
                (CLIENT_ID, f"{VM_IP}:{VM_PORT}")
            ]
            (series,) = rig.opened("node1")
            assert series["reporter"] == "source"
            assert series["destination_workload"] == "ratings-vm-1"
            assert series["destination_workload_namespace"] == "default"
            assert series["destination_principal"] == VM_ID
            assert series["connection_security_policy"] == "mutual_tls"
        finally:
            server.close()

    run_vm(body)
