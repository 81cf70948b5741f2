"""The text form of ``nodeagent ctl explain``: one section per decision the proxy would
take, in the order it takes them, from the JSON answer of the ``Explain`` RPC."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any


def _kv(d: Mapping[str, Any], *keys: str) -> str:
    return ", ".join(f"{k}={d[k]}" for k in keys if d.get(k) not in (None, "", [], {}))


def _route(r: Mapping[str, Any]) -> list[str]:
    out = []
    vs = r.get("virtual_service")
    if vs:
        name = f" ({r['rule_name']})" if r.get("rule_name") else ""
        match = f", match[{r['match']}]" if r.get("match") is not None else ""
        out.append(f"  VirtualService {vs}: http[{r.get('rule')}]{name}{match}")
        extra = _kv(r, "timeout", "retries", "fault", "redirect")
        if extra:
            out.append(f"    {extra}")
    elif r.get("tcp_rule"):
        out.append("  VirtualService tcp[] rule")
    else:
        out.append(f"  {r.get('outcome') or 'no VirtualService: the service itself'}")
    for d in r.get("destinations") or []:
        subset = f" subset {d['subset']}" if d.get("subset") else ""
        out.append(f"    -> {d['host']}{subset} weight {d['weight']}")
    return out


def _endpoints(e: Mapping[str, Any]) -> list[str]:
    out = [f"  cluster {e.get('cluster')} ({e.get('algorithm')})"]
    for i, tier in enumerate(e.get("tiers") or []):
        for h in tier:
            state = "EJECTED" if h.get("ejected") else f"{h.get('active_requests')} in flight"
            loc = f" [{h['locality']}]" if h.get("locality") else ""
            out.append(f"    tier {i}: {h['endpoint']} {h['pod']}{loc} {state}")
    for addr in e.get("excluded_as_ejected") or []:
        out.append(f"    excluded (ejected by outlier detection): {addr}")
    pick = e.get("pick")
    if isinstance(pick, Mapping):
        out.append(f"  would pick {pick['endpoint']} ({pick['pod']}): {e.get('why')}")
    else:
        out.append(f"  no pick: {e.get('why')}")
    return out


def _policies(a: Mapping[str, Any]) -> list[str]:
    out = [f"  enforced {a.get('enforced')}"]
    pols: Sequence[Mapping[str, Any]] = a.get("policies") or []
    if not pols:
        out.append("  no AuthorizationPolicy applies")
    for p in pols:
        state = "MATCHED" if p.get("matched") else "no match"
        out.append(f"  {p['action']} {p['policy']}: {state}")
        rules = p.get("rules")
        if isinstance(rules, str):
            out.append(f"    {rules}")
            continue
        for r in rules or []:
            out.append(f"    rule {r['index']}: {r['why']}")
    d = a.get("decision") or {}
    out.append(f"  => {'ALLOW' if d.get('allowed') else 'DENY'}: {d.get('reason')}")
    return out


def _generic(d: Any, indent: str = "  ") -> list[str]:
    if isinstance(d, Mapping):
        lines = []
        for k, v in d.items():
            if isinstance(v, Mapping | list) and not v:
                lines.append(f"{indent}{k}: none")
            elif isinstance(v, Mapping | list):
                lines.append(f"{indent}{k}:")
                lines += _generic(v, indent + "  ")
            else:
                lines.append(f"{indent}{k}: {v}")
        return lines
    if isinstance(d, list):
        lines = []
        for item in d:
            sub = _generic(item, indent + "  ")
            if sub:
                lines.append(f"{indent}- {sub[0].strip()}")
                lines += sub[1:]
        return lines
    return [f"{indent}{d}"]


SECTIONS = (
    ("source", "Source"),
    ("request", "Request"),
    ("service", "Service"),
    ("route", "Route"),
    ("endpoints", "Endpoints"),
    ("destination", "Destination"),
    ("peer_authentication", "PeerAuthentication"),
    ("authentication", "RequestAuthentication (JWT)"),
    ("authorization", "AuthorizationPolicy"),
    ("rate_limits", "Rate limits and quotas"),
)


def format_explain(data: Mapping[str, Any]) -> str:
    lines: list[str] = []
    special = {"route": _route, "endpoints": _endpoints, "authorization": _policies}
    for key, title in SECTIONS:
        if key not in data:
            continue
        lines.append(f"{title}:")
        fn = special.get(key)
        lines += fn(data[key]) if fn is not None else _generic(data[key])
    v = data.get("verdict") or {}
    status = f" ({v['status']})" if v.get("status") else ""
    lines.append(f"Verdict: {'ALLOWED' if v.get('allowed') else 'DENIED'}{status}: {v.get('why')}")
    return "\n".join(lines)
