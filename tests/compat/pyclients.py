"""The Python drivers of the matrix behind one small interface.

Strategy: the scenario (test_python_drivers.py) is written once against `Db`; one
subclass per driver does each step with that driver's own API: its parameter style,
its prepared statements, its transaction calls, its cancel call, its notification
API. asyncpg and psycopg's async connection run on an event loop owned by the
adapter (an asyncio.Runner), so every step is a plain call with a time limit.

Rules:

* Every value a driver hands back (rows, error fields, notices, notification
  payloads) is appended to `Db.received`, which the `db` fixture runs through the
  leak check after each test: a step cannot forget it.
* A database error becomes DbError (SQLSTATE, message, hint). Its repr holds the
  SQLSTATE only, and pgwarden's own message (which never holds a value).
* Statements are written with $1 placeholders (scenario.py); each adapter turns
  them into its driver's style.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Coroutine, Sequence
from typing import Any, ClassVar, TypeVar

import asyncpg
import pg8000.native
import psycopg
import psycopg2
from conftest import Proxy

from .scenario import LONG_SQL, Role, with_params

T = TypeVar("T")
STEP_TIMEOUT_S = 30.0
Rows = list[tuple[Any, ...]]


class DbError(Exception):
    """An ErrorResponse as a driver reported it."""

    def __init__(self, sqlstate: str | None, message: str, hint: str = "") -> None:
        super().__init__(sqlstate, message)
        self.sqlstate, self.message, self.hint = sqlstate, message, hint

    @property
    def by_pgwarden(self) -> bool:
        return self.message.startswith("pgwarden: ")

    def __repr__(self) -> str:
        shown = f" {self.message!r}" if self.by_pgwarden else ""
        return f"DbError({self.sqlstate}{shown})"

    __str__ = __repr__


class Db:
    """One connection of one driver, logged in as one role through pgwarden."""

    client: ClassVar[str]
    binary: ClassVar[bool] = False  # results arrive in binary format

    def __init__(self, proxy: Proxy, role: Role, app: str) -> None:
        self.proxy, self.role, self.app = proxy, role, app
        self.received: list[object] = []

    # each driver implements these
    def fetch(self, sql: str, params: Sequence[Any] = ()) -> Rows:
        raise NotImplementedError

    def prepared(self, sql: str, runs: Sequence[Sequence[Any]]) -> list[Rows]:
        """One prepared statement, executed once per parameter row."""
        raise NotImplementedError

    def begin(self) -> None:
        raise NotImplementedError

    def rollback(self) -> None:
        raise NotImplementedError

    def cancel_running(self, wait_running: Callable[[], None]) -> DbError:
        """Run LONG_SQL, cancel it with the driver's API once wait_running() returns."""
        raise NotImplementedError

    def listen_notify(self, channel: str, payload: str) -> list[str]:
        """LISTEN, NOTIFY on the same connection, and the payloads received."""
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    # shared
    def keep(self, rows: Rows) -> Rows:
        self.received.append(rows)
        return rows

    def error(self, sqlstate: str | None, message: str, hint: str = "", *more: str) -> DbError:
        self.received.extend([message, hint, *more])
        return DbError(sqlstate, message, hint)


def _format(sql: str, params: Sequence[Any]) -> str:
    """$N as %s for psycopg and psycopg2; a text without parameters goes as written."""
    return with_params(sql, "%s") if params else sql


def _in_thread_after(wait: Callable[[], None], then: Callable[[], None]) -> threading.Thread:
    def run() -> None:
        wait()
        then()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


class _Blocking(Db):
    """A blocking DB-API driver (psycopg, psycopg2): transactions by autocommit, a
    cancel from another thread."""

    conn: Any

    def cancel(self) -> None:
        raise NotImplementedError

    def begin(self) -> None:
        self.conn.autocommit = False

    def rollback(self) -> None:
        self.conn.rollback()
        self.conn.autocommit = True

    def cancel_running(self, wait_running: Callable[[], None]) -> DbError:
        thread = _in_thread_after(wait_running, self.cancel)
        try:
            self.fetch(LONG_SQL)
        except DbError as error:
            return error
        finally:
            thread.join(STEP_TIMEOUT_S)
        raise AssertionError("the long query was not cancelled")


# --- psycopg 3 ----------------------------------------------------------------------


def _psycopg_error(db: Db, exc: psycopg.Error) -> DbError:
    diag = exc.diag
    return db.error(
        exc.sqlstate,
        diag.message_primary or str(exc),
        diag.message_hint or "",
        diag.message_detail or "",
        diag.context or "",
    )


class Psycopg(_Blocking):
    client = "psycopg"

    def __init__(self, proxy: Proxy, role: Role, app: str) -> None:
        super().__init__(proxy, role, app)
        self.conn = psycopg.connect(
            proxy.dsn(role.user, role.password, sslmode="disable"),
            autocommit=True,
            application_name=app,
            connect_timeout=10,
        )
        self.conn.add_notice_handler(lambda d: self.received.append(d.message_primary))

    def fetch(self, sql: str, params: Sequence[Any] = ()) -> Rows:
        try:
            cur = self.conn.execute(_format(sql, params), tuple(params) or None)
            return self.keep(cur.fetchall() if cur.description else [])
        except psycopg.DatabaseError as exc:
            raise _psycopg_error(self, exc) from None

    def prepared(self, sql: str, runs: Sequence[Sequence[Any]]) -> list[Rows]:
        query = with_params(sql, "%s")
        try:
            return [
                self.keep(self.conn.execute(query, tuple(p), prepare=True).fetchall()) for p in runs
            ]
        except psycopg.DatabaseError as exc:
            raise _psycopg_error(self, exc) from None

    def cancel(self) -> None:
        self.conn.cancel_safe()

    def listen_notify(self, channel: str, payload: str) -> list[str]:
        self.fetch(f"LISTEN {channel}")
        self.fetch(f"NOTIFY {channel}, '{payload}'")
        got = [n.payload for n in self.conn.notifies(timeout=STEP_TIMEOUT_S, stop_after=1)]
        self.received.extend(got)
        return got

    def close(self) -> None:
        self.conn.close()


# --- asyncio drivers: a runner per connection ------------------------------------------


class _Async(Db):
    def __init__(self, proxy: Proxy, role: Role, app: str) -> None:
        super().__init__(proxy, role, app)
        self.runner = asyncio.Runner()

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return self.runner.run(asyncio.wait_for(coro, STEP_TIMEOUT_S))

    def close(self) -> None:
        try:
            self.run(self._close())
        finally:
            self.runner.close()

    async def _close(self) -> None:
        raise NotImplementedError

    def cancel_running(self, wait_running: Callable[[], None]) -> DbError:
        return self.run(self._cancel_running(wait_running))

    async def _cancel_running(self, wait_running: Callable[[], None]) -> DbError:
        raise NotImplementedError


class PsycopgAsync(_Async):
    client = "psycopg-async"

    def __init__(self, proxy: Proxy, role: Role, app: str) -> None:
        super().__init__(proxy, role, app)
        self.conn = self.run(
            psycopg.AsyncConnection.connect(
                proxy.dsn(role.user, role.password, sslmode="disable"),
                autocommit=True,
                application_name=app,
                connect_timeout=10,
            )
        )
        self.conn.add_notice_handler(lambda d: self.received.append(d.message_primary))

    async def _fetch(self, sql: str, params: Sequence[Any] = (), **kw: Any) -> Rows:
        try:
            cur = await self.conn.execute(_format(sql, params), tuple(params) or None, **kw)
            return self.keep(await cur.fetchall() if cur.description else [])
        except psycopg.DatabaseError as exc:
            raise _psycopg_error(self, exc) from None

    def fetch(self, sql: str, params: Sequence[Any] = ()) -> Rows:
        return self.run(self._fetch(sql, params))

    def prepared(self, sql: str, runs: Sequence[Sequence[Any]]) -> list[Rows]:
        async def all_runs() -> list[Rows]:
            return [await self._fetch(sql, p, prepare=True) for p in runs]

        return self.run(all_runs())

    def begin(self) -> None:
        self.run(self.conn.set_autocommit(False))

    def rollback(self) -> None:
        self.run(self.conn.rollback())
        self.run(self.conn.set_autocommit(True))

    async def _cancel_running(self, wait_running: Callable[[], None]) -> DbError:
        query = asyncio.ensure_future(self._fetch(LONG_SQL))
        await asyncio.to_thread(wait_running)
        await self.conn.cancel_safe()
        try:
            await query
        except DbError as error:
            return error
        raise AssertionError("the long query was not cancelled")

    def listen_notify(self, channel: str, payload: str) -> list[str]:
        async def listen() -> list[str]:
            await self._fetch(f"LISTEN {channel}")
            await self._fetch(f"NOTIFY {channel}, '{payload}'")
            gen = self.conn.notifies(timeout=STEP_TIMEOUT_S, stop_after=1)
            return [n.payload async for n in gen]

        got = self.run(listen())
        self.received.extend(got)
        return got

    async def _close(self) -> None:
        await self.conn.close()


class Asyncpg(_Async):
    client = "asyncpg"
    binary = True

    def __init__(self, proxy: Proxy, role: Role, app: str) -> None:
        super().__init__(proxy, role, app)
        self.conn: asyncpg.Connection = self.run(
            asyncpg.connect(
                host=proxy.host,
                port=proxy.port,
                user=role.user,
                password=role.password,
                database="shop",
                ssl=False,
                server_settings={"application_name": app},
                timeout=10,
            )
        )
        self.conn.add_log_listener(lambda _c, msg: self.received.append(msg.args))
        self.transaction: Any = None

    def error_of(self, exc: asyncpg.PostgresError) -> DbError:
        fields = exc.as_dict()
        return self.error(
            fields.get("sqlstate"),
            str(fields.get("message", "")),
            str(fields.get("hint", "")),
            str(fields.get("detail", "")),
        )

    async def _fetch(self, sql: str, params: Sequence[Any] = ()) -> Rows:
        try:
            return self.keep([tuple(r) for r in await self.conn.fetch(sql, *params)])
        except asyncpg.PostgresError as exc:
            raise self.error_of(exc) from None

    def fetch(self, sql: str, params: Sequence[Any] = ()) -> Rows:
        return self.run(self._fetch(sql, params))

    def prepared(self, sql: str, runs: Sequence[Sequence[Any]]) -> list[Rows]:
        async def all_runs() -> list[Rows]:
            try:
                statement = await self.conn.prepare(sql)
                return [self.keep([tuple(r) for r in await statement.fetch(*p)]) for p in runs]
            except asyncpg.PostgresError as exc:
                raise self.error_of(exc) from None

        return self.run(all_runs())

    def begin(self) -> None:
        self.transaction = self.conn.transaction()
        self.run(self.transaction.start())

    def rollback(self) -> None:
        self.run(self.transaction.rollback())

    async def _cancel_running(self, wait_running: Callable[[], None]) -> DbError:
        """asyncpg's cancel API is task cancellation: it sends a CancelRequest."""
        query = asyncio.ensure_future(self.conn.fetch(LONG_SQL))
        await asyncio.to_thread(wait_running)
        query.cancel()
        try:
            await query
        except asyncio.CancelledError:
            return DbError("57014", "cancelled: asyncio.CancelledError")
        raise AssertionError("the long query was not cancelled")

    def listen_notify(self, channel: str, payload: str) -> list[str]:
        async def listen() -> list[str]:
            got: asyncio.Queue[str] = asyncio.Queue()
            try:
                await self.conn.add_listener(channel, lambda *args: got.put_nowait(args[3]))
            except asyncpg.PostgresError as exc:
                raise self.error_of(exc) from None
            await self._fetch(f"NOTIFY {channel}, '{payload}'")
            return [await got.get()]

        got = self.run(listen())
        self.received.extend(got)
        return got

    async def _close(self) -> None:
        await self.conn.close(timeout=10)


# --- psycopg2 -------------------------------------------------------------------------


class Psycopg2(_Blocking):
    client = "psycopg2"

    def __init__(self, proxy: Proxy, role: Role, app: str) -> None:
        super().__init__(proxy, role, app)
        self.conn = psycopg2.connect(
            host=proxy.host,
            port=proxy.port,
            user=role.user,
            password=role.password,
            dbname="shop",
            sslmode="disable",
            application_name=app,
            connect_timeout=10,
        )
        self.conn.autocommit = True

    def error_of(self, exc: psycopg2.Error) -> DbError:
        diag = exc.diag
        self.received.extend(self.conn.notices)
        return self.error(
            exc.pgcode,
            diag.message_primary or str(exc),
            diag.message_hint or "",
            diag.message_detail or "",
        )

    def fetch(self, sql: str, params: Sequence[Any] = ()) -> Rows:
        try:
            with self.conn.cursor() as cur:
                cur.execute(_format(sql, params), tuple(params) or None)
                rows = cur.fetchall() if cur.description else []
        except psycopg2.DatabaseError as exc:
            raise self.error_of(exc) from None
        self.received.extend(self.conn.notices)
        return self.keep(rows)

    def prepared(self, sql: str, runs: Sequence[Sequence[Any]]) -> list[Rows]:
        """psycopg2 has no protocol-level prepare: the same statement, bound client-side."""
        return [self.fetch(sql, p) for p in runs]

    def cancel(self) -> None:
        self.conn.cancel()

    def listen_notify(self, channel: str, payload: str) -> list[str]:
        self.fetch(f"LISTEN {channel}")
        self.fetch(f"NOTIFY {channel}, '{payload}'")
        self.conn.poll()
        got = [n.payload for n in self.conn.notifies]
        self.received.extend(got)
        return got

    def close(self) -> None:
        self.conn.close()


# --- pg8000 ---------------------------------------------------------------------------


def _named(sql: str, count: int) -> str:
    for n in range(count, 0, -1):
        sql = sql.replace(f"${n}", f":p{n}")
    return sql


class Pg8000(Db):
    client = "pg8000"

    def __init__(self, proxy: Proxy, role: Role, app: str) -> None:
        super().__init__(proxy, role, app)
        self.conn = pg8000.native.Connection(
            role.user,
            host=proxy.host,
            port=proxy.port,
            password=role.password,
            database="shop",
            application_name=app,
            timeout=STEP_TIMEOUT_S,
        )

    def error_of(self, exc: pg8000.native.DatabaseError) -> DbError:
        fields = exc.args[0] if exc.args and isinstance(exc.args[0], dict) else {}
        self.received.extend(str(v) for v in fields.values())
        return self.error(fields.get("C"), str(fields.get("M", exc)), str(fields.get("H", "")))

    def _kept(self, rows: list[list[Any]] | None) -> Rows:
        self.received.extend(n for n in self.conn.notices)
        return self.keep([tuple(r) for r in rows or []])

    def fetch(self, sql: str, params: Sequence[Any] = ()) -> Rows:
        named = {f"p{n}": v for n, v in enumerate(params, start=1)}
        try:
            return self._kept(self.conn.run(_named(sql, len(params)), **named))
        except pg8000.native.DatabaseError as exc:
            raise self.error_of(exc) from None

    def prepared(self, sql: str, runs: Sequence[Sequence[Any]]) -> list[Rows]:
        count = len(runs[0]) if runs else 0
        try:
            statement = self.conn.prepare(_named(sql, count))
            try:
                return [
                    self._kept(statement.run(**{f"p{n}": v for n, v in enumerate(p, 1)}))
                    for p in runs
                ]
            finally:
                statement.close()
        except pg8000.native.DatabaseError as exc:
            raise self.error_of(exc) from None

    def begin(self) -> None:
        self.fetch("START TRANSACTION")

    def rollback(self) -> None:
        self.fetch("ROLLBACK")

    def cancel_running(self, wait_running: Callable[[], None]) -> DbError:
        raise NotImplementedError("pg8000 has no cancel API")

    def listen_notify(self, channel: str, payload: str) -> list[str]:
        self.fetch(f"LISTEN {channel}")
        self.fetch(f"NOTIFY {channel}, '{payload}'")
        got = [str(n[2]) for n in self.conn.notifications]
        self.received.extend(got)
        return got

    def close(self) -> None:
        self.conn.close()


DRIVERS: dict[str, type[Db]] = {
    d.client: d for d in (Psycopg, PsycopgAsync, Asyncpg, Psycopg2, Pg8000)
}
