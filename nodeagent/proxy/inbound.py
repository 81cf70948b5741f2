"""Inbound connections to local pods: plaintext on each pod's 15006 listener, HBONE
``CONNECT`` streams on its 15008 listener. Each is admitted by the pod's policies
(PeerAuthentication, AuthorizationPolicy, connection rate limits) before any byte reaches
the app, then relayed, or served request by request when the port speaks HTTP; live
connections are re-checked when policy changes (``recheck``), and every refusal by
policy is counted, logged and written to the access log (``denied``).

Policy decisions are ``InboundPolicy``'s (``proxy.admission``) and ``core``'s; this
module only applies them.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import ipaddress
import logging
import time
from collections.abc import Callable, Mapping

from nodeagent.core import authz
from nodeagent.core.authz import AuthzRequest
from nodeagent.core.peerauth import effective_mtls
from nodeagent.errors import PeerError
from nodeagent.model.objects import NO_SOURCE, Pod
from nodeagent.model.snapshot import Endpoint, MeshSnapshot
from nodeagent.proxy.admission import HttpPort, InboundPolicy
from nodeagent.proxy.connections import tcp_telemetry
from nodeagent.proxy.hbone_server import ConnectRefusal, ConnectRequest
from nodeagent.proxy.inputs import INBOUND_PORT, OUTBOUND_PORT, ProxyInputs
from nodeagent.proxy.l7 import Downstream
from nodeagent.proxy.l7 import Inbound as L7Inbound
from nodeagent.proxy.pipe import Pipe
from nodeagent.proxy.plumbing import Plumbing
from nodeagent.proxy.pods import PodProxy
from nodeagent.proxy.relay import ClientSide, Relay
from nodeagent.telemetry.accesslog import AccessRecord, rfc3339

log = logging.getLogger("nodeagent.proxy")


FORWARDED_FLAG = "FORWARDED_FOR"
"""The response flag of a CONNECT refused for its ``forwarded: for=`` claim."""


def forwarded_for(headers: Mapping[str, str] | None) -> str | None:
    """The client address an HBONE CONNECT claims in its ``forwarded`` header (RFC 7239),
    normalized (``10.0.0.1``, ``2001:db8::1``); None when it claims none.

    One element, whose ``for=`` is an IPv4 address or a bracketed IPv6 one, quoted or
    not, with an optional port. Raises ``ValueError`` naming what is wrong otherwise
    (``unknown``, an obfuscated ``_name``, several elements): a peer must not be able
    to make its address unknown to ``ipBlocks``."""
    value = headers.get("forwarded") if headers else None
    if value is None:
        return None
    if "," in value:
        raise ValueError(f"forwarded {value!r}: more than one element")
    node: str | None = None
    for part in value.split(";"):
        k, _, v = part.strip().partition("=")
        if k.lower() == "for":
            if node is not None:
                raise ValueError(f"forwarded {value!r}: more than one for=")
            node = v.strip()
    if node is None:
        return None
    host = node[1:-1] if len(node) >= 2 and node[0] == node[-1] == '"' else node
    if host.startswith("["):  # "[v6]" or "[v6]:port"
        end = host.find("]")
        rest = host[end + 1 :] if end > 0 else "?"
        if rest and not (rest[0] == ":" and rest[1:].isdigit()):
            raise ValueError(f"forwarded for={node}: not an IP address")
        host = host[1:end]
    elif host.count(":") == 1:  # "v4:port"
        host, _, port = host.partition(":")
        if not port.isdigit():
            raise ValueError(f"forwarded for={node}: not an IP address")
    try:
        return _normal_ip(host)
    except ValueError:
        raise ValueError(f"forwarded for={node}: not an IP address") from None


@functools.lru_cache(maxsize=4096)
def _normal_ip(host: str) -> str:
    """``host`` as ``ipaddress`` writes it (raises ``ValueError``); remembered, as each
    client pod's address comes back on every connection it makes (``ipaddress`` parses in
    Python, ~20 µs)."""
    return str(ipaddress.ip_address(host))


L4Authz = tuple[Pod, int, str | None, str, str]
"""What a live L4 connection's ``recheck`` asks the authorizer: (destination, port,
source principal, source IP, destination IP); a tuple until a policy changes: an
``AuthzRequest`` (a frozen dataclass of 16 fields) costs each new connection ~4 µs."""


def l4_request(
    destination: Pod, port: int, principal: str | None, source_ip: str, destination_ip: str
) -> AuthzRequest:
    return AuthzRequest(
        destination=destination,
        destination_port=port,
        source_principal=principal,
        source_ip=source_ip,
        destination_ip=destination_ip,
    )


SOURCE_MODES = frozenset({"iptables", "eBPF"})
"""Pod capture modes that route the app's answers back to the proxy (not ``… (no source
routing)``); host mode's (``host (…)``) do too unless they say so."""


def app_source(client_ip: str, pp: PodProxy) -> str | None:
    """The address the proxy's connection to ``pp``'s app comes from: the client's
    (``IP_TRANSPARENT``, so the app sees who called) where the capture routes the app's
    answers back to the proxy (``SOURCE_MODES``); else, and for a loopback address, the
    pod's own, or IPv6, the proxy's own (the pod's address)."""
    routed = pp.mode in SOURCE_MODES or (
        pp.mode.startswith("host (") and not pp.mode.endswith(NO_SOURCE)
    )
    if not routed or "." not in client_ip or client_ip.startswith("127."):
        return None
    return None if client_ip == pp.pod.pod_ip else client_ip


class Inbound:
    """The inbound handlers of every local pod."""

    def __init__(
        self,
        inputs: ProxyInputs,
        plumbing: Plumbing,
        admission: InboundPolicy,
        pods: Mapping[str, PodProxy],
    ) -> None:
        self.inputs = inputs
        self.plumbing = plumbing
        self.admission = admission
        self.pods = pods
        """The local pods: only these are served."""

    def accept(self, pp: PodProxy) -> Callable[[], asyncio.Protocol]:
        return self.plumbing.accept(pp, "inbound", self._serve_plaintext)

    async def on_hbone(
        self, pp: PodProxy, req: ConnectRequest
    ) -> asyncio.BaseProtocol | ConnectRefusal:
        """A CONNECT arrived on ``pp``'s 15008: check the target, dial it, wire a relay."""
        snap = self.inputs.snapshot()
        ip, port = req.destination
        target = snap.pod_by_ip.get(ip)
        if target is None and pp.is_host and ip == pp.runtime.ip:  # a host's workload
            target = pp.pod
        me = self.inputs.principal(pp.pod)
        if target is None or target.key not in self.pods or self.inputs.principal(target) != me:
            self.inputs.metrics.failures.labels(direction="inbound", response_flags="NR").inc()
            reason = f"{req.authority} is not a pod running as {me} on node {self.inputs.node}"
            log.warning("HBONE from %s refused: %s", req.peer_identity, reason)
            return ConnectRefusal(400, reason)
        src = self._source(snap, req, target, port)
        if isinstance(src, ConnectRefusal):
            return src
        src_ip, src_pod = src
        tpp = self.pods[target.key]
        hp = self.admission.l7_port(snap, target, port)
        if hp is not None:  # authorized request by request
            if tpp.sockets is None:
                return ConnectRefusal(503, f"pod {target.key} is not captured")
            rate = self.admission.connection_rate(snap, target, port)
            if not rate.allowed:
                why = f"local_rate_limited: tcp limit of {rate.policy}"
                self.denied(req.peer_identity, src_ip, target, port, "RL", why, rate.policy)
                return ConnectRefusal(429, why)
            pipe = Pipe()
            relay = self.inputs.table.open(
                {
                    "pod": target.key,
                    "source": f"{req.peer_addr[0]}:{req.peer_addr[1]}",
                    "destination": req.authority,
                    "peer": req.peer_identity,
                }
            )
            self.plumbing.spawn(
                self._serve_http(tpp, hp, req.peer_identity, src_pod, src_ip, pipe, relay)
            )
            return pipe
        authz_req: L4Authz = (target, port, req.peer_identity, src_ip, ip)
        adm = self.admission.admit_connection(snap, target, port, req.peer_identity, src_ip)
        if not adm.allowed:
            self.denied(
                req.peer_identity, src_ip, target, port, adm.flag, adm.reason, *adm.deciding()
            )
            return ConnectRefusal(adm.status, adm.reason)
        sockets = tpp.sockets
        if sockets is None:
            return ConnectRefusal(503, f"pod {target.key} is not captured")
        try:
            sock = await sockets.connect(
                (ip, port), self.inputs.connect_timeout, app_source(src_ip, tpp)
            )
        except PeerError as e:
            self.inputs.metrics.failures.labels(direction="inbound", response_flags="UF").inc()
            log.warning("inbound HBONE %s -> %s failed: %s", req.peer_identity, req.authority, e)
            return ConnectRefusal(503, str(e))
        relay = self.inputs.table.open(
            {
                "direction": "inbound",
                "pod": target.key,
                "source": f"{req.peer_addr[0]}:{req.peer_addr[1]}",
                "destination": req.authority,
                "upstream": req.authority,
                "peer": req.peer_identity,
                "authz": authz_req,
                "traceparent": req.headers.get("traceparent"),  # the caller's L4 span
            }
        )
        svc = self.plumbing.index(snap).service_at.get((target.key, port))
        tcp_telemetry(
            relay.meta,
            "destination",
            src_pod,
            target,
            svc,
            svc.fqdn if svc is not None else "",
            src_principal=req.peer_identity,
            dst_principal=me,
        )

        def attach(side: ClientSide) -> None:
            self.plumbing.attach(
                relay, sock, lambda e: relay.abort(f"upstream {req.authority}: {e}")
            )

        return ClientSide(relay, attach)

    def _source(
        self, snap: MeshSnapshot, req: ConnectRequest, target: Pod, port: int
    ) -> tuple[str, Pod | None] | ConnectRefusal:
        """``source.ip`` and the source pod of a CONNECT: the address its ``forwarded``
        header claims as far as the peer's certificate vouches for it, else the
        tunnel's peer address. A claim that is no IP address, or the address of a pod
        of another identity, is refused (400), counted, logged and access-logged."""
        peer_ip = req.peer_addr[0]
        try:
            claimed = forwarded_for(req.headers)
        except ValueError as e:
            why = str(e)
        else:
            index = self.plumbing.index(snap)
            src = index.tunnel_source(snap, req.peer_identity, claimed, peer_ip)
            if not isinstance(src, str):
                return src
            why = src
        reason = f"{why} (from HBONE peer {req.peer_identity} at {peer_ip})"
        self.denied(req.peer_identity, peer_ip, target, port, FORWARDED_FLAG, reason)
        return ConnectRefusal(400, reason)

    def _serve_plaintext(self, pp: PodProxy, side: ClientSide) -> None:
        """Admit at once (in ``connection_made``); a relayed connection's dial goes on by
        callbacks, one served request by request gets a Task."""
        relay = side.relay
        got = self.plumbing.captured(side, "inbound", own_ports=(INBOUND_PORT, OUTBOUND_PORT))
        if got is None:
            return
        dst, peer = got
        src_ip = peer[0] if peer else ""
        snap = self.inputs.snapshot()
        if self.inputs.identity is not None:
            mtls = effective_mtls(snap, pp.pod, dst[1])
            if not mtls.accepts_plaintext:
                self.plumbing.refuse(
                    relay,
                    "inbound",
                    "MTLS_REQUIRED",
                    f"plaintext to {pp.pod.key} port {dst[1]} refused: PeerAuthentication "
                    f"{mtls.policy} requires mTLS (STRICT)",
                )
                return
        hp = self.admission.l7_port(snap, pp.pod, dst[1])
        if hp is not None and side.transport is not None:  # authorized request by request
            rate = self.admission.connection_rate(snap, pp.pod, dst[1])
            if not rate.allowed:
                why = f"local_rate_limited: tcp limit of {rate.policy}"
                self.denied(None, src_ip or "?", pp.pod, dst[1], "RL", why, rate.policy)
                relay.close(why)
                return
            pipe = Pipe()
            pending, relay.pending = relay.pending, []
            pipe.adopt(side.transport, pending)
            relay.client = side.transport
            peer_pod = snap.pod_by_ip.get(src_ip)
            self.plumbing.spawn(self._serve_http(pp, hp, None, peer_pod, src_ip, pipe, relay))
            return
        relay.meta["authz"] = (pp.pod, dst[1], None, src_ip, dst[0])
        adm = self.admission.admit_connection(snap, pp.pod, dst[1], None, src_ip)
        if not adm.allowed:
            self.denied(None, src_ip or "?", pp.pod, dst[1], adm.flag, adm.reason, *adm.deciding())
            relay.close(adm.reason)
            return
        src_pod = snap.pod_by_ip.get(peer[0]) if peer else None
        relay.meta["peer"] = src_pod.key if src_pod else ""
        svc = self.plumbing.index(snap).service_at.get((pp.pod.key, dst[1]))
        host = svc.fqdn if svc is not None else ""
        tcp_telemetry(relay.meta, "destination", src_pod, pp.pod, svc, host)
        self.plumbing.dial(pp, relay, dst, "inbound", app_source(src_ip, pp))

    async def _serve_http(
        self,
        tpp: PodProxy,
        hp: HttpPort,
        peer_principal: str | None,
        peer_pod: Pod | None,
        src_ip: str,
        pipe: Pipe,
        relay: Relay,
    ) -> None:
        """Serve one connection that reached ``tpp``'s HTTP port request by request:
        each passes the workload's policies, then goes to the app."""
        principal = self.inputs.principal(tpp.pod)
        source = app_source(src_ip, tpp)

        async def connect(ep: Endpoint, up: Pipe) -> tuple[str, str]:
            await self.plumbing.connect_plain(tpp, ep, up, source)
            return f"{ep.ip}:{ep.port}", principal

        ds = Downstream(
            pod=tpp.pod,
            source_principal=peer_principal or "unknown",
            source_ip=src_ip,
            service=hp.service,
            port=hp.port,
            connect=connect,
            meta=relay.meta,
            inbound=L7Inbound(
                peer_pod=peer_pod,
                cluster=hp.cluster,
                admit=self.admission.admit,
                principal=principal if self.inputs.identity is not None else "unknown",
            ),
        )
        relay.meta["direction"] = "inbound-http"
        relay.meta["upstream"] = "per request"
        if relay.client is None:
            relay.client = pipe.transport
        await self.plumbing.serve_http(ds, pipe, relay, hp.protocol)

    def recheck(self, snap: MeshSnapshot) -> int:
        """After a config change: close the live inbound connections the
        AuthorizationPolicies of ``snap`` now deny (others continue): connections
        authorized once (L4), and those served request by request whose request in flight
        (a long download, a stream, a WebSocket) is now denied. Returns how many."""
        closed = 0
        for relay in list(self.inputs.table.live.values()):
            if relay.closed:
                continue
            inflight = relay.meta.get("inflight")
            if inflight:
                for r in list(inflight.values()):
                    target = snap.pod_by_key.get(r.destination.key)
                    if target is None:
                        continue
                    d = authz.evaluate(snap, dataclasses.replace(r, destination=target))
                    if not d.allowed:
                        self.denied(
                            r.source_principal,
                            r.source_ip,
                            target,
                            r.destination_port,
                            "RBAC",
                            f"{d.reason} (policy changed: {r.method} {r.path} in flight closed)",
                            d.policy,
                            d.rule_index,
                        )
                        relay.abort(f"RBAC: {d.reason}")
                        closed += 1
                        break
                continue
            req = relay.meta.get("authz")
            if isinstance(req, tuple):  # made into a request only when policy changes
                req = relay.meta["authz"] = l4_request(*req)
            if not isinstance(req, AuthzRequest):
                continue
            target = snap.pod_by_key.get(req.destination.key)
            if target is None:
                continue
            if target is not req.destination:
                req = dataclasses.replace(req, destination=target)
                relay.meta["authz"] = req
            decision = authz.evaluate(snap, req)
            if not decision.allowed:
                self.denied(
                    req.source_principal,
                    req.source_ip,
                    target,
                    req.destination_port,
                    "RBAC",
                    f"{decision.reason} (policy changed: live connection closed)",
                    decision.policy,
                    decision.rule_index,
                )
                relay.abort(f"RBAC: {decision.reason}")
                closed += 1
        return closed

    def denied(
        self,
        principal: str | None,
        src_ip: str,
        target: Pod,
        port: int,
        flag: str,
        reason: str,
        policy: str = "",
        rule: int | None = None,
    ) -> None:
        """A policy (``flag`` RBAC: authorization, RL: a connection rate limit) refused a
        connection: count it, log it, and write it to the access log (``protocol`` TCP,
        the deciding ``policy`` and ``rule``); the caller closes it before any byte
        reaches the app."""
        self.inputs.metrics.failures.labels(direction="inbound", response_flags=flag).inc()
        snap = self.inputs.snapshot()
        index = self.plumbing.index(snap)
        src = index.source_pod(snap, principal or "", src_ip) or snap.pod_by_ip.get(src_ip)
        rec = AccessRecord(
            start_time=rfc3339(time.time()),
            source_workload=src.name if src else "unknown",
            source_namespace=src.namespace if src else "unknown",
            source_principal=principal or "unknown",
            destination_service="-",
            destination_workload=target.name,
            destination_namespace=target.namespace,
            destination_principal=self.inputs.principal(target),
            method="-",
            authority=f"{target.pod_ip}:{port}",
            path="-",
            protocol="TCP",
            response_code=0,
            response_flags=flag,
            bytes_received=0,
            bytes_sent=0,
            duration=0,
            upstream_service_time=None,
            x_forwarded_for=None,
            downstream_remote_address=src_ip,
            downstream_local_address=f"{target.pod_ip}:{port}",
            upstream_local_address=None,
            requested_server_name=None,
            connection_termination_details=reason,
            upstream_transport_failure_reason=None,
            grpc_status=None,
            upstream_host="-",
            upstream_cluster=f"inbound|{port}||",
            route_name="-",
            attempts=0,
            trace_id="",
            request_id="",
            user_agent="",
            reporter="destination",
            detail=reason,
        )
        if policy:
            rec["authz_policy"] = policy
            if rule is not None:
                rec["authz_rule"] = rule
        self.inputs.access_log.write(rec)
        log.warning(
            "connection refused by policy: %s (%s) -> %s port %d: %s",
            principal or "plaintext",
            src_ip,
            target.key,
            port,
            reason,
        )
