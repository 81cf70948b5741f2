"""Outlier detection with Envoy's semantics, as Istio's ``outlierDetection`` configures it:
consecutive 5xx and consecutive gateway errors per host, ejection for
``baseEjectionTime * multiplier`` (capped at Envoy's ``max_ejection_time`` of 300 s), the
``maxEjectionPercent`` guard, un-ejection on the ``interval`` sweep, and the multiplier
decaying while a returned host stays healthy.

Owns ``OutlierSettings`` (the config with Istio's defaults filled in), ``HostHealth`` (a
host's counters and ejection, which the balancer's hosts extend) and ``OutlierDetector``
(the sweep over one cluster's hosts). Time is injected and the sweep runs lazily: ticks
that fell due are caught up on the next call. Not owned: which host a pick chooses, and
panic mode (``core.balancer``). No I/O.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import Final, TypeAlias

from nodeagent.model.traffic import OutlierDetection

__all__ = [
    "DEFAULT_BASE_EJECTION_TIME",
    "DEFAULT_CONSECUTIVE_5XX",
    "DEFAULT_CONSECUTIVE_GATEWAY",
    "DEFAULT_INTERVAL",
    "DEFAULT_MAX_EJECTION_PERCENT",
    "MAX_EJECTION_TIME",
    "REASON_CONSECUTIVE_5XX",
    "REASON_CONSECUTIVE_GATEWAY",
    "EjectHook",
    "HostHealth",
    "OutlierDetector",
    "OutlierSettings",
    "ReturnHook",
]

DEFAULT_CONSECUTIVE_5XX: Final = 5
DEFAULT_CONSECUTIVE_GATEWAY: Final = 0
"""0 disables the check (Istio's default)."""
DEFAULT_INTERVAL: Final = 10.0
DEFAULT_BASE_EJECTION_TIME: Final = 30.0
DEFAULT_MAX_EJECTION_PERCENT: Final = 10
MAX_EJECTION_TIME: Final = 300.0
"""Envoy's default ``max_ejection_time`` (Istio does not expose it)."""

REASON_CONSECUTIVE_5XX: Final = "consecutive_5xx"
REASON_CONSECUTIVE_GATEWAY: Final = "consecutive_gateway_failure"

EjectHook: TypeAlias = Callable[[Hashable, str, str], None]
"""``on_eject(cluster key, address, reason)``; reason is one of the ``REASON_*`` names.
Called while the cluster is being updated: it must not pick from that cluster."""
ReturnHook: TypeAlias = Callable[[Hashable, str], None]
"""``on_return(cluster key, address)``; the same rule as ``EjectHook``."""

_EPS: Final = 1e-9
_GATEWAY_ERRORS: Final = frozenset({502, 503, 504})


@dataclass(frozen=True)
class OutlierSettings:
    """``OutlierDetection`` with Istio's defaults filled in (0 disables a check)."""

    consecutive_5xx: int = DEFAULT_CONSECUTIVE_5XX
    consecutive_gateway: int = DEFAULT_CONSECUTIVE_GATEWAY
    interval: float = DEFAULT_INTERVAL
    base_ejection_time: float = DEFAULT_BASE_EJECTION_TIME
    max_ejection_percent: int = DEFAULT_MAX_EJECTION_PERCENT

    @classmethod
    def of(cls, od: OutlierDetection) -> OutlierSettings:
        def pick(v: int | None, default: int) -> int:
            return default if v is None else v

        def pickf(v: float | None, default: float) -> float:
            return default if v is None or v <= 0 else v

        return cls(
            consecutive_5xx=pick(od.consecutive_5xx_errors, DEFAULT_CONSECUTIVE_5XX),
            consecutive_gateway=pick(od.consecutive_gateway_errors, DEFAULT_CONSECUTIVE_GATEWAY),
            interval=pickf(od.interval, DEFAULT_INTERVAL),
            base_ejection_time=pickf(od.base_ejection_time, DEFAULT_BASE_EJECTION_TIME),
            max_ejection_percent=min(
                100, pick(od.max_ejection_percent, DEFAULT_MAX_EJECTION_PERCENT)
            ),
        )

    @property
    def max_ejection_time(self) -> float:
        return max(MAX_EJECTION_TIME, self.base_ejection_time)


class HostHealth:
    """One host's outlier state, kept across config reloads by the balancer."""

    __slots__ = (
        "addr",
        "c5xx",
        "cgw",
        "ejected",
        "last_return_tick",
        "return_at",
        "return_tick",
        "times",
    )

    def __init__(self, addr: str) -> None:
        self.addr = addr
        self.c5xx = 0
        self.cgw = 0
        self.ejected = False
        self.return_at = 0.0
        self.return_tick = 0
        self.times = 0
        """Envoy's ejection backoff multiplier."""
        self.last_return_tick: int | None = None


class OutlierDetector:
    """Outlier detection over one cluster's hosts. The hosts are passed to each call (the
    cluster owns the list); a call returns True when an ejection or a return changed which
    hosts are healthy, so the caller can recompute what depends on that."""

    __slots__ = (
        "clock",
        "key",
        "n_ejected",
        "next_sweep",
        "on_eject",
        "on_return",
        "settings",
        "t0",
        "tick",
    )

    def __init__(
        self,
        key: Hashable,
        clock: Callable[[], float],
        on_eject: EjectHook | None,
        on_return: ReturnHook | None,
    ) -> None:
        self.key = key
        self.clock = clock
        self.on_eject = on_eject
        self.on_return = on_return
        self.settings: OutlierSettings | None = None
        """None: detection is off (no ``outlierDetection`` in the rule)."""
        self.n_ejected = 0
        # the sweep grid: tick m happens at t0 + m * interval
        self.t0 = 0.0
        self.tick = 0
        self.next_sweep = math.inf

    def configure(self, settings: OutlierSettings | None, hosts: Sequence[HostHealth]) -> None:
        """New settings: off returns every ejected host; a new interval restarts the grid."""
        if settings is None:
            for h in hosts:
                h.c5xx = h.cgw = h.times = 0
                h.last_return_tick = None
                if h.ejected:
                    h.ejected = False
                    if self.on_return is not None:
                        self.on_return(self.key, h.addr)
            self.n_ejected = 0
            self.next_sweep = math.inf
        elif self.settings is None or settings.interval != self.settings.interval:
            now = self.clock()
            self.t0, self.tick = now, 0
            self.next_sweep = now + settings.interval
            for h in hosts:
                h.last_return_tick = None
                if h.ejected:
                    h.return_tick = self._tick_at_or_after(h.return_at, settings.interval)
        self.settings = settings

    def count(self, hosts: Sequence[HostHealth]) -> None:
        """Recount the ejected hosts after the host set changed."""
        self.n_ejected = sum(1 for h in hosts if h.ejected)

    def _tick_at_or_after(self, t: float, interval: float) -> int:
        return max(self.tick + 1, math.ceil((t - self.t0) / interval - _EPS))

    def advance(self, now: float, hosts: Sequence[HostHealth]) -> bool:
        """Run every interval tick due by ``now`` (Envoy's interval timer, lazily)."""
        s = self.settings
        if s is None or now < self.next_sweep:
            return False
        last = int((now - self.t0) / s.interval + _EPS)
        first = self.tick + 1
        if last < first:
            last = first
        self.tick = last
        self.next_sweep = self.t0 + (last + 1) * s.interval
        changed = False
        for h in hosts:
            if h.ejected:
                if h.return_tick > last:
                    continue
                r = h.return_tick
                h.ejected = False
                h.c5xx = h.cgw = 0
                h.last_return_tick = r
                self.n_ejected -= 1
                changed = True
                if self.on_return is not None:
                    self.on_return(self.key, h.addr)
                # healthy ticks after the one that returned it, at least one interval later
                h.times = max(0, h.times - (last - r))
            elif h.times and h.last_return_tick is not None:
                start = max(first, h.last_return_tick + 1)
                if last >= start:
                    h.times = max(0, h.times - (last - start + 1))
        return changed

    def report(
        self,
        h: HostHealth,
        status: int | None,
        connect_failure: bool,
        hosts: Sequence[HostHealth],
    ) -> bool:
        """The outcome of one request to ``h``, one of ``hosts`` (see ``Balancer.report``)."""
        s = self.settings
        if s is None:
            return False
        if connect_failure:
            status = 503
        elif status is None:
            status = 200
        if status < 500:
            h.c5xx = h.cgw = 0
            return False
        now = self.clock()
        changed = self.advance(now, hosts)
        if status in _GATEWAY_ERRORS:
            h.cgw += 1
            if h.cgw == s.consecutive_gateway and s.consecutive_gateway > 0 and not h.ejected:
                if self._try_eject(h, now, s, REASON_CONSECUTIVE_GATEWAY, len(hosts)):
                    changed = True
                h.cgw = 0
        else:
            h.cgw = 0
        h.c5xx += 1
        if h.c5xx == s.consecutive_5xx and s.consecutive_5xx > 0 and not h.ejected:
            if self._try_eject(h, now, s, REASON_CONSECUTIVE_5XX, len(hosts)):
                changed = True
            h.c5xx = 0
        return changed

    def _try_eject(
        self, h: HostHealth, now: float, s: OutlierSettings, reason: str, n_hosts: int
    ) -> bool:
        # Envoy's guard, checked before ejecting: the fraction already ejected must stay
        # below maxEjectionPercent (so with 2 hosts and 10 %, the first one may go).
        if 100.0 * self.n_ejected / n_hosts >= s.max_ejection_percent:
            return False
        max_time = s.max_ejection_time
        if h.times * s.base_ejection_time < max_time + s.base_ejection_time:
            h.times += 1
        h.ejected = True
        h.return_at = now + min(s.base_ejection_time * h.times, max_time)
        h.return_tick = self._tick_at_or_after(h.return_at, s.interval)
        self.n_ejected += 1
        if self.on_eject is not None:
            self.on_eject(self.key, h.addr, reason)
        return True

    def ejected(self, now: float, hosts: Sequence[HostHealth]) -> list[tuple[str, float]]:
        """``(address, seconds from ``now`` until the sweep that returns it)`` per ejected
        host; call ``advance(now)`` first."""
        s = self.settings
        if s is None:
            return []
        return [
            (h.addr, max(0.0, self.t0 + h.return_tick * s.interval - now))
            for h in hosts
            if h.ejected
        ]
