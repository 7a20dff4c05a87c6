"""The `statement` event: one JSON line per statement, its shape and never its values."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import asyncpg
import psycopg
import pytest
from conftest import PASSWORDS, SVC_PASSWORD, SVC_USER, Proxy

from proxy.pgserver import PgServer

Launcher = Callable[..., Proxy]


def statements(proxy: Proxy, count: int) -> list[dict[str, Any]]:
    """The first `count` statement events (waiting for the log to be written)."""
    deadline = time.monotonic() + 5
    while True:
        found = [e for e in proxy.events() if e.get("event") == "statement"]
        if len(found) >= count or time.monotonic() > deadline:
            return found
        time.sleep(0.05)


def test_statement_events_through_both_protocols(pgwarden: Launcher, pg: PgServer) -> None:
    proxy = pgwarden()
    with psycopg.connect(pg.dsn(SVC_USER, SVC_PASSWORD, dbname="shop")) as direct:
        email = direct.execute("SELECT email FROM customers WHERE id = 9").fetchone()
    assert email is not None
    secret = email[0]
    with psycopg.connect(proxy.dsn("alice", PASSWORDS["alice"]), autocommit=True) as conn:
        conn.execute(f"SELECT id, email FROM customers WHERE email = '{secret}'")  # noqa: S608
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("SELECT street FROM customers WHERE email = 'refused-literal-1'")
        with pytest.raises(psycopg.errors.ProgramLimitExceeded):
            conn.execute("SELECT id FROM orders")  # over the cap of 50

    async def extended() -> None:
        conn = await asyncpg.connect(proxy.dsn("dora", PASSWORDS["dora"]))
        try:
            await conn.fetch("SELECT id FROM orders WHERE id < $1", 4)
        finally:
            await conn.close()

    asyncio.run(extended())
    events = statements(proxy, 4)
    lookup, refused, capped, dba = events[0], events[1], events[2], events[-1]
    assert lookup["fingerprint"] == "SELECT id , email FROM customers WHERE email = ?"
    assert lookup["verdict"] == "allow"
    assert lookup["rows"] == 1
    assert lookup["tables"] == ["public.customers"]
    assert lookup["user"] == "alice"
    assert lookup["role"] == "support"
    assert isinstance(lookup["duration_ms"], float)
    assert 0 <= lookup["upstream_ms"] <= lookup["duration_ms"]  # the rest is pgwarden's own
    assert refused["verdict"] == "refuse"
    assert refused["sqlstate"] == "42501"
    assert "street" in refused["reason"]
    assert capped["error"] == "54000"
    assert capped["rows"] == 0
    assert dba["fingerprint"] == "SELECT id FROM orders WHERE id < ?"
    assert dba["rows"] == 3
    assert dba["role"] == "dba"
    text = "\n".join(proxy.log_lines())
    assert secret not in text
    assert "refused-literal-1" not in text
