"""Record accounting in the rewrite: hidden key columns that name the records a row shows.

Strategy: the distinct-record budgets, decoys and enumeration alerts (docs/policy.md,
"Records") need to know which records of classified tables each result row shows,
not only how many rows there were. The rewrite knows which FROM items of the
top-level SELECT are classified tables (proxy/analysis/rewrite.py,
`_locate_records`); for each of them this module appends one column to the
statement's output, named `__pgw_rk<n>`, holding the record's primary key as text.
The key columns come first, so the relay reads a row's keys from its first columns
without walking the rest; positional ORDER BY and GROUP BY references move by as
many places.
The relay (proxy/session/machine.py) removes these columns from every
RowDescription and DataRow before the client sees them, and hands the keys to the
record book. The client's result is unchanged.

Rules:
* A plain SELECT: the key of the row's record, `CAST(alias.pk AS TEXT)`; a
  composite key is `CAST(ROW(a, b) AS TEXT)`, as PostgreSQL prints a row.
* A grouped or aggregated SELECT: a group shows a record when it holds exactly
  one: `CASE WHEN count(DISTINCT key) = 1 THEN min(key) END`; a group of several
  records (count(*), an average) shows none of them by name and counts as one
  unnamed record (never free, see below).
* SELECT DISTINCT, set operations, classified tables read in a subquery in FROM,
  a CTE or the select list, and keys the role may not see cannot be named: each
  result row then counts as one new record (`unkeyed`), which over-counts and
  never under-counts. Decoys cannot be checked in such rows, so the engine refuses
  those statements when they read a table with decoys.
* Names starting with `__pgw` are refused in client statements, so a hidden
  column can never be confused with a client's.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlglot import exp

HIDDEN_PREFIX = "__pgw_rk"
HIDDEN_PREFIX_BYTES = HIDDEN_PREFIX.encode()


@dataclass(frozen=True, slots=True)
class RecordSpec:
    """What the relay must do to account for one statement's result rows."""

    tables: tuple[str, ...] = ()  # the table of each hidden key column, in order
    grouped: bool = False  # keys are per group: NULL for a group of several records
    unkeyed: bool = False  # rows show records that cannot be named: one new record per row
    paging: bool = False  # the top-level query has an OFFSET (enumeration alerts)
    lookup: bool = False  # the statement filters by an equality look-up
    blind: frozenset[str] = frozenset()  # tables whose records rows show without a key

    @property
    def hidden(self) -> int:
        return len(self.tables)


def add_key_columns(
    root: exp.Expression,
    keyed: list[tuple[str, list[exp.Column]]],
    unkeyed: set[str],
    *,
    keyable: bool = True,
    lookup: bool = False,
) -> tuple[exp.Expression, RecordSpec | None]:
    """Append the hidden key columns to `root`; the spec, or None when rows show no record.

    `keyable` is False for a statement inside a longer Query: its rows are then
    counted one new record each, without keys.
    """
    if not keyed and not unkeyed:
        return root, None
    paging = isinstance(root, exp.Query) and root.args.get("offset") is not None
    if (
        not keyable
        or not isinstance(root, exp.Select)
        or root.args.get("distinct") is not None
        or _grouping_sets(root)
    ):
        blind = frozenset({t for t, _ in keyed} | unkeyed)
        return root, RecordSpec(unkeyed=True, paging=paging, lookup=lookup, blind=blind)
    grouped = _aggregated(root)
    columns: list[exp.Expr] = []
    for index, (_, keys) in enumerate(keyed):
        key = _key_text(keys)
        if grouped:
            once = exp.EQ(
                this=exp.Count(this=exp.Distinct(expressions=[key.copy()])),
                expression=exp.Literal.number(1),
            )
            key = exp.Case(ifs=[exp.If(this=once, true=exp.Min(this=key))])
        columns.append(exp.alias_(key, f"{HIDDEN_PREFIX}{index}", quoted=True, copy=False))
    if columns:
        _shift_ordinals(root, len(columns))
        root.set("expressions", [*columns, *root.expressions])
    spec = RecordSpec(
        tables=tuple(t for t, _ in keyed),
        grouped=grouped,
        unkeyed=bool(unkeyed),
        paging=paging,
        lookup=lookup,
        blind=frozenset(unkeyed),
    )
    return root, spec


def merged(specs: list[RecordSpec]) -> RecordSpec | None:
    """One spec for a Query of several statements: no keys, every row one record."""
    if not specs:
        return None
    if len(specs) == 1:
        return specs[0]
    return RecordSpec(
        unkeyed=True,
        paging=any(s.paging for s in specs),
        lookup=any(s.lookup for s in specs),
        blind=frozenset().union(*(s.blind | set(s.tables) for s in specs)),
    )


def _key_text(keys: list[exp.Column]) -> exp.Expression:
    if len(keys) == 1:
        return exp.cast(keys[0], "text")
    return exp.cast(exp.Anonymous(this="ROW", expressions=list(keys)), "text")


def _grouping_sets(select: exp.Select) -> bool:
    """GROUP BY with ROLLUP, CUBE or GROUPING SETS: left unkeyed (ordinals inside them)."""
    group = select.args.get("group")
    kinds = (exp.Rollup, exp.Cube, exp.GroupingSets)
    return group is not None and (
        any(group.args.get(k) for k in ("rollup", "cube", "grouping_sets"))
        or any(isinstance(e, kinds) for e in group.expressions)
    )


def _shift_ordinals(select: exp.Select, by: int) -> None:
    """`ORDER BY 2` and `GROUP BY 1` name output columns: move them past the key columns."""
    order = select.args.get("order")
    group = select.args.get("group")
    items: list[exp.Expression] = []
    if order is not None:
        items += [o.this for o in order.expressions if isinstance(o, exp.Ordered)]
    if group is not None:
        items += list(group.expressions)
    for item in items:
        if isinstance(item, exp.Literal) and not item.is_string and item.this.isdigit():
            item.replace(exp.Literal.number(int(item.this) + by))


def _aggregated(select: exp.Select) -> bool:
    """The SELECT groups its rows: GROUP BY, HAVING, or an aggregate outside a window."""
    if select.args.get("group") is not None or select.args.get("having") is not None:
        return True
    for expression in select.expressions:
        for agg in expression.find_all(exp.AggFunc):
            if agg.find_ancestor(exp.Select, exp.Window, exp.Subquery) is select:
                return True
    return False
