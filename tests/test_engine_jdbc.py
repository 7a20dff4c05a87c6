"""The policy live_engine on the catalog queries JDBC drivers send for metadata.

Strategy: pgjdbc's DatabaseMetaData answers getPrimaryKeys and getIndexInfo with
pg_catalog queries that expand pg_index.indkey with information_schema's
_pg_expandarray, and getTypeInfo (like DBeaver's navigator) with a query over every
type: hundreds of rows. The texts below are pgjdbc 42.5's, as the database logged
them. Each is evaluated for the restricted role support, and the text pgwarden
would send is run on PostgreSQL as the service account and compared with the
client's own text run there: a catalog query must come back whole. The row cap
must keep holding wherever a statement reads anything but catalog relations; the
end-to-end path through pgjdbc is tests/compat/test_jdbc.py.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from typing import Any

import asyncpg
import pytest
from conftest import SVC_PASSWORD, SVC_USER

from proxy.analysis.engine import Engine
from proxy.pgserver import PgServer

CAP = 50  # TEST_POLICY: support's rows_per_query
Fetch = Callable[[str], list[tuple[Any, ...]]]

PRIMARY_KEYS = (
    "SELECT result.TABLE_CAT, result.TABLE_SCHEM, result.TABLE_NAME, result.COLUMN_NAME, "
    "result.KEY_SEQ, result.PK_NAME FROM (SELECT NULL AS TABLE_CAT, n.nspname AS TABLE_SCHEM, "
    "ct.relname AS TABLE_NAME, a.attname AS COLUMN_NAME, "
    "(information_schema._pg_expandarray(i.indkey)).n AS KEY_SEQ, ci.relname AS PK_NAME, "
    "information_schema._pg_expandarray(i.indkey) AS KEYS, a.attnum AS A_ATTNUM "
    "FROM pg_catalog.pg_class ct JOIN pg_catalog.pg_attribute a ON (ct.oid = a.attrelid) "
    "JOIN pg_catalog.pg_namespace n ON (ct.relnamespace = n.oid) "
    "JOIN pg_catalog.pg_index i ON ( a.attrelid = i.indrelid) "
    "JOIN pg_catalog.pg_class ci ON (ci.oid = i.indexrelid) WHERE true "
    "AND n.nspname = 'public' AND ct.relname = 'customers' AND i.indisprimary ) result "
    "where result.A_ATTNUM = (result.KEYS).x "
    "ORDER BY result.table_name, result.pk_name, result.key_seq"
)
INDEX_INFO = (
    "SELECT tmp.TABLE_CAT, tmp.TABLE_SCHEM, tmp.TABLE_NAME, tmp.NON_UNIQUE, "
    "tmp.INDEX_QUALIFIER, tmp.INDEX_NAME, tmp.TYPE, tmp.ORDINAL_POSITION, "
    "trim(both '\"' from pg_catalog.pg_get_indexdef(tmp.CI_OID, tmp.ORDINAL_POSITION, false)) "
    "AS COLUMN_NAME, CASE tmp.AM_NAME WHEN 'btree' THEN "
    "CASE tmp.I_INDOPTION[tmp.ORDINAL_POSITION - 1] & 1::smallint WHEN 1 THEN 'D' ELSE 'A' END "
    "ELSE NULL END AS ASC_OR_DESC, tmp.CARDINALITY, tmp.PAGES, tmp.FILTER_CONDITION "
    "FROM (SELECT NULL AS TABLE_CAT, n.nspname AS TABLE_SCHEM, ct.relname AS TABLE_NAME, "
    "NOT i.indisunique AS NON_UNIQUE, NULL AS INDEX_QUALIFIER, ci.relname AS INDEX_NAME, "
    "CASE i.indisclustered WHEN true THEN 1 ELSE CASE am.amname WHEN 'hash' THEN 2 ELSE 3 END "
    "END AS TYPE, (information_schema._pg_expandarray(i.indkey)).n AS ORDINAL_POSITION, "
    "ci.reltuples AS CARDINALITY, ci.relpages AS PAGES, "
    "pg_catalog.pg_get_expr(i.indpred, i.indrelid) AS FILTER_CONDITION, ci.oid AS CI_OID, "
    "i.indoption AS I_INDOPTION, am.amname AS AM_NAME FROM pg_catalog.pg_class ct "
    "JOIN pg_catalog.pg_namespace n ON (ct.relnamespace = n.oid) "
    "JOIN pg_catalog.pg_index i ON (ct.oid = i.indrelid) "
    "JOIN pg_catalog.pg_class ci ON (ci.oid = i.indexrelid) "
    "JOIN pg_catalog.pg_am am ON (ci.relam = am.oid) WHERE true "
    "AND n.nspname = 'public' AND ct.relname = 'customers') AS tmp "
    "ORDER BY NON_UNIQUE, TYPE, INDEX_NAME, ORDINAL_POSITION"
)
TYPE_INFO = (
    "SELECT t.typname,t.oid FROM pg_catalog.pg_type t "
    "JOIN pg_catalog.pg_namespace n ON (t.typnamespace = n.oid) "
    "WHERE n.nspname != 'pg_toast' AND (t.typrelid = 0 OR "
    "(SELECT c.relkind = 'c' FROM pg_catalog.pg_class c WHERE c.oid = t.typrelid))"
)


@pytest.fixture(scope="module")
def db(pg: PgServer) -> Iterator[Fetch]:
    """Runs SQL on the shop database as the service account (what pgwarden connects as)."""
    loop = asyncio.new_event_loop()
    conn = loop.run_until_complete(asyncpg.connect(pg.dsn(SVC_USER, SVC_PASSWORD, dbname="shop")))

    def fetch(sql: str) -> list[tuple[Any, ...]]:
        """The rows as a client of pgwarden gets them: without the hidden record keys."""
        rows = loop.run_until_complete(conn.fetch(sql))
        return [tuple(v for k, v in r.items() if not k.startswith("__pgw_rk")) for r in rows]

    try:
        yield fetch
    finally:
        loop.run_until_complete(conn.close())
        loop.close()


@pytest.mark.parametrize(
    ("sql", "rows"),
    [(PRIMARY_KEYS, 1), (INDEX_INFO, 3), (TYPE_INFO, CAP + 1)],
    ids=["getPrimaryKeys", "getIndexInfo", "getTypeInfo"],
)
def test_pgjdbc_metadata_queries_come_back_whole(
    live_engine: Engine, db: Fetch, sql: str, rows: int
) -> None:
    verdict = live_engine.evaluate("support", sql, extended=True)
    assert verdict.allowed, verdict.message
    assert verdict.sql is not None
    assert verdict.cap is None  # catalog relations only: rows that describe objects
    got = db(verdict.sql)
    assert got == db(sql)
    assert len(got) >= rows


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT c.relname, (SELECT count(*) FROM customers) FROM pg_catalog.pg_class c",
        "SELECT relname FROM pg_class UNION ALL SELECT email FROM customers",
        "WITH x AS (SELECT id FROM orders) SELECT t.typname FROM pg_type t, x",
        "SELECT t.typname FROM pg_type t WHERE t.oid IN (SELECT id FROM orders)",
        "SELECT g FROM generate_series(1, 1000) AS g",
        "SELECT 1",
        "SELECT typname FROM pg_type; SELECT id FROM orders",
        "FETCH 100 FROM c",
    ],
)
def test_the_row_cap_holds_unless_only_catalog_relations_are_read(
    live_engine: Engine, sql: str
) -> None:
    verdict = live_engine.evaluate("support", sql)
    assert verdict.allowed, verdict.message
    assert verdict.cap == CAP


def test_a_capped_query_still_gets_its_limit_and_an_uncapped_one_none(live_engine: Engine) -> None:
    capped = live_engine.evaluate("support", "SELECT id FROM orders")
    assert capped.sql is not None
    assert f"LIMIT {CAP + 1}" in capped.sql
    catalog = live_engine.evaluate("support", "SELECT typname FROM pg_type")
    assert catalog.sql is not None
    assert "LIMIT" not in catalog.sql
    declared = live_engine.evaluate("support", "DECLARE c CURSOR FOR SELECT typname FROM pg_type")
    assert (declared.allowed, declared.cap, declared.cursor) == (True, None, ("c", True))


@pytest.mark.parametrize(
    ("sql", "mentions"),
    [
        ("SELECT _pg_expandarray(indkey) FROM pg_index", "_pg_expandarray"),
        ("SELECT public._pg_expandarray(indkey) FROM pg_index", "public._pg_expandarray"),
        (
            "SELECT information_schema._pg_truetypid(a, t) FROM pg_attribute a, pg_type t",
            "information_schema._pg_truetypid",
        ),
        (
            'SELECT information_schema."_PG_EXPANDARRAY"(indkey) FROM pg_index',
            "information_schema._PG_EXPANDARRAY",
        ),
    ],
)
def test_only_the_listed_information_schema_helper_is_callable(
    live_engine: Engine, sql: str, mentions: str
) -> None:
    verdict = live_engine.evaluate("support", sql)
    assert not verdict.allowed
    assert (verdict.sqlstate, mentions in verdict.message) == ("42501", True), verdict.message


def test_the_helper_sees_masked_values_only(live_engine: Engine, db: Fetch) -> None:
    sql = (
        "SELECT (information_schema._pg_expandarray(ARRAY[email, phone])).x "
        "FROM customers WHERE id = 3"
    )
    verdict = live_engine.evaluate("support", sql)
    assert verdict.allowed, verdict.message
    assert verdict.sql is not None
    values = [row[0] for row in db(verdict.sql)]
    assert len(values) == 2
    assert all(str(v).count("***") == 1 for v in values)
