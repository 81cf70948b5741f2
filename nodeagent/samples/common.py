"""What the sample app's HTTP and gRPC services share: who answers, what was served, the log.

This module owns the settings a sample-app process reports about itself (``AppSettings``),
its one count of requests answered (``ServedCounter``, shared by the HTTP and gRPC
services of a process), the one log line per request both print, and the byte pattern of
``/bytes/N`` (and of gRPC payloads in tests). ``sampleapp`` and ``samplegrpc`` both import
it; it imports neither, so the two never import each other in a circle.
"""

from __future__ import annotations

import sys
import threading
from dataclasses import dataclass
from datetime import UTC, datetime

CALL_TIMEOUT_S = 10.0
"""The default timeout of each downstream call of the HTTP service."""
MAX_DELAY_S = 600.0
"""The longest delay a request may ask for (``/delay/SECONDS``, gRPC ``delay_ms``)."""
PATTERN_PERIOD = 251
"""``/bytes/N`` answers byte ``i`` = ``i % 251`` (a prime period shows shifted data)."""


def pattern_bytes(n: int) -> bytes:
    """The first ``n`` bytes ``/bytes/N`` answers (for tests and clients)."""
    reps = n // PATTERN_PERIOD + 1
    return (bytes(range(PATTERN_PERIOD)) * reps)[:n]


@dataclass(frozen=True)
class AppSettings:
    """What the sample app says about itself and whom it calls."""

    pod: str
    namespace: str
    node: str
    service: str
    version: str
    calls: tuple[str, ...] = ()
    call_timeout: float = CALL_TIMEOUT_S
    fail_status: int = 0
    """Non-zero: the status of every answer on a non-special path (``--fail-status``)."""


class ServedCounter:
    """The running count of requests one process has answered (thread-safe)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._value = 0

    def next(self) -> int:
        """Count one more request; its number (the first is 1)."""
        with self._lock:
            self._value += 1
            return self._value

    @property
    def value(self) -> int:
        """How many requests were counted so far."""
        with self._lock:
            return self._value


# One lock for every thread of the process: lines never interleave.
_LOG_LOCK = threading.Lock()


def log_line(text: str) -> None:
    """Write one line to stdout and flush it, safe across threads."""
    with _LOG_LOCK:
        try:
            sys.stdout.write(text + "\n")
            sys.stdout.flush()
        except (OSError, ValueError):
            pass  # stdout gone (closed pipe): keep serving


def timestamp() -> str:
    """Now, as the log lines show it (UTC, milliseconds)."""
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def log_request(settings: AppSettings, what: str, status: int | str, ms: float) -> None:
    """Print the one line of a request: ``TIME SERVICE/VERSION WHAT STATUS DURATIONms``."""
    log_line(f"{timestamp()} {settings.service}/{settings.version} {what} {status} {ms:.1f}ms")
