"""Logging a peer's misbehaviour without letting the peer flood the log: the first event
of each kind at WARNING, later ones at DEBUG (the metrics count every one)."""

from __future__ import annotations

import logging

_warned: set[tuple[str, str]] = set()


def warn_once(log: logging.Logger, kind: str, message: str, *args: object) -> None:
    """``log.warning`` the first time ``kind`` happens in this process, then ``log.debug``."""
    key = (log.name, kind)
    if key in _warned:
        log.debug(message, *args)
        return
    _warned.add(key)
    log.warning(message + " (further ones of this kind are logged at DEBUG)", *args)
