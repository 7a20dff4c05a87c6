"""One role's view of the schema: which relations it may read and how each column looks.

Strategy: the policy speaks in table globs and column tags; analysis asks about a
concrete relation. `RoleView` answers and remembers the answer per relation (the
policy and the snapshot are both frozen, so the answers never change; a reload
builds new views).

Rules:
* Catalog relations on the allowlist are readable by every role; other catalog
  relations never are.
* A user table is readable when a table pattern of the role matches it. Views,
  materialized views and foreign tables only when named exactly: a view can
  expose classified data under a name the classify section does not know.
* A classified column whose tag has no rule for the role (and no "*" rule) is
  denied: fail closed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import cast

from sqlglot import exp, parse_one

from proxy.analysis.allowlists import CATALOG_RELATIONS
from proxy.analysis.catalog import CATALOG_SCHEMAS, KIND_NAMES, Relation, Snapshot
from proxy.analysis.masks import mask_sql, per_user_key
from proxy.analysis.rewrite_errors import Refusal
from proxy.analysis.row_filter import BoundFilter, FilterError, bind_filter
from proxy.policy.model import ANY_TAG, ColumnRule, Policy, Role, pattern_matches

_ALLOW = ColumnRule("allow")
_DENY = ColumnRule("deny")


@dataclass(eq=False)
class Visibility:
    """How one relation looks to one role."""

    relation: Relation
    rules: dict[str, ColumnRule]  # raw column -> rule, for classified columns only
    hash_key: bytes | None
    user_key: bytes | None = None  # the per-user hash key (hash: per_user) of the view's user
    row_filter: BoundFilter | None = None  # the role's row filter for this relation
    filter_error: str | None = None  # the row filter cannot be bound: every read is refused
    denied_columns: list[str] = field(default_factory=list)
    _parsed: dict[str, exp.Expression | None] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.denied_columns = [
            c.name for c in self.relation.columns if self.rule(c.name).action == "deny"
        ]

    @property
    def protected(self) -> bool:
        return any(rule.action != "allow" for rule in self.rules.values())

    @property
    def filtered(self) -> bool:
        """The role reads this relation through a row filter (or not at all)."""
        return self.row_filter is not None or self.filter_error is not None

    @property
    def derived(self) -> bool:
        """Every read of the relation goes through a derived table (masks or a filter)."""
        return self.protected or self.filtered

    def rule(self, column: str) -> ColumnRule:
        return self.rules.get(column, _ALLOW)

    def denied(self, column: str) -> bool:
        return self.rule(column).action == "deny"

    def protected_column(self, column: str) -> bool:
        return self.rule(column).action != "allow"

    def lookup(self, column: str) -> bool:
        rule = self.rule(column)
        return rule.action == "mask" and rule.lookup == "equality"

    def projection_sql(self, column: str) -> str | None:
        """SQL for the column inside the derived table; None when it is left out."""
        rule = self.rule(column)
        if rule.action == "deny":
            return None
        if rule.action == "allow":
            return '"' + column.replace('"', '""') + '"'
        found = self.relation.column(column)
        key = self.user_key if rule.per_user else self.hash_key
        return mask_sql(rule, column, found.type if found else "text", key)

    def projection(self, column: str) -> exp.Expression | None:
        """The projection as a fresh sqlglot tree (parsed once, copied per use)."""
        if column not in self._parsed:
            text = self.projection_sql(column)
            self._parsed[column] = None if text is None else self._parse(text)
        found = self._parsed[column]
        return None if found is None else found.copy()

    @staticmethod
    def _parse(text: str) -> exp.Expression:
        return cast("exp.Expression", parse_one(text, read="postgres"))


class RoleView:
    """Answers analysis questions for one role under one policy."""

    def __init__(
        self,
        policy: Policy,
        role: Role,
        hash_key: bytes | None,
        *,
        user: str = "",
        snapshot: Snapshot | None = None,
    ) -> None:
        self.policy = policy
        self.role = role
        self.name = role.name
        self.hash_key = hash_key
        self.user = user  # set for a per-user role (Role.per_user); else ""
        self.snapshot = snapshot  # resolves row filters; None: a filtered table is refused
        self._views: dict[str, Visibility] = {}

    @property
    def rows_per_query(self) -> int | None:
        limits = self.role.limits
        return None if limits is None else limits.rows_per_query

    @property
    def truncates(self) -> bool:
        return self.role.limits is not None and self.role.limits.on_exceed == "truncate"

    def authorise(self, relation: Relation) -> None:
        if relation.schema in CATALOG_SCHEMAS:
            if (relation.schema, relation.name) not in CATALOG_RELATIONS:
                raise Refusal(
                    f"pgwarden: catalog relation {relation.qualified} is not readable "
                    "by restricted roles; refused",
                    "Catalog tables that describe objects (pg_class, pg_attribute, "
                    "information_schema.columns, ...) are readable; statistics and "
                    "activity views are not.",
                )
            return
        if relation.kind not in KIND_NAMES:
            raise Refusal(f"pgwarden: {relation.qualified} cannot be read; refused")
        exact_only = relation.kind in ("v", "m", "f")
        for pattern in self.role.tables:
            if pattern == relation.qualified or (
                not exact_only and pattern_matches(pattern, relation.qualified)
            ):
                return
        what = KIND_NAMES[relation.kind]
        extra = (
            " (views and foreign tables must be listed by their exact name)" if exact_only else ""
        )
        raise Refusal(
            f'pgwarden: role "{self.name}" may not read {what} '
            f"{relation.qualified}{extra}; refused",
            f"Tables of role {self.name}: {', '.join(self.role.tables) or 'none'}.",
        )

    def visibility(self, relation: Relation) -> Visibility:
        found = self._views.get(relation.qualified)
        if found is None:
            user_key = None
            if self.hash_key is not None and self.user:
                user_key = per_user_key(self.hash_key, self.user)
            found = Visibility(relation, self._rules(relation), self.hash_key, user_key)
            self._bind_filter(found)
            self._views[relation.qualified] = found
        return found

    def _bind_filter(self, view: Visibility) -> None:
        text = self.role.row_filter.get(view.relation.qualified)
        if text is None:
            return
        if self.snapshot is None:
            view.filter_error = "no schema to resolve it against"
            return
        try:
            view.row_filter = bind_filter(
                text, view.relation, self.snapshot, user=self.user, role=self.name
            )
        except FilterError as error:
            view.filter_error = str(error)

    def check_filter(self, view: Visibility) -> None:
        """Refuse a read of a relation whose row filter could not be bound (fail closed)."""
        if view.filter_error is not None:
            raise Refusal(
                f'pgwarden: the row filter of role "{self.name}" on '
                f"{view.relation.qualified} cannot be applied ({view.filter_error}); refused",
                "The policy's row_filter does not match the schema; run "
                "`pgwarden check --schema` and fix the policy.",
            )

    def _rules(self, relation: Relation) -> dict[str, ColumnRule]:
        tags = self.policy.classify.get(relation.qualified, {})
        rules: dict[str, ColumnRule] = {}
        for column, tag in tags.items():
            rule = self.role.columns.get(tag) or self.role.columns.get(ANY_TAG) or _DENY
            rules[column] = rule
        return rules

    def columns_hint(self, relation: Relation) -> str:
        view = self.visibility(relation)
        shown = [c.name for c in relation.columns if not view.denied(c.name)]
        return f"Columns of {relation.qualified} your role may use: {', '.join(shown) or 'none'}."
