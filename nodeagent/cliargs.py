"""Argument parsing every ``nodeagent`` subcommand shares: the parser class (whose help
shows each option's default and keeps a description's paragraphs) and the log levels.

Imports nothing of ours, so ``cli.py`` and the subcommands' own modules (``admin/ctl.py``,
``sandbox/cli.py``, ``identity/cli.py``, …) can all use it without an upward import.
"""

from __future__ import annotations

import argparse
import textwrap
from typing import Any

__all__ = ["LOG_LEVELS", "HelpFormatter", "Parser", "add_log_level"]

LOG_LEVELS = ("debug", "info", "warning", "error", "critical")
"""What ``--log-level`` accepts (any case): the names of Python's logging levels."""


class HelpFormatter(argparse.HelpFormatter):
    """Help that shows each option's default, and wraps text paragraph by paragraph.

    A default is shown unless the help already speaks of it, the option is required, or
    there is nothing to show (``None``, ``""``, ``False``, an empty list: the help says what
    leaving the option out means). In a description or epilog, blank lines separate
    paragraphs and indented lines are kept as written (examples).
    """

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if "default" in text.lower() or action.required or not _shows_default(action):
            return text
        return f"{text} (default: %(default)s)"

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        out: list[str] = []
        for para in textwrap.dedent(text).strip("\n").split("\n\n"):
            if para.startswith(" "):  # an example: keep its lines and alignment
                out.append("\n".join(indent + line for line in para.splitlines()))
            else:
                out.append(super()._fill_text(para, width, indent))
        return "\n\n".join(out)


def _shows_default(action: argparse.Action) -> bool:
    default = action.default
    if default is None or default is False or default is argparse.SUPPRESS:
        return False
    if isinstance(default, str | list | tuple) and not default:
        return False
    # a positional shows a default only when it may be left out
    return bool(action.option_strings) or action.nargs in ("?", "*")


class Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` using ``HelpFormatter``; its subcommands' parsers are ``Parser``
    too (``add_subparsers`` makes children of the parent's class), so one choice at the top
    formats every ``--help`` of the command line."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)


def _log_level(text: str) -> str:
    return text.strip().lower()


def add_log_level(parser: argparse.ArgumentParser) -> None:
    """``--log-level``: one of ``LOG_LEVELS``, any case; anything else is a usage error
    naming the choices (exit status 2) rather than a silent fall-back to ``info``."""
    parser.add_argument(
        "--log-level",
        type=_log_level,
        choices=LOG_LEVELS,
        default="info",
        metavar="LEVEL",
        help=f"how much to log on stderr: {', '.join(LOG_LEVELS)}",
    )
