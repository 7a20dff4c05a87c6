"""The policy engine: one client statement in, one verdict out.

Strategy, for a restricted role:

1. PostgreSQL's grammar first (pglast/libpg_query): split the text into statements
   and classify each by its real parse node, so comments, dollar quotes, U& and E''
   literals and multi-statement tricks mean exactly what they will mean upstream.
2. Each query (SELECT, INSERT/UPDATE/DELETE, the query of COPY and DECLARE) is
   deparsed to canonical SQL and analysed with sqlglot: relations resolved and
   authorised, columns bound, the masking rewrite applied (proxy/analysis/rewrite.py).
3. The text to send is generated from the rewritten tree and checked again with
   PostgreSQL's grammar (proxy/analysis/verify.py): node types, functions,
   relations and the masking invariant.

The client's text never reaches the database for a restricted role: what is sent
is generated from the trees that were checked. Session housekeeping (BEGIN, SET of
harmless settings, SHOW, FETCH, ...) is deparsed from PostgreSQL's own parse.

Any parse error, recursion error, unknown node or unexpected failure is a refusal:
`evaluate` never raises for a client's input. Verdicts are cached by (role, text);
the engine is rebuilt on every policy or schema reload, so the cache never
outlives either. A role whose rewrite depends on the user (`:user` in a row filter,
a per-user hash) is analysed and cached per user: its key is (role, user, text).
A statement of a session in break-glass is evaluated for the role's break-glass
variant (`Role.under_break_glass`: other row filters and limits) and cached under
its own key, so the two never share a verdict. `SET pgwarden.reason = '...'` (and
its RESET) is recognised here: its Evaluation carries the reason for the gate.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, cast

import pglast
import sqlglot
from pglast import ast
from pglast.enums import TransactionStmtKind, VariableSetKind
from pglast.parser import ParseError as PgParseError
from sqlglot import exp
from sqlglot.errors import ErrorLevel, SqlglotError

from proxy.analysis.allowlists import SAFE_SETTINGS
from proxy.analysis.catalog import Snapshot
from proxy.analysis.masks import quote_ident
from proxy.analysis.records import RecordSpec, add_key_columns, merged
from proxy.analysis.rewrite import Rewriter
from proxy.analysis.rewrite_errors import Refusal
from proxy.analysis.roles import RoleView
from proxy.analysis.template import Filler, Shape, filler_of, shape_of
from proxy.analysis.verify import Verifier, deparse, reads_catalog_only, walk
from proxy.policy.model import Policy, Role, StatementKind

PgNode = Any  # pglast's node classes are loosely typed
PARSE_HINT = "Check the statement's syntax; pgwarden forwards only statements it can parse."
REASON_SETTING = "pgwarden.reason"  # SET pgwarden.reason = '...' opens break-glass
REASON_MAX = 200
REASON_HINT = "State a ticket number, for example SET pgwarden.reason = 'CS-0042 fraud call'."

_QUERY_KINDS: Mapping[type, StatementKind] = {
    ast.SelectStmt: "select",
    ast.InsertStmt: "insert",
    ast.UpdateStmt: "update",
    ast.DeleteStmt: "delete",
}
_SESSION = (
    ast.TransactionStmt,
    ast.VariableSetStmt,
    ast.VariableShowStmt,
    ast.DeallocateStmt,
    ast.ClosePortalStmt,
    ast.FetchStmt,
    ast.DiscardStmt,
    ast.UnlistenStmt,  # only stops notifications (asyncpg's pool sends UNLISTEN * on release)
)
_UTILITY = (ast.ListenStmt, ast.NotifyStmt)
_TWO_PHASE = (
    TransactionStmtKind.TRANS_STMT_PREPARE,
    TransactionStmtKind.TRANS_STMT_COMMIT_PREPARED,
    TransactionStmtKind.TRANS_STMT_ROLLBACK_PREPARED,
)
_SET_FREE = ("transaction", "session characteristics")


@dataclass(frozen=True, slots=True)
class Evaluation:
    """The engine's answer for one client text."""

    allowed: bool
    sql: str | None = None  # the text to send (None: the client's own text)
    kinds: tuple[str, ...] = ()
    tables: tuple[str, ...] = ()
    masked: tuple[str, ...] = ()  # tables read through masks
    filtered: tuple[str, ...] = ()  # tables read through the role's row filter
    lookups: int = 0
    sqlstate: str = ""
    message: str = ""
    hint: str = ""
    reasons: tuple[str, ...] = field(default=())
    cap: int | None = None  # rows_per_query of the role, for the relay
    classified: bool = False  # reads a table with classified columns (rows count for quotas)
    # A single DECLARE (True) or FETCH/MOVE (False) statement: its cursor's name, so the
    # relay can sum a cursor's rows over its FETCHes.
    cursor: tuple[str, bool] | None = None
    truncate: bool = False  # on_exceed: truncate (else reject)
    unknown_relation: bool = False  # refused because the snapshot lacks a relation
    internal: str = ""  # analysis failed unexpectedly: the exception type, for the log
    records: RecordSpec | None = None  # record accounting of the result rows (hidden keys)
    # SET/RESET pgwarden.reason: the reason stated ("" closes break-glass); else None
    reason: str | None = None


@dataclass
class _Facts:
    kinds: list[str] = field(default_factory=list)
    tables: set[str] = field(default_factory=set)
    masked: set[str] = field(default_factory=set)
    filtered: set[str] = field(default_factory=set)
    lookups: int = 0
    cursor_rows: bool = False  # FETCH: rows of a cursor whose query is not known here
    cursors: list[tuple[str, bool]] = field(default_factory=list)  # (name, declared here)
    single: bool = True  # the client's text holds one statement
    # per query: it reads catalog relations only (no row cap: they describe objects, not data)
    catalog: list[bool] = field(default_factory=list)
    records: list[RecordSpec] = field(default_factory=list)  # per query showing records
    reason: str | None = None  # SET/RESET pgwarden.reason: the reason ("" to close)


@dataclass(frozen=True, slots=True)
class _Templated:
    """An allowed template's verdict, and where its rewrite takes the literals."""

    verdict: Evaluation
    filler: Filler | None  # None: the client's own text is sent

    @classmethod
    def of(cls, verdict: Evaluation, shape: Shape) -> _Templated | None:
        if not verdict.allowed:
            return None  # analysed with its literals instead: its own verdict, its own message
        if verdict.sql is None:
            return cls(verdict, None)
        filler = filler_of(verdict.sql, len(shape.literals))
        return None if filler is None else cls(verdict, filler)

    def fill(self, literals: tuple[str, ...]) -> Evaluation:
        if self.filler is None:
            return self.verdict
        return replace(self.verdict, sql=self.filler.fill(literals))


class Engine:
    """Evaluates statements for every role of one policy against one snapshot."""

    def __init__(
        self, policy: Policy, snapshot: Snapshot, hash_key: bytes | None, *, cache_size: int = 4096
    ) -> None:
        self.policy = policy
        self.snapshot = snapshot
        self.hash_key = hash_key
        self._roles: dict[tuple[str, str, bool], RoleView] = {}
        self._forbidden: dict[str, frozenset[tuple[int, int]]] = {}
        # (role, user or "" for a role that does not depend on it, text, extended, break-glass)
        self._variants: dict[str, Role] = {}  # role -> its break-glass variant
        self._per_user: dict[tuple[str, bool], bool] = {}
        self._cache: OrderedDict[tuple[str, str, str, bool, bool], Evaluation] = OrderedDict()
        self._cache_size = cache_size
        # (role, user or "", template text, break-glass) -> the template's verdict and its
        # rewrite as segments, or None when statements of that template are analysed one by one.
        self._templates: OrderedDict[tuple[str, str, str, bool], _Templated | None] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def role(self, role: str, *, break_glass: bool = False) -> Role:
        """The policy's role, or its break-glass variant (KeyError, ValueError if none)."""
        if not break_glass:
            return self.policy.roles[role]
        found = self._variants.get(role)
        if found is None:
            found = self._variants[role] = self.policy.roles[role].under_break_glass()
        return found

    def user_key(self, role: str, user: str, *, break_glass: bool = False) -> str:
        """The user as far as `role`'s rewrites depend on it: `user`, or "" (one for all)."""
        per_user = self._per_user.get((role, break_glass))
        if per_user is None:  # worked out once per role: the policy is frozen
            per_user = self._per_user[role, break_glass] = self.role(
                role, break_glass=break_glass
            ).per_user
        return user if per_user else ""

    def role_view(self, role: str, user: str = "", *, break_glass: bool = False) -> RoleView:
        key = (role, self.user_key(role, user, break_glass=break_glass), break_glass)
        view = self._roles.get(key)
        if view is None:
            found = self.role(role, break_glass=break_glass)
            view = RoleView(self.policy, found, self.hash_key, user=key[1], snapshot=self.snapshot)
            self._roles[key] = view
        return view

    def forbidden_fields(self, role: str) -> frozenset[tuple[int, int]]:
        """(table OID, attnum) of every column `role` may not see raw: the result backstop."""
        found = self._forbidden.get(role)
        if found is None:
            view = self.role_view(role)
            found = frozenset(
                (relation.oid, column.attnum)
                for relation in self.snapshot.user_relations()
                for column in relation.columns
                if view.visibility(relation).protected_column(column.name)
            )
            self._forbidden[role] = found
        return found

    def evaluate(
        self,
        role: str,
        sql: str,
        *,
        extended: bool = False,
        user: str = "",
        break_glass: bool = False,
    ) -> Evaluation:
        """The verdict for `sql` run by `user`, a member of `role` (cached).

        `break_glass`: under the role's break-glass rules (refused if it has none).
        """
        if break_glass and self.policy.roles[role].break_glass is None:
            return _refused(_no_break_glass(role), _Facts())
        user = self.user_key(role, user, break_glass=break_glass)
        key = (role, user, sql, extended, break_glass)
        found = self._cache.get(key)
        if found is not None:
            self.hits += 1
            self._cache.move_to_end(key)
            return found
        result = None if extended else self._from_template(role, sql, user, break_glass)
        if result is None:
            self.misses += 1
            result = self._evaluate(role, sql, extended, user, break_glass)
        self._cache[key] = result
        if len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return result

    def _from_template(
        self, role: str, sql: str, user: str, break_glass: bool = False
    ) -> Evaluation | None:
        """The verdict of `sql` from its literal template (proxy/analysis/template.py)."""
        if self.policy.roles[role].unrestricted:
            return None
        shape = shape_of(sql)
        if shape is None:
            return None
        key = (role, user, shape.template, break_glass)
        if key in self._templates:
            self.hits += 1
            self._templates.move_to_end(key)
            entry = self._templates[key]
        else:  # analysed once, as a statement with parameters (counted as the miss)
            verdict = self.evaluate(
                role, shape.template, extended=True, user=user, break_glass=break_glass
            )
            entry = _Templated.of(verdict, shape)
            self._templates[key] = entry
            if len(self._templates) > self._cache_size:
                self._templates.popitem(last=False)
        return None if entry is None else entry.fill(shape.literals)

    def _evaluate(
        self, role: str, sql: str, extended: bool, user: str = "", break_glass: bool = False
    ) -> Evaluation:
        found = self.role(role, break_glass=break_glass)
        if found.unrestricted:
            return Evaluation(True, reasons=("role is unrestricted",))
        facts = _Facts()
        try:
            if found.per_user and not user:  # a per-user rewrite for nobody: fail closed
                raise Refusal(f'pgwarden: role "{role}" needs a user; refused')
            view = self.role_view(role, user, break_glass=break_glass)
            text = self._statements(view, sql, extended, facts)
        except Refusal as refusal:
            return _refused(refusal, facts)
        except PgParseError:
            return _refused(Refusal(_PARSE_MESSAGE, PARSE_HINT, sqlstate="42601"), facts)
        except RecursionError:
            return _refused(
                Refusal(
                    "pgwarden: statement nested too deeply; refused",
                    "Simplify the statement (fewer nested parentheses or subqueries).",
                    sqlstate="42601",
                ),
                facts,
            )
        except Exception as error:  # noqa: BLE001 - fail closed on anything unexpected
            return replace(_refused(_unexpected(error), facts), internal=type(error).__name__)
        reasons = [f"{t} read through masks" for t in sorted(facts.masked)]
        reasons += [f"{t} read through the role's row filter" for t in sorted(facts.filtered)]
        reasons += (
            [f"{facts.lookups} equality look-up(s) pushed to the raw column"]
            if facts.lookups
            else []
        )
        return Evaluation(
            True,
            sql=text,
            kinds=tuple(facts.kinds),
            tables=tuple(sorted(facts.tables)),
            masked=tuple(sorted(facts.masked)),
            filtered=tuple(sorted(facts.filtered)),
            lookups=facts.lookups,
            reasons=tuple(reasons) or ("every table and column is visible to the role",),
            cap=None if _catalog_only(facts) else view.rows_per_query,
            truncate=view.truncates,
            classified=facts.cursor_rows or any(t in self.policy.classify for t in facts.tables),
            cursor=facts.cursors[0] if len(facts.kinds) == 1 and facts.cursors else None,
            records=merged(facts.records),
            reason=facts.reason,
        )

    # --- statements --------------------------------------------------------------

    def _statements(self, role: RoleView, sql: str, extended: bool, facts: _Facts) -> str | None:
        raw = pglast.parse_sql(sql)
        if not raw:
            return None  # an empty query: PostgreSQL answers EmptyQueryResponse
        if extended and len(raw) > 1:
            raise Refusal(
                "pgwarden: a prepared statement must hold exactly one command; refused",
                "Send one statement per Parse message, or use the simple query protocol.",
                sqlstate="42601",
            )
        facts.single = len(raw) == 1
        return "; ".join(self._statement(role, stmt.stmt, facts) for stmt in raw)

    def _statement(self, role: RoleView, stmt: PgNode, facts: _Facts) -> str:
        kind = _QUERY_KINDS.get(type(stmt))
        if kind is not None:
            self._require(role, kind, facts)
            for nested in _nested_kinds(stmt) - {kind}:  # WITH x AS (DELETE ...) SELECT ...
                self._require(role, nested, facts)
            return self._query(
                role, stmt, facts, limit=_one_more(role.rows_per_query), rows=kind == "select"
            )
        if isinstance(stmt, ast.CopyStmt):
            return self._copy(role, stmt, facts)
        if isinstance(stmt, ast.DeclareCursorStmt):
            self._require(role, "select", facts)
            # Alone in its Query, the relay sums the cursor's FETCHes (cap+1 shows a
            # crossing); inside a longer Query it is not tracked, so it is cut at the cap.
            cap = role.rows_per_query
            limit = _one_more(cap) if facts.single else cap
            text = self._query(role, stmt.query, facts, limit=limit, rows=True)
            stmt.query = pglast.parse_sql(text)[0].stmt
            facts.cursors.append((str(stmt.portalname), True))
            return deparse(stmt)
        if isinstance(stmt, ast.VariableSetStmt) and (stmt.name or "").lower() == REASON_SETTING:
            return self._reason(role, stmt, facts)
        if isinstance(stmt, _SESSION):
            _check_session(stmt)
            facts.kinds.append("session")
            if isinstance(stmt, ast.FetchStmt):
                facts.cursor_rows = True
                facts.cursors.append((str(stmt.portalname or ""), False))
            return deparse(stmt)
        if isinstance(stmt, _UTILITY):
            self._require(role, "utility", facts)
            return deparse(stmt)
        raise Refusal(
            f"pgwarden: {_tag(stmt)} is not allowed for restricted roles; refused",
            f"Role {role.name} may run: {', '.join(sorted(role.role.statements)) or 'nothing'}, "
            "and session commands (BEGIN, COMMIT, SET of presentation settings, SHOW, FETCH).",
        )

    def _reason(self, role: RoleView, stmt: PgNode, facts: _Facts) -> str:
        """SET/RESET pgwarden.reason: the reason that opens (or "" closes) break-glass."""
        if self.policy.roles[role.name].break_glass is None:
            raise _no_break_glass(role.name)
        if not facts.single:
            raise Refusal(
                f"pgwarden: SET {REASON_SETTING} must be sent alone, not with other "
                "statements; refused",
                REASON_HINT,
            )
        if stmt.is_local:
            raise Refusal(
                f"pgwarden: SET LOCAL {REASON_SETTING} is refused: break-glass lasts for "
                "its configured time, not for a transaction",
                f"Use SET {REASON_SETTING} = '...' (or SET SESSION).",
            )
        facts.kinds.append("session")
        facts.reason = _reason_text(stmt)
        return deparse(stmt)

    def _require(self, role: RoleView, kind: StatementKind, facts: _Facts) -> None:
        if kind not in role.role.statements:
            raise Refusal(
                f'pgwarden: role "{role.name}" may not run {_KIND_WORDS[kind]} statements; refused',
                f"Statements of role {role.name}: {_listing(role.role.statements)}.",
            )
        facts.kinds.append(kind)

    def _query(
        self,
        role: RoleView,
        stmt: PgNode,
        facts: _Facts,
        *,
        limit: int | None = None,
        rows: bool = False,
        keyable: bool = True,
    ) -> str:
        if isinstance(stmt, ast.SelectStmt) and (stmt.intoClause or stmt.lockingClause):
            raise Refusal(
                "pgwarden: SELECT INTO and FOR UPDATE/SHARE are refused for restricted roles"
            )
        canonical = deparse(_qualified_array_types(stmt))
        try:
            tree: exp.Expr = sqlglot.parse_one(
                canonical, read="postgres", error_level=ErrorLevel.RAISE
            )
        except SqlglotError as error:
            raise Refusal(_PARSE_MESSAGE, PARSE_HINT, sqlstate="42601") from error
        if isinstance(tree, exp.Command) or tree is None:
            raise Refusal(_PARSE_MESSAGE, PARSE_HINT, sqlstate="42601")
        accounting = rows and self.policy.accounts_records(role.role)
        rewriter = Rewriter(role, self.snapshot, records=accounting)
        rewritten: exp.Expr = rewriter.run(cast("exp.Expression", tree))
        if accounting:
            rewritten = self._account(rewritten, rewriter, facts, keyable=keyable and facts.single)
        catalog = bool(rewriter.outcome.tables) and not rewriter.outcome.data
        if limit is not None and isinstance(rewritten, exp.Query) and not catalog:
            rewritten = _capped(rewritten, limit)
        facts.tables |= rewriter.outcome.tables
        facts.masked |= rewriter.outcome.protected
        facts.filtered |= rewriter.outcome.filtered
        facts.lookups += rewriter.outcome.lookups
        try:
            text = rewritten.sql(
                dialect="postgres", unsupported_level=ErrorLevel.RAISE, comments=False
            )
        except SqlglotError as error:
            raise Refusal(_PARSE_MESSAGE, PARSE_HINT, sqlstate="42601") from error
        checked = Verifier(role, self.snapshot).check_text(text, type(stmt))
        # both analyses must agree; else the cap holds (and no LIMIT was added only if
        # sqlglot saw catalog relations alone, so an uncapped statement is never cut short)
        facts.catalog.append(catalog and reads_catalog_only(checked))
        return text

    def _account(
        self, root: exp.Expr, rewriter: Rewriter, facts: _Facts, *, keyable: bool
    ) -> exp.Expr:
        """Hidden key columns for record accounting (proxy/analysis/records.py)."""
        outcome = rewriter.outcome
        root, spec = add_key_columns(
            cast("exp.Expression", root),
            outcome.keyed,
            outcome.unkeyed,
            keyable=keyable,
            lookup=outcome.lookups > 0,
        )
        if spec is None:
            return root
        checked = rewriter.role.role.decoys
        blind = sorted(spec.blind & set(self.policy.decoys)) if checked else []
        if blind:
            raise Refusal(
                f"pgwarden: rows of {', '.join(blind)} cannot be accounted record by record "
                "in this form; refused",
                "Select from the table directly: no DISTINCT, UNION, WITH query, subquery in "
                "FROM or COPY, one statement per query.",
                sqlstate="0A000",
            )
        facts.records.append(spec)
        return root

    def _copy(self, role: RoleView, stmt: PgNode, facts: _Facts) -> str:
        if stmt.filename is not None or stmt.is_program:
            raise Refusal(
                "pgwarden: COPY to or from a server file or program is refused",
                "Use COPY ... TO STDOUT or FROM STDIN.",
            )
        if stmt.is_from:
            self._require(role, "copy_in", facts)
            relation = self.snapshot.resolve(stmt.relation.schemaname, stmt.relation.relname)
            if relation is None:
                raise Refusal(
                    f'pgwarden: relation "{stmt.relation.relname}" is unknown to pgwarden; refused'
                )
            role.authorise(relation)
            if stmt.whereClause is not None:
                raise Refusal(
                    "pgwarden: COPY FROM ... WHERE is refused for restricted roles",
                    "Filter the data before sending it.",
                )
            stmt.relation.schemaname = relation.schema
            facts.tables.add(relation.qualified)
            return deparse(stmt)
        self._require(role, "copy_out", facts)
        query = stmt.query
        if query is None:
            columns = ", ".join(quote_ident(c.sval) for c in stmt.attlist or ()) or "*"
            table = deparse(stmt.relation)
            query = pglast.parse_sql(f"SELECT {columns} FROM {table}")[0].stmt  # noqa: S608 - deparsed names
        text = self._query(
            role, query, facts, limit=_one_more(role.rows_per_query), rows=True, keyable=False
        )
        stmt.query = pglast.parse_sql(text)[0].stmt
        stmt.relation = None
        stmt.attlist = None
        return deparse(stmt)


_PARSE_MESSAGE = "pgwarden: statement could not be parsed; refused"
# Built-in types sqlglot cannot read as arrays unqualified (`$1::oid[]`, asyncpg's type
# introspection) but reads as pg_catalog.oid[].
_ARRAY_TYPES_TO_QUALIFY = frozenset(
    [
        "oid",
        "regproc",
        "regprocedure",
        "regoper",
        "regoperator",
        "regclass",
        "regcollation",
        "regtype",
        "regrole",
        "regnamespace",
        "regconfig",
        "regdictionary",
        "cstring",
    ]
)


def _qualified_array_types(stmt: PgNode) -> PgNode:
    """stmt with `oid[]` (and the other names above) written `pg_catalog.oid[]`.

    The same type: pg_catalog is searched first unless search_path names it later,
    and restricted roles cannot change search_path. The verifier checks the result.
    """
    for node, _ in walk(stmt):
        if not isinstance(node, ast.TypeName) or not node.arrayBounds:
            continue
        names = node.names or ()
        if len(names) == 1 and names[0].sval in _ARRAY_TYPES_TO_QUALIFY:
            node.names = (ast.String(sval="pg_catalog"), names[0])
    return stmt


_KIND_WORDS: Mapping[str, str] = {
    "copy_out": "COPY ... TO",
    "copy_in": "COPY ... FROM",
    **{k: k.upper() for k in ("select", "insert", "update", "delete", "ddl", "utility")},
}


def _listing(items: Iterable[str]) -> str:
    return ", ".join(sorted(items)) or "none"


def _catalog_only(facts: _Facts) -> bool:
    """Every statement is a query of catalog relations only: its rows describe objects.

    Such rows hold no customer data (leaky catalog relations are refused), so the row
    cap, meant for data, would only break client tools (pgjdbc's getTypeInfo, DBeaver's
    navigator). A FETCH is capped: its cursor's query is not known here.
    """
    return bool(facts.catalog) and all(facts.catalog) and not facts.cursor_rows


def _one_more(cap: int | None) -> int | None:
    """The database may return cap + 1 rows: enough for the relay to see the cap exceeded."""
    return None if cap is None else cap + 1


def _capped(query: exp.Query, limit: int) -> exp.Query:
    """`query` returning at most `limit` rows: LIMIT added, or the query wrapped.

    The relay's count is the guarantee; this spares the database the rest of a
    result pgwarden would not deliver. A query with its own LIMIT, OFFSET or FETCH
    (WITH TIES may return more) is wrapped rather than edited.
    """
    own = any(query.args.get(k) is not None for k in ("limit", "offset", "fetch"))
    if not own:
        return query.limit(limit, copy=False)
    wrapped = exp.select("*").from_(query.subquery("__pgw_capped", copy=False), copy=False)
    return wrapped.limit(limit, copy=False)


def _nested_kinds(stmt: PgNode) -> set[StatementKind]:
    """Kinds of the data-modifying statements inside `stmt` (WITH ... DELETE)."""
    return {_QUERY_KINDS[type(n)] for n, _ in walk(stmt) if type(n) in _QUERY_KINDS}


def _check_session(stmt: PgNode) -> None:
    if isinstance(stmt, ast.TransactionStmt) and stmt.kind in _TWO_PHASE:
        raise Refusal(
            "pgwarden: two-phase commit commands are refused for restricted roles",
            "Use BEGIN and COMMIT.",
        )
    if isinstance(stmt, ast.VariableSetStmt):
        if stmt.kind == VariableSetKind.VAR_RESET_ALL:
            return
        name = (stmt.name or "").lower()
        if name not in SAFE_SETTINGS and name not in _SET_FREE:
            raise Refusal(
                f'pgwarden: setting "{name}" may not be changed by restricted roles; refused',
                "Presentation and timeout settings (application_name, DateStyle, TimeZone, "
                "extra_float_digits, statement_timeout, ...) may be set.",
            )


def _no_break_glass(role: str) -> Refusal:
    return Refusal(
        f'pgwarden: role "{role}" has no break-glass; SET {REASON_SETTING} refused',
        "Ask the security team for wider access; stating a reason widens nothing for this role.",
    )


def _reason_text(stmt: PgNode) -> str:
    """The reason of a SET pgwarden.reason ("" for RESET, TO DEFAULT or ''); else Refusal."""
    if stmt.kind in (VariableSetKind.VAR_RESET, VariableSetKind.VAR_SET_DEFAULT):
        return ""
    args: tuple[PgNode, ...] = tuple(stmt.args or ())
    value = getattr(args[0], "val", None) if len(args) == 1 else None
    if stmt.kind != VariableSetKind.VAR_SET_VALUE or not isinstance(value, ast.String):
        raise Refusal(
            f"pgwarden: {REASON_SETTING} takes one quoted text; refused",
            REASON_HINT,
            sqlstate="22023",
        )
    text = str(value.sval)
    if not text:
        return ""
    if not text.strip() or not text.isprintable() or len(text) > REASON_MAX:
        raise Refusal(
            f"pgwarden: a break-glass reason must be printable text of 1 to {REASON_MAX} "
            "characters, on one line; refused",
            REASON_HINT + " It is logged as typed: never put customer data in it.",
            sqlstate="22023",
        )
    return text


def _tag(stmt: PgNode) -> str:
    name = type(stmt).__name__.removesuffix("Stmt")
    return "".join(" " + ch if ch.isupper() else ch for ch in name).strip().upper()


def _refused(refusal: Refusal, facts: _Facts) -> Evaluation:
    return Evaluation(
        False,
        kinds=tuple(facts.kinds),
        tables=tuple(sorted(facts.tables)),
        sqlstate=refusal.sqlstate,
        message=refusal.message,
        hint=refusal.hint,
        reasons=(refusal.message.removeprefix("pgwarden: "),),
        unknown_relation=refusal.unknown_relation,
    )


def _unexpected(error: Exception) -> Refusal:
    return Refusal(
        f"pgwarden: the statement could not be analysed ({type(error).__name__}); refused",
        "This is a limitation of pgwarden's analysis; rephrase the statement or report it.",
    )
