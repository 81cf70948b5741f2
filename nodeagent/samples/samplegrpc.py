"""The sample app's gRPC echo service (``nodeagent.sample.Echo``), its client helpers and CLI.

This module owns the gRPC side of the examples' workload, for the mesh's L7 (HTTP/2,
gRPC) tests:

* the server, ``start_server``, that ``nodeagent sample-app --grpc-port PORT`` runs in its
  own process next to the HTTP server (a thread pool; one counter of requests served,
  shared with the HTTP answers' ``served``). The four methods of ``sample.proto``:
  ``Unary``, ``ServerStream`` (``count`` replies), ``ClientStream`` (one reply adding up
  the requests) and ``Bidi`` (each request echoed as soon as it arrives). Every reply names
  who answered (pod, namespace, node, service, version, from the sample app's settings)
  and echoes the call's request metadata, the text and payload, with a sequence number. A
  request's ``fail_code`` makes the call fail with that status code, ``delay_ms`` slows
  it. Every call prints one line ``TIME SERVICE/VERSION GRPC /nodeagent.sample.Echo/METHOD
  CODE DURATIONms``, like the HTTP request lines;
* client helpers for tests (``call_unary``, ``call_server_stream``, ``call_client_stream``,
  ``call_bidi``; ``iter_server_stream`` and ``iter_bidi`` yield replies as they arrive;
  ``BidiSession`` interleaves sends and receives), which raise ``grpc.RpcError`` when the
  call fails, and ``reply_to_dict`` (the JSON form);
* the command ``python -m nodeagent.samples.samplegrpc client`` for tests that must call
  from inside a network namespace::

    python -m nodeagent.samples.samplegrpc client --target HOST:PORT \\
        [--method unary|server-stream|client-stream|bidi] [--count N] [--text T] \\
        [--metadata K=V ...] [--fail-code C] [--delay-ms MS] [--payload-bytes N] \\
        [--timeout S] [--repeat N [--new-connection]]

  It prints one JSON line (``reply_to_dict``) per reply as it arrives and exits 0; when
  the call fails it prints ``{"error": {"code": NAME, "value": N, "details": ...}}`` to
  stderr and exits with the status value N (1..16). ``--count`` is the number of replies
  (server-stream) or of requests sent (client-stream, bidi). ``--repeat N`` (unary only)
  makes N calls (one connection, or one each with ``--new-connection``) and prints one
  JSON summary ``{"calls", "ok", "errors": {CODE: n}, "pods": {POD: n}, "versions":
  {VERSION: n}}``; it exits 0 when every call succeeded, else 1.

The channels here are plaintext and ignore ``http_proxy``-style environment variables: the
mesh, not the client, decides where a call goes.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import queue
import sys
import time
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from concurrent import futures
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from types import TracebackType
from typing import Any, NoReturn

import grpc

from nodeagent.samples import sample_pb2 as pb
from nodeagent.samples import sample_pb2_grpc as pb_grpc
from nodeagent.samples.common import (
    MAX_DELAY_S,
    AppSettings,
    ServedCounter,
    log_request,
    pattern_bytes,
)

__all__ = [
    "SERVICE",
    "BidiSession",
    "EchoService",
    "SampleGrpcServer",
    "call_bidi",
    "call_client_stream",
    "call_server_stream",
    "call_unary",
    "iter_bidi",
    "iter_server_stream",
    "main",
    "open_channel",
    "reply_to_dict",
    "start_server",
]

SERVICE = "nodeagent.sample.Echo"
MAX_WORKERS = 128
"""Server threads: each streaming call in progress holds one; more calls wait for one."""
MAX_STREAM_COUNT = 1_000_000
"""The most replies one ``ServerStream`` call may ask for."""
MAX_MESSAGE_BYTES = 64 * 1024 * 1024
CALL_TIMEOUT_S = 30.0
_SLEEP_SLICE_S = 0.05

SERVER_OPTIONS: list[tuple[str, Any]] = [
    ("grpc.so_reuseport", 0),  # a port in use is an error, not a silently shared port
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
]
CHANNEL_OPTIONS: list[tuple[str, Any]] = [
    ("grpc.enable_http_proxy", 0),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
]

_STATUS_BY_VALUE: dict[int, grpc.StatusCode] = {int(c.value[0]): c for c in grpc.StatusCode}

MetadataArg = Mapping[str, str | bytes] | Sequence[tuple[str, str | bytes]] | None
"""Request metadata for the helpers: a mapping or (key, value) pairs (keys lower-case;
the value of a ``-bin`` key is bytes, or a str sent as its UTF-8)."""
RequestArg = str | pb.EchoRequest
"""A request for the streaming helpers: its text, or the whole message."""


# --------------------------------------------------------------------------- server


@dataclass
class _Call:
    """One call being served: what its log line and replies need."""

    method: str
    served: int
    metadata: dict[str, str]
    code: grpc.StatusCode = grpc.StatusCode.OK


def _metadata_dict(metadata: grpc.Metadata | None) -> dict[str, str]:
    out: dict[str, str] = {}
    for key, value in metadata or ():
        text = base64.b64encode(value).decode() if isinstance(value, bytes) else value
        out[key] = f"{out[key]}, {text}" if key in out else text
    return out


def _size(request: pb.EchoRequest) -> int:
    return len(request.text.encode()) + len(request.payload)


class EchoService(pb_grpc.EchoServicer):
    """The ``nodeagent.sample.Echo`` methods, answering as ``settings`` says."""

    def __init__(self, settings: AppSettings, served: ServedCounter) -> None:
        self._settings = settings
        self._served = served

    # -- the methods
    def Unary(self, request: pb.EchoRequest, context: grpc.ServicerContext) -> pb.EchoReply:
        with self._track("Unary", context) as call:
            self._check(call, context, request)
            self._sleep(request, context)
            self._maybe_fail(call, context, request)
            return self._reply(call, request.text, request.payload, 1, 1, _size(request))

    def ServerStream(
        self, request: pb.EchoRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.EchoReply]:
        with self._track("ServerStream", context) as call:
            self._check(call, context, request)
            if not 0 <= request.count <= MAX_STREAM_COUNT:
                self._abort(
                    call,
                    context,
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"count wants 0..{MAX_STREAM_COUNT}, got {request.count}",
                )
            size = _size(request)
            for sequence in range(1, request.count + 1):
                self._sleep(request, context)
                if not context.is_active():
                    call.code = grpc.StatusCode.CANCELLED
                    return
                yield self._reply(call, request.text, request.payload, sequence, 1, size)
            self._maybe_fail(call, context, request)

    def ClientStream(
        self, request_iterator: Iterator[pb.EchoRequest], context: grpc.ServicerContext
    ) -> pb.EchoReply:
        with self._track("ClientStream", context) as call:
            count = total = 0
            text = ""
            for request in request_iterator:
                self._check(call, context, request)
                self._sleep(request, context)
                self._maybe_fail(call, context, request)
                count += 1
                total += _size(request)
                text = request.text
            return self._reply(call, text, b"", 1, count, total)

    def Bidi(
        self, request_iterator: Iterator[pb.EchoRequest], context: grpc.ServicerContext
    ) -> Iterator[pb.EchoReply]:
        with self._track("Bidi", context) as call:
            for sequence, request in enumerate(request_iterator, 1):
                self._check(call, context, request)
                self._sleep(request, context)
                self._maybe_fail(call, context, request)
                yield self._reply(call, request.text, request.payload, sequence, 1, _size(request))

    # -- helpers
    @contextmanager
    def _track(self, method: str, context: grpc.ServicerContext) -> Iterator[_Call]:
        """Count the call, and print its line when it ends."""
        start = time.monotonic()
        metadata = _metadata_dict(context.invocation_metadata())
        call = _Call(method=method, served=self._served.next(), metadata=metadata)
        try:
            yield call
        except GeneratorExit:  # a streaming call the client went away from
            call.code = grpc.StatusCode.CANCELLED
            raise
        except BaseException:
            if call.code == grpc.StatusCode.OK:  # not an abort of ours: a bug
                call.code = grpc.StatusCode.UNKNOWN
            raise
        finally:
            ms = (time.monotonic() - start) * 1000
            log_request(self._settings, f"GRPC /{SERVICE}/{method}", call.code.name, ms)

    def _abort(
        self, call: _Call, context: grpc.ServicerContext, code: grpc.StatusCode, details: str
    ) -> NoReturn:
        call.code = code
        context.abort(code, details)

    def _check(self, call: _Call, context: grpc.ServicerContext, request: pb.EchoRequest) -> None:
        if request.fail_code and request.fail_code not in _STATUS_BY_VALUE:
            self._abort(
                call,
                context,
                grpc.StatusCode.INVALID_ARGUMENT,
                f"fail_code wants 0..16, got {request.fail_code}",
            )
        if not 0 <= request.delay_ms <= MAX_DELAY_S * 1000:
            self._abort(
                call,
                context,
                grpc.StatusCode.INVALID_ARGUMENT,
                f"delay_ms wants 0..{MAX_DELAY_S * 1000:.0f}, got {request.delay_ms}",
            )

    def _maybe_fail(
        self, call: _Call, context: grpc.ServicerContext, request: pb.EchoRequest
    ) -> None:
        if request.fail_code:
            s = self._settings
            code = _STATUS_BY_VALUE[request.fail_code]
            self._abort(
                call,
                context,
                code,
                f"{s.pod} ({s.service}/{s.version}): fail_code {request.fail_code} requested",
            )

    @staticmethod
    def _sleep(request: pb.EchoRequest, context: grpc.ServicerContext) -> None:
        """Sleep ``delay_ms``, but not past the end of the call (deadline, cancel)."""
        deadline = time.monotonic() + request.delay_ms / 1000
        while context.is_active() and (left := deadline - time.monotonic()) > 0:
            time.sleep(min(left, _SLEEP_SLICE_S))

    def _reply(
        self, call: _Call, text: str, payload: bytes, sequence: int, count: int, size: int
    ) -> pb.EchoReply:
        s = self._settings
        return pb.EchoReply(
            pod=s.pod,
            namespace=s.namespace,
            node=s.node,
            service=s.service,
            version=s.version,
            method=call.method,
            metadata=call.metadata,
            text=text,
            sequence=sequence,
            count=count,
            bytes=size,
            served=call.served,
            payload=payload,
        )


class SampleGrpcServer:
    """A running Echo server: the port it listens on, and how to stop it."""

    def __init__(
        self, server: grpc.Server, executor: futures.ThreadPoolExecutor, port: int
    ) -> None:
        self._server = server
        self._executor = executor
        self.port = port

    def stop(self, grace: float | None = 1.0) -> None:
        """Refuse new calls, give the calls in progress ``grace`` seconds, then cancel them."""
        self._server.stop(grace).wait()
        self._executor.shutdown(wait=False)


def start_server(
    host: str, port: int, settings: AppSettings, served: ServedCounter | None = None
) -> SampleGrpcServer:
    """Serve ``nodeagent.sample.Echo`` on HOST:PORT (0: any free port); ``OSError`` if busy."""
    executor = futures.ThreadPoolExecutor(max_workers=MAX_WORKERS, thread_name_prefix="sample-grpc")
    server = grpc.server(executor, options=SERVER_OPTIONS)
    service = EchoService(settings, served or ServedCounter())
    pb_grpc.add_EchoServicer_to_server(service, server)  # type: ignore[no-untyped-call]
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    running = SampleGrpcServer(server, executor, 0)
    try:
        bound = server.add_insecure_port(address)
    except RuntimeError as e:  # grpcio says "Failed to bind to address ..."
        running.stop(None)
        raise OSError(f"cannot listen on {address} (gRPC): {e}") from None
    if not bound:  # older grpcio answers 0 instead of raising
        running.stop(None)
        raise OSError(f"cannot listen on {address} (gRPC)")
    server.start()
    running.port = bound
    return running


# --------------------------------------------------------------------------- client


def open_channel(target: str) -> grpc.Channel:
    """A plaintext channel to ``HOST:PORT`` (close it, or use it as a context manager)."""
    return grpc.insecure_channel(target, options=CHANNEL_OPTIONS)


def _using(target: str, channel: grpc.Channel | None) -> AbstractContextManager[grpc.Channel]:
    """The given channel (left open), or a new one closed after the call."""
    return nullcontext(channel) if channel is not None else open_channel(target)


def _metadata(metadata: MetadataArg) -> tuple[tuple[str, str | bytes], ...]:
    if metadata is None:
        return ()
    pairs = metadata.items() if isinstance(metadata, Mapping) else metadata
    return tuple(
        (k, v.encode() if k.endswith("-bin") and isinstance(v, str) else v) for k, v in pairs
    )


def _request(item: RequestArg) -> pb.EchoRequest:
    return pb.EchoRequest(text=item) if isinstance(item, str) else item


def _path(method: str) -> str:
    return f"/{SERVICE}/{method}"


def call_unary(
    target: str,
    text: str = "",
    metadata: MetadataArg = None,
    *,
    fail_code: int = 0,
    payload: bytes = b"",
    delay_ms: int = 0,
    timeout: float = CALL_TIMEOUT_S,
    channel: grpc.Channel | None = None,
) -> pb.EchoReply:
    """One ``Unary`` call (over ``channel`` if given): its reply, or ``grpc.RpcError``."""
    request = pb.EchoRequest(text=text, fail_code=fail_code, payload=payload, delay_ms=delay_ms)
    with _using(target, channel) as ch:
        rpc: grpc.UnaryUnaryMultiCallable[pb.EchoRequest, pb.EchoReply] = ch.unary_unary(
            _path("Unary"),
            request_serializer=pb.EchoRequest.SerializeToString,
            response_deserializer=pb.EchoReply.FromString,
        )
        return rpc(request, timeout=timeout, metadata=_metadata(metadata))


def call_server_stream(
    target: str,
    text: str = "",
    count: int = 1,
    metadata: MetadataArg = None,
    *,
    fail_code: int = 0,
    payload: bytes = b"",
    delay_ms: int = 0,
    timeout: float = CALL_TIMEOUT_S,
    channel: grpc.Channel | None = None,
) -> list[pb.EchoReply]:
    """The ``count`` replies of one ``ServerStream`` call; ``grpc.RpcError`` if it fails."""
    request = pb.EchoRequest(
        text=text, count=count, fail_code=fail_code, payload=payload, delay_ms=delay_ms
    )
    return list(iter_server_stream(target, request, metadata, timeout=timeout, channel=channel))


def iter_server_stream(
    target: str,
    request: pb.EchoRequest,
    metadata: MetadataArg = None,
    *,
    timeout: float = CALL_TIMEOUT_S,
    channel: grpc.Channel | None = None,
) -> Iterator[pb.EchoReply]:
    """The replies of one ``ServerStream`` call as they arrive; ``grpc.RpcError`` if it fails."""
    with _using(target, channel) as ch:
        rpc: grpc.UnaryStreamMultiCallable[pb.EchoRequest, pb.EchoReply] = ch.unary_stream(
            _path("ServerStream"),
            request_serializer=pb.EchoRequest.SerializeToString,
            response_deserializer=pb.EchoReply.FromString,
        )
        yield from rpc(request, timeout=timeout, metadata=_metadata(metadata))


def call_client_stream(
    target: str,
    requests: Iterable[RequestArg],
    metadata: MetadataArg = None,
    *,
    timeout: float = CALL_TIMEOUT_S,
    channel: grpc.Channel | None = None,
) -> pb.EchoReply:
    """Stream ``requests`` (texts or messages) in one ``ClientStream`` call; its one reply."""
    with _using(target, channel) as ch:
        rpc: grpc.StreamUnaryMultiCallable[pb.EchoRequest, pb.EchoReply] = ch.stream_unary(
            _path("ClientStream"),
            request_serializer=pb.EchoRequest.SerializeToString,
            response_deserializer=pb.EchoReply.FromString,
        )
        return rpc((_request(r) for r in requests), timeout=timeout, metadata=_metadata(metadata))


def call_bidi(
    target: str,
    requests: Iterable[RequestArg],
    metadata: MetadataArg = None,
    *,
    timeout: float = CALL_TIMEOUT_S,
    channel: grpc.Channel | None = None,
) -> list[pb.EchoReply]:
    """Stream ``requests`` in one ``Bidi`` call, then half-close; every reply.

    The requests are sent as the iterable yields them, while replies arrive; to wait for
    each echo before sending the next request, use ``BidiSession``.
    """
    return list(iter_bidi(target, requests, metadata, timeout=timeout, channel=channel))


def iter_bidi(
    target: str,
    requests: Iterable[RequestArg],
    metadata: MetadataArg = None,
    *,
    timeout: float = CALL_TIMEOUT_S,
    channel: grpc.Channel | None = None,
) -> Iterator[pb.EchoReply]:
    """The replies of one ``Bidi`` call as they arrive; ``grpc.RpcError`` if it fails."""
    with _using(target, channel) as ch:
        yield from _bidi_rpc(ch)(
            (_request(r) for r in requests), timeout=timeout, metadata=_metadata(metadata)
        )


def _bidi_rpc(
    channel: grpc.Channel,
) -> grpc.StreamStreamMultiCallable[pb.EchoRequest, pb.EchoReply]:
    rpc: grpc.StreamStreamMultiCallable[pb.EchoRequest, pb.EchoReply] = channel.stream_stream(
        _path("Bidi"),
        request_serializer=pb.EchoRequest.SerializeToString,
        response_deserializer=pb.EchoReply.FromString,
    )
    return rpc


class BidiSession:
    """One open ``Bidi`` call driven a message at a time, so sends and replies interleave::

        with BidiSession(target) as bidi:
            bidi.send("a")
            assert bidi.recv().text == "a"   # echoed before "b" is even sent
            bidi.send("b")
            ...

    ``recv`` raises ``grpc.RpcError`` when the call failed and ``EOFError`` when the server
    ended it; ``close_send`` half-closes; leaving the ``with`` cancels a call still open.
    """

    def __init__(
        self,
        target: str,
        metadata: MetadataArg = None,
        *,
        timeout: float = CALL_TIMEOUT_S,
        channel: grpc.Channel | None = None,
    ) -> None:
        self._own_channel = channel is None
        self._channel = channel if channel is not None else open_channel(target)
        self._outbox: queue.Queue[pb.EchoRequest | None] = queue.Queue()
        self._call = _bidi_rpc(self._channel)(
            self._requests(), timeout=timeout, metadata=_metadata(metadata)
        )
        self._replies = iter(self._call)

    def _requests(self) -> Iterator[pb.EchoRequest]:
        while (request := self._outbox.get()) is not None:
            yield request

    def send(self, request: RequestArg) -> None:
        """Queue one request (a text or a message); it is sent right away."""
        self._outbox.put(_request(request))

    def recv(self) -> pb.EchoReply:
        """The next reply, waiting for it."""
        try:
            return next(self._replies)
        except StopIteration:
            raise EOFError("the Bidi call ended") from None

    def close_send(self) -> None:
        """Half-close: no more requests."""
        self._outbox.put(None)

    def close(self) -> None:
        """Half-close, cancel the call if still open, close the channel if ours."""
        self.close_send()
        self._call.cancel()  # type: ignore[no-untyped-call]  # (untyped in grpc-stubs)
        if self._own_channel:
            self._channel.close()

    def __enter__(self) -> BidiSession:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def reply_to_dict(reply: pb.EchoReply) -> dict[str, Any]:
    """The JSON form of a reply (the payload as its length and SHA-256)."""
    return {
        "pod": reply.pod,
        "namespace": reply.namespace,
        "node": reply.node,
        "service": reply.service,
        "version": reply.version,
        "method": reply.method,
        "metadata": dict(sorted(reply.metadata.items())),
        "text": reply.text,
        "sequence": reply.sequence,
        "count": reply.count,
        "bytes": reply.bytes,
        "served": reply.served,
        "payload_bytes": len(reply.payload),
        "payload_sha256": hashlib.sha256(reply.payload).hexdigest(),
    }


# --------------------------------------------------------------------------- CLI

_METHODS = ("unary", "server-stream", "client-stream", "bidi")


def _print_json(doc: dict[str, Any], *, err: bool = False) -> None:
    print(json.dumps(doc, sort_keys=True), file=sys.stderr if err else sys.stdout, flush=True)


def _error_doc(e: grpc.RpcError) -> tuple[int, dict[str, Any]]:
    """The exit code (the status value) and the JSON of a failed call."""
    if isinstance(e, grpc.Call):
        code = e.code()
        value = int(code.value[0])
        return value, {"code": code.name, "value": value, "details": e.details() or ""}
    return 2, {"code": "UNKNOWN", "value": 2, "details": str(e)}


def _metadata_arg(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"want KEY=VALUE, got {text!r}")
    return key.strip().lower(), value


def _client(args: argparse.Namespace) -> int:
    metadata: list[tuple[str, str]] = args.metadata
    payload = pattern_bytes(args.payload_bytes)

    def request() -> pb.EchoRequest:
        return pb.EchoRequest(
            text=args.text,
            count=args.count,
            fail_code=args.fail_code,
            payload=payload,
            delay_ms=args.delay_ms,
        )

    if args.repeat is not None:
        return _repeat(args, metadata, request())
    try:
        with open_channel(args.target) as channel:
            if args.method == "unary":
                _print_json(reply_to_dict(_unary(channel, request(), metadata, args.timeout)))
                return 0
            if args.method == "server-stream":
                replies = iter_server_stream(
                    args.target, request(), metadata, timeout=args.timeout, channel=channel
                )
            else:
                requests = [request() for _ in range(args.count)]
                if args.method == "client-stream":
                    reply = call_client_stream(
                        args.target, requests, metadata, timeout=args.timeout, channel=channel
                    )
                    replies = iter([reply])
                else:
                    replies = iter_bidi(
                        args.target, requests, metadata, timeout=args.timeout, channel=channel
                    )
            for reply in replies:
                _print_json(reply_to_dict(reply))
    except grpc.RpcError as e:
        rc, doc = _error_doc(e)
        _print_json({"error": doc}, err=True)
        return rc
    return 0


def _unary(
    channel: grpc.Channel,
    request: pb.EchoRequest,
    metadata: Sequence[tuple[str, str]],
    timeout: float,
) -> pb.EchoReply:
    return call_unary(
        "",
        request.text,
        metadata,
        fail_code=request.fail_code,
        payload=request.payload,
        delay_ms=request.delay_ms,
        timeout=timeout,
        channel=channel,
    )


def _repeat(
    args: argparse.Namespace, metadata: Sequence[tuple[str, str]], request: pb.EchoRequest
) -> int:
    pods: Counter[str] = Counter()
    versions: Counter[str] = Counter()
    errors: Counter[str] = Counter()
    shared = None if args.new_connection else open_channel(args.target)
    try:
        for _ in range(args.repeat):
            with _using(args.target, shared) as channel:
                try:
                    reply = _unary(channel, request, metadata, args.timeout)
                except grpc.RpcError as e:
                    errors[_error_doc(e)[1]["code"]] += 1
                    continue
            pods[reply.pod] += 1
            versions[reply.version] += 1
    finally:
        if shared is not None:
            shared.close()
    ok = sum(pods.values())
    _print_json(
        {
            "calls": args.repeat,
            "ok": ok,
            "errors": dict(errors),
            "pods": dict(pods),
            "versions": dict(versions),
        }
    )
    return 0 if ok == args.repeat else 1


def _nonnegative(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"wants >= 0, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The parser of ``python -m nodeagent.samples.samplegrpc``."""
    parser = argparse.ArgumentParser(
        prog="python -m nodeagent.samples.samplegrpc",
        description="Call the sample app's gRPC echo service (nodeagent.sample.Echo).",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    c = sub.add_parser("client", help="make calls, print one JSON line per reply")
    c.add_argument("--target", required=True, help="HOST:PORT of the service")
    c.add_argument("--method", choices=_METHODS, default="unary")
    c.add_argument(
        "--count",
        type=_nonnegative,
        default=1,
        help="replies (server-stream) or requests sent (client-stream, bidi); default 1",
    )
    c.add_argument("--text", default="", help="the text of the request(s)")
    c.add_argument(
        "--metadata",
        type=_metadata_arg,
        nargs="+",
        action="extend",
        default=[],
        metavar="KEY=VALUE",
        help="request metadata (repeatable; keys are lower-cased)",
    )
    c.add_argument(
        "--fail-code", type=_nonnegative, default=0, help="ask the server to fail with this"
    )
    c.add_argument(
        "--delay-ms", type=_nonnegative, default=0, help="ask the server to wait this long"
    )
    c.add_argument(
        "--payload-bytes",
        type=_nonnegative,
        default=0,
        metavar="N",
        help="send an N-byte payload per request (the /bytes/N pattern)",
    )
    c.add_argument(
        "--timeout", type=float, default=CALL_TIMEOUT_S, help="deadline of each call (seconds)"
    )
    c.add_argument(
        "--repeat",
        type=_nonnegative,
        default=None,
        metavar="N",
        help="unary only: make N calls and print one summary (per pod, per version)",
    )
    c.add_argument(
        "--new-connection",
        action="store_true",
        help="with --repeat: a new connection for every call",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m nodeagent.samples.samplegrpc client ...``; the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.repeat is not None and args.method != "unary":
        parser.error("--repeat is for --method unary only")
    if args.new_connection and args.repeat is None:
        parser.error("--new-connection goes with --repeat")
    return _client(args)


if __name__ == "__main__":
    sys.exit(main())
