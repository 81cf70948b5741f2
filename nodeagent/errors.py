"""The error types of nodeagent, one per whose-fault.

- ``ConfigError``: the user's configuration is wrong (names the file, object and field).
- ``PeerError``: a remote peer misbehaved or is unreachable (names the peer).
- ``LocalStateError``: this machine is not in the state we need (a missing netns, a
  command that failed, a permission), with what to do about it.
"""

from __future__ import annotations


class NodeAgentError(Exception):
    """Base of every error nodeagent raises on purpose."""


MAX_REASON = 1000
"""Characters of a config error's reason kept: a message never carries a huge value."""


class ConfigError(NodeAgentError):
    """A configuration object is invalid.

    The message reads ``FILE: KIND NAMESPACE/NAME: FIELD.PATH: what is wrong``.
    """

    def __init__(self, message: str, *, source: str = "", obj: str = "", field: str = "") -> None:
        if len(message) > MAX_REASON:
            message = f"{message[:MAX_REASON]}… ({len(message) - MAX_REASON} characters cut)"
        self.source = source
        self.obj = obj
        self.field = field
        self.reason = message
        # a name or path from the file may be huge (fuzzing found a 10,000-character name)
        parts = [_clip(p) for p in (source, obj, field) if p]
        super().__init__(": ".join([*parts, message]))


MAX_PART = 300
"""Characters of a file, object or field named in a ConfigError's message (Kubernetes
names are at most 253)."""


def _clip(part: str) -> str:
    if len(part) <= MAX_PART:
        return part
    return f"{part[:MAX_PART]}… ({len(part) - MAX_PART} characters cut)"


class ConfigErrors(NodeAgentError):
    """Several configuration errors found in one load (each reported, all at once)."""

    def __init__(self, errors: list[ConfigError]) -> None:
        self.errors = errors
        lines = "\n".join(f"  - {e}" for e in errors)
        super().__init__(f"{len(errors)} configuration error(s):\n{lines}")


class PeerError(NodeAgentError):
    """A peer (client, upstream, CA) failed or misbehaved."""


class ConnectRefusedError(PeerError):
    """The HBONE peer answered our CONNECT with a non-200 status (403: a policy there
    denied it)."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


class LocalStateError(NodeAgentError):
    """The local machine is not in a state we can work with."""
