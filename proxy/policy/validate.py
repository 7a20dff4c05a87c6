"""Policy checker: marked YAML data in, frozen model objects and error lines out.

Strategy: one walk over the plain data that `compose_marked` produced. Each
section has a small method that reports every fault it finds (never stopping
at the first) as `file:line:col: dotted.key: message` and returns the
normalised value, or a harmless stand-in so later checks still run. The caller
raises PolicyError when any error was collected, so a half-valid policy is
never used.

Rules:
* Unknown keys are errors at every level: a typo must not silently widen access.
* A restricted role must name statements and tables, or it could do nothing;
  an unrestricted role may name neither (they would contradict it).
* A column rule may only name a tag that `classify` defines, or `*`.
* Integers are real integers: `true` is not 1 and "50" is not 50.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from types import MappingProxyType
from typing import Any, cast

from proxy.policy.marked import MarkedDocument, YamlPath, dotted, where
from proxy.policy.model import (
    ACTIONS,
    ALERT_ACTIONS,
    ANY_TAG,
    BREAK_GLASS_DURATION_S,
    BREAK_GLASS_LIMITS,
    BREAK_GLASS_MAX_S,
    BREAK_GLASS_MIN_S,
    DEFAULT_ALERTS,
    LOOKUPS,
    MASKS,
    MODES,
    ON_EXCEED,
    STATEMENT_KINDS,
    Action,
    AlertAction,
    Alerts,
    BreakGlass,
    ColumnRule,
    Limits,
    Lookup,
    Mask,
    Mode,
    OnExceed,
    Role,
    StatementKind,
    pattern_matches,
)

SUPPORTED_VERSION = 1
TOP_KEYS = ("version", "classify", "decoys", "roles")
ROLE_KEYS = (
    "members",
    "statements",
    "tables",
    "columns",
    "row_filter",
    "limits",
    "alerts",
    "unrestricted",
    "mode",
    "break_glass",
    "decoys",
)
BREAK_GLASS_KEYS = ("duration_s", "row_filter", "limits")
_BREAK_GLASS_LIMIT_KEYS = ("rows_per_query", "rows_per_hour", "rows_per_day", "on_exceed")
RULE_KEYS = ("mask", "lookup", "first", "last", "per_user")
LIMIT_KEYS = (
    "rows_per_query",
    "rows_per_hour",
    "rows_per_day",
    "records_per_day",
    "records_per_7d",
    "records_per_30d",
    "on_exceed",
)
_CAP_KEYS = tuple(k for k in LIMIT_KEYS if k != "on_exceed")
ALERT_KEYS = ("window_s", "distinct_lookups", "id_run", "offset_pages", "action")
RESTRICTED_ONLY = (
    "statements",
    "tables",
    "columns",
    "row_filter",
    "limits",
    "alerts",
    "mode",
    "break_glass",
    "decoys",
)

_IDENT = re.compile(r"[^\W\d][\w$]*")
_PATTERN_PART = re.compile(r"(?:[^\W\d]|\*)[\w$*]*")

Classify = dict[str, dict[str, str]]
Decoys = dict[str, frozenset[str]]


def is_identifier(name: object) -> bool:
    """A PostgreSQL identifier as written unquoted (case kept)."""
    return isinstance(name, str) and _IDENT.fullmatch(name) is not None


def is_qualified(name: str) -> bool:
    """`schema.table`: two identifiers joined by one dot."""
    parts = name.split(".")
    return len(parts) == 2 and all(is_identifier(p) for p in parts)


def pattern_problem(pattern: object) -> str | None:
    """Why `pattern` is not a valid table pattern, or None."""
    if not isinstance(pattern, str):
        return "must be a table pattern such as public.customers or public.*"
    if "?" in pattern or "[" in pattern or "]" in pattern:
        return f'"{pattern}": only * is a glob (no ?, no [...])'
    parts = pattern.split(".")
    if len(parts) != 2:
        return f'"{pattern}": must be schema.table (globs: public.*)'
    if not all(parts):
        return f'"{pattern}": schema and table may not be empty'
    if not all(_PATTERN_PART.fullmatch(p) for p in parts):
        return f'"{pattern}": schema and table must be identifiers, with * as the only glob'
    return None


def _positive_int(value: object) -> bool:
    return type(value) is int and value > 0


def _non_negative_int(value: object) -> bool:
    return type(value) is int and value >= 0


class Checker:
    """Collects every fault of one document; `check()` returns what was valid."""

    def __init__(self, source: Path, doc: MarkedDocument) -> None:
        self.source = source
        self.doc = doc
        self.errors: list[str] = []
        self.owner: dict[str, str] = {}
        self.tags: set[str] = set()
        self.decoys: Decoys = {}

    def error(self, path: YamlPath, message: str, *, key: bool = False) -> None:
        position = self.doc.position(path, key=key) or (1, 1)
        label = f"{dotted(path)}: " if path else ""
        self.errors.append(f"{where(self.source, position)}: {label}{message}")

    def check(self) -> tuple[Classify, dict[str, Role]]:
        root = self.doc.data
        if not isinstance(root, dict):
            self.error((), "a policy is a mapping with `version: 1` and `roles`")
            return {}, {}
        self.unknown_keys((), root, TOP_KEYS)
        self.version(root)
        classify = self.classify(root.get("classify", {}))
        self.decoys = self.decoy_section(root.get("decoys", {}), classify)
        roles = self.roles(root)
        if self.decoys:
            self.decoys_need_caps(roles)
        return classify, roles

    # --- decoys -----------------------------------------------------------------

    def decoy_section(self, section: object, classify: Classify) -> Decoys:
        out: Decoys = {}
        for path, table, keys in self.table_entries(
            "decoys", section, "a list of primary-key values"
        ):
            if table not in classify:
                self.error(path, "decoys belong in a table the classify section names", key=True)
            elif not isinstance(keys, list) or not keys:
                self.error(path, "must be a non-empty list of primary-key values")
            else:
                found = self.decoy_keys(path, keys)
                if found:
                    out[table] = found
        return out

    def decoy_keys(self, path: YamlPath, keys: list[Any]) -> frozenset[str]:
        found: set[str] = set()
        for index, key in enumerate(keys):
            if type(key) is int or (isinstance(key, str) and key):
                found.add(str(key))
            else:
                self.error(
                    (*path, index),
                    "must be an integer or a non-empty string: the key as key::text prints it",
                )
        return frozenset(found)

    def decoys_need_caps(self, roles: dict[str, Role]) -> None:
        for name, role in roles.items():
            if role.unrestricted or not role.decoys or (role.limits and role.limits.rows_per_query):
                continue
            self.error(
                ("roles", name),
                "with decoys planted, every restricted role needs limits.rows_per_query "
                "(pgwarden holds a statement's rows until it has checked them)",
                key=True,
            )

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

    # --- classify ---------------------------------------------------------------

    def table_entries(
        self, name: str, section: object, what: str
    ) -> Iterator[tuple[YamlPath, str, Any]]:
        """(path, table, value) of a top-level mapping of schema.table to `what`."""
        if not isinstance(section, dict):
            self.error((name,), f"must be a mapping of table to {what}")
            return
        for table, value in section.items():
            path: YamlPath = (name, table)
            if not is_qualified(table):
                self.error(path, "must be schema.table (two identifiers, no globs)", key=True)
            else:
                yield path, table, value

    def classify(self, section: object) -> Classify:
        out: Classify = {}
        for path, table, columns in self.table_entries("classify", section, "{column: tag}"):
            if not isinstance(columns, dict):
                self.error(path, "must be a mapping of column to tag")
            else:
                out[table] = self.classified(path, columns)
        return out

    def classified(self, path: YamlPath, columns: dict[str, Any]) -> dict[str, str]:
        out: dict[str, str] = {}
        for column, tag in columns.items():
            at: YamlPath = (*path, column)
            if not is_identifier(column):
                self.error(at, "column name must be an identifier", key=True)
            elif not is_identifier(tag):
                self.error(at, "tag must be an identifier (such as email or free_text)")
            else:
                out[column] = tag
                self.tags.add(tag)
        return out

    # --- roles ------------------------------------------------------------------

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
        self.unknown_keys(path, body, ROLE_KEYS)
        members = self.members(path, body)
        unrestricted = body.get("unrestricted", False)
        if not isinstance(unrestricted, bool):
            self.error((*path, "unrestricted"), "must be true or false")
            return Role(name=name, members=members)
        if unrestricted:
            self.contradictions(path, body)
            return Role(name=name, members=members, unrestricted=True)
        return self.restricted(path, name, members, body)

    def contradictions(self, path: YamlPath, body: dict[str, Any]) -> None:
        for section in RESTRICTED_ONLY:
            if section in body:
                self.error(
                    (*path, section),
                    f"contradicts unrestricted: true (an unrestricted role passes everything; "
                    f"remove {section} or unrestricted)",
                    key=True,
                )

    def restricted(
        self, path: YamlPath, name: str, members: frozenset[str], body: dict[str, Any]
    ) -> Role:
        statements = self.statements(path, body)
        tables = self.tables(path, body)
        return Role(
            name=name,
            members=members,
            statements=statements,
            tables=tables,
            columns=MappingProxyType(self.columns(path, body.get("columns", {}))),
            row_filter=MappingProxyType(self.row_filter(path, body, tables)),
            limits=self.limits((*path, "limits"), body["limits"]) if "limits" in body else None,
            alerts=self.alerts((*path, "alerts"), body["alerts"])
            if "alerts" in body
            else DEFAULT_ALERTS,
            mode=self.mode(path, body),
            decoys=self.decoy_switch(path, body),
            break_glass=self.break_glass((*path, "break_glass"), body["break_glass"], tables)
            if "break_glass" in body
            else None,
        )

    # --- break_glass ------------------------------------------------------------

    def break_glass(
        self, path: YamlPath, section: object, tables: tuple[str, ...]
    ) -> BreakGlass | None:
        """duration_s, row_filter (default: none) and limits (default: a small quota)."""
        if not isinstance(section, dict):
            self.error(path, f"must be a mapping ({', '.join(BREAK_GLASS_KEYS)})")
            return None
        self.unknown_keys(path, section, BREAK_GLASS_KEYS)
        duration = section.get("duration_s", BREAK_GLASS_DURATION_S)
        if type(duration) is not int or not BREAK_GLASS_MIN_S <= duration <= BREAK_GLASS_MAX_S:
            self.error(
                (*path, "duration_s"),
                f"must be a whole number of seconds from {BREAK_GLASS_MIN_S} "
                f"to {BREAK_GLASS_MAX_S}",
            )
            duration = BREAK_GLASS_DURATION_S
        row_filter = self.row_filter(path, section, tables)
        return BreakGlass(
            duration_s=duration,
            row_filter=MappingProxyType(row_filter),
            limits=self.break_glass_limits((*path, "limits"), section.get("limits", {})),
        )

    def break_glass_limits(self, path: YamlPath, section: object) -> Limits:
        """Each key left out takes the default: a break-glass window is never uncapped."""
        if not isinstance(section, dict):
            self.error(path, f"must be a mapping ({', '.join(_BREAK_GLASS_LIMIT_KEYS)})")
            return BREAK_GLASS_LIMITS
        for name in section:
            if name in LIMIT_KEYS and name not in _BREAK_GLASS_LIMIT_KEYS:
                self.error(
                    (*path, name),
                    f"not available under break_glass (keys: {', '.join(_BREAK_GLASS_LIMIT_KEYS)})",
                    key=True,
                )
        given = self.limits(path, section) or BREAK_GLASS_LIMITS
        return Limits(
            rows_per_query=given.rows_per_query or BREAK_GLASS_LIMITS.rows_per_query,
            rows_per_hour=given.rows_per_hour or BREAK_GLASS_LIMITS.rows_per_hour,
            rows_per_day=given.rows_per_day or BREAK_GLASS_LIMITS.rows_per_day,
            on_exceed=given.on_exceed,
        )

    def row_filter(
        self, path: YamlPath, body: dict[str, Any], tables: tuple[str, ...]
    ) -> dict[str, str]:
        """table -> SQL condition; its syntax is parsed now, its names by check --schema."""
        from proxy.analysis.row_filter import filter_problem  # noqa: PLC0415 - no import cycle

        section = body.get("row_filter", {})
        at: YamlPath = (*path, "row_filter")
        if not isinstance(section, dict):
            self.error(at, "must be a mapping of schema.table to a SQL condition")
            return {}
        out: dict[str, str] = {}
        for table, text in section.items():
            entry: YamlPath = (*at, table)
            if not is_qualified(table):
                self.error(entry, "must be schema.table (two identifiers, no globs)", key=True)
                continue
            if not any(pattern == table or pattern_matches(pattern, table) for pattern in tables):
                self.error(entry, f"{table} is not one of the role's tables", key=True)
                continue
            problem = filter_problem(text)
            if problem is not None:
                self.error(entry, problem)
                continue
            out[table] = cast(str, text)
        return out

    def choice(
        self, path: YamlPath, body: dict[str, Any], key: str, choices: tuple[str, ...]
    ) -> str:
        """`body[key]`, one of `choices` (the first is the default and the fallback)."""
        value = body.get(key, choices[0])
        if value not in choices:
            self.error((*path, key), f"must be {' or '.join(choices)}")
            return choices[0]
        return cast(str, value)

    def flag(self, path: YamlPath, body: dict[str, Any], key: str, *, default: bool) -> bool:
        """`body[key]`, true or false."""
        value = body.get(key, default)
        if not isinstance(value, bool):
            self.error((*path, key), "must be true or false")
            return default
        return value

    def decoy_switch(self, path: YamlPath, body: dict[str, Any]) -> bool:
        """`decoys: false` exempts a role from the decoy check (default: checked)."""
        return self.flag(path, body, "decoys", default=True)

    def mode(self, path: YamlPath, body: dict[str, Any]) -> Mode:
        """enforce (the default), or shadow: nothing enforced, would-be verdicts logged."""
        return cast(Mode, self.choice(path, body, "mode", MODES))

    # --- alerts -----------------------------------------------------------------

    def alerts(self, path: YamlPath, section: object) -> Alerts | None:
        if section == "off" or section is False:
            return None
        if not isinstance(section, dict):
            self.error(path, f"must be off or a mapping ({', '.join(ALERT_KEYS)})")
            return DEFAULT_ALERTS
        self.unknown_keys(path, section, ALERT_KEYS)
        values: dict[str, Any] = {}
        window = section.get("window_s", DEFAULT_ALERTS.window_s)
        if type(window) not in (int, float) or not 60 <= window <= 30 * 86400:
            self.error((*path, "window_s"), "must be a number of seconds from 60 to 2592000")
        else:
            values["window_s"] = float(window)
        for name in ALERT_KEYS[1:4]:
            if name not in section:
                continue
            value = section[name]
            if value == "off" or value is False:
                values[name] = None
            elif not _positive_int(value):
                self.error((*path, name), "must be a positive integer, or off")
            else:
                values[name] = value
        values["action"] = cast(AlertAction, self.choice(path, section, "action", ALERT_ACTIONS))
        return Alerts(**values)

    def members(self, path: YamlPath, body: dict[str, Any]) -> frozenset[str]:
        if "members" not in body:
            self.error(path, "missing key members (a list of user names)")
            return frozenset()
        users = body["members"]
        if not isinstance(users, list):
            self.error((*path, "members"), "must be a list of user names")
            return frozenset()
        if not users:
            self.error((*path, "members"), "must list at least one user")
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

    def nothing_to_do(self, path: YamlPath, section: str) -> None:
        self.error(
            path,
            f"a restricted role with no {section} could do nothing "
            f"(list {section}, or set unrestricted: true)",
        )

    def listed(self, path: YamlPath, body: dict[str, Any], section: str) -> list[object] | None:
        """The list under `section`, or None after reporting why there is none."""
        if section not in body:
            self.nothing_to_do(path, section)
            return None
        items = body[section]
        if not isinstance(items, list):
            self.error((*path, section), f"must be a list of {section}")
            return None
        if not items:
            self.nothing_to_do((*path, section), section)
        return items

    # --- statements and tables -------------------------------------------------------

    def statements(self, path: YamlPath, body: dict[str, Any]) -> frozenset[StatementKind]:
        kinds: set[StatementKind] = set()
        known = ", ".join((*STATEMENT_KINDS, "all"))
        for i, kind in enumerate(self.listed(path, body, "statements") or []):
            if kind == "all":
                kinds.update(STATEMENT_KINDS)
            elif kind in STATEMENT_KINDS:
                kinds.add(kind)
            else:
                self.error((*path, "statements", i), f"unknown statement kind (known: {known})")
        return frozenset(kinds)

    def tables(self, path: YamlPath, body: dict[str, Any]) -> tuple[str, ...]:
        patterns: list[str] = []
        for i, pattern in enumerate(self.listed(path, body, "tables") or []):
            problem = pattern_problem(pattern)
            if problem is None:
                patterns.append(cast(str, pattern))
            else:
                self.error((*path, "tables", i), problem)
        return tuple(patterns)

    # --- columns ----------------------------------------------------------------

    def columns(self, path: YamlPath, section: object) -> dict[str, ColumnRule]:
        at: YamlPath = (*path, "columns")
        if not isinstance(section, dict):
            self.error(at, "must be a mapping of tag (or *) to an action or mask")
            return {}
        rules: dict[str, ColumnRule] = {}
        for tag, value in section.items():
            if self.tag_known((*at, tag), tag):
                rule = self.rule((*at, tag), value)
                if rule is not None:
                    rules[tag] = rule
        return rules

    def tag_known(self, path: YamlPath, tag: str) -> bool:
        if tag == ANY_TAG:
            return True
        if tag not in self.tags:
            self.error(path, f'tag "{tag}" is not defined in classify', key=True)
            return False
        return True

    def rule(self, path: YamlPath, value: object) -> ColumnRule | None:
        if isinstance(value, str):
            return self.bare_rule(path, value)
        if isinstance(value, dict):
            return self.mask_rule(path, value)
        self.error(path, "must be allow, deny, redact, a mask name, or {mask: KIND, ...}")
        return None

    def bare_rule(self, path: YamlPath, value: str) -> ColumnRule | None:
        if value in ACTIONS:
            return ColumnRule(cast(Action, value))
        if value == "partial":
            self.error(
                path, "mask partial needs first and last: {mask: partial, first: 2, last: 2}"
            )
            return None
        if value in MASKS:
            return ColumnRule("mask", mask=value)
        self.error(path, f'unknown action or mask "{value}" ({_KNOWN_RULES})')
        return None

    def mask_rule(self, path: YamlPath, body: dict[str, Any]) -> ColumnRule | None:
        self.unknown_keys(path, body, RULE_KEYS)
        if "mask" not in body:
            self.error(path, "missing key mask (a mask name)")
            return None
        mask = body["mask"]
        if mask == "redact":
            self.no_lookup(path, body)
            self.no_partial_keys(path, body, "redact")
            if "per_user" in body:
                self.error((*path, "per_user"), "applies to mask hash only", key=True)
            return ColumnRule("redact")
        if mask not in MASKS:
            self.error((*path, "mask"), f'unknown mask "{mask}" (masks: {", ".join(_MASKS)})')
            return None
        first, last = self.partial(path, body, cast(Mask, mask))
        lookup = self.lookup(path, body)
        per_user = self.per_user(path, body, cast(Mask, mask))
        return ColumnRule(
            "mask",
            mask=cast(Mask, mask),
            lookup=lookup,
            first=first,
            last=last,
            per_user=per_user,
        )

    def per_user(self, path: YamlPath, body: dict[str, Any], mask: Mask) -> bool:
        if "per_user" not in body:
            return False
        if mask != "hash":
            self.error((*path, "per_user"), f"applies to mask hash only, not {mask}", key=True)
            return False
        return self.flag(path, body, "per_user", default=False)

    def lookup(self, path: YamlPath, body: dict[str, Any]) -> Lookup:
        return cast(Lookup, self.choice(path, body, "lookup", LOOKUPS))

    def no_lookup(self, path: YamlPath, body: dict[str, Any]) -> None:
        if "lookup" in body:
            message = "applies to masks only (redact returns NULL, there is nothing to look up)"
            self.error((*path, "lookup"), message, key=True)

    def no_partial_keys(self, path: YamlPath, body: dict[str, Any], mask: str) -> None:
        for name in ("first", "last"):
            if name in body:
                self.error((*path, name), f"applies to mask partial only, not {mask}", key=True)

    def partial(self, path: YamlPath, body: dict[str, Any], mask: Mask) -> tuple[int | None, ...]:
        if mask != "partial":
            self.no_partial_keys(path, body, mask)
            return None, None
        out: list[int | None] = []
        for name in ("first", "last"):
            value = body.get(name)
            if name not in body:
                self.error(path, f"mask partial needs {name} (a non-negative integer)")
            elif not _non_negative_int(value):
                self.error((*path, name), "must be a non-negative integer")
            out.append(value if _non_negative_int(value) else None)
        return tuple(out)

    # --- limits -----------------------------------------------------------------

    def limits(self, path: YamlPath, section: object) -> Limits | None:
        if not isinstance(section, dict):
            self.error(path, f"must be a mapping ({', '.join(LIMIT_KEYS)})")
            return None
        self.unknown_keys(path, section, LIMIT_KEYS)
        caps: dict[str, int | None] = {}
        for name in _CAP_KEYS:
            value = section.get(name)
            if name in section and not _positive_int(value):
                self.error((*path, name), "must be a positive integer (leave it out for no cap)")
            caps[name] = value if _positive_int(value) else None
        return Limits(**caps, on_exceed=self.on_exceed(path, section))

    def on_exceed(self, path: YamlPath, section: dict[str, Any]) -> OnExceed:
        return cast(OnExceed, self.choice(path, section, "on_exceed", ON_EXCEED))


_MASKS = (*MASKS, "redact")
_KNOWN_RULES = f"actions: {', '.join(ACTIONS)}; masks: {', '.join(MASKS)}"
