"""HTTP/1.1 for the proxy as two sans-I/O machines on top of ``httptools`` (the C parser
``llhttp``, strict mode): one per side of a proxied exchange.

Rule: **no I/O here**. No asyncio, no sockets, no clocks, no logging side effects. Bytes
from a peer go in with ``receive_data`` and come out as events; the caller's actions
(``send_response_head``, ``send_body``, ...) return the bytes to write. ``receive_data(b"")``
means the peer closed its side (EOF). The I/O layer (``nodeagent.proxy``) owns sockets.

- ``DownstreamHttp1`` is the proxy's server side, facing the client: it yields
  ``RequestHead`` / ``BodyChunk`` / ``RequestEnd``, answers malformed requests with 400 and
  oversize heads with 431 (``ProtocolError``; answer it with ``send_error``), supports
  ``Expect: 100-continue`` (``send_continue``), keep-alive (``start_next_request``), and
  pipelining: a request arriving while one is in flight is parsed, but its events stay
  queued here and are delivered by ``start_next_request``. After a ``101`` (or a 2xx to
  ``CONNECT``) it becomes a raw passthrough: every later input comes out as
  ``Upgraded(data)``.
- ``UpstreamHttp1`` is the proxy's client side, facing the application: it sends one
  request at a time and yields ``Informational`` / ``ResponseHead`` / ``BodyChunk`` /
  ``ResponseEnd``; a malformed response is ``ProtocolError(502, ...)``; ``reusable`` says
  whether the connection can carry another request after this one.
- ``forwardable_headers`` is the pure rule for copying a head across the proxy
  (hop-by-hop headers removed, see its docstring).

Parsing is llhttp's: it rejects the request-smuggling vectors (``Content-Length`` together
with ``Transfer-Encoding``, a bad or repeated ``Content-Length``, obs-fold, bare LF or CR
line ends, whitespace after a chunk size, control characters in fields). Added here: an
HTTP/1.1 request needs exactly one ``Host`` (400), a request ``Transfer-Encoding`` other
than ``chunked`` is a 501 and a response one a 502 (relayed without its hop-by-hop coding,
such a body would reach the client still encoded), a version other than 1.0/1.1 is a 505
(502 upstream), and so are a response status below 100 or control characters in a reason
phrase (llhttp lets those through).

Trailers of a chunked body are delivered: llhttp reports trailer fields like header fields
after the last chunk, and they come out in ``RequestEnd.trailers`` /
``ResponseEnd.trailers``; on the way out they go after the last chunk (on a body framed any
other way they are dropped).

Heads are written here by hand; header names must be tokens and no name, value, target or
reason may contain CR, LF or NUL, so a caller cannot inject a header or a second message.

What else this module adds to llhttp (which ``httptools`` exposes only partly): size
limits for the parts llhttp would buffer in Python (a head, and the trailers: bytes are
counted per read while one is incomplete, so a never-ending one is cut after the read that
crosses ``max_header_size``: 431, 502 upstream), end-of-body by EOF for responses without
framing, the ``HEAD`` / ``204`` / ``304`` / ``CONNECT`` rules for responses (the response
parser does not know the request), and the boundary between pipelined messages. Bytes an
application sends after a complete response make its connection not ``reusable`` (they are
never taken for the next response); bytes a client sends after a request that ends the
connection (``Connection: close``, HTTP/1.0) are ignored.

Bodies stream in both directions: each ``BodyChunk`` is what arrived, never a whole body.
Errors are split by whose fault: the peer's bytes produce a ``ProtocolError`` event; a
caller's misuse (a body on a ``HEAD`` response, a header value with CR/LF, a second
response head, ...) raises ``LocalProtocolError`` (a ``ValueError``).

Limits of llhttp worth knowing: only the request methods llhttp knows are accepted (the
registered ones, ``PURGE``, WebDAV, ...; an unknown token is a 400); llhttp stops right
after an ``Upgrade``/``CONNECT`` head, so the ``Content-Length`` body of such a request is
counted here, an ``Upgrade`` offer on a request with a *chunked* body is dropped
(``RequestHead.upgrade`` is None; the request is served as plain HTTP) and ``CONNECT`` with
a chunked body is a 400.

The layer lives in private modules and this one is its public face (every name callers use
is importable from here: ``__all__``), as h11's package is over its ``_`` modules:

- ``_http1_common``: the vocabulary (events, errors, header constants,
  ``forwardable_headers``);
- ``_http1_read``: what both machines do alike with llhttp (message phases, the field and
  chunk callbacks, the limits on heads and trailers);
- ``_http1_write``: heads and bodies written (pure functions returning the framing chosen);
- ``_http1_down``: ``DownstreamHttp1``; ``_http1_up``: ``UpstreamHttp1``.
"""

from __future__ import annotations

from nodeagent.protocol._http1_common import (
    DEFAULT_MAX_HEADER_SIZE,
    DEFAULT_MAX_HEADERS,
    HOP_BY_HOP,
    RESPONSE_FLAG_HEADER,
    BodyChunk,
    ConnectionClosed,
    DownstreamEvent,
    Headers,
    Informational,
    LocalProtocolError,
    ProtocolError,
    RawHead,
    RequestEnd,
    RequestHead,
    ResponseEnd,
    ResponseHead,
    Upgraded,
    UpstreamEvent,
    forwardable_headers,
)
from nodeagent.protocol._http1_down import DownstreamHttp1
from nodeagent.protocol._http1_up import UpstreamHttp1

__all__ = [
    "DEFAULT_MAX_HEADERS",
    "DEFAULT_MAX_HEADER_SIZE",
    "HOP_BY_HOP",
    "RESPONSE_FLAG_HEADER",
    "BodyChunk",
    "ConnectionClosed",
    "DownstreamEvent",
    "DownstreamHttp1",
    "Headers",
    "Informational",
    "LocalProtocolError",
    "ProtocolError",
    "RawHead",
    "RequestEnd",
    "RequestHead",
    "ResponseEnd",
    "ResponseHead",
    "Upgraded",
    "UpstreamEvent",
    "UpstreamHttp1",
    "forwardable_headers",
]
