"""psycopg2 beyond the common scenario: named (server-side) cursors and its catalog
helpers (register_composite), in its default mode (a transaction per statement
group, client-side parameter binding, text results).

Strategy: what a legacy admin panel does with psycopg2, as each role; every value
received is leak-checked for support.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import psycopg2
import psycopg2.extras
import pytest
from conftest import Proxy

from .conftest import CompatRecord, Pii
from .scenario import (
    CURSOR_CAP_NOTE,
    CUSTOMERS,
    METADATA,
    ROW_CAP_SQL,
    ROW_CAP_SQLSTATE,
    SERVER_CURSOR,
    Role,
)

CLIENT = "psycopg2"


@pytest.fixture
def conn(compat_proxy: Proxy, role: Role, pii: Pii) -> Iterator[Any]:
    connection = psycopg2.connect(
        host=compat_proxy.host,
        port=compat_proxy.port,
        user=role.user,
        password=role.password,
        dbname="shop",
        sslmode="disable",
        connect_timeout=10,
    )
    try:
        yield connection
        pii.check(role, connection.notices, f"psycopg2 notices as {role}")
    finally:
        connection.close()


@pytest.mark.compat(client=CLIENT, feature=SERVER_CURSOR)
def test_named_cursor(conn: Any, role: Role, pii: Pii, compat_record: CompatRecord) -> None:
    """DECLARE ... CURSOR, FETCH FORWARD itersize: capped for support across fetches."""
    with conn.cursor(name="compat_small") as cur:
        cur.itersize = 7
        cur.execute("SELECT id, full_name, email FROM customers WHERE id <= %s ORDER BY id", (40,))
        under = list(cur)
    conn.rollback()
    over: list[Any] = []
    sqlstate = None
    try:
        with conn.cursor(name="compat_all") as cur:
            cur.itersize = 20
            cur.execute(ROW_CAP_SQL)
            over.extend(cur)
    except psycopg2.Error as exc:
        sqlstate = exc.pgcode
    conn.rollback()
    pii.check(role, [under, over], "psycopg2 named cursor")
    assert [r[0] for r in under] == list(range(1, 41))
    assert all(("***@" in r[2]) is role.restricted for r in under)
    if role.restricted:
        assert sqlstate == ROW_CAP_SQLSTATE
        # the batches before the one that crossed the cap arrived (2 x 20), then 54000
        assert [r[0] for r in over] == list(range(1, 2 * 20 + 1))
        compat_record.note(CURSOR_CAP_NOTE)
    else:
        assert (sqlstate, [r[0] for r in over]) == (None, list(range(1, CUSTOMERS + 1)))


@pytest.mark.compat(client=CLIENT, feature=METADATA)
def test_register_composite_and_server_info(conn: Any, role: Role, pii: Pii) -> None:
    """register_composite reads pg_type and pg_attribute (with a regtype cast)."""
    caster = psycopg2.extras.register_composite("public.customers", conn)
    assert [name for name, _ in zip(caster.attnames, caster.atttypes, strict=True)] == [
        "id",
        "full_name",
        "email",
        "phone",
        "street",
    ]
    assert conn.server_version >= 180000
    assert conn.get_parameter_status("server_version").startswith("18")
    with conn.cursor(cursor_factory=psycopg2.extras.RealDictCursor) as cur:
        cur.execute("SELECT id, email FROM customers WHERE id = %s", (3,))
        row = cur.fetchone()
    conn.rollback()
    pii.check(role, row, "psycopg2 RealDictCursor")
    assert row is not None
    assert ("***@" in row["email"]) is role.restricted
