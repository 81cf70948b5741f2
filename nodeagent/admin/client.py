"""A small synchronous client of the node agent socket, returning plain JSON-able dicts.

Owns the client side of ``nodeagent.v1.NodeAgent``: dialling ``unix:PATH``, deadlines, and
turning gRPC failures into ``LocalStateError`` with a message a person can act on. Used by
``nodeagent ctl``, by the sandbox (which polls ``status()["ready"]``) and by the CNI plugin
(``cni_add``, ``cni_del``, ``cni_check``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from types import TracebackType
from typing import Any, TypeVar

import grpc
from google.protobuf.json_format import MessageToDict
from google.protobuf.message import Message

from nodeagent.admin import nodeagent_pb2 as pb
from nodeagent.errors import LocalStateError

__all__ = ["AdminClient", "message_to_dict"]

_Resp = TypeVar("_Resp", bound=Message)

MAX_MESSAGE_BYTES = 256 * 1024 * 1024
"""Largest answer we accept (a big config dump exceeds gRPC's 4 MiB default)."""

READS = frozenset(
    {
        "Status",
        "Workloads",
        "Services",
        "Connections",
        "Requests",
        "Metrics",
        "ConfigDump",
        "Certs",
        "Explain",
        "CniCheck",
    }
)
"""The RPCs that only read the agent: asked again, once, on a new connection when the
first one broke under the call (not a refused dial). Those that change state
(``Bpf``, ``CniAdd``, ``CniDel``) are not, as the agent may have done them already."""


def message_to_dict(message: Message) -> dict[str, Any]:
    """A message as a plain dict: proto field names, every field present, 64-bit ints as ints."""
    return MessageToDict(
        message,
        preserving_proto_field_name=True,
        always_print_fields_with_no_presence=True,
        unquote_int64_if_possible=True,
    )


class AdminClient:
    """Talks to one agent over its node agent socket. Each call has a ``timeout`` deadline."""

    def __init__(self, socket_path: str, timeout: float = 5.0) -> None:
        self.socket_path = socket_path
        self.timeout = timeout
        self._channel: grpc.Channel | None = None

    # -- the RPCs -------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        """Version, node, uptime, CPU/RSS, redirect mode, ``ready`` and the config state."""
        return message_to_dict(self._call("Status", pb.StatusRequest(), pb.StatusResponse))

    def workloads(self) -> list[dict[str, Any]]:
        """Every workload of the serving snapshot, pods and WorkloadEntries (``kind``);
        ``local`` marks this node's."""
        resp = self._call("Workloads", pb.WorkloadsRequest(), pb.WorkloadsResponse)
        return [message_to_dict(w) for w in resp.workloads]

    def services(self) -> list[dict[str, Any]]:
        """Every service with its ports and, per port, its endpoints."""
        resp = self._call("Services", pb.ServicesRequest(), pb.ServicesResponse)
        return [message_to_dict(s) for s in resp.services]

    def connections(self) -> list[dict[str, Any]]:
        """The live proxied connections of the agent's node."""
        resp = self._call("Connections", pb.ConnectionsRequest(), pb.ConnectionsResponse)
        return [message_to_dict(c) for c in resp.connections]

    def requests(self, limit: int = 0) -> dict[str, Any]:
        """``{"records": [access-log record...], "ejected": [{cluster, endpoint,
        returns_in_seconds}...]}``: the last HTTP requests and ejected endpoints."""
        resp = self._call("Requests", pb.RequestsRequest(limit=limit), pb.RequestsResponse)
        return {
            "records": [json.loads(r) for r in resp.records],
            "ejected": [message_to_dict(e) for e in resp.ejected],
        }

    def metrics(self) -> str:
        """The agent's metrics in Prometheus' text format (what its port 15020 serves)."""
        return self._call("Metrics", pb.MetricsRequest(), pb.MetricsResponse).text

    def config_dump(self) -> dict[str, Any]:
        """``{"version": int, "objects": [the raw config objects, parsed from JSON]}``."""
        resp = self._call("ConfigDump", pb.ConfigDumpRequest(), pb.ConfigDumpResponse)
        objects: list[Any] = []
        for i, text in enumerate(resp.objects):
            try:
                objects.append(json.loads(text))
            except ValueError as e:
                raise LocalStateError(
                    f"the agent on {self.socket_path} sent config object #{i} that is not JSON: {e}"
                ) from e
        return {"version": resp.version, "objects": objects}

    def certs(self) -> dict[str, Any]:
        """``{"certificates": [per identity, with its chain], "ca": {the CA's status}}``."""
        resp = self._call("Certs", pb.CertsRequest(), pb.CertsResponse)
        return {
            "certificates": [message_to_dict(c) for c in resp.certificates],
            "ca": message_to_dict(resp.ca),
        }

    def bpf(self, bypass: str = "") -> dict[str, Any]:
        """The eBPF capture's state (``{"mode": ...}`` only in iptables mode); ``bypass``
        ``on``/``off`` switches the local socket bypass first."""
        resp = self._call("Bpf", pb.BpfRequest(bypass=bypass), pb.BpfResponse)
        state: dict[str, Any] = json.loads(resp.json)
        return state

    def explain(
        self,
        from_pod: str,
        to: str,
        *,
        method: str = "GET",
        path: str = "/",
        headers: tuple[str, ...] = (),
        jwt: str = "",
    ) -> dict[str, Any]:
        """The agent's answer to "why would this request be routed, allowed or denied"
        (``headers``: ``NAME=VALUE`` each)."""
        req = pb.ExplainRequest(
            from_pod=from_pod, to=to, method=method, path=path, headers=headers, jwt=jwt
        )
        resp = self._call("Explain", req, pb.ExplainResponse)
        answer: dict[str, Any] = json.loads(resp.json)
        return answer

    def cni_add(self, pod: pb.CniPod, wait: float) -> pb.CniAddResponse:
        """Hand the agent a new pod; it answers once the pod is captured (or opted out)
        and waits up to ``wait`` seconds for that (this client's deadline: ``timeout``)."""
        req = pb.CniAddRequest(pod=pod, timeout_seconds=wait)
        return self._call("CniAdd", req, pb.CniAddResponse)

    def cni_del(self, pod: pb.CniPod) -> pb.CniDelResponse:
        """Have the agent release a pod (idempotent)."""
        return self._call("CniDel", pb.CniDelRequest(pod=pod), pb.CniDelResponse)

    def cni_check(self, pod: pb.CniPod) -> pb.CniCheckResponse:
        """Whether the agent has the pod captured."""
        return self._call("CniCheck", pb.CniCheckRequest(pod=pod), pb.CniCheckResponse)

    # -- plumbing -------------------------------------------------------------------------

    def close(self) -> None:
        if self._channel is not None:
            self._channel.close()
            self._channel = None

    def __enter__(self) -> AdminClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _not_listening(self, why: str = "") -> LocalStateError:
        detail = f" ({why})" if why else ""
        return LocalStateError(
            f"no agent is listening on {self.socket_path}{detail}: "
            "is `nodeagent run` (or the sandbox) up?"
        )

    def _check_socket(self) -> None:
        if not os.path.exists(self.socket_path):
            raise self._not_listening("no such socket")
        if not os.access(self.socket_path, os.R_OK | os.W_OK):
            raise LocalStateError(
                f"permission denied on {self.socket_path}: the node agent socket is for "
                "its owner only (mode 0600); run this as the agent's user (e.g. with sudo)"
            )

    def _call(self, method: str, request: Message, response_type: type[_Resp]) -> _Resp:
        try:
            return self._call_once(method, request, response_type)
        except grpc.RpcError as e:
            if method not in READS or not _broken_connection(e):
                raise self._error(method, e) from None
        # A connection to a live agent can break under a call (seen once in CI: grpc's
        # HTTP/2 parser refused a frame); a read is safe to ask again on a fresh one.
        self.close()
        try:
            return self._call_once(method, request, response_type)
        except grpc.RpcError as e:
            raise self._error(method, e) from None

    def _call_once(self, method: str, request: Message, response_type: type[_Resp]) -> _Resp:
        self._check_socket()
        if self._channel is None:
            self._channel = grpc.insecure_channel(
                f"unix:{self.socket_path}",
                options=[
                    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                    # a channel of its own connections: grpc's process-wide pool would give
                    # the retry's new channel the broken one, failed fast with its old error
                    ("grpc.use_local_subchannel_pool", 1),
                ],
            )
        rpc: Callable[..., _Resp] = self._channel.unary_unary(
            f"/nodeagent.v1.NodeAgent/{method}",
            request_serializer=type(request).SerializeToString,
            response_deserializer=response_type.FromString,
        )
        return rpc(request, timeout=self.timeout)

    def _error(self, method: str, e: grpc.RpcError) -> LocalStateError:
        code = e.code() if isinstance(e, grpc.Call) else None
        details = (e.details() if isinstance(e, grpc.Call) else None) or str(e)
        if code == grpc.StatusCode.UNAVAILABLE:
            if "connection refused" in details.lower():
                details = "connection refused: the socket is stale"
            return self._not_listening(details)
        if code == grpc.StatusCode.DEADLINE_EXCEEDED:
            return LocalStateError(
                f"the agent on {self.socket_path} did not answer {method} within "
                f"{self.timeout:g}s: is it overloaded or stuck? (see its log)"
            )
        if code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION):
            return LocalStateError(details)  # the agent's own words on what is wrong
        if code == grpc.StatusCode.UNIMPLEMENTED:
            return LocalStateError(
                f"the agent on {self.socket_path} does not know {method}: "
                "is it an older nodeagent than this client?"
            )
        name = code.name if code is not None else "error"
        return LocalStateError(
            f"the agent on {self.socket_path} failed to answer {method} ({name}): {details}"
        )


def _broken_connection(e: grpc.RpcError) -> bool:
    """Whether ``e`` is a connection that broke under the call (``UNAVAILABLE``, or grpc's
    ``Stream removed`` once the call was out), not an agent that is not there."""
    if not isinstance(e, grpc.Call):
        return False
    details = (e.details() or "").lower()
    if e.code() == grpc.StatusCode.UNKNOWN:
        return "stream removed" in details
    if e.code() != grpc.StatusCode.UNAVAILABLE:
        return False
    return "connection refused" not in details and "no such file" not in details
