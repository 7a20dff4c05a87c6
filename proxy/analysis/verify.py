"""The second opinion: PostgreSQL's own grammar checks the SQL pgwarden will send.

Strategy: the rewritten text is parsed again with libpg_query (pglast), the parser
PostgreSQL itself uses, and the tree is checked against closed lists, independently
of how sqlglot understood the client's text. Whatever the first analysis got wrong,
the statement that reaches the database must pass here:

* every node type is on NODE_TYPES (anything else: refused);
* every function is on the allowlist (by the name PostgreSQL will call);
* every relation is schema-qualified and readable by the role, or is the name of a
  WITH query that no relation shares;
* every relation with protected columns appears only as the single FROM item of a
  select that projects exactly the role's masks (the derived table), or of a
  primary-key look-up select whose filter compares look-up columns with constants.
* a relation with a row filter for the role, likewise; and the WHERE of its derived
  table or look-up starts with exactly the role's filter (ANDed with look-ups only),
  its derived table is fenced with OFFSET 0, and relations inside that filter (the
  policy's text, compared node for node) are only required to be readable.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, cast
from weakref import WeakKeyDictionary

from pglast import ast, parse_sql, prettify
from pglast.enums import A_Expr_Kind, BoolExprType
from pglast.stream import RawStream

from proxy.analysis.allowlists import (
    DANGEROUS_FUNCTIONS,
    SAFE_FUNCTIONS,
    SAFE_INFORMATION_SCHEMA_FUNCTIONS,
    SAFE_SETTINGS,
)
from proxy.analysis.catalog import CATALOG_SCHEMAS, Snapshot
from proxy.analysis.rewrite_errors import Refusal
from proxy.analysis.roles import RoleView, Visibility

PgNode = Any  # pglast's node classes are loosely typed; checked at run time instead

NODE_TYPES = frozenset(
    [
        "RawStmt",
        "SelectStmt",
        "InsertStmt",
        "UpdateStmt",
        "DeleteStmt",
        "ResTarget",
        "ColumnRef",
        "A_Star",
        "A_Const",
        "String",
        "Integer",
        "Float",
        "Boolean",
        "BitString",
        "A_Expr",
        "BoolExpr",
        "FuncCall",
        "TypeCast",
        "TypeName",
        "RangeVar",
        "RangeSubselect",
        "RangeFunction",
        "RangeTableSample",
        "JoinExpr",
        "SortBy",
        "SubLink",
        "CaseExpr",
        "CaseWhen",
        "CoalesceExpr",
        "MinMaxExpr",
        "NullTest",
        "BooleanTest",
        "ParamRef",
        "WithClause",
        "CommonTableExpr",
        "Alias",
        "A_ArrayExpr",
        "A_Indirection",
        "A_Indices",
        "RowExpr",
        "SQLValueFunction",
        "WindowDef",
        "GroupingSet",
        "CollateClause",
        "MultiAssignRef",
        "SetToDefault",
        "NamedArgExpr",
        "ReturningClause",
    ]
)


def walk(node: Any) -> Iterator[tuple[PgNode, tuple[PgNode, ...]]]:
    """Every node under `node` with its chain of ancestors (nearest last)."""
    stack: list[tuple[Any, tuple[PgNode, ...]]] = [(node, ())]
    while stack:
        item, parents = stack.pop()
        if isinstance(item, tuple | list):
            stack.extend((child, parents) for child in item)
            continue
        if not isinstance(item, ast.Node):
            continue
        yield item, parents
        below = (*parents, item)
        for slot in cast("Any", item).__slots__:
            value = getattr(item, slot, None)
            if isinstance(value, ast.Node | tuple | list):
                stack.append((value, below))


def deparse(node: PgNode) -> str:
    return str(RawStream()(node))


class Verifier:
    """Checks one rewritten statement for one role."""

    def __init__(self, role: RoleView, snapshot: Snapshot) -> None:
        self.role = role
        self.snapshot = snapshot

    def check_text(self, sql: str, kind: type | None = None) -> PgNode:
        """Check `sql` and return its parse; with `kind`, it must be that statement type."""
        statements = parse_sql(sql)
        if len(statements) != 1:
            raise _broken("the rewritten statement did not parse as one statement")
        stmt = statements[0].stmt
        if kind is not None and type(stmt) is not kind:
            raise _broken(f"the rewrite turned a {kind.__name__} into a {type(stmt).__name__}")
        self.check(stmt)
        return stmt

    def check(self, stmt: PgNode) -> None:
        ctes = {str(n.ctename) for n, _ in walk(stmt) if isinstance(n, ast.CommonTableExpr)}
        for node, parents in walk(stmt):
            name = type(node).__name__
            if name not in NODE_TYPES:
                raise Refusal(
                    f"pgwarden: {_construct(name)} is not supported for restricted roles; refused",
                    "Plain SELECT statements with joins, subqueries, WITH, aggregates and "
                    "window functions are supported.",
                )
            if isinstance(node, ast.FuncCall):
                check_function(node, self.snapshot.user_functions)
            elif isinstance(node, ast.RangeVar):
                self._check_relation(node, parents, ctes)
            elif isinstance(node, ast.SelectStmt) and (node.intoClause or node.lockingClause):
                raise Refusal(
                    "pgwarden: SELECT INTO and FOR UPDATE/SHARE are refused for restricted roles"
                )

    def _check_relation(self, node: PgNode, parents: tuple[PgNode, ...], ctes: set[str]) -> None:
        if node.catalogname:
            raise _broken("three-part name")
        if not node.schemaname:
            if node.relname not in ctes or self.snapshot.resolve(None, node.relname) is not None:
                raise _broken(f'unqualified relation "{node.relname}"')
            return
        relation = self.snapshot.resolve(node.schemaname, node.relname)
        if relation is None:
            raise _broken(f"unknown relation {node.schemaname}.{node.relname}")
        self.role.authorise(relation)
        view = self.role.visibility(relation)
        if not view.derived or self._in_row_filter(parents):
            return
        if not self._is_masked_read(node, parents, view):
            raise _broken(f"{relation.qualified} read outside its mask")

    def _in_row_filter(self, parents: tuple[PgNode, ...]) -> bool:
        """Inside the role's own row filter of the derived table or look-up around it."""
        for index, select in enumerate(parents):
            if not isinstance(select, ast.SelectStmt) or not select.whereClause:
                continue
            view = self._filtered_from(select)
            if view is None:
                continue
            expected = _filter_conjuncts(view)
            actual = _conjuncts(select.whereClause)[: len(expected)]
            if actual != expected:
                continue
            below = parents[index + 1 :]
            if any(p is c for p in below for c in actual):
                return True
        return False

    def _filtered_from(self, select: PgNode) -> Visibility | None:
        items = tuple(select.fromClause or ())
        item = items[0] if len(items) == 1 else None
        if isinstance(item, ast.RangeTableSample):
            item = item.relation
        if not isinstance(item, ast.RangeVar) or not item.schemaname:
            return None
        relation = self.snapshot.resolve(item.schemaname, str(item.relname))
        if relation is None:
            return None
        view = self.role.visibility(relation)
        return view if view.row_filter is not None else None

    def _is_masked_read(self, node: PgNode, parents: tuple[PgNode, ...], view: Visibility) -> bool:
        holder: PgNode = node
        chain = list(parents)
        if chain and isinstance(chain[-1], ast.RangeTableSample):
            holder = chain.pop()
        if not chain or not isinstance(chain[-1], ast.SelectStmt):
            if chain and isinstance(chain[-1], ast.InsertStmt) and chain[-1].relation is node:
                return not chain[-1].returningClause and not chain[-1].onConflictClause
            return False
        select = chain[-1]
        if view.filter_error is not None or tuple(select.fromClause or ()) != (holder,):
            return False
        if _is_from_item(chain):  # the derived table, perhaps filtered by look-ups
            if not _plain(select, fenced=view.row_filter is not None):
                return False
            rest = _after_filter(select.whereClause, view)
            return (
                self._is_derived(select, view)
                and rest is not None
                and all(_lookup_tree(c, view) for c in rest)
            )
        return (
            _plain(select)
            and self._is_lookup(select, view)
            and len(chain) >= 2
            and isinstance(chain[-2], ast.SubLink)
        )

    def _is_derived(self, select: PgNode, view: Visibility) -> bool:
        raw, masks = _expected_projections(view)
        for target in select.targetList or ():
            if not isinstance(target, ast.ResTarget):
                return False
            name = _column_name(target.val)
            if name is not None:
                if name not in raw:
                    return False
            elif not any(target.val == mask for mask in masks):  # equality ignores locations
                return False
        return True

    def _is_lookup(self, select: PgNode, view: Visibility) -> bool:
        pk = view.relation.primary_key
        targets = [t.val for t in select.targetList or () if isinstance(t, ast.ResTarget)]
        names = [_column_name(t) for t in targets]
        if not pk or names != list(pk) or any(view.protected_column(k) for k in pk):
            return False
        rest = _after_filter(select.whereClause, view)
        if view.row_filter is None:
            return _lookup_filter(select.whereClause, view)
        return rest is not None and len(rest) == 1 and _lookup_filter(rest[0], view)


# Per Visibility (an identity-hashed object that lives as long as its Engine): the raw
# columns a derived table may project as they are, and the parsed mask expressions.
_EXPECTED: WeakKeyDictionary[Visibility, tuple[frozenset[str], tuple[PgNode, ...]]] = (
    WeakKeyDictionary()
)


def _expected_projections(view: Visibility) -> tuple[frozenset[str], tuple[PgNode, ...]]:
    found = _EXPECTED.get(view)
    if found is None:
        raw: set[str] = set()
        masks: list[PgNode] = []
        for column in view.relation.columns:
            if view.denied(column.name):
                continue
            if not view.protected_column(column.name):
                raw.add(column.name)
                continue
            text = view.projection_sql(column.name)
            select: PgNode = parse_sql(f"SELECT {text}")[0].stmt
            masks.append(select.targetList[0].val)
        found = (frozenset(raw), tuple(masks))
        _EXPECTED[view] = found
    return found


def _conjuncts(node: PgNode) -> list[PgNode]:
    """The top-level AND operands of a condition (libpg_query flattens a AND b AND c)."""
    if isinstance(node, ast.BoolExpr) and node.boolop == BoolExprType.AND_EXPR:
        return list(node.args or ())
    return [node]


# Per Visibility, like _EXPECTED: the parsed conjuncts of the role's row filter.
_FILTERS: WeakKeyDictionary[Visibility, list[PgNode]] = WeakKeyDictionary()


def _filter_conjuncts(view: Visibility) -> list[PgNode]:
    found = _FILTERS.get(view)
    if found is None:
        assert view.row_filter is not None
        select: PgNode = parse_sql(f"SELECT 1 WHERE ({view.row_filter.sql})")[0].stmt
        found = _conjuncts(select.whereClause)
        _FILTERS[view] = found
    return found


def _after_filter(where: PgNode, view: Visibility) -> list[PgNode] | None:
    """The conjuncts of `where` after the role's row filter; None when it lacks the filter."""
    if view.row_filter is None:
        return [] if where is None else [where]
    if where is None:
        return None
    expected = _filter_conjuncts(view)
    actual = _conjuncts(where)
    if actual[: len(expected)] != expected:
        return None
    return actual[len(expected) :]


def _fence(select: PgNode) -> bool:
    """OFFSET 0 and no LIMIT: the derived table is planned on its own."""
    offset = select.limitOffset
    return (
        select.limitCount is None
        and isinstance(offset, ast.A_Const)
        and isinstance(offset.val, ast.Integer)
        and offset.val.ival == 0
    )


def _plain(select: PgNode, *, fenced: bool = False) -> bool:
    if fenced and not _fence(select):
        return False
    return not (
        select.withClause
        or select.distinctClause
        or select.groupClause
        or select.havingClause
        or select.windowClause
        or select.sortClause
        or select.limitCount
        or (select.limitOffset and not fenced)
        or select.valuesLists
        or select.intoClause
        or select.lockingClause
        or select.larg
        or select.rarg
    )


def _is_from_item(chain: list[PgNode]) -> bool:
    return len(chain) >= 2 and isinstance(chain[-2], ast.RangeSubselect)


def _column_name(node: PgNode) -> str | None:
    if not isinstance(node, ast.ColumnRef):
        return None
    fields: tuple[Any, ...] = tuple(node.fields or ())
    if len(fields) == 1 and isinstance(fields[0], ast.String):
        return str(fields[0].sval)
    return None


def _constant(node: PgNode) -> bool:
    if isinstance(node, ast.TypeCast):
        return _constant(node.arg)
    return isinstance(node, ast.A_Const | ast.ParamRef)


def _lookup_filter(node: PgNode, view: Visibility) -> bool:
    if not isinstance(node, ast.A_Expr) or node.kind not in _LOOKUP_KINDS:
        return False
    column = _column_name(node.lexpr)
    if column is None or not view.lookup(column):
        return False
    if [s.sval for s in node.name or ()] != ["="]:
        return False
    values = node.rexpr if isinstance(node.rexpr, tuple | list) else (node.rexpr,)
    if node.kind == A_Expr_Kind.AEXPR_OP_ANY and isinstance(node.rexpr, ast.A_ArrayExpr):
        values = node.rexpr.elements or ()  # = ANY(ARRAY['a', 'b'])
    return all(_constant(v) for v in values)


def _lookup_tree(node: PgNode, view: Visibility) -> bool:
    """AND/OR of look-up comparisons (a derived table's own filter)."""
    if isinstance(node, ast.BoolExpr) and node.boolop in _AND_OR:
        return all(_lookup_tree(arg, view) for arg in node.args or ())
    return _lookup_filter(node, view)


_AND_OR = (BoolExprType.AND_EXPR, BoolExprType.OR_EXPR)
_LOOKUP_KINDS = (A_Expr_Kind.AEXPR_OP, A_Expr_Kind.AEXPR_IN, A_Expr_Kind.AEXPR_OP_ANY)


def reads_catalog_only(stmt: PgNode) -> bool:
    """A checked SELECT that reads relations, all of them in pg_catalog or information_schema.

    Unqualified names in a checked statement are WITH queries (check refuses others).
    """
    if not isinstance(stmt, ast.SelectStmt):
        return False
    schemas = [
        str(n.schemaname) for n, _ in walk(stmt) if isinstance(n, ast.RangeVar) and n.schemaname
    ]
    return bool(schemas) and all(schema in CATALOG_SCHEMAS for schema in schemas)


def check_function(node: PgNode, shadowed: frozenset[str] = frozenset()) -> None:
    """Refuse a call to anything but an allowlisted built-in.

    An unqualified name that a user schema also defines may resolve to that
    function instead of the built-in (overloads are matched across the search
    path), so it must be written pg_catalog.NAME.
    """
    names = [s.sval for s in node.funcname]
    name = names[-1].lower() if names else ""
    qualified_ok = (len(names) == 1 and name not in shadowed) or (
        len(names) == 2 and names[0] == "pg_catalog"
    )
    if qualified_ok and (name in SAFE_FUNCTIONS or _safe_set_config(name, node)):
        return
    if (
        len(names) == 2
        and names[0] == "information_schema"
        and names[1] in SAFE_INFORMATION_SCHEMA_FUNCTIONS
    ):
        return  # schema-qualified: no user schema can shadow it
    if len(names) == 1 and name in shadowed and name in SAFE_FUNCTIONS:
        raise Refusal(
            f"pgwarden: function {name}() is also defined in a user schema; refused",
            f"Write pg_catalog.{name}(...) to call the built-in.",
        )
    reason = DANGEROUS_FUNCTIONS.get(name)
    why = f"({reason})" if reason else "is not on the allowlist of safe built-in functions"
    raise Refusal(
        f"pgwarden: function {'.'.join(names)}() {why}; refused",
        "Built-in string, number, date, aggregate, JSON and catalog functions are allowed; "
        "see docs/policy.md for the list.",
    )


def _safe_set_config(name: str, node: PgNode) -> bool:
    """set_config('jit', $1, false): a setting SET may change, named by a literal.

    asyncpg turns jit off around its type introspection this way. The name must be
    a string constant on SAFE_SETTINGS and the other arguments constants or
    parameters, so the call does exactly what an allowed SET would.
    """
    args = list(node.args or ())
    if name != "set_config" or len(args) != 3 or not all(map(_literal_or_param, args)):
        return False
    first = _uncast(args[0])
    value = first.val.sval if isinstance(first.val, ast.String) else None
    return isinstance(value, str) and value.lower() in SAFE_SETTINGS


def _uncast(node: PgNode) -> PgNode:
    while isinstance(node, ast.TypeCast):
        node = node.arg
    return node


def _literal_or_param(node: PgNode) -> bool:
    node = _uncast(node)
    return (isinstance(node, ast.A_Const) and not node.isnull) or isinstance(node, ast.ParamRef)


def _construct(node_type: str) -> str:
    return {
        "XmlExpr": "XML construction",
        "XmlSerialize": "XMLSERIALIZE",
        "RangeTableFunc": "XMLTABLE",
        "JsonTable": "JSON_TABLE",
        "CurrentOfExpr": "WHERE CURRENT OF",
        "OnConflictClause": "ON CONFLICT",
        "LockingClause": "FOR UPDATE/SHARE",
        "IntoClause": "SELECT INTO",
    }.get(node_type, f"the construct {node_type}")


def _broken(what: str) -> Refusal:
    return Refusal(
        f"pgwarden: the statement could not be verified ({what}); refused",
        "This is a limitation of pgwarden's analysis; rephrase the statement or report it.",
    )


def pretty(sql: str) -> str:
    """`sql` laid out for reading (explain output); unchanged if it does not parse."""
    try:
        return str(prettify(sql))
    except Exception:  # noqa: BLE001 - display only
        return sql
