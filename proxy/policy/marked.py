"""Marked YAML: plain data plus the 1-based line:col of every value and key.

Strategy: the file is composed (not loaded) with PyYAML's SafeLoader, so every
value keeps the node mark it came from; `compose_marked` turns the node tree
into plain dicts, lists and scalars plus a table from each value's path to its
1-based (line, col). Callers (the policy checker, proxy/settings.py) walk the
plain data and report faults as `file:line:col: dotted.key: message`.

Rules:
* Only safe YAML: SafeLoader constructs scalars, nothing else runs; a tag on a
  list or mapping (`!!set`, `!!python/...`) is refused.
* Mapping keys are taken as written (`on:` stays "on"), must be scalars, and may
  not repeat; merge keys (`<<`) are refused rather than half supported.
* Alias expansion and nesting are capped, so a hostile file cannot blow up.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import yaml

YamlPath = tuple[str | int, ...]
Position = tuple[int, int]

_MAX_NODES = 200_000
_MAX_DEPTH = 64
_MERGE_TAG = "tag:yaml.org,2002:merge"
_MAP_TAG = "tag:yaml.org,2002:map"
_SEQ_TAG = "tag:yaml.org,2002:seq"


class YamlError(Exception):
    """The text is not YAML pgwarden accepts; `position` is 1-based (line, col)."""

    def __init__(self, message: str, position: Position | None) -> None:
        super().__init__(message)
        self.message = message
        self.position = position


@dataclass(frozen=True, slots=True)
class MarkedDocument:
    """Plain YAML data plus the 1-based position of every value and key."""

    data: object
    values: Mapping[YamlPath, Position]
    keys: Mapping[YamlPath, Position]

    def position(self, path: YamlPath, *, key: bool = False) -> Position | None:
        """Where `path` is written (its key if `key`), else its nearest ancestor."""
        found = (self.keys if key else self.values).get(path)
        while found is None and path:
            path = path[:-1]
            found = self.values.get(path)
        return found


def dotted(path: YamlPath) -> str:
    """`("roles", "support", "members", 1)` -> `roles.support.members[1]`."""
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else part
    return out


def where(source: object, position: Position | None) -> str:
    """`file:line:col`, or just `file` when there is no position."""
    return f"{source}:{position[0]}:{position[1]}" if position else str(source)


def compose_marked(text: str) -> MarkedDocument:
    """Compose YAML text safely, keeping positions; raises YamlError."""
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return MarkedDocument(None, {}, {})
        walker = _Walker(loader)
        data = walker.walk(node, ())
        return MarkedDocument(data, walker.values, walker.keys)
    except yaml.YAMLError as exc:
        raise _yaml_error(exc) from None
    finally:
        loader.dispose()


def _yaml_error(exc: yaml.YAMLError) -> YamlError:
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or str(exc)
    position = (mark.line + 1, mark.column + 1) if mark is not None else None
    return YamlError(f"invalid YAML: {problem}", position)


def _pos(node: yaml.Node) -> Position:
    return (node.start_mark.line + 1, node.start_mark.column + 1)


class _Walker:
    def __init__(self, loader: yaml.SafeLoader) -> None:
        self.loader = loader
        self.values: dict[YamlPath, Position] = {}
        self.keys: dict[YamlPath, Position] = {}
        self.count = 0

    def walk(self, node: yaml.Node, path: YamlPath) -> object:
        self.count += 1
        if self.count > _MAX_NODES or len(path) > _MAX_DEPTH:
            raise YamlError("document too large or too deeply nested", _pos(node))
        self.values[path] = _pos(node)
        if isinstance(node, yaml.MappingNode):
            _plain(node, _MAP_TAG)
            return self._mapping(node, path)
        if isinstance(node, yaml.SequenceNode):
            _plain(node, _SEQ_TAG)
            return [self.walk(item, (*path, i)) for i, item in enumerate(node.value)]
        value: object = self.loader.construct_object(node)
        return value

    def _mapping(self, node: yaml.MappingNode, path: YamlPath) -> dict[str, object]:
        out: dict[str, object] = {}
        for key_node, value_node in node.value:
            key = _key(key_node, out)
            self.keys[(*path, key)] = _pos(key_node)
            out[key] = self.walk(value_node, (*path, key))
        return out


def _plain(node: yaml.Node, tag: str) -> None:
    if node.tag != tag:  # scalars are checked by SafeLoader's constructor
        raise YamlError(f"unsupported tag {node.tag}", _pos(node))


def _key(node: yaml.Node, seen: Mapping[str, object]) -> str:
    if not isinstance(node, yaml.ScalarNode) or node.tag == _MERGE_TAG:
        raise YamlError("mapping keys must be plain scalars (no `<<` merges)", _pos(node))
    key = str(node.value)
    if key in seen:
        raise YamlError(f"duplicate key {key!r}", _pos(node))
    return key
