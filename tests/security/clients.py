"""The two client sessions of the security suite, with one interface.

Strategy: psycopg 3 speaks the simple Query protocol here (a ClientCursor merges any
parameters into the text, so every statement travels as one Query message, several
statements in one string included); asyncpg speaks the extended protocol (Parse,
Bind, Execute for every fetch). Both return an Outcome: the result sets, the error
(every field of the ErrorResponse), the notices, and every received text labelled
with where it came from, for the leak check.

Rules:

* Everything the client received is kept, including the rows of a multi-statement
  query that came before a failing statement: psycopg drops those when it raises, so
  RecordingCursor keeps the text of each result as it arrives.
* Nothing here prints or formats a received value: reprs and summaries give
  SQLSTATEs, counts and sizes only (the tests print no PII).
* A session outlives any one statement; `settle()` puts it back to idle (a
  transaction left open is rolled back, a closed connection is reopened), so one
  failing case cannot spoil the next.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Coroutine, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, LiteralString, Protocol, TypeVar, cast

import asyncpg
import psycopg
from psycopg import pq
from psycopg.pq.abc import PGresult

T = TypeVar("T")
CLIENTS = ("psycopg", "asyncpg")
TIMEOUT_S = 15.0
PGWARDEN_SQLSTATES = frozenset({"42501", "42601", "54000", "53400"})  # PRODUCT.md
_COPY = re.compile(r"\s*copy\b", re.IGNORECASE)
_DOLLAR_PARAM = re.compile(r"\$(\d+)")
_DIAG_FIELDS = (
    "severity",
    "sqlstate",
    "message_primary",
    "message_detail",
    "message_hint",
    "statement_position",
    "internal_position",
    "internal_query",
    "context",
    "schema_name",
    "table_name",
    "column_name",
    "datatype_name",
    "constraint_name",
)

if not hasattr(psycopg.ClientCursor, "_check_results"):  # pragma: no cover
    raise ImportError("psycopg changed: RecordingCursor cannot see every result any more")


@dataclass
class ErrorInfo:
    """An error as the client saw it; sqlstate None: raised by the client library."""

    sqlstate: str | None
    message: str
    hint: str
    fields: dict[str, str]

    @property
    def by_pgwarden(self) -> bool:
        """An ErrorResponse pgwarden wrote itself (PRODUCT.md: 'pgwarden: ...')."""
        return self.sqlstate is not None and self.message.startswith("pgwarden: ")

    def summary(self) -> str:
        """SQLSTATE, and the message when it is pgwarden's (which holds no values)."""
        if self.sqlstate is None:
            return "a client-side error (no ErrorResponse)"
        if self.by_pgwarden:
            return f"{self.sqlstate} {self.message!r}"
        return f"{self.sqlstate} from the database"

    def __repr__(self) -> str:
        return f"ErrorInfo({self.summary()})"


ResultSet = list[tuple[Any, ...]] | None  # None: a command that returns no rows


@dataclass
class Outcome:
    """What one statement string produced, as received."""

    results: list[ResultSet]
    error: ErrorInfo | None
    notices: list[dict[str, str]] = field(default_factory=list)
    texts: list[tuple[str, str]] = field(default_factory=list)  # (where, text)
    partial: bool = False  # some statement ran and answered before the one that failed

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def rows(self) -> list[tuple[Any, ...]]:
        """The rows of the last result set (the one a single statement makes)."""
        last = self.results[-1] if self.results else None
        return last or []

    def summary(self) -> str:
        if self.error is not None:
            return self.error.summary() + (" after earlier results" if self.partial else "")
        sizes = ["command" if r is None else f"{len(r)} rows" for r in self.results]
        return "ok: " + ", ".join(sizes)

    def __repr__(self) -> str:
        return f"Outcome({self.summary()})"


class Session(Protocol):
    client: str

    def run(self, sql: str, *params: Any) -> Outcome: ...

    def run_prepared(self, sql: str, params: Sequence[Sequence[Any]]) -> list[Outcome]: ...

    def idle(self) -> bool: ...

    def settle(self) -> None: ...

    def close(self) -> None: ...


def texts_of(value: Any, where: str) -> Iterator[tuple[str, str]]:
    """Every text inside a received value: cells, array items, JSON keys and values, and
    any nesting of mappings and sequences (asyncpg Records, driver result objects)."""
    if value is None:
        return
    if isinstance(value, str):
        yield where, value
    elif isinstance(value, bytes | bytearray | memoryview):
        yield where, bytes(value).decode("utf-8", "replace")
    elif isinstance(value, Mapping):
        for key, item in value.items():
            yield from texts_of(key, where)
            yield from texts_of(item, where)
    elif isinstance(value, Iterable):
        items = value.values() if callable(getattr(value, "values", None)) else value
        for item in items:
            yield from texts_of(item, where)
    else:
        yield where, str(value)


def canonical(value: Any) -> Any:
    """A comparable form: asyncpg Records become tuples, recursively."""
    if isinstance(value, asyncpg.Record):
        return tuple(canonical(v) for v in value.values())
    if isinstance(value, list | tuple):
        return type(value)(canonical(v) for v in value)
    return value


def difference(actual: Outcome, expected: Outcome, *, ordered: bool = False) -> str | None:
    """How two outcomes differ (SQLSTATEs, shapes, positions; never values), or None."""
    if actual.error is not None or expected.error is not None:
        same = (
            actual.error is not None
            and expected.error is not None
            and actual.error.sqlstate == expected.error.sqlstate
        )
        return None if same else f"got {actual.summary()}, expected {expected.summary()}"
    if [r is None for r in actual.results] != [r is None for r in expected.results]:
        return f"got {actual.summary()}, expected {expected.summary()}"
    for n, (got, want) in enumerate(zip(actual.results, expected.results, strict=True)):
        problem = rows_difference(got or [], want or [], ordered=ordered)
        if problem:
            return f"result set {n}: {problem}"
    return None


def rows_difference(
    got: Sequence[Sequence[Any]], want: Sequence[Sequence[Any]], *, ordered: bool = True
) -> str | None:
    """Where two row lists differ, described by position, type and length only."""
    got_rows = [tuple(canonical(v) for v in row) for row in got]
    want_rows = [tuple(canonical(v) for v in row) for row in want]
    if not ordered:
        got_rows.sort(key=repr)
        want_rows.sort(key=repr)
    if len(got_rows) != len(want_rows):
        return f"{len(got_rows)} rows, expected {len(want_rows)}"
    for r, (a, b) in enumerate(zip(got_rows, want_rows, strict=True)):
        if len(a) != len(b):
            return f"row {r}: {len(a)} columns, expected {len(b)}"
        for c, (x, y) in enumerate(zip(a, b, strict=True)):
            if x != y:
                return f"row {r} column {c}: got {_shape(x)}, expected {_shape(y)}"
    return None


def _shape(value: Any) -> str:
    if value is None:
        return "NULL"
    if isinstance(value, str | bytes | list | tuple):
        return f"{type(value).__name__} of length {len(value)}"
    if isinstance(value, bool | int):
        return f"{type(value).__name__} {value}"  # counts and ids are not PII
    return f"a {type(value).__name__}"


def psycopg_query(sql: str, params: Sequence[Any]) -> LiteralString:
    """$1, $2 ... as psycopg's %s (in order of appearance); % escaped when there are params."""
    if params:
        sql = _DOLLAR_PARAM.sub("%s", sql.replace("%", "%%"))
    return sql  # mypy treats LiteralString as str; the text is the test's own


# --- psycopg 3: the simple protocol ------------------------------------------------------


class RecordingCursor(psycopg.ClientCursor[Any]):
    """A ClientCursor that keeps the text of every result it receives, as it arrives."""

    def __init__(self, connection: psycopg.Connection[Any], **kwargs: Any) -> None:
        super().__init__(connection, **kwargs)
        self.received: list[tuple[str, str]] = []
        self.statuses: list[pq.ExecStatus] = []

    def _check_results(self, results: list[PGresult]) -> None:
        for n, res in enumerate(results, start=len(self.statuses)):
            self.statuses.append(pq.ExecStatus(res.status))
            for r in range(res.ntuples):
                for c in range(res.nfields):
                    value = res.get_value(r, c)
                    if value is not None:
                        where = f"result {n} row {r} column {c}"
                        self.received.append((where, value.decode("utf-8", "replace")))
        super()._check_results(results)


def psycopg_error(exc: psycopg.Error) -> ErrorInfo:
    diag = exc.diag
    fields = {name: str(v) for name in _DIAG_FIELDS if (v := getattr(diag, name, None))}
    message = diag.message_primary or str(exc)
    fields.setdefault("message_primary", message)
    return ErrorInfo(exc.sqlstate, message, diag.message_hint or "", fields)


class PsycopgSession:
    """One psycopg connection, autocommit, simple Query protocol."""

    client = "psycopg"

    def __init__(self, dsn: str) -> None:
        self.dsn = dsn
        self._notices: list[dict[str, str]] = []
        self.conn = self._connect()

    def _connect(self) -> psycopg.Connection[Any]:
        conn = psycopg.connect(
            self.dsn, autocommit=True, connect_timeout=10, cursor_factory=RecordingCursor
        )
        conn.add_notice_handler(self._on_notice)
        return conn

    def _on_notice(self, diag: psycopg.errors.Diagnostic) -> None:
        self._notices.append({n: str(v) for n in _DIAG_FIELDS if (v := getattr(diag, n, None))})

    def run(self, sql: str, *params: Any) -> Outcome:
        notices: list[dict[str, str]] = []
        self._notices = notices
        cur = cast(RecordingCursor, self.conn.cursor())
        results: list[ResultSet] = []
        copied: list[tuple[str, str]] = []
        error: ErrorInfo | None = None
        try:
            if _COPY.match(sql) and not params:
                with cur.copy(psycopg_query(sql, ())) as copy:
                    data = b"".join(bytes(chunk) for chunk in copy)
                copied.append(("COPY data", data.decode("utf-8", "replace")))
                results.append([(line,) for line in data.decode("utf-8", "replace").splitlines()])
            else:
                cur.execute(psycopg_query(sql, params), params or None, prepare=False)
                while True:
                    results.append(cur.fetchall() if cur.description is not None else None)
                    if not cur.nextset():
                        break
        except psycopg.Error as exc:
            error = psycopg_error(exc)
        finally:
            cur.close()
        answered = [s for s in cur.statuses if s != pq.ExecStatus.FATAL_ERROR]
        texts = [*cur.received, *copied]
        texts += [(f"error {k}", v) for k, v in (error.fields.items() if error else ())]
        texts += [(f"notice {k}", v) for notice in notices for k, v in notice.items()]
        return Outcome(
            results if error is None else [],
            error,
            notices,
            texts,
            partial=error is not None and bool(answered),
        )

    def run_prepared(self, sql: str, params: Sequence[Sequence[Any]]) -> list[Outcome]:
        """Each parameter tuple through one server-side prepared statement (extended)."""
        outcomes = []
        with psycopg.Cursor(self.conn) as cur:
            for args in params:
                try:
                    cur.execute(psycopg_query(sql, args), args, prepare=True)
                    rows = cur.fetchall()
                except psycopg.Error as exc:
                    outcomes.append(Outcome([], psycopg_error(exc)))
                    continue
                texts = [(w, t) for row in rows for w, t in texts_of(row, "row")]
                outcomes.append(Outcome([rows], None, texts=texts))
        return outcomes

    def idle(self) -> bool:
        status = self.conn.info.transaction_status
        return not self.conn.closed and status == pq.TransactionStatus.IDLE

    def settle(self) -> None:
        if self.conn.closed or self.conn.broken:
            self.conn = self._connect()
        elif not self.idle():
            self.conn.rollback()

    def close(self) -> None:
        self.conn.close()


# --- asyncpg: the extended protocol -----------------------------------------------------


class AsyncRunner:
    """One event loop for a module's asyncpg sessions; every call bounded in time."""

    def __init__(self) -> None:
        self._runner = asyncio.Runner()

    def run(self, coro: Coroutine[Any, Any, T], limit: float = TIMEOUT_S + 5) -> T:
        return self._runner.run(asyncio.wait_for(coro, limit))

    def close(self) -> None:
        self._runner.close()


def asyncpg_error(exc: asyncpg.PostgresError) -> ErrorInfo:
    fields = {k: str(v) for k, v in exc.as_dict().items() if v is not None}
    message = str(getattr(exc, "message", "") or exc)
    fields.setdefault("message", message)
    return ErrorInfo(exc.sqlstate, message, str(getattr(exc, "hint", "") or ""), fields)


class AsyncpgSession:
    """One asyncpg connection (no statement cache: every fetch is a fresh Parse)."""

    client = "asyncpg"

    def __init__(self, dsn: str, runner: AsyncRunner) -> None:
        self.dsn = dsn
        self.runner = runner
        self._notices: list[dict[str, str]] = []
        self.conn = runner.run(self._connect())

    async def _connect(self) -> asyncpg.Connection:
        conn = await asyncpg.connect(
            self.dsn, timeout=10, statement_cache_size=0, command_timeout=TIMEOUT_S
        )
        conn.add_log_listener(self._on_notice)
        return conn

    def _on_notice(self, _conn: Any, message: Any) -> None:
        self._notices.append({k: str(v) for k, v in message.as_dict().items() if v is not None})

    def run(self, sql: str, *params: Any) -> Outcome:
        notices: list[dict[str, str]] = []
        self._notices = notices
        results: list[ResultSet] = []
        error: ErrorInfo | None = None
        try:
            records = self.runner.run(self.conn.fetch(sql, *params, timeout=TIMEOUT_S))
            results.append([tuple(record.values()) for record in records])
        except asyncpg.PostgresError as exc:
            error = asyncpg_error(exc)
        except (asyncpg.InterfaceError, asyncpg.exceptions.InternalClientError) as exc:
            error = ErrorInfo(None, type(exc).__name__, "", {"client": str(exc)})
        texts = [
            (f"row {r}", text)
            for rows in results
            for r, row in enumerate(rows or [])
            for _, text in texts_of(row, "")
        ]
        texts += [(f"error {k}", v) for k, v in (error.fields.items() if error else ())]
        texts += [(f"notice {k}", v) for notice in notices for k, v in notice.items()]
        return Outcome(results, error, notices, texts)

    def run_prepared(self, sql: str, params: Sequence[Sequence[Any]]) -> list[Outcome]:
        """Each parameter tuple through one prepared statement (conn.prepare)."""

        async def go() -> list[Outcome]:
            outcomes = []
            try:
                statement = await self.conn.prepare(sql, timeout=TIMEOUT_S)
            except asyncpg.PostgresError as exc:
                return [Outcome([], asyncpg_error(exc))]
            for args in params:
                try:
                    records = await statement.fetch(*args, timeout=TIMEOUT_S)
                except asyncpg.PostgresError as exc:
                    outcomes.append(Outcome([], asyncpg_error(exc)))
                    continue
                rows = [tuple(record.values()) for record in records]
                texts = [(w, t) for row in rows for w, t in texts_of(row, "row")]
                outcomes.append(Outcome([rows], None, texts=texts))
            return outcomes

        return self.runner.run(go(), limit=TIMEOUT_S * 4)

    def idle(self) -> bool:
        return not self.conn.is_closed() and not self.conn.is_in_transaction()

    def settle(self) -> None:
        if self.conn.is_closed():
            self.conn = self.runner.run(self._connect())
        elif self.conn.is_in_transaction():
            self.runner.run(self.conn.execute("ROLLBACK"))

    def close(self) -> None:
        if not self.conn.is_closed():
            self.runner.run(self.conn.close(timeout=5))


class SessionPool:
    """One session per (user, client), opened on first use, closed together."""

    def __init__(self, dsn_for: dict[str, str], runner: AsyncRunner) -> None:
        self._dsn_for = dsn_for  # key -> libpq URI
        self._runner = runner
        self._sessions: dict[tuple[str, str], Session] = {}
        self.baseline: dict[tuple[str, str], str] = {}

    def get(self, key: str, client: str) -> Session:
        if (key, client) not in self._sessions:
            dsn = self._dsn_for[key]
            session: Session = (
                PsycopgSession(dsn) if client == "psycopg" else AsyncpgSession(dsn, self._runner)
            )
            self._sessions[key, client] = session
            self.baseline[key, client] = probe(session)
        return self._sessions[key, client]

    def close(self) -> None:
        for session in self._sessions.values():
            session.close()
        self._sessions.clear()


def probe(session: Session) -> str:
    """How the session answers SELECT 1: 'rows [(1,)]' or the error's SQLSTATE."""
    outcome = session.run("SELECT 1")
    if outcome.error is not None:
        return f"error {outcome.error.sqlstate}"
    return f"rows {[canonical(row) for row in outcome.rows]!r}"
