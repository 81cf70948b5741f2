"""Reading a config file's bytes into YAML documents, safely, whatever the bytes: every
input gives documents or one ``ConfigError`` naming the file (and the line), in bounded
time and memory, never another exception.

The bounds (``docs/config-reference.md``): a file of at most ``MAX_FILE_BYTES``, UTF-8;
values nested at most ``MAX_DEPTH`` deep; aliases (``*name``) adding at most
``MAX_ALIAS_NODES`` nodes to a file (1 KB of nested aliases, the "billion laughs", would
expand to billions), none naming a node that holds it; integers of at most
``MAX_INT_CHARS`` characters. libyaml's parser (C) reads the events when it is there;
the composer is PyYAML's own, counting as it goes, and the constructor is the safe one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from yaml.composer import Composer
from yaml.constructor import SafeConstructor
from yaml.events import AliasEvent
from yaml.nodes import MappingNode, Node, SequenceNode
from yaml.resolver import Resolver

from nodeagent.control.schema import MAX_DEPTH
from nodeagent.errors import ConfigError
from nodeagent.model.status import LimitStatus

__all__ = [
    "MAX_ALIAS_NODES",
    "MAX_DEPTH",
    "MAX_FILE_BYTES",
    "MAX_INT_CHARS",
    "bounds_limit",
    "load_yaml",
    "read_config_file",
]

MAX_FILE_BYTES = 4 * 1024 * 1024
"""A config file's size limit (Kubernetes keeps an object under 1.5 MiB)."""
MAX_ALIAS_NODES = 10_000
"""Nodes that aliases may add to one file, counting each use at its expanded size."""
MAX_INT_CHARS = 64
"""Longest integer literal read (Python refuses decimal ones past 4,300 digits, slowly)."""


def bounds_limit(rejected: int) -> LimitStatus:
    """The bounds as ``ctl status`` lists them; ``rejected``: config loads refused (for
    these bounds or any other error: the last error names which)."""
    return LimitStatus(
        "Config files (reload rejected)",
        f"{MAX_FILE_BYTES >> 20} MiB, depth {MAX_DEPTH}, {MAX_ALIAS_NODES // 1000}k alias "
        f"nodes, {MAX_INT_CHARS} digits",
        "",
        "nodeagent_config_reloads_total{result=rejected}",
        rejected,
    )


try:  # libyaml's scanner and parser: several times faster than PyYAML's own
    from yaml._yaml import CParser as _Events
except ImportError:  # pragma: no cover - PyYAML built without libyaml
    from yaml.parser import Parser
    from yaml.reader import Reader
    from yaml.scanner import Scanner

    class _Events(Reader, Scanner, Parser):  # type: ignore[no-redef]
        def __init__(self, stream: str) -> None:
            Reader.__init__(self, stream)
            Scanner.__init__(self)
            Parser.__init__(self)


class _BoundedLoader(_Events, SafeConstructor, Resolver):
    """PyYAML's safe loader with PyYAML's composer (not libyaml's) counting depth and
    alias expansion as it composes."""

    get_node = Composer.get_node
    check_node = Composer.check_node
    get_single_node = Composer.get_single_node
    compose_scalar_node = Composer.compose_scalar_node
    compose_sequence_node = Composer.compose_sequence_node
    compose_mapping_node = Composer.compose_mapping_node

    def __init__(self, text: str) -> None:
        _Events.__init__(self, text)
        SafeConstructor.__init__(self)
        Resolver.__init__(self)
        self.anchors: dict[str, Node] = {}
        self._depth = 0
        self._alias_nodes = 0
        self._sizes: dict[int, int] = {}
        """id(node) → its size with aliases expanded, once it is composed."""

    def compose_document(self) -> Node | None:
        self._sizes = {}  # node ids of an earlier document may be reused
        node: Node | None = Composer.compose_document(self)  # type: ignore[arg-type]
        self._sizes = {}
        return node

    def compose_node(self, parent: Node | None, index: object) -> Node | None:
        event: Any = self.peek_event()
        if isinstance(event, AliasEvent):
            target = self.anchors.get(str(event.anchor))
            if target is not None:  # else PyYAML's "found undefined alias"
                size = self._sizes.get(id(target))
                if size is None:
                    problem = f"alias *{event.anchor} names a node that holds it"
                    raise _composer_error(problem, event)
                self._alias_nodes += size
                if self._alias_nodes > MAX_ALIAS_NODES:
                    raise _composer_error(
                        f"aliases expand to more than {MAX_ALIAS_NODES} nodes in this file", event
                    )
            return Composer.compose_node(self, parent, index)  # type: ignore[arg-type]
        self._depth += 1
        if self._depth > MAX_DEPTH:
            raise _composer_error(f"values nest deeper than {MAX_DEPTH} levels", event)
        node: Any = Composer.compose_node(self, parent, index)  # type: ignore[arg-type]
        self._depth -= 1
        size = 1
        if isinstance(node, SequenceNode):
            size += sum(self._sizes[id(item)] for item in node.value)
        elif isinstance(node, MappingNode):
            size += sum(self._sizes[id(k)] + self._sizes[id(v)] for k, v in node.value)
        self._sizes[id(node)] = size
        return node  # type: ignore[no-any-return]

    def construct_object(self, node: Node, deep: bool = False) -> Any:
        try:
            return SafeConstructor.construct_object(self, node, deep)
        except LookupError:  # PyYAML's !!int, !!float on "" or "+", !!bool on "x"
            tag = str(node.tag).rsplit(":", 1)[-1]
            value = node.value if isinstance(node.value, str) else ""
            raise yaml.constructor.ConstructorError(
                None, None, f"{value[:40]!r} is not a valid {tag}", node.start_mark
            ) from None

    def construct_bounded_int(self, node: yaml.ScalarNode) -> int:
        text = str(self.construct_scalar(node))
        if len(text) > MAX_INT_CHARS:
            raise yaml.constructor.ConstructorError(
                None, None,
                f"an integer of {len(text)} characters (at most {MAX_INT_CHARS})",
                node.start_mark,
            )  # fmt: skip
        value: int = SafeConstructor.construct_yaml_int(self, node)
        return value


_BoundedLoader.add_constructor(  # type: ignore[type-var]
    "tag:yaml.org,2002:int", _BoundedLoader.construct_bounded_int
)


def _composer_error(problem: str, event: Any) -> yaml.composer.ComposerError:
    return yaml.composer.ComposerError(None, None, problem, event.start_mark)


def _yaml_error(e: yaml.YAMLError, source: str) -> ConfigError:
    mark = getattr(e, "problem_mark", None)
    at_line = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
    problem = getattr(e, "problem", None) or str(e)
    return ConfigError(f"{at_line}invalid YAML: {problem}", source=source)


def load_yaml(text: str, source: str) -> list[Any]:
    """The YAML documents of ``text``; ``ConfigError`` naming ``source`` (and the line)
    for anything else: bad YAML, a bound passed, a value no type holds."""
    loader = _BoundedLoader(text)
    try:
        docs: list[Any] = []
        while loader.check_data():  # type: ignore[no-untyped-call]
            docs.append(loader.get_data())
        return docs
    except yaml.YAMLError as e:
        raise _yaml_error(e, source) from None
    except (ValueError, TypeError, AttributeError, OverflowError, RecursionError, LookupError) as e:
        # a timestamp out of range (2001-13-01), a tag on the wrong kind of value
        raise ConfigError(f"invalid YAML: {str(e)[:200]}", source=source) from None
    finally:
        loader.dispose()


def read_config_file(path: Path) -> str:
    """A config file's text: at most ``MAX_FILE_BYTES``, UTF-8; ``ConfigError`` else."""
    try:
        with path.open("rb") as f:
            data = f.read(MAX_FILE_BYTES + 1)
    except OSError as e:
        raise ConfigError(f"cannot read: {e.strerror or e}", source=str(path)) from None
    if len(data) > MAX_FILE_BYTES:
        raise ConfigError(
            f"larger than {MAX_FILE_BYTES // (1024 * 1024)} MiB, the limit of a config file: "
            "split it into several files",
            source=str(path),
        )
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise ConfigError(
            f"line {line}: not UTF-8 text: byte 0x{data[e.start]:02x} at offset {e.start} "
            f"({e.reason})",
            source=str(path),
        ) from None
