"""Hourly and daily row quotas end to end: shared, durable, fail closed.

Each test uses its own users (the ledger in `shop` is shared by every proxy of the
session) in a role `desk` with small limits: 20 rows per statement, 100 per hour,
150 per day. Statements that read a classified table (customers) count; orders is
not classified and does not.
"""

from __future__ import annotations

import asyncio
import select
import socket
import threading
import time
from collections.abc import Callable

import asyncpg
import psycopg
import pytest
from conftest import PASSWORDS, SVC_PASSWORD, SVC_USER, TEST_POLICY, Proxy

from proxy.pgserver import PgServer, free_port

Launcher = Callable[..., Proxy]
PER_QUERY, PER_HOUR = 20, 100


def desk_policy(*users: str) -> str:
    return TEST_POLICY.replace(
        "  dba:\n",
        f"""  desk:
    members: [{", ".join(users)}]
    statements: [select]
    tables: [public.customers, public.orders]
    columns:
      name: allow
      email: {{mask: email, lookup: equality}}
      phone: last4
      address: deny
    limits: {{rows_per_query: {PER_QUERY}, rows_per_hour: {PER_HOUR}, rows_per_day: 150}}
  dba:
""",
    )


def start(pgwarden: Launcher, *users: str, **overrides: object) -> Proxy:
    passwords = {u: f"{u}-pw" for u in users} | {"dora": PASSWORDS["dora"]}
    return pgwarden(policy_text=desk_policy(*users), users=passwords, **overrides)


def connect(proxy: Proxy, user: str) -> psycopg.Connection[tuple[object, ...]]:
    return psycopg.connect(proxy.dsn(user, f"{user}-pw"), autocommit=True)


def page(conn: psycopg.Connection[tuple[object, ...]], after: int) -> int:
    sql = "SELECT id, email FROM customers WHERE id > %s ORDER BY id LIMIT 20"
    return len(conn.execute(sql, (after,)).fetchall())


def read_until_refused(conn: psycopg.Connection[tuple[object, ...]]) -> tuple[int, str]:
    """Rows read in pages until the quota refuses; and the refusal's HINT."""
    got = 0
    for n in range(20):
        try:
            got += page(conn, (n * 20) % 180)
        except psycopg.errors.ConfigurationLimitExceeded as exc:
            return got, str(exc.diag.message_hint)
    pytest.fail("the hourly quota never ran out")


def test_the_hourly_quota_runs_out_and_the_session_goes_on(pgwarden: Launcher) -> None:
    proxy = start(pgwarden, "q_hour")
    with connect(proxy, "q_hour") as conn:
        got, hint = read_until_refused(conn)
        assert got == PER_HOUR
        assert "hourly quota of 100 rows used" in hint
        assert conn.execute("SELECT count(*) FROM orders").fetchone() == (400,)  # not classified
        with pytest.raises(psycopg.errors.ConfigurationLimitExceeded):
            conn.execute("SELECT count(*) FROM customers")
    deadline = time.monotonic() + 5
    while not [e for e in proxy.events() if e.get("event") == "quota.exhausted"]:
        assert time.monotonic() < deadline, proxy.log_tail()
        time.sleep(0.1)
    exhausted = next(e for e in proxy.events() if e.get("event") == "quota.exhausted")
    assert exhausted["user"] == "q_hour"
    assert exhausted["role"] == "desk"


def test_a_reused_prepared_statement_is_checked_at_every_bind(pgwarden: Launcher) -> None:
    proxy = start(pgwarden, "q_prepared")

    async def run() -> tuple[int, list[int]]:
        conn = await asyncpg.connect(proxy.dsn("q_prepared", "q_prepared-pw"))
        try:
            orders = await conn.prepare("SELECT count(*) FROM orders WHERE id > $1")
            stmt = await conn.prepare("SELECT id FROM customers WHERE id > $1 ORDER BY id LIMIT 20")
            got = 0
            for n in range(20):
                try:
                    got += len(await stmt.fetch((n * 20) % 180))
                except asyncpg.ConfigurationLimitExceededError:
                    break
            # a prepared statement that reads no classified table still runs, Bind after Bind
            return got, [await orders.fetchval(n) for n in range(3)]
        finally:
            await conn.close()

    assert asyncio.run(run()) == (PER_HOUR, [400, 399, 398])


def test_the_quota_survives_a_restart_and_is_shared_by_two_processes(
    pgwarden: Launcher,
) -> None:
    first = start(pgwarden, "q_shared")
    with connect(first, "q_shared") as conn:
        assert page(conn, 0) + page(conn, 20) + page(conn, 40) == 60
    second = start(pgwarden, "q_shared")  # another process on the same ledger
    time.sleep(0.5)  # the first process writes its charges in the background
    with connect(second, "q_shared") as conn:
        assert page(conn, 60) + page(conn, 80) == 40  # 100 used now, across both
        with pytest.raises(psycopg.errors.ConfigurationLimitExceeded):
            page(conn, 100)
    assert second.stop() == 0
    third = start(pgwarden, "q_shared")  # a restart: the ledger remembers
    with (
        connect(third, "q_shared") as conn,
        pytest.raises(psycopg.errors.ConfigurationLimitExceeded),
    ):
        page(conn, 0)


def test_four_connections_at_once_cannot_take_more_than_quota_plus_four_caps(
    pgwarden: Launcher,
) -> None:
    proxy = start(pgwarden, "q_exfil")
    received: list[int] = []
    lock = threading.Lock()

    def thief(kind: int) -> None:
        got = 0
        deadline = time.monotonic() + 20
        with connect(proxy, "q_exfil") as conn:
            n = 0
            while time.monotonic() < deadline:
                n += 1
                try:
                    if kind == 0:  # id ranges
                        got += len(
                            conn.execute(
                                "SELECT id, email FROM customers WHERE id BETWEEN %s AND %s",
                                ((n * 19) % 180, (n * 19) % 180 + 18),
                            ).fetchall()
                        )
                    elif kind == 1:  # OFFSET paging
                        sql = "SELECT id, full_name FROM customers ORDER BY id LIMIT 20 OFFSET %s"
                        got += len(conn.execute(sql, ((n * 20) % 180,)).fetchall())
                    elif kind == 2:  # a cursor, five rows per FETCH
                        with conn.transaction():
                            conn.execute("DECLARE c CURSOR FOR SELECT id, email FROM customers")
                            while rows := conn.execute("FETCH 5 FROM c").fetchall():
                                got += len(rows)
                    else:  # packing rows into one: refused outright
                        conn.execute("SELECT string_agg(email, ',') FROM customers")
                except (
                    psycopg.errors.ConfigurationLimitExceeded,  # the quota (53400)
                    psycopg.errors.ProgramLimitExceeded,  # the cursor's cap, if it comes first
                    psycopg.errors.InsufficientPrivilege,
                ):
                    if conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
                        conn.rollback()
                    conn.autocommit = True
        with lock:
            received.append(got)

    threads = [threading.Thread(target=thief, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert sum(received) <= PER_HOUR + 4 * PER_QUERY, received
    assert sum(received) > PER_HOUR - PER_QUERY  # the quota was the limit, not an accident


def test_an_unreachable_ledger_refuses_counted_statements_only(pgwarden: Launcher) -> None:
    dead = f"postgresql://nobody@127.0.0.1:{free_port()}/nowhere"
    proxy = start(pgwarden, "q_down", state_dsn=dead)
    with connect(proxy, "q_down") as conn:
        with pytest.raises(psycopg.errors.ConnectionFailure, match="ledger"):
            page(conn, 0)
        assert conn.execute("SELECT count(*) FROM orders").fetchone() == (400,)
    with psycopg.connect(proxy.dsn("dora", PASSWORDS["dora"]), autocommit=True) as dba:
        assert dba.execute("SELECT count(*) FROM customers").fetchone() == (200,)


class SwitchableRelay:
    """A TCP relay to PostgreSQL that can be turned off (it then hangs up at once)."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.up = False
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.1)
        self.port = self.listener.getsockname()[1]
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.stop.set()
        self.thread.join(timeout=5)
        self.listener.close()

    def _accept(self) -> None:
        while not self.stop.is_set():
            try:
                conn, _ = self.listener.accept()
            except TimeoutError:
                continue
            if not self.up:
                conn.close()
                continue
            threading.Thread(target=self._pipe, args=(conn,), daemon=True).start()

    def _pipe(self, conn: socket.socket) -> None:
        with conn, socket.create_connection(self.target) as upstream:
            pair = {conn: upstream, upstream: conn}
            while not self.stop.is_set():
                ready, _, _ = select.select(list(pair), [], [], 0.1)
                for sock in ready:
                    data = sock.recv(65536)
                    if not data:
                        return
                    pair[sock].sendall(data)


def test_service_comes_back_with_the_ledger(pgwarden: Launcher, pg: PgServer) -> None:
    relay = SwitchableRelay((pg.host, pg.port))
    try:
        dsn = f"postgresql://{SVC_USER}:{SVC_PASSWORD}@127.0.0.1:{relay.port}/shop"
        proxy = start(pgwarden, "q_back", state_dsn=dsn)
        with connect(proxy, "q_back") as conn:
            with pytest.raises(psycopg.errors.ConnectionFailure, match="ledger"):
                page(conn, 0)
            relay.up = True
            deadline = time.monotonic() + 15
            while True:
                try:
                    assert page(conn, 0) == PER_QUERY
                    break
                except psycopg.errors.ConnectionFailure:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.2)
        assert proxy.process.poll() is None
    finally:
        relay.close()
