"""End to end: real clients (psql, psycopg 3, asyncpg, pgbench, a raw protocol client)
through the session's pgwarden to the real PostgreSQL.

Strategy: every client logs in as dora, whose role is unrestricted, so pgwarden must
behave exactly like a direct connection (only the login differs). Results are checked
against what the database holds, and for the raw protocol client the complete
response bytes from after a request up to ReadyForQuery must be identical to those of
a direct connection as the service account (same server, same session settings).

Rules:
* No sleeps to synchronise: wait for a condition with bounded polling (`wait_until`),
  e.g. a query showing up as active in pg_stat_activity before cancelling it.
* Every connection is closed by a context manager or a finally: tests turn
  ResourceWarnings into errors, and dora may hold at most 4 sessions at a time.
* What needs DDL (tables to write to) is made directly on `pg` as postgres, or is a
  TEMP table of the session under test.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import decimal
import hashlib
import io
import re
import secrets
import socket
import struct
import subprocess
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import asyncpg
import psycopg
import pytest
from conftest import (
    PASSWORDS,
    SHOP_CUSTOMERS,
    SVC_PASSWORD,
    SVC_USER,
    Proxy,
    ProxyLauncher,
)
from psycopg import errors, pq, sql
from scramp import ScramClient
from tlsutil import Pki

from proxy.pgserver import PgServer
from proxy.wire import frontend as fe

T = TypeVar("T")
USER = "dora"  # role dba: unrestricted, passes through untouched
PASSWORD = PASSWORDS[USER]
SCRATCH = "clients_scratch"  # schema made on pg for writes visible to other sessions
BENCH_DB = "clients_bench"
CUSTOMERS, ORDERS = SHOP_CUSTOMERS, 2 * SHOP_CUSTOMERS  # the shop data: 2 orders each


def wait_until(check: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    """Poll check() every 20 ms until it is true; fail after timeout seconds."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.02)


def connect(dsn: str, **kwargs: Any) -> psycopg.Connection[Any]:
    return psycopg.connect(dsn, connect_timeout=10, **kwargs)


def run_async(coro: Coroutine[Any, Any, T], limit: float = 30) -> T:
    """Run coro to completion, failing (not hanging) after limit seconds.

    pytest-timeout cannot interrupt a stuck event loop, so every async test
    bounds itself here and every asyncpg call carries its own timeout.
    """
    return asyncio.run(asyncio.wait_for(coro, limit))


def tag() -> str:
    return f"clients-{secrets.token_hex(4)}"


# --- fixtures ------------------------------------------------------------------------


@pytest.fixture
def dsn(proxy: Proxy) -> str:
    return proxy.dsn(USER, PASSWORD)


@pytest.fixture
def direct_dsn(pg: PgServer) -> str:
    return pg.dsn(SVC_USER, SVC_PASSWORD, "shop")


@pytest.fixture(scope="module")
def admin(pg: PgServer) -> Iterator[psycopg.Connection[Any]]:
    """A direct superuser connection to shop (pg_stat_activity, setup checks)."""
    with psycopg.connect(pg.dsn(dbname="shop"), autocommit=True) as conn:
        yield conn


@pytest.fixture(scope="module")
def scratch(admin: psycopg.Connection[Any]) -> Iterator[str]:
    """Schema SCRATCH with table items(id, note), writable by the service account."""
    admin.execute(f"DROP SCHEMA IF EXISTS {SCRATCH} CASCADE")
    admin.execute(f"CREATE SCHEMA {SCRATCH}")
    admin.execute(f"CREATE TABLE {SCRATCH}.items (id int PRIMARY KEY, note text)")
    admin.execute(f"GRANT USAGE ON SCHEMA {SCRATCH} TO {SVC_USER}")
    admin.execute(f"GRANT SELECT, INSERT, UPDATE, DELETE ON {SCRATCH}.items TO {SVC_USER}")
    try:
        yield f"{SCRATCH}.items"
    finally:
        admin.execute(f"DROP SCHEMA IF EXISTS {SCRATCH} CASCADE")


def active_backends(admin: psycopg.Connection[Any], app: str, query: str) -> int:
    row = admin.execute(
        "SELECT count(*) FROM pg_stat_activity"
        " WHERE application_name = %s AND state = 'active' AND query = %s",
        (app, query),
    ).fetchone()
    assert row is not None
    return int(row[0])


# --- psql ----------------------------------------------------------------------------


def run_psql(
    pg: PgServer, proxy: Proxy, *args: str, timeout: float = 30
) -> subprocess.CompletedProcess[str]:
    env = proxy.env(USER, PASSWORD, PGSSLMODE="disable")  # the wheel's libpq has no SSL
    return subprocess.run(
        [str(pg.bin_dir / "psql"), "-X", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
        check=False,
    )


def test_psql_queries(pg: PgServer, proxy: Proxy) -> None:
    done = run_psql(pg, proxy, "-At", "-c", "SELECT count(*) FROM customers")
    assert (done.returncode, done.stdout, done.stderr) == (0, f"{CUSTOMERS}\n", "")
    done = run_psql(pg, proxy, "-At", "-c", "SELECT current_user, 1 + 1, NULL IS NULL")
    assert (done.returncode, done.stdout) == (0, f"{SVC_USER}|2|t\n")


def test_psql_multiple_statements_in_one_command(pg: PgServer, proxy: Proxy) -> None:
    done = run_psql(pg, proxy, "-At", "-c", "SELECT 1; SELECT 'two'; SELECT 3 WHERE false")
    assert (done.returncode, done.stderr) == (0, "")
    assert done.stdout == "1\ntwo\n"


def test_psql_copy_to_and_from(pg: PgServer, proxy: Proxy, tmp_path: Path) -> None:
    out = tmp_path / "customers.csv"
    done = run_psql(
        pg,
        proxy,
        "-c",
        # S608: a psql meta-command naming a file under tmp_path, not SQL built from input
        f"\\copy (SELECT id, email FROM customers ORDER BY id) TO '{out}' WITH (FORMAT csv)",  # noqa: S608
    )
    assert (done.returncode, done.stderr) == (0, "")
    lines = out.read_text().splitlines()
    assert len(lines) == CUSTOMERS
    assert lines[0].startswith("1,")
    done = run_psql(
        pg,
        proxy,
        "-At",
        "-c",
        "CREATE TEMP TABLE t (id int, email text)",
        "-c",
        f"\\copy t FROM '{out}' WITH (FORMAT csv)",
        "-c",
        "SELECT count(*), count(DISTINCT email), sum(id) FROM t",
    )
    assert (done.returncode, done.stderr) == (0, "")
    assert (
        done.stdout.splitlines()[-1]
        == f"{CUSTOMERS}|{CUSTOMERS}|{CUSTOMERS * (CUSTOMERS + 1) // 2}"
    )


def test_psql_error_reports_sqlstate(pg: PgServer, proxy: Proxy) -> None:
    done = run_psql(pg, proxy, "-v", "VERBOSITY=verbose", "-c", "SELECT 1/0")
    assert done.returncode == 1
    assert "ERROR:  22012: division by zero" in done.stderr
    assert "LOCATION:" in done.stderr  # the server's own error fields came through
    # ON_ERROR_STOP off: the session goes on after an error
    done = run_psql(pg, proxy, "-At", "-c", "SELECT 1/0", "-c", "SELECT 'after'")
    assert "division by zero" in done.stderr
    assert done.stdout == "after\n"


def test_psql_describe_table(pg: PgServer, proxy: Proxy) -> None:
    done = run_psql(pg, proxy, "-c", r"\d customers")
    assert (done.returncode, done.stderr) == (0, "")
    assert 'Table "public.customers"' in done.stdout
    for column in ("id", "full_name", "email", "phone", "street"):
        assert re.search(rf"^\s*{column}\s*\|", done.stdout, re.MULTILINE), column
    assert "customers_pkey" in done.stdout
    done = run_psql(pg, proxy, "-c", r"\dt")
    assert (done.returncode, done.stderr) == (0, "")
    assert "support_tickets" in done.stdout


# --- psycopg 3 -----------------------------------------------------------------------


def test_psycopg_simple_protocol(dsn: str) -> None:
    with (
        connect(dsn, autocommit=True) as conn,
        psycopg.ClientCursor(conn) as cur,
    ):
        # Several statements in one string only exist in the simple Query protocol.
        cur.execute("SELECT 1 AS a; SELECT %s::text AS b, %s::int AS c", ("x'y", 7))
        assert cur.fetchall() == [(1,)]
        assert cur.nextset()
        assert cur.fetchall() == [("x'y", 7)]
        assert cur.pgresult is not None
        assert cur.pgresult.fformat(0) == pq.Format.TEXT
        cur.execute("SELECT count(*) FROM customers")
        assert cur.fetchone() == (CUSTOMERS,)


def test_psycopg_extended_protocol_with_params(dsn: str, admin: psycopg.Connection[Any]) -> None:
    query = "SELECT email FROM customers WHERE id = %s AND full_name <> %s"
    expected = admin.execute(query, (42, "")).fetchone()
    with connect(dsn) as conn:
        assert conn.execute(query, (42, "")).fetchone() == expected
        with pytest.raises(errors.SyntaxError):  # extended: one statement per Parse
            conn.execute("SELECT %s; SELECT 2", (1,))
        conn.rollback()
        assert conn.execute("SELECT %s::int + %s::int", (40, 2)).fetchone() == (42,)


def test_psycopg_prepared_statement_reused(dsn: str) -> None:
    with connect(dsn, autocommit=True) as conn:
        query = "SELECT %s::int * 2, %s::text"
        results = [conn.execute(query, (i, str(i)), prepare=True).fetchone() for i in range(100)]
        assert results == [(i * 2, str(i)) for i in range(100)]
        prepared = conn.execute(
            "SELECT statement FROM pg_prepared_statements WHERE NOT from_sql"
        ).fetchall()
        assert [row[0] for row in prepared] == ["SELECT $1::int * 2, $2::text"]


def test_psycopg_pipeline_mode(dsn: str) -> None:
    with connect(dsn, autocommit=True) as conn:
        with conn.pipeline():
            cursors = [conn.execute("SELECT %s::int, %s::text", (i, f"n{i}")) for i in range(50)]
        assert [cur.fetchone() for cur in cursors] == [(i, f"n{i}") for i in range(50)]
        with conn.pipeline() as pipe:  # an error inside a pipeline, then more work
            first = conn.execute("SELECT 1")

            def failing_batch() -> None:  # the error surfaces at execute or at sync
                conn.execute("SELECT 1/0")
                pipe.sync()

            with pytest.raises(errors.DivisionByZero):
                failing_batch()
            after = conn.execute("SELECT 'after'")
        assert first.fetchone() == (1,)
        assert after.fetchone() == ("after",)


def test_psycopg_large_parameters_and_results(dsn: str) -> None:
    """Messages of megabytes, split across many reads (and TLS records) both ways."""
    text = "".join(chr(0x41 + i % 26) for i in range(6_000_000))
    with connect(dsn, autocommit=True) as conn:
        row = conn.execute("SELECT length(%s), sha256(%s::bytea)", (text, text)).fetchone()
        assert row == (len(text), hashlib.sha256(text.encode()).digest())
        blob = bytes(range(256)) * 20_000
        assert conn.execute("SELECT %b::bytea", (blob,), binary=True).fetchone() == (blob,)


def test_psycopg_server_side_cursor(dsn: str) -> None:
    with connect(dsn) as conn:
        with conn.cursor(name="big") as cur:
            cur.itersize = 7
            cur.execute("SELECT g, md5(g::text) FROM generate_series(1, 1000) AS g")
            rows = list(cur)
        assert len(rows) == 1000
        assert rows[-1][0] == 1000
        with conn.cursor(name="customers_cur", scrollable=True) as cur:
            cur.execute("SELECT id FROM customers ORDER BY id")
            assert cur.fetchmany(3) == [(1,), (2,), (3,)]
            cur.scroll(100, mode="absolute")
            assert cur.fetchone() == (101,)
        conn.commit()


def test_psycopg_binary_cursor(dsn: str) -> None:
    with connect(dsn) as conn, conn.cursor(binary=True) as cur:
        cur.execute(
            "SELECT %s::int8, 1.25::numeric, 'héllo'::text, '\\x00ff'::bytea,"
            " '2024-05-06 07:08:09+00'::timestamptz, ARRAY[1, NULL, 3], '{\"a\": [1]}'::jsonb,"
            " NULL::int",
            (2**40,),
        )
        assert cur.pgresult is not None
        assert all(cur.pgresult.fformat(i) == pq.Format.BINARY for i in range(8))
        assert cur.fetchone() == (
            2**40,
            decimal.Decimal("1.25"),
            "héllo",
            b"\x00\xff",
            dt.datetime(2024, 5, 6, 7, 8, 9, tzinfo=dt.UTC),
            [1, None, 3],
            {"a": [1]},
            None,
        )


def test_psycopg_copy_to_and_from(dsn: str) -> None:
    with connect(dsn) as conn, conn.cursor() as cur:
        with cur.copy("COPY (SELECT g, g * 2 FROM generate_series(1, 1000) AS g) TO STDOUT") as cp:
            cp.set_types(["int4", "int4"])
            rows = list(cp.rows())
        assert rows == [(g, g * 2) for g in range(1, 1001)]
        cur.execute("CREATE TEMP TABLE copied (a int, b text, c jsonb)")
        with cur.copy("COPY copied (a, b, c) FROM STDIN") as cp:
            for i in range(1000):
                cp.write_row((i, f"row\t{i}\n", None if i % 2 else '{"k": 1}'))
        cur.execute("SELECT count(*), sum(a), count(c), max(b) FROM copied")
        assert cur.fetchone() == (1000, 999 * 1000 // 2, 500, "row\t999\n")
        with cur.copy("COPY copied (a, b) FROM STDIN (FORMAT binary)") as cp:
            cp.set_types(["int4", "text"])
            for i in range(10):
                cp.write_row((i, "bin"))
        assert cur.execute("SELECT count(*) FROM copied WHERE b = 'bin'").fetchone() == (10,)


def test_psycopg_transactions(dsn: str, scratch: str, admin: psycopg.Connection[Any]) -> None:
    table = sql.SQL(scratch)
    admin.execute(sql.SQL("DELETE FROM {}").format(table))
    with connect(dsn) as conn:
        with conn.transaction():
            conn.execute(sql.SQL("INSERT INTO {} VALUES (1, 'kept')").format(table))
        assert conn.info.transaction_status == pq.TransactionStatus.IDLE
        conn.execute(sql.SQL("INSERT INTO {} VALUES (2, 'dropped')").format(table))
        assert conn.info.transaction_status == pq.TransactionStatus.INTRANS
        conn.rollback()
        conn.execute(sql.SQL("INSERT INTO {} VALUES (3, 'committed')").format(table))
        conn.commit()
    rows = admin.execute(sql.SQL("SELECT id, note FROM {} ORDER BY id").format(table)).fetchall()
    assert rows == [(1, "kept"), (3, "committed")]


def test_psycopg_error_in_transaction_then_rollback(dsn: str) -> None:
    with connect(dsn) as conn:
        conn.execute("SELECT 1")
        with pytest.raises(errors.DivisionByZero) as info:
            conn.execute("SELECT 1/0")
        assert info.value.sqlstate == "22012"
        assert conn.info.transaction_status == pq.TransactionStatus.INERROR
        with pytest.raises(errors.InFailedSqlTransaction):
            conn.execute("SELECT 2")
        conn.rollback()
        assert conn.info.transaction_status == pq.TransactionStatus.IDLE
        assert conn.execute("SELECT 'usable'").fetchone() == ("usable",)
        with pytest.raises(errors.UndefinedTable):
            conn.execute("SELECT * FROM no_such_table")
        conn.rollback()
        assert conn.execute("SELECT count(*) FROM orders").fetchone() == (ORDERS,)


def test_psycopg_notices(dsn: str) -> None:
    notices: list[tuple[str | None, str | None]] = []
    with connect(dsn, autocommit=True) as conn:
        conn.add_notice_handler(lambda diag: notices.append((diag.sqlstate, diag.message_primary)))
        conn.execute("DO $$BEGIN RAISE NOTICE 'hello %', 42; RAISE WARNING 'careful'; END$$")
        assert conn.execute("SELECT 1").fetchone() == (1,)
    assert notices == [("00000", "hello 42"), ("01000", "careful")]


def test_psycopg_listen_notify(dsn: str) -> None:
    channel = tag().replace("-", "_")
    with (
        connect(dsn, autocommit=True) as listener,
        connect(dsn, autocommit=True) as talker,
    ):
        listener.execute(f"LISTEN {channel}")
        talker.execute("SELECT pg_notify(%s, %s)", (channel, "first"))
        talker.execute(f"NOTIFY {channel}, 'second'")
        got = list(listener.notifies(timeout=10, stop_after=2))
        assert [(n.channel, n.payload) for n in got] == [(channel, "first"), (channel, "second")]
        # a notification names the sender's upstream backend: PostgreSQL's bytes, untouched
        sender = talker.execute("SELECT pg_backend_pid()").fetchone()
        assert {n.pid for n in got} == {sender[0] if sender else None}
        assert listener.execute("SELECT 1").fetchone() == (1,)


def test_psycopg_async_connection(dsn: str) -> None:
    async def main() -> list[tuple[Any, ...]]:
        async with await psycopg.AsyncConnection.connect(dsn, connect_timeout=10) as conn:
            cur = await conn.execute("SELECT id, email FROM customers WHERE id <= %s", (3,))
            rows = await cur.fetchall()
            async with conn.cursor(name="acur") as scur:
                await scur.execute("SELECT g FROM generate_series(1, 50) AS g")
                rows.append((len(await scur.fetchall()),))
            return rows

    rows = run_async(main())
    assert [r[0] for r in rows] == [1, 2, 3, 50]


def test_application_name_is_visible_upstream(dsn: str, admin: psycopg.Connection[Any]) -> None:
    app = tag()
    with connect(dsn, application_name=app) as conn:
        assert conn.info.parameter_status("application_name") == app
        assert conn.execute("SHOW application_name").fetchone() == (app,)
        rows = admin.execute(
            "SELECT usename, datname FROM pg_stat_activity WHERE application_name = %s", (app,)
        ).fetchall()
        assert rows == [(SVC_USER, "shop")]


# --- cancel ----------------------------------------------------------------------------


def test_cancel_stops_a_running_query(dsn: str, admin: psycopg.Connection[Any]) -> None:
    app = tag()
    with connect(dsn, autocommit=True, application_name=app) as conn:
        sent: list[float] = []

        def cancel_when_running() -> None:
            wait_until(
                lambda: active_backends(admin, app, "SELECT pg_sleep(30)") == 1,
                "pg_sleep to run upstream",
            )
            sent.append(time.monotonic())
            conn.cancel()

        thread = threading.Thread(target=cancel_when_running)
        thread.start()
        try:
            with pytest.raises(errors.QueryCanceled) as info:
                conn.execute("SELECT pg_sleep(30)")
            stopped = time.monotonic()
        finally:
            thread.join(timeout=15)
        assert info.value.sqlstate == "57014"
        assert sent
        assert stopped - sent[0] < 2
        assert conn.execute("SELECT 'still usable'").fetchone() == ("still usable",)


def test_cancel_safe_over_tls(dsn: str, admin: psycopg.Connection[Any]) -> None:
    """libpq's new cancel API repeats the connection's sslmode: SSLRequest, TLS, cancel."""
    app = tag()
    with connect(dsn, autocommit=True, application_name=app, sslmode="require") as conn:
        assert conn.pgconn.ssl_in_use

        def cancel_when_running() -> None:
            wait_until(
                lambda: active_backends(admin, app, "SELECT pg_sleep(30)") == 1,
                "pg_sleep to run upstream",
            )
            conn.cancel_safe(timeout=5)

        thread = threading.Thread(target=cancel_when_running)
        thread.start()
        started = time.monotonic()
        try:
            with pytest.raises(errors.QueryCanceled):
                conn.execute("SELECT pg_sleep(30)")
        finally:
            thread.join(timeout=15)
        assert time.monotonic() - started < 10
        assert conn.execute("SELECT 1").fetchone() == (1,)


def raw_cancel(proxy: Proxy, pid: int, secret: bytes) -> bytes:
    """Send a CancelRequest on its own connection; return what came back before EOF."""
    with socket.create_connection((proxy.host, proxy.port), timeout=10) as sock:
        sock.sendall(struct.pack("!iii", 16, fe.CANCEL_REQUEST, pid) + secret)
        received = b""
        while chunk := sock.recv(1024):
            received += chunk
        return received


def test_cancel_with_wrong_key_does_nothing(
    proxy: Proxy, dsn: str, admin: psycopg.Connection[Any]
) -> None:
    app = tag()
    query = "SELECT pg_sleep(30)"
    with connect(dsn, autocommit=True, application_name=app) as conn:
        pid = conn.info.backend_pid
        upstream_pid = conn.execute("SELECT pg_backend_pid()").fetchone()
        assert upstream_pid is not None
        assert pid != upstream_pid[0]  # clients see pgwarden's key, not the backend's
        outcome: list[BaseException | None] = []

        def sleeper() -> None:
            try:
                conn.execute(query)
            except psycopg.Error as exc:
                outcome.append(exc)
            else:
                outcome.append(None)

        thread = threading.Thread(target=sleeper)
        thread.start()
        try:
            wait_until(lambda: active_backends(admin, app, query) == 1, "pg_sleep to run")
            ignored_before = sum(e["event"] == "cancel.ignored" for e in proxy.events())
            assert raw_cancel(proxy, pid, b"\0\0\0\0") == b""  # wrong secret
            assert raw_cancel(proxy, pid ^ 0x5A5A5A5A, b"\0\0\0\1") == b""  # unknown pid
            assert raw_cancel(proxy, upstream_pid[0], b"\0\0\0\2") == b""  # backend's own pid
            wait_until(
                lambda: (
                    sum(e["event"] == "cancel.ignored" for e in proxy.events())
                    >= ignored_before + 3
                ),
                "pgwarden to log the ignored cancels",
            )
            deadline = time.monotonic() + 0.5
            while time.monotonic() < deadline:  # a forwarded cancel lands within ms
                assert active_backends(admin, app, query) == 1, "a bad cancel stopped the query"
                assert not outcome
                time.sleep(0.02)
        finally:
            conn.cancel()  # the right key still works
            thread.join(timeout=15)
        assert len(outcome) == 1
        assert isinstance(outcome[0], errors.QueryCanceled)
        assert conn.execute("SELECT 1").fetchone() == (1,)


# --- asyncpg ----------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def apg(target: str) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(target, timeout=10, command_timeout=10)
    try:
        yield conn
    finally:
        try:
            await asyncio.wait_for(conn.close(), 5)
        except TimeoutError:
            conn.terminate()


TYPED_QUERY = """
SELECT 42::int4 AS i4, (-2)::int2 AS i2, 9007199254740993::int8 AS i8,
       12345.678900::numeric(12, 6) AS num, 0.1::float8 AS f8, 1.5::float4 AS f4,
       'héllo wörld'::text AS txt, 'c'::char(3) AS ch, true AS b,
       '2024-02-29 23:59:59.123456+02'::timestamptz AS tstz,
       '2024-02-29 01:02:03'::timestamp AS ts, '2024-02-29'::date AS d,
       '1 day 02:03:04'::interval AS iv,
       '{"a": [1, 2, {"b": null}], "c": "é"}'::jsonb AS jb, '\\x00ff10'::bytea AS by,
       ARRAY[1, 2, NULL]::int[] AS arr, ARRAY['a', NULL, 'c']::text[] AS tarr,
       '{{1,2},{3,4}}'::int8[] AS arr2,
       'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11'::uuid AS u,
       '192.168.1.0/24'::cidr AS net, NULL::int AS nothing
"""


def test_asyncpg_binary_results_match_direct(dsn: str, direct_dsn: str) -> None:
    async def fetch(target: str) -> tuple[list[asyncpg.Record], list[asyncpg.Record]]:
        async with apg(target) as conn:
            return await conn.fetch(TYPED_QUERY), await conn.fetch("SELECT * FROM orders")

    through, direct = run_async(fetch(dsn)), run_async(fetch(direct_dsn))
    assert [dict(r) for r in through[0]] == [dict(r) for r in direct[0]]
    assert sorted(map(tuple, through[1])) == sorted(map(tuple, direct[1]))
    row = through[0][0]
    assert row["u"] == uuid.UUID("a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11")
    assert row["by"] == b"\x00\xff\x10"
    assert row["num"] == decimal.Decimal("12345.678900")
    assert row["arr2"] == [[1, 2], [3, 4]]
    assert len(through[1]) == ORDERS


def test_asyncpg_params_and_prepared(dsn: str) -> None:
    async def main() -> None:
        async with apg(dsn) as conn:
            rows = await conn.fetch(
                "SELECT id, email FROM customers WHERE id = ANY($1::int[]) ORDER BY id", [3, 1]
            )
            assert [r["id"] for r in rows] == [1, 3]
            text = "SELECT $1::int + $2::int AS s, $3::text AS t"
            stmt = await conn.prepare(text)
            for i in range(100):
                assert tuple(await stmt.fetchrow(i, 1, str(i))) == (i + 1, str(i))
            assert [a.name for a in stmt.get_attributes()] == ["s", "t"]
            count = await conn.fetchval(
                "SELECT count(*) FROM pg_prepared_statements WHERE statement = $1", text
            )
            assert count == 1

    run_async(main())


def test_asyncpg_cursors_in_transaction(dsn: str) -> None:
    async def main() -> None:
        async with apg(dsn) as conn, conn.transaction():
            query = "SELECT g FROM generate_series(1, $1::int) AS g"
            seen = [r["g"] async for r in conn.cursor(query, 103, prefetch=5)]
            assert seen == list(range(1, 104))
            cur = await conn.cursor("SELECT id FROM customers ORDER BY id")
            assert [r["id"] for r in await cur.fetch(4)] == [1, 2, 3, 4]
            assert await cur.forward(10) == 10
            row = await cur.fetchrow()
            assert row is not None
            assert row["id"] == 15

    run_async(main())


def test_asyncpg_executemany(dsn: str) -> None:
    async def main() -> None:
        async with apg(dsn) as conn:
            await conn.execute("CREATE TEMP TABLE many (a int, b text, c timestamptz)")
            when = dt.datetime(2024, 1, 1, tzinfo=dt.UTC)
            await conn.executemany(
                "INSERT INTO many VALUES ($1, $2, $3)", [(i, f"m{i}", when) for i in range(500)]
            )
            assert await conn.fetchrow("SELECT count(*), sum(a), min(c) FROM many") == (
                500,
                499 * 500 // 2,
                when,
            )

    run_async(main())


def test_asyncpg_copy_from_query_and_table(dsn: str) -> None:
    async def main() -> None:
        async with apg(dsn) as conn:
            out = io.BytesIO()
            result = await conn.copy_from_query(
                "SELECT g, 'r' || g FROM generate_series(1, $1::int) AS g",
                3,
                output=out,
                format="csv",
                timeout=10,
            )
            assert result == "COPY 3"
            assert out.getvalue() == b"1,r1\n2,r2\n3,r3\n"
            out = io.BytesIO()
            assert await conn.copy_from_table("orders", output=out, timeout=10) == f"COPY {ORDERS}"
            assert out.getvalue().count(b"\n") == ORDERS

    run_async(main())


def test_asyncpg_copy_records_to_table(dsn: str) -> None:
    """asyncpg writes its CopyData right behind the COPY query, before CopyInResponse.

    Whether those bytes reach pgwarden before the server's CopyInResponse is a
    race, so the copy is repeated: small batches lose it nearly every time.
    """

    async def main() -> None:
        async with apg(dsn) as conn:
            await conn.execute("CREATE TEMP TABLE copied (a int, b text)")
            for batch in range(5):
                records = [(batch * 10 + i, f"c{i}") for i in range(10)]
                result = await conn.copy_records_to_table("copied", records=records, timeout=3)
                assert result == "COPY 10"
            records = [(1000 + i, f"big{i}") for i in range(5000)]
            result = await conn.copy_records_to_table("copied", records=records, timeout=3)
            assert result == "COPY 5000"
            assert await conn.fetchval("SELECT count(*) FROM copied") == 5050

    run_async(main())


def test_asyncpg_timeout_cancels_and_connection_survives(dsn: str) -> None:
    async def main() -> float:
        async with apg(dsn) as conn:  # ssl="prefer": TLS, and its cancel uses TLS too
            with pytest.raises(TimeoutError):
                await conn.fetch("SELECT pg_sleep(30)", timeout=0.5)
            started = time.monotonic()
            # asyncpg waits for the cancelled statement's ReadyForQuery first
            assert await conn.fetchval("SELECT 'after'") == "after"
            return time.monotonic() - started

    assert run_async(main()) < 5


# --- pgbench ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bench_proxy(
    pg: PgServer, pki: Pki, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Proxy]:
    """pgbench tables (scale 1) in their own database and a pgwarden in front of it."""
    pg.create_service_account(SVC_USER, SVC_PASSWORD, BENCH_DB)  # grants future tables
    subprocess.run(
        [str(pg.bin_dir / "pgbench"), "-i", "-q", "-s", "1"],
        env=pg.env(dbname=BENCH_DB),
        capture_output=True,
        check=True,
        timeout=120,
    )
    launcher = ProxyLauncher(pg, pki, tmp_path_factory.mktemp("bench"))
    dsn = f"postgresql://{SVC_USER}@{pg.host}:{pg.port}/{BENCH_DB}"
    try:
        yield launcher(upstream={"dsn": dsn})
    finally:
        launcher.stop_all()


@pytest.mark.parametrize("mode", ["simple", "extended", "prepared"])
def test_pgbench_select_only(pg: PgServer, bench_proxy: Proxy, mode: str) -> None:
    env = bench_proxy.env(USER, PASSWORD, dbname=BENCH_DB, PGSSLMODE="disable")
    done = subprocess.run(
        [str(pg.bin_dir / "pgbench"), "-S", "-M", mode, "-c", "4", "-j", "2", "-T", "3", "-n"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )
    report = f"stdout:\n{done.stdout}\nstderr:\n{done.stderr}"
    assert done.returncode == 0, report
    assert "error" not in done.stderr.lower(), report
    assert f"query mode: {mode}" in done.stdout, report
    assert "number of failed transactions: 0 (0.000%)" in done.stdout, report
    processed = re.search(r"number of transactions actually processed: (\d+)", done.stdout)
    assert processed is not None, report
    assert int(processed.group(1)) > 100, report
    assert re.search(r"^tps = \d+(\.\d+)? \(without initial connection time\)$", done.stdout, re.M)


# --- byte-identical responses: a raw protocol client ---------------------------------------


def _msg(mtype: bytes, body: bytes) -> bytes:
    return mtype + struct.pack("!i", len(body) + 4) + body


def bind(
    portal: str,
    statement: str,
    params: list[bytes | None],
    param_formats: list[int],
    result_formats: list[int],
) -> bytes:
    body = portal.encode() + b"\0" + statement.encode() + b"\0"
    body += struct.pack(f"!h{len(param_formats)}h", len(param_formats), *param_formats)
    body += struct.pack("!h", len(params))
    for value in params:
        body += struct.pack("!i", -1) if value is None else struct.pack("!i", len(value)) + value
    body += struct.pack(f"!h{len(result_formats)}h", len(result_formats), *result_formats)
    return _msg(b"B", body)


def describe(kind: bytes, name: str) -> bytes:
    return _msg(b"D", kind + name.encode() + b"\0")


def execute(portal: str, max_rows: int = 0) -> bytes:
    return _msg(b"E", portal.encode() + b"\0" + struct.pack("!i", max_rows))


def close(kind: bytes, name: str) -> bytes:
    return _msg(b"C", kind + name.encode() + b"\0")


def copy_data(data: bytes) -> bytes:
    return _msg(b"d", data)


COPY_DONE = _msg(b"c", b"")


class RawClient:
    """A minimal protocol 3.0 client: SCRAM login, then requests and raw replies."""

    def __init__(self, host: str, port: int, user: str, password: str) -> None:
        self.sock = socket.create_connection((host, port), timeout=10)
        self.buf = bytearray()
        self.sock.sendall(
            fe.encode_startup([("user", user), ("database", "shop"), ("client_encoding", "UTF8")])
        )
        self._login(user, password)

    def close(self) -> None:
        try:
            self.sock.sendall(fe.TERMINATE_MESSAGE)
        finally:
            self.sock.close()

    def message(self) -> tuple[int, bytes]:
        """The next whole message (type, bytes including the header)."""
        while True:
            if len(self.buf) >= 5:
                end = 1 + struct.unpack_from("!i", self.buf, 1)[0]
                if len(self.buf) >= end:
                    msg = bytes(self.buf[:end])
                    del self.buf[:end]
                    return msg[0], msg
            chunk = self.sock.recv(1 << 16)
            if not chunk:
                raise ConnectionError(f"connection closed; unread: {bytes(self.buf)[:200]!r}")
            self.buf += chunk

    def exchange(self, request: bytes, until: bytes = b"Z", count: int = 1) -> bytes:
        """Send request; return every byte received up to the count-th `until` message."""
        self.sock.sendall(request)
        out = bytearray()
        while count:
            mtype, msg = self.message()
            out += msg
            count -= mtype == until[0]
        return bytes(out)

    def _login(self, user: str, password: str) -> None:
        scram = ScramClient(["SCRAM-SHA-256"], user, password)
        while True:
            mtype, msg = self.message()
            if mtype == ord("E"):
                raise ConnectionError(f"login failed: {msg!r}")
            if mtype == ord("Z"):
                return
            if mtype != ord("R"):
                continue  # ParameterStatus, BackendKeyData, NegotiateProtocolVersion
            code = struct.unpack_from("!i", msg, 5)[0]
            if code == 10:
                first = scram.get_client_first().encode()
                self.sock.sendall(fe.encode_sasl_initial("SCRAM-SHA-256", first))
            elif code == 11:
                scram.set_server_first(msg[9:].decode())
                self.sock.sendall(fe.encode_password(scram.get_client_final().encode()))
            elif code == 12:
                scram.set_server_final(msg[9:].decode())
            elif code != 0:
                raise ConnectionError(f"unexpected authentication request {code}")


@pytest.fixture
def raw_pair(proxy: Proxy, pg: PgServer) -> Iterator[tuple[RawClient, RawClient]]:
    """(direct as the service account, through pgwarden as dora)."""
    direct = RawClient(pg.host, pg.port, SVC_USER, SVC_PASSWORD)
    try:
        through = RawClient(proxy.host, proxy.port, USER, PASSWORD)
    except BaseException:
        direct.close()
        raise
    try:
        yield direct, through
    finally:
        through.close()
        direct.close()


def assert_same(
    pair: tuple[RawClient, RawClient], request: bytes, until: bytes = b"Z", count: int = 1
) -> bytes:
    direct, through = pair
    expected = direct.exchange(request, until, count)
    got = through.exchange(request, until, count)
    if got != expected:  # a short report: where they part, not two megabytes of repr
        at = next(
            (i for i, (a, b) in enumerate(zip(got, expected, strict=False)) if a != b),
            min(len(got), len(expected)),
        )
        pytest.fail(
            f"responses differ at byte {at} (direct {len(expected)} bytes, pgwarden"
            f" {len(got)}):\n direct:   {expected[max(0, at - 40) : at + 40]!r}\n"
            f" pgwarden: {got[max(0, at - 40) : at + 40]!r}"
        )
    return got


SIMPLE_CASES: dict[str, list[str]] = {
    "all_types": [TYPED_QUERY + ", point(1, 2) AS pt, 'x'::name AS nm, 1::oid AS o"],
    "nulls": ["SELECT NULL, NULL::int, ''::text, NULL::text[], ARRAY[NULL]::int[]"],
    "empty_result": ["SELECT id, email FROM customers WHERE false"],
    "empty_query": ["", ";"],
    "multi_statement": [
        "SELECT 1; SELECT 'two'::text, 2.0; VALUES (1, 'a'), (2, NULL); SHOW TimeZone"
    ],
    "error": ["SELECT 1/0", "SELECT 'after'"],
    "error_mid_batch": ["SELECT 1; SELECT 1/0; SELECT 3", "SELECT 4"],
    "syntax_error": ["SELEC 1", "SELECT * FROM no_such_table"],
    "notice": ["DO $$BEGIN RAISE NOTICE 'hello %', 42; RAISE WARNING 'careful'; END$$"],
    "large_text": ["SELECT repeat('x', 1048576), 'tail'", "SELECT repeat('yz', 400000)"],
    "ten_thousand_rows": ["SELECT g, md5(g::text), g * 1.5 FROM generate_series(1, 10000) AS g"],
    "table": ["SELECT * FROM customers ORDER BY id", "SELECT * FROM support_tickets ORDER BY id"],
    "copy_to_stdout": [
        "COPY (SELECT g, 'row ' || g, NULL FROM generate_series(1, 5000) AS g) TO STDOUT",
        "COPY customers TO STDOUT WITH (FORMAT csv, HEADER)",
        "COPY (SELECT repeat('z', 600000)) TO STDOUT (FORMAT binary)",
    ],
    "transaction": ["BEGIN", "SELECT 1", "SELECT 1/0", "SELECT 2", "ROLLBACK", "SELECT 3"],
    "parameter_status": ["SET DateStyle = 'SQL, DMY'", "SELECT '2024-02-29'::date, now() IS NULL"],
    "cursor": [
        "BEGIN; DECLARE c CURSOR FOR SELECT g FROM generate_series(1, 100) AS g",
        "FETCH 30 FROM c",
        "FETCH ALL FROM c",
        "CLOSE c; COMMIT",
    ],
}


@pytest.mark.parametrize("steps", SIMPLE_CASES.values(), ids=SIMPLE_CASES.keys())
def test_simple_query_responses_byte_identical(
    raw_pair: tuple[RawClient, RawClient], steps: list[str]
) -> None:
    for query in steps:
        assert_same(raw_pair, fe.encode_query(query))


def test_copy_from_stdin_byte_identical(raw_pair: tuple[RawClient, RawClient]) -> None:
    assert_same(raw_pair, fe.encode_query("CREATE TEMP TABLE t (a int, b text)"))
    data = b"".join(copy_data(f"{i}\tline {i}\n".encode()) for i in range(3000))
    assert_same(raw_pair, fe.encode_query("COPY t FROM STDIN"), until=b"G")
    assert_same(raw_pair, data + COPY_DONE)
    assert_same(raw_pair, fe.encode_query("COPY t FROM STDIN"), until=b"G")
    assert_same(raw_pair, copy_data(b"not a number\tx\n") + COPY_DONE)  # bad data: an error
    assert_same(raw_pair, fe.encode_query("SELECT count(*), sum(a) FROM t"))


def test_copy_data_pipelined_behind_query_byte_identical(
    raw_pair: tuple[RawClient, RawClient],
) -> None:
    """PostgreSQL reads CopyData that was sent before its CopyInResponse arrived."""
    raw_pair[1].sock.settimeout(3)  # what it does wrong is wait forever
    assert_same(raw_pair, fe.encode_query("CREATE TEMP TABLE t (a int, b text)"))
    data = b"".join(copy_data(f"{i}\tline {i}\n".encode()) for i in range(100))
    assert_same(raw_pair, fe.encode_query("COPY t FROM STDIN") + data + COPY_DONE)
    assert_same(raw_pair, fe.encode_query("SELECT count(*) FROM t"))


def test_copy_data_sent_before_copy_in_response_is_not_lost(
    raw_pair: tuple[RawClient, RawClient],
) -> None:
    """Rows sent early must not vanish while later ones arrive (a silent partial COPY)."""
    assert_same(raw_pair, fe.encode_query("CREATE TEMP TABLE t (a int)"))
    early = b"".join(copy_data(f"{i}\n".encode()) for i in range(100))
    assert_same(raw_pair, fe.encode_query("COPY t FROM STDIN") + early, until=b"G")
    late = b"".join(copy_data(f"{i}\n".encode()) for i in range(100, 200))
    reply = assert_same(raw_pair, late + COPY_DONE)
    assert b"COPY 200\0" in reply


def test_extended_copy_data_pipelined_behind_execute_byte_identical(
    raw_pair: tuple[RawClient, RawClient],
) -> None:
    """The same with Parse/Bind/Execute: the Sync after CopyDone is answered, not ignored."""
    raw_pair[1].sock.settimeout(3)
    assert_same(raw_pair, fe.encode_query("CREATE TEMP TABLE t (a int)"))
    request = fe.encode_parse("", "COPY t FROM STDIN") + bind("", "", [], [], []) + execute("")
    request += b"".join(copy_data(f"{i}\n".encode()) for i in range(100)) + COPY_DONE
    assert_same(raw_pair, request + fe.SYNC_MESSAGE)
    assert_same(raw_pair, fe.encode_query("SELECT count(*) FROM t"))


def _int4(value: int) -> bytes:
    return struct.pack("!i", value)


def extended_batches() -> list[tuple[bytes, int]]:
    """(request, number of ReadyForQuery it ends with), all binary results."""
    typed = fe.encode_parse(
        "",
        "SELECT $1::int4 + 1 AS a, $2::text AS b, $3::int8 AS c, '\\x0102'::bytea AS d,"
        " 1.5::numeric AS n, ARRAY[1, 2] AS arr, '{\"k\": 1}'::jsonb AS j",
        struct.pack("!hiii", 3, 23, 25, 20),
    )
    rows = fe.encode_parse(
        "s_rows", "SELECT g, g::text, g * 1.5 FROM generate_series(1, $1::int) AS g"
    )
    first = b"".join(
        [
            typed,
            bind("", "", [_int4(41), "héllo".encode(), None], [1, 0, 0], [1]),
            describe(b"P", ""),
            execute(""),
            rows,
            describe(b"S", "s_rows"),
            bind("p1", "s_rows", [b"2500"], [0], [1]),
            execute("p1", 30),
            execute("p1", 1000),
            execute("p1", 0),
            close(b"P", "p1"),
            close(b"S", "s_rows"),
            fe.SYNC_MESSAGE,
        ]
    )
    bad_parse = fe.encode_parse("", "SELEC $1") + bind("", "", [b"1"], [0], [1])
    bad_parse += describe(b"P", "") + execute("") + fe.SYNC_MESSAGE
    bad_execute = fe.encode_parse("", "SELECT 1 / $1::int") + bind("", "", [_int4(0)], [1], [1])
    bad_execute += execute("") + fe.SYNC_MESSAGE
    big = fe.encode_parse("big", "SELECT repeat('b', 700000), g FROM generate_series(1, 3) AS g")
    big += bind("", "big", [], [], [1]) + execute("") + fe.SYNC_MESSAGE
    odd = b"".join(
        [
            fe.encode_parse("", ""),  # empty query: EmptyQueryResponse
            bind("", "", [], [], []),
            describe(b"P", ""),
            execute(""),
            fe.encode_parse(
                "", "COPY (SELECT g, NULL FROM generate_series(1, 300) AS g) TO STDOUT"
            ),
            bind("", "", [], [], []),
            execute(""),
            fe.encode_parse("", "DO $$BEGIN RAISE NOTICE 'from extended'; END$$"),
            bind("", "", [], [], []),
            describe(b"P", ""),  # NoData
            execute(""),
            fe.encode_parse("", "SET DateStyle = 'German'"),  # ParameterStatus mid-batch
            bind("", "", [], [], []),
            execute(""),
            close(b"P", "never_opened"),
            close(b"S", "never_prepared"),
            fe.SYNC_MESSAGE,
        ]
    )
    return [(first, 1), (bad_parse, 1), (bad_execute, 1), (big, 1), (odd, 1)]


def test_extended_protocol_batch_byte_identical(raw_pair: tuple[RawClient, RawClient]) -> None:
    batches = extended_batches()
    for request, syncs in batches:  # one batch at a time
        assert_same(raw_pair, request, count=syncs)
    everything = b"".join(request for request, _ in batches)  # all pipelined at once
    assert_same(raw_pair, everything, count=sum(syncs for _, syncs in batches))


def test_extended_protocol_error_then_flush_byte_identical(
    raw_pair: tuple[RawClient, RawClient],
) -> None:
    """After an error the server skips to Sync; messages sent meanwhile are dropped."""
    assert_same(raw_pair, fe.encode_parse("", "SELEC 1") + fe.FLUSH_MESSAGE, until=b"E")
    assert_same(raw_pair, bind("", "", [], [], [1]) + execute("") + fe.SYNC_MESSAGE)
    request = fe.encode_parse("", "SELECT 7") + bind("", "", [], [], [1]) + execute("")
    assert_same(raw_pair, request + fe.FLUSH_MESSAGE, until=b"C")
    assert_same(raw_pair, fe.SYNC_MESSAGE)


def test_extended_copy_from_stdin_byte_identical(raw_pair: tuple[RawClient, RawClient]) -> None:
    assert_same(raw_pair, fe.encode_query("CREATE TEMP TABLE t (a int)"))
    start = fe.encode_parse("", "COPY t FROM STDIN") + bind("", "", [], [], [])
    start += execute("") + fe.SYNC_MESSAGE  # a Sync during COPY is ignored by the server
    assert_same(raw_pair, start, until=b"G")
    rows = b"".join(copy_data(f"{i}\n".encode()) for i in range(500))
    assert_same(raw_pair, rows + COPY_DONE + fe.SYNC_MESSAGE)
    assert_same(raw_pair, fe.encode_query("SELECT count(*), sum(a) FROM t"))


def test_bind_to_a_statement_not_parsed_through_pgwarden(
    raw_pair: tuple[RawClient, RawClient],
) -> None:
    """pgwarden answers such a Bind itself (26000, as PostgreSQL would), then skips to Sync."""
    _, through = raw_pair
    request = bind("", "no_such_statement", [], [], [1]) + execute("") + fe.SYNC_MESSAGE
    reply = through.exchange(request)
    assert reply.startswith(b"E")
    assert b"C26000\0" in reply
    assert reply.endswith(b"Z\0\0\0\5I")
    assert_same(raw_pair, fe.encode_query("SELECT 'after'"))


def test_newer_protocol_request_is_negotiated_down_to_3_0(proxy: Proxy) -> None:
    """NegotiateProtocolVersion carries the full version (3 << 16 | minor), as PostgreSQL's."""
    body = struct.pack("!i", 3 << 16 | 9) + b"user\0dora\0database\0shop\0_pq_.x\0y\0\0"
    with socket.create_connection((proxy.host, proxy.port), timeout=10) as sock:
        sock.sendall(struct.pack("!i", len(body) + 4) + body)
        reply = b""
        while len(reply) < 20:
            chunk = sock.recv(1024)
            assert chunk, reply
            reply += chunk
    assert reply[:20] == b"v" + struct.pack("!iii", 19, 3 << 16, 1) + b"_pq_.x\0"


@pytest.mark.skipif(pq.version() < 180000, reason="max_protocol_version needs libpq 18")
def test_libpq_asking_for_protocol_3_2_gets_3_0(dsn: str) -> None:
    with connect(dsn, max_protocol_version="3.2", autocommit=True) as conn:
        assert conn.pgconn.protocol_version == 3
        assert getattr(conn.pgconn, "full_protocol_version", 30000) == 30000
        assert conn.execute("SELECT 'negotiated'").fetchone() == ("negotiated",)
