"""A refusal ends a transaction the way an error does in PostgreSQL.

Strategy: a restricted role that may insert into a scratch table writes a row,
then runs a statement pgwarden refuses, through psycopg (simple protocol,
explicit transaction), psycopg's pipeline mode (one extended-protocol batch, an
implicit transaction) and asyncpg (extended protocol, explicit transaction). A
direct connection then checks what the database kept: nothing, as if the
refused statement had failed in PostgreSQL itself.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from typing import Any

import asyncpg
import psycopg
import pytest
from conftest import SVC_USER, TEST_POLICY, PgServer, Proxy

SCHEMA = "tx_scratch"
TABLE = f"{SCHEMA}.items"
INSERT = "INSERT INTO tx_scratch.items VALUES (%s, 'note')"
INSERT_ASYNCPG = "INSERT INTO tx_scratch.items VALUES ($1, 'note')"
REFUSED = "SELECT street FROM customers"  # address is denied to the role
CLERK_POLICY = TEST_POLICY.replace(
    "  dba:\n",
    f"""  clerk:
    members: [wendy]
    statements: [select, insert]
    tables: [public.customers, {TABLE}]
    columns: {{name: allow, email: redact, phone: redact, address: deny, free_text: redact}}
  dba:
""",
)


@pytest.fixture(scope="module")
def admin(pg: PgServer) -> Iterator[psycopg.Connection[Any]]:
    with psycopg.connect(pg.dsn(dbname="shop"), autocommit=True) as conn:
        conn.execute(f"DROP SCHEMA IF EXISTS {SCHEMA} CASCADE")
        conn.execute(f"CREATE SCHEMA {SCHEMA}")
        conn.execute(f"CREATE TABLE {TABLE} (id int PRIMARY KEY, note text)")
        conn.execute(f"GRANT USAGE ON SCHEMA {SCHEMA} TO {SVC_USER}")
        conn.execute(f"GRANT SELECT, INSERT ON {TABLE} TO {SVC_USER}")
        try:
            yield conn
        finally:
            conn.execute(f"DROP SCHEMA IF EXISTS {SCHEMA} CASCADE")


@pytest.fixture
def clerk(pgwarden: Callable[..., Proxy], admin: psycopg.Connection[Any]) -> str:
    proxy = pgwarden(policy_text=CLERK_POLICY, users={"wendy": "wendy-pw"})
    return proxy.dsn("wendy", "wendy-pw", sslmode="disable")


def kept(admin: psycopg.Connection[Any], row_id: int) -> bool:
    found = admin.execute("SELECT 1 FROM tx_scratch.items WHERE id = %s", (row_id,))
    return found.fetchone() is not None


def test_a_refusal_fails_the_open_transaction(clerk: str, admin: psycopg.Connection[Any]) -> None:
    with psycopg.connect(clerk) as conn:
        conn.execute(INSERT, (1,))
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute(REFUSED)
        assert conn.info.transaction_status == psycopg.pq.TransactionStatus.INERROR
        with pytest.raises(psycopg.errors.InFailedSqlTransaction):  # 25P02, from PostgreSQL
            conn.execute("SELECT 1")
        conn.rollback()
        assert conn.execute("SELECT 2").fetchone() == (2,)  # usable again
    assert not kept(admin, 1)


def test_commit_after_a_refusal_rolls_back(clerk: str, admin: psycopg.Connection[Any]) -> None:
    with psycopg.connect(clerk) as conn:
        conn.execute(INSERT, (2,))
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute(REFUSED)
        cur = conn.execute("COMMIT")
        assert cur.statusmessage == "ROLLBACK"  # what PostgreSQL answers in a failed block
    assert not kept(admin, 2)


def test_a_refusal_rolls_back_its_pipelined_batch(
    clerk: str, admin: psycopg.Connection[Any]
) -> None:
    with psycopg.connect(clerk, autocommit=True) as conn:

        def batch() -> None:
            with conn.pipeline():
                conn.execute(INSERT, (3,))
                conn.execute(REFUSED)

        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            batch()
        assert conn.execute(INSERT, (4,)).rowcount == 1
    assert not kept(admin, 3)  # one batch, one implicit transaction: rolled back
    assert kept(admin, 4)


def test_asyncpg_transaction_is_rolled_back_by_a_refusal(
    clerk: str, admin: psycopg.Connection[Any]
) -> None:
    async def run() -> None:
        conn = await asyncpg.connect(clerk)

        async def write_then_refused() -> None:
            async with conn.transaction():
                await conn.execute(INSERT_ASYNCPG, 5)
                await conn.fetch(REFUSED)

        try:
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                await write_then_refused()
            assert await conn.fetchval("SELECT 6") == 6
        finally:
            await conn.close()

    asyncio.run(run())
    assert not kept(admin, 5)


def test_outside_a_transaction_a_refusal_changes_nothing(
    clerk: str, admin: psycopg.Connection[Any]
) -> None:
    with psycopg.connect(clerk, autocommit=True) as conn:
        conn.execute(INSERT, (7,))
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute(REFUSED)
        assert conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
        assert conn.execute("SELECT 8").fetchone() == (8,)
    assert kept(admin, 7)
