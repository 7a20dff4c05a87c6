"""The policy live_engine on what the Python and command-line clients of the compatibility
matrix send: regressions for the fixes their tests needed.

Strategy: each statement is one a real client sends unprompted (asyncpg's type
introspection, psql's \\dx), evaluated for the restricted role support; the text
pgwarden would send is then run on PostgreSQL as the service account, so a fix that
lets a statement through also has to keep it working. Next to each fix stand the
statements it must keep refusing: every widening is as narrow as the client needs.
The end-to-end path through the real clients is tests/compat/.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from typing import Any

import asyncpg
import pytest
from asyncpg import introspection
from conftest import SVC_PASSWORD, SVC_USER

from proxy.analysis.engine import Engine
from proxy.pgserver import PgServer

Fetch = Callable[..., list[tuple[Any, ...]]]

# psql 18's \dx: the extension list joins the set-returning function
# pg_available_extensions() (the view of the same name was already allowed).
PSQL_DX = (
    'SELECT e.extname AS "Name", e.extversion AS "Version", ae.default_version AS '
    '"Default version",n.nspname AS "Schema", d.description AS "Description" '
    "FROM pg_catalog.pg_extension e LEFT JOIN pg_catalog.pg_namespace n ON n.oid = "
    "e.extnamespace LEFT JOIN pg_catalog.pg_description d ON d.objoid = e.oid AND "
    "d.classoid = 'pg_catalog.pg_extension'::pg_catalog.regclass LEFT JOIN "
    "pg_catalog.pg_available_extensions() ae(name, default_version, comment) ON "
    "ae.name = e.extname ORDER BY 1"
)
# asyncpg turns jit off around its type introspection, and back on after it.
ASYNCPG_JIT = [
    "SELECT current_setting('jit') AS cur, set_config('jit', 'off', false) AS new",
    "SELECT set_config('jit', $1, false)",
]


@pytest.fixture(scope="module")
def db(pg: PgServer) -> Iterator[Fetch]:
    """Runs SQL with parameters on shop as the service account."""
    loop = asyncio.new_event_loop()
    conn = loop.run_until_complete(asyncpg.connect(pg.dsn(SVC_USER, SVC_PASSWORD, dbname="shop")))

    def fetch(sql: str, *args: object) -> list[tuple[Any, ...]]:
        return [tuple(r) for r in loop.run_until_complete(conn.fetch(sql, *args))]

    try:
        yield fetch
    finally:
        loop.run_until_complete(conn.close())
        loop.close()


def sent(live_engine: Engine, sql: str) -> str:
    """The text pgwarden sends for support (the client's own when unchanged)."""
    result = live_engine.evaluate("support", sql)
    assert result.allowed, result.message
    return result.sql or sql


# psql 18's \dO (collations) filters on the database encoding.
PSQL_DO = (
    'SELECT n.nspname AS "Schema", c.collname AS "Name" FROM pg_catalog.pg_collation c, '
    "pg_catalog.pg_namespace n WHERE n.oid = c.collnamespace AND c.collencoding IN "
    "(-1, pg_catalog.pg_char_to_encoding(pg_catalog.getdatabaseencoding())) "
    "AND n.nspname <> 'pg_catalog' ORDER BY 1, 2"
)


def test_psql_do_and_the_encoding_functions(live_engine: Engine, db: Fetch) -> None:
    assert db(sent(live_engine, PSQL_DO)) == db(PSQL_DO)
    assert db(sent(live_engine, "SELECT getdatabaseencoding(), pg_client_encoding()")) == [
        ("UTF8", "UTF8")
    ]


def test_psql_dx_lists_extensions(live_engine: Engine, db: Fetch) -> None:
    assert db(sent(live_engine, PSQL_DX)) == db(PSQL_DX)
    assert any(row[0] == "plpgsql" for row in db(sent(live_engine, PSQL_DX)))


@pytest.mark.parametrize("sql", ASYNCPG_JIT)
def test_asyncpg_may_turn_jit_off_and_on(live_engine: Engine, db: Fetch, sql: str) -> None:
    args = ["off"] if "$1" in sql else []
    assert db(sent(live_engine, sql), *args)


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT set_config('search_path', 'pg_temp, public', false)",
        "SELECT set_config('role', 'postgres', false)",
        "SELECT set_config('session_authorization', 'postgres', false)",
        "SELECT set_config('JIT' || '', 'off', false)",  # the name must be a literal
        "SELECT set_config(lower('jit'), 'off', false)",
        "SELECT set_config($1, 'off', false)",
        "SELECT set_config('jit', (SELECT email FROM customers LIMIT 1), false)",
        "SELECT set_config('jit', email, false) FROM customers",
        "SELECT set_config('jit', 'off')",  # not the three-argument built-in
        "SELECT public.set_config('jit', 'off', false)",
    ],
)
def test_set_config_stays_refused_beyond_safe_settings(live_engine: Engine, sql: str) -> None:
    result = live_engine.evaluate("support", sql)
    assert not result.allowed
    assert result.sqlstate == "42501", result.message


def test_asyncpg_type_introspection(live_engine: Engine, db: Fetch) -> None:
    """The recursive catalog query with `$1::oid[]` (sqlglot reads only pg_catalog.oid[])."""
    oids = [int(db("SELECT 'int4range'::regtype::oid")[0][0])]
    query = introspection.INTRO_LOOKUP_TYPES_13
    assert db(sent(live_engine, query), oids) == db(query, oids)
    assert db(sent(live_engine, introspection.TYPE_BY_NAME), "jsonb", "pg_catalog")


@pytest.mark.parametrize(
    ("sql", "args"),
    [
        ("SELECT $1::oid[]", [[1, 2]]),
        ("SELECT ARRAY['text', 'int4']::regtype[]::text[]", []),
        ("SELECT $1::regclass[]::text[]", [["pg_class"]]),
        ("SELECT CAST($1 AS pg_catalog.regnamespace[])::text[]", [["public"]]),
    ],
)
def test_arrays_of_oid_and_reg_types(
    live_engine: Engine, db: Fetch, sql: str, args: list[Any]
) -> None:
    assert db(sent(live_engine, sql), *args) == db(sql, *args)


def test_array_type_qualifying_keeps_masks_and_caps(live_engine: Engine) -> None:
    result = live_engine.evaluate(
        "support", "SELECT email, ARRAY[id]::oid[] FROM customers WHERE id = $1"
    )
    assert result.allowed
    assert result.sql is not None
    assert "pg_catalog.oid[]" in result.sql
    assert "***" in result.sql  # the e-mail is still read through its mask
    assert result.cap == 50


ASYNCPG_POOL_RESET = "SELECT pg_advisory_unlock_all();\nCLOSE ALL;\nUNLISTEN *;\nRESET ALL;"


def test_asyncpg_pool_reset_query(live_engine: Engine) -> None:
    """asyncpg's Connection.reset(), run by its pool on every release."""
    result = live_engine.evaluate("support", ASYNCPG_POOL_RESET)
    assert result.allowed, result.message


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT pg_advisory_lock(1)",
        "SELECT pg_advisory_unlock(1)",
        "SELECT pg_advisory_xact_lock(1)",
        "LISTEN compat",
        "NOTIFY compat",
        "SELECT pg_notify('compat', 'x')",
    ],
)
def test_locks_and_notifications_stay_refused(live_engine: Engine, sql: str) -> None:
    result = live_engine.evaluate("support", sql)
    assert not result.allowed
    assert result.sqlstate == "42501", result.message
