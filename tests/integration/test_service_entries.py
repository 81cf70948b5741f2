"""ServiceEntries and ``outboundTrafficPolicy: REGISTRY_ONLY`` through the real ``Proxy``
on loopback (the rig of ``test_proxy_loopback``): a destination outside the registry is
closed before any byte and counted (``NR``) once the ``istio`` ConfigMap says
REGISTRY_ONLY, goes through once a ServiceEntry declares it, and a DNS ServiceEntry's
allocated address reaches the host its name resolves to."""

from __future__ import annotations

import hashlib
import ipaddress
import os
import socket
from pathlib import Path

from test_proxy_loopback import (
    Addr,
    Echo,
    LoopbackPod,
    Network,
    Rig,
    closed_without_data,
    http_app,
    round_trip,
    run,
)

from nodeagent.model.objects import PodRuntime

REGISTRY_ONLY = """
apiVersion: v1
kind: ConfigMap
metadata: {name: istio, namespace: istio-system}
data:
  mesh: |
    outboundTrafficPolicy:
      mode: REGISTRY_ONLY
"""


class NumericPod(LoopbackPod):
    """A pod's sockets that, like the node's (``redirect/sockets.connect_in``), take only
    numeric addresses: a name there would be resolved by a blocking ``connect()``."""

    async def connect(self, addr: Addr, timeout: float, source: str | None = None) -> socket.socket:
        ipaddress.ip_address(addr[0])  # raises on a host name
        return await super().connect(addr, timeout, source)


class NumericNetwork(Network):
    def pod(self, runtime: PodRuntime) -> LoopbackPod:
        return NumericPod(self, runtime.ip)


class NumericRig(Rig):
    def __init__(self, tmp: Path, mtls: bool) -> None:
        super().__init__(tmp, mtls)
        self.net = NumericNetwork()


def entry(port: int, *, resolution: str, host: str, addresses: str = "") -> str:
    return f"""
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: outside, namespace: default}}
spec:
  hosts: [{host}]
  {addresses}
  ports: [{{number: {port}, name: tcp, protocol: TCP}}]
  location: MESH_EXTERNAL
  resolution: {resolution}
"""


def test_registry_only_refuses_what_no_service_entry_declares() -> None:
    async def body(rig: Rig) -> None:
        outside = Echo()
        addr = await outside.start()
        try:
            rig.apply(REGISTRY_ONLY)
            assert await closed_without_data(*await rig.connect(addr))
            assert rig.failures("node1", "outbound", "NR") == 1
            assert outside.accepted == 0
            known = f"addresses: [{addr[0]}]"
            declared = entry(addr[1], resolution="NONE", host="outside.example", addresses=known)
            rig.apply(REGISTRY_ONLY + declared)
            payload = os.urandom(50_000)
            digest, _ = await round_trip(*await rig.connect(addr), payload)
            assert digest == hashlib.sha256(payload).hexdigest()
            assert outside.accepted == 1
            assert rig.failures("node1", "outbound", "NR") == 1
        finally:
            assert outside.server is not None
            outside.server.close()

    run(False, body)


def test_a_dns_service_entry_reaches_the_host_its_name_resolves_to() -> None:
    async def body(rig: Rig) -> None:
        outside = Echo()
        addr = await outside.start()
        try:
            rig.apply(REGISTRY_ONLY + entry(addr[1], resolution="DNS", host="localhost"))
            svc = rig.snap.service_for_host("localhost")
            assert svc is not None and svc.cluster_ip is not None
            assert svc.cluster_ip.startswith("240.240.")  # auto-allocated, as Istio does
            payload = os.urandom(50_000)
            digest, _ = await round_trip(*await rig.connect((svc.cluster_ip, addr[1])), payload)
            assert digest == hashlib.sha256(payload).hexdigest()
            assert outside.accepted == 1
        finally:
            assert outside.server is not None
            outside.server.close()

    run(False, body, NumericRig)


def test_an_http_service_entry_is_routed_and_its_host_resolved_per_request() -> None:
    async def body(rig: Rig) -> None:
        app = await http_app()
        port = app.sockets[0].getsockname()[1]
        try:
            http = entry(port, resolution="DNS", host="localhost").replace(
                "protocol: TCP", "protocol: HTTP"
            )
            rig.apply(REGISTRY_ONLY + http)
            svc = rig.snap.service_for_host("localhost")
            assert svc is not None and svc.cluster_ip is not None
            r, w = await rig.connect((svc.cluster_ip, port))
            w.write(b"GET /ext HTTP/1.1\r\nhost: localhost\r\n\r\n")
            head = await r.readuntil(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 200"), head
            answer = b"hello from server: /ext"
            assert await r.readexactly(len(answer)) == answer
            w.close()
        finally:
            app.close()

    run(False, body, NumericRig)
