"""Request targets as routing, authorization and the app see them: absolute-form turned
into origin-form (RFC 9112 §3.2.2: the target's authority replaces ``Host``), every other
form refused but ``OPTIONS *``, and the path normalized as Istio's mesh-wide
``pathNormalization`` option says (Envoy's ``normalize_path``, ``merge_slashes`` and
``path_with_escaped_slashes_action``). Pure: the L7 path calls ``request_target`` once
per request, before routing and policy, and the app gets what it returns.

Options (Istio's ``meshConfig.pathNormalization.normalization``):

- ``NONE``: the path as sent (still origin-form; ``%00`` is still refused);
- ``BASE`` (the default): escapes of unreserved characters decoded, other escapes in
  upper case, ``\\`` turned into ``/``, ``.`` and ``..`` segments removed (RFC 3986
  §5.2.4, never above the root);
- ``MERGE_SLASHES``: ``BASE``, then runs of ``/`` merged into one;
- ``DECODE_AND_MERGE_SLASHES``: ``%2F`` and ``%5C`` (any case) decoded first, then
  ``MERGE_SLASHES``.

The query is never changed. A ``%`` not followed by two hex digits, ``%00``, and a
fragment (``#``) are refused (400) under every option.
"""

from __future__ import annotations

from typing import Final

from mypy_extensions import mypyc_attr

NONE: Final = "NONE"
BASE: Final = "BASE"
MERGE_SLASHES: Final = "MERGE_SLASHES"
DECODE_AND_MERGE_SLASHES: Final = "DECODE_AND_MERGE_SLASHES"
PATH_NORMALIZATIONS: Final = (NONE, BASE, MERGE_SLASHES, DECODE_AND_MERGE_SLASHES)
"""Istio's names, in order of strictness; ``BASE`` is Istio's (and our) default."""

_UNRESERVED: Final = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
_HEX: Final = frozenset("0123456789abcdefABCDEF")
_SCHEMES: Final = frozenset({"http", "https"})
_KEEP_SLASHES: Final = frozenset({NONE, BASE})


@mypyc_attr(native_class=False)
class BadTarget(ValueError):
    """A request target the proxy refuses (400); the message says what is wrong."""


def request_target(method: str, target: str, authority: str, mode: str) -> tuple[str, str]:
    """(origin-form target, authority) of a request: the path normalized per ``mode``,
    the authority taken from an absolute-form target. Raises ``BadTarget``."""
    if target[:1] == "/":
        # the fast path: origin-form with nothing to normalize (most requests)
        if (
            "%" not in target
            and "\\" not in target
            and "/." not in target
            and "#" not in target
            and ("//" not in target or mode in _KEEP_SLASHES)
        ):
            return target, authority
        return normalize_path(target, mode), authority
    if target == "*":
        if method != "OPTIONS":
            raise BadTarget("request target * is only for OPTIONS")
        return target, authority
    scheme, sep, rest = target.partition("://")
    if not sep or scheme.lower() not in _SCHEMES:
        if method == "CONNECT":
            raise BadTarget("CONNECT is not served on an HTTP port")
        raise BadTarget(f"request target {target[:100]!r} is neither origin-form nor absolute")
    end = len(rest)
    for stop in "/?#":
        i = rest.find(stop)
        if i != -1 and i < end:
            end = i
    host, path = rest[:end], rest[end:]
    if not host or "@" in host:
        raise BadTarget(f"request target {target[:100]!r} has no host, or userinfo")
    if path[:1] != "/":
        path = "/" + path  # an empty path is "/" (RFC 9112 §3.2.1)
    return request_target(method, path, host, mode)[0], host


def normalize_path(target: str, mode: str) -> str:
    """An origin-form target (``/path?query``) normalized per ``mode``; the query is kept
    as sent. Raises ``BadTarget`` for a malformed escape, ``%00`` or a fragment."""
    if "#" in target:
        raise BadTarget("a request target may not carry a fragment (#)")
    path, sep, query = target.partition("?")
    if "%" in path:
        path = _escapes(path, mode)
    if mode == NONE:
        return target
    if "\\" in path:
        path = path.replace("\\", "/")
    if "/." in path:
        path = _dot_segments(path)
    if mode != BASE and "//" in path:  # after the dot segments, as Envoy merges
        while "//" in path:
            path = path.replace("//", "/")
    return path + sep + query


def _escapes(path: str, mode: str) -> str:
    """``%XX`` escapes checked (malformed or ``%00``: ``BadTarget``) and, except under
    ``NONE``, decoded where the option says, others upper-cased."""
    out: list[str] = []
    decode_slashes = mode == DECODE_AND_MERGE_SLASHES
    i, n = 0, len(path)
    while i < n:
        c = path[i]
        if c != "%":
            out.append(c)
            i += 1
            continue
        h = path[i + 1 : i + 3]
        if len(h) != 2 or h[0] not in _HEX or h[1] not in _HEX:
            raise BadTarget(f"malformed escape {path[i : i + 3]!r} in the request path")
        if h == "00":
            raise BadTarget("%00 in the request path")
        ch = chr(int(h, 16))
        if ch in _UNRESERVED or (decode_slashes and (ch == "/" or ch == "\\")):
            out.append(ch)
        else:
            out.append("%" + h.upper())
        i += 3
    return path if mode == NONE else "".join(out)


def _dot_segments(path: str) -> str:
    """RFC 3986 §5.2.4 on an absolute path: ``.`` dropped, ``..`` removes the segment
    before it (never above the root); a trailing one leaves the path ending in ``/``."""
    segs: list[str] = []
    parts = path.split("/")[1:]
    last = len(parts) - 1
    for n, seg in enumerate(parts):
        if seg == ".":
            if n == last:
                segs.append("")
        elif seg == "..":
            if segs:
                segs.pop()
            if n == last:
                segs.append("")
        else:
            segs.append(seg)
    return "/" + "/".join(segs)
