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
from proxy.analysis.catalog import CATALOG_SCHEMAS, KIND_NAMES, Relation
from proxy.analysis.masks import mask_sql
from proxy.analysis.rewrite_errors import Refusal
from proxy.policy.model import ANY_TAG, ColumnRule, Policy, Role, pattern_matches

_ALLOW = ColumnRule("allow")
_DENY = ColumnRule("deny")


@dataclass(eq=False)
class Visibility:
    """How one relation looks to one role."""

    relation: Relation
    rules: dict[str, ColumnRule]  # raw column -> rule, for classified columns only
    hash_key: bytes | None
    denied_columns: list[str] = field(default_factory=list)
    _parsed: dict[str, exp.Expression | None] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.denied_columns = [
            c.name for c in self.relation.columns if self.rule(c.name).action == "deny"
        ]

    @property
    def protected(self) -> bool:
        return any(rule.action != "allow" for rule in self.rules.values())

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
        return mask_sql(rule, column, found.type if found else "text", self.hash_key)

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

    def __init__(self, policy: Policy, role: Role, hash_key: bytes | None) -> None:
        self.policy = policy
        self.role = role
        self.name = role.name
        self.hash_key = hash_key
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
            found = Visibility(relation, self._rules(relation), self.hash_key)
            self._views[relation.qualified] = found
        return found

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
