"""psycopg 3 beyond the common scenario: pipeline mode, server-side cursors, binary
results, and its type-introspection calls; sync and async connections alike.

Strategy: each test runs once per (client, role) with client psycopg (sync) or
psycopg-async, so every cell of those two columns is a real use of that API. All
rows are collected and leak-checked for support, binary ones included (decoded by
psycopg, and the raw wire bytes too via pgresult).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine, Iterator
from typing import Any, TypeVar

import psycopg
import pytest
from conftest import Proxy
from psycopg.types import TypeInfo
from psycopg.types.composite import CompositeInfo

from .conftest import CompatRecord, Pii
from .scenario import (
    BINARY,
    CURSOR_CAP_NOTE,
    CUSTOMERS,
    LOOKUP_SQL,
    METADATA,
    PIPELINE,
    PREPARED_SQL,
    REFUSED,
    ROW_CAP_SQL,
    ROW_CAP_SQLSTATE,
    SERVER_CURSOR,
    SINGLE_ROW,
    TICKETS_SQL,
    Role,
    with_params,
)

T = TypeVar("T")
CLIENTS = ["psycopg", "psycopg-async"]
TIMEOUT_S = 30.0


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(asyncio.wait_for(coro, TIMEOUT_S))


def q(sql: str) -> str:
    return with_params(sql, "%s")


@pytest.fixture
def dsn(compat_proxy: Proxy, role: Role) -> str:
    return compat_proxy.dsn(role.user, role.password, sslmode="disable")


@pytest.fixture
def received(role: Role, pii: Pii) -> Iterator[list[object]]:
    """Append what the client received; it is leak-checked after the test."""
    got: list[object] = []
    yield got
    pii.check(role, got, f"psycopg as {role}")


def sync_or_async(
    client: str, sync: Callable[[], T], coro: Callable[[], Coroutine[Any, Any, T]]
) -> T:
    return sync() if client == "psycopg" else run(coro())


# --- pipeline -------------------------------------------------------------------------


@pytest.mark.compat(feature=PIPELINE)
@pytest.mark.parametrize("client", CLIENTS)
def test_pipeline(dsn: str, client: str, role: Role, pii: Pii, received: list[object]) -> None:
    """Several statements in flight; an error in the middle aborts the rest, in order."""
    c = pii.customer
    refused, sqlstate = REFUSED[role]
    orders = "SELECT count(*) FROM orders WHERE customer_id = %s"

    def sync() -> tuple[Any, ...]:
        with psycopg.connect(dsn, autocommit=True) as conn:
            with conn.pipeline():
                lookup = conn.execute(q(LOOKUP_SQL), (c.email,))
                tickets = conn.execute(q(TICKETS_SQL), (c.id,))
                counts = conn.execute(orders, (c.id,))
            first = (lookup.fetchall(), tickets.fetchall(), counts.fetchall())
            sqlstate = None
            try:
                with conn.pipeline():
                    before = conn.execute(q(PREPARED_SQL), (c.id,))
                    conn.execute(refused)
                    conn.execute(q(PREPARED_SQL), (c.id,))
            except psycopg.Error as exc:
                sqlstate = exc.sqlstate
            after = conn.execute(q(PREPARED_SQL), (c.id,)).fetchall()
            return (*first, before.fetchall(), sqlstate, after)

    async def coro() -> tuple[Any, ...]:
        async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
            async with conn.pipeline():
                lookup = await conn.execute(q(LOOKUP_SQL), (c.email,))
                tickets = await conn.execute(q(TICKETS_SQL), (c.id,))
                counts = await conn.execute(orders, (c.id,))
            first = (await lookup.fetchall(), await tickets.fetchall(), await counts.fetchall())
            sqlstate = None
            try:
                async with conn.pipeline():
                    before = await conn.execute(q(PREPARED_SQL), (c.id,))
                    await conn.execute(refused)
                    await conn.execute(q(PREPARED_SQL), (c.id,))
            except psycopg.Error as exc:
                sqlstate = exc.sqlstate
            after = await (await conn.execute(q(PREPARED_SQL), (c.id,))).fetchall()
            return (*first, await before.fetchall(), sqlstate, after)

    lookup, tickets, counts, before, error, after = sync_or_async(client, sync, coro)
    received.extend([lookup, tickets, counts, before, after])
    email = c.masked_email if role.restricted else c.email
    assert lookup == [(c.id, c.full_name, email, c.masked_phone if role.restricted else c.phone)]
    assert [t[0] for t in tickets] == list(c.ticket_nos)
    assert counts[0][0] >= 1
    assert before == after == [(c.id, c.full_name, email)]
    assert error == sqlstate


# --- server-side cursors -------------------------------------------------------------


@pytest.mark.compat(feature=SERVER_CURSOR)
@pytest.mark.parametrize("client", CLIENTS)
def test_server_side_cursor(
    dsn: str, client: str, role: Role, received: list[object], compat_record: CompatRecord
) -> None:
    """A named cursor (DECLARE, then FETCH in batches): under the cap it reads all;
    over it, support is stopped with 54000 once the cap is passed, dba reads all."""
    small = "SELECT id, full_name, email FROM customers WHERE id <= 40 ORDER BY id"

    def sync() -> tuple[Any, ...]:
        with psycopg.connect(dsn) as conn:
            with conn.cursor(name="compat_small") as cur:
                cur.itersize = 7
                cur.execute(small)
                under = list(cur)
            conn.rollback()
            over: list[Any] = []
            sqlstate = None
            try:
                with conn.cursor(name="compat_all") as cur:
                    cur.itersize = 20
                    cur.execute(ROW_CAP_SQL)
                    over.extend(cur)
            except psycopg.Error as exc:
                sqlstate = exc.sqlstate
            return under, over, sqlstate

    async def coro() -> tuple[Any, ...]:
        async with await psycopg.AsyncConnection.connect(dsn) as conn:
            async with conn.cursor(name="compat_small") as cur:
                cur.itersize = 7
                await cur.execute(small)
                under = [row async for row in cur]
            await conn.rollback()
            over: list[Any] = []
            sqlstate = None
            try:
                async with conn.cursor(name="compat_all") as cur:
                    cur.itersize = 20
                    await cur.execute(ROW_CAP_SQL)
                    async for row in cur:
                        over.append(row)  # noqa: PERF401 (keep the rows that came before an error)
            except psycopg.Error as exc:
                sqlstate = exc.sqlstate
            return under, over, sqlstate

    under, over, sqlstate = sync_or_async(client, sync, coro)
    received.extend([under, over])
    assert [r[0] for r in under] == list(range(1, 41))
    assert all(("***@" in r[2]) is role.restricted for r in under)
    if role.restricted:
        assert sqlstate == ROW_CAP_SQLSTATE
        # the batches before the one that crossed the cap arrived (2 x 20), then 54000
        assert [r[0] for r in over] == list(range(1, 2 * 20 + 1))
        compat_record.note(CURSOR_CAP_NOTE)
    else:
        assert (sqlstate, [r[0] for r in over]) == (None, list(range(1, CUSTOMERS + 1)))


# --- binary ----------------------------------------------------------------------------


@pytest.mark.compat(feature=BINARY)
@pytest.mark.parametrize("client", CLIENTS)
def test_binary_results_and_parameters(
    dsn: str, client: str, role: Role, pii: Pii, received: list[object]
) -> None:
    """Binary parameters (the raw e-mail) and binary results; the wire bytes are checked too."""
    c = pii.customer
    sql = q(LOOKUP_SQL) + " AND id = ANY(%b)"
    tickets = q(TICKETS_SQL)

    def sync() -> tuple[Any, ...]:
        with psycopg.connect(dsn, autocommit=True) as conn, conn.cursor(binary=True) as cur:
            cur.execute(sql.replace("%s", "%b"), (c.email, [c.id]))
            rows = cur.fetchall()
            wire = _wire_values(cur)
            cur.execute(tickets.replace("%s", "%b"), (c.id,))
            return rows, wire, cur.fetchall(), _wire_values(cur)

    async def coro() -> tuple[Any, ...]:
        async with (
            await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn,
            conn.cursor(binary=True) as cur,
        ):
            await cur.execute(sql.replace("%s", "%b"), (c.email, [c.id]))
            rows = await cur.fetchall()
            wire = _wire_values(cur)
            await cur.execute(tickets.replace("%s", "%b"), (c.id,))
            return rows, wire, await cur.fetchall(), _wire_values(cur)

    rows, wire, ticket_rows, ticket_wire = sync_or_async(client, sync, coro)
    received.extend([rows, wire, ticket_rows, ticket_wire])
    email = c.masked_email if role.restricted else c.email
    phone = c.masked_phone if role.restricted else c.phone
    assert rows == [(c.id, c.full_name, email, phone)]
    assert wire[0] == c.id.to_bytes(4, "big")  # int4 in binary: the format really was binary
    assert [t[0] for t in ticket_rows] == list(c.ticket_nos)
    assert [t[2] for t in ticket_rows] == (
        [None] * len(ticket_rows) if role.restricted else list(c.bodies)
    )


def _wire_values(cur: psycopg.Cursor[Any] | psycopg.AsyncCursor[Any]) -> list[bytes | None]:
    """Every cell of the current result as the server sent it (binary format)."""
    res = cur.pgresult
    assert res is not None
    assert all(res.fformat(n) == 1 for n in range(res.nfields))
    return [res.get_value(r, n) for r in range(res.ntuples) for n in range(res.nfields)]


# --- metadata ---------------------------------------------------------------------------


@pytest.mark.compat(feature=METADATA)
@pytest.mark.parametrize("client", CLIENTS)
def test_type_introspection(dsn: str, client: str, received: list[object]) -> None:
    """TypeInfo/CompositeInfo.fetch: psycopg's catalog queries (regtype casts, to_regtype)."""

    def sync() -> tuple[Any, ...]:
        with psycopg.connect(dsn, autocommit=True) as conn:
            info = TypeInfo.fetch(conn, "int4")
            composite = CompositeInfo.fetch(conn, "customers")
            return info, composite, conn.info.server_version, conn.info.parameter_status("TimeZone")

    async def coro() -> tuple[Any, ...]:
        async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
            info = await TypeInfo.fetch(conn, "int4")
            composite = await CompositeInfo.fetch(conn, "customers")
            return info, composite, conn.info.server_version, conn.info.parameter_status("TimeZone")

    info, composite, version, tz = sync_or_async(client, sync, coro)
    assert info is not None
    assert (info.name, info.array_oid) == ("int4", 1007)
    assert composite is not None
    assert list(composite.field_names) == ["id", "full_name", "email", "phone", "street"]
    assert version >= 180000
    assert tz


# --- single-row mode -----------------------------------------------------------------


@pytest.mark.compat(feature=SINGLE_ROW)
@pytest.mark.parametrize("client", CLIENTS)
def test_stream_in_single_row_mode(
    dsn: str, client: str, role: Role, received: list[object]
) -> None:
    """cursor.stream(): libpq single-row mode. Over the cap, support gets no row at all."""

    def sync() -> tuple[list[Any], str | None]:
        got: list[Any] = []
        with psycopg.connect(dsn, autocommit=True) as conn:
            try:
                got.extend(conn.cursor().stream(ROW_CAP_SQL))
            except psycopg.Error as exc:
                return got, exc.sqlstate
        return got, None

    async def coro() -> tuple[list[Any], str | None]:
        got: list[Any] = []
        async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
            try:
                async for row in conn.cursor().stream(ROW_CAP_SQL):
                    got.append(row)  # noqa: PERF401 (keep the rows that came before an error)
            except psycopg.Error as exc:
                return got, exc.sqlstate
        return got, None

    rows, sqlstate = sync_or_async(client, sync, coro)
    received.append(rows)
    if role.restricted:
        assert (sqlstate, rows) == (ROW_CAP_SQLSTATE, [])
    else:
        assert (sqlstate, [r[0] for r in rows]) == (None, list(range(1, CUSTOMERS + 1)))
