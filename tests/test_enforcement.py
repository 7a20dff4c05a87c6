"""Policy enforcement end to end, beyond the attack table of tests/security/.

A role that may COPY, a policy reload reaching sessions that are already open, and
the schema snapshot catching up with a table created after pgwarden started.
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Callable

import asyncpg
import psycopg
import pytest
from conftest import PASSWORDS, SVC_PASSWORD, SVC_USER, TEST_POLICY, Proxy

from proxy.pgserver import PgServer

Launcher = Callable[..., Proxy]

CLERK_POLICY = TEST_POLICY.replace(
    "  dba:\n",
    """  clerk:
    members: [clerk1]
    statements: [select, copy_out]
    tables: [public.customers, public.orders]
    columns:
      name: allow
      email: {mask: email, lookup: equality}
      phone: last4
      address: deny
  dba:
""",
)
USERS = {**PASSWORDS, "clerk1": "clerk-pw"}


def connect(proxy: Proxy, user: str) -> psycopg.Connection[tuple[object, ...]]:
    return psycopg.connect(proxy.dsn(user, USERS[user]), autocommit=True)


def raw_emails(pg: PgServer) -> list[str]:
    with psycopg.connect(pg.dsn(SVC_USER, SVC_PASSWORD, dbname="shop")) as conn:
        return [r[0] for r in conn.execute("SELECT email FROM customers ORDER BY id")]


def test_copy_to_stdout_is_masked(pgwarden: Launcher, pg: PgServer) -> None:
    proxy = pgwarden(policy_text=CLERK_POLICY, users=USERS)
    with connect(proxy, "clerk1") as conn, conn.cursor() as cur:
        with cur.copy("COPY customers (id, email) TO STDOUT") as copy:
            data = b"".join(bytes(chunk) for chunk in copy)
        text = data.decode()
    emails = raw_emails(pg)
    assert len(text.splitlines()) == len(emails)
    assert not [e for e in emails if e in text]
    first = emails[0]
    assert f"1\t{first[0]}***@{first.split('@')[1]}" in text.splitlines()


def test_copy_is_refused_without_copy_out(pgwarden: Launcher) -> None:
    proxy = pgwarden(policy_text=CLERK_POLICY, users=USERS)
    with connect(proxy, "alice") as conn, conn.cursor() as cur:
        refused = pytest.raises(psycopg.errors.InsufficientPrivilege, match="COPY")
        with refused, cur.copy("COPY (SELECT id FROM orders) TO STDOUT") as copy:
            list(copy)
        assert cur.execute("SELECT 1").fetchone() == (1,)


def test_a_reload_reaches_open_sessions(pgwarden: Launcher) -> None:
    proxy = pgwarden(policy_text=CLERK_POLICY, users=USERS)
    with connect(proxy, "alice") as alice, connect(proxy, "clerk1") as clerk:
        assert alice.execute("SELECT count(*) FROM orders").fetchone() is not None
        assert clerk.execute("SELECT count(*) FROM orders").fetchone() is not None
        narrower = CLERK_POLICY.replace(
            "tables: [public.customers, public.support_tickets, public.orders]",
            "tables: [public.customers, public.support_tickets]",
        ).replace("members: [clerk1]", "members: [someone_else]")
        proxy.policy_path.write_text(narrower)
        proxy.process.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                alice.execute("SELECT count(*) FROM orders")
            except psycopg.errors.InsufficientPrivilege as exc:
                message = str(exc)
                break
            time.sleep(0.1)
        else:
            pytest.fail("the reloaded policy did not reach the open session")
        assert "public.orders" in message
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="no longer in role"):
            clerk.execute("SELECT 1")


def test_a_table_created_later_is_found_after_a_miss(pgwarden: Launcher, pg: PgServer) -> None:
    proxy = pgwarden()
    with psycopg.connect(pg.dsn(dbname="shop"), autocommit=True) as admin:
        admin.execute("DROP TABLE IF EXISTS public.late_table")
        admin.execute("CREATE TABLE public.late_table (id int)")
        admin.execute(f"GRANT SELECT ON public.late_table TO {SVC_USER}")
    try:
        with connect(proxy, "bob") as bob:  # analyst: tables public.*
            with pytest.raises(psycopg.errors.InsufficientPrivilege, match="unknown"):
                bob.execute("SELECT count(*) FROM late_table")
            deadline = time.monotonic() + 20
            while True:
                try:
                    assert bob.execute("SELECT count(*) FROM late_table").fetchone() == (0,)
                    break
                except psycopg.errors.InsufficientPrivilege:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.25)
    finally:
        with psycopg.connect(pg.dsn(dbname="shop"), autocommit=True) as admin:
            admin.execute("DROP TABLE public.late_table")


def test_a_statement_prepared_before_a_reload_is_not_executed_after_it(
    pgwarden: Launcher,
) -> None:
    proxy = pgwarden(policy_text=CLERK_POLICY, users=USERS)

    async def run() -> str:
        conn = await asyncpg.connect(proxy.dsn("alice", PASSWORDS["alice"]))
        try:
            stmt = await conn.prepare("SELECT id, full_name FROM customers WHERE id = $1")
            assert len(await stmt.fetch(1)) == 1
            # full_name becomes denied: the prepared text still selects it raw
            proxy.policy_path.write_text(
                CLERK_POLICY.replace("      name: allow\n", "      name: deny\n", 1)
            )
            proxy.process.send_signal(signal.SIGHUP)
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                try:
                    rows = await stmt.fetch(1)
                except asyncpg.InsufficientPrivilegeError as exc:
                    return str(exc)
                assert rows[0]["full_name"] is not None  # the old policy, still in force
                await asyncio.sleep(0.1)
            return "never refused"
        finally:
            await conn.close()

    assert "policy changed since this statement was prepared" in asyncio.run(run())
