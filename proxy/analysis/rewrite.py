"""Resolve and rewrite one query statement with sqlglot: the masking rewrite.

Strategy: every reference to a table the role may not see raw becomes a derived
table that projects the masked columns (and leaves denied columns out), so that
whatever the rest of the statement does (aliases, whole-row references, casts,
aggregates, set operations) it can only ever reach masked values. Equality
look-ups on a `lookup: equality` column in a filter position (`c.email = 'x'`,
`c.phone IN ($1, $2)`, AND/OR of them) are replaced by a semi-join on the primary
key against the raw column: `c.id IN (SELECT id FROM public.customers WHERE email = 'x')`.

Rules:
* Every relation is resolved against the schema snapshot under the pinned search
  path, authorised for the role, and written schema-qualified in the output.
* A name that is a WITH query in scope is that WITH query; a WITH query may not
  share its name with a table (refused), so the two cannot be confused.
* Column references are bound to FROM items only where the binding is certain; an
  uncertain binding is never a reason to show a raw value (the raw table is only
  ever reachable through the derived table), only a reason not to push a look-up.
* Any reference to a denied column, and any `*` that would expand over one, refuses
  the statement; so does an UPDATE or DELETE of a table with protected columns, and
  RETURNING or ON CONFLICT on one.
* Nothing here does I/O or logging; problems are raised as `Refusal`.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import cast

from sqlglot import exp

from proxy.analysis.catalog import CATALOG_SCHEMAS, Relation, Snapshot
from proxy.analysis.rewrite_errors import Refusal
from proxy.analysis.roles import RoleView, Visibility

INTERNAL_PREFIX = "__pgw"


def ident_name(ident: exp.Expression | str | None) -> str:
    """PostgreSQL's folding: unquoted identifiers are lower-cased (ASCII only)."""
    if ident is None:
        return ""
    if isinstance(ident, str):
        return ident
    if isinstance(ident, exp.Identifier):
        text = str(ident.this)
        return text if ident.quoted else text.translate(_ASCII_LOWER)
    return str(ident.name)


_ASCII_LOWER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")


@dataclass(eq=False)
class Source:
    """One FROM item of a scope."""

    alias: str
    node: exp.Expression
    relation: Relation | None = None
    view: Visibility | None = None  # set when the reference is rewritten
    columns: list[str] | None = None  # visible names in order; None when unknown
    base: dict[str, str] = field(default_factory=dict)  # visible name -> raw column
    filters: list[exp.Expression] = field(default_factory=list)  # look-ups moved inside

    @property
    def rewritten(self) -> bool:
        return self.view is not None


@dataclass
class Outcome:
    """What the rewrite learnt about a statement."""

    tables: set[str] = field(default_factory=set)
    protected: set[str] = field(default_factory=set)  # tables read through a mask
    filtered: set[str] = field(default_factory=set)  # tables read through a row filter
    lookups: int = 0
    data: bool = False  # reads a relation outside the catalog schemas (user data)
    # Record accounting (proxy/analysis/records.py), filled when asked for:
    keyed: list[tuple[str, list[exp.Column]]] = field(default_factory=list)  # top FROM items
    unkeyed: set[str] = field(default_factory=set)  # classified tables shown without keys


_SCOPES = (exp.Select, exp.Update, exp.Delete)
_CONST = (exp.Literal, exp.Placeholder, exp.Parameter, exp.Null, exp.Boolean)


class Rewriter:
    """Rewrites one parsed statement in place for one role."""

    def __init__(self, role: RoleView, snapshot: Snapshot, *, records: bool = False) -> None:
        self.role = role
        self.snapshot = snapshot
        self.records = records  # find the key columns of the records each result row shows
        self.outcome = Outcome()
        self._sources: dict[int, list[Source]] = {}  # id(scope node) -> its FROM items
        self._by_table: dict[int, Source] = {}  # id(exp.Table) -> Source

    # --- entry point -------------------------------------------------------------

    def run(self, root: exp.Expression) -> exp.Expression:
        self._check_identifiers(root)
        for table in list(root.find_all(exp.Table)):
            self._resolve_table(table)
        self._check_dml(root)
        for scope in [n for n in root.walk() if isinstance(n, _SCOPES)]:
            self._sources[id(scope)] = self._scope_sources(scope)
        for column in list(root.find_all(exp.Column)):
            self._check_column(column)
        for join in list(root.find_all(exp.Join)):
            self._check_join(join)
        self._check_packing(root)
        for star in list(root.find_all(exp.Star)):
            if isinstance(star.parent, exp.Select) and star.arg_key == "expressions":
                self._check_star(star, "")
        self._push_lookups(root)
        if self.records:
            self._locate_records(root)
        for source in list(self._by_table.values()):
            if source.rewritten:
                self._replace(source)
        return root

    # --- record accounting ---------------------------------------------------------

    def _locate_records(self, root: exp.Expression) -> None:
        """Which classified FROM items the result rows show, and their key columns.

        A classified table read as a FROM item of the top-level SELECT is keyed: each
        result row shows one of its records, named by its primary key (visible raw to
        the role). One read only inside a WHERE, HAVING or JOIN ... ON condition shows
        no record (it filters). Anywhere else (a subquery in FROM, a CTE, a set
        operation, a scalar subquery in the select list, a key the role may not see)
        its records are shown but cannot be named: `unkeyed`.
        """
        classify = self.role.policy.classify
        top = self._sources.get(id(root), []) if isinstance(root, exp.Select) else []
        for source in self._by_table.values():
            relation = source.relation
            if relation is None or relation.qualified not in classify:
                continue
            if any(source is t for t in top):
                keys = self._key_columns(source)
                if keys is not None:
                    self.outcome.keyed.append((relation.qualified, keys))
                    continue
            elif _filter_only(source.node, root):
                continue
            self.outcome.unkeyed.add(relation.qualified)

    def _key_columns(self, source: Source) -> list[exp.Column] | None:
        relation = source.relation
        assert relation is not None
        pk = relation.primary_key
        visible = {b: v for v, b in source.base.items()}
        if not pk or any(k not in visible for k in pk):
            return None
        if source.view is not None and any(source.view.protected_column(k) for k in pk):
            return None
        return [exp.column(visible[k], table=source.alias, quoted=True) for k in pk]

    # --- relations ---------------------------------------------------------------

    def _resolve_table(self, table: exp.Table) -> None:
        if not isinstance(table.this, exp.Identifier):
            return  # a table function: checked by the function allowlist
        if table.args.get("catalog") is not None:
            raise Refusal(
                "pgwarden: three-part relation names are not supported; refused",
                "Write schema.table; pgwarden serves one database.",
            )
        name = ident_name(table.this)
        schema = ident_name(table.args.get("db")) or None
        if schema is None and self._is_cte(table, name):
            return
        relation = self.snapshot.resolve(schema, name)
        if relation is None:
            shown = f"{schema}.{name}" if schema else name
            raise Refusal(
                f'pgwarden: relation "{shown}" is unknown to pgwarden; refused',
                "Name a table your role is given; pgwarden resolves names in "
                f"{', '.join(('pg_catalog', *self.snapshot.search_path))}.",
                unknown_relation=True,
            )
        self.role.authorise(relation)
        self.outcome.tables.add(relation.qualified)
        self.outcome.data = self.outcome.data or relation.schema not in CATALOG_SCHEMAS
        table.set("db", exp.to_identifier(relation.schema))
        view = self.role.visibility(relation)
        alias = ident_name(table.args["alias"].this) if table.alias else relation.name
        source = Source(alias, table, relation, view if view.derived else None)
        self._fill_columns(source, table, relation)
        self._by_table[id(table)] = source
        if source.rewritten:
            self.role.check_filter(view)
            if view.protected:
                self.outcome.protected.add(relation.qualified)
            if view.filtered:
                self.outcome.filtered.add(relation.qualified)
            self._check_table_args(table, relation)

    def _is_cte(self, table: exp.Table, name: str) -> bool:
        node: exp.Expr = table
        while node.parent is not None:
            parent = node.parent
            with_ = parent.args.get("with_") if isinstance(parent, exp.Expression) else None
            if isinstance(with_, exp.With):
                names = [ident_name(c.args["alias"].this) for c in with_.expressions]
                visible = self._visible_ctes(with_, table, names) if node is with_ else names
                if name in visible:
                    self._check_cte_name(name)
                    return True
            node = parent
        return False

    @staticmethod
    def _visible_ctes(with_: exp.With, table: exp.Expression, names: list[str]) -> list[str]:
        """WITH queries visible inside `with_` itself: earlier ones (all if RECURSIVE)."""
        if with_.args.get("recursive"):
            return names
        for index, cte in enumerate(with_.expressions):
            if any(n is table for n in cte.walk()):
                return names[:index]
        return names

    def _check_cte_name(self, name: str) -> None:
        if self.snapshot.resolve(None, name) is not None:
            raise Refusal(
                f'pgwarden: WITH query "{name}" has the name of a table; refused',
                "Give the WITH query a name no table has.",
            )

    def _check_table_args(self, table: exp.Table, relation: Relation) -> None:
        allowed = {"this", "db", "alias", "only", "sample"}
        extra = [k for k, v in table.args.items() if v not in (None, False) and k not in allowed]
        if extra:
            raise Refusal(
                f"pgwarden: unsupported clause on {relation.qualified} "
                f"({', '.join(sorted(extra))}); refused"
            )

    def _fill_columns(self, source: Source, table: exp.Table, relation: Relation) -> None:
        if relation.schema in CATALOG_SCHEMAS or not relation.columns:
            return
        raw = [c.name for c in relation.columns]
        alias = table.args.get("alias")
        renamed = [ident_name(c) for c in alias.columns] if alias is not None else []
        if len(renamed) > len(raw):
            raise Refusal(
                f"pgwarden: too many column aliases for {relation.qualified}; refused",
                f"{relation.qualified} has {len(raw)} columns.",
            )
        visible = renamed + raw[len(renamed) :]
        source.columns = visible
        source.base = dict(zip(visible, raw, strict=True))

    def _check_dml(self, root: exp.Expression) -> None:
        for node in root.walk():
            if isinstance(node, (exp.Update, exp.Delete)):
                target = self._target_source(node.this)
                if target is not None and target.rewritten:
                    assert target.view is not None
                    what = "protected columns" if target.view.protected else "a row filter"
                    raise Refusal(
                        f"pgwarden: {target.alias} has {what}; "
                        f"{type(node).__name__.upper()} of it is refused",
                        "Your role may read this table only through its masks.",
                    )
            elif isinstance(node, exp.Insert):
                target = self._target_source(node.this)
                if target is not None and target.rewritten:
                    if node.args.get("returning") or node.args.get("conflict"):
                        raise Refusal(
                            "pgwarden: RETURNING and ON CONFLICT are refused on a table "
                            "with protected columns"
                        )
                    target.view = None  # a write target is not read: no derived table

    def _target_source(self, node: exp.Expression | None) -> Source | None:
        if isinstance(node, exp.Schema):
            node = node.this
        return self._by_table.get(id(node)) if isinstance(node, exp.Table) else None

    # --- scopes and columns ------------------------------------------------------

    def _scope_sources(self, scope: exp.Expression) -> list[Source]:
        items: list[exp.Expression] = []
        if isinstance(scope, (exp.Update, exp.Delete)):
            items.append(scope.this)
        from_ = scope.args.get("from_") or scope.args.get("from")
        if from_ is not None:
            items.append(from_.this)
        items += [j.this for j in scope.args.get("joins") or ()]
        items += list(scope.args.get("using") or ())
        return [s for s in (self._source_of(i) for i in items) if s is not None]

    def _source_of(self, item: exp.Expression) -> Source | None:
        if isinstance(item, exp.Schema):
            item = item.this
        if isinstance(item, exp.Table) and id(item) in self._by_table:
            return self._by_table[id(item)]
        alias = item.args.get("alias") if isinstance(item, exp.Expression) else None
        name = ident_name(alias.this) if isinstance(alias, exp.TableAlias) and alias.this else ""
        if isinstance(item, exp.Table) and not name:
            name = ident_name(item.this)
        columns: list[str] | None = None
        if isinstance(alias, exp.TableAlias) and alias.columns:
            columns = [ident_name(c) for c in alias.columns]
        elif isinstance(item, exp.Subquery) and isinstance(item.this, exp.Query):
            selects = item.this.named_selects
            columns = None if "*" in selects or "" in selects else list(selects)
        return Source(name, item, columns=columns)

    def _scopes_of(self, node: exp.Expression) -> Iterator[list[Source]]:
        parent = node.parent
        while parent is not None:
            if isinstance(parent, _SCOPES) and id(parent) in self._sources:
                yield self._sources[id(parent)]
            parent = parent.parent

    def bind(self, column: exp.Column) -> Source | None:
        """The FROM item `column` certainly refers to, or None."""
        qualifier = ident_name(column.args.get("table")) if column.args.get("table") else ""
        name = ident_name(column.this) if not isinstance(column.this, exp.Star) else "*"
        for sources in self._scopes_of(column):
            if qualifier:
                for source in sources:
                    if source.alias == qualifier:
                        return source
                continue
            known = [s for s in sources if s.columns is not None and name in s.columns]
            unknown = [s for s in sources if s.columns is None]
            if len(known) == 1 and not unknown:
                return known[0]
            if known or unknown:
                return None
        return None

    def _check_column(self, column: exp.Column) -> None:
        if isinstance(column.this, exp.Star):
            self._check_star(column, ident_name(column.args.get("table")))
            return
        source = self.bind(column)
        if source is None and not column.args.get("table"):
            self._check_whole_row(column)
        if source is None or not source.rewritten:
            return
        name = ident_name(column.this)
        raw = source.base.get(name)
        if raw is not None and source.view is not None and source.view.denied(raw):
            raise self._denied(source, raw)
        self._qualify(column, source)

    def _check_packing(self, root: exp.Expression) -> None:
        """string_agg, array_agg, json_agg, ARRAY(subquery) ... over protected columns.

        One such row can carry a whole table, so for a role with row limits the
        statement is refused when a packing aggregate's argument is a protected
        column, a whole row, or a column of a subquery or WITH query whose origin
        is not certain, in a statement that reads a protected table.
        """
        limits = self.role.role.limits
        if limits is None or not self.outcome.protected:
            return
        for node in root.walk():
            if _packs(node) and self._packs_protected(node):
                raise Refusal(
                    f"pgwarden: {_packing_name(node)} over protected columns packs many rows "
                    "into one; refused for a role with row limits",
                    "Select the rows themselves (they count against the row cap), or aggregate "
                    "unclassified columns.",
                )

    def _packs_protected(self, node: exp.Expr) -> bool:
        for column in node.find_all(exp.Column):
            if isinstance(column.this, exp.Star):
                return True
            source = self.bind(column)
            if source is None or (source.relation is None and not source.rewritten):
                return True  # a whole row, or a column of unknown origin
            raw = source.base.get(ident_name(column.this))
            if source.view is not None and (raw is None or source.view.protected_column(raw)):
                return True
        return any(isinstance(n, exp.Star) for n in node.walk() if n is not node)

    def _check_join(self, join: exp.Join) -> None:
        """NATURAL and USING joins name columns implicitly: a denied one refuses.

        The derived table leaves denied columns out, which would silently change
        what a NATURAL join matches on; refusing keeps the statement's meaning.
        """
        natural = str(join.args.get("method") or "").upper() == "NATURAL"
        using = {ident_name(i) for i in join.args.get("using") or ()}
        if not natural and not using:
            return
        scope = join.parent
        for source in self._sources.get(id(scope), []):
            if source.view is None or not source.view.denied_columns:
                continue
            denied = [v for v, raw in source.base.items() if source.view.denied(raw)]
            hit = denied if natural else [v for v in denied if v in using]
            if hit:
                raise self._denied(source, source.base[hit[0]])

    def _check_whole_row(self, column: exp.Column) -> None:
        """`SELECT c FROM customers c`, `row_to_json(c)`, `(c).street`: like `c.*`."""
        name = ident_name(column.this)
        for sources in self._scopes_of(column):
            if any(s.columns is None or name in s.columns for s in sources):
                return  # a column (or perhaps one): not a whole-row reference
            named = [s for s in sources if s.alias == name]
            if named:
                self._check_star(column, name)
                return

    def _check_star(self, node: exp.Expression, qualifier: str) -> None:
        for sources in self._scopes_of(node):
            chosen = [s for s in sources if not qualifier or s.alias == qualifier]
            for source in chosen:
                if source.view is not None and source.view.denied_columns:
                    raise self._denied(source, source.view.denied_columns[0], star=True)
            if chosen or not qualifier:
                return

    def _denied(self, source: Source, raw: str, *, star: bool = False) -> Refusal:
        relation = source.relation.qualified if source.relation else source.alias
        how = "* expands over" if star else "the statement uses"
        return Refusal(
            f'pgwarden: {how} column "{raw}" of {relation}, which role '
            f'"{self.role.name}" may not see; refused',
            self.role.columns_hint(source.relation) if source.relation else "",
        )

    @staticmethod
    def _qualify(column: exp.Column, source: Source) -> None:
        column.set("catalog", None)
        column.set("db", None)
        column.set("table", exp.to_identifier(source.alias, quoted=True))

    # --- look-ups ----------------------------------------------------------------

    def _push_lookups(self, root: exp.Expression) -> None:
        for select in [n for n in root.walk() if isinstance(n, exp.Select)]:
            self._filter_derived(select)
        roots: list[exp.Expression] = []
        for node in root.walk():
            if isinstance(node, (exp.Where, exp.Having)):
                roots.append(node.this)
            elif isinstance(node, exp.Join) and node.args.get("on") is not None:
                roots.append(node.args["on"])
        for start in roots:
            for leaf in list(self._filter_leaves(start)):
                self._push(leaf)

    def _filter_derived(self, select: exp.Select) -> None:
        """Move whole WHERE conjuncts of look-ups into the derived table's own WHERE.

        `FROM customers c WHERE c.email = 'x' AND c.id > 3` becomes `FROM (SELECT ...
        FROM public.customers WHERE "email" = 'x') AS c WHERE c.id > 3`: one index
        scan, no semi-join. Only for a select without outer joins, where filtering a
        FROM item early cannot change the result.
        """
        where = select.args.get("where")
        if where is None or any(j.args.get("side") for j in select.args.get("joins") or ()):
            return
        sources = self._sources.get(id(select), [])
        kept: list[exp.Expression] = []
        for conjunct in _conjuncts(where.this):
            source = self._pushable(conjunct, sources)
            if source is None:
                kept.append(conjunct)
                continue
            source.filters.append(self._raw_condition(conjunct))
            self.outcome.lookups += len(list(self._filter_leaves(conjunct)))
        if len(kept) == len(list(_conjuncts(where.this))):
            return
        select.set("where", exp.Where(this=exp.and_(*kept)) if kept else None)

    def _pushable(self, conjunct: exp.Expression, sources: list[Source]) -> Source | None:
        if any(not isinstance(n, _FILTER_NODES) for n in _bool_frame(conjunct)):
            return None
        found: set[int] = set()
        chosen: Source | None = None
        for leaf in self._filter_leaves(conjunct):
            target = self._lookup_target(leaf)
            if target is None or not any(target[1] is s for s in sources):
                return None
            found.add(id(target[1]))
            chosen = target[1]
        return chosen if len(found) == 1 else None

    def _raw_condition(self, node: exp.Expression) -> exp.Expression:
        if isinstance(node, exp.And | exp.Or):
            return type(node)(
                this=self._raw_condition(node.this), expression=self._raw_condition(node.expression)
            )
        if isinstance(node, exp.Paren):
            return exp.Paren(this=self._raw_condition(node.this))
        target = self._lookup_target(node)
        assert target is not None
        column, source, values = target
        raw_col = exp.column(source.base[ident_name(column.this)], quoted=True)
        if isinstance(node, exp.In):
            return exp.In(this=raw_col, expressions=[v.copy() for v in values])
        return exp.EQ(this=raw_col, expression=values[0].copy())

    def _filter_leaves(self, node: exp.Expression) -> Iterator[exp.Expression]:
        if isinstance(node, (exp.And, exp.Or)):
            yield from self._filter_leaves(node.this)
            yield from self._filter_leaves(node.expression)
        elif isinstance(node, exp.Paren):
            yield from self._filter_leaves(node.this)
        elif isinstance(node, (exp.EQ, exp.In)):
            yield node

    def _push(self, leaf: exp.Expression) -> None:
        target = self._lookup_target(leaf)
        if target is None:
            return
        column, source, values = target
        relation = source.relation
        assert relation is not None
        assert source.view is not None
        raw = source.base[ident_name(column.this)]
        inner = exp.select(*[exp.column(k, quoted=True) for k in relation.primary_key])
        inner = inner.from_(exp.table_(relation.name, db=relation.schema, quoted=True), copy=False)
        raw_col = exp.column(raw, quoted=True)
        if isinstance(leaf, exp.In):
            cond: exp.Expression = exp.In(this=raw_col, expressions=[v.copy() for v in values])
        else:
            cond = exp.EQ(this=raw_col, expression=values[0].copy())
        if source.view.row_filter is not None:  # a look-up finds filtered-out rows never
            fence = exp.Paren(this=source.view.row_filter.tree.copy())
            cond = cast("exp.Expression", exp.and_(fence, cond, copy=False))
        inner = inner.where(cond, copy=False)
        visible = {b: v for v, b in source.base.items()}
        keys = [
            exp.column(visible[k], table=source.alias, quoted=True) for k in relation.primary_key
        ]
        probe = keys[0] if len(keys) == 1 else exp.Tuple(expressions=keys)
        leaf.replace(exp.In(this=probe, query=exp.Subquery(this=inner)))
        self.outcome.lookups += 1

    def _lookup_target(
        self, leaf: exp.Expression
    ) -> tuple[exp.Column, Source, list[exp.Expression]] | None:
        if isinstance(leaf, exp.EQ):
            pairs = [(leaf.this, leaf.expression), (leaf.expression, leaf.this)]
            for column, value in pairs:
                if isinstance(column, exp.Column) and _constant(value):
                    found = self._lookup_column(column)
                    if found is not None:
                        return column, found, [value]
            return None
        column = leaf.this
        values = list(leaf.expressions)
        if (
            leaf.args.get("query") is not None
            or not values
            or not all(_constant(v) for v in values)
        ):
            return None
        if not isinstance(column, exp.Column):
            return None
        found = self._lookup_column(column)
        return (column, found, values) if found is not None else None

    def _lookup_column(self, column: exp.Column) -> Source | None:
        if isinstance(column.this, exp.Star):
            return None
        source = self.bind(column)
        if source is None or source.view is None or source.relation is None:
            return None
        raw = source.base.get(ident_name(column.this))
        if raw is None or not source.view.lookup(raw):
            return None
        pk = source.relation.primary_key
        if not pk or any(source.view.protected_column(k) for k in pk):
            return None
        return source

    # --- replacement -------------------------------------------------------------

    def _replace(self, source: Source) -> None:
        table = source.node
        relation, view = source.relation, source.view
        assert isinstance(table, exp.Table)
        assert relation is not None
        assert view is not None
        projections: list[exp.Expr] = []
        for visible, raw in source.base.items():
            expr = view.projection(raw)
            if expr is not None:
                projections.append(exp.alias_(expr, visible, quoted=True, copy=False))
        inner_table = exp.table_(relation.name, db=relation.schema, quoted=True)
        if table.args.get("only"):
            inner_table.set("only", True)
        if table.args.get("sample") is not None:
            inner_table.set("sample", table.args["sample"])
        inner = exp.select(*projections, copy=False).from_(inner_table, copy=False)
        conditions = list(source.filters)
        if view.row_filter is not None:
            conditions.insert(0, exp.Paren(this=view.row_filter.tree.copy()))
            # OFFSET 0: PostgreSQL neither flattens this derived table nor pushes the
            # statement's own conditions into it, so they only ever see filtered rows
            # (a division by zero on a filtered-out row cannot happen, or be observed).
            inner = inner.offset(0, copy=False)
        if conditions:
            inner = inner.where(exp.and_(*conditions, copy=False), copy=False)
        derived = exp.Subquery(
            this=inner, alias=exp.TableAlias(this=exp.to_identifier(source.alias, quoted=True))
        )
        table.replace(derived)

    # --- identifiers -------------------------------------------------------------

    @staticmethod
    def _check_identifiers(root: exp.Expression) -> None:
        for ident in root.find_all(exp.Identifier):
            if str(ident.this).lower().startswith(INTERNAL_PREFIX):
                raise Refusal(
                    f'pgwarden: names starting with "{INTERNAL_PREFIX}" are reserved; refused'
                )


_PACKING_CLASSES = (
    exp.GroupConcat,
    exp.ArrayAgg,
    exp.JSONArrayAgg,
    exp.JSONObjectAgg,
    exp.JSONBObjectAgg,
)
_PACKING_CLASS_NAMES: dict[type, str] = {
    exp.GroupConcat: "string_agg()",
    exp.ArrayAgg: "array_agg()",
    exp.JSONArrayAgg: "json_agg()",
    exp.JSONObjectAgg: "json_object_agg()",
    exp.JSONBObjectAgg: "jsonb_object_agg()",
}
_PACKING_NAMES = frozenset({"jsonb_agg", "xmlagg", "json_agg", "string_agg", "array_agg"})


def _filter_only(node: exp.Expression, root: exp.Expression) -> bool:
    """`node` sits inside a WHERE, HAVING or JOIN ... ON condition (below `root`)."""
    child: exp.Expr = node
    parent = node.parent
    while parent is not None and child is not root:
        if isinstance(parent, (exp.Where, exp.Having)):
            return True
        if isinstance(parent, exp.Join) and child.arg_key == "on":
            return True
        child, parent = parent, parent.parent
    return False


def _packs(node: exp.Expr) -> bool:
    if isinstance(node, _PACKING_CLASSES):
        return True
    if isinstance(node, exp.Anonymous):
        return str(node.name).lower() in _PACKING_NAMES
    if isinstance(node, exp.Array):
        return any(isinstance(a, exp.Query | exp.Subquery) for a in node.expressions)
    return False


def _packing_name(node: exp.Expr) -> str:
    if isinstance(node, exp.Array):
        return "ARRAY(subquery)"
    if isinstance(node, exp.Anonymous):
        return f"{str(node.name).lower()}()"
    return _PACKING_CLASS_NAMES.get(type(node), "aggregate")


_FILTER_NODES = (exp.EQ, exp.In, exp.And, exp.Or, exp.Paren)


def _conjuncts(node: exp.Expression) -> Iterator[exp.Expression]:
    if isinstance(node, exp.And):
        yield from _conjuncts(node.this)
        yield from _conjuncts(node.expression)
    elif isinstance(node, exp.Paren) and isinstance(node.this, exp.And):
        yield from _conjuncts(node.this)
    else:
        yield node


def _bool_frame(node: exp.Expression) -> Iterator[exp.Expression]:
    """The AND/OR/parenthesis skeleton of a condition and its leaves (not below them)."""
    yield node
    if isinstance(node, exp.And | exp.Or):
        yield from _bool_frame(node.this)
        yield from _bool_frame(node.expression)
    elif isinstance(node, exp.Paren):
        yield from _bool_frame(node.this)


def _constant(node: exp.Expression, *, any_ok: bool = True) -> bool:
    """A literal or parameter (cast or negated), or `ANY(...)` of such (`= ANY($1)`)."""
    if isinstance(node, exp.Cast):
        return _constant(node.this, any_ok=False)
    if isinstance(node, exp.Neg):
        return isinstance(node.this, exp.Literal)
    if isinstance(node, exp.Any) and any_ok:
        inner = node.this.this if isinstance(node.this, exp.Paren) else node.this
        if isinstance(inner, exp.Array):
            return all(_constant(e, any_ok=False) for e in inner.expressions)
        return _constant(inner, any_ok=False)
    return isinstance(node, _CONST)
