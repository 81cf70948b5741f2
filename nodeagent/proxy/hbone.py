"""HBONE over asyncio: mutual-TLS 1.3 HTTP/2 connections carrying one CONNECT stream per
proxied TCP connection. The names the proxy wiring uses, in one place; each is defined
(and documented) in the module that owns it:

- ``hbone_stream``: one connection and its streams, whichever side opened it
  (``HboneStream`` as an ``asyncio.Transport``, the connection protocol under TLS,
  ``HBONE_PORT``, ``describe_tls_error``);
- ``hbone_client``: ``HboneClientPool``, outbound connections pooled per identity pair
  and peer;
- ``hbone_server``: ``start_hbone_server``/``HboneServer``, the listener, and the
  ``ConnectRequest``/``ConnectRefusal`` it exchanges with the proxy.

Framing and flow-control rules are ``nodeagent.protocol.hbone``'s. This module only
re-exports: the three above never import it (no import circle).
"""

from __future__ import annotations

from nodeagent.proxy.hbone_client import HboneClientPool
from nodeagent.proxy.hbone_server import (
    ConnectRefusal,
    ConnectRequest,
    HboneServer,
    start_hbone_server,
)
from nodeagent.proxy.hbone_stream import HBONE_PORT, HboneStream, describe_tls_error

__all__ = [
    "HBONE_PORT",
    "ConnectRefusal",
    "ConnectRequest",
    "HboneClientPool",
    "HboneServer",
    "HboneStream",
    "describe_tls_error",
    "start_hbone_server",
]
