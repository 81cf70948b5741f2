"""The hash input of a consistent-hash load balancer (Istio's ``consistentHash``), taken
from a request: a header, a cookie (generated, as Envoy does, when the policy sets a
``ttl`` and the request carries none), the source IP, or a query parameter.

Also owns ``stable_hash``, the 64-bit hash that both the keys and the ring points of
``core.balancer`` go through (the same in every process, unlike Python's ``hash``).
Pure: the request's parts arrive parsed; which host a key lands on is the balancer's.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from hashlib import blake2b

from nodeagent.model.traffic import ConsistentHash

__all__ = ["SetCookie", "hash_key_for", "stable_hash"]


def stable_hash(value: str) -> int:
    """A stable 64-bit hash (not Python's per-process ``hash``)."""
    return int.from_bytes(blake2b(value.encode(), digest_size=8).digest(), "big")


@dataclass(frozen=True)
class SetCookie:
    """A cookie Envoy generates for ``httpCookie`` with a ``ttl`` when the request had none."""

    name: str
    value: str
    max_age: int
    """Seconds; 0 makes a session cookie (no ``Max-Age``)."""
    path: str = ""

    def header_value(self) -> str:
        """The ``Set-Cookie`` header value, formatted as Envoy does."""
        out = f'{self.name}="{self.value}"'
        if self.max_age:
            out += f"; Max-Age={self.max_age}"
        if self.path:
            out += f"; Path={self.path}"
        return out + "; HttpOnly"

    def __str__(self) -> str:
        return self.header_value()


def _unquote(value: str) -> str:
    if len(value) >= 2 and value[0] == '"' and value[-1] == '"':
        return value[1:-1]
    return value


def hash_key_for(
    ch: ConsistentHash,
    headers: Mapping[str, str],
    cookies: Mapping[str, str],
    source_ip: str,
    query: Mapping[str, str],
    *,
    connection: str = "",
) -> tuple[str | None, SetCookie | None]:
    """The string to pass to :meth:`Balancer.pick` as ``hash_key``, and a cookie to set on
    the response (only for ``httpCookie`` with a ``ttl`` when the request carried none).

    ``headers`` has lowercase names. ``None`` as key means "no hash" (the header, cookie
    or query parameter is absent): the pick is then random, as in Envoy. A generated
    cookie value is a hash of the source IP and ``connection`` (pass something that tells
    client connections apart, e.g. ``"peer-ip:port>local-ip:port"``; Envoy hashes the
    remote and local addresses), so requests racing on one connection get the same value.
    """
    if ch.http_header_name is not None:
        name = ch.http_header_name
        value = headers.get(name.lower())
        if value is None:
            value = headers.get(name)
        return value, None
    if ch.http_cookie is not None:
        cookie = ch.http_cookie
        present = cookies.get(cookie.name)
        if present is not None:
            return _unquote(present), None
        if cookie.ttl is None:
            return None, None
        generated = f"{stable_hash(source_ip + '|' + connection):016x}"
        return generated, SetCookie(cookie.name, generated, max(0, int(cookie.ttl)))
    if ch.use_source_ip:
        return (source_ip or None), None
    if ch.http_query_parameter_name is not None:
        return query.get(ch.http_query_parameter_name), None
    return None, None
