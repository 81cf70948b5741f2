"""The node agent socket: the gRPC service ``nodeagent.v1.NodeAgent`` on a UNIX socket.

Owns turning an ``AgentView`` into the typed messages of ``nodeagent.proto`` and serving them
with ``grpc.aio`` (which runs on uvloop as well as on asyncio's own loop). Most RPCs only
read the agent: they take ``view.snapshot()`` once and answer from it. Three change its
state: ``Bpf`` with ``bypass`` set (switches the eBPF socket bypass), ``CniAdd`` and
``CniDel`` (record or release a pod, through the agent's ``PodHandoff``; ``CniCheck`` only
reads). Who may call them: whoever can connect, and only the socket's owner (root) can:
the socket is 0600 from its first moment (``unixsocket.serve_owner_only``); grpc does not
tell a UNIX peer's uid, so the mode is the access control. A failing handler answers
``INTERNAL`` with what went wrong; it never takes the server down.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any, TypeVar

import grpc
import grpc.aio
from prometheus_client import generate_latest
from prometheus_client.registry import CollectorRegistry

from nodeagent import __version__
from nodeagent.admin import capture_state
from nodeagent.admin import nodeagent_pb2 as pb
from nodeagent.admin import nodeagent_pb2_grpc as pb_grpc
from nodeagent.errors import LocalStateError
from nodeagent.model.snapshot import MeshSnapshot
from nodeagent.model.status import AgentView, CniPod, ConnectionInfo, ExplainQuery, PodHandoff
from nodeagent.unixsocket import prepare_unix_socket_path, serve_owner_only

if TYPE_CHECKING:
    import psutil

__all__ = [
    "NodeAgentService",
    "ca_status_message",
    "certificate_message",
    "start_admin_server",
]

log = logging.getLogger(__name__)

_T = TypeVar("_T")

"""``sun_path`` holds 108 bytes including the terminating NUL."""


class NodeAgentService(pb_grpc.NodeAgentServicer):
    """The RPC handlers, over one ``AgentView``."""

    def __init__(
        self,
        view: AgentView,
        pods: PodHandoff | None = None,
        registry: CollectorRegistry | None = None,
    ) -> None:
        self._view = view
        self._pods = pods
        self._registry = registry
        self._process: psutil.Process | None = None
        """This process, made by the first Status: psutil is imported only when asked
        (0.8 MiB of an idle agent's RSS otherwise)."""

    async def Status(
        self, request: pb.StatusRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.StatusResponse:
        async def build() -> pb.StatusResponse:
            await self._view.refresh()  # the workers' connection counts, now
            return self._status()

        return await _answer_async("Status", context, build)

    async def Workloads(
        self, request: pb.WorkloadsRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.WorkloadsResponse:
        return await _answer("Workloads", context, self._workloads)

    async def Services(
        self, request: pb.ServicesRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.ServicesResponse:
        return await _answer("Services", context, self._services)

    async def Connections(
        self, request: pb.ConnectionsRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.ConnectionsResponse:
        async def build() -> pb.ConnectionsResponse:
            await self._view.refresh()  # the worker processes' connections, now
            return self._connections()

        return await _answer_async("Connections", context, build)

    async def Requests(
        self, request: pb.RequestsRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.RequestsResponse:
        async def build() -> pb.RequestsResponse:
            await self._view.refresh()  # the worker processes' requests, now
            return self._requests(request.limit)

        return await _answer_async("Requests", context, build)

    async def Metrics(
        self, request: pb.MetricsRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.MetricsResponse:
        async def build() -> pb.MetricsResponse:
            await self._view.refresh()
            return self._metrics()

        return await _answer_async("Metrics", context, build)

    async def ConfigDump(
        self, request: pb.ConfigDumpRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.ConfigDumpResponse:
        return await _answer("ConfigDump", context, self._config_dump)

    async def Certs(
        self, request: pb.CertsRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.CertsResponse:
        return await _answer("Certs", context, self._certs)

    async def Bpf(
        self, request: pb.BpfRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.BpfResponse:
        switch = {"": None, "on": True, "off": False}
        if request.bypass not in switch:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"bypass {request.bypass!r}: expected 'on' or 'off'",
            )
        bypass = switch[request.bypass]
        return await _answer(
            "Bpf",
            context,
            lambda: pb.BpfResponse(json=json.dumps(self._view.bpf_state(bypass), default=str)),
        )

    async def Explain(
        self, request: pb.ExplainRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.ExplainResponse:
        headers = []
        for h in request.headers:
            k, sep, v = h.partition("=")
            if not sep or not k.strip():
                await context.abort(
                    grpc.StatusCode.INVALID_ARGUMENT, f"header {h!r}: expected NAME=VALUE"
                )
            headers.append((k.strip(), v))
        if request.jwt:
            headers.append(("authorization", f"Bearer {request.jwt.strip()}"))
        query = ExplainQuery(
            from_pod=request.from_pod,
            to=request.to,
            method=request.method or "GET",
            path=request.path or "/",
            headers=tuple(headers),
        )
        try:
            answer = self._view.explain(query)
        except ValueError as e:  # the question names nothing the mesh has
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
            raise  # (abort raises)
        except Exception as e:
            log.exception("node agent socket: Explain failed")
            await context.abort(
                grpc.StatusCode.INTERNAL, f"Explain failed in the agent: {type(e).__name__}: {e}"
            )
            raise
        return await _answer(
            "Explain", context, lambda: pb.ExplainResponse(json=json.dumps(answer, default=str))
        )

    # -- the CNI plugin's calls -------------------------------------------------------------

    async def CniAdd(
        self, request: pb.CniAddRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.CniAddResponse:
        pods, pod = await self._cni_pod("CniAdd", request.pod, context)
        answer = await _answer_async(
            "CniAdd", context, lambda: pods.add(pod, request.timeout_seconds)
        )
        return pb.CniAddResponse(captured=answer.captured, state=answer.state, mode=answer.mode)

    async def CniDel(
        self, request: pb.CniDelRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.CniDelResponse:
        pods, pod = await self._cni_pod("CniDel", request.pod, context)
        released = await _answer_async("CniDel", context, lambda: pods.remove(pod))
        return pb.CniDelResponse(released=released)

    async def CniCheck(
        self, request: pb.CniCheckRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.CniCheckResponse:
        pods, pod = await self._cni_pod("CniCheck", request.pod, context)
        answer = await _answer_async("CniCheck", context, lambda: pods.check(pod))
        return pb.CniCheckResponse(captured=answer.captured, state=answer.state, mode=answer.mode)

    async def _cni_pod(
        self, name: str, msg: pb.CniPod, context: grpc.aio.ServicerContext[Any, Any]
    ) -> tuple[PodHandoff, CniPod]:
        if self._pods is None:
            await context.abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                "this agent takes no pods from a CNI plugin (it was started without one)",
            )
            raise AssertionError("abort raises")
        if not msg.namespace or not msg.name:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"{name}: the pod's namespace and name are required",
            )
        pod = CniPod(
            namespace=msg.namespace,
            name=msg.name,
            uid=msg.uid,
            container_id=msg.container_id,
            netns=msg.netns,
            ips=tuple(msg.ips),
            cgroup=msg.cgroup,
        )
        return self._pods, pod

    # -- builders: plain functions of the view, one snapshot each --------------------------

    def _usage(self) -> tuple[float, int]:
        """CPU % of one core since the previous Status (the first: since start), and RSS."""
        if self._process is None:
            import psutil

            p = self._process = psutil.Process()
            with p.oneshot():
                times, rss = p.cpu_times(), p.memory_info().rss
                alive = max(time.time() - p.create_time(), 1e-3)
                p.cpu_percent(interval=None)  # (its first call starts the measurement)
            return round(100.0 * (times.user + times.system) / alive, 1), rss
        with self._process.oneshot():
            return self._process.cpu_percent(interval=None), self._process.memory_info().rss

    def _status(self) -> pb.StatusResponse:
        view = self._view
        cfg = view.config_status()
        cpu, rss = self._usage()
        return pb.StatusResponse(
            version=__version__,
            node=view.node,
            uptime_seconds=max(0.0, time.time() - view.started_at),
            cpu_percent=cpu,
            memory_rss_bytes=rss,
            redirect_mode=view.redirect_mode(),
            ready=view.ready(),
            config=pb.ConfigStatus(
                version=cfg.version,
                loaded_at=cfg.loaded_at,
                sources=list(cfg.sources),
                last_error=cfg.last_error,
                last_error_at=cfg.last_error_at,
                warnings=list(cfg.warnings),
                watches=[
                    pb.WatchStatus(
                        kind=w.kind,
                        state=w.state,
                        resource_version=w.resource_version,
                        objects=w.objects,
                        last_event_at=w.last_event_at,
                        lag_seconds=w.lag_seconds,
                        last_error=w.last_error,
                        relists=w.relists,
                    )
                    for w in cfg.watches
                ],
                source=cfg.source,
            ),
            ca=ca_status_message(view.ca_status()),
            jwks=[pb.JwksStatus(**j) for j in view.jwks_status()],
            limits=[
                pb.Limit(name=x.name, value=x.value, flag=x.flag, metric=x.metric, hits=x.hits)
                for x in view.limits()
            ],
            workers=[
                pb.Worker(
                    index=w.index,
                    pid=w.pid,
                    state=w.state,
                    memory_rss_bytes=w.rss_bytes,
                    cpu_percent=w.cpu_percent,
                    connections=w.connections,
                    restarts=w.restarts,
                )
                for w in view.workers()
            ],
        )

    def _workloads(self) -> pb.WorkloadsResponse:
        snap = self._view.snapshot()
        local = {str(p.get("key", "")): p for p in self._view.local_pods()}
        return pb.WorkloadsResponse(workloads=workload_messages(snap, self._view.node, local))

    def _services(self) -> pb.ServicesResponse:
        return pb.ServicesResponse(services=service_messages(self._view.snapshot()))

    def _connections(self) -> pb.ConnectionsResponse:
        conns = sorted(self._view.connections(), key=lambda c: c.id)
        return pb.ConnectionsResponse(connections=[connection_message(c) for c in conns])

    def _requests(self, limit: int) -> pb.RequestsResponse:
        records = [json.dumps(r) for r in self._view.recent_requests(limit)]
        ejected = [
            pb.Ejection(cluster=c, endpoint=e, returns_in_seconds=t)
            for c, e, t in self._view.ejections()
        ]
        return pb.RequestsResponse(records=records, ejected=ejected)

    def _metrics(self) -> pb.MetricsResponse:
        if self._registry is None:
            raise LocalStateError("this agent's socket was started without its metrics")
        return pb.MetricsResponse(text=generate_latest(self._registry).decode())

    def _config_dump(self) -> pb.ConfigDumpResponse:
        snap = self._view.snapshot()
        objects = [json.dumps(o, default=str) for o in self._view.config_dump()]
        return pb.ConfigDumpResponse(version=snap.version, objects=objects)

    def _certs(self) -> pb.CertsResponse:
        return pb.CertsResponse(
            certificates=[certificate_message(c) for c in self._view.certificates()],
            ca=ca_status_message(self._view.ca_status()),
        )


async def _answer(
    name: str, context: grpc.aio.ServicerContext[Any, Any], build: Callable[[], _T]
) -> _T:
    """Run one handler; a ``LocalStateError`` (the agent cannot do what was asked in its
    present state) becomes ``FAILED_PRECONDITION`` with its message, any other error an
    ``INTERNAL`` status naming the RPC."""
    try:
        return build()
    except LocalStateError as e:
        await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(e))
    except Exception as e:
        log.exception("node agent socket: %s failed", name)
        await context.abort(
            grpc.StatusCode.INTERNAL, f"{name} failed in the agent: {type(e).__name__}: {e}"
        )


async def _answer_async(
    name: str, context: grpc.aio.ServicerContext[Any, Any], call: Callable[[], Awaitable[_T]]
) -> _T:
    """``_answer`` for a coroutine."""
    try:
        return await call()
    except LocalStateError as e:
        await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(e))
    except Exception as e:
        log.exception("node agent socket: %s failed", name)
        await context.abort(
            grpc.StatusCode.INTERNAL, f"{name} failed in the agent: {type(e).__name__}: {e}"
        )
    raise AssertionError("abort raises")


def workload_messages(
    snap: MeshSnapshot, node: str, local_pods: dict[str, dict[str, Any]]
) -> list[pb.Workload]:
    """One ``Workload`` per pod and WorkloadEntry of ``snap``, sorted by namespace/name
    (then kind). A local entry's capture state is shown when the agent holds one."""
    out: list[pb.Workload] = []
    workloads = (*snap.pods, *snap.workload_entries)
    for w in sorted(workloads, key=lambda p: (p.namespace, p.name, p.kind)):
        is_local = bool(w.node_name) and w.node_name == node
        lp = local_pods.get(w.key) if is_local else None
        ip = w.pod_ip or (str(lp.get("ip") or "") if lp else "")
        if not is_local:
            capture = ""
        elif w.kind == "Pod" or lp is not None:
            capture = capture_state(lp)
        else:
            capture = ""  # an entry the agent does not capture (yet): no state to show
        out.append(
            pb.Workload(
                namespace=w.namespace,
                name=w.name,
                kind=w.kind,
                node=w.node_name,
                service_account=w.service_account,
                identity=w.identity(),
                ip=ip,
                labels=dict(w.labels.items_),
                local=is_local,
                capture=capture,
                netns=str(lp.get("netns") or "") if lp else "",
            )
        )
    return out


def service_messages(snap: MeshSnapshot) -> list[pb.Service]:
    """One ``Service`` per service of ``snap`` with its endpoints per port, sorted."""
    out: list[pb.Service] = []
    for svc in sorted(snap.services, key=lambda s: (s.namespace, s.name)):
        ports = []
        for port in svc.ports:
            endpoints = [
                pb.ServiceEndpoint(pod=ep.pod.key, ip=ep.ip, port=ep.port, node=ep.pod.node_name)
                for ep in sorted(snap.endpoints(svc, port), key=lambda e: (e.pod.key, e.port))
            ]
            ports.append(
                pb.ServicePort(
                    name=port.name,
                    port=port.port,
                    target_port=str(port.target_port),
                    protocol=port.protocol,
                    app_protocol=port.app_protocol or "",
                    endpoints=endpoints,
                )
            )
        out.append(
            pb.Service(
                namespace=svc.namespace,
                name=svc.name,
                cluster_ip=svc.cluster_ip or "",
                ports=ports,
            )
        )
    return out


def connection_message(c: ConnectionInfo) -> pb.Connection:
    return pb.Connection(
        id=c.id,
        direction=c.direction,
        pod=c.pod,
        source=c.source,
        destination=c.destination,
        upstream=c.upstream,
        service=c.service,
        peer_workload=c.peer_workload,
        bytes_sent=c.bytes_sent,
        bytes_received=c.bytes_received,
        opened_at=c.opened_at,
        worker=c.worker,
    )


def _str(d: Mapping[str, Any], key: str) -> str:
    value = d.get(key)
    return "" if value is None else str(value)


def _float(d: Mapping[str, Any], key: str) -> float:
    value = d.get(key)
    return float(value) if isinstance(value, int | float) else 0.0


def ca_status_message(ca: Mapping[str, Any]) -> pb.CaStatus:
    """``AgentView.ca_status()`` as a ``CaStatus`` (missing keys: empty / 0)."""
    return pb.CaStatus(
        state=_str(ca, "state") or "unknown",
        address=_str(ca, "address"),
        last_error=_str(ca, "last_error"),
        last_error_at=_float(ca, "last_error_at"),
        unreachable_since=_float(ca, "unreachable_since"),
        last_success_at=_float(ca, "last_success_at"),
        next_renewal_at=_float(ca, "next_renewal_at"),
    )


def certificate_message(cert: Mapping[str, Any]) -> pb.Certificate:
    """One entry of ``AgentView.certificates()`` as a ``Certificate``."""
    chain: list[Mapping[str, Any]] = list(cert.get("chain") or [])
    return pb.Certificate(
        identity=_str(cert, "identity"),
        serial=_str(cert, "serial"),
        not_before=_float(cert, "not_before"),
        not_after=_float(cert, "not_after"),
        renews_in_seconds=_float(cert, "renews_in_seconds"),
        state=_str(cert, "state"),
        last_error=_str(cert, "last_error"),
        chain=[
            pb.ChainCertificate(
                subject=_str(c, "subject"),
                issuer=_str(c, "issuer"),
                serial=_str(c, "serial"),
                not_before=_float(c, "not_before"),
                not_after=_float(c, "not_after"),
                uris=[str(u) for u in c.get("uris") or []],
            )
            for c in chain
        ],
    )


async def start_admin_server(
    view: AgentView,
    socket_path: str,
    pods: PodHandoff | None = None,
    replace: bool = False,
    registry: CollectorRegistry | None = None,
) -> grpc.aio.Server:
    """Serve the node agent socket on ``unix:socket_path`` (mode 0600) and return the server;
    ``pods`` takes the CNI plugin's calls (None: they are refused); ``registry`` holds the
    metrics ``Metrics`` answers with (None: refused). ``replace``: the socket
    of a live agent there is replaced in one rename (a hand-over; clients never see no
    socket), not refused.

    Call from inside the running event loop (asyncio or uvloop). Stop it with
    ``await server.stop(grace)``.
    """
    path = prepare_unix_socket_path(
        socket_path, "node agent socket", "agent", "--socket", replace_live=replace
    )
    grpc_server = grpc.aio.server()
    pb_grpc.add_NodeAgentServicer_to_server(NodeAgentService(view, pods, registry), grpc_server)  # type: ignore[no-untyped-call]
    server = serve_owner_only(grpc_server, path, "node agent socket", "--socket")
    await server.start()
    log.info("node agent socket listening on %s", path)
    return server
