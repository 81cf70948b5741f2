"""Which Telemetry applies to a workload, and the access-log filter's small CEL.

``resolve``: Istio's precedence, field by field — the mesh-wide object (root namespace,
no selector), then the namespace's (no selector), then the workload's (a ``selector``
or a ``targetRefs`` Service that picks it); a field a level leaves out is inherited;
custom tags merge by name. Several objects at one level: the first by name wins.

``parse_filter`` / ``keeps``: the subset of CEL the mesh evaluates for
``accessLogging[].filter.expression``: comparisons (``== != < <= > >=``) of one
attribute with an integer, a string or a boolean, combined with ``&&``, ``||``, ``!``
and parentheses. Attributes: ``response.code``, ``request.method``, ``request.path``,
``request.host``, ``request.useragent``, ``request.id``, ``connection.mtls``. Anything
else is a ``ValueError`` that says what is not supported.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from nodeagent.model.objects import Pod
from nodeagent.model.snapshot import MeshSnapshot
from nodeagent.model.telemetry import (
    DEFAULT_SAMPLING,
    DEFAULT_TELEMETRY,
    CustomTag,
    FilterNode,
    LogFilter,
    Telemetry,
    TelemetryConfig,
)

ATTRIBUTES: Mapping[str, tuple[str, type]] = {
    "response.code": ("response_code", int),
    "request.method": ("method", str),
    "request.path": ("path", str),
    "request.host": ("authority", str),
    "request.useragent": ("user_agent", str),
    "request.id": ("request_id", str),
    "connection.mtls": ("connection_security_policy", bool),
}
"""CEL attribute → (access-log field it reads, its CEL type)."""

_TOKEN = re.compile(
    r"\s*(?:(?P<num>\d+)|(?P<str>\"(?:[^\"\\]|\\.)*\"|'(?:[^'\\]|\\.)*')"
    r"|(?P<op>&&|\|\||==|!=|<=|>=|<|>|!|\(|\))|(?P<name>[A-Za-z_][A-Za-z0-9_.]*))"
)


def _tokens(expr: str) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    pos = 0
    expr = expr.rstrip()
    while pos < len(expr):
        m = _TOKEN.match(expr, pos)
        if m is None or m.end() == pos:
            rest = expr[pos:].lstrip()
            raise ValueError(
                f"unsupported CEL at {rest[:20]!r} (supported: comparisons of "
                f"{', '.join(ATTRIBUTES)} with &&, ||, !, parentheses)"
            )
        kind = m.lastgroup or ""
        out.append((kind, m.group(kind)))
        pos = m.end()
    return out


class _Parser:
    def __init__(self, expr: str) -> None:
        self.toks = _tokens(expr)
        self.i = 0

    def peek(self) -> str | None:
        return self.toks[self.i][1] if self.i < len(self.toks) else None

    def take(self) -> tuple[str, str]:
        if self.i >= len(self.toks):
            raise ValueError("the expression ends too early")
        t = self.toks[self.i]
        self.i += 1
        return t

    def expr(self) -> FilterNode:
        node = self.conj()
        while self.peek() == "||":
            self.i += 1
            node = ("or", node, self.conj())
        return node

    def conj(self) -> FilterNode:
        node = self.unary()
        while self.peek() == "&&":
            self.i += 1
            node = ("and", node, self.unary())
        return node

    def unary(self) -> FilterNode:
        if self.peek() == "!":
            self.i += 1
            return ("not", self.unary())
        if self.peek() == "(":
            self.i += 1
            node = self.expr()
            if self.peek() != ")":
                raise ValueError("a '(' is not closed")
            self.i += 1
            return node
        return self.comparison()

    def comparison(self) -> FilterNode:
        kind, name = self.take()
        if kind != "name":
            raise ValueError(f"expected an attribute, got {name!r}")
        if name not in ATTRIBUTES:
            raise ValueError(f"unsupported attribute {name!r} (supported: {', '.join(ATTRIBUTES)})")
        typ = ATTRIBUTES[name][1]
        if typ is bool and self.peek() not in ("==", "!="):
            return ("cmp", "==", name, True)
        op_kind, op = self.take()
        if op_kind != "op" or op not in ("==", "!=", "<", "<=", ">", ">="):
            raise ValueError(f"expected a comparison after {name}, got {op!r}")
        vkind, raw = self.take()
        value: int | str | bool
        if vkind == "num":
            value = int(raw)
        elif vkind == "str":
            value = raw[1:-1].encode().decode("unicode_escape")
        elif raw in ("true", "false"):
            value = raw == "true"
        else:
            raise ValueError(f"expected a literal after {name} {op}, got {raw!r}")
        if type(value) is not typ:
            raise ValueError(f"{name} is a {typ.__name__}, compared with {raw}")
        if typ is not int and op not in ("==", "!="):
            raise ValueError(f"{name} can only be compared with == or !=")
        return ("cmp", op, name, value)


def parse_filter(expr: str) -> LogFilter:
    """The tree of ``expr``, or ``ValueError`` saying what is outside the subset."""
    p = _Parser(expr)
    if not p.toks:
        raise ValueError("the expression is empty")
    tree = p.expr()
    if p.i != len(p.toks):
        raise ValueError(f"unexpected {p.toks[p.i][1]!r} after a complete expression")
    return LogFilter(expr, tree)


def _value(rec: Mapping[str, object], attr: str) -> object:
    field, typ = ATTRIBUTES[attr]
    v = rec.get(field)
    if typ is bool:
        return v == "mutual_tls" or (
            rec.get("source_principal", "unknown") != "unknown"
            and rec.get("destination_principal", "unknown") != "unknown"
        )
    return v


def _eval(node: tuple[Any, ...], rec: Mapping[str, object]) -> bool:
    tag = node[0]
    if tag == "or":
        return _eval(node[1], rec) or _eval(node[2], rec)
    if tag == "and":
        return _eval(node[1], rec) and _eval(node[2], rec)
    if tag == "not":
        return not _eval(node[1], rec)
    _, op, attr, want = node
    have = _value(rec, attr)
    if op == "==":
        return bool(have == want)
    if op == "!=":
        return bool(have != want)
    if not isinstance(have, int):
        return False
    w = int(want)
    if op == "<":
        return have < w
    if op == "<=":
        return have <= w
    if op == ">":
        return have > w
    return have >= w


def keeps(f: LogFilter, record: Mapping[str, object]) -> bool:
    """Whether an access-log record passes the filter."""
    return _eval(f.tree, record)


# --- which Telemetry applies ------------------------------------------------------------


def _selects(snap: MeshSnapshot, t: Telemetry, pod: Pod) -> bool:
    if t.selector is not None and pod.labels.matches(t.selector):
        return True
    for name in t.target_services:
        svc = snap.service_by_key.get(f"{t.namespace}/{name}")
        if svc is not None and svc.selector and pod.labels.matches(svc.selector):
            return True
    return False


def _scoped(t: Telemetry) -> bool:
    return t.selector is not None or bool(t.target_services)


def levels(snap: MeshSnapshot, pod: Pod | None) -> list[Telemetry]:
    """The Telemetry objects that apply to ``pod``: mesh, namespace, workload (each at
    most one, the first by name); the mesh-wide one alone when ``pod`` is None."""
    items = sorted(snap.telemetries, key=lambda t: t.name)
    root = snap.root_namespace
    chain = [t for t in items if t.namespace == root and not _scoped(t)][:1]
    if pod is None:
        return chain
    if pod.namespace != root:
        chain += [t for t in items if t.namespace == pod.namespace and not _scoped(t)][:1]
    chain += [
        t for t in items if t.namespace == pod.namespace and _scoped(t) and _selects(snap, t, pod)
    ][:1]
    return chain


def resolve(snap: MeshSnapshot, pod: Pod | None) -> TelemetryConfig:
    """What applies to ``pod``'s traffic (the mesh-wide level alone when None)."""
    if not snap.telemetries:
        return DEFAULT_TELEMETRY
    chain = levels(snap, pod)
    log_on, log_filter = True, None
    sampling, report = DEFAULT_SAMPLING, True
    tags: dict[str, CustomTag] = {}
    for t in chain:
        for al in t.access_logging:
            if al.disabled is not None:
                log_on = not al.disabled
            if al.filter is not None:
                log_filter = al.filter
        for tr in t.tracing:
            if tr.sampling is not None:
                sampling = tr.sampling
            if tr.disable_span_reporting is not None:
                report = not tr.disable_span_reporting
            for tag in tr.custom_tags:
                tags[tag.tag] = tag
    return TelemetryConfig(
        access_log=log_on,
        log_filter=log_filter,
        sampling=sampling,
        custom_tags=tuple(tags.values()),
        report_spans=report,
        policies=tuple(t.key for t in chain),
    )


__all__ = ["ATTRIBUTES", "keeps", "levels", "parse_filter", "resolve"]
