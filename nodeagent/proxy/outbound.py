"""Outbound connections (a pod's 15001 listener): decide once, then dispatch.

``core.outbound``'s ``Planner`` makes the whole decision from the original destination (refuse,
pass through, plain TCP or HBONE to an endpoint, plain TCP to a DNS ServiceEntry's host
name, or the L7 path); ``Outbound`` then does what the plan says in one ``match``, and
decides nothing more (a host name is resolved with the event loop's resolver). The L7
path's per-request upstreams (``connector``) are plain TCP or HBONE streams by the same
``tunnels`` rule.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Callable

from nodeagent.core.clusters import Clusters
from nodeagent.core.outbound import (
    Dns,
    Hbone,
    Http1,
    Http2,
    Passthrough,
    Planner,
    Refuse,
    Tcp,
    is_name,
    tunnels,
)
from nodeagent.errors import PeerError
from nodeagent.model.objects import Pod, Service, ServicePort
from nodeagent.model.snapshot import Endpoint, MeshSnapshot
from nodeagent.proxy.connections import tcp_telemetry
from nodeagent.proxy.h1pool import ConnectFn
from nodeagent.proxy.hbone import HBONE_PORT
from nodeagent.proxy.inputs import Addr, ProxyInputs
from nodeagent.proxy.l7 import Downstream
from nodeagent.proxy.pipe import Pipe
from nodeagent.proxy.plumbing import Plumbing
from nodeagent.proxy.pods import PodProxy
from nodeagent.proxy.relay import ClientSide, Relay, UpstreamSide

log = logging.getLogger("nodeagent.proxy")


class Outbound:
    """The outbound handler of every local pod."""

    def __init__(
        self,
        inputs: ProxyInputs,
        plumbing: Plumbing,
        clusters: Clusters,
        random: Callable[[], float],
    ) -> None:
        self.inputs = inputs
        self.plumbing = plumbing
        self.clusters = clusters
        self.mtls = inputs.identity is not None
        """The agent holds identities: mesh connections may go through HBONE."""
        self.planner = Planner(clusters=clusters, random=random, mtls=self.mtls)
        """Decides each connection (``random`` draws VirtualService ``tcp[]`` weighted
        picks); remembers what the snapshot alone decides."""

    def accept(self, pp: PodProxy) -> Callable[[], asyncio.Protocol]:
        return self.plumbing.accept(pp, "outbound", self._serve)

    def _serve(self, pp: PodProxy, side: ClientSide) -> None:
        """Decide at once (in ``connection_made``); only what must wait for a name or
        requests gets a Task (a plain TCP dial and a tunnel's CONNECT go on by
        callbacks)."""
        p = self.plumbing
        relay = side.relay
        got = p.captured(side, "outbound")
        if got is None:
            return
        dst = got[0]
        snap = self.inputs.snapshot()
        match self.planner.plan(snap, pp.pod, dst[0], dst[1]):
            case Refuse(flag, reason):
                p.refuse(relay, "outbound", flag, reason)
            case Passthrough():
                relay.meta["direction"] = "passthrough"
                tcp_telemetry(relay.meta, "source", pp.pod, None, None, "PassthroughCluster")
                p.dial(pp, relay, dst, "passthrough")
            case Tcp(ep, svc, host):
                _peer(relay, ep, svc)
                tcp_telemetry(relay.meta, "source", pp.pod, ep.pod, svc, host)
                p.dial(pp, relay, (ep.ip, ep.port), "outbound")
            case Dns(ep, svc, host):
                _peer(relay, ep, svc)
                tcp_telemetry(relay.meta, "source", pp.pod, None, svc, host)
                p.spawn(self._dial_name(pp, relay, ep, host))
            case Hbone(ep, svc, host):
                _peer(relay, ep, svc)
                p.run(self._tunnel(pp, relay, snap, ep, svc, host))
            case Http1(ep, svc, port):
                _peer(relay, ep, svc)
                p.spawn(self._serve_l7(pp, side, svc, port, "http1"))
            case Http2(ep, svc, port):
                _peer(relay, ep, svc)
                p.spawn(self._serve_l7(pp, side, svc, port, "h2"))

    async def _dial_name(self, pp: PodProxy, relay: Relay, ep: Endpoint, host: str) -> None:
        """A DNS ServiceEntry's endpoint: resolved, then dialled."""
        addr = await self._resolve(ep)
        if addr is None:
            self.plumbing.refuse(relay, "outbound", "UF", f"cannot resolve {ep.ip} ({host})")
        else:
            self.plumbing.dial(pp, relay, addr, "outbound")

    async def _resolve(self, ep: Endpoint) -> Addr | None:
        """A DNS ServiceEntry's host name to an IPv4 address, by the node's resolver."""
        try:
            infos = await asyncio.get_running_loop().getaddrinfo(
                ep.ip, ep.port, family=socket.AF_INET, type=socket.SOCK_STREAM
            )
        except OSError:
            return None
        return (str(infos[0][4][0]), ep.port) if infos else None

    async def _serve_l7(
        self, pp: PodProxy, side: ClientSide, svc: Service, port: ServicePort, proto: str
    ) -> None:
        """Hand the client connection to the L7 path: requests are routed one by one."""
        relay = side.relay
        t = side.transport
        assert t is not None
        relay.meta["direction"] = "outbound-http"
        relay.meta["upstream"] = "per request"
        client_ip = str(relay.meta.get("source", "")).rsplit(":", 1)[0]
        ds = Downstream(
            pod=pp.pod,
            source_principal=self.inputs.principal(pp.pod) if self.mtls else "unknown",
            source_ip=client_ip,
            service=svc,
            port=port,
            connect=self._connector(pp, client_ip),
            meta=relay.meta,
        )
        pipe = Pipe()
        pending, relay.pending = relay.pending, []
        pipe.adopt(t, pending)
        await self.plumbing.serve_http(ds, pipe, relay, proto)

    def _connector(self, pp: PodProxy, client_ip: str) -> ConnectFn:
        """How the L7 path of ``pp``'s clients reaches an endpoint: plain TCP from the
        pod's network where mTLS is off for it, else an HBONE stream."""

        async def connect(ep: Endpoint, pipe: Pipe) -> tuple[str, str]:
            snap = self.inputs.snapshot()
            if tunnels(snap, ep, self.mtls):
                return await self._open_tunnel(pp, snap, ep, client_ip, pipe)
            if is_name(ep):  # a DNS ServiceEntry's: resolved here, never by a blocking connect
                addr = await self._resolve(ep)
                if addr is None:
                    raise PeerError(f"cannot resolve {ep.ip}")
                ep = Endpoint(ep.pod, addr[0], ep.port)
            await self.plumbing.connect_plain(pp, ep, pipe)
            return f"{ep.ip}:{ep.port}", "unknown"

        return connect

    async def _tunnel(
        self,
        pp: PodProxy,
        relay: Relay,
        snap: MeshSnapshot,
        ep: Endpoint,
        svc: Service | None,
        service_host: str,
    ) -> None:
        tcp_telemetry(
            relay.meta,
            "source",
            pp.pod,
            ep.pod,
            svc,
            service_host,
            src_principal=self.inputs.principal(pp.pod),
            dst_principal=self.inputs.principal(ep.pod),
        )
        client_ip = str(relay.meta.get("source", "")).rsplit(":", 1)[0]
        obs = self.inputs.table.observer  # a sampled connection's CONNECT names its span
        tp = obs.tcp_opened(relay, pp.pod) if obs is not None else None
        try:
            relay.meta["upstream"], _ = await self._open_tunnel(
                pp, snap, ep, client_ip, UpstreamSide(relay), tp
            )
        except PeerError as e:
            if not relay.closed:
                self.plumbing.refuse(relay, "outbound", "UF", str(e))
            return
        if relay.closed:
            return
        relay.meta["counted"] = True
        self.inputs.table.counted(relay)

    def _hbone_peer(self, snap: MeshSnapshot, dst: Pod) -> str:
        """The address to tunnel to for ``dst``: one pod per (node, identity), so tunnels
        are pooled per (source identity, destination identity, destination node)."""
        index = self.plumbing.index(snap)
        peer = index.tunnel_peer.get((dst.node_name, self.inputs.principal(dst)))
        return peer or dst.pod_ip or ""

    async def _open_tunnel(
        self,
        pp: PodProxy,
        snap: MeshSnapshot,
        ep: Endpoint,
        client_ip: str,
        protocol: asyncio.BaseProtocol,
        traceparent: str | None = None,
    ) -> tuple[str, str]:
        """An HBONE stream from ``pp`` to ``ep`` wired to ``protocol``: (a description of
        the path, the destination's identity). Raises ``PeerError``
        (``ConnectRefusedError`` when the destination answered non-200)."""
        pool = pp.pool
        if pool is None:
            raise PeerError(f"pod {pp.pod.key} has no HBONE pool yet")
        dst_id = self.inputs.principal(ep.pod)
        peer: Addr = (self._hbone_peer(snap, ep.pod), HBONE_PORT)
        await pool.open_stream(
            source_identity=self.inputs.principal(pp.pod),
            expected_identity=dst_id,
            peer=peer,
            authority=f"{ep.ip}:{ep.port}",
            headers=_headers(pp.pod, client_ip, traceparent),
            protocol=protocol,
        )
        return f"hbone {peer[0]}:{peer[1]} -> {ep.ip}:{ep.port}", dst_id


def _headers(pod: Pod, client_ip: str, traceparent: str | None = None) -> dict[str, str]:
    """A CONNECT's headers: the client pod's name (``baggage``) and address
    (``forwarded``, RFC 7239: an IPv6 address quoted and bracketed; left out when not
    known, as the receiver refuses a ``for=`` that is no IP address), and the L4 span's
    ``traceparent`` when the connection is sampled."""
    out = {"baggage": f"k8s.namespace.name={pod.namespace},k8s.pod.name={pod.name}"}
    if traceparent is not None:
        out["traceparent"] = traceparent
    if ":" in client_ip:
        out["forwarded"] = f'for="[{client_ip}]"'
    elif client_ip[:1].isdigit():
        out["forwarded"] = f"for={client_ip}"
    return out


def _peer(relay: Relay, ep: Endpoint, svc: Service | None) -> None:
    """What the connection table shows of a mesh destination."""
    relay.meta["service"] = svc.key if svc is not None else ""
    relay.meta["peer"] = ep.pod.key
