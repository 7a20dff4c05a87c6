"""The scenario through every Python driver: psycopg 3 (sync, async), asyncpg,
psycopg2, pg8000.

Strategy: one test per feature, parametrized over driver (`client`) and role, each
step done with the driver's own API through pyclients.Db. The `db` fixture opens the
connection as the role through compat_proxy and, after the test, runs everything the
driver received through the leak check for support. Driver-specific features
(pipeline, server-side cursors, binary, the drivers' own metadata calls) are in
test_psycopg.py, test_asyncpg.py, test_psycopg2.py and test_pg8000.py.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from conftest import Proxy

from .conftest import CompatRecord, Pii, wait_for_active
from .pyclients import DRIVERS, Db, DbError
from .scenario import (
    CANCEL,
    CANCELLED_SQLSTATE,
    CUSTOMERS,
    LIST_TICKETS,
    LISTEN_CHANNEL,
    LISTEN_NOTIFY,
    LOGIN,
    LONG_SQL,
    LOOKUP_BY_EMAIL,
    LOOKUP_SQL,
    METADATA,
    POLICY_REFUSAL,
    PREPARED_REUSE,
    PREPARED_RUNS,
    PREPARED_SQL,
    REFUSED,
    REFUSED_SQLSTATE,
    ROW_CAP,
    ROW_CAP_SQL,
    ROW_CAP_SQLSTATE,
    TICKETS_SQL,
    TRANSACTION_ROLLBACK,
    Role,
)


@pytest.fixture(params=list(DRIVERS))
def client(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def db(client: str, role: Role, compat_proxy: Proxy, pii: Pii) -> Iterator[Db]:
    """A connection of `client` as `role`; what it received is leak-checked afterwards."""
    conn = DRIVERS[client](compat_proxy, role, f"compat-{client}-{secrets.token_hex(4)}")
    try:
        yield conn
    finally:
        conn.close()
    pii.check(role, conn.received, f"{client} as {role}")


def masked(role: Role, raw: str, mask: str) -> str:
    return mask if role.restricted else raw


@pytest.mark.compat(feature=LOGIN)
def test_login_and_startup_queries(db: Db) -> None:
    """What drivers and their users ask right after connecting."""
    user, version_num, version = db.fetch(
        "SELECT current_user, current_setting('server_version_num'), version()"
    )[0]
    assert user == "pgwarden_svc"
    assert int(version_num) >= 180000
    assert str(version).startswith("PostgreSQL ")
    for statement in (
        "SET application_name = 'compat-renamed'",
        "SET extra_float_digits = 3",
        "SET TIME ZONE 'UTC'",
        "SHOW server_version",
        "SHOW transaction_isolation",
        "SHOW standard_conforming_strings",
        "SHOW client_encoding",
        "SHOW DateStyle",
    ):
        db.fetch(statement)
    assert db.fetch("SHOW application_name") == [("compat-renamed",)]


@pytest.mark.compat(feature=LOOKUP_BY_EMAIL)
def test_lookup_by_email(db: Db, role: Role, pii: Pii) -> None:
    c = pii.customer
    assert db.fetch(LOOKUP_SQL, [c.email]) == [
        (
            c.id,
            c.full_name,
            masked(role, c.email, c.masked_email),
            masked(role, c.phone, c.masked_phone),
        )
    ]


@pytest.mark.compat(feature=LIST_TICKETS)
def test_list_tickets(db: Db, role: Role, pii: Pii) -> None:
    c = pii.customer
    rows = db.fetch(TICKETS_SQL, [c.id])
    assert [r[0] for r in rows] == list(c.ticket_nos)
    bodies = [r[2] for r in rows]
    assert bodies == ([None] * len(rows) if role.restricted else list(c.bodies))


@pytest.mark.compat(feature=REFUSED_SQLSTATE)
def test_refused_statement_reports_its_sqlstate(db: Db, role: Role) -> None:
    sql, sqlstate = REFUSED[role]
    with pytest.raises(DbError) as info:
        db.fetch(sql)
    assert info.value.sqlstate == sqlstate
    if role.restricted:
        assert info.value.by_pgwarden
        assert info.value.hint
    assert db.fetch("SELECT 'after'") == [("after",)]  # the session goes on


@pytest.mark.compat(feature=ROW_CAP)
def test_row_cap(db: Db, role: Role) -> None:
    if not role.restricted:
        assert [r[0] for r in db.fetch(ROW_CAP_SQL)] == list(range(1, CUSTOMERS + 1))
        return
    with pytest.raises(DbError) as info:
        db.fetch(ROW_CAP_SQL)
    assert info.value.sqlstate == ROW_CAP_SQLSTATE
    assert info.value.by_pgwarden
    assert db.fetch("SELECT count(*) FROM customers") == [(CUSTOMERS,)]


@pytest.mark.compat(feature=PREPARED_REUSE)
def test_prepared_statement_reused(db: Db, role: Role, compat_record: CompatRecord) -> None:
    results = db.prepared(PREPARED_SQL, [[n] for n in range(1, PREPARED_RUNS + 1)])
    assert [rows[0][0] for rows in results] == list(range(1, PREPARED_RUNS + 1))
    assert all(("***@" in rows[0][2]) is role.restricted for rows in results)
    if db.client != "psycopg2":
        return
    compat_record.note(
        "psycopg2 has no protocol-level prepared statements: the same statement runs "
        "100 times, bound client-side; SQL PREPARE/EXECUTE works for dba and is "
        "refused (42501) for restricted roles"
    )
    if role.restricted:
        with pytest.raises(DbError) as info:
            db.fetch("PREPARE compat_p (int) AS " + PREPARED_SQL)
        assert info.value.sqlstate == POLICY_REFUSAL
    else:
        db.fetch("PREPARE compat_p (int) AS " + PREPARED_SQL)
        assert [db.fetch(f"EXECUTE compat_p ({n})")[0][0] for n in (1, 2)] == [1, 2]


@pytest.mark.compat(feature=TRANSACTION_ROLLBACK)
def test_transaction_rollback(db: Db, role: Role, pii: Pii) -> None:
    sql, sqlstate = REFUSED[role]
    db.begin()
    assert db.fetch(PREPARED_SQL, [pii.customer.id])[0][0] == pii.customer.id
    if not role.restricted:
        db.fetch(f"CREATE TEMP TABLE compat_tx_{db.client.replace('-', '_')} (x int)")
    with pytest.raises(DbError) as info:
        db.fetch(sql)
    assert info.value.sqlstate == sqlstate
    db.rollback()
    assert db.fetch("SELECT 'after'") == [("after",)]
    if not role.restricted:  # the rollback undid what the transaction did
        name = f"pg_temp.compat_tx_{db.client.replace('-', '_')}"
        assert db.fetch("SELECT to_regclass($1) IS NULL", [name]) == [(True,)]


@pytest.mark.compat(feature=CANCEL)
def test_cancel_a_running_query(
    db: Db, pg_admin: psycopg.Connection[Any], compat_record: CompatRecord
) -> None:
    if db.client == "pg8000":
        # pg8000 has no cancel API; what its users do instead is statement_timeout
        db.fetch("SET statement_timeout = '50ms'")
        with pytest.raises(DbError) as info:
            db.fetch(LONG_SQL)
        assert info.value.sqlstate == CANCELLED_SQLSTATE
        compat_record.note("pg8000 has no cancel API: statement_timeout (57014) instead")
    else:
        error = db.cancel_running(lambda: wait_for_active(pg_admin, db.app))
        assert error.sqlstate == CANCELLED_SQLSTATE
    assert db.fetch("SELECT 'still usable'") == [("still usable",)]


@pytest.mark.compat(feature=LISTEN_NOTIFY)
def test_listen_notify(db: Db, role: Role, compat_record: CompatRecord) -> None:
    channel = f"{LISTEN_CHANNEL}_{db.client.replace('-', '_')}"
    if not role.restricted:
        assert db.listen_notify(channel, "from python") == ["from python"]
        return
    with pytest.raises(DbError) as info:
        db.listen_notify(channel, "from python")
    assert info.value.sqlstate == POLICY_REFUSAL
    assert info.value.by_pgwarden
    compat_record.refused(POLICY_REFUSAL, "LISTEN and NOTIFY are not statements support may run")


CATALOG_QUERIES = [
    # information_schema, as ORMs and admin panels read it
    "SELECT column_name, data_type FROM information_schema.columns"
    " WHERE table_schema = 'public' AND table_name = 'customers' ORDER BY ordinal_position",
    # pg_catalog with regclass casts, as drivers and psql do
    "SELECT a.attname, format_type(a.atttypid, a.atttypmod) FROM pg_catalog.pg_attribute a"
    " WHERE a.attrelid = 'public.customers'::regclass AND a.attnum > 0"
    " AND NOT a.attisdropped ORDER BY a.attnum",
    "SELECT i.indexrelid::regclass::text, i.indisprimary FROM pg_catalog.pg_index i"
    " WHERE i.indrelid = 'customers'::regclass ORDER BY 1",
    "SELECT c.relname FROM pg_catalog.pg_class c"
    " JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace"
    " WHERE n.nspname = 'public' AND c.relkind = 'r' ORDER BY 1",
    "SELECT t.typname, t.oid FROM pg_catalog.pg_type t WHERE t.oid = 'text'::regtype",
]


@pytest.mark.compat(feature=METADATA)
def test_catalog_queries(db: Db) -> None:
    columns = db.fetch(CATALOG_QUERIES[0])
    assert [c[0] for c in columns] == ["id", "full_name", "email", "phone", "street"]
    attributes = db.fetch(CATALOG_QUERIES[1])
    assert [a[0] for a in attributes] == ["id", "full_name", "email", "phone", "street"]
    indexes = db.fetch(CATALOG_QUERIES[2])
    assert ("customers_pkey", True) in indexes
    tables = [r[0] for r in db.fetch(CATALOG_QUERIES[3])]
    assert {"customers", "orders", "payment_cards", "support_tickets"} <= set(tables)
    assert db.fetch(CATALOG_QUERIES[4])[0][0] == "text"
