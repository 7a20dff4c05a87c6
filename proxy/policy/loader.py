"""Policy loader: YAML with line numbers, validated into frozen objects.

Strategy: the file is composed (not loaded) with PyYAML's SafeLoader, so every
value keeps the node mark it came from; `compose_marked` turns the node tree
into plain dicts, lists and scalars plus a table from each value's path to its
1-based (line, col). Checks then walk the plain data and report each fault as
`file:line:col: dotted.key: message`, collecting every fault before raising so
that `pgwarden check` shows them all at once. `compose_marked` is also what
proxy/settings.py uses for pgwarden.yaml.

Rules:
* Only safe YAML: SafeLoader constructs scalars, nothing else runs; a tag on a
  list or mapping (`!!set`, `!!python/...`) is refused.
* Mapping keys are taken as written (`on:` stays "on"), must be scalars, and may
  not repeat; merge keys (`<<`) are refused rather than half supported.
* Alias expansion and nesting are capped, so a hostile file cannot blow up.
* This is the foundation's subset of the policy language: `version`,
  `classify`, `roles` and role membership are checked here; the sections a role
  may carry (statements, tables, columns, limits, mode) are accepted as written
  and validated by the work on the full policy language.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

import yaml

from proxy.errors import ConfigError

YamlPath = tuple[str | int, ...]
Position = tuple[int, int]

_MAX_NODES = 200_000
_MAX_DEPTH = 64
_MERGE_TAG = "tag:yaml.org,2002:merge"
_MAP_TAG = "tag:yaml.org,2002:map"
_SEQ_TAG = "tag:yaml.org,2002:seq"

_TOP_KEYS = ("version", "classify", "roles")
_ROLE_KEYS = ("members", "statements", "tables", "columns", "limits", "unrestricted", "mode")
SUPPORTED_VERSION = 1


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


# --- the policy model (foundation subset) ---------------------------------------


class PolicyError(ConfigError):
    """A policy file is invalid; `errors` holds one `file:line:col: message` per fault."""

    def __init__(self, errors: list[str]) -> None:
        super().__init__("policy", "; ".join(errors))
        self.errors = list(errors)
        self.message = "\n".join(self.errors)

    def __str__(self) -> str:
        return self.message


@dataclass(frozen=True, slots=True)
class Role:
    """A policy role: who is in it, and whether it bypasses policy entirely."""

    name: str
    unrestricted: bool
    members: frozenset[str]


@dataclass(frozen=True, slots=True)
class Policy:
    """A validated policy; `version_hash` identifies the file's exact bytes."""

    source: Path
    version_hash: str
    roles: Mapping[str, Role]
    _by_user: Mapping[str, Role] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        by_user = {user: role for role in self.roles.values() for user in role.members}
        object.__setattr__(self, "_by_user", MappingProxyType(by_user))

    def role_of(self, user: str) -> Role | None:
        """The role `user` belongs to, or None (such a user is refused at login)."""
        return self._by_user.get(user)


def load_policy(path: Path) -> Policy:
    """Read and validate a policy file; raises PolicyError listing every fault."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise PolicyError([f"{path}: cannot read: {exc.strerror or exc}"]) from None
    return parse_policy(raw, source=path)


def parse_policy(raw: bytes, *, source: Path) -> Policy:
    """Validate policy bytes read from `source` (named in messages); no I/O."""
    try:
        doc = compose_marked(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise PolicyError([f"{source}: not UTF-8 text (byte {exc.start})"]) from None
    except YamlError as exc:
        raise PolicyError([f"{where(source, exc.position)}: {exc.message}"]) from None
    checker = _Checker(source, doc)
    roles = checker.check()
    if checker.errors:
        raise PolicyError(checker.errors)
    digest = hashlib.sha256(raw).hexdigest()[:16]
    return Policy(source=source, version_hash=digest, roles=MappingProxyType(roles))


class _Checker:
    def __init__(self, source: Path, doc: MarkedDocument) -> None:
        self.source = source
        self.doc = doc
        self.errors: list[str] = []
        self.owner: dict[str, str] = {}

    def error(self, path: YamlPath, message: str, *, key: bool = False) -> None:
        position = self.doc.position(path, key=key) or (1, 1)
        label = f"{dotted(path)}: " if path else ""
        self.errors.append(f"{where(self.source, position)}: {label}{message}")

    def check(self) -> dict[str, Role]:
        root = self.doc.data
        if not isinstance(root, dict):
            self.error((), "a policy is a mapping with `version: 1` and `roles`")
            return {}
        self.unknown_keys((), root, _TOP_KEYS)
        self.version(root)
        if not isinstance(root.get("classify", {}), dict):
            self.error(("classify",), "must be a mapping of table to {column: tag}")
        return self.roles(root)

    def unknown_keys(self, path: YamlPath, mapping: dict[str, Any], known: tuple[str, ...]) -> None:
        for name in mapping:
            if name not in known:
                self.error((*path, name), f"unknown key (known: {', '.join(known)})", key=True)

    def version(self, root: dict[str, Any]) -> None:
        if "version" not in root:
            self.error((), f"missing key version (write `version: {SUPPORTED_VERSION}`)")
        elif type(root["version"]) is not int or root["version"] != SUPPORTED_VERSION:
            self.error(
                ("version",), f"unsupported version (this pgwarden reads {SUPPORTED_VERSION})"
            )

    def roles(self, root: dict[str, Any]) -> dict[str, Role]:
        if "roles" not in root:
            self.error((), "missing key roles")
            return {}
        if not isinstance(root["roles"], dict):
            self.error(("roles",), "must be a mapping of role name to role")
            return {}
        roles: dict[str, Role] = {}
        for name, body in root["roles"].items():
            role = self.role(name, body)
            if role is not None:
                roles[name] = role
        return roles

    def role(self, name: str, body: object) -> Role | None:
        path: YamlPath = ("roles", name)
        if not isinstance(body, dict):
            self.error(path, "must be a mapping with members")
            return None
        self.unknown_keys(path, body, _ROLE_KEYS)
        unrestricted = body.get("unrestricted", False)
        if not isinstance(unrestricted, bool):
            self.error((*path, "unrestricted"), "must be true or false")
        members = self.members(path, body)
        return Role(name=name, unrestricted=unrestricted is True, members=members)

    def members(self, path: YamlPath, body: dict[str, Any]) -> frozenset[str]:
        if "members" not in body:
            self.error(path, "missing key members (a list of user names)")
            return frozenset()
        users = body["members"]
        if not isinstance(users, list):
            self.error((*path, "members"), "must be a list of user names")
            return frozenset()
        return frozenset(u for i, u in enumerate(users) if self.member(path, i, u))

    def member(self, path: YamlPath, index: int, user: object) -> bool:
        at: YamlPath = (*path, "members", index)
        if not isinstance(user, str) or not user:
            self.error(at, "must be a user name (a non-empty string)")
            return False
        role = str(path[-1])
        previous = self.owner.get(user)
        if previous == role:
            self.error(at, f'user "{user}" is listed twice')
            return False
        if previous is not None:
            self.error(at, f'user "{user}" is already a member of role "{previous}"')
            return False
        self.owner[user] = role
        return True
