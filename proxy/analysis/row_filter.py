"""Row filters: a role's SQL predicate over a table, bound to one user and one snapshot.

Strategy: a filter is policy text, written by the security team, but it is still
handled like a client's statement. It is parsed with sqlglot when the policy loads
(`filter_problem`), and bound when the engine first needs it (`bind_filter`): the
placeholders `:user` and `:role` become string literals (sqlglot quotes them; the
name is never spliced as text), every relation is resolved against the snapshot and
written schema-qualified, and every column reference must bind to a relation of
the filter itself, the filtered table or a FROM item of one of the filter's own
subqueries. A name that would bind nowhere in the filter could bind to a column of
the client's statement around the derived table, so it is an error, not a guess.

Rules:
* The filter is a boolean condition, not a statement: no WITH, no parameters other
  than :user and :role, no names with the reserved prefix.
* Relations in the filter are read raw, as the policy author wrote them (they are
  policy, not the client's statement); the verifier still requires each one to be
  readable by the role and checks every function against the allowlist.
* Nothing here does I/O; problems are `FilterError` with a message for people.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import cast

import sqlglot
from sqlglot import exp
from sqlglot.errors import ErrorLevel, SqlglotError

from proxy.analysis.catalog import Relation, Snapshot

PLACEHOLDERS = ("user", "role")
_RESERVED = "__pgw"


class FilterError(Exception):
    """A row filter that cannot be used; the message names why."""


def _ident(node: exp.Expression | None) -> str:
    if node is None:
        return ""
    if isinstance(node, exp.Identifier):
        text = str(node.this)
        return text if node.quoted else text.lower()
    return str(node.name)


def parse_filter(text: str) -> exp.Expression:
    """The filter's syntax tree (placeholders still in it); raises FilterError."""
    try:
        parsed = sqlglot.parse_one(text, read="postgres", error_level=ErrorLevel.RAISE)
    except SqlglotError as error:
        first = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise FilterError(f"not a valid SQL condition ({first})") from None
    tree = cast("exp.Expression", parsed)
    if tree is None or isinstance(tree, (exp.Query, exp.Command, exp.DDL, exp.DML)):
        raise FilterError("must be a condition (such as id IN (SELECT ...)), not a statement")
    for node in tree.walk():
        _check_node(cast("exp.Expression", node))
    return tree


def _check_node(node: exp.Expression) -> None:
    if isinstance(node, exp.Placeholder):
        name = str(node.this or "")
        if name not in PLACEHOLDERS:
            raise FilterError(f'unknown placeholder ":{name}" (known: :user, :role)')
    elif isinstance(node, exp.Parameter):
        raise FilterError("parameters ($1) are not allowed; use :user or :role")
    elif isinstance(node, exp.With):
        raise FilterError("WITH is not allowed in a row filter; use a subquery")
    elif isinstance(node, exp.Identifier) and str(node.this).lower().startswith(_RESERVED):
        raise FilterError(f'names starting with "{_RESERVED}" are reserved')


def filter_problem(text: object) -> str | None:
    """Why `text` is not a usable row filter (syntax only), or None."""
    if not isinstance(text, str) or not text.strip():
        return "must be a SQL condition over the table, as a string"
    try:
        parse_filter(text)
    except FilterError as error:
        return str(error)
    return None


@dataclass(frozen=True, slots=True)
class BoundFilter:
    """A filter ready to be put into a derived table's WHERE."""

    tree: exp.Expression
    relations: tuple[Relation, ...]  # what it reads besides the filtered table

    @property
    def sql(self) -> str:
        return self.tree.sql(dialect="postgres", comments=False)


def bind_filter(
    text: str, table: Relation, snapshot: Snapshot, *, user: str, role: str
) -> BoundFilter:
    """The filter of `table` for `user` in `role`, resolved against `snapshot`."""
    tree = parse_filter(text)
    values = {"user": user, "role": role}
    for placeholder in list(tree.find_all(exp.Placeholder)):
        literal = exp.Literal.string(values[str(placeholder.this)])
        if placeholder is tree:
            raise FilterError("a placeholder alone is not a condition")
        placeholder.replace(literal)
    relations = [_resolve(t, snapshot) for t in list(tree.find_all(exp.Table))]
    for column in list(tree.find_all(exp.Column)):
        _bind_column(column, table)
    return BoundFilter(tree, tuple(r for r in relations if r is not None))


def _resolve(table: exp.Table, snapshot: Snapshot) -> Relation | None:
    if not isinstance(table.this, exp.Identifier):
        raise FilterError("table functions are not allowed in a row filter")
    if table.args.get("catalog") is not None:
        raise FilterError("three-part names are not allowed; write schema.table")
    schema = _ident(table.args.get("db")) or None
    name = _ident(table.this)
    relation = snapshot.resolve(schema, name)
    if relation is None:
        raise FilterError(f'relation "{f"{schema}." if schema else ""}{name}" does not exist')
    alias = table.args.get("alias")
    if alias is not None and alias.columns:
        raise FilterError("column aliases on a table are not allowed in a row filter")
    table.set("db", exp.to_identifier(relation.schema))
    table.meta["pgwarden_columns"] = frozenset(c.name for c in relation.columns)
    return relation


def _bind_column(column: exp.Column, table: Relation) -> None:
    """The column binds to a FROM item inside the filter, or to the filtered table."""
    if isinstance(column.this, exp.Star):
        return
    qualifier = _ident(column.args.get("table"))
    name = _ident(column.this)
    if column.args.get("db") is not None:
        raise FilterError(f"write columns as table.column, not schema.table.column ({name})")
    for items in _scopes(column, table):
        if qualifier:
            named = [cols for alias, cols in items if alias == qualifier]
            if named:
                if named[0] is not None and name not in named[0]:
                    raise FilterError(f'column "{qualifier}.{name}" does not exist')
                return
            continue
        having = [alias for alias, cols in items if cols is None or name in cols]
        if len(having) > 1:
            raise FilterError(f'column reference "{name}" is ambiguous')
        if having:
            return
    shown = f"{qualifier}.{name}" if qualifier else name
    raise FilterError(f'column "{shown}" is not a column of {table.qualified} or of the filter')


Scope = list[tuple[str, "frozenset[str] | None"]]


def _scopes(node: exp.Expression, table: Relation) -> Iterator[Scope]:
    """FROM items visible at `node`, innermost scope first; the filtered table last."""
    parent = node.parent
    while parent is not None:
        if isinstance(parent, exp.Select):
            yield _items(parent)
        parent = parent.parent
    yield [(table.name, frozenset(c.name for c in table.columns))]


def _items(select: exp.Select) -> Scope:
    found: Scope = []
    from_ = select.args.get("from_") or select.args.get("from")
    nodes = ([from_.this] if from_ is not None else []) + [
        j.this for j in select.args.get("joins") or ()
    ]
    for item in nodes:
        if not isinstance(item, exp.Table):
            raise FilterError("only tables may be FROM items in a row filter's subqueries")
        alias = _ident(item.args["alias"].this) if item.alias else _ident(item.this)
        columns = _table_columns(item)
        found.append((alias, columns))
    return found


def _table_columns(item: exp.Table) -> frozenset[str] | None:
    meta = item.meta.get("pgwarden_columns")
    return meta if isinstance(meta, frozenset) else None
