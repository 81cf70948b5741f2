"""Cluster IPs for Services written without one, as the API server would allocate them.

In file mode nothing allocates a Service's ``spec.clusterIP``, and the sandbox and each
node's agent load the same directory on their own: so the address is a pure function of
the config. A Service's address is a hash of its ``namespace/name`` into the dynamic band
of ``SERVICE_CIDR``, probing upwards past addresses written explicitly and those given to
Services earlier in (namespace, name) order. It is the same in every process, on every
reload, and when other Services come and go (unless two hash to one address). Headless
Services (``clusterIP: None``) get no address, as in Kubernetes.

A ServiceEntry host gets one the same way (``with_entry_addresses``) from Istio's
auto-allocation range, ``ENTRY_CIDR``, unless Istio already wrote one to its
``status.addresses``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import ipaddress
from collections.abc import Sequence
from typing import Any

from nodeagent.model.entries import ServiceEntry, is_wildcard
from nodeagent.model.objects import Service

SERVICE_CIDR = ipaddress.IPv4Network("10.96.0.0/12")
"""kubeadm's default service CIDR (the examples' clusterIPs are in it); far from the pod
CIDRs of the sandbox (10.244.0.0/16) and of common CNIs."""
ENTRY_CIDR = ipaddress.IPv4Network("240.240.0.0/16")
"""Istio's range for ServiceEntry addresses it auto-allocates (class E: never routed)."""
STATIC_BAND = 256
"""The first addresses, left to clusterIPs written by hand (10.96.0.1 is the ``kubernetes``
Service's, 10.96.0.10 the DNS's), as Kubernetes' static subrange leaves them."""


def wants_address(raw: dict[str, Any]) -> bool:
    """A Service written without ``spec.clusterIP`` (or with ``""``), as users write them."""
    spec = raw.get("spec")
    return isinstance(spec, dict) and spec.get("clusterIP") in (None, "")


def _start(key: str, size: int) -> int:
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") % size


def allocate(
    keys: Sequence[str],
    taken: set[str],
    network: ipaddress.IPv4Network = SERVICE_CIDR,
    static_band: int = STATIC_BAND,
) -> dict[str, str]:
    """An address in ``network`` past its first ``static_band`` for each
    ``namespace/name`` in ``keys``, none of them in ``taken``."""
    first = int(network.network_address) + static_band
    size = network.num_addresses - static_band - 1  # not the broadcast address
    used = set(taken)
    out: dict[str, str] = {}
    for key in sorted(set(keys), key=lambda k: tuple(k.split("/", 1))):
        offset = _start(key, size)
        for step in range(size):
            addr = str(ipaddress.IPv4Address(first + (offset + step) % size))
            if addr not in used:
                break
        else:
            continue  # a million Services: leave the rest without an address
        used.add(addr)
        out[key] = addr
    return out


def with_cluster_ips(
    pairs: Sequence[tuple[dict[str, Any], object]],
) -> list[tuple[dict[str, Any], object]]:
    """``pairs`` with an allocated address on each Service written without a clusterIP
    (in the model object, and in the raw object as the API server would show it)."""
    services = [obj for _, obj in pairs if isinstance(obj, Service)]
    wanting = [obj.key for raw, obj in pairs if isinstance(obj, Service) and wants_address(raw)]
    if not wanting:
        return list(pairs)
    taken = {s.cluster_ip for s in services if s.cluster_ip is not None}
    addresses = allocate(wanting, taken)
    out: list[tuple[dict[str, Any], object]] = []
    for raw, obj in pairs:
        addr = addresses.get(obj.key) if isinstance(obj, Service) and wants_address(raw) else None
        if addr is not None and isinstance(obj, Service):
            spec = {**raw["spec"], "clusterIP": addr, "clusterIPs": [addr]}
            raw, obj = {**raw, "spec": spec}, dataclasses.replace(obj, cluster_ip=addr)
        out.append((raw, obj))
    return out


def with_entry_addresses(
    pairs: Sequence[tuple[dict[str, Any], object]],
) -> list[tuple[dict[str, Any], object]]:
    """``pairs`` with an address for each host of a ServiceEntry written without
    addresses (``ServiceEntry.wants_addresses``; not for wildcard hosts), keyed by
    ``namespace/host``: in the model object and, as Istio writes them, in the raw
    object's ``status.addresses``."""
    entries = [o for _, o in pairs if isinstance(o, ServiceEntry) and o.wants_addresses()]
    if not entries:
        return list(pairs)
    taken = {a for _, o in pairs if isinstance(o, ServiceEntry) for _, a in o.auto_addresses}
    wanting = [
        f"{se.namespace}/{h}"
        for se in entries
        for h in se.hosts
        if not is_wildcard(h) and h not in dict(se.auto_addresses)
    ]
    addresses = allocate(wanting, taken, ENTRY_CIDR, 1)
    out: list[tuple[dict[str, Any], object]] = []
    for raw, obj in pairs:
        if isinstance(obj, ServiceEntry) and obj.wants_addresses():
            have = dict(obj.auto_addresses)
            for h in obj.hosts:
                addr = addresses.get(f"{obj.namespace}/{h}")
                if addr is not None and h not in have:
                    have[h] = addr
            auto = tuple((h, have[h]) for h in obj.hosts if h in have)
            status = [{"value": a, "host": h} for h, a in auto]
            # status is the API server's, never checked: anything but a mapping is dropped
            old = raw.get("status")
            raw = {**raw, "status": {**(old if isinstance(old, dict) else {}), "addresses": status}}
            obj = dataclasses.replace(obj, auto_addresses=auto)
        out.append((raw, obj))
    return out
