"""The policy model: frozen objects the loader builds and the engine reads.

Strategy: every object is a frozen, slotted dataclass and every mapping a
MappingProxyType, so a loaded policy cannot change under a session; a reload
swaps the whole `Policy`. Values are already normalised by the checker: a bare
mask name became `ColumnRule("mask", mask=...)`, `{mask: redact}` became the
`redact` action, `statements: [all]` became every kind. Nothing here does I/O.

Rules:
* Names are kept exactly as written (`public.customers`, tag `email`); the
  engine compares them with the names PostgreSQL reports.
* A table pattern is `schema.table` where `*` in a part matches any run of
  characters within that part; no other glob syntax exists.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import MappingProxyType
from typing import Literal

StatementKind = Literal[
    "select", "insert", "update", "delete", "copy_out", "copy_in", "ddl", "utility"
]
Action = Literal["allow", "deny", "redact", "mask"]
Mask = Literal["email", "last4", "initials", "hash", "partial"]
Lookup = Literal["none", "equality"]
OnExceed = Literal["reject", "truncate"]
Mode = Literal["enforce", "shadow"]
AlertAction = Literal["alert", "lock"]

STATEMENT_KINDS: tuple[StatementKind, ...] = (
    "select",
    "insert",
    "update",
    "delete",
    "copy_out",
    "copy_in",
    "ddl",
    "utility",
)
ACTIONS: tuple[str, ...] = ("allow", "deny", "redact")
MASKS: tuple[Mask, ...] = ("email", "last4", "initials", "hash", "partial")
LOOKUPS: tuple[Lookup, ...] = ("none", "equality")
ON_EXCEED: tuple[OnExceed, ...] = ("reject", "truncate")
MODES: tuple[Mode, ...] = ("enforce", "shadow")
ALERT_ACTIONS: tuple[AlertAction, ...] = ("alert", "lock")
ANY_TAG = "*"


@dataclass(frozen=True, slots=True)
class ColumnRule:
    """What a role sees of a column with a given tag."""

    action: Action
    mask: Mask | None = None
    lookup: Lookup = "none"
    first: int | None = None
    last: int | None = None
    per_user: bool = False  # hash: keyed per user (`pgwarden trace` tells whose key)


@dataclass(frozen=True, slots=True)
class Limits:
    """Row caps for one statement and per-user quotas; None means no cap."""

    rows_per_query: int | None = None
    rows_per_hour: int | None = None
    rows_per_day: int | None = None
    on_exceed: OnExceed = "reject"
    # distinct records (primary keys of classified tables) shown in a rolling window
    records_per_day: int | None = None
    records_per_7d: int | None = None
    records_per_30d: int | None = None

    def record_budgets(self) -> tuple[tuple[str, float, int], ...]:
        """(name, window in seconds, budget) of every records_* limit set."""
        out = []
        for name, days in (("day", 1), ("7d", 7), ("30d", 30)):
            budget = getattr(self, f"records_per_{name}")
            if budget is not None:
                out.append((name, days * 86400.0, budget))
        return tuple(out)


@dataclass(frozen=True, slots=True)
class Alerts:
    """Enumeration alert thresholds of a role (proxy/enumeration.py); None disables one."""

    window_s: float = 3600.0
    distinct_lookups: int | None = 100  # distinct records returned by look-ups in the window
    id_run: int | None = 200  # consecutive integer keys of one table seen in the window
    offset_pages: int | None = 10  # OFFSET pages bringing new records of one table
    action: AlertAction = "alert"


DEFAULT_ALERTS = Alerts()

# break_glass: the window's bounds, and the small quota that applies when limits are left out
BREAK_GLASS_DURATION_S = 900
BREAK_GLASS_MIN_S = 60
BREAK_GLASS_MAX_S = 86400
BREAK_GLASS_LIMITS = Limits(rows_per_query=20, rows_per_hour=100, rows_per_day=200)
BREAK_GLASS_BUCKET = "#break_glass"  # ledger user of the break-glass quota: alice#break_glass


@dataclass(frozen=True, slots=True)
class BreakGlass:
    """A role's break-glass rules: what applies for duration_s after a stated reason.

    Masks, tables and statements stay the role's; `row_filter` replaces the role's
    filters (empty: every filter lifted) and `limits` its caps and quotas, charged to
    a quota of their own (the ledger user `USER#break_glass`).
    """

    duration_s: int = BREAK_GLASS_DURATION_S
    row_filter: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    limits: Limits = BREAK_GLASS_LIMITS


def break_glass_bucket(user: str) -> str:
    """The ledger user that `user`'s break-glass rows are charged to."""
    return user + BREAK_GLASS_BUCKET


@dataclass(frozen=True, slots=True)
class Role:
    """A policy role: its members and what they may do (nothing checked if unrestricted)."""

    name: str
    members: frozenset[str]
    statements: frozenset[StatementKind] = frozenset()
    tables: tuple[str, ...] = ()
    columns: Mapping[str, ColumnRule] = field(default_factory=lambda: MappingProxyType({}))
    limits: Limits | None = None
    unrestricted: bool = False
    # shadow: statements pass through as for an unrestricted role; the log says what
    # enforcement would have done (rolling out a policy, docs/policy.md)
    mode: Mode = "enforce"
    # table -> SQL predicate over it (placeholders :user, :role): rows outside it do not exist
    row_filter: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))

    @property
    def per_user(self) -> bool:
        """Rewrites depend on the user, not only the role (:user in a filter, per-user hash)."""
        return any(rule.per_user for rule in self.columns.values()) or any(
            has_user_placeholder(text) for text in self.row_filter.values()
        )

    alerts: Alerts | None = DEFAULT_ALERTS  # None: `alerts: off`
    break_glass: BreakGlass | None = None  # None: a stated reason widens nothing
    decoys: bool = True  # the policy's decoys are checked in this role's results

    def under_break_glass(self) -> Role:
        """The role as it applies during break-glass: its filters and limits replaced."""
        if self.break_glass is None:
            raise ValueError(f"role {self.name} has no break_glass")
        return replace(self, row_filter=self.break_glass.row_filter, limits=self.break_glass.limits)


@dataclass(frozen=True, slots=True)
class Policy:
    """A validated policy; `version_hash` identifies the file's exact bytes."""

    source: Path
    version_hash: str
    roles: Mapping[str, Role]
    version: int = 1
    classify: Mapping[str, Mapping[str, str]] = field(default_factory=lambda: MappingProxyType({}))
    # table -> primary-key texts of planted records (as `key::text` prints them)
    decoys: Mapping[str, frozenset[str]] = field(default_factory=lambda: MappingProxyType({}))
    _by_user: Mapping[str, Role] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        by_user = {user: role for role in self.roles.values() for user in role.members}
        object.__setattr__(self, "_by_user", MappingProxyType(by_user))

    def role_of(self, user: str) -> Role | None:
        """The role `user` belongs to, or None (such a user is refused at login)."""
        return self._by_user.get(user)

    def accounts_records(self, role: Role) -> bool:
        """Whether `role`'s results are accounted record by record (hidden key columns).

        So when the role has a records budget or enumeration alerts, or the policy
        plants decoys; never for unrestricted roles.
        """
        if role.unrestricted:
            return False
        budgets = role.limits is not None and bool(role.limits.record_budgets())
        return budgets or role.alerts is not None or (bool(self.decoys) and role.decoys)

    def uses_hash(self) -> bool:
        """True when some role hashes a column (the hash key is then required)."""
        return any(
            rule.mask == "hash" for role in self.roles.values() for rule in role.columns.values()
        )

    def classified_columns(self) -> int:
        """How many columns carry a tag."""
        return sum(len(columns) for columns in self.classify.values())


def _change(before: object, after: object) -> str:
    if before is None:
        return "added"
    return "removed" if after is None else "changed"


def has_user_placeholder(text: str) -> bool:
    """Whether a row filter names :user (a rough test: it only widens per-user caching)."""
    return re.search(r":user\b", text) is not None


def pattern_matches(pattern: str, table: str) -> bool:
    """Whether `schema.table` is matched by `pattern` (`*` matches any run)."""
    regex = "[^.]*".join(re.escape(piece) for piece in pattern.split("*"))
    return re.fullmatch(regex, table) is not None


def policy_changes(old: Policy, new: Policy) -> dict[str, object]:
    """What a reload changes, for the policy.loaded event: roles, members, tables."""
    changes: dict[str, object] = {}
    added = sorted(set(new.roles) - set(old.roles))
    removed = sorted(set(old.roles) - set(new.roles))
    if added:
        changes["roles_added"] = added
    if removed:
        changes["roles_removed"] = removed
    for name in sorted(set(old.roles) & set(new.roles)):
        before, after = old.roles[name], new.roles[name]
        role: dict[str, object] = {}
        if before.members != after.members:
            role["members_added"] = sorted(after.members - before.members)
            role["members_removed"] = sorted(before.members - after.members)
        if before.tables != after.tables:
            role["tables"] = list(after.tables)
        if (
            before.columns != after.columns
            or before.limits != after.limits
            or before.alerts != after.alerts
        ):
            role["rules_changed"] = True
        if before.mode != after.mode:
            role["mode"] = after.mode
        if before.row_filter != after.row_filter:
            role["row_filter_changed"] = True
        if before.break_glass != after.break_glass:
            role["break_glass"] = _change(before.break_glass, after.break_glass)
        if role:
            changes[name] = role
    if old.classify != new.classify:
        changes["classify_changed"] = True
    if old.decoys != new.decoys:
        changes["decoys_changed"] = True
    return changes
