"""The one regex engine for patterns a user gives (VirtualService ``regex`` string matches):
RE2, as Envoy and Istio use, so matching takes time linear in the input whatever the
pattern; a pattern RE2 does not accept (backreferences, lookaround) is refused when the
config loads (``RegexError``), never at request time.

``compile_regex`` gives a ``Re2Regex``; ``fullmatch`` is the only match a StringMatch
makes (Istio's ``regex`` matches the whole value).
"""

from __future__ import annotations

from typing import Any

__all__ = ["MAX_PATTERN_LENGTH", "Re2Regex", "RegexError", "compile_regex"]

MAX_PATTERN_LENGTH = 1024
"""Longer patterns are refused: a route match is not a program (Envoy's default
``max_program_size`` refuses large ones the same way)."""

_RE2: Any = None
_OPTIONS: Any = None
_BOTH: Any = None
"""RE2's compiler, its options and its whole-input anchor, loaded by the first pattern
compiled (``_load``): a mesh without a ``regex`` match never maps RE2 and its C++
runtime (1 MiB of each agent's RSS)."""
_NO_MATCH = (-1, -1)


def _load() -> Any:
    global _RE2, _OPTIONS, _BOTH
    import re2
    from re2 import _re2

    options = re2.Options()
    options.log_errors = False  # a bad pattern is our ConfigError, not a line on stderr
    options.never_capture = True  # only whether it matches counts: the fastest RE2 path
    _OPTIONS, _BOTH, _RE2 = options, _re2.RE2.Anchor.ANCHOR_BOTH, _re2.RE2
    return _RE2


class RegexError(ValueError):
    """A pattern RE2 refuses, with RE2's reason."""


class Re2Regex:
    """A compiled RE2 pattern; ``pattern`` is its source as written."""

    __slots__ = ("_re", "pattern")

    def __init__(self, pattern: str, compiled: Any) -> None:
        self.pattern = pattern
        self._re = compiled

    def fullmatch(self, text: str) -> bool:
        """Whether ``text`` matches the pattern as a whole."""
        try:
            data = text.encode()
        except UnicodeEncodeError:  # a lone surrogate: no UTF-8 text, so no match
            return False
        # RE2's own call, not the ``re``-like wrapper: 1 µs instead of 6 per match
        return bool(self._re.Match(_BOTH, data, 0, len(data))[0] != _NO_MATCH)

    def __repr__(self) -> str:
        return f"Re2Regex({self.pattern!r})"


def compile_regex(pattern: str) -> Re2Regex:
    """``pattern`` compiled with RE2 syntax; ``RegexError`` saying why RE2 refuses it."""
    if len(pattern) > MAX_PATTERN_LENGTH:
        raise RegexError(f"longer than {MAX_PATTERN_LENGTH} characters")
    try:
        compiled = (_RE2 or _load())(pattern.encode(), _OPTIONS)
    except UnicodeEncodeError:
        raise RegexError("not valid Unicode text") from None
    if not compiled.ok():
        reason = compiled.error()
        raise RegexError(reason.decode("utf-8", "replace") if isinstance(reason, bytes) else reason)
    return Re2Regex(pattern, compiled)
