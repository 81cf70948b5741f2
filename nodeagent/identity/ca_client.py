"""The agent's client of the mesh CA: send a CSR, get a PEM chain back.

Owns dialling the CA with ``grpc.aio`` (so it runs on uvloop too): ``unix:PATH`` in
plaintext (a local socket, as the sandbox runs it), ``HOST:PORT`` always over TLS, the CA's
certificate checked against the trust bundle and the expected server name (``ca_tls``);
presenting the node's credential (``authorization: Bearer <token>``: a static node token
or the agent's projected ServiceAccount token, read from its file at each call since
kubelet rotates it); and turning gRPC failures into ``PeerError`` messages a person can
act on: ``CaUnreachable`` ("CA at … unreachable: …"), ``CaUntrusted`` ("CA at … is not
trusted: its certificate …") and ``CaRefused`` ("CA refused: …").
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import grpc.aio
from google.protobuf import struct_pb2

from nodeagent.errors import LocalStateError, PeerError
from nodeagent.identity import ca_pb2 as pb
from nodeagent.identity.ca import IMPERSONATED_IDENTITY, CsrRejected, csr_identity
from nodeagent.identity.ca_tls import CaTls

__all__ = ["CaClient", "CaRefused", "CaUnreachable", "CaUntrusted"]

METHOD = "/istio.v1.auth.IstioCertificateService/CreateCertificate"

CHANNEL_OPTIONS = (
    ("grpc.initial_reconnect_backoff_ms", 500),
    ("grpc.min_reconnect_backoff_ms", 500),
    ("grpc.max_reconnect_backoff_ms", 5000),
    ("grpc.use_local_subchannel_pool", 1),
)
"""gRPC's own reconnect backoff grows to 2 minutes and its connections are shared by every
channel of the process; the store's retries (≤ 30 s) decide here, and a channel dropped
after an UNAVAILABLE takes its connection (and backoff) with it."""


class CaUnreachable(PeerError):
    """The CA did not answer (down, wrong address, timed out)."""


class CaUntrusted(CaUnreachable):
    """The CA's TLS certificate does not verify (another root, wrong name, expired)."""


class CaRefused(PeerError):
    """The CA answered with a refusal (bad token, identity not placed here, bad CSR)."""


class CaClient:
    """Asks one CA for certificates on behalf of this node.

    ``target``: ``unix:PATH`` (plaintext) or ``HOST:PORT`` (TLS: ``trust_bundle`` is then
    required; ``server_name`` is the name the CA's certificate must carry, by default
    ``HOST``).
    """

    def __init__(
        self,
        target: str,
        token_file: str,
        timeout: float = 5.0,
        *,
        trust_bundle: str = "",
        server_name: str = "",
    ) -> None:
        self.target = target
        self.token_file = token_file
        self.timeout = timeout
        self.tls = None if target.startswith("unix:") else CaTls(target, trust_bundle, server_name)
        self._channel: grpc.aio.Channel | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def _token(self) -> str:
        try:
            token = Path(self.token_file).read_text().strip()
        except OSError as e:
            raise LocalStateError(
                f"cannot read this node's CA token from {self.token_file}: {e}"
            ) from e
        if not token:
            raise LocalStateError(f"this node's CA token file {self.token_file} is empty")
        return token

    async def _get_channel(self) -> grpc.aio.Channel:
        loop = asyncio.get_running_loop()
        if self.tls is not None and self.tls.reload():
            await self._drop_channel()  # the bundle changed: verify with the new roots
        if self._channel is None or self._loop is not loop:
            # A grpc.aio channel belongs to the loop it was made on.
            if self.tls is None:
                self._channel = grpc.aio.insecure_channel(self.target, options=CHANNEL_OPTIONS)
            else:
                self._channel = grpc.aio.secure_channel(
                    self.target,
                    self.tls.credentials(),
                    options=[*CHANNEL_OPTIONS, *self.tls.channel_options()],
                )
            self._loop = loop
        return self._channel

    async def sign(self, csr_pem: bytes, ttl_seconds: int) -> list[bytes]:
        """The PEM chain (leaf first, root last) the CA signs for ``csr_pem``."""
        token = self._token()
        request = pb.IstioCertificateRequest(
            csr=csr_pem.decode(), validity_duration=int(ttl_seconds)
        )
        try:
            identity = csr_identity(csr_pem)
        except CsrRejected:
            identity = ""  # let the CA say what is wrong with it
        if identity:
            meta = struct_pb2.Struct()
            meta.update({IMPERSONATED_IDENTITY: identity})
            request.metadata.CopyFrom(meta)
        rpc = (await self._get_channel()).unary_unary(
            METHOD,
            request_serializer=pb.IstioCertificateRequest.SerializeToString,
            response_deserializer=pb.IstioCertificateResponse.FromString,
        )
        try:
            response: pb.IstioCertificateResponse = await rpc(
                request,
                timeout=self.timeout,
                metadata=(("authorization", f"Bearer {token}"),),
            )
        except grpc.aio.AioRpcError as e:
            error = self._error(e)
            if isinstance(error, CaUnreachable) and self.tls is not None:
                why = await self.tls.explain(self.timeout)
                if why:
                    error = CaUntrusted(f"CA at {self.target} is not trusted: {why}")
            if isinstance(error, CaUnreachable):
                await self._drop_channel()  # dial afresh next time: the CA may be back
            raise error from None
        if not response.cert_chain:
            raise CaRefused(f"CA at {self.target} answered with an empty certificate chain")
        return [c.encode() for c in response.cert_chain]

    def _error(self, e: grpc.aio.AioRpcError) -> PeerError:
        code = e.code()
        details = e.details() or code.name
        if code == grpc.StatusCode.UNAVAILABLE:
            return CaUnreachable(f"CA at {self.target} unreachable: {details}")
        if code == grpc.StatusCode.DEADLINE_EXCEEDED:
            return CaUnreachable(
                f"CA at {self.target} unreachable: no answer within {self.timeout:g}s"
            )
        if code in (
            grpc.StatusCode.UNAUTHENTICATED,
            grpc.StatusCode.PERMISSION_DENIED,
            grpc.StatusCode.INVALID_ARGUMENT,
        ):
            return CaRefused(f"CA refused: {details}")
        if code == grpc.StatusCode.UNIMPLEMENTED:
            return CaRefused(
                f"CA at {self.target} does not serve IstioCertificateService: is it a CA?"
            )
        return CaRefused(f"CA at {self.target} failed ({code.name}): {details}")

    async def _drop_channel(self) -> None:
        channel, self._channel = self._channel, None
        if channel is not None and self._loop is asyncio.get_running_loop():
            await channel.close(None)

    async def close(self) -> None:
        """Close the channel (from the loop that used it)."""
        await self._drop_channel()
