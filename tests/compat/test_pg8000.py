"""pg8000 beyond the common scenario (which uses pg8000.native): its DB-API interface
and the server facts it keeps from the start-up.

Strategy: pg8000 is pure Python and speaks the extended protocol for every
statement (unnamed statements, text results); its DB-API module is what
SQLAlchemy's pg8000 dialect uses. Every value received is leak-checked for support.
"""

from __future__ import annotations

import pg8000.dbapi
import pg8000.native
import pytest
from conftest import Proxy

from .conftest import Pii
from .scenario import LOOKUP_SQL, METADATA, REFUSED, Role, with_params

CLIENT = "pg8000"


@pytest.mark.compat(client=CLIENT, feature="dbapi")
def test_dbapi_lookup_and_rollback(compat_proxy: Proxy, role: Role, pii: Pii) -> None:
    c = pii.customer
    conn = pg8000.dbapi.connect(
        role.user,
        host=compat_proxy.host,
        port=compat_proxy.port,
        password=role.password,
        database="shop",
        timeout=30,
    )
    try:
        cur = conn.cursor()
        cur.execute(with_params(LOOKUP_SQL, "%s"), (c.email,))
        rows = cur.fetchall()
        sql, sqlstate = REFUSED[role]
        with pytest.raises(pg8000.dbapi.DatabaseError) as info:
            cur.execute(sql)
        error = info.value.args[0]
        conn.rollback()
        cur.execute("SELECT 'after'")
        after = cur.fetchall()
    finally:
        conn.close()
    pii.check(role, [rows, error], "pg8000.dbapi")
    email = c.masked_email if role.restricted else c.email
    assert [tuple(r) for r in rows] == [
        (c.id, c.full_name, email, c.masked_phone if role.restricted else c.phone)
    ]
    assert error["C"] == sqlstate
    assert [tuple(r) for r in after] == [("after",)]


@pytest.mark.compat(client=CLIENT, feature=METADATA)
def test_parameter_statuses_and_columns(compat_proxy: Proxy, role: Role, pii: Pii) -> None:
    conn = pg8000.native.Connection(
        role.user,
        host=compat_proxy.host,
        port=compat_proxy.port,
        password=role.password,
        database="shop",
        timeout=30,
    )
    try:
        rows = conn.run("SELECT id, email FROM customers WHERE id = 1")
        columns = [col["name"] for col in conn.columns or []]
        statuses = dict(conn.parameter_statuses)
    finally:
        conn.close()
    pii.check(role, rows, "pg8000.native")
    assert columns == ["id", "email"]
    assert statuses["server_version"].startswith("18")
    assert statuses["client_encoding"] == "UTF8"
