"""asyncpg beyond the common scenario: portals read in batches, binary parameters,
pipelined executemany, and its type introspection.

Strategy: asyncpg speaks only the extended protocol and binary format, and looks up
every type it has no codec for with a recursive catalog query (introspection.py),
turning jit off around it with set_config: pgwarden must let all of that through
for a restricted role without letting anything else through. Every value received
is leak-checked for support.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from typing import Any, TypeVar

import asyncpg
import pytest
from conftest import Proxy

from .conftest import CompatRecord, Pii
from .scenario import (
    BINARY,
    CURSOR_CAP_NOTE,
    CUSTOMERS,
    LOOKUP_SQL,
    METADATA,
    PIPELINE,
    POOL,
    PREPARED_SQL,
    ROW_CAP_SQL,
    ROW_CAP_SQLSTATE,
    SERVER_CURSOR,
    Role,
)

T = TypeVar("T")
CLIENT = "asyncpg"
TIMEOUT_S = 30.0


@pytest.fixture
def received(role: Role, pii: Pii) -> Iterator[list[object]]:
    got: list[object] = []
    yield got
    pii.check(role, got, f"asyncpg as {role}")


def run_as(proxy: Proxy, role: Role, body: Any) -> Any:
    """Connect as role, await body(conn), close; bounded in time."""

    async def main() -> Any:
        conn = await asyncpg.connect(
            host=proxy.host,
            port=proxy.port,
            user=role.user,
            password=role.password,
            database="shop",
            ssl=False,
            timeout=10,
        )
        try:
            return await body(conn)
        finally:
            await conn.close(timeout=10)

    return asyncio.run(asyncio.wait_for(main(), TIMEOUT_S))


@pytest.mark.compat(client=CLIENT, feature=SERVER_CURSOR)
def test_cursor_reads_a_portal_in_batches(
    compat_proxy: Proxy, role: Role, received: list[object], compat_record: CompatRecord
) -> None:
    """conn.cursor(): Execute with a row limit, PortalSuspended, Execute again."""

    async def body(conn: asyncpg.Connection) -> tuple[Any, ...]:
        async with conn.transaction():
            under = [
                tuple(r)
                async for r in conn.cursor(PREPARED_SQL.replace("= $1", "<= $1"), 40, prefetch=7)
            ]
        over: list[Any] = []
        sqlstate = None
        try:
            async with conn.transaction():
                cursor = await conn.cursor(ROW_CAP_SQL)
                while batch := await cursor.fetch(20):
                    over.extend(tuple(r) for r in batch)
        except asyncpg.PostgresError as exc:
            sqlstate = exc.sqlstate
        return under, over, sqlstate

    under, over, sqlstate = run_as(compat_proxy, role, body)
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


@pytest.mark.compat(client=CLIENT, feature=BINARY)
def test_binary_parameters_and_results(
    compat_proxy: Proxy, role: Role, pii: Pii, received: list[object]
) -> None:
    """asyncpg sends parameters and reads results in binary: arrays, ranges, jsonb."""
    c = pii.customer

    async def body(conn: asyncpg.Connection) -> tuple[Any, ...]:
        lookup = await conn.fetch(LOOKUP_SQL + " AND id = ANY($2::int[])", c.email, [c.id])
        typed = await conn.fetchrow(
            "SELECT $1::int4range AS r, $2::jsonb AS j, $3::numeric AS n, $4::bytea AS b",
            asyncpg.Range(1, 5),
            json.dumps({"k": [1, 2]}),
            "12.50",
            b"\x00\x01",
        )
        return [tuple(r) for r in lookup], tuple(typed) if typed else ()

    lookup, typed = run_as(compat_proxy, role, body)
    received.extend([lookup, typed])
    email = c.masked_email if role.restricted else c.email
    phone = c.masked_phone if role.restricted else c.phone
    assert lookup == [(c.id, c.full_name, email, phone)]
    assert typed[0] == asyncpg.Range(1, 5)
    assert json.loads(typed[1]) == {"k": [1, 2]}
    assert str(typed[2]) == "12.50"
    assert typed[3] == b"\x00\x01"


@pytest.mark.compat(client=CLIENT, feature=PIPELINE)
def test_executemany_pipelines_binds(compat_proxy: Proxy, role: Role) -> None:
    """executemany sends every Bind/Execute before one Sync."""

    async def body(conn: asyncpg.Connection) -> int:
        await conn.executemany(PREPARED_SQL, [(n,) for n in range(1, 31)])
        return int(await conn.fetchval("SELECT 30"))

    assert run_as(compat_proxy, role, body) == 30


@pytest.mark.compat(client=CLIENT, feature=METADATA)
def test_type_introspection_and_settings(
    compat_proxy: Proxy, role: Role, received: list[object]
) -> None:
    """Codecs asyncpg must look up in the catalog (introspection with set_config('jit'))."""

    async def body(conn: asyncpg.Connection) -> tuple[Any, ...]:
        await conn.set_type_codec(
            "jsonb", encoder=json.dumps, decoder=json.loads, schema="pg_catalog"
        )
        decoded = await conn.fetchval("SELECT '{\"a\": [1]}'::jsonb")
        multirange = await conn.fetchval("SELECT '{[1,3), [5,7)}'::int4multirange")
        array = await conn.fetchval("SELECT $1::int8[]", [1, 2])
        settings = conn.get_settings()
        return (
            decoded,
            multirange,
            array,
            conn.get_server_version().major,
            settings.server_version,
            await conn.fetchval("SHOW jit"),
        )

    decoded, multirange, array, major, version, jit = run_as(compat_proxy, role, body)
    received.extend([decoded, version])
    assert decoded == {"a": [1]}
    assert [(r.lower, r.upper) for r in multirange] == [(1, 3), (5, 7)]
    assert array == [1, 2]
    assert major >= 18
    assert version.startswith("18")
    assert jit in ("on", "off")


@pytest.mark.compat(client=CLIENT, feature=POOL)
def test_pool_resets_connections_on_release(
    compat_proxy: Proxy, role: Role, pii: Pii, received: list[object]
) -> None:
    """A pool hands a session out again after its reset query (pg_advisory_unlock_all(),
    CLOSE ALL, UNLISTEN *, RESET ALL): a restricted role must pass it."""
    c = pii.customer

    async def main() -> list[Any]:
        async with asyncpg.create_pool(
            host=compat_proxy.host,
            port=compat_proxy.port,
            user=role.user,
            password=role.password,
            database="shop",
            ssl=False,
            min_size=1,
            max_size=2,
            timeout=10,
        ) as pool:
            got = []
            for _ in range(4):
                async with pool.acquire() as conn:
                    await conn.execute("SET application_name = 'compat-pool'")
                    got.append(tuple(await conn.fetchrow(LOOKUP_SQL, c.email) or ()))
                    got.append(await conn.fetchval("SHOW application_name"))
            return got

    got = asyncio.run(asyncio.wait_for(main(), TIMEOUT_S))
    received.extend(got)
    email = c.masked_email if role.restricted else c.email
    assert (
        got[0::2]
        == [(c.id, c.full_name, email, c.masked_phone if role.restricted else c.phone)] * 4
    )
    assert got[1::2] == ["compat-pool"] * 4
