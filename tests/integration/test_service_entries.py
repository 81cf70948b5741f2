"""ServiceEntries and ``outboundTrafficPolicy: REGISTRY_ONLY`` through the real ``Proxy``
on loopback (the rig of ``test_proxy_loopback``): a destination outside the registry is
closed before any byte and counted (``NR``) once the ``istio`` ConfigMap says
REGISTRY_ONLY, goes through once a ServiceEntry declares it, and a DNS ServiceEntry's
allocated address reaches the host its name resolves to."""

from __future__ import annotations

import hashlib
import os

from test_proxy_loopback import Echo, Rig, closed_without_data, round_trip, run

REGISTRY_ONLY = """
apiVersion: v1
kind: ConfigMap
metadata: {name: istio, namespace: istio-system}
data:
  mesh: |
    outboundTrafficPolicy:
      mode: REGISTRY_ONLY
"""


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

    run(False, body)
